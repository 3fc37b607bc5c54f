//! Activation quantization, once per matmul, as ggml does it on x86:
//! - Q8_0 / Q8_1 (`quantize_row_q8_0` / `quantize_row_q8_1`, x86 version): per 32 values,
//!   `d = amax/127`, `q = round_half_even(x · 127/amax)`, `d` stored as f16; Q8_1 also keeps
//!   `s = f16(d · Σq)` (with the unrounded `d`).
//! - Q8_K (`quantize_row_q8_K_ref`, which x86 also uses): per 256 values, scale from the
//!   signed value of largest magnitude, `q = min(127, nearest_int(-127/max · x))`, f32 `d`,
//!   and `bsums` = sums of each 16 quants.
//!
//! The layout is ours (only the numbers must match ggml): quants are row-major `m × cols`
//! i8; the per-block scales are stored for groups of 4 rows interleaved,
//! `d[((row/4)·nb + b)·4 + row%4]`, so a register tile of 4 rows loads its 4 scales at once.

use super::formats::{QK, QK_K, round_f16};
use super::pool::ThreadPool;
use super::{KernelPath, WeightType};

/// Rows per interleaved scale group (the widest register tile).
pub(crate) const GROUP: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActKind {
    /// f32 activations used as they are (F32/F16/BF16 weights).
    F32,
    /// Q8_0; `s` holds `d·Σq` (exact in f32), used to fold Q4_0's `-8` offset.
    Q8_0,
    /// Q8_1; `s` holds ggml's f16-rounded `d·Σq`.
    Q8_1,
    /// Q8_K; `d` is f32, `bsums` holds the 16 sums of 16 quants per super-block.
    Q8K,
}

impl ActKind {
    pub(crate) fn for_weights(ty: WeightType) -> ActKind {
        match ty {
            WeightType::F32 | WeightType::F16 | WeightType::BF16 => ActKind::F32,
            WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 | WeightType::IQ4NL => {
                ActKind::Q8_0
            }
            WeightType::Q4_1 | WeightType::Q5_1 => ActKind::Q8_1,
            WeightType::Q2K
            | WeightType::Q3K
            | WeightType::Q4K
            | WeightType::Q5K
            | WeightType::Q6K
            | WeightType::IQ4XS => ActKind::Q8K,
        }
    }

    fn block(self) -> usize {
        match self {
            ActKind::F32 => 1,
            ActKind::Q8_0 | ActKind::Q8_1 => QK,
            ActKind::Q8K => QK_K,
        }
    }
}

/// Reusable scratch for quantized activations: buffers only grow, so once warm a matmul of
/// the same or smaller size allocates nothing.
#[derive(Default, Debug)]
pub struct ActivationScratch {
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    bsums: Vec<i16>,
}

/// Read-only view of quantized activations.
#[derive(Clone, Copy)]
pub(crate) struct Acts<'a> {
    pub kind: ActKind,
    pub m: usize,
    pub cols: usize,
    /// Blocks per row.
    pub nb: usize,
    /// The f32 activations themselves (`m × cols`).
    pub x: &'a [f32],
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub bsums: &'a [i16],
}

impl Acts<'_> {
    /// Index of block `b` of row `row` in `d` / `s`.
    #[inline]
    pub(crate) fn scale_index(&self, row: usize, b: usize) -> usize {
        ((row / GROUP) * self.nb + b) * GROUP + row % GROUP
    }

    /// Row `i`'s quants (none when the activations stay f32).
    pub(crate) fn row_quants(&self, i: usize) -> &[i8] {
        if self.kind == ActKind::F32 {
            &[]
        } else {
            &self.qs[i * self.cols..(i + 1) * self.cols]
        }
    }
}

fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    }
}

/// Raw pointers to the scratch buffers, shared by the threads that each fill whole groups.
#[derive(Clone, Copy)]
struct ScratchPtrs {
    qs: *mut i8,
    d: *mut f32,
    s: *mut f32,
    bsums: *mut i16,
}
// SAFETY: the pointers are only used to build slices over disjoint row groups, one thread per
// group, while the owning `ActivationScratch` is mutably borrowed by `quantize`.
unsafe impl Send for ScratchPtrs {}
// SAFETY: as above.
unsafe impl Sync for ScratchPtrs {}

