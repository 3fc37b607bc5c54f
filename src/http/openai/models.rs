//! `GET /v1/models` (exactly the served model) and `GET /v1/models/{id}`.

use std::time::UNIX_EPOCH;

use axum::Json;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;

use super::error::OpenAiError;
use super::response::{ModelCard, ModelList};
use super::run::ready;
use crate::http::AppState;
use crate::http::body::path_text;
use crate::jobs::ServedModel;

fn card(app: &AppState, served: &ServedModel) -> ModelCard {
    ModelCard {
        id: served.model_id.clone(),
        object: "model",
        // When this worker started serving: there is no better creation time for a model file.
        created: app
            .identity
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        owned_by: "llm-worker-rbee",
        max_model_len: served.meta.context_length,
    }
}

pub async fn list_models(State(app): State<AppState>) -> Result<Json<ModelList>, OpenAiError> {
    let served = ready(&app)?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![card(&app, served)],
    }))
}

/// The id may contain slashes (`--model-ref org/name`), so the route captures the rest of
/// the path.
pub async fn get_model(
    State(app): State<AppState>,
    ModelIdPath(id): ModelIdPath,
) -> Result<Json<ModelCard>, OpenAiError> {
    let served = ready(&app)?;
    if id != served.model_id {
        return Err(OpenAiError::model_not_found(&id, &served.model_id));
    }
    Ok(Json(card(&app, served)))
}

/// The `{id}` of `/v1/models/{id}`; an id that is not UTF-8 once percent-decoded is a 400 in
/// the API's error shape rather than axum's plain-text rejection.
pub struct ModelIdPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ModelIdPath {
    type Rejection = OpenAiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, OpenAiError> {
        path_text(parts, state)
            .await
            .map(Self)
            .map_err(|why| OpenAiError::invalid("model", format!("is not a model id: {why}")))
    }
}
