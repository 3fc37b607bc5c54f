//! x86-64 AVX2 + FMA + F16C kernels, selected at run time (no `-C target-cpu` needed).
//!
//! Integer dot products use `vpmaddubsw` (u8 × i8 → i16 pairs) then `vpmaddwd` (→ i32), as in
//! ggml's x86 `ggml_vec_dot_*`. Each tile computes `MR` activation rows × `NR` weight rows, so a
//! decoded weight block is reused `MR` times and an activation block `NR` times.
//!
//! - Q4_0 / Q4_1: nibbles are used unsigned (0..15); Q4_1's min and Q4_0's `-8` are both an
//!   offset `m` per block, added as `m · d_y · Σq_y` (Q8_1's `s`, or Q8_0's exact `d·Σq`).
//! - Q5_1: as Q4_1 with the fifth bits OR-ed in (quants 0..31), as ggml's x86
//!   `ggml_vec_dot_q5_1_q8_1`.
//! - Q8_0: `maddubs(|w|, sign(y, w))`. Q5_0 the same on its signed quants `q − 16` (the nibbles
//!   OR `0xF0` where the fifth bit is clear), exactly ggml's x86 `ggml_vec_dot_q5_0_q8_0`;
//!   IQ4_NL on its levels, the nibbles looked up in `kvalues_iq4nl` by `vpshufb`, as ggml's x86
//!   `ggml_vec_dot_iq4_nl_q8_0`.
//! - Q2_K / Q3_K / Q4_K / Q5_K / Q6_K: the 4/6/8-bit sub-block scales multiply the i16 pair sums
//!   inside `vpmaddwd`, so one float FMA per 256 weights; mins (and Q3_K's `-4`, Q6_K's `-32`)
//!   come from the Q8_K block sums. Q3_K's quants are used unsigned (`q + 4`, 0..7), which
//!   needs one `vpmaddubsw` per 32 weights where ggml's x86 `ggml_vec_dot_q3_K_q8_K` spends two
//!   (low bits and high bits apart); the integer super-block sum is the same.
//! - IQ4_XS: IQ4_NL's levels, `maddubs(|w|, sign(y, w))` per 32-weight sub-block, whose scale
//!   `ls − 32` multiplies the pair sums inside `vpmaddwd` as the K-quants' do (ggml's x86
//!   `ggml_vec_dot_iq4_xs_q8_K`).
//! - F32 / F16 / BF16: f32 FMAs on the f32 activations (BF16 widened by a 16-bit shift).

// Register tiles index several fixed-size arrays with the same row/column counters.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ops::Range;

use super::formats::{
    self, IQ4NL_BYTES, IQ4NL_QS, IQ4XS_BYTES, IQ4XS_QS, KVALUES_IQ4NL, Q2K_BYTES, Q2K_D, Q2K_QS,
    Q2K_SCALES, Q3K_BYTES, Q3K_D, Q3K_HMASK, Q3K_QS, Q3K_SCALES, Q4_0_BYTES, Q4_1_BYTES,
    Q5_0_BYTES, Q5_0_QH, Q5_0_QS, Q5_1_BYTES, Q5_1_QH, Q5_1_QS, Q5K_QH, Q6K_BYTES, Q6K_D, Q6K_QH,
    Q6K_QL, Q6K_SCALES, Q8_0_BYTES, QK, QK_K, iq4xs_scales, q3k_scale_words, round_f16,
};
use super::matmul::OutPtr;
use super::quantize::{Acts, GROUP};
use super::{QMatrix, WeightType};

/// Raw views of one matmul's operands for the tile kernels (shared with `avx512`).
pub(super) struct TileArgs {
    /// Weight data (`rows · rb` bytes) and bytes per row.
    pub(super) w: *const u8,
    pub(super) rb: usize,
    /// Blocks per row (of the activation/weight block size).
    pub(super) nb: usize,
    pub(super) cols: usize,
    pub(super) qs: *const i8,
    pub(super) d: *const f32,
    pub(super) s: *const f32,
    pub(super) bsums: *const i16,
    pub(super) x: *const f32,
}

impl TileArgs {
    pub(super) fn new(w: &QMatrix, acts: &Acts) -> TileArgs {
        TileArgs {
            w: w.data.as_ptr(),
            rb: w.row_bytes(),
            nb: acts.nb,
            cols: w.cols,
            qs: acts.qs.as_ptr(),
            d: acts.d.as_ptr(),
            s: acts.s.as_ptr(),
            bsums: acts.bsums.as_ptr(),
            x: acts.x.as_ptr(),
        }
    }

    /// Weight rows `j0..j0 + NR`.
    ///
    /// # Safety
    /// The rows exist.
    #[inline(always)]
    pub(super) unsafe fn weight_rows<const NR: usize>(&self, j0: usize) -> [*const u8; NR] {
        // SAFETY: the caller's.
        std::array::from_fn(|j| unsafe { self.w.add((j0 + j) * self.rb) })
    }

    /// The quants of activation rows `i0..i0 + MR`.
    ///
    /// # Safety
    /// The rows exist.
    #[inline(always)]
    pub(super) unsafe fn act_rows<const MR: usize>(&self, i0: usize) -> [*const i8; MR] {
        // SAFETY: the caller's.
        std::array::from_fn(|i| unsafe { self.qs.add((i0 + i) * self.cols) })
    }

    /// Where the scales (`scales`: `d` or `s`) of activation rows `i0..i0 + MR` start: block
    /// `b`'s is `GROUP · b` further (4-row groups are interleaved per block).
    ///
    /// # Safety
    /// The rows exist.
    #[inline(always)]
    pub(super) unsafe fn row_scales<const MR: usize>(
        &self,
        scales: *const f32,
        i0: usize,
    ) -> [*const f32; MR] {
        let at = |row: usize| row / GROUP * self.nb * GROUP + row % GROUP;
        // SAFETY: the caller's.
        std::array::from_fn(|i| unsafe { scales.add(at(i0 + i)) })
    }

