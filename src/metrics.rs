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
//! - Series that mirror an engine counter (the prefix cache's) and the `vllm:*` series are
//!   built from the same readings at render time, each scrape, rather than registered: a
//!   registered counter can only be incremented, and the `model_name` label is known only once
//!   a model is served.
//!
//! The `vllm:*` series carry vLLM's own names (`vllm:num_requests_running`,
//! `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:cache_config_info`,
//! `vllm:prefix_cache_{queries,hits}_total`) so that the Gateway API Inference Extension's
//! endpoint picker and llm-d, which scrape those names, route to this worker unchanged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::engine::EngineStats;

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

/// What the engine's atomics (and the queue) say at scrape time.
#[derive(Debug, Clone, Default)]
pub struct GaugeReadings {
    /// The served model's name: the `model_name` label of the `vllm:*` series (no label while
    /// it is empty).
    pub model_name: String,
    pub running: usize,
    pub waiting: usize,
    /// Positions held in KV caches, over every running sequence.
    pub kv_positions: usize,
    /// Positions the running sequences may hold (slots × context length, or less under the KV
    /// budget); 0 while loading.
    pub kv_capacity_positions: usize,
    /// Bytes the KV caches have allocated.
    pub kv_cache_bytes: usize,
    /// How the KV caches store keys and values ("f16"): `cache_dtype` of
    /// `vllm:cache_config_info`, left out while empty (not known for this backend).
    pub kv_cache_dtype: &'static str,
    /// Positions per KV block (`block_size` of `vllm:cache_config_info`): the CPU path's
    /// blocks, or 1 where caches are allocated per position (0 reads as 1).
    pub kv_block_positions: usize,
    /// Prompt tokens looked up in the prefix cache, ever.
    pub prefix_cache_queries: u64,
    /// Of those, the tokens served from the cache.
    pub prefix_cache_hits: u64,
    /// Bytes of KV kept for reuse.
    pub prefix_cache_bytes: usize,
    /// The most bytes the prefix cache may keep (0: prefix caching is off).
    pub prefix_cache_budget: usize,
    /// Tokens drafted (prompt lookup or the draft model), and of those accepted.
    pub spec_drafted: u64,
    pub spec_accepted: u64,
}

impl GaugeReadings {
    /// The engine's numbers for a model of `context_length` positions per slot; the queue
    /// length, the model's name and the cache's dtype are the caller's to fill in.
    pub fn from_engine(stats: &EngineStats, context_length: usize) -> Self {
        let slots = stats.slots_total.load(Ordering::Relaxed);
        let capacity = match stats.kv_capacity_positions.load(Ordering::Relaxed) {
            0 => slots.saturating_mul(context_length),
            known => known,
        };
        Self {
            running: stats.running.load(Ordering::Relaxed),
            kv_positions: stats.kv_positions.load(Ordering::Relaxed),
            kv_capacity_positions: capacity,
            kv_cache_bytes: stats.kv_cache_bytes.load(Ordering::Relaxed),
            prefix_cache_queries: stats.prefix_cache_queries.load(Ordering::Relaxed),
            prefix_cache_hits: stats.prefix_cache_hits.load(Ordering::Relaxed),
            prefix_cache_bytes: stats.prefix_cache_bytes.load(Ordering::Relaxed),
            prefix_cache_budget: stats.prefix_cache_budget.load(Ordering::Relaxed),
            spec_drafted: stats.spec_drafted.load(Ordering::Relaxed),
            spec_accepted: stats.spec_accepted.load(Ordering::Relaxed),
            ..Self::default()
        }
    }

    /// Positions in use over what the running sequences may hold, 0 to 1 (0 while loading).
    pub fn kv_cache_usage(&self) -> f64 {
        if self.kv_capacity_positions == 0 {
            return 0.0;
        }
        (self.kv_positions as f64 / self.kv_capacity_positions as f64).clamp(0.0, 1.0)
    }

