//! End to end on the default model (SmolLM2-135M-Instruct Q4_1): a real socket, a real SSE
//! client, and the real binary stopped with SIGTERM. The job API's rules that `http_jobs.rs`
//! checks on the fake model run here too, from the same bodies (`common::job_api`), with short
//! jobs so that each test takes a few seconds at most.
//!
//! The model comes from `LLM_WORKER_MODEL`, else the project cache
//! (`scripts/fetch-default-model.sh` puts it there). Without it these tests fail and say how to
//! fetch it; they never skip silently.

mod common;

use std::time::{Duration, Instant};

use common::client::{Client, infer};
use common::default_model::{default_model_path, load_default_model};
use common::job_api::{self, TooLong};
use common::process::WorkerProcess;
use common::sse::{SseEvent, assert_well_formed_ending};
use common::worker::{Setup, TestWorker};
use serde_json::Value;

/// The default model on the CPU is slower than the fake one.
const WAIT: Duration = Duration::from_secs(120);

fn chat(question: &str) -> String {
    format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
}

/// A client that waits as long as the default model needs.
fn model_client(base: String) -> Client {
    Client {
        wait: WAIT,
        ..Client::new(base, None)
    }
}

/// Runs a job to its end: (token ids, text, all events).
async fn run(client: &Client, body: Value) -> (Vec<u64>, String, Vec<SseEvent>) {
    let events = client.run(body).await;
    let tokens: Vec<Value> = events
        .iter()
        .filter(|e| e.name() == "token")
        .map(SseEvent::json)
        .collect();
    let ids = tokens.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    let text = tokens.iter().map(|t| t["t"].as_str().unwrap()).collect();
    (ids, text, events)
}

/// An in-process worker set up as `setup` says, serving the default model (the fake model's
/// fields of `setup` are unused).
async fn model_worker(setup: Setup) -> TestWorker {
    let w = TestWorker::start(Setup {
        attach: false,
        ..setup
    })
    .await;
    w.worker.attach(load_default_model().await).unwrap();
    w
}

/// One slot and four queue places.
fn one_slot() -> Setup {
    Setup {
        parallel: 1,
        queue: 4,
        ..Setup::default()
    }
}

