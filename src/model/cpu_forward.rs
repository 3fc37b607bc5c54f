//! The decoder's forward on the CPU over plain buffers: our quantized kernels for every matrix
//! (weights read in place from the GGUF map), our attention over the f16 caches, and the small
//! element-wise steps written out here, with every intermediate buffer reused across steps.
//!
//! It computes exactly what [`super::decoder::Decoder`]'s Candle path computes (tests compare
//! the two on every architecture); it exists because per-operation tensor overhead (an
//! allocation, a dispatch and a thread hand-off for each of ~450 operations per token) costs as
//! much as the matmuls themselves for a small model decoding one token.

use std::cell::RefCell;
use std::sync::Arc;

use super::attention::{self, AttentionShape, SpanAttention};
use super::rope::Rope;
use super::weights::MappedMatrix;
use crate::kernels::{self, ActivationScratch, KernelError, ThreadPool};

/// A projection: a matrix in the map, with an optional bias.
pub(super) struct Projection {
    pub matrix: MappedMatrix,
    pub bias: Option<Vec<f32>>,
}

pub(super) enum CpuQkv {
    Separate {
        q: Projection,
        k: Projection,
        v: Projection,
    },
    /// Rows `[q; k; v]`.
    Fused(Projection),
}

pub(super) enum CpuGateUp {
    Separate {
        gate: MappedMatrix,
        up: MappedMatrix,
    },
    /// Rows `[gate; up]`.
    Fused(MappedMatrix),
}

pub(super) struct CpuLayer {
    pub attn_norm: Vec<f32>,
    pub qkv: CpuQkv,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub o: MappedMatrix,
    pub ffn_norm: Vec<f32>,
    pub gate_up: CpuGateUp,
    pub down: MappedMatrix,
}

/// The model as the CPU path needs it.
pub(super) struct CpuModel {
    pub pool: Arc<ThreadPool>,
    pub embedding: MappedMatrix,
    pub layers: Vec<CpuLayer>,
    pub norm: Vec<f32>,
    pub lm_head: MappedMatrix,
    pub eps: f32,
    pub hidden: usize,
    pub intermediate: usize,
    pub attention: AttentionShape,
    pub buffers: RefCell<Buffers>,
}

/// Intermediate activations, grown to the largest batch seen and then reused.
#[derive(Default)]
pub(super) struct Buffers {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    gate_up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    scratch: ActivationScratch,
}

fn resize(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.resize(n, 0.0);
    &mut buf[..n]
}

/// One sequence's rows in the batch.
pub(super) struct CpuSpan<'a> {
    pub cache: &'a mut [attention::HostKv],
    pub first_position: usize,
    pub start_row: usize,
    pub rows: usize,
}

