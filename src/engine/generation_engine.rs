//! The engine thread: the only thread that touches the model, its device and the KV caches.
//!
//! It admits jobs from the [`RequestQueue`] into free slots, runs [`Scheduler::step`] while
//! anything is running, and sleeps on the queue's condition variable otherwise. A panic inside
//! a step fails the jobs that were running (each gets its terminal event) instead of leaving
//! their streams open forever; the thread keeps serving.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::backend::InferenceBackend;
use super::job::CancelReason;
use super::queue::RequestQueue;
use super::scheduler::{Scheduler, SchedulerConfig};

/// Live numbers the engine publishes for health, info, metrics and `Retry-After`.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub slots_total: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_cache_bytes: AtomicUsize,
    /// Positions held in KV caches, over every running sequence (for the KV-cache usage ratio).
    pub kv_positions: AtomicUsize,
    /// Positions the running sequences may hold at most: every slot's context, or fewer under
    /// the KV budget (0: not known, e.g. before the engine starts).
    pub kv_capacity_positions: AtomicUsize,
    pub steps: AtomicU64,
    pub jobs_finished: AtomicU64,
    /// Prompt tokens looked up in the prefix cache (jobs that allow caching), ever.
    pub prefix_cache_queries: AtomicU64,
    /// Of those, the tokens whose keys and values came from the cache instead of a prefill.
    pub prefix_cache_hits: AtomicU64,
    /// Bytes of KV kept for reuse by finished sequences (the prefix cache).
    pub prefix_cache_bytes: AtomicUsize,
    /// The most bytes the prefix cache may keep (`--cache-ram`).
    pub prefix_cache_budget: AtomicUsize,
    /// Tokens drafted (prompt lookup or the draft model), ever.
    pub spec_drafted: AtomicU64,
    /// Of those, the ones the model's own samples confirmed.
    pub spec_accepted: AtomicU64,
    /// Smoothed seconds a job holds a slot, in microseconds (0 until a job finished).
    pub job_slot_micros: AtomicU64,
    /// False once the engine thread has exited.
    pub alive: AtomicBool,
}

impl EngineStats {
    /// Seconds until a slot is likely free for a job that would be `queue_depth` deep.
    pub fn estimated_wait_seconds(&self, queue_depth: usize) -> u64 {
        let slots = self.slots_total.load(Ordering::Relaxed).max(1);
        let per_job = self.job_slot_micros.load(Ordering::Relaxed) as f64 / 1e6;
        // Before any job finished, assume a few seconds per job.
        let per_job = if per_job > 0.0 { per_job } else { 5.0 };
        let waves = (queue_depth as f64 + 1.0) / slots as f64;
        (per_job * waves).ceil().clamp(1.0, 600.0) as u64
    }
}

pub struct GenerationEngine {
    thread: Option<JoinHandle<()>>,
    queue: Arc<RequestQueue>,
    stats: Arc<EngineStats>,
    abort: Arc<AtomicBool>,
}

