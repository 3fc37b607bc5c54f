//! The matmul driver: checks shapes, quantizes the activations once, then splits the weight
//! rows into equal contiguous panels that the pool's threads take in turn.
//!
//! Every thread sees all `m` activation rows, so each weight block is loaded from memory once
//! per matmul. Beyond one group of rows a panel is small enough (tens of KiB of weights) to stay
//! in L2 while the backend sweeps it once per group of activation rows; up to one group it is
//! swept once, so it is large (a MiB): each thread then streams long runs of consecutive
//! lines, which the hardware prefetchers follow at the memory's full rate, where short panels
//! taken in turn by the threads broke every stream every few pages (decode at three quarters of
//! the bandwidth).

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::pool::ThreadPool;
use super::quantize::{ActKind, Acts, GROUP, quantize};
use super::{ActivationScratch, KernelError, KernelPath, QMatrix, scalar};

/// Below this much work (weight bytes × activation rows) a matmul stays on the calling thread.
pub(crate) const DEFAULT_MIN_PARALLEL_BYTES: usize = 24 * 1024;

/// Target weight bytes per panel for up to one group of activation rows (streamed once) and for
/// more (the panel is re-read from L2 for every group of activation rows). A streamed panel of
/// 512 KiB to 8 MiB reads a Llama-1B-sized model's weights at 29–33 GB/s on two Zen 4 threads,
/// 32 KiB at 22–24 GB/s.
const PANEL_BYTES_STREAM: usize = 1024 * 1024;
const PANEL_BYTES_GEMM: usize = 64 * 1024;

/// Where the results go: `out[i * rows + j]`.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr {
    ptr: *mut f32,
    m: usize,
    rows: usize,
}

// SAFETY: threads write disjoint weight-row panels of the output through this pointer while the
// `&mut [f32]` it came from is borrowed by `matmul`.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Output view of `out` (`m × rows`, length checked).
    pub(crate) fn new(out: &mut [f32], m: usize, rows: usize) -> OutPtr {
        assert_eq!(out.len(), m * rows, "output view size");
        OutPtr {
            ptr: out.as_mut_ptr(),
            m,
            rows,
        }
    }

    /// Where element `(i, j)` is; row `i`'s elements follow it.
    ///
    /// # Safety
    /// `i < m` and `j < rows`.
    #[inline]
    pub(crate) unsafe fn at(&self, i: usize, j: usize) -> *mut f32 {
        debug_assert!(i < self.m && j < self.rows);
        // SAFETY: in bounds by the caller's contract; `ptr` covers m·rows floats.
        unsafe { self.ptr.add(i * self.rows + j) }
    }

    /// # Safety
    /// `i < m`, `j < rows`, and no other thread reads or writes element `(i, j)` meanwhile.
    #[inline]
    pub(crate) unsafe fn write(&self, i: usize, j: usize, v: f32) {
        debug_assert!(i < self.m && j < self.rows);
        // SAFETY: in bounds by the caller's contract; `ptr` covers m·rows floats.
        unsafe { *self.ptr.add(i * self.rows + j) = v };
    }
}

/// `actual` must be `m × per_row`.
fn check_len(
    what: &'static str,
    m: usize,
    per_row: usize,
    actual: usize,
) -> Result<(), KernelError> {
    let expected = m.checked_mul(per_row).ok_or(KernelError::SizeOverflow)?;
    if actual == expected {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            what,
            expected,
            actual,
        })
    }
}

