//! A family GGUF turned back into the Hugging Face checkpoint llama.cpp's converter
//! (`convert_hf_to_gguf.py`) would have made it from: `config.json` and `model.safetensors`,
//! every tensor under its Hugging Face name, for checking that the safetensors loader computes
//! what the GGUF loader computes from the same weights.
//!
//! The converter's steps, undone:
//! - `llama` files (Mixtral among them) had their q and k projections' rows permuted so that
//!   llama.cpp's interleaved rope pairs `(2i, 2i + 1)` see what Hugging Face's half-split rope
//!   pairs `(i, i + d/2)` saw; the rows are put back. Qwen and Phi-3 were not permuted.
//! - The experts' stacks `blk.N.ffn_*_exps.weight`, `(experts, rows, cols)`, are split into
//!   one matrix per expert (Mixtral's `block_sparse_moe.experts.E.w1/w3/w2`, Qwen's
//!   `mlp.experts.E.{gate,up,down}_proj`).
//! - Qwen2-MoE's shared-expert gate, a vector in the GGUF, is the `(1, hidden)` matrix of a
//!   `Linear(hidden, 1)` again.
//! - Phi-3's LongRoPE factors, tensors in the GGUF, go back into `rope_scaling`, and the rotary
//!   dimensions into `partial_rotary_factor`, as the converter computes them
//!   (`int(partial_rotary_factor * hidden) // heads`).
//!
//! - Gemma's norms (every one: the layers', the final one, Gemma 3's q/k norms) were stored as
//!   `1 + w`; the 1 is taken off again (exactly: the weights are near 1). Its layer norms take
//!   Gemma's names (`post_attention_layernorm` is the attention output's norm there,
//!   `pre_feedforward_layernorm` the FFN's input norm), and its keys (the query scale, soft
//!   caps, sliding pattern, the sliding layers' rope base) go back into `config.json`.
//!
//! Only F32 files are converted: a quantized tensor has no exact safetensors twin.

use std::collections::BTreeMap;
use std::path::Path;

use llm_worker_rbee::kernels::WeightType;
use llm_worker_rbee::model::gguf::GgufFile;
use serde_json::{Value, json};

/// One tensor of the checkpoint: its shape (outermost first) and its values.
struct HfTensor {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// The checkpoint as it will be written: `config.json`'s content and the tensors by name.
pub struct HfTwin {
    pub config: Value,
    tensors: BTreeMap<String, HfTensor>,
}

impl HfTwin {
    /// Writes `config.json` and `model.safetensors` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let config = serde_json::to_string_pretty(&self.config).map_err(|e| e.to_string())?;
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, config)
            .map_err(|e| format!("{}: {e}", config_path.display()))?;
        let bytes: Vec<(&str, &[usize], Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(name, t)| {
                let data = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name.as_str(), t.shape.as_slice(), data)
            })
            .collect();
        let mut views = Vec::new();
        for (name, shape, data) in &bytes {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), data)
                    .map_err(|e| format!("{name}: {e}"))?;
            views.push((*name, view));
        }
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Converts the GGUF at `gguf` into a Hugging Face directory `dir`.
pub fn write_hf_twin(gguf: &Path, dir: &Path) -> Result<HfTwin, String> {
    let twin = hf_twin(gguf)?;
    twin.write(dir)?;
    Ok(twin)
}

/// The family's Hugging Face `model_type`.
fn model_type(arch: &str, experts: usize) -> Result<&'static str, String> {
    Ok(match arch {
        "llama" if experts > 0 => "mixtral",
        "llama" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "phi3" => "phi3",
        "qwen2moe" => "qwen2_moe",
        "qwen3moe" => "qwen3_moe",
        "gemma2" => "gemma2",
        "gemma3" => "gemma3_text",
        other => return Err(format!("no Hugging Face twin for architecture {other:?}")),
    })
}

