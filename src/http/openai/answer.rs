//! What both generation endpoints do once their prompt is tokenized: fit `max_tokens` to the
//! context, submit the job, and answer with one response or a stream of chunks.
//! [`AnswerShape`] is all that `chat` and `completions` differ in here: their `object` names,
//! their choices and their log-probability format.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Serialize;

use super::error::OpenAiError;
use super::request::{Common, resolve_max_tokens};
use super::response::{Completion, ResponseMeta, TokenNamer, Usage, finish_reason};
use super::run::{ended_error, json_event, response_meta, submit};
use crate::engine::EngineEvent;
use crate::generation::TokenLogprobs;
use crate::http::AppState;
use crate::http::auth::Caller;
use crate::http::pipeline::{event_stream, sse_response};
use crate::http::structured;
use crate::jobs::{JobApi, JobFollower, ServedModel, Submission, Timeline};
use crate::model::tokenizer::TextTokenizer;

/// One generation endpoint's answer format.
pub trait AnswerShape: Send + 'static {
    /// Labels the job's metrics.
    const API: JobApi;
    /// The response id's prefix (`chatcmpl`, `cmpl`).
    const ID_PREFIX: &'static str;
    /// The parameter that holds the prompt, named in context-length errors.
    const PROMPT_PARAM: &'static str;
    /// The `object` of the whole response.
    const OBJECT: &'static str;
    /// The `object` of a stream's chunks.
    const CHUNK_OBJECT: &'static str;

    /// A choice of the whole response.
    type Choice: Serialize;
    /// A choice of a stream's chunk.
    type ChunkChoice: Serialize + Send;
    /// The log-probabilities of some tokens: one chunk's, or the whole response's.
    type Logprobs: Default + Send;

    /// Appends one token's log-probabilities.
    fn push_logprobs(
        &mut self,
        logprobs: &mut Self::Logprobs,
        namer: TokenNamer<'_>,
        token: u32,
        lp: &TokenLogprobs,
    );

    /// The chunk a stream opens with, before any token.
    fn first_chunk() -> Option<Self::ChunkChoice> {
        None
    }

    /// The chunk for one token's text and log-probabilities, or `None` when there is nothing
    /// to send yet (text withheld until it is known what it is).
    fn token_chunk(
        &mut self,
        text: String,
        logprobs: Option<Self::Logprobs>,
    ) -> Option<Self::ChunkChoice>;

    /// The last chunks: whatever was withheld, then the one that says why generation ended.
    fn finish_chunks(&mut self, finish_reason: &'static str) -> Vec<Self::ChunkChoice>;

    /// The whole response's choice.
    fn choice(
        &mut self,
        text: String,
        logprobs: Option<Self::Logprobs>,
        finish_reason: &'static str,
    ) -> Self::Choice;
}

/// Submits the job and answers it: as SSE chunks when the client asked for a stream, else as
/// one JSON response once the job has finished.
pub async fn answer<S: AnswerShape>(
    app: &AppState,
    caller: &Caller,
    served: &ServedModel,
    shape: S,
    common: Common,
    prompt_tokens: Vec<u32>,
) -> Result<Response, OpenAiError> {
    let mut params = common.params;
    params.max_tokens = resolve_max_tokens(
        common.max_tokens,
        prompt_tokens.len(),
        served.meta.context_length,
        S::PROMPT_PARAM,
    )?;
    if let Some(requested) = common.constraint {
        params.constraint = Some(
            structured::compile(served, requested)
                .await?
                .map_err(|e| OpenAiError::from_problems(&[e]))?,
        );
    }
    let wants_logprobs = params.logprobs.is_some();
    let response = response_meta(S::ID_PREFIX, served);
    let submission = Submission {
        api: S::API,
        owner: caller.0.clone(),
        id: Some(response.id.clone()),
        prompt_tokens,
        params,
    };
    let job = submit(app, submission)?;
    let namer = OwnedNamer {
        tokenizer: served.meta.tokenizer.clone(),
        as_ids: common.tokens_as_ids,
    };
    if common.stream {
        let stream = chunks(job, response, shape, namer, common.include_usage);
        return Ok(sse_response(app, stream));
    }
    whole(job, response, shape, namer, wants_logprobs).await
}

