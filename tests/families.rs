//! Each model family against llama.cpp: small random-weight GGUFs of every family
//! ([`common::families`], rebuilt here bit for bit from their seeds) were run by llama.cpp's
//! `llama-server` on fixed token-id prompts, greedily, by `scripts/family_conformance.py`, which
//! kept each step's token and the top log-probabilities in `tests/data/families/<family>.json`.
//! Here the worker's decoder generates from the same files and prompts, through our CPU kernels
//! and through the Candle tensor path forced on the CPU, each prompt alone and all of a family's
//! prompts batched, and is judged by the rule of `shared/conformance/README.md`
//! ([`common::conformance_rule`]), with the top candidates' log-probabilities checked as well.
//!
//! `FAMILY_GGUF_DIR=DIR cargo test --test families write_family_ggufs -- --ignored` writes the
//! files (the script does this); `CONFORMANCE_VERBOSE=1` prints every step.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use common::conformance_rule::{LOGPROB_TOLERANCE, Outcome, compare, ids};
use common::families::{Family, FamilyModel, fnv1a, reference, write_family_gguf};
use common::hf_twin::write_hf_twin;
use common::tiny_models::TempDir;
use llm_worker_rbee::generation::FinishReason;
use llm_worker_rbee::kernels::ThreadPool;
use llm_worker_rbee::model::config::{Architecture, ModelConfig, RopeScaling};
use llm_worker_rbee::model::decoder::{
    AttentionPath, Decoder, DecoderOptions, ForwardItem, SequenceCache,
};
use llm_worker_rbee::model::gguf::GgufFile;
use llm_worker_rbee::model::weights::WeightStore;
use serde_json::Value;

/// The context llama-server ran the references with.
const SERVED_CONTEXT: usize = 512;

/// The tiny vocabulary's end-of-generation token (its EOS), as llama.cpp stops on it.
const EOS: u32 = 2;

/// Candidates below this log-probability in llama.cpp's top list are not compared: far in the
/// tail, a 0.25 difference says nothing about the model.
const TOP_FLOOR: f64 = -8.0;

#[test]
#[ignore = "writes the family GGUFs for scripts/family_conformance.py"]
fn write_family_ggufs() {
    let dir = PathBuf::from(std::env::var("FAMILY_GGUF_DIR").expect("FAMILY_GGUF_DIR"));
    std::fs::create_dir_all(&dir).expect("create FAMILY_GGUF_DIR");
    for model in FamilyModel::ALL {
        let path = dir.join(format!("{}.gguf", model.name()));
        write_family_gguf(model, &path).expect("write gguf");
        eprintln!("wrote {}", path.display());
    }
}

fn decoder(path: &Path, options: DecoderOptions) -> Decoder {
    let file = GgufFile::open(path).expect("open gguf");
    let cfg = ModelConfig::from_gguf(&file).expect("gguf config");
    // The references' server context (`-c 512`): LongRoPE picks its factors from it.
    let context = SERVED_CONTEXT.min(cfg.max_position_embeddings);
    Decoder::load_with(
        cfg,
        &WeightStore::Gguf(Arc::new(file)),
        &Device::Cpu,
        context,
        options,
    )
    .expect("load gguf")
}

