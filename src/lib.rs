//! llm-worker-rbee: one model behind rbee's job API, with continuous batching on Candle.
//!
//! # Layout
//!
//! ARCHITECTURE.md holds the one module map: its "Layers" list says which module may use which
//! (`tests/layering.rs` checks the code against it), and its code map names the files and types.
//! An embedder needs [`setup_worker_with_backend`] (or [`worker::Worker`] for the whole
//! lifecycle), [`create_router`], [`engine::InferenceBackend`] for a model of its own,
//! [`backend::CandleInferenceBackend`] and [`model::load_model`] for ours, and
//! [`config::WorkerArgs`].

pub mod backend;
pub mod bench;
pub mod config;
pub mod connections;
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
