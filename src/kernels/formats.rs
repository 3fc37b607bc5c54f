//! Byte layouts of the ggml blocks and their dequantization (ggml `dequantize_row_*`).
//!
//! Offsets are given per block; see the table in the parent module's docs.

use super::WeightType;

/// Weights per block of the 32-wide formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and the
/// Q8_0/Q8_1 activations).
pub(crate) const QK: usize = 32;
/// Weights per super-block of the K-quants and IQ4_XS (and the Q8_K activations).
pub(crate) const QK_K: usize = 256;

pub(crate) const Q4_0_BYTES: usize = 18;
pub(crate) const Q4_1_BYTES: usize = 20;
pub(crate) const Q5_0_BYTES: usize = 22;
pub(crate) const Q5_1_BYTES: usize = 24;
pub(crate) const Q8_0_BYTES: usize = 34;
pub(crate) const Q2K_BYTES: usize = 84;
pub(crate) const Q3K_BYTES: usize = 110;
pub(crate) const Q4K_BYTES: usize = 144;
pub(crate) const Q5K_BYTES: usize = 176;
pub(crate) const Q6K_BYTES: usize = 210;
pub(crate) const IQ4NL_BYTES: usize = 18;
pub(crate) const IQ4XS_BYTES: usize = 136;

// Field offsets of Q5_0/Q5_1: the 4 bytes of 5th bits, then the 16 bytes of nibbles.
pub(crate) const Q5_0_QH: usize = 2;
pub(crate) const Q5_0_QS: usize = 6;
pub(crate) const Q5_1_QH: usize = 4;
pub(crate) const Q5_1_QS: usize = 8;

/// A Q4_K (`five` false) or Q5_K super-block: its size in bytes, where its 12 packed scale
/// bytes start and where its nibbles start (Q5_K's 32 bytes of fifth bits sit between).
pub(crate) const fn k4_layout(five: bool) -> (usize, usize, usize) {
    if five {
        (Q5K_BYTES, Q5K_SCALES, Q5K_QS)
    } else {
        (Q4K_BYTES, Q4K_SCALES, Q4K_QS)
    }
}

// Field offsets inside the K-quant super-blocks.
pub(crate) const Q2K_SCALES: usize = 0;
pub(crate) const Q2K_QS: usize = 16;
pub(crate) const Q2K_D: usize = 80;
pub(crate) const Q2K_DMIN: usize = 82;
pub(crate) const Q3K_HMASK: usize = 0;
pub(crate) const Q3K_QS: usize = 32;
pub(crate) const Q3K_SCALES: usize = 96;
pub(crate) const Q3K_D: usize = 108;
pub(crate) const Q4K_SCALES: usize = 4;
pub(crate) const Q4K_QS: usize = 16;
pub(crate) const Q5K_SCALES: usize = 4;
pub(crate) const Q5K_QH: usize = 16;
pub(crate) const Q5K_QS: usize = 48;
pub(crate) const Q6K_QL: usize = 0;
pub(crate) const Q6K_QH: usize = 128;
pub(crate) const Q6K_SCALES: usize = 192;
pub(crate) const Q6K_D: usize = 208;

// IQ4_NL: f16 d, then 16 bytes of nibbles. IQ4_XS: f16 d at 0, then the high 2 bits of the 8
// sub-block scales (u16), their low 4 bits (4 bytes), and 8 × 16 bytes of nibbles.
pub(crate) const IQ4NL_QS: usize = 2;
pub(crate) const IQ4XS_SCALES_H: usize = 2;
pub(crate) const IQ4XS_SCALES_L: usize = 4;
pub(crate) const IQ4XS_QS: usize = 8;

/// ggml `kvalues_iq4nl`: the 16 non-linear levels a 4-bit IQ4_NL/IQ4_XS quant indexes.
pub(crate) const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Reads the little-endian f16 at `b[off..off + 2]` as f32.
#[inline]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Rounds through f16 the way ggml stores a scale (`GGML_FP32_TO_FP16`, round to nearest even).
#[inline]
pub(crate) fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// ggml `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K
/// super-block, from its 12 packed bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 8 scales (bytes 0..8) and 8 mins (bytes 8..16) of a Q4_K/Q5_K super-block, unpacked
/// with 32-bit word operations (same result as [`scale_min_k4`] for each `j`). The NEON kernels
/// and the tests use it; on x86 the repack unpacks 16 rows at once.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
#[inline]
pub(crate) fn unpack_scales_mins_k4(q: &[u8]) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let scales_lo = u0 & KMASK1;
    let scales_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mins_lo = u1 & KMASK1;
    let mins_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&scales_lo.to_le_bytes());
    out[4..8].copy_from_slice(&scales_hi.to_le_bytes());
    out[8..12].copy_from_slice(&mins_lo.to_le_bytes());
    out[12..16].copy_from_slice(&mins_hi.to_le_bytes());
    out
}

