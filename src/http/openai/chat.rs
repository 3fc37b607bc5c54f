//! `POST /v1/chat/completions`: messages (and tools) rendered with the chat template,
//! tokenized, and run as one job; the answer as a `chat.completion` or a stream of
//! `chat.completion.chunk`s, with the model's thinking and tool calls taken out of its text.

use std::sync::{Arc, OnceLock};

use axum::response::Response;
use serde_json::{Map, Value};

use super::answer::{AnswerShape, Call, Endpoint, GenerationRequest, answer};
use super::error::OpenAiError;
use super::request::{ChatRequest, parse_chat};
use super::response::{
    AssistantMessage, ChatChoice, ChatLogprobs, ChunkChoice, Delta, FunctionCall, FunctionDelta,
    ToolCallDelta, ToolCallOut,
};
use super::run::off_the_runtime;
use super::tools::{self, template_tools};
use crate::engine::ModelMeta;
use crate::generation::ConstraintSpec;
use crate::http::AppState;
use crate::http::fields::Rules;
use crate::http::structured::Requested;
use crate::model::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use crate::model::reasoning::{
    ReasoningDelta, ReasoningStream, prompt_opens_thinking, split_reasoning, template_thinks,
};
use crate::model::tool_calls::{
    ReplyDelta, ToolCallStream, ToolFormat, call_id, generic_auto_grammar, parse_reply,
    tool_call_grammar,
};

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

/// What the chat template is given besides the messages.
struct TemplateInput {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    /// The template's own variables and the tools, with the request's `chat_template_kwargs`.
    vars: Map<String, Value>,
    /// The same without the request's `chat_template_kwargs`; `None` when it has none.
    plain_vars: Option<Map<String, Value>>,
}

impl TemplateInput {
    fn render(&self, template: &ChatTemplate) -> Result<String, OpenAiError> {
        template
            .render_with_context(&self.messages, self.add_generation_prompt, &self.vars)
            .map_err(|e| self.blame(template, e))
    }

    /// A failed render is the request's fault (a 400 naming what to change) when the template
    /// renders a plain one-message conversation; otherwise the template's (a 500).
    fn blame(&self, template: &ChatTemplate, e: ChatTemplateError) -> OpenAiError {
        let message = match e {
            ChatTemplateError::Raised(message) => {
                return OpenAiError::invalid(
                    "messages",
                    format!("the model's chat template rejected the conversation: {message}"),
                );
            }
            ChatTemplateError::Render { message, .. } => message,
            other => return OpenAiError::internal(other.to_string()),
        };
        let plain = self.plain_vars.as_ref().unwrap_or(&self.vars);
        let probe = [ChatMessage {
            role: "user".into(),
            content: "Hello".into(),
            ..ChatMessage::default()
        }];
        if template
            .render_with_context(&probe, self.add_generation_prompt, plain)
            .is_err()
        {
            return OpenAiError::internal(format!("chat template render error: {message}"));
        }
        let kwargs_to_blame = self.plain_vars.is_some()
            && template
                .render_with_context(&self.messages, self.add_generation_prompt, plain)
                .is_ok();
        if kwargs_to_blame {
            OpenAiError::invalid(
                "chat_template_kwargs",
                format!("the model's chat template cannot render with these values: {message}"),
            )
        } else {
            OpenAiError::invalid(
                "messages",
                format!("the model's chat template cannot render this conversation: {message}"),
            )
        }
    }
}

impl GenerationRequest for ChatRequest {
    fn parse(body: &Map<String, Value>, rules: &Rules<'_>) -> Result<Self, OpenAiError> {
        parse_chat(body, rules)
    }

