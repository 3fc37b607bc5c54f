//! The OpenAI request bodies, read field by field into validated [`ChatRequest`] and
//! [`CompletionRequest`] values whose [`GenerationParams`] the engine runs as they are.
//!
//! Every field is checked on its own, so one 400 names every broken rule (the first one is the
//! error's `param`). Fields this worker does not know are accepted and ignored, as llama-server
//! and vLLM do; features it knows but does not implement are refused with a 400 that names them
//! rather than silently ignored.
//!
//! | field | rule | default |
//! |---|---|---|
//! | `model` | the served name (404 otherwise) | the served model |
//! | `messages` (chat) | non-empty; roles system, developer (→ system), user, assistant, tool; `content` a string or text parts | required |
//! | `prompt` (completions) | a string, an array of one string, or an array of token ids | required |
//! | `max_completion_tokens`, `max_tokens` | ≥ 1 (the first wins) | until EOS or the context is full |
//! | `temperature` | 0–2 (0 = greedy) | 1 |
//! | `top_p` | 0–1 | 1 |
//! | `top_k` (ext.) | ≥ -1 (-1 and 0 = off) | off |
//! | `min_p` (ext.) | 0–1 | 0 |
//! | `repetition_penalty` (ext.) | (0, 2] | 1 |
//! | `repeat_last_n` (ext.) | ≥ -1 (-1 = whole context) | 64 |
//! | `presence_penalty`, `frequency_penalty` | −2–2 | 0 |
//! | `seed` | integer; -1 = random | random |
//! | `stop` | string or ≤ 16 strings of ≤ 256 bytes; empty ones ignored | none |
//! | `logit_bias` | `{"token id": -100..100}` | none |
//! | `logprobs` + `top_logprobs` (chat) | bool; 0–20, needs `logprobs: true` | off |
//! | `logprobs` (completions) | 0–20 | off |
//! | `n` | 1–16: choices, each its own seeded stream ([`choice_seed`](super::answer::choice_seed)); the prompt is read once | 1 |
//! | `best_of` | 1 | 1 |
//! | `stream`, `stream_options.include_usage` | bool (`stream_options` only with `stream: true`, else 400) | false |
//! | `ignore_eos` (ext.) | bool | false |
//! | `return_tokens_as_token_ids` (vLLM) | bool: logprob tokens as `token_id:N` | false |
//! | `add_generation_prompt`, `chat_template_kwargs` (vLLM, chat) | bool; object of template variables | true; none |
//! | `response_format`, `structured_outputs`, `guided_*`, `json_schema`, `grammar` | one output constraint ([`structured`](crate::http::structured)) | none |
//! | `user`, `store`, `metadata`, ... | accepted, ignored | |
//!
//! | `tools`, `tool_choice`, `parallel_tool_calls` (chat) | see [`tools`](super::tools) | none |
//! | `cache_prompt` (llama-server), `cache_salt` (vLLM) | bool; non-empty string: prefix-cache reuse, shared only under one salt and API key | true; none |
//! | `reasoning_format` (llama-server, chat) | `auto`/`deepseek`: thinking in `reasoning_content`; `none`: inline | `auto` |
//!
//! Refused with a 400 naming them: `functions`, `function_call`, `modalities` other than
//! text, `audio`, `prediction`, `web_search_options`, `best_of` > 1, `echo`, `suffix`,
//! non-text content parts.
//!
//! Sampling defaults are OpenAI's (temperature 1, top-p 1, no top-k or min-p), not the job
//! API's llama-server defaults: OpenAI clients expect OpenAI's distribution.

use serde_json::{Map, Value};

use super::error::OpenAiError;
use super::tools::ToolRequest;
use crate::generation::{ContextFitError, GenerationParams, SamplingParams, fit_max_tokens};
use crate::http::fields::{Dialect, Fields, Rules};
use crate::http::structured::Requested;
use crate::model::chat_template::ChatMessage;

const MAX_LOGIT_BIAS: f64 = 100.0;
/// The most choices one request may ask for (`n`).
const MAX_CHOICES: i64 = 16;