/// The shapes the tensor mapping needs.
struct Dims {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Reads the GGUF at `path` and builds its Hugging Face twin in memory.
pub fn hf_twin(path: &Path) -> Result<HfTwin, String> {
    let file = GgufFile::open(path).map_err(|e| e.to_string())?;
    let err = |e: llm_worker_rbee::model::gguf::GgufError| e.to_string();
    let arch = file.require_str("general.architecture").map_err(err)?;
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| file.require_usize(&key(k)).map_err(err);
    let experts = file
        .get_usize(&key("expert_count"))
        .map_err(err)?
        .unwrap_or(0);
    let model_type = model_type(arch, experts)?;
    let hidden = usize_key("embedding_length")?;
    let heads = usize_key("attention.head_count")?;
    let kv_heads = file
        .get_usize(&key("attention.head_count_kv"))
        .map_err(err)?
        .unwrap_or(heads);
    let head_dim = file
        .get_usize(&key("attention.key_length"))
        .map_err(err)?
        .unwrap_or(hidden / heads);
    let rope_dims = file
        .get_usize(&key("rope.dimension_count"))
        .map_err(err)?
        .unwrap_or(head_dim);
    let context = usize_key("context_length")?;
    let f64_key = |k: &str| file.get_f64(&key(k)).map_err(err);
    let embedding = file
        .tensor_info("token_embd.weight")
        .ok_or("no token_embd.weight")?
        .shape();

    let mut config = json!({
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": usize_key("feed_forward_length")?,
        "num_hidden_layers": usize_key("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": embedding[0],
        // The GGUF's f32 values widened exactly to f64: the twin reads the same numbers.
        "rms_norm_eps": f64_key("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        "rope_theta": f64_key("rope.freq_base")?.unwrap_or(10_000.0),
        "max_position_embeddings": context,
        "tie_word_embeddings": file.tensor_info("output.weight").is_none(),
    });
    let set = |config: &mut Value, k: &str, v: Value| {
        config[k] = v;
    };
    if let Some(window) = file
        .get_usize(&key("attention.sliding_window"))
        .map_err(err)?
    {
        set(&mut config, "sliding_window", json!(window));
    }
    if arch.starts_with("qwen") {
        set(&mut config, "use_sliding_window", json!(false));
    }
    match file.get_str(&key("rope.scaling.type")).map_err(err)? {
        None | Some("none") => {}
        Some("linear") => set(
            &mut config,
            "rope_scaling",
            json!({"type": "linear", "factor": f64_key("rope.scaling.factor")?.unwrap_or(1.0)}),
        ),
        Some(other) => return Err(format!("rope scaling {other:?} has no twin here")),
    }
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err("rope_freqs.weight (Llama 3.1's factors) has no twin here".into());
    }
    if rope_dims != head_dim {
        // The converter's `rope_dims = int(partial_rotary_factor * hidden) // heads`.
        let factor = (rope_dims * heads) as f64 / hidden as f64;
        if ((factor * hidden as f64) as usize) / heads != rope_dims {
            return Err(format!(
                "rope dimension {rope_dims} is not a partial_rotary_factor of {hidden} / {heads}"
            ));
        }
        set(&mut config, "partial_rotary_factor", json!(factor));
    }
    if let (Some(long), Some(short)) = (
        file.tensor_info("rope_factors_long.weight"),
        file.tensor_info("rope_factors_short.weight"),
    ) {
        let original = usize_key("rope.scaling.original_context_length")?;
        let mut scaling = json!({
            "type": "longrope",
            "short_factor": f32_values(&file, short)?,
            "long_factor": f32_values(&file, long)?,
        });
        // The converter derives the attention factor from the two contexts; a file whose factor
        // is not that one keeps it explicitly.
        let scale = context as f64 / original as f64;
        let derived = if scale > 1.0 {
            (1.0 + scale.ln() / (original as f64).ln()).sqrt()
        } else {
            1.0
        };
        let stored = f64_key("rope.scaling.attn_factor")?.unwrap_or(1.0);
        if (derived as f32) != (stored as f32) {
            scaling["attention_factor"] = json!(stored);
        }
        set(&mut config, "rope_scaling", scaling);
        set(
            &mut config,
            "original_max_position_embeddings",
            json!(original),
        );
    }
    if experts > 0 {
        let used = usize_key("expert_used_count")?;
        set(&mut config, "num_experts_per_tok", json!(used));
        if model_type == "mixtral" {
            set(&mut config, "num_local_experts", json!(experts));
        } else {
            set(&mut config, "num_experts", json!(experts));
            set(&mut config, "decoder_sparse_step", json!(1));
            set(&mut config, "mlp_only_layers", json!([]));
            // llama.cpp fixes the routing weights per family: Qwen3-MoE renormalizes them.
            set(
                &mut config,
                "norm_topk_prob",
                json!(model_type == "qwen3_moe"),
            );
            if let Some(n) = file
                .get_usize(&key("expert_feed_forward_length"))
                .map_err(err)?
            {
                set(&mut config, "moe_intermediate_size", json!(n));
            }
            if let Some(n) = file
                .get_usize(&key("expert_shared_feed_forward_length"))
                .map_err(err)?
            {
                set(&mut config, "shared_expert_intermediate_size", json!(n));
            }
        }
    }

    if arch.starts_with("gemma") {
        // As llama.cpp (after gemma_pytorch) scales queries: by hidden / heads for the 27B
        // models, known by their layer count, else by the head size.
        let layers = usize_key("block_count")?;
        let is_27b = matches!((arch, layers), ("gemma2", 46) | ("gemma3", 62));
        let scalar = if is_27b { hidden / heads } else { head_dim };
        set(&mut config, "query_pre_attn_scalar", json!(scalar));
        set(&mut config, "hidden_activation", json!("gelu_pytorch_tanh"));
        let window = file
            .get_usize(&key("attention.sliding_window"))
            .map_err(err)?;
        if file
            .get(&key("attention.sliding_window_pattern"))
            .and_then(|v| v.as_array())
            .is_some()
        {
            return Err("a per-layer sliding_window_pattern has no twin here".into());
        }
        let pattern = file
            .get_usize(&key("attention.sliding_window_pattern"))
            .map_err(err)?;
        let swa_base = f64_key("rope.freq_base_swa")?;
        if arch == "gemma2" {
            set(&mut config, "sliding_window", json!(window.unwrap_or(4096)));
            if pattern.is_some_and(|n| n != 2) || swa_base.is_some() {
                return Err("a Gemma 2 sliding pattern or rope other than 2, none".into());
            }
            let cap = |k: &str, default: f64| -> Result<f64, String> {
                Ok(f64_key(k)?.unwrap_or(default))
            };
            set(
                &mut config,
                "attn_logit_softcapping",
                json!(cap("attn_logit_softcapping", 50.0)?),
            );
            set(
                &mut config,
                "final_logit_softcapping",
                json!(cap("final_logit_softcapping", 30.0)?),
            );
        } else {
            set(
                &mut config,
                "sliding_window_pattern",
                json!(pattern.unwrap_or(6)),
            );
            set(
                &mut config,
                "rope_local_base_freq",
                json!(swa_base.unwrap_or(10_000.0)),
            );
            set(&mut config, "attn_logit_softcapping", Value::Null);
            set(
                &mut config,
                "final_logit_softcapping",
                json!(f64_key("final_logit_softcapping")?.filter(|&c| c != 0.0)),
            );
        }
    }

    let dims = Dims {
        hidden,
        heads,
        kv_heads,
        head_dim,
    };
    let mut tensors = BTreeMap::new();
    for name in file.tensor_names() {
        if name.starts_with("rope_factors_") {
            continue;
        }
        let info = file.tensor_info(name).ok_or(name.to_string())?;
        let tensor = HfTensor {
            shape: info.shape(),
            values: f32_values(&file, info)?,
        };
        for (hf_name, t) in hf_tensors(name, tensor, model_type, &dims)? {
            if tensors.insert(hf_name.clone(), t).is_some() {
                return Err(format!("{hf_name} twice"));
            }
        }
    }
    Ok(HfTwin { config, tensors })
}

/// An F32 tensor's values.
fn f32_values(
    file: &GgufFile,
    info: &llm_worker_rbee::model::gguf::GgufTensorInfo,
) -> Result<Vec<f32>, String> {
    if info.ty != WeightType::F32 {
        return Err(format!(
            "{} is {:?}: only F32 tensors have an exact twin",
            info.name, info.ty
        ));
    }
    Ok(file
        .tensor_bytes(info)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The Hugging Face tensors one GGUF tensor came from.
fn hf_tensors(
    name: &str,
    mut t: HfTensor,
    model_type: &str,
    d: &Dims,
) -> Result<Vec<(String, HfTensor)>, String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    let gemma = model_type.starts_with("gemma");
    if gemma && name.ends_with("norm.weight") {
        // The converter's `norm_shift`: every Gemma norm was stored as `1 + w`.
        t.values.iter_mut().for_each(|v| *v -= 1.0);
    }
    if let Some(hf) = top {
        return Ok(vec![(hf.to_string(), t)]);
    }
    let unknown = || format!("{name}: no Hugging Face name for it");
    let rest = name.strip_prefix("blk.").ok_or_else(unknown)?;
    let (layer, suffix) = rest.split_once('.').ok_or_else(unknown)?;
    let p = |s: &str| format!("model.layers.{layer}.{s}");
    let llama_rope = matches!(model_type, "llama" | "mixtral");
    let mixtral = model_type == "mixtral";
    let one =
        |s: &str, t: HfTensor| -> Result<Vec<(String, HfTensor)>, String> { Ok(vec![(p(s), t)]) };
    match suffix {
        "attn_norm.weight" => one("input_layernorm.weight", t),
        "attn_q.weight" | "attn_q.bias" | "attn_k.weight" | "attn_k.bias" => {
            let (proj, heads) = match suffix.starts_with("attn_q") {
                true => ("q_proj", d.heads),
                false => ("k_proj", d.kv_heads),
            };
            if llama_rope {
                t.values = unpermute_rope_rows(&t.values, heads, d.head_dim)?;
            }
            let kind = suffix.rsplit('.').next().unwrap_or("weight");
            one(&format!("self_attn.{proj}.{kind}"), t)
        }
        "attn_v.weight" => one("self_attn.v_proj.weight", t),
        "attn_v.bias" => one("self_attn.v_proj.bias", t),
        "attn_qkv.weight" => one("self_attn.qkv_proj.weight", t),
        "attn_qkv.bias" => one("self_attn.qkv_proj.bias", t),
        "attn_output.weight" => one("self_attn.o_proj.weight", t),
        "attn_q_norm.weight" => one("self_attn.q_norm.weight", t),
        "attn_k_norm.weight" => one("self_attn.k_norm.weight", t),
        "post_attention_norm.weight" if gemma => one("post_attention_layernorm.weight", t),
        "ffn_norm.weight" if gemma => one("pre_feedforward_layernorm.weight", t),
        "post_ffw_norm.weight" if gemma => one("post_feedforward_layernorm.weight", t),
        "ffn_norm.weight" => one("post_attention_layernorm.weight", t),
        "ffn_gate.weight" => one("mlp.gate_proj.weight", t),
        // Phi-3's fused gate and up projection, gate rows first, is stored as `ffn_up`.
        "ffn_up.weight" if model_type == "phi3" => one("mlp.gate_up_proj.weight", t),
        "ffn_up.weight" => one("mlp.up_proj.weight", t),
        "ffn_down.weight" => one("mlp.down_proj.weight", t),
        "ffn_gate_inp.weight" if mixtral => one("block_sparse_moe.gate.weight", t),
        "ffn_gate_inp.weight" => one("mlp.gate.weight", t),
        "ffn_gate_exps.weight" | "ffn_up_exps.weight" | "ffn_down_exps.weight" => {
            let (qwen, mix) = match suffix {
                "ffn_gate_exps.weight" => ("gate_proj", "w1"),
                "ffn_up_exps.weight" => ("up_proj", "w3"),
                _ => ("down_proj", "w2"),
            };
            let [experts, rows, cols] = t.shape[..] else {
                return Err(format!(
                    "{name}: shape {:?}, expected 3 dimensions",
                    t.shape
                ));
            };
            Ok(t.values
                .chunks_exact(rows * cols)
                .take(experts)
                .enumerate()
                .map(|(e, values)| {
                    let hf = match mixtral {
                        true => p(&format!("block_sparse_moe.experts.{e}.{mix}.weight")),
                        false => p(&format!("mlp.experts.{e}.{qwen}.weight")),
                    };
                    let shape = vec![rows, cols];
                    let values = values.to_vec();
                    (hf, HfTensor { shape, values })
                })
                .collect())
        }
        // `Linear(hidden, 1)`: the converter squeezed its `(1, hidden)` weight into a vector.
        "ffn_gate_inp_shexp.weight" => {
            t.shape = vec![1, d.hidden];
            one("mlp.shared_expert_gate.weight", t)
        }
        "ffn_gate_shexp.weight" => one("mlp.shared_expert.gate_proj.weight", t),
        "ffn_up_shexp.weight" => one("mlp.shared_expert.up_proj.weight", t),
        "ffn_down_shexp.weight" => one("mlp.shared_expert.down_proj.weight", t),
        _ => Err(unknown()),
    }
}

/// Undoes `convert_hf_to_gguf.py`'s `LlamaModel.permute` on the rows of a q or k projection
/// (or its bias) of `heads` heads of `head_dim` rows each. The converter computed
/// `w.reshape(heads, 2, head_dim / 2, cols).swapaxes(1, 2).reshape(w.shape)`: GGUF row
/// `h * head_dim + 2i + j` is Hugging Face row `h * head_dim + j * head_dim / 2 + i`.
pub fn unpermute_rope_rows(
    values: &[f32],
    heads: usize,
    head_dim: usize,
) -> Result<Vec<f32>, String> {
    let rows = heads * head_dim;
    if rows == 0 || !values.len().is_multiple_of(rows) || !head_dim.is_multiple_of(2) {
        return Err(format!(
            "{} values are not {heads} heads of {head_dim} (even) rows",
            values.len()
        ));
    }
    let cols = values.len() / rows;
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let gguf_row = h * head_dim + 2 * i + j;
                let hf_row = h * head_dim + j * half + i;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&values[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    Ok(out)
}
