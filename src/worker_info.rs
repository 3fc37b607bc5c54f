//! [`WorkerInfo`]: what the worker says about itself on `GET /info` and in its heartbeat to
//! the hive, and the [`WorkerStatus`] in it.
//!
//! The status is derived, never stored apart from what it describes: the registry's
//! [`WorkerState`] says where the worker is in its life, and while it serves, the engine's
//! atomics say whether every slot is taken.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::jobs::{JobRegistry, WorkerState};
use crate::metrics::GaugeReadings;
use crate::model::decoder::ComputePath;

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
    /// The served model's name when the flags give it (`--model-ref`, a model reference), for
    /// the reports sent while the model loads; empty when only the model itself knows it.
    pub model_id: String,
}

impl WorkerIdentity {
    pub fn new(implementation: &str, device: &str) -> Self {
        Self {
            id: format!("worker-{}", &crate::jobs::new_job_id()[4..16]),
            port: 0,
            device: device.to_string(),
            implementation: implementation.to_string(),
            started_at: SystemTime::now(),
            model_id: String::new(),
        }
    }
}

/// Where the worker is in its life. `/info` and the heartbeat report it in the words of rbee's
/// `WorkerStatus` (`starting | ready | busy | stopping | stopped`), where draining is
/// `stopping`; `/health` says `draining`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerStatus {
    /// Listening; the model is loading.
    Starting,
    /// Serving with at least one free slot.
    Ready,
    /// Every slot holds a job (new jobs wait in the queue).
    Busy,
    /// Stop requested: no new jobs, the ones in flight finish.
    Draining,
    /// Every job has ended and the engine has stopped; the HTTP server is closing.
    Stopping,
    /// The worker is about to exit (only ever seen in the last heartbeat).
    Stopped,
}

impl WorkerStatus {
    pub fn of(registry: &JobRegistry) -> Self {
        match registry.state() {
            WorkerState::Loading => Self::Starting,
            WorkerState::Serving => {
                let busy = registry.served().is_some_and(|served| {
                    let total = served.stats.slots_total.load(Ordering::Relaxed);
                    served.stats.running.load(Ordering::Relaxed) >= total
                });
                if busy || !registry.queue().is_empty() {
                    Self::Busy
                } else {
                    Self::Ready
                }
            }
            WorkerState::Draining => Self::Draining,
            WorkerState::Stopping => Self::Stopping,
            WorkerState::Stopped => Self::Stopped,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Busy => "busy",
            Self::Draining => "draining",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
        }
    }

    /// The status as rbee's hive and queen spell it.
    pub fn as_wire_str(self) -> &'static str {
        match self {
            Self::Draining => "stopping",
            other => other.as_str(),
        }
    }
}

impl Serialize for WorkerStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_wire_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    /// The served model name: the reference the worker was started with when it was given
    /// one (the queen matches on it), known while loading too; empty only while loading a
    /// model whose name comes from the model itself.
    pub model_id: String,
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
    /// How the served model computes; absent while loading (and for a backend that is not a
    /// decoder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute: Option<ComputeInfo>,
    /// KV-cache positions in use over what all slots can hold, 0 to 1 (`/metrics`'
    /// `vllm:kv_cache_usage_perc`); absent while loading. Optional: a hive may ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,
    /// Prompt tokens served from the prefix cache over those looked up in it, 0 to 1; absent
    /// before the first lookup. Optional: a hive may ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_hit_rate: Option<f64>,
}

/// `compute` in [`WorkerInfo`]: the served model's compute path as its decoder decided at load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeInfo {
    /// "cpu-kernels" (plain buffers and our CPU kernels) or "candle" (Candle tensors).
    pub path: String,
    /// Why the forward runs on Candle tensors; null on the CPU kernels' path.
    pub reason: Option<String>,
    /// Each stored tensor type ("Q4_1", "F32", …): how many tensors, and their path.
    pub tensor_types: BTreeMap<String, TensorTypeInfo>,
    /// The CPU kernels' selection ("amx", "avx512vnni", "avx2", "neon", "scalar", after
    /// `LLM_WORKER_CPU_KERNELS`); null when only Candle computes.
    pub cpu_kernels: Option<String>,
}

/// One stored tensor type in [`ComputeInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorTypeInfo {
    pub count: usize,
    /// "cpu-kernels", "candle", or "mixed" when the type's tensors go both ways.
    pub path: String,
    /// For "mixed": how many of `count` our CPU kernels read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_kernels: Option<usize>,
}

impl From<&ComputePath> for ComputeInfo {
    fn from(compute: &ComputePath) -> Self {
        Self {
            path: compute.path_name().to_string(),
            reason: compute.reason().map(ToString::to_string),
            tensor_types: compute
                .tensor_types
                .iter()
                .map(|t| {
                    let info = TensorTypeInfo {
                        count: t.count,
                        path: t.path().to_string(),
                        cpu_kernels: (t.cpu_kernels != 0 && t.cpu_kernels != t.count)
                            .then_some(t.cpu_kernels),
                    };
                    (t.dtype.clone(), info)
                })
                .collect(),
            cpu_kernels: compute.cpu_kernels.map(|k| k.to_string()),
        }
    }
}

impl WorkerInfo {
    pub fn collect(identity: &WorkerIdentity, registry: &JobRegistry) -> Self {
        let served = registry.served();
        let cache = served.map(|s| GaugeReadings::from_engine(&s.stats, s.meta.context_length));
        Self {
            id: identity.id.clone(),
            model_id: served.map_or_else(|| identity.model_id.clone(), |s| s.model_id.clone()),
            device: served.map_or_else(|| identity.device.clone(), |s| s.meta.device.clone()),
            port: identity.port,
            status: WorkerStatus::of(registry),
            implementation: identity.implementation.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            slots_total: served.map_or(0, |s| s.stats.slots_total.load(Ordering::Relaxed)),
            slots_busy: served.map_or(0, |s| s.stats.running.load(Ordering::Relaxed)),
            queue_depth: registry.queue().len(),
            ctx_size: served.map_or(0, |s| s.meta.context_length),
            started_at: crate::timestamp::rfc3339(identity.started_at),
            compute: served
                .and_then(|s| s.meta.compute.as_deref())
                .map(ComputeInfo::from),
            kv_cache_usage: cache.as_ref().map(GaugeReadings::kv_cache_usage),
            prefix_cache_hit_rate: cache
                .as_ref()
                .and_then(GaugeReadings::prefix_cache_hit_rate),
        }
    }
}
