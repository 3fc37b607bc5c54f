//! An in-process worker on an ephemeral loopback port, serving the scripted fake model; and
//! the pieces for serving any other router or worker the same way.

#![allow(dead_code)]

use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use llm_worker_rbee::engine::SchedulerConfig;
use llm_worker_rbee::heartbeat::HeartbeatConfig;
use llm_worker_rbee::http::auth::ApiKey;
use llm_worker_rbee::jobs::RegistryConfig;
use llm_worker_rbee::model::chat_template::ChatTemplate;
use llm_worker_rbee::worker::{Worker, WorkerConfig};
use tokio::net::TcpListener;

use super::WAIT;
use super::client::Client;
use super::fake_backend::{Fault, SCRIPT, ScriptedBackend, script_tokens};

/// A loopback listener on a port of the system's choosing.
pub async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// Serves `router` on `listener` in the background; returns its base URL.
pub async fn serve_on(listener: TcpListener, router: Router) -> String {
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    base
}

/// Serves `router` on an ephemeral loopback port; returns its base URL.
pub async fn serve(router: Router) -> String {
    serve_on(bind().await, router).await
}

/// The worker's defaults with `parallel` slots.
pub fn worker_config(parallel: usize) -> WorkerConfig {
    WorkerConfig {
        scheduler: SchedulerConfig {
            max_sequences: parallel,
            batch_tokens: 512,
            // The default model's tests run with the prefix cache on, as the binary does.
            prefix_cache_bytes: 256 << 20,
            draft_tokens: 8,
            kv_budget_bytes: 0,
        },
        ..WorkerConfig::default()
    }
}

/// How a [`TestWorker`] is configured; the default is the worker's own defaults with two slots
/// and no token, and the fake model attached at once, writing [`SCRIPT`] without delay.
pub struct Setup {
    pub parallel: usize,
    pub queue: usize,
    /// How long each of the fake model's steps sleeps.
    pub step_delay: Duration,
    pub grace: Duration,
    pub ttl: Duration,
    /// The registry's capacity.
    pub capacity: usize,
    pub token: Option<&'static str>,
    /// More API keys beside `token` (which is the key named `default`).
    pub more_keys: Vec<ApiKey>,
    /// The fake model's tokens.
    pub script: Vec<u32>,
    /// The fake model's context.
    pub context: usize,
    /// The fake model's one faulty step.
    pub fault: Option<Fault>,
    pub chat_template: Option<ChatTemplate>,
    pub metrics_auth: bool,
    pub heartbeat: Option<HeartbeatConfig>,
    /// Attach the fake model at start; otherwise the worker is loading until
    /// [`TestWorker::attach`].
    pub attach: bool,
    /// The fake model's KV bytes per position and the worker's KV budget in bytes.
    pub kv_budget: Option<(usize, usize)>,
}

impl Default for Setup {
    fn default() -> Self {
        let worker = WorkerConfig::default();
        Self {
            parallel: 2,
            queue: worker.queue_capacity,
            step_delay: Duration::ZERO,
            grace: worker.registry.detach_grace,
            ttl: worker.registry.job_ttl,
            capacity: worker.registry.capacity,
            token: None,
            more_keys: Vec::new(),
            script: script_tokens(SCRIPT),
            context: 512,
            fault: None,
            chat_template: None,
            metrics_auth: false,
            heartbeat: None,
            attach: true,
            kv_budget: None,
        }
    }
}

/// A worker serving on an ephemeral port, and a [`Client`] for it (which it derefs to).
pub struct TestWorker {
    client: Client,
    pub port: u16,
    pub worker: Worker,
    /// Every prompt the fake model has been given, in order.
    prompts: Arc<Mutex<Vec<Vec<u32>>>>,
    script: Vec<u32>,
    step_delay: Duration,
    context: usize,
    fault: Option<Fault>,
    kv_bytes_per_position: usize,
}

impl Deref for TestWorker {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl TestWorker {
    pub async fn start(setup: Setup) -> Self {
        let listener = bind().await;
        let port = listener.local_addr().unwrap().port();
        let mut config = WorkerConfig {
            queue_capacity: setup.queue,
            registry: RegistryConfig {
                detach_grace: setup.grace,
                job_ttl: setup.ttl,
                capacity: setup.capacity,
            },
            api_keys: setup
                .token
                .map(|t| ApiKey::new("default", t))
                .into_iter()
                .chain(setup.more_keys.iter().cloned())
                .collect(),
            chat_template: setup.chat_template.map(Arc::new),
            heartbeat: setup.heartbeat,
            metrics_auth: setup.metrics_auth,
            ..worker_config(setup.parallel)
        };
        config.identity.port = port;
        if let Some((_, budget)) = setup.kv_budget {
            config.scheduler.kv_budget_bytes = budget;
        }
        let worker = Worker::new(config);
        let base = serve_on(listener, worker.router()).await;
        let w = Self {
            client: Client::new(base, setup.token),
            port,
            worker,
            prompts: Arc::default(),
            script: setup.script,
            step_delay: setup.step_delay,
            context: setup.context,
            fault: setup.fault,
            kv_bytes_per_position: setup.kv_budget.map_or(0, |(per, _)| per),
        };
        if setup.attach {
            w.attach();
        }
        w
    }

    /// Attaches the fake model: the worker is ready.
    pub fn attach(&self) {
        let mut backend = ScriptedBackend::new(self.context, self.script.clone(), self.step_delay);
        backend.prompts = self.prompts.clone();
        backend.fault = self.fault;
        backend.kv_bytes_per_position = self.kv_bytes_per_position;
        self.worker.attach(backend).unwrap();
    }

    /// The prompts the fake model has been given, once `n` have arrived.
    pub async fn prompts(&self, n: usize) -> Vec<Vec<u32>> {
        let start = Instant::now();
        loop {
            let p = self.prompts.lock().unwrap().clone();
            if p.len() >= n {
                return p;
            }
            assert!(start.elapsed() < WAIT, "backend saw {} prompts", p.len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
