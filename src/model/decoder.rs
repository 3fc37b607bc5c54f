//! The transformer decoder: one configurable implementation for the llama family and its
//! relatives (Llama 2/3.x, Mistral, SmolLM, TinyLlama, Qwen2/2.5, Qwen3, Phi-3).
//!
//! References: Meta's Llama reference model (RMSNorm, rotary embeddings, SwiGLU, grouped-query
//! attention), Hugging Face transformers' `modeling_llama`, `modeling_qwen2`, `modeling_qwen3`
//! and `modeling_phi3` for the per-architecture differences, and llama.cpp's GGUF tensor naming.
//!
//! [`Decoder::forward`] takes several sequences at once, each at its own absolute position with
//! its own [`SequenceCache`]: the rows of all sequences go through every projection together
//! (one pass over the weights), and only attention is done per sequence. A batch of one is the
//! same code.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use super::ModelError;
use super::attention::{self, AttentionShape, HostKv};
use super::config::{ModelConfig, RopeScaling, RopeStyle};
use super::weights::{LayerWeight, RawWeight, WeightName, WeightStore};

/// KV caches grow in steps of this many positions.
const CACHE_GROWTH: usize = 256;

/// A linear projection `y = x W^T (+ b)`.
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

enum LinearWeight {
    Quantized(QMatMul),
    /// `(out, in)`, in the device's dense dtype.
    Dense(Tensor),
}

impl Linear {
    fn new(raw: RawWeight, bias: Option<Tensor>) -> candle_core::Result<Self> {
        let weight = match raw {
            RawWeight::Quantized(q) => LinearWeight::Quantized(QMatMul::from_arc(q)?),
            RawWeight::Dense(t) => LinearWeight::Dense(t),
        };
        Ok(Self { weight, bias })
    }

    /// `x`: `(rows, in)` f32 → `(rows, out)` f32.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Quantized(q) => q.forward(x)?,
            LinearWeight::Dense(w) if w.dtype() == x.dtype() => x.matmul(&w.t()?)?,
            LinearWeight::Dense(w) => x
                .to_dtype(w.dtype())?
                .matmul(&w.t()?)?
                .to_dtype(x.dtype())?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

enum Embedding {
    Quantized(std::sync::Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
}

impl Embedding {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(q) => q.embedding(ids),
            Self::Dense(t) => t.index_select(ids, 0)?.to_dtype(DType::F32),
        }
    }
}

enum QkvProjection {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// Phi-3's fused projection: rows are `[q; k; v]`.
    Fused(Linear),
}

enum GateUpProjection {
    Separate {
        gate: Linear,
        up: Linear,
    },
    /// Phi-3's fused projection: rows are `[gate; up]`.
    Fused(Linear),
}

struct Layer {
    attn_norm: RmsNorm,
    qkv: QkvProjection,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    o: Linear,
    ffn_norm: RmsNorm,
    gate_up: GateUpProjection,
    down: Linear,
}

/// Rotary embedding frequencies.
struct Rope {
    inv_freq: Vec<f64>,
    style: RopeStyle,
}

impl Rope {
    fn new(cfg: &ModelConfig) -> Self {
        let half = cfg.head_dim / 2;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64))
            .collect();
        match &cfg.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::FreqFactors(factors) => {
                for (f, d) in inv_freq.iter_mut().zip(factors) {
                    *f /= f64::from(*d);
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Self {
            inv_freq,
            style: cfg.rope_style,
        }
    }

    /// cos and sin for each row's position, shaped `(rows, 1, head_dim / 2)`.
    fn cos_sin(
        &self,
        positions: &[usize],
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &self.inv_freq {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let shape = (positions.len(), 1, half);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }

    /// `x`: `(rows, heads, head_dim)` → rotated, same shape.
    fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, heads, head_dim) = x.dims3()?;
        // Each row is its own "batch" entry so that it gets its own position's cos/sin.
        let x4 = x.contiguous()?.reshape((rows, heads, 1, head_dim))?;
        let y = match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x4, cos, sin)?,
            RopeStyle::HalfSplit => candle_nn::rotary_emb::rope(&x4, cos, sin)?,
        };
        y.reshape((rows, heads, head_dim))
    }
}

/// One layer's keys and values for a sequence on an accelerator, `(kv_heads, capacity, head_dim)`.
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Where a sequence's keys and values live.
enum CacheLayers {
    /// Candle tensors on the model's device (CUDA, Metal).
    Device(Vec<LayerCache>),
    /// f16 host buffers read by [`attention::attend`] (CPU).
    Host(Vec<HostKv>),
}