    /// Where the 16 block sums per super-block of activation rows `i0..i0 + MR` start.
    ///
    /// # Safety
    /// The rows exist.
    #[inline(always)]
    pub(super) unsafe fn row_bsums<const MR: usize>(&self, i0: usize) -> [*const i16; MR] {
        // SAFETY: the caller's.
        std::array::from_fn(|i| unsafe { self.bsums.add((i0 + i) * self.nb * 16) })
    }
}

/// A tile kernel: activation rows `i0..i0+MR` × weight rows `j0..j0+NR`.
pub(super) type TileFn = unsafe fn(&TileArgs, usize, usize, OutPtr);

/// Walks `a × r` in tiles of at most `mr_max` activation rows × `nr_max` weight rows, weight
/// rows innermost, running the tile kernel `pick(mr, nr)` on each: the loop both x86 backends'
/// `compute` run.
///
/// # Safety
/// As [`compute`], with the CPU features of every kernel `pick` returns; `mr_max` is a
/// multiple of 4.
#[inline(always)]
pub(super) unsafe fn run_tiles(
    t: &TileArgs,
    a: Range<usize>,
    r: Range<usize>,
    (mr_max, nr_max): (usize, usize),
    pick: fn(usize, usize) -> TileFn,
    out: OutPtr,
) {
    let mut i = a.start;
    while i < a.end {
        let mr = (a.end - i).min(mr_max);
        let mut j = r.start;
        while j < r.end {
            let nr = (r.end - j).min(nr_max);
            // SAFETY: i + mr ≤ a.end ≤ m, j + nr ≤ r.end ≤ rows, i is a multiple of 4 (a.start
            // and mr_max are); CPU features and output exclusivity are the caller's contract.
            unsafe { pick(mr, nr)(t, i, j, out) };
            j += nr;
        }
        i += mr;
    }
}

/// Computes `out[i, j]` for activation rows `a` × weight rows `r`.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `a.start` is a multiple of 4; `acts` was quantized for
/// `w.ty` with `acts.m ≥ a.end`, `w.rows ≥ r.end`; `out` is exclusively ours for `a × r`.
pub(crate) unsafe fn compute(
    w: &QMatrix,
    acts: &Acts,
    a: Range<usize>,
    r: Range<usize>,
    out: OutPtr,
) {
    debug_assert!(a.start.is_multiple_of(GROUP) && a.end <= acts.m && r.end <= w.rows);
    let t = TileArgs::new(w, acts);
    let gemv = acts.m == 1;
    let (nr_max, pick): (usize, fn(usize, usize) -> TileFn) = match w.ty {
        WeightType::Q4_0 => (if gemv { 4 } else { 1 }, pick_q4::<false, false>),
        WeightType::Q4_1 => (if gemv { 4 } else { 1 }, pick_q4::<true, false>),
        WeightType::Q5_1 => (if gemv { 4 } else { 1 }, pick_q4::<true, true>),
        WeightType::Q8_0 => (if gemv { 2 } else { 1 }, pick_q8_0::<SIGNED_Q8_0>),
        WeightType::Q5_0 => (if gemv { 4 } else { 1 }, pick_q8_0::<SIGNED_Q5_0>),
        WeightType::IQ4NL => (if gemv { 4 } else { 1 }, pick_q8_0::<SIGNED_IQ4NL>),
        WeightType::Q4K => (1, pick_k::<false>),
        WeightType::Q5K => (1, pick_k::<true>),
        WeightType::Q6K => (1, pick_q6k),
        WeightType::Q2K => (1, pick_q2k),
        WeightType::Q3K => (1, pick_q3k),
        WeightType::IQ4XS => (1, pick_iq4xs),
        WeightType::F32 => (1, pick_dense::<DENSE_F32>),
        WeightType::F16 => (1, pick_dense::<DENSE_F16>),
        WeightType::BF16 => (1, pick_dense::<DENSE_BF16>),
    };
    // SAFETY: the caller's contract; GROUP is 4.
    unsafe { run_tiles(&t, a, r, (GROUP, nr_max), pick, out) };
}

x86_tile_pickers!();

/// Element formats of [`tile_dense`].
const DENSE_F32: u8 = 0;
const DENSE_F16: u8 = 1;
const DENSE_BF16: u8 = 2;

fn pick_dense<const FMT: u8>(mr: usize, _nr: usize) -> TileFn {
    pick_mr_nr!(mr, 1, tile_dense, FMT)
}

/// GEMV software prefetch. A tile's weight rows are one contiguous range that it consumes
/// about evenly over its blocks; the cursor keeps every cache line up to `dist` bytes past the
/// consumption point requested, each line once. Rows are contiguous, so this walks the panel
/// linearly ahead of use. Without it the interleaved short row streams are latency bound at
/// about half the DRAM bandwidth.
struct Prefetch {
    next: usize,
    dist: usize,
}

impl Prefetch {
    /// For a tile of `tile_bytes` starting at `base`: about two tiles ahead, 2–8 KiB.
    #[inline(always)]
    fn new(base: *const u8, tile_bytes: usize) -> Prefetch {
        let dist = (2 * tile_bytes).clamp(2048, 8192);
        Prefetch {
            next: (base as usize + dist) & !63,
            dist,
        }
    }

    /// Consumption has reached `p`: request the lines up to `p + dist`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn upto(&mut self, p: *const u8) {
        let target = p as usize + self.dist;
        while self.next < target {
            // A prefetch never faults, so lines past the end of the weights are harmless.
            _mm_prefetch::<_MM_HINT_T0>(self.next as *const i8);
            self.next += 64;
        }
    }
}

/// The fixed horizontal sum of 8 lanes that every tile ends with; the order is part of the
/// results' bit pattern, so the `avx512` tiles call this same function.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// ggml's `bytes_from_bits_32`: byte `k` of the result is `0xFF` where bit `k` of the
/// little-endian u32 at `p` is set, else 0.
///
/// # Safety
/// AVX2 available; `p` is valid for 4 bytes (no alignment needed).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
    // SAFETY: 4 readable bytes (caller contract).
    let bits = unsafe { std::ptr::read_unaligned(p as *const i32) };
    // Byte k takes byte k/8 of the word, then every bit but bit k%8 is set: all ones iff set.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
    _mm256_cmpeq_epi8(others, _mm256_set1_epi64x(-1))
}

