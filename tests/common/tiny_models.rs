//! Tiny random-weight models written by the tests, in Hugging Face safetensors layout and as
//! GGUF (optionally quantized), for every architecture the decoder supports.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::gguf_writer::GgufWriter;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use llm_worker_rbee::generation::rng::Rng;
use llm_worker_rbee::kernels::WeightType;
use llm_worker_rbee::model::gguf::{GgufValue, candle_dtype};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::Llama,
        Arch::Mistral,
        Arch::Qwen2,
        Arch::Qwen3,
        Arch::Phi3,
    ];

    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
        }
    }

    /// llama.cpp writes Mistral as `llama`.
    fn gguf_arch(self) -> &'static str {
        match self {
            Arch::Mistral => "llama",
            other => other.model_type(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TinySpec {
    pub arch: Arch,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub rope_theta: f64,
    pub eps: f64,
    pub context: usize,
    pub sliding_window: Option<usize>,
    pub tied: bool,
}

impl TinySpec {
    /// Dimensions that are multiples of 256 so every ggml block type (K-quants included) fits.
    pub fn new(arch: Arch) -> Self {
        Self {
            arch,
            hidden: 256,
            intermediate: 512,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: if arch == Arch::Qwen3 { 32 } else { 64 },
            vocab: 256,
            rope_theta: 10_000.0,
            eps: 1e-5,
            context: 128,
            sliding_window: if arch == Arch::Mistral { Some(6) } else { None },
            tied: matches!(arch, Arch::Qwen2 | Arch::Llama),
        }
    }

    pub fn config_json(&self) -> serde_json::Value {
        let mut c = serde_json::json!({
            "model_type": self.arch.model_type(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
        });
        let o = c.as_object_mut().expect("object");
        match self.arch {
            Arch::Qwen2 => {
                o.insert("sliding_window".into(), self.context.into());
                o.insert("max_window_layers".into(), self.layers.into());
                o.insert("use_sliding_window".into(), false.into());
            }
            Arch::Qwen3 => {
                o.insert("head_dim".into(), self.head_dim.into());
                o.insert("attention_bias".into(), false.into());
                o.insert("sliding_window".into(), serde_json::Value::Null);
                o.insert("max_window_layers".into(), self.layers.into());
                o.insert("use_sliding_window".into(), false.into());
            }
            Arch::Mistral => {
                o.insert(
                    "sliding_window".into(),
                    self.sliding_window
                        .map_or(serde_json::Value::Null, Into::into),
                );
            }
            Arch::Phi3 => {
                // Phi-3 configs carry a window (2047 in Phi-3-mini-4k) that llama.cpp, and so
                // the worker, does not apply.
                if let Some(w) = self.sliding_window {
                    o.insert("sliding_window".into(), w.into());
                }
            }
            Arch::Llama => {}
        }
        c
    }
}

/// One weight in Hugging Face naming, f32, row-major.
pub struct NamedWeight {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

fn gaussian(rng: &mut Rng) -> f32 {
    // Box-Muller; plenty for test weights.
    let u1 = rng.next_f64().max(1e-12);
    let u2 = rng.next_f64();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn random(rng: &mut Rng, shape: &[usize], std: f32, mean: f32) -> Vec<f32> {
    let n: usize = shape.iter().product();
    (0..n).map(|_| mean + std * gaussian(rng)).collect()
}

/// Random weights with scales that keep activations in a useful range.
pub fn random_weights(spec: &TinySpec, seed: u64) -> Vec<NamedWeight> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, std: f32, mean: f32, rng: &mut Rng| {
        let values = random(rng, &shape, std, mean);
        out.push(NamedWeight {
            name,
            shape,
            values,
        });
    };
    let (h, ff, hd) = (spec.hidden, spec.intermediate, spec.head_dim);
    let (q_rows, kv_rows) = (spec.heads * hd, spec.kv_heads * hd);
    let w_std = 1.0 / (h as f32).sqrt();
    push(
        "model.embed_tokens.weight".into(),
        vec![spec.vocab, h],
        1.0,
        0.0,
        &mut rng,
    );
    for i in 0..spec.layers {
        let p = format!("model.layers.{i}");
        push(
            format!("{p}.input_layernorm.weight"),
            vec![h],
            0.1,
            1.0,
            &mut rng,
        );
        push(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.1,
            1.0,
            &mut rng,
        );
        if spec.arch == Arch::Phi3 {
            push(
                format!("{p}.self_attn.qkv_proj.weight"),
                vec![q_rows + 2 * kv_rows, h],
                w_std,
                0.0,
                &mut rng,
            );
            push(
                format!("{p}.mlp.gate_up_proj.weight"),
                vec![2 * ff, h],
                w_std,
                0.0,
                &mut rng,
            );
        } else {
            push(
                format!("{p}.self_attn.q_proj.weight"),
                vec![q_rows, h],
                w_std,
                0.0,
                &mut rng,
            );
            push(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv_rows, h],
                w_std,
                0.0,
                &mut rng,
            );
            push(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv_rows, h],
                w_std,
                0.0,
                &mut rng,
            );
            push(
                format!("{p}.mlp.gate_proj.weight"),
                vec![ff, h],
                w_std,
                0.0,
                &mut rng,
            );
            push(
                format!("{p}.mlp.up_proj.weight"),
                vec![ff, h],
                w_std,
                0.0,
                &mut rng,
            );
        }
        if spec.arch == Arch::Qwen2 {
            push(
                format!("{p}.self_attn.q_proj.bias"),
                vec![q_rows],
                0.1,
                0.0,
                &mut rng,
            );
            push(
                format!("{p}.self_attn.k_proj.bias"),
                vec![kv_rows],
                0.1,
                0.0,
                &mut rng,
            );
            push(
                format!("{p}.self_attn.v_proj.bias"),
                vec![kv_rows],
                0.1,
                0.0,
                &mut rng,
            );
        }
        if spec.arch == Arch::Qwen3 {
            push(
                format!("{p}.self_attn.q_norm.weight"),
                vec![hd],
                0.1,
                1.0,
                &mut rng,
            );
            push(
                format!("{p}.self_attn.k_norm.weight"),
                vec![hd],
                0.1,
                1.0,
                &mut rng,
            );
        }
        push(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, q_rows],
            1.0 / (q_rows as f32).sqrt(),
            0.0,
            &mut rng,
        );
        push(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, ff],
            1.0 / (ff as f32).sqrt(),
            0.0,
            &mut rng,
        );
    }
    push("model.norm.weight".into(), vec![h], 0.1, 1.0, &mut rng);
    if !spec.tied {
        push(
            "lm_head.weight".into(),
            vec![spec.vocab, h],
            w_std,
            0.0,
            &mut rng,
        );
    }
    out
}

