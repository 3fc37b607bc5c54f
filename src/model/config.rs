//! The decoder's hyper-parameters and architecture flags, read from GGUF metadata or a Hugging
//! Face `config.json`.
//!
//! One configuration covers the llama family and its relatives: what differs between Llama,
//! Mistral, SmolLM, Qwen2/2.5, Qwen3, Phi-3 and Gemma 2/3 is a handful of flags (rope layout and
//! scaling, biases, q/k norm, fused projections, tied embeddings, sliding window and the layers
//! it applies to, Gemma's embedding scale, query scale, soft caps and GeGLU). The
//! mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) are the same decoder with
//! [`MoeConfig`] in place of the dense feed-forward block. A GGUF's keys are
//! read per family as llama.cpp reads them: a key llama.cpp ignores for a family (Phi-3's
//! `attention.sliding_window`) is ignored here too. Structural flags that
//! the weights themselves reveal (biases, q/k norm, fused projections, a separate LM head) are
//! detected from the tensors present when loading, not trusted from metadata.

use serde::Deserialize;

use super::gguf::{GgufError, GgufFile, GgufValue};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2 / 3.x, TinyLlama, SmolLM, Mistral (GGUF writes Mistral as `llama`).
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    /// Gemma 2: scaled embedding, post-attention and post-FFN norms, GeGLU, soft-capping,
    /// sliding-window attention on every other layer.
    Gemma2,
    /// Gemma 3 (text): Gemma 2's block with q/k norms, sliding window on 5 of every 6 layers,
    /// their own rope base, no attention soft-capping.
    Gemma3,
    /// Mixtral from a Hugging Face checkpoint (a GGUF writes it as `llama` with experts).
    Mixtral,
    /// Qwen2's attention (biases) with experts and a gated shared expert.
    Qwen2Moe,
    /// Qwen3's attention (q/k norms) with experts.
    Qwen3Moe,
}

impl Architecture {
    /// The GGUF `general.architecture` or Hugging Face `model_type` name.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "phi3" => Self::Phi3,
            "gemma2" => Self::Gemma2,
            "gemma3" => Self::Gemma3,
            "mixtral" => Self::Mixtral,
            "qwen2moe" | "qwen2_moe" => Self::Qwen2Moe,
            "qwen3moe" | "qwen3_moe" => Self::Qwen3Moe,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Phi3 => "phi3",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3",
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2moe",
            Self::Qwen3Moe => "qwen3moe",
        }
    }

    pub const SUPPORTED: &'static str =
        "llama, mistral, mixtral, qwen2, qwen2moe, qwen3, qwen3moe, phi3, gemma2, gemma3";

    fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma2 | Self::Gemma3)
    }
}

/// How rotary embeddings pair the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (2i, 2i+1): llama.cpp's "norm" mode, used for GGUF `llama` whose q/k weights the
    /// converter permuted.
    Interleaved,
    /// Pairs (i, i + d/2): GPT-NeoX style, used by Hugging Face weights and by GGUF qwen2/qwen3/phi3.
    HalfSplit,
}

/// The most experts a layer may have (llama.cpp's limit).
pub const MAX_EXPERTS: usize = 512;

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors, as GGUF stores them in `rope_freqs.weight`.
    FreqFactors(Vec<f32>),
    /// Phi-3's LongRoPE: per-frequency divisors for contexts up to the original one, and others
    /// beyond it. Which set applies is decided once for the serving context
    /// ([`ModelConfig::resolve_rope`]), as llama.cpp decides it per context.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
    },
}

/// The feed-forward block's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnActivation {
    /// SwiGLU: `silu(gate) * up`.
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma), computed as ggml does.
    GeluTanh,
}

/// A mixture-of-experts feed-forward block: a router picks `experts_used` of `experts` per token,
/// and the token's output is the weighted sum of those experts' SwiGLU outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    pub experts_used: usize,
    /// Each expert's intermediate size.
    pub expert_ff: usize,
    /// The chosen experts' softmax probabilities are rescaled to sum to 1 (Mixtral, Qwen3-MoE),
    /// or used as they are (Qwen2-MoE).
    pub normalize_weights: bool,
    /// The intermediate size of a shared expert that every token goes through, its output gated
    /// by `sigmoid(x · w)` (Qwen2-MoE).
    pub shared_expert_ff: Option<usize>,
}

