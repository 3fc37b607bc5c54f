//! The OpenAI-compatible API through a real socket against the scripted fake backend: request
//! mapping, validation and unsupported-feature errors in OpenAI's shape, response and stream
//! framing, `include_usage`, stop, length, logprobs, auth, the shared queue's 503, the
//! tokenizer routes, `--chat-template`, and that a client that goes away cancels its job.

mod common;

use std::time::Duration;

use common::fake_backend::{
    EOS, Fault, FaultKind, IM_END, IM_START, MODEL, script_tokens, tiny_tokenizer,
};
use common::sse::{SseEvent, SseReader};
use common::worker::{Setup, TestWorker};
use common::{WAIT, wait_until};
use llm_worker_rbee::engine::{CancelReason, JobSink};
use llm_worker_rbee::jobs::JobState;
use llm_worker_rbee::model::chat_template::ChatTemplate;
use serde_json::{Value, json};

const CONTEXT: usize = 128;
const TOKEN: &str = "s3cret";

/// A worker with two slots, eight queue places and the token.
fn setup() -> Setup {
    Setup {
        queue: 8,
        token: Some(TOKEN),
        context: CONTEXT,
        // Far longer than any test: a cancellation seen here is the request's own. SSE
        // keep-alives come at half the grace (at least 250 ms).
        grace: Duration::from_secs(600),
        ..Setup::default()
    }
}

impl TestWorker {
    /// A 200 JSON answer.
    async fn ok(&self, path: &str, body: Value) -> Value {
        let r = self.post(path, &body).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{path} {body}: {v}");
        v
    }

    /// Every event of a 200 SSE answer.
    async fn stream_answer(&self, path: &str, body: Value) -> Vec<SseEvent> {
        let r = self.post(path, &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        assert_eq!(r.headers()["x-accel-buffering"], "no");
        SseReader::new(r).collect(WAIT).await
    }

    /// A short greedy completion answers with the script's start: the engine serves.
    async fn completes_a_request(&self) {
        let v = self
            .ok(
                "/v1/completions",
                json!({"prompt": "x", "temperature": 0, "max_tokens": 2}),
            )
            .await;
        assert_eq!(v["choices"][0]["text"], "He");
    }

    fn job_state(&self, id: &str) -> Option<JobState> {
        // The jobs belong to the one key, which the test set-up names `default`.
        self.worker.registry().get("default", id).map(|r| r.state())
    }

    fn running(&self) -> usize {
        self.worker.registry().served().map_or(0, |s| {
            s.stats.running.load(std::sync::atomic::Ordering::SeqCst)
        })
    }

    fn queued(&self) -> usize {
        self.worker.registry().queue().len()
    }
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Asserts an error in OpenAI's shape and returns its `error` object.
async fn expect_error(r: reqwest::Response, status: u16) -> Value {
    assert_eq!(r.status(), status);
    let v: Value = r.json().await.unwrap();
    let e = v["error"].clone();
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    let keys: Vec<&String> = e.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["message", "type", "param", "code"], "{v}");
    e
}

fn chunks(events: &[SseEvent]) -> Vec<Value> {
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(|e| {
            assert!(
                e.event.is_none() && e.id.is_none(),
                "data-only events: {e:?}"
            );
            e.json()
        })
        .collect()
}

fn tokens_of(text: &str) -> Vec<u32> {
    tiny_tokenizer().encode(text, true).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Models and routes

#[tokio::test]
async fn models_lists_exactly_the_served_model() {
    let w = TestWorker::start(setup()).await;
    let (status, v) = w.get_json("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], MODEL);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["owned_by"], "llm-worker-rbee");
    assert!(data[0]["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(data[0]["max_model_len"], CONTEXT);

    let (status, v) = w.get_json(&format!("/v1/models/{MODEL}")).await;
    assert_eq!(status, 200);
    assert_eq!(v["id"], MODEL);

    let r = w
        .request(reqwest::Method::GET, "/v1/models/org/other")
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 404).await;
    assert_eq!(e["code"], "model_not_found");
    // An id that is not UTF-8 once decoded: OpenAI's error shape, not axum's plain text.
    let r = w
        .request(reqwest::Method::GET, "/v1/models/%ff%fe")
        .send()
        .await
        .unwrap();
    let e = expect_error(r, 400).await;
    assert_eq!(e["param"], "model", "{e}");

    let r = w.post("/v1/nope", &json!({})).await;
    let e = expect_error(r, 404).await;
    assert_eq!(e["type"], "invalid_request_error");
    let r = w.post("/v1/models", &json!({})).await;
    expect_error(r, 405).await;
    let r = w
        .request(reqwest::Method::GET, "/v1/chat/completions")
        .send()
        .await
        .unwrap();
    expect_error(r, 405).await;
    // The job API keeps its own error shape.
    let (status, v) = w.get_json("/v1/jobs/nope").await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "JOB_NOT_FOUND");
}

// ---------------------------------------------------------------------------------------------
// Chat

#[tokio::test]
async fn chat_renders_chatml_and_answers_in_openai_shape() {
    let w = TestWorker::start(setup()).await;
    let v = w
        .ok(
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                "max_tokens": 5, "temperature": 0}),
        )
        .await;
    // No template in the fake model: plain ChatML.
    let prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                  <|im_start|>assistant\n";
    assert_eq!(w.prompts(1).await[0], tokens_of(prompt));
    assert_eq!(tokens_of(prompt)[0], IM_START);

    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], MODEL);
    assert!(v["system_fingerprint"].as_str().unwrap().starts_with("fp_"));
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello");
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["finish_reason"], "length");
    let n = tokens_of(prompt).len();
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": n, "completion_tokens": 5, "total_tokens": n + 5,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );
}

