//! `GET /metrics`: the worker's [`WorkerMetrics`](crate::metrics::WorkerMetrics) in the
//! Prometheus text format.
//!
//! The gauges are read from the engine's atomics and the queue length here, at scrape time, so
//! the handler answers at once even during a long prefill.

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::jobs::JobRegistry;
use crate::metrics::{GaugeReadings, TEXT_FORMAT};

pub async fn metrics(State(app): State<AppState>) -> Response {
    let readings = readings(&app.registry, &app.identity.model_id);
    match app.registry.metrics().render(&readings) {
        Ok(text) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT))],
            text,
        )
            .into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

/// `configured_model`: the name from the flags, which labels the `vllm:*` series while the
/// model loads (empty when only the model knows its name).
fn readings(registry: &JobRegistry, configured_model: &str) -> GaugeReadings {
    let waiting = registry.queue().len();
    let Some(served) = registry.served() else {
        return GaugeReadings {
            model_name: configured_model.to_string(),
            waiting,
            ..GaugeReadings::default()
        };
    };
    // Our CPU code (the host attention) keeps keys and values in f16; Candle's caches are not
    // described here, so the label is left out for them.
    let host_attention = served
        .meta
        .compute
        .as_deref()
        .is_some_and(|c| c.cpu_kernels.is_some());
    GaugeReadings {
        model_name: served.model_id.clone(),
        waiting,
        kv_cache_dtype: if host_attention { "f16" } else { "" },
        kv_block_positions: if host_attention {
            crate::model::attention::KV_BLOCK
        } else {
            1
        },
        ..GaugeReadings::from_engine(&served.stats, served.meta.context_length)
    }
}
