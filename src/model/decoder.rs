//! The transformer decoder: one configurable implementation for the llama family and its
//! relatives (Llama 2/3.x, Mistral, SmolLM, TinyLlama, Qwen2/2.5, Qwen3, Phi-3, Gemma 2 and 3),
//! and the mixture-of-experts ones (Mixtral, Qwen2-MoE, Qwen3-MoE).
//!
//! References: Meta's Llama reference model (RMSNorm, rotary embeddings, SwiGLU, grouped-query
//! attention), Hugging Face transformers' `modeling_llama`, `modeling_qwen2`, `modeling_qwen3`
//! and `modeling_phi3` for the per-architecture differences, and llama.cpp's GGUF tensor naming;
//! for Gemma 2 and 3, llama.cpp's `src/models/gemma2.cpp` and `gemma3.cpp` (what the converter
//! stores, the query scale, the soft caps, which layers slide and with which rope); for the
//! experts, llama.cpp's `build_moe_ffn` and its Qwen2-MoE graph (the gated shared expert).
//!
//! [`Decoder::forward`] takes several sequences at once, each at its own absolute position with
//! its own [`SequenceCache`]: the rows of all sequences go through every projection together
//! (one pass over the weights), and only attention is done per sequence. A batch of one is the
//! same code.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};

use super::ModelError;
use super::attention::{self, AttentionShape, HostKv, KvBytes, SpanAttention};
use super::config::{FfnActivation, ModelConfig, MoeConfig, RopeScaling};
use super::cpu_forward::{
    CpuExpert, CpuFfn, CpuGateUp, CpuLayer, CpuModel, CpuMoe, CpuQkv, CpuSpan, Projection,
};
use super::moe::Routes;
use super::rope::Rope;
use super::weights::{
    DenseDType, LayerWeight, MappedMatrix, Placement, RawWeight, WeightName, WeightStore,
};
use crate::kernels::{self, ActivationScratch, KernelPath, ThreadPool};

thread_local! {
    /// Quantized activations, reused across matmuls (the engine thread is the only caller).
    static SCRATCH: RefCell<ActivationScratch> = RefCell::new(ActivationScratch::default());
}

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
    /// In the GGUF map, multiplied by our CPU kernels.
    Native {
        matrix: MappedMatrix,
        pool: Arc<ThreadPool>,
    },
}

