//! Portable reference kernels: the specification the SIMD paths are tested against.
//!
//! Each dot product follows ggml's generic `ggml_vec_dot_*` (integer sums within a block,
//! one float multiply per block): Q4_0·Q8_0, Q4_1·Q8_1, Q5_0·Q8_0, Q5_1·Q8_1, Q8_0·Q8_0,
//! IQ4_NL·Q8_0, Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS·Q8_K.

use std::ops::Range;

use super::formats::{
    self, IQ4NL_QS, IQ4XS_BYTES, IQ4XS_QS, Q2K_BYTES, Q2K_D, Q2K_DMIN, Q2K_SCALES, Q3K_BYTES,
    Q3K_D, Q3K_SCALES, Q4_0_BYTES, Q4_1_BYTES, Q5_0_QH, Q5_0_QS, Q5_1_BYTES, Q5_1_QH, Q5_1_QS,
    Q5K_QH, Q6K_BYTES, Q6K_D, Q6K_QH, Q6K_QL, Q6K_SCALES, QK, QK_K, f16_at,
};
use super::matmul::OutPtr;
use super::quantize::Acts;
use super::{QMatrix, WeightType};

/// A row-by-row dot product: weight row `wr` (of type `ty`) with activation row `i` ([`dot`],
/// or NEON's).
pub(crate) type RowDot = fn(WeightType, &[u8], &Acts, usize) -> f32;

/// Computes `out[i, j]` for activation rows `a` and weight rows `r`, one `dot` per pair.
///
/// # Safety
/// `out` must be valid for every `(i, j)` in `a × r`, with no other thread writing them; `dot`
/// can run on this CPU.
pub(crate) unsafe fn compute(
    dot: RowDot,
    w: &QMatrix,
    acts: &Acts,
    a: Range<usize>,
    r: Range<usize>,
    out: OutPtr,
) {
    let rb = w.row_bytes();
    for j in r {
        let wr = &w.data[j * rb..(j + 1) * rb];
        for i in a.clone() {
            let v = dot(w.ty, wr, acts, i);
            // SAFETY: (i, j) is in the caller's exclusive rectangle.
            unsafe { out.write(i, j, v) };
        }
    }
}

