//! [`JobRegistry`]: every job the worker knows, from `POST` until it is collected.
//!
//! Submitting inserts a [`JobRecord`] and pushes the job onto the bounded [`RequestQueue`];
//! the record is the job's sink, so the engine writes straight into it. Cancelling sets the
//! record's flag and takes the job out of the queue if it is still waiting; a running job is
//! dropped by the scheduler at its next step.
//!
//! A reaper thread (one per registry, holding only a `Weak`) cancels live jobs that no stream
//! has watched for `detach_grace` and forgets finished jobs after `job_ttl`. It is a plain
//! thread rather than a tokio task so that a registry works whichever runtime, if any, built it.
//!
//! The registry also holds what is being served once the model is loaded ([`ServedModel`]),
//! including the [`GenerationEngine`]: dropping the last handle on the registry stops the engine.
//!
//! It hands each job the worker's [`WorkerMetrics`] (through a [`JobObserver`] that knows the
//! job's front door, [`JobApi`]) and counts the submissions it refuses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::record::{JobRecord, scoped_key};
use crate::engine::{
    CancelReason, EngineEvent, EngineStats, GenerationEngine, GenerationJob, InferenceBackend,
    JobSink, ModelMeta, PushError, RequestQueue, SchedulerConfig,
};
use crate::generation::{GenerationParams, Grammars};
use crate::metrics::{JobApi, JobObserver, WorkerMetrics};

#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// Jobs remembered at once, live and finished; when full, the oldest finished job is
    /// evicted. Each job's log holds up to `max_tokens` events, so this bounds memory too.
    pub capacity: usize,
    /// A live job with no stream attached for this long is cancelled (`disconnect`).
    pub detach_grace: Duration,
    /// A finished job is forgotten this long after it ended.
    pub job_ttl: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            capacity: 256,
            detach_grace: Duration::from_secs(5),
            job_ttl: Duration::from_secs(300),
        }
    }
}

/// The loaded model and the engine serving it.
pub struct ServedModel {
    /// The name clients must use in `model` (from `--model-ref`, else the model's own).
    pub model_id: String,
    pub meta: ModelMeta,
    pub stats: Arc<EngineStats>,
    /// Compiles and caches requests' output constraints for this model's vocabulary.
    pub grammars: Arc<Grammars>,
    engine: GenerationEngine,
}

/// Where the worker is in its life: the one state that `/health`, `/info`, the heartbeat and
/// admission all read. It only moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum WorkerState {
    /// Listening; no model is attached yet.
    Loading = 0,
    /// A model is served; jobs are admitted.
    Serving = 1,
    /// Stop requested: no new jobs, the ones in flight finish (or are cancelled).
    Draining = 2,
    /// Every job has ended and the engine has stopped; the HTTP server is closing.
    Stopping = 3,
    /// The worker is about to exit.
    Stopped = 4,
}

impl WorkerState {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Loading,
            1 => Self::Serving,
            2 => Self::Draining,
            3 => Self::Stopping,
            _ => Self::Stopped,
        }
    }
}

/// A validated request ready to be queued: what every API parses its JSON into. Its
/// `max_tokens` is resolved against the context ([`crate::generation::fit_max_tokens`]).
pub struct Submission {
    /// The front door it came through (labels its metrics).
    pub api: JobApi,
    /// The API key it belongs to (empty without authentication).
    pub owner: Arc<str>,
    /// A client-chosen id (the queen sends one), the OpenAI response id, or `None` for a
    /// generated one.
    pub id: Option<String>,
    pub prompt_tokens: Vec<u32>,
    pub params: GenerationParams,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the model is still loading")]
    Loading,
    #[error("the worker is shutting down")]
    Draining,
    #[error("job id {0} is already in use")]
    DuplicateId(String),
    #[error("all slots are busy and the queue is full")]
    Busy {
        queue_depth: usize,
        retry_after_s: u64,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("job {0} not found")]
pub struct JobNotFound(pub String);

pub struct JobRegistry {
    queue: Arc<RequestQueue>,
    config: RegistryConfig,
    jobs: Mutex<HashMap<String, Arc<JobRecord>>>,
    served: OnceLock<ServedModel>,
    state: AtomicU8,
    metrics: Arc<WorkerMetrics>,
}

impl JobRegistry {
    /// Creates the registry (with metrics of its own) and its reaper thread.
    pub fn new(queue: Arc<RequestQueue>, config: RegistryConfig) -> Arc<Self> {
        Self::with_metrics(queue, config, Arc::new(WorkerMetrics::new()))
    }