/// A sequence's KV cache: its length is the absolute position of the next token.
pub struct SequenceCache {
    layers: CacheLayers,
    len: usize,
    capacity: usize,
}

impl SequenceCache {
    /// Tokens already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by this cache.
    pub fn allocated_bytes(&self) -> usize {
        match &self.layers {
            CacheLayers::Device(layers) => layers
                .iter()
                .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
                .sum(),
            CacheLayers::Host(layers) => layers.iter().map(HostKv::bytes).sum(),
        }
    }
}

/// One sequence's part of a batched forward: `tokens` are appended at positions
/// `cache.len()..cache.len() + tokens.len()`.
pub struct ForwardItem<'a> {
    pub cache: &'a mut SequenceCache,
    pub tokens: &'a [u32],
}

pub struct Decoder {
    cfg: ModelConfig,
    device: Device,
    embedding: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    /// The positions this decoder accepts (the serving context, at most the model's).
    context_length: usize,
}

/// What a row of the batch belongs to.
struct Span {
    start_row: usize,
    rows: usize,
    first_position: usize,
}

impl Decoder {
    /// Builds the decoder from weights. `context_length` caps positions (it may be smaller than
    /// the model's trained context to bound memory).
    pub fn load(
        cfg: ModelConfig,
        store: &WeightStore,
        device: &Device,
        context_length: usize,
    ) -> Result<Self, ModelError> {
        let dense = if device.is_cpu() {
            Some(DType::F32)
        } else {
            None
        };
        let h = cfg.hidden_size;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let ff = cfg.intermediate_size;
        let source = store.source_name();
        let candle_err = |what: String| {
            let source = source.clone();
            move |e: candle_core::Error| ModelError::Load {
                source_name: source,
                tensor: what,
                message: e.to_string(),
            }
        };
        let eps = cfg.rms_norm_eps as f32;
        let norm = |name: WeightName, size: usize| -> Result<RmsNorm, ModelError> {
            let w = store.require(name, &[size], device, Some(DType::F32))?;
            Ok(RmsNorm {
                weight: w
                    .to_dense_f32(device)
                    .map_err(candle_err(format!("{name:?}")))?,
                eps,
            })
        };
        let vector = |name: WeightName, size: usize| -> Result<Option<Tensor>, ModelError> {
            store
                .load(name, &[size], device, Some(DType::F32))?
                .map(|w| {
                    w.to_dense_f32(device)
                        .map_err(candle_err(format!("{name:?}")))
                })
                .transpose()
        };
        let linear = |name: WeightName, out: usize, inp: usize, bias: Option<Tensor>| {
            let w = store.require(name, &[out, inp], device, dense)?;
            Linear::new(w, bias).map_err(candle_err(format!("{name:?}")))
        };

        let embed_raw = store.require(
            WeightName::TokenEmbedding,
            &[cfg.vocab_size, h],
            device,
            dense,
        )?;
        let lm_head = if store.contains(WeightName::Output) {
            linear(WeightName::Output, cfg.vocab_size, h, None)?
        } else {
            // Tied embeddings: the LM head shares the embedding table (no copy).
            let shared = match &embed_raw {
                RawWeight::Quantized(q) => RawWeight::Quantized(q.clone()),
                RawWeight::Dense(t) => RawWeight::Dense(t.clone()),
            };
            Linear::new(shared, None).map_err(candle_err("tied output".into()))?
        };
        let embedding = match embed_raw {
            RawWeight::Quantized(q) => Embedding::Quantized(q),
            RawWeight::Dense(t) => Embedding::Dense(t),
        };

        let mut cfg = cfg;
        if let Some(raw) = store.load(WeightName::RopeFreqs, &[hd / 2], device, Some(DType::F32))? {
            let factors = raw
                .to_dense_f32(device)
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(candle_err("rope_freqs".into()))?;
            cfg.rope_scaling = RopeScaling::FreqFactors(factors);
        }

        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let w = |lw: LayerWeight| WeightName::Layer(i, lw);
            let qkv = if store.contains(w(LayerWeight::Qkv)) {
                let rows = (nh + 2 * nkv) * hd;
                let bias = vector(w(LayerWeight::QkvBias), rows)?;
                QkvProjection::Fused(linear(w(LayerWeight::Qkv), rows, h, bias)?)
            } else {
                QkvProjection::Separate {
                    q: linear(
                        w(LayerWeight::Q),
                        nh * hd,
                        h,
                        vector(w(LayerWeight::QBias), nh * hd)?,
                    )?,
                    k: linear(
                        w(LayerWeight::K),
                        nkv * hd,
                        h,
                        vector(w(LayerWeight::KBias), nkv * hd)?,
                    )?,
                    v: linear(
                        w(LayerWeight::V),
                        nkv * hd,
                        h,
                        vector(w(LayerWeight::VBias), nkv * hd)?,
                    )?,
                }
            };
            let q_norm = match store.contains(w(LayerWeight::QNorm)) {
                true => Some(norm(w(LayerWeight::QNorm), hd)?),
                false => None,
            };
            let k_norm = match store.contains(w(LayerWeight::KNorm)) {
                true => Some(norm(w(LayerWeight::KNorm), hd)?),
                false => None,
            };
            let gate_up = if store.contains(w(LayerWeight::Gate)) {
                GateUpProjection::Separate {
                    gate: linear(w(LayerWeight::Gate), ff, h, None)?,
                    up: linear(w(LayerWeight::Up), ff, h, None)?,
                }
            } else {
                GateUpProjection::Fused(linear(w(LayerWeight::GateUp), 2 * ff, h, None)?)
            };
            layers.push(Layer {
                attn_norm: norm(w(LayerWeight::AttnNorm), h)?,
                qkv,
                q_norm,
                k_norm,
                o: linear(w(LayerWeight::O), h, nh * hd, None)?,
                ffn_norm: norm(w(LayerWeight::FfnNorm), h)?,
                gate_up,
                down: linear(w(LayerWeight::Down), h, ff, None)?,
            });
        }
        let output_norm = norm(WeightName::OutputNorm, h)?;
        let rope = Rope::new(&cfg);
        let context_length = context_length.min(cfg.max_position_embeddings).max(1);
        Ok(Self {
            cfg,
            device: device.clone(),
            embedding,
            layers,
            norm: output_norm,
            lm_head,
            rope,
            context_length,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// An empty cache for a new sequence (allocates nothing until the first forward).
    pub fn new_cache(&self) -> SequenceCache {
        let layers = if self.device.is_cpu() {
            CacheLayers::Host(Vec::new())
        } else {
            CacheLayers::Device(Vec::new())
        };
        SequenceCache {
            layers,
            len: 0,
            capacity: 0,
        }
    }

    fn attention_shape(&self) -> AttentionShape {
        AttentionShape {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            sliding_window: self.cfg.sliding_window,
        }
    }

    fn ensure_capacity(&self, cache: &mut SequenceCache, needed: usize) -> candle_core::Result<()> {
        if needed <= cache.capacity {
            return Ok(());
        }
        let new_capacity = needed
            .max(cache.capacity * 2)
            .div_ceil(CACHE_GROWTH)
            .saturating_mul(CACHE_GROWTH)
            .min(self.context_length)
            .max(needed);
        match &mut cache.layers {
            CacheLayers::Host(layers) => {
                let stride = self.cfg.num_kv_heads * self.cfg.head_dim;
                layers.resize_with(self.cfg.num_layers, HostKv::default);
                for l in layers.iter_mut() {
                    l.reserve_positions(new_capacity, stride);
                }
            }
            CacheLayers::Device(old_layers) => {
                let shape = (self.cfg.num_kv_heads, new_capacity, self.cfg.head_dim);
                let mut layers = Vec::with_capacity(self.cfg.num_layers);
                for l in 0..self.cfg.num_layers {
                    let k = Tensor::zeros(shape, DType::F32, &self.device)?;
                    let v = Tensor::zeros(shape, DType::F32, &self.device)?;
                    if let Some(old) = old_layers.get(l)
                        && cache.len > 0
                    {
                        k.slice_set(&old.k.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
                        v.slice_set(&old.v.narrow(1, 0, cache.len)?.contiguous()?, 1, 0)?;
                    }
                    layers.push(LayerCache { k, v });
                }
                *old_layers = layers;
            }
        }
        cache.capacity = new_capacity;
        Ok(())
    }

    /// Runs one step for several sequences and returns the logits after each item's last token,
    /// shaped `(items, vocab)`. Each cache advances by its item's token count.
    pub fn forward(&self, items: &mut [ForwardItem<'_>]) -> Result<Tensor, ModelError> {
        let mut spans = Vec::with_capacity(items.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for item in items.iter() {
            let first_position = item.cache.len();
            if item.tokens.is_empty() {
                return Err(ModelError::Forward("a forward item has no tokens".into()));
            }
            if first_position + item.tokens.len() > self.context_length {
                return Err(ModelError::ContextOverflow {
                    needed: first_position + item.tokens.len(),
                    context_length: self.context_length,
                });
            }
            if let Some(&bad) = item
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::Forward(format!(
                    "token id {bad} is outside the vocabulary ({})",
                    self.cfg.vocab_size
                )));
            }
            spans.push(Span {
                start_row: ids.len(),
                rows: item.tokens.len(),
                first_position,
            });
            ids.extend_from_slice(item.tokens);
            positions.extend(first_position..first_position + item.tokens.len());
        }
        self.forward_rows(items, &spans, ids, &positions)
            .map_err(|e| ModelError::Forward(e.to_string()))
    }

    fn forward_rows(
        &self,
        items: &mut [ForwardItem<'_>],
        spans: &[Span],
        ids: Vec<u32>,
        positions: &[usize],
    ) -> candle_core::Result<Tensor> {
        for (item, span) in items.iter_mut().zip(spans) {
            self.ensure_capacity(item.cache, span.first_position + span.rows)?;
        }
        let n_rows = ids.len();
        let ids = Tensor::from_vec(ids, n_rows, &self.device)?;
        let mut x = self.embedding.forward(&ids)?;
        let (cos, sin) = self.rope.cos_sin(positions, &self.device)?;
        let masks = if self.device.is_cpu() {
            Vec::new()
        } else {
            spans
                .iter()
                .map(|s| self.attention_mask(s))
                .collect::<candle_core::Result<Vec<_>>>()?
        };
        for (l, layer) in self.layers.iter().enumerate() {
            x = self.layer_forward(layer, l, &x, &cos, &sin, items, spans, &masks)?;
        }
        for (item, span) in items.iter_mut().zip(spans) {
            item.cache.len = span.first_position + span.rows;
        }
        let last_rows: Vec<u32> = spans
            .iter()
            .map(|s| (s.start_row + s.rows - 1) as u32)
            .collect();
        let last_rows = Tensor::from_vec(last_rows, spans.len(), &self.device)?;
        let h = self.norm.forward(&x.index_select(&last_rows, 0)?)?;
        self.lm_head.forward(&h)?.to_dtype(DType::F32)
    }

    /// The first key position a span's rows may attend to.
    fn first_key(&self, span: &Span) -> usize {
        match self.cfg.sliding_window {
            Some(w) => (span.first_position + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Additive mask `(rows * group, keys)` for a multi-row span; single rows need none (the key
    /// range already ends at the row's own position).
    fn attention_mask(&self, span: &Span) -> candle_core::Result<Option<Tensor>> {
        if span.rows == 1 {
            return Ok(None);
        }
        let group = self.cfg.num_heads / self.cfg.num_kv_heads;
        let first_key = self.first_key(span);
        let n_keys = span.first_position + span.rows - first_key;
        let mut mask = Vec::with_capacity(span.rows * group * n_keys);
        for t in 0..span.rows {
            let pos = span.first_position + t;
            for _ in 0..group {
                for c in 0..n_keys {
                    let key_pos = first_key + c;
                    let visible =
                        key_pos <= pos && self.cfg.sliding_window.is_none_or(|w| pos - key_pos < w);
                    mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
        }
        Tensor::from_vec(mask, (span.rows * group, n_keys), &self.device).map(Some)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        layer_index: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        items: &mut [ForwardItem<'_>],
        spans: &[Span],
        masks: &[Option<Tensor>],
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let rows = x.dim(0)?;
        let h = layer.attn_norm.forward(x)?;
        let (q, k, v) = match &layer.qkv {
            QkvProjection::Separate { q, k, v } => (q.forward(&h)?, k.forward(&h)?, v.forward(&h)?),
            QkvProjection::Fused(qkv) => {
                let y = qkv.forward(&h)?;
                (
                    y.narrow(1, 0, nh * hd)?,
                    y.narrow(1, nh * hd, nkv * hd)?,
                    y.narrow(1, (nh + nkv) * hd, nkv * hd)?,
                )
            }
        };
        let mut q = q.reshape((rows, nh, hd))?;
        let mut k = k.reshape((rows, nkv, hd))?;
        let v = v.reshape((rows, nkv, hd))?;
        if let Some(n) = &layer.q_norm {
            q = n.forward(&q)?;
        }
        if let Some(n) = &layer.k_norm {
            k = n.forward(&k)?;
        }
        let q = self.rope.apply(&q, cos, sin)?;
        let k = self.rope.apply(&k, cos, sin)?;

        let attn = if self.device.is_cpu() {
            self.attend_host(layer_index, &q, &k, &v, items, spans)?
        } else {
            let mut outputs = Vec::with_capacity(spans.len());
            for ((item, span), mask) in items.iter_mut().zip(spans).zip(masks) {
                let CacheLayers::Device(layers) = &item.cache.layers else {
                    candle_core::bail!("a host cache was given to a device decoder");
                };
                outputs.push(self.attend(
                    &q.narrow(0, span.start_row, span.rows)?,
                    &k.narrow(0, span.start_row, span.rows)?,
                    &v.narrow(0, span.start_row, span.rows)?,
                    &layers[layer_index],
                    span,
                    mask.as_ref(),
                )?);
            }
            if outputs.len() == 1 {
                outputs.swap_remove(0)
            } else {
                Tensor::cat(&outputs, 0)?
            }
        };
        let x = (x + layer.o.forward(&attn)?)?;

        let h = layer.ffn_norm.forward(&x)?;
        let (gate, up) = match &layer.gate_up {
            GateUpProjection::Separate { gate, up } => (gate.forward(&h)?, up.forward(&h)?),
            GateUpProjection::Fused(gu) => {
                let y = gu.forward(&h)?;
                let ff = cfg.intermediate_size;
                (y.narrow(1, 0, ff)?, y.narrow(1, ff, ff)?)
            }
        };
        let act = (candle_nn::ops::silu(&gate)? * up)?;
        x + layer.down.forward(&act)?
    }

    /// CPU attention: every span's keys and values go into its f16 cache, then each span's rows
    /// attend with llama.cpp's flash-attention numerics.
    fn attend_host(
        &self,
        layer_index: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        items: &mut [ForwardItem<'_>],
        spans: &[Span],
    ) -> candle_core::Result<Tensor> {
        let shape = self.attention_shape();
        let q_width = shape.heads * shape.head_dim;
        let kv_width = shape.kv_heads * shape.head_dim;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let rows = q.len() / q_width;
        let mut out = vec![0f32; q.len()];
        for (item, span) in items.iter_mut().zip(spans) {
            let CacheLayers::Host(layers) = &mut item.cache.layers else {
                candle_core::bail!("a device cache was given to a CPU decoder");
            };
            let kv = &mut layers[layer_index];
            let (a, b) = (span.start_row, span.start_row + span.rows);
            kv.write(
                span.first_position,
                kv_width,
                &k[a * kv_width..b * kv_width],
                &v[a * kv_width..b * kv_width],
            );
            attention::attend(
                &shape,
                kv,
                &q[a * q_width..b * q_width],
                span.first_position,
                span.rows,
                &mut out[a * q_width..b * q_width],
            );
        }
        Tensor::from_vec(out, (rows, q_width), &self.device)
    }

    /// Attention of one span's rows against its cache (after appending the span's keys/values).
    /// `q`: `(rows, heads, hd)`, `k`/`v`: `(rows, kv_heads, hd)` → `(rows, heads * hd)`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &LayerCache,
        span: &Span,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let group = nh / nkv;
        let rows = span.rows;
        cache
            .k
            .slice_set(&k.transpose(0, 1)?.contiguous()?, 1, span.first_position)?;
        cache
            .v
            .slice_set(&v.transpose(0, 1)?.contiguous()?, 1, span.first_position)?;
        let first_key = self.first_key(span);
        let n_keys = span.first_position + rows - first_key;
        let mut keys = cache.k.narrow(1, first_key, n_keys)?;
        let mut values = cache.v.narrow(1, first_key, n_keys)?;
        if !self.device.is_cpu() {
            // GPU matmuls want plain strides; the CPU gemm reads the strided view directly.
            keys = keys.contiguous()?;
            values = values.contiguous()?;
        }
        // (rows, nh, hd) → (nkv, rows * group, hd): head h uses kv head h / group.
        let q = q
            .reshape((rows, nkv, group, hd))?
            .permute((1, 0, 2, 3))?
            .contiguous()?
            .reshape((nkv, rows * group, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&keys.t()?)? * scale)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs
            .matmul(&values)?
            .reshape((nkv, rows, group, hd))?
            .permute((1, 0, 2, 3))?
            .contiguous()?
            .reshape((rows, nh * hd))
    }

    /// Vocabulary size of the logits.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }
}

/// Log-softmax of one row of logits, in f64 for a stable sum.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln() as f32;
    logits.iter().map(|&l| l - max - log_sum).collect()
}