impl Linear {
    fn new(
        raw: RawWeight,
        bias: Option<Tensor>,
        pool: Option<&Arc<ThreadPool>>,
    ) -> candle_core::Result<Self> {
        let weight = match (raw, pool) {
            (RawWeight::Quantized(q), _) => LinearWeight::Quantized(QMatMul::from_arc(q)?),
            (RawWeight::Dense(t), _) => LinearWeight::Dense(t),
            (RawWeight::Mapped(matrix), Some(pool)) => LinearWeight::Native {
                matrix,
                pool: pool.clone(),
            },
            (RawWeight::Mapped(_), None) => {
                candle_core::bail!("an in-place matrix needs the CPU kernels' thread pool")
            }
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
            LinearWeight::Native { matrix, pool } => native_matmul(matrix, pool, x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x (rows, in)` times a mapped matrix with our kernels, reading `x` in place.
fn native_matmul(
    matrix: &MappedMatrix,
    pool: &ThreadPool,
    x: &Tensor,
) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    let (m, k) = x.dims2()?;
    let w = matrix.matrix();
    let mut out = vec![0f32; m * w.rows];
    {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("CPU kernels were given a tensor on another device");
        };
        let start = layout.start_offset();
        let input = &cpu.as_slice::<f32>()?[start..start + m * k];
        SCRATCH
            .with(|scratch| {
                kernels::matmul(pool, &w, input, m, &mut out, &mut scratch.borrow_mut())
            })
            .map_err(candle_core::Error::wrap)?;
    }
    Tensor::from_vec(out, (m, w.rows), x.device())
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
    Quantized(Arc<candle_core::quantized::QTensor>),
    Dense(Tensor),
    /// Rows dequantized from the GGUF map as they are looked up.
    Mapped(MappedMatrix),
}

impl Embedding {
    fn forward(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(q) => q.embedding(&Tensor::new(ids, device)?),
            Self::Dense(t) => t
                .index_select(&Tensor::new(ids, device)?, 0)?
                .to_dtype(DType::F32),
            Self::Mapped(m) => {
                let w = m.matrix();
                let mut out = vec![0f32; ids.len() * m.cols()];
                for (&id, row) in ids.iter().zip(out.chunks_mut(m.cols())) {
                    kernels::dequantize_row(&w, id as usize, row)
                        .map_err(candle_core::Error::wrap)?;
                }
                Tensor::from_vec(out, (ids.len(), m.cols()), device)
            }
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

/// One expert: a SwiGLU feed-forward block of its own.
struct Expert {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Expert {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let act = (candle_nn::ops::silu(&self.gate.forward(x)?)? * self.up.forward(x)?)?;
        self.down.forward(&act)
    }
}

struct MoeBlock {
    router: Linear,
    experts: Vec<Expert>,
    /// Qwen2-MoE's shared expert and its gate vector, `(hidden, 1)`.
    shared: Option<(Expert, Tensor)>,
}

enum FeedForward {
    Dense {
        gate_up: GateUpProjection,
        down: Linear,
    },
    Experts(Box<MoeBlock>),
}

struct Layer {
    attn_norm: RmsNorm,
    qkv: QkvProjection,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    o: Linear,
    post_attn_norm: Option<RmsNorm>,
    ffn_norm: RmsNorm,
    ffn: FeedForward,
    post_ffn_norm: Option<RmsNorm>,
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

/// Where attention runs and a sequence's keys and values live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    /// f16 host buffers and our CPU attention: the CPU's path.
    Host,
    /// Candle tensors on the model's device: the CUDA and Metal path. It also runs on the CPU
    /// device, which is how the tests check it without a GPU.
    Device,
}

/// How [`Decoder::load_with`] builds the decoder; the defaults follow the device.
#[derive(Clone, Default)]
pub struct DecoderOptions {
    /// The CPU kernels' pool: with it, matrices of the types our kernels read stay in the GGUF
    /// memory map. Used only on the CPU with [`AttentionPath::Host`].
    pub cpu_pool: Option<Arc<ThreadPool>>,
    /// `None`: [`AttentionPath::Host`] on the CPU, [`AttentionPath::Device`] elsewhere.
    pub attention: Option<AttentionPath>,
    /// Dense matrices in half precision ([`DenseDType::Half`]) rather than f32. `None`: half
    /// on accelerators, f32 on the CPU (whose kernels compute in f32).
    pub half_weights: Option<bool>,
}

/// Which code runs a decoder's forward, decided once at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPath {
    /// Plain buffers and our CPU kernels, every matrix read in place from the GGUF map
    /// (`cpu_forward.rs`).
    CpuKernels,
    /// Candle tensors, for this reason.
    Candle(CandlePathReason),
}

/// Why a decoder runs on Candle tensors rather than on our CPU kernels: what
/// [`Decoder::load_with`] checks, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CandlePathReason {
    /// The device is not the CPU (CUDA, Metal): Candle's kernels are the accelerators' path.
    NotCpu { device: String },
    /// [`AttentionPath::Device`] was asked for on the CPU (how the tests run the accelerators'
    /// code).
    DeviceAttention,
    /// No pool for the CPU kernels was given (`LoadOptions::cpu_kernels` off).
    KernelsDisabled,
    /// Safetensors weights: dense tensors, which our kernels do not read in place.
    Safetensors,
    /// A matrix was built outside the GGUF map although every matrix's type is one our kernels
    /// read (the loader and this check disagree; `role` is the weight's role).
    MatrixNotInMap { role: String },
    /// A projection carries a bias that the CPU forward does not add.
    Bias { role: String },
}

impl CandlePathReason {
    /// A reason that comes from the weights rather than from the device or the options: on the
    /// CPU it costs most of the speed without anyone having asked for it.
    pub fn is_unexpected(&self) -> bool {
        matches!(self, Self::MatrixNotInMap { .. } | Self::Bias { .. })
    }
}

impl std::fmt::Display for CandlePathReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotCpu { device } => {
                write!(f, "the device is {device}; the CPU kernels run on the CPU")
            }
            Self::DeviceAttention => f.write_str("attention was set to the device path"),
            Self::KernelsDisabled => f.write_str("the CPU kernels are turned off"),
            Self::Safetensors => f.write_str(
                "safetensors weights are dense tensors; the CPU kernels read GGUF matrices",
            ),
            Self::MatrixNotInMap { role } => {
                write!(f, "matrix {role} is not read in place from the GGUF map")
            }
            Self::Bias { role } => {
                write!(f, "{role} has a bias, which the CPU forward does not add")
            }
        }
    }
}

/// The tensors of one stored type and the path they take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorTypeUse {
    /// The type as ggml names it ("Q4_K", "F32"), or a safetensors dtype ("BF16").
    pub dtype: String,
    pub count: usize,
    /// Of `count`, the tensors our CPU code reads (the rest are Candle tensors). On the Candle
    /// path, GGUF matrices of the kernels' types are still multiplied by our kernels.
    pub cpu_kernels: usize,
}

impl TensorTypeUse {
    /// "cpu-kernels", "candle", or "mixed" when the type's tensors go both ways.
    pub fn path(&self) -> &'static str {
        if self.cpu_kernels == self.count {
            ComputePath::CPU_KERNELS
        } else if self.cpu_kernels == 0 {
            ComputePath::CANDLE
        } else {
            "mixed"
        }
    }
}

impl std::fmt::Display for TensorTypeUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{} {}", self.dtype, self.count, self.path())?;
        if self.path() == "mixed" {
            write!(
                f,
                " ({} cpu-kernels, {} candle)",
                self.cpu_kernels,
                self.count - self.cpu_kernels
            )?;
        }
        Ok(())
    }
}

/// How a loaded decoder computes: the forward's path (with the reason when it is Candle's),
/// every stored tensor type with the path its tensors take, and the CPU kernels' selection.
/// `Display` gives the load log's line: `cpu-kernels; Q4_1×210 cpu-kernels, F32×61 cpu-kernels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputePath {
    pub forward: ForwardPath,
    /// Every type stored in the weights, most tensors first.
    pub tensor_types: Vec<TensorTypeUse>,
    /// The CPU kernels' selection ([`kernels::detect`]) when our CPU code runs (in-place
    /// matrices or the host attention); `None` when only Candle computes.
    pub cpu_kernels: Option<KernelPath>,
}

impl ComputePath {
    pub const CPU_KERNELS: &'static str = "cpu-kernels";
    pub const CANDLE: &'static str = "candle";

    /// "cpu-kernels" or "candle".
    pub fn path_name(&self) -> &'static str {
        match self.forward {
            ForwardPath::CpuKernels => Self::CPU_KERNELS,
            ForwardPath::Candle(_) => Self::CANDLE,
        }
    }

    /// Why the forward runs on Candle tensors; `None` on the CPU kernels' path.
    pub fn reason(&self) -> Option<&CandlePathReason> {
        match &self.forward {
            ForwardPath::CpuKernels => None,
            ForwardPath::Candle(reason) => Some(reason),
        }
    }

    /// Counts the stored tensors by type. `forward_on_kernels`: the whole forward runs on our
    /// kernels; otherwise, with `in_place`, GGUF matrices of the kernels' types still do (as
    /// [`Placement::in_place`] keeps them in the map), and everything else is Candle's.
    fn count_tensors(
        store: &WeightStore,
        forward_on_kernels: bool,
        in_place: bool,
    ) -> Vec<TensorTypeUse> {
        let mut types: Vec<TensorTypeUse> = Vec::new();
        let mut add = |dtype: &str, on_kernels: bool| {
            let i = match types.iter().position(|t| t.dtype == dtype) {
                Some(i) => i,
                None => {
                    types.push(TensorTypeUse {
                        dtype: dtype.to_string(),
                        count: 0,
                        cpu_kernels: 0,
                    });
                    types.len() - 1
                }
            };
            types[i].count += 1;
            types[i].cpu_kernels += usize::from(on_kernels);
        };
        match store {
            WeightStore::Gguf(file) => {
                for info in file.tensor_names().filter_map(|n| file.tensor_info(n)) {
                    let mapped = in_place && info.dims.len() >= 2;
                    add(&info.ty.to_string(), forward_on_kernels || mapped);
                }
            }
            WeightStore::Safetensors { tensors, .. } => {
                for (_, view) in tensors.tensors() {
                    add(&format!("{:?}", view.dtype()), false);
                }
            }
        }
        types.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.dtype.cmp(&b.dtype)));
        types
    }

    /// Logs the decision: one info line with every tensor type's path, and a warning naming
    /// what sends a model to the slow path on the CPU when the weights (not the options) did.
    fn log(&self, source: &str, device: &Device) {
        let kernels = self
            .cpu_kernels
            .map_or("none".to_string(), |k| k.to_string());
        tracing::info!(model = %source, cpu_kernels = %kernels, "compute path: {self}");
        if let Some(reason) = self.reason()
            && device.is_cpu()
            && reason.is_unexpected()
        {
            tracing::warn!(
                model = %source,
                "{reason}: the whole forward runs on Candle tensors, much slower than the CPU \
                 kernels' path"
            );
        }
    }
}

impl std::fmt::Display for ComputePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path_name())?;
        if let Some(reason) = self.reason() {
            write!(f, " ({reason})")?;
        }
        for (i, t) in self.tensor_types.iter().enumerate() {
            f.write_str(if i == 0 { "; " } else { ", " })?;
            write!(f, "{t}")?;
        }
        Ok(())
    }
}