    /// Creates the registry reporting to `metrics`, and its reaper thread.
    pub fn with_metrics(
        queue: Arc<RequestQueue>,
        config: RegistryConfig,
        metrics: Arc<WorkerMetrics>,
    ) -> Arc<Self> {
        let config = RegistryConfig {
            capacity: config.capacity.max(1),
            ..config
        };
        let registry = Arc::new(Self {
            queue,
            config,
            jobs: Mutex::new(HashMap::new()),
            served: OnceLock::new(),
            state: AtomicU8::new(WorkerState::Loading as u8),
            metrics,
        });
        spawn_reaper(Arc::downgrade(&registry), reaper_tick(config.detach_grace));
        registry
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<String, Arc<JobRecord>>> {
        // Inserts and removes cannot leave the map half-updated.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    pub fn queue(&self) -> &Arc<RequestQueue> {
        &self.queue
    }

    pub fn metrics(&self) -> &Arc<WorkerMetrics> {
        &self.metrics
    }

    /// Starts the engine on `backend` and begins accepting jobs. `model_id` overrides the
    /// model's own name. Fails if a model is already served.
    pub fn serve<B: InferenceBackend>(
        &self,
        backend: B,
        model_id: Option<String>,
        scheduler: SchedulerConfig,
    ) -> std::io::Result<()> {
        if self.served.get().is_some() {
            return Err(std::io::Error::other("a model is already being served"));
        }
        let meta = backend.meta().clone();
        let engine = GenerationEngine::start(backend, self.queue.clone(), scheduler)?;
        if self.state() >= WorkerState::Draining {
            engine.drain();
        }
        let served = ServedModel {
            model_id: model_id.unwrap_or_else(|| meta.name.clone()),
            grammars: Arc::new(Grammars::new(
                meta.tokenizer.clone(),
                meta.eog_tokens.clone(),
            )),
            meta,
            stats: engine.stats().clone(),
            engine,
        };
        self.served
            .set(served)
            .map_err(|_| std::io::Error::other("a model is already being served"))?;
        self.advance(WorkerState::Serving);
        Ok(())
    }

    pub fn served(&self) -> Option<&ServedModel> {
        self.served.get()
    }

    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Moves to `state` unless the worker is already past it.
    pub fn advance(&self, state: WorkerState) {
        self.state.fetch_max(state as u8, Ordering::SeqCst);
    }

    /// Registers a job and queues it; returns its record and queue position. Never waits: a
    /// full queue or registry is refused at once.
    pub fn submit(&self, job: Submission) -> Result<(Arc<JobRecord>, usize), SubmitError> {
        let api = job.api;
        let submitted = self.try_submit(job);
        if submitted.is_err() {
            self.metrics.request_rejected(api);
        }
        submitted
    }

    fn try_submit(&self, job: Submission) -> Result<(Arc<JobRecord>, usize), SubmitError> {
        let Some(served) = self.served.get() else {
            return Err(SubmitError::Loading);
        };
        if self.state() >= WorkerState::Draining {
            return Err(SubmitError::Draining);
        }
        let busy = || SubmitError::Busy {
            queue_depth: self.queue.len(),
            retry_after_s: served.stats.estimated_wait_seconds(self.queue.len()),
        };
        let id = job.id.unwrap_or_else(new_job_id);
        let arrived_at = Instant::now();
        let observer = JobObserver::new(
            self.metrics.clone(),
            job.api,
            job.prompt_tokens.len(),
            arrived_at,
        );
        let record = JobRecord::observed(id.clone(), job.owner, job.params.max_tokens, observer);
        let key = record.key();
        {
            let mut jobs = self.jobs();
            if jobs.contains_key(&key) {
                return Err(SubmitError::DuplicateId(id));
            }
            if jobs.len() >= self.config.capacity && !evict_oldest_finished(&mut jobs) {
                return Err(busy());
            }
            jobs.insert(key.clone(), record.clone());
        }
        let queued = GenerationJob {
            id: key.clone(),
            prompt_tokens: job.prompt_tokens,
            params: job.params,
            sink: record.clone(),
        };
        match self.queue.try_push(queued) {
            Ok(position) => Ok((record, position)),
            Err(refused) => {
                self.jobs().remove(&key);
                Err(match refused {
                    PushError::Full(_) => busy(),
                    PushError::Closed(_) => SubmitError::Draining,
                })
            }
        }
    }

    /// `owner`'s job `id`; another owner's job with that id is not found.
    pub fn get(&self, owner: &str, id: &str) -> Option<Arc<JobRecord>> {
        self.jobs().get(&scoped_key(owner, id)).cloned()
    }

    /// Cancels `owner`'s job `id`. Idempotent: cancelling a finished or already cancelled job
    /// is a no-op.
    pub fn cancel(&self, owner: &str, id: &str, reason: CancelReason) -> Result<(), JobNotFound> {
        let record = self
            .get(owner, id)
            .ok_or_else(|| JobNotFound(id.to_string()))?;
        cancel_record(&self.queue, &record, reason);
        Ok(())
    }

    /// Jobs remembered (live and finished).
    pub fn len(&self) -> usize {
        self.jobs().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cancels abandoned jobs and forgets expired ones, as of `now`.
    pub fn collect(&self, now: Instant) {
        let mut abandoned = Vec::new();
        {
            let mut jobs = self.jobs();
            jobs.retain(|_, record| {
                if record
                    .finished_for(now)
                    .is_some_and(|age| age >= self.config.job_ttl)
                {
                    return false;
                }
                if record
                    .unattached_for(now)
                    .is_some_and(|idle| idle >= self.config.detach_grace)
                    && record.cancel_requested().is_none()
                {
                    abandoned.push(record.clone());
                }
                true
            });
        }
        for record in abandoned {
            let reason = if record.ever_attached() {
                CancelReason::Disconnect
            } else {
                CancelReason::Unattached
            };
            cancel_record(&self.queue, &record, reason);
        }
    }

    /// Stops admitting jobs: the queue closes, queued and running jobs still finish.
    pub fn begin_drain(&self) {
        self.advance(WorkerState::Draining);
        match self.served.get() {
            Some(served) => {
                served.engine.drain();
            }
            None => self.queue.close(),
        }
    }

    /// Cancels whatever is still queued or running (reason `shutdown`). Every live job gets its
    /// terminal event now, not when the engine notices the abort after the step in progress
    /// (a long prompt chunk can take seconds): a caller that kills the process shortly after
    /// its SIGTERM (the hive waits 2 s) must not cut a stream before its end.
    pub fn abort(&self) {
        self.advance(WorkerState::Draining);
        match self.served.get() {
            Some(served) => {
                served.engine.abort();
            }
            None => {
                self.queue.close();
                self.queue.cancel_all(CancelReason::Shutdown);
            }
        }
        let live: Vec<Arc<JobRecord>> = self
            .jobs()
            .values()
            .filter(|r| !r.state().is_terminal())
            .cloned()
            .collect();
        for record in live {
            cancel_record(&self.queue, &record, CancelReason::Shutdown);
            let reason = record.cancel_requested().unwrap_or(CancelReason::Shutdown);
            record.emit(EngineEvent::Cancelled { reason });
        }
    }

    /// True once the engine thread has exited (or was never started).
    pub fn engine_finished(&self) -> bool {
        self.served.get().is_none_or(|s| s.engine.is_finished())
    }
}

fn cancel_record(queue: &RequestQueue, record: &JobRecord, reason: CancelReason) {
    if record.state().is_terminal() {
        return;
    }
    record.request_cancel(reason);
    // The first reason set is the one reported.
    let reason = record.cancel_requested().unwrap_or(reason);
    record
        .span()
        .in_scope(|| tracing::info!(reason = reason.as_str(), "cancelling the job"));
    if !queue.cancel(&record.key(), reason) {
        // Running (or between queue and slot): the scheduler sees the flag at its next step;
        // wake it in case it is idle-waiting.
        queue.notify();
    }
}

/// Removes the finished job that ended first; false when every job is live.
fn evict_oldest_finished(jobs: &mut HashMap<String, Arc<JobRecord>>) -> bool {
    let now = Instant::now();
    let oldest = jobs
        .iter()
        .filter_map(|(id, r)| r.finished_for(now).map(|age| (age, id)))
        .max_by_key(|(age, _)| *age)
        .map(|(_, id)| id.clone());
    match oldest {
        Some(id) => jobs.remove(&id).is_some(),
        None => false,
    }
}

fn reaper_tick(grace: Duration) -> Duration {
    (grace / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
}

fn spawn_reaper(registry: Weak<JobRegistry>, tick: Duration) {
    let spawned = std::thread::Builder::new()
        .name("job-reaper".into())
        .spawn(move || {
            loop {
                std::thread::sleep(tick);
                let Some(registry) = registry.upgrade() else {
                    return;
                };
                registry.collect(Instant::now());
            }
        });
    if let Err(e) = spawned {
        tracing::error!(
            "cannot start the job reaper thread: {e}; abandoned jobs will not be collected"
        );
    }
}

/// A fresh, unguessable job id: `job-` and 32 hex digits from randomly keyed SipHash.
pub fn new_job_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut words = [0u64; 2];
    for (i, word) in words.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u128(nanos);
        h.write_usize(i);
        *word = h.finish();
    }
    format!("job-{:016x}{:016x}", words[0], words[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{BackendError, BatchItem, EngineEvent, SeqId};
    use crate::model::tokenizer::TextTokenizer;
    use crate::model::tokenizer::tests::bpe_without_merges;

    /// Always predicts token 0, a few milliseconds per step, so jobs stay live for a while.
    struct SlowBackend(ModelMeta);

    impl InferenceBackend for SlowBackend {
        fn meta(&self) -> &ModelMeta {
            &self.0
        }
        fn forward(&mut self, batch: &[BatchItem<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
            std::thread::sleep(Duration::from_millis(5));
            Ok(batch.iter().map(|_| vec![1.0, 0.0]).collect())
        }
        fn release(&mut self, _: SeqId) {}
    }

    fn registry(capacity: usize) -> Arc<JobRegistry> {
        let vocab = bpe_without_merges(&[("a", 0), ("b", 1)]);
        let tokenizer = TextTokenizer::from_tokenizers(vocab).unwrap();
        let meta = ModelMeta {
            name: "m".into(),
            architecture: "llama".into(),
            format: "gguf".into(),
            device: "cpu:0".into(),
            context_length: 100_000,
            vocab_size: 2,
            tokenizer: Arc::new(tokenizer),
            eog_tokens: Arc::from([]),
            chat_template: None,
            compute: None,
        };
        let queue = Arc::new(RequestQueue::new(8));
        let config = RegistryConfig {
            capacity,
            detach_grace: Duration::from_secs(3600),
            job_ttl: Duration::from_secs(3600),
        };
        let r = JobRegistry::new(queue, config);
        let scheduler = SchedulerConfig {
            max_sequences: 1,
            batch_tokens: 64,
            prefix_cache_bytes: 0,
            draft_tokens: 0,
            kv_budget_bytes: 0,
        };
        r.serve(SlowBackend(meta), None, scheduler).unwrap();
        r
    }

    fn job(id: &str) -> Submission {
        Submission {
            api: JobApi::Rbee,
            owner: Arc::from(""),
            id: Some(id.into()),
            prompt_tokens: vec![1],
            params: GenerationParams::greedy(100_000 - 1),
        }
    }

    fn wait_terminal(r: &JobRecord) -> EngineEvent {
        let start = Instant::now();
        loop {
            if let Some((_, e)) = r.terminal_event() {
                return e;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no terminal event"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn serving_plain_jobs_builds_no_token_trie() {
        // The trie costs ~4.5 MB for a 128k vocabulary (~17 MB more while it is built): only a
        // constrained request pays.
        let r = registry(2);
        let (a, _) = r.submit(job("a")).unwrap();
        // Some engine steps: a build started at serve time has long finished by then.
        let start = Instant::now();
        while a.newest_event_id() < 4 {
            assert!(start.elapsed() < Duration::from_secs(10), "no tokens");
            std::thread::sleep(Duration::from_millis(2));
        }
        r.cancel("", "a", CancelReason::Client).unwrap();
        wait_terminal(&a);
        assert!(!r.served().unwrap().grammars.trie_built());
    }

    #[test]
    fn full_of_live_jobs_refuses_and_evicts_finished_ones_first() {
        let r = registry(2);
        let (a, _) = r.submit(job("a")).unwrap();
        let (b, _) = r.submit(job("b")).unwrap();
        assert!(matches!(r.submit(job("c")), Err(SubmitError::Busy { .. })));
        assert!(matches!(
            r.submit(job("a")),
            Err(SubmitError::DuplicateId(id)) if id == "a"
        ));
        r.cancel("", "b", CancelReason::Client).unwrap();
        r.cancel("", "b", CancelReason::Shutdown).unwrap();
        assert_eq!(
            wait_terminal(&b),
            EngineEvent::Cancelled {
                reason: CancelReason::Client
            }
        );
        r.submit(job("c")).unwrap();
        assert!(r.get("", "b").is_none(), "the finished job made room");
        assert!(r.get("", "a").is_some_and(|a| !a.state().is_terminal()));
        assert!(r.cancel("", "zzz", CancelReason::Client).is_err());
        assert!(!a.state().is_terminal());
    }

    #[test]
    fn collect_cancels_abandoned_jobs_and_forgets_expired_ones() {
        let r = registry(8);
        let (a, _) = r.submit(job("a")).unwrap();
        let (b, _) = r.submit(job("b")).unwrap();
        // `a` was watched once and let go; `b` is watched.
        drop(a.attach());
        let watching = b.attach();
        let later = Instant::now() + Duration::from_secs(3601);
        r.collect(later);
        assert_eq!(
            wait_terminal(&a),
            EngineEvent::Cancelled {
                reason: CancelReason::Disconnect
            }
        );
        assert!(!b.state().is_terminal(), "a watched job lives on");
        drop(watching);
        r.cancel("", "b", CancelReason::Client).unwrap();
        wait_terminal(&b);
        assert_eq!(r.len(), 2);
        r.collect(Instant::now() + Duration::from_secs(3601));
        assert!(r.is_empty());
    }
}
