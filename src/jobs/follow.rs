//! [`JobFollower`]: the one way to read a job's events as they come. The job API's SSE stream,
//! the OpenAI streaming writer and the OpenAI whole-response writer all read through it, each
//! keeping only its wire format.
//!
//! It reads the record's log in batches and waits on the record's `watch` channel between
//! them; it never holds the log's lock while waiting or while its reader writes to a client,
//! so a slow client never slows the engine. While it lives the job counts as watched (its
//! [`Attachment`]), so the reaper never takes a followed job for an abandoned one; a follower
//! made with [`JobFollower::cancel_on_drop`] (an OpenAI request, which cannot re-attach) cancels
//! the job at once when it is dropped before the job's end, queued or running.

use std::sync::Arc;

use tokio::sync::watch;

use super::record::{Attachment, JobRecord, LoggedEvent};
use super::registry::JobRegistry;
use crate::engine::CancelReason;

/// Events read from the log per wake-up.
const READ_BATCH: usize = 64;

pub struct JobFollower {
    record: Arc<JobRecord>,
    changed: watch::Receiver<u64>,
    /// The id of the last event returned.
    cursor: u64,
    ended: bool,
    /// Cancels the job when dropped before its end.
    cancel_on_drop: Option<Arc<JobRegistry>>,
    _attachment: Attachment,
}

impl JobFollower {
    /// Follows `record` from the event after `after` (0: from the start).
    pub fn new(record: Arc<JobRecord>, after: u64) -> Self {
        Self {
            _attachment: record.attach(),
            changed: record.subscribe(),
            record,
            cursor: after,
            ended: false,
            cancel_on_drop: None,
        }
    }

    /// Cancels the job (reason `disconnect`) if this follower is dropped before it has
    /// returned the job's terminal event: the client went away.
    pub fn cancel_on_drop(mut self, registry: Arc<JobRegistry>) -> Self {
        self.cancel_on_drop = Some(registry);
        self
    }

    pub fn record(&self) -> &Arc<JobRecord> {
        &self.record
    }

    /// The next events, waiting while there are none. Empty once the terminal event has been
    /// returned, or at once when following began after it (see [`JobRecord::terminal_event`]).
    pub async fn next_batch(&mut self) -> Vec<LoggedEvent> {
        loop {
            if self.ended {
                return Vec::new();
            }
            // Mark the current version seen before reading, so an event appended after the
            // read wakes the wait below.
            self.changed.borrow_and_update();
            let mut batch = self.record.events_after(self.cursor, READ_BATCH);
            if let Some(end) = batch.iter().position(|(_, e)| e.is_terminal()) {
                batch.truncate(end + 1);
                self.ended = true;
            }
            if let Some((last, _)) = batch.last() {
                self.cursor = *last;
                return batch;
            }
            if self
                .record
                .terminal_event()
                .is_some_and(|(id, _)| id <= self.cursor)
            {
                self.ended = true;
                return Vec::new();
            }
            if self.changed.changed().await.is_err() {
                // The record owns the sender and this holds the record: it cannot close.
                self.ended = true;
                return Vec::new();
            }
        }
    }
}

impl Drop for JobFollower {
    fn drop(&mut self) {
        if let Some(registry) = &self.cancel_on_drop
            && !self.ended
        {
            // Not found: already collected, nothing left to cancel.
            let _ = registry.cancel(
                self.record.owner(),
                self.record.id(),
                CancelReason::Disconnect,
            );
        }
    }
}
