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
use super::config::{FfnActivation, ModelConfig};
use super::moe::Routes;
use super::rope::Rope;
use super::vecmath::{gelu_mul, silu_mul};
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

/// One expert's SwiGLU block, its matrices in place in the GGUF map (an expert's rows are a
/// byte range of the stacked tensor).
pub(super) struct CpuExpert {
    pub gate: MappedMatrix,
    pub up: MappedMatrix,
    pub down: MappedMatrix,
}

pub(super) struct CpuMoe {
    pub router: MappedMatrix,
    pub experts: Vec<CpuExpert>,
    /// Qwen2-MoE's shared expert and the vector whose `sigmoid(x · w)` gates it.
    pub shared: Option<(CpuExpert, Vec<f32>)>,
    pub experts_used: usize,
    pub normalize_weights: bool,
}

pub(super) enum CpuFfn {
    Dense {
        gate_up: CpuGateUp,
        down: MappedMatrix,
    },
    Experts(Box<CpuMoe>),
}

pub(super) struct CpuLayer {
    pub attn_norm: Vec<f32>,
    pub qkv: CpuQkv,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub o: MappedMatrix,
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub ffn: CpuFfn,
    pub post_ffn_norm: Option<Vec<f32>>,
    /// This layer's attention (its window, score scale and soft cap).
    pub attention: AttentionShape,
    /// Whether this layer rotates with the sliding-window layers' rope.
    pub swa_rope: bool,
}

/// The model as the CPU path needs it.
pub(super) struct CpuModel {
    pub pool: Arc<ThreadPool>,
    /// Sizes, scales, caps and the feed-forward activation, as the decoder read them.
    pub cfg: ModelConfig,
    pub embedding: MappedMatrix,
    pub layers: Vec<CpuLayer>,
    /// The final norm's weights and epsilon.
    pub norm: Vec<f32>,
    pub eps: f32,
    pub lm_head: MappedMatrix,
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
    /// The experts' router logits, the rows routed to one expert, and that expert's output.
    router: Vec<f32>,
    expert_x: Vec<f32>,
    expert_y: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    cos_swa: Vec<f32>,
    sin_swa: Vec<f32>,
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
    /// How many of the span's last rows become logits.
    pub logit_rows: usize,
}