/// Quantizes `x` (`m × cols`, `cols` a multiple of the block size, checked by the caller) into
/// `scratch`, splitting rows over the pool when there is enough work.
pub(crate) fn quantize<'a>(
    kind: ActKind,
    path: KernelPath,
    pool: &ThreadPool,
    x: &'a [f32],
    m: usize,
    cols: usize,
    scratch: &'a mut ActivationScratch,
) -> Acts<'a> {
    let bs = kind.block();
    let nb = cols / bs;
    let groups = m.div_ceil(GROUP);
    if kind != ActKind::F32 {
        grow(&mut scratch.qs, m * cols);
        grow(&mut scratch.d, groups * nb * GROUP);
        grow(&mut scratch.s, groups * nb * GROUP);
        if kind == ActKind::Q8K {
            grow(&mut scratch.bsums, m * nb * 16);
        }
        let ptrs = ScratchPtrs {
            qs: scratch.qs.as_mut_ptr(),
            d: scratch.d.as_mut_ptr(),
            s: scratch.s.as_mut_ptr(),
            bsums: scratch.bsums.as_mut_ptr(),
        };
        let do_groups = |g0: usize, g1: usize| {
            // Capture the whole struct (its Sync impl), not its raw-pointer fields one by one.
            let p = ptrs;
            for g in g0..g1 {
                let r0 = g * GROUP;
                let r1 = (r0 + GROUP).min(m);
                // SAFETY: rows r0..r1 and scale group g lie inside the buffers grown above
                // (qs: m·cols, d/s: groups·nb·GROUP, bsums: m·nb·16) and each group is handled by
                // exactly one caller of `do_groups`, so the slices are disjoint.
                let (qs, d, s, bsums) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(p.qs.add(r0 * cols), (r1 - r0) * cols),
                        std::slice::from_raw_parts_mut(p.d.add(g * nb * GROUP), nb * GROUP),
                        std::slice::from_raw_parts_mut(p.s.add(g * nb * GROUP), nb * GROUP),
                        if kind == ActKind::Q8K {
                            std::slice::from_raw_parts_mut(
                                p.bsums.add(r0 * nb * 16),
                                (r1 - r0) * nb * 16,
                            )
                        } else {
                            &mut []
                        },
                    )
                };
                // Lanes of a partial last group stay zero so tiles may read all 4.
                d.fill(0.0);
                s.fill(0.0);
                for r in r0..r1 {
                    let lane = r - r0;
                    let xr = &x[r * cols..(r + 1) * cols];
                    let qr = &mut qs[lane * cols..(lane + 1) * cols];
                    match kind {
                        ActKind::Q8_0 | ActKind::Q8_1 => {
                            quantize_row_q8(kind, path, xr, qr, &mut d[lane..], &mut s[lane..]);
                        }
                        ActKind::Q8K => quantize_row_q8k(
                            path,
                            xr,
                            qr,
                            &mut d[lane..],
                            &mut bsums[lane * nb * 16..(lane + 1) * nb * 16],
                        ),
                        ActKind::F32 => {}
                    }
                }
            }
        };
        let n = pool.n_threads();
        // Small batches are cheaper on the calling thread than a dispatch.
        if n > 1 && m >= 8 && m * cols >= 16 * 1024 {
            pool.run(|t, n| {
                let g0 = groups * t / n;
                let g1 = groups * (t + 1) / n;
                do_groups(g0, g1);
            });
        } else {
            do_groups(0, groups);
        }
    }
    Acts {
        kind,
        m,
        cols,
        nb,
        x,
        qs: &scratch.qs[..if kind == ActKind::F32 { 0 } else { m * cols }],
        d: &scratch.d[..],
        s: &scratch.s[..],
        bsums: &scratch.bsums[..],
    }
}

/// One row to Q8_0/Q8_1; scales go to `d[b·GROUP]`, `s[b·GROUP]`.
fn quantize_row_q8(
    kind: ActKind,
    path: KernelPath,
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    s: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if path.runs_avx2_routines() {
        for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
            // SAFETY: AVX2/FMA/F16C availability checked just above.
            let (db, sb) = unsafe { super::avx2::quantize_block_q8(xb, qb) };
            d[b * GROUP] = db;
            s[b * GROUP] = if kind == ActKind::Q8_1 {
                sb
            } else {
                q8_0_offset_sum(db, qb)
            };
        }
        return;
    }
    let _ = path;
    for (b, (xb, qb)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
        let (db, sb) = quantize_block_q8_scalar(xb, qb);
        d[b * GROUP] = db;
        s[b * GROUP] = if kind == ActKind::Q8_1 {
            sb
        } else {
            q8_0_offset_sum(db, qb)
        };
    }
}