/// What chat and completions requests share once validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Common {
    /// `max_tokens` is a placeholder until [`resolve_max_tokens`] knows the prompt's length.
    pub params: GenerationParams,
    pub max_tokens: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's `return_tokens_as_token_ids`: logprob tokens read `token_id:N`.
    pub tokens_as_ids: bool,
    /// The output constraint asked for, still to be compiled.
    pub constraint: Option<Requested>,
    /// Choices to generate (`n`).
    pub n: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub common: Common,
    pub messages: Vec<ChatMessage>,
    pub add_generation_prompt: bool,
    /// Extra template variables (`chat_template_kwargs`).
    pub template_kwargs: Map<String, Value>,
    /// The tools the model may call, and whether it must.
    pub tools: Option<ToolRequest>,
    /// `reasoning_format: "none"`: thinking stays in `content` instead of `reasoning_content`.
    pub reasoning_inline: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub common: Common,
    pub prompt: Prompt,
}

/// Reads a `/v1/chat/completions` body.
pub fn parse_chat(
    body: &Map<String, Value>,
    rules: &Rules<'_>,
) -> Result<ChatRequest, OpenAiError> {
    read_body(body, rules, |f| {
        let messages = f.messages();
        refuse_chat_features(f);
        let logprobs = match (f.boolean("logprobs"), f.get("top_logprobs")) {
            (Some(true), None) => Some(0),
            (Some(true), Some(_)) => f.alternatives("top_logprobs"),
            (_, Some(_)) => {
                if f.alternatives("top_logprobs").is_some_and(|n| n > 0) {
                    f.fail("top_logprobs", "requires `logprobs: true`");
                }
                None
            }
            (_, None) => None,
        };
        let common = f.common(rules, logprobs);
        let tools = f.tools();
        if let (Some(t), Some(c)) = (&tools, &common.constraint)
            && t.forced.is_some()
        {
            f.fail(
                "tool_choice",
                format!("a forced tool call cannot be combined with {}", c.field),
            );
        }
        let reasoning_inline = match f.string("reasoning_format") {
            None | Some("auto" | "deepseek" | "deepseek-legacy") => false,
            Some("none") => true,
            Some(other) => {
                f.fail(
                    "reasoning_format",
                    format!("unknown format `{other}` (auto, deepseek, none)"),
                );
                false
            }
        };
        let add_generation_prompt = f.boolean("add_generation_prompt").unwrap_or(true);
        let template_kwargs = match f.get("chat_template_kwargs") {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                f.fail("chat_template_kwargs", "must be an object");
                Map::new()
            }
        };
        ChatRequest {
            common,
            messages,
            add_generation_prompt,
            template_kwargs,
            tools,
            reasoning_inline,
        }
    })
}

/// Reads a `/v1/completions` body.
pub fn parse_completion(
    body: &Map<String, Value>,
    rules: &Rules<'_>,
) -> Result<CompletionRequest, OpenAiError> {
    read_body(body, rules, |f| {
        let prompt = f.prompt(rules.vocab_size);
        if f.boolean("echo") == Some(true) {
            f.unsupported("echo", "echoing the prompt is not supported");
        }
        match f.get("suffix") {
            None => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => f.unsupported("suffix", "insertion (suffix) is not supported"),
        }
        match f.int("best_of") {
            None | Some(1) => {}
            Some(_) => f.unsupported("best_of", "only best_of = 1 is supported"),
        }
        let logprobs = match f.get("logprobs") {
            None => None,
            Some(_) => f.alternatives("logprobs"),
        };
        let common = f.common(rules, logprobs);
        CompletionRequest { common, prompt }
    })
}

/// 404 unless `model` is absent or names the served model. Absent is accepted (curl users,
/// llama-server habits); the OpenAI SDKs always send it.
fn check_model(body: &Map<String, Value>, model_id: &str) -> Result<(), OpenAiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == model_id => Ok(()),
        Some(Value::String(m)) => Err(OpenAiError::model_not_found(m, model_id)),
        Some(_) => Err(OpenAiError::invalid("model", "must be a string")),
    }
}

