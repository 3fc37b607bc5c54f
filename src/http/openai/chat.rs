//! `POST /v1/chat/completions`: messages rendered with the chat template, tokenized, and run
//! as one job; the answer as a `chat.completion` or a stream of `chat.completion.chunk`s.

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::OpenAiJson;
use super::error::OpenAiError;
use super::request::{Rules, parse_chat, resolve_max_tokens};
use super::response::{
    AssistantMessage, ChatChoice, ChatChunk, ChatCompletion, ChatLogprobs, ChunkChoice, Delta,
    TokenNamer, Usage, chat_token_logprob, finish_reason,
};
use super::run::{
    JobWatch, ended_error, event_stream, json_event, off_the_runtime, ready, response_meta,
    sse_response,
};
use crate::engine::{EngineEvent, ModelMeta};
use crate::http::AppState;
use crate::jobs::JobApi;
use crate::model::chat_template::{ChatTemplate, ChatTemplateError};

/// The template chat requests are rendered with: `--chat-template` when given, else the
/// model's own, else plain ChatML. With the override, also the variables it needs from the
/// model (`bos_token`, `eos_token`), which the model's own template was built with already.
pub fn chat_template(app: &AppState, meta: &ModelMeta) -> (Arc<ChatTemplate>, Map<String, Value>) {
    static CHATML: OnceLock<Arc<ChatTemplate>> = OnceLock::new();
    if let Some(t) = &app.chat_template {
        let piece = |id: Option<u32>| {
            id.and_then(|i| meta.tokenizer.id_to_piece(i))
                .unwrap_or_default()
                .to_string()
        };
        let mut vars = Map::new();
        vars.insert(
            "bos_token".into(),
            piece(meta.tokenizer.bos_token_id()).into(),
        );
        vars.insert(
            "eos_token".into(),
            piece(meta.tokenizer.eos_token_id()).into(),
        );
        return (t.clone(), vars);
    }
    let template = meta.chat_template.clone().unwrap_or_else(|| {
        CHATML
            .get_or_init(|| Arc::new(ChatTemplate::chatml()))
            .clone()
    });
    (template, Map::new())
}

fn template_error(e: ChatTemplateError) -> OpenAiError {
    match e {
        ChatTemplateError::Raised(message) => OpenAiError::invalid(
            "messages",
            format!("the model's chat template rejected the conversation: {message}"),
        ),
        other => OpenAiError::internal(other.to_string()),
    }
}

pub async fn chat_completions(
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
    let request = parse_chat(&body, &rules)?;
    drop(body);

    let (template, mut vars) = chat_template(&app, meta);
    vars.extend(request.template_kwargs);
    let input_bytes = request.messages.iter().map(|m| m.content.len()).sum();
    let tokenizer = meta.tokenizer.clone();
    let messages = request.messages;
    let add_generation_prompt = request.add_generation_prompt;
    let prompt_tokens = off_the_runtime(input_bytes, move || {
        let text = template
            .render_with_context(&messages, add_generation_prompt, &vars)
            .map_err(template_error)?;
        // The template writes any BOS itself, as transformers' apply_chat_template expects.
        tokenizer
            .encode_with_special(&text, true, false)
            .map_err(|e| OpenAiError::invalid("messages", format!("cannot be tokenized: {e}")))
    })
    .await??;

    let common = request.common;
    let mut params = common.params;
    params.max_tokens = resolve_max_tokens(
        common.max_tokens,
        prompt_tokens.len(),
        meta.context_length,
        "messages",
    )?;
    let wants_logprobs = params.logprobs.is_some();
    let response = response_meta("chatcmpl", served);
    let mut job = JobWatch::submit(
        &app,
        JobApi::OpenAiChat,
        response.id.clone(),
        prompt_tokens,
        params,
    )?;
    let tokenizer = meta.tokenizer.clone();
    let tokens_as_ids = common.tokens_as_ids;

    if common.stream {
        let include_usage = common.include_usage;
        let usage_null = include_usage.then_some(None);
        let first = json_event(&ChatChunk::new(
            &response,
            vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage_null,
        ));
        let translate = move |event: EngineEvent| match event {
            EngineEvent::Token(step) => {
                let namer = TokenNamer {
                    tokenizer: &tokenizer,
                    as_ids: tokens_as_ids,
                };
                let logprobs = step.logprobs.as_ref().map(|lp| ChatLogprobs {
                    content: vec![chat_token_logprob(namer, step.token, lp)],
                });
                // Text withheld (an incomplete character, a possible stop string) comes with a
                // later token; a chunk is only worth sending with text or log-probabilities.
                if step.text.is_empty() && logprobs.is_none() {
                    return Vec::new();
                }
                vec![json_event(&ChatChunk::new(
                    &response,
                    vec![ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role: None,
                            content: Some(step.text),
                        },
                        logprobs,
                        finish_reason: None,
                    }],
                    usage_null,
                ))]
            }
            EngineEvent::Finished(summary) => {
                let mut out = vec![json_event(&ChatChunk::new(
                    &response,
                    vec![ChunkChoice {
                        index: 0,
                        delta: Delta::default(),
                        logprobs: None,
                        finish_reason: Some(finish_reason(&summary.reason)),
                    }],
                    usage_null,
                ))];
                if include_usage {
                    out.push(json_event(&ChatChunk::new(
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
        return Ok(sse_response(
            &app,
            event_stream(job, vec![first], translate),
        ));
    }

    let namer = TokenNamer {
        tokenizer: &tokenizer,
        as_ids: tokens_as_ids,
    };
    let mut content = String::new();
    let mut logprobs = ChatLogprobs::default();
    loop {
        let events = job.next_events().await;
        if events.is_empty() {
            return Err(OpenAiError::internal("the job's events ended early"));
        }
        for event in events {
            match event {
                EngineEvent::Token(step) => {
                    content.push_str(&step.text);
                    if let Some(lp) = &step.logprobs {
                        logprobs
                            .content
                            .push(chat_token_logprob(namer, step.token, lp));
                    }
                }
                EngineEvent::Finished(summary) => {
                    return Ok(Json(ChatCompletion {
                        id: &response.id,
                        object: "chat.completion",
                        created: response.created,
                        model: &response.model,
                        system_fingerprint: &response.system_fingerprint,
                        choices: [ChatChoice {
                            index: 0,
                            message: AssistantMessage {
                                role: "assistant",
                                content,
                                refusal: None,
                            },
                            logprobs: wants_logprobs.then_some(logprobs),
                            finish_reason: finish_reason(&summary.reason),
                        }],
                        usage: Usage::new(summary.tokens_in, summary.tokens_out),
                    })
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