    /// Prefix-cache hits over lookups, in prompt tokens; `None` before the first lookup.
    pub fn prefix_cache_hit_rate(&self) -> Option<f64> {
        (self.prefix_cache_queries > 0).then(|| {
            (self.prefix_cache_hits as f64 / self.prefix_cache_queries as f64).clamp(0.0, 1.0)
        })
    }
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
    prefix_cache_bytes: IntGauge,
    prefix_cache_budget_bytes: IntGauge,
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
                "Positions held in KV caches over what the running sequences may hold (slots x context, or less under --kv-cache-mem); 1 is full.",
            )?,
            kv_cache_bytes: gauge_i(
                "rbee_worker_kv_cache_bytes",
                "Bytes allocated by the KV caches (a block shared by several caches once).",
            )?,
            prefix_cache_bytes: gauge_i(
                "rbee_worker_prefix_cache_bytes",
                "Bytes of KV kept by finished sequences for reuse (the prefix cache).",
            )?,
            prefix_cache_budget_bytes: gauge_i(
                "rbee_worker_prefix_cache_budget_bytes",
                "The most bytes the prefix cache may keep; 0 when prefix caching is off.",
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

    /// The exposition text, with the gauges set from `readings` and the series built from
    /// them (the mirrored counters and the `vllm:*` series) added.
    pub fn render(&self, readings: &GaugeReadings) -> Result<String, MetricsError> {
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.num_requests_running.set(as_i64(readings.running));
        self.num_requests_waiting.set(as_i64(readings.waiting));
        self.kv_cache_bytes.set(as_i64(readings.kv_cache_bytes));
        self.kv_cache_usage_ratio.set(readings.kv_cache_usage());
        self.prefix_cache_bytes
            .set(as_i64(readings.prefix_cache_bytes));
        self.prefix_cache_budget_bytes
            .set(as_i64(readings.prefix_cache_budget));
        let mut families = self.registry.gather();
        families.extend(snapshot_families(readings));
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut text = Vec::with_capacity(8 * 1024);
        TextEncoder::new().encode(&families, &mut text)?;
        Ok(String::from_utf8(text)?)
    }
}

/// One series of its own family, with `labels` (those with an empty value left out).
fn family(
    name: &str,
    help: &str,
    kind: MetricType,
    labels: &[(&str, &str)],
    value: f64,
) -> MetricFamily {
    let labels = labels
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(n, v)| {
            let mut pair = LabelPair::default();
            pair.set_name(n.to_string());
            pair.set_value(v.to_string());
            pair
        })
        .collect();
    let mut metric = Metric::from_label(labels);
    if kind == MetricType::COUNTER {
        let mut counter = prometheus::proto::Counter::default();
        counter.set_value(value);
        metric.set_counter(counter);
    } else {
        let mut gauge = prometheus::proto::Gauge::default();
        gauge.set_value(value);
        metric.set_gauge(gauge);
    }
    let mut family = MetricFamily::default();
    family.set_name(name.to_string());
    family.set_help(help.to_string());
    family.set_field_type(kind);
    family.set_metric(vec![metric]);
    family
}

