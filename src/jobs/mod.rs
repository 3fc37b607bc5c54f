//! Jobs: what the worker remembers about every generation request, between the HTTP layer and
//! the engine.
//!
//! - [`record`]: one job's state, cancel flag and bounded event log; it is the engine's
//!   [`JobSink`](crate::engine::JobSink) for that job.
//! - [`registry`]: job id → record, submission into the queue, cancellation, the detach and
//!   TTL reaper, and the served model with its engine.

pub mod record;
pub mod registry;

pub use crate::metrics::JobApi;
pub use record::{Attachment, JobRecord, JobSnapshot, JobState, LoggedEvent};
pub use registry::{
    JobNotFound, JobRegistry, NewJob, Phase, RegistryConfig, ServedModel, SubmitError, new_job_id,
};