/// Q4_0 (`Q41 = false`, offset −8·d), Q4_1 (`Q41 = true`, offset m) and Q5_1 (`Q41` and
/// `FIVE`, offset m) × Q8_0/Q8_1.
///
/// # Safety
/// AVX2/FMA/F16C; the tile lies inside the operands described by `t` (see [`compute`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q4<const MR: usize, const NR: usize, const Q41: bool, const FIVE: bool>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    debug_assert!(Q41 || !FIVE);
    let (bb, qoff) = match (Q41, FIVE) {
        (true, true) => (Q5_1_BYTES, Q5_1_QS),
        (true, false) => (Q4_1_BYTES, 4),
        _ => (Q4_0_BYTES, 2),
    };
    let bit5 = _mm256_set1_epi8(0x10);
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut accm = [_mm_setzero_ps(); NR];
    // SAFETY (whole block): rows j0..j0+NR and i0..i0+MR exist (caller contract), so every
    // block pointer below stays inside its row: weight block b at b·bb (< rb), activation block
    // at b·32 (< cols), and the 4-row scale group at ((i0/4)·nb + b)·4 (< groups·nb·4).
    unsafe {
        let wrow = t.weight_rows::<NR>(j0);
        let mut pf = Prefetch::new(wrow[0], NR * t.rb);
        let yrow = t.act_rows::<MR>(i0);
        let dbase = t.d.add(i0 / GROUP * t.nb * GROUP);
        let sbase = t.s.add(i0 / GROUP * t.nb * GROUP);
        for b in 0..t.nb {
            let dx = _mm_loadu_ps(dbase.add(b * GROUP));
            let sx = _mm_loadu_ps(sbase.add(b * GROUP));
            let mut q = [_mm256_setzero_si256(); NR];
            let mut sc = [[0f32; GROUP]; NR];
            if MR == 1 {
                pf.upto(wrow[0].wrapping_add((b + 1) * NR * bb));
            }
            for j in 0..NR {
                let blk = wrow[j].add(b * bb);
                let (dw, mw) = if Q41 {
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                        blk as *const i32,
                    )));
                    (_mm_broadcastss_ps(dm), _mm_permute_ps::<0b01_01_01_01>(dm))
                } else {
                    let raw = std::ptr::read_unaligned(blk as *const u16);
                    let dw = _mm_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(raw as i32)));
                    (dw, _mm_mul_ps(dw, _mm_set1_ps(-8.0)))
                };
                accm[j] = _mm_fmadd_ps(mw, sx, accm[j]);
                _mm_storeu_ps(sc[j].as_mut_ptr(), _mm_mul_ps(dw, dx));
                let raw = _mm_loadu_si128(blk.add(qoff) as *const __m128i);
                q[j] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw), mask);
                if FIVE {
                    let hi = _mm256_and_si256(bytes_from_bits(blk.add(Q5_1_QH)), bit5);
                    q[j] = _mm256_or_si256(q[j], hi);
                }
            }
            for i in 0..MR {
                let y = _mm256_loadu_si256(yrow[i].add(b * QK) as *const __m256i);
                for j in 0..NR {
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q[j], y), ones);
                    acc[i][j] =
                        _mm256_fmadd_ps(_mm256_set1_ps(sc[j][i]), _mm256_cvtepi32_ps(p), acc[i][j]);
                }
            }
        }
        for j in 0..NR {
            let mut mins = [0f32; GROUP];
            _mm_storeu_ps(mins.as_mut_ptr(), accm[j]);
            for i in 0..MR {
                out.write(i0 + i, j0 + j, hsum(acc[i][j]) + mins[i]);
            }
        }
    }
}

/// The weight formats of [`tile_q8_0`] (and of `avx512`'s): blocks of 32 signed quants
/// ([`signed_quants`]) and an f16 `d` at offset 0.
pub(super) const SIGNED_Q8_0: u8 = 0;
pub(super) const SIGNED_Q5_0: u8 = 1;
pub(super) const SIGNED_IQ4NL: u8 = 2;

/// Bytes per block of a [`signed_quants`] format.
pub(super) const fn signed_block_bytes(fmt: u8) -> usize {
    match fmt {
        SIGNED_Q5_0 => Q5_0_BYTES,
        SIGNED_IQ4NL => IQ4NL_BYTES,
        _ => Q8_0_BYTES,
    }
}

/// The 32 signed quants of the block at `blk` in weight order: Q8_0's bytes, Q5_0's `q − 16`
/// (the nibbles OR `0xF0` where the fifth bit is clear), IQ4_NL's levels (−127..113).
///
/// # Safety
/// AVX2; `blk` points to a whole block of format `FMT`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn signed_quants<const FMT: u8>(blk: *const u8) -> __m256i {
    // SAFETY: the block's bytes are readable (caller contract): Q8_0 32 quants at 2; Q5_0 4
    // bytes of fifth bits at 2 and 16 bytes of nibbles at 6; IQ4_NL 16 bytes of nibbles at 2.
    unsafe {
        match FMT {
            SIGNED_Q5_0 => {
                let raw = _mm_loadu_si128(blk.add(Q5_0_QS) as *const __m128i);
                let nib = _mm256_and_si256(
                    _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw),
                    _mm256_set1_epi8(0x0F),
                );
                // Fifth bit clear: q − 16 = nibble − 16, the nibble with its high bits set.
                let high = _mm256_set1_epi8(0xF0u8 as i8);
                let neg = _mm256_andnot_si256(bytes_from_bits(blk.add(Q5_0_QH)), high);
                _mm256_or_si256(nib, neg)
            }
            SIGNED_IQ4NL => iq4_levels(blk.add(IQ4NL_QS)),
            _ => _mm256_loadu_si256(blk.add(2) as *const __m256i),
        }
    }
}

/// The levels (`kvalues_iq4nl`) of the 16 bytes of IQ4 nibbles at `qs`, in weight order: low
/// nibbles are weights 0..16, high nibbles 16..32 (one `vpshufb` of the 16-entry table).
///
/// # Safety
/// AVX2; `qs` is valid for 16 bytes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
pub(super) unsafe fn iq4_levels(qs: *const u8) -> __m256i {
    // SAFETY: 16 readable bytes (caller contract); the table is 16 bytes.
    unsafe {
        let table = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
        let raw = _mm_loadu_si128(qs as *const __m128i);
        let idx = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(raw), raw),
            _mm256_set1_epi8(0x0F),
        );
        _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(table), idx)
    }
}