/// The series built from `readings` at each scrape: the counters that mirror the engine's
/// prefix-cache atomics, and vLLM's names for what a cluster router reads.
fn snapshot_families(r: &GaugeReadings) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE};
    let model: &[(&str, &str)] = &[("model_name", r.model_name.as_str())];
    let queries = r.prefix_cache_queries as f64;
    let hits = r.prefix_cache_hits as f64;
    let mut families = vec![
        family(
            "rbee_worker_prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            COUNTER,
            &[],
            queries,
        ),
        family(
            "rbee_worker_prefix_cache_hits_total",
            "Prompt tokens whose keys and values came from the prefix cache instead of a prefill.",
            COUNTER,
            &[],
            hits,
        ),
        family(
            "rbee_worker_spec_draft_tokens_total",
            "Tokens drafted by prompt lookup or the draft model (speculative decoding).",
            COUNTER,
            &[],
            r.spec_drafted as f64,
        ),
        family(
            "rbee_worker_spec_accepted_tokens_total",
            "Drafted tokens the model's own samples confirmed.",
            COUNTER,
            &[],
            r.spec_accepted as f64,
        ),
        family(
            "vllm:spec_decode_num_draft_tokens_total",
            "Draft tokens (rbee_worker_spec_draft_tokens_total).",
            COUNTER,
            model,
            r.spec_drafted as f64,
        ),
        family(
            "vllm:spec_decode_num_accepted_tokens_total",
            "Accepted draft tokens (rbee_worker_spec_accepted_tokens_total).",
            COUNTER,
            model,
            r.spec_accepted as f64,
        ),
        family(
            "vllm:num_requests_running",
            "Requests holding a slot (rbee_worker_num_requests_running).",
            GAUGE,
            model,
            r.running as f64,
        ),
        family(
            "vllm:num_requests_waiting",
            "Requests waiting in the queue for a slot (rbee_worker_num_requests_waiting).",
            GAUGE,
            model,
            r.waiting as f64,
        ),
        family(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage, 0 to 1: positions in use over what the running sequences may hold (slots x context, or less under --kv-cache-mem; rbee_worker_kv_cache_usage_ratio).",
            GAUGE,
            model,
            r.kv_cache_usage(),
        ),
        family(
            "vllm:prefix_cache_queries_total",
            "Prefix-cache queries, in prompt tokens (rbee_worker_prefix_cache_queries_total).",
            COUNTER,
            model,
            queries,
        ),
        family(
            "vllm:prefix_cache_hits_total",
            "Prefix-cache hits, in prompt tokens (rbee_worker_prefix_cache_hits_total).",
            COUNTER,
            model,
            hits,
        ),
    ];
    // vLLM's labels are its cache config's fields: the block size in positions (the CPU path's
    // blocks; 1 where caches grow by position), and as "GPU blocks" the blocks every slot's
    // positions take. Absent until a model is served.
    if r.kv_capacity_positions > 0 {
        let block = r.kv_block_positions.max(1);
        let block_size = block.to_string();
        let blocks = r.kv_capacity_positions.div_ceil(block).to_string();
        let prefix_caching = if r.prefix_cache_budget > 0 {
            "True"
        } else {
            "False"
        };
        families.push(family(
            "vllm:cache_config_info",
            "Always 1; the labels describe the KV cache (block_size in positions).",
            GAUGE,
            &[
                ("block_size", &block_size),
                ("cache_dtype", r.kv_cache_dtype),
                ("enable_prefix_caching", prefix_caching),
                ("num_gpu_blocks", &blocks),
            ],
            1.0,
        ));
    }
    families
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
    use std::collections::{BTreeMap, HashMap};
    use std::sync::atomic::Ordering;

    use super::*;

    /// The exposition, parsed strictly: every family's `# TYPE` (once, before its samples),
    /// and every sample as `name{labels}` (labels in the order written) → value.
    struct Exposition {
        types: HashMap<String, String>,
        samples: HashMap<String, f64>,
        /// Each sample's labels by `name{labels}`.
        labels: HashMap<String, BTreeMap<String, String>>,
    }

    fn is_metric_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn is_label_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    fn parse(text: &str) -> Exposition {
        let mut e = Exposition {
            types: HashMap::new(),
            samples: HashMap::new(),
            labels: HashMap::new(),
        };
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let name = help.split(' ').next().unwrap();
                assert!(is_metric_name(name), "{line}");
                continue;
            }
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let (name, kind) = decl.split_once(' ').expect("`# TYPE name type`");
                assert!(is_metric_name(name), "{line}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                let earlier = e.types.insert(name.to_string(), kind.to_string());
                assert!(earlier.is_none(), "two TYPE lines for {name}");
                continue;
            }
            assert!(!line.starts_with('#'), "{line}");
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().expect("a number"),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}').expect("closing brace")),
                None => (series, ""),
            };
            assert!(is_metric_name(name), "{line}");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| e.types[*f] == "histogram"))
                .unwrap_or(name);
            assert!(e.types.contains_key(family), "{name} before its TYPE");
            let mut pairs = BTreeMap::new();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').expect("label=value");
                assert!(is_label_name(k), "{line}");
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                pairs.insert(k.to_string(), v.expect("quoted").to_string());
            }
            e.samples.insert(series.to_string(), value);
            e.labels.insert(series.to_string(), pairs);
        }
        e
    }

    /// `m` rendered with `readings`, parsed.
    fn scrape(m: &WorkerMetrics, readings: &GaugeReadings) -> Exposition {
        parse(&m.render(readings).unwrap())
    }

    #[test]
    fn every_family_parses_once_with_a_valid_name() {
        // `parse` checks every name, label and TYPE line, and that no family comes twice (a
        // series built at render time never shadows a registered one).
        let m = WorkerMetrics::new();
        scrape(&m, &GaugeReadings::default());
        m.set_info("tiny", "cpu:0", "0.1.0");
        let e = scrape(&m, &loaded(GaugeReadings::default()));
        assert!(e.types.contains_key("rbee_worker_info"));
        assert!(e.types.contains_key("vllm:cache_config_info"));
    }

    /// `readings` on a served model.
    fn loaded(readings: GaugeReadings) -> GaugeReadings {
        GaugeReadings {
            model_name: "org/tiny".into(),
            kv_capacity_positions: 4 * 512,
            ..readings
        }
    }

    #[test]
    fn the_vllm_series_mirror_ours_with_their_types_and_model_name() {
        let readings = GaugeReadings {
            running: 3,
            waiting: 5,
            kv_positions: 512,
            kv_cache_dtype: "f16",
            kv_block_positions: 64,
            prefix_cache_queries: 40,
            prefix_cache_hits: 30,
            prefix_cache_bytes: 1000,
            prefix_cache_budget: 4096,
            ..loaded(GaugeReadings::default())
        };
        let e = scrape(&WorkerMetrics::new(), &readings);
        let model = r#"{model_name="org/tiny"}"#;
        for (vllm, ours, kind, want) in [
            ("num_requests_running", "num_requests_running", "gauge", 3.0),
            ("num_requests_waiting", "num_requests_waiting", "gauge", 5.0),
            ("kv_cache_usage_perc", "kv_cache_usage_ratio", "gauge", 0.25),
            (
                "prefix_cache_queries_total",
                "prefix_cache_queries_total",
                "counter",
                40.0,
            ),
            (
                "prefix_cache_hits_total",
                "prefix_cache_hits_total",
                "counter",
                30.0,
            ),
        ] {
            let (vllm, ours) = (format!("vllm:{vllm}"), format!("rbee_worker_{ours}"));
            assert_eq!(e.types[&vllm], kind, "{vllm}");
            assert_eq!(e.types[&ours], kind, "{ours}");
            assert_eq!(e.samples[&format!("{vllm}{model}")], want, "{vllm}");
            assert_eq!(e.samples[&ours], want, "{ours}");
        }
        assert_eq!(e.samples["rbee_worker_prefix_cache_bytes"], 1000.0);
        assert_eq!(e.samples["rbee_worker_prefix_cache_budget_bytes"], 4096.0);

        assert_eq!(e.types["vllm:cache_config_info"], "gauge");
        let (series, labels) = e
            .labels
            .iter()
            .find(|(k, _)| k.starts_with("vllm:cache_config_info"))
            .expect("cache_config_info");
        assert_eq!(e.samples[series], 1.0);
        let want: BTreeMap<String, String> = [
            ("block_size", "64"),
            ("cache_dtype", "f16"),
            ("enable_prefix_caching", "True"),
            ("num_gpu_blocks", "32"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(labels, &want);
    }

    #[test]
    fn before_a_model_the_vllm_series_have_no_label_and_no_cache_config() {
        let readings = GaugeReadings {
            waiting: 2,
            ..GaugeReadings::default()
        };
        let e = scrape(&WorkerMetrics::new(), &readings);
        assert_eq!(e.samples["vllm:num_requests_waiting"], 2.0);
        assert_eq!(e.samples["vllm:kv_cache_usage_perc"], 0.0);
        assert!(!e.types.contains_key("vllm:cache_config_info"));
        assert!(!e.samples.keys().any(|k| k.contains("model_name")));
    }

    #[test]
    fn the_series_follow_the_engine_atomics_between_scrapes() {
        let m = WorkerMetrics::new();
        let stats = EngineStats::default();
        stats.slots_total.store(2, Ordering::Relaxed);
        let scrape = |stats: &EngineStats| {
            let readings = GaugeReadings {
                model_name: "tiny".into(),
                ..GaugeReadings::from_engine(stats, 100)
            };
            let e = scrape(&m, &readings);
            (readings, e)
        };
        let (r, e) = scrape(&stats);
        assert_eq!(r.prefix_cache_hit_rate(), None, "no lookup yet");
        assert_eq!(
            e.samples[r#"vllm:prefix_cache_queries_total{model_name="tiny"}"#],
            0.0
        );
        assert!(
            e.labels
                .iter()
                .any(|(k, l)| k.starts_with("vllm:cache_config_info")
                    && l["num_gpu_blocks"] == "200"
                    && l["enable_prefix_caching"] == "False"
                    && !l.contains_key("cache_dtype"))
        );

        stats.running.store(2, Ordering::Relaxed);
        stats.kv_positions.store(50, Ordering::Relaxed);
        stats.prefix_cache_queries.store(64, Ordering::Relaxed);
        stats.prefix_cache_hits.store(16, Ordering::Relaxed);
        stats.prefix_cache_budget.store(1 << 20, Ordering::Relaxed);
        let (r, e) = scrape(&stats);
        assert_eq!(r.prefix_cache_hit_rate(), Some(0.25));
        assert_eq!(r.kv_cache_usage(), 0.25);
        for (series, want) in [
            (r#"vllm:num_requests_running{model_name="tiny"}"#, 2.0),
            (r#"vllm:kv_cache_usage_perc{model_name="tiny"}"#, 0.25),
            (
                r#"vllm:prefix_cache_queries_total{model_name="tiny"}"#,
                64.0,
            ),
            (r#"vllm:prefix_cache_hits_total{model_name="tiny"}"#, 16.0),
            ("rbee_worker_prefix_cache_queries_total", 64.0),
            ("rbee_worker_prefix_cache_hits_total", 16.0),
            ("rbee_worker_prefix_cache_budget_bytes", 1048576.0),
        ] {
            assert_eq!(e.samples[series], want, "{series}");
        }

        // The counters keep up with the engine's, scrape after scrape.
        stats.prefix_cache_queries.fetch_add(36, Ordering::Relaxed);
        stats.prefix_cache_hits.fetch_add(34, Ordering::Relaxed);
        stats.running.store(0, Ordering::Relaxed);
        let (r, e) = scrape(&stats);
        assert_eq!(r.prefix_cache_hit_rate(), Some(0.5));
        assert_eq!(e.samples["rbee_worker_prefix_cache_queries_total"], 100.0);
        assert_eq!(
            e.samples[r#"vllm:prefix_cache_hits_total{model_name="tiny"}"#],
            50.0
        );
        assert_eq!(
            e.samples[r#"vllm:num_requests_running{model_name="tiny"}"#],
            0.0
        );
    }

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
            "rbee_worker_prefix_cache_queries_total 0",
            "rbee_worker_prefix_cache_hits_total 0",
            "rbee_worker_prefix_cache_bytes 0",
            "rbee_worker_prefix_cache_budget_bytes 0",
            // No model yet: no `model_name` label.
            "vllm:num_requests_running 0",
            "vllm:num_requests_waiting 0",
            "vllm:kv_cache_usage_perc 0",
            "vllm:prefix_cache_queries_total 0",
            "vllm:prefix_cache_hits_total 0",
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
                ..GaugeReadings::default()
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