/// A [`TokenNamer`] that can move into a stream.
struct OwnedNamer {
    tokenizer: Arc<TextTokenizer>,
    as_ids: bool,
}

impl OwnedNamer {
    fn namer(&self) -> TokenNamer<'_> {
        TokenNamer {
            tokenizer: &self.tokenizer,
            as_ids: self.as_ids,
        }
    }
}

/// The job's events as chunks, ending with the finish chunk (and the usage chunk when asked).
fn chunks<S: AnswerShape>(
    job: JobFollower,
    response: ResponseMeta,
    mut shape: S,
    namer: OwnedNamer,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let usage_null = include_usage.then_some(None);
    let chunk = move |choices: Vec<S::ChunkChoice>, usage: Option<Option<Usage>>| {
        json_event(&Completion::new(&response, S::CHUNK_OBJECT, choices, usage))
    };
    let first = S::first_chunk()
        .map(|choice| chunk(vec![choice], usage_null))
        .into_iter()
        .collect();
    let mut chunks_of = move |event: EngineEvent| match event {
        EngineEvent::Token(step) => {
            let logprobs = step.logprobs.as_ref().map(|lp| {
                let mut one = S::Logprobs::default();
                shape.push_logprobs(&mut one, namer.namer(), step.token, lp);
                one
            });
            // Text withheld (an incomplete character, a possible stop string) comes with a
            // later token; a chunk is only worth sending with text or log-probabilities.
            if step.text.is_empty() && logprobs.is_none() {
                return Vec::new();
            }
            shape
                .token_chunk(step.text, logprobs)
                .map(|choice| chunk(vec![choice], usage_null))
                .into_iter()
                .collect()
        }
        EngineEvent::Finished(summary) => {
            let mut out: Vec<Event> = shape
                .finish_chunks(finish_reason(&summary.reason))
                .into_iter()
                .map(|choice| chunk(vec![choice], usage_null))
                .collect();
            if include_usage {
                let usage = Usage::new(summary.tokens_in, summary.tokens_out);
                out.push(chunk(Vec::new(), Some(Some(usage))));
            }
            out
        }
        e @ (EngineEvent::Failed { .. } | EngineEvent::Cancelled { .. }) => {
            vec![json_event(&ended_error(&e).body())]
        }
        EngineEvent::Queued { .. } | EngineEvent::Started { .. } => Vec::new(),
    };
    let translate = move |_id, event: EngineEvent, _timeline: &Timeline| {
        let terminal = event.is_terminal();
        let mut out = chunks_of(event);
        if terminal {
            out.push(Event::default().data("[DONE]"));
        }
        out
    };
    event_stream(job, first, translate, |_| None)
}

/// Follows the job to its end and answers with the whole text in one response.
async fn whole<S: AnswerShape>(
    mut job: JobFollower,
    response: ResponseMeta,
    mut shape: S,
    namer: OwnedNamer,
    wants_logprobs: bool,
) -> Result<Response, OpenAiError> {
    let mut text = String::new();
    let mut logprobs = S::Logprobs::default();
    loop {
        let events = job.next_batch().await;
        if events.is_empty() {
            return Err(OpenAiError::internal("the job's events ended early"));
        }
        for (_, event) in events {
            match event {
                EngineEvent::Token(step) => {
                    text.push_str(&step.text);
                    if let Some(lp) = &step.logprobs {
                        shape.push_logprobs(&mut logprobs, namer.namer(), step.token, lp);
                    }
                }
                EngineEvent::Finished(summary) => {
                    let choice = shape.choice(
                        text,
                        wants_logprobs.then_some(logprobs),
                        finish_reason(&summary.reason),
                    );
                    let usage = Usage::new(summary.tokens_in, summary.tokens_out);
                    return Ok(Json(Completion::new(
                        &response,
                        S::OBJECT,
                        vec![choice],
                        Some(Some(usage)),
                    ))
                    .into_response());
                }
                e @ (EngineEvent::Failed { .. } | EngineEvent::Cancelled { .. }) => {
                    return Err(ended_error(&e));
                }
                EngineEvent::Queued { .. } | EngineEvent::Started { .. } => {}
            }
        }
    }
}
