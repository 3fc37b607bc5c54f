//! Test helpers: a fixed-seed PRNG, random weight matrices in every format, and the
//! dequantize + naive f32 reference matmul.

use super::formats::{self, QK, QK_K};
use super::pool::ThreadPool;
use super::quantize::{ActKind, ActivationScratch, Acts, quantize};
use super::{KernelPath, QMatrix, WeightType};

/// SplitMix64: tiny, fixed-seed, good enough to fill test data.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn fill_bytes(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next_u64() as u8;
        }
    }

    /// Uniform in [lo, hi).
    pub(crate) fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    /// Roughly normal (sum of uniforms), occasionally with an outlier, sometimes exactly 0.
    pub(crate) fn activation(&mut self) -> f32 {
        let r = self.next_u64() % 64;
        if r == 0 {
            return 0.0;
        }
        let mut v = 0.0;
        for _ in 0..4 {
            v += self.uniform(-1.0, 1.0);
        }
        if r == 1 { v * 20.0 } else { v }
    }
}

fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// Random weight bytes for `rows × cols` of `ty`: random quants, small random scales.
pub(crate) fn random_weights(rng: &mut Rng, ty: WeightType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * ty.row_bytes(cols);
    let mut data = vec![0u8; n];
    rng.fill_bytes(&mut data);
    match ty {
        WeightType::F32 => {
            for c in data.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.uniform(-0.1, 0.1).to_le_bytes());
            }
        }
        WeightType::F16 => {
            for c in data.chunks_exact_mut(2) {
                put_f16(c, 0, rng.uniform(-0.1, 0.1));
            }
        }
        WeightType::BF16 => {
            for c in data.chunks_exact_mut(2) {
                let bits = (half::bf16::from_f32(rng.uniform(-0.1, 0.1)).to_bits()).to_le_bytes();
                c.copy_from_slice(&bits);
            }
        }
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => {
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                put_f16(b, 0, rng.uniform(-0.02, 0.02));
            }
        }
        WeightType::Q4_1 | WeightType::Q5_1 => {
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                put_f16(b, 0, rng.uniform(0.0, 0.02));
                put_f16(b, 2, rng.uniform(-0.15, 0.05));
            }
        }
        WeightType::Q4K | WeightType::Q5K => {
            // Random scale bytes cover every 6-bit scale and min value.
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                put_f16(b, 0, rng.uniform(0.0, 0.002));
                put_f16(b, 2, rng.uniform(0.0, 0.002));
            }
        }
        WeightType::Q2K => {
            // Random scale bytes cover every 4-bit scale and min.
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                put_f16(b, formats::Q2K_D, rng.uniform(0.0, 0.004));
                put_f16(b, formats::Q2K_DMIN, rng.uniform(0.0, 0.004));
            }
        }
        WeightType::Q3K => {
            // Random scale bytes cover every 6-bit scale.
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                put_f16(b, formats::Q3K_D, rng.uniform(-0.001, 0.001));
            }
        }
        WeightType::Q6K => {
            // Random i8 scales cover -128..=127.
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                put_f16(b, formats::Q6K_D, rng.uniform(-0.0005, 0.0005));
            }
        }
        WeightType::IQ4NL => {
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                put_f16(b, 0, rng.uniform(-0.0008, 0.0008));
            }
        }
        WeightType::IQ4XS => {
            // Random scale bytes cover every 6-bit scale.
            for b in data.chunks_exact_mut(ty.block_bytes()) {
                put_f16(b, 0, rng.uniform(-0.00003, 0.00003));
            }
        }
    }
    data
}

/// Every kernel path this CPU can run, the scalar reference first (so AVX2 stays tested where
/// AVX-512 VNNI is detected).
pub(crate) fn available_paths() -> Vec<KernelPath> {
    [
        KernelPath::Scalar,
        KernelPath::Avx2,
        KernelPath::Avx512Vnni,
        KernelPath::Amx,
        KernelPath::Neon,
    ]
    .into_iter()
    .filter(|p| p.is_available())
    .collect()
}

/// `x` (`m` rows of `cols`) quantized as the kernels for `ty` take it, by the scalar path on one
/// thread.
pub(crate) fn scalar_acts<'a>(
    ty: WeightType,
    x: &'a [f32],
    m: usize,
    cols: usize,
    scratch: &'a mut ActivationScratch,
) -> Acts<'a> {
    let pool = ThreadPool::new(1);
    let kind = ActKind::for_weights(ty);
    quantize(kind, KernelPath::Scalar, &pool, x, m, cols, scratch)
}

pub(crate) fn random_activations(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.activation()).collect()
}

/// Dequantized weights, `rows × cols` row-major.
pub(crate) fn dequantize_all(w: &QMatrix) -> Vec<f32> {
    let mut out = vec![0f32; w.rows * w.cols];
    let rb = w.row_bytes();
    for r in 0..w.rows {
        formats::dequantize_row(
            w.ty,
            &w.data[r * rb..(r + 1) * rb],
            &mut out[r * w.cols..(r + 1) * w.cols],
        );
    }
    out
}

/// Naive f64-accumulated `x · Wᵀ` on dequantized weights.
pub(crate) fn naive_matmul(wf: &[f32], rows: usize, cols: usize, x: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * rows];
    for i in 0..m {
        for j in 0..rows {
            let mut s = 0f64;
            for c in 0..cols {
                s += x[i * cols + c] as f64 * wf[j * cols + c] as f64;
            }
            out[i * rows + j] = s as f32;
        }
    }
    out
}

