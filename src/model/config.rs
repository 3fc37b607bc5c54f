//! The decoder's hyper-parameters and architecture flags, read from GGUF metadata or a Hugging
//! Face `config.json`.
//!
//! One configuration covers the llama family and its relatives: what differs between Llama,
//! Mistral, SmolLM, Qwen2/2.5, Qwen3 and Phi-3 is a handful of flags (rope layout and scaling,
//! biases, q/k norm, fused projections, tied embeddings, sliding window). Structural flags that
//! the weights themselves reveal (biases, q/k norm, fused projections, a separate LM head) are
//! detected from the tensors present when loading, not trusted from metadata.

use serde::Deserialize;

use super::gguf::{GgufError, GgufFile};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2 / 3.x, TinyLlama, SmolLM, Mistral (GGUF writes Mistral as `llama`).
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
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
        }
    }

    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, qwen3, phi3";
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
    /// The context length the model was trained for.
    pub max_position_embeddings: usize,
    pub sliding_window: Option<usize>,
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
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(invalid(format!(
                "rope base {} is not positive",
                self.rope_theta
            )));
        }
        if let RopeScaling::FreqFactors(f) = &self.rope_scaling
            && f.len() != self.head_dim / 2
        {
            return Err(invalid(format!(
                "rope_freqs has {} entries, expected head_dim/2 = {}",
                f.len(),
                self.head_dim / 2
            )));
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
        if let Some(rope_dims) = file.get_usize(&key("rope.dimension_count"))?
            && rope_dims != head_dim
        {
            return Err(ConfigError::Invalid {
                source_name,
                problem: format!(
                    "partial rotary embeddings (rope dimension {rope_dims} < head dimension {head_dim}) are not supported"
                ),
            });
        }
        let vocab_size = match file.get_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => file
                .get_string_array("tokenizer.ggml.tokens")?
                .map(|t| t.len())
                .unwrap_or(0),
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
        // Phi-3's long-context variants (LongRoPE) store per-frequency factors as tensors and
        // scale attention; running them without would be silently wrong at every position.
        if let Some(name) = file
            .tensor_names()
            .find(|n| n.starts_with("rope_factors_long") || n.starts_with("rope_factors_short"))
        {
            return Err(ConfigError::Invalid {
                source_name,
                problem: format!(
                    "LongRoPE (tensor {name}, Phi-3 long-context models) is not supported"
                ),
            });
        }
        let rope_style = match architecture {
            Architecture::Llama | Architecture::Mistral => RopeStyle::Interleaved,
            Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Phi3 => RopeStyle::HalfSplit,
        };
        let cfg = Self {
            architecture,
            hidden_size,
            intermediate_size: file.require_usize(&key("feed_forward_length"))?,
            num_layers: file.require_usize(&key("block_count"))?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: file
                .get_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5),
            rope_theta: file.get_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_style,
            rope_scaling,
            max_position_embeddings: file.get_usize(&key("context_length"))?.unwrap_or(2048),
            sliding_window: file
                .get_usize(&key("attention.sliding_window"))?
                .filter(|&w| w > 0),
        };
        cfg.validate(&source_name)?;
        Ok(cfg)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        let json_err = |e: serde_json::Error| ConfigError::Json {
            source_name: source_name.to_string(),
            message: e.to_string(),
        };
        let raw: HfConfig = serde_json::from_str(text).map_err(json_err)?;
        let model_type = raw.model_type.clone().unwrap_or_default();
        let architecture = Architecture::from_name(&model_type).ok_or_else(|| {
            ConfigError::UnsupportedArchitecture {
                source_name: source_name.to_string(),
                name: model_type.clone(),
            }
        })?;
        let invalid = |problem: String| ConfigError::Invalid {
            source_name: source_name.to_string(),
            problem,
        };
        if raw.num_attention_heads == 0 {
            return Err(invalid("num_attention_heads is 0".into()));
        }
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads);
        if let Some(p) = raw.partial_rotary_factor
            && p != 1.0
        {
            return Err(invalid(format!(
                "partial_rotary_factor {p} is not supported"
            )));
        }
        let rope_scaling = match &raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => {
                let kind = s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("");
                match kind {
                    "default" | "" => RopeScaling::None,
                    "linear" => RopeScaling::Linear {
                        factor: s.factor.unwrap_or(1.0),
                    },
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
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if raw.use_sliding_window.unwrap_or(false) {
                    raw.sliding_window
                } else {
                    None
                }
            }
            _ => raw.sliding_window,
        }
        .filter(|&w| w > 0);
        let cfg = Self {
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
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            sliding_window,
        };
        cfg.validate(source_name)?;
        Ok(cfg)
    }
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
}
