//! The heartbeat against a stand-in hive (an axum server on an ephemeral port that records
//! every heartbeat with its `Authorization` header).
//!
//! - In process, with a scripted fake backend: the first heartbeat leaves at once (`starting`),
//!   the status follows the load (`ready → busy → ready`) and the shutdown (`stopping →
//!   stopped`: draining is `stopping` in rbee's words); with the hive down the worker keeps
//!   serving, logs the outage once, and the heartbeats resume when the hive is back.
//! - The real binary on a tiny GGUF written by the test, stopped with SIGTERM: the same
//!   lifecycle on the wire, and JSON logs with the startup line and one line per job.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::WAIT;
use common::client::{Client, infer};
use common::fake_backend::{ASCII_SCRIPT, MODEL, script_tokens};
use common::process::WorkerProcess;
use common::sse::assert_well_formed_ending;
use common::tiny_models::{Arch, TempDir, TinySpec, gguf_writer, random_weights};
use common::worker::{Setup, TestWorker};
use llm_worker_rbee::heartbeat::HeartbeatConfig;
use serde_json::Value;
use tokio::sync::oneshot;

const CONTEXT: usize = 512;

// ---------------------------------------------------------------------------------------------
// The stand-in hive

/// One heartbeat as the hive got it.
#[derive(Debug, Clone)]
struct Beat {
    authorization: Option<String>,
    body: Value,
}

impl Beat {
    fn status(&self) -> &str {
        self.body["worker"]["status"].as_str().unwrap_or("?")
    }
}

type Inbox = Arc<Mutex<Vec<Beat>>>;

struct Hive {
    addr: SocketAddr,
    inbox: Inbox,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn take_heartbeat(
    State(inbox): State<Inbox>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    let Ok(body) = serde_json::from_str::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE;
    }
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    inbox.lock().unwrap().push(Beat {
        authorization,
        body,
    });
    StatusCode::NO_CONTENT
}

impl Hive {
    async fn start() -> Self {
        Self::listen("127.0.0.1:0".parse().unwrap(), Inbox::default()).await
    }

    async fn listen(addr: SocketAddr, inbox: Inbox) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route("/v1/worker-heartbeat", post(take_heartbeat))
            .with_state(inbox.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        Self {
            addr,
            inbox,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener and every connection: the hive's address refuses connections.
    async fn go_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the hive did not stop")
                .unwrap();
        }
    }

    /// Listens again on the same address, keeping what it got.
    async fn come_back(self) -> Self {
        Self::listen(self.addr, self.inbox.clone()).await
    }

    fn beats(&self) -> Vec<Beat> {
        self.inbox.lock().unwrap().clone()
    }

