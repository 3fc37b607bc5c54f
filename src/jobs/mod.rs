//! Jobs: what the worker remembers about every generation request, between the HTTP layer and
//! the engine.
//!
//! - [`record`]: one job's state, cancel flag and bounded event log; it is the engine's
//!   [`JobSink`](crate::engine::JobSink) for that job.
//! - [`follow`]: [`JobFollower`], the one reader of a job's events that every response is
//!   written from.
//! - [`registry`]: job id → record, submission into the queue, cancellation, the detach and
//!   TTL reaper, and the served model with its engine.

pub(crate) mod follow;
pub(crate) mod record;
pub(crate) mod registry;

pub use crate::metrics::JobApi;
pub use follow::JobFollower;
pub use record::{Attachment, JobRecord, JobSnapshot, JobState, LoggedEvent, Timeline};
pub use registry::{
    JobNotFound, JobRegistry, RegistryConfig, ServedModel, Submission, SubmitError, WorkerState,
    new_job_id,
};