/// The 16 6-bit scales (0..63, stored +32) of a Q3_K super-block from its 12 packed bytes, as
/// four little-endian words of four scales, unpacked as ggml's `dequantize_row_q3_K` does
/// (kmask1/kmask2 on 32-bit words): scale `k` has its low 4 bits in a nibble of byte `k % 8`
/// (low nibble for `k < 8`) and its high 2 bits in byte `8 + k % 4`, bits `2·(k / 4)..`.
#[inline]
pub(crate) fn q3k_scale_words(q: &[u8]) -> [u32; 4] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let w = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (a0, a1, t) = (w(0), w(1), w(2));
    [
        (a0 & KMASK2) | ((t & KMASK1) << 4),
        (a1 & KMASK2) | (((t >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((t >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((t >> 6) & KMASK1) << 4),
    ]
}

/// The 16 signed scales (−32..31) of a Q3_K super-block ([`q3k_scale_words`] − 32).
#[inline]
pub(crate) fn q3k_scales(q: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (o, word) in out.chunks_exact_mut(4).zip(q3k_scale_words(q)) {
        for (o, b) in o.iter_mut().zip(word.to_le_bytes()) {
            *o = b as i8 - 32;
        }
    }
    out
}

/// The 3-bit quant (−4..3) at position `p` (0..256) of a Q3_K super-block, as ggml lays it out:
/// `p = 128·n + 32·j + l` takes bits `2j..2j+2` of `qs[32·n + l]`, and its third bit is bit
/// `4n + j` of `hmask[l]`; a clear bit means −4.
#[inline]
pub(crate) fn q3k_quant(blk: &[u8], p: usize) -> i32 {
    let (n, j, l) = (p / 128, (p % 128) / 32, p % 32);
    let low = (blk[Q3K_QS + 32 * n + l] >> (2 * j)) & 3;
    let high = (blk[Q3K_HMASK + l] >> (4 * n + j)) & 1;
    low as i32 - if high == 0 { 4 } else { 0 }
}

/// The 2-bit quant (0..3) at position `p` of a Q2_K super-block (same packing as Q3_K's low bits).
#[inline]
pub(crate) fn q2k_quant(blk: &[u8], p: usize) -> i32 {
    let (n, j, l) = (p / 128, (p % 128) / 32, p % 32);
    ((blk[Q2K_QS + 32 * n + l] >> (2 * j)) & 3) as i32
}

/// The 8 signed sub-block scales `ls − 32` (−32..31) of an IQ4_XS super-block: sub-block `ib`
/// takes its low 4 bits from nibble `ib % 2` of `scales_l[ib / 2]` and its high 2 bits from bits
/// `2·ib..2·ib + 2` of the little-endian `scales_h` (ggml `dequantize_row_iq4_xs`).
#[inline]
pub(crate) fn iq4xs_scales(blk: &[u8]) -> [i8; 8] {
    let h = u16::from_le_bytes([blk[IQ4XS_SCALES_H], blk[IQ4XS_SCALES_H + 1]]);
    std::array::from_fn(|ib| {
        let low = (blk[IQ4XS_SCALES_L + ib / 2] >> (4 * (ib % 2))) & 0xF;
        let high = ((h >> (2 * ib)) & 3) as u8;
        (low | (high << 4)) as i8 - 32
    })
}

/// The 32 levels of 16 bytes of IQ4 nibbles, in weight order: weight `j < 16` is the low nibble
/// of byte `j`, weight `j + 16` its high nibble.
#[inline]
pub(crate) fn iq4_levels(qs: &[u8]) -> [i8; QK] {
    std::array::from_fn(|j| {
        let byte = qs[j % 16];
        KVALUES_IQ4NL[if j < 16 { byte & 0xF } else { byte >> 4 } as usize]
    })
}

/// Reads the little-endian bf16 at `b[off..off + 2]` as f32 (its bits are the top half of the
/// f32's).
#[inline]
pub(crate) fn bf16_at(b: &[u8], off: usize) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[off], b[off + 1]]) as u32) << 16)
}