/// GPT-2's byte-to-character map: the piece text of byte-level token `b`.
pub fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return char::from(b);
    }
    let offset = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + offset).unwrap_or('?')
}

/// A byte-level vocabulary: token `i` is byte `i` (so any text encodes, with no merges).
pub fn byte_vocab() -> Vec<String> {
    (0..=255u8)
        .map(|b| byte_level_char(b).to_string())
        .collect()
}

/// A byte-level BPE `tokenizer.json` without merges (token `b` is byte `b`, so any text
/// encodes), with `added_tokens` after the bytes.
pub fn byte_level_tokenizer_json(added_tokens: Vec<serde_json::Value>) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_vocab()
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, serde_json::Value::from(i)))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

/// Writes `config.json`, `model.safetensors` (f32), a byte-level `tokenizer.json` and
/// `tokenizer_config.json` into `dir`.
pub fn write_hf_dir(dir: &Path, spec: &TinySpec, weights: &[NamedWeight]) {
    write_hf_dir_with(dir, spec, weights, DType::F32, 1);
}

/// [`write_hf_dir`] with the weights stored as `dtype`, in one `model.safetensors` or, when
/// `shards > 1`, in that many `model-0000i-of-0000n.safetensors` files listed by
/// `model.safetensors.index.json` as Hugging Face writes large checkpoints.
pub fn write_hf_dir_with(
    dir: &Path,
    spec: &TinySpec,
    weights: &[NamedWeight],
    dtype: DType,
    shards: usize,
) {
    std::fs::create_dir_all(dir).expect("create model dir");
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&spec.config_json()).expect("json"),
    )
    .expect("write config");
    let tensor = |w: &NamedWeight| {
        Tensor::from_vec(w.values.clone(), w.shape.as_slice(), &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("tensor")
    };
    if shards <= 1 {
        let tensors: HashMap<String, Tensor> = weights
            .iter()
            .map(|w| (w.name.clone(), tensor(w)))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
            .expect("save safetensors");
    } else {
        let per_shard = weights.len().div_ceil(shards);
        let mut weight_map = serde_json::Map::new();
        let mut total_size = 0;
        for (i, part) in weights.chunks(per_shard).enumerate() {
            let file = format!("model-{:05}-of-{shards:05}.safetensors", i + 1);
            let tensors: HashMap<String, Tensor> = part
                .iter()
                .map(|w| {
                    weight_map.insert(w.name.clone(), file.clone().into());
                    total_size += w.values.len() * dtype.size_in_bytes();
                    (w.name.clone(), tensor(w))
                })
                .collect();
            candle_core::safetensors::save(&tensors, dir.join(&file)).expect("save shard");
        }
        let index = serde_json::json!({
            "metadata": {"total_size": total_size},
            "weight_map": weight_map,
        });
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index).expect("json"),
        )
        .expect("write index");
    }
    let tokenizer = byte_level_tokenizer_json(Vec::new());
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("write tokenizer");
    let tokenizer_config = serde_json::json!({
        "eos_token": byte_level_char(2).to_string(),
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .expect("write tokenizer config");
}

/// llama.cpp's converter reorders q/k rows so that rotary pairs are adjacent ("norm" rope).
fn permute_for_interleaved_rope(
    values: &[f32],
    rows: usize,
    cols: usize,
    heads: usize,
) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for (j, src_row) in [(2 * i, h * hd + i), (2 * i + 1, h * hd + half + i)] {
                let dst_row = h * hd + j;
                out[dst_row * cols..(dst_row + 1) * cols]
                    .copy_from_slice(&values[src_row * cols..(src_row + 1) * cols]);
            }
        }
    }
    out
}