    /// The statuses received, consecutive repeats folded.
    fn statuses(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for beat in self.beats() {
            if out.last().map(String::as_str) != Some(beat.status()) {
                out.push(beat.status().to_string());
            }
        }
        out
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&[Beat]) -> bool) -> Vec<Beat> {
        let start = Instant::now();
        loop {
            let beats = self.beats();
            if cond(&beats) {
                return beats;
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting until {what}; got {:?}",
                self.statuses()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_for_status(&self, status: &str) -> Beat {
        let beats = self
            .wait_for(&format!("status {status}"), |b| {
                b.last().is_some_and(|b| b.status() == status)
            })
            .await;
        beats.last().cloned().unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// An in-process worker on a fake backend

/// A one-slot worker reporting to a hive, loading until [`TestWorker::attach`]; its fake model
/// takes `step_delay` a step.
async fn start(heartbeat: HeartbeatConfig, step_delay: Duration) -> TestWorker {
    TestWorker::start(Setup {
        parallel: 1,
        heartbeat: Some(heartbeat),
        step_delay,
        script: script_tokens(ASCII_SCRIPT),
        context: CONTEXT,
        attach: false,
        ..Setup::default()
    })
    .await
}

/// Heartbeats quick enough for a test: status polled every 10 ms, changes 50 ms apart.
fn fast_heartbeat(hive: &Hive) -> HeartbeatConfig {
    let mut c = HeartbeatConfig::new(&hive.url()).unwrap();
    c.token = Some("hive-secret".into());
    c.status_poll = Duration::from_millis(10);
    c.min_change_gap = Duration::from_millis(50);
    c.backoff_base = Duration::from_millis(50);
    c.request_timeout = Duration::from_secs(2);
    c
}

#[tokio::test]
async fn heartbeats_start_at_once_and_follow_load_and_shutdown() {
    let hive = Hive::start().await;
    let config = fast_heartbeat(&hive);
    // Only transitions and changes in this test, no periodic heartbeat.
    let t = Instant::now();
    // 20 ms a step, 40 tokens: the one slot is busy for most of a second.
    let w = start(
        HeartbeatConfig {
            interval: Duration::from_secs(600),
            ..config
        },
        Duration::from_millis(20),
    )
    .await;
    let first = hive
        .wait_for("the first heartbeat", |b| !b.is_empty())
        .await[0]
        .clone();
    let first_after = t.elapsed();
    assert!(first_after < Duration::from_secs(2), "took {first_after:?}");
    assert_eq!(first.authorization.as_deref(), Some("Bearer hive-secret"));
    let info = &first.body["worker"];
    assert_eq!(info["status"], "starting");
    // A string from the start (rbee's `WorkerInfo` has no optional field); empty while only
    // the model itself knows its name.
    assert_eq!(info["model_id"], "");
    assert_eq!(info["port"], w.port);
    assert_eq!(info["implementation"], "llm-worker-rbee-cpu");
    assert_eq!(info["device"], "cpu:0");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["slots_total"], 0);
    // The optional cache fields come with a served model.
    assert!(info.get("kv_cache_usage").is_none(), "{info}");
    assert!(info["id"].as_str().unwrap().starts_with("worker-"));
    assert!(info["started_at"].as_str().unwrap().ends_with('Z'));
    assert!(first.body["timestamp"].as_str().unwrap().ends_with('Z'));

    w.attach();
    let ready = hive.wait_for_status("ready").await;
    let info = &ready.body["worker"];
    assert_eq!(info["model_id"], MODEL);
    assert_eq!(info["slots_total"], 1);
    assert_eq!(info["slots_busy"], 0);
    assert_eq!(info["ctx_size"], CONTEXT);

    let job = tokio::spawn({
        let client = Client::clone(&w);
        async move { client.run(infer("Hi", 40)).await }
    });
    let busy = hive.wait_for_status("busy").await;
    assert_eq!(busy.body["worker"]["slots_busy"], 1);
    let usage = busy.body["worker"]["kv_cache_usage"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&usage), "{usage}");
    let events = job.await.unwrap();
    assert_eq!(assert_well_formed_ending(&events).1.data, "[DONE]");
    let ready_again = hive.wait_for_status("ready").await;
    assert_eq!(ready_again.body["worker"]["slots_busy"], 0);
    assert_eq!(hive.statuses(), ["starting", "ready", "busy", "ready"]);

    // The Worker API's shutdown (the binary's SIGTERM path is the test below).
    let report = w.worker.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained && report.engine_stopped);
    w.worker.finish().await;
    assert_eq!(
        hive.statuses(),
        ["starting", "ready", "busy", "ready", "stopping", "stopped"]
    );
    assert!(
        hive.beats()
            .iter()
            .all(|b| b.authorization.as_deref() == Some("Bearer hive-secret"))
    );
    let stamps: Vec<String> = hive
        .beats()
        .iter()
        .map(|b| b.body["timestamp"].as_str().unwrap().to_string())
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
}

/// Log lines written while the guard lives, on this thread (the tests' runtime is
/// single-threaded, so the heartbeat task logs here too).
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

#[tokio::test]
async fn with_the_hive_down_the_worker_serves_and_heartbeats_resume_when_it_returns() {
    let logs = CapturedLogs::default();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer({
                let logs = logs.clone();
                move || logs.clone()
            })
            .finish(),
    );
    let mut hive = Hive::start().await;
    let w = start(
        HeartbeatConfig {
            interval: Duration::from_millis(200),
            ..fast_heartbeat(&hive)
        },
        Duration::ZERO,
    )
    .await;
    w.attach();
    hive.wait_for_status("ready").await;

    hive.go_down().await;
    let down_at = Instant::now();
    for _ in 0..3 {
        let t = Instant::now();
        let events = w.run(infer("Hi", 5)).await;
        assert_eq!(events.iter().filter(|e| e.name() == "token").count(), 5);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t.elapsed()
        );
    }
    assert_eq!(w.get_json("/health").await.0, 200);
    // Several retries fail meanwhile (backoff from 50 ms, capped at the 200 ms interval).
    tokio::time::sleep(Duration::from_millis(800).saturating_sub(down_at.elapsed())).await;
    assert_eq!(logs.count("hive unreachable"), 1, "one line per outage");
    assert_eq!(logs.count("hive reachable again"), 0);

    let received = hive.beats().len();
    let hive = hive.come_back().await;
    let back_at = Instant::now();
    let beats = hive
        .wait_for("heartbeats resume", |b| b.len() > received)
        .await;
    let resumed_after = back_at.elapsed();
    assert!(
        resumed_after < Duration::from_secs(2),
        "took {resumed_after:?}"
    );
    assert_eq!(beats[received].status(), "ready");
    // The worker logs the recovery once the hive has answered, which can come a moment after
    // the hive recorded the beat.
    let deadline = Instant::now() + Duration::from_secs(2);
    while logs.count("hive reachable again") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(logs.count("hive unreachable"), 1);
    assert_eq!(logs.count("hive reachable again"), 1);
    // And they go on at the interval.
    hive.wait_for("more heartbeats", |b| b.len() > received + 2)
        .await;
}