/// The first reason, from the device, the options and the weights, for the forward to run on
/// Candle tensors; `None` when our CPU kernels can run all of it.
fn candle_path_reason(
    store: &WeightStore,
    device: &Device,
    attention: AttentionPath,
    has_pool: bool,
) -> Option<CandlePathReason> {
    if !device.is_cpu() {
        let device = match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        };
        return Some(CandlePathReason::NotCpu { device });
    }
    if attention == AttentionPath::Device {
        return Some(CandlePathReason::DeviceAttention);
    }
    if !has_pool {
        return Some(CandlePathReason::KernelsDisabled);
    }
    if !matches!(store, WeightStore::Gguf(_)) {
        return Some(CandlePathReason::Safetensors);
    }
    // Every tensor type the GGUF reader accepts is one our kernels read (`gguf::ggml_type`).
    None
}

/// Layer `layer`'s router, experts and shared expert.
fn load_experts(
    store: &WeightStore,
    layer: usize,
    moe: &MoeConfig,
    h: usize,
    at: Placement<'_>,
    pool: Option<&Arc<ThreadPool>>,
) -> Result<MoeBlock, ModelError> {
    let w = |lw: LayerWeight| WeightName::Layer(layer, lw);
    let source = store.source_name();
    let linear = |raw: RawWeight, what: String| {
        Linear::new(raw, None, pool).map_err(|e| ModelError::Load {
            source_name: source.clone(),
            tensor: what,
            message: e.to_string(),
        })
    };
    let router = store.require(w(LayerWeight::Router), &[moe.experts, h], at)?;
    let router = linear(router, format!("{:?}", w(LayerWeight::Router)))?;
    let ff = moe.expert_ff;
    let stacked = |which: LayerWeight, rows: usize, cols: usize| {
        store.require_experts(layer, which, moe.experts, rows, cols, at)
    };
    let gates = stacked(LayerWeight::ExpertGate, ff, h)?;
    let ups = stacked(LayerWeight::ExpertUp, ff, h)?;
    let downs = stacked(LayerWeight::ExpertDown, h, ff)?;
    let mut experts = Vec::new();
    for (e, ((gate, up), down)) in gates.into_iter().zip(ups).zip(downs).enumerate() {
        experts.push(Expert {
            gate: linear(gate, format!("layer {layer} expert {e} gate"))?,
            up: linear(up, format!("layer {layer} expert {e} up"))?,
            down: linear(down, format!("layer {layer} expert {e} down"))?,
        });
    }
    let shared = match moe.shared_expert_ff {
        None => None,
        Some(sff) => {
            let matrix =
                |lw: LayerWeight, rows: usize, cols: usize| -> Result<Linear, ModelError> {
                    let raw = store.require(w(lw), &[rows, cols], at)?;
                    linear(raw, format!("{:?}", w(lw)))
                };
            let expert = Expert {
                gate: matrix(LayerWeight::SharedGate, sff, h)?,
                up: matrix(LayerWeight::SharedUp, sff, h)?,
                down: matrix(LayerWeight::SharedDown, h, sff)?,
            };
            // A vector in GGUF, a one-row matrix in the checkpoint.
            let shape: &[usize] = if store.is_gguf() { &[h] } else { &[1, h] };
            let name = w(LayerWeight::SharedExpertGateInp);
            let gate = store
                .require(name, shape, Placement::f32(at.device))?
                .to_dense_f32(at.device)
                .and_then(|t| t.reshape((h, 1)))
                .map_err(|e| ModelError::Load {
                    source_name: source.clone(),
                    tensor: format!("{name:?}"),
                    message: e.to_string(),
                })?;
            Some((expert, gate))
        }
    };
    Ok(MoeBlock {
        router,
        experts,
        shared,
    })
}

/// Why [`Decoder::cpu_model`] built no CPU model.
enum NoCpuModel {
    /// The decoder as built cannot run on the CPU path: it stays on Candle's.
    Reason(CandlePathReason),
    /// Copying a norm or a bias out of its tensor failed: a load error.
    Failed(candle_core::Error),
}

impl From<CandlePathReason> for NoCpuModel {
    fn from(reason: CandlePathReason) -> Self {
        Self::Reason(reason)
    }
}

impl From<candle_core::Error> for NoCpuModel {
    fn from(e: candle_core::Error) -> Self {
        Self::Failed(e)
    }
}

/// A sequence's KV cache: its length is the absolute position of the next token.
pub struct SequenceCache {
    layers: CacheLayers,
    len: usize,
    capacity: usize,
    /// Positions the cache grows to at most, unless one forward needs more (the sequence's
    /// reservation under the worker's KV budget).
    limit: usize,
}