fn gguf_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (i, suffix) = rest.split_once('.').expect("layer name");
        let s = match suffix {
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.q_proj.bias" => "attn_q.bias",
            "self_attn.k_proj.bias" => "attn_k.bias",
            "self_attn.v_proj.bias" => "attn_v.bias",
            "self_attn.qkv_proj.weight" => "attn_qkv.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "self_attn.q_norm.weight" => "attn_q_norm.weight",
            "self_attn.k_norm.weight" => "attn_k_norm.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.gate_up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            other => panic!("no GGUF name for {other}"),
        };
        return format!("blk.{i}.{s}");
    }
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        other => panic!("no GGUF name for {other}"),
    }
}

/// A gpt2-style tokenizer of `tokens` without merges: `types` token types (all normal), BOS 1 and
/// EOS 2, no BOS added.
pub fn write_gpt2_tokenizer(w: &mut GgufWriter, tokens: Vec<String>, types: usize) {
    w.metadata("tokenizer.ggml.model", "gpt2");
    w.metadata("tokenizer.ggml.pre", "default");
    w.metadata(
        "tokenizer.ggml.tokens",
        GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect()),
    );
    w.metadata(
        "tokenizer.ggml.token_type",
        GgufValue::Array((0..types).map(|_| GgufValue::I32(1)).collect()),
    );
    w.metadata("tokenizer.ggml.merges", GgufValue::Array(Vec::new()));
    w.metadata("tokenizer.ggml.bos_token_id", 1u32);
    w.metadata("tokenizer.ggml.eos_token_id", 2u32);
    w.metadata("tokenizer.ggml.add_bos_token", false);
}

/// Builds a GGUF with the same weights. Matrices are stored as `quant` (F32 when `None`);
/// vectors stay F32 as llama.cpp writes them.
pub fn gguf_writer(
    spec: &TinySpec,
    weights: &[NamedWeight],
    quant: Option<GgmlDType>,
) -> GgufWriter {
    gguf_writer_with(spec, weights, |_| quant)
}

