//! `POST /v1/chat/completions`: messages rendered with the chat template, tokenized, and run
//! as one job; the answer as a `chat.completion` or a stream of `chat.completion.chunk`s.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::response::Response;
use serde_json::{Map, Value};

use super::OpenAiJson;
use super::answer::{AnswerShape, answer};
use super::error::OpenAiError;
use super::request::parse_chat;
use super::response::{
    AssistantMessage, ChatChoice, ChatLogprobs, ChunkChoice, Delta, TokenNamer, chat_token_logprob,
};
use super::run::{off_the_runtime, ready};
use crate::engine::ModelMeta;
use crate::generation::TokenLogprobs;
use crate::http::AppState;
use crate::http::auth::Caller;
use crate::http::fields::Rules;
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
    caller: Caller,
    OpenAiJson(body): OpenAiJson,
) -> Result<Response, OpenAiError> {
    let served = ready(&app)?;
    let meta = &served.meta;
    let request = parse_chat(&body, &Rules::of(served))?;
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

    answer(&app, &caller, served, Chat, request.common, prompt_tokens).await
}

/// The chat answer: `chat.completion`, or `chat.completion.chunk`s that open with the
/// assistant's role.
struct Chat;

impl AnswerShape for Chat {
    const API: JobApi = JobApi::OpenAiChat;
    const ID_PREFIX: &'static str = "chatcmpl";
    const PROMPT_PARAM: &'static str = "messages";
    const OBJECT: &'static str = "chat.completion";
    const CHUNK_OBJECT: &'static str = "chat.completion.chunk";

    type Choice = ChatChoice;
    type ChunkChoice = ChunkChoice;
    type Logprobs = ChatLogprobs;

    fn push_logprobs(
        &mut self,
        logprobs: &mut ChatLogprobs,
        namer: TokenNamer<'_>,
        token: u32,
        lp: &TokenLogprobs,
    ) {
        logprobs.content.push(chat_token_logprob(namer, token, lp));
    }

    fn first_chunk() -> Option<ChunkChoice> {
        Some(ChunkChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            },
            logprobs: None,
            finish_reason: None,
        })
    }

    fn token_chunk(text: String, logprobs: Option<ChatLogprobs>) -> ChunkChoice {
        ChunkChoice {
            index: 0,
            delta: Delta {
                role: None,
                content: Some(text),
            },
            logprobs,
            finish_reason: None,
        }
    }

    fn finish_chunk(finish_reason: &'static str) -> ChunkChoice {
        ChunkChoice {
            index: 0,
            delta: Delta::default(),
            logprobs: None,
            finish_reason: Some(finish_reason),
        }
    }

    fn choice(
        content: String,
        logprobs: Option<ChatLogprobs>,
        finish_reason: &'static str,
    ) -> ChatChoice {
        ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant",
                content,
                refusal: None,
            },
            logprobs,
            finish_reason,
        }
    }
}
