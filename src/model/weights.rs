//! Reading named weights from a GGUF file or a safetensors checkpoint onto a Candle device.
//!
//! The decoder asks for weights by their role ([`WeightName`]); this module maps a role to the
//! tensor name each format uses (llama.cpp's `blk.N.attn_q.weight`, Hugging Face's
//! `model.layers.N.self_attn.q_proj.weight`), checks the shape, and returns either a quantized
//! tensor (kept in its ggml block format) or a dense one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use super::ModelError;
use super::gguf::{GgufFile, candle_dtype};
use crate::kernels::{self, QMatrix, WeightType};

/// The role of a weight in the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightName {
    TokenEmbedding,
    OutputNorm,
    Output,
    /// Per-frequency rope divisors (GGUF only).
    RopeFreqs,
    /// LongRoPE's divisors beyond the original context, and within it (GGUF only).
    RopeFactorsLong,
    RopeFactorsShort,
    Layer(usize, LayerWeight),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerWeight {
    AttnNorm,
    Q,
    K,
    V,
    Qkv,
    O,
    QBias,
    KBias,
    VBias,
    QkvBias,
    QNorm,
    KNorm,
    FfnNorm,
    /// Gemma's norm of the attention output, before the residual add.
    PostAttnNorm,
    /// Gemma's norm of the feed-forward output, before the residual add.
    PostFfnNorm,
    Gate,
    Up,
    GateUp,
    Down,
    /// The experts' router, `(experts, hidden)`.
    Router,
    /// Every expert's gate, up and down projections, stacked (`(experts, rows, cols)` in GGUF,
    /// one tensor per expert in safetensors; see [`WeightStore::require_experts`]).
    ExpertGate,
    ExpertUp,
    ExpertDown,
    /// The shared expert's gate vector (`sigmoid(x · w)` scales its output) and projections.
    SharedExpertGateInp,
    SharedGate,
    SharedUp,
    SharedDown,
}

impl WeightName {
    /// The tensor's name in llama.cpp's GGUF files (`blk.N.…` in a layer) and, when the
    /// checkpoint has it as one tensor, in Hugging Face's (`model.layers.N.…`): each role's
    /// two names on one line.
    fn names(self) -> (String, Option<String>) {
        let (gguf, hf) = match self {
            Self::TokenEmbedding => ("token_embd.weight", Some("model.embed_tokens.weight")),
            Self::OutputNorm => ("output_norm.weight", Some("model.norm.weight")),
            Self::Output => ("output.weight", Some("lm_head.weight")),
            Self::RopeFreqs => ("rope_freqs.weight", None),
            Self::RopeFactorsLong => ("rope_factors_long.weight", None),
            Self::RopeFactorsShort => ("rope_factors_short.weight", None),
            Self::Layer(i, w) => {
                let (gguf, hf) = w.name_suffixes();
                return (
                    format!("blk.{i}.{gguf}"),
                    hf.map(|hf| format!("model.layers.{i}.{hf}")),
                );
            }
        };
        (gguf.to_owned(), hf.map(str::to_owned))
    }

    fn gguf_name(self) -> String {
        self.names().0
    }

    /// The Hugging Face names, the first found wins (Mixtral names its blocks apart from Qwen's
    /// MoE). Experts are one tensor each: see [`Self::hf_expert_names`]. `gemma_norms`: the
    /// layer has Gemma's four norms (see [`Self::hf_gemma_norm`]).
    fn hf_names(self, gemma_norms: bool) -> Vec<String> {
        use LayerWeight as L;
        match self {
            Self::Layer(i, L::Router) => vec![
                format!("model.layers.{i}.mlp.gate.weight"),
                format!("model.layers.{i}.block_sparse_moe.gate.weight"),
            ],
            Self::Layer(i, w @ (L::FfnNorm | L::PostAttnNorm | L::PostFfnNorm)) if gemma_norms => {
                vec![Self::hf_gemma_norm(i, w)]
            }
            _ => self.hf_name().into_iter().collect(),
        }
    }

    /// Gemma's layer norms. Its `post_attention_layernorm` normalizes the attention output
    /// (llama's same-named norm is the FFN's input norm); the FFN's input norm is
    /// `pre_feedforward_layernorm`. A layer holding that name has Gemma's layout.
    fn hf_gemma_norm(layer: usize, which: LayerWeight) -> String {
        let suffix = match which {
            LayerWeight::PostAttnNorm => "post_attention_layernorm",
            LayerWeight::PostFfnNorm => "post_feedforward_layernorm",
            _ => "pre_feedforward_layernorm",
        };
        format!("model.layers.{layer}.{suffix}.weight")
    }

