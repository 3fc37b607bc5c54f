//! The queue and the engine: jobs wait in the bounded [`RequestQueue`], and one
//! [`GenerationEngine`] thread owns the model and runs every sequence's steps.
//!
//! - [`job`]: the job handed to the engine and the events it reports.
//! - [`backend`]: the [`InferenceBackend`] trait the engine drives.
//! - [`scheduler`]: admission, chunked prefill and one batched forward per step.
//! - [`queue`]: the bounded request queue.
//! - [`generation_engine`]: the engine thread.

pub mod backend;
pub(crate) mod generation_engine;
pub mod job;
pub mod queue;
pub(crate) mod scheduler;

pub use backend::{BackendError, BatchItem, DraftRequest, InferenceBackend, ModelMeta, SeqId};
pub use generation_engine::{EngineStats, GenerationEngine};
pub use job::{CancelReason, EngineEvent, ErrorCode, FinishSummary, GenerationJob, JobSink};
pub use queue::{PushError, RequestQueue};
pub use scheduler::{CollectingSink, Scheduler, SchedulerConfig};
