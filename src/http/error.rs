//! [`ApiError`]: every error the HTTP layer answers with, and the one place that turns each into
//! a status code and a `{"error":{"code","message",…}}` body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::jobs::{JobNotFound, SubmitError};

/// One broken validation rule: the field (OpenAI's `param`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
    /// OpenAI's `code`: `invalid_value`, or `unsupported_parameter` for a feature this worker
    /// knows but does not implement (the job API's body does not carry it).
    #[serde(skip)]
    pub code: &'static str,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
            code: "invalid_value",
        }
    }

    pub fn unsupported(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: "unsupported_parameter",
            ..Self::new(field, message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is well-formed JSON but breaks rules; every broken rule is in `details`.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        details: Vec<FieldError>,
    },
    #[error("missing API key: send `Authorization: Bearer <token>`")]
    MissingApiKey,
    #[error("invalid API key")]
    InvalidApiKey,
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("all slots are busy and the queue is full; retry in {retry_after_s} s")]
    AllSlotsBusy {
        queue_depth: usize,
        retry_after_s: u64,
    },
    #[error("the model is still loading")]
    Loading,
    #[error("the worker is shutting down and accepts no new jobs")]
    Draining,
    #[error("job id {0} is already in use")]
    JobIdInUse(String),
    /// Our bug, never the client's mistake.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 listing every broken rule.
    pub fn invalid(details: Vec<FieldError>) -> Self {
        let message = match details.as_slice() {
            [one] => format!("{}: {}", one.field, one.message),
            many => format!("{} fields are invalid", many.len()),
        };
        Self::InvalidRequest { message, details }
    }

    /// A 400 about the request as a whole (not valid JSON, not an object).
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::MissingApiKey | Self::InvalidApiKey => StatusCode::UNAUTHORIZED,
            Self::JobNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::AllSlotsBusy { .. } | Self::Loading | Self::Draining => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::JobIdInUse(_) => StatusCode::CONFLICT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "INVALID_REQUEST",
            Self::MissingApiKey => "MISSING_API_KEY",
            Self::InvalidApiKey => "INVALID_API_KEY",
            Self::JobNotFound(_) => "JOB_NOT_FOUND",
            Self::RouteNotFound(_) => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::PayloadTooLarge { .. } => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::AllSlotsBusy { .. } => "ALL_SLOTS_BUSY",
            Self::Loading => "MODEL_LOADING",
            Self::Draining => "SHUTTING_DOWN",
            Self::JobIdInUse(_) => "JOB_ID_IN_USE",
            Self::Internal(_) => "INTERNAL_ERROR",
        }
    }

    /// Seconds for the `Retry-After` of a 503. Loading and draining are both brief on the
    /// worker's scale (a supervisor restarts a drained worker), so a few seconds.
    pub(crate) fn retry_after(&self) -> Option<u64> {
        match self {
            Self::AllSlotsBusy { retry_after_s, .. } => Some(*retry_after_s),
            Self::Loading | Self::Draining => Some(5),
            _ => None,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a [FieldError]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_depth: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_s: Option<u64>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Internal(message) = &self {
            tracing::error!("internal error answered with 500: {message}");
        }
        let (details, queue_depth) = match &self {
            Self::InvalidRequest { details, .. } => (Some(details.as_slice()), None),
            Self::AllSlotsBusy { queue_depth, .. } => (None, Some(*queue_depth)),
            _ => (None, None),
        };
        let retry_after = self.retry_after();
        let body = ErrorBody {
            error: ErrorObject {
                code: self.code(),
                message: self.to_string(),
                details,
                queue_depth,
                retry_after_s: retry_after,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Loading => Self::Loading,
            SubmitError::Draining => Self::Draining,
            SubmitError::DuplicateId(id) => Self::JobIdInUse(id),
            SubmitError::Busy {
                queue_depth,
                retry_after_s,
            } => Self::AllSlotsBusy {
                queue_depth,
                retry_after_s,
            },
        }
    }
}

impl From<JobNotFound> for ApiError {
    fn from(e: JobNotFound) -> Self {
        Self::JobNotFound(e.0)
    }
}
