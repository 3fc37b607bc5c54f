//! The real worker binary under stand-ins for rbee's hive and queen, which behave as upstream's
//! do at rbee-keeper/rbee 0509312f (read from its sources; CI cannot reach it):
//!
//! - the hive asks an installed binary `--build-info` (exit 0, `release` or `debug` on stdout),
//!   spawns the worker with exactly `--worker-id worker-cpu-{port} --model {model} --device 0
//!   --port {port} --queen-url {queen}` and stdin, stdout and stderr on /dev/null
//!   (`rbee-hive/src/operations/worker.rs`, `monitor.rs`), polls `GET http://localhost:{port}`
//!   until any 2xx: 30 attempts, 200 ms before the second, ×1.5 each time, 5 s per request,
//!   inside a 120 s budget (`health-poll`, `lifecycle-local/src/start.rs`), and stops a worker
//!   with SIGTERM, then SIGKILL 2 s later;
//! - the queen POSTs its flat body `{prompt, max_tokens, temperature}` to `/v1/inference`
//!   without a token, GETs the `sse_url` it is given, splits the body on newlines, strips
//!   `data: `, and reads until a line is exactly `[DONE]` (or the stream ends)
//!   (`queen-rbee/…/scheduler/src/simple.rs`);
//! - heartbeats and the JSON of every event are validated against schemas written from
//!   upstream's `WorkerHeartbeat` and `InferenceEvent` (`tests/data/rbee/`).
//!
//! The worker's queen URL points at the stand-in queen (upstream hard-codes
//! `http://localhost:7833`; tests use no fixed port).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::routing::post;
use futures_util::StreamExt;
use serde_json::{Value, json};

use common::default_model::default_model_path;
use common::worker::{bind, serve_on};

const WORKER_BIN: &str = env!("CARGO_BIN_EXE_llm-worker-rbee-cpu");

fn schema(name: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/rbee")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("read the schema");
    jsonschema::validator_for(&serde_json::from_str(&text).expect("schema JSON"))
        .expect("a valid schema")
}

fn assert_valid(validator: &jsonschema::Validator, what: &str, value: &Value) {
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} {value} breaks rbee's type: {errors:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The stand-in hive

/// `<bin> --build-info`, checked as the hive checks it; returns the trimmed mode.
fn build_info(bin: &Path, env: &[(&str, &str)]) -> String {
    let output = Command::new(bin)
        .arg("--build-info")
        .envs(env.iter().copied())
        .output()
        .expect("run --build-info");
    assert!(output.status.success(), "--build-info: {output:?}");
    let mode = String::from_utf8_lossy(&output.stdout).trim().to_string();
    assert!(
        mode == "release" || mode == "debug",
        "--build-info printed {mode:?}"
    );
    mode
}

/// A port nothing listens on now (the hive assigns ports itself; the test asks the system).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

struct SpawnedWorker {
    child: Child,
    port: u16,
    spawned_at: Instant,
}

impl SpawnedWorker {
    /// The hive's `worker_spawn`: its argv, no environment of its own, stdio on /dev/null.
    fn spawn(model: &str, queen_url: &str, home: Option<&Path>) -> Self {
        let port = free_port();
        let mut command = Command::new(WORKER_BIN);
        command
            .args(["--worker-id", &format!("worker-cpu-{port}")])
            .args(["--model", model])
            .args(["--device", "0"])
            .args(["--port", &port.to_string()])
            .args(["--queen-url", queen_url])
            .env_remove("LLORCH_API_TOKEN")
            .env_remove("LLM_WORKER_MODEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(home) = home {
            command
                .env("HOME", home)
                .env_remove("XDG_CACHE_HOME")
                .env_remove("HF_HOME")
                .env_remove("HF_HUB_CACHE");
        }
        let child = command.spawn().expect("spawn the worker");
        Self {
            child,
            port,
            spawned_at: Instant::now(),
        }
    }

    fn url(&self) -> String {
        format!("http://localhost:{}", self.port)
    }