/// A job far longer than any test waits for (about 25 s alone): it is cancelled or deleted.
fn long() -> Value {
    infer(
        &chat("Count from one to one thousand, one number per line."),
        1000,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_stream_alone_and_together_with_the_same_greedy_output() {
    let w = model_worker(Setup {
        parallel: 4,
        ..Setup::default()
    })
    .await;
    let client = model_client(w.base.clone());
    let prompts = [
        chat("What is the capital of France?"),
        chat("Name three colors."),
        "The quick brown fox".to_string(),
    ];
    let max_tokens = 16;

    let t = Instant::now();
    let mut alone = Vec::new();
    for p in &prompts {
        let (ids, text, events) = run(&client, infer(p, max_tokens)).await;
        let end = events[events.len() - 2].json();
        assert!(!text.trim().is_empty(), "empty output for {p:?}");
        assert!(ids.len() <= max_tokens);
        // `tokens_out` counts the end-of-generation token, which is no `token` event.
        let eos = usize::from(end["stop_reason"] == "EOS");
        assert_eq!(end["tokens_out"].as_u64(), Some((ids.len() + eos) as u64));
        alone.push((ids, text));
    }
    let alone_time = t.elapsed();
    assert!(
        alone[0].1.contains("Paris"),
        "greedy SmolLM2 answers Paris: {:?}",
        alone[0].1
    );

    let t = Instant::now();
    let together = futures_util::future::join_all(
        prompts
            .iter()
            .map(|p| async { run(&client, infer(p, max_tokens)).await }),
    )
    .await;
    let together_time = t.elapsed();
    for ((ids, text, _), (alone_ids, alone_text)) in together.iter().zip(&alone) {
        assert_eq!(
            ids, alone_ids,
            "batched output differs: {text:?} vs {alone_text:?}"
        );
    }
    eprintln!(
        "3 jobs x {max_tokens} tokens: one after another {alone_time:?}, together {together_time:?}"
    );

    // Cancel a running job: how soon is its slot free?
    let id = client.create(infer(&prompts[2], 1000)).await;
    let mut reader = client.stream(&id, None).await;
    loop {
        let e = reader.next_within(WAIT).await.expect("stream ended early");
        if e.name() == "token" {
            break;
        }
    }
    let t = Instant::now();
    assert_eq!(client.delete(&id).await, 204);
    let rest = reader.collect(WAIT).await;
    let terminal_after = t.elapsed();
    let (terminal, _) = assert_well_formed_ending(&rest);
    assert_eq!(terminal.json()["reason"], "client");
    while client.slots_busy().await != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "slot not freed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let tokens_after = rest.iter().filter(|e| e.name() == "token").count();
    eprintln!(
        "cancel of a running job: terminal event after {terminal_after:?} ({tokens_after} more \
         token events), slot free after {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_a_queued_job_while_the_running_one_completes() {
    let w = model_worker(one_slot()).await;
    let running = infer(&chat("Describe the sea."), 24);
    let (_, mut running_stream) =
        job_api::delete_a_queued_job(&w, running, infer(&chat("Name three colors."), 8)).await;
    let rest = running_stream.collect(WAIT).await;
    let (end, sentinel) = assert_well_formed_ending(&rest);
    assert_eq!(sentinel.data, "[DONE]");
    assert_eq!(end.json()["stop_reason"], "MAX_TOKENS", "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_slot() {
    let w = model_worker(Setup {
        grace: Duration::from_millis(200),
        ..one_slot()
    })
    .await;
    let next = infer(&chat("What is the capital of France?"), 8);
    job_api::a_client_that_goes_away_frees_its_slot(&w, long(), next).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_with_last_event_id_loses_and_repeats_nothing() {
    let w = model_worker(Setup {
        grace: Duration::from_secs(5),
        ..one_slot()
    })
    .await;
    let body = infer(&chat("Tell me a story about a fox."), 32);
    let joined = job_api::reattach_with_last_event_id_loses_and_repeats_nothing(&w, body, 4).await;
    let end = joined[joined.len() - 2].json();
    assert_eq!(end["stop_reason"], "MAX_TOKENS", "{end}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_503_with_retry_after_at_once() {
    let w = model_worker(Setup {
        queue: 1,
        ..one_slot()
    })
    .await;
    job_api::a_full_queue_is_503_with_retry_after_at_once(&w, long()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bodies_each_get_their_4xx() {
    let w = model_worker(Setup::default()).await;
    let meta = &w.worker.registry().served().unwrap().meta;
    let prompt = "hello ".repeat(meta.context_length);
    let tokens = meta
        .tokenizer
        .encode_with_special(&prompt, true, true)
        .unwrap()
        .len();
    assert!(tokens + 10 > meta.context_length, "{tokens} tokens fit");
    let too_long = TooLong {
        prompt,
        tokens,
        context: meta.context_length,
    };
    job_api::invalid_bodies_each_get_their_4xx(&w, &too_long).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_header_table() {
    let token = "s3cret-token";
    let w = model_worker(Setup {
        token: Some(token),
        ..Setup::default()
    })
    .await;
    job_api::auth_header_table(&w, token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_ends_every_stream_and_exits_zero() {
    let mut worker = WorkerProcess::start(|command| {
        command
            .args(["--port", "0", "--parallel", "2", "--ctx-size", "1024"])
            .args(["--drain-timeout", "500ms"])
            .arg("--model")
            .arg(default_model_path());
    });
    let base = worker.wait_for_line(WAIT, "the worker never said where it listens", |line| {
        let rest = line.split("listening on ").nth(1)?;
        Some(rest.split_whitespace().next().unwrap().to_string())
    });
    let client = model_client(base);
    let start = Instant::now();
    loop {
        let r = client
            .http
            .get(format!("{}/health", client.base))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(start.elapsed() < WAIT, "the model never finished loading");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Two running, one queued, all far from done.
    let mut readers = Vec::new();
    for q in [
        "Tell me a long story.",
        "Count to one hundred.",
        "Describe the sea.",
    ] {
        let id = client.create(infer(&chat(q), 500)).await;
        readers.push(client.stream(&id, None).await);
    }
    let mut first_token = readers.remove(0);
    loop {
        let e = first_token
            .next_within(WAIT)
            .await
            .expect("stream ended early");
        if e.name() == "token" {
            break;
        }
    }
    readers.insert(0, first_token);
    let reads: Vec<_> = readers
        .into_iter()
        .map(|mut r| tokio::spawn(async move { r.collect(WAIT).await }))
        .collect();

    worker.sigterm();
    for read in reads {
        let events = read.await.unwrap();
        // The first stream was read in part before; its tail still ends properly.
        let (terminal, sentinel) = match events.len() {
            0 | 1 => panic!("stream ended without a terminal event: {events:?}"),
            _ => (&events[events.len() - 2], &events[events.len() - 1]),
        };
        assert!(terminal.is_terminal(), "{events:?}");
        assert!(sentinel.is_sentinel(), "{events:?}");
        assert_eq!(terminal.json()["reason"], "shutdown", "{terminal:?}");
        assert_eq!(sentinel.data, "[CANCELLED]");
    }
    let status = worker.wait_for_exit();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_model_that_does_not_load_in_time_stops_the_worker_saying_why() {
    let mut worker = WorkerProcess::start(|command| {
        command
            .args(["--port", "0", "--load-timeout", "1ms"])
            .arg("--model")
            .arg(default_model_path());
    });
    worker.wait_for_line(WAIT, "no word of the load timeout", |line| {
        line.contains("did not load within --load-timeout")
            .then_some(())
    });
    let status = worker.wait_for_exit();
    assert_eq!(status.code(), Some(1), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gbnf_grammar_through_the_job_api_gives_only_its_language() {
    let w = model_worker(Setup {
        parallel: 2,
        ..Setup::default()
    })
    .await;
    let client = model_client(w.base.clone());
    // A date in ISO form, then a weekday from a list: the model would rather chat.
    let grammar = r#"
root    ::= date " " weekday
date    ::= [12] [0-9]{3} "-" ("0" [1-9] | "1" [0-2]) "-" ([0-2] [0-9] | "3" [01])
weekday ::= "Monday" | "Tuesday" | "Wednesday" | "Thursday" | "Friday" | "Saturday" | "Sunday"
"#;
    let shape = |text: &str| {
        let Some((date, day)) = text.split_once(' ') else {
            return false;
        };
        let b = date.as_bytes();
        b.len() == 10
            && b[4] == b'-'
            && b[7] == b'-'
            && date.chars().filter(char::is_ascii_digit).count() == 8
            && [
                "Monday",
                "Tuesday",
                "Wednesday",
                "Thursday",
                "Friday",
                "Saturday",
                "Sunday",
            ]
            .contains(&day)
    };
    for seed in 0..3 {
        let mut body = infer(&chat("Tell me a story about a cat."), 40);
        body["grammar"] = grammar.into();
        body["temperature"] = 1.0.into();
        body["seed"] = seed.into();
        let (_, text, events) = run(&client, body).await;
        let end = events[events.len() - 2].json();
        assert_eq!(end["stop_reason"], "EOS", "the grammar ended it: {end}");
        assert!(shape(&text), "seed {seed}: {text:?}");
    }
    // A grammar that cannot be compiled is refused before it is queued, naming the field.
    let mut body = infer(&chat("Hi"), 4);
    body["grammar"] = "root ::= missing".into();
    let r = client.post("/v1/jobs", &body).await;
    assert_eq!(r.status(), 400);
    let error: Value = r.json().await.unwrap();
    assert!(error.to_string().contains("grammar"), "{error}");
    assert!(error.to_string().contains("missing"), "{error}");
}