    /// Renders the messages (and tools) with the chat template and tokenizes them.
    async fn respond(self, call: Call<'_>) -> Result<Response, OpenAiError> {
        let meta = &call.served.meta;
        let (template, mut vars) = chat_template(call.app, meta);
        let mut plain_vars = (!self.template_kwargs.is_empty()).then(|| vars.clone());
        vars.extend(self.template_kwargs);
        let mut messages = self.messages;
        if ToolFormat::detect(template.source()) == ToolFormat::Mistral {
            tools::mistral_call_ids(&mut messages);
        }
        let mut common = self.common;
        let tool_format = self
            .tools
            .as_ref()
            .map(|_| ToolFormat::detect(template.source()));
        if let (Some(tools), Some(format)) = (&self.tools, tool_format) {
            if format.renders_tools() {
                let value = template_tools(&tools.tools);
                if let Some(plain) = &mut plain_vars {
                    plain.insert("tools".into(), value.clone());
                }
                vars.insert("tools".into(), value);
            } else {
                tools::generic_conversation(&mut messages, &tools.tools, template.source());
            }
            // A forced call is constrained to the tools' schemas; in the generic format the
            // model's free choice is constrained too (a call list or a response, as llama.cpp
            // does), unless the request constrains its output itself.
            let grammar = match &tools.forced {
                Some(forced) => Some(tool_call_grammar(
                    format,
                    &tools.tools,
                    forced,
                    tools.parallel,
                )),
                None if format == ToolFormat::Generic && common.constraint.is_none() => {
                    Some(generic_auto_grammar(&tools.tools, tools.parallel))
                }
                None => None,
            };
            if let Some(grammar) = grammar {
                common.constraint = Some(Requested {
                    field: "tool_choice".into(),
                    spec: ConstraintSpec::Lark(grammar),
                });
            }
        }
        let thinks = !self.reasoning_inline && template_thinks(template.source());
        // A grammar starts at the first generated token: the reply cannot be inside thinking.
        let constrained = common.constraint.is_some();

        let input_bytes = messages.iter().map(|m| m.content.len()).sum();
        let tokenizer = meta.tokenizer.clone();
        let input = TemplateInput {
            messages,
            add_generation_prompt: self.add_generation_prompt,
            vars,
            plain_vars,
        };
        let (prompt_tokens, opens_thinking) = off_the_runtime(input_bytes, move || {
            let text = input.render(&template)?;
            // The template writes any BOS itself, as transformers' apply_chat_template expects.
            let tokens = tokenizer
                .encode_with_special(&text, true, false)
                .map_err(|e| {
                    OpenAiError::invalid("messages", format!("cannot be tokenized: {e}"))
                })?;
            Ok::<_, OpenAiError>((tokens, prompt_opens_thinking(&text)))
        })
        .await??;

        let thinking = thinks.then_some(opens_thinking && !constrained);
        let shape = |index| Chat::new(index, thinking, tool_format);
        answer(call, shape, common, prompt_tokens).await
    }
}

/// The chat answer: `chat.completion`, or `chat.completion.chunk`s that open with the
/// assistant's role. The generated text is split, as it streams, into thinking
/// (`reasoning_content`), tool calls and content.
struct Chat {
    /// The choice's index.
    index: usize,
    /// Whether thinking is separated, and whether the prompt left the reply inside it.
    thinking: Option<bool>,
    tools: Option<ToolFormat>,
    reasoning: Option<ReasoningStream>,
    calls: Option<ToolCallStream>,
    /// Ids of the streamed calls so far.
    call_ids: Vec<String>,
}

impl Chat {
    fn new(index: usize, thinking: Option<bool>, tools: Option<ToolFormat>) -> Self {
        Self {
            index,
            thinking,
            tools,
            reasoning: thinking.map(ReasoningStream::new),
            calls: tools.map(ToolCallStream::new),
            call_ids: Vec::new(),
        }
    }