/// Activation block size for a weight type (what the activations are quantized with).
pub(crate) fn act_block(ty: WeightType) -> usize {
    match ty {
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => 0,
        WeightType::Q4_0
        | WeightType::Q4_1
        | WeightType::Q5_0
        | WeightType::Q5_1
        | WeightType::Q8_0
        | WeightType::IQ4NL => QK,
        WeightType::Q2K
        | WeightType::Q3K
        | WeightType::Q4K
        | WeightType::Q5K
        | WeightType::Q6K
        | WeightType::IQ4XS => QK_K,
    }
}

/// Bound on |matmul − exact| coming from quantizing the activations.
///
/// Each activation block is quantized with step `d = amax/127` (rounded to nearest), so every
/// value moves by at most `d/2`; the f16 rounding of `d` (Q8_0/Q8_1) moves `q·d` by at most
/// `127·d·2⁻¹¹`, and Q8_1's f16 `s` moves the Q4_1 min term by at most `|m|·|Σq|·d·2⁻¹⁰`.
/// So `|err| ≤ Σ_blocks amax/127 · (1/2 + 127·2⁻¹⁰) · Σ_c (|w_c| + |m_b|)`. A relative float
/// slack of 1e-5 of `Σ|x||w|` covers accumulation-order rounding.
pub(crate) fn quantization_bound(
    ty: WeightType,
    w: &QMatrix,
    wf: &[f32],
    x: &[f32],
    i: usize,
    j: usize,
) -> f32 {
    let cols = w.cols;
    let xr = &x[i * cols..(i + 1) * cols];
    let wr = &wf[j * cols..(j + 1) * cols];
    let mag: f64 = xr
        .iter()
        .zip(wr)
        .map(|(a, b)| (a.abs() * b.abs()) as f64)
        .sum();
    let bs = act_block(ty);
    if bs == 0 {
        // F32/F16/BF16: only rounding of f32 accumulation (F16/BF16 weights are exact in f32).
        return (2e-6 * mag + 1e-6) as f32;
    }
    let offset = block_offsets(w, j);
    let mut bound = 0f64;
    for (b, (xb, wb)) in xr.chunks_exact(bs).zip(wr.chunks_exact(bs)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
        let step = amax / 127.0;
        let wsum: f64 =
            wb.iter().map(|v| v.abs() as f64).sum::<f64>() + offset[b] as f64 * bs as f64;
        bound += step * (0.5 + 127.0 / 1024.0) * wsum;
    }
    (bound * 1.01 + 1e-5 * mag + 1e-6) as f32
}

/// Per activation block, the magnitude of the weight offset folded into the dot product
/// (Q4_1/Q5_1 `m`, Q4_0 `8d`, K-quant `dmin·min`, Q3_K `4·d·scale`, Q6_K `32·d·scale`), used
/// for error bounds.
pub(crate) fn block_offsets(w: &QMatrix, row: usize) -> Vec<f32> {
    let rb = w.row_bytes();
    let r = &w.data[row * rb..(row + 1) * rb];
    let bb = w.ty.block_bytes();
    match w.ty {
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => vec![],
        // Q5_0's quants are signed (q − 16), IQ4's levels too: nothing is folded.
        WeightType::Q8_0 | WeightType::Q5_0 | WeightType::IQ4NL => vec![0.0; w.cols / QK],
        WeightType::IQ4XS => vec![0.0; w.cols / QK_K],
        WeightType::Q4_0 => r
            .chunks_exact(bb)
            .map(|b| 8.0 * formats::f16_at(b, 0).abs())
            .collect(),
        WeightType::Q4_1 | WeightType::Q5_1 => r
            .chunks_exact(bb)
            .map(|b| formats::f16_at(b, 2).abs())
            .collect(),
        WeightType::Q4K | WeightType::Q5K => r
            .chunks_exact(bb)
            .map(|b| formats::f16_at(b, 2).abs() * 63.0)
            .collect(),
        WeightType::Q2K => r
            .chunks_exact(bb)
            .map(|b| formats::f16_at(b, formats::Q2K_DMIN).abs() * 15.0)
            .collect(),
        // The kernels take the third bit's −4 out through the block sums.
        WeightType::Q3K => r
            .chunks_exact(bb)
            .map(|b| formats::f16_at(b, formats::Q3K_D).abs() * 4.0 * 32.0)
            .collect(),
        WeightType::Q6K => r
            .chunks_exact(bb)
            .map(|b| formats::f16_at(b, formats::Q6K_D).abs() * 32.0 * 128.0)
            .collect(),
    }
}

/// Sum over the row of |x_c|·(|w_c| + offset of its block): scale for float-order tolerances.
pub(crate) fn magnitude(w: &QMatrix, wf: &[f32], x: &[f32], i: usize, j: usize) -> f32 {
    let cols = w.cols;
    let xr = &x[i * cols..(i + 1) * cols];
    let wr = &wf[j * cols..(j + 1) * cols];
    let bs = act_block(w.ty).max(1);
    let off = block_offsets(w, j);
    let mut s = 0f64;
    for c in 0..cols {
        let o = off.get(c / bs).copied().unwrap_or(0.0);
        s += (xr[c].abs() * (wr[c].abs() + o)) as f64;
    }
    s as f32
}

/// `w × x` (`m` rows) on `path`, into a fresh NaN-filled output; threshold 0, so that even
/// tiny shapes take the threaded split.
pub(crate) fn run_path(
    path: KernelPath,
    pool: &ThreadPool,
    w: &QMatrix,
    x: &[f32],
    m: usize,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; m * w.rows];
    let mut scratch = ActivationScratch::default();
    let jobs = &mut [(w, &mut out[..])];
    super::matmul::matmul_many(path, pool, jobs, x, m, &mut scratch, 0).unwrap();
    out
}
