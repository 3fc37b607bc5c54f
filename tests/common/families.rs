//! Small random-weight GGUFs of each model family, with the family's real metadata keys and
//! tensor names as llama.cpp's converter writes them, for the comparison with llama.cpp
//! (`tests/families.rs`, `scripts/family_conformance.py`). A file is rebuilt bit for bit from
//! its family's seed, so the references recorded from llama.cpp stay valid without the file
//! being kept anywhere.
//!
//! The weights are scaled so that the next-token distributions are peaked but not one-hot
//! (logits with a spread of a few units): greedy decoding then has clear margins at most
//! steps, and the log-probabilities of the top candidates say something.

#![allow(dead_code)]

use std::path::Path;

use serde_json::Value;

use super::gguf_writer::GgufWriter;
use super::tiny_models::{byte_level_char, write_gpt2_tokenizer};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use llm_worker_rbee::generation::rng::Rng;
use llm_worker_rbee::kernels::WeightType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Qwen2,
    /// Carries `phi3.attention.sliding_window` = 16 (which llama.cpp does not apply).
    Phi3,
    Gemma2,
    Gemma3,
    /// A `llama` file with experts: 4, 2 per token, weights renormalized.
    Mixtral,
    /// Qwen2's biases, 4 experts (2 per token, weights as routed) and a gated shared expert.
    Qwen2Moe,
    /// Qwen3's q/k norms, 8 experts, 2 per token, weights renormalized.
    Qwen3Moe,
    /// Phi-3 with LongRoPE factors (the long ones apply: the served context, 512, exceeds the
    /// original 256), its attention factor, and partial rotary embeddings (48 of 64 dimensions,
    /// as Phi-4-mini rotates 3/4).
    Phi3LongRope,
}

impl Family {
    pub const ALL: [Family; 9] = [
        Family::Llama,
        Family::Qwen2,
        Family::Phi3,
        Family::Gemma2,
        Family::Gemma3,
        Family::Mixtral,
        Family::Qwen2Moe,
        Family::Qwen3Moe,
        Family::Phi3LongRope,
    ];

    /// The name of the family's reference file.
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Phi3 => "phi3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2moe",
            Family::Qwen3Moe => "qwen3moe",
            Family::Phi3LongRope => "phi3-longrope",
        }
    }

    /// The GGUF architecture.
    pub fn arch(self) -> &'static str {
        match self {
            Family::Mixtral => "llama",
            Family::Phi3LongRope => "phi3",
            other => other.name(),
        }
    }

    /// `(experts, used per token, each expert's intermediate size)`.
    pub fn experts(self) -> Option<(usize, usize, usize)> {
        match self {
            Family::Mixtral => Some((4, 2, 256)),
            Family::Qwen2Moe => Some((4, 2, 96)),
            Family::Qwen3Moe => Some((8, 2, 96)),
            _ => None,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    fn seed(self) -> u64 {
        0x5eed_0000 + self as u64
    }
}

/// One test file: a family's model with F32 matrices, or the same weights in Q8_0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FamilyModel {
    pub family: Family,
    pub q8_0: bool,
}

impl FamilyModel {
    /// Every family in F32; llama, the Gemmas and Qwen3-MoE again in Q8_0 (our quantized
    /// kernels on their shapes, the experts' stacks among them).
    pub const ALL: [FamilyModel; 13] = [
        Self::f32(Family::Llama),
        Self::f32(Family::Qwen2),
        Self::f32(Family::Phi3),
        Self::f32(Family::Gemma2),
        Self::f32(Family::Gemma3),
        Self::f32(Family::Mixtral),
        Self::f32(Family::Qwen2Moe),
        Self::f32(Family::Qwen3Moe),
        Self::f32(Family::Phi3LongRope),
        Self::q8_0(Family::Llama),
        Self::q8_0(Family::Gemma2),
        Self::q8_0(Family::Gemma3),
        Self::q8_0(Family::Qwen3Moe),
    ];

    pub const fn f32(family: Family) -> Self {
        Self {
            family,
            q8_0: false,
        }
    }

    pub const fn q8_0(family: Family) -> Self {
        Self { family, q8_0: true }
    }

    /// The file's and its reference's name: `gemma2`, `gemma2-q8_0`.
    pub fn name(self) -> String {
        match self.q8_0 {
            true => format!("{}-q8_0", self.family.name()),
            false => self.family.name().to_string(),
        }
    }
}

