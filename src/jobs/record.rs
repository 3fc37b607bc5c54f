//! One job as the worker remembers it: its state, times, cancel flag and the log of its events.
//!
//! A [`JobRecord`] is the job's [`JobSink`]: the engine thread appends to the log and returns at
//! once, and any number of streams read the log at their own pace, woken through a `watch`
//! channel. A slow or absent client therefore never holds up the engine, and a client that
//! reconnects can be replayed what it missed.
//!
//! The log is bounded by construction: at most one `queued` event (a newer position replaces
//! the older one under a new id), one `started`, `max_tokens` tokens and one terminal event.
//! Event ids only grow, so "everything after id N" stays well defined when a `queued` event is
//! replaced.
//!
//! The std `Mutex` guards a few field updates and a `Vec` push; it is never held across an
//! `.await` and never while taking another lock. Metrics and the job's log line come after
//! the lock is released: the metrics are atomics ([`JobObserver`]), and the one log line per
//! job is written at its end, inside the job's span (which carries `job_id` and `api`).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::engine::{CancelReason, EngineEvent, JobSink};
use crate::metrics::{JobObserver, Outcome};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// A point-in-time copy of a job's bookkeeping (for `GET /v1/jobs/{id}`).
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub id: String,
    pub state: JobState,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub tokens_out: usize,
}

/// A job id within its owner's: client-chosen ids are scoped per API key, so two keys may both
/// use `job-1`, and neither can reach the other's.
pub fn scoped_key(owner: &str, id: &str) -> String {
    if owner.is_empty() {
        id.to_string()
    } else {
        // '\n' cannot occur in a key name or a job id.
        format!("{owner}\n{id}")
    }
}

/// An event with its stream id (ids start at 1 and only grow).
pub type LoggedEvent = (u64, EngineEvent);

/// A job's times, stamped once as its events reach the record, and the one source of every
/// duration reported about the job: the `end` event, the job's log line and the metrics read
/// them from here, so they agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeline {
    /// When the request was submitted.
    pub arrived: Instant,
    /// When the job got a slot.
    pub started: Option<Instant>,
    pub first_token: Option<Instant>,
    pub last_token: Option<Instant>,
    /// When its terminal event arrived.
    pub finished: Option<Instant>,
}

impl Timeline {
    fn new(arrived: Instant) -> Self {
        Self {
            arrived,
            started: None,
            first_token: None,
            last_token: None,
            finished: None,
        }
    }

    /// From arrival to the first generated token.
    pub fn time_to_first_token(&self) -> Option<Duration> {
        self.first_token
            .map(|t| t.saturating_duration_since(self.arrived))
    }

    /// From arrival to the slot.
    pub fn queue_time(&self) -> Option<Duration> {
        self.started
            .map(|t| t.saturating_duration_since(self.arrived))
    }

    /// From the first generated token to the last.
    pub fn decode_time(&self) -> Duration {
        match (self.first_token, self.last_token) {
            (Some(first), Some(last)) => last.saturating_duration_since(first),
            _ => Duration::ZERO,
        }
    }

    /// From arrival to the terminal event (or to `now` while the job is live).
    pub fn total(&self, now: Instant) -> Duration {
        self.finished
            .unwrap_or(now)
            .saturating_duration_since(self.arrived)
    }

    /// Decode speed after the first of `tokens_out` tokens (0 with a single token).
    pub fn tokens_per_second(&self, tokens_out: usize) -> f64 {
        let secs = self.decode_time().as_secs_f64();
        if tokens_out > 1 && secs > 0.0 {
            (tokens_out - 1) as f64 / secs
        } else {
            0.0
        }
    }
}

/// Non-terminal events a log accepts beyond `max_tokens` (one `queued`, one `started`, slack).
const LOG_SLACK: usize = 4;

pub struct JobRecord {
    id: String,
    /// The API key the job belongs to (empty without authentication).
    owner: Arc<str>,
    created_at: SystemTime,
    /// Moves the worker's metrics as the job's events pass (absent for records built alone).
    observer: Option<JobObserver>,
    /// Every log line about the job is in it.
    span: tracing::Span,
    /// 0: none, else a [`CancelReason`] (see `encode_reason`). The first reason wins.
    cancel: AtomicU8,
    max_events: usize,
    log: Mutex<JobLog>,
    /// Carries the id of the newest event; streams wait on it.
    changed: watch::Sender<u64>,
}

