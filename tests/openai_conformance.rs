//! Conformance with llama.cpp through the OpenAI API, on the default model: every `chat` case
//! of `shared/conformance/generate.json` is sent as messages (the user text alone; the model's
//! template adds its default system prompt) to a greedy `/v1/chat/completions` on a real
//! in-process server. The prompt the engine is given must be the case's `prompt_ids` exactly,
//! and the generated tokens must pass the README's comparison rule
//! ([`common::conformance_rule`]).
//!
//! The generated ids are read from the response's `logprobs` with vLLM's
//! `return_tokens_as_token_ids`; the prompt ids from a backend wrapper that records what the
//! engine fed the model.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::client::Client;
use common::conformance_rule::{Outcome, compare, ids};
use common::default_model::{conformance_file, load_default_model, read_json};
use common::worker::{serve, worker_config};
use llm_worker_rbee::engine::{BackendError, BatchItem, InferenceBackend, ModelMeta, SeqId};
use llm_worker_rbee::generation::FinishReason;
use llm_worker_rbee::worker::Worker;
use serde_json::{Value, json};

/// The template's default system prompt around the user's text (README, `kind: chat`).
const CHAT_PREFIX: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, \
                           trained by Hugging Face<|im_end|>\n<|im_start|>user\n";
const CHAT_SUFFIX: &str = "<|im_end|>\n<|im_start|>assistant\n";

/// Every token each sequence was fed (prompt chunks, then its generated tokens).
type Fed = Arc<Mutex<HashMap<SeqId, Vec<u32>>>>;

struct Recording<B> {
    inner: B,
    fed: Fed,
}

impl<B: InferenceBackend> InferenceBackend for Recording<B> {
    fn meta(&self) -> &ModelMeta {
        self.inner.meta()
    }

    fn forward(&mut self, batch: &[BatchItem<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        if let Ok(mut fed) = self.fed.lock() {
            for item in batch {
                fed.entry(item.seq)
                    .or_default()
                    .extend_from_slice(item.tokens);
            }
        }
        self.inner.forward(batch)
    }

    fn release(&mut self, seq: SeqId) {
        self.inner.release(seq);
    }

    fn kv_cache_bytes(&self) -> usize {
        self.inner.kv_cache_bytes()
    }
}

/// The generated ids and log-probabilities of a response asked with
/// `return_tokens_as_token_ids`, and its finish.
fn outcome(response: &Value) -> Result<(Outcome, Vec<Vec<u8>>), String> {
    let choice = &response["choices"][0];
    let content = choice["logprobs"]["content"]
        .as_array()
        .ok_or_else(|| format!("no logprobs in {response}"))?;
    let mut tokens = Vec::new();
    let mut logprobs = Vec::new();
    let mut bytes = Vec::new();
    for entry in content {
        let id = entry["token"]
            .as_str()
            .and_then(|t| t.strip_prefix("token_id:"))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("token is not `token_id:N`: {entry}"))?;
        tokens.push(id);
        logprobs.push(entry["logprob"].as_f64().ok_or("no logprob")? as f32);
        bytes.push(
            entry["bytes"]
                .as_array()
                .ok_or("no bytes")?
                .iter()
                .map(|b| b.as_u64().unwrap_or(256) as u8)
                .collect(),
        );
    }
    // No stop strings were sent: `stop` can only be an end-of-generation token.
    let finish = match choice["finish_reason"].as_str() {
        Some("stop") => FinishReason::Eos,
        Some("length") => FinishReason::MaxTokens,
        other => return Err(format!("finish_reason {other:?}")),
    };
    Ok((
        Outcome {
            tokens,
            logprobs,
            finish,
        },
        bytes,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_cases_through_the_openai_api_match_llama_cpp() {
    let cases = read_json(&conformance_file("generate.json"));
    let cases: Vec<Value> = cases
        .as_array()
        .expect("list of cases")
        .iter()
        .filter(|c| c["kind"] == "chat")
        .cloned()
        .collect();
    assert!(!cases.is_empty(), "generate.json has no chat cases");

    let backend = load_default_model().await;
    let fed: Fed = Arc::default();
    let worker = Worker::new(worker_config(cases.len()));
    worker
        .attach(Recording {
            inner: backend,
            fed: fed.clone(),
        })
        .expect("start the engine");
    let client = Client::new(serve(worker.router()).await, None);
    let (_, models) = client.get_json("/v1/models").await;
    let model = models["data"][0]["id"].as_str().unwrap().to_string();

    // All cases at once, as clients would send them: the engine batches them.
    let start = Instant::now();
    let requests = cases.iter().map(|case| {
        let prompt = case["prompt"].as_str().expect("prompt");
        let message = prompt
            .strip_prefix(CHAT_PREFIX)
            .and_then(|p| p.strip_suffix(CHAT_SUFFIX))
            .unwrap_or_else(|| panic!("not a default-system-prompt chat case: {prompt:?}"));
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": message}],
            "temperature": 0,
            "max_tokens": case["n_predict"],
            "logprobs": true,
            "return_tokens_as_token_ids": true,
        });
        let request = client
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .json(&body);
        async move {
            let r = request.send().await.expect("request");
            let status = r.status();
            let v: Value = r.json().await.expect("JSON body");
            assert_eq!(status, 200, "{v}");
            v
        }
    });
    let responses = futures_util::future::join_all(requests).await;
    let elapsed = start.elapsed();

    let fed = fed.lock().unwrap().clone();
    let mut failures = Vec::new();
    for (i, (case, response)) in cases.iter().zip(&responses).enumerate() {
        let want_prompt = ids(&case["prompt_ids"]);
        let fed_prompt = fed.values().any(|tokens| tokens.starts_with(&want_prompt));
        let label = format!(
            "chat case {i} ({:?})",
            case["prompt"].as_str().unwrap_or("")
        );
        if !fed_prompt || response["usage"]["prompt_tokens"] != want_prompt.len() {
            let prefixes: Vec<&[u32]> = fed
                .values()
                .map(|t| &t[..t.len().min(want_prompt.len())])
                .collect();
            failures.push(format!(
                "{label}: the engine was not fed prompt_ids {want_prompt:?} (usage {}; fed \
                 {prefixes:?})",
                response["usage"]
            ));
            continue;
        }
        let (ours, bytes) = match outcome(response) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{label}: {e}"));
                continue;
            }
        };
        // The bytes reported for each matching token are llama.cpp's piece bytes.
        let steps = case["steps"].as_array().expect("steps");
        for (step, (id, got)) in steps.iter().zip(ours.tokens.iter().zip(&bytes)) {
            if step["id"].as_u64() != Some(u64::from(*id)) {
                break;
            }
            let want: Vec<u8> = step["bytes"]
                .as_array()
                .map(|b| b.iter().map(|x| x.as_u64().unwrap_or(0) as u8).collect())
                .unwrap_or_default();
            if *got != want {
                failures.push(format!("{label}: token {id} bytes {got:?}, want {want:?}"));
            }
        }
        match compare(case, &ours) {
            Ok(summary) => {
                if summary.starts_with("all") {
                    let content = &response["choices"][0]["message"]["content"];
                    if content != &case["generated_text"] {
                        failures.push(format!(
                            "{label}: content {content}, llama.cpp {}",
                            case["generated_text"]
                        ));
                    }
                }
                eprintln!("{label}: prompt ids equal; {summary}");
            }
            Err(e) => failures.push(format!("{label}: prompt ids equal; {e}")),
        }
    }
    eprintln!(
        "{} chat cases through /v1/chat/completions in {:.2}s",
        cases.len(),
        elapsed.as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
