//! Prometheus metrics ([`WorkerMetrics`]), named `rbee_worker_*` and shaped like vLLM's
//! `vllm:*` so that dashboards translate by renaming.
//!
//! Each worker owns its own `prometheus::Registry`, passed explicitly (worker → job registry →
//! each job's [`JobObserver`]); there is no process-global recorder, so several workers in one
//! process (the tests) never see each other's numbers.
//!
//! Two kinds of updates:
//! - Counters and histograms move on the engine path, from each job's sink: every call is a few
//!   atomic operations on pre-resolved series (no label look-up, no lock, no IO), so the engine
//!   thread never waits for metrics.
//! - Gauges (running, waiting, KV-cache usage) are read from the engine's atomics when
//!   `/metrics` is scraped ([`GaugeReadings`]), so nothing updates them between scrapes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The `Content-Type` of the Prometheus text exposition format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which front door a job came through: the `api` label of `rbee_worker_requests_total`.
/// A closed set, so the label's cardinality is bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobApi {
    /// `POST /v1/jobs`, `POST /v1/inference`.
    Rbee,
    /// `POST /v1/chat/completions`.
    OpenAiChat,
    /// `POST /v1/completions`.
    OpenAiCompletions,
}

impl JobApi {
    pub const ALL: [JobApi; 3] = [Self::Rbee, Self::OpenAiChat, Self::OpenAiCompletions];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rbee => "rbee",
            Self::OpenAiChat => "openai_chat",
            Self::OpenAiCompletions => "openai_completions",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a request ended: the `outcome` label of `rbee_worker_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished on its own (a stop condition, `max_tokens`, end of context).
    Completed,
    /// The engine failed it.
    Failed,
    /// By the client, a disconnect, or shutdown.
    Cancelled,
    /// Refused at submission (queue full, loading, draining, duplicate id): never queued.
    Rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Rejected => "rejected",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode the metrics: {0}")]
    Encode(#[from] prometheus::Error),
    #[error("the metrics text is not UTF-8: {0}")]
    Utf8(#[from] std::string::FromUtf8Error),
}

/// vLLM's TTFT buckets, with finer ones below 10 ms for small models.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token buckets, with finer ones below 10 ms (a tiny model on a CPU is faster).
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/// vLLM's request-latency buckets, with sub-second ones (a short job on a free slot).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];

/// What the engine's atomics say at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct GaugeReadings {
    pub running: usize,
    pub waiting: usize,
    /// Positions held in KV caches, over every running sequence.
    pub kv_positions: usize,
    /// Positions all slots could hold (slots × context length); 0 while loading.
    pub kv_capacity_positions: usize,
    /// Bytes the KV caches have allocated.
    pub kv_cache_bytes: usize,
}

/// Every metric of one worker, registered in the worker's own registry.
pub struct WorkerMetrics {
    registry: Registry,
    /// `[api][outcome]`, resolved once so the engine path never looks a label up.
    requests: Vec<Vec<IntCounter>>,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
    e2e_request_latency: Histogram,
    request_queue_time: Histogram,
    num_requests_running: IntGauge,
    num_requests_waiting: IntGauge,
    kv_cache_usage_ratio: Gauge,
    kv_cache_bytes: IntGauge,
    model_load_seconds: Gauge,
    info: IntGaugeVec,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    /// A fresh registry with every metric at zero. Every `requests_total` series exists from the
    /// start, so `rate()` sees the first request.
    pub fn new() -> Self {
        // The definitions below are constants: failing to register them is a bug in this file
        // (a bad name or a duplicate), caught by the unit tests, never a runtime condition.
        Self::build().expect("the metric definitions are valid and distinct")
    }

    fn build() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge_i = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let gauge_f = |name: &str, help: &str| -> Result<Gauge, prometheus::Error> {
            let g = Gauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram =
            |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, prometheus::Error> {
                let h =
                    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };

        let requests_vec = prometheus::IntCounterVec::new(
            Opts::new(
                "rbee_worker_requests_total",
                "Generation requests by front door and outcome.",
            ),
            &["api", "outcome"],
        )?;
        registry.register(Box::new(requests_vec.clone()))?;
        let requests = JobApi::ALL
            .iter()
            .map(|api| {
                Outcome::ALL
                    .iter()
                    .map(|o| requests_vec.get_metric_with_label_values(&[api.as_str(), o.as_str()]))
                    .collect::<Result<Vec<_>, _>>()
            })
            .collect::<Result<Vec<_>, _>>()?;

        let info = IntGaugeVec::new(
            Opts::new(
                "rbee_worker_info",
                "Always 1 once a model is served; its labels say which model, device and version.",
            ),
            &["model", "device", "version"],
        )?;
        registry.register(Box::new(info.clone()))?;

        Ok(Self {
            requests,
            prompt_tokens: counter(
                "rbee_worker_prompt_tokens_total",
                "Prompt tokens of the requests admitted to a slot.",
            )?,
            generation_tokens: counter("rbee_worker_generation_tokens_total", "Tokens generated.")?,
            time_to_first_token: histogram(
                "rbee_worker_time_to_first_token_seconds",
                "From a request's arrival to its first generated token.",
                TTFT_BUCKETS,
            )?,
            inter_token_latency: histogram(
                "rbee_worker_inter_token_latency_seconds",
                "Between consecutive generated tokens of one request.",
                ITL_BUCKETS,
            )?,
            e2e_request_latency: histogram(
                "rbee_worker_e2e_request_latency_seconds",
                "From a request's arrival to its end (completed, failed or cancelled).",
                LATENCY_BUCKETS,
            )?,
            request_queue_time: histogram(
                "rbee_worker_request_queue_time_seconds",
                "From a request's arrival to its admission to a slot.",
                LATENCY_BUCKETS,
            )?,
            num_requests_running: gauge_i(
                "rbee_worker_num_requests_running",
                "Requests holding a slot.",
            )?,
            num_requests_waiting: gauge_i(
                "rbee_worker_num_requests_waiting",
                "Requests waiting in the queue for a slot.",
            )?,
            kv_cache_usage_ratio: gauge_f(
                "rbee_worker_kv_cache_usage_ratio",
                "Positions held in KV caches over what all slots can hold (slots x context); 1 is full.",
            )?,
            kv_cache_bytes: gauge_i(
                "rbee_worker_kv_cache_bytes",
                "Bytes allocated by the KV caches.",
            )?,
            model_load_seconds: gauge_f(
                "rbee_worker_model_load_seconds",
                "How long loading the served model took.",
            )?,
            info,
            registry,
        })
    }

    /// A request refused at submission.
    pub fn request_rejected(&self, api: JobApi) {
        self.requests[api.index()][Outcome::Rejected.index()].inc();
    }

    pub fn set_model_load_time(&self, load: Duration) {
        self.model_load_seconds.set(load.as_secs_f64());
    }

    /// Sets `rbee_worker_info{model,device,version} 1` (replacing an earlier model's series).
    pub fn set_info(&self, model: &str, device: &str, version: &str) {
        self.info.reset();
        self.info
            .with_label_values(&[model, device, version])
            .set(1);
    }

    /// The exposition text, with the gauges set from `readings`.
    pub fn render(&self, readings: &GaugeReadings) -> Result<String, MetricsError> {
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.num_requests_running.set(as_i64(readings.running));
        self.num_requests_waiting.set(as_i64(readings.waiting));
        self.kv_cache_bytes.set(as_i64(readings.kv_cache_bytes));
        let ratio = if readings.kv_capacity_positions == 0 {
            0.0
        } else {
            readings.kv_positions as f64 / readings.kv_capacity_positions as f64
        };
        self.kv_cache_usage_ratio.set(ratio.clamp(0.0, 1.0));
        let mut text = Vec::with_capacity(8 * 1024);
        TextEncoder::new().encode(&self.registry.gather(), &mut text)?;
        Ok(String::from_utf8(text)?)
    }
}

/// One job's view of the metrics: it knows the job's door, prompt length and arrival, and its
/// record calls it from the engine path with durations from the job's one timeline (it
/// measures nothing itself). Every method is a few atomic operations.
#[derive(Debug, Clone)]
pub struct JobObserver {
    metrics: Arc<WorkerMetrics>,
    api: JobApi,
    prompt_tokens: usize,
    arrived: Instant,
}

impl JobObserver {
    pub fn new(
        metrics: Arc<WorkerMetrics>,
        api: JobApi,
        prompt_tokens: usize,
        arrived: Instant,
    ) -> Self {
        Self {
            metrics,
            api,
            prompt_tokens,
            arrived,
        }
    }

    pub fn api(&self) -> JobApi {
        self.api
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    /// The job got a slot, `queue_time` after it arrived.
    pub fn started(&self, queue_time: Duration) {
        self.metrics.prompt_tokens.inc_by(self.prompt_tokens as u64);
        self.metrics
            .request_queue_time
            .observe(queue_time.as_secs_f64());
    }

    /// A token was generated, `after` its arrival (the first) or the token before it.
    pub fn token(&self, first: bool, after: Duration) {
        self.metrics.generation_tokens.inc();
        let histogram = if first {
            &self.metrics.time_to_first_token
        } else {
            &self.metrics.inter_token_latency
        };
        histogram.observe(after.as_secs_f64());
    }

    /// The job's terminal event, `total` after it arrived.
    pub fn ended(&self, outcome: Outcome, total: Duration) {
        self.metrics.requests[self.api.index()][outcome.index()].inc();
        self.metrics
            .e2e_request_latency
            .observe(total.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exposed_from_the_start() {
        let m = WorkerMetrics::new();
        let text = m.render(&GaugeReadings::default()).unwrap();
        for name in [
            "rbee_worker_prompt_tokens_total 0",
            "rbee_worker_generation_tokens_total 0",
            "rbee_worker_time_to_first_token_seconds_count 0",
            "rbee_worker_inter_token_latency_seconds_count 0",
            "rbee_worker_e2e_request_latency_seconds_count 0",
            "rbee_worker_request_queue_time_seconds_count 0",
            "rbee_worker_num_requests_running 0",
            "rbee_worker_num_requests_waiting 0",
            "rbee_worker_kv_cache_usage_ratio 0",
            "rbee_worker_model_load_seconds 0",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        let request_series = text
            .lines()
            .filter(|l| l.starts_with("rbee_worker_requests_total{"))
            .count();
        assert_eq!(request_series, JobApi::ALL.len() * Outcome::ALL.len());
        assert!(
            text.contains(r#"rbee_worker_requests_total{api="openai_chat",outcome="rejected"} 0"#)
        );
    }

    #[test]
    fn a_job_moves_its_series() {
        let m = Arc::new(WorkerMetrics::new());
        let t0 = Instant::now();
        let job = JobObserver::new(m.clone(), JobApi::OpenAiCompletions, 7, t0);
        job.started(Duration::from_millis(2));
        job.token(true, Duration::from_millis(30));
        job.token(false, Duration::from_millis(10));
        job.ended(Outcome::Completed, Duration::from_millis(41));
        m.request_rejected(JobApi::Rbee);
        m.set_info("tiny", "cpu:0", "0.1.0");
        m.set_model_load_time(Duration::from_millis(1500));
        let text = m
            .render(&GaugeReadings {
                running: 1,
                waiting: 2,
                kv_positions: 25,
                kv_capacity_positions: 100,
                kv_cache_bytes: 4096,
            })
            .unwrap();
        for line in [
            r#"rbee_worker_requests_total{api="openai_completions",outcome="completed"} 1"#,
            r#"rbee_worker_requests_total{api="rbee",outcome="rejected"} 1"#,
            "rbee_worker_prompt_tokens_total 7",
            "rbee_worker_generation_tokens_total 2",
            "rbee_worker_time_to_first_token_seconds_count 1",
            "rbee_worker_inter_token_latency_seconds_count 1",
            "rbee_worker_e2e_request_latency_seconds_count 1",
            "rbee_worker_request_queue_time_seconds_count 1",
            "rbee_worker_num_requests_running 1",
            "rbee_worker_num_requests_waiting 2",
            "rbee_worker_kv_cache_usage_ratio 0.25",
            "rbee_worker_kv_cache_bytes 4096",
            "rbee_worker_model_load_seconds 1.5",
            r#"rbee_worker_info{device="cpu:0",model="tiny",version="0.1.0"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