impl CpuModel {
    /// Runs all rows (`ids`, at `positions`) through the model; returns the logits after each
    /// span's last row.
    pub fn forward(
        &self,
        ids: &[u32],
        positions: &[usize],
        rope: &Rope,
        rope_swa: Option<&Rope>,
        spans: &mut [CpuSpan<'_>],
    ) -> Result<Vec<Vec<f32>>, KernelError> {
        let mut guard = self.buffers.borrow_mut();
        let b = &mut *guard;
        let n = ids.len();
        let hsz = self.cfg.hidden_size;
        let Some(sh) = self.layers.first().map(|l| l.attention) else {
            return Ok(Vec::new());
        };
        let (q_width, kv_width) = (sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim);
        let pool = &*self.pool;

        let emb = self.embedding.matrix();
        let x = resize(&mut b.x, n * hsz);
        for (&id, row) in ids.iter().zip(x.chunks_mut(hsz)) {
            kernels::dequantize_row(&emb, id as usize, row)?;
            if let Some(s) = self.cfg.embedding_scale {
                row.iter_mut().for_each(|v| *v *= s);
            }
        }
        rope.tables(positions, &mut b.cos, &mut b.sin);
        if let Some(r) = rope_swa {
            r.tables(positions, &mut b.cos_swa, &mut b.sin_swa);
        }

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
                    let (qm, km, vm) = (q.matrix.matrix(), k.matrix.matrix(), v.matrix.matrix());
                    kernels::matmul_many(
                        pool,
                        &mut [
                            (&qm, resize(&mut b.q, n * q_width)),
                            (&km, resize(&mut b.k, n * kv_width)),
                            (&vm, resize(&mut b.v, n * kv_width)),
                        ],
                        h,
                        n,
                        &mut b.scratch,
                    )?;
                    add_bias(&mut b.q[..n * q_width], &q.bias);
                    add_bias(&mut b.k[..n * kv_width], &k.bias);
                    add_bias(&mut b.v[..n * kv_width], &v.bias);
                }
                CpuQkv::Fused(p) => {
                    let width = q_width + 2 * kv_width;
                    let qkv = resize(&mut b.qkv, n * width);
                    kernels::matmul(pool, &p.matrix.matrix(), h, n, qkv, &mut b.scratch)?;
                    add_bias(qkv, &p.bias);
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
            let half = rope.half();
            let (cos_all, sin_all, rope) = match rope_swa {
                Some(r) if layer.swa_rope => (&b.cos_swa, &b.sin_swa, r),
                _ => (&b.cos, &b.sin, rope),
            };
            for r in 0..n {
                let (cos, sin) = (
                    &cos_all[r * half..(r + 1) * half],
                    &sin_all[r * half..(r + 1) * half],
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

            if let Some(s) = self.cfg.attention_scale {
                q.iter_mut().for_each(|v| *v *= s);
            }

            for span in spans.iter_mut() {
                let (a, e) = (span.start_row, span.start_row + span.rows);
                span.cache[l].write(
                    span.first_position,
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
            attention::attend_spans(
                &layer.attention,
                &jobs,
                resize(&mut b.attn, n * q_width),
                Some(pool),
            );

            let proj = resize(&mut b.proj, n * hsz);
            kernels::matmul(
                pool,
                &layer.o.matrix(),
                &b.attn[..n * q_width],
                n,
                proj,
                &mut b.scratch,
            )?;
            if let Some(w) = &layer.post_attn_norm {
                rms_norm_rows_in_place(proj, w, self.eps);
            }
            add_in_place(&mut b.x[..n * hsz], proj);

            rms_norm_rows(
                &b.x[..n * hsz],
                &layer.ffn_norm,
                self.eps,
                resize(&mut b.h, n * hsz),
            );
            let ff = self.cfg.intermediate_size;
            match &layer.ffn {
                CpuFfn::Dense { gate_up, down } => {
                    let h = &b.h[..n * hsz];
                    match gate_up {
                        CpuGateUp::Separate { gate, up } => self.gated_rows(
                            [gate, up, down],
                            h,
                            n,
                            [&mut b.gate, &mut b.up],
                            &mut b.proj,
                            &mut b.scratch,
                        )?,
                        CpuGateUp::Fused(m) => {
                            let gu = resize(&mut b.gate_up, n * 2 * ff);
                            kernels::matmul(pool, &m.matrix(), h, n, gu, &mut b.scratch)?;
                            let gate = resize(&mut b.gate, n * ff);
                            for (r, row) in b.gate_up.chunks(2 * ff).take(n).enumerate() {
                                let (g, u) = row.split_at(ff);
                                gate[r * ff..(r + 1) * ff].copy_from_slice(g);
                                self.activate(&mut gate[r * ff..(r + 1) * ff], u);
                            }
                            let proj = resize(&mut b.proj, n * hsz);
                            kernels::matmul(
                                pool,
                                &down.matrix(),
                                &b.gate[..n * ff],
                                n,
                                proj,
                                &mut b.scratch,
                            )?;
                        }
                    }
                }
                CpuFfn::Experts(moe) => self.experts(moe, b, n)?,
            }
            let proj = &mut b.proj[..n * hsz];
            if let Some(w) = &layer.post_ffn_norm {
                rms_norm_rows_in_place(proj, w, self.eps);
            }
            add_in_place(&mut b.x[..n * hsz], proj);
        }

        // Only each span's last rows (usually one) become logits.
        let n: usize = spans.iter().map(|s| s.logit_rows).sum();
        let last = resize(&mut b.h, n * hsz);
        let rows = spans
            .iter()
            .flat_map(|s| s.start_row + s.rows - s.logit_rows..s.start_row + s.rows);
        for (i, r) in rows.enumerate() {
            last[i * hsz..(i + 1) * hsz].copy_from_slice(&b.x[r * hsz..(r + 1) * hsz]);
        }
        rms_norm_rows_in_place(last, &self.norm, self.eps);
        let head = self.lm_head.matrix();
        let mut logits = vec![0f32; n * head.rows];
        kernels::matmul(pool, &head, last, n, &mut logits, &mut b.scratch)?;
        if let Some(cap) = self.cfg.final_logit_softcap {
            // As ggml: scale by 1/cap, tanh, scale by cap.
            let inv = 1.0 / cap;
            logits.iter_mut().for_each(|v| *v = (*v * inv).tanh() * cap);
        }
        Ok(logits.chunks(head.rows).map(<[f32]>::to_vec).collect())
    }

    /// The experts' output for the `n` normed rows in `b.h`, into `b.proj`: the rows routed to
    /// an expert are gathered and go through it together (one pass over its weights), and its
    /// weighted outputs are added into their rows; then the shared expert, gated per row.
    fn experts(&self, moe: &CpuMoe, b: &mut Buffers, n: usize) -> Result<(), KernelError> {
        let hsz = self.cfg.hidden_size;
        let n_experts = moe.experts.len();
        kernels::matmul(
            &self.pool,
            &moe.router.matrix(),
            &b.h[..n * hsz],
            n,
            resize(&mut b.router, n * n_experts),
            &mut b.scratch,
        )?;
        let routes = Routes::new(
            &b.router[..n * n_experts],
            n_experts,
            moe.experts_used,
            moe.normalize_weights,
        );
        resize(&mut b.proj, n * hsz).fill(0.0);
        for (e, routed) in routes.active() {
            let m = routed.len();
            let x = resize(&mut b.expert_x, m * hsz);
            for (j, &(r, _)) in routed.iter().enumerate() {
                x[j * hsz..(j + 1) * hsz].copy_from_slice(&b.h[r * hsz..(r + 1) * hsz]);
            }
            self.expert_rows(&moe.experts[e], true, m, b)?;
            for (j, &(r, w)) in routed.iter().enumerate() {
                let y = &b.expert_y[j * hsz..(j + 1) * hsz];
                for (o, &v) in b.proj[r * hsz..(r + 1) * hsz].iter_mut().zip(y) {
                    *o += w * v;
                }
            }
        }
        if let Some((shared, gate)) = &moe.shared {
            self.expert_rows(shared, false, n, b)?;
            for r in 0..n {
                let row = r * hsz..(r + 1) * hsz;
                let logit: f32 = b.h[row.clone()].iter().zip(gate).map(|(x, w)| x * w).sum();
                let g = 1.0 / (1.0 + (-logit).exp());
                for (o, &v) in b.proj[row.clone()].iter_mut().zip(&b.expert_y[row]) {
                    *o += g * v;
                }
            }
        }
        Ok(())
    }

    /// One expert over the first `m` rows of the gathered `b.expert_x` (`gathered`) or of the
    /// normed `b.h`, into `b.expert_y`.
    fn expert_rows(
        &self,
        e: &CpuExpert,
        gathered: bool,
        m: usize,
        b: &mut Buffers,
    ) -> Result<(), KernelError> {
        let x = if gathered { &b.expert_x } else { &b.h };
        self.gated_rows(
            [&e.gate, &e.up, &e.down],
            &x[..m * self.cfg.hidden_size],
            m,
            [&mut b.gate, &mut b.up],
            &mut b.expert_y,
            &mut b.scratch,
        )
    }

    /// `out = down(act(gate · x) * up · x)` for the `m` rows of `x`: a dense feed-forward
    /// block or one expert; `g` and `u` receive the gate and up projections.
    fn gated_rows(
        &self,
        [gate, up, down]: [&MappedMatrix; 3],
        x: &[f32],
        m: usize,
        [g, u]: [&mut Vec<f32>; 2],
        out: &mut Vec<f32>,
        scratch: &mut ActivationScratch,
    ) -> Result<(), KernelError> {
        let ff = gate.rows();
        let (gm, um) = (gate.matrix(), up.matrix());
        kernels::matmul_many(
            &self.pool,
            &mut [(&gm, resize(g, m * ff)), (&um, resize(u, m * ff))],
            x,
            m,
            scratch,
        )?;
        self.activate(&mut g[..m * ff], &u[..m * ff]);
        kernels::matmul(
            &self.pool,
            &down.matrix(),
            &g[..m * ff],
            m,
            resize(out, m * self.cfg.hidden_size),
            scratch,
        )
    }

    /// `gate = act(gate) * up`.
    fn activate(&self, gate: &mut [f32], up: &[f32]) {
        match self.cfg.ffn_activation {
            FfnActivation::Silu => silu_mul(gate, up),
            FfnActivation::GeluTanh => gelu_mul(gate, up),
        }
    }
}

/// Adds a bias to every row of `out` (rows of `bias.len()` values).
fn add_bias(out: &mut [f32], bias: &Option<Vec<f32>>) {
    if let Some(bias) = bias {
        for row in out.chunks_mut(bias.len()) {
            add_in_place(row, bias);
        }
    }
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
