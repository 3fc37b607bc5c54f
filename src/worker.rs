//! Putting the worker together: queue, registry, engine and router ([`Worker`]), and the
//! seed's one-call entry point [`setup_worker_with_backend`].
//!
//! A [`Worker`] exists before its model: the router answers `/health` with 503 `loading`
//! until [`Worker::attach`] hands it a backend, which is what lets the server bind first and
//! load second. [`Worker::shutdown`] is the graceful stop: refuse new jobs, let the ones in
//! flight finish for up to the drain timeout, cancel the rest (each gets its terminal event).
//! [`Worker::finish`] is the very end: the last heartbeat (`stopped`).
//!
//! The worker owns its [`WorkerMetrics`] (handed to the registry, and so to every job) and,
//! with a hive configured, its [`Heartbeat`], which it tells about each lifecycle transition.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;

use crate::engine::{InferenceBackend, RequestQueue, SchedulerConfig};
use crate::heartbeat::{Heartbeat, HeartbeatConfig, StatusSource};
use crate::http::auth::ApiKey;
use crate::http::{self, ApiAuth, AppState};
use crate::jobs::WorkerState;
use crate::jobs::{JobRegistry, RegistryConfig};
use crate::metrics::WorkerMetrics;
use crate::model::chat_template::ChatTemplate;
use crate::worker_info::WorkerIdentity;

/// How long the engine may take to notice an abort (it finishes the step in progress).
const ABORT_WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub scheduler: SchedulerConfig,
    pub queue_capacity: usize,
    pub registry: RegistryConfig,
    /// The served model name (`--model-ref`); `None` uses the model's own.
    pub model_id: Option<String>,
    /// The keys clients must present one of (none: authentication off).
    pub api_keys: Vec<ApiKey>,
    pub identity: WorkerIdentity,
    /// `--chat-template`: renders OpenAI chat requests instead of the model's own template.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// Heartbeats to a hive (`--hive-url`); `None` sends nothing.
    pub heartbeat: Option<HeartbeatConfig>,
    /// `/metrics` requires the API token too.
    pub metrics_auth: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            queue_capacity: 64,
            registry: RegistryConfig::default(),
            model_id: None,
            api_keys: Vec::new(),
            identity: WorkerIdentity::new("llm-worker-rbee-cpu", "cpu:0"),
            chat_template: None,
            heartbeat: None,
            metrics_auth: false,
        }
    }
}

/// How a graceful shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Every job finished on its own within the drain timeout (none had to be cancelled).
    pub drained: bool,
    /// The engine thread has exited (false only if it was stuck past the abort wait).
    pub engine_stopped: bool,
}

pub struct Worker {
    registry: Arc<JobRegistry>,
    scheduler: SchedulerConfig,
    model_id: Option<String>,
    router: Router,
    metrics: Arc<WorkerMetrics>,
    heartbeat: Option<Heartbeat>,
}