/// The two compute paths: ours (in-place GGUF matrices, our kernels and attention) and Candle's
/// tensors with the accelerators' attention, run on the CPU device.
fn decoders(path: &Path) -> Vec<(&'static str, Decoder)> {
    let cpu = decoder(
        path,
        DecoderOptions {
            cpu_pool: Some(Arc::new(ThreadPool::new(2))),
            ..DecoderOptions::default()
        },
    );
    assert!(cpu.uses_cpu_path(), "{}", cpu.compute_path());
    let candle = decoder(
        path,
        DecoderOptions {
            attention: Some(AttentionPath::Device),
            ..DecoderOptions::default()
        },
    );
    assert!(!candle.uses_cpu_path());
    vec![("cpu-kernels", cpu), ("candle", candle)]
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let z: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    logits
        .iter()
        .map(|&v| f64::from(v - max) - z.ln())
        .collect()
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// One sequence's greedy generation: its tokens and each step's log-probabilities.
struct Generation {
    tokens: Vec<u32>,
    logprobs: Vec<Vec<f64>>,
    finish: FinishReason,
}

/// Greedy generation for all `prompts` together: one forward per step over every sequence
/// still running (the prompts in the first), each stopping at EOS or after `n_predict` tokens.
fn greedy(decoder: &Decoder, prompts: &[Vec<u32>], n_predict: usize) -> Vec<Generation> {
    let mut caches: Vec<SequenceCache> = prompts.iter().map(|_| decoder.new_cache()).collect();
    let mut out: Vec<Generation> = prompts
        .iter()
        .map(|_| Generation {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: FinishReason::MaxTokens,
        })
        .collect();
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut running: Vec<usize> = (0..prompts.len()).collect();
    while !running.is_empty() {
        let logits = {
            let mut items: Vec<ForwardItem<'_>> = caches
                .iter_mut()
                .zip(&next)
                .enumerate()
                .filter(|(i, _)| running.contains(i))
                .map(|(_, (cache, tokens))| ForwardItem { cache, tokens })
                .collect();
            decoder.forward(&mut items).expect("forward")
        };
        let mut still = Vec::new();
        for (&s, logits) in running.iter().zip(&logits) {
            let token = argmax(logits);
            let g = &mut out[s];
            g.tokens.push(token);
            g.logprobs.push(log_softmax(logits));
            if token == EOS {
                g.finish = FinishReason::Eos;
            } else if g.tokens.len() < n_predict {
                next[s] = vec![token];
                still.push(s);
            }
        }
        running = still;
    }
    out
}

/// The README rule on one case, then the top candidates: on every step both agree on, each of
/// llama.cpp's top tokens above [`TOP_FLOOR`] within [`LOGPROB_TOLERANCE`] of ours (only
/// reported, not required, when `candidates_required` is false). Returns the summary and the
/// largest candidate log-probability difference seen.
fn judge(
    case: &Value,
    ours: &Generation,
    candidates_required: bool,
) -> Result<(String, f64), String> {
    let outcome = Outcome {
        tokens: ours.tokens.clone(),
        logprobs: ours
            .tokens
            .iter()
            .zip(&ours.logprobs)
            .map(|(&t, lp)| lp[t as usize] as f32)
            .collect(),
        finish: ours.finish.clone(),
    };
    let summary = compare(case, &outcome)?;
    let want = ids(&case["generated_ids"]);
    let steps = case["steps"].as_array().ok_or("no steps")?;
    let mut max_delta = 0f64;
    for (i, (&got, &expected)) in ours.tokens.iter().zip(&want).enumerate() {
        if got != expected {
            break;
        }
        for top in steps[i]["top"].as_array().ok_or("no top")? {
            let reference = top["logprob"].as_f64().ok_or("no logprob")?;
            if reference < TOP_FLOOR {
                continue;
            }
            let id = top["id"].as_u64().ok_or("no id")? as usize;
            let delta = (ours.logprobs[i][id] - reference).abs();
            if delta > LOGPROB_TOLERANCE && candidates_required {
                return Err(format!(
                    "step {i}: candidate {id} logprob {:.3}, llama.cpp {reference:.3}",
                    ours.logprobs[i][id]
                ));
            }
            max_delta = max_delta.max(delta);
        }
    }
    Ok((summary, max_delta))
}

/// The whole comparison for one family: every case alone and all cases batched, on both paths.
fn family_matches_llama_cpp(model: FamilyModel) {
    let name = model.name();
    let reference = reference(model);
    let cases = reference["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    let n_predict = reference["n_predict"].as_u64().expect("n_predict") as usize;
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let dir = TempDir::new(&name);
    let path = dir.path().join(format!("{name}.gguf"));
    write_family_gguf(model, &path).expect("write gguf");
    let bytes = std::fs::read(&path).expect("read gguf");
    let digest = format!("{:016x}", fnv1a(&bytes));
    assert_eq!(
        reference["gguf_fnv1a64"].as_str(),
        Some(digest.as_str()),
        "{name}: the rebuilt file is not the one llama.cpp ran; rerun scripts/family_conformance.py"
    );
    let mut failures = Vec::new();
    for (path_name, decoder) in decoders(&path) {
        let batched = greedy(&decoder, &prompts, n_predict);
        // Candle's CPU Q8_0 matmul does not quantize activations bit for bit as ggml does: on
        // these files its candidates' log-probabilities drift up to ~0.5 from llama.cpp's (ours
        // stay within 0.2; on llama-q8_0 within 0.04), on llama as on the Gemmas. There the
        // README rule (greedy tokens and their log-probabilities) is required and the
        // candidates only reported; the F32 files hold the Candle path to the full check.
        let candidates_required = !(model.q8_0 && path_name == "candle");
        for (i, case) in cases.iter().enumerate() {
            let alone = greedy(&decoder, &prompts[i..=i], n_predict).remove(0);
            for (mode, ours) in [("alone", &alone), ("batched", &batched[i])] {
                match judge(case, ours, candidates_required) {
                    Ok((summary, max_delta)) => eprintln!(
                        "{name} {path_name} case {i} {mode}: {summary}; top candidates max \
                         |dlogprob| {max_delta:.4}"
                    ),
                    Err(e) => failures.push(format!("{name} {path_name} case {i} {mode}: {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Llama));
}

#[test]
fn qwen2_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Qwen2));
}

/// The file carries `phi3.attention.sliding_window` = 16 and the prompts run past it: llama.cpp
/// does not apply the window, and neither may we.
#[test]
fn phi3_matches_llama_cpp_past_its_unused_window() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Phi3));
}

#[test]
fn gemma2_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Gemma2));
}

