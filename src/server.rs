//! The binaries' shared `main`: bind, load the model in the background, serve, and stop
//! gracefully on SIGTERM or SIGINT.
//!
//! Order matters: the listener is bound before the model loads so the hive sees the worker at
//! once (`/health` says `loading`), and signal handlers are installed before either, so a
//! SIGTERM at any point takes the graceful path. A second signal exits immediately.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use tokio::net::TcpListener;

use crate::backend::CandleInferenceBackend;
use crate::config::{ServerSettings, WorkerArgs};
use crate::connections::ConnectionLimits;
use crate::engine::SchedulerConfig;
use crate::jobs::RegistryConfig;
use crate::model::LoadOptions;
use crate::model_ref::ModelSource;
use crate::worker::{Worker, WorkerConfig};
use crate::worker_info::WorkerIdentity;

/// After the engine has stopped, how long open streams get to deliver their last events.
const STREAM_FLUSH: Duration = Duration::from_secs(5);

/// What distinguishes the cpu, cuda and metal binaries.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSpec {
    /// Reported as `implementation` ("llm-worker-rbee-cpu").
    pub implementation: &'static str,
    /// "cpu", "cuda" or "metal".
    pub kind: &'static str,
    /// Builds the device for `--device N`.
    pub build: fn(usize) -> candle_core::Result<Device>,
}

#[derive(Debug, thiserror::Error)]
enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the {kind} device {index}: {message}")]
    Device {
        kind: &'static str,
        index: usize,
        message: String,
    },
    #[error("cannot load the model: {0}")]
    Load(String),
    #[error("cannot start the generation engine: {0}")]
    Engine(std::io::Error),
    #[error("the server failed: {0}")]
    Serve(std::io::Error),
}

/// The binaries' `main`: answers `--build-info` before anything else is parsed or touched (the
/// hive asks it of every installed worker binary, with no other argument), otherwise parses the
/// flags and runs the worker.
pub fn main(device: DeviceSpec) -> ExitCode {
    if std::env::args_os().skip(1).any(|a| a == "--build-info") {
        println!("{}", build_profile());
        return ExitCode::SUCCESS;
    }
    run(<WorkerArgs as clap::Parser>::parse(), device)
}

/// Allocations of this size and more get their own mappings from glibc's malloc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 64 * 1024;

