//! `POST /v1/completions`: a raw prompt (text or token ids) run as one job; the answer as a
//! `text_completion` or a stream of them.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::OpenAiJson;
use super::error::OpenAiError;
use super::request::{Prompt, Rules, parse_completion, resolve_max_tokens};
use super::response::{
    CompletionLogprobs, TextChoice, TextCompletion, TokenNamer, Usage, finish_reason,
};
use super::run::{
    JobWatch, ended_error, event_stream, json_event, off_the_runtime, ready, response_meta,
    sse_response,
};
use crate::engine::EngineEvent;
use crate::http::AppState;
use crate::jobs::JobApi;

pub async fn completions(
    State(app): State<AppState>,
    OpenAiJson(body): OpenAiJson,
) -> Result<Response, OpenAiError> {
    let served = ready(&app)?;
    let meta = &served.meta;
    let rules = Rules {
        model_id: &served.model_id,
        vocab_size: meta.vocab_size,
        context_length: meta.context_length,
    };
    let request = parse_completion(&body, &rules)?;
    drop(body);

    let prompt_tokens = match request.prompt {
        Prompt::Tokens(ids) => ids,
        Prompt::Text(text) => {
            let tokenizer = meta.tokenizer.clone();
            // Special-token text is parsed and BOS added where the model asks for it, as
            // llama-server does for a raw prompt.
            off_the_runtime(text.len(), move || {
                tokenizer
                    .encode_with_special(&text, true, true)
                    .map_err(|e| {
                        OpenAiError::invalid("prompt", format!("cannot be tokenized: {e}"))
                    })
            })
            .await??
        }
    };

    let common = request.common;
    let mut params = common.params;
    params.max_tokens = resolve_max_tokens(
        common.max_tokens,
        prompt_tokens.len(),
        meta.context_length,
        "prompt",
    )?;
    let wants_logprobs = params.logprobs.is_some();
    let response = response_meta("cmpl", served);
    let mut job = JobWatch::submit(
        &app,
        JobApi::OpenAiCompletions,
        response.id.clone(),
        prompt_tokens,
        params,
    )?;
    let tokenizer = meta.tokenizer.clone();
    let tokens_as_ids = common.tokens_as_ids;

    if common.stream {
        let include_usage = common.include_usage;
        let usage_null = include_usage.then_some(None);
        // Characters streamed so far, for `text_offset`.
        let mut offset = 0;
        let translate = move |event: EngineEvent| match event {
            EngineEvent::Token(step) => {
                let logprobs = step.logprobs.as_ref().map(|lp| {
                    let mut l = CompletionLogprobs::default();
                    let namer = TokenNamer {
                        tokenizer: &tokenizer,
                        as_ids: tokens_as_ids,
                    };
                    l.push(namer, step.token, lp, &mut offset);
                    l
                });
                if step.text.is_empty() && logprobs.is_none() {
                    return Vec::new();
                }
                vec![json_event(&TextCompletion::new(
                    &response,
                    vec![TextChoice {
                        text: step.text,
                        index: 0,
                        logprobs,
                        finish_reason: None,
                    }],
                    usage_null,
                ))]
            }
            EngineEvent::Finished(summary) => {
                let mut out = vec![json_event(&TextCompletion::new(
                    &response,
                    vec![TextChoice {
                        text: String::new(),
                        index: 0,
                        logprobs: None,
                        finish_reason: Some(finish_reason(&summary.reason)),
                    }],
                    usage_null,
                ))];
                if include_usage {
                    out.push(json_event(&TextCompletion::new(
                        &response,
                        Vec::new(),
                        Some(Some(Usage::new(summary.tokens_in, summary.tokens_out))),
                    )));
                }
                out
            }
            e @ (EngineEvent::Failed { .. } | EngineEvent::Cancelled { .. }) => {
                vec![json_event(&ended_error(&e).body())]
            }
            EngineEvent::Queued { .. } | EngineEvent::Started { .. } => Vec::new(),
        };
        return Ok(sse_response(&app, event_stream(job, Vec::new(), translate)));
    }

    let namer = TokenNamer {
        tokenizer: &tokenizer,
        as_ids: tokens_as_ids,
    };
    let mut text = String::new();
    let mut logprobs = CompletionLogprobs::default();
    let mut offset = 0;
    loop {
        let events = job.next_events().await;
        if events.is_empty() {
            return Err(OpenAiError::internal("the job's events ended early"));
        }
        for event in events {
            match event {
                EngineEvent::Token(step) => {
                    text.push_str(&step.text);
                    if let Some(lp) = &step.logprobs {
                        logprobs.push(namer, step.token, lp, &mut offset);
                    }
                }
                EngineEvent::Finished(summary) => {
                    let choice = TextChoice {
                        text,
                        index: 0,
                        logprobs: wants_logprobs.then_some(logprobs),
                        finish_reason: Some(finish_reason(&summary.reason)),
                    };
                    let usage = Usage::new(summary.tokens_in, summary.tokens_out);
                    return Ok(Json(TextCompletion::new(
                        &response,
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