/// The output budget by the one context rule ([`fit_max_tokens`]), refusals in OpenAI's
/// words (clients parse "maximum context length is N tokens").
pub fn resolve_max_tokens(
    requested: Option<usize>,
    prompt_tokens: usize,
    context_length: usize,
    prompt_param: &str,
) -> Result<usize, OpenAiError> {
    fit_max_tokens(prompt_tokens, requested, context_length).map_err(|e| match e {
        ContextFitError::EmptyPrompt => OpenAiError::invalid(prompt_param, e.to_string()),
        ContextFitError::TooLong { max_tokens, .. } => OpenAiError::context_length_exceeded(
            prompt_param,
            format!(
                "This model's maximum context length is {context_length} tokens. However, you \
                 requested {} tokens ({prompt_tokens} in the {prompt_param}, {max_tokens} for \
                 the completion). Please reduce the length of the {prompt_param} or max_tokens.",
                prompt_tokens as u128 + max_tokens as u128
            ),
        ),
        ContextFitError::NoRoom { .. } => OpenAiError::context_length_exceeded(
            prompt_param,
            format!(
                "This model's maximum context length is {context_length} tokens. However, the \
                 {prompt_param} is {prompt_tokens} tokens, leaving no room for the completion."
            ),
        ),
    })
}

fn refuse_chat_features(f: &mut Fields<'_>) {
    for name in ["functions", "function_call"] {
        if f.get(name).is_some() {
            f.unsupported(
                name,
                "the deprecated function-calling fields are not supported (use tools)",
            );
        }
    }
    match f.get("modalities") {
        None => {}
        Some(Value::Array(a)) if a.iter().all(|m| m == "text") => {}
        Some(_) => f.unsupported("modalities", "only text output is supported"),
    }
    for name in ["audio", "prediction", "web_search_options"] {
        if f.get(name).is_some() {
            f.unsupported(name, "is not supported");
        }
    }
}