struct JobLog {
    state: JobState,
    events: Vec<LoggedEvent>,
    next_id: u64,
    started_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    tokens_out: usize,
    timeline: Timeline,
    /// Streams currently reading this job.
    attached: usize,
    /// Since when no stream has been attached (creation, then the last detach).
    unattached_since: Instant,
    /// Whether a stream was ever attached.
    ever_attached: bool,
    /// Non-terminal events refused because the log was full (an engine bug if ever non-zero).
    refused: usize,
}

impl JobRecord {
    pub fn new(id: String, max_tokens: usize) -> Arc<Self> {
        Self::build(id, Arc::from(""), max_tokens, None)
    }

    /// A record owned by `owner` that reports to the worker's metrics through `observer`.
    pub fn observed(
        id: String,
        owner: Arc<str>,
        max_tokens: usize,
        observer: JobObserver,
    ) -> Arc<Self> {
        Self::build(id, owner, max_tokens, Some(observer))
    }

    fn build(
        id: String,
        owner: Arc<str>,
        max_tokens: usize,
        observer: Option<JobObserver>,
    ) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        let span = tracing::info_span!(
            "job",
            job_id = %id,
            api = observer.as_ref().map_or("", |o| o.api().as_str())
        );
        let arrived = observer
            .as_ref()
            .map_or_else(Instant::now, JobObserver::arrived);
        Arc::new(Self {
            id,
            owner,
            created_at: SystemTime::now(),
            observer,
            span,
            cancel: AtomicU8::new(0),
            max_events: max_tokens.saturating_add(LOG_SLACK),
            log: Mutex::new(JobLog {
                state: JobState::Queued,
                events: Vec::new(),
                next_id: 1,
                started_at: None,
                finished_at: None,
                tokens_out: 0,
                timeline: Timeline::new(arrived),
                attached: 0,
                unattached_since: Instant::now(),
                ever_attached: false,
                refused: 0,
            }),
            changed,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The API key the job belongs to.
    pub fn owner(&self) -> &Arc<str> {
        &self.owner
    }

    /// The job's key in the registry and the queue: its id within its owner's.
    pub fn key(&self) -> String {
        scoped_key(&self.owner, &self.id)
    }

    /// The job's span: handlers may enter it so their lines carry the job's id.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    fn lock(&self) -> MutexGuard<'_, JobLog> {
        // Every update leaves the log consistent, so a poisoned lock is still usable.
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> JobState {
        self.lock().state
    }

    pub fn snapshot(&self) -> JobSnapshot {
        let log = self.lock();
        JobSnapshot {
            id: self.id.clone(),
            state: log.state,
            created_at: self.created_at,
            started_at: log.started_at,
            finished_at: log.finished_at,
            tokens_out: log.tokens_out,
        }
    }

    /// Asks the engine to drop the job; returns false when a reason was already set.
    pub fn request_cancel(&self, reason: CancelReason) -> bool {
        self.cancel
            .compare_exchange(0, encode_reason(reason), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Up to `limit` events with an id greater than `after`, oldest first.
    pub fn events_after(&self, after: u64, limit: usize) -> Vec<LoggedEvent> {
        let log = self.lock();
        let start = log.events.partition_point(|(id, _)| *id <= after);
        log.events[start..].iter().take(limit).cloned().collect()
    }

    /// The terminal event and its id, once the job has ended.
    pub fn terminal_event(&self) -> Option<LoggedEvent> {
        let log = self.lock();
        log.events.last().filter(|(_, e)| e.is_terminal()).cloned()
    }

    /// The id of the newest event logged (0: none yet).
    pub fn newest_event_id(&self) -> u64 {
        *self.changed.borrow()
    }

    /// A receiver that sees a change whenever an event is appended.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Counts a stream as attached until the returned guard is dropped.
    pub fn attach(self: &Arc<Self>) -> Attachment {
        let mut log = self.lock();
        log.attached += 1;
        log.ever_attached = true;
        drop(log);
        Attachment {
            record: self.clone(),
        }
    }

    /// Whether a stream was ever attached to the job.
    pub fn ever_attached(&self) -> bool {
        self.lock().ever_attached
    }

    /// How long a live job has had no stream attached (`None`: finished, or a stream is
    /// attached).
    pub fn unattached_for(&self, now: Instant) -> Option<Duration> {
        let log = self.lock();
        (!log.state.is_terminal() && log.attached == 0)
            .then(|| now.saturating_duration_since(log.unattached_since))
    }

    /// How long ago the job ended (`None` while it is live).
    pub fn finished_for(&self, now: Instant) -> Option<Duration> {
        self.lock()
            .timeline
            .finished
            .map(|at| now.saturating_duration_since(at))
    }

    /// The job's times so far.
    pub fn timeline(&self) -> Timeline {
        self.lock().timeline
    }
}

/// Keeps a job counted as watched; dropping it starts the detach grace period.
pub struct Attachment {
    record: Arc<JobRecord>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut log = self.record.lock();
        log.attached = log.attached.saturating_sub(1);
        if log.attached == 0 {
            log.unattached_since = Instant::now();
        }
    }
}

/// What an event means for the metrics and the log, worked out under the lock and acted on
/// after it; every duration comes from the job's [`Timeline`].
enum Seen {
    Nothing,
    Started {
        queue_time: Duration,
    },
    /// The time to the first token, or the gap since the previous one.
    Token {
        first: bool,
        after: Duration,
    },
    Ended(Ending),
}

struct Ending {
    outcome: Outcome,
    /// The stop reason, error code or cancel reason.
    reason: &'static str,
    /// From the `end` event's summary (0 when the job did not finish on its own).
    tokens_in: usize,
    tokens_out: usize,
    timeline: Timeline,
}

impl JobRecord {
    fn observe(&self, seen: Seen) {
        match seen {
            Seen::Nothing => {}
            Seen::Started { queue_time } => {
                if let Some(o) = &self.observer {
                    o.started(queue_time);
                }
            }
            Seen::Token { first, after } => {
                if let Some(o) = &self.observer {
                    o.token(first, after);
                }
            }
            Seen::Ended(ending) => {
                if let Some(o) = &self.observer {
                    o.ended(ending.outcome, ending.timeline.total(Instant::now()));
                }
                self.log_ending(&ending);
            }
        }
    }

    /// The one info line per job: sizes, speed and why it ended; never its text.
    fn log_ending(&self, e: &Ending) {
        let tokens_in = self
            .observer
            .as_ref()
            .map_or(e.tokens_in, |o| o.prompt_tokens());
        let tokens_per_s = (e.timeline.tokens_per_second(e.tokens_out) * 10.0).round() / 10.0;
        let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        self.span.in_scope(|| {
            tracing::info!(
                outcome = e.outcome.as_str(),
                reason = e.reason,
                tokens_in,
                tokens_out = e.tokens_out,
                tokens_per_s,
                ttft_ms = e.timeline.time_to_first_token().map(ms),
                total_ms = ms(e.timeline.total(Instant::now())),
                "job finished"
            );
        });
    }
}

impl JobSink for JobRecord {
    fn emit(&self, event: EngineEvent) {
        let now = Instant::now();
        let (newest, seen) = {
            let mut log = self.lock();
            if log.state.is_terminal() {
                // Exactly one terminal event per job: anything after it is ignored.
                return;
            }
            let terminal = event.is_terminal();
            if terminal {
                log.finished_at = Some(SystemTime::now());
                log.timeline.finished = Some(now);
            }
            let ended = |log: &mut JobLog, state, outcome, reason, tokens_in| {
                log.state = state;
                Seen::Ended(Ending {
                    outcome,
                    reason,
                    tokens_in,
                    tokens_out: log.tokens_out,
                    timeline: log.timeline,
                })
            };
            let seen = match &event {
                EngineEvent::Queued { .. } => {
                    if matches!(log.events.last(), Some((_, EngineEvent::Queued { .. }))) {
                        log.events.pop();
                    }
                    Seen::Nothing
                }
                EngineEvent::Started { at } => {
                    log.state = JobState::Running;
                    log.started_at = Some(*at);
                    log.timeline.started = Some(now);
                    Seen::Started {
                        queue_time: now.saturating_duration_since(log.timeline.arrived),
                    }
                }
                EngineEvent::Token(_) => {
                    log.tokens_out += 1;
                    let t = &mut log.timeline;
                    let previous = t.last_token.replace(now);
                    t.first_token.get_or_insert(now);
                    match previous {
                        None => Seen::Token {
                            first: true,
                            after: now.saturating_duration_since(t.arrived),
                        },
                        Some(previous) => Seen::Token {
                            first: false,
                            after: now.saturating_duration_since(previous),
                        },
                    }
                }
                EngineEvent::Finished(summary) => ended(
                    &mut log,
                    JobState::Completed,
                    Outcome::Completed,
                    summary.reason.as_str(),
                    summary.tokens_in,
                ),
                EngineEvent::Failed { code, .. } => ended(
                    &mut log,
                    JobState::Failed,
                    Outcome::Failed,
                    code.as_str(),
                    0,
                ),
                EngineEvent::Cancelled { reason } => ended(
                    &mut log,
                    JobState::Cancelled,
                    Outcome::Cancelled,
                    reason.as_str(),
                    0,
                ),
            };
            if !terminal && log.events.len() >= self.max_events {
                log.refused += 1;
                let first_refusal = log.refused == 1;
                drop(log);
                if first_refusal {
                    self.span.in_scope(|| {
                        tracing::warn!("job event log is full; dropping events");
                    });
                }
                self.observe(seen);
                return;
            }
            let id = log.next_id;
            log.next_id += 1;
            log.events.push((id, event));
            (id, seen)
        };
        self.changed.send_replace(newest);
        self.observe(seen);
    }

    fn cancel_requested(&self) -> Option<CancelReason> {
        decode_reason(self.cancel.load(Ordering::SeqCst))
    }
}

fn encode_reason(reason: CancelReason) -> u8 {
    match reason {
        CancelReason::Client => 1,
        CancelReason::Disconnect => 2,
        CancelReason::Shutdown => 3,
        CancelReason::Unattached => 4,
    }
}

fn decode_reason(value: u8) -> Option<CancelReason> {
    match value {
        1 => Some(CancelReason::Client),
        2 => Some(CancelReason::Disconnect),
        3 => Some(CancelReason::Shutdown),
        4 => Some(CancelReason::Unattached),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::TokenStep;

    fn token(index: usize) -> EngineEvent {
        EngineEvent::Token(TokenStep {
            token: index as u32,
            index,
            text: format!("t{index}"),
            logprobs: None,
            finish: None,
        })
    }

    #[test]
    fn state_follows_events_and_only_the_first_terminal_event_counts() {
        let r = JobRecord::new("j".into(), 4);
        assert_eq!(r.state(), JobState::Queued);
        r.emit(EngineEvent::Started {
            at: SystemTime::now(),
        });
        assert_eq!(r.state(), JobState::Running);
        r.emit(token(0));
        r.emit(EngineEvent::Cancelled {
            reason: CancelReason::Client,
        });
        r.emit(EngineEvent::Failed {
            code: crate::engine::ErrorCode::InferenceFailed,
            message: "late".into(),
        });
        r.emit(token(1));
        let s = r.snapshot();
        assert_eq!(s.state, JobState::Cancelled);
        assert_eq!(s.tokens_out, 1);
        assert!(s.finished_at.is_some());
        let events = r.events_after(0, 100);
        assert_eq!(events.len(), 3);
        assert!(events[2].1.is_terminal());
        assert_eq!(r.terminal_event().map(|(id, _)| id), Some(3));
    }

    #[test]
    fn a_newer_queue_position_replaces_the_older_under_a_new_id() {
        let r = JobRecord::new("j".into(), 4);
        r.emit(EngineEvent::Queued { position: 2 });
        r.emit(EngineEvent::Queued { position: 1 });
        let events = r.events_after(0, 100);
        assert_eq!(events, vec![(2, EngineEvent::Queued { position: 1 })]);
        // A client that saw id 1 resumes with the replacement.
        assert_eq!(r.events_after(1, 100).len(), 1);
        assert_eq!(r.events_after(2, 100).len(), 0);
    }

    #[test]
    fn the_log_is_bounded_but_always_takes_the_terminal_event() {
        let r = JobRecord::new("j".into(), 2);
        for i in 0..50 {
            r.emit(token(i));
        }
        r.emit(EngineEvent::Cancelled {
            reason: CancelReason::Shutdown,
        });
        let events = r.events_after(0, 1000);
        assert_eq!(events.len(), 2 + LOG_SLACK + 1);
        assert!(events.last().is_some_and(|(_, e)| e.is_terminal()));
    }

    #[test]
    fn the_first_cancel_reason_wins() {
        let r = JobRecord::new("j".into(), 1);
        assert_eq!(r.cancel_requested(), None);
        assert!(r.request_cancel(CancelReason::Disconnect));
        assert!(!r.request_cancel(CancelReason::Client));
        assert_eq!(r.cancel_requested(), Some(CancelReason::Disconnect));
    }

    #[test]
    fn attachment_tracks_unattached_time() {
        let r = JobRecord::new("j".into(), 1);
        let now = Instant::now() + Duration::from_secs(10);
        assert!(
            r.unattached_for(now)
                .is_some_and(|d| d >= Duration::from_secs(9))
        );
        let a = r.attach();
        assert_eq!(r.unattached_for(now), None);
        drop(a);
        assert!(
            r.unattached_for(Instant::now() + Duration::from_millis(5))
                .is_some_and(|d| d < Duration::from_secs(1))
        );
    }
}