/// The rope of the sliding-window layers where it differs from the other layers' (Gemma 3:
/// base 10000, no scaling; Gemma 2 with `rope.freq_base_swa`).
#[derive(Debug, Clone, PartialEq)]
pub struct SwaRope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_style: RopeStyle,
    pub rope_scaling: RopeScaling,
    /// Leading dimensions of each head that rotate (the rest pass through): `head_dim` unless
    /// the model has partial rotary embeddings (Phi-4-mini: 3/4).
    pub rope_dims: usize,
    /// Multiplies the rotated dimensions of queries and keys (LongRoPE's attention factor).
    pub rope_attn_factor: f32,
    /// The context the rope was trained for before extension: a serving context above it picks
    /// LongRoPE's long factors (`rope.scaling.original_context_length`).
    pub rope_original_context: usize,
    /// The context length the model was trained for.
    pub max_position_embeddings: usize,
    /// Tokens a sliding-window layer lets a position see, itself included.
    pub sliding_window: Option<usize>,
    /// Which layers use `sliding_window`; empty: every layer does.
    pub sliding_window_layers: Vec<bool>,
    /// The sliding-window layers' own rope, if they have one.
    pub swa_rope: Option<SwaRope>,
    /// Multiplies the token embeddings (Gemma: √hidden).
    pub embedding_scale: Option<f32>,
    /// Multiplies the queries before attention; `None`: 1/√head_dim.
    pub attention_scale: Option<f32>,
    /// Attention scores become `cap * tanh(score / cap)` (Gemma 2).
    pub attn_logit_softcap: Option<f32>,
    /// Logits become `cap * tanh(logit / cap)` (Gemma 2).
    pub final_logit_softcap: Option<f32>,
    pub ffn_activation: FfnActivation,
    /// Experts in place of the dense feed-forward block.
    pub moe: Option<MoeConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(
        "{source_name}: unsupported architecture {name:?} (supported: {})",
        Architecture::SUPPORTED
    )]
    UnsupportedArchitecture { source_name: String, name: String },
    #[error("{source_name}: {problem}")]
    Invalid {
        source_name: String,
        problem: String,
    },
    #[error("{source_name}: invalid config.json: {message}")]
    Json {
        source_name: String,
        message: String,
    },
}

/// The base of the readers' struct literals: the llama family's flags (no window, no Gemma
/// scales or caps, SwiGLU, no experts) and zero sizes, which [`ModelConfig::validate`] rejects,
/// so a reader must set every size.
impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            vocab_size: 0,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::HalfSplit,
            rope_scaling: RopeScaling::None,
            rope_dims: 0,
            rope_attn_factor: 1.0,
            rope_original_context: 0,
            max_position_embeddings: 0,
            sliding_window: None,
            sliding_window_layers: Vec::new(),
            swa_rope: None,
            embedding_scale: None,
            attention_scale: None,
            attn_logit_softcap: None,
            final_logit_softcap: None,
            ffn_activation: FfnActivation::Silu,
            moe: None,
        }
    }
}