// ---------------------------------------------------------------------------------------------
// The real binary, stopped with SIGTERM

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reports_its_lifecycle_and_says_stopped_after_sigterm() {
    let dir = TempDir::new("heartbeat");
    let mut spec = TinySpec::new(Arch::Llama);
    spec.context = 256;
    let model = dir.path().join("tiny.gguf");
    gguf_writer(&spec, &random_weights(&spec, 7), None)
        .write(&model)
        .expect("write the tiny GGUF");

    let hive = Hive::start().await;
    let mut worker = WorkerProcess::start(|command| {
        // Exactly the flags the hive passes today; the rest come from the environment.
        command
            .args(["--worker-id", "worker-7", "--model"])
            .arg(&model)
            .args(["--device", "0", "--port", "0", "--queen-url", &hive.url()])
            .env("LLM_WORKER_PARALLEL", "1")
            .env("LLM_WORKER_THREADS", "1")
            .env("LLM_WORKER_CTX_SIZE", "256")
            .env("LLM_WORKER_HEARTBEAT_INTERVAL", "30s")
            .env("LLORCH_LOG_FORMAT", "json")
            .env("LLM_WORKER_HIVE_TOKEN", "hive-secret");
    });
    let mut log: Vec<Value> = Vec::new();
    let ready_line = worker.wait_for_line(WAIT, "the worker never said it was ready", |line| {
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        log.push(v.clone());
        (v["message"] == "worker ready").then_some(v)
    });
    let base = ready_line["url"].as_str().unwrap().to_string();
    assert_eq!(ready_line["level"], "INFO");
    assert_eq!(ready_line["model"], "tiny");
    assert_eq!(ready_line["device"], "cpu:0");
    assert_eq!(ready_line["threads"], 1);
    assert!(ready_line["load_time_s"].is_number(), "{ready_line}");

    let ready = hive.wait_for_status("ready").await;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(ready.body["worker"]["port"], port);
    assert_eq!(ready.body["worker"]["id"], "worker-7");
    assert_eq!(ready.body["worker"]["model_id"], "tiny");
    assert_eq!(ready.body["worker"]["ctx_size"], 256);

    // One job, so that its log line can be checked.
    let client = Client::new(base, None);
    let prompt = "a very private prompt";
    let job_id = client.create(infer(prompt, 8)).await;
    let events = client.stream(&job_id, None).await.collect(WAIT).await;
    let (end, _) = assert_well_formed_ending(&events);
    let metrics = client.metrics_text().await;
    let ttft_histogram_s: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rbee_worker_time_to_first_token_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the TTFT histogram");

    worker.sigterm();
    let status = worker.wait_for_exit();
    assert!(status.success(), "exit status {status:?}");

    // On the wire: starting, ready (busy and back, if the job was seen), then the shutdown.
    let statuses = hive.statuses();
    assert_eq!(statuses[..2], ["starting", "ready"], "{statuses:?}");
    // Draining is `stopping` in rbee's words, as is the engine's stop after it.
    assert_eq!(
        statuses[statuses.len() - 2..],
        ["stopping", "stopped"],
        "{statuses:?}"
    );
    assert!(
        statuses[2..statuses.len() - 2]
            .iter()
            .all(|s| s == "busy" || s == "ready"),
        "{statuses:?}"
    );
    assert!(
        hive.beats()
            .iter()
            .all(|b| b.authorization.as_deref() == Some("Bearer hive-secret"))
    );

    // The logs: one line for the job, in its span, with sizes and no text.
    while let Ok(line) = worker.lines.recv_timeout(Duration::from_secs(5)) {
        log.push(serde_json::from_str(&line).unwrap_or(Value::String(line)));
    }
    // Every line about the job is in its span (so a log query on job_id finds all of them).
    let queued: Vec<&Value> = log
        .iter()
        .filter(|l| l["message"] == "job queued")
        .collect();
    assert_eq!(queued.len(), 1, "{log:?}");
    assert_eq!(
        queued[0]["span"]["job_id"],
        job_id.as_str(),
        "{}",
        queued[0]
    );
    let finished: Vec<&Value> = log
        .iter()
        .filter(|l| l["message"] == "job finished")
        .collect();
    assert_eq!(finished.len(), 1, "{log:?}");
    let line = finished[0];
    assert_eq!(line["span"]["job_id"], job_id.as_str(), "{line}");
    assert_eq!(line["span"]["api"], "rbee", "{line}");
    assert_eq!(line["outcome"], "completed");
    let stop_reason = end.json()["stop_reason"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase();
    assert_eq!(line["reason"], stop_reason.as_str());
    assert_eq!(line["tokens_in"], prompt.len());
    assert_eq!(line["tokens_out"], end.json()["tokens_out"]);
    assert!(line["tokens_per_s"].is_number(), "{line}");
    // One timeline: the `end` event (whole ms, truncated), the log line (ms rounded to 0.1)
    // and the one TTFT observation (seconds) are the same duration.
    let log_ttft_ms = line["ttft_ms"].as_f64().unwrap();
    let end_ttft_ms = end.json()["ttft_ms"].as_f64().unwrap();
    let observed_ms = ttft_histogram_s * 1000.0;
    assert!(
        (observed_ms - end_ttft_ms) > -1e-6 && (observed_ms - end_ttft_ms) < 1.0,
        "histogram {observed_ms} ms, end {end_ttft_ms} ms"
    );
    assert!(
        (observed_ms - log_ttft_ms).abs() <= 0.05 + 1e-9,
        "histogram {observed_ms} ms, log {log_ttft_ms} ms"
    );
    for l in &log {
        let text = l.to_string();
        assert!(!text.contains(prompt), "prompt text in a log line: {text}");
        assert!(
            !text.contains("hive-secret"),
            "a token in a log line: {text}"
        );
    }
    assert!(log.iter().any(|l| l["message"] == "stopped"));
}
