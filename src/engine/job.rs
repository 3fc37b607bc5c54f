//! What the engine is given (a [`GenerationJob`]) and what it reports back ([`EngineEvent`]s
//! through the job's [`JobSink`]).

use std::sync::Arc;
use std::time::SystemTime;

use crate::generation::{FinishReason, GenerationParams, TokenStep};

/// Why a job was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The client asked (`DELETE /v1/jobs/{id}`).
    Client,
    /// The client that watched the job's stream went away.
    Disconnect,
    /// No client ever opened the job's stream.
    Unattached,
    /// The worker is shutting down.
    Shutdown,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Disconnect => "disconnect",
            Self::Unattached => "unattached",
            Self::Shutdown => "shutdown",
        }
    }
}

/// How a finished job went. Its times are not here: a job's record keeps its one timeline
/// ([`Timeline`](crate::jobs::Timeline)), stamped as the events arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishSummary {
    pub reason: FinishReason,
    pub tokens_in: usize,
    /// Of `tokens_in`, those whose keys and values came from the prefix cache.
    pub tokens_cached: usize,
    pub tokens_out: usize,
    pub seed: u64,
}

/// Everything the engine reports about a job, in order. Exactly one of `Finished`, `Failed` or
/// `Cancelled` ends every job.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Waiting; `position` 0 is next in line.
    Queued {
        position: usize,
    },
    /// The job holds a slot and its prompt is being read.
    Started {
        at: SystemTime,
    },
    Token(TokenStep),
    Finished(FinishSummary),
    Failed {
        code: ErrorCode,
        message: String,
    },
    Cancelled {
        reason: CancelReason,
    },
}

impl EngineEvent {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Finished(_) | Self::Failed { .. } | Self::Cancelled { .. }
        )
    }
}

/// Machine-readable failure codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InferenceFailed,
    InvalidRequest,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InferenceFailed => "INFERENCE_FAILED",
            Self::InvalidRequest => "INVALID_REQUEST",
        }
    }
}

/// Where a job's events go, and how the engine learns that it should stop.
pub trait JobSink: Send + Sync {
    /// Never blocks: the engine thread calls it for every token of every job.
    fn emit(&self, event: EngineEvent);
    /// `Some` once the job should be dropped.
    fn cancel_requested(&self) -> Option<CancelReason>;
}

/// A validated, tokenized request waiting for or holding a slot.
pub struct GenerationJob {
    pub id: String,
    pub prompt_tokens: Vec<u32>,
    pub params: GenerationParams,
    pub sink: Arc<dyn JobSink>,
}

impl std::fmt::Debug for GenerationJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationJob")
            .field("id", &self.id)
            .field("prompt_tokens", &self.prompt_tokens.len())
            .field("params", &self.params)
            .finish()
    }
}
