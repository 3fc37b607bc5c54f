//! The model layer: loading GGUF files and Hugging Face safetensors directories, the tokenizer,
//! the chat template, and the transformer forward. It does no IO beyond loading.
//!
//! - [`gguf`]: the GGUF reader (memory-mapped, bounds-checked).
//! - [`weights`]: weights by role, from either format, onto a Candle device.
//! - [`config`]: hyper-parameters and architecture flags.
//! - [`decoder`]: the one configurable decoder, its per-sequence KV caches, and the compute
//!   path it decides at load ([`decoder::ComputePath`]).
//! - [`tokenizer`], [`gguf_tokenizer`], [`detokenizer`]: text ↔ tokens.
//! - [`chat_template`]: Jinja chat templates.
//! - [`load`]: puts it together into a [`LoadedModel`].

pub(crate) mod attention;
pub mod chat_template;
pub mod config;
mod cpu_forward;
pub mod decoder;
pub mod detokenizer;
pub mod gguf;
pub mod gguf_tokenizer;
pub(crate) mod load;
mod moe;
pub(crate) mod reasoning;
pub(crate) mod rope;
pub mod tokenizer;
pub mod tool_calls;
mod vecmath;
pub mod weights;

use std::path::PathBuf;

pub use load::{LoadOptions, LoadedModel, ModelFormat, load_model};

/// Drives a streaming reply parser (reasoning, tool calls): `step` advances its state machine
/// by one state and returns false when it needs more text (or, with `last`, is done); what the
/// steps emit is collected.
fn run_steps<S, T>(
    parser: &mut S,
    last: bool,
    step: fn(&mut S, bool, &mut Vec<T>) -> bool,
) -> Vec<T> {
    let mut out = Vec::new();
    while step(parser, last, &mut out) {}
    out
}

/// Everything that can go wrong loading or running a model. Load errors name the file and
/// the problem.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {what} not found")]
    MissingFile { path: PathBuf, what: String },
    #[error("{path}: {message}")]
    Io { path: PathBuf, message: String },
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{source_name}: tensor {tensor} is missing")]
    MissingTensor { source_name: String, tensor: String },
    #[error("{source_name}: tensor {tensor} has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        source_name: String,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error(
        "{source_name}: tensor {tensor} has unsupported dtype {dtype} (supported: F32, F16, BF16)"
    )]
    UnsupportedDtype {
        source_name: String,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: cannot read safetensors: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{source_name}: tensor {tensor}: {message}")]
    Load {
        source_name: String,
        tensor: String,
        message: String,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("device: {0}")]
    Device(String),
    #[error("context overflow: {needed} positions needed, the context holds {context_length}")]
    ContextOverflow {
        needed: usize,
        context_length: usize,
    },
    #[error("forward failed: {0}")]
    Forward(String),
}
