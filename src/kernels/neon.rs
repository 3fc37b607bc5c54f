//! aarch64 NEON kernels, kept simple: one activation row × one weight row at a time, baseline
//! NEON only (`vmull_s8` + `vpadalq_s16`, no `dotprod` extension), integer sums per block as in
//! the scalar reference. On x86 the tests build this file against `neon_emu`, a scalar
//! emulation of the same intrinsics, so the logic is tested here too.

// Whether the arithmetic intrinsics are `unsafe fn` depends on the toolchain; the blocks are
// needed on some, redundant on others.
#![allow(unused_unsafe)]

#[cfg(target_arch = "aarch64")]
use std::arch::aarch64::*;

#[cfg(not(target_arch = "aarch64"))]
use super::neon_emu::*;

use super::WeightType;
use super::formats::{
    self, IQ4NL_BYTES, IQ4NL_QS, IQ4XS_BYTES, IQ4XS_QS, KVALUES_IQ4NL, Q2K_BYTES, Q2K_D, Q2K_DMIN,
    Q2K_QS, Q2K_SCALES, Q3K_BYTES, Q3K_D, Q3K_HMASK, Q3K_QS, Q3K_SCALES, Q4_0_BYTES, Q4_1_BYTES,
    Q5_0_BYTES, Q5_0_QH, Q5_0_QS, Q5_1_BYTES, Q5_1_QH, Q5_1_QS, Q5K_QH, Q6K_BYTES, Q6K_D, Q6K_QH,
    Q6K_QL, Q6K_SCALES, Q8_0_BYTES, QK, QK_K, f16_at,
};
use super::quantize::Acts;

/// `Σ w·x` of a row of 16-bit floats (`at(wr, byte offset)` reads one: F16 or BF16) with f32
/// activations `x`, four lanes at a time.
fn dense16(wr: &[u8], x: &[f32], at: fn(&[u8], usize) -> f32) -> f32 {
    let full = x.len() / 4 * 4;
    let mut wbuf = [0f32; 4];
    // SAFETY: register-only intrinsics and loads of 4 floats from `wbuf` and `x[k..k + 4]`.
    unsafe {
        let mut acc = vdupq_n_f32(0.0);
        for k in (0..full).step_by(4) {
            for (l, v) in wbuf.iter_mut().enumerate() {
                *v = at(wr, 2 * (k + l));
            }
            acc = vfmaq_f32(
                acc,
                vld1q_f32(wbuf.as_ptr()),
                vld1q_f32(x[k..k + 4].as_ptr()),
            );
        }
        let mut s = vaddvq_f32(acc);
        for (k, xv) in x.iter().enumerate().skip(full) {
            s += xv * at(wr, 2 * k);
        }
        s
    }
}

/// `acc + Σ a·b` over 16 i8 lanes (products fit i16: |a| ≤ 128, |b| ≤ 127).
#[inline]
fn dot16(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: register-only intrinsics.
    unsafe {
        let acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
        vpadalq_s16(acc, vmull_s8(vget_high_s8(a), vget_high_s8(b)))
    }
}

/// Loads 16 bytes from `s[off..off + 16]` (bounds-checked).
#[inline]
fn load_u8(s: &[u8], off: usize) -> uint8x16_t {
    let v = &s[off..off + 16];
    // SAFETY: `v` holds exactly 16 bytes.
    unsafe { vld1q_u8(v.as_ptr()) }
}

#[inline]
fn load_i8(s: &[i8], off: usize) -> int8x16_t {
    let v = &s[off..off + 16];
    // SAFETY: `v` holds exactly 16 bytes.
    unsafe { vld1q_s8(v.as_ptr()) }
}

/// Σ over 32 i8 pairs: `lo·y[0..16] + hi·y[16..32]`.
#[inline]
fn dot32(lo: int8x16_t, hi: int8x16_t, y: &[i8]) -> i32 {
    // SAFETY: register-only intrinsics.
    unsafe {
        vaddvq_s32(dot16(
            dot16(vdupq_n_s32(0), lo, load_i8(y, 0)),
            hi,
            load_i8(y, 16),
        ))
    }
}