impl SequenceCache {
    /// Caps growth at `positions` (see [`SequenceCache::limit`]).
    pub fn set_limit(&mut self, positions: usize) {
        self.limit = positions;
    }

    /// Tokens already in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the positions from `len` on (a rejected draft's); the next forward writes them
    /// again.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
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
    /// The sliding-window layers' rope where it differs from `rope` (Gemma 3).
    rope_swa: Option<Rope>,
    /// The positions this decoder accepts (the serving context, at most the model's).
    context_length: usize,
    attention: AttentionPath,
    /// The CPU compute pool (our kernels and attention), when running on the CPU with them.
    cpu_pool: Option<Arc<ThreadPool>>,
    /// The tensor-free CPU path, when every matrix is readable by our kernels.
    cpu: Option<CpuModel>,
    /// Which path the forward takes and why, decided at load.
    compute: ComputePath,
    /// The bytes of the CPU path's KV blocks alive in this decoder's caches.
    kv_live: KvBytes,
}

/// What a row of the batch belongs to.
struct Span {
    start_row: usize,
    rows: usize,
    first_position: usize,
    /// How many of the span's last rows become logits.
    logit_rows: usize,
}

impl Decoder {
    /// Builds the decoder from weights. `context_length` caps positions (it may be smaller than
    /// the model's trained context to bound memory).
    /// With `cpu_pool`, matrices of the types our kernels read stay in the GGUF memory map and
    /// are multiplied by the kernels on that pool; without it, Candle's own kernels are used.
    pub fn load(
        cfg: ModelConfig,
        store: &WeightStore,
        device: &Device,
        context_length: usize,
        cpu_pool: Option<Arc<ThreadPool>>,
    ) -> Result<Self, ModelError> {
        let options = DecoderOptions {
            cpu_pool,
            ..DecoderOptions::default()
        };
        Self::load_with(cfg, store, device, context_length, options)
    }

