//! Character sets (code point ranges) and byte sets (UTF-8 lead bytes).

/// Sorted, disjoint, non-adjacent code point ranges, never containing a surrogate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct CharSet(pub(super) Vec<(u32, u32)>);

impl CharSet {
    pub(super) const MAX: u32 = 0x10FFFF;
    const SURROGATES: (u32, u32) = (0xD800, 0xDFFF);

    pub(super) fn new(ranges: Vec<(u32, u32)>) -> Self {
        let mut pieces = Vec::new();
        for (lo, hi) in ranges {
            let (s_lo, s_hi) = Self::SURROGATES;
            if hi < s_lo || lo > s_hi {
                pieces.push((lo, hi));
                continue;
            }
            if lo < s_lo {
                pieces.push((lo, s_lo - 1));
            }
            if hi > s_hi {
                pieces.push((s_hi + 1, hi));
            }
        }
        pieces.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (lo, hi) in pieces {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Self(merged)
    }

    pub(super) fn full() -> Self {
        Self::new(vec![(0, Self::MAX)])
    }

    pub(super) fn single(c: char) -> Self {
        Self(vec![(c as u32, c as u32)])
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(super) fn complement(&self) -> Self {
        let mut gaps = Vec::new();
        let mut next = 0u32;
        for &(lo, hi) in &self.0 {
            if lo > next {
                gaps.push((next, lo - 1));
            }
            next = hi + 1;
        }
        if next <= Self::MAX {
            gaps.push((next, Self::MAX));
        }
        Self::new(gaps)
    }

    pub(super) fn lead_bytes(&self) -> ByteSet {
        let mut bytes = ByteSet::default();
        for &(lo, hi) in &self.0 {
            bytes.insert_code_points(lo, hi);
        }
        bytes
    }
}

/// A set of bytes: here, first bytes of UTF-8 encodings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(super) struct ByteSet([u64; 4]);

impl ByteSet {
    fn insert(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1 << (b & 63);
    }

    /// Adds the lead bytes of every code point in `lo..=hi`.
    pub(super) fn insert_code_points(&mut self, lo: u32, hi: u32) {
        // Per encoding length, lead bytes grow with the code point and cover every value between.
        for (seg_lo, seg_hi) in [
            (0, 0x7F),
            (0x80, 0x7FF),
            (0x800, 0xFFFF),
            (0x10000, 0x10FFFF),
        ] {
            let (a, b) = (lo.max(seg_lo), hi.min(seg_hi));
            if a <= b {
                for byte in lead_byte(a)..=lead_byte(b) {
                    self.insert(byte);
                }
            }
        }
    }

    pub(super) fn union(&mut self, other: &ByteSet) -> bool {
        let before = self.0;
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
        before != self.0
    }

    pub(super) fn intersects(&self, other: &ByteSet) -> bool {
        self.0.iter().zip(other.0).any(|(a, b)| a & b != 0)
    }
}

fn lead_byte(c: u32) -> u8 {
    match c {
        0..=0x7F => c as u8,
        0x80..=0x7FF => 0xC0 | (c >> 6) as u8,
        0x800..=0xFFFF => 0xE0 | (c >> 12) as u8,
        _ => 0xF0 | (c >> 18) as u8,
    }
}
