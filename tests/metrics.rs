//! `GET /metrics` against a scripted fake backend: known requests move every metric by exactly
//! the right amount (read from the parsed exposition text), and `--metrics-auth` decides
//! whether the route needs the token. Every worker has its own registry, so these tests run in
//! parallel with each other and with every other test in the process.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::WAIT;
use common::client::infer;
use common::fake_backend::{ASCII_SCRIPT, MODEL, script_tokens};
use common::sse::assert_well_formed_ending;
use common::worker::{Setup, TestWorker};
use serde_json::{Value, json};

const CONTEXT: usize = 512;

/// `name{labels}` → value, from the Prometheus text format.
fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect("`series value`");
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("a number"),
            };
            (key.to_string(), value)
        })
        .collect()
}

/// Family name → its `# TYPE`, from the Prometheus text format (each declared once).
fn types(text: &str) -> HashMap<String, String> {
    let mut types = HashMap::new();
    for decl in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = decl.split_once(' ').expect("`# TYPE name type`");
        let earlier = types.insert(name.to_string(), kind.to_string());
        assert!(earlier.is_none(), "{name} declared twice");
    }
    types
}

/// A `vllm:*` series of the served model.
fn vllm(name: &str) -> String {
    format!(r#"vllm:{name}{{model_name="{MODEL}"}}"#)
}

/// A worker whose fake model takes 10 ms a step.
async fn start(parallel: usize, token: Option<&'static str>, metrics_auth: bool) -> TestWorker {
    TestWorker::start(Setup {
        parallel,
        token,
        metrics_auth,
        step_delay: Duration::from_millis(10),
        script: script_tokens(ASCII_SCRIPT),
        context: CONTEXT,
        ..Setup::default()
    })
    .await
}

impl TestWorker {
    async fn scrape(&self) -> HashMap<String, f64> {
        parse(&self.scrape_text().await)
    }

    async fn scrape_text(&self) -> String {
        let r = self
            .request(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        r.text().await.unwrap()
    }

    /// Runs a job to its end; returns how many tokens it generated.
    async fn run_to_max_tokens(&self, prompt: &str, max_tokens: usize) -> usize {
        let events = self.run(infer(prompt, max_tokens)).await;
        let (end, _) = assert_well_formed_ending(&events);
        assert_eq!(end.json()["stop_reason"], "MAX_TOKENS");
        events.iter().filter(|e| e.name() == "token").count()
    }

    /// Scrapes until `cond` holds.
    async fn scrape_until(
        &self,
        what: &str,
        cond: impl Fn(&HashMap<String, f64>) -> bool,
    ) -> HashMap<String, f64> {
        let start = Instant::now();
        loop {
            let m = self.scrape().await;
            if cond(&m) {
                return m;
            }
            assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn requests(api: &str, outcome: &str) -> String {
    format!(r#"rbee_worker_requests_total{{api="{api}",outcome="{outcome}"}}"#)
}

#[tokio::test]
async fn known_requests_move_every_metric_by_exactly_their_amounts() {
    let w = start(1, None, false).await;
    w.worker
        .metrics()
        .set_model_load_time(Duration::from_millis(1250));
    let before = w.scrape().await;

    // Three jobs that run to max_tokens, one after another. The tokenizer is byte-level, so a
    // prompt's tokens are its bytes.
    let mut generated = 0;
    for (prompt, max_tokens) in [("Hi", 5), ("abc", 7), ("wxyz", 4)] {
        let n = w.run_to_max_tokens(prompt, max_tokens).await;
        assert_eq!(n, max_tokens);
        generated += n;
    }

    // A long job holds the one slot while a second one waits.
    let long = w.create(infer("long", 400)).await;
    let mut long_stream = w.stream(&long, None).await;
    loop {
        let e = long_stream.next_within(WAIT).await.expect("stream ended");
        if e.name() == "token" {
            break;
        }
    }
    let queued = w.create(infer("q", 5)).await;
    let mid = w
        .scrape_until("one runs and one waits", |m| {
            m["rbee_worker_num_requests_running"] == 1.0
                && m["rbee_worker_num_requests_waiting"] == 1.0
        })
        .await;
    let ratio = mid["rbee_worker_kv_cache_usage_ratio"];
    assert!(ratio > 0.0 && ratio <= 1.0, "kv usage {ratio}");
    // "long" (4 positions) plus at least one generated token, of 1 slot x CONTEXT positions.
    assert!(ratio >= 5.0 / CONTEXT as f64, "kv usage {ratio}");
    // vLLM's names for the same numbers, read by cluster routers, in the same scrape.
    assert_eq!(mid[&vllm("num_requests_running")], 1.0);
    assert_eq!(mid[&vllm("num_requests_waiting")], 1.0);
    assert_eq!(mid[&vllm("kv_cache_usage_perc")], ratio);
    // /health and /info say the same, as optional fields.
    let (_, health) = w.get_json("/health").await;
    let (_, info) = w.get_json("/info").await;
    for (what, v) in [("/health", &health), ("/info", &info)] {
        let usage = v["kv_cache_usage"]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: {v}"));
        assert!(usage > 0.0 && usage <= 1.0, "{what}: {v}");
    }

    // A duplicate job id is refused at submission.
    let mut dup = infer("x", 1);
    dup["job_id"] = Value::from(long.clone());
    assert_eq!(w.post("/v1/jobs", &dup).await.status(), 409);

    // Cancel the waiting job (it never starts), then the running one.
    assert_eq!(w.delete(&queued).await, 204);
    assert_eq!(w.delete(&long).await, 204);
    let mut long_events = vec![];
    while let Some(e) = long_stream.next_within(WAIT).await {
        long_events.push(e);
    }
    let (terminal, _) = assert_well_formed_ending(&long_events);
    assert_eq!(terminal.json()["reason"], "client");
    let (_, long_status) = w.get_json(&format!("/v1/jobs/{long}")).await;
    let long_tokens = long_status["tokens_out"].as_u64().unwrap() as usize;
    assert!(long_tokens >= 1);
    generated += long_tokens;

    // The OpenAI front doors, through their routes (not streamed).
    let r = w
        .post(
            "/v1/completions",
            &json!({"prompt": "Yo", "max_tokens": 3, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let completion: Value = r.json().await.unwrap();
    assert_eq!(completion["usage"]["prompt_tokens"], 2, "{completion}");
    assert_eq!(completion["usage"]["completion_tokens"], 3, "{completion}");
    let r = w
        .post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Yo"}], "max_tokens": 2,
                    "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let chat: Value = r.json().await.unwrap();
    assert_eq!(chat["usage"]["completion_tokens"], 2, "{chat}");
    let chat_prompt = chat["usage"]["prompt_tokens"].as_f64().unwrap();
    generated += 3 + 2;

    let after = w
        .scrape_until("the slot is free", |m| {
            m["rbee_worker_num_requests_running"] == 0.0
        })
        .await;
    let delta = |key: &str| after[key] - before.get(key).copied().unwrap_or(0.0);

    let jobs_with_tokens = 3 + 1 + 2;
    let expected: Vec<(String, f64)> = vec![
        (requests("rbee", "completed"), 3.0),
        (requests("rbee", "cancelled"), 2.0),
        (requests("rbee", "rejected"), 1.0),
        (requests("rbee", "failed"), 0.0),
        (requests("openai_chat", "completed"), 1.0),
        (requests("openai_chat", "cancelled"), 0.0),
        (requests("openai_completions", "completed"), 1.0),
        // "Hi" + "abc" + "wxyz" + "long" + "Yo" + the chat prompt; "q" never got a slot.
        ("rbee_worker_prompt_tokens_total".into(), 15.0 + chat_prompt),
        (
            "rbee_worker_generation_tokens_total".into(),
            generated as f64,
        ),
        (
            "rbee_worker_time_to_first_token_seconds_count".into(),
            jobs_with_tokens as f64,
        ),
        (
            "rbee_worker_inter_token_latency_seconds_count".into(),
            (generated - jobs_with_tokens) as f64,
        ),
        // Every job that got a slot.
        ("rbee_worker_request_queue_time_seconds_count".into(), 6.0),
        // Every job that ended, the never-started one included.
        ("rbee_worker_e2e_request_latency_seconds_count".into(), 7.0),
    ];
    for (key, want) in &expected {
        assert_eq!(delta(key), *want, "{key}");
    }
    for name in [
        "time_to_first_token",
        "inter_token_latency",
        "request_queue_time",
        "e2e_request_latency",
    ] {
        let count = after[&format!("rbee_worker_{name}_seconds_count")];
        let inf = after[&format!(r#"rbee_worker_{name}_seconds_bucket{{le="+Inf"}}"#)];
        assert_eq!(count, inf, "{name}: +Inf bucket = count");
        assert!(
            delta(&format!("rbee_worker_{name}_seconds_sum")) > 0.0,
            "{name}"
        );
    }
    // Steps take 10 ms: inter-token latencies average about that.
    let itl = delta("rbee_worker_inter_token_latency_seconds_sum")
        / delta("rbee_worker_inter_token_latency_seconds_count");
    assert!(
        (0.005..0.5).contains(&itl),
        "mean inter-token latency {itl}"
    );

    assert_eq!(after["rbee_worker_num_requests_waiting"], 0.0);
    assert_eq!(after["rbee_worker_kv_cache_usage_ratio"], 0.0);
    assert_eq!(after[&vllm("num_requests_running")], 0.0);
    assert_eq!(after[&vllm("num_requests_waiting")], 0.0);
    assert_eq!(after[&vllm("kv_cache_usage_perc")], 0.0);
    assert_eq!(after["rbee_worker_model_load_seconds"], 1.25);
    let info = format!(
        r#"rbee_worker_info{{device="cpu:0",model="{MODEL}",version="{}"}}"#,
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(after[&info], 1.0);
}

#[tokio::test]
async fn the_vllm_series_a_cluster_router_reads_are_typed_and_mirror_the_engine() {
    let w = start(2, None, false).await;
    let text = w.scrape_text().await;
    let types = types(&text);
    for (name, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:cache_config_info", "gauge"),
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:prefix_cache_hits_total", "counter"),
        ("rbee_worker_prefix_cache_queries_total", "counter"),
        ("rbee_worker_prefix_cache_hits_total", "counter"),
        ("rbee_worker_prefix_cache_bytes", "gauge"),
        ("rbee_worker_prefix_cache_budget_bytes", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    // The endpoint picker reads block_size and num_gpu_blocks off cache_config_info: the fake
    // backend's KV is counted per position, so 2 slots x CONTEXT one-position blocks (the CPU
    // path's 64-position blocks are checked in src/metrics.rs).
    let m = parse(&text);
    let config = m
        .keys()
        .find(|k| k.starts_with("vllm:cache_config_info{"))
        .expect("cache_config_info");
    assert!(config.contains(r#"block_size="1""#), "{config}");
    assert!(
        config.contains(&format!(r#"num_gpu_blocks="{}""#, 2 * CONTEXT)),
        "{config}"
    );
    assert_eq!(m[config], 1.0);

    // Two jobs hold both slots and a third waits; then all end.
    let ids = [
        w.create(infer("one", 400)).await,
        w.create(infer("two", 400)).await,
        w.create(infer("three", 5)).await,
    ];
    let mid = w
        .scrape_until("two run (their caches filling) and one waits", |m| {
            m[&vllm("num_requests_running")] == 2.0
                && m[&vllm("num_requests_waiting")] == 1.0
                && m[&vllm("kv_cache_usage_perc")] > 0.0
        })
        .await;
    assert_eq!(mid["rbee_worker_num_requests_running"], 2.0);
    assert_eq!(mid["rbee_worker_num_requests_waiting"], 1.0);
    let usage = mid[&vllm("kv_cache_usage_perc")];
    assert!(usage > 0.0 && usage <= 1.0, "{usage}");
    for id in &ids {
        w.delete(id).await;
    }
    let after = w
        .scrape_until("every slot is free", |m| {
            m[&vllm("num_requests_running")] == 0.0 && m[&vllm("num_requests_waiting")] == 0.0
        })
        .await;
    assert_eq!(after[&vllm("kv_cache_usage_perc")], 0.0);

    // The prefix-cache series are the engine's counters, under both names.
    let stats = &w.worker.registry().served().unwrap().stats;
    let queries = stats.prefix_cache_queries.load(Ordering::Relaxed) as f64;
    let hits = stats.prefix_cache_hits.load(Ordering::Relaxed) as f64;
    assert_eq!(after[&vllm("prefix_cache_queries_total")], queries);
    assert_eq!(after["rbee_worker_prefix_cache_queries_total"], queries);
    assert_eq!(after[&vllm("prefix_cache_hits_total")], hits);
    assert_eq!(after["rbee_worker_prefix_cache_hits_total"], hits);
    assert!(hits <= queries);
    let budget = stats.prefix_cache_budget.load(Ordering::Relaxed) as f64;
    assert_eq!(after["rbee_worker_prefix_cache_budget_bytes"], budget);
}

#[tokio::test]
async fn metrics_are_public_unless_metrics_auth_is_on() {
    let anonymous = reqwest::Client::new();
    let status = |base: String, token: Option<&'static str>| {
        let anonymous = anonymous.clone();
        async move {
            let rb = anonymous.get(format!("{base}/metrics"));
            let rb = match token {
                Some(t) => rb.bearer_auth(t),
                None => rb,
            };
            rb.send().await.unwrap().status().as_u16()
        }
    };

    // A token protects the API but not /metrics by default.
    let w = start(1, Some("t0ken"), false).await;
    assert_eq!(status(w.base.clone(), None).await, 200);
    let info = anonymous
        .get(format!("{}/info", w.base))
        .send()
        .await
        .unwrap();
    assert_eq!(info.status(), 401);
    // A fresh worker counts from zero whatever the other tests in this process do.
    let m = w.scrape().await;
    assert_eq!(m[&requests("rbee", "completed")], 0.0);
    assert_eq!(m["rbee_worker_generation_tokens_total"], 0.0);

    let w = start(1, Some("t0ken"), true).await;
    assert_eq!(status(w.base.clone(), None).await, 401);
    assert_eq!(status(w.base.clone(), Some("wrong")).await, 401);
    assert_eq!(status(w.base.clone(), Some("t0ken")).await, 200);
    assert_eq!(w.get_json("/health").await.0, 200);

    // Without a token there is nothing to check: /metrics stays public.
    let w = start(1, None, true).await;
    assert_eq!(status(w.base.clone(), None).await, 200);
}
