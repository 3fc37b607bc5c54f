//! The stretch between "a request arrived" and "its events reach the client" that every API
//! shares; each API keeps only its JSON fields and its wire format.
//!
//! 1. [`served`]: the model, or the 503 that says why there is none (loading, draining).
//! 2. The API parses its body into a [`Submission`]; prompts are rendered and tokenized with
//!    [`off_the_runtime`] ([`tokenize_prompt`] for raw text), and `max_tokens` is fitted to the
//!    context by the one rule, [`fit_max_tokens`](crate::generation::fit_max_tokens).
//! 3. [`submit`]: into the registry and the queue (a full queue is a 503 at once).
//! 4. A [`JobFollower`] reads the job's events for the response: SSE through [`event_stream`]
//!    and [`sse_response`], or one JSON body built from the same events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;

use super::AppState;
use super::error::ApiError;
use crate::engine::EngineEvent;
use crate::jobs::{JobFollower, JobRecord, ServedModel, Submission, Timeline, WorkerState};
use crate::model::tokenizer::TextTokenizer;

/// Inputs larger than this (bytes) are templated and tokenized on the blocking pool, so a big
/// prompt never stalls an async worker.
pub const INLINE_WORK_BYTES: usize = 2048;

/// The served model, or the 503 that says why there is none.
pub fn served(app: &AppState) -> Result<&ServedModel, ApiError> {
    match (app.registry.state(), app.registry.served()) {
        (WorkerState::Loading, _) | (_, None) => Err(ApiError::Loading),
        (WorkerState::Serving, Some(served)) => Ok(served),
        _ => Err(ApiError::Draining),
    }
}

/// Runs `work` inline when the input is small, else on the blocking pool.
pub async fn off_the_runtime<T: Send + 'static>(
    input_bytes: usize,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    if input_bytes <= INLINE_WORK_BYTES {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("blocking task: {e}")))
}

/// A raw-text prompt's tokens, as llama-server reads one: special-token text such as
/// `<|im_start|>` is parsed, and BOS is added only where the model asks for it. The outer error
/// is ours (the blocking task died), the inner one is about the prompt.
pub async fn tokenize_prompt(
    tokenizer: Arc<TextTokenizer>,
    prompt: String,
) -> Result<Result<Vec<u32>, String>, ApiError> {
    off_the_runtime(prompt.len(), move || {
        tokenizer
            .encode_with_special(&prompt, true, true)
            .map_err(|e| format!("cannot be tokenized: {e}"))
    })
    .await
}

/// Queues a validated request; returns its record and queue position.
pub fn submit(app: &AppState, mut job: Submission) -> Result<(Arc<JobRecord>, usize), ApiError> {
    // Prefix caches are never shared across API keys: timing would tell one tenant what
    // another's prompts begin with.
    job.params.cache_salt = format!("{}\u{0}{}", job.owner, job.params.cache_salt);
    let (record, position) = app.registry.submit(job)?;
    record
        .span()
        .in_scope(|| tracing::info!(position, "job queued"));
    Ok((record, position))
}

/// A job's events as a stream of items (SSE events, or an API's own pieces): `first`, then
/// whatever `translate` makes of each logged event (with the job's timeline, complete for a
/// terminal event), ending after the terminal event; a follower that began after the end (or
/// whose events ended early) gets `after_end` of the record instead.
pub fn event_stream<T, F>(
    job: JobFollower,
    first: Vec<T>,
    translate: F,
    after_end: fn(&JobRecord) -> Option<T>,
) -> impl Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnMut(u64, EngineEvent, &Timeline) -> Vec<T> + Send + 'static,
{
    struct State<T, F> {
        job: JobFollower,
        translate: F,
        after_end: fn(&JobRecord) -> Option<T>,
        pending: VecDeque<T>,
        done: bool,
    }
    let state = State {
        job,
        translate,
        after_end,
        pending: first.into(),
        done: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(item) = s.pending.pop_front() {
                return Some((item, s));
            }
            if s.done {
                return None;
            }
            let batch = s.job.next_batch().await;
            if batch.is_empty() {
                s.pending.extend((s.after_end)(s.job.record()));
                s.done = true;
                continue;
            }
            let timeline = s.job.record().timeline();
            for (id, event) in batch {
                s.done |= event.is_terminal();
                s.pending.extend((s.translate)(id, event, &timeline));
            }
        }
    })
}

/// An SSE response: keep-alive comments while the job waits (queued, or a long prefill), and
/// headers that stop proxies from buffering.
pub fn sse_response(
    app: &AppState,
    stream: impl Stream<Item = Result<Event, Infallible>> + Send + 'static,
) -> Response {
    let sse =
        Sse::new(stream).keep_alive(KeepAlive::new().interval(app.keep_alive).text("keep-alive"));
    (
        [
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        sse,
    )
        .into_response()
}