impl GenerationEngine {
    /// Starts the engine thread, which takes ownership of the backend.
    pub fn start<B: InferenceBackend>(
        backend: B,
        queue: Arc<RequestQueue>,
        config: SchedulerConfig,
    ) -> std::io::Result<Self> {
        let stats = Arc::new(EngineStats::default());
        let abort = Arc::new(AtomicBool::new(false));
        let scheduler = Scheduler::new(backend, config);
        stats
            .slots_total
            .store(scheduler.config().max_sequences, Ordering::Relaxed);
        stats
            .prefix_cache_budget
            .store(scheduler.config().prefix_cache_bytes, Ordering::Relaxed);
        stats
            .kv_capacity_positions
            .store(scheduler.capacity_positions(), Ordering::Relaxed);
        stats.alive.store(true, Ordering::Relaxed);
        let thread = std::thread::Builder::new()
            .name("generation-engine".into())
            .spawn({
                let queue = queue.clone();
                let stats = stats.clone();
                let abort = abort.clone();
                move || {
                    run(scheduler, &queue, &stats, &abort);
                    stats.alive.store(false, Ordering::Relaxed);
                }
            })?;
        Ok(Self {
            thread: Some(thread),
            queue,
            stats,
            abort,
        })
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    pub fn queue(&self) -> &Arc<RequestQueue> {
        &self.queue
    }

    /// Stops admitting: queued and running jobs still finish, then the thread exits.
    pub fn drain(&self) {
        self.queue.close();
    }

    /// Cancels everything left (reason `shutdown`) and lets the thread exit.
    pub fn abort(&self) {
        self.abort.store(true, Ordering::SeqCst);
        self.queue.close();
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for GenerationEngine {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.abort.store(true, Ordering::SeqCst);
            self.queue.close();
            let _ = t.join();
        }
    }
}

/// How long the idle engine sleeps before looking at the abort flag again.
const IDLE_WAIT: Duration = Duration::from_millis(100);

fn run<B: InferenceBackend>(
    mut scheduler: Scheduler<B>,
    queue: &RequestQueue,
    stats: &EngineStats,
    abort: &AtomicBool,
) {
    let mut slot_started: std::collections::HashMap<String, Instant> = Default::default();
    loop {
        if abort.load(Ordering::SeqCst) {
            queue.cancel_all(CancelReason::Shutdown);
            scheduler.cancel_all(CancelReason::Shutdown);
            break;
        }
        while scheduler.has_free_slot() {
            let Some(job) = queue.pop_if(|job| scheduler.make_room_for(job)) else {
                break;
            };
            slot_started.insert(job.id.clone(), Instant::now());
            scheduler.admit(job);
        }
        publish(&scheduler, stats);
        if scheduler.is_idle() {
            slot_started.clear();
            if queue.is_closed() && queue.is_empty() {
                break;
            }
            queue.wait(IDLE_WAIT);
            continue;
        }
        let before = scheduler.running_job_ids();
        let stepped = std::panic::catch_unwind(AssertUnwindSafe(|| scheduler.step()));
        if stepped.is_err() {
            scheduler
                .fail_all("the inference engine hit an internal error (panic) during this step");
        }
        stats.steps.fetch_add(1, Ordering::Relaxed);
        let after = scheduler.running_job_ids();
        for id in before.iter().filter(|id| !after.contains(id)) {
            if let Some(start) = slot_started.remove(id) {
                record_job_time(stats, start.elapsed());
            }
        }
    }
    publish(&scheduler, stats);
}

fn publish<B: InferenceBackend>(scheduler: &Scheduler<B>, stats: &EngineStats) {
    stats.running.store(scheduler.running(), Ordering::Relaxed);
    stats
        .kv_positions
        .store(scheduler.positions_in_use(), Ordering::Relaxed);
    stats
        .kv_cache_bytes
        .store(scheduler.backend().kv_cache_bytes(), Ordering::Relaxed);
    let prefix = scheduler.prefix_cache_stats();
    stats
        .prefix_cache_queries
        .store(prefix.queries, Ordering::Relaxed);
    stats
        .prefix_cache_hits
        .store(prefix.hits, Ordering::Relaxed);
    stats
        .prefix_cache_bytes
        .store(prefix.bytes, Ordering::Relaxed);
    let spec = scheduler.speculation_stats();
    stats.spec_drafted.store(spec.drafted, Ordering::Relaxed);
    stats.spec_accepted.store(spec.accepted, Ordering::Relaxed);
}

fn record_job_time(stats: &EngineStats, held: Duration) {
    stats.jobs_finished.fetch_add(1, Ordering::Relaxed);
    let sample = held.as_micros().min(u128::from(u64::MAX)) as u64;
    let old = stats.job_slot_micros.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        (old * 7 + sample) / 8
    };
    stats.job_slot_micros.store(new, Ordering::Relaxed);
}