/// The shapes of one family's test model.
struct Shape {
    hidden: usize,
    ff: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
}

fn shape(family: Family) -> Shape {
    match family {
        Family::Llama | Family::Qwen2 | Family::Phi3 | Family::Phi3LongRope => Shape {
            hidden: 256,
            ff: 512,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            vocab: 256,
        },
        // A head size that is not hidden / heads (the query scale comes from key_length, and
        // 1/√96 is not a power of two).
        Family::Gemma2 => Shape {
            hidden: 256,
            ff: 512,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            head_dim: 96,
            vocab: 256,
        },
        Family::Mixtral | Family::Qwen2Moe | Family::Qwen3Moe => Shape {
            hidden: 128,
            ff: 256,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            vocab: 256,
        },
        // Six layers: the default pattern slides on layers 0-4 and attends globally on 5.
        Family::Gemma3 => Shape {
            hidden: 128,
            ff: 256,
            layers: 6,
            heads: 4,
            kv_heads: 1,
            head_dim: 64,
            vocab: 256,
        },
    }
}

/// The sliding window written into the file.
pub fn sliding_window(family: Family) -> Option<usize> {
    match family {
        Family::Phi3 => Some(16),
        Family::Gemma2 | Family::Gemma3 => Some(8),
        _ => None,
    }
}

/// Token `i < 128` is byte `i` (GPT-2's byte-level text); the others are `<i>`. Every token is
/// then whole UTF-8 on its own: llama-server holds back a token that ends inside a UTF-8
/// sequence and reports no probabilities for it.
fn vocab() -> Vec<String> {
    (0..256u32)
        .map(|i| match u8::try_from(i) {
            Ok(b) if b < 128 => byte_level_char(b).to_string(),
            _ => format!("<{i}>"),
        })
        .collect()
}

struct Weights {
    rng: Rng,
    w: GgufWriter,
    q8_0: bool,
}

impl Weights {
    fn gaussian(&mut self) -> f32 {
        let u1 = self.rng.next_f64().max(1e-12);
        let u2 = self.rng.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// An F32 tensor of `mean + std * N(0, 1)`; `shape` row-major (outermost first).
    /// Matrices (and the experts' stacks of them) are stored as Q8_0 in a Q8_0 file, except the
    /// router, which llama-quantize leaves alone; vectors stay F32, as llama.cpp keeps them.
    fn tensor(&mut self, name: &str, shape: &[usize], std: f32, mean: f32) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| mean + std * self.gaussian()).collect();
        if self.q8_0 && shape.len() >= 2 && !name.contains("ffn_gate_inp") {
            let cols = shape[shape.len() - 1];
            let t = Tensor::from_vec(values, (n / cols, cols), &Device::Cpu).expect("tensor");
            let q = QTensor::quantize(&t, GgmlDType::Q8_0).expect("quantize");
            let bytes = q.data().expect("data").into_owned();
            self.w.tensor(name, shape, WeightType::Q8_0, bytes);
        } else {
            self.w.tensor_f32(name, shape, &values);
        }
    }

    /// A norm's weight as the converter stores it (Gemma's `1 +` included): about 1.
    fn norm(&mut self, name: &str, size: usize) {
        self.tensor(name, &[size], 0.1, 1.0);
    }

    /// Gemma's post-attention and post-FFN norms: large enough that the blocks' outputs, not
    /// the input embedding, decide the next token (with tied embeddings a weak block leaves the
    /// model repeating its input token).
    fn post_norm(&mut self, name: &str, size: usize) {
        self.tensor(name, &[size], 2.0, 24.0);
    }

    /// A projection `rows × cols` whose outputs have about unit variance.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) {
        self.tensor(name, &[rows, cols], 1.0 / (cols as f32).sqrt(), 0.0);
    }

    /// `experts` projections `rows × cols`, stacked as llama.cpp stores them.
    fn experts(&mut self, name: &str, experts: usize, rows: usize, cols: usize) {
        self.tensor(
            name,
            &[experts, rows, cols],
            1.0 / (cols as f32).sqrt(),
            0.0,
        );
    }
}

/// The rotated dimensions of each 64-wide head in the LongRoPE file.
const ROTARY_DIMS_LONGROPE: usize = 48;

/// The spread of the logits: the LM head's rows have this norm over √hidden.
const LOGIT_SCALE: f32 = 4.0;

