//! What the integration tests share. Each test binary includes it with `mod common;` and uses
//! what it needs, so every module allows dead code.
//!
//! - [`fake_backend`]: the scripted fake model; [`worker`]: an in-process worker serving it on
//!   an ephemeral port; [`client`]: an HTTP client for any worker; [`sse`]: reading SSE;
//!   [`job_api`]: the job API's rules as test bodies, for the fake and the default model.
//! - [`process`]: the real worker binary as a child process.
//! - [`default_model`], [`conformance_rule`]: the default model and the llama.cpp comparison.
//! - [`tiny_models`]: random tiny models written as safetensors and GGUF ([`gguf_writer`],
//!   [`iq4`] for the types Candle cannot quantize); [`families`]: one small GGUF per model
//!   family, as llama.cpp's converter names things.

#![allow(dead_code)]

pub mod client;
pub mod conformance_rule;
pub mod default_model;
pub mod fake_backend;
pub mod families;
pub mod gguf_writer;
pub mod hf_twin;
pub mod iq4;
pub mod job_api;
pub mod process;
pub mod sse;
pub mod tiny_models;
pub mod worker;

use std::time::{Duration, Instant};

/// How long a test waits for any one thing: an answer, a stream's end, a state.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds, failing the test after [`WAIT`]; returns how long it took.
pub async fn wait_until<F, Fut>(what: &str, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}
