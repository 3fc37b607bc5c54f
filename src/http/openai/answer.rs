//! What both generation endpoints share: [`generate`], the handler both routes run (readiness,
//! then the body read by the endpoint's [`GenerationRequest`] rules), and, once the endpoint
//! has tokenized its prompt, [`answer`]: fit `max_tokens` to the context, submit one job per
//! choice (`n`), and answer with one response or a stream of chunks. [`AnswerShape`] is all
//! that `chat` and `completions` differ in here: their [`Endpoint`] names, their choices (whose
//! types name the `object`s) and their log-probability format; each choice has its own shape
//! (it knows its `index`).
//!
//! With `n` > 1, choice `i` is the job seeded with [`choice_seed`]`(seed, i)` (choice 0 with the
//! request's seed itself), and the choices' jobs read the prompt once: the engine starts the
//! others from a copy of the first one's cache. `usage` counts the prompt once and every
//! choice's tokens.

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde_json::{Map, Value};

use super::OpenAiJson;
use super::error::OpenAiError;
use super::request::{Common, resolve_max_tokens};
use super::response::{
    Completion, CompletionChoice, LogprobList, ResponseMeta, TokenNamer, Usage, finish_reason,
};
use super::run::{ended_error, json_event, ready, response_meta, submit};
use crate::engine::EngineEvent;
use crate::http::AppState;
use crate::http::auth::Caller;
use crate::http::fields::Rules;
use crate::http::pipeline::{event_stream, sse_response};
use crate::http::structured;
use crate::jobs::{JobApi, JobFollower, JobRecord, ServedModel, Submission, Timeline};
use crate::model::tokenizer::TextTokenizer;

/// One generation request on its way: the app, who asked, and the model that serves it.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    pub app: &'a AppState,
    pub caller: &'a Caller,
    pub served: &'a ServedModel,
}

