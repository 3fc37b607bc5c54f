//! The rbee job routes: create, stream, status and cancel.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use serde::Serialize;

use super::AppState;
use super::auth::Caller;
use super::body::{JsonObject, path_text};
use super::error::{ApiError, FieldError};
use super::fields::Rules;
use super::sse::{StreamContext, job_event_stream};
use super::validation::{DEFAULT_MAX_TOKENS, JobRules, parse_job_request};
use super::{pipeline, structured};
use crate::engine::CancelReason;
use crate::generation::fit_max_tokens;
use crate::jobs::{JobApi, JobState, Submission};
use crate::timestamp::rfc3339;

/// Which route family a request came through; it decides the `sse_url`, whether the queen's
/// flat body (no `operation`) is accepted, and whether the stream carries `queued` events
/// (`/v1/inference` is the queen's door and speaks only rbee's `InferenceEvent` types). The
/// router gives it to [`create`] and [`stream`] as an extension.
#[derive(Debug, Clone, Copy)]
pub enum Door {
    Jobs,
    Inference,
}

impl Door {
    pub const ALL: [Self; 2] = [Self::Jobs, Self::Inference];

    /// Where the door's routes are.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Jobs => "/v1/jobs",
            Self::Inference => "/v1/inference",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct JobCreated {
    pub job_id: String,
    pub sse_url: String,
}

#[derive(Debug, Serialize)]
pub struct JobStatus {
    pub job_id: String,
    pub state: &'static str,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    pub tokens_out: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
}

pub async fn create(
    State(app): State<AppState>,
    caller: Caller,
    Extension(door): Extension<Door>,
    JsonObject(body): JsonObject,
) -> Result<Json<JobCreated>, ApiError> {
    let served = pipeline::served(&app)?;
    let context_length = served.meta.context_length;
    let rules = JobRules {
        model: Rules::of(served),
        operation_required: matches!(door, Door::Jobs),
    };
    let mut errors = Vec::new();
    let draft = parse_job_request(&body, &rules, &mut errors);
    let mut prompt_tokens = Vec::new();
    if !draft.prompt.is_empty() {
        match pipeline::tokenize_prompt(served.meta.tokenizer.clone(), draft.prompt.clone()).await?
        {
            Ok(tokens) => {
                let fit =
                    fit_max_tokens(tokens.len(), Some(draft.params.max_tokens), context_length);
                if let Err(e) = fit {
                    let mut message = e.to_string();
                    if !body.contains_key("max_tokens") {
                        // Say where the number came from: the client never sent it.
                        message.push_str(&format!(
                            " (max_tokens was not sent; it defaults to {DEFAULT_MAX_TOKENS})"
                        ));
                    }
                    errors.push(FieldError::new("prompt", message));
                }
                prompt_tokens = tokens;
            }
            Err(message) => errors.push(FieldError::new("prompt", message)),
        }
    }
    let mut params = draft.params;
    if errors.is_empty()
        && let Some(requested) = draft.constraint
    {
        match structured::compile(served, requested).await? {
            Ok(constraint) => params.constraint = Some(constraint),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(errors));
    }
    let (record, _) = pipeline::submit(
        &app,
        Submission {
            api: JobApi::Rbee,
            owner: caller.0,
            id: draft.job_id,
            prompt_tokens,
            params,
        },
    )?;
    let job_id = record.id().to_string();
    Ok(Json(JobCreated {
        sse_url: format!("{}/{job_id}/stream", door.prefix()),
        job_id,
    }))
}

pub async fn job_status(
    State(app): State<AppState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
) -> Result<Json<JobStatus>, ApiError> {
    let record = app
        .registry
        .get(&caller.0, &id)
        .ok_or_else(|| ApiError::JobNotFound(id.clone()))?;
    let s = record.snapshot();
    let queue_position = if s.state == JobState::Queued {
        app.registry.queue().position(&record.key())
    } else {
        None
    };
    Ok(Json(JobStatus {
        job_id: s.id,
        state: s.state.as_str(),
        created_at: rfc3339(s.created_at),
        started_at: s.started_at.map(rfc3339),
        finished_at: s.finished_at.map(rfc3339),
        tokens_out: s.tokens_out,
        queue_position,
    }))
}

pub async fn cancel_job(
    State(app): State<AppState>,
    caller: Caller,
    JobIdPath(id): JobIdPath,
) -> Result<StatusCode, ApiError> {
    app.registry.cancel(&caller.0, &id, CancelReason::Client)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn stream(
    State(app): State<AppState>,
    caller: Caller,
    Extension(door): Extension<Door>,
    JobIdPath(id): JobIdPath,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = last_event_id(&headers)?;
    let record = app
        .registry
        .get(&caller.0, &id)
        .ok_or_else(|| ApiError::JobNotFound(id.clone()))?;
    let newest = record.newest_event_id();
    if after > newest {
        return Err(bad_last_event_id(&format!(
            "{after} is past the last event of this stream ({newest})"
        )));
    }
    let served = app
        .registry
        .served()
        .ok_or_else(|| ApiError::Internal("a job exists but no model is served".into()))?;
    let ctx = StreamContext {
        job_id: id,
        model: served.model_id.clone(),
        tokenizer: served.meta.tokenizer.clone(),
        queue_events: matches!(door, Door::Jobs),
    };
    Ok(pipeline::sse_response(
        &app,
        job_event_stream(record, after, ctx),
    ))
}

/// `Last-Event-ID` as a log id; absent (or empty) means "from the start". Anything else that
/// is not an event id of the stream is a 400 saying so, whatever it is.
fn last_event_id(headers: &HeaderMap) -> Result<u64, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    let Ok(text) = value.to_str() else {
        return Err(bad_last_event_id(
            "is not an event id of this stream (not ASCII)",
        ));
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(0);
    }
    text.parse()
        .map_err(|_| bad_last_event_id(&format!("`{text}` is not an event id of this stream")))
}

fn bad_last_event_id(message: &str) -> ApiError {
    ApiError::invalid(vec![FieldError::new("Last-Event-ID", message)])
}

/// The `{id}` of a job route; one that is not valid UTF-8 once percent-decoded is a 400 in
/// the API's JSON shape rather than axum's plain-text rejection.
pub struct JobIdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for JobIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        path_text(parts, state).await.map(Self).map_err(|why| {
            ApiError::invalid(vec![FieldError::new(
                "job_id",
                format!("is not a job id: {why}"),
            )])
        })
    }
}
