//! The OpenAI-compatible API: a second front door into the same [`JobRegistry`], queue and
//! engine as the rbee job API, with the same token and body limit, speaking OpenAI's request,
//! response, stream and error shapes so that unmodified OpenAI clients work.
//!
//! - [`request`]: the request bodies, validated into [`GenerationParams`] (OpenAI's defaults,
//!   llama-server/vLLM extensions, unsupported features refused by name).
//! - [`response`]: response, chunk and log-probability shapes.
//! - [`run`]: submitting a job, following its events, cancelling it when the client leaves.
//! - [`answer`]: what both generation endpoints share: their one handler, and the way from a
//!   tokenized prompt to the answer, whole or streamed.
//! - [`chat`], [`completions`]: how each makes its prompt and shapes its choices;
//!   [`models`]: the model routes.
//! - [`error`]: errors as `{"error":{"message","type","param","code"}}`.
//!
//! | method | path | |
//! |---|---|---|
//! | POST | `/v1/chat/completions` | chat, JSON or SSE |
//! | POST | `/v1/completions` | text completion, JSON or SSE |
//! | GET | `/v1/models`, `/v1/models/{id}` | the served model |
//! | POST | `/tokenize`, `/detokenize` | llama-server's shapes ([`crate::http::tokenize`]) |
//!
//! [`JobRegistry`]: crate::jobs::JobRegistry
//! [`GenerationParams`]: crate::generation::GenerationParams

pub mod answer;
pub mod chat;
pub(crate) mod completions;
pub mod error;
pub mod models;
pub mod request;
pub mod response;
pub(crate) mod run;
pub(crate) mod tools;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value};

pub use error::OpenAiError;

use answer::generate;
use request::{ChatRequest, CompletionRequest};

use super::body::JsonObject;
use super::{ApiAuth, ApiError, AppState, tokenize};

/// The OpenAI routes and `/tokenize`, `/detokenize`, all behind the API token (answered in
/// OpenAI's error shape).
pub fn router(auth: Arc<ApiAuth>) -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(generate::<ChatRequest>))
        .route("/v1/completions", post(generate::<CompletionRequest>))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::get_model))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(auth, require_token))
}

/// Paths whose errors (unknown route, wrong method) are answered in OpenAI's shape: `/v1/…`
/// outside the job API, and the tokenizer routes.
pub fn owns_path(path: &str) -> bool {
    let under = |prefix: &str| {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    (path.starts_with("/v1/") && !under("/v1/jobs") && !under("/v1/inference"))
        || path == "/tokenize"
        || path == "/detokenize"
}

/// The job API's token check, with OpenAI's 401 body.
async fn require_token(
    State(auth): State<Arc<ApiAuth>>,
    mut request: Request,
    next: Next,
) -> Response {
    match auth.check(request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(e) => OpenAiError::from(e).into_response(),
    }
}

/// The JSON object body (413, 415 and malformed JSON as in the job API), rejected in OpenAI's
/// shape.
pub struct OpenAiJson(pub Map<String, Value>);

impl<S: Send + Sync> FromRequest<S> for OpenAiJson {
    type Rejection = OpenAiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, OpenAiError> {
        JsonObject::from_request(request, state)
            .await
            .map(|JsonObject(map)| Self(map))
            .map_err(OpenAiError::from)
    }
}

/// An unknown route or method under an OpenAI path, in OpenAI's shape.
pub fn route_error(e: ApiError) -> Response {
    OpenAiError::from(e).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_paths_are_openai() {
        for p in [
            "/v1/chat/completions",
            "/v1/models",
            "/v1/models/x/y",
            "/v1/nope",
            "/v1/jobsx",
            "/tokenize",
            "/detokenize",
        ] {
            assert!(owns_path(p), "{p}");
        }
        for p in [
            "/v1/jobs",
            "/v1/jobs/abc",
            "/v1/inference/abc/stream",
            "/health",
            "/nope",
            "/tokenizer",
        ] {
            assert!(!owns_path(p), "{p}");
        }
    }
}