#[tokio::test]
async fn eos_and_stop_strings_finish_with_stop() {
    let mut script = script_tokens("Hi there");
    script.push(IM_END);
    let w = TestWorker::start(Setup { script, ..setup() }).await;
    let v = w
        .ok(
            "/v1/chat/completions",
            json!({"messages": user("x"), "temperature": 0, "max_tokens": 50}),
        )
        .await;
    assert_eq!(v["choices"][0]["message"]["content"], "Hi there");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 9, "the end token counts");
    // Its log-probability entry is there too, empty as in the content (llama-server's way).
    let v = w
        .ok(
            "/v1/chat/completions",
            json!({"messages": user("x"), "temperature": 0, "logprobs": true}),
        )
        .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 9);
    assert_eq!(content[8]["token"], "");
    assert_eq!(content[8]["bytes"], json!([]));

    let v = w
        .ok(
            "/v1/completions",
            json!({"prompt": "x", "temperature": 0, "max_tokens": 50, "stop": "the"}),
        )
        .await;
    assert_eq!(v["choices"][0]["text"], "Hi ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let v = w
        .ok(
            "/v1/completions",
            json!({"prompt": "x", "temperature": 0, "max_tokens": 50, "stop": ["zz", "re"]}),
        )
        .await;
    assert_eq!(v["choices"][0]["text"], "Hi the");
}

#[tokio::test]
async fn without_max_tokens_generation_runs_until_the_context_is_full() {
    let w = TestWorker::start(setup()).await;
    let v = w
        .ok(
            "/v1/completions",
            json!({"prompt": "abcd", "temperature": 0}),
        )
        .await;
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], CONTEXT - 4);
    assert_eq!(v["usage"]["total_tokens"], CONTEXT);

    let r = w
        .post(
            "/v1/completions",
            &json!({"prompt": "abcd", "max_tokens": CONTEXT - 3}),
        )
        .await;
    let e = expect_error(r, 400).await;
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "prompt");
}