    /// `poll_health(url, 30, 200, 1.5)` under the 120 s budget; returns the time from spawn
    /// to the first 2xx and the wait that preceded that attempt.
    async fn poll_ready(&mut self) -> (Duration, Duration) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let mut delay_ms: u64 = 200;
        let mut last_wait = Duration::ZERO;
        for attempt in 1..=30 {
            if attempt > 1 {
                last_wait = Duration::from_millis(delay_ms);
                tokio::time::sleep(last_wait).await;
                delay_ms = (delay_ms as f64 * 1.5) as u64;
            }
            if let Ok(r) = client.get(self.url()).send().await
                && r.status().is_success()
            {
                return (self.spawned_at.elapsed(), last_wait);
            }
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the worker exited while the hive polled it"
            );
            assert!(
                self.spawned_at.elapsed() < Duration::from_secs(120),
                "Start daemon timed out"
            );
        }
        panic!("health check failed after 30 attempts");
    }

    /// The hive's `worker_process_delete`: SIGTERM, 2 s, SIGKILL.
    async fn stop(&mut self) {
        signal(&self.child, "TERM");
        tokio::time::sleep(Duration::from_secs(2)).await;
        signal(&self.child, "KILL");
        let _ = self.child.wait();
    }
}

impl Drop for SpawnedWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, name: &str) {
    // Errors ignored, as upstream's `kill` calls are (the worker may already be gone).
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status();
}

// ---------------------------------------------------------------------------------------------
// The stand-in queen

#[derive(Clone, Default)]
struct Heartbeats(Arc<Mutex<Vec<Value>>>);

impl Heartbeats {
    fn all(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }
}

/// Receives heartbeats at `/v1/worker-heartbeat` (upstream's queen has no such route: its UI
/// catch-all answers 200, which is what this answers too). Returns its URL.
async fn start_queen(heartbeats: Heartbeats) -> String {
    async fn receive(State(beats): State<Heartbeats>, Json(body): Json<Value>) -> &'static str {
        beats.0.lock().unwrap().push(body);
        "ok"
    }
    let router = axum::Router::new()
        .route("/v1/worker-heartbeat", post(receive))
        .with_state(heartbeats);
    serve_on(bind().await, router).await
}

/// The queen's inference: the flat body, then the stream's lines (without `data: `) up to
/// `[DONE]` or the end of the stream, as its line handler receives them.
async fn queen_infer(worker_url: &str, prompt: &str, max_tokens: u32) -> Vec<String> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    queen_infer_into(worker_url, prompt, max_tokens, lines.clone()).await;
    let mut lines = lines.lock().unwrap();
    std::mem::take(&mut *lines)
}

/// [`queen_infer`], each line appended to `lines` as it arrives (so a caller can see how far a
/// stream got when the worker is killed under it).
async fn queen_infer_into(
    worker_url: &str,
    prompt: &str,
    max_tokens: u32,
    lines: Arc<Mutex<Vec<String>>>,
) {
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{worker_url}/v1/inference"))
        .json(&json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}))
        .send()
        .await
        .expect("POST /v1/inference");
    assert!(created.status().is_success(), "{created:?}");
    let created: Value = created.json().await.unwrap();
    let sse_url = created["sse_url"].as_str().expect("sse_url");
    assert!(created["job_id"].is_string(), "{created}");
    let Ok(response) = http.get(format!("{worker_url}{sse_url}")).send().await else {
        return;
    };
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    while let Some(Ok(chunk)) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(newline) = buffer.find('\n') {
            let line: String = buffer.drain(..=newline).collect();
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let line = line.strip_prefix("data: ").unwrap_or(line).to_string();
            let done = line == "[DONE]";
            lines.lock().unwrap().push(line);
            if done {
                return;
            }
        }
    }
}

/// The JSON events among a stream's lines, each checked against rbee's `InferenceEvent`.
fn events_of(lines: &[String]) -> Vec<Value> {
    let schema = schema("inference_event.schema.json");
    let events: Vec<Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect();
    for event in &events {
        assert_valid(&schema, "event", event);
    }
    events
}