    /// Streamed text as a delta: thinking, content and tool-call pieces.
    fn delta(&mut self, text: &str, finishing: bool) -> Delta {
        let mut delta = Delta::default();
        let mut content = String::new();
        let mut reasoning = String::new();
        let pieces = match &mut self.reasoning {
            Some(r) => {
                let mut d = r.push(text);
                if finishing {
                    d.extend(r.finish());
                }
                d
            }
            None => vec![ReasoningDelta::Content(text.to_string())],
        };
        let mut replies = Vec::new();
        for piece in pieces {
            match piece {
                ReasoningDelta::Reasoning(t) => reasoning.push_str(&t),
                ReasoningDelta::Content(t) => match &mut self.calls {
                    Some(calls) => replies.extend(calls.push(&t)),
                    None => content.push_str(&t),
                },
            }
        }
        if finishing && let Some(calls) = &mut self.calls {
            replies.extend(calls.finish());
        }
        for reply in replies {
            match reply {
                ReplyDelta::Content(t) => content.push_str(&t),
                ReplyDelta::CallStart { index, id, name } => {
                    let id = id.unwrap_or_else(|| self.new_call_id());
                    self.call_ids.push(id.clone());
                    delta.tool_calls.push(ToolCallDelta {
                        index,
                        id: Some(id),
                        kind: Some("function"),
                        function: FunctionDelta {
                            name: Some(name),
                            arguments: String::new(),
                        },
                    });
                }
                ReplyDelta::CallArguments { index, fragment } => {
                    delta.tool_calls.push(ToolCallDelta {
                        index,
                        id: None,
                        kind: None,
                        function: FunctionDelta {
                            name: None,
                            arguments: fragment,
                        },
                    });
                }
            }
        }
        if !content.is_empty() {
            delta.content = Some(content);
        }
        if !reasoning.is_empty() {
            delta.reasoning_content = Some(reasoning);
        }
        delta
    }

    /// A fresh id in the shape the model's format wants.
    fn new_call_id(&self) -> String {
        call_id(
            self.tools.unwrap_or(ToolFormat::Generic),
            crate::generation::rng::random_seed(),
        )
    }

    /// `tool_calls` once the reply called a tool, else the engine's reason.
    fn finish_reason(&self, called: bool, reason: &'static str) -> &'static str {
        if called { "tool_calls" } else { reason }
    }
}

impl AnswerShape for Chat {
    const ENDPOINT: Endpoint = Endpoint::CHAT;

    type Choice = ChatChoice;
    type ChunkChoice = ChunkChoice;
    type Logprobs = ChatLogprobs;

    fn first_chunk(&self) -> Option<ChunkChoice> {
        Some(ChunkChoice {
            index: self.index,
            delta: Delta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..Delta::default()
            },
            ..ChunkChoice::default()
        })
    }

    fn token_chunk(&mut self, text: String, logprobs: Option<ChatLogprobs>) -> Option<ChunkChoice> {
        let delta = self.delta(&text, false);
        if delta.is_empty() && logprobs.is_none() {
            return None;
        }
        Some(ChunkChoice {
            index: self.index,
            delta,
            logprobs,
            finish_reason: None,
        })
    }

    fn finish_chunks(&mut self, finish_reason: &'static str) -> Vec<ChunkChoice> {
        let rest = self.delta("", true);
        let mut out = Vec::new();
        if !rest.is_empty() {
            out.push(ChunkChoice {
                index: self.index,
                delta: rest,
                ..ChunkChoice::default()
            });
        }
        out.push(ChunkChoice {
            index: self.index,
            finish_reason: Some(self.finish_reason(!self.call_ids.is_empty(), finish_reason)),
            ..ChunkChoice::default()
        });
        out
    }

    fn choice(
        &mut self,
        text: String,
        logprobs: Option<ChatLogprobs>,
        finish_reason: &'static str,
    ) -> ChatChoice {
        let (reasoning, text) = match self.thinking {
            Some(starts_inside) => {
                let split = split_reasoning(&text, starts_inside);
                (
                    Some(split.reasoning).filter(|r| !r.is_empty()),
                    split.content,
                )
            }
            None => (None, text),
        };
        let (content, tool_calls) = match self.tools {
            Some(format) => {
                let reply = parse_reply(format, &text);
                let calls: Vec<ToolCallOut> = reply
                    .tool_calls
                    .into_iter()
                    .map(|c| ToolCallOut {
                        id: c.id.unwrap_or_else(|| self.new_call_id()),
                        kind: "function",
                        function: FunctionCall {
                            name: c.name,
                            arguments: c.arguments,
                        },
                    })
                    .collect();
                let content = if calls.is_empty() || !reply.content.trim().is_empty() {
                    Some(reply.content)
                } else {
                    None
                };
                (content, calls)
            }
            None => (Some(text), Vec::new()),
        };
        ChatChoice {
            index: self.index,
            finish_reason: self.finish_reason(!tool_calls.is_empty(), finish_reason),
            message: AssistantMessage {
                role: "assistant",
                content,
                reasoning_content: reasoning,
                tool_calls,
                refusal: None,
            },
            logprobs,
        }
    }
}