    /// [`Self::load`] with every choice explicit.
    pub fn load_with(
        cfg: ModelConfig,
        store: &WeightStore,
        device: &Device,
        context_length: usize,
        options: DecoderOptions,
    ) -> Result<Self, ModelError> {
        let attention = options.attention.unwrap_or(if device.is_cpu() {
            AttentionPath::Host
        } else {
            AttentionPath::Device
        });
        // The path is decided before anything is built, from the device, the options and the
        // weights' types. The in-place matrices and the tensor-free path belong to the CPU's
        // host path.
        let planned = candle_path_reason(store, device, attention, options.cpu_pool.is_some());
        let cpu_pool = options
            .cpu_pool
            .filter(|_| device.is_cpu() && attention == AttentionPath::Host);
        let in_place = cpu_pool.is_some();
        let dense = if options.half_weights.unwrap_or(!device.is_cpu()) {
            DenseDType::Half
        } else {
            DenseDType::Exactly(DType::F32)
        };
        let matrices = Placement {
            device,
            dense,
            in_place,
        };
        let vectors = Placement::f32(device);
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
        // Gemma normalizes by `1 + w`: the GGUF converter stored the sum, a Hugging Face
        // checkpoint stores `w`, so the sum is taken here.
        let norm_offset = !store.is_gguf()
            && matches!(
                cfg.architecture,
                super::config::Architecture::Gemma2 | super::config::Architecture::Gemma3
            );
        let norm = |name: WeightName, size: usize| -> Result<RmsNorm, ModelError> {
            let w = store.require(name, &[size], vectors)?;
            let weight = w
                .to_dense_f32(device)
                .and_then(|w| if norm_offset { w + 1.0 } else { Ok(w) })
                .map_err(candle_err(format!("{name:?}")))?;
            Ok(RmsNorm { weight, eps })
        };
        let vector = |name: WeightName, size: usize| -> Result<Option<Tensor>, ModelError> {
            store
                .load(name, &[size], vectors)?
                .map(|w| {
                    w.to_dense_f32(device)
                        .map_err(candle_err(format!("{name:?}")))
                })
                .transpose()
        };
        let linear = |name: WeightName, out: usize, inp: usize, bias: Option<Tensor>| {
            let w = store.require(name, &[out, inp], matrices)?;
            Linear::new(w, bias, cpu_pool.as_ref()).map_err(candle_err(format!("{name:?}")))
        };

        let embed_raw =
            store.require(WeightName::TokenEmbedding, &[cfg.vocab_size, h], matrices)?;
        // llama.cpp's Gemma 2 always reads its LM head from the embedding, whatever else the
        // file holds.
        let has_head = store.contains(WeightName::Output)
            && cfg.architecture != super::config::Architecture::Gemma2;
        let lm_head = if has_head {
            linear(WeightName::Output, cfg.vocab_size, h, None)?
        } else {
            // Tied embeddings: the LM head shares the embedding table (no copy).
            let shared = match &embed_raw {
                RawWeight::Quantized(q) => RawWeight::Quantized(q.clone()),
                RawWeight::Dense(t) => RawWeight::Dense(t.clone()),
                RawWeight::Mapped(m) => RawWeight::Mapped(m.clone()),
            };
            Linear::new(shared, None, cpu_pool.as_ref())
                .map_err(candle_err("tied output".into()))?
        };
        let embedding = match embed_raw {
            RawWeight::Quantized(q) => Embedding::Quantized(q),
            RawWeight::Dense(t) => Embedding::Dense(t),
            RawWeight::Mapped(m) => Embedding::Mapped(m),
        };

        let mut cfg = cfg;
        let rope_pairs = cfg.rope_dims / 2;
        let factors = |name: WeightName| -> Result<Option<Vec<f32>>, ModelError> {
            store
                .load(name, &[rope_pairs], vectors)?
                .map(|raw| {
                    raw.to_dense_f32(device)
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(candle_err(format!("{name:?}")))
                })
                .transpose()
        };
        if let Some(f) = factors(WeightName::RopeFreqs)? {
            cfg.rope_scaling = RopeScaling::FreqFactors(f);
        } else if let (Some(long), Some(short)) = (
            factors(WeightName::RopeFactorsLong)?,
            factors(WeightName::RopeFactorsShort)?,
        ) {
            cfg.rope_scaling = RopeScaling::LongRope { short, long };
        }
        let context_length = context_length.min(cfg.max_position_embeddings).max(1);
        cfg.resolve_rope(context_length);

        // The layer count comes from the file: grow as layers are found rather than reserve
        // for it, so a corrupt count is a missing tensor, not a huge allocation.
        let mut layers = Vec::new();
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
            let optional_norm = |lw: LayerWeight| match store.contains(w(lw)) {
                true => norm(w(lw), h).map(Some),
                false => Ok(None),
            };
            let ffn = match &cfg.moe {
                Some(moe) => FeedForward::Experts(Box::new(load_experts(
                    store,
                    i,
                    moe,
                    h,
                    matrices,
                    cpu_pool.as_ref(),
                )?)),
                None if store.contains(w(LayerWeight::Gate)) => FeedForward::Dense {
                    gate_up: GateUpProjection::Separate {
                        gate: linear(w(LayerWeight::Gate), ff, h, None)?,
                        up: linear(w(LayerWeight::Up), ff, h, None)?,
                    },
                    down: linear(w(LayerWeight::Down), h, ff, None)?,
                },
                None => FeedForward::Dense {
                    gate_up: GateUpProjection::Fused(linear(
                        w(LayerWeight::GateUp),
                        2 * ff,
                        h,
                        None,
                    )?),
                    down: linear(w(LayerWeight::Down), h, ff, None)?,
                },
            };
            layers.push(Layer {
                attn_norm: norm(w(LayerWeight::AttnNorm), h)?,
                qkv,
                q_norm,
                k_norm,
                o: linear(w(LayerWeight::O), h, nh * hd, None)?,
                post_attn_norm: optional_norm(LayerWeight::PostAttnNorm)?,
                ffn_norm: norm(w(LayerWeight::FfnNorm), h)?,
                ffn,
                post_ffn_norm: optional_norm(LayerWeight::PostFfnNorm)?,
            });
        }
        let output_norm = norm(WeightName::OutputNorm, h)?;
        let rope = Rope::new(&cfg);
        let rope_swa = Rope::for_swa_layers(&cfg);
        let mut decoder = Self {
            cfg,
            device: device.clone(),
            embedding,
            layers,
            norm: output_norm,
            lm_head,
            rope,
            rope_swa,
            context_length,
            attention,
            cpu_pool,
            cpu: None,
            kv_live: KvBytes::default(),
            // Decided below, once the CPU model is built or known not to be.
            compute: ComputePath {
                forward: ForwardPath::CpuKernels,
                tensor_types: Vec::new(),
                cpu_kernels: None,
            },
        };
        let forward = match planned {
            Some(reason) => ForwardPath::Candle(reason),
            None => match decoder.cpu_model() {
                Ok(cpu) => {
                    decoder.cpu = Some(cpu);
                    ForwardPath::CpuKernels
                }
                Err(NoCpuModel::Reason(reason)) => ForwardPath::Candle(reason),
                Err(NoCpuModel::Failed(e)) => {
                    return Err(ModelError::Load {
                        source_name: source.clone(),
                        tensor: "(CPU path)".into(),
                        message: e.to_string(),
                    });
                }
            },
        };
        let on_kernels = forward == ForwardPath::CpuKernels;
        decoder.compute = ComputePath {
            tensor_types: ComputePath::count_tensors(store, on_kernels, in_place),
            // Our CPU code (in-place matrices, the host attention) runs on the host path.
            cpu_kernels: (device.is_cpu() && attention == AttentionPath::Host)
                .then(kernels::detect),
            forward,
        };
        decoder.compute.log(&source, device);
        Ok(decoder)
    }

    /// The tensor-free CPU path's model, when the load decided on it: every matrix must be in the
    /// map for our kernels, or the reason the decoder as built cannot run there after all.
    fn cpu_model(&self) -> Result<CpuModel, NoCpuModel> {
        let pool = self
            .cpu_pool
            .clone()
            .ok_or(CandlePathReason::KernelsDisabled)?;
        let mapped = |l: &Linear, role: WeightName| match &l.weight {
            LinearWeight::Native { matrix, .. } => Ok(matrix.clone()),
            _ => Err(CandlePathReason::MatrixNotInMap {
                role: format!("{role:?}"),
            }),
        };
        let vector = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>());
        let optional_norm = |n: &Option<RmsNorm>| n.as_ref().map(|n| vector(&n.weight)).transpose();
        let projection = |l: &Linear, role: WeightName| -> Result<Projection, NoCpuModel> {
            let matrix = mapped(l, role)?;
            let bias = l.bias.as_ref().map(vector).transpose()?;
            Ok(Projection { matrix, bias })
        };
        let Embedding::Mapped(embedding) = &self.embedding else {
            return Err(CandlePathReason::MatrixNotInMap {
                role: format!("{:?}", WeightName::TokenEmbedding),
            }
            .into());
        };
        let lm_head = mapped(&self.lm_head, WeightName::Output)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let role = |w: LayerWeight| WeightName::Layer(i, w);
            let qkv = match &layer.qkv {
                QkvProjection::Separate { q, k, v } => CpuQkv::Separate {
                    q: projection(q, role(LayerWeight::Q))?,
                    k: projection(k, role(LayerWeight::K))?,
                    v: projection(v, role(LayerWeight::V))?,
                },
                QkvProjection::Fused(l) => CpuQkv::Fused(projection(l, role(LayerWeight::Qkv))?),
            };
            let expert = |x: &Expert, lw: LayerWeight| -> Result<CpuExpert, NoCpuModel> {
                Ok(CpuExpert {
                    gate: mapped(&x.gate, role(lw))?,
                    up: mapped(&x.up, role(lw))?,
                    down: mapped(&x.down, role(lw))?,
                })
            };
            let ffn = match &layer.ffn {
                FeedForward::Dense { gate_up, down } => CpuFfn::Dense {
                    gate_up: match gate_up {
                        GateUpProjection::Separate { gate, up } => CpuGateUp::Separate {
                            gate: mapped(gate, role(LayerWeight::Gate))?,
                            up: mapped(up, role(LayerWeight::Up))?,
                        },
                        GateUpProjection::Fused(l) => {
                            CpuGateUp::Fused(mapped(l, role(LayerWeight::GateUp))?)
                        }
                    },
                    down: mapped(down, role(LayerWeight::Down))?,
                },
                FeedForward::Experts(block) => {
                    let Some(moe) = &self.cfg.moe else {
                        return Err(CandlePathReason::MatrixNotInMap {
                            role: "experts without an expert configuration".into(),
                        }
                        .into());
                    };
                    CpuFfn::Experts(Box::new(CpuMoe {
                        router: mapped(&block.router, role(LayerWeight::Router))?,
                        experts: block
                            .experts
                            .iter()
                            .map(|x| expert(x, LayerWeight::ExpertGate))
                            .collect::<Result<_, _>>()?,
                        shared: match &block.shared {
                            Some((x, gate)) => {
                                Some((expert(x, LayerWeight::SharedGate)?, vector(gate)?))
                            }
                            None => None,
                        },
                        experts_used: moe.experts_used,
                        normalize_weights: moe.normalize_weights,
                    }))
                }
            };
            let o = mapped(&layer.o, role(LayerWeight::O))?;
            if layer.o.bias.is_some() {
                return Err(CandlePathReason::Bias {
                    role: format!("{:?}", role(LayerWeight::O)),
                }
                .into());
            }
            layers.push(CpuLayer {
                attn_norm: vector(&layer.attn_norm.weight)?,
                qkv,
                q_norm: optional_norm(&layer.q_norm)?,
                k_norm: optional_norm(&layer.k_norm)?,
                o,
                post_attn_norm: optional_norm(&layer.post_attn_norm)?,
                ffn_norm: vector(&layer.ffn_norm.weight)?,
                ffn,
                post_ffn_norm: optional_norm(&layer.post_ffn_norm)?,
                attention: self.attention_shape(i),
                swa_rope: self.cfg.layer_uses_swa_rope(i),
            });
        }
        Ok(CpuModel {
            pool,
            embedding: embedding.clone(),
            layers,
            norm: vector(&self.norm.weight)?,
            lm_head,
            eps: self.norm.eps,
            cfg: self.cfg.clone(),
            buffers: Default::default(),
        })
    }

    /// Which path the forward takes and why, every stored tensor type's path, and the CPU
    /// kernels' selection, as decided at load.
    pub fn compute_path(&self) -> &ComputePath {
        &self.compute
    }

    /// Where attention runs and keys and values are kept.
    pub fn attention_path(&self) -> AttentionPath {
        self.attention
    }

    /// Whether forwards run on the tensor-free CPU path.
    pub fn uses_cpu_path(&self) -> bool {
        self.cpu.is_some()
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

    /// A new cache of the first `len` positions of `cache` (a prefix-cache hit, or `n` > 1
    /// forking from one prompt): it continues from there, and the original is untouched. On the
    /// CPU path it holds the same KV blocks as `cache`, shared and reference-counted: a block is
    /// copied only when one of the two writes into it. Device caches are copied.
    pub fn copy_cache_prefix(
        &self,
        cache: &SequenceCache,
        len: usize,
    ) -> candle_core::Result<SequenceCache> {
        let len = len.min(cache.len);
        let mut out = self.new_cache();
        if len == 0 {
            return Ok(out);
        }
        match (&cache.layers, &mut out.layers) {
            (CacheLayers::Host(src), CacheLayers::Host(dst)) => {
                *dst = src.iter().map(|l| l.share_prefix(len)).collect();
                // Exactly the prefix: what it grows to is for its new owner's limit to say.
                out.capacity = len;
            }
            (CacheLayers::Device(src), CacheLayers::Device(_)) => {
                self.grow_to(&mut out, len)?;
                let CacheLayers::Device(dst) = &out.layers else {
                    unreachable!("grow_to keeps the path")
                };
                for (s, d) in src.iter().zip(dst.iter()) {
                    d.k.slice_set(&s.k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    d.v.slice_set(&s.v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
            }
            _ => candle_core::bail!("a cache of another attention path"),
        }
        out.len = len;
        Ok(out)
    }

    /// Keeps only the first `len` positions of a cache kept for reuse, and gives back the memory
    /// past them.
    pub fn shrink_cache(&self, cache: &mut SequenceCache, len: usize) -> candle_core::Result<()> {
        let len = len.min(cache.len);
        match &mut cache.layers {
            CacheLayers::Host(layers) => {
                for l in layers.iter_mut() {
                    l.truncate(len);
                }
                cache.len = len;
                cache.capacity = len;
            }
            CacheLayers::Device(_) => *cache = self.copy_cache_prefix(cache, len)?,
        }
        Ok(())
    }

    /// Bytes of KV one position of one sequence takes (keys and values of every layer: f16 in
    /// the CPU path's caches, f32 in the tensor path's).
    pub fn kv_bytes_per_position(&self) -> usize {
        let element = match self.attention {
            AttentionPath::Host => std::mem::size_of::<half::f16>(),
            AttentionPath::Device => std::mem::size_of::<f32>(),
        };
        2 * self.cfg.num_layers * self.cfg.num_kv_heads * self.cfg.head_dim * element
    }

    /// Bytes of KV held by this decoder's CPU-path caches, each shared block once (0 on the
    /// device path, whose caches are tensors).
    pub fn kv_bytes_alive(&self) -> usize {
        self.kv_live.get()
    }

    /// An empty cache for a new sequence (allocates nothing until the first forward).
    pub fn new_cache(&self) -> SequenceCache {
        let layers = match self.attention {
            AttentionPath::Host => CacheLayers::Host(Vec::new()),
            AttentionPath::Device => CacheLayers::Device(Vec::new()),
        };
        SequenceCache {
            layers,
            len: 0,
            capacity: 0,
            limit: usize::MAX,
        }
    }

    /// Layer `layer`'s attention: its window, and the score scale and soft cap.
    fn attention_shape(&self, layer: usize) -> AttentionShape {
        AttentionShape {
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            sliding_window: self.cfg.layer_window(layer),
            // Queries already carry the model's own scale (see `layer_forward`).
            score_scale: self.cfg.attention_scale.map(|_| 1.0),
            softcap: self.cfg.attn_logit_softcap,
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
            .min(cache.limit)
            .max(needed);
        self.grow_to(cache, new_capacity)
    }

    /// Reallocates `cache` to hold `new_capacity` positions, keeping what it holds.
    fn grow_to(&self, cache: &mut SequenceCache, new_capacity: usize) -> candle_core::Result<()> {
        match &mut cache.layers {
            CacheLayers::Host(layers) => {
                let stride = self.cfg.num_kv_heads * self.cfg.head_dim;
                layers.resize_with(self.cfg.num_layers, || HostKv::counted_in(&self.kv_live));
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
    pub fn forward(&self, items: &mut [ForwardItem<'_>]) -> Result<Vec<Vec<f32>>, ModelError> {
        let ones = vec![1; items.len()];
        self.forward_with_logits(items, &ones)
    }

    /// Like [`forward`](Self::forward), with the logits after each of item `i`'s last
    /// `logit_rows[i]` tokens (in order; a speculative draft's verification).
    pub fn forward_with_logits(
        &self,
        items: &mut [ForwardItem<'_>],
        logit_rows: &[usize],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut spans = Vec::with_capacity(items.len());
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for (i, item) in items.iter().enumerate() {
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
                logit_rows: logit_rows
                    .get(i)
                    .copied()
                    .unwrap_or(1)
                    .clamp(1, item.tokens.len()),
            });
            ids.extend_from_slice(item.tokens);
            positions.extend(first_position..first_position + item.tokens.len());
        }
        let result = match &self.cpu {
            Some(cpu) => self.forward_cpu(cpu, items, &spans, &ids, &positions),
            None => self
                .forward_rows(items, &spans, ids, &positions)
                .and_then(|logits| logits.to_vec2::<f32>()),
        };
        result.map_err(|e| ModelError::Forward(e.to_string()))
    }

    fn forward_cpu(
        &self,
        cpu: &CpuModel,
        items: &mut [ForwardItem<'_>],
        spans: &[Span],
        ids: &[u32],
        positions: &[usize],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        for (item, span) in items.iter_mut().zip(spans) {
            self.ensure_capacity(item.cache, span.first_position + span.rows)?;
        }
        let mut cpu_spans = Vec::with_capacity(spans.len());
        for (item, span) in items.iter_mut().zip(spans) {
            let CacheLayers::Host(layers) = &mut item.cache.layers else {
                candle_core::bail!("a device cache was given to a CPU decoder");
            };
            cpu_spans.push(CpuSpan {
                cache: layers.as_mut_slice(),
                first_position: span.first_position,
                start_row: span.start_row,
                rows: span.rows,
                logit_rows: span.logit_rows,
            });
        }
        let logits = cpu
            .forward(
                ids,
                positions,
                &self.rope,
                self.rope_swa.as_ref(),
                &mut cpu_spans,
            )
            .map_err(candle_core::Error::wrap)?;
        drop(cpu_spans);
        for (item, span) in items.iter_mut().zip(spans) {
            item.cache.len = span.first_position + span.rows;
        }
        Ok(logits)
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
        let mut x = self.embedding.forward(&ids, &self.device)?;
        if let Some(scale) = self.cfg.embedding_scale {
            x = (x * f64::from(scale))?;
        }
        let tables = self.rope.tensors(positions, &self.device)?;
        let swa_tables = match &self.rope_swa {
            Some(rope) => Some(rope.tensors(positions, &self.device)?),
            None => None,
        };
        // One set of masks per distinct window among the layers (a global and a sliding one).
        let mut mask_sets: Vec<(Option<usize>, Vec<Option<Tensor>>)> = Vec::new();
        if self.attention == AttentionPath::Device {
            for l in 0..self.layers.len() {
                let window = self.cfg.layer_window(l);
                if mask_sets.iter().all(|(w, _)| *w != window) {
                    let masks = spans
                        .iter()
                        .map(|s| self.attention_mask(s, window))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    mask_sets.push((window, masks));
                }
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let window = self.cfg.layer_window(l);
            let masks = mask_sets
                .iter()
                .find(|(w, _)| *w == window)
                .map_or(&[][..], |(_, m)| m.as_slice());
            let (cos, sin) = match &swa_tables {
                Some(t) if self.cfg.layer_uses_swa_rope(l) => (&t.0, &t.1),
                _ => (&tables.0, &tables.1),
            };
            x = self.layer_forward(layer, l, &x, cos, sin, items, spans, masks)?;
        }
        for (item, span) in items.iter_mut().zip(spans) {
            item.cache.len = span.first_position + span.rows;
        }
        let last_rows: Vec<u32> = spans
            .iter()
            .flat_map(|s| s.start_row + s.rows - s.logit_rows..s.start_row + s.rows)
            .map(|r| r as u32)
            .collect();
        let n = last_rows.len();
        let last_rows = Tensor::from_vec(last_rows, n, &self.device)?;
        let h = self.norm.forward(&x.index_select(&last_rows, 0)?)?;
        let logits = self.lm_head.forward(&h)?.to_dtype(DType::F32)?;
        match self.cfg.final_logit_softcap {
            // As ggml: scale by 1/cap, tanh, scale by cap.
            Some(cap) => (logits * f64::from(1.0 / cap))?.tanh()? * f64::from(cap),
            None => Ok(logits),
        }
    }

    /// The first key position a span's rows may attend to in a layer with `window`.
    fn first_key(span: &Span, window: Option<usize>) -> usize {
        match window {
            Some(w) => (span.first_position + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Additive mask `(rows * group, keys)` for a multi-row span in a layer with `window`;
    /// single rows need none (the key range already ends at the row's own position).
    fn attention_mask(
        &self,
        span: &Span,
        window: Option<usize>,
    ) -> candle_core::Result<Option<Tensor>> {
        if span.rows == 1 {
            return Ok(None);
        }
        let group = self.cfg.num_heads / self.cfg.num_kv_heads;
        let first_key = Self::first_key(span, window);
        let n_keys = span.first_position + span.rows - first_key;
        let mut mask = Vec::with_capacity(span.rows * group * n_keys);
        for t in 0..span.rows {
            let pos = span.first_position + t;
            for _ in 0..group {
                for c in 0..n_keys {
                    let key_pos = first_key + c;
                    let visible = key_pos <= pos && window.is_none_or(|w| pos - key_pos < w);
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
        let q = self.rope.apply_tensor(&q, cos, sin)?;
        let k = self.rope.apply_tensor(&k, cos, sin)?;
        // Gemma scales the queries themselves (llama.cpp: before attention, whose own scale is 1).
        let q = match cfg.attention_scale {
            Some(scale) => (q * f64::from(scale))?,
            None => q,
        };

        let attn = if self.attention == AttentionPath::Host {
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
                    cfg.layer_window(layer_index),
                )?);
            }
            if outputs.len() == 1 {
                outputs.swap_remove(0)
            } else {
                Tensor::cat(&outputs, 0)?
            }
        };
        let mut attn = layer.o.forward(&attn)?;
        if let Some(n) = &layer.post_attn_norm {
            attn = n.forward(&attn)?;
        }
        let x = (x + attn)?;

        let h = layer.ffn_norm.forward(&x)?;
        let mut ffn = match &layer.ffn {
            FeedForward::Dense { gate_up, down } => {
                let (gate, up) = match gate_up {
                    GateUpProjection::Separate { gate, up } => (gate.forward(&h)?, up.forward(&h)?),
                    GateUpProjection::Fused(gu) => {
                        let y = gu.forward(&h)?;
                        let ff = cfg.intermediate_size;
                        (y.narrow(1, 0, ff)?, y.narrow(1, ff, ff)?)
                    }
                };
                let act = match cfg.ffn_activation {
                    FfnActivation::Silu => (candle_nn::ops::silu(&gate)? * up)?,
                    FfnActivation::GeluTanh => (gate.gelu()? * up)?,
                };
                down.forward(&act)?
            }
            FeedForward::Experts(block) => self.experts_forward(block, &h)?,
        };
        if let Some(n) = &layer.post_ffn_norm {
            ffn = n.forward(&ffn)?;
        }
        x + ffn
    }

    /// The experts' output for `h` (`rows × hidden`): each expert runs once on the rows routed
    /// to it, its outputs weighted and added into their rows; then the shared expert, gated.
    fn experts_forward(&self, block: &MoeBlock, h: &Tensor) -> candle_core::Result<Tensor> {
        let Some(moe) = &self.cfg.moe else {
            candle_core::bail!("an expert layer in a model without experts");
        };
        let rows = h.dim(0)?;
        let logits = block
            .router
            .forward(h)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let routes = Routes::new(
            &logits,
            moe.experts,
            moe.experts_used,
            moe.normalize_weights,
        );
        let mut out = Tensor::zeros((rows, self.cfg.hidden_size), DType::F32, h.device())?;
        for (e, routed) in routes.active() {
            let ids: Vec<u32> = routed.iter().map(|&(r, _)| r as u32).collect();
            let weights: Vec<f32> = routed.iter().map(|&(_, w)| w).collect();
            let ids = Tensor::new(ids.as_slice(), h.device())?;
            let weights = Tensor::from_vec(weights, (routed.len(), 1), h.device())?;
            let y = block.experts[e]
                .forward(&h.index_select(&ids, 0)?)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&weights)?;
            out = out.index_add(&ids, &y, 0)?;
        }
        if let Some((shared, gate)) = &block.shared {
            let g = candle_nn::ops::sigmoid(&h.to_dtype(DType::F32)?.matmul(gate)?)?;
            let y = shared.forward(h)?.to_dtype(DType::F32)?.broadcast_mul(&g)?;
            out = (out + y)?;
        }
        Ok(out)
    }

    /// CPU attention: every span's keys and values go into its f16 cache, then all spans' rows
    /// attend at once on the compute pool.
    fn attend_host(
        &self,
        layer_index: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        items: &mut [ForwardItem<'_>],
        spans: &[Span],
    ) -> candle_core::Result<Tensor> {
        let shape = self.attention_shape(layer_index);
        let q_width = shape.heads * shape.head_dim;
        let kv_width = shape.kv_heads * shape.head_dim;
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let k = k.flatten_all()?.to_vec1::<f32>()?;
        let v = v.flatten_all()?.to_vec1::<f32>()?;
        let rows = q.len() / q_width;
        let mut caches = Vec::with_capacity(spans.len());
        for (item, span) in items.iter_mut().zip(spans) {
            let CacheLayers::Host(layers) = &mut item.cache.layers else {
                candle_core::bail!("a device cache was given to a CPU decoder");
            };
            let kv = &mut layers[layer_index];
            let (a, b) = (span.start_row, span.start_row + span.rows);
            kv.write(
                span.first_position,
                &k[a * kv_width..b * kv_width],
                &v[a * kv_width..b * kv_width],
            );
            caches.push(&*kv);
        }
        let jobs: Vec<SpanAttention<'_>> = caches
            .into_iter()
            .zip(spans)
            .map(|(cache, span)| SpanAttention {
                cache,
                q: &q[span.start_row * q_width..(span.start_row + span.rows) * q_width],
                first_position: span.first_position,
                rows: span.rows,
            })
            .collect();
        let mut out = vec![0f32; q.len()];
        attention::attend_spans(&shape, &jobs, &mut out, self.cpu_pool.as_deref());
        Tensor::from_vec(out, (rows, q_width), &self.device)
    }

    /// Attention of one span's rows against its cache (after appending the span's keys/values).
    /// `q`: `(rows, heads, hd)`, `k`/`v`: `(rows, kv_heads, hd)` → `(rows, heads * hd)`.
    /// `window`: the layer's sliding window.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cache: &LayerCache,
        span: &Span,
        mask: Option<&Tensor>,
        window: Option<usize>,
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
        let first_key = Self::first_key(span, window);
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
        let shape = self.attention_shape(0);
        let mut scores = (q.matmul(&keys.t()?)? * f64::from(shape.scale()))?;
        if let Some(cap) = shape.softcap {
            scores = (scores.tanh()? * f64::from(cap))?;
        }
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