/// Dot product of weight row `wr` with activation row `i`.
pub(crate) fn dot(ty: WeightType, wr: &[u8], acts: &Acts, i: usize) -> f32 {
    let cols = acts.cols;
    let qs = acts.row_quants(i);
    // SAFETY: register-only intrinsics; every load goes through the bounds-checked helpers.
    unsafe {
        let m4 = vdupq_n_u8(0x0F);
        match ty {
            WeightType::F32 => {
                let x = &acts.x[i * cols..(i + 1) * cols];
                let mut acc = vdupq_n_f32(0.0);
                let full = cols / 4 * 4;
                let mut wbuf = [0f32; 4];
                for k in (0..full).step_by(4) {
                    for (l, v) in wbuf.iter_mut().enumerate() {
                        let c = &wr[4 * (k + l)..4 * (k + l) + 4];
                        *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                    let xv = &x[k..k + 4];
                    acc = vfmaq_f32(acc, vld1q_f32(wbuf.as_ptr()), vld1q_f32(xv.as_ptr()));
                }
                let mut s = vaddvq_f32(acc);
                for (k, xv) in x.iter().enumerate().skip(full) {
                    let c = &wr[4 * k..4 * k + 4];
                    s += xv * f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
                s
            }
            WeightType::F16 => dense16(wr, &acts.x[i * cols..(i + 1) * cols], f16_at),
            WeightType::BF16 => dense16(wr, &acts.x[i * cols..(i + 1) * cols], formats::bf16_at),
            WeightType::Q4_0 | WeightType::Q4_1 => {
                let q41 = ty == WeightType::Q4_1;
                let (bb, qoff) = if q41 {
                    (Q4_1_BYTES, 4)
                } else {
                    (Q4_0_BYTES, 2)
                };
                let mut sumf = 0f32;
                for (b, blk) in wr.chunks_exact(bb).enumerate() {
                    let v = load_u8(blk, qoff);
                    let mut lo = vreinterpretq_s8_u8(vandq_u8(v, m4));
                    let mut hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(v));
                    let k = acts.scale_index(i, b);
                    if q41 {
                        let isum = dot32(lo, hi, &qs[b * QK..]);
                        sumf +=
                            (f16_at(blk, 0) * acts.d[k]) * isum as f32 + f16_at(blk, 2) * acts.s[k];
                    } else {
                        lo = vsubq_s8(lo, vdupq_n_s8(8));
                        hi = vsubq_s8(hi, vdupq_n_s8(8));
                        let isum = dot32(lo, hi, &qs[b * QK..]);
                        sumf += isum as f32 * f16_at(blk, 0) * acts.d[k];
                    }
                }
                sumf
            }
            WeightType::Q5_0 | WeightType::Q5_1 => {
                let q51 = ty == WeightType::Q5_1;
                let (bb, qh_off, qoff) = if q51 {
                    (Q5_1_BYTES, Q5_1_QH, Q5_1_QS)
                } else {
                    (Q5_0_BYTES, Q5_0_QH, Q5_0_QS)
                };
                let mut sumf = 0f32;
                for (b, blk) in wr.chunks_exact(bb).enumerate() {
                    // The fifth bits as 0/16 per weight, expanded in scalar code.
                    let h = u32::from_le_bytes([
                        blk[qh_off],
                        blk[qh_off + 1],
                        blk[qh_off + 2],
                        blk[qh_off + 3],
                    ]);
                    let mut hb = [0u8; QK];
                    for (k, v) in hb.iter_mut().enumerate() {
                        *v = (((h >> k) & 1) as u8) << 4;
                    }
                    let v = load_u8(blk, qoff);
                    let mut lo = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(v, m4), load_u8(&hb, 0)));
                    let mut hi =
                        vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8::<4>(v), load_u8(&hb, 16)));
                    let k = acts.scale_index(i, b);
                    if q51 {
                        let isum = dot32(lo, hi, &qs[b * QK..]);
                        sumf +=
                            (f16_at(blk, 0) * acts.d[k]) * isum as f32 + f16_at(blk, 2) * acts.s[k];
                    } else {
                        lo = vsubq_s8(lo, vdupq_n_s8(16));
                        hi = vsubq_s8(hi, vdupq_n_s8(16));
                        let isum = dot32(lo, hi, &qs[b * QK..]);
                        sumf += isum as f32 * (f16_at(blk, 0) * acts.d[k]);
                    }
                }
                sumf
            }
            WeightType::Q8_0 => {
                let mut sumf = 0f32;
                for (b, blk) in wr.chunks_exact(Q8_0_BYTES).enumerate() {
                    let lo = vreinterpretq_s8_u8(load_u8(blk, 2));
                    let hi = vreinterpretq_s8_u8(load_u8(blk, 18));
                    let isum = dot32(lo, hi, &qs[b * QK..]);
                    sumf += isum as f32 * (f16_at(blk, 0) * acts.d[acts.scale_index(i, b)]);
                }
                sumf
            }
            WeightType::IQ4NL | WeightType::IQ4XS => {
                // The levels of 16 bytes of nibbles: low nibbles are the first 16 weights.
                let table = vld1q_s8(KVALUES_IQ4NL.as_ptr());
                let levels = |blk: &[u8], off: usize| {
                    let v = load_u8(blk, off);
                    (
                        vqtbl1q_s8(table, vandq_u8(v, m4)),
                        vqtbl1q_s8(table, vshrq_n_u8::<4>(v)),
                    )
                };
                let mut sumf = 0f32;
                if ty == WeightType::IQ4NL {
                    for (b, blk) in wr.chunks_exact(IQ4NL_BYTES).enumerate() {
                        let (lo, hi) = levels(blk, IQ4NL_QS);
                        let isum = dot32(lo, hi, &qs[b * QK..]);
                        sumf += isum as f32 * (acts.d[acts.scale_index(i, b)] * f16_at(blk, 0));
                    }
                } else {
                    for (b, blk) in wr.chunks_exact(IQ4XS_BYTES).enumerate() {
                        let mut isum = 0i32;
                        for (ib, &ls) in formats::iq4xs_scales(blk).iter().enumerate() {
                            let (lo, hi) = levels(blk, IQ4XS_QS + 16 * ib);
                            isum += ls as i32 * dot32(lo, hi, &qs[b * QK_K + QK * ib..]);
                        }
                        sumf += f16_at(blk, 0) * acts.d[acts.scale_index(i, b)] * isum as f32;
                    }
                }
                sumf
            }
            WeightType::Q2K | WeightType::Q3K => {
                // Quant p = 128n + 32c + l: bits 2c of byte 32n + l of the 2-bit field; Q3_K's
                // third bit is bit 4n + c of hmask byte l (clear: −4).
                let three = ty == WeightType::Q3K;
                let (bb, qs_off) = if three {
                    (Q3K_BYTES, Q3K_QS)
                } else {
                    (Q2K_BYTES, Q2K_QS)
                };
                let (m3, m1, four) = (vdupq_n_u8(3), vdupq_n_u8(1), vdupq_n_s8(4));
                let mut sumf = 0f32;
                for (b, blk) in wr.chunks_exact(bb).enumerate() {
                    let y = &qs[b * QK_K..(b + 1) * QK_K];
                    let scales: [i32; 16] = if three {
                        formats::q3k_scales(&blk[Q3K_SCALES..Q3K_SCALES + 12]).map(i32::from)
                    } else {
                        std::array::from_fn(|g| (blk[Q2K_SCALES + g] & 0xF) as i32)
                    };
                    let mut isum = 0i32;
                    for half in 0..2 {
                        let mut hm = if three {
                            load_u8(blk, Q3K_HMASK + 16 * half)
                        } else {
                            vdupq_n_u8(0)
                        };
                        for n in 0..2 {
                            let mut bits = load_u8(blk, qs_off + 32 * n + 16 * half);
                            for c in 0..4 {
                                let low = vandq_u8(bits, m3);
                                bits = vshrq_n_u8::<2>(bits);
                                let q = if three {
                                    let q = vorrq_u8(low, vshlq_n_u8::<2>(vandq_u8(hm, m1)));
                                    hm = vshrq_n_u8::<1>(hm);
                                    vsubq_s8(vreinterpretq_s8_u8(q), four)
                                } else {
                                    vreinterpretq_s8_u8(low)
                                };
                                let p = 128 * n + 32 * c + 16 * half;
                                let d16 = vaddvq_s32(dot16(vdupq_n_s32(0), q, load_i8(y, p)));
                                isum += scales[p / 16] * d16;
                            }
                        }
                    }
                    let dy = acts.d[acts.scale_index(i, b)];
                    if three {
                        sumf += f16_at(blk, Q3K_D) * dy * isum as f32;
                    } else {
                        let bsums = &acts.bsums[(i * acts.nb + b) * 16..(i * acts.nb + b + 1) * 16];
                        let msum: i32 = (0..16)
                            .map(|g| (blk[Q2K_SCALES + g] >> 4) as i32 * bsums[g] as i32)
                            .sum();
                        sumf += dy * f16_at(blk, Q2K_D) * isum as f32
                            - dy * f16_at(blk, Q2K_DMIN) * msum as f32;
                    }
                }
                sumf
            }
            WeightType::Q4K | WeightType::Q5K => {
                let five = ty == WeightType::Q5K;
                let (bb, sc_off, qs_off) = formats::k4_layout(five);
                let (m1, m2) = (vdupq_n_u8(1), vdupq_n_u8(2));
                let mut sumf = 0f32;
                for (b, blk) in wr.chunks_exact(bb).enumerate() {
                    let y = &qs[b * QK_K..(b + 1) * QK_K];
                    let bsums = &acts.bsums[(i * acts.nb + b) * 16..(i * acts.nb + b + 1) * 16];
                    let sm = formats::unpack_scales_mins_k4(&blk[sc_off..sc_off + 12]);
                    let (mut h0, mut h1) = if five {
                        (load_u8(blk, Q5K_QH), load_u8(blk, Q5K_QH + 16))
                    } else {
                        (vdupq_n_u8(0), vdupq_n_u8(0))
                    };
                    let mut isum = 0i32;
                    let mut msum = 0i32;
                    for c in 0..4 {
                        let r0 = load_u8(blk, qs_off + 32 * c);
                        let r1 = load_u8(blk, qs_off + 32 * c + 16);
                        let (mut l0, mut l1) = (vandq_u8(r0, m4), vandq_u8(r1, m4));
                        let (mut u0, mut u1) = (vshrq_n_u8::<4>(r0), vshrq_n_u8::<4>(r1));
                        if five {
                            // Bit 2c of qh is the 5th bit of the low nibbles, bit 2c+1 of the high.
                            l0 = vorrq_u8(l0, vshlq_n_u8::<4>(vandq_u8(h0, m1)));
                            l1 = vorrq_u8(l1, vshlq_n_u8::<4>(vandq_u8(h1, m1)));
                            u0 = vorrq_u8(u0, vshlq_n_u8::<3>(vandq_u8(h0, m2)));
                            u1 = vorrq_u8(u1, vshlq_n_u8::<3>(vandq_u8(h1, m2)));
                            h0 = vshrq_n_u8::<2>(h0);
                            h1 = vshrq_n_u8::<2>(h1);
                        }
                        let dl = dot32(
                            vreinterpretq_s8_u8(l0),
                            vreinterpretq_s8_u8(l1),
                            &y[64 * c..],
                        );
                        let du = dot32(
                            vreinterpretq_s8_u8(u0),
                            vreinterpretq_s8_u8(u1),
                            &y[64 * c + 32..],
                        );
                        isum += sm[2 * c] as i32 * dl + sm[2 * c + 1] as i32 * du;
                    }
                    for sub in 0..8 {
                        msum += sm[8 + sub] as i32
                            * (bsums[2 * sub] as i32 + bsums[2 * sub + 1] as i32);
                    }
                    let dy = acts.d[acts.scale_index(i, b)];
                    sumf += dy * f16_at(blk, 0) * isum as f32 - dy * f16_at(blk, 2) * msum as f32;
                }
                sumf
            }
            WeightType::Q6K => {
                let (m3, off) = (vdupq_n_u8(3), vdupq_n_s8(32));
                // 6-bit quant from 4 low bits and 2 high bits, recentred to -32..31.
                let six = |low: uint8x16_t, high: uint8x16_t| {
                    vsubq_s8(
                        vreinterpretq_s8_u8(vorrq_u8(low, vshlq_n_u8::<4>(vandq_u8(high, m3)))),
                        off,
                    )
                };
                let mut sumf = 0f32;
                for (b, blk) in wr.chunks_exact(Q6K_BYTES).enumerate() {
                    let y = &qs[b * QK_K..(b + 1) * QK_K];
                    let sc = &blk[Q6K_SCALES..Q6K_SCALES + 16];
                    let mut isum = 0i32;
                    for n in 0..2 {
                        for half in 0..2 {
                            let ql0 = load_u8(blk, Q6K_QL + 64 * n + 16 * half);
                            let ql1 = load_u8(blk, Q6K_QL + 64 * n + 32 + 16 * half);
                            let qh = load_u8(blk, Q6K_QH + 32 * n + 16 * half);
                            let q = [
                                six(vandq_u8(ql0, m4), qh),
                                six(vandq_u8(ql1, m4), vshrq_n_u8::<2>(qh)),
                                six(vshrq_n_u8::<4>(ql0), vshrq_n_u8::<4>(qh)),
                                six(vshrq_n_u8::<4>(ql1), vshrq_n_u8::<6>(qh)),
                            ];
                            for (c, qc) in q.iter().enumerate() {
                                let p = 128 * n + 32 * c + 16 * half;
                                let d16 = vaddvq_s32(dot16(vdupq_n_s32(0), *qc, load_i8(y, p)));
                                isum += (sc[p / 16] as i8) as i32 * d16;
                            }
                        }
                    }
                    sumf += f16_at(blk, Q6K_D) * acts.d[acts.scale_index(i, b)] * isum as f32;
                }
                sumf
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::OutPtr;
    use crate::kernels::quantize::ActivationScratch;
    use crate::kernels::testutil::{self, Rng};
    use crate::kernels::{QMatrix, scalar};

    fn run(dot: scalar::RowDot, w: &QMatrix, acts: &Acts) -> Vec<f32> {
        let mut out = vec![f32::NAN; acts.m * w.rows];
        let o = OutPtr::new(&mut out, acts.m, w.rows);
        // SAFETY: single thread, whole output; the NEON dot runs emulated off aarch64.
        unsafe { scalar::compute(dot, w, acts, 0..acts.m, 0..w.rows, o) };
        out
    }

    /// The NEON kernels (emulated on x86) against the scalar reference on the same quantized
    /// activations: only float summation order differs (tolerance 1e-5 of Σ|x|·(|w|+offset)).
    #[test]
    fn neon_matches_scalar_reference() {
        let mut rng = Rng::new(21);
        for ty in WeightType::ALL {
            for &(rows, cols, m) in &[(3usize, 256usize, 2usize), (5, 512, 3), (1, 1536, 1)] {
                let cols = if matches!(ty, WeightType::F32 | WeightType::F16 | WeightType::BF16) {
                    cols + 3
                } else {
                    cols
                };
                let data = testutil::random_weights(&mut rng, ty, rows, cols);
                let w = QMatrix::new(ty, rows, cols, &data).unwrap();
                let wf = testutil::dequantize_all(&w);
                let x = testutil::random_activations(&mut rng, m * cols);
                let mut scratch = ActivationScratch::default();
                let acts = testutil::scalar_acts(ty, &x, m, cols, &mut scratch);
                let want = run(scalar::dot, &w, &acts);
                let got = run(dot, &w, &acts);
                for i in 0..m {
                    for j in 0..rows {
                        let tol = 1e-5 * testutil::magnitude(&w, &wf, &x, i, j) + 1e-6;
                        let (g, e) = (got[i * rows + j], want[i * rows + j]);
                        assert!((g - e).abs() <= tol, "{ty} ({i},{j}): {g} vs {e}");
                    }
                }
            }
        }
    }
}