impl CpuModel {
    /// Runs all rows (`ids`, at `positions`) through the model; returns the logits after each
    /// span's last row.
    pub fn forward(
        &self,
        ids: &[u32],
        positions: &[usize],
        rope: &Rope,
        spans: &mut [CpuSpan<'_>],
    ) -> Result<Vec<Vec<f32>>, KernelError> {
        let mut guard = self.buffers.borrow_mut();
        let b = &mut *guard;
        let n = ids.len();
        let hsz = self.hidden;
        let sh = self.attention;
        let (q_width, kv_width) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
        let pool = &*self.pool;

        let emb = self.embedding.matrix();
        let x = resize(&mut b.x, n * hsz);
        for (&id, row) in ids.iter().zip(x.chunks_mut(hsz)) {
            kernels::dequantize_row(&emb, id as usize, row)?;
        }
        rope.tables(positions, &mut b.cos, &mut b.sin);

        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm_rows(
                &b.x[..n * hsz],
                &layer.attn_norm,
                self.eps,
                resize(&mut b.h, n * hsz),
            );
            let h = &b.h[..n * hsz];
            match &layer.qkv {
                CpuQkv::Separate { q, k, v } => {
                    project(pool, q, h, n, resize(&mut b.q, n * q_width), &mut b.scratch)?;
                    project(
                        pool,
                        k,
                        h,
                        n,
                        resize(&mut b.k, n * kv_width),
                        &mut b.scratch,
                    )?;
                    project(
                        pool,
                        v,
                        h,
                        n,
                        resize(&mut b.v, n * kv_width),
                        &mut b.scratch,
                    )?;
                }
                CpuQkv::Fused(p) => {
                    let width = q_width + 2 * kv_width;
                    project(pool, p, h, n, resize(&mut b.qkv, n * width), &mut b.scratch)?;
                    let (q, k, v) = (
                        resize(&mut b.q, n * q_width),
                        resize(&mut b.k, n * kv_width),
                        resize(&mut b.v, n * kv_width),
                    );
                    for (r, row) in b.qkv.chunks(width).take(n).enumerate() {
                        q[r * q_width..(r + 1) * q_width].copy_from_slice(&row[..q_width]);
                        k[r * kv_width..(r + 1) * kv_width]
                            .copy_from_slice(&row[q_width..q_width + kv_width]);
                        v[r * kv_width..(r + 1) * kv_width]
                            .copy_from_slice(&row[q_width + kv_width..]);
                    }
                }
            }
            let q = &mut b.q[..n * q_width];
            let k = &mut b.k[..n * kv_width];
            if let Some(w) = &layer.q_norm {
                rms_norm_rows_in_place(q, w, self.eps);
            }
            if let Some(w) = &layer.k_norm {
                rms_norm_rows_in_place(k, w, self.eps);
            }
            let half = sh.head_dim / 2;
            for r in 0..n {
                let (cos, sin) = (
                    &b.cos[r * half..(r + 1) * half],
                    &b.sin[r * half..(r + 1) * half],
                );
                rope.rotate_row(
                    &mut q[r * q_width..(r + 1) * q_width],
                    sh.head_dim,
                    cos,
                    sin,
                );
                rope.rotate_row(
                    &mut k[r * kv_width..(r + 1) * kv_width],
                    sh.head_dim,
                    cos,
                    sin,
                );
            }

            for span in spans.iter_mut() {
                let (a, e) = (span.start_row, span.start_row + span.rows);
                span.cache[l].write(
                    span.first_position,
                    kv_width,
                    &b.k[a * kv_width..e * kv_width],
                    &b.v[a * kv_width..e * kv_width],
                );
            }
            let jobs: Vec<SpanAttention<'_>> = spans
                .iter()
                .map(|s| SpanAttention {
                    cache: &s.cache[l],
                    q: &b.q[s.start_row * q_width..(s.start_row + s.rows) * q_width],
                    first_position: s.first_position,
                    rows: s.rows,
                })
                .collect();
            attention::attend_spans(&sh, &jobs, resize(&mut b.attn, n * q_width), Some(pool));

            let proj = resize(&mut b.proj, n * hsz);
            kernels::matmul(
                pool,
                &layer.o.matrix(),
                &b.attn[..n * q_width],
                n,
                proj,
                &mut b.scratch,
            )?;
            add_in_place(&mut b.x[..n * hsz], proj);

            rms_norm_rows(
                &b.x[..n * hsz],
                &layer.ffn_norm,
                self.eps,
                resize(&mut b.h, n * hsz),
            );
            let h = &b.h[..n * hsz];
            let ff = self.intermediate;
            match &layer.gate_up {
                CpuGateUp::Separate { gate, up } => {
                    kernels::matmul(
                        pool,
                        &gate.matrix(),
                        h,
                        n,
                        resize(&mut b.gate, n * ff),
                        &mut b.scratch,
                    )?;
                    kernels::matmul(
                        pool,
                        &up.matrix(),
                        h,
                        n,
                        resize(&mut b.up, n * ff),
                        &mut b.scratch,
                    )?;
                    silu_mul(&mut b.gate[..n * ff], &b.up[..n * ff]);
                }
                CpuGateUp::Fused(m) => {
                    let gu = resize(&mut b.gate_up, n * 2 * ff);
                    kernels::matmul(pool, &m.matrix(), h, n, gu, &mut b.scratch)?;
                    let gate = resize(&mut b.gate, n * ff);
                    for (r, row) in b.gate_up.chunks(2 * ff).take(n).enumerate() {
                        let (g, u) = row.split_at(ff);
                        gate[r * ff..(r + 1) * ff].copy_from_slice(g);
                        silu_mul(&mut gate[r * ff..(r + 1) * ff], u);
                    }
                }
            }
            let proj = resize(&mut b.proj, n * hsz);
            kernels::matmul(
                pool,
                &layer.down.matrix(),
                &b.gate[..n * ff],
                n,
                proj,
                &mut b.scratch,
            )?;
            add_in_place(&mut b.x[..n * hsz], proj);
        }

        // Only each span's last row becomes logits.
        let last = resize(&mut b.h, spans.len() * hsz);
        for (i, s) in spans.iter().enumerate() {
            let r = s.start_row + s.rows - 1;
            last[i * hsz..(i + 1) * hsz].copy_from_slice(&b.x[r * hsz..(r + 1) * hsz]);
        }
        rms_norm_rows_in_place(last, &self.norm, self.eps);
        let head = self.lm_head.matrix();
        let mut logits = vec![0f32; spans.len() * head.rows];
        kernels::matmul(pool, &head, last, spans.len(), &mut logits, &mut b.scratch)?;
        Ok(logits.chunks(head.rows).map(<[f32]>::to_vec).collect())
    }
}

