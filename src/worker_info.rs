//! [`WorkerInfo`]: what the worker says about itself on `GET /info` (and, later, in its
//! heartbeat to the hive).

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::Serialize;

use crate::jobs::{JobRegistry, Phase};

/// Facts fixed at startup.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub id: String,
    pub port: u16,
    /// The device as configured ("cpu:0", "cuda:1"), reported until the model says otherwise.
    pub device: String,
    /// The binary: "llm-worker-rbee-cpu", "-cuda" or "-metal".
    pub implementation: String,
    pub started_at: SystemTime,
}

impl WorkerIdentity {
    pub fn new(implementation: &str, device: &str) -> Self {
        Self {
            id: format!("worker-{}", &crate::jobs::new_job_id()[4..16]),
            port: 0,
            device: device.to_string(),
            implementation: implementation.to_string(),
            started_at: SystemTime::now(),
        }
    }
}

/// The worker's readiness, as `/health` and `/info` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStatus {
    Loading,
    /// Serving with at least one free slot.
    Ok,
    /// Every slot holds a job (new jobs wait in the queue).
    Busy,
    Draining,
}

impl WorkerStatus {
    pub fn of(registry: &JobRegistry) -> Self {
        match (registry.phase(), registry.served()) {
            (Phase::Draining, _) => Self::Draining,
            (Phase::Loading, _) | (Phase::Ready, None) => Self::Loading,
            (Phase::Ready, Some(served)) => {
                let total = served.stats.slots_total.load(Ordering::Relaxed);
                let busy = served.stats.running.load(Ordering::Relaxed);
                if busy >= total || !registry.queue().is_empty() {
                    Self::Busy
                } else {
                    Self::Ok
                }
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub id: String,
    /// The served model name (`null` while loading).
    pub model_id: Option<String>,
    pub device: String,
    pub port: u16,
    pub status: WorkerStatus,
    pub implementation: String,
    pub version: String,
    pub slots_total: usize,
    pub slots_busy: usize,
    pub queue_depth: usize,
    /// Positions per sequence (0 while loading).
    pub ctx_size: usize,
    /// RFC 3339.
    pub started_at: String,
}

impl WorkerInfo {
    pub fn collect(identity: &WorkerIdentity, registry: &JobRegistry) -> Self {
        let served = registry.served();
        Self {
            id: identity.id.clone(),
            model_id: served.map(|s| s.model_id.clone()),
            device: served.map_or_else(|| identity.device.clone(), |s| s.meta.device.clone()),
            port: identity.port,
            status: WorkerStatus::of(registry),
            implementation: identity.implementation.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            slots_total: served.map_or(0, |s| s.stats.slots_total.load(Ordering::Relaxed)),
            slots_busy: served.map_or(0, |s| s.stats.running.load(Ordering::Relaxed)),
            queue_depth: registry.queue().len(),
            ctx_size: served.map_or(0, |s| s.meta.context_length),
            started_at: crate::http::timestamp::rfc3339(identity.started_at),
        }
    }
}