/// Reads a body with `read` once its `model` passed [`check_model`]; a 400 naming every broken
/// rule `read` found, if any.
fn read_body<T>(
    body: &Map<String, Value>,
    rules: &Rules<'_>,
    read: impl FnOnce(&mut Fields<'_>) -> T,
) -> Result<T, OpenAiError> {
    check_model(body, rules.model_id)?;
    let mut f = Fields::new(body, Dialect::OpenAi);
    let request = read(&mut f);
    if f.has_errors() {
        return Err(OpenAiError::from_problems(&f.into_errors()));
    }
    Ok(request)
}

/// The OpenAI readers for what only this API has.
impl Fields<'_> {
    /// The fields both endpoints share: sampling, limits, stop strings, streaming.
    fn common(&mut self, rules: &Rules<'_>, logprobs: Option<usize>) -> Common {
        let n = match self.int("n") {
            None => 1,
            Some(n) if (1..=MAX_CHOICES).contains(&n) => n as usize,
            Some(_) => {
                self.fail("n", format!("must be between 1 and {MAX_CHOICES}"));
                1
            }
        };
        let max_tokens = match self.get("max_completion_tokens") {
            Some(_) => {
                let n = self.count("max_completion_tokens");
                if self.get("max_tokens").is_some() {
                    self.count("max_tokens");
                }
                n
            }
            None => self.count("max_tokens"),
        };
        let sampling = self.openai_sampling(rules);
        let stop = self.stop_strings();
        let ignore_eos = self.boolean("ignore_eos").unwrap_or(false);
        let stream = self.boolean("stream").unwrap_or(false);
        let include_usage = match self.get("stream_options") {
            None => false,
            // As OpenAI and vLLM answer: options for a stream that is not asked for are a
            // client mistake worth reporting, not something to ignore.
            Some(_) if !stream => {
                self.fail("stream_options", "is only allowed when stream is true");
                false
            }
            Some(Value::Object(o)) => match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    self.fail("stream_options.include_usage", "must be a boolean");
                    false
                }
            },
            Some(_) => {
                self.fail("stream_options", "must be an object");
                false
            }
        };
        let tokens_as_ids = self.boolean("return_tokens_as_token_ids").unwrap_or(false);
        let (params, constraint) = self.generation_params(
            sampling,
            max_tokens.unwrap_or(1),
            stop,
            ignore_eos,
            logprobs,
        );
        if let Some(user) = self.get("user")
            && !user.is_string()
        {
            self.fail("user", "must be a string");
        }
        Common {
            params,
            max_tokens,
            stream,
            include_usage: stream && include_usage,
            tokens_as_ids,
            constraint,
            n,
        }
    }

    fn openai_sampling(&mut self, rules: &Rules<'_>) -> SamplingParams {
        // OpenAI's defaults: nothing but temperature 1.
        let mut s = SamplingParams {
            temperature: 1.0,
            ..SamplingParams::greedy()
        };
        self.sampling(&mut s, rules.context_length);
        s.seed = self.seed();
        s.logit_bias = self.logit_bias(rules.vocab_size);
        s
    }

    fn logit_bias(&mut self, vocab_size: usize) -> Vec<(u32, f32)> {
        let Some(v) = self.get("logit_bias") else {
            return Vec::new();
        };
        let Value::Object(map) = v else {
            self.fail("logit_bias", "must be an object of token id → bias");
            return Vec::new();
        };
        let mut out = Vec::with_capacity(map.len());
        for (key, bias) in map {
            let param = format!("logit_bias.{key}");
            let id = match key.trim().parse::<u32>() {
                Ok(id) if (id as usize) < vocab_size => id,
                Ok(_) => {
                    self.fail(
                        &param,
                        format!("token id is outside the vocabulary ({vocab_size})"),
                    );
                    continue;
                }
                Err(_) => {
                    self.fail(&param, "keys must be token ids");
                    continue;
                }
            };
            match bias.as_f64() {
                Some(b) if (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&b) => {
                    out.push((id, b as f32));
                }
                _ => self.fail(&param, "must be a number between -100 and 100"),
            }
        }
        out
    }

    fn messages(&mut self) -> Vec<ChatMessage> {
        let list = match self.get("messages") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(Value::Array(_)) => {
                self.fail("messages", "must not be empty");
                return Vec::new();
            }
            Some(_) => {
                self.fail("messages", "must be an array of messages");
                return Vec::new();
            }
            None => {
                self.fail("messages", "required");
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            if let Some(m) = self.message(i, item) {
                out.push(m);
            }
        }
        out
    }

    fn message(&mut self, i: usize, item: &Value) -> Option<ChatMessage> {
        let at = |field: &str| format!("messages[{i}].{field}");
        let Value::Object(m) = item else {
            self.fail(&format!("messages[{i}]"), "must be an object");
            return None;
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => match r.as_str() {
                "system" | "user" | "assistant" | "tool" => r.clone(),
                // OpenAI's newer name for the system role; templates only know `system`.
                "developer" => "system".to_string(),
                other => {
                    self.fail(
                        &at("role"),
                        format!(
                            "unknown role `{other}` (system, developer, user, assistant, tool)"
                        ),
                    );
                    return None;
                }
            },
            Some(_) => {
                self.fail(&at("role"), "must be a string");
                return None;
            }
            None => {
                self.fail(&at("role"), "required");
                return None;
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                self.fail(&at("content"), "required");
                return None;
            }
            Some(Value::Array(parts)) => self.content_parts(i, parts)?,
            Some(_) => {
                self.fail(&at("content"), "must be a string or an array of text parts");
                return None;
            }
        };
        let text_field = |this: &mut Self, name: &str| -> Option<String> {
            match m.get(name) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => {
                    this.fail(&at(name), "must be a string");
                    None
                }
            }
        };
        let name = text_field(self, "name");
        let tool_call_id = text_field(self, "tool_call_id");
        let tool_calls = match m.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Array(calls)) => {
                for (j, call) in calls.iter().enumerate() {
                    if let Err((field, rule)) = check_tool_call(call) {
                        self.fail(&format!("{}[{j}]{field}", at("tool_calls")), rule);
                    }
                }
                Some(Value::Array(
                    calls.iter().map(decode_tool_call_arguments).collect(),
                ))
            }
            Some(_) => {
                self.fail(&at("tool_calls"), "must be an array");
                None
            }
        };
        Some(ChatMessage {
            role,
            content,
            name,
            tool_calls,
            tool_call_id,
        })
    }

    /// Text parts joined with newlines, as llama-server and vLLM join them.
    fn content_parts(&mut self, i: usize, parts: &[Value]) -> Option<String> {
        let mut texts = Vec::with_capacity(parts.len());
        let mut ok = true;
        for (j, part) in parts.iter().enumerate() {
            let at = format!("messages[{i}].content[{j}]");
            match part {
                Value::String(s) => texts.push(s.as_str()),
                Value::Object(p) => match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some("text"), _) => {
                        self.fail(&format!("{at}.text"), "must be a string");
                        ok = false;
                    }
                    (Some(other), _) => {
                        self.unsupported(
                            &format!("{at}.type"),
                            format!("`{other}` content is not supported (text only)"),
                        );
                        ok = false;
                    }
                    (None, _) => {
                        self.fail(&format!("{at}.type"), "required");
                        ok = false;
                    }
                },
                _ => {
                    self.fail(&at, "must be a text part object");
                    ok = false;
                }
            }
        }
        ok.then(|| texts.join("\n"))
    }

    fn prompt(&mut self, vocab_size: usize) -> Prompt {
        let empty = Prompt::Text(String::new());
        match self.get("prompt") {
            Some(Value::String(s)) => Prompt::Text(s.clone()),
            Some(Value::Array(items)) => match items.as_slice() {
                [Value::String(s)] => Prompt::Text(s.clone()),
                [Value::Array(ids)] => self.token_prompt(ids, vocab_size),
                [] => {
                    self.fail("prompt", "must not be empty");
                    empty
                }
                [Value::Number(_), ..] => self.token_prompt(items, vocab_size),
                _ if items.len() > 1 => {
                    self.unsupported("prompt", "only one prompt per request is supported");
                    empty
                }
                _ => {
                    self.fail("prompt", "must be a string or an array of token ids");
                    empty
                }
            },
            Some(_) => {
                self.fail("prompt", "must be a string or an array of token ids");
                empty
            }
            None => {
                self.fail("prompt", "required");
                empty
            }
        }
    }

    fn token_prompt(&mut self, ids: &[Value], vocab_size: usize) -> Prompt {
        let mut out = Vec::with_capacity(ids.len());
        for (i, v) in ids.iter().enumerate() {
            match v.as_u64() {
                Some(id) if (id as usize) < vocab_size => out.push(id as u32),
                _ => {
                    self.fail(
                        &format!("prompt[{i}]"),
                        format!("must be a token id below {vocab_size}"),
                    );
                    return Prompt::Tokens(Vec::new());
                }
            }
        }
        Prompt::Tokens(out)
    }
}

