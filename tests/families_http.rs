//! Each model family against llama.cpp through the OpenAI API of the real CPU binary: the same
//! small random-weight GGUFs and references as `tests/families.rs` (made by
//! `scripts/family_conformance.py` with `llama-server -c 512 -np 1`), but served by
//! `llm-worker-rbee-cpu` and asked through `POST /v1/completions` with the prompts as token ids,
//! greedily, with `logprobs` and `return_tokens_as_token_ids` so that the answer names every
//! generated token and its log-probability. Every case is asked alone, then all of a family's
//! cases at once so that the engine batches them; each answer is judged by the rule of
//! `shared/conformance/README.md` ([`common::conformance_rule`]), with llama.cpp's top
//! candidates checked against the answer's `top_logprobs` as well.
//!
//! One worker process per family, served with `--ctx-size 512` (LongRoPE picks its factors
//! from the serving context, as llama.cpp does from `-c`) and no prefix cache, so that every
//! request prefills its own prompt. `CONFORMANCE_VERBOSE=1` prints every step.

mod common;

use std::path::Path;

use common::WAIT;
use common::client::Client;
use common::conformance_rule::{LOGPROB_TOLERANCE, Outcome, compare, ids};
use common::families::{Family, FamilyModel, fnv1a, reference, write_family_gguf};
use common::process::WorkerProcess;
use common::tiny_models::TempDir;
use llm_worker_rbee::generation::FinishReason;
use serde_json::{Value, json};

/// The context llama-server ran the references with.
const SERVED_CONTEXT: &str = "512";

/// Candidates asked for with every token (the API's most): enough to hold every llama.cpp
/// candidate worth comparing on a 256-token vocabulary.
const TOP_LOGPROBS: usize = 20;

/// Candidates below this log-probability in llama.cpp's top list are not compared: far in the
/// tail, a 0.25 difference says nothing about the model (as in `tests/families.rs`).
const TOP_FLOOR: f64 = -8.0;

/// Starts the CPU binary on `gguf` and waits until its model is loaded; returns it and its
/// base URL. One compute thread: the tests of this file run two at a time on a 2-core machine.
fn start_worker(gguf: &Path, parallel: usize) -> (WorkerProcess, String) {
    let worker = WorkerProcess::start(|command| {
        command
            .arg("--model")
            .arg(gguf)
            .args(["--port", "0", "--ctx-size", SERVED_CONTEXT])
            .args(["--parallel", &parallel.to_string(), "--threads", "1"])
            .args(["--cache-ram", "0"]);
    });
    let base = worker.wait_for_line(WAIT, "the worker never said where it listens", |line| {
        let rest = line.split("listening on ").nth(1)?;
        Some(rest.split_whitespace().next()?.to_string())
    });
    worker.wait_for_line(WAIT, "the worker never loaded its model", |line| {
        line.contains("worker ready").then_some(())
    });
    (worker, base)
}

/// One answer of `/v1/completions`, read back into token ids.
struct Answer {
    outcome: Outcome,
    /// Each step's candidates as the answer lists them: (token id, log-probability).
    top: Vec<Vec<(u32, f64)>>,
}

/// The id in a `return_tokens_as_token_ids` name, `token_id:N`.
fn token_id(name: &str) -> u32 {
    name.strip_prefix("token_id:")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a token_id:N name: {name:?}"))
}

/// Asks for `prompt` greedily, `n_predict` tokens at most, and reads the answer.
async fn complete(client: &Client, prompt: &[u32], n_predict: usize) -> Answer {
    let body = json!({
        "prompt": prompt,
        "max_tokens": n_predict,
        "temperature": 0,
        "logprobs": TOP_LOGPROBS,
        "return_tokens_as_token_ids": true,
    });
    let response = tokio::time::timeout(WAIT, async {
        let r = client.post("/v1/completions", &body).await;
        let status = r.status();
        let text = r.text().await.expect("answer body");
        assert_eq!(status, 200, "{text}");
        text
    })
    .await
    .expect("no answer in time");
    let v: Value = serde_json::from_str(&response).expect("JSON answer");
    let choice = &v["choices"][0];
    let logprobs = &choice["logprobs"];
    let tokens: Vec<u32> = logprobs["tokens"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs.tokens: {v}"))
        .iter()
        .map(|t| token_id(t.as_str().expect("token name")))
        .collect();
    let token_logprobs: Vec<f32> = logprobs["token_logprobs"]
        .as_array()
        .expect("token_logprobs")
        .iter()
        .map(|x| x.as_f64().expect("logprob") as f32)
        .collect();
    let top: Vec<Vec<(u32, f64)>> = logprobs["top_logprobs"]
        .as_array()
        .expect("top_logprobs")
        .iter()
        .map(|m| {
            m.as_object()
                .expect("top_logprobs entry")
                .iter()
                .map(|(name, lp)| (token_id(name), lp.as_f64().expect("logprob")))
                .collect()
        })
        .collect();
    assert_eq!(token_logprobs.len(), tokens.len(), "{v}");
    assert_eq!(top.len(), tokens.len(), "{v}");
    // The prompt went in as it was sent: no BOS added, none dropped.
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len(), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], tokens.len(), "{v}");
    let finish = match choice["finish_reason"].as_str() {
        Some("stop") => FinishReason::Eos,
        Some("length") => FinishReason::MaxTokens,
        other => panic!("finish_reason {other:?}: {v}"),
    };
    Answer {
        outcome: Outcome {
            tokens,
            logprobs: token_logprobs,
            finish,
        },
        top,
    }
}