/// A generation endpoint's request: how its body is read, and how it is answered.
pub trait GenerationRequest: Sized + Send {
    fn parse(body: &Map<String, Value>, rules: &Rules<'_>) -> Result<Self, OpenAiError>;

    /// Makes the prompt's tokens and [`answer`]s.
    fn respond(self, call: Call<'_>) -> impl Future<Output = Result<Response, OpenAiError>> + Send;
}

/// `POST /v1/chat/completions` and `POST /v1/completions`: the body read by `R`'s rules for the
/// served model (a 503 while there is none), then answered by `R`.
pub async fn generate<R: GenerationRequest>(
    State(app): State<AppState>,
    caller: Caller,
    OpenAiJson(body): OpenAiJson,
) -> Result<Response, OpenAiError> {
    let served = ready(&app)?;
    let request = R::parse(&body, &Rules::of(served))?;
    drop(body);
    let call = Call {
        app: &app,
        caller: &caller,
        served,
    };
    request.respond(call).await
}

/// What a generation endpoint is called where the two differ.
pub struct Endpoint {
    /// Labels the job's metrics.
    pub api: JobApi,
    /// The response id's prefix.
    pub id_prefix: &'static str,
    /// The parameter that holds the prompt, named in context-length errors.
    pub prompt_param: &'static str,
}

impl Endpoint {
    pub const CHAT: Self = Self {
        api: JobApi::OpenAiChat,
        id_prefix: "chatcmpl",
        prompt_param: "messages",
    };
    pub const COMPLETIONS: Self = Self {
        api: JobApi::OpenAiCompletions,
        id_prefix: "cmpl",
        prompt_param: "prompt",
    };
}

/// One generation endpoint's answer format.
pub trait AnswerShape: Send + 'static {
    /// [`Endpoint::CHAT`] or [`Endpoint::COMPLETIONS`].
    const ENDPOINT: Endpoint;

    /// A choice of the whole response.
    type Choice: CompletionChoice;
    /// A choice of a stream's chunk.
    type ChunkChoice: CompletionChoice + Send;
    /// The log-probabilities of some tokens: one chunk's, or the whole response's.
    type Logprobs: LogprobList;

    /// The chunk a stream opens with, before any token.
    fn first_chunk(&self) -> Option<Self::ChunkChoice> {
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

/// The seed of choice `i`: the request's seed for choice 0, a SplitMix64 mix of it and `i` for
/// the others, so a repeated request repeats every choice.
pub fn choice_seed(seed: u64, i: usize) -> u64 {
    if i == 0 {
        return seed;
    }
    let mut z = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Submits one job per choice and answers them: as SSE chunks when the client asked for a
/// stream, else as one JSON response once every job has finished. `shape(i)` is choice `i`'s.
pub async fn answer<S: AnswerShape>(
    call: Call<'_>,
    shape: impl Fn(usize) -> S,
    common: Common,
    prompt_tokens: Vec<u32>,
) -> Result<Response, OpenAiError> {
    let Call {
        app,
        caller,
        served,
    } = call;
    let mut params = common.params;
    params.max_tokens = resolve_max_tokens(
        common.max_tokens,
        prompt_tokens.len(),
        served.meta.context_length,
        S::ENDPOINT.prompt_param,
    )?;
    if let Some(requested) = common.constraint {
        params.constraint = Some(
            structured::compile(served, requested)
                .await?
                .map_err(|e| OpenAiError::from_problems(&[e]))?,
        );
    }
    let wants_logprobs = params.logprobs.is_some();
    let response = response_meta(S::ENDPOINT.id_prefix, served);
    let mut choices = Vec::with_capacity(common.n);
    for i in 0..common.n {
        let mut params = params.clone();
        params.sampling.seed = choice_seed(params.sampling.seed, i);
        let submission = Submission {
            api: S::ENDPOINT.api,
            owner: caller.0.clone(),
            id: Some(if i == 0 {
                response.id.clone()
            } else {
                format!("{}-{i}", response.id)
            }),
            prompt_tokens: prompt_tokens.clone(),
            params,
        };
        // A choice that cannot be queued drops the ones before it (their followers cancel).
        choices.push((submit(app, submission)?, shape(i)));
    }
    let namer = Arc::new(OwnedNamer {
        tokenizer: served.meta.tokenizer.clone(),
        as_ids: common.tokens_as_ids,
    });
    if common.stream {
        let stream = chunks(choices, response, namer, common.include_usage);
        return Ok(sse_response(app, stream));
    }
    whole(choices, response, namer, wants_logprobs).await
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

/// What one choice's events become in a stream.
enum ChoiceItem<C> {
    /// Chunk choices to send.
    Chunks(Vec<C>),
    /// The choice finished: (prompt tokens, completion tokens, cached prompt tokens).
    Finished(Vec<C>, (usize, usize, usize)),
    /// The job ended without finishing: the error to send, and the stream ends.
    Ended(OpenAiError),
}

/// One choice's events as [`ChoiceItem`]s, in order, ending with its terminal event.
fn choice_items<S: AnswerShape>(
    job: JobFollower,
    mut shape: S,
    namer: Arc<OwnedNamer>,
) -> impl Stream<Item = ChoiceItem<S::ChunkChoice>> + Send + 'static {
    let mut offset = 0;
    let translate =
        move |_id, event: EngineEvent, _timeline: &Timeline| -> Vec<ChoiceItem<S::ChunkChoice>> {
            let item = match event {
                EngineEvent::Token(step) => {
                    let logprobs = step.logprobs.as_ref().map(|lp| {
                        let mut one = S::Logprobs::default();
                        one.push(namer.namer(), step.token, lp, &mut offset);
                        one
                    });
                    // Text withheld (an incomplete character, a possible stop string) comes with a
                    // later token; a chunk is only worth sending with text or log-probabilities.
                    if step.text.is_empty() && logprobs.is_none() {
                        return Vec::new();
                    }
                    shape
                        .token_chunk(step.text, logprobs)
                        .map(|chunk| ChoiceItem::Chunks(vec![chunk]))
                }
                EngineEvent::Finished(summary) => Some(ChoiceItem::Finished(
                    shape.finish_chunks(finish_reason(&summary.reason)),
                    (summary.tokens_in, summary.tokens_out, summary.tokens_cached),
                )),
                e @ (EngineEvent::Failed { .. } | EngineEvent::Cancelled { .. }) => {
                    Some(ChoiceItem::Ended(ended_error(&e)))
                }
                EngineEvent::Queued { .. } | EngineEvent::Started { .. } => None,
            };
            item.into_iter().collect()
        };
    // The follower began with the job, so its events only run out early if something broke.
    let early = |_: &JobRecord| {
        let e = OpenAiError::internal("the job's events ended early");
        Some(ChoiceItem::Ended(e))
    };
    event_stream(job, Vec::new(), translate, early)
}

/// Every choice's chunks as they come, then the usage chunk (when asked) and `[DONE]` once all
/// have finished. A choice that fails ends the stream with its error (the others are
/// cancelled as their followers drop).
fn chunks<S: AnswerShape>(
    choices: Vec<(JobFollower, S)>,
    response: ResponseMeta,
    namer: Arc<OwnedNamer>,
    include_usage: bool,
) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
    let usage_null = include_usage.then_some(None);
    let chunk = move |response: &ResponseMeta,
                      choices: Vec<S::ChunkChoice>,
                      usage: Option<Option<Usage>>| {
        json_event(&Completion::new(response, choices, usage))
    };
    let n = choices.len();
    let first: Vec<Event> = choices
        .iter()
        .filter_map(|(_, shape)| shape.first_chunk())
        .map(|c| chunk(&response, vec![c], usage_null))
        .collect();
    let merged = futures_util::stream::select_all(
        choices
            .into_iter()
            .map(|(job, shape)| Box::pin(choice_items(job, shape, namer.clone()))),
    );
    struct Tally {
        finished: usize,
        usage: Usage,
        ended: bool,
    }
    let tally = Tally {
        finished: 0,
        usage: Usage::new(0, 0, 0),
        ended: false,
    };
    let events = futures_util::stream::unfold(
        (merged, tally, response),
        move |(mut merged, mut t, response)| async move {
            if t.ended {
                return None;
            }
            let item = merged.next().await?;
            let mut out = Vec::new();
            match item {
                ChoiceItem::Chunks(c) => {
                    out.extend(c.into_iter().map(|c| chunk(&response, vec![c], usage_null)));
                }
                ChoiceItem::Finished(c, (tokens_in, tokens_out, cached)) => {
                    out.extend(c.into_iter().map(|c| chunk(&response, vec![c], usage_null)));
                    t.usage = add_choice(t.usage, t.finished == 0, tokens_in, tokens_out, cached);
                    t.finished += 1;
                    if t.finished == n {
                        if include_usage {
                            out.push(chunk(&response, Vec::new(), Some(Some(t.usage))));
                        }
                        out.push(Event::default().data("[DONE]"));
                        t.ended = true;
                    }
                }
                ChoiceItem::Ended(e) => {
                    out.push(json_event(&e.body()));
                    out.push(Event::default().data("[DONE]"));
                    t.ended = true;
                }
            }
            let out = futures_util::stream::iter(out.into_iter().map(Ok));
            Some((out, (merged, t, response)))
        },
    )
    .flatten();
    futures_util::stream::iter(first.into_iter().map(Ok)).chain(events)
}

/// `usage` with one more choice: the prompt counted once, every choice's completion tokens
/// added. The cached prompt tokens are the fewest any choice had: the other choices start from
/// a copy of the first one's prompt, which is not the cache of an earlier request.
fn add_choice(
    usage: Usage,
    first: bool,
    tokens_in: usize,
    tokens_out: usize,
    cached: usize,
) -> Usage {
    if first {
        Usage::new(tokens_in, tokens_out, cached)
    } else {
        Usage::new(
            usage.prompt_tokens,
            usage.completion_tokens + tokens_out,
            usage.prompt_tokens_details.cached_tokens.min(cached),
        )
    }
}

/// Follows every choice's job to its end and answers with the whole texts in one response.
async fn whole<S: AnswerShape>(
    choices: Vec<(JobFollower, S)>,
    response: ResponseMeta,
    namer: Arc<OwnedNamer>,
    wants_logprobs: bool,
) -> Result<Response, OpenAiError> {
    let answers = futures_util::future::try_join_all(
        choices
            .into_iter()
            .map(|(job, shape)| one_choice(job, shape, namer.clone(), wants_logprobs)),
    )
    .await?;
    let mut usage = Usage::new(0, 0, 0);
    let mut out = Vec::with_capacity(answers.len());
    for (i, (choice, (tokens_in, tokens_out, cached))) in answers.into_iter().enumerate() {
        usage = add_choice(usage, i == 0, tokens_in, tokens_out, cached);
        out.push(choice);
    }
    Ok(Json(Completion::new(&response, out, Some(Some(usage)))).into_response())
}

/// One choice's whole answer, and its (prompt, completion, cached) token counts.
async fn one_choice<S: AnswerShape>(
    mut job: JobFollower,
    mut shape: S,
    namer: Arc<OwnedNamer>,
    wants_logprobs: bool,
) -> Result<(S::Choice, (usize, usize, usize)), OpenAiError> {
    let mut text = String::new();
    let mut logprobs = S::Logprobs::default();
    let mut offset = 0;
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
                        logprobs.push(namer.namer(), step.token, lp, &mut offset);
                    }
                }
                EngineEvent::Finished(summary) => {
                    let choice = shape.choice(
                        text,
                        wants_logprobs.then_some(logprobs),
                        finish_reason(&summary.reason),
                    );
                    return Ok((
                        choice,
                        (summary.tokens_in, summary.tokens_out, summary.tokens_cached),
                    ));
                }
                e @ (EngineEvent::Failed { .. } | EngineEvent::Cancelled { .. }) => {
                    return Err(ended_error(&e));
                }
                EngineEvent::Queued { .. } | EngineEvent::Started { .. } => {}
            }
        }
    }
}
