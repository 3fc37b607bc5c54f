//! The job event stream: a job's logged [`EngineEvent`]s as Server-Sent Events.
//!
//! Each event carries an `event:` name, an `id:` (the log id, for `Last-Event-ID`) and JSON
//! `data` whose `type` repeats the name. The terminal event is followed by a data-only sentinel
//! line for line-oriented clients: `[DONE]`, `[ERROR] <message>` or `[CANCELLED]`.
//!
//! The stream reads the job through a [`JobFollower`], so the engine is never slowed by a
//! client.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::Event;
use futures_util::{Stream, StreamExt};
use serde::Serialize;

use super::pipeline::event_stream;
use crate::engine::EngineEvent;
use crate::generation::FinishReason;
use crate::jobs::{JobFollower, JobRecord, Timeline};
use crate::model::tokenizer::TextTokenizer;
use crate::timestamp::rfc3339;

/// What every event of one job's stream needs besides the event.
pub struct StreamContext {
    pub job_id: String,
    pub model: String,
    pub tokenizer: Arc<TextTokenizer>,
    /// Send `queued` events (the job API's own; rbee's `InferenceEvent` has no such type).
    pub queue_events: bool,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TopLogprob {
    pub id: u32,
    pub t: String,
    pub logprob: f32,
}

/// The JSON `data` of each event.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent<'a> {
    Queued {
        job_id: &'a str,
        position: usize,
    },
    Started {
        job_id: &'a str,
        model: &'a str,
        started_at: String,
    },
    Token {
        t: &'a str,
        i: usize,
        id: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        logprob: Option<f32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        top_logprobs: Option<Vec<TopLogprob>>,
    },
    End {
        tokens_in: usize,
        /// Of `tokens_in`, those read from the prefix cache instead of prefilled.
        tokens_cached: usize,
        tokens_out: usize,
        ttft_ms: u64,
        decode_time_ms: u64,
        tokens_per_sec: f64,
        /// rbee's `StopReason`: `MAX_TOKENS`, `EOS` or `STOP_SEQUENCE`.
        stop_reason: &'static str,
        /// The stop string that ended the job (with `STOP_SEQUENCE`).
        #[serde(skip_serializing_if = "Option::is_none")]
        stop_sequence_matched: Option<&'a str>,
        /// With `MAX_TOKENS`: the limit was the context window, not `max_tokens`.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        context_full: bool,
        seed: u64,
    },
    Error {
        code: &'static str,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    },
}

impl StreamEvent<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Queued { .. } => "queued",
            Self::Started { .. } => "started",
            Self::Token { .. } => "token",
            Self::End { .. } => "end",
            Self::Error { .. } => "error",
        }
    }
}

/// rbee's spelling of a finish reason (its `StopReason` has no value for a full context: that
/// is `MAX_TOKENS`, with `context_full` in the `end` event).
pub fn stop_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::MaxTokens | FinishReason::ContextFull => "MAX_TOKENS",
        FinishReason::Eos => "EOS",
        FinishReason::StopSequence(_) => "STOP_SEQUENCE",
    }
}

/// The wire form of an engine event; `None` for what this stream does not carry: the
/// end-of-generation token when it brings no text (it is not output; the `end` event that
/// follows says `EOS`), and `queued` events on a stream without them.
pub fn stream_event<'a>(
    event: &'a EngineEvent,
    ctx: &'a StreamContext,
    timeline: &Timeline,
) -> Option<StreamEvent<'a>> {
    match event {
        EngineEvent::Token(step)
            if step.finish == Some(FinishReason::Eos) && step.text.is_empty() =>
        {
            return None;
        }
        EngineEvent::Queued { .. } if !ctx.queue_events => return None,
        _ => {}
    }
    Some(match event {
        EngineEvent::Queued { position } => StreamEvent::Queued {
            job_id: &ctx.job_id,
            position: *position,
        },
        EngineEvent::Started { at } => StreamEvent::Started {
            job_id: &ctx.job_id,
            model: &ctx.model,
            started_at: rfc3339(*at),
        },
        EngineEvent::Token(step) => StreamEvent::Token {
            t: &step.text,
            i: step.index,
            id: step.token,
            logprob: step.logprobs.as_ref().map(|l| l.logprob),
            top_logprobs: step.logprobs.as_ref().map(|l| {
                l.top
                    .iter()
                    .map(|&(id, logprob)| TopLogprob {
                        id,
                        t: String::from_utf8_lossy(ctx.tokenizer.token_bytes(id, true))
                            .into_owned(),
                        logprob,
                    })
                    .collect()
            }),
        },
        EngineEvent::Finished(summary) => StreamEvent::End {
            tokens_in: summary.tokens_in,
            tokens_cached: summary.tokens_cached,
            tokens_out: summary.tokens_out,
            ttft_ms: timeline.time_to_first_token().map_or(0, millis),
            decode_time_ms: millis(timeline.decode_time()),
            tokens_per_sec: (timeline.tokens_per_second(summary.tokens_out) * 100.0).round()
                / 100.0,
            stop_reason: stop_reason(&summary.reason),
            stop_sequence_matched: match &summary.reason {
                FinishReason::StopSequence(s) => Some(s),
                _ => None,
            },
            context_full: summary.reason == FinishReason::ContextFull,
            seed: summary.seed,
        },
        EngineEvent::Failed { code, message } => StreamEvent::Error {
            code: code.as_str(),
            message: message.clone(),
            reason: None,
        },
        EngineEvent::Cancelled { reason } => StreamEvent::Error {
            code: "CANCELLED",
            message: format!("the job was cancelled ({})", reason.as_str()),
            reason: Some(reason.as_str()),
        },
    })
}

fn millis(d: std::time::Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The SSE event for a logged engine event (`None`: nothing to send, see [`stream_event`]);
/// `timeline` is the job's, for the `end` event's times.
pub fn sse_event(
    id: u64,
    event: &EngineEvent,
    ctx: &StreamContext,
    timeline: &Timeline,
) -> Option<Event> {
    let wire = stream_event(event, ctx, timeline)?;
    let data = serde_json::to_string(&wire).unwrap_or_else(|e| {
        // Only non-string map keys fail to serialize; our types have none.
        format!(r#"{{"type":"error","code":"INTERNAL_ERROR","message":"{e}"}}"#)
    });
    Some(
        Event::default()
            .event(wire.name())
            .id(id.to_string())
            .data(data),
    )
}

/// The data-only line after a terminal event.
pub fn sentinel(terminal: &EngineEvent) -> Event {
    let line = match terminal {
        EngineEvent::Failed { message, .. } => {
            format!("[ERROR] {}", message.replace(['\r', '\n'], " "))
        }
        EngineEvent::Cancelled { .. } => "[CANCELLED]".to_string(),
        _ => "[DONE]".to_string(),
    };
    Event::default().data(line)
}

/// The job's events after `after` (0: from the start), ending after the terminal event and its
/// sentinel (resumed after the terminal event: the sentinel alone). The job counts as watched
/// until the stream is dropped.
pub fn job_event_stream(
    record: Arc<JobRecord>,
    after: u64,
    ctx: StreamContext,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let translate = move |id, event: EngineEvent, timeline: &Timeline| {
        let mut out: Vec<Event> = sse_event(id, &event, &ctx, timeline).into_iter().collect();
        if event.is_terminal() {
            out.push(sentinel(&event));
        }
        out
    };
    let after_end = |record: &JobRecord| record.terminal_event().map(|(_, e)| sentinel(&e));
    event_stream(
        JobFollower::new(record, after),
        Vec::new(),
        translate,
        after_end,
    )
    .map(Ok)
}