    /// Expert `e`'s tensor names for a stacked expert role.
    fn hf_expert_names(layer: usize, which: LayerWeight, e: usize) -> Vec<String> {
        let (qwen, mixtral) = match which {
            LayerWeight::ExpertGate => ("gate_proj", "w1"),
            LayerWeight::ExpertUp => ("up_proj", "w3"),
            _ => ("down_proj", "w2"),
        };
        vec![
            format!("model.layers.{layer}.mlp.experts.{e}.{qwen}.weight"),
            format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{mixtral}.weight"),
        ]
    }

    fn hf_name(self) -> Option<String> {
        self.names().1
    }
}

impl LayerWeight {
    /// The role's name within a layer, in GGUF and in Hugging Face's checkpoints.
    fn name_suffixes(self) -> (&'static str, Option<&'static str>) {
        use LayerWeight as L;
        match self {
            L::AttnNorm => ("attn_norm.weight", Some("input_layernorm.weight")),
            L::Q => ("attn_q.weight", Some("self_attn.q_proj.weight")),
            L::K => ("attn_k.weight", Some("self_attn.k_proj.weight")),
            L::V => ("attn_v.weight", Some("self_attn.v_proj.weight")),
            L::Qkv => ("attn_qkv.weight", Some("self_attn.qkv_proj.weight")),
            L::O => ("attn_output.weight", Some("self_attn.o_proj.weight")),
            L::QBias => ("attn_q.bias", Some("self_attn.q_proj.bias")),
            L::KBias => ("attn_k.bias", Some("self_attn.k_proj.bias")),
            L::VBias => ("attn_v.bias", Some("self_attn.v_proj.bias")),
            L::QkvBias => ("attn_qkv.bias", Some("self_attn.qkv_proj.bias")),
            L::QNorm => ("attn_q_norm.weight", Some("self_attn.q_norm.weight")),
            L::KNorm => ("attn_k_norm.weight", Some("self_attn.k_norm.weight")),
            L::FfnNorm => ("ffn_norm.weight", Some("post_attention_layernorm.weight")),
            L::Gate => ("ffn_gate.weight", Some("mlp.gate_proj.weight")),
            // llama.cpp stores Phi-3's fused gate+up projection as ffn_up.
            L::Up => ("ffn_up.weight", Some("mlp.up_proj.weight")),
            L::GateUp => ("ffn_up.weight", Some("mlp.gate_up_proj.weight")),
            L::Down => ("ffn_down.weight", Some("mlp.down_proj.weight")),
            L::Router => ("ffn_gate_inp.weight", Some("mlp.gate.weight")),
            // `(1, hidden)` in the checkpoint.
            L::SharedExpertGateInp => (
                "ffn_gate_inp_shexp.weight",
                Some("mlp.shared_expert_gate.weight"),
            ),
            L::SharedGate => (
                "ffn_gate_shexp.weight",
                Some("mlp.shared_expert.gate_proj.weight"),
            ),
            L::SharedUp => (
                "ffn_up_shexp.weight",
                Some("mlp.shared_expert.up_proj.weight"),
            ),
            L::SharedDown => (
                "ffn_down_shexp.weight",
                Some("mlp.shared_expert.down_proj.weight"),
            ),
            // No such Hugging Face tensor: Gemma's norms are named by the layer's layout
            // (`hf_gemma_norm`; a llama layer has none), experts are one tensor each
            // (`hf_expert_names`).
            L::PostAttnNorm => ("post_attention_norm.weight", None),
            L::PostFfnNorm => ("post_ffw_norm.weight", None),
            L::ExpertGate => ("ffn_gate_exps.weight", None),
            L::ExpertUp => ("ffn_up_exps.weight", None),
            L::ExpertDown => ("ffn_down_exps.weight", None),
        }
    }
}

/// A weight as loaded: quantized blocks, a dense tensor, or a matrix left in place in the GGUF
/// memory map for our CPU kernels.
pub enum RawWeight {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
    Mapped(MappedMatrix),
}

/// A GGUF matrix used in place from the file's memory map: nothing is copied, the pages are
/// read by the kernels as the forward needs them. It holds the map alone, not the parsed
/// [`GgufFile`], whose metadata (the tokenizer's lists among it) is freed after loading.
#[derive(Clone)]
pub struct MappedMatrix {
    map: Arc<Mmap>,
    offset: usize,
    len: usize,
    ty: WeightType,
    rows: usize,
    cols: usize,
}

