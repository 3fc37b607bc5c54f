//! The rbee job API through a real socket and a real SSE client, against a scripted fake
//! backend: every HTTP rule of the job API without a model.
//!
//! The fake backend forces a known token sequence (one byte-level token per byte of a script),
//! optionally sleeping per step so that jobs are observably queued and running.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::{Client, infer};
use common::fake_backend::{EOS, Fault, FaultKind, MODEL, SCRIPT, ScriptedBackend, script_tokens};
use common::job_api::{self, TooLong, expect_error, text_of, token_indices};
use common::sse::{SseEvent, SseReader, assert_well_formed_ending};
use common::worker::{Setup, TestWorker, serve};
use common::{WAIT, wait_until};
use llm_worker_rbee::http::auth::ApiKey;
use serde_json::{Value, json};

const CONTEXT: usize = 512;

/// A worker with two slots, eight queue places and a 10 s detach grace.
fn setup() -> Setup {
    Setup {
        queue: 8,
        grace: Duration::from_secs(10),
        context: CONTEXT,
        ..Setup::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming

#[tokio::test]
async fn a_job_streams_started_tokens_end_and_done() {
    let w = TestWorker::start(setup()).await;
    let id = w.create(infer("Hi", 10)).await;
    let events = w.stream(&id, None).await.collect(WAIT).await;
    let (end, sentinel) = assert_well_formed_ending(&events);
    assert_eq!(sentinel.data, "[DONE]");

    let names: Vec<&str> = events.iter().map(SseEvent::name).collect();
    assert_eq!(names[0], "queued");
    assert_eq!(names[1], "started");
    let started = events[1].json();
    assert_eq!(started["job_id"], id.as_str());
    assert_eq!(started["model"], MODEL);
    assert!(started["started_at"].as_str().unwrap().ends_with('Z'));

    let tokens: Vec<Value> = events
        .iter()
        .filter(|e| e.name() == "token")
        .map(SseEvent::json)
        .collect();
    assert_eq!(tokens.len(), 10);
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(t["i"], i);
        assert_eq!(t["id"], u64::from(SCRIPT.as_bytes()[i]));
        assert!(t.get("logprob").is_none());
    }
    // "ö" is two tokens: the first one's delta is empty until the character is complete.
    assert_eq!(tokens[8]["t"], "");
    assert_eq!(tokens[9]["t"], "ö");
    assert_eq!(text_of(&events), "Hello, wö");

    let end = end.json();
    assert_eq!(end["type"], "end");
    assert_eq!(end["stop_reason"], "MAX_TOKENS");
    assert_eq!(end["tokens_in"], 2);
    assert_eq!(end["tokens_out"], 10);
    assert!(end["seed"].is_u64());
    for field in ["ttft_ms", "decode_time_ms", "tokens_per_sec"] {
        assert!(end[field].is_number(), "{field}: {end}");
    }

    let (status, job) = w.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(job["state"], "completed");
    assert_eq!(job["tokens_out"], 10);
    for field in ["created_at", "started_at", "finished_at"] {
        assert!(job[field].is_string(), "{field}: {job}");
    }
}

#[tokio::test]
async fn eos_stop_strings_logprobs_and_special_tokens_in_the_prompt() {
    let mut script = script_tokens("ab");
    script.push(EOS);
    let w = TestWorker::start(Setup { script, ..setup() }).await;

    let id = w.create(infer("<|im_start|>x", 20)).await;
    let events = w.stream(&id, None).await.collect(WAIT).await;
    let (end, _) = assert_well_formed_ending(&events);
    let end = end.json();
    assert_eq!(end["stop_reason"], "EOS");
    // The marker is one special token, not twelve bytes.
    assert_eq!(end["tokens_in"], 2);
    assert_eq!(text_of(&events), "ab");

    let id = w
        .create(
            json!({"operation": "infer", "prompt": "x", "max_tokens": 20, "temperature": 0,
                       "stop": ["b"], "seed": 42}),
        )
        .await;
    let events = w.stream(&id, None).await.collect(WAIT).await;
    let end = assert_well_formed_ending(&events).0.json();
    assert_eq!(end["stop_reason"], "STOP_SEQUENCE");
    assert_eq!(end["stop_sequence_matched"], "b");
    assert_eq!(end["seed"], 42);
    assert_eq!(text_of(&events), "a");

    let id = w
        .create(
            json!({"operation": "infer", "prompt": "x", "max_tokens": 1, "temperature": 0,
                       "logprobs": true, "top_logprobs": 2}),
        )
        .await;
    let events = w.stream(&id, None).await.collect(WAIT).await;
    let token = events.iter().find(|e| e.name() == "token").unwrap().json();
    assert!(token["logprob"].as_f64().unwrap() <= 0.0);
    let top = token["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top[0]["id"], u64::from(b'a'));
    assert_eq!(top[0]["t"], "a");
}

#[tokio::test]
async fn the_legacy_inference_body_and_client_job_ids() {
    let w = TestWorker::start(setup()).await;
    // What the queen sends today, unknown fields included.
    let body = json!({"job_id": "queen-job-1", "prompt": "Hi", "max_tokens": 3,
                      "temperature": 0.0, "seed": 1, "hive_id": "h1", "worker_id": "w1",
                      "device": "cpu:0", "stream": true, "model": MODEL});
    let r = w.post("/v1/inference", &body).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["job_id"], "queen-job-1");
    assert_eq!(v["sse_url"], "/v1/inference/queen-job-1/stream");
    let r = w
        .request(reqwest::Method::GET, "/v1/inference/queen-job-1/stream")
        .send()
        .await
        .unwrap();
    let events = SseReader::new(r).collect(WAIT).await;
    assert_eq!(assert_well_formed_ending(&events).1.data, "[DONE]");
    assert_eq!(text_of(&events), "Hel");

    // The same id again is a conflict, not a second job.
    let r = w.post("/v1/inference", &body).await;
    assert_eq!(r.status(), 409);
    // `/v1/jobs` needs `operation`.
    let r = w
        .post("/v1/jobs", &json!({"prompt": "Hi", "max_tokens": 3}))
        .await;
    assert_eq!(r.status(), 400);
}

// ---------------------------------------------------------------------------------------------
// Validation, routing, body rules

#[tokio::test]
async fn invalid_bodies_each_get_their_4xx() {
    let w = TestWorker::start(setup()).await;
    let too_long = TooLong {
        prompt: "x".repeat(CONTEXT - 5),
        tokens: CONTEXT - 5,
        context: CONTEXT,
    };
    job_api::invalid_bodies_each_get_their_4xx(&w, &too_long).await;
}

#[tokio::test]
async fn unknown_jobs_and_routes_are_404() {
    let w = TestWorker::start(setup()).await;
    let (status, v) = w.get_json("/v1/jobs/nope").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("JOB_NOT_FOUND"))
    );
    assert_eq!(w.delete("nope").await, 404);
    let (status, _) = w.get_json("/v1/jobs/nope/stream").await;
    assert_eq!(status, 404);
    let (status, v) = w.get_json("/v2/whatever").await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
    let r = w
        .http
        .put(format!("{}/v1/jobs", w.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = w
        .http
        .get(format!("{}/v1/jobs/x/stream", w.base))
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn path_and_last_event_id_edges_are_json_400s() {
    let w = TestWorker::start(setup()).await;
    // A job id that is not UTF-8 once decoded: the JSON error shape, not axum's text.
    let (status, v) = w.get_json("/v1/jobs/%ff%fe").await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "INVALID_REQUEST", "{v}");

    let id = w.create(infer("a", 3)).await;
    let events = w.stream(&id, None).await.collect(WAIT).await;
    let last = events.iter().filter_map(|e| e.id).max().unwrap();
    let stream_with = |value: &'static [u8]| {
        w.http
            .get(format!("{}/v1/jobs/{id}/stream", w.base))
            .header(
                "Last-Event-ID",
                reqwest::header::HeaderValue::from_bytes(value).unwrap(),
            )
            .send()
    };
    // Not ASCII, not a number, past the end: each a 400 naming the header.
    for value in [&b"\xc3\xa9"[..], b"garbage", b"999999"] {
        let r = stream_with(value).await.unwrap();
        assert_eq!(r.status(), 400, "{value:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["details"][0]["field"], "Last-Event-ID", "{v}");
    }
    // The last event's own id is valid: only the sentinel is left.
    let r = w
        .http
        .get(format!("{}/v1/jobs/{id}/stream", w.base))
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("[DONE]"));
}

