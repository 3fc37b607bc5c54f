//! The rbee job API through a real socket and a real SSE client, against a scripted fake
//! backend: every HTTP rule of the job API without a model.
//!
//! The fake backend forces a known token sequence (one byte-level token per byte of a script),
//! optionally sleeping per step so that jobs are observably queued and running.

mod common;

use std::time::{Duration, Instant};

use common::client::{Client, infer};
use common::fake_backend::{EOS, MODEL, SCRIPT, ScriptedBackend, script_tokens};
use common::sse::{SseEvent, SseReader, assert_well_formed_ending};
use common::worker::{Setup, TestWorker, serve};
use common::{WAIT, wait_until};
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

impl TestWorker {
    async fn job_state(&self, id: &str) -> String {
        let (_, v) = self.get_json(&format!("/v1/jobs/{id}")).await;
        v["state"].as_str().unwrap_or("?").to_string()
    }
}

fn text_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.name() == "token")
        .map(|e| e.json()["t"].as_str().unwrap().to_string())
        .collect()
}

async fn read_until_token(reader: &mut SseReader, index: u64) -> Vec<SseEvent> {
    let mut seen = Vec::new();
    loop {
        let e = reader.next_within(WAIT).await.expect("stream ended early");
        let done = e.name() == "token" && e.json()["i"] == index;
        seen.push(e);
        if done {
            return seen;
        }
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
    assert_eq!(end["stop_reason"], "max_tokens");
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
    assert_eq!(end["stop_reason"], "eos");
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
    assert_eq!(end["stop_reason"], "stop_sequence");
    assert_eq!(end["stop_sequence"], "b");
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

async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status(), status, "want {status} {code}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    v
}

#[tokio::test]
async fn invalid_bodies_each_get_their_4xx() {
    let w = TestWorker::start(setup()).await;
    let long_prompt = "x".repeat(CONTEXT - 5);
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "empty prompt",
            json!({"operation": "infer", "prompt": "", "max_tokens": 5}),
            vec!["prompt"],
        ),
        (
            "missing prompt",
            json!({"operation": "infer", "max_tokens": 5}),
            vec!["prompt"],
        ),
        (
            "max_tokens 0",
            json!({"operation": "infer", "prompt": "a", "max_tokens": 0}),
            vec!["max_tokens"],
        ),
        (
            "temperature",
            json!({"operation": "infer", "prompt": "a", "temperature": 2.5}),
            vec!["temperature"],
        ),
        (
            "top_p 0",
            json!({"operation": "infer", "prompt": "a", "top_p": 0}),
            vec!["top_p"],
        ),
        (
            "min_p",
            json!({"operation": "infer", "prompt": "a", "min_p": 1.5}),
            vec!["min_p"],
        ),
        (
            "penalties",
            json!({"operation": "infer", "prompt": "a", "repetition_penalty": 0,
                             "presence_penalty": 2.5, "frequency_penalty": -9}),
            vec![
                "repetition_penalty",
                "presence_penalty",
                "frequency_penalty",
            ],
        ),
        (
            "five stops",
            json!({"operation": "infer", "prompt": "a", "stop": ["1", "2", "3", "4", "5"]}),
            vec!["stop"],
        ),
        (
            "long stop",
            json!({"operation": "infer", "prompt": "a", "stop": ["x".repeat(101)]}),
            vec!["stop[0]"],
        ),
        (
            "context",
            json!({"operation": "infer", "prompt": long_prompt, "max_tokens": 10}),
            vec!["prompt"],
        ),
        (
            "other model",
            json!({"operation": "infer", "prompt": "a", "model": "gpt-4"}),
            vec!["model"],
        ),
        (
            "unknown operation",
            json!({"operation": "train", "prompt": "a"}),
            vec!["operation"],
        ),
        ("no operation", json!({"prompt": "a"}), vec!["operation"]),
        (
            "wrong types",
            json!({"operation": "infer", "prompt": ["a"], "max_tokens": "5", "seed": -1}),
            vec!["prompt", "max_tokens", "seed"],
        ),
        (
            "everything at once",
            json!({"operation": "infer", "prompt": "", "max_tokens": 0,
                                      "temperature": -1, "top_p": 2, "model": "m"}),
            vec!["prompt", "max_tokens", "temperature", "top_p", "model"],
        ),
    ];
    for (name, body, fields) in cases {
        let r = w.post("/v1/jobs", &body).await;
        let v = expect_error(r, 400, "INVALID_REQUEST").await;
        let got: Vec<&str> = v["error"]["details"]
            .as_array()
            .unwrap_or_else(|| panic!("{name}: no details: {v}"))
            .iter()
            .map(|d| d["field"].as_str().unwrap())
            .collect();
        assert_eq!(got, fields, "{name}: {v}");
        if name == "context" {
            let m = v["error"]["details"][0]["message"].as_str().unwrap();
            assert!(
                m.contains(&format!("({} tokens)", CONTEXT - 5)) && m.contains("(10)"),
                "{m}"
            );
        }
    }

    let raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut rb = w.http.post(format!("{}/v1/jobs", w.base)).body(body);
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        rb.send()
    };
    expect_error(
        raw("{", Some("application/json")).await.unwrap(),
        400,
        "INVALID_REQUEST",
    )
    .await;
    expect_error(
        raw("[1]", Some("application/json")).await.unwrap(),
        400,
        "INVALID_REQUEST",
    )
    .await;
    let ok = r#"{"operation":"infer","prompt":"a","max_tokens":1}"#;
    expect_error(
        raw(ok, Some("text/plain")).await.unwrap(),
        415,
        "UNSUPPORTED_MEDIA_TYPE",
    )
    .await;
    expect_error(raw(ok, None).await.unwrap(), 415, "UNSUPPORTED_MEDIA_TYPE").await;
    let r = raw(ok, Some("application/json; charset=utf-8"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let huge = json!({"operation": "infer", "prompt": "a".repeat(3 << 20)});
    expect_error(w.post("/v1/jobs", &huge).await, 413, "PAYLOAD_TOO_LARGE").await;
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
async fn auth_header_table() {
    let w = TestWorker::start(Setup {
        token: Some("s3cret-token"),
        ..setup()
    })
    .await;
    let cases: &[(Option<&str>, u16, Option<&str>)] = &[
        (None, 401, Some("MISSING_API_KEY")),
        (Some("Bearer"), 401, Some("MISSING_API_KEY")),
        (Some("Basic czNjcmV0LXRva2Vu"), 401, Some("MISSING_API_KEY")),
        (Some("Bearer wrong"), 401, Some("INVALID_API_KEY")),
        (
            Some("Bearer s3cret-token-and-more"),
            401,
            Some("INVALID_API_KEY"),
        ),
        (Some("Bearer s3cret-token"), 200, None),
        (Some("bearer s3cret-token"), 200, None),
    ];
    for path in ["/info", "/v1/jobs"] {
        for (header, status, code) in cases {
            let mut rb = if path == "/info" {
                w.http.get(format!("{}{path}", w.base))
            } else {
                w.http
                    .post(format!("{}{path}", w.base))
                    .json(&infer("a", 1))
            };
            if let Some(h) = header {
                rb = rb.header("authorization", *h);
            }
            let r = rb.send().await.unwrap();
            assert_eq!(r.status(), *status, "{path} with {header:?}");
            if let Some(code) = code {
                assert_eq!(r.headers()["www-authenticate"], "Bearer");
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], *code, "{path} with {header:?}");
            }
        }
    }
    // Streams, status and cancel are protected too; health is public.
    for path in ["/v1/jobs/x", "/v1/jobs/x/stream", "/v1/inference/x/stream"] {
        let r = w
            .http
            .get(format!("{}{path}", w.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = w
        .http
        .delete(format!("{}/v1/jobs/x", w.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = w
        .http
        .get(format!("{}/health", w.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
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

#[tokio::test]
async fn a_full_queue_is_503_with_retry_after_at_once() {
    let w = TestWorker::start(slow(1, 1)).await;
    let running = w.create(infer("a", 400)).await;
    let _running_stream = w.stream(&running, None).await;
    wait_until("the first job runs", || async {
        w.job_state(&running).await == "running"
    })
    .await;
    let queued = w.create(infer("b", 400)).await;
    let mut queued_stream = w.stream(&queued, None).await;
    let first = queued_stream.next_within(WAIT).await.unwrap();
    assert_eq!(first.name(), "queued");
    assert_eq!(first.json()["position"], 0);
    let (_, status) = w.get_json(&format!("/v1/jobs/{queued}")).await;
    assert_eq!(status["state"], "queued");
    assert_eq!(status["queue_position"], 0);

    let t = Instant::now();
    let r = w.post("/v1/jobs", &infer("c", 5)).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "503 must be immediate"
    );
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let v = expect_error(r, 503, "ALL_SLOTS_BUSY").await;
    assert_eq!(v["error"]["queue_depth"], 1);
    assert_eq!(v["error"]["retry_after_s"], retry_after);

    let (_, health) = w.get_json("/health").await;
    assert_eq!(health["status"], "busy");
    assert_eq!(health["queue_depth"], 1);
}

#[tokio::test]
async fn delete_a_queued_job_and_a_running_one() {
    let w = TestWorker::start(slow(1, 4)).await;
    let running = w.create(infer("a", 400)).await;
    let mut running_stream = w.stream(&running, None).await;
    let queued = w.create(infer("b", 5)).await;
    let queued_stream = w.stream(&queued, None).await;
    read_until_token(&mut running_stream, 1).await;

    assert_eq!(w.delete(&queued).await, 204);
    assert_eq!(w.delete(&queued).await, 204, "idempotent");
    let mut queued_stream = queued_stream;
    let events = queued_stream.collect(WAIT).await;
    let (terminal, sentinel) = assert_well_formed_ending(&events);
    assert_eq!(terminal.json()["code"], "CANCELLED");
    assert_eq!(terminal.json()["reason"], "client");
    assert_eq!(sentinel.data, "[CANCELLED]");
    assert!(events.iter().all(|e| e.name() != "started"));
    assert_eq!(w.job_state(&queued).await, "cancelled");

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
    let id = w.create(infer("a", 400)).await;
    let mut reader = w.stream(&id, None).await;
    read_until_token(&mut reader, 2).await;
    let dropped_at = Instant::now();
    drop(reader);
    wait_until("the abandoned job is cancelled", || async {
        w.job_state(&id).await == "cancelled"
    })
    .await;
    wait_until("the slot is free", || async { w.slots_busy().await == 0 }).await;
    let freed_after = dropped_at.elapsed();
    assert!(freed_after < Duration::from_secs(2), "took {freed_after:?}");
    // Its log says why.
    let events = w.stream(&id, None).await.collect(WAIT).await;
    let (terminal, _) = assert_well_formed_ending(&events);
    assert_eq!(terminal.json()["reason"], "disconnect");

    // A job nobody ever attaches to is cancelled too (grace counted from creation).
    let never = w.create(infer("b", 400)).await;
    wait_until("the unwatched job is cancelled", || async {
        w.job_state(&never).await == "cancelled"
    })
    .await;
}

#[tokio::test]
async fn reattach_with_last_event_id_loses_and_repeats_nothing() {
    let w = TestWorker::start(Setup {
        grace: Duration::from_secs(5),
        ..slow(1, 4)
    })
    .await;
    let id = w.create(infer("a", 30)).await;
    let mut first = w.stream(&id, None).await;
    let part1 = read_until_token(&mut first, 4).await;
    drop(first);
    let last_id = part1.last().unwrap().id.unwrap();
    // Let a few tokens be generated while nobody listens.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let part2 = w.stream(&id, Some(last_id)).await.collect(WAIT).await;
    let mut joined = part1.clone();
    joined.extend(part2);
    assert_well_formed_ending(&joined);

    let replay = w.stream(&id, None).await.collect(WAIT).await;
    assert_eq!(joined, replay, "resumed = replayed from the start");
    let indices: Vec<u64> = joined
        .iter()
        .filter(|e| e.name() == "token")
        .map(|e| e.json()["i"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, (0..30).collect::<Vec<_>>());
    assert_eq!(
        text_of(&joined),
        SCRIPT.repeat(2),
        "30 tokens are the script twice"
    );

    // Resuming after the terminal event yields only the sentinel.
    let terminal_id = replay[replay.len() - 2].id.unwrap();
    let tail = w.stream(&id, Some(terminal_id)).await.collect(WAIT).await;
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].data, "[DONE]");
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
    let r = w.post("/v1/jobs", &infer("a", 1)).await;
    expect_error(r, 503, "MODEL_LOADING").await;
    let (_, info) = w.get_json("/info").await;
    assert_eq!(info["status"], "starting");

    w.attach();
    let (status, v) = w.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "ok");
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
    expect_error(r, 503, "SHUTTING_DOWN").await;
    let (status, v) = w.get_json("/health").await;
    assert_eq!((status, v["status"].as_str()), (200, Some("draining")));
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
async fn the_seed_entry_point_serves_jobs() {
    let router = llm_worker_rbee::setup_worker_with_backend(
        ScriptedBackend::new(CONTEXT, script_tokens(SCRIPT), Duration::ZERO),
        Some("tok".into()),
    );
    let client = Client::new(serve(router).await, Some("tok"));
    let events = client.run(infer("Hi", 5)).await;
    assert_eq!(text_of(&events), "Hello");
}