/// Several matrices over the same activations (q/k/v, gate/up): the activations are quantized
/// once and all matrices' panels go to the pool in one dispatch, so small matrices do not each
/// pay a thread hand-off. Matrices that need different activation types are grouped.
pub(crate) fn matmul_many(
    path: KernelPath,
    pool: &ThreadPool,
    jobs: &mut [(&QMatrix, &mut [f32])],
    x: &[f32],
    m: usize,
    scratch: &mut ActivationScratch,
    min_parallel_bytes: usize,
) -> Result<(), KernelError> {
    if !path.is_available() {
        return Err(KernelError::PathUnavailable(path));
    }
    let Some((first, _)) = jobs.first() else {
        return Ok(());
    };
    let (cols, kind) = (first.cols, ActKind::for_weights(first.ty));
    for (w, out) in jobs.iter_mut() {
        w.validate()?;
        check_len("activation length (m × cols)", m, w.cols, x.len())?;
        check_len("output length (m × rows)", m, w.rows, out.len())?;
    }
    if jobs.iter().any(|(w, _)| ActKind::for_weights(w.ty) != kind) {
        for job in jobs.iter_mut() {
            let one = std::slice::from_mut(job);
            matmul_many(path, pool, one, x, m, scratch, min_parallel_bytes)?;
        }
        return Ok(());
    }
    if m == 0 {
        return Ok(());
    }
    if cols == 0 {
        for (_, out) in jobs.iter_mut() {
            out.fill(0.0);
        }
        return Ok(());
    }

    let acts = quantize(kind, path, pool, x, m, cols, scratch);
    let total_bytes: usize = jobs.iter().map(|(w, _)| w.row_bytes() * w.rows).sum();
    let threads = if total_bytes.saturating_mul(m) < min_parallel_bytes {
        1
    } else {
        pool.n_threads()
    };
    let target = if m <= GROUP {
        PANEL_BYTES_STREAM
    } else {
        PANEL_BYTES_GEMM
    };
    // Every matrix is cut into equal panels of about `target` bytes, each a multiple of 16
    // weight rows: a multiple of every tile width (16 for the AVX-512 VNNI GEMM tiles), and 16
    // f32 outputs are one cache line, so two threads' panels never write the same line of an
    // output row (false sharing there cost GEMV about a fifth of its speed on two threads). The
    // panels of all matrices form one list the threads take in turn.
    let align = 16;
    struct Work<'w> {
        w: &'w QMatrix<'w>,
        out: OutPtr,
        panel_rows: usize,
        first_panel: usize,
    }
    let mut work = Vec::with_capacity(jobs.len());
    let mut n_panels = 0;
    for (w, out) in jobs.iter_mut() {
        let weight_bytes = w.row_bytes() * w.rows;
        let per_thread = weight_bytes.div_ceil(target).div_ceil(threads).max(1);
        let panel_rows = w
            .rows
            .div_ceil(per_thread * threads)
            .next_multiple_of(align);
        let panels = w.rows.div_ceil(panel_rows);
        work.push(Work {
            w,
            out: OutPtr::new(out, m, w.rows),
            panel_rows,
            first_panel: n_panels,
        });
        n_panels += panels;
    }
    let run_panel = |p: usize| {
        let k = work.partition_point(|wk| wk.first_panel <= p) - 1;
        let wk = &work[k];
        let start = (p - wk.first_panel) * wk.panel_rows;
        let rows = start..(start + wk.panel_rows).min(wk.w.rows);
        // SAFETY: each panel index is run once, so the output columns written are disjoint;
        // the outputs outlive this call.
        unsafe { compute(path, wk.w, &acts, 0..m, rows, wk.out) };
    };
    if threads == 1 || n_panels == 1 {
        (0..n_panels).for_each(run_panel);
        return Ok(());
    }
    let next = AtomicUsize::new(0);
    pool.run(|_, _| {
        loop {
            let p = next.fetch_add(1, Ordering::Relaxed);
            if p >= n_panels {
                break;
            }
            run_panel(p);
        }
    });
    Ok(())
}

