//! [`OpenAiError`]: errors of the OpenAI-compatible routes (and `/tokenize`, `/detokenize`) in
//! OpenAI's shape, `{"error":{"message","type","param","code"}}`.
//!
//! The status codes are the job API's ([`ApiError::status`]); only the body differs, because
//! OpenAI clients read `error.message` and the SDKs pick their exception class by status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::http::error::{ApiError, FieldError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `server_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u64>,
}

impl OpenAiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// A 400 for every broken rule; `param` and `code` are the first one's, the message lists
    /// them all.
    pub fn from_problems(problems: &[FieldError]) -> Self {
        let message = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ");
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        if let Some(first) = problems.first() {
            e.param = Some(first.field.clone());
            e.code = Some(first.code);
        }
        e
    }

    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::from_problems(&[FieldError::new(param, message)])
    }

    /// 404 for a `model` this worker does not serve.
    pub fn model_not_found(requested: &str, served: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{requested}` does not exist; this worker serves `{served}`"),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 400 when the prompt and the requested output do not fit the context.
    pub fn context_length_exceeded(param: &str, message: String) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.into());
        e.code = Some("context_length_exceeded");
        e
    }

    /// A job that ended without finishing (engine failure, cancelled by shutdown or by a
    /// `DELETE` through the job API).
    pub fn job_ended(status: StatusCode, code: &'static str, message: String) -> Self {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let mut e = Self::new(status, kind, message);
        e.code = Some(code);
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::from(ApiError::Internal(message.into()))
    }

    /// The `error` object, also sent as an SSE `data:` line when a stream fails midway.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({ "error": ErrorObject::of(self) })
    }
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl<'a> ErrorObject<'a> {
    fn of(e: &'a OpenAiError) -> Self {
        Self {
            message: &e.message,
            kind: e.kind,
            param: e.param.as_deref(),
            code: e.code,
        }
    }
}

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        let status = e.status();
        let (kind, code) = match &e {
            ApiError::InvalidRequest { .. } => ("invalid_request_error", None),
            ApiError::MissingApiKey | ApiError::InvalidApiKey => {
                ("invalid_request_error", Some("invalid_api_key"))
            }
            ApiError::JobNotFound(_) | ApiError::RouteNotFound(_) => {
                ("invalid_request_error", Some("not_found"))
            }
            ApiError::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
            ApiError::PayloadTooLarge { .. } => {
                ("invalid_request_error", Some("payload_too_large"))
            }
            ApiError::UnsupportedMediaType => {
                ("invalid_request_error", Some("unsupported_media_type"))
            }
            ApiError::AllSlotsBusy { .. } => ("server_error", Some("all_slots_busy")),
            ApiError::Loading => ("server_error", Some("model_loading")),
            ApiError::Draining => ("server_error", Some("shutting_down")),
            ApiError::JobIdInUse(_) => ("server_error", Some("job_id_in_use")),
            ApiError::Internal(message) => {
                tracing::error!("internal error answered with 500: {message}");
                ("server_error", None)
            }
        };
        let retry_after_s = e.retry_after();
        // The rbee message names the field already; OpenAI's `param` carries it separately.
        let param = match &e {
            ApiError::InvalidRequest { details, .. } => details.first().map(|d| d.field.clone()),
            _ => None,
        };
        Self {
            status,
            message: e.to_string(),
            kind,
            param,
            code,
            retry_after_s,
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after_s {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_become_one_400_naming_the_first_param() {
        let e = OpenAiError::from_problems(&[
            FieldError::unsupported("tools", "tool calling is not supported"),
            FieldError::new("n", "must be 1"),
        ]);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let body = e.body();
        assert_eq!(body["error"]["param"], "tools");
        assert_eq!(body["error"]["code"], "unsupported_parameter");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(
            body["error"]["message"],
            "tools: tool calling is not supported; n: must be 1"
        );
    }

    #[test]
    fn api_errors_keep_their_status_and_retry_after() {
        let e = OpenAiError::from(ApiError::AllSlotsBusy {
            queue_depth: 3,
            retry_after_s: 7,
        });
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after_s, Some(7));
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        let e = OpenAiError::from(ApiError::MissingApiKey);
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert_eq!(e.body()["error"]["code"], "invalid_api_key");
        assert!(e.body()["error"]["param"].is_null());
    }
}