impl ModelConfig {
    /// Checks the relations the decoder relies on.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |problem: String| ConfigError::Invalid {
            source_name: source_name.to_string(),
            problem,
        };
        for (name, v) in [
            ("hidden size", self.hidden_size),
            ("intermediate size", self.intermediate_size),
            ("layer count", self.num_layers),
            ("head count", self.num_heads),
            ("key/value head count", self.num_kv_heads),
            ("head dimension", self.head_dim),
            ("vocabulary size", self.vocab_size),
            ("context length", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(invalid(format!("{name} is 0")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(format!(
                "head count {} is not a multiple of the key/value head count {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(invalid(format!("head dimension {} is odd", self.head_dim)));
        }
        if self.rope_dims == 0
            || self.rope_dims > self.head_dim
            || !self.rope_dims.is_multiple_of(2)
        {
            return Err(invalid(format!(
                "rope dimension {} is not an even number in 1..={}",
                self.rope_dims, self.head_dim
            )));
        }
        if !(self.rope_attn_factor.is_finite() && self.rope_attn_factor > 0.0) {
            return Err(invalid(format!(
                "rope attention factor {} is not positive",
                self.rope_attn_factor
            )));
        }
        if let Some(moe) = &self.moe {
            if moe.experts == 0 || moe.experts_used == 0 || moe.experts_used > moe.experts {
                return Err(invalid(format!(
                    "{} experts used of {}: need 1..={} of at least one",
                    moe.experts_used, moe.experts, moe.experts
                )));
            }
            // A count from the file: bounded before anything is sized by it.
            if moe.experts > MAX_EXPERTS {
                return Err(invalid(format!(
                    "{} experts: at most {MAX_EXPERTS} are supported",
                    moe.experts
                )));
            }
            if moe.expert_ff == 0 || moe.shared_expert_ff == Some(0) {
                return Err(invalid("an expert's feed-forward length is 0".into()));
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(format!(
                "rope base {} is not positive",
                self.rope_theta
            )));
        }
        let factor_sets: &[&Vec<f32>] = match &self.rope_scaling {
            RopeScaling::FreqFactors(f) => &[f],
            RopeScaling::LongRope { short, long } => &[short, long],
            _ => &[],
        };
        for f in factor_sets {
            if f.len() != self.rope_dims / 2 {
                return Err(invalid(format!(
                    "{} rope frequency factors, expected rope dimension / 2 = {}",
                    f.len(),
                    self.rope_dims / 2
                )));
            }
            if let Some(bad) = f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                return Err(invalid(format!(
                    "rope frequency factor {bad} is not positive"
                )));
            }
        }
        Ok(())
    }

    /// Reads the configuration from GGUF metadata (`{arch}.*` keys).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ConfigError> {
        let source_name = file.path().display().to_string();
        let arch_name = file.require_str("general.architecture")?;
        let architecture = Architecture::from_name(arch_name).ok_or_else(|| {
            ConfigError::UnsupportedArchitecture {
                source_name: source_name.clone(),
                name: arch_name.to_string(),
            }
        })?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let hidden_size = file.require_usize(&key("embedding_length"))?;
        let num_heads = file.require_usize(&key("attention.head_count"))?;
        let num_kv_heads = file
            .get_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_heads == 0 {
            return Err(ConfigError::Invalid {
                source_name,
                problem: "head count is 0".into(),
            });
        }
        let head_dim = match file.get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_heads,
        };
        let rope_dims = file
            .get_usize(&key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        let vocab_size = match file.get_usize(&key("vocab_size"))? {
            Some(v) => v,
            // Counted in place: copying 150k token strings to count them costs tens of MB.
            None => file
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map_or(0, <[_]>::len),
        };
        let rope_scaling = match file.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: file.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0),
            },
            Some(other) => {
                return Err(ConfigError::Invalid {
                    source_name,
                    problem: format!("rope scaling type {other:?} is not supported"),
                });
            }
        };
        // The LongRoPE factors (`rope_factors_long/short.weight`) are tensors, chosen by the
        // decoder from the serving context; llama.cpp's Phi-3 is the only graph that reads them.
        if architecture != Architecture::Phi3
            && let Some(name) = file
                .tensor_names()
                .find(|n| n.starts_with("rope_factors_long") || n.starts_with("rope_factors_short"))
        {
            return Err(ConfigError::Invalid {
                source_name,
                problem: format!(
                    "tensor {name} (LongRoPE) is read for phi3 only, not for {arch_name}"
                ),
            });
        }
        let rope_style = match architecture {
            Architecture::Llama | Architecture::Mistral | Architecture::Mixtral => {
                RopeStyle::Interleaved
            }
            Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Phi3
            | Architecture::Gemma2
            | Architecture::Gemma3
            | Architecture::Qwen2Moe
            | Architecture::Qwen3Moe => RopeStyle::HalfSplit,
        };
        let num_layers = file.require_usize(&key("block_count"))?;
        let rms_norm_eps = file
            .get_f64(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        let intermediate_size = file.require_usize(&key("feed_forward_length"))?;
        let max_position_embeddings = file.get_usize(&key("context_length"))?.unwrap_or(2048);
        let moe = Self::read_moe_gguf(file, architecture, arch_name, intermediate_size)?;
        let mut cfg = Self {
            architecture,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta: file.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_style,
            rope_scaling,
            rope_dims,
            rope_attn_factor: file
                .get_f64(&key("rope.scaling.attn_factor"))?
                .map_or(1.0, |f| f as f32),
            rope_original_context: file
                .get_usize(&key("rope.scaling.original_context_length"))?
                .unwrap_or(max_position_embeddings),
            max_position_embeddings,
            moe,
            // llama.cpp reads `{arch}.attention.sliding_window` only for the families whose
            // graphs use it (below). For llama, qwen2, qwen3 and phi3 it ignores the key:
            // Phi-3's converter writes 2047 or 262144 there, which llama.cpp deliberately does
            // not apply, and llama.cpp's Mistral (a `llama` GGUF) attends to the whole context.
            // The other family flags are Gemma's, set below.
            ..Self::default()
        };
        if architecture.is_gemma() {
            cfg.read_gemma_gguf(file, arch_name)?;
        }
        cfg.validate(&source_name)?;
        Ok(cfg)
    }

    /// The experts, read as llama.cpp reads them: `{arch}.expert_count` > 0 makes a llama file a
    /// Mixtral; the Qwen MoE families require it. Each expert's intermediate size is
    /// `expert_feed_forward_length`, else `feed_forward_length / expert_used_count` (Qwen) or
    /// `feed_forward_length` (Mixtral). How the chosen experts are weighted is fixed per family
    /// in llama.cpp's graphs, not read from the file.
    fn read_moe_gguf(
        file: &GgufFile,
        architecture: Architecture,
        arch_name: &str,
        ff: usize,
    ) -> Result<Option<MoeConfig>, ConfigError> {
        let key = |k: &str| format!("{arch_name}.{k}");
        let experts = file.get_usize(&key("expert_count"))?.unwrap_or(0);
        let qwen = matches!(
            architecture,
            Architecture::Qwen2Moe | Architecture::Qwen3Moe
        );
        if experts == 0 && !qwen {
            return Ok(None);
        }
        let invalid = |problem: String| ConfigError::Invalid {
            source_name: file.path().display().to_string(),
            problem,
        };
        if !matches!(architecture, Architecture::Llama) && !qwen {
            return Err(invalid(format!(
                "{arch_name} with experts ({experts}) is not supported"
            )));
        }
        let experts_used = file.get_usize(&key("expert_used_count"))?.unwrap_or(0);
        if experts == 0 || experts_used == 0 {
            return Err(invalid(format!(
                "{arch_name} needs expert_count and expert_used_count > 0 (found {experts} and {experts_used})"
            )));
        }
        let expert_ff = match file.get_usize(&key("expert_feed_forward_length"))? {
            Some(n) if n > 0 => n,
            _ if qwen => ff / experts_used,
            _ => ff,
        };
        let shared_expert_ff = match architecture {
            Architecture::Qwen2Moe => Some(
                file.get_usize(&key("expert_shared_feed_forward_length"))?
                    .filter(|&n| n > 0)
                    .unwrap_or(ff),
            ),
            _ => None,
        };
        Ok(Some(MoeConfig {
            experts,
            experts_used,
            expert_ff,
            normalize_weights: architecture != Architecture::Qwen2Moe,
            shared_expert_ff,
        }))
    }

    /// Gemma 2 and 3's keys, read as llama.cpp's `llama_model_gemma2/3::load_arch_hparams` reads
    /// them. The converter stores the norms' weights with Gemma's `1 +` already added.
    fn read_gemma_gguf(&mut self, file: &GgufFile, arch_name: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{arch_name}.{k}");
        let f32_key = |k: &str| -> Result<Option<f32>, ConfigError> {
            Ok(file.get_f64(&key(k))?.map(|v| v as f32))
        };
        let window = file.get_usize(&key("attention.sliding_window"))?;
        let rope_base_swa = file.get_f64(&key("rope.freq_base_swa"))?;
        // Which layers slide: an explicit per-layer list, or "n - 1 of every n" (n from the key or
        // the family's default), as llama.cpp's `set_swa_pattern`.
        let pattern = |default_n: usize| -> Result<Vec<bool>, ConfigError> {
            let pattern_key = key("attention.sliding_window_pattern");
            if let Some(list) = file.get(&pattern_key).and_then(|v| v.as_array()) {
                let mut layers: Vec<bool> =
                    list.iter().map(|v| v.as_bool() == Some(true)).collect();
                layers.resize(self.num_layers, false);
                return Ok(layers);
            }
            let n = file.get_usize(&pattern_key)?.unwrap_or(default_n);
            Ok((0..self.num_layers)
                .map(|l| n == 0 || l % n < n - 1)
                .collect())
        };
        match self.architecture {
            Architecture::Gemma2 => {
                self.sliding_window = Some(window.unwrap_or(4096)).filter(|&w| w > 0);
                self.sliding_window_layers = pattern(2)?;
                self.swa_rope = rope_base_swa.map(|theta| SwaRope {
                    theta,
                    scaling: self.rope_scaling.clone(),
                });
                self.attn_logit_softcap = Some(f32_key("attn_logit_softcapping")?.unwrap_or(50.0));
                self.final_logit_softcap =
                    Some(f32_key("final_logit_softcapping")?.unwrap_or(30.0));
            }
            Architecture::Gemma3 => {
                if let Some(w) = window.filter(|&w| w > 0) {
                    self.sliding_window = Some(w);
                    self.sliding_window_layers = pattern(6)?;
                    self.swa_rope = Some(SwaRope {
                        theta: rope_base_swa.unwrap_or(10_000.0),
                        scaling: RopeScaling::None,
                    });
                }
                self.final_logit_softcap =
                    f32_key("final_logit_softcapping")?.filter(|&c| c != 0.0);
            }
            _ => {}
        }
        self.embedding_scale = Some((self.hidden_size as f32).sqrt());
        // llama.cpp (after gemma_pytorch): the 27B models scale queries by 1/√(hidden / heads),
        // the others by 1/√head_dim; it knows the 27B models by their layer count.
        let is_27b = matches!(
            (self.architecture, self.num_layers),
            (Architecture::Gemma2, 46) | (Architecture::Gemma3, 62)
        );
        let scaled_dim = if is_27b {
            self.hidden_size / self.num_heads
        } else {
            self.head_dim
        };
        self.attention_scale = Some(1.0 / (scaled_dim as f32).sqrt());
        self.ffn_activation = FfnActivation::GeluTanh;
        Ok(())
    }

    /// Picks LongRoPE's factors for a serving context of `context_length` positions: the long
    /// ones when it exceeds the original context (llama.cpp's `get_rope_factors`).
    pub fn resolve_rope(&mut self, context_length: usize) {
        if let RopeScaling::LongRope { short, long } = &self.rope_scaling {
            let factors = if context_length > self.rope_original_context {
                long.clone()
            } else {
                short.clone()
            };
            self.rope_scaling = RopeScaling::FreqFactors(factors);
        }
    }

    /// Whether layer `layer` attends through the sliding window, and its size.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let w = self.sliding_window?;
        match self.sliding_window_layers.get(layer) {
            Some(&slides) => slides.then_some(w),
            None if self.sliding_window_layers.is_empty() => Some(w),
            None => None,
        }
    }

    /// Whether layer `layer` uses the sliding-window layers' own rope.
    pub fn layer_uses_swa_rope(&self, layer: usize) -> bool {
        self.swa_rope.is_some() && self.layer_window(layer).is_some()
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let json_err = |e: serde_json::Error| ConfigError::Json {
            source_name: source_name.to_string(),
            message: e.to_string(),
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(json_err)?;
        let invalid = |problem: String| ConfigError::Invalid {
            source_name: source_name.to_string(),
            problem,
        };
        // Gemma 3's multimodal checkpoints nest the text model's config (and name its weights
        // apart); only the text model's own checkpoint (`gemma3_text`) is read.
        if value.get("model_type").and_then(|v| v.as_str()) == Some("gemma3")
            && value.get("text_config").is_some()
        {
            return Err(invalid(
                "gemma3 with a text_config (the multimodal checkpoint) is not supported; \
                 the text-only gemma3_text checkpoint is"
                    .into(),
            ));
        }
        let raw: HfConfig = serde_json::from_value(value).map_err(json_err)?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let architecture = match model_type.as_str() {
            "gemma3_text" => Some(Architecture::Gemma3),
            name => Architecture::from_name(name),
        }
        .ok_or_else(|| ConfigError::UnsupportedArchitecture {
            source_name: source_name.to_string(),
            name: model_type.clone(),
        })?;
        if raw.num_attention_heads == 0 {
            return Err(invalid("num_attention_heads is 0".into()));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        // As the GGUF converter computes `rope.dimension_count`.
        let rope_dims = match raw.partial_rotary_factor {
            Some(p) if p != 1.0 => {
                if !(p > 0.0 && p <= 1.0) {
                    return Err(invalid(format!(
                        "partial_rotary_factor {p} is not in (0, 1]"
                    )));
                }
                (p * raw.hidden_size as f64) as usize / raw.num_attention_heads
            }
            _ => head_dim,
        };
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(2048);
        let rope_original_context = raw
            .original_max_position_embeddings
            .unwrap_or(max_position_embeddings);
        let mut rope_attn_factor = 1f32;
        let rope_scaling = match &raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("");
                match kind {
                    "default" | "" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: s.factor.unwrap_or(1.0),
                    },
                    "longrope" | "su" if architecture == Architecture::Phi3 => {
                        let (Some(short), Some(long)) = (&s.short_factor, &s.long_factor) else {
                            return Err(invalid(
                                "rope_scaling longrope needs short_factor and long_factor".into(),
                            ));
                        };
                        // As the GGUF converter writes `rope.scaling.attn_factor`.
                        let scale = max_position_embeddings as f64 / rope_original_context as f64;
                        rope_attn_factor = match s.attention_factor {
                            Some(f) => f as f32,
                            None if scale > 1.0 => (1.0
                                + scale.ln() / (rope_original_context as f64).ln())
                            .sqrt() as f32,
                            None => 1.0,
                        };
                        RopeScaling::LongRope {
                            short: short.clone(),
                            long: long.clone(),
                        }
                    }
                    "llama3" => RopeScaling::Llama3 {
                        factor: s.factor.unwrap_or(8.0),
                        low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                        high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                        original_max_position_embeddings: s
                            .original_max_position_embeddings
                            .unwrap_or(8192.0),
                    },
                    other => {
                        return Err(invalid(format!(
                            "rope_scaling type {other:?} is not supported"
                        )));
                    }
                }
            }
        };
        let sliding_window = match architecture {
            // Qwen2 configs carry a window but only apply it when use_sliding_window is set.
            Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Qwen2Moe
            | Architecture::Qwen3Moe => {
                if raw.use_sliding_window.unwrap_or(false) {
                    raw.sliding_window
                } else {
                    None
                }
            }
            // As in a GGUF: llama.cpp does not apply Phi-3's window, and the safetensors twin
            // of a GGUF must compute what it computes.
            Architecture::Phi3 => None,
            _ => raw.sliding_window,
        }
        .filter(|&w| w > 0);
        let moe = raw.moe(architecture).map_err(invalid)?;
        let mut cfg = Self {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_style: RopeStyle::HalfSplit,
            rope_scaling,
            rope_dims,
            rope_attn_factor,
            rope_original_context,
            max_position_embeddings,
            sliding_window,
            moe,
            ..Self::default()
        };
        if architecture.is_gemma() {
            cfg.read_gemma_hf(&raw).map_err(invalid)?;
        }
        cfg.validate(source_name)?;
        Ok(cfg)
    }

    /// Gemma 2 and 3's keys in a Hugging Face `config.json`, read as transformers'
    /// `modeling_gemma2.py` / `modeling_gemma3.py` use them; for the checkpoints llama.cpp
    /// converts, this is what [`Self::read_gemma_gguf`] reads from the GGUF. The norms' `1 +`
    /// is added when the weights load (the checkpoint stores `w`, the GGUF `1 + w`).
    fn read_gemma_hf(&mut self, raw: &HfConfig) -> Result<(), String> {
        let activation = raw
            .hidden_activation
            .as_deref()
            .or(raw.hidden_act.as_deref());
        match activation {
            None | Some("gelu_pytorch_tanh" | "gelu_tanh" | "gelu") => {}
            Some(other) => return Err(format!("hidden_activation {other:?} is not supported")),
        }
        // Which layers slide: `layer_types` if given, else every other layer from the first
        // (Gemma 2) or `n - 1` of every `n` (Gemma 3, `sliding_window_pattern`, default 6).
        let layers = |n: usize| -> Result<Vec<bool>, String> {
            if let Some(types) = &raw.layer_types {
                if types.len() != self.num_layers {
                    return Err(format!(
                        "{} layer_types for {} layers",
                        types.len(),
                        self.num_layers
                    ));
                }
                return types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(format!("layer type {other:?} is not supported")),
                    })
                    .collect();
            }
            Ok((0..self.num_layers)
                .map(|l| n == 0 || l % n < n - 1)
                .collect())
        };
        let cap = |v: Option<Option<f64>>, default: Option<f64>| {
            v.unwrap_or(default).filter(|&c| c != 0.0).map(|c| c as f32)
        };
        self.swa_rope = None;
        match self.architecture {
            Architecture::Gemma2 => {
                self.sliding_window = Some(raw.sliding_window.unwrap_or(4096)).filter(|&w| w > 0);
                self.sliding_window_layers = layers(2)?;
                self.attn_logit_softcap = cap(raw.attn_logit_softcapping, Some(50.0));
                self.final_logit_softcap = cap(raw.final_logit_softcapping, Some(30.0));
            }
            Architecture::Gemma3 => {
                self.sliding_window = raw.sliding_window.filter(|&w| w > 0);
                if self.sliding_window.is_some() {
                    self.sliding_window_layers = layers(raw.sliding_window_pattern.unwrap_or(6))?;
                    self.swa_rope = Some(SwaRope {
                        theta: raw.rope_local_base_freq.unwrap_or(10_000.0),
                        scaling: RopeScaling::None,
                    });
                }
                self.attn_logit_softcap = cap(raw.attn_logit_softcapping, None);
                self.final_logit_softcap = cap(raw.final_logit_softcapping, None);
            }
            _ => {}
        }
        self.embedding_scale = Some((self.hidden_size as f32).sqrt());
        // Queries are scaled by `query_pre_attn_scalar^-0.5` (the 27B models: hidden / heads,
        // which llama.cpp knows by their layer count).
        let scalar = raw.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
        if !(scalar.is_finite() && scalar > 0.0) {
            return Err(format!("query_pre_attn_scalar {scalar} is not positive"));
        }
        self.attention_scale = Some(1.0 / (scalar as f32).sqrt());
        self.ffn_activation = FfnActivation::GeluTanh;
        Ok(())
    }
}