/// Dot product of weight row `wr` with activation row `i`.
pub(crate) fn dot(ty: WeightType, wr: &[u8], acts: &Acts, i: usize) -> f32 {
    let cols = acts.cols;
    let qs = acts.row_quants(i);
    match ty {
        WeightType::F32 => {
            let x = &acts.x[i * cols..(i + 1) * cols];
            x.iter()
                .zip(wr.chunks_exact(4))
                .map(|(a, c)| a * f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .sum()
        }
        WeightType::F16 => {
            let x = &acts.x[i * cols..(i + 1) * cols];
            x.iter()
                .zip(wr.chunks_exact(2))
                .map(|(a, c)| a * half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .sum()
        }
        WeightType::BF16 => {
            let x = &acts.x[i * cols..(i + 1) * cols];
            x.iter()
                .zip(wr.chunks_exact(2))
                .map(|(a, c)| a * formats::bf16_at(c, 0))
                .sum()
        }
        WeightType::Q4_0 => {
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(Q4_0_BYTES).enumerate() {
                let y = &qs[b * QK..(b + 1) * QK];
                let mut sumi = 0i32;
                for j in 0..QK / 2 {
                    let v0 = (blk[2 + j] & 0xF) as i32 - 8;
                    let v1 = (blk[2 + j] >> 4) as i32 - 8;
                    sumi += v0 * y[j] as i32 + v1 * y[j + QK / 2] as i32;
                }
                sumf += sumi as f32 * f16_at(blk, 0) * acts.d[acts.scale_index(i, b)];
            }
            sumf
        }
        WeightType::Q4_1 => {
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(Q4_1_BYTES).enumerate() {
                let y = &qs[b * QK..(b + 1) * QK];
                let mut sumi = 0i32;
                for j in 0..QK / 2 {
                    sumi += (blk[4 + j] & 0xF) as i32 * y[j] as i32
                        + (blk[4 + j] >> 4) as i32 * y[j + QK / 2] as i32;
                }
                let k = acts.scale_index(i, b);
                sumf += (f16_at(blk, 0) * acts.d[k]) * sumi as f32 + f16_at(blk, 2) * acts.s[k];
            }
            sumf
        }
        WeightType::Q5_0 | WeightType::Q8_0 | WeightType::IQ4NL => {
            // ggml `ggml_vec_dot_q5_0_q8_0`, `…_q8_0_q8_0`, `…_iq4_nl_q8_0`: signed quants (Q5_0
            // q − 16, IQ4_NL's levels), one (d_w·d_y)·Σ per block.
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(ty.block_bytes()).enumerate() {
                let y = &qs[b * QK..(b + 1) * QK];
                let w: [i32; QK] = match ty {
                    WeightType::Q5_0 => {
                        formats::q5_quants(&blk[Q5_0_QH..], &blk[Q5_0_QS..]).map(|q| q as i32 - 16)
                    }
                    WeightType::IQ4NL => formats::iq4_levels(&blk[IQ4NL_QS..]).map(i32::from),
                    _ => std::array::from_fn(|j| blk[2 + j] as i8 as i32),
                };
                let sumi: i32 = w.iter().zip(y).map(|(&w, &y)| w * y as i32).sum();
                sumf += sumi as f32 * (f16_at(blk, 0) * acts.d[acts.scale_index(i, b)]);
            }
            sumf
        }
        WeightType::Q5_1 => {
            // ggml `ggml_vec_dot_q5_1_q8_1`: unsigned quants, min term m·s with Q8_1's f16 s.
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(Q5_1_BYTES).enumerate() {
                let y = &qs[b * QK..(b + 1) * QK];
                let q = formats::q5_quants(&blk[Q5_1_QH..], &blk[Q5_1_QS..]);
                let sumi: i32 = (0..QK).map(|j| q[j] as i32 * y[j] as i32).sum();
                let k = acts.scale_index(i, b);
                sumf += (f16_at(blk, 0) * acts.d[k]) * sumi as f32 + f16_at(blk, 2) * acts.s[k];
            }
            sumf
        }
        WeightType::Q2K => {
            // ggml `ggml_vec_dot_q2_K_q8_K`: Σ scale·(q·y) and Σ min·bsum as integers per
            // super-block, then d·d_y·Σ − dmin·d_y·Σ.
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(Q2K_BYTES).enumerate() {
                let y = &qs[b * QK_K..(b + 1) * QK_K];
                let bsums = &acts.bsums[(i * acts.nb + b) * 16..(i * acts.nb + b + 1) * 16];
                let mut isum = 0i32;
                let mut msum = 0i32;
                for g in 0..16 {
                    let sc = blk[Q2K_SCALES + g];
                    let dot: i32 = (16 * g..16 * g + 16)
                        .map(|p| formats::q2k_quant(blk, p) * y[p] as i32)
                        .sum();
                    isum += (sc & 0xF) as i32 * dot;
                    msum += (sc >> 4) as i32 * bsums[g] as i32;
                }
                let dy = acts.d[acts.scale_index(i, b)];
                sumf += dy * f16_at(blk, Q2K_D) * isum as f32
                    - dy * f16_at(blk, Q2K_DMIN) * msum as f32;
            }
            sumf
        }
        WeightType::Q3K => {
            // ggml `ggml_vec_dot_q3_K_q8_K`: Σ (scale − 32)·(q·y) as an integer per super-block,
            // then d·d_y·Σ.
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(Q3K_BYTES).enumerate() {
                let y = &qs[b * QK_K..(b + 1) * QK_K];
                let sc = formats::q3k_scales(&blk[Q3K_SCALES..Q3K_SCALES + 12]);
                let mut isum = 0i32;
                for (g, &s) in sc.iter().enumerate() {
                    let dot: i32 = (16 * g..16 * g + 16)
                        .map(|p| formats::q3k_quant(blk, p) * y[p] as i32)
                        .sum();
                    isum += s as i32 * dot;
                }
                sumf += f16_at(blk, Q3K_D) * acts.d[acts.scale_index(i, b)] * isum as f32;
            }
            sumf
        }
        WeightType::Q4K | WeightType::Q5K => {
            let five = ty == WeightType::Q5K;
            let (bb, sc_off, qs_off) = formats::k4_layout(five);
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(bb).enumerate() {
                let y = &qs[b * QK_K..(b + 1) * QK_K];
                let bsums = &acts.bsums[(i * acts.nb + b) * 16..(i * acts.nb + b + 1) * 16];
                let sc = &blk[sc_off..sc_off + 12];
                let mut isum = 0i32;
                let mut msum = 0i32;
                for sub in 0..8 {
                    let (s, m) = formats::scale_min_k4(sub, sc);
                    let c = sub / 2;
                    let hi = sub % 2 == 1;
                    let mut dot = 0i32;
                    for l in 0..32 {
                        let byte = blk[qs_off + 32 * c + l];
                        let mut q = if hi { byte >> 4 } else { byte & 0xF } as i32;
                        if five && (blk[Q5K_QH + l] >> sub) & 1 != 0 {
                            q += 16;
                        }
                        dot += q * y[32 * sub + l] as i32;
                    }
                    isum += s as i32 * dot;
                    msum += m as i32 * (bsums[2 * sub] as i32 + bsums[2 * sub + 1] as i32);
                }
                let dy = acts.d[acts.scale_index(i, b)];
                sumf += dy * f16_at(blk, 0) * isum as f32 - dy * f16_at(blk, 2) * msum as f32;
            }
            sumf
        }
        WeightType::Q6K => {
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(Q6K_BYTES).enumerate() {
                let y = &qs[b * QK_K..(b + 1) * QK_K];
                let mut isum = 0i32;
                for (p, &yv) in y.iter().enumerate() {
                    // Position p = 128·n + 32·c + l (c: which of the four 32-runs of the half).
                    let (n, c, l) = (p / 128, (p % 128) / 32, p % 32);
                    let ql = blk[Q6K_QL + 64 * n + l + 32 * (c % 2)];
                    let low = if c < 2 { ql & 0xF } else { ql >> 4 };
                    let high = (blk[Q6K_QH + 32 * n + l] >> (2 * c)) & 3;
                    let q = (low | (high << 4)) as i32 - 32;
                    let sc = blk[Q6K_SCALES + p / 16] as i8 as i32;
                    isum += sc * q * yv as i32;
                }
                sumf += f16_at(blk, Q6K_D) * acts.d[acts.scale_index(i, b)] * isum as f32;
            }
            sumf
        }
        WeightType::IQ4XS => {
            // ggml's x86 `ggml_vec_dot_iq4_xs_q8_K`: Σ (ls − 32)·(kvalue·y) as an integer per
            // super-block, then d·d_y·Σ.
            let mut sumf = 0f32;
            for (b, blk) in wr.chunks_exact(IQ4XS_BYTES).enumerate() {
                let y = &qs[b * QK_K..(b + 1) * QK_K];
                let mut isum = 0i32;
                for (ib, &ls) in formats::iq4xs_scales(blk).iter().enumerate() {
                    let qs = &blk[IQ4XS_QS + 16 * ib..IQ4XS_QS + 16 * ib + 16];
                    let w = formats::iq4_levels(qs);
                    let yb = &y[QK * ib..QK * (ib + 1)];
                    let dot: i32 = w.iter().zip(yb).map(|(&w, &y)| w as i32 * y as i32).sum();
                    isum += ls as i32 * dot;
                }
                sumf += f16_at(blk, 0) * acts.d[acts.scale_index(i, b)] * isum as f32;
            }
            sumf
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quantize::{ActKind, ActivationScratch};
    use crate::kernels::testutil::{self, Rng};

    /// The integer reference against dequantize + dot on the dequantized activations: equal up
    /// to float rounding, which checks the block decoding of every format.
    #[test]
    fn reference_dot_equals_dequantized_dot() {
        let mut rng = Rng::new(11);
        for ty in WeightType::ALL {
            let cols = 2 * ty.block_size().max(256);
            let data = testutil::random_weights(&mut rng, ty, 3, cols);
            let w = QMatrix::new(ty, 3, cols, &data).unwrap();
            let wf = testutil::dequantize_all(&w);
            let x = testutil::random_activations(&mut rng, 2 * cols);
            let mut scratch = ActivationScratch::default();
            let acts = testutil::scalar_acts(ty, &x, 2, cols, &mut scratch);
            let xq = dequantized_activations(&acts);
            for i in 0..2 {
                for j in 0..3 {
                    let rb = w.row_bytes();
                    let got = dot(ty, &w.data[j * rb..(j + 1) * rb], &acts, i);
                    let mut want = 0f64;
                    for c in 0..cols {
                        want += xq[i * cols + c] as f64 * wf[j * cols + c] as f64;
                    }
                    let mag = testutil::magnitude(&w, &wf, &xq, i, j);
                    // Q4_1's and Q5_1's min term uses ggml's f16 `s` instead of d·Σq.
                    let slack = if matches!(ty, WeightType::Q4_1 | WeightType::Q5_1) {
                        2e-3
                    } else {
                        1e-5
                    };
                    assert!(
                        (got as f64 - want).abs() <= (slack * mag) as f64 + 1e-6,
                        "{ty}: got {got}, want {want}"
                    );
                }
            }
        }
    }

    /// The activations as the kernels see them (q·d), or x itself for F32/F16.
    fn dequantized_activations(a: &Acts) -> Vec<f32> {
        let bs = match a.kind {
            ActKind::F32 => return a.x.to_vec(),
            ActKind::Q8K => QK_K,
            _ => QK,
        };
        let mut out = vec![0f32; a.m * a.cols];
        for i in 0..a.m {
            for c in 0..a.cols {
                out[i * a.cols + c] = a.qs[i * a.cols + c] as f32 * a.d[a.scale_index(i, c / bs)];
            }
        }
        out
    }
}