/// Q8_0, Q5_0 and IQ4_NL (`FMT`: [`SIGNED_Q8_0`], [`SIGNED_Q5_0`], [`SIGNED_IQ4NL`]) × Q8_0.
///
/// # Safety
/// As [`tile_q4`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_q8_0<const MR: usize, const NR: usize, const FMT: u8>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    let bb = signed_block_bytes(FMT);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    // SAFETY: as in `tile_q4`, with blocks of `bb` bytes (see `signed_quants`).
    unsafe {
        let wrow = t.weight_rows::<NR>(j0);
        let mut pf = Prefetch::new(wrow[0], NR * t.rb);
        let yrow = t.act_rows::<MR>(i0);
        let dbase = t.d.add(i0 / GROUP * t.nb * GROUP);
        for b in 0..t.nb {
            let dx = _mm_loadu_ps(dbase.add(b * GROUP));
            let mut wq = [_mm256_setzero_si256(); NR];
            let mut aw = [_mm256_setzero_si256(); NR];
            let mut sc = [[0f32; GROUP]; NR];
            if MR == 1 {
                pf.upto(wrow[0].wrapping_add((b + 1) * NR * bb));
            }
            for j in 0..NR {
                let blk = wrow[j].add(b * bb);
                let raw = std::ptr::read_unaligned(blk as *const u16);
                let dw = _mm_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(raw as i32)));
                _mm_storeu_ps(sc[j].as_mut_ptr(), _mm_mul_ps(dw, dx));
                wq[j] = signed_quants::<FMT>(blk);
                aw[j] = _mm256_sign_epi8(wq[j], wq[j]);
            }
            for i in 0..MR {
                let y = _mm256_loadu_si256(yrow[i].add(b * QK) as *const __m256i);
                for j in 0..NR {
                    let sy = _mm256_sign_epi8(y, wq[j]);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], sy), ones);
                    acc[i][j] =
                        _mm256_fmadd_ps(_mm256_set1_ps(sc[j][i]), _mm256_cvtepi32_ps(p), acc[i][j]);
                }
            }
        }
        for i in 0..MR {
            for j in 0..NR {
                out.write(i0 + i, j0 + j, hsum(acc[i][j]));
            }
        }
    }
}

/// `vpshufb` control broadcasting 16-bit word `k` (0..8) of each 128-bit lane.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn word_splat(k: usize) -> __m256i {
    let lo = (2 * k) as i16;
    _mm256_set1_epi16(((lo + 1) << 8) | lo)
}

/// How the K-quant tiles add i16 pair sums times their sub-block scales to i32 sums: AVX2's
/// `vpmaddwd` then `vpaddd`, or one AVX-512 VNNI `vpdpwssd` (`avx512`). Both give the same
/// integers, so the tiles built on either give the same floats.
pub(super) trait ScaledSum {
    /// `sum + madd(pairs, scales)`, lane by lane.
    ///
    /// # Safety
    /// Inlined into a function that enables the instructions used.
    unsafe fn add(sum: __m256i, pairs: __m256i, scales: __m256i) -> __m256i;
}

/// [`ScaledSum`] with AVX2 instructions.
pub(super) struct Madd;

impl ScaledSum for Madd {
    #[inline(always)]
    unsafe fn add(sum: __m256i, pairs: __m256i, scales: __m256i) -> __m256i {
        // SAFETY: AVX2 is the caller's contract.
        unsafe { _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, scales)) }
    }
}

/// The K-quant tiles of one instruction set: `tile_k` (Q4_K, `FIVE`: Q5_K), `tile_q6k`,
/// `tile_q2k`, `tile_q3k` and `tile_iq4xs`, each `MR ≤ 8` activation rows × one weight row (a
/// `TileFn`): the shared bodies below compiled with `$features` (at least AVX2, FMA, F16C), their
/// scaled sums done by `$sum`.
macro_rules! k_tiles {
    (@small $features:literal, $sum:ty) => {
        $crate::kernels::avx2::k_tiles!(@one $features, $sum, tile_q2k, tile_q23k_rows, "Q2_K", false);
        $crate::kernels::avx2::k_tiles!(@one $features, $sum, tile_q3k, tile_q23k_rows, "Q3_K", true);
        $crate::kernels::avx2::k_tiles!(
            @one $features, $sum, tile_iq4xs, tile_iq4xs_rows, "IQ4_XS"
        );
    };
    ($features:literal, $sum:ty) => {
        /// Q4_K (`FIVE = false`) and Q5_K × Q8_K, one weight row.
        ///
        /// # Safety
        /// As `avx2::tile_k_rows`.
        #[target_feature(enable = $features)]
        unsafe fn tile_k<const MR: usize, const NR: usize, const FIVE: bool>(
            t: &TileArgs,
            i0: usize,
            j0: usize,
            out: OutPtr,
        ) {
            debug_assert_eq!(NR, 1);
            // SAFETY: forwarded contract, with the features enabled here.
            unsafe { super::avx2::tile_k_rows::<MR, FIVE, $sum>(t, i0, j0, out) }
        }

        $crate::kernels::avx2::k_tiles!(@one $features, $sum, tile_q6k, tile_q6k_rows, "Q6_K");
        $crate::kernels::avx2::k_tiles!(@small $features, $sum);
    };
    (@one $features:literal, $sum:ty, $name:ident, $body:ident, $ty:literal $(, $arg:tt)*) => {
        #[doc = concat!($ty, " × Q8_K, one weight row.")]
        ///
        /// # Safety
        /// As `avx2::tile_k_rows`.
        #[target_feature(enable = $features)]
        unsafe fn $name<const MR: usize, const NR: usize>(
            t: &TileArgs,
            i0: usize,
            j0: usize,
            out: OutPtr,
        ) {
            debug_assert_eq!(NR, 1);
            // SAFETY: forwarded contract, with the features enabled here.
            unsafe { super::avx2::$body::<MR, $($arg,)* $sum>(t, i0, j0, out) }
        }
    };
}
pub(super) use k_tiles;