#[test]
fn gemma3_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Gemma3));
}

/// The same weights in Q8_0: activations quantized before every matmul, as llama.cpp does.
#[test]
fn llama_q8_0_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::q8_0(Family::Llama));
}

#[test]
fn gemma2_q8_0_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::q8_0(Family::Gemma2));
}

#[test]
fn gemma3_q8_0_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::q8_0(Family::Gemma3));
}

/// Mixtral: a llama file with experts, two of four per token, their weights renormalized.
#[test]
fn mixtral_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Mixtral));
}

/// Qwen2-MoE: the routed experts' weights as the softmax gives them, plus the shared expert
/// gated by a sigmoid.
#[test]
fn qwen2moe_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Qwen2Moe));
}

#[test]
fn qwen3moe_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Qwen3Moe));
}

/// The experts' stacked matrices in Q8_0, read in place by our kernels.
#[test]
fn qwen3moe_q8_0_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::q8_0(Family::Qwen3Moe));
}

/// LongRoPE's long factors and attention factor, with partial rotary embeddings.
#[test]
fn phi3_longrope_matches_llama_cpp() {
    family_matches_llama_cpp(FamilyModel::f32(Family::Phi3LongRope));
}

// The safetensors twins: each F32 family's GGUF converted back into the Hugging Face checkpoint
// llama.cpp's converter would have made it from ([`common::hf_twin`]), loaded through
// `config.json` and `model.safetensors`, must compute what the GGUF computes. The Q8_0 files
// have no exact safetensors twin.

/// Greedy steps each reference prompt runs in the twin comparison.
const TWIN_STEPS: usize = 6;

/// The largest |Δ log-probability| allowed between a GGUF and its twin, over the whole
/// vocabulary at every step, when attention keeps its keys and values in f32 Candle tensors
/// ([`AttentionPath::Device`]). Both decoders then run the same Candle code on the same f32
/// weights: the Qwen and Phi-3 twins measure 0 (bit for bit). The `llama` twins (Llama,
/// Mixtral) differ in summation order only: their q/k dimensions are the GGUF's permuted back
/// and rotated as pairs (i, i + d/2) where the GGUF's pairs are (2i, 2i + 1); that measures
/// 1.4e-5.
const TWIN_TOLERANCE_F32_KV: f64 = 1e-4;

/// The same on the CPU worker's path ([`AttentionPath::Host`]): the GGUF's matrices through our
/// kernels, the twin's through Candle's matmul (it has no in-place matrices), and keys and
/// values rounded to f16 in the host cache, where a summation-order difference of one f32 ulp
/// can flip a value by one f16 ulp (2^-11). The GGUF's own two paths differ by as much; the
/// twins measure up to 2.6e-3. A wrong weight, rope or routing moves log-probabilities by
/// tenths.
const TWIN_TOLERANCE_F16_KV: f64 = 1e-2;

/// The same for Gemma, whose test models amplify those flips (post-norms of about 24, logits
/// scaled up, soft caps): the GGUF's kernels and the same GGUF through Candle's matmul, both
/// with the host cache, differ by 1.0e-2 (Gemma 2) and 1.5e-2 (Gemma 3), and the twins measure
/// exactly that (on the f32 path they measure 0).
const TWIN_TOLERANCE_F16_KV_GEMMA: f64 = 3e-2;

/// The twin checkpoint, on the attention path `attention`, as a worker serves it on the CPU.
fn twin_decoder(dir: &Path, attention: AttentionPath) -> Decoder {
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let cfg = ModelConfig::from_hf_json(&text, "config.json").expect("twin config");
    let store = WeightStore::open_safetensors(dir, &[dir.join("model.safetensors")])
        .expect("open safetensors");
    let context = SERVED_CONTEXT.min(cfg.max_position_embeddings);
    let decoder = Decoder::load_with(
        cfg,
        &store,
        &Device::Cpu,
        context,
        DecoderOptions {
            cpu_pool: Some(Arc::new(ThreadPool::new(2))),
            attention: Some(attention),
            ..DecoderOptions::default()
        },
    )
    .expect("load safetensors twin");
    assert!(!decoder.uses_cpu_path(), "{}", decoder.compute_path());
    decoder
}