/// The README rule on one case, then the top candidates: on every step both agree on, each of
/// llama.cpp's top tokens above [`TOP_FLOOR`] within [`LOGPROB_TOLERANCE`] of the answer's (a
/// candidate missing from the answer's list must be one llama.cpp also puts below all of it).
/// Returns the summary and the largest candidate log-probability difference seen.
fn judge(case: &Value, answer: &Answer) -> Result<(String, f64), String> {
    let summary = compare(case, &answer.outcome)?;
    let want = ids(&case["generated_ids"]);
    let steps = case["steps"].as_array().ok_or("no steps")?;
    let mut max_delta = 0f64;
    for (i, (&got, &expected)) in answer.outcome.tokens.iter().zip(&want).enumerate() {
        if got != expected {
            break;
        }
        let ours = &answer.top[i];
        let lowest = ours.iter().map(|&(_, lp)| lp).fold(f64::INFINITY, f64::min);
        for top in steps[i]["top"].as_array().ok_or("no top")? {
            let reference = top["logprob"].as_f64().ok_or("no logprob")?;
            if reference < TOP_FLOOR {
                continue;
            }
            let id = top["id"].as_u64().ok_or("no id")? as u32;
            match ours.iter().find(|&&(t, _)| t == id) {
                Some(&(_, lp)) => {
                    let delta = (lp - reference).abs();
                    if delta > LOGPROB_TOLERANCE {
                        return Err(format!(
                            "step {i}: candidate {id} logprob {lp:.3}, llama.cpp {reference:.3}"
                        ));
                    }
                    max_delta = max_delta.max(delta);
                }
                None if reference > lowest + LOGPROB_TOLERANCE => {
                    return Err(format!(
                        "step {i}: candidate {id} (llama.cpp {reference:.3}) is not among the \
                         answer's top {TOP_LOGPROBS}, whose lowest is {lowest:.3}"
                    ));
                }
                None => {}
            }
        }
    }
    Ok((summary, max_delta))
}

/// The whole comparison for one family: one worker, every case alone, then all cases at once.
fn family_matches_llama_cpp_over_http(model: FamilyModel) {
    let name = model.name();
    let reference = reference(model);
    let cases = reference["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    let n_predict = reference["n_predict"].as_u64().expect("n_predict") as usize;
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let dir = TempDir::new(&format!("http-{name}"));
    let path = dir.path().join(format!("{name}.gguf"));
    write_family_gguf(model, &path).expect("write gguf");
    let digest = format!("{:016x}", fnv1a(&std::fs::read(&path).expect("read gguf")));
    assert_eq!(
        reference["gguf_fnv1a64"].as_str(),
        Some(digest.as_str()),
        "{name}: the rebuilt file is not the one llama.cpp ran; rerun scripts/family_conformance.py"
    );
    let (_worker, base) = start_worker(&path, cases.len());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (alone, batched) = runtime.block_on(async {
        let client = Client::new(base, None);
        let mut alone = Vec::new();
        for prompt in &prompts {
            alone.push(complete(&client, prompt, n_predict).await);
        }
        // All at once: every request is sent before any answer is awaited, so the engine
        // runs them in one batch.
        let mut requests = tokio::task::JoinSet::new();
        for (i, prompt) in prompts.iter().cloned().enumerate() {
            let client = client.clone();
            requests.spawn(async move { (i, complete(&client, &prompt, n_predict).await) });
        }
        let mut batched: Vec<(usize, Answer)> = requests.join_all().await;
        batched.sort_by_key(|&(i, _)| i);
        let batched: Vec<Answer> = batched.into_iter().map(|(_, a)| a).collect();
        (alone, batched)
    });
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        for (mode, answer) in [("alone", &alone[i]), ("batched", &batched[i])] {
            match judge(case, answer) {
                Ok((summary, max_delta)) => eprintln!(
                    "{name} http case {i} {mode}: {summary}; top candidates max |dlogprob| \
                     {max_delta:.4}"
                ),
                Err(e) => failures.push(format!("{name} http case {i} {mode}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn llama_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Llama));
}

#[test]
fn qwen2_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Qwen2));
}

#[test]
fn phi3_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Phi3));
}

#[test]
fn gemma2_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Gemma2));
}

#[test]
fn gemma3_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Gemma3));
}

#[test]
fn mixtral_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Mixtral));
}

#[test]
fn qwen2moe_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Qwen2Moe));
}

#[test]
fn qwen3moe_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Qwen3Moe));
}

#[test]
fn phi3_longrope_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::f32(Family::Phi3LongRope));
}

#[test]
fn llama_q8_0_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::q8_0(Family::Llama));
}

#[test]
fn gemma2_q8_0_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::q8_0(Family::Gemma2));
}

#[test]
fn gemma3_q8_0_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::q8_0(Family::Gemma3));
}

#[test]
fn qwen3moe_q8_0_matches_llama_cpp_over_http() {
    family_matches_llama_cpp_over_http(FamilyModel::q8_0(Family::Qwen3Moe));
}

/// Every entry of [`FamilyModel::ALL`] has its test above.
#[test]
fn every_family_model_is_served_here() {
    let source = include_str!("families_http.rs");
    for model in FamilyModel::ALL {
        let constructor = match model.q8_0 {
            true => "q8_0",
            false => "f32",
        };
        let call = format!("FamilyModel::{constructor}(Family::{:?})", model.family);
        assert!(source.contains(&call), "no test serves {}", model.name());
    }
}