k_tiles!("avx2,fma,f16c", Madd);

/// The activation rows of a K-quant tile, Q8_K: per super-block 256 quants, a `d` and 16 block
/// sums.
pub(super) struct KRows<const MR: usize> {
    pub(super) y: [*const i8; MR],
    pub(super) bsums: [*const i16; MR],
    /// `d` of the first row's 4-row group (groups of 4 rows are interleaved per block).
    d: *const f32,
    nb: usize,
}

impl<const MR: usize> KRows<MR> {
    /// # Safety
    /// Rows `i0..i0 + MR` exist in `t`; `i0` is a multiple of 4.
    #[inline(always)]
    pub(super) unsafe fn new(t: &TileArgs, i0: usize) -> Self {
        // SAFETY: the offsets stay inside the activation buffers for existing rows.
        unsafe {
            KRows {
                y: t.act_rows(i0),
                bsums: t.row_bsums(i0),
                d: t.d.add(i0 / GROUP * t.nb * GROUP),
                nb: t.nb,
            }
        }
    }

    /// Row `i`'s `d` of super-block `b`.
    #[inline(always)]
    unsafe fn d(&self, b: usize, i: usize) -> f32 {
        // SAFETY: `b < nb`, `i < MR` (the caller's).
        unsafe {
            *self
                .d
                .add(i / GROUP * self.nb * GROUP + b * GROUP + i % GROUP)
        }
    }

    /// Row `i`'s 16 block sums of super-block `b`.
    #[inline(always)]
    unsafe fn bsums(&self, b: usize, i: usize) -> __m256i {
        // SAFETY: as in `d`; AVX2 is the caller's contract.
        unsafe { _mm256_loadu_si256(self.bsums[i].add(b * 16) as *const __m256i) }
    }

    /// One run of 32 unpacked weight quants `q` (0..127) against every row's 32 activation
    /// quants at `off` of super-block `b`: `sums[i] = S::add(sums[i], maddubs(q, y_i), scales)`.
    #[inline(always)]
    unsafe fn dot<S: ScaledSum>(
        &self,
        sums: &mut [__m256i; MR],
        b: usize,
        off: usize,
        q: __m256i,
        scales: __m256i,
    ) {
        for i in 0..MR {
            // SAFETY: as in `d`, `off + 32 ≤ 256`; AVX2 is the caller's contract.
            unsafe {
                let y = _mm256_loadu_si256(self.y[i].add(b * QK_K + off) as *const __m256i);
                sums[i] = S::add(sums[i], _mm256_maddubs_epi16(q, y), scales);
            }
        }
    }
}

/// The frame of every K-quant tile (a macro, not a function taking a closure: a closure would
/// not be compiled with the caller's CPU features, and its intrinsics would not inline): weight
/// row `j0`'s super-blocks of `bytes` each, in order (prefetched ahead for GEMV), `$body` run
/// for each with `$blk` (its bytes), `$b` (its index), `$rows` (the activation rows) and `$acc`
/// (the rows' float sums), then each row's total ([`hsum`]) written out. Used inside `unsafe`,
/// in a body generic over `MR` (the rows, `≤ 8`).
macro_rules! k_frame {
    ($t:expr, $i0:expr, $j0:expr, $out:expr, $bytes:expr, |$blk:ident, $b:ident, $rows:ident, $acc:ident| $body:block) => {{
        let (t, i0, j0, out, bytes): (&TileArgs, usize, usize, OutPtr, usize) =
            ($t, $i0, $j0, $out, $bytes);
        let $rows = KRows::<MR>::new(t, i0);
        let mut $acc = [_mm256_setzero_ps(); MR];
        let wrow = t.w.add(j0 * t.rb);
        let mut pf = Prefetch::new(wrow, t.rb);
        for $b in 0..t.nb {
            let $blk = wrow.add($b * bytes);
            if MR == 1 {
                pf.upto($blk.wrapping_add(bytes));
            }
            $body
        }
        for (i, a) in $acc.iter().enumerate() {
            out.write(i0 + i, j0, hsum(*a));
        }
    }};
}

/// The Q4_K/Q5_K tile body (see [`k_tiles`]).
///
/// # Safety
/// As [`tile_q4`] for `MR ≤ 8` rows, inlined into a function that enables AVX2, FMA, F16C and
/// what `S` uses.
#[inline(always)]
pub(super) unsafe fn tile_k_rows<const MR: usize, const FIVE: bool, S: ScaledSum>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    let (bb, sc_off, qs_off) = formats::k4_layout(FIVE);
    // SAFETY: a super-block is `bb` bytes with the fields at the offsets of `formats`; the
    // rest is the caller's contract.
    unsafe {
        let (m4, m1) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x01));
        k_frame!(t, i0, j0, out, bb, |blk, b, rows, acc| {
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk as *const i32,
            )));
            let (dw, dmin) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
            let sm = k4_scales_mins(blk.add(sc_off));
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
            let mins = _mm_cvtepu8_epi16(_mm_srli_si128::<8>(sm));
            let mut hbits = if FIVE {
                _mm256_loadu_si256(blk.add(Q5K_QH) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let mut isum = [_mm256_setzero_si256(); MR];
            for c in 0..4 {
                let raw = _mm256_loadu_si256(blk.add(qs_off + 32 * c) as *const __m256i);
                let mut lo = _mm256_and_si256(raw, m4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
                if FIVE {
                    // Bit 2c of each qh byte is the 5th bit of the low nibble, bit 2c+1 of the high.
                    let hl = _mm256_slli_epi16::<4>(_mm256_and_si256(hbits, m1));
                    let hh =
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<1>(hbits), m1));
                    lo = _mm256_or_si256(lo, hl);
                    hi = _mm256_or_si256(hi, hh);
                    hbits = _mm256_srli_epi16::<2>(hbits);
                }
                let sl = _mm256_shuffle_epi8(scales, word_splat(2 * c));
                let sh = _mm256_shuffle_epi8(scales, word_splat(2 * c + 1));
                rows.dot::<S>(&mut isum, b, 64 * c, lo, sl);
                rows.dot::<S>(&mut isum, b, 64 * c + 32, hi, sh);
            }
            for i in 0..MR {
                let dy = rows.d(b, i);
                let bs = rows.bsums(b, i);
                let bs32 = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bs),
                    _mm256_extracti128_si256::<1>(bs),
                );
                let msum = _mm_cvtepi32_ps(_mm_madd_epi16(mins, bs32));
                acc[i] =
                    _mm256_fmadd_ps(_mm256_set1_ps(dw * dy), _mm256_cvtepi32_ps(isum[i]), acc[i]);
                let mterm = _mm256_set_m128(_mm_setzero_ps(), msum);
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * dy), mterm, acc[i]);
            }
        })
    }
}

