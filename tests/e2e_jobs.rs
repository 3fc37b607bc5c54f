//! End to end on the default model (SmolLM2-135M-Instruct Q4_1): a real socket, a real SSE
//! client, and the real binary stopped with SIGTERM.
//!
//! The model comes from `LLM_WORKER_MODEL`, else the project cache
//! (`scripts/fetch-default-model.sh` puts it there). Without it these tests fail and say how to
//! fetch it; they never skip silently.

mod sse_client;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use llm_worker_rbee::backend::CandleInferenceBackend;
use llm_worker_rbee::engine::SchedulerConfig;
use llm_worker_rbee::model::LoadOptions;
use llm_worker_rbee::worker::{Worker, WorkerConfig};
use serde_json::{Value, json};
use sse_client::{SseEvent, SseReader, assert_well_formed_ending};

const WAIT: Duration = Duration::from_secs(120);

fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LLM_WORKER_MODEL") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("LLM_WORKER_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/llm-worker-rbee"))
        })
        .unwrap_or_default();
    let path = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "the default model is not at {}: run scripts/fetch-default-model.sh, or set \
         LLM_WORKER_MODEL to a GGUF file",
        path.display()
    );
    path
}

fn chat(question: &str) -> String {
    format!("<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
}

fn greedy(prompt: &str, max_tokens: usize) -> Value {
    json!({"operation": "infer", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

struct Client {
    base: String,
    http: reqwest::Client,
}

impl Client {
    async fn create(&self, body: &Value) -> String {
        let r = self
            .http
            .post(format!("{}/v1/jobs", self.base))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        r.json::<Value>().await.unwrap()["job_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn stream(&self, id: &str) -> SseReader {
        let r = self
            .http
            .get(format!("{}/v1/jobs/{id}/stream", self.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        SseReader::new(r)
    }

    /// Runs a job to its end: (token ids, text, all events).
    async fn run(&self, body: &Value) -> (Vec<u64>, String, Vec<SseEvent>) {
        let id = self.create(body).await;
        let events = self.stream(&id).await.collect(WAIT).await;
        assert_eq!(
            assert_well_formed_ending(&events).1.data,
            "[DONE]",
            "{events:?}"
        );
        let tokens: Vec<Value> = events
            .iter()
            .filter(|e| e.name() == "token")
            .map(SseEvent::json)
            .collect();
        let ids = tokens.iter().map(|t| t["id"].as_u64().unwrap()).collect();
        let text = tokens.iter().map(|t| t["t"].as_str().unwrap()).collect();
        (ids, text, events)
    }

    async fn slots_busy(&self) -> u64 {
        let v: Value = self
            .http
            .get(format!("{}/health", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["slots_busy"].as_u64().unwrap()
    }
}

async fn in_process_worker(parallel: usize) -> (Worker, Client) {
    let path = model_path();
    let backend = tokio::task::spawn_blocking(move || {
        CandleInferenceBackend::load(
            &path,
            &LoadOptions {
                context_length: Some(2048),
                ..LoadOptions::default()
            },
        )
    })
    .await
    .unwrap()
    .expect("load the default model");
    let worker = Worker::new(WorkerConfig {
        scheduler: SchedulerConfig {
            max_sequences: parallel,
            batch_tokens: 512,
        },
        ..WorkerConfig::default()
    });
    worker.attach(backend).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = worker.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let client = Client {
        base,
        http: reqwest::Client::new(),
    };
    (worker, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_stream_alone_and_together_with_the_same_greedy_output() {
    let (_worker, client) = in_process_worker(4).await;
    let prompts = [
        chat("What is the capital of France?"),
        chat("Name three colors."),
        "The quick brown fox".to_string(),
    ];
    let max_tokens = 16;

    let t = Instant::now();
    let mut alone = Vec::new();
    for p in &prompts {
        let (ids, text, events) = client.run(&greedy(p, max_tokens)).await;
        let end = events[events.len() - 2].json();
        assert!(!text.trim().is_empty(), "empty output for {p:?}");
        assert!(ids.len() <= max_tokens);
        assert_eq!(end["tokens_out"].as_u64(), Some(ids.len() as u64));
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
            .map(|p| async { client.run(&greedy(p, max_tokens)).await }),
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
    let id = client.create(&greedy(&prompts[2], 1000)).await;
    let mut reader = client.stream(&id).await;
    loop {
        let e = reader.next_within(WAIT).await.expect("stream ended early");
        if e.name() == "token" {
            break;
        }
    }
    let t = Instant::now();
    let r = client
        .http
        .delete(format!("{}/v1/jobs/{id}", client.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
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

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_ends_every_stream_and_exits_zero() {
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_llm-worker-rbee-cpu"))
            .args(["--port", "0", "--parallel", "2", "--ctx-size", "1024"])
            .args(["--drain-timeout", "500ms"])
            .arg("--model")
            .arg(model_path())
            .env("RUST_LOG", "info")
            .env_remove("LLORCH_API_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the worker binary"),
    );
    // Forward stderr lines (and keep the pipe drained so the child never blocks on it).
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[worker] {line}");
            let _ = lines_tx.send(line);
        }
    });
    let base = {
        let deadline = Instant::now() + WAIT;
        loop {
            let line = lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("the worker never said where it listens");
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        }
    };
    let client = Client {
        base,
        http: reqwest::Client::new(),
    };
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
        let id = client.create(&greedy(&chat(q), 500)).await;
        readers.push(client.stream(&id).await);
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

    let pid = child.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
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
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
}