impl MappedMatrix {
    pub fn matrix(&self) -> QMatrix<'_> {
        QMatrix {
            ty: self.ty,
            rows: self.rows,
            cols: self.cols,
            data: &self.map[self.offset..self.offset + self.len],
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl RawWeight {
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Quantized(q) => q.shape().dims().to_vec(),
            Self::Dense(t) => t.dims().to_vec(),
            Self::Mapped(m) => vec![m.rows, m.cols],
        }
    }

    /// A dense f32 copy (for norms, biases and other small vectors).
    pub fn to_dense_f32(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Quantized(q) => q.dequantize(device),
            Self::Dense(t) => t.to_dtype(DType::F32),
            Self::Mapped(m) => Tensor::from_vec(dequantize(&m.matrix())?, (m.rows, m.cols), device),
        }
    }
}

/// Every row of `w`, dequantized by the kernels' `dequantize_row`.
fn dequantize(w: &QMatrix) -> candle_core::Result<Vec<f32>> {
    let mut out = vec![0f32; w.rows * w.cols];
    for (r, row) in out.chunks_mut(w.cols).enumerate() {
        kernels::dequantize_row(w, r, row).map_err(candle_core::Error::wrap)?;
    }
    Ok(out)
}

/// A GGUF tensor's bytes as a weight: quantized blocks stay quantized, float types become dense
/// tensors of `dense_dtype`, and so do the quantized types Candle has no kernels for (IQ4_NL,
/// IQ4_XS: dequantized here, exactly in f32).
fn gguf_raw(
    ty: WeightType,
    bytes: &[u8],
    shape: &[usize],
    device: &Device,
    dense_dtype: DenseDType,
) -> candle_core::Result<RawWeight> {
    let Some(dtype) = candle_dtype(ty) else {
        let cols = shape.last().copied().unwrap_or(1);
        let rows = shape.iter().product::<usize>() / cols.max(1);
        let w = QMatrix::new(ty, rows, cols, bytes).map_err(candle_core::Error::wrap)?;
        let t = Tensor::from_vec(dequantize(&w)?, shape, device)?
            .to_dtype(dense_dtype.for_stored(DType::F32))?;
        return Ok(RawWeight::Dense(t));
    };
    let q = qtensor_from_ggml(dtype, bytes, shape.to_vec(), device)?;
    if ty.block_size() > 1 {
        return Ok(RawWeight::Quantized(Arc::new(q)));
    }
    let stored = match ty {
        WeightType::F16 => DType::F16,
        WeightType::BF16 => DType::BF16,
        _ => DType::F32,
    };
    let t = q
        .dequantize(device)?
        .to_dtype(dense_dtype.for_stored(stored))?
        .reshape(shape)?;
    Ok(RawWeight::Dense(t))
}

/// The dtype dense (unquantized) matrices are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseDType {
    /// Converted to this type whatever was stored (the CPU computes in f32).
    Exactly(DType),
    /// Half precision, as llama.cpp and vLLM run on GPUs: F32 becomes F16, F16 and BF16 stay as
    /// stored (a BF16 checkpoint may hold values outside F16's range).
    Half,
}

impl DenseDType {
    /// The dtype a tensor stored as `stored` is kept in.
    pub fn for_stored(self, stored: DType) -> DType {
        match self {
            Self::Exactly(d) => d,
            Self::Half => match stored {
                DType::BF16 => DType::BF16,
                _ => DType::F16,
            },
        }
    }
}

/// How weights are loaded: onto `device`, dense matrices kept as `dense` says, and with
/// `in_place` a GGUF matrix left in the memory map for the CPU kernels
/// ([`RawWeight::Mapped`]: nothing copied, whatever its type).
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub device: &'a Device,
    pub dense: DenseDType,
    pub in_place: bool,
}

impl<'a> Placement<'a> {
    /// As f32 tensors on `device`: norms, biases and the other vectors.
    pub fn f32(device: &'a Device) -> Self {
        Self {
            device,
            dense: DenseDType::Exactly(DType::F32),
            in_place: false,
        }
    }
}

/// Where the weights come from.
pub enum WeightStore {
    Gguf(Arc<GgufFile>),
    Safetensors {
        tensors: candle_core::safetensors::MmapedSafetensors,
        dir: PathBuf,
    },
}