#[tokio::test]
async fn chat_stream_framing_with_and_without_usage() {
    let w = TestWorker::start(setup()).await;
    let body = json!({"messages": user("x"), "temperature": 0, "max_tokens": 10, "stream": true});
    let chunks_plain = chunks(&w.stream_answer("/v1/chat/completions", body).await);
    let first = &chunks_plain[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(
        first["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(first["choices"][0]["finish_reason"].is_null());
    let id = first["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    let mut text = String::new();
    for c in &chunks_plain[1..chunks_plain.len() - 1] {
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], MODEL);
        assert!(
            c.get("usage").is_none(),
            "no usage field without include_usage"
        );
        assert!(c["choices"][0]["delta"].get("role").is_none());
        assert!(c["choices"][0]["finish_reason"].is_null());
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    // "ö" is two byte tokens: its first half sends no chunk.
    assert_eq!(text, "Hello, wö");
    assert_eq!(chunks_plain.len(), 1 + 9 + 1);
    let last = chunks_plain.last().unwrap();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    let body = json!({"messages": user("x"), "temperature": 0, "max_tokens": 10, "stream": true,
                      "stream_options": {"include_usage": true}});
    let with_usage = chunks(&w.stream_answer("/v1/chat/completions", body).await);
    let (usage_chunk, rest) = with_usage.split_last().unwrap();
    for c in rest {
        assert!(c["usage"].is_null() && c.get("usage").is_some(), "{c}");
    }
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 10);
    let prompt_tokens = usage_chunk["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage_chunk["usage"]["total_tokens"], prompt_tokens + 10);
    assert_eq!(
        rest.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn chat_logprobs_name_tokens_bytes_and_alternatives() {
    let w = TestWorker::start(setup()).await;
    let v = w
        .ok(
            "/v1/chat/completions",
            json!({"messages": user("x"), "max_tokens": 10, "temperature": 0,
                   "logprobs": true, "top_logprobs": 2}),
        )
        .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 10);
    assert_eq!(content[0]["token"], "H");
    assert_eq!(content[0]["bytes"], json!([72]));
    // Logit 10 against 258 zeros.
    let expected = 10.0 - (10f64.exp() + 258.0).ln();
    assert!((content[0]["logprob"].as_f64().unwrap() - expected).abs() < 1e-4);
    let top = content[0]["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top[0]["token"], "H");
    assert_eq!(top[1]["token"], "\u{0}", "ties go to the lowest id");
    // The two halves of "ö": their own bytes, text that is not UTF-8 on its own.
    assert_eq!(content[8]["bytes"], json!([0xC3]));
    assert_eq!(content[9]["bytes"], json!([0xB6]));
    assert_eq!(content[8]["token"], "\u{FFFD}");

    let v = w
        .ok(
            "/v1/chat/completions",
            json!({"messages": user("x"), "temperature": 0, "max_tokens": 2, "logprobs": true,
                   "return_tokens_as_token_ids": true}),
        )
        .await;
    let content = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(content[0]["token"], "token_id:72");
    assert_eq!(content[0]["top_logprobs"], json!([]));

    let body = json!({"messages": user("x"), "temperature": 0, "max_tokens": 3, "stream": true,
                      "logprobs": true, "top_logprobs": 1});
    let cs = chunks(&w.stream_answer("/v1/chat/completions", body).await);
    let streamed: Vec<&Value> = cs[1..cs.len() - 1]
        .iter()
        .map(|c| &c["choices"][0]["logprobs"]["content"][0])
        .collect();
    assert_eq!(streamed.len(), 3);
    assert_eq!(streamed[2]["token"], "l");
    assert_eq!(streamed[2]["top_logprobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn same_seed_same_text() {
    let w = TestWorker::start(setup()).await;
    // At temperature 2 the scripted token has about a third of the mass: seeds matter.
    let run = |seed: u64| {
        let body = json!({"prompt": "x", "max_tokens": 24, "temperature": 2, "seed": seed});
        let w = &w;
        async move { w.ok("/v1/completions", body).await["choices"][0]["text"].clone() }
    };
    let a = run(11).await;
    assert_eq!(a, run(11).await);
    assert_ne!(a, run(12).await);
}

// ---------------------------------------------------------------------------------------------
// Completions

#[tokio::test]
async fn completions_in_openai_shape_with_logprobs() {
    let w = TestWorker::start(setup()).await;
    let v = w
        .ok(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "<|im_start|>ab", "max_tokens": 10,
                   "logprobs": 2, "temperature": 0}),
        )
        .await;
    assert_eq!(w.prompts(1).await[0], vec![IM_START, 97, 98]);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "Hello, wö");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 10);
    assert_eq!(lp["tokens"][1], "e");
    assert_eq!(lp["text_offset"][0], 0);
    assert_eq!(lp["text_offset"][1], 1);
    assert!(lp["token_logprobs"][0].as_f64().unwrap() < 0.0);
    let top = lp["top_logprobs"][0].as_object().unwrap();
    assert_eq!(top.len(), 2);
    assert!(top.contains_key("H"));

    // Token ids as the prompt.
    w.ok(
        "/v1/completions",
        json!({"prompt": [IM_START, 120], "temperature": 0, "max_tokens": 1}),
    )
    .await;
    assert_eq!(w.prompts(2).await[1], vec![IM_START, 120]);

    let body = json!({"prompt": "x", "temperature": 0, "max_tokens": 4, "stream": true,
                      "stream_options": {"include_usage": true}});
    let cs = chunks(&w.stream_answer("/v1/completions", body).await);
    assert_eq!(cs.len(), 4 + 2);
    let text: String = cs[..4]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, "Hell");
    for c in &cs[..5] {
        assert_eq!(c["object"], "text_completion");
        assert!(c["usage"].is_null() && c.get("usage").is_some());
    }
    assert_eq!(cs[4]["choices"][0]["finish_reason"], "length");
    assert_eq!(cs[5]["choices"], json!([]));
    assert_eq!(cs[5]["usage"]["completion_tokens"], 4);
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test]
async fn validation_and_unsupported_features_are_400s_naming_the_field() {
    let w = TestWorker::start(setup()).await;
    let cases = [
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "n": 17}),
            "n",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "tools": [{"type": "function", "function": {"name": "f g"}}]}),
            "tools[0].function.name",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "top_logprobs": 3}),
            "top_logprobs",
        ),
        ("/v1/chat/completions", json!({"messages": []}), "messages"),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "temperature": 5}),
            "temperature",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": user("x"), "logit_bias": {"999": 1}}),
            "logit_bias.999",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "echo": true}),
            "echo",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "suffix": "y"}),
            "suffix",
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "best_of": 3}),
            "best_of",
        ),
        ("/v1/completions", json!({"prompt": "x", "n": 0}), "n"),
        ("/v1/completions", json!({"prompt": [1, 9999]}), "prompt[1]"),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
    ];
    for (path, body, param) in cases {
        let e = expect_error(w.post(path, &body).await, 400).await;
        assert_eq!(e["param"], param, "{body}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
        assert!(
            e["message"].as_str().unwrap().contains(param),
            "the message names {param}: {e}"
        );
    }

    // Over 2 KiB: templated and tokenized on the blocking pool, then too long for the context.
    let long = "a".repeat(3000);
    let e = expect_error(
        w.post("/v1/chat/completions", &json!({"messages": user(&long)}))
            .await,
        400,
    )
    .await;
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "messages");

    let e = expect_error(
        w.post(
            "/v1/chat/completions",
            &json!({"model": "gpt-4o", "messages": user("x")}),
        )
        .await,
        404,
    )
    .await;
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    // No model at all is accepted: the served one.
    w.ok("/v1/completions", json!({"prompt": "x", "max_tokens": 1}))
        .await;

    let r = w
        .request(reqwest::Method::POST, "/v1/completions")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_error(r, 400).await;
    let r = w
        .request(reqwest::Method::POST, "/v1/completions")
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_error(r, 415).await;
    let huge = "x".repeat(3 * 1024 * 1024);
    let r = w.post("/v1/completions", &json!({"prompt": huge})).await;
    let e = expect_error(r, 413).await;
    assert_eq!(e["code"], "payload_too_large");
}