impl Worker {
    /// A worker without a model yet. With a heartbeat configured, this must run inside a tokio
    /// runtime (the heartbeat's task is spawned on it) and the first heartbeat leaves at once.
    pub fn new(config: WorkerConfig) -> Self {
        let queue = Arc::new(RequestQueue::new(config.queue_capacity));
        // Room for every job that can be live at once, so only finished ones are ever evicted.
        let live_max = config.queue_capacity + config.scheduler.max_sequences;
        let registry_config = RegistryConfig {
            capacity: config.registry.capacity.max(2 * live_max),
            ..config.registry
        };
        let metrics = Arc::new(WorkerMetrics::new());
        let registry = JobRegistry::with_metrics(queue, registry_config, metrics.clone());
        for key in &config.api_keys {
            tracing::info!(
                key = %key.name,
                token_fingerprint = %http::auth::fingerprint(&key.token),
                "API key accepted"
            );
        }
        if config.api_keys.is_empty() && config.metrics_auth {
            tracing::warn!("metrics auth is on but no API token is set: /metrics stays public");
        }
        let mut identity = config.identity;
        if let Some(name) = &config.model_id {
            identity.model_id = name.clone();
        }
        let state = AppState::new(registry.clone(), identity)
            .with_metrics_auth(config.metrics_auth)
            .with_chat_template(config.chat_template.clone());
        let heartbeat = config.heartbeat.and_then(|hb| {
            let source = StatusSource::new(state.identity.clone(), &registry);
            Heartbeat::start(hb, source)
        });
        let router = http::router(state, ApiAuth::with_keys(&config.api_keys));
        Self {
            registry,
            scheduler: config.scheduler,
            model_id: config.model_id,
            router,
            metrics,
            heartbeat,
        }
    }

    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        &self.metrics
    }

    /// Tells the hive (if any) the state as of now.
    fn report_transition(&self) {
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.transition();
        }
    }

    pub fn router(&self) -> Router {
        self.router.clone()
    }

    pub fn registry(&self) -> &Arc<JobRegistry> {
        &self.registry
    }

    /// Starts the engine on `backend`; from now on jobs are accepted.
    pub fn attach<B: InferenceBackend>(&self, backend: B) -> std::io::Result<()> {
        let meta = backend.meta();
        tracing::info!(
            model = %self.model_id.as_deref().unwrap_or(&meta.name),
            device = %meta.device,
            context_length = meta.context_length,
            slots = self.scheduler.max_sequences,
            "model attached; accepting jobs"
        );
        self.registry
            .serve(backend, self.model_id.clone(), self.scheduler)?;
        if let Some(served) = self.registry.served() {
            self.metrics.set_info(
                &served.model_id,
                &served.meta.device,
                env!("CARGO_PKG_VERSION"),
            );
        }
        self.report_transition();
        Ok(())
    }

    /// Stops admitting jobs, lets queued and running ones finish for up to `drain_timeout`,
    /// then cancels what is left (reason `shutdown`). Every job has its terminal event when
    /// this returns with `engine_stopped`.
    pub async fn shutdown(&self, drain_timeout: Duration) -> ShutdownReport {
        self.registry.begin_drain();
        self.report_transition();
        let drained = wait_until(drain_timeout, || self.registry.engine_finished()).await;
        if !drained {
            tracing::warn!(
                "drain timeout ({drain_timeout:?}) reached; cancelling the remaining jobs"
            );
            self.registry.abort();
        }
        let engine_stopped = wait_until(ABORT_WAIT, || self.registry.engine_finished()).await;
        // Nothing runs any more (or the engine is stuck and the process is about to stop
        // waiting for it): either way the worker is on its way out.
        self.registry.advance(WorkerState::Stopping);
        self.report_transition();
        ShutdownReport {
            drained,
            engine_stopped,
        }
    }

    /// The end of the worker's life: status `stopped`, and with a hive, the last heartbeat
    /// (waits at most about twice the heartbeat's request timeout). Call it after the HTTP
    /// server has stopped.
    pub async fn finish(&self) {
        self.registry.advance(WorkerState::Stopped);
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.finish().await;
        }
    }
}

async fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The seed's interface: a queue, a registry and an engine on `backend`, behind the rbee
/// router. The engine stops when the router (and every clone of it) is dropped.
pub fn setup_worker_with_backend<B: InferenceBackend>(
    backend: B,
    expected_token: Option<String>,
) -> Router {
    let queue = Arc::new(RequestQueue::new(WorkerConfig::default().queue_capacity));
    let registry = JobRegistry::new(queue.clone(), RegistryConfig::default());
    if let Err(e) = registry.serve(backend, None, SchedulerConfig::default()) {
        // The router still answers: `/health` says `loading` and jobs get 503.
        tracing::error!("cannot start the generation engine: {e}");
    }
    http::create_router(queue, registry, expected_token)
}