/// `formats::unpack_scales_mins_k4` in registers (a store then a wider load would miss store
/// forwarding on every super-block): the 8 scales then the 8 mins of a Q4_K/Q5_K super-block
/// as bytes, from the words w0, w1, w2 of its 12 packed bytes: [w0 & 0x3f.., (w2 & 0x0f..) |
/// (w0 >> 2 & 0x30..), w1 & 0x3f.., (w2 >> 4 & 0x0f..) | (w1 >> 2 & 0x30..)].
///
/// # Safety
/// 16 bytes are readable at `p` (the quants follow the 12); inlined into a function that
/// enables AVX2.
#[inline(always)]
pub(super) unsafe fn k4_scales_mins(p: *const u8) -> __m128i {
    // SAFETY: the caller's.
    unsafe {
        let v = _mm_loadu_si128(p as *const __m128i);
        let x = _mm_srlv_epi32(
            _mm_shuffle_epi32::<0b10_01_10_00>(v),
            _mm_set_epi32(4, 0, 0, 0),
        );
        let y = _mm_srli_epi32::<2>(_mm_shuffle_epi32::<0b01_01_00_00>(v));
        let low = _mm_set_epi32(0x0f0f_0f0f, 0x3f3f_3f3f, 0x0f0f_0f0f, 0x3f3f_3f3f);
        let high = _mm_set_epi32(0x3030_3030, 0, 0x3030_3030, 0);
        _mm_or_si128(_mm_and_si128(x, low), _mm_and_si128(y, high))
    }
}

/// The Q6_K tile body (see [`k_tiles`]).
///
/// # Safety
/// As [`tile_k_rows`].
#[inline(always)]
pub(super) unsafe fn tile_q6k_rows<const MR: usize, S: ScaledSum>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    // SAFETY: as in `tile_k_rows` with the Q6_K field offsets.
    unsafe {
        let (m4, m3) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
        k_frame!(t, i0, j0, out, Q6K_BYTES, |blk, b, rows, acc| {
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk.add(Q6K_D) as *const u16,
            ) as i32)));
            let sc8 = _mm_loadu_si128(blk.add(Q6K_SCALES) as *const __m128i);
            let sc_lo = _mm_cvtepi8_epi16(sc8);
            let sc_hi = _mm_cvtepi8_epi16(_mm_srli_si128::<8>(sc8));
            let sc_all = _mm256_set_m128i(sc_hi, sc_lo);
            let mut isum = [_mm256_setzero_si256(); MR];
            for n in 0..2 {
                let scn = _mm256_broadcastsi128_si256(if n == 0 { sc_lo } else { sc_hi });
                let ql0 = _mm256_loadu_si256(blk.add(Q6K_QL + 64 * n) as *const __m256i);
                let ql1 = _mm256_loadu_si256(blk.add(Q6K_QL + 64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(blk.add(Q6K_QH + 32 * n) as *const __m256i);
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m3)),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                        _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m3)),
                    ),
                ];
                for (c, qc) in q.iter().enumerate() {
                    // Quants 0..16 of this run use scale 8n+2c, quants 16..32 scale 8n+2c+1.
                    let st = _mm256_shuffle_epi8(scn, sub_block_pair_splat(c));
                    rows.dot::<S>(&mut isum, b, 128 * n + 32 * c, *qc, st);
                }
            }
            for i in 0..MR {
                let dy = rows.d(b, i);
                // Quants are stored +32: subtract 32 · Σ_g scale_g · bsum_g.
                let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc_all, rows.bsums(b, i)));
                let s = _mm256_sub_epi32(isum[i], off);
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dy), _mm256_cvtepi32_ps(s), acc[i]);
            }
        })
    }
}

/// `vpshufb` control for 8 i16 scales broadcast to both 128-bit halves: every i16 lane of the
/// low half gets scale `2c`, of the high half scale `2c + 1`. Those are the scales of the two
/// 16-weight sub-blocks of the `c`-th (0..4) run of 32 weights of a Q2_K/Q3_K half super-block
/// (and of a Q6_K half super-block's scales).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn sub_block_pair_splat(c: usize) -> __m256i {
    let word = |k: usize| (((2 * k + 1) << 8) | (2 * k)) as i16;
    _mm256_set_m128i(_mm_set1_epi16(word(2 * c + 1)), _mm_set1_epi16(word(2 * c)))
}

/// Scales 8n..8n+8 of 16 i16 scales, in both 128-bit halves (for [`sub_block_pair_splat`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn half_scales(scales: __m256i, n: usize) -> __m256i {
    if n == 0 {
        _mm256_permute2x128_si256::<0x00>(scales, scales)
    } else {
        _mm256_permute2x128_si256::<0x11>(scales, scales)
    }
}