#[tokio::test]
async fn the_token_is_required_and_401s_are_openai_shaped() {
    let w = TestWorker::start(setup()).await;
    for (method, path) in [
        (reqwest::Method::POST, "/v1/chat/completions"),
        (reqwest::Method::POST, "/v1/completions"),
        (reqwest::Method::GET, "/v1/models"),
        (reqwest::Method::POST, "/tokenize"),
    ] {
        let r = w
            .http
            .request(method.clone(), format!("{}{path}", w.base))
            .json(&json!({"messages": user("x"), "prompt": "x", "content": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let e = expect_error(r, 401).await;
        assert_eq!(e["code"], "invalid_api_key", "{path}");
        let r = w
            .http
            .request(method, format!("{}{path}", w.base))
            .bearer_auth("wrong")
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        expect_error(r, 401).await;
    }
    assert!(w.worker.registry().is_empty(), "nothing was submitted");
}

#[tokio::test]
async fn loading_and_a_full_queue_are_503s_with_retry_after() {
    let w = TestWorker::start(Setup {
        attach: false,
        parallel: 1,
        queue: 1,
        step_delay: Duration::from_millis(5),
        ..setup()
    })
    .await;
    let r = w.post("/v1/completions", &json!({"prompt": "x"})).await;
    assert_eq!(r.headers()["retry-after"], "5");
    let e = expect_error(r, 503).await;
    assert_eq!(e["code"], "model_loading");
    expect_error(
        w.request(reqwest::Method::GET, "/v1/models")
            .send()
            .await
            .unwrap(),
        503,
    )
    .await;

    w.attach();
    // One running, one queued; the third is refused at once.
    let long = json!({"prompt": "x", "max_tokens": 100, "stream": true});
    let running = w.post("/v1/completions", &long).await;
    wait_until("the first job runs", || async { w.running() == 1 }).await;
    let queued = w.post("/v1/completions", &long).await;
    wait_until("the second job waits", || async { w.queued() == 1 }).await;
    let r = w
        .post("/v1/chat/completions", &json!({"messages": user("x")}))
        .await;
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let e = expect_error(r, 503).await;
    assert_eq!(e["code"], "all_slots_busy");
    assert_eq!(e["type"], "server_error");
    drop((running, queued));
}

#[tokio::test]
async fn a_queued_stream_gets_keep_alive_comments() {
    let w = TestWorker::start(Setup {
        parallel: 1,
        step_delay: Duration::from_millis(50),
        grace: Duration::from_millis(500),
        ..setup()
    })
    .await;
    let body = json!({"prompt": "x", "max_tokens": 100, "stream": true});
    let running = w.post("/v1/completions", &body).await;
    wait_until("the first job runs", || async { w.running() == 1 }).await;
    let mut queued = SseReader::new(w.post("/v1/completions", &body).await);
    // No chunk while it waits, only comments.
    let waited = tokio::time::timeout(Duration::from_millis(900), queued.next()).await;
    assert!(waited.is_err(), "a chunk arrived while queued: {waited:?}");
    assert!(
        queued.comments >= 2,
        "{} keep-alive comments",
        queued.comments
    );
    drop((running, queued));
}

// ---------------------------------------------------------------------------------------------
// A client that goes away

#[tokio::test]
async fn a_dropped_stream_cancels_its_job_at_once() {
    let w = TestWorker::start(Setup {
        parallel: 1,
        step_delay: Duration::from_millis(50),
        ..setup()
    })
    .await;
    let body = json!({"messages": user("x"), "max_tokens": 100, "stream": true});
    let r = w.post("/v1/chat/completions", &body).await;
    let mut reader = SseReader::new(r);
    let first = reader.next_within(WAIT).await.unwrap().json();
    let running_id = first["id"].as_str().unwrap().to_string();
    // A second stream waits in the queue behind the first.
    let r = w.post("/v1/chat/completions", &body).await;
    let mut queued_reader = SseReader::new(r);
    let queued_id = queued_reader.next_within(WAIT).await.unwrap().json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_until("the first job runs", || async {
        w.job_state(&running_id) == Some(JobState::Running)
    })
    .await;
    assert_eq!(w.job_state(&queued_id), Some(JobState::Queued));

    drop(queued_reader);
    let took = wait_until("the queued job is cancelled", || async {
        w.job_state(&queued_id) == Some(JobState::Cancelled)
    })
    .await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    drop(reader);
    wait_until("the running job is cancelled", || async {
        w.job_state(&running_id) == Some(JobState::Cancelled)
    })
    .await;
    let record = w.worker.registry().get("default", &running_id).unwrap();
    assert_eq!(record.cancel_requested(), Some(CancelReason::Disconnect));
    assert_eq!(w.running(), 0);
}

#[tokio::test]
async fn a_client_that_gives_up_on_a_json_answer_cancels_its_job() {
    let w = TestWorker::start(Setup {
        parallel: 1,
        step_delay: Duration::from_millis(50),
        ..setup()
    })
    .await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let send = |path: &'static str, body: Value| {
        let rb = impatient
            .post(format!("{}{path}", w.base))
            .bearer_auth(TOKEN)
            .json(&body);
        async move { rb.send().await }
    };
    // One runs (for 5 s if nobody stops it), one waits behind it; both clients give up.
    let (a, b) = tokio::join!(
        send(
            "/v1/chat/completions",
            json!({"messages": user("x"), "max_tokens": 100})
        ),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            send("/v1/completions", json!({"prompt": "x", "max_tokens": 100})).await
        }
    );
    assert!(a.unwrap_err().is_timeout());
    assert!(b.unwrap_err().is_timeout());
    let took = wait_until("both jobs are gone", || async {
        w.running() == 0 && w.queued() == 0
    })
    .await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    // The engine is free again at once.
    w.completes_a_request().await;
}

// ---------------------------------------------------------------------------------------------
// A failing model

#[tokio::test]
async fn a_failed_step_ends_a_stream_with_an_error_object_and_a_request_with_a_500() {
    let fault = Fault {
        step: 3,
        kind: FaultKind::Error,
    };
    let w = TestWorker::start(Setup {
        fault: Some(fault),
        ..setup()
    })
    .await;
    let body = json!({"messages": user("x"), "temperature": 0, "max_tokens": 10, "stream": true});
    let streamed = chunks(&w.stream_answer("/v1/chat/completions", body).await);
    // The role chunk, one chunk per token of steps 0 to 2, then the error instead of a finish
    // chunk; `chunks` has checked that `[DONE]` still closes the stream.
    let (error, before) = streamed.split_last().unwrap();
    assert_eq!(before.len(), 1 + 3, "{streamed:?}");
    let mut text = String::new();
    for c in before {
        assert!(c["choices"][0]["finish_reason"].is_null(), "{c}");
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert_eq!(text, "Hel");
    assert_eq!(
        error,
        &json!({"error": {
            "message": format!("inference failed: {}", fault.message()),
            "type": "server_error",
            "param": null,
            "code": "inference_failed",
        }})
    );

    // The fault was one step: the worker goes on.
    w.completes_a_request().await;

    // A JSON answer whose job fails is a 500 with the same error.
    let w = TestWorker::start(Setup {
        fault: Some(Fault { step: 0, ..fault }),
        ..setup()
    })
    .await;
    let r = w
        .post(
            "/v1/completions",
            &json!({"prompt": "x", "temperature": 0, "max_tokens": 2}),
        )
        .await;
    let e = expect_error(r, 500).await;
    assert_eq!(e["code"], "inference_failed");
    assert_eq!(e["type"], "server_error");
}

// ---------------------------------------------------------------------------------------------
// Tokenizer routes and the chat template override

#[tokio::test]
async fn tokenize_and_detokenize_in_llama_server_shapes() {
    let w = TestWorker::start(setup()).await;
    let v = w
        .ok("/tokenize", json!({"content": "<|im_start|>hö"}))
        .await;
    assert_eq!(v["tokens"], json!([IM_START, 104, 0xC3, 0xB6]));
    let v = w
        .ok(
            "/tokenize",
            json!({"content": "<|im_start|>", "parse_special": false}),
        )
        .await;
    assert_eq!(v["tokens"].as_array().unwrap().len(), "<|im_start|>".len());
    let v = w
        .ok(
            "/tokenize",
            json!({"content": "<|im_start|>hö", "with_pieces": true}),
        )
        .await;
    assert_eq!(
        v["tokens"],
        json!([{"id": IM_START, "piece": "<|im_start|>"}, {"id": 104, "piece": "h"},
               {"id": 0xC3, "piece": [0xC3]}, {"id": 0xB6, "piece": [0xB6]}])
    );
    let v = w
        .ok(
            "/detokenize",
            json!({"tokens": [IM_START, 104, 0xC3, 0xB6, EOS]}),
        )
        .await;
    assert_eq!(v["content"], "<|im_start|>hö<|endoftext|>");
    let e = expect_error(
        w.post("/detokenize", &json!({"tokens": [99999]})).await,
        400,
    )
    .await;
    assert_eq!(e["param"], "tokens");
    let e = expect_error(w.post("/tokenize", &json!({})).await, 400).await;
    assert_eq!(e["param"], "content");
}

#[tokio::test]
async fn chat_template_override_is_used_with_the_models_special_tokens() {
    let template = ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}\
         {% if add_generation_prompt %}[assistant] {% endif %}",
        "",
        "",
    )
    .unwrap();
    let w = TestWorker::start(Setup {
        chat_template: Some(template),
        ..setup()
    })
    .await;
    w.ok(
        "/v1/chat/completions",
        json!({"messages": user("hi"), "max_tokens": 1}),
    )
    .await;
    // The fake tokenizer has no BOS: bos_token renders empty.
    assert_eq!(w.prompts(1).await[0], tokens_of("[user] hi\n[assistant] "));
    w.ok(
        "/v1/chat/completions",
        json!({"messages": user("hi"), "max_tokens": 1, "add_generation_prompt": false}),
    )
    .await;
    assert_eq!(w.prompts(2).await[1], tokens_of("[user] hi\n"));
}