fn project(
    pool: &ThreadPool,
    p: &Projection,
    x: &[f32],
    rows: usize,
    out: &mut [f32],
    scratch: &mut ActivationScratch,
) -> Result<(), KernelError> {
    kernels::matmul(pool, &p.matrix.matrix(), x, rows, out, scratch)?;
    if let Some(bias) = &p.bias {
        for row in out.chunks_mut(bias.len()) {
            add_in_place(row, bias);
        }
    }
    Ok(())
}

/// `out = x / rms(x) * w` per row of `w.len()` values.
pub(super) fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks(w.len()).zip(out.chunks_mut(w.len())) {
        let scale = rms_scale(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// RMS-normalises every `w.len()` values in place (per row, or per head for q/k norms).
pub(super) fn rms_norm_rows_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    for xr in x.chunks_mut(w.len()) {
        let scale = rms_scale(xr, eps);
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    }
}

fn rms_scale(x: &[f32], eps: f32) -> f32 {
    // As ggml: f32 squares summed in f64.
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    1.0 / ((sum / x.len() as f64) as f32 + eps).sqrt()
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `gate = silu(gate) * up`.
fn silu_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA are available (checked above).
        unsafe { x86::silu_mul(gate, up) };
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `e^x` for 8 lanes: the single-precision routine of Arm's optimized-routines library, as
    /// ggml vectorizes it for its SiLU (error ≤ 1.5 ulp; flushes beyond ±88/−104). Using the
    /// same approximation as llama.cpp keeps our activations bit-identical to its.
    /// Reduction `x = n·ln2 + b` with `n` rounded by the 1.5·2²³ shift, a degree-5 polynomial
    /// for `e^b − 1`, and the scale `2^n` assembled in the exponent bits (split in two when `n`
    /// leaves the normal range).
    #[target_feature(enable = "avx2,fma")]
    fn expf(x: __m256) -> __m256 {
        let shift = _mm256_set1_ps(f32::from_bits(0x4b40_0000)); // 1.5 * 2^23
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(f32::from_bits(0x3fb8_aa3b)), shift); // 1/ln2
        let n = _mm256_sub_ps(z, shift);
        let ln2_hi = _mm256_set1_ps(f32::from_bits(0x3f31_7200));
        let ln2_lo = _mm256_set1_ps(f32::from_bits(0x35bf_be8e));
        let b = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, x));
        let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(z));
        let k = _mm256_castsi256_ps(_mm256_add_epi32(
            e,
            _mm256_castps_si256(_mm256_set1_ps(1.0)),
        ));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(126.0));
        let u = _mm256_mul_ps(b, b);
        let c5 = _mm256_set1_ps(f32::from_bits(0x3c07_2010));
        let c4 = _mm256_set1_ps(f32::from_bits(0x3d2b_9f17));
        let c3 = _mm256_set1_ps(f32::from_bits(0x3e2a_af33));
        let c2 = _mm256_set1_ps(f32::from_bits(0x3eff_fedb));
        let c1 = _mm256_set1_ps(f32::from_bits(0x3f7f_fff6));
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_fmadd_ps(c5, b, c4), u, _mm256_fmadd_ps(c3, b, c2)),
            u,
            _mm256_mul_ps(c1, b),
        );
        if _mm256_movemask_ps(big) == 0 {
            return _mm256_fmadd_ps(j, k, k);
        }
        let g = _mm256_and_si256(
            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_setzero_ps())),
            _mm256_set1_epi32(0x8200_0000u32 as i32),
        );
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let huge = _mm256_cmp_ps::<_CMP_GT_OQ>(abs_n, _mm256_set1_ps(192.0));
        _mm256_or_ps(
            _mm256_and_ps(huge, _mm256_mul_ps(s1, s1)),
            _mm256_andnot_ps(
                huge,
                _mm256_or_ps(
                    _mm256_and_ps(big, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                    _mm256_andnot_ps(big, _mm256_fmadd_ps(k, j, k)),
                ),
            ),
        )
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices; unaligned loads and stores.
            unsafe {
                let x = _mm256_loadu_ps(gate.as_ptr().add(i));
                let e = expf(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
                let y = _mm256_mul_ps(silu, _mm256_loadu_ps(up.as_ptr().add(i)));
                _mm256_storeu_ps(gate.as_mut_ptr().add(i), y);
            }
            i += 8;
        }
        for j in i..n {
            gate[j] = gate[j] / (1.0 + (-gate[j]).exp()) * up[j];
        }
    }
}