/// The Q2_K (`THREE = false`, ggml's x86 `ggml_vec_dot_q2_K_q8_K`) and Q3_K tile bodies (see
/// [`k_tiles`]): the same 2-bit runs, scaled per 16 weights. Q3_K's quants enter `vpmaddubsw`
/// as `q + 4` (low bits OR third bit·4, 0..7) and `4·Σ_g scale_g·bsum_g` is subtracted per
/// super-block; Q2_K's mins give a second FMA.
///
/// # Safety
/// As [`tile_k_rows`].
#[inline(always)]
pub(super) unsafe fn tile_q23k_rows<const MR: usize, const THREE: bool, S: ScaledSum>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    let (bb, qs_off) = if THREE {
        (Q3K_BYTES, Q3K_QS)
    } else {
        (Q2K_BYTES, Q2K_QS)
    };
    // SAFETY: as in `tile_k_rows` with the Q2_K or Q3_K field offsets.
    unsafe {
        let m3 = _mm256_set1_epi8(3);
        let m1 = _mm256_set1_epi8(1);
        let m4 = _mm_set1_epi8(0x0F);
        k_frame!(t, i0, j0, out, bb, |blk, b, rows, acc| {
            // Scales per 16 weights; Q2_K's mins and `dmin` (unused for Q3_K).
            let (dw, dmin, scales, mins) = if THREE {
                let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    blk.add(Q3K_D) as *const u16,
                ) as i32)));
                // In registers, as ggml does: through memory the 16 bytes would wait on a store.
                let sw = q3k_scale_words(std::slice::from_raw_parts(blk.add(Q3K_SCALES), 12));
                let sc8 = _mm_sub_epi8(
                    _mm_set_epi32(sw[3] as i32, sw[2] as i32, sw[1] as i32, sw[0] as i32),
                    _mm_set1_epi8(32),
                );
                (dw, 0.0, _mm256_cvtepi8_epi16(sc8), _mm256_setzero_si256())
            } else {
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                    blk.add(Q2K_D) as *const i32
                )));
                let packed = _mm_loadu_si128(blk.add(Q2K_SCALES) as *const __m128i);
                (
                    _mm_cvtss_f32(dm),
                    _mm_cvtss_f32(_mm_movehdup_ps(dm)),
                    _mm256_cvtepu8_epi16(_mm_and_si128(packed, m4)),
                    _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(packed), m4)),
                )
            };
            // Q3_K: bit 4n + c of hmask byte l is the third bit of quant 128n + 32c + l.
            let mut hbits = if THREE {
                _mm256_loadu_si256(blk.add(Q3K_HMASK) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let mut isum = [_mm256_setzero_si256(); MR];
            for n in 0..2 {
                let sc = half_scales(scales, n);
                let mut bits = _mm256_loadu_si256(blk.add(qs_off + 32 * n) as *const __m256i);
                for c in 0..4 {
                    let mut q = _mm256_and_si256(bits, m3);
                    if THREE {
                        let high = _mm256_slli_epi16::<2>(_mm256_and_si256(hbits, m1));
                        q = _mm256_or_si256(q, high);
                        hbits = _mm256_srli_epi16::<1>(hbits);
                    }
                    bits = _mm256_srli_epi16::<2>(bits);
                    let st = _mm256_shuffle_epi8(sc, sub_block_pair_splat(c));
                    rows.dot::<S>(&mut isum, b, 128 * n + 32 * c, q, st);
                }
            }
            for i in 0..MR {
                let dy = rows.d(b, i);
                if THREE {
                    let off = _mm256_slli_epi32::<2>(_mm256_madd_epi16(scales, rows.bsums(b, i)));
                    let s = _mm256_sub_epi32(isum[i], off);
                    acc[i] =
                        _mm256_fmadd_ps(_mm256_set1_ps(dw * dy), _mm256_cvtepi32_ps(s), acc[i]);
                } else {
                    let msum = _mm256_madd_epi16(mins, rows.bsums(b, i));
                    acc[i] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dw * dy),
                        _mm256_cvtepi32_ps(isum[i]),
                        acc[i],
                    );
                    acc[i] = _mm256_fmadd_ps(
                        _mm256_set1_ps(-dmin * dy),
                        _mm256_cvtepi32_ps(msum),
                        acc[i],
                    );
                }
            }
        })
    }
}

impl<const MR: usize> KRows<MR> {
    /// [`KRows::dot`] for 32 signed weight quants `w` (|w| ≤ 127): `vpmaddubsw` takes `|w|`
    /// against each row's activations with `w`'s signs (ggml's x86 `mul_add_epi8`), so no pair
    /// sum saturates (2·127·127 < 2¹⁵).
    #[inline(always)]
    unsafe fn dot_signed<S: ScaledSum>(
        &self,
        sums: &mut [__m256i; MR],
        b: usize,
        off: usize,
        w: __m256i,
        scales: __m256i,
    ) {
        // SAFETY: as in `dot`; AVX2 is the caller's contract.
        unsafe {
            let aw = _mm256_sign_epi8(w, w);
            for i in 0..MR {
                let y = _mm256_loadu_si256(self.y[i].add(b * QK_K + off) as *const __m256i);
                let p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(y, w));
                sums[i] = S::add(sums[i], p, scales);
            }
        }
    }
}

/// The IQ4_XS tile body (see [`k_tiles`]): per 32-weight sub-block `ib` the levels of its 16
/// bytes of nibbles ([`iq4_levels`]) against the rows' activations, scaled by `ls − 32` in the
/// scaled sum; one float FMA per super-block.
///
/// # Safety
/// As [`tile_k_rows`].
#[inline(always)]
pub(super) unsafe fn tile_iq4xs_rows<const MR: usize, S: ScaledSum>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    // SAFETY: as in `tile_k_rows` with the IQ4_XS field offsets.
    unsafe {
        k_frame!(t, i0, j0, out, IQ4XS_BYTES, |blk, b, rows, acc| {
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk as *const u16,
            ) as i32)));
            let ls = iq4xs_scales(std::slice::from_raw_parts(blk, IQ4XS_QS));
            let ls = i64::from_le_bytes(ls.map(|v| v as u8));
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_cvtsi64_si128(ls)));
            let mut isum = [_mm256_setzero_si256(); MR];
            for ib in 0..8 {
                let w = iq4_levels(blk.add(IQ4XS_QS + 16 * ib));
                let st = _mm256_shuffle_epi8(scales, word_splat(ib));
                rows.dot_signed::<S>(&mut isum, b, 32 * ib, w, st);
            }
            for i in 0..MR {
                let dy = rows.d(b, i);
                acc[i] =
                    _mm256_fmadd_ps(_mm256_set1_ps(dw * dy), _mm256_cvtepi32_ps(isum[i]), acc[i]);
            }
        })
    }
}

