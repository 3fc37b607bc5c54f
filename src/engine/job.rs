//! What the engine is given (a [`GenerationJob`]) and what it reports back ([`EngineEvent`]s
//! through the job's [`JobSink`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::generation::{FinishReason, GenerationParams, TokenStep};

/// Why a job was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The client asked (`DELETE /v1/jobs/{id}`).
    Client,
    /// No client was attached to the job's stream.
    Disconnect,
    /// The worker is shutting down.
    Shutdown,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Disconnect => "disconnect",
            Self::Shutdown => "shutdown",
        }
    }
}

/// How a finished job went.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishSummary {
    pub reason: FinishReason,
    pub tokens_in: usize,
    pub tokens_out: usize,
    /// From the job's arrival to its first generated token.
    pub time_to_first_token: Duration,
    /// From the first generated token to the last.
    pub decode_time: Duration,
    pub seed: u64,
}

impl FinishSummary {
    /// Decode speed after the first token (0 when a single token was generated).
    pub fn tokens_per_second(&self) -> f64 {
        let secs = self.decode_time.as_secs_f64();
        if self.tokens_out > 1 && secs > 0.0 {
            (self.tokens_out - 1) as f64 / secs
        } else {
            0.0
        }
    }
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
    pub arrived_at: Instant,
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