/// # Safety
/// `path` is available on this CPU; `out` is exclusively ours for `a × r`.
unsafe fn compute(
    path: KernelPath,
    w: &QMatrix,
    acts: &Acts,
    a: Range<usize>,
    r: Range<usize>,
    out: OutPtr,
) {
    match path {
        // SAFETY: forwarded contract.
        KernelPath::Scalar => unsafe { scalar::compute(scalar::dot, w, acts, a, r, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded contract; the caller checked AVX2/FMA/F16C.
        KernelPath::Avx2 => unsafe { super::avx2::compute(w, acts, a, r, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded contract; the caller checked AVX2/FMA/F16C and AVX-512 F/BW/VL/VNNI.
        KernelPath::Avx512Vnni => unsafe { super::avx512::compute(w, acts, a, r, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded contract; the caller checked AVX2/FMA/F16C, AVX-512 and AMX.
        KernelPath::Amx => unsafe { super::avx512::compute_amx(w, acts, a, r, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: forwarded contract; NEON is part of aarch64.
        KernelPath::Neon => unsafe { scalar::compute(super::neon::dot, w, acts, a, r, out) },
        // Unreachable: `is_available` was checked before quantizing.
        #[allow(unreachable_patterns)]
        _ => unsafe { scalar::compute(scalar::dot, w, acts, a, r, out) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::formats;
    use crate::kernels::testutil::{self, Rng};
    use crate::kernels::{WeightType, detect};

    use testutil::available_paths as paths;
    use testutil::run_path as run;

    /// Each output of `got` (activation row `i`, matrix row `j` of `rows`) within
    /// `tolerance(i, j)` of `want`'s.
    fn assert_close(
        got: &[f32],
        want: &[f32],
        rows: usize,
        tolerance: impl Fn(usize, usize) -> f32,
        what: &str,
    ) {
        for i in 0..got.len() / rows {
            for j in 0..rows {
                let (g, e, tol) = (got[i * rows + j], want[i * rows + j], tolerance(i, j));
                assert!(
                    (g - e).abs() <= tol,
                    "{what} ({i},{j}): {g} vs {e}, within {tol}"
                );
            }
        }
    }

    /// How far activation quantization may move an output from the f32 matmul of `x` and the
    /// dequantized weights `wf` (see `testutil::quantization_bound`).
    fn quantization_bound(w: &QMatrix, wf: &[f32], x: &[f32]) -> impl Fn(usize, usize) -> f32 {
        move |i, j| testutil::quantization_bound(w.ty, w, wf, x, i, j)
    }

    /// How far float summation order alone may move an output computed from the same quantized
    /// activations: 1e-5 of Σ|x|·(|w| + block offset).
    fn summation_order(w: &QMatrix, wf: &[f32], x: &[f32]) -> impl Fn(usize, usize) -> f32 {
        move |i, j| 1e-5 * testutil::magnitude(w, wf, x, i, j) + 1e-6
    }

    /// Each SIMD path against the scalar reference on the first `mm` rows of `x`, for each `mm`
    /// in `ms`: both see bit-identical quantized activations, so they differ only by float
    /// summation order. `what` names the case.
    fn assert_simd_matches_scalar(
        pool: &ThreadPool,
        w: &QMatrix,
        x: &[f32],
        ms: &[usize],
        what: &str,
    ) {
        let (rows, cols) = (w.rows, w.cols);
        let wf = testutil::dequantize_all(w);
        let reference = run(KernelPath::Scalar, pool, w, x, x.len() / cols);
        for path in paths().into_iter().skip(1) {
            for &mm in ms {
                let got = run(path, pool, w, &x[..mm * cols], mm);
                let tolerance = summation_order(w, &wf, x);
                assert_close(&got, &reference, rows, tolerance, &format!("{what} {path}"));
            }
        }
    }

    /// matmul on every path and thread count vs dequantize + naive f32 matmul, with the bound
    /// from activation quantization (see `testutil::quantization_bound`); and each SIMD path vs
    /// the scalar reference, which sees bit-identical quantized activations, so they differ only
    /// by float summation order (tolerance 1e-5 of Σ|x|·(|w| + block offset)).
    #[test]
    fn matmul_matches_reference_on_odd_shapes() {
        let mut rng = Rng::new(42);
        let pools: Vec<ThreadPool> = [1, 2, 3].into_iter().map(ThreadPool::new).collect();
        let ms = [1usize, 2, 3, 5, 8, 17, 33];
        let rowss = [1usize, 3, 7, 64, 65];
        for ty in WeightType::ALL {
            let bs = ty.block_size();
            let colss = match bs {
                1 => [1, 7, 33, 100, 576],
                32 => [32, 64, 96, 128, 576],
                _ => [256, 512, 768, 1024, 1536],
            };
            for (ci, &cols) in colss.iter().enumerate() {
                for (ri, &rows) in rowss.iter().enumerate() {
                    // All m for a few shapes, a rotating subset elsewhere, to bound run time.
                    let m_list: Vec<usize> = if ci == 4 || ri == 4 {
                        ms.to_vec()
                    } else {
                        vec![ms[(ci + ri) % ms.len()], 1]
                    };
                    let data = testutil::random_weights(&mut rng, ty, rows, cols);
                    let w = QMatrix::new(ty, rows, cols, &data).unwrap();
                    let wf = testutil::dequantize_all(&w);
                    for &m in &m_list {
                        let x = testutil::random_activations(&mut rng, m * cols);
                        let want = testutil::naive_matmul(&wf, rows, cols, &x, m);
                        let reference = run(KernelPath::Scalar, &pools[0], &w, &x, m);
                        for path in paths() {
                            for pool in &pools {
                                let got = run(path, pool, &w, &x, m);
                                let what = format!(
                                    "{ty} {path} t={} m={m} rows={rows} cols={cols}",
                                    pool.n_threads()
                                );
                                let bound = quantization_bound(&w, &wf, &x);
                                assert_close(&got, &want, rows, bound, &what);
                                let tolerance = summation_order(&w, &wf, &x);
                                let what = format!("{what} vs scalar");
                                assert_close(&got, &reference, rows, tolerance, &what);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn many_matrices_in_one_dispatch_equal_separate_matmuls() {
        let mut rng = Rng::new(17);
        let pool = ThreadPool::new(2);
        let cols = 576;
        for m in [1usize, 3, 40] {
            let x = testutil::random_activations(&mut rng, m * cols);
            // q/k/v-like shapes, plus a matrix needing other activations (grouped separately).
            let shapes = [
                (WeightType::Q4_1, 576),
                (WeightType::Q4_1, 192),
                (WeightType::Q4_1, 192),
                (WeightType::Q8_0, 64),
            ];
            let datas: Vec<Vec<u8>> = shapes
                .iter()
                .map(|&(ty, rows)| testutil::random_weights(&mut rng, ty, rows, cols))
                .collect();
            let ws: Vec<QMatrix> = shapes
                .iter()
                .zip(&datas)
                .map(|(&(ty, rows), d)| QMatrix::new(ty, rows, cols, d).unwrap())
                .collect();
            let separate: Vec<Vec<f32>> =
                ws.iter().map(|w| run(detect(), &pool, w, &x, m)).collect();
            for subset in [&ws[..3], &ws[..]] {
                let mut outs: Vec<Vec<f32>> =
                    subset.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
                let mut jobs: Vec<(&QMatrix, &mut [f32])> = subset
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(w, o)| (w, o.as_mut_slice()))
                    .collect();
                let mut scratch = ActivationScratch::default();
                matmul_many(detect(), &pool, &mut jobs, &x, m, &mut scratch, 0).unwrap();
                for (got, want) in outs.iter().zip(&separate) {
                    assert_eq!(got, want, "m={m}");
                }
            }
        }
    }

    #[test]
    fn large_batch_and_rows_match_scalar() {
        // Enough rows and activation rows for several panels and full tiles on every thread.
        let mut rng = Rng::new(5);
        let pool = ThreadPool::new(2);
        for ty in WeightType::ALL {
            let (rows, cols, m) = (300, 512, 70);
            let data = testutil::random_weights(&mut rng, ty, rows, cols);
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let x = testutil::random_activations(&mut rng, m * cols);
            assert_simd_matches_scalar(&pool, &w, &x, &[m], &ty.to_string());
        }
    }

    #[test]
    fn scratch_reuse_across_types_and_sizes() {
        let mut rng = Rng::new(9);
        let pool = ThreadPool::new(2);
        let mut scratch = ActivationScratch::default();
        for (ty, m, cols) in [
            (WeightType::Q4K, 9, 512),
            (WeightType::Q4_1, 3, 64),
            (WeightType::Q8_0, 17, 256),
            (WeightType::Q6K, 1, 256),
        ] {
            let data = testutil::random_weights(&mut rng, ty, 5, cols);
            let w = QMatrix::new(ty, 5, cols, &data).unwrap();
            let x = testutil::random_activations(&mut rng, m * cols);
            let mut a = vec![0f32; m * 5];
            crate::kernels::matmul(&pool, &w, &x, m, &mut a, &mut scratch).unwrap();
            let b = run(detect(), &pool, &w, &x, m);
            assert_eq!(a, b, "{ty}");
        }
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let pool = ThreadPool::new(1);
        let mut scratch = ActivationScratch::default();
        let data = vec![0u8; 2 * 20];
        assert!(matches!(
            QMatrix::new(WeightType::Q4_1, 2, 33, &data),
            Err(KernelError::NotBlockAligned { .. })
        ));
        assert!(matches!(
            QMatrix::new(WeightType::Q4_1, 3, 32, &data),
            Err(KernelError::ShapeMismatch { .. })
        ));
        let w = QMatrix::new(WeightType::Q4_1, 2, 32, &data).unwrap();
        let mut out = vec![0f32; 2];
        let e =
            crate::kernels::matmul(&pool, &w, &[0.0; 31], 1, &mut out, &mut scratch).unwrap_err();
        assert!(e.to_string().contains("activation length"), "{e}");
        let e = crate::kernels::matmul(&pool, &w, &[0.0; 32], 1, &mut out[..1], &mut scratch)
            .unwrap_err();
        assert!(matches!(
            e,
            KernelError::ShapeMismatch {
                expected: 2,
                actual: 1,
                ..
            }
        ));
        // A hand-built QMatrix with too little data is rejected too.
        let bad = QMatrix {
            ty: WeightType::Q4_1,
            rows: 4,
            cols: 32,
            data: &data,
        };
        assert!(
            crate::kernels::matmul(&pool, &bad, &[0.0; 32], 1, &mut [0.0; 4], &mut scratch)
                .is_err()
        );
        let mut row = vec![0f32; 32];
        assert!(matches!(
            crate::kernels::dequantize_row(&w, 2, &mut row),
            Err(KernelError::RowOutOfRange { row: 2, rows: 2 })
        ));
        assert!(crate::kernels::dequantize_row(&w, 0, &mut row[..31]).is_err());
        // Q8_K (ggml type 15, only ever activations) is not read by the kernels.
        assert!(matches!(
            WeightType::from_ggml_type_id(15),
            Err(KernelError::UnsupportedType(15))
        ));
        for ty in WeightType::ALL {
            assert_eq!(WeightType::from_ggml_type_id(ty.ggml_type_id()), Ok(ty));
        }
        assert_eq!(
            QMatrix::new(WeightType::F32, 2, usize::MAX / 2, &data).unwrap_err(),
            KernelError::SizeOverflow
        );
        // Empty shapes are fine.
        crate::kernels::matmul(&pool, &w, &[], 0, &mut [], &mut scratch).unwrap();
        #[cfg(target_arch = "x86_64")]
        assert!(matches!(
            matmul_many(
                KernelPath::Neon,
                &pool,
                &mut [(&w, &mut out[..])],
                &[0.0; 32],
                1,
                &mut scratch,
                DEFAULT_MIN_PARALLEL_BYTES
            ),
            Err(KernelError::PathUnavailable(KernelPath::Neon))
        ));
    }

    #[test]
    fn dequantize_row_reads_the_right_row() {
        let mut rng = Rng::new(4);
        for ty in WeightType::ALL {
            let cols = ty.block_size().max(256);
            let data = testutil::random_weights(&mut rng, ty, 4, cols);
            let w = QMatrix::new(ty, 4, cols, &data).unwrap();
            let all = testutil::dequantize_all(&w);
            let mut row = vec![0f32; cols];
            crate::kernels::dequantize_row(&w, 3, &mut row).unwrap();
            assert_eq!(&row[..], &all[3 * cols..]);
        }
    }

    /// Blocks of `ty` as Candle's quantizer (ggml's reference `quantize_row_*`) writes them from
    /// random f32 rows: our `dequantize_row` is bit-identical to Candle's dequantization, and
    /// every path's matmul is within the activation-quantization bound of Candle's f32 matmul
    /// on those dequantized weights.
    fn check_against_candle(
        ty: WeightType,
        dtype: candle_core::quantized::GgmlDType,
        shapes: &[(usize, usize)],
        rng: &mut Rng,
    ) {
        use candle_core::quantized::QTensor;
        use candle_core::{Device, Tensor};
        let pools = [ThreadPool::new(1), ThreadPool::new(2)];
        for &(rows, cols) in shapes {
            let wf: Vec<f32> = (0..rows * cols).map(|_| 0.05 * rng.activation()).collect();
            let wt = Tensor::from_vec(wf, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let data = q.data().unwrap().into_owned();
            let deq = q.dequantize(&Device::Cpu).unwrap();
            let want: Vec<f32> = deq.flatten_all().unwrap().to_vec1().unwrap();
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let mut row = vec![f32::NAN; cols];
            for r in 0..rows {
                crate::kernels::dequantize_row(&w, r, &mut row).unwrap();
                for (c, (a, b)) in row.iter().zip(&want[r * cols..(r + 1) * cols]).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{ty} row {r} col {c}: {a} vs {b}");
                }
            }
            for m in [1usize, 2, 5, 17] {
                let x = testutil::random_activations(rng, m * cols);
                let xt = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
                let candle: Vec<f32> = xt
                    .matmul(&deq.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for path in paths() {
                    for pool in &pools {
                        let got = run(path, pool, &w, &x, m);
                        let t = pool.n_threads();
                        let what = format!("{ty} {path} t={t} m={m} {rows}x{cols} vs Candle");
                        let bound = quantization_bound(&w, &want, &x);
                        assert_close(&got, &candle, rows, bound, &what);
                    }
                }
            }
        }
    }

    /// Q5_0, Q5_1, Q3_K, Q2_K and BF16 blocks made by Candle's quantizer (its own encoding
    /// choices), as `check_against_candle`.
    #[test]
    fn candle_blocks_dequantize_identically_and_multiply_within_bound() {
        use candle_core::quantized::GgmlDType;
        let blocks32 = [(1usize, 32usize), (7, 64), (33, 96), (65, 896)];
        let blocks256 = [(1usize, 256usize), (7, 512), (33, 768), (65, 1024)];
        let dense = [(1usize, 1usize), (7, 33), (33, 100), (65, 576)];
        type Shapes<'a> = &'a [(usize, usize)];
        let cases: [(WeightType, GgmlDType, Shapes, u64); 5] = [
            (WeightType::Q5_0, GgmlDType::Q5_0, &blocks32, 55),
            (WeightType::Q5_1, GgmlDType::Q5_1, &blocks32, 155),
            (WeightType::Q3K, GgmlDType::Q3K, &blocks256, 56),
            (WeightType::Q2K, GgmlDType::Q2K, &blocks256, 156),
            (WeightType::BF16, GgmlDType::BF16, &dense, 256),
        ];
        for (ty, candle_ty, shapes, seed) in cases {
            check_against_candle(ty, candle_ty, shapes, &mut Rng::new(seed));
        }
    }

    /// Activations in runs of all −3, all 2.5 or small mixed values, `run(k)` choosing for index
    /// `k`: activation blocks quantize to ±127 quants.
    fn extreme_activations(n: usize, run: impl Fn(usize) -> usize) -> Vec<f32> {
        (0..n)
            .map(|k| match run(k) % 3 {
                0 => -3.0,
                1 => 2.5,
                _ => (k % 7) as f32 - 3.0,
            })
            .collect()
    }

    /// `rows` rows of each of `types` whose bytes are all one of `fills` but for the scales
    /// `write_scales` sets in each block (a scale of 0.001 to 0.003), on every SIMD path
    /// against the scalar reference, for one and for all `m` rows of `x`.
    fn assert_filled_blocks_match_scalar(
        types: &[WeightType],
        fills: &[u8],
        rows: usize,
        x: &[f32],
        m: usize,
    ) {
        let pool = ThreadPool::new(2);
        let cols = x.len() / m;
        for &ty in types {
            for &fill in fills {
                let mut data = vec![fill; rows * ty.row_bytes(cols)];
                for (n, blk) in data.chunks_exact_mut(ty.block_bytes()).enumerate() {
                    write_scales(ty, f16_bytes(0.001 * (1 + n % 3) as f32), blk);
                }
                let w = QMatrix::new(ty, rows, cols, &data).unwrap();
                let what = format!("{ty} fill {fill:#x}");
                assert_simd_matches_scalar(&pool, &w, x, &[1, m], &what);
            }
        }
    }

    /// Writes the f16 scale `d` into a block of `ty` (Q5_0, Q5_1, Q2_K, Q3_K, IQ4_NL or
    /// IQ4_XS), and a small fixed min where the type has one, so that the filled quants stay
    /// finite and in range.
    fn write_scales(ty: WeightType, d: [u8; 2], blk: &mut [u8]) {
        let (d_at, min) = match ty {
            WeightType::Q5_1 => (0, Some((2, -0.0007))),
            WeightType::Q2K => (formats::Q2K_D, Some((formats::Q2K_DMIN, 0.0007))),
            WeightType::Q3K => (formats::Q3K_D, None),
            _ => (0, None),
        };
        blk[d_at..d_at + 2].copy_from_slice(&d);
        if let Some((at, min)) = min {
            blk[at..at + 2].copy_from_slice(&f16_bytes(min));
        }
    }

    fn f16_bytes(v: f32) -> [u8; 2] {
        half::f16::from_f32(v).to_bits().to_le_bytes()
    }

    /// Extreme operands, on every path against the scalar reference: every weight byte one of
    /// a few fills (but for the scales), and activation blocks of ±127 quants in runs that
    /// `run(k, cols)` picks.
    #[test]
    fn extreme_values_match_scalar() {
        use WeightType::{IQ4NL, IQ4XS, Q2K, Q3K, Q5_0, Q5_1};
        type Run = fn(usize, usize) -> usize;
        // ((types, byte fills), (weight rows, columns, activation rows, run))
        type Case = (([WeightType; 2], &'static [u8]), (usize, usize, usize, Run));
        let cases: [Case; 3] = [
            // Every Q5 quant 0 or 31 (all nibbles and fifth bits clear or set).
            (
                ([Q5_0, Q5_1], &[0x00, 0xFF, 0x0F, 0xF0, 0xAA]),
                (9, 128, 6, |k, _| k / 32),
            ),
            // Every quant at its smallest or largest (all low bits and third bits clear or
            // set), every scale and min at 0 or 15 (Q3_K's 6-bit scales at −32 or 31), and
            // activation super-blocks of ±127 quants.
            (
                ([Q2K, Q3K], &[0x00, 0xFF, 0x55, 0xAA, 0x0F, 0xF0]),
                (9, 512, 6, |k, cols| k / 256 + k / cols),
            ),
            // Every nibble 0 (level −127), 15 (113) or mixed, IQ4_XS's 6-bit scales at −32 (all
            // bits clear), 31 (all set) or between; 40 rows: AVX-512's wide IQ4_NL kernel too.
            (
                ([IQ4NL, IQ4XS], &[0x00, 0xFF, 0x0F, 0xF0, 0x88, 0x77]),
                (19, 512, 40, |k, cols| k / 32 + k / cols),
            ),
        ];
        for ((types, fills), (rows, cols, m, run)) in cases {
            let x = extreme_activations(m * cols, |k| run(k, cols));
            assert_filled_blocks_match_scalar(&types, fills, rows, &x, m);
        }
    }

    /// IQ4_NL and IQ4_XS on every SIMD path against the scalar reference for every m from 1 to
    /// 70 (every tile height and remainder; AVX-512's wide IQ4_NL kernel from 24 rows), with
    /// weight row counts that are not multiples of the tiles.
    #[test]
    fn iq4_matches_scalar_for_every_m() {
        let mut rng = Rng::new(61);
        let pool = ThreadPool::new(2);
        let all_m: Vec<usize> = (1..=70).collect();
        for (ty, rows, cols) in [
            (WeightType::IQ4NL, 37, 96),
            (WeightType::IQ4NL, 19, 576),
            (WeightType::IQ4XS, 37, 256),
            (WeightType::IQ4XS, 19, 768),
        ] {
            let data = testutil::random_weights(&mut rng, ty, rows, cols);
            let w = QMatrix::new(ty, rows, cols, &data).unwrap();
            let x = testutil::random_activations(&mut rng, 70 * cols);
            assert_simd_matches_scalar(&pool, &w, &x, &all_m, &format!("{ty} {rows}x{cols}"));
        }
    }

    /// Throughput of Q5_0 and Q5_1 against Q4_0, Q4_1 and Q8_0 on Qwen2.5-0.5B's feed-forward
    /// shapes, for one activation row (GEMV: weight bytes/s) and 512 (a prefill batch), on
    /// every SIMD path. The types take turns, best of 5 rounds each, so that other load on the
    /// machine biases no type. By hand:
    /// `cargo test --lib q5_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, run by hand"]
    fn q5_throughput_against_q4_and_q8_0() {
        let types = [
            WeightType::Q4_0,
            WeightType::Q5_0,
            WeightType::Q8_0,
            WeightType::Q4_1,
            WeightType::Q5_1,
        ];
        throughput(&types, &[(896, 4864), (4864, 896)], &[1, 512]);
    }

    /// Throughput of Q2_K, Q3_K, IQ4_NL and IQ4_XS against Q4_K and Q6_K, and of BF16 against
    /// F16, on Llama-3.2-1B's feed-forward shapes, as [`q5_throughput_against_q4_and_q8_0`]. By
    /// hand:
    /// `cargo test --lib k_quant_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing, run by hand"]
    fn k_quant_throughput_q2k_q3k_against_q4k_q6k() {
        let types = [
            WeightType::Q2K,
            WeightType::Q3K,
            WeightType::Q4K,
            WeightType::Q6K,
            WeightType::IQ4NL,
            WeightType::IQ4XS,
            WeightType::F16,
            WeightType::BF16,
        ];
        throughput(&types, &[(8192, 2048), (2048, 8192)], &[1, 128]);
    }

    /// Best-of-5 times of `matmul` for each type in turn, for each shape and m, on every SIMD
    /// path.
    fn throughput(types: &[WeightType], shapes: &[(usize, usize)], ms: &[usize]) {
        let mut rng = Rng::new(3);
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pool = ThreadPool::new(threads);
        eprintln!("{threads} threads");
        for &(rows, cols) in shapes {
            let datas: Vec<Vec<u8>> = types
                .iter()
                .map(|&ty| testutil::random_weights(&mut rng, ty, rows, cols))
                .collect();
            for &m in ms {
                let x = testutil::random_activations(&mut rng, m * cols);
                let mut out = vec![0f32; m * rows];
                let mut scratch = ActivationScratch::default();
                for path in paths().into_iter().filter(|p| *p != KernelPath::Scalar) {
                    let mut best = vec![f64::INFINITY; types.len()];
                    for _round in 0..5 {
                        for (k, (&ty, data)) in types.iter().zip(&datas).enumerate() {
                            let w = QMatrix::new(ty, rows, cols, data).unwrap();
                            let mut call = || {
                                let min = DEFAULT_MIN_PARALLEL_BYTES;
                                let jobs = &mut [(&w, &mut out[..])];
                                matmul_many(path, &pool, jobs, &x, m, &mut scratch, min).unwrap()
                            };
                            call();
                            let iters = if m == 1 { 200 } else { 2 };
                            let start = std::time::Instant::now();
                            for _ in 0..iters {
                                call();
                            }
                            let secs = start.elapsed().as_secs_f64() / iters as f64;
                            best[k] = best[k].min(secs);
                        }
                    }
                    for (k, &ty) in types.iter().enumerate() {
                        let secs = best[k];
                        eprintln!(
                            "{path:>10} {ty:>4} {rows:>4}x{cols:<4} m={m:<3}: {:8.3} ms  {:6.2} GB/s of weights  {:7.1} Gop/s",
                            secs * 1e3,
                            datas[k].len() as f64 / secs / 1e9,
                            2.0 * (m * rows * cols) as f64 / secs / 1e9
                        );
                    }
                }
            }
        }
    }
}