/// The twin's configuration is the GGUF's, but for what the formats say differently: the rope
/// pairs (the `llama` weights were permuted for them instead), Mixtral's name (a `llama` GGUF
/// with experts) and LongRoPE's factors (tensors in the GGUF, read at load).
fn assert_twin_config(name: &str, gguf: &Path, twin_dir: &Path) {
    let file = GgufFile::open(gguf).expect("open gguf");
    let mut expected = ModelConfig::from_gguf(&file).expect("gguf config");
    let text = std::fs::read_to_string(twin_dir.join("config.json")).expect("config.json");
    let twin = ModelConfig::from_hf_json(&text, "config.json").expect("twin config");
    expected.rope_style = twin.rope_style;
    if expected.architecture == Architecture::Llama && expected.moe.is_some() {
        expected.architecture = Architecture::Mixtral;
    }
    if matches!(twin.rope_scaling, RopeScaling::LongRope { .. }) {
        expected.rope_scaling = twin.rope_scaling.clone();
    }
    assert_eq!(
        expected, twin,
        "{name}: the twin's config.json reads differently"
    );
}

/// One family: the GGUF on each of its paths against the twin on the same attention path, all
/// of the family's reference prompts batched, [`TWIN_STEPS`] greedy steps: the same tokens, and
/// log-probabilities within the path's tolerance.
fn family_twin_matches_gguf(family: Family) {
    let model = FamilyModel::f32(family);
    let name = model.name();
    let reference = reference(model);
    let cases = reference["cases"].as_array().expect("cases");
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    assert!(!prompts.is_empty());
    let dir = TempDir::new(&format!("{name}-twin"));
    let path = dir.path().join(format!("{name}.gguf"));
    write_family_gguf(model, &path).expect("write gguf");
    let twin_dir = dir.path().join("hf");
    write_hf_twin(&path, &twin_dir).expect("convert to safetensors");
    assert_twin_config(&name, &path, &twin_dir);
    let mut failures = Vec::new();
    for (path_name, gguf) in decoders(&path) {
        let attention = gguf.attention_path();
        let tolerance = match attention {
            AttentionPath::Host if matches!(family, Family::Gemma2 | Family::Gemma3) => {
                TWIN_TOLERANCE_F16_KV_GEMMA
            }
            AttentionPath::Host => TWIN_TOLERANCE_F16_KV,
            AttentionPath::Device => TWIN_TOLERANCE_F32_KV,
        };
        let twin = twin_decoder(&twin_dir, attention);
        let want = greedy(&gguf, &prompts, TWIN_STEPS);
        let got = greedy(&twin, &prompts, TWIN_STEPS);
        let mut max_delta = 0f64;
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            if w.tokens != g.tokens {
                failures.push(format!(
                    "{name} gguf {path_name} case {i}: twin generated {:?}, gguf {:?}",
                    g.tokens, w.tokens
                ));
                continue;
            }
            for (step, (lw, lg)) in w.logprobs.iter().zip(&g.logprobs).enumerate() {
                let (id, delta) = lw
                    .iter()
                    .zip(lg)
                    .map(|(a, b)| (a - b).abs())
                    .enumerate()
                    .fold(
                        (0, 0f64),
                        |best, (id, d)| if d > best.1 { (id, d) } else { best },
                    );
                if delta > tolerance {
                    failures.push(format!(
                        "{name} gguf {path_name} case {i} step {step}: token {id} logprob \
                         {:.6} in the twin, {:.6} in the gguf",
                        lg[id], lw[id]
                    ));
                }
                max_delta = max_delta.max(delta);
            }
        }
        eprintln!(
            "{name}: twin vs gguf {path_name} ({attention:?} attention): max |dlogprob| \
             {max_delta:.2e} (tolerance {tolerance:.0e}) over {} prompts x {TWIN_STEPS} steps",
            prompts.len()
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Llama);
}

#[test]
fn qwen2_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Qwen2);
}

#[test]
fn phi3_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Phi3);
}

/// Mixtral's `block_sparse_moe` names, its q/k rows permuted back as for llama.
#[test]
fn mixtral_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Mixtral);
}

/// Qwen2-MoE's `mlp.experts.E.*`, its shared expert and the `(1, hidden)` shared-expert gate.
#[test]
fn qwen2moe_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Qwen2Moe);
}

#[test]
fn qwen3moe_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Qwen3Moe);
}

/// LongRoPE from `rope_scaling`, the rotary share from `partial_rotary_factor`, the attention
/// factor derived from the two contexts as the converter derived the GGUF's.
#[test]
fn phi3_longrope_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Phi3LongRope);
}

/// Gemma 2's names (`post_attention_layernorm` is the attention output's norm here), its norms
/// stored without the converter's `1 +`, the query scale from `query_pre_attn_scalar`, both
/// soft caps and sliding attention on every other layer.
#[test]
fn gemma2_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Gemma2);
}

/// Gemma 3 (`gemma3_text`): q/k norms without the `1 +`, `sliding_window_pattern`, the sliding
/// layers' rope base from `rope_local_base_freq` and linear scaling on the global layers only.
#[test]
fn gemma3_safetensors_twin_matches_gguf() {
    family_twin_matches_gguf(Family::Gemma3);
}