/// Fixes glibc's mmap threshold. Left dynamic, it rises to the size of the largest block freed
/// (up to 32 MiB), after which the prefix cache's long-lived KV buffers share the heap with each
/// step's short-lived ones; the heap then fragments and cannot shrink: a soak held 4 to 6 times
/// the cache's budget in RSS. Mapped apart, a buffer's memory goes back when it is freed.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a malloc parameter; it is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// `release` or `debug`: the profile this binary was built with, as the hive reads it (an
/// optimized build with debug assertions, like the test profile, counts as `debug`).
pub fn build_profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Runs the worker until it is told to stop. Exit code 0 after a graceful shutdown, 2 for a
/// configuration error, 1 for anything else.
pub fn run(args: WorkerArgs, device: DeviceSpec) -> ExitCode {
    args.apply_threads();
    fix_mmap_threshold();
    // Held to the end of `run`: dropping it flushes the buffered log lines.
    let _log_writer = crate::logging::init(args.log_format);
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    // HTTP work is light; more async workers would only compete with the compute threads.
    let async_threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(async_threads)
        .thread_name("http")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(args, settings, device));
    // A model load interrupted by a signal may still be running on the blocking pool.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(
    args: WorkerArgs,
    settings: ServerSettings,
    device: DeviceSpec,
) -> Result<(), ServerError> {
    let mut signals = Signals::install();
    let listener = TcpListener::bind(settings.bind)
        .await
        .map_err(|source| ServerError::Bind {
            addr: settings.bind,
            source,
        })?;
    let addr = listener.local_addr().map_err(ServerError::Serve)?;

    let device_label = if device.kind == "cpu" {
        "cpu:0".to_string()
    } else {
        format!("{}:{}", device.kind, args.device)
    };
    let mut identity = WorkerIdentity::new(device.implementation, &device_label);
    if let Some(id) = &args.worker_id {
        identity.id = id.clone();
    }
    identity.port = addr.port();
    let worker = Arc::new(Worker::new(WorkerConfig {
        scheduler: SchedulerConfig {
            max_sequences: args.parallel as usize,
            batch_tokens: args.batch_size as usize,
            prefix_cache_bytes: args.prefix_cache_bytes(),
            draft_tokens: args.draft_tokens as usize,
            kv_budget_bytes: args.kv_budget_bytes(),
        },
        queue_capacity: args.queue_capacity as usize,
        registry: RegistryConfig {
            detach_grace: args.detach_grace,
            job_ttl: args.job_ttl,
            ..RegistryConfig::default()
        },
        model_id: args.served_name(&settings.model),
        api_keys: settings.api_keys.clone(),
        identity,
        chat_template: args.chat_template()?.map(Arc::new),
        heartbeat: settings.heartbeat.clone(),
        metrics_auth: args.metrics_auth,
    }));
    if settings.api_keys.is_empty() {
        tracing::warn!("no API token set: every client that can reach {addr} may use this worker");
    }

    let (stop_server, server_stopped) = tokio::sync::watch::channel(false);
    let limits = ConnectionLimits {
        max_connections: args.max_connections as usize,
        header_timeout: args.header_timeout,
        body_timeout: args.body_timeout,
    };
    match crate::connections::raise_open_file_limit() {
        Ok(fds) if fds < args.max_connections + crate::connections::RESERVED_FDS => {
            tracing::warn!(
                open_file_limit = fds,
                "--max-connections {} is more than the open-file limit leaves room for; \
                 connections past about {} wait unaccepted instead of getting a 503",
                args.max_connections,
                fds.saturating_sub(crate::connections::RESERVED_FDS)
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
    let server = tokio::spawn(crate::connections::serve(
        listener,
        worker.router(),
        limits,
        server_stopped,
    ));
    tracing::info!(worker_id = %worker_id(&args), "listening on http://{addr}");

    let load_args = args.clone();
    let model = settings.model.clone();
    let loading = tokio::task::spawn_blocking(move || load_backend(&load_args, &model, device));
    let loaded = tokio::select! {
        loaded = loading => Some(loaded),
        () = signals.recv() => None,
        () = tokio::time::sleep(args.load_timeout) => {
            // Never `loading` forever: the hive and load balancers then see the worker gone.
            worker.finish().await;
            return Err(ServerError::Load(format!(
                "the model did not load within --load-timeout {:?}",
                args.load_timeout
            )));
        }
    };
    match loaded {
        None => tracing::info!("stop requested while the model was loading"),
        Some(loaded) => {
            let attached = loaded
                .map_err(|e| ServerError::Load(format!("loader task: {e}")))
                .and_then(|loaded| loaded)
                .and_then(|backend| {
                    let load_time = backend.load_time();
                    worker.metrics().set_model_load_time(load_time);
                    worker.attach(backend).map_err(ServerError::Engine)?;
                    Ok(load_time)
                });
            let load_time = match attached {
                Ok(t) => t,
                Err(e) => {
                    // The hive hears `stopped` rather than waiting for heartbeats to stop.
                    worker.finish().await;
                    return Err(e);
                }
            };
            log_ready(&worker, addr, &args, load_time);
            signals.recv().await;
            tracing::info!(
                drain_timeout = ?args.drain_timeout,
                "stop requested; finishing the jobs in flight"
            );
            tokio::spawn(async move {
                signals.recv().await;
                tracing::warn!("second stop signal; exiting now");
                std::process::exit(130);
            });
            let report = worker.shutdown(args.drain_timeout).await;
            tracing::info!(
                drained = report.drained,
                engine_stopped = report.engine_stopped,
                "generation stopped"
            );
        }
    }

    let _ = stop_server.send(true);
    match tokio::time::timeout(STREAM_FLUSH, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(ServerError::Serve(e)),
        Ok(Err(e)) => return Err(ServerError::Serve(std::io::Error::other(e))),
        Err(_) => tracing::warn!("some streams were still open after {STREAM_FLUSH:?}; closing"),
    }
    worker.finish().await;
    tracing::info!("stopped");
    Ok(())
}

/// The startup line: where, what, on which device, with how many threads, loaded how fast.
fn log_ready(worker: &Worker, addr: std::net::SocketAddr, args: &WorkerArgs, load: Duration) {
    let served = worker.registry().served();
    let threads = args
        .threads
        .map_or_else(crate::model::load::physical_cores, |n| n as usize);
    tracing::info!(
        url = %format!("http://{addr}"),
        model = served.map_or("", |s| s.model_id.as_str()),
        device = served.map_or("", |s| s.meta.device.as_str()),
        threads,
        load_time_s = (load.as_secs_f64() * 1000.0).round() / 1000.0,
        "worker ready"
    );
}

fn worker_id(args: &WorkerArgs) -> &str {
    args.worker_id.as_deref().unwrap_or("(generated)")
}

fn load_backend(
    args: &WorkerArgs,
    model: &ModelSource,
    device: DeviceSpec,
) -> Result<CandleInferenceBackend, ServerError> {
    let path = model.local_path()?;
    let built = (device.build)(args.device).map_err(|e| ServerError::Device {
        kind: device.kind,
        index: args.device,
        message: e.to_string(),
    })?;
    tracing::info!(path = %path.display(), "loading the model");
    let options = LoadOptions {
        device: built,
        context_length: Some(args.context_length()),
        threads: args.threads.map(|n| n as usize),
        cpu_kernels: true,
    };
    let mut backend = CandleInferenceBackend::load(&path, &options)
        .map_err(|e| ServerError::Load(e.to_string()))?;
    tracing::info!(load_time = ?backend.load_time(), "model loaded");
    if let Some(draft_path) = &args.model_draft {
        tracing::info!(path = %draft_path.display(), "loading the draft model");
        let draft = CandleInferenceBackend::load(draft_path, &options).map_err(|e| {
            ServerError::Load(format!("the draft model {}: {e}", draft_path.display()))
        })?;
        backend.set_draft_model(draft).map_err(ServerError::Load)?;
    }
    Ok(backend)
}

/// SIGTERM and SIGINT, registered when created (not on first poll), so no signal is lost to
/// the default handler while the model loads.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let term = signal(SignalKind::terminate());
            let int = signal(SignalKind::interrupt());
            if let Err(e) = term.as_ref().and(int.as_ref()) {
                tracing::warn!("cannot install signal handlers: {e}");
            }
            Self {
                term: term.ok(),
                int: int.ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                // `None` from `recv` means no more signals will come: wait forever rather than
                // report a signal that never happened.
                if let Some(s) = s
                    && s.recv().await.is_some()
                {
                    return;
                }
                std::future::pending().await
            }
            tokio::select! {
                () = next(&mut self.term) => {}
                () = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