// ---------------------------------------------------------------------------------------------
// Thinking and tool calls taken out of the text

/// A Hermes-style template that also knows thinking tags, and a model that writes both.
async fn thinking_tool_worker() -> TestWorker {
    let template = ChatTemplate::new(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         {% if tools %}{% for t in tools %}{{ t.function.name }} {% endfor %}<tool_call></tool_call>{% endif %}\
         {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{# <think></think> #}",
        "",
        "",
    )
    .unwrap();
    let mut script = script_tokens(
        "<think>plan it</think>\n\nSure.<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>",
    );
    script.push(IM_END);
    TestWorker::start(Setup {
        script,
        chat_template: Some(template),
        context: 512,
        ..setup()
    })
    .await
}

fn tool_body(stream: bool) -> Value {
    json!({
        "messages": user("go"), "max_tokens": 200, "temperature": 0, "stream": stream,
        "tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]
    })
}

#[tokio::test]
async fn thinking_and_tool_calls_come_out_of_the_text_whole_and_streamed() {
    let w = thinking_tool_worker().await;
    let v = w.ok("/v1/chat/completions", tool_body(false)).await;
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let m = &choice["message"];
    assert_eq!(m["reasoning_content"], "plan it");
    assert_eq!(m["content"], "Sure.");
    let call = &m["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "f");
    assert_eq!(call["function"]["arguments"], "{\"x\":1}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));

    // The stream: the same pieces, the call's id and name before its arguments.
    let events = w
        .stream_answer("/v1/chat/completions", tool_body(true))
        .await;
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(SseEvent::json)
        .collect();
    let mut reasoning = String::new();
    let mut content = String::new();
    let mut name = String::new();
    let mut arguments = String::new();
    for c in &chunks {
        let d = &c["choices"][0]["delta"];
        reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        content.push_str(d["content"].as_str().unwrap_or(""));
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            assert_eq!(tc["index"], 0);
            if let Some(n) = tc["function"]["name"].as_str() {
                assert!(arguments.is_empty(), "the name comes first");
                assert!(tc["id"].is_string());
                name.push_str(n);
            }
            arguments.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(
        (reasoning.as_str(), content.as_str(), name.as_str()),
        ("plan it", "Sure.", "f")
    );
    assert_eq!(arguments, "{\"x\":1}");
    let last = &chunks[chunks.len() - 1]["choices"][0];
    assert_eq!(last["finish_reason"], "tool_calls");

    // reasoning_format none: the thinking stays in the content; tool_choice none: no parsing.
    let mut body = tool_body(false);
    body["reasoning_format"] = "none".into();
    body["tool_choice"] = "none".into();
    let v = w.ok("/v1/chat/completions", body).await;
    let m = &v["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{v}");
    assert!(m.get("tool_calls").is_none(), "{v}");
    assert!(
        m["content"]
            .as_str()
            .unwrap()
            .starts_with("<think>plan it</think>"),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

// ---------------------------------------------------------------------------------------------
// n > 1

#[tokio::test]
async fn several_choices_whole_and_streamed() {
    let w = TestWorker::start(setup()).await;
    let body = |stream: bool| {
        json!({"messages": user("hi"), "max_tokens": 6, "n": 4, "seed": 11,
               "temperature": 2, "stream": stream,
               "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null }})
    };
    let v = w.ok("/v1/chat/completions", body(false)).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    let texts: Vec<&str> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i);
            c["message"]["content"].as_str().unwrap()
        })
        .collect();
    // Each choice is its own seeded stream: at temperature 2 they differ.
    let distinct: std::collections::HashSet<&&str> = texts.iter().collect();
    assert!(distinct.len() > 1, "{texts:?}");
    let usage = &v["usage"];
    assert_eq!(usage["completion_tokens"], 4 * 6, "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["prompt_tokens"].as_u64().unwrap() + 24)
    );
    // The same request again: the same four.
    let again = w.ok("/v1/chat/completions", body(false)).await;
    assert_eq!(again["choices"], v["choices"]);

    // Streamed: every choice's chunks by index, one usage chunk and one [DONE] at the end.
    let events = w.stream_answer("/v1/chat/completions", body(true)).await;
    assert_eq!(events.last().unwrap().data, "[DONE]");
    assert_eq!(events.iter().filter(|e| e.data == "[DONE]").count(), 1);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(SseEvent::json)
        .collect();
    let mut streamed = vec![String::new(); 4];
    let mut finished = 0;
    for c in &chunks[..chunks.len() - 1] {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        streamed[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        finished += usize::from(choice["finish_reason"].is_string());
    }
    assert_eq!(finished, 4);
    assert_eq!(streamed, texts);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 24);
}

#[tokio::test]
async fn a_mistral_template_takes_openai_style_call_ids_in_the_history() {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/chat_templates/mistral-nemo-instruct-2407.jinja"
    ))
    .unwrap();
    let w = TestWorker::start(Setup {
        chat_template: Some(ChatTemplate::new(&source, "<s>", "</s>").unwrap()),
        context: 1024,
        ..setup()
    })
    .await;
    // The template raises on ids that are not nine alphanumerics; clients send `call_…`.
    let body = json!({
        "max_tokens": 2,
        "tools": [{"type": "function", "function": {"name": "f",
            "parameters": {"type": "object", "properties": {}}}}],
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_Zx81kq0LmP2vT7",
                "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_Zx81kq0LmP2vT7", "content": "done"}
        ]
    });
    w.ok("/v1/chat/completions", body).await;
    let prompt = tiny_tokenizer()
        .decode(&w.prompts(1).await[0], true)
        .unwrap();
    assert!(
        prompt.contains("[TOOL_CALLS]") && prompt.contains("[TOOL_RESULTS]"),
        "{prompt}"
    );
    assert!(!prompt.contains("call_Zx81kq0LmP2vT7"), "{prompt}");
}
