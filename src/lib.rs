//! llm-worker-rbee: one model behind rbee's job API, with continuous batching on Candle.
//!
//! # Layout
//!
//! Folders follow the dependency direction: each module uses only those listed after it.
//!
//! - [`server`]: the binaries' shared `main` (bind, load in the background, serve, graceful
//!   shutdown on SIGTERM/SIGINT). `src/bin/{cpu,cuda,metal}.rs` only name their device.
//! - [`config`]: command-line flags and environment variables ([`config::WorkerArgs`]);
//!   [`model_ref`]: `--model` as a path or a model reference resolved without network.
//! - [`logging`]: structured logs (`--log-format pretty|json`).
//! - [`worker`]: queue + registry + engine + router ([`worker::Worker`]), and the seed's
//!   [`setup_worker_with_backend`].
//! - [`heartbeat`]: the [`heartbeat::WorkerHeartbeat`] sent to the hive (`--hive-url`).
//! - [`worker_info`]: what the worker reports about itself (`/info`, the heartbeat).
//! - [`http`]: routes, auth, validation, error mapping and SSE; the seed's [`create_router`].
//! - [`jobs`]: [`jobs::JobRegistry`] and each job's state and event log.
//! - [`metrics`]: the worker's Prometheus metrics ([`metrics::WorkerMetrics`]), moved by each
//!   job's record on the engine path with atomics only.
//! - [`engine`]: the bounded [`engine::RequestQueue`] and the [`engine::GenerationEngine`]
//!   thread that owns the model and runs every sequence.
//! - [`backend`]: [`backend::CandleInferenceBackend`], a loaded model with its KV caches.
//! - [`generation`]: sampling, stop strings and the one per-sequence generation loop.
//! - [`kernels`]: our CPU quantized matmul kernels (scalar, AVX2, NEON) and their thread pool.
//! - [`model`]: GGUF / safetensors loading, the tokenizer, chat templates, the decoder.
//! - [`bench`]: the llama-bench-shaped speed measurement behind `llm-worker-rbee-bench`.

pub mod backend;
pub mod bench;
pub mod config;
pub mod engine;
pub mod generation;
pub mod heartbeat;
pub mod http;
pub mod jobs;
pub mod kernels;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod model_ref;
pub mod server;
pub mod timestamp;
pub mod worker;
pub mod worker_info;

pub use http::create_router;
pub use worker::setup_worker_with_backend;