/// A key that may be absent (`None`), `null` (`Some(None)`) or a value.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    /// Mixtral's expert count.
    num_local_experts: Option<usize>,
    /// Qwen MoE's expert count.
    num_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    shared_expert_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    /// Gemma: queries are scaled by its inverse square root.
    query_pre_attn_scalar: Option<f64>,
    /// Gemma: absent, `null` (no cap) or the cap.
    #[serde(default, deserialize_with = "present")]
    attn_logit_softcapping: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    final_logit_softcapping: Option<Option<f64>>,
    /// Gemma 3: `n - 1` of every `n` layers slide.
    #[serde(alias = "_sliding_window_pattern")]
    sliding_window_pattern: Option<usize>,
    /// Each layer's attention: `sliding_attention` or `full_attention`.
    layer_types: Option<Vec<String>>,
    /// Gemma 3: the sliding layers' rope base.
    rope_local_base_freq: Option<f64>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
}

impl HfConfig {
    /// The experts of a Mixtral or Qwen MoE checkpoint. Layers without experts (a
    /// `decoder_sparse_step` above 1, `mlp_only_layers`) are refused rather than misread: the
    /// published checkpoints put experts in every layer.
    fn moe(&self, architecture: Architecture) -> Result<Option<MoeConfig>, String> {
        let experts = match architecture {
            Architecture::Mixtral => self.num_local_experts,
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => self.num_experts,
            _ => return Ok(None),
        }
        .ok_or("the expert count (num_local_experts or num_experts) is missing")?;
        if self.decoder_sparse_step.unwrap_or(1) != 1 || !self.mlp_only_layers.is_empty() {
            return Err(
                "layers without experts (decoder_sparse_step, mlp_only_layers) are not supported"
                    .into(),
            );
        }
        let qwen = architecture != Architecture::Mixtral;
        Ok(Some(MoeConfig {
            experts,
            experts_used: self.num_experts_per_tok.unwrap_or(2),
            expert_ff: match (qwen, self.moe_intermediate_size) {
                (true, Some(n)) => n,
                _ => self.intermediate_size,
            },
            // llama.cpp fixes these per family; the checkpoints say the same.
            normalize_weights: self
                .norm_topk_prob
                .unwrap_or(architecture != Architecture::Qwen2Moe),
            shared_expert_ff: match architecture {
                Architecture::Qwen2Moe => Some(
                    self.shared_expert_intermediate_size
                        .unwrap_or(self.intermediate_size),
                ),
                _ => None,
            },
        }))
    }
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    short_factor: Option<Vec<f32>>,
    long_factor: Option<Vec<f32>>,
    attention_factor: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(extra: &str) -> Result<ModelConfig, ConfigError> {
        let text = format!(
            r#"{{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
                "max_position_embeddings": 4096, {extra}}}"#
        );
        ModelConfig::from_hf_json(&text, "test")
    }

    #[test]
    fn hugging_face_expert_configs_follow_each_family() {
        let mixtral =
            hf(r#""model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2"#)
                .unwrap();
        let moe = mixtral.moe.unwrap();
        assert_eq!((moe.experts, moe.experts_used, moe.expert_ff), (8, 2, 128));
        assert!(moe.normalize_weights && moe.shared_expert_ff.is_none());

        let qwen2 = hf(
            r#""model_type": "qwen2_moe", "num_experts": 60, "num_experts_per_tok": 4,
                         "moe_intermediate_size": 32, "shared_expert_intermediate_size": 256,
                         "norm_topk_prob": false"#,
        )
        .unwrap();
        let moe = qwen2.moe.unwrap();
        assert_eq!(qwen2.architecture, Architecture::Qwen2Moe);
        assert_eq!((moe.experts, moe.experts_used, moe.expert_ff), (60, 4, 32));
        assert_eq!(moe.shared_expert_ff, Some(256));
        assert!(!moe.normalize_weights);

        let qwen3 = hf(
            r#""model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8,
                         "moe_intermediate_size": 48, "norm_topk_prob": true"#,
        )
        .unwrap();
        assert!(qwen3.moe.unwrap().normalize_weights);
        assert!(hf(r#""model_type": "llama""#).unwrap().moe.is_none());
    }

    #[test]
    fn expert_configs_that_would_be_misread_are_refused() {
        for extra in [
            // Layers without experts.
            r#""model_type": "qwen3_moe", "num_experts": 8, "decoder_sparse_step": 2"#,
            r#""model_type": "qwen2_moe", "num_experts": 8, "mlp_only_layers": [0]"#,
            // More experts per token than there are.
            r#""model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3"#,
            // A count nothing should be sized by.
            r#""model_type": "mixtral", "num_local_experts": 100000, "num_experts_per_tok": 2"#,
            // No count at all.
            r#""model_type": "qwen3_moe""#,
        ] {
            let err = hf(extra).unwrap_err().to_string();
            assert!(err.contains("test:"), "{extra}: {err}");
        }
    }

    /// Phi-3 LongRoPE: the factors from the config, the attention factor as the GGUF converter
    /// computes it, and the short factors up to the original context, the long ones beyond.
    #[test]
    fn longrope_resolves_by_the_serving_context() {
        let short: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 * 0.01).collect();
        let long: Vec<f32> = (0..8).map(|i| 1.0 + i as f32).collect();
        let extra = format!(
            r#""model_type": "phi3", "original_max_position_embeddings": 1024,
               "partial_rotary_factor": 1.0,
               "rope_scaling": {{"type": "longrope", "short_factor": {short:?}, "long_factor": {long:?}}}"#
        );
        let cfg = hf(&extra).unwrap();
        let want = (1.0 + 4f64.ln() / 1024f64.ln()).sqrt() as f32;
        assert!((cfg.rope_attn_factor - want).abs() < 1e-6);
        let mut at_original = cfg.clone();
        at_original.resolve_rope(1024);
        assert_eq!(at_original.rope_scaling, RopeScaling::FreqFactors(short));
        let mut beyond = cfg;
        beyond.resolve_rope(1025);
        assert_eq!(beyond.rope_scaling, RopeScaling::FreqFactors(long));
        // Factors for the wrong number of rotated pairs.
        let bad = r#""model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}"#;
        assert!(
            hf(bad)
                .unwrap_err()
                .to_string()
                .contains("rope frequency factors")
        );
    }

    /// Gemma's keys: the query scale, soft caps (absent: the defaults, `null`: none), the
    /// sliding layers from the pattern or `layer_types`, and Gemma 3's local rope base.
    #[test]
    fn hugging_face_gemma_configs() {
        let g2 = hf(
            r#""model_type": "gemma2", "head_dim": 16, "query_pre_attn_scalar": 144,
                       "sliding_window": 8, "hidden_activation": "gelu_pytorch_tanh""#,
        )
        .unwrap();
        assert_eq!(g2.attention_scale, Some(1.0 / 12.0));
        assert_eq!(
            (g2.attn_logit_softcap, g2.final_logit_softcap),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(g2.sliding_window_layers, [true, false]);
        assert_eq!(g2.embedding_scale, Some(8.0));
        assert!(g2.swa_rope.is_none());
        let g2 = hf(r#""model_type": "gemma2", "attn_logit_softcapping": null,
                       "final_logit_softcapping": null"#)
        .unwrap();
        assert_eq!(
            (g2.attn_logit_softcap, g2.final_logit_softcap),
            (None, None)
        );

        let g3 = hf(r#""model_type": "gemma3_text", "sliding_window": 512,
                       "layer_types": ["full_attention", "sliding_attention"],
                       "rope_local_base_freq": 20000.0, "final_logit_softcapping": null"#)
        .unwrap();
        assert_eq!(g3.architecture, Architecture::Gemma3);
        assert_eq!(g3.sliding_window_layers, [false, true]);
        assert_eq!(g3.swa_rope.as_ref().map(|r| r.theta), Some(20000.0));
        assert_eq!(
            (g3.attn_logit_softcap, g3.final_logit_softcap),
            (None, None)
        );
        assert!(hf(r#""model_type": "gemma3_text", "hidden_activation": "silu""#).is_err());
    }

    #[test]
    fn partial_rotary_factor_gives_the_rotated_dimensions() {
        let cfg = hf(r#""model_type": "phi3", "partial_rotary_factor": 0.75"#).unwrap();
        assert_eq!((cfg.head_dim, cfg.rope_dims), (16, 12));
        for bad in ["0.0", "1.5", "-0.5"] {
            assert!(
                hf(&format!(
                    r#""model_type": "phi3", "partial_rotary_factor": {bad}"#
                ))
                .is_err()
            );
        }
    }
}
