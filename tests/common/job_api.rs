//! The job API's rules as test bodies, run through a real socket against the scripted fake
//! model (`http_jobs.rs`) and the default model (`e2e_jobs.rs`), so that both hold the same
//! rules. Each body takes a client for a worker set up as its comment says, and request bodies
//! that suit the model behind it; what only one model can show (exact text, step timing) stays
//! with the caller.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use super::client::{Client, infer};
use super::sse::{SseEvent, SseReader, assert_well_formed_ending};
use super::{WAIT, wait_until};

/// Asserts an error answer in the job API's shape and returns its body.
pub async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status(), status, "want {status} {code}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    v
}

/// The text of every token event.
pub fn text_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.name() == "token")
        .map(|e| e.json()["t"].as_str().unwrap().to_string())
        .collect()
}

/// The index `i` of every token event.
pub fn token_indices(events: &[SseEvent]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.name() == "token")
        .map(|e| e.json()["i"].as_u64().unwrap())
        .collect()
}

/// Reads up to and including the token with index `index`.
pub async fn read_until_token(reader: &mut SseReader, index: u64) -> Vec<SseEvent> {
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

/// Reads until the stream's terminal event and sentinel, and checks that it was cancelled by
/// the client.
async fn expect_cancelled_by_client(reader: &mut SseReader) -> Vec<SseEvent> {
    let events = reader.collect(WAIT).await;
    let (terminal, sentinel) = assert_well_formed_ending(&events);
    assert_eq!(terminal.json()["code"], "CANCELLED");
    assert_eq!(terminal.json()["reason"], "client");
    assert_eq!(sentinel.data, "[CANCELLED]");
    events
}

// ---------------------------------------------------------------------------------------------
// Validation and auth

/// A prompt that does not fit the context with `max_tokens` 10.
pub struct TooLong {
    pub prompt: String,
    /// Its tokens, as the worker counts them.
    pub tokens: usize,
    pub context: usize,
}

/// Every broken rule of a job body is listed in one 400 naming the fields; a broken body is
/// 400, a wrong content type 415, an oversized body 413. Needs: a worker that accepts jobs.
pub async fn invalid_bodies_each_get_their_4xx(c: &Client, too_long: &TooLong) {
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
            json!({"operation": "infer", "prompt": too_long.prompt, "max_tokens": 10}),
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
        let r = c.post("/v1/jobs", &body).await;
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
            for number in [
                format!("({} tokens)", too_long.tokens),
                "(10)".to_string(),
                format!("({})", too_long.context),
            ] {
                assert!(m.contains(&number), "{number} in {m}");
            }
        }
    }

    let raw = |body: &'static str, content_type: Option<&'static str>| {
        let mut rb = c.request(Method::POST, "/v1/jobs").body(body);
        if let Some(ct) = content_type {
            rb = rb.header("content-type", ct);
        }
        rb.send()
    };
    for broken in ["{", "[1]"] {
        let r = raw(broken, Some("application/json")).await.unwrap();
        expect_error(r, 400, "INVALID_REQUEST").await;
    }
    let ok = r#"{"operation":"infer","prompt":"a","max_tokens":1}"#;
    for content_type in [Some("text/plain"), None] {
        let r = raw(ok, content_type).await.unwrap();
        expect_error(r, 415, "UNSUPPORTED_MEDIA_TYPE").await;
    }
    let r = raw(ok, Some("application/json; charset=utf-8"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let huge = json!({"operation": "infer", "prompt": "a".repeat(3 << 20)});
    expect_error(c.post("/v1/jobs", &huge).await, 413, "PAYLOAD_TOO_LARGE").await;
}

/// Missing, malformed and wrong tokens are 401s with their codes on every protected route; the
/// right one (scheme in any case) passes; `/health` is public. Needs: a worker that requires
/// `token` and accepts jobs.
pub async fn auth_header_table(c: &Client, token: &str) {
    let cases: Vec<(Option<String>, u16, Option<&str>)> = vec![
        (None, 401, Some("MISSING_API_KEY")),
        (Some("Bearer".into()), 401, Some("MISSING_API_KEY")),
        (
            Some("Basic czNjcmV0LXRva2Vu".into()),
            401,
            Some("MISSING_API_KEY"),
        ),
        (Some("Bearer wrong".into()), 401, Some("INVALID_API_KEY")),
        (
            Some(format!("Bearer {token}-and-more")),
            401,
            Some("INVALID_API_KEY"),
        ),
        (Some(format!("Bearer {token}")), 200, None),
        (Some(format!("bearer {token}")), 200, None),
    ];
    for path in ["/info", "/v1/jobs"] {
        for (header, status, code) in &cases {
            let mut rb = if path == "/info" {
                c.http.get(format!("{}{path}", c.base))
            } else {
                c.http
                    .post(format!("{}{path}", c.base))
                    .json(&infer("a", 1))
            };
            if let Some(h) = header {
                rb = rb.header("authorization", h);
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
        let r = c
            .http
            .get(format!("{}{path}", c.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let r = c
        .http
        .delete(format!("{}/v1/jobs/x", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .http
        .get(format!("{}/health", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

// ---------------------------------------------------------------------------------------------
// Queue, cancel, detach, re-attach

/// With the slot and the queue taken, a job is refused at once with 503 and `Retry-After`.
/// Needs: one slot, one queue place; `long` runs for seconds at least.
pub async fn a_full_queue_is_503_with_retry_after_at_once(c: &Client, long: Value) {
    let running = c.create(long.clone()).await;
    let _running_stream = c.stream(&running, None).await;
    wait_until("the first job runs", || async {
        c.job_state(&running).await == "running"
    })
    .await;
    let queued = c.create(long).await;
    let mut queued_stream = c.stream(&queued, None).await;
    let first = queued_stream.next_within(WAIT).await.unwrap();
    assert_eq!(first.name(), "queued");
    assert_eq!(first.json()["position"], 0);
    let (_, status) = c.get_json(&format!("/v1/jobs/{queued}")).await;
    assert_eq!(status["state"], "queued");
    assert_eq!(status["queue_position"], 0);

    let t = Instant::now();
    let r = c.post("/v1/jobs", &infer("c", 5)).await;
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

    let (_, health) = c.get_json("/health").await;
    assert_eq!(health["status"], "busy");
    assert_eq!(health["queue_depth"], 1);

    // Leave nothing running behind the test.
    for id in [&queued, &running] {
        assert_eq!(c.delete(id).await, 204);
    }
    expect_cancelled_by_client(&mut queued_stream).await;
}

/// DELETE of a queued job ends it (idempotently) with a client cancellation before it ever
/// started, while the running job goes on; returns the running job's id and stream, read up to
/// its second token. Needs: one slot; `running` outlasts a few round trips.
pub async fn delete_a_queued_job(c: &Client, running: Value, queued: Value) -> (String, SseReader) {
    let running = c.create(running).await;
    let mut running_stream = c.stream(&running, None).await;
    let queued = c.create(queued).await;
    let mut queued_stream = c.stream(&queued, None).await;
    read_until_token(&mut running_stream, 1).await;

    assert_eq!(c.delete(&queued).await, 204);
    assert_eq!(c.delete(&queued).await, 204, "idempotent");
    let events = expect_cancelled_by_client(&mut queued_stream).await;
    assert!(events.iter().all(|e| e.name() != "started"), "{events:?}");
    assert_eq!(c.job_state(&queued).await, "cancelled");
    assert_eq!(c.job_state(&running).await, "running");
    (running, running_stream)
}

/// A client that drops its stream has its job cancelled (reason `disconnect`) after the detach
/// grace, which frees the slot for the job queued behind it; a job nobody ever attaches to is
/// cancelled too. Needs: one slot, a detach grace of a few hundred ms at most; `long` runs for
/// seconds at least, `next` is short.
pub async fn a_client_that_goes_away_frees_its_slot(c: &Client, long: Value, next: Value) {
    let id = c.create(long.clone()).await;
    let mut reader = c.stream(&id, None).await;
    read_until_token(&mut reader, 2).await;
    let next = c.create(next).await;
    let mut next_stream = c.stream(&next, None).await;
    let dropped_at = Instant::now();
    drop(reader);
    loop {
        let e = next_stream.next_within(WAIT).await.expect("stream ended");
        if e.name() == "started" {
            break;
        }
        assert_eq!(e.name(), "queued", "{e:?}");
    }
    let freed_after = dropped_at.elapsed();
    assert!(freed_after < Duration::from_secs(2), "took {freed_after:?}");
    assert_eq!(c.job_state(&id).await, "cancelled");
    // Its log says why.
    let events = c.stream(&id, None).await.collect(WAIT).await;
    let (terminal, _) = assert_well_formed_ending(&events);
    assert_eq!(terminal.json()["reason"], "disconnect");
    // The next job runs to its end.
    let rest = next_stream.collect(WAIT).await;
    assert_eq!(assert_well_formed_ending(&rest).1.data, "[DONE]");

    // A job nobody ever attaches to is cancelled too (grace counted from creation), and says
    // so: nobody disconnected.
    let never = c.create(long).await;
    wait_until("the unwatched job is cancelled", || async {
        c.job_state(&never).await == "cancelled"
    })
    .await;
    let events = c.stream(&never, None).await.collect(WAIT).await;
    let (terminal, _) = assert_well_formed_ending(&events);
    assert_eq!(terminal.json()["reason"], "unattached");
    wait_until("the slot is free", || async { c.slots_busy().await == 0 }).await;
}

/// A stream dropped after token `cut` and resumed with `Last-Event-ID` gives, joined, exactly
/// the job's whole log (nothing lost, nothing repeated); returns the joined events. Needs: a
/// detach grace well over 150 ms; `body`'s job goes on for a few hundred ms after token `cut`.
pub async fn reattach_with_last_event_id_loses_and_repeats_nothing(
    c: &Client,
    body: Value,
    cut: u64,
) -> Vec<SseEvent> {
    let id = c.create(body).await;
    let mut first = c.stream(&id, None).await;
    let part1 = read_until_token(&mut first, cut).await;
    drop(first);
    let last_id = part1.last().unwrap().id.unwrap();
    // Let a few tokens be generated while nobody listens.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let part2 = c.stream(&id, Some(last_id)).await.collect(WAIT).await;
    assert!(
        part2.iter().any(|e| e.name() == "token"),
        "the job ended before the first stream did: {part2:?}"
    );
    let mut joined = part1;
    joined.extend(part2);
    let (end, _) = assert_well_formed_ending(&joined);
    // `tokens_out` counts the end-of-generation token, which is no `token` event.
    let tokens_out =
        end.json()["tokens_out"].as_u64().unwrap() - u64::from(end.json()["stop_reason"] == "EOS");

    let replay = c.stream(&id, None).await.collect(WAIT).await;
    assert_eq!(joined, replay, "resumed = replayed from the start");
    assert_eq!(token_indices(&joined), (0..tokens_out).collect::<Vec<_>>());

    // Resuming after the terminal event yields only the sentinel.
    let terminal_id = replay[replay.len() - 2].id.unwrap();
    let tail = c.stream(&id, Some(terminal_id)).await.collect(WAIT).await;
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].data, "[DONE]");
    joined
}
