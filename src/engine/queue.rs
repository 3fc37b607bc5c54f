//! The bounded queue between the HTTP handlers and the engine thread.
//!
//! Handlers push without waiting: a full queue is refused at once (the caller answers 503 with
//! `Retry-After`). The engine pops when it has a free slot and sleeps on a condition variable
//! when it has nothing to do. A std `Mutex` is right here: every critical section is a few
//! pointer moves and never spans an `.await`.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::job::{CancelReason, EngineEvent, GenerationJob};

pub struct RequestQueue {
    state: Mutex<QueueState>,
    wake: Condvar,
    capacity: usize,
}

struct QueueState {
    jobs: VecDeque<GenerationJob>,
    /// No more pushes (shutdown); the engine exits once it has nothing left.
    closed: bool,
}

/// Why a push was refused; the job is handed back.
#[derive(Debug)]
pub enum PushError {
    Full(Box<GenerationJob>),
    Closed(Box<GenerationJob>),
}

impl RequestQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the deque half-updated, so a poisoned
        // lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Enqueues a job and returns its position (0 = next), or hands it back.
    pub fn try_push(&self, job: GenerationJob) -> Result<usize, PushError> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed(Box::new(job)));
        }
        if s.jobs.len() >= self.capacity {
            return Err(PushError::Full(Box::new(job)));
        }
        let position = s.jobs.len();
        job.sink.emit(EngineEvent::Queued { position });
        s.jobs.push_back(job);
        drop(s);
        self.wake.notify_all();
        Ok(position)
    }

    /// Takes the oldest job; the others learn their new positions.
    pub fn try_pop(&self) -> Option<GenerationJob> {
        self.pop_if(|_| true)
    }

    /// Takes the oldest job if `admits` it; otherwise it keeps its place at the head (jobs are
    /// started in arrival order: a large one is not overtaken for ever by small ones).
    pub fn pop_if(&self, admits: impl FnOnce(&GenerationJob) -> bool) -> Option<GenerationJob> {
        let mut s = self.lock();
        if !admits(s.jobs.front()?) {
            return None;
        }
        let job = s.jobs.pop_front()?;
        for (position, j) in s.jobs.iter().enumerate() {
            j.sink.emit(EngineEvent::Queued { position });
        }
        Some(job)
    }

    /// Removes a waiting job (cancelled before it got a slot) and ends it.
    pub fn cancel(&self, id: &str, reason: CancelReason) -> bool {
        let mut s = self.lock();
        let Some(index) = s.jobs.iter().position(|j| j.id == id) else {
            return false;
        };
        let job = s.jobs.remove(index);
        for (position, j) in s.jobs.iter().enumerate().skip(index) {
            j.sink.emit(EngineEvent::Queued { position });
        }
        drop(s);
        if let Some(job) = job {
            job.sink.emit(EngineEvent::Cancelled { reason });
        }
        true
    }

    pub fn position(&self, id: &str) -> Option<usize> {
        self.lock().jobs.iter().position(|j| j.id == id)
    }

    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks the engine thread until a job arrives, the queue closes, or `timeout` passes.
    pub fn wait(&self, timeout: Duration) {
        let s = self.lock();
        if !s.jobs.is_empty() || s.closed {
            return;
        }
        let _unused = self.wake.wait_timeout(s, timeout);
    }

    /// Wakes the engine thread (e.g. after a cancel it should act on).
    pub fn notify(&self) {
        self.wake.notify_all();
    }

    /// Refuses further pushes and wakes the engine.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Ends every waiting job with `reason` (shutdown).
    pub fn cancel_all(&self, reason: CancelReason) {
        let jobs: Vec<GenerationJob> = self.lock().jobs.drain(..).collect();
        for job in jobs {
            job.sink.emit(EngineEvent::Cancelled { reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::engine::scheduler::CollectingSink;
    use crate::generation::GenerationParams;

    fn job(id: &str) -> (GenerationJob, Arc<CollectingSink>) {
        let sink = CollectingSink::new();
        (
            GenerationJob {
                id: id.into(),
                prompt_tokens: vec![1, 2],
                params: GenerationParams::greedy(4),
                sink: sink.clone(),
            },
            sink,
        )
    }

    #[test]
    fn full_queue_refuses_at_once_and_hands_the_job_back() {
        let q = RequestQueue::new(2);
        assert_eq!(q.try_push(job("a").0).ok(), Some(0));
        assert_eq!(q.try_push(job("b").0).ok(), Some(1));
        match q.try_push(job("c").0) {
            Err(PushError::Full(j)) => assert_eq!(j.id, "c"),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn pop_is_fifo_and_tells_the_rest_their_positions() {
        let q = RequestQueue::new(4);
        let (a, _) = job("a");
        let (b, sb) = job("b");
        q.try_push(a).ok();
        q.try_push(b).ok();
        assert_eq!(q.try_pop().map(|j| j.id), Some("a".into()));
        assert_eq!(
            sb.events(),
            vec![
                EngineEvent::Queued { position: 1 },
                EngineEvent::Queued { position: 0 }
            ]
        );
        assert_eq!(q.position("b"), Some(0));
    }

    #[test]
    fn cancelling_a_waiting_job_ends_it_and_frees_its_place() {
        let q = RequestQueue::new(1);
        let (a, sa) = job("a");
        q.try_push(a).ok();
        assert!(q.cancel("a", CancelReason::Client));
        assert!(!q.cancel("a", CancelReason::Client));
        assert_eq!(
            sa.events().last(),
            Some(&EngineEvent::Cancelled {
                reason: CancelReason::Client
            })
        );
        assert!(q.try_push(job("b").0).is_ok());
    }

    #[test]
    fn closed_queue_refuses_and_wait_returns_immediately() {
        let q = RequestQueue::new(1);
        q.close();
        assert!(matches!(q.try_push(job("a").0), Err(PushError::Closed(_))));
        let t = Instant::now();
        q.wait(Duration::from_secs(5));
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
