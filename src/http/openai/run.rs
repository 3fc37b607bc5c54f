//! What both generation endpoints do once a request is valid: submit the job to the shared
//! [`JobRegistry`], follow its events, and cancel it when the client goes away.
//!
//! The job's [`JobFollower`] lives exactly as long as the client's request: inside the handler's
//! future for a JSON response, inside the body stream for SSE. Dropping it before the job's
//! terminal event (the client disconnected, so hyper dropped the future or the body) cancels the
//! job at once, queued or running, with reason `disconnect`; the registry's detach grace is not
//! waited for.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::sse::Event;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::OpenAiError;
use super::response::ResponseMeta;
use crate::engine::{CancelReason, EngineEvent, ErrorCode};
use crate::http::{AppState, pipeline};
use crate::jobs::{JobFollower, ServedModel, Submission};

/// The served model, or the 503 that says why there is none.
pub fn ready(app: &AppState) -> Result<&ServedModel, OpenAiError> {
    Ok(pipeline::served(app)?)
}

/// Runs `work` inline when the input is small, else on the blocking pool.
pub async fn off_the_runtime<T: Send + 'static>(
    input_bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, OpenAiError> {
    Ok(pipeline::off_the_runtime(input_bytes, work).await?)
}

/// A fresh response id (`chatcmpl-…`, `cmpl-…`), the request's time and the fingerprint.
pub fn response_meta(prefix: &str, served: &ServedModel) -> ResponseMeta {
    let job_id = crate::jobs::new_job_id();
    let unique = job_id.strip_prefix("job-").unwrap_or(&job_id);
    ResponseMeta {
        id: format!("{prefix}-{unique}"),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: served.model_id.clone(),
        system_fingerprint: system_fingerprint(served),
    }
}

/// Stable for one build serving one model on one device: clients compare it to know whether
/// the same seed can be expected to give the same output.
fn system_fingerprint(served: &ServedModel) -> String {
    let digest = Sha256::digest(
        format!(
            "{}|{}|{}|{}",
            env!("CARGO_PKG_VERSION"),
            served.meta.name,
            served.meta.format,
            served.meta.device
        )
        .as_bytes(),
    );
    let hex: String = digest[..5].iter().map(|b| format!("{b:02x}")).collect();
    format!("fp_{hex}")
}

/// Queues the job (its id is the response id). A full queue is a 503 at once. The follower
/// cancels the job when the request ends before the job does.
pub fn submit(app: &AppState, submission: Submission) -> Result<JobFollower, OpenAiError> {
    let (record, _) = pipeline::submit(app, submission)?;
    Ok(JobFollower::new(record, 0).cancel_on_drop(app.registry.clone()))
}

/// The error for a job that ended without finishing.
pub fn ended_error(event: &EngineEvent) -> OpenAiError {
    match event {
        EngineEvent::Failed {
            code: ErrorCode::InvalidRequest,
            message,
        } => OpenAiError::job_ended(StatusCode::BAD_REQUEST, "invalid_request", message.clone()),
        EngineEvent::Failed { message, .. } => OpenAiError::job_ended(
            StatusCode::INTERNAL_SERVER_ERROR,
            "inference_failed",
            format!("inference failed: {message}"),
        ),
        EngineEvent::Cancelled {
            reason: CancelReason::Shutdown,
        } => OpenAiError::job_ended(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the worker is shutting down; the request was cancelled".into(),
        ),
        EngineEvent::Cancelled { reason } => OpenAiError::job_ended(
            StatusCode::SERVICE_UNAVAILABLE,
            "cancelled",
            format!("the request was cancelled ({})", reason.as_str()),
        ),
        other => OpenAiError::internal(format!("not a terminal event: {other:?}")),
    }
}

/// A `data:` event holding `value` as JSON.
pub fn json_event<T: Serialize>(value: &T) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        // Only maps with non-string keys fail to serialize; ours have none.
        Err(e) => Event::default().data(OpenAiError::internal(e.to_string()).body().to_string()),
    }
}
