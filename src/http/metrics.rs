//! `GET /metrics`: the worker's [`WorkerMetrics`](crate::metrics::WorkerMetrics) in the
//! Prometheus text format.
//!
//! The gauges are read from the engine's atomics and the queue length here, at scrape time, so
//! the handler answers at once even during a long prefill.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::jobs::JobRegistry;
use crate::metrics::{GaugeReadings, TEXT_FORMAT};

pub async fn metrics(State(app): State<AppState>) -> Response {
    let readings = readings(&app.registry);
    match app.registry.metrics().render(&readings) {
        Ok(text) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT))],
            text,
        )
            .into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

fn readings(registry: &JobRegistry) -> GaugeReadings {
    let waiting = registry.queue().len();
    let Some(served) = registry.served() else {
        return GaugeReadings {
            waiting,
            ..GaugeReadings::default()
        };
    };
    let stats = &served.stats;
    let slots = stats.slots_total.load(Ordering::Relaxed);
    GaugeReadings {
        running: stats.running.load(Ordering::Relaxed),
        waiting,
        kv_positions: stats.kv_positions.load(Ordering::Relaxed),
        kv_capacity_positions: slots.saturating_mul(served.meta.context_length),
        kv_cache_bytes: stats.kv_cache_bytes.load(Ordering::Relaxed),
    }
}