#[tokio::test]
async fn context_errors_name_where_max_tokens_came_from() {
    let w = TestWorker::start(setup()).await;
    let prompt = "a".repeat(CONTEXT - 100);
    let r = w
        .post("/v1/jobs", &json!({"operation": "infer", "prompt": prompt}))
        .await;
    let v = expect_error(r, 400, "INVALID_REQUEST").await;
    let message = v["error"]["details"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("max_tokens was not sent"), "{message}");
    let r = w
        .post(
            "/v1/jobs",
            &json!({"operation": "infer", "prompt": prompt, "max_tokens": 200}),
        )
        .await;
    let v = expect_error(r, 400, "INVALID_REQUEST").await;
    let message = v["error"]["details"][0]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!message.contains("not sent"), "{message}");
    assert!(message.contains("max_tokens (200)"), "{message}");
    // OpenAI: a count past i64 is too many, not "not an integer".
    let r = w
        .post(
            "/v1/completions",
            &json!({"prompt": "hi", "max_tokens": 18446744073709551615u64}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(!message.contains("integer"), "{message}");
    assert!(
        message.contains("18446744073709551615 for the completion"),
        "{message}"
    );
}

#[tokio::test]
async fn a_job_belongs_to_the_key_that_created_it() {
    let w = TestWorker::start(Setup {
        token: Some("token-aaaa"),
        more_keys: vec![ApiKey::new("bee", "token-bbbb")],
        ..setup()
    })
    .await;
    let a = Client::new(w.base.clone(), Some("token-aaaa"));
    let b = Client::new(w.base.clone(), Some("token-bbbb"));
    let job = a.create(infer("x", 3)).await;
    let r = a
        .post(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let completion = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    for id in [&job, &completion] {
        // The owner sees it, through the job API whichever API made it.
        let (status, _) = a.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(status, 200, "{id}");
        // Another key is told it does not exist: status, stream and cancel alike.
        let (status, v) = b.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(
            (status, v["error"]["code"].as_str()),
            (404, Some("JOB_NOT_FOUND"))
        );
        let (status, _) = b.get_json(&format!("/v1/jobs/{id}/stream")).await;
        assert_eq!(status, 404, "{id}");
        assert_eq!(b.delete(id).await, 404, "{id}");
        assert_eq!(a.delete(id).await, 204, "{id}");
    }
    // Client-chosen ids are per key: both may use the same one.
    let body = json!({"operation": "infer", "prompt": "x", "max_tokens": 2, "job_id": "mine"});
    assert_eq!(a.create(body.clone()).await, "mine");
    assert_eq!(b.create(body).await, "mine");
    let (_, v) = b.get_json("/v1/jobs/mine").await;
    assert_eq!(v["job_id"], "mine");
}

#[tokio::test]
async fn auth_header_table() {
    let token = "s3cret-token";
    let w = TestWorker::start(Setup {
        token: Some(token),
        ..setup()
    })
    .await;
    job_api::auth_header_table(&w, token).await;
}

// ---------------------------------------------------------------------------------------------
// Queue, cancel, detach, re-attach

fn slow(parallel: usize, queue: usize) -> Setup {
    Setup {
        parallel,
        queue,
        step_delay: Duration::from_millis(30),
        ..setup()
    }
}

/// A job that runs for 12 s unless it is stopped.
fn long() -> Value {
    infer("a", 400)
}

#[tokio::test]
async fn a_full_queue_is_503_with_retry_after_at_once() {
    let w = TestWorker::start(slow(1, 1)).await;
    job_api::a_full_queue_is_503_with_retry_after_at_once(&w, long()).await;
}

#[tokio::test]
async fn delete_a_queued_job_and_a_running_one() {
    let w = TestWorker::start(slow(1, 4)).await;
    let (running, mut running_stream) =
        job_api::delete_a_queued_job(&w, long(), infer("b", 5)).await;

    let t = Instant::now();
    assert_eq!(w.delete(&running).await, 204);
    let rest = running_stream.collect(WAIT).await;
    let stopped_in = t.elapsed();
    let (terminal, _) = assert_well_formed_ending(&rest);
    assert_eq!(terminal.json()["reason"], "client");
    // One step is 30 ms; allow generous scheduling slack.
    assert!(
        stopped_in < Duration::from_millis(500),
        "took {stopped_in:?}"
    );
    let freed = wait_until("the slot is free", || async { w.slots_busy().await == 0 }).await;
    assert!(freed < Duration::from_secs(1));
    assert_eq!(w.job_state(&running).await, "cancelled");
    assert_eq!(w.delete(&running).await, 204);
}

#[tokio::test]
async fn a_client_that_goes_away_frees_its_slot() {
    let w = TestWorker::start(Setup {
        grace: Duration::from_millis(200),
        ..slow(1, 4)
    })
    .await;
    job_api::a_client_that_goes_away_frees_its_slot(&w, long(), infer("b", 3)).await;
}

#[tokio::test]
async fn reattach_with_last_event_id_loses_and_repeats_nothing() {
    let w = TestWorker::start(Setup {
        grace: Duration::from_secs(5),
        ..slow(1, 4)
    })
    .await;
    let joined =
        job_api::reattach_with_last_event_id_loses_and_repeats_nothing(&w, infer("a", 30), 4).await;
    assert_eq!(
        text_of(&joined),
        SCRIPT.repeat(2),
        "30 tokens are the script twice"
    );
}

#[tokio::test]
async fn finished_jobs_are_collected_after_the_ttl() {
    let w = TestWorker::start(Setup {
        ttl: Duration::from_millis(200),
        ..setup()
    })
    .await;
    let id = w.create(infer("a", 2)).await;
    w.stream(&id, None).await.collect(WAIT).await;
    assert_eq!(w.job_state(&id).await, "completed");
    wait_until("the finished job is forgotten", || async {
        w.get_json(&format!("/v1/jobs/{id}")).await.0 == 404
    })
    .await;
}

#[tokio::test]
async fn a_full_registry_evicts_the_oldest_finished_jobs() {
    // One slot and one queue place: the registry keeps at least 2 × 2 = 4 jobs.
    let w = TestWorker::start(Setup {
        parallel: 1,
        queue: 1,
        capacity: 1,
        ..setup()
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        let id = w.create(infer("a", 1)).await;
        w.stream(&id, None).await.collect(WAIT).await;
        ids.push(id);
    }
    let mut known = Vec::new();
    for id in &ids {
        known.push(w.get_json(&format!("/v1/jobs/{id}")).await.0 == 200);
    }
    assert_eq!(known, [false, false, true, true, true, true]);
}

// ---------------------------------------------------------------------------------------------
// A failing model

/// Forward number 10 of the fake model goes wrong while two jobs run and a third waits: both
/// running jobs end with `error` + `[ERROR] …` (never `[DONE]`) and state `failed`, and the
/// waiting job and a later one then run normally. Returns the error event of the first job.
async fn a_failed_step_ends_the_jobs_in_it(kind: FaultKind) -> Value {
    let fault = Fault { step: 10, kind };
    let w = TestWorker::start(Setup {
        fault: Some(fault),
        ..slow(2, 4)
    })
    .await;
    let mut failing = Vec::new();
    for _ in 0..2 {
        let id = w.create(long()).await;
        failing.push((id.clone(), w.stream(&id, None).await));
    }
    let waiting = w.create(infer("c", 5)).await;
    let waiting_stream = w.stream(&waiting, None).await;

    let mut errors = Vec::new();
    let mut tokens = Vec::new();
    for (id, mut reader) in failing {
        let events = reader.collect(WAIT).await;
        let (terminal, sentinel) = assert_well_formed_ending(&events);
        let error = terminal.json();
        assert_eq!(error["type"], "error", "{events:?}");
        assert_eq!(error["code"], "INFERENCE_FAILED");
        assert!(error.get("reason").is_none(), "{error}");
        let message = error["message"].as_str().unwrap();
        assert_eq!(sentinel.data, format!("[ERROR] {message}"));
        assert!(events.iter().all(|e| e.data != "[DONE]"));
        assert_eq!(w.job_state(&id).await, "failed");
        tokens.push(token_indices(&events).len());
        errors.push(error);
    }
    assert_eq!(errors[0]["message"], errors[1]["message"]);
    // Step 10 was the faulty one: the first job ran from step 0, the second from step 0 or
    // soon after, and neither got a token from step 10 or after it.
    assert_eq!(tokens[0], 10, "{tokens:?}");
    assert!((1..=10).contains(&tokens[1]), "{tokens:?}");

    let mut waiting_stream = waiting_stream;
    let events = waiting_stream.collect(WAIT).await;
    assert_eq!(assert_well_formed_ending(&events).1.data, "[DONE]");
    assert_eq!(text_of(&events), "Hello");
    assert_eq!(text_of(&w.run(infer("d", 3)).await), "Hel");
    // The engine publishes its slot count after the step that ended the job.
    wait_until("the slots are free", || async { w.slots_busy().await == 0 }).await;
    let (_, health) = w.get_json("/health").await;
    assert_eq!(health["status"], "ok");
    errors.swap_remove(0)
}

#[tokio::test]
async fn a_backend_error_fails_the_jobs_in_its_step_and_the_worker_goes_on() {
    let error = a_failed_step_ends_the_jobs_in_it(FaultKind::Error).await;
    let fault = Fault {
        step: 10,
        kind: FaultKind::Error,
    };
    assert_eq!(error["message"], fault.message());
}

#[tokio::test]
async fn a_panic_in_a_step_fails_its_jobs_and_the_worker_goes_on() {
    let error = a_failed_step_ends_the_jobs_in_it(FaultKind::Panic).await;
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("panic"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Health, info, shutdown

#[tokio::test]
async fn health_is_loading_until_the_model_is_attached() {
    let w = TestWorker::start(Setup {
        attach: false,
        token: Some("t0ken"),
        ..setup()
    })
    .await;
    let (status, v) = w.get_json("/health").await;
    assert_eq!((status, v), (503, json!({"status": "loading"})));
    // `/` is what rbee's hive polls after spawning a worker: `/health`'s answer, no token.
    let root = reqwest::get(format!("{}/", w.base)).await.unwrap();
    assert_eq!(root.status(), 503);
    assert_eq!(
        root.json::<Value>().await.unwrap(),
        json!({"status": "loading"})
    );
    let r = w.post("/v1/jobs", &infer("a", 1)).await;
    expect_error(r, 503, "MODEL_LOADING").await;
    let (_, info) = w.get_json("/info").await;
    assert_eq!(info["status"], "starting");

    w.attach();
    let (status, v) = w.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "ok");
    let root = reqwest::get(format!("{}/", w.base)).await.unwrap();
    assert_eq!(root.status(), 200);
    assert_eq!(root.json::<Value>().await.unwrap()["status"], "ok");
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["slots_total"], 2);
    assert_eq!(v["slots_busy"], 0);
    assert_eq!(v["queue_depth"], 0);
    assert!(v["uptime_s"].is_u64());

    let (status, info) = w.get_json("/info").await;
    assert_eq!(status, 200);
    for (field, want) in [
        ("model_id", json!(MODEL)),
        ("status", json!("ready")),
        ("device", json!("cpu:0")),
        ("implementation", json!("llm-worker-rbee-cpu")),
        ("slots_total", json!(2)),
        ("ctx_size", json!(CONTEXT)),
        ("queue_depth", json!(0)),
    ] {
        assert_eq!(info[field], want, "{field}: {info}");
    }
    for field in ["id", "version", "started_at"] {
        assert!(info[field].is_string(), "{field}: {info}");
    }
    assert!(info["port"].is_u64());
}

#[tokio::test]
async fn a_kv_budget_for_two_requests_runs_two_and_queues_the_rest_without_failing_any() {
    // 1 KiB per position; each job may fill its prompt, 40 tokens and an 8-token draft (under
    // 60 positions): the budget holds two such reservations, not three, though four slots are free.
    let w = TestWorker::start(Setup {
        parallel: 4,
        step_delay: Duration::from_millis(5),
        kv_budget: Some((1024, 2 * 60 * 1024)),
        ..setup()
    })
    .await;
    let mut reads = Vec::new();
    for prompt in ["a", "b", "c", "d"] {
        let id = w.create(infer(prompt, 40)).await;
        let mut reader = w.stream(&id, None).await;
        reads.push(tokio::spawn(async move { reader.collect(WAIT).await }));
    }
    let mut most = 0;
    while reads.iter().any(|r| !r.is_finished()) {
        most = most.max(w.slots_busy().await);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        most, 2,
        "at most two jobs fit the budget, and two did run at once"
    );
    // The capacity routers read is the budget's, in positions.
    let metrics = w.metrics_text().await;
    assert!(metrics.contains(r#"num_gpu_blocks="120""#), "{metrics}");
    for read in reads {
        let events = read.await.unwrap();
        let (terminal, _) = assert_well_formed_ending(&events);
        assert_eq!(terminal.name(), "end", "{}", terminal.data);
        assert_eq!(terminal.json()["tokens_out"], 40);
    }
}

#[tokio::test]
async fn shutdown_ends_every_stream_with_a_terminal_event() {
    let w = TestWorker::start(slow(2, 8)).await;
    let mut readers = Vec::new();
    for prompt in ["a", "b", "c", "d"] {
        let id = w.create(infer(prompt, 400)).await;
        readers.push(w.stream(&id, None).await);
    }
    let reads: Vec<_> = readers
        .into_iter()
        .map(|mut r| tokio::spawn(async move { r.collect(WAIT).await }))
        .collect();
    wait_until("two jobs run", || async { w.slots_busy().await == 2 }).await;

    let report = w.worker.shutdown(Duration::from_millis(100)).await;
    assert!(!report.drained, "400 tokens cannot finish in 100 ms");
    assert!(report.engine_stopped);
    for read in reads {
        let events = read.await.unwrap();
        let (terminal, sentinel) = assert_well_formed_ending(&events);
        assert_eq!(terminal.json()["reason"], "shutdown");
        assert_eq!(sentinel.data, "[CANCELLED]");
    }
    let r = w.post("/v1/jobs", &infer("e", 1)).await;
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    expect_error(r, 503, "SHUTTING_DOWN").await;
    let (status, v) = w.get_json("/health").await;
    assert_eq!((status, v["status"].as_str()), (503, Some("draining")));
    assert_eq!(v["slots_total"], 2, "{v}");
}

#[tokio::test]
async fn shutdown_lets_short_jobs_finish() {
    let w = TestWorker::start(slow(2, 8)).await;
    let id = w.create(infer("a", 5)).await;
    let reader = w.stream(&id, None).await;
    let read = tokio::spawn(async move {
        let mut reader = reader;
        reader.collect(WAIT).await
    });
    let report = w.worker.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained && report.engine_stopped);
    let events = read.await.unwrap();
    assert_eq!(assert_well_formed_ending(&events).1.data, "[DONE]");
}

#[tokio::test]
async fn an_abort_ends_every_stream_without_waiting_for_the_step_in_progress() {
    // Steps of 4 s, like a long prompt chunk of a big model: the hive's SIGKILL comes 2 s
    // after its SIGTERM, so the terminal events cannot wait for the engine to finish a step.
    let w = TestWorker::start(Setup {
        parallel: 1,
        queue: 4,
        step_delay: Duration::from_secs(4),
        ..setup()
    })
    .await;
    let mut readers = Vec::new();
    for prompt in ["a", "b"] {
        let id = w.create(infer(prompt, 50)).await;
        readers.push(w.stream(&id, None).await);
    }
    wait_until("a job runs", || async { w.slots_busy().await == 1 }).await;
    let reads: Vec<_> = readers
        .into_iter()
        .map(|mut r| tokio::spawn(async move { r.collect(Duration::from_secs(2)).await }))
        .collect();
    let worker = Arc::new(w);
    let shutdown = tokio::spawn({
        let worker = worker.clone();
        async move { worker.worker.shutdown(Duration::from_millis(100)).await }
    });
    let aborted = Instant::now();
    for read in reads {
        let events = read.await.unwrap();
        let (terminal, sentinel) = assert_well_formed_ending(&events);
        assert_eq!(terminal.json()["reason"], "shutdown");
        assert_eq!(sentinel.data, "[CANCELLED]");
    }
    assert!(
        aborted.elapsed() < Duration::from_secs(2),
        "{:?}",
        aborted.elapsed()
    );
    assert!(shutdown.await.unwrap().engine_stopped);
}

#[tokio::test]
async fn the_seed_entry_point_serves_jobs() {
    let router = llm_worker_rbee::setup_worker_with_backend(
        ScriptedBackend::new(CONTEXT, script_tokens(SCRIPT), Duration::ZERO),
        Some("tok".into()),
    );
    let client = Client::new(serve(router).await, Some("tok"));
    let events = client.run(infer("Hi", 5)).await;
    assert_eq!(text_of(&events), "Hello");
}
