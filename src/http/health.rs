//! `GET /health` (public, for load balancers and the hive) and `GET /info`.
//!
//! Both read atomics and the queue length only, so they answer at once even while the engine
//! is in the middle of a long prefill.

use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use crate::metrics::GaugeReadings;
use crate::worker_info::{WorkerInfo, WorkerStatus};

/// `/health`'s own words for the worker's status, kept from before [`WorkerStatus`] had six
/// values so that load balancers and scripts that match on them keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Loading,
    Ok,
    Busy,
    Draining,
}

impl From<WorkerStatus> for HealthStatus {
    fn from(status: WorkerStatus) -> Self {
        match status {
            WorkerStatus::Starting => Self::Loading,
            WorkerStatus::Ready => Self::Ok,
            WorkerStatus::Busy => Self::Busy,
            WorkerStatus::Draining | WorkerStatus::Stopping | WorkerStatus::Stopped => {
                Self::Draining
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Health {
    pub status: HealthStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub uptime_s: u64,
    pub slots_total: usize,
    pub slots_busy: usize,
    pub queue_depth: usize,
    /// KV-cache positions in use over what all slots can hold, 0 to 1.
    pub kv_cache_usage: f64,
    /// Prompt tokens served from the prefix cache over those looked up in it, 0 to 1; absent
    /// before the first lookup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix_cache_hit_rate: Option<f64>,
}

/// 503 `{"status":"loading"}` until the model is attached, then 200, and 503 again (the whole
/// body, `"status":"draining"`) from the stop signal on: load balancers and readiness probes
/// take a worker out while it admits nothing.
pub async fn health(State(app): State<AppState>) -> Response {
    let status = HealthStatus::from(WorkerStatus::of(&app.registry));
    let Some(served) = app.registry.served() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": status })),
        )
            .into_response();
    };
    let cache = GaugeReadings::from_engine(&served.stats, served.meta.context_length);
    let code = if status == HealthStatus::Draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let health = Json(Health {
        status,
        model: Some(served.model_id.clone()),
        uptime_s: app.identity.started_at.elapsed().map_or(0, |d| d.as_secs()),
        slots_total: served.stats.slots_total.load(Ordering::Relaxed),
        slots_busy: served.stats.running.load(Ordering::Relaxed),
        queue_depth: app.registry.queue().len(),
        kv_cache_usage: cache.kv_cache_usage(),
        prefix_cache_hit_rate: cache.prefix_cache_hit_rate(),
    });
    (code, health).into_response()
}

pub async fn info(State(app): State<AppState>) -> Json<WorkerInfo> {
    Json(WorkerInfo::collect(&app.identity, &app.registry))
}
