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
//!
//! Public beyond that are the building blocks an embedder may use on their own and that the
//! integration tests drive directly: the GGUF reader, tokenizer and chat templates
//! ([`model`]), the CPU kernels' types ([`kernels`]), generation parameters ([`generation`]),
//! the job registry's configuration ([`jobs`]), the HTTP request types and errors ([`http`]).
//! Everything else — connections, logging, metrics, model references, timestamps, the
//! worker's self-description, and the internals of those modules (the request pipeline, the
//! engine's scheduler, samplers, grammar compilers, attention) — is `pub(crate)`.

// Module docs name the private modules they are made of; `cargo doc --document-private-items`
// renders those links.
#![allow(rustdoc::private_intra_doc_links)]

pub mod backend;
pub mod bench;
pub mod config;
pub(crate) mod connections;
pub mod engine;
pub mod generation;
pub mod heartbeat;
pub mod http;
pub mod jobs;
pub mod kernels;
pub(crate) mod logging;
pub(crate) mod metrics;
pub mod model;
pub(crate) mod model_ref;
pub mod server;
pub(crate) mod timestamp;
pub mod worker;
pub(crate) mod worker_info;

pub use http::create_router;
pub use worker::setup_worker_with_backend;