/// F32, F16 and BF16 weights (`FMT`: [`DENSE_F32`], [`DENSE_F16`], [`DENSE_BF16`]) × f32
/// activations, one weight row.
///
/// # Safety
/// As [`tile_q4`]; `t.x` holds `m × cols` floats.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_dense<const MR: usize, const NR: usize, const FMT: u8>(
    t: &TileArgs,
    i0: usize,
    j0: usize,
    out: OutPtr,
) {
    debug_assert_eq!(NR, 1);
    let mut acc = [_mm256_setzero_ps(); MR];
    let mut tail = [0f32; MR];
    // SAFETY: weight row j0 has `cols` elements of 4 (F32) or 2 (F16, BF16) bytes; activation rows
    // i0..i0+MR have `cols` floats; vector loads stop at the last full 8.
    unsafe {
        let wrow = t.w.add(j0 * t.rb);
        let mut pf = Prefetch::new(wrow, t.rb);
        let xrow: [*const f32; MR] = std::array::from_fn(|i| t.x.add((i0 + i) * t.cols));
        let full = t.cols / 8 * 8;
        let load_w = |k: usize| match FMT {
            DENSE_F16 => _mm256_cvtph_ps(_mm_loadu_si128(wrow.add(2 * k) as *const __m128i)),
            DENSE_BF16 => {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(wrow.add(2 * k) as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            }
            _ => _mm256_loadu_ps(wrow.add(4 * k) as *const f32),
        };
        let esize = if FMT == DENSE_F32 { 4 } else { 2 };
        let mut k = 0;
        while k < full {
            if MR == 1 {
                pf.upto(wrow.wrapping_add(esize * (k + 8)));
            }
            let wv = load_w(k);
            for i in 0..MR {
                acc[i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xrow[i].add(k)), acc[i]);
            }
            k += 8;
        }
        for k in full..t.cols {
            let wv = match FMT {
                DENSE_F16 => {
                    half::f16::from_bits(std::ptr::read_unaligned(wrow.add(2 * k) as *const u16))
                        .to_f32()
                }
                DENSE_BF16 => f32::from_bits(
                    (std::ptr::read_unaligned(wrow.add(2 * k) as *const u16) as u32) << 16,
                ),
                _ => std::ptr::read_unaligned(wrow.add(4 * k) as *const f32),
            };
            for i in 0..MR {
                tail[i] += wv * *xrow[i].add(k);
            }
        }
        for i in 0..MR {
            out.write(i0 + i, j0, hsum(acc[i]) + tail[i]);
        }
    }
}

/// Quantizes 32 floats to Q8_0/Q8_1 exactly as ggml's x86 `quantize_row_q8_1`; returns the
/// f16-rounded `d` and `s = d·Σq` (bit-identical to `quantize::quantize_block_q8_scalar`).
///
/// # Safety
/// AVX2/FMA/F16C available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_block_q8(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    assert!(x.len() >= QK && q.len() >= QK);
    // SAFETY: both slices hold at least 32 elements (asserted above).
    unsafe {
        let xp = x.as_ptr();
        let v = [
            _mm256_loadu_ps(xp),
            _mm256_loadu_ps(xp.add(8)),
            _mm256_loadu_ps(xp.add(16)),
            _mm256_loadu_ps(xp.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let mut max = _mm256_andnot_ps(sign, v[0]);
        for vi in &v[1..] {
            max = _mm256_max_ps(max, _mm256_andnot_ps(sign, *vi));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(max), _mm256_castps256_ps128(max));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let r = |v: __m256| {
            _mm256_cvtps_epi32(_mm256_round_ps::<
                { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
            >(_mm256_mul_ps(v, id)))
        };
        let (i0, i1, i2, i3) = (r(v[0]), r(v[1]), r(v[2]), r(v[3]));
        let sum = hsum_i32(_mm256_add_epi32(
            _mm256_add_epi32(i0, i1),
            _mm256_add_epi32(i2, i3),
        ));
        let p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p);
        (round_f16(d), round_f16(d * sum as f32))
    }
}

/// The value of largest magnitude among 256 floats, the first one where several share it (as
/// ggml's scalar search keeps it), with that magnitude; NaNs are passed over as there.
///
/// # Safety
/// AVX2 available.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn first_max_q8k(x: &[f32]) -> (f32, f32) {
    assert!(x.len() >= QK_K);
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: x holds at least QK_K elements (asserted above).
    unsafe {
        let xp = x.as_ptr();
        let mut m = [_mm256_setzero_ps(); 4];
        for i in (0..QK_K).step_by(32) {
            for (j, mj) in m.iter_mut().enumerate() {
                // A NaN lane keeps the running max: `max_ps` returns its second operand.
                let a = _mm256_andnot_ps(sign, _mm256_loadu_ps(xp.add(i + 8 * j)));
                *mj = _mm256_max_ps(a, *mj);
            }
        }
        let max = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(max), _mm256_castps256_ps128(max));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        if amax == 0.0 {
            return (0.0, 0.0);
        }
        let want = _mm256_set1_ps(amax);
        for i in (0..QK_K).step_by(8) {
            let v = _mm256_loadu_ps(xp.add(i));
            let hit = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v), want);
            let mask = _mm256_movemask_ps(hit);
            if mask != 0 {
                return (amax, *xp.add(i + mask.trailing_zeros() as usize));
            }
        }
        (amax, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-register Q4_K/Q5_K scale unpack equals the scalar one, on random packed bytes
    /// (every 6-bit scale and min value) and on each byte value repeated.
    #[test]
    fn k4_scales_mins_matches_the_scalar_unpack() {
        if !super::super::KernelPath::Avx2.is_available() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for case in 0..4096 {
            let mut q = [0u8; 16];
            for b in q.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            if case < 256 {
                q[..12].fill(case as u8);
            }
            let want = formats::unpack_scales_mins_k4(&q[..12]);
            let mut got = [0u8; 16];
            // SAFETY: AVX2 is available (checked above); 16 bytes are readable at `q`.
            unsafe { _mm_storeu_si128(got.as_mut_ptr() as *mut __m128i, unpack(q.as_ptr())) };
            assert_eq!(got, want, "packed bytes {:02x?}", &q[..12]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(p: *const u8) -> __m128i {
        // SAFETY: forwarded.
        unsafe { k4_scales_mins(p) }
    }
}