/// llama.cpp's reference for a test model (`tests/data/families/<name>.json`).
pub fn reference(model: FamilyModel) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/families")
        .join(format!("{}.json", model.name()));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (scripts/family_conformance.py writes it)",
            path.display()
        )
    });
    serde_json::from_str(&text).expect("reference JSON")
}

/// FNV-1a over the file: the references name the file they were made from.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes the test model to `path`.
pub fn write_family_gguf(model: FamilyModel, path: &Path) -> std::io::Result<()> {
    family_writer(model).write(path)
}

pub fn family_writer(model: FamilyModel) -> GgufWriter {
    let family = model.family;
    let s = shape(family);
    let arch = family.arch();
    let mut w = GgufWriter::new();
    let k = |key: &str| format!("{arch}.{key}");
    w.metadata("general.architecture", arch);
    // Not the family's name: llama.cpp's vocabulary loader special-cases tokens by model name
    // (a "phi3" name wants a `</s>` token).
    w.metadata("general.name", "tiny");
    w.metadata(&k("block_count"), s.layers as u32);
    w.metadata(&k("context_length"), 512u32);
    w.metadata(&k("embedding_length"), s.hidden as u32);
    w.metadata(&k("feed_forward_length"), s.ff as u32);
    w.metadata(&k("attention.head_count"), s.heads as u32);
    w.metadata(&k("attention.head_count_kv"), s.kv_heads as u32);
    w.metadata(&k("attention.key_length"), s.head_dim as u32);
    w.metadata(&k("attention.value_length"), s.head_dim as u32);
    w.metadata(&k("rope.dimension_count"), s.head_dim as u32);
    w.metadata(&k("attention.layer_norm_rms_epsilon"), 1e-6f32);
    match family {
        Family::Llama => {
            w.metadata(&k("rope.freq_base"), 500_000f32);
        }
        Family::Qwen2 => {
            w.metadata(&k("rope.freq_base"), 1_000_000f32);
        }
        Family::Phi3 => {
            w.metadata(&k("rope.freq_base"), 10_000f32);
        }
        Family::Phi3LongRope => {
            // As the converter writes a 128k Phi-3: the trained context, the original one, and
            // sqrt(1 + ln(scale) / ln(original)) for the attention factor.
            w.metadata(&k("rope.freq_base"), 10_000f32);
            w.metadata(&k("context_length"), 1024u32);
            w.metadata(&k("rope.scaling.original_context_length"), 256u32);
            let scale = 1024f64 / 256.0;
            let attn = (1.0 + scale.ln() / 256f64.ln()).sqrt();
            w.metadata(&k("rope.scaling.attn_factor"), attn as f32);
            w.metadata(&k("rope.dimension_count"), ROTARY_DIMS_LONGROPE as u32);
        }
        Family::Mixtral => {
            w.metadata(&k("rope.freq_base"), 1_000_000f32);
        }
        Family::Qwen2Moe | Family::Qwen3Moe => {
            w.metadata(&k("rope.freq_base"), 1_000_000f32);
        }
        Family::Gemma2 => {
            w.metadata(&k("rope.freq_base"), 10_000f32);
            // Gemma 2 has 50 and 30; this small model's scores and logits are a few units,
            // so smaller caps make the tanh bend them.
            w.metadata(&k("attn_logit_softcapping"), 3f32);
            w.metadata(&k("final_logit_softcapping"), 15f32);
        }
        Family::Gemma3 => {
            // Gemma 3 4B and larger: global layers at base 1e6 with linear scaling 8; the
            // sliding layers keep base 10000 (llama.cpp's default) and no scaling.
            w.metadata(&k("rope.freq_base"), 1_000_000f32);
            w.metadata(&k("rope.scaling.type"), "linear");
            w.metadata(&k("rope.scaling.factor"), 8f32);
        }
    }
    if let Some(window) = sliding_window(family) {
        w.metadata(&k("attention.sliding_window"), window as u32);
    }
    if let Some((experts, used, expert_ff)) = family.experts() {
        w.metadata(&k("expert_count"), experts as u32);
        w.metadata(&k("expert_used_count"), used as u32);
        if family != Family::Mixtral {
            w.metadata(&k("expert_feed_forward_length"), expert_ff as u32);
        }
        if family == Family::Qwen2Moe {
            w.metadata(&k("expert_shared_feed_forward_length"), s.ff as u32);
        }
    }
    write_gpt2_tokenizer(&mut w, vocab(), s.vocab);

    let mut t = Weights {
        rng: Rng::new(family.seed()),
        w,
        q8_0: model.q8_0,
    };
    let (h, ff, hd) = (s.hidden, s.ff, s.head_dim);
    let (q_rows, kv_rows) = (s.heads * hd, s.kv_heads * hd);
    let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    let phi3 = matches!(family, Family::Phi3 | Family::Phi3LongRope);
    if family == Family::Phi3LongRope {
        // Short factors near 1, long ones growing with the pair's wavelength, as the published
        // files have them.
        let pairs = ROTARY_DIMS_LONGROPE / 2;
        let short: Vec<f32> = (0..pairs).map(|i| 1.0 + 0.05 * i as f32).collect();
        let long: Vec<f32> = (0..pairs).map(|i| 1.0 + 1.5 * i as f32).collect();
        t.w.tensor_f32("rope_factors_short.weight", &[pairs], &short);
        t.w.tensor_f32("rope_factors_long.weight", &[pairs], &long);
    }
    if gemma {
        // Tied: the embedding is also the LM head. Gemma multiplies the input by √hidden.
        t.tensor(
            "token_embd.weight",
            &[s.vocab, h],
            LOGIT_SCALE / (h as f32).sqrt(),
            0.0,
        );
    } else {
        t.tensor("token_embd.weight", &[s.vocab, h], 1.0, 0.0);
    }
    for i in 0..s.layers {
        let p = |n: &str| format!("blk.{i}.{n}");
        t.norm(&p("attn_norm.weight"), h);
        if phi3 {
            t.matrix(&p("attn_qkv.weight"), q_rows + 2 * kv_rows, h);
        } else {
            t.matrix(&p("attn_q.weight"), q_rows, h);
            t.matrix(&p("attn_k.weight"), kv_rows, h);
            t.matrix(&p("attn_v.weight"), kv_rows, h);
        }
        if matches!(family, Family::Qwen2 | Family::Qwen2Moe) {
            t.tensor(&p("attn_q.bias"), &[q_rows], 0.1, 0.0);
            t.tensor(&p("attn_k.bias"), &[kv_rows], 0.1, 0.0);
            t.tensor(&p("attn_v.bias"), &[kv_rows], 0.1, 0.0);
        }
        if matches!(family, Family::Gemma3 | Family::Qwen3Moe) {
            t.norm(&p("attn_q_norm.weight"), hd);
            t.norm(&p("attn_k_norm.weight"), hd);
        }
        t.matrix(&p("attn_output.weight"), h, q_rows);
        if gemma {
            t.post_norm(&p("post_attention_norm.weight"), h);
        }
        t.norm(&p("ffn_norm.weight"), h);
        if let Some((experts, _, eff)) = family.experts() {
            t.matrix(&p("ffn_gate_inp.weight"), experts, h);
            t.experts(&p("ffn_gate_exps.weight"), experts, eff, h);
            t.experts(&p("ffn_up_exps.weight"), experts, eff, h);
            t.experts(&p("ffn_down_exps.weight"), experts, h, eff);
            if family == Family::Qwen2Moe {
                t.tensor(
                    &p("ffn_gate_inp_shexp.weight"),
                    &[h],
                    1.0 / (h as f32).sqrt(),
                    0.0,
                );
                t.matrix(&p("ffn_gate_shexp.weight"), ff, h);
                t.matrix(&p("ffn_up_shexp.weight"), ff, h);
                t.matrix(&p("ffn_down_shexp.weight"), h, ff);
            }
        } else if phi3 {
            t.matrix(&p("ffn_up.weight"), 2 * ff, h);
            t.matrix(&p("ffn_down.weight"), h, ff);
        } else {
            t.matrix(&p("ffn_gate.weight"), ff, h);
            t.matrix(&p("ffn_up.weight"), ff, h);
            t.matrix(&p("ffn_down.weight"), h, ff);
        }
        if gemma {
            t.post_norm(&p("post_ffw_norm.weight"), h);
        }
    }
    t.norm("output_norm.weight", h);
    if !gemma {
        t.tensor(
            "output.weight",
            &[s.vocab, h],
            LOGIT_SCALE / (h as f32).sqrt(),
            0.0,
        );
    }
    t.w
}