/// [`gguf_writer`] with each matrix's type chosen by its GGUF name (F32 when `None`), e.g. one
/// matrix of a type the CPU kernels do not read among the others.
pub fn gguf_writer_with(
    spec: &TinySpec,
    weights: &[NamedWeight],
    quant: impl Fn(&str) -> Option<GgmlDType>,
) -> GgufWriter {
    gguf_writer_typed(spec, weights, |name| quant(name).map(ggml_type))
}

/// [`gguf_writer_with`] by GGUF type, so also the types Candle cannot quantize (IQ4_NL and
/// IQ4_XS, quantized by [`super::iq4`]).
pub fn gguf_writer_typed(
    spec: &TinySpec,
    weights: &[NamedWeight],
    quant: impl Fn(&str) -> Option<WeightType>,
) -> GgufWriter {
    let arch = spec.arch.gguf_arch();
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", arch);
    w.metadata("general.name", "tiny");
    let k = |s: &str| format!("{arch}.{s}");
    w.metadata(&k("block_count"), spec.layers as u32);
    w.metadata(&k("context_length"), spec.context as u32);
    w.metadata(&k("embedding_length"), spec.hidden as u32);
    w.metadata(&k("feed_forward_length"), spec.intermediate as u32);
    w.metadata(&k("attention.head_count"), spec.heads as u32);
    w.metadata(&k("attention.head_count_kv"), spec.kv_heads as u32);
    w.metadata(&k("attention.key_length"), spec.head_dim as u32);
    w.metadata(&k("attention.value_length"), spec.head_dim as u32);
    w.metadata(&k("rope.dimension_count"), spec.head_dim as u32);
    w.metadata(&k("rope.freq_base"), spec.rope_theta as f32);
    w.metadata(&k("attention.layer_norm_rms_epsilon"), spec.eps as f32);
    w.metadata(&k("vocab_size"), spec.vocab as u32);
    if let Some(sw) = spec.sliding_window {
        w.metadata(&k("attention.sliding_window"), sw as u32);
    }
    write_gpt2_tokenizer(&mut w, byte_vocab(), spec.vocab);
    w.metadata(
        "tokenizer.chat_template",
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    );

    let permute = spec.arch.gguf_arch() == "llama";
    for nw in weights {
        let name = gguf_name(&nw.name);
        let mut values = nw.values.clone();
        if permute && nw.name.ends_with("q_proj.weight") {
            values = permute_for_interleaved_rope(&values, nw.shape[0], nw.shape[1], spec.heads);
        }
        if permute && nw.name.ends_with("k_proj.weight") {
            values = permute_for_interleaved_rope(&values, nw.shape[0], nw.shape[1], spec.kv_heads);
        }
        match (quant(&name), nw.shape.len()) {
            (Some(ty @ (WeightType::IQ4NL | WeightType::IQ4XS)), 2) => {
                w.tensor(&name, &nw.shape, ty, super::iq4::quantize(ty, &values));
            }
            (Some(ty), 2) => {
                let q = candle_dtype(ty).expect("a type Candle quantizes");
                let t =
                    Tensor::from_vec(values, nw.shape.as_slice(), &Device::Cpu).expect("tensor");
                let qt = QTensor::quantize(&t, q).expect("quantize");
                let bytes = qt.data().expect("data").into_owned();
                w.tensor(&name, &nw.shape, ty, bytes);
            }
            _ => {
                w.tensor_f32(&name, &nw.shape, &values);
            }
        }
    }
    w
}

pub fn ggml_type(q: GgmlDType) -> WeightType {
    match q {
        GgmlDType::F32 => WeightType::F32,
        GgmlDType::F16 => WeightType::F16,
        GgmlDType::BF16 => WeightType::BF16,
        GgmlDType::Q4_0 => WeightType::Q4_0,
        GgmlDType::Q4_1 => WeightType::Q4_1,
        GgmlDType::Q5_0 => WeightType::Q5_0,
        GgmlDType::Q5_1 => WeightType::Q5_1,
        GgmlDType::Q8_0 => WeightType::Q8_0,
        GgmlDType::Q2K => WeightType::Q2K,
        GgmlDType::Q3K => WeightType::Q3K,
        GgmlDType::Q4K => WeightType::Q4K,
        GgmlDType::Q5K => WeightType::Q5K,
        GgmlDType::Q6K => WeightType::Q6K,
        other => panic!("no GGUF type for {other:?}"),
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("llm-worker-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