impl WeightStore {
    pub fn open_safetensors(dir: &Path, files: &[PathBuf]) -> Result<Self, ModelError> {
        // SAFETY: the files are read-only model weights that are not modified while loaded.
        let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
            .map_err(|e| ModelError::Safetensors {
                path: dir.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(Self::Safetensors {
            tensors,
            dir: dir.to_path_buf(),
        })
    }

    pub fn source_name(&self) -> String {
        match self {
            Self::Gguf(f) => f.path().display().to_string(),
            Self::Safetensors { dir, .. } => dir.display().to_string(),
        }
    }

    fn file_name(&self, name: WeightName) -> Option<String> {
        match self {
            Self::Gguf(_) => Some(name.gguf_name()),
            Self::Safetensors { tensors, .. } => {
                let gemma_norms = match name {
                    WeightName::Layer(i, _) => tensors
                        .get(&WeightName::hf_gemma_norm(i, LayerWeight::FfnNorm))
                        .is_ok(),
                    _ => false,
                };
                let names = name.hf_names(gemma_norms);
                names
                    .iter()
                    .find(|n| tensors.get(n).is_ok())
                    .or(names.first())
                    .cloned()
            }
        }
    }

    pub fn is_gguf(&self) -> bool {
        matches!(self, Self::Gguf(_))
    }

    pub fn contains(&self, name: WeightName) -> bool {
        let Some(file_name) = self.file_name(name) else {
            return false;
        };
        match self {
            Self::Gguf(f) => f.tensor_info(&file_name).is_some(),
            Self::Safetensors { tensors, .. } => tensors.get(&file_name).is_ok(),
        }
    }

    /// Loads a weight if present, checking its shape, as `at` says.
    pub fn load(
        &self,
        name: WeightName,
        expected_shape: &[usize],
        at: Placement<'_>,
    ) -> Result<Option<RawWeight>, ModelError> {
        if at.in_place
            && let Some(mapped) = self.mapped(name, expected_shape)?
        {
            return Ok(Some(mapped));
        }
        let Some(file_name) = self.file_name(name) else {
            return Ok(None);
        };
        self.load_named(file_name, expected_shape, at)
    }

    fn load_named(
        &self,
        file_name: String,
        expected_shape: &[usize],
        at: Placement<'_>,
    ) -> Result<Option<RawWeight>, ModelError> {
        let (device, dense_dtype) = (at.device, at.dense);
        let source = self.source_name();
        let shape_error = |got: Vec<usize>| ModelError::ShapeMismatch {
            source_name: source.clone(),
            tensor: file_name.clone(),
            expected: expected_shape.to_vec(),
            got,
        };
        let runtime = |e: candle_core::Error| ModelError::Load {
            source_name: source.clone(),
            tensor: file_name.clone(),
            message: e.to_string(),
        };
        match self {
            Self::Gguf(file) => {
                let Some(info) = file.tensor_info(&file_name) else {
                    return Ok(None);
                };
                let shape = info.shape();
                if shape != expected_shape {
                    return Err(shape_error(shape));
                }
                gguf_raw(
                    info.ty,
                    file.tensor_bytes(info),
                    &shape,
                    device,
                    dense_dtype,
                )
                .map(Some)
                .map_err(runtime)
            }
            Self::Safetensors { tensors, .. } => {
                let view = match tensors.get(&file_name) {
                    Ok(v) => v,
                    Err(_) => return Ok(None),
                };
                let shape = view.shape().to_vec();
                if shape != expected_shape {
                    return Err(shape_error(shape));
                }
                let dtype = view.dtype();
                if !matches!(
                    dtype,
                    safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
                ) {
                    return Err(ModelError::UnsupportedDtype {
                        source_name: source,
                        tensor: file_name,
                        dtype: format!("{dtype:?}"),
                    });
                }
                let t = tensors
                    .load(&file_name, device)
                    .and_then(|t| t.to_dtype(dense_dtype.for_stored(t.dtype())))
                    .and_then(|t| t.reshape(expected_shape))
                    .map_err(runtime)?;
                Ok(Some(RawWeight::Dense(t)))
            }
        }
    }

    /// A GGUF matrix left in the memory map for the CPU kernels; `None` when the store has no
    /// such matrix (safetensors, a vector, a missing tensor).
    fn mapped(
        &self,
        name: WeightName,
        expected_shape: &[usize],
    ) -> Result<Option<RawWeight>, ModelError> {
        let (Self::Gguf(file), [rows, cols]) = (self, expected_shape) else {
            return Ok(None);
        };
        let Some(info) = file.tensor_info(&name.gguf_name()) else {
            return Ok(None);
        };
        let shape = info.shape();
        if shape != expected_shape {
            return Err(ModelError::ShapeMismatch {
                source_name: self.source_name(),
                tensor: info.name.clone(),
                expected: expected_shape.to_vec(),
                got: shape,
            });
        }
        Ok(Some(RawWeight::Mapped(MappedMatrix {
            map: file.map().clone(),
            offset: info.offset,
            len: info.n_bytes,
            ty: info.ty,
            rows: *rows,
            cols: *cols,
        })))
    }

    /// Every expert's matrix of a stacked expert role (`rows × cols` each), as `at` says. A
    /// GGUF stores them as one `(experts, rows, cols)` tensor whose experts are consecutive byte
    /// ranges; a safetensors checkpoint as one tensor per expert.
    pub fn require_experts(
        &self,
        layer: usize,
        which: LayerWeight,
        experts: usize,
        rows: usize,
        cols: usize,
        at: Placement<'_>,
    ) -> Result<Vec<RawWeight>, ModelError> {
        let name = WeightName::Layer(layer, which);
        let source = self.source_name();
        match self {
            Self::Gguf(file) => {
                let file_name = name.gguf_name();
                let info = file
                    .tensor_info(&file_name)
                    .ok_or_else(|| self.missing(name))?;
                let shape = info.shape();
                if shape != [experts, rows, cols] {
                    return Err(ModelError::ShapeMismatch {
                        source_name: source,
                        tensor: file_name,
                        expected: vec![experts, rows, cols],
                        got: shape,
                    });
                }
                // The shape matched, so the byte count splits evenly by expert.
                let per_expert = info.n_bytes / experts;
                let bytes = file.tensor_bytes(info);
                let mut out = Vec::new();
                for e in 0..experts {
                    let raw = match Some(info.ty).filter(|_| at.in_place) {
                        Some(ty) => RawWeight::Mapped(MappedMatrix {
                            map: file.map().clone(),
                            offset: info.offset + e * per_expert,
                            len: per_expert,
                            ty,
                            rows,
                            cols,
                        }),
                        None => gguf_raw(
                            info.ty,
                            &bytes[e * per_expert..(e + 1) * per_expert],
                            &[rows, cols],
                            at.device,
                            at.dense,
                        )
                        .map_err(|err| ModelError::Load {
                            source_name: source.clone(),
                            tensor: format!("{file_name} (expert {e})"),
                            message: err.to_string(),
                        })?,
                    };
                    out.push(raw);
                }
                Ok(out)
            }
            Self::Safetensors { tensors, .. } => {
                let mut out = Vec::new();
                for e in 0..experts {
                    let names = WeightName::hf_expert_names(layer, which, e);
                    let file_name = names
                        .iter()
                        .find(|n| tensors.get(n).is_ok())
                        .ok_or_else(|| ModelError::MissingTensor {
                            source_name: source.clone(),
                            tensor: names[0].clone(),
                        })?
                        .clone();
                    let raw = self
                        .load_named(file_name.clone(), &[rows, cols], at)?
                        .ok_or_else(|| ModelError::MissingTensor {
                            source_name: source.clone(),
                            tensor: file_name,
                        })?;
                    out.push(raw);
                }
                Ok(out)
            }
        }
    }

    /// Like [`Self::load`], but the weight must exist.
    pub fn require(
        &self,
        name: WeightName,
        expected_shape: &[usize],
        at: Placement<'_>,
    ) -> Result<RawWeight, ModelError> {
        self.load(name, expected_shape, at)?
            .ok_or_else(|| self.missing(name))
    }

    fn missing(&self, name: WeightName) -> ModelError {
        ModelError::MissingTensor {
            source_name: self.source_name(),
            tensor: self.file_name(name).unwrap_or_else(|| format!("{name:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_keeps_bf16_and_halves_f32() {
        assert_eq!(DenseDType::Half.for_stored(DType::F32), DType::F16);
        assert_eq!(DenseDType::Half.for_stored(DType::F16), DType::F16);
        assert_eq!(DenseDType::Half.for_stored(DType::BF16), DType::BF16);
        for stored in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(
                DenseDType::Exactly(DType::F32).for_stored(stored),
                DType::F32
            );
        }
    }
}