/// `d·Σq` for a Q8_0 block (exact integer sum, one rounding).
fn q8_0_offset_sum(d: f32, q: &[i8]) -> f32 {
    d * q.iter().map(|&v| v as i32).sum::<i32>() as f32
}

/// Reference Q8_0/Q8_1 block: returns (f16-rounded d, f16-rounded d·Σq).
pub(crate) fn quantize_block_q8_scalar(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (qv, &xv) in q.iter_mut().zip(x) {
        // |x·id| ≤ 127 (up to rounding of id), so the cast never saturates past ±128.
        let v = (xv * id).round_ties_even() as i32;
        *qv = v.clamp(-128, 127) as i8;
        sum += *qv as i32;
    }
    (round_f16(d), round_f16(d * sum as f32))
}

/// ggml `nearest_int`: round half to even through the 1.5·2²³ trick (valid for |x| < 2²²).
#[inline]
fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// One row to Q8_K; `d[b·GROUP]` and 16 `bsums` per super-block.
pub(crate) fn quantize_row_q8k(
    path: KernelPath,
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    bsums: &mut [i16],
) {
    #[cfg(target_arch = "x86_64")]
    if path.runs_avx2_routines() {
        // SAFETY: AVX2 availability checked just above.
        unsafe { quantize_row_q8k_avx2(x, q, d, bsums) };
        return;
    }
    let _ = path;
    quantize_row_q8k_with(x, q, d, bsums, first_max_q8k);
}

/// [`quantize_row_q8k`] with the largest-magnitude search in AVX2 and the rest compiled for
/// AVX2 (the same operations on each value, so the same bits).
///
/// # Safety
/// AVX2 available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_q8k_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    // SAFETY: AVX2 available (this function's contract).
    quantize_row_q8k_with(x, q, d, bsums, |xb| unsafe {
        super::avx2::first_max_q8k(xb)
    });
}