/// The 5-bit quants (0..32) of one Q5_0/Q5_1 block, in weight order: weight `j < 16` is the low
/// nibble of byte `j` of `qs`, weight `j + 16` its high nibble, and bit `j` of the little-endian
/// `qh` is weight `j`'s fifth bit (ggml `dequantize_row_q5_0`).
#[inline]
pub(crate) fn q5_quants(qh: &[u8], qs: &[u8]) -> [u8; QK] {
    let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0xF) | ((((h >> j) & 1) as u8) << 4);
        q[j + QK / 2] = (qs[j] >> 4) | ((((h >> (j + 16)) & 1) as u8) << 4);
    }
    q
}

/// Dequantizes one weight row (`row.len() == ty.row_bytes(out.len())`, checked by the caller).
pub(crate) fn dequantize_row(ty: WeightType, row: &[u8], out: &mut [f32]) {
    match ty {
        WeightType::F32 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        WeightType::F16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        WeightType::BF16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16_at(c, 0);
            }
        }
        WeightType::Q4_0 => {
            for (y, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(Q4_0_BYTES)) {
                let d = f16_at(b, 0);
                for j in 0..QK / 2 {
                    let q = b[2 + j];
                    y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
                    y[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        WeightType::Q4_1 => {
            for (y, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(Q4_1_BYTES)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for j in 0..QK / 2 {
                    let q = b[4 + j];
                    y[j] = (q & 0xF) as f32 * d + m;
                    y[j + QK / 2] = (q >> 4) as f32 * d + m;
                }
            }
        }
        WeightType::Q5_0 | WeightType::Q5_1 => {
            // Q5_0 is (q − 16)·d; Q5_1 is q·d + m, its min m after the scale. Q5_0 adds −0.0,
            // which leaves every product as it is (signed zeros too).
            let (bytes, qh, qs, offset, min_at) = match ty {
                WeightType::Q5_0 => (Q5_0_BYTES, Q5_0_QH, Q5_0_QS, 16, None),
                _ => (Q5_1_BYTES, Q5_1_QH, Q5_1_QS, 0, Some(2)),
            };
            for (y, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(bytes)) {
                let d = f16_at(b, 0);
                let m = min_at.map_or(-0.0, |at| f16_at(b, at));
                let q = q5_quants(&b[qh..], &b[qs..]);
                for (y, &q) in y.iter_mut().zip(&q) {
                    *y = (q as i32 - offset) as f32 * d + m;
                }
            }
        }
        WeightType::Q8_0 => {
            for (y, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(Q8_0_BYTES)) {
                let d = f16_at(b, 0);
                for j in 0..QK {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        WeightType::Q2K => {
            // ggml `dequantize_row_q2_K`: per 16 weights dl = d·scale, ml = dmin·min.
            for (y, b) in out.chunks_exact_mut(QK_K).zip(row.chunks_exact(Q2K_BYTES)) {
                let d = f16_at(b, Q2K_D);
                let dmin = f16_at(b, Q2K_DMIN);
                for (g, y) in y.chunks_exact_mut(16).enumerate() {
                    let sc = b[Q2K_SCALES + g];
                    let dl = d * (sc & 0xF) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    for (k, y) in y.iter_mut().enumerate() {
                        *y = dl * q2k_quant(b, 16 * g + k) as f32 - ml;
                    }
                }
            }
        }
        WeightType::Q3K => {
            // ggml `dequantize_row_q3_K`: per 16 weights dl = d·(scale − 32).
            for (y, b) in out.chunks_exact_mut(QK_K).zip(row.chunks_exact(Q3K_BYTES)) {
                let d = f16_at(b, Q3K_D);
                let sc = q3k_scales(&b[Q3K_SCALES..Q3K_SCALES + 12]);
                for (g, y) in y.chunks_exact_mut(16).enumerate() {
                    let dl = d * sc[g] as f32;
                    for (k, y) in y.iter_mut().enumerate() {
                        *y = dl * q3k_quant(b, 16 * g + k) as f32;
                    }
                }
            }
        }
        WeightType::Q4K | WeightType::Q5K => {
            // Q5_K's fifth bits (in `qh`) add 16 to a nibble; Q4_K has none (all-zero bits).
            let five = ty == WeightType::Q5K;
            let (bytes, scales, qs) = k4_layout(five);
            for (y, b) in out.chunks_exact_mut(QK_K).zip(row.chunks_exact(bytes)) {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let sc = &b[scales..scales + 12];
                let qh: &[u8] = if five {
                    &b[Q5K_QH..Q5K_QH + 32]
                } else {
                    &[0; 32]
                };
                for c in 0..4 {
                    let ql = &b[qs + 32 * c..qs + 32 * c + 32];
                    let (s1, m1) = scale_min_k4(2 * c, sc);
                    let (s2, m2) = scale_min_k4(2 * c + 1, sc);
                    let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
                    let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
                    let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
                    for l in 0..32 {
                        let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                        let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                        y[64 * c + l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                        y[64 * c + 32 + l] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
                    }
                }
            }
        }
        WeightType::Q6K => {
            for (y, b) in out.chunks_exact_mut(QK_K).zip(row.chunks_exact(Q6K_BYTES)) {
                let d = f16_at(b, Q6K_D);
                for n in 0..2 {
                    let ql = &b[Q6K_QL + 64 * n..Q6K_QL + 64 * n + 64];
                    let qh = &b[Q6K_QH + 32 * n..Q6K_QH + 32 * n + 32];
                    let sc = &b[Q6K_SCALES + 8 * n..Q6K_SCALES + 8 * n + 8];
                    let y = &mut y[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
        WeightType::IQ4NL => {
            for (y, b) in out.chunks_exact_mut(QK).zip(row.chunks_exact(IQ4NL_BYTES)) {
                let d = f16_at(b, 0);
                for (y, q) in y.iter_mut().zip(iq4_levels(&b[IQ4NL_QS..])) {
                    *y = d * q as f32;
                }
            }
        }
        WeightType::IQ4XS => {
            // ggml `dequantize_row_iq4_xs`: per 32 weights dl = d·(ls − 32).
            for (y, b) in out
                .chunks_exact_mut(QK_K)
                .zip(row.chunks_exact(IQ4XS_BYTES))
            {
                let d = f16_at(b, 0);
                let scales = iq4xs_scales(b);
                for (ib, y) in y.chunks_exact_mut(QK).enumerate() {
                    let dl = d * scales[ib] as f32;
                    let qs = &b[IQ4XS_QS + 16 * ib..IQ4XS_QS + 16 * ib + 16];
                    for (y, q) in y.iter_mut().zip(iq4_levels(qs)) {
                        *y = dl * q as f32;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::Rng;

    /// `check` on 2000 random 12-byte groups of packed scales from the generator `seed`.
    fn for_random_packed_scales(seed: u64, check: impl Fn(&[u8; 12])) {
        let mut rng = Rng::new(seed);
        for _ in 0..2000 {
            let mut q = [0u8; 12];
            rng.fill_bytes(&mut q);
            check(&q);
        }
    }

    #[test]
    fn packed_k4_scales_match_reference_unpacking() {
        for_random_packed_scales(7, |q| {
            let packed = unpack_scales_mins_k4(q);
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, q);
                assert_eq!(packed[j], s);
                assert_eq!(packed[8 + j], m);
            }
        });
    }

    #[test]
    fn q3k_scales_follow_the_documented_bit_layout() {
        for_random_packed_scales(8, |q| {
            let sc = q3k_scales(q);
            for (k, &s) in sc.iter().enumerate() {
                let low = if k < 8 { q[k] & 0xF } else { q[k - 8] >> 4 };
                let high = (q[8 + k % 4] >> (2 * (k / 4))) & 3;
                assert_eq!(s as i32, (low | (high << 4)) as i32 - 32, "scale {k}");
            }
        });
    }

    #[test]
    fn block_sizes_match_ggml() {
        // sizeof(block_*) in ggml-common.h.
        assert_eq!(WeightType::Q4_0.row_bytes(64), 36);
        assert_eq!(WeightType::Q4_1.block_bytes(), 2 + 2 + 16);
        assert_eq!(WeightType::Q5_0.block_bytes(), 2 + 4 + 16);
        assert_eq!(WeightType::Q5_1.block_bytes(), 2 + 2 + 4 + 16);
        assert_eq!(WeightType::Q8_0.block_bytes(), 2 + 32);
        assert_eq!(WeightType::Q4K.block_bytes(), 2 + 2 + 12 + 128);
        assert_eq!(WeightType::Q5K.block_bytes(), 2 + 2 + 12 + 32 + 128);
        assert_eq!(WeightType::Q6K.block_bytes(), 128 + 64 + 16 + 2);
        assert_eq!(WeightType::Q2K.block_bytes(), 16 + 64 + 2 + 2);
        assert_eq!(WeightType::Q3K.block_bytes(), 32 + 64 + 12 + 2);
        assert_eq!(WeightType::IQ4NL.block_bytes(), 2 + 16);
        assert_eq!(WeightType::IQ4XS.block_bytes(), 2 + 2 + 4 + 128);
        assert_eq!(WeightType::IQ4NL.row_bytes(64), 36);
        assert_eq!(WeightType::IQ4XS.row_bytes(512), 272);
        assert_eq!(WeightType::BF16.row_bytes(10), 20);
        assert_eq!(WeightType::F16.row_bytes(10), 20);
    }

    /// ggml's `dequantize_row_iq4_nl` and `dequantize_row_iq4_xs` written out on the raw bytes
    /// (the struct fields by offset, the table as in `ggml-common.h`): ours is bit-identical on
    /// random blocks, so on every nibble and every 6-bit scale.
    #[test]
    fn iq4_dequantization_follows_ggml() {
        const KV: [i8; 16] = [
            -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
        ];
        let fp16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let mut rng = Rng::new(9);
        // `blocks` random blocks of `ty` (`bytes` bytes, `weights` weights each, a finite scale
        // d in bytes 0..2), dequantized bit-identically to `reference` on each block.
        let mut check = |ty: WeightType,
                         (blocks, bytes, weights): (usize, usize, usize),
                         reference: &dyn Fn(&[u8], &mut [f32])| {
            let mut x = vec![0u8; blocks * bytes];
            rng.fill_bytes(&mut x);
            let mut want = vec![0f32; blocks * weights];
            for (blk, y) in x
                .chunks_exact_mut(bytes)
                .zip(want.chunks_exact_mut(weights))
            {
                let d = half::f16::from_f32(rng.uniform(-2.0, 2.0));
                blk[0..2].copy_from_slice(&d.to_le_bytes());
                reference(blk, y);
            }
            let mut got = vec![f32::NAN; blocks * weights];
            dequantize_row(ty, &x, &mut got);
            assert_eq!(bits(&got), bits(&want), "{ty}");
        };
        for _ in 0..200 {
            // block_iq4_nl { ggml_half d; uint8_t qs[16]; }, four blocks.
            check(WeightType::IQ4NL, (4, 18, 32), &|blk, y| {
                let d = fp16(&blk[0..2]);
                let qs = &blk[2..18];
                for j in 0..16 {
                    y[j] = d * KV[(qs[j] & 0xf) as usize] as f32;
                    y[j + 16] = d * KV[(qs[j] >> 4) as usize] as f32;
                }
            });
            // block_iq4_xs { ggml_half d; uint16_t scales_h; uint8_t scales_l[4];
            // uint8_t qs[128]; }, two super-blocks.
            check(WeightType::IQ4XS, (2, 136, 256), &|blk, out| {
                let d = fp16(&blk[0..2]);
                let scales_h = u16::from_le_bytes([blk[2], blk[3]]);
                let scales_l = &blk[4..8];
                let qs = &blk[8..136];
                for ib in 0..8 {
                    let ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf) as i32
                        | ((((scales_h >> (2 * ib)) & 3) as i32) << 4);
                    let dl = d * (ls - 32) as f32;
                    let y = &mut out[32 * ib..32 * ib + 32];
                    for j in 0..16 {
                        let q = qs[16 * ib + j];
                        y[j] = dl * KV[(q & 0xf) as usize] as f32;
                        y[j + 16] = dl * KV[(q >> 4) as usize] as f32;
                    }
                }
            });
        }
    }

    #[test]
    fn dequantize_known_blocks() {
        // Q4_0: d = 0.5, nibble 0x1F -> low 15, high 1.
        let mut b = vec![0u8; Q4_0_BYTES];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2] = 0x1F;
        let mut y = [0f32; QK];
        dequantize_row(WeightType::Q4_0, &b, &mut y);
        assert_eq!(y[0], (15 - 8) as f32 * 0.5);
        assert_eq!(y[16], (1 - 8) as f32 * 0.5);
        assert_eq!(y[1], -4.0);

        // Q4_1: d = 2, m = -1.
        let mut b = vec![0u8; Q4_1_BYTES];
        b[0..2].copy_from_slice(&half::f16::from_f32(2.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(-1.0).to_bits().to_le_bytes());
        b[4 + 3] = 0x52;
        dequantize_row(WeightType::Q4_1, &b, &mut y);
        assert_eq!(y[3], 2.0 * 2.0 - 1.0);
        assert_eq!(y[19], 5.0 * 2.0 - 1.0);
        assert_eq!(y[0], -1.0);

        // Q5_0: d = 0.5; byte 3 = 0xA7 (low 7, high 10); qh bit 3 set (weight 3 gets +16),
        // bit 19 clear (weight 19 does not), bit 31 set (weight 31 = 0 | 16).
        let mut b = vec![0u8; Q5_0_BYTES];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        b[Q5_0_QH..Q5_0_QH + 4].copy_from_slice(&((1u32 << 3) | (1u32 << 31)).to_le_bytes());
        b[Q5_0_QS + 3] = 0xA7;
        let mut y = [0f32; QK];
        dequantize_row(WeightType::Q5_0, &b, &mut y);
        assert_eq!(y[3], (7 + 16 - 16) as f32 * 0.5);
        assert_eq!(y[19], (10 - 16) as f32 * 0.5);
        assert_eq!(y[31], 0.0);
        assert_eq!(y[0], -8.0);

        // Q5_1: d = 2, m = -1; same bits.
        let mut b = vec![0u8; Q5_1_BYTES];
        b[0..2].copy_from_slice(&half::f16::from_f32(2.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&half::f16::from_f32(-1.0).to_bits().to_le_bytes());
        b[Q5_1_QH..Q5_1_QH + 4].copy_from_slice(&((1u32 << 3) | (1u32 << 31)).to_le_bytes());
        b[Q5_1_QS + 3] = 0xA7;
        dequantize_row(WeightType::Q5_1, &b, &mut y);
        assert_eq!(y[3], 23.0 * 2.0 - 1.0);
        assert_eq!(y[19], 10.0 * 2.0 - 1.0);
        assert_eq!(y[31], 16.0 * 2.0 - 1.0);
        assert_eq!(y[0], -1.0);

        // Q6_K: all-zero quants give -32 * d * scale.
        let mut b = vec![0u8; Q6K_BYTES];
        b[Q6K_D..Q6K_D + 2].copy_from_slice(&half::f16::from_f32(0.25).to_bits().to_le_bytes());
        for (i, s) in b[Q6K_SCALES..Q6K_SCALES + 16].iter_mut().enumerate() {
            *s = (i as i8 - 8) as u8;
        }
        let mut y = [0f32; QK_K];
        dequantize_row(WeightType::Q6K, &b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let sc = (i / 16) as i32 - 8;
            assert_eq!(*v, 0.25 * sc as f32 * -32.0, "index {i}");
        }

        // IQ4_NL: d = 0.5; byte 0 = 0xF0: weight 0 is level 0 (−127), weight 16 level 15 (113).
        let mut b = vec![0x88u8; IQ4NL_BYTES];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        b[IQ4NL_QS] = 0xF0;
        let mut y = [0f32; QK];
        dequantize_row(WeightType::IQ4NL, &b, &mut y);
        assert_eq!((y[0], y[16], y[1], y[31]), (-63.5, 56.5, 0.5, 0.5));

        // IQ4_XS: d = 0.5; scales_l[0] = 0x21 and scales_h bits 0..4 = 0b1110 give sub-block 0
        // ls = 1 | 2 << 4 = 33 (scale 1) and sub-block 1 ls = 2 | 3 << 4 = 50 (scale 18); the
        // others ls = 0 (scale −32). Nibbles: weight 0 level 0, 16 level 15, 32 level 8, 48
        // level 0, all others level 0.
        let mut b = vec![0u8; IQ4XS_BYTES];
        b[0..2].copy_from_slice(&half::f16::from_f32(0.5).to_bits().to_le_bytes());
        b[IQ4XS_SCALES_H..IQ4XS_SCALES_H + 2].copy_from_slice(&0b1110u16.to_le_bytes());
        b[IQ4XS_SCALES_L] = 0x21;
        b[IQ4XS_QS] = 0xF0;
        b[IQ4XS_QS + 16] = 0x08;
        assert_eq!(iq4xs_scales(&b), [1, 18, -32, -32, -32, -32, -32, -32]);
        let mut y = [0f32; QK_K];
        dequantize_row(WeightType::IQ4XS, &b, &mut y);
        assert_eq!((y[0], y[16], y[32], y[48]), (-63.5, 56.5, 9.0, -1143.0));
        assert_eq!((y[1], y[255]), (-63.5, 2032.0));
    }
}