/// A tool call in the history, as OpenAI defines it: `{"id"?: string, "type"?: "function",
/// "function": {"name": string, "arguments": string or object}}`. Templates index into it, so
/// anything else would fail there. `Err((path under the call, rule))`.
fn check_tool_call(call: &Value) -> Result<(), (&'static str, &'static str)> {
    let Some(call) = call.as_object() else {
        return Err(("", "must be an object"));
    };
    if call.get("id").is_some_and(|id| !id.is_string()) {
        return Err((".id", "must be a string"));
    }
    if call
        .get("type")
        .is_some_and(|t| t.as_str() != Some("function"))
    {
        return Err((".type", "must be \"function\""));
    }
    let Some(function) = call.get("function").and_then(Value::as_object) else {
        return Err((
            ".function",
            "required: an object with `name` and `arguments`",
        ));
    };
    if !function.get("name").is_some_and(Value::is_string) {
        return Err((".function.name", "required: a string"));
    }
    match function.get("arguments") {
        Some(Value::String(_) | Value::Object(_)) => Ok(()),
        _ => Err((
            ".function.arguments",
            "required: a JSON object or a string holding one",
        )),
    }
}

/// OpenAI sends tool-call `arguments` as a JSON-encoded string; templates pass them through
/// `tojson`, so they get the decoded object (a string that is not JSON stays a string).
fn decode_tool_call_arguments(call: &Value) -> Value {
    let mut call = call.clone();
    if let Some(args) = call
        .get_mut("function")
        .and_then(|f| f.get_mut("arguments"))
        && let Value::String(text) = args
        && let Ok(decoded) = serde_json::from_str::<Value>(text)
    {
        *args = decoded;
    }
    call
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const RULES: Rules<'static> = Rules {
        model_id: "tiny",
        vocab_size: 100,
        context_length: 64,
    };

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("test bodies are objects"),
        }
    }

    fn chat(v: Value) -> Result<ChatRequest, OpenAiError> {
        parse_chat(&obj(v), &RULES)
    }

    fn completion(v: Value) -> Result<CompletionRequest, OpenAiError> {
        parse_completion(&obj(v), &RULES)
    }

    fn user(text: &str) -> Value {
        json!([{"role": "user", "content": text}])
    }

    #[test]
    fn openai_defaults() {
        let r = chat(json!({"model": "tiny", "messages": user("hi")})).unwrap();
        let s = &r.common.params.sampling;
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.min_p),
            (1.0, 1.0, 0, 0.0)
        );
        assert_eq!(s.repetition_penalty, 1.0);
        assert_eq!((s.presence_penalty, s.frequency_penalty), (0.0, 0.0));
        assert!(s.logit_bias.is_empty());
        assert_eq!(r.common.max_tokens, None);
        assert!(!r.common.stream && !r.common.include_usage && !r.common.tokens_as_ids);
        assert_eq!(r.common.params.logprobs, None);
        assert!(!r.common.params.ignore_eos);
        assert!(r.add_generation_prompt);
        assert_eq!(r.messages, vec![ChatMessage::new("user", "hi")]);
        let other = chat(json!({"messages": user("hi")})).unwrap();
        assert_ne!(s.seed, other.common.params.sampling.seed, "random seeds");
    }

    #[test]
    fn every_field_maps() {
        let r = chat(json!({
            "model": "tiny", "messages": user("hi"), "max_tokens": 9, "temperature": 0,
            "top_p": 0.5, "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.1,
            "repeat_last_n": -1, "presence_penalty": -1, "frequency_penalty": 2, "seed": 7,
            "stop": ["a", "", "b"], "logit_bias": {"5": -100, "7": 2.5}, "logprobs": true,
            "top_logprobs": 3, "n": 1, "stream": true, "stream_options": {"include_usage": true},
            "ignore_eos": true, "user": "u", "return_tokens_as_token_ids": true,
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "add_generation_prompt": false, "chat_template_kwargs": {"enable_thinking": false},
            "some_future_field": {"x": 1}
        }))
        .unwrap();
        let c = &r.common;
        let s = &c.params.sampling;
        assert_eq!(c.max_tokens, Some(9));
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.min_p),
            (0.0, 0.5, 3, 0.1)
        );
        assert_eq!(s.repetition_penalty, 1.1);
        assert_eq!(s.repeat_last_n, 64, "-1 is the whole context");
        assert_eq!((s.presence_penalty, s.frequency_penalty), (-1.0, 2.0));
        assert_eq!(s.seed, 7);
        assert_eq!(s.logit_bias, vec![(5, -100.0), (7, 2.5)]);
        assert_eq!(c.params.stop, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(c.params.logprobs, Some(3));
        assert!(c.stream && c.include_usage && c.params.ignore_eos && c.tokens_as_ids);
        assert!(!r.add_generation_prompt);
        assert_eq!(r.template_kwargs["enable_thinking"], false);
    }

    #[test]
    fn max_completion_tokens_wins_and_both_are_checked() {
        let r = chat(json!({"messages": user("x"), "max_completion_tokens": 4, "max_tokens": 9}))
            .unwrap();
        assert_eq!(r.common.max_tokens, Some(4));
        let e = chat(json!({"messages": user("x"), "max_completion_tokens": 4, "max_tokens": 0}))
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
    }

    #[test]
    fn unsupported_features_are_named() {
        let cases = [
            (json!({"functions": []}), "functions"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
            (json!({"audio": {"voice": "x"}}), "audio"),
        ];
        for (extra, param) in cases {
            let mut body = obj(json!({"messages": user("hi")}));
            body.extend(obj(extra.clone()));
            let e = parse_chat(&body, &RULES).unwrap_err();
            assert_eq!(e.status, 400, "{extra}");
            assert_eq!(e.param.as_deref(), Some(param), "{extra}");
            assert_eq!(e.code, Some("unsupported_parameter"), "{extra}");
            assert!(e.message.starts_with(param), "{}", e.message);
        }
        for (extra, param) in [
            (json!({"echo": true}), "echo"),
            (json!({"suffix": "x"}), "suffix"),
            (json!({"best_of": 2}), "best_of"),
            (json!({"prompt": ["a", "b"]}), "prompt"),
        ] {
            let mut body = obj(json!({"prompt": "hi"}));
            body.extend(obj(extra.clone()));
            let e = parse_completion(&body, &RULES).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}");
            assert_eq!(e.code, Some("unsupported_parameter"), "{extra}");
        }
        let ok = completion(json!({"prompt": "hi", "echo": false, "suffix": "", "best_of": 1}));
        assert!(ok.is_ok());
    }

    #[test]
    fn n_is_one_to_sixteen() {
        assert_eq!(chat(json!({"messages": user("x")})).unwrap().common.n, 1);
        assert_eq!(
            chat(json!({"messages": user("x"), "n": 16}))
                .unwrap()
                .common
                .n,
            16
        );
        for bad in [json!(0), json!(17), json!("2")] {
            let e = completion(json!({"prompt": "x", "n": bad})).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("n"), "{bad}");
            assert_eq!(e.code, Some("invalid_value"));
        }
    }

    #[test]
    fn logprob_rules() {
        let e = chat(json!({"messages": user("x"), "top_logprobs": 2})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        assert!(e.message.contains("logprobs: true"));
        let e =
            chat(json!({"messages": user("x"), "logprobs": true, "top_logprobs": 21})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let r = chat(json!({"messages": user("x"), "logprobs": false, "top_logprobs": 0})).unwrap();
        assert_eq!(r.common.params.logprobs, None);
        let r = chat(json!({"messages": user("x"), "logprobs": true})).unwrap();
        assert_eq!(r.common.params.logprobs, Some(0));
        let r = completion(json!({"prompt": "x", "logprobs": 5})).unwrap();
        assert_eq!(r.common.params.logprobs, Some(5));
        let r = completion(json!({"prompt": "x", "logprobs": 0})).unwrap();
        assert_eq!(r.common.params.logprobs, Some(0));
        let e = completion(json!({"prompt": "x", "logprobs": true})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logprobs"));
    }

    #[test]
    fn every_broken_rule_is_listed() {
        let e = chat(json!({
            "messages": [], "temperature": 3, "top_p": 1.5, "max_tokens": 0, "stop": 5,
            "logit_bias": {"100": 1, "x": 1, "3": 500}, "seed": "s", "top_k": -2,
            "stream": "yes"
        }))
        .unwrap_err();
        let params: Vec<&str> = e
            .message
            .split("; ")
            .map(|p| p.split(':').next().unwrap())
            .collect();
        assert_eq!(
            params,
            vec![
                "messages",
                "max_tokens",
                "temperature",
                "top_p",
                "top_k",
                "seed",
                "logit_bias.100",
                "logit_bias.x",
                "logit_bias.3",
                "stop",
                "stream"
            ]
        );
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn the_model_must_be_the_served_one() {
        let e = chat(json!({"model": "gpt-4o", "messages": user("x")})).unwrap_err();
        assert_eq!(e.status, 404);
        assert_eq!(e.code, Some("model_not_found"));
        assert!(e.message.contains("gpt-4o") && e.message.contains("tiny"));
        assert_eq!(
            completion(json!({"model": 5, "prompt": "x"}))
                .unwrap_err()
                .status,
            400
        );
        assert!(completion(json!({"model": null, "prompt": "x"})).is_ok());
    }

    #[test]
    fn messages_roles_and_content_parts() {
        let r = chat(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1", "name": "f"}
        ]}))
        .unwrap();
        assert_eq!(r.messages[0], ChatMessage::new("system", "be brief"));
        assert_eq!(r.messages[1].content, "a\nb");
        assert_eq!(r.messages[2].content, "");
        let calls = r.messages[2].tool_calls.as_ref().unwrap();
        assert_eq!(calls[0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(r.messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(r.messages[3].name.as_deref(), Some("f"));

        let e = chat(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]}))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0].type"));
        assert_eq!(e.code, Some("unsupported_parameter"));
        let e = chat(json!({"messages": [{"role": "wizard", "content": "x"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = chat(json!({"messages": [{"role": "user"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = chat(json!({"messages": "hi"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn prompts() {
        assert_eq!(
            completion(json!({"prompt": "x"})).unwrap().prompt,
            Prompt::Text("x".into())
        );
        assert_eq!(
            completion(json!({"prompt": ["x"]})).unwrap().prompt,
            Prompt::Text("x".into())
        );
        assert_eq!(
            completion(json!({"prompt": [1, 2, 3]})).unwrap().prompt,
            Prompt::Tokens(vec![1, 2, 3])
        );
        assert_eq!(
            completion(json!({"prompt": [[4, 5]]})).unwrap().prompt,
            Prompt::Tokens(vec![4, 5])
        );
        let e = completion(json!({"prompt": [1, 100]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt[1]"));
        assert_eq!(
            completion(json!({})).unwrap_err().param.as_deref(),
            Some("prompt")
        );
        assert_eq!(
            completion(json!({"prompt": []}))
                .unwrap_err()
                .param
                .as_deref(),
            Some("prompt")
        );
    }

    #[test]
    fn seeds() {
        let seed = |v: Value| {
            completion(json!({"prompt": "x", "seed": v})).map(|r| r.common.params.sampling.seed)
        };
        assert_eq!(seed(json!(0)).unwrap(), 0);
        assert_eq!(seed(json!(u64::MAX)).unwrap(), u64::MAX);
        assert_eq!(seed(json!(-2)).unwrap(), (-2i64) as u64);
        assert_ne!(seed(json!(-1)).unwrap(), seed(json!(-1)).unwrap());
        assert!(seed(json!(1.5)).is_err());
    }

    #[test]
    fn stream_options_need_a_stream() {
        let e = completion(json!({"prompt": "x", "stream_options": {"include_usage": true}}))
            .unwrap_err();
        assert!(format!("{e:?}").contains("stream_options"), "{e:?}");
        let e =
            completion(json!({"prompt": "x", "stream": false, "stream_options": {}})).unwrap_err();
        assert!(format!("{e:?}").contains("stream_options"), "{e:?}");
        let r = completion(json!({"prompt": "x", "stream_options": null})).unwrap();
        assert!(!r.common.include_usage);
        let r = completion(json!({"prompt": "x", "stream": true, "stream_options": {}})).unwrap();
        assert!(r.common.stream && !r.common.include_usage);
    }

    #[test]
    fn max_tokens_against_the_context() {
        assert_eq!(resolve_max_tokens(Some(10), 54, 64, "prompt"), Ok(10));
        let e = resolve_max_tokens(Some(11), 54, 64, "prompt").unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(e.message.contains("64 tokens") && e.message.contains("65 tokens"));
        assert_eq!(resolve_max_tokens(None, 54, 64, "messages"), Ok(10));
        assert!(resolve_max_tokens(None, 64, 64, "messages").is_err());
        assert!(resolve_max_tokens(None, 0, 64, "prompt").is_err());
    }
}