/// The largest magnitude among a super-block's values and the first value that has it.
fn first_max_q8k(xb: &[f32]) -> (f32, f32) {
    let mut max = 0f32;
    let mut amax = 0f32;
    for &v in xb {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

#[inline(always)]
fn quantize_row_q8k_with(
    x: &[f32],
    q: &mut [i8],
    d: &mut [f32],
    bsums: &mut [i16],
    first_max: impl Fn(&[f32]) -> (f32, f32),
) {
    for (b, (xb, qb)) in x
        .chunks_exact(QK_K)
        .zip(q.chunks_exact_mut(QK_K))
        .enumerate()
    {
        let (amax, max) = first_max(xb);
        let sums = &mut bsums[b * 16..(b + 1) * 16];
        if amax == 0.0 {
            d[b * GROUP] = 0.0;
            qb.fill(0);
            sums.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for (qv, &xv) in qb.iter_mut().zip(xb) {
            *qv = nearest_int(iscale * xv).min(127) as i8;
        }
        for (sum, q16) in sums.iter_mut().zip(qb.chunks_exact(16)) {
            *sum = q16.iter().map(|&v| v as i16).sum();
        }
        d[b * GROUP] = 1.0 / iscale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::{self, Rng};

    fn quantized(
        kind: ActKind,
        path: KernelPath,
        x: &[f32],
        m: usize,
        cols: usize,
        threads: usize,
    ) -> (Vec<i8>, Vec<f32>, Vec<f32>, Vec<i16>) {
        let pool = ThreadPool::new(threads);
        let mut scratch = ActivationScratch::default();
        let a = quantize(kind, path, &pool, x, m, cols, &mut scratch);
        let n = m.div_ceil(GROUP) * a.nb * GROUP;
        let nbs = if kind == ActKind::Q8K {
            m * a.nb * 16
        } else {
            0
        };
        (
            a.qs.to_vec(),
            a.d[..n].to_vec(),
            a.s[..n].to_vec(),
            a.bsums[..nbs].to_vec(),
        )
    }

    #[test]
    fn q8_matches_ggml_definition() {
        let mut rng = Rng::new(1);
        let x: Vec<f32> = (0..64).map(|_| rng.activation()).collect();
        let mut q = [0i8; 32];
        let (d, s) = quantize_block_q8_scalar(&x[..32], &mut q);
        let amax = x[..32].iter().fold(0f32, |a, v| a.max(v.abs()));
        assert_eq!(d, round_f16(amax / 127.0));
        let sum: i32 = q.iter().map(|&v| v as i32).sum();
        assert_eq!(s, round_f16(amax / 127.0 * sum as f32));
        for (qv, xv) in q.iter().zip(&x) {
            assert!((*qv as f32 - xv * 127.0 / amax).abs() <= 0.5 + 1e-4);
        }
        assert!(q.iter().any(|&v| v.abs() == 127));
        // All-zero block: d = 0 and q = 0.
        let (d, s) = quantize_block_q8_scalar(&[0.0; 32], &mut q);
        assert_eq!((d, s), (0.0, 0.0));
        assert!(q.iter().all(|&v| v == 0));
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-126.7), -127);
        assert_eq!(nearest_int(3.49), 3);
    }

    #[test]
    fn q8k_matches_ggml_definition() {
        let mut rng = Rng::new(2);
        let mut x: Vec<f32> = (0..512).map(|_| rng.activation()).collect();
        x[256..512].fill(0.0);
        let mut q = vec![0i8; 512];
        let mut d = vec![0f32; 2 * GROUP];
        let mut bs = vec![0i16; 32];
        quantize_row_q8k(KernelPath::Scalar, &x, &mut q, &mut d, &mut bs);
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in &x[..256] {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        assert_eq!(d[0], 1.0 / (-127.0 / max));
        let imax = x.iter().position(|&v| v == max).unwrap();
        assert_eq!(q[imax], -127);
        for g in 0..16 {
            let s: i16 = q[16 * g..16 * g + 16].iter().map(|&v| v as i16).sum();
            assert_eq!(bs[g], s);
        }
        assert_eq!(d[GROUP], 0.0);
        assert!(q[256..].iter().all(|&v| v == 0) && bs[16..].iter().all(|&v| v == 0));
    }

    /// The AVX2 search finds the same value as the scalar one where the largest magnitude is
    /// shared (by +a and −a, or repeated), sits in the last lane, sits next to NaNs or
    /// infinities, or is zero.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_largest_magnitude_search_matches_the_scalar_one() {
        if !KernelPath::Avx2.runs_avx2_routines() {
            return;
        }
        let mut rng = Rng::new(4);
        let base: Vec<f32> = (0..QK_K).map(|_| rng.activation()).collect();
        let mut cases = vec![base.clone(), vec![0.0; QK_K], vec![-0.0; QK_K]];
        for (a, b) in [(17, 200), (200, 17), (3, 4), (250, 255)] {
            for sign in [1.0, -1.0] {
                let mut x = base.clone();
                x[a] = 9.5;
                x[b] = 9.5 * sign;
                cases.push(x);
            }
        }
        let mut x = base.clone();
        x[255] = -40.0;
        cases.push(x.clone());
        x[10] = f32::NAN;
        x[44] = f32::NAN;
        cases.push(x.clone());
        x[100] = f32::NEG_INFINITY;
        x[101] = f32::INFINITY;
        cases.push(x);
        for (i, x) in cases.iter().enumerate() {
            // SAFETY: AVX2 is available (checked above).
            let (amax, max) = unsafe { super::super::avx2::first_max_q8k(x) };
            let (want_amax, want_max) = first_max_q8k(x);
            assert_eq!(
                (amax.to_bits(), max.to_bits()),
                (want_amax.to_bits(), want_max.to_bits()),
                "case {i}"
            );
        }
    }

    #[test]
    fn simd_and_threaded_quantization_is_bit_identical() {
        let mut rng = Rng::new(3);
        for &(m, cols) in &[(1usize, 256usize), (3, 512), (9, 768), (33, 1024)] {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.activation()).collect();
            for kind in [ActKind::Q8_0, ActKind::Q8_1, ActKind::Q8K] {
                let reference = quantized(kind, KernelPath::Scalar, &x, m, cols, 1);
                for path in testutil::available_paths() {
                    for threads in [1, 2, 3] {
                        assert!(
                            quantized(kind, path, &x, m, cols, threads) == reference,
                            "{kind:?} {path} m={m} threads={threads}"
                        );
                    }
                }
            }
        }
    }
}
