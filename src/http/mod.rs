//! The HTTP layer: routes, authentication, request validation, error mapping and SSE. It does
//! no tensor work; it validates, tokenizes and hands jobs to the [`JobRegistry`].
//!
//! - [`error`]: [`ApiError`] and its one mapping to status codes and bodies.
//! - [`auth`]: bearer tokens (constant-time, fingerprints in logs).
//! - [`body`]: the JSON body extractor (413, 415, malformed JSON).
//! - [`fields`]: typed access to a JSON body and the rules both APIs check;
//!   [`validation`]: the job request read through it.
//! - [`pipeline`]: what every API shares between the request and its events: readiness,
//!   tokenizing off the runtime, submission, the SSE response.
//! - [`jobs`]: the rbee job routes; [`sse`]: their event stream.
//! - [`health`]: `/health` and `/info`.
//! - [`metrics`]: `/metrics` (Prometheus text format).
//! - [`openai`]: the OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`,
//!   `/v1/models`), same registry and engine, OpenAI's shapes; [`tokenize`]: `/tokenize`,
//!   `/detokenize`.
//! - [`crate::timestamp`]: RFC 3339.
//!
//! Routes (all but `/health` and `/metrics` require the token when one is configured;
//! `/metrics` too with `--metrics-auth`):
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/health`, `/` | liveness and load (`/` is what the hive polls after spawning) |
//! | GET | `/info` | [`WorkerInfo`](crate::worker_info::WorkerInfo) |
//! | GET | `/metrics` | Prometheus metrics ([`WorkerMetrics`](crate::metrics::WorkerMetrics)) |
//! | POST | `/v1/jobs`, `/v1/inference` | create a job → `{job_id, sse_url}` |
//! | GET | `/v1/jobs/{id}/stream`, `/v1/inference/{id}/stream` | the job's events (SSE) |
//! | GET | `/v1/jobs/{id}`, `/v1/inference/{id}` | the job's state |
//! | DELETE | `/v1/jobs/{id}`, `/v1/inference/{id}` | cancel (204, idempotent) |
//! | POST | `/v1/chat/completions`, `/v1/completions` | OpenAI-compatible generation |
//! | GET | `/v1/models`, `/v1/models/{id}` | the served model, OpenAI's shape |
//! | POST | `/tokenize`, `/detokenize` | llama-server's tokenizer routes |

pub mod auth;
pub mod body;
pub mod error;
pub mod fields;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod openai;
pub(crate) mod pipeline;
pub mod sse;
pub(crate) mod structured;
pub(crate) mod tokenize;
pub mod validation;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};

pub use auth::ApiAuth;
pub use error::{ApiError, FieldError};

use crate::engine::RequestQueue;
use crate::jobs::JobRegistry;
use crate::model::chat_template::ChatTemplate;
use crate::worker_info::WorkerIdentity;

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<JobRegistry>,
    pub identity: Arc<WorkerIdentity>,
    /// How often an idle SSE stream sends a comment (keeps proxies open and lets a vanished
    /// client be noticed well within the detach grace).
    pub keep_alive: Duration,
    /// `/metrics` requires the API token too.
    pub metrics_auth: bool,
    /// `--chat-template`: renders OpenAI chat requests instead of the model's own template.
    pub chat_template: Option<Arc<ChatTemplate>>,
}

impl AppState {
    pub fn new(registry: Arc<JobRegistry>, identity: WorkerIdentity) -> Self {
        let keep_alive = (registry.config().detach_grace / 2)
            .clamp(Duration::from_millis(250), Duration::from_secs(15));
        Self {
            registry,
            identity: Arc::new(identity),
            keep_alive,
            metrics_auth: false,
            chat_template: None,
        }
    }

    /// Renders chat requests with `template` instead of the model's own (`--chat-template`).
    pub fn with_chat_template(mut self, template: Option<Arc<ChatTemplate>>) -> Self {
        self.chat_template = template;
        self
    }

    /// Puts `/metrics` behind the API token (when one is configured).
    pub fn with_metrics_auth(mut self, on: bool) -> Self {
        self.metrics_auth = on;
        self
    }
}

/// The seed's entry point: the rbee router over an existing queue and registry. `queue` must
/// be the registry's queue.
pub fn create_router(
    queue: Arc<RequestQueue>,
    registry: Arc<JobRegistry>,
    expected_token: Option<String>,
) -> Router {
    assert!(
        Arc::ptr_eq(&queue, registry.queue()),
        "create_router: the queue must be the one the registry was built with"
    );
    let device = registry
        .served()
        .map_or_else(|| "cpu:0".to_string(), |s| s.meta.device.clone());
    let kind = device.split(':').next().unwrap_or("cpu").to_string();
    let identity = WorkerIdentity::new(&format!("llm-worker-rbee-{kind}"), &device);
    router(
        AppState::new(registry, identity),
        ApiAuth::new(expected_token.as_deref()),
    )
}

/// The router for a given state and authentication.
pub fn router(state: AppState, auth: ApiAuth) -> Router {
    let auth = Arc::new(auth);
    let metrics_route = Router::new().route("/metrics", get(metrics::metrics));
    let metrics_route = if state.metrics_auth {
        metrics_route.route_layer(axum::middleware::from_fn_with_state(
            auth.clone(),
            auth::require_token,
        ))
    } else {
        metrics_route
    };
    let mut protected = Router::new().route("/info", get(health::info));
    for door in jobs::Door::ALL {
        let prefix = door.prefix();
        protected = protected
            .route(prefix, post(jobs::create.layer(Extension(door))))
            .route(
                &format!("{prefix}/{{id}}"),
                get(jobs::job_status).delete(jobs::cancel_job),
            )
            .route(
                &format!("{prefix}/{{id}}/stream"),
                get(jobs::stream.layer(Extension(door))),
            );
    }
    let protected = protected.route_layer(axum::middleware::from_fn_with_state(
        auth.clone(),
        auth::require_token,
    ));
    Router::new()
        .route("/health", get(health::health))
        .route("/", get(health::health))
        .merge(metrics_route)
        .merge(protected)
        .merge(openai::router(auth))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found(uri: Uri) -> Response {
    let e = ApiError::RouteNotFound(uri.path().to_string());
    if openai::owns_path(uri.path()) {
        return openai::route_error(e);
    }
    e.into_response()
}

async fn method_not_allowed(uri: Uri) -> Response {
    if openai::owns_path(uri.path()) {
        return openai::route_error(ApiError::MethodNotAllowed);
    }
    ApiError::MethodNotAllowed.into_response()
}