fn model_arg() -> String {
    default_model_path().to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn build_info_answers_before_any_other_flag_is_read() {
    let expected = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    assert_eq!(build_info(Path::new(WORKER_BIN), &[]), expected);
    // Settings that would stop the worker from starting do not matter to --build-info.
    let broken = [
        ("LLM_WORKER_PORT", "not-a-port"),
        ("LLM_WORKER_MODEL", "/nowhere"),
    ];
    assert_eq!(build_info(Path::new(WORKER_BIN), &broken), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hive_spawns_us_the_queen_routes_to_us_and_a_stop_ends_every_stream() {
    let heartbeats = Heartbeats::default();
    let queen = start_queen(heartbeats.clone()).await;
    build_info(Path::new(WORKER_BIN), &[]);
    let mut worker = SpawnedWorker::spawn(&model_arg(), &queen, None);
    let (ready_after, last_wait) = worker.poll_ready().await;
    let url = worker.url();

    // Ready as soon as the model is: within its load time plus the poll's last interval (and
    // a margin for the process to start and the file to be mapped).
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let load_s: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rbee_worker_model_load_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the load time gauge");
    let bound = Duration::from_secs_f64(load_s) + last_wait + Duration::from_secs(3);
    assert!(
        ready_after <= bound,
        "ready after {ready_after:?}; load {load_s} s, last poll interval {last_wait:?}"
    );
    // `/` answers as `/health` does, without a token.
    let health: Value = reqwest::get(format!("{url}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let root: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(root["status"], health["status"]);
    assert_eq!(root["model"], health["model"]);

    // Three concurrent inferences through the queen, each to [DONE] after an `end`.
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { queen_infer(&url, prompt, 24).await })
        })
        .collect();
    for run in runs {
        let lines = run.await.unwrap();
        assert_eq!(
            lines.last().map(String::as_str),
            Some("[DONE]"),
            "{lines:?}"
        );
        let events = events_of(&lines);
        let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(types.first(), Some(&"started"), "{types:?}");
        assert_eq!(types.last(), Some(&"end"), "{types:?}");
        assert!(!types.contains(&"queued"), "{types:?}");
        let end = events.last().unwrap();
        assert!(["MAX_TOKENS", "EOS"].contains(&end["stop_reason"].as_str().unwrap()));
        let tokens = events.iter().filter(|e| e["type"] == "token").count();
        assert!(tokens > 0, "{lines:?}");
        let text: String = events
            .iter()
            .filter(|e| e["type"] == "token")
            .filter_map(|e| e["t"].as_str())
            .collect();
        assert!(text.contains("Paris"), "{text:?}");
    }

    // Eight streams in flight (four running, four queued), then the hive's stop.
    let streams: Vec<Arc<Mutex<Vec<String>>>> = (0..8).map(|_| Arc::default()).collect();
    let reads: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(i, lines)| {
            let url = url.clone();
            let lines = lines.clone();
            let prompt = format!(
                "<|im_start|>user\nTell story number {i}.<|im_end|>\n<|im_start|>assistant\n"
            );
            tokio::spawn(async move { queen_infer_into(&url, &prompt, 2000, lines).await })
        })
        .collect();
    let started = Instant::now();
    while streams
        .iter()
        .filter(|l| {
            l.lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(r#""type":"token""#))
        })
        .count()
        < 4
    {
        assert!(
            started.elapsed() < common::WAIT,
            "four streams never got a token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.stop().await;
    for read in reads {
        // The worker is gone: every stream has ended by now.
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("a stream outlived the worker")
            .unwrap();
    }
    for lines in &streams {
        let lines = lines.lock().unwrap();
        let events = events_of(&lines);
        let terminal = events
            .iter()
            .find(|e| e["type"] == "end" || e["type"] == "error")
            .unwrap_or_else(|| panic!("a stream was cut without a terminal event: {lines:?}"));
        if terminal["type"] == "error" {
            assert_eq!(terminal["code"], "CANCELLED", "{terminal}");
            assert_eq!(terminal["reason"], "shutdown", "{terminal}");
        }
    }

    // Every heartbeat parses as upstream's, from `starting` to `stopping`.
    let beats = heartbeats.all();
    let heartbeat_schema = schema("worker_heartbeat.schema.json");
    for beat in &beats {
        assert_valid(&heartbeat_schema, "heartbeat", beat);
        assert_eq!(beat["worker"]["id"], format!("worker-cpu-{}", worker.port));
    }
    let statuses: Vec<&str> = beats
        .iter()
        .filter_map(|b| b["worker"]["status"].as_str())
        .collect();
    assert_eq!(statuses.first(), Some(&"starting"), "{statuses:?}");
    assert!(statuses.contains(&"ready"), "{statuses:?}");
    assert!(statuses.contains(&"stopping"), "{statuses:?}");
}

/// A Hugging Face hub cache holding the default model as `{org}/{name}`, under `home`.
fn hub_cache(home: &Path, org: &str, name: &str) -> PathBuf {
    let repo = home.join(format!(".cache/huggingface/hub/models--{org}--{name}"));
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd\n").unwrap();
    // The hub stores blobs and links them into snapshots.
    std::os::unix::fs::symlink(
        default_model_path(),
        snapshot.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
    )
    .unwrap();
    snapshot
}

struct TempHome(PathBuf);

impl TempHome {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("llm-worker-home-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempHome {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_references_resolve_from_the_hub_cache_and_are_served_by_that_name() {
    let home = TempHome::new("refs");
    hub_cache(&home.0, "HuggingFaceTB", "SmolLM2-135M-Instruct-GGUF");
    let heartbeats = Heartbeats::default();
    let queen = start_queen(heartbeats.clone()).await;
    for reference in [
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
        "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1",
    ] {
        let mut worker = SpawnedWorker::spawn(reference, &queen, Some(&home.0));
        worker.poll_ready().await;
        let info: Value = reqwest::get(format!("{}/info", worker.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(info["model_id"], reference, "{info}");
        let models: Value = reqwest::get(format!("{}/v1/models", worker.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(models["data"][0]["id"], reference, "{models}");
        let lines = queen_infer(&worker.url(), "The capital of France is", 4).await;
        let events = events_of(&lines);
        assert_eq!(events[0]["model"], reference, "{events:?}");
        worker.stop().await;
        let beats = heartbeats.all();
        let schema = schema("worker_heartbeat.schema.json");
        let own: Vec<&Value> = beats
            .iter()
            .filter(|b| b["worker"]["port"] == worker.port)
            .collect();
        assert!(!own.is_empty());
        for beat in own {
            assert_valid(&schema, "heartbeat", beat);
            // Known from the flags, so the same while loading as after.
            assert_eq!(beat["worker"]["model_id"], reference, "{beat}");
        }
    }
}

#[test]
fn a_missing_reference_fails_at_once_naming_where_it_looked() {
    let home = TempHome::new("missing");
    let started = Instant::now();
    let output = Command::new(WORKER_BIN)
        .args(["--model", "SomeOrg/Missing-GGUF:Q4_K_M", "--port", "0"])
        .env("HOME", &home.0)
        .env_remove("XDG_CACHE_HOME")
        .env_remove("HF_HOME")
        .env_remove("HF_HUB_CACHE")
        .env_remove("LLM_WORKER_MODEL")
        .output()
        .expect("run the worker");
    let took = started.elapsed();
    assert!(!output.status.success());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let rbee = home
        .0
        .join(".cache/rbee/models/SomeOrg-Missing-GGUF-Q4_K_M/model.gguf");
    let hub = home
        .0
        .join(".cache/huggingface/hub/models--SomeOrg--Missing-GGUF/snapshots");
    assert!(stderr.contains(&rbee.display().to_string()), "{stderr}");
    assert!(stderr.contains(&hub.display().to_string()), "{stderr}");
}
