//! The engine's view of a model: a batched forward over sequences identified by [`SeqId`],
//! plus the immutable facts the HTTP layer needs ([`ModelMeta`]).

use std::sync::Arc;

use crate::model::chat_template::ChatTemplate;
use crate::model::decoder::ComputePath;
use crate::model::tokenizer::TextTokenizer;

/// Identifies a sequence (and its KV cache) inside a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Facts about the loaded model that never change while it is served.
#[derive(Clone)]
pub struct ModelMeta {
    /// The model's default served name.
    pub name: String,
    pub architecture: String,
    /// "gguf" or "safetensors".
    pub format: String,
    /// "cpu:0", "cuda:N", "metal:N".
    pub device: String,
    /// Positions a sequence may use (prompt plus generated tokens).
    pub context_length: usize,
    pub vocab_size: usize,
    pub tokenizer: Arc<TextTokenizer>,
    pub eog_tokens: Arc<[u32]>,
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// How the model computes (its forward's path and why, every tensor type's path), as the
    /// decoder decided at load; `None` for a backend that is not a decoder (the tests' fakes).
    pub compute: Option<Arc<ComputePath>>,
}

/// One sequence's part of a batched forward.
#[derive(Debug, Clone, Copy)]
pub struct BatchItem<'a> {
    pub seq: SeqId,
    /// Appended at the sequence's next positions; a sequence is created on first use.
    pub tokens: &'a [u32],
    /// How many of the last tokens get logits (1, or more to verify a speculative draft; only
    /// with [`InferenceBackend::verifies_drafts`]).
    pub logit_rows: usize,
}

/// What a draft is asked for: the sequence, every token it has (prompt, then generated, the
/// last one sampled but not yet fed), and the most tokens to draft.
#[derive(Debug, Clone, Copy)]
pub struct DraftRequest<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub max: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// A model the engine can drive. Only the engine thread calls these methods.
pub trait InferenceBackend: Send + 'static {
    fn meta(&self) -> &ModelMeta;

    /// Runs all items in one forward and returns, for each item, the logits after each of its
    /// last `logit_rows` tokens (vocabulary-sized), in order.
    fn forward(&mut self, batch: &[BatchItem<'_>]) -> Result<Vec<Vec<f32>>, BackendError>;

    /// Frees a sequence's cache. Unknown ids are ignored.
    fn release(&mut self, seq: SeqId);

    /// Bytes held by all KV caches (for metrics).
    fn kv_cache_bytes(&self) -> usize {
        0
    }

    /// Bytes of KV one position of one sequence takes; 0 when unknown (no memory budget).
    fn kv_bytes_per_position(&self) -> usize {
        0
    }

    /// Caps how far a sequence's cache may grow, in positions (its reservation under the
    /// memory budget); growing past it in one step is still allowed.
    fn limit_positions(&mut self, _seq: SeqId, _positions: usize) {}

    /// Whether [`InferenceBackend::propose`] drafts with a model of its own.
    fn has_draft_model(&self) -> bool {
        false
    }

    /// Drafts, for each `(sequence, its tokens so far, at most n)`, up to `n` tokens that are
    /// likely to follow (a smaller model's greedy continuation), to be verified by `forward`.
    fn propose(&mut self, requests: &[DraftRequest<'_>]) -> Result<Vec<Vec<u32>>, BackendError> {
        Ok(vec![Vec::new(); requests.len()])
    }

    /// Whether `forward` gives logits for several rows of an item and `truncate` forgets
    /// positions: what speculative decoding needs.
    fn verifies_drafts(&self) -> bool {
        false
    }

    /// Forgets a sequence's positions from `len` on (a rejected draft's).
    fn truncate(&mut self, _seq: SeqId, _len: usize) {}

    /// Starts sequence `to` with a copy of the first `len` positions of `from`'s KV cache (a
    /// prefix-cache hit; `from` is untouched). `Ok(false)` when the backend keeps no reusable
    /// caches or `from` holds fewer positions.
    fn copy_prefix(&mut self, _from: SeqId, _to: SeqId, _len: usize) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Keeps the first `len` positions of a finished sequence's cache for reuse and frees the
    /// rest; returns the bytes it still holds. `None`: it cannot be kept (it is released).
    fn keep_prefix(&mut self, seq: SeqId, _len: usize) -> Option<usize> {
        self.release(seq);
        None
    }
}
