//! Response bodies and stream chunks, shaped as OpenAI's (`chat.completion`,
//! `chat.completion.chunk`, `text_completion`, `list`/`model`), and the log-probability
//! formats of both endpoints built from the engine's [`TokenLogprobs`].

use serde::Serialize;
use serde_json::Map;

use crate::generation::{FinishReason, TokenLogprobs};
use crate::model::tokenizer::TextTokenizer;

/// OpenAI's stand-in for a log-probability of minus infinity (JSON has no infinities).
const NEG_INF_LOGPROB: f32 = -9999.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens read from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// `stop` (end of generation or a stop sequence) or `length` (`max_tokens` or the context).
pub fn finish_reason(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::Eos | FinishReason::StopSequence(_) => "stop",
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
    }
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
}

/// A choice of a [`Completion`]; its type decides the completion's `object`.
pub trait CompletionChoice: Serialize {
    const OBJECT: &'static str;
}

impl CompletionChoice for ChatChoice {
    const OBJECT: &'static str = "chat.completion";
}
impl CompletionChoice for ChunkChoice {
    const OBJECT: &'static str = "chat.completion.chunk";
}
impl CompletionChoice for TextChoice {
    const OBJECT: &'static str = "text_completion";
}

/// A `chat.completion`, `chat.completion.chunk` or `text_completion` object: what every
/// response and chunk of one request repeats, around its choices.
#[derive(Debug, Serialize)]
pub struct Completion<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub system_fingerprint: &'a str,
    pub choices: Vec<C>,
    /// Always there in a whole response. Absent from chunks unless `include_usage`; then
    /// `null` on every chunk but the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

impl<'a, C: CompletionChoice> Completion<'a, C> {
    pub fn new(meta: &'a ResponseMeta, choices: Vec<C>, usage: Option<Option<Usage>>) -> Self {
        Self {
            id: &meta.id,
            object: C::OBJECT,
            created: meta.created,
            model: &meta.model,
            system_fingerprint: &meta.system_fingerprint,
            choices,
            usage,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chat

#[derive(Debug, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the reply is only tool calls, as OpenAI answers.
    pub content: Option<String>,
    /// The model's thinking (`<think>…</think>`), as llama-server and vLLM return it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
    pub refusal: Option<String>,
}

/// One tool call of a whole response.
#[derive(Debug, Serialize, PartialEq)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments: String,
}

/// A piece of a streamed tool call: the first carries the id and the name, the rest argument
/// text to append.
#[derive(Debug, Serialize, PartialEq)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// A chunk's choice; its defaults are a chunk that says nothing and has not finished.
#[derive(Debug, Default, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallDelta>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.role.is_none()
            && self.content.is_none()
            && self.reasoning_content.is_none()
            && self.tool_calls.is_empty()
    }
}

#[derive(Debug, Default, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// The sampled token's entry, then its most likely alternatives in the same form.
#[derive(Debug, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    #[serde(flatten)]
    pub sampled: NamedLogprob,
    pub top_logprobs: Vec<NamedLogprob>,
}

/// A token as the chat format lists it: its text, log-probability and raw bytes.
#[derive(Debug, Serialize, PartialEq)]
pub struct NamedLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

// ---------------------------------------------------------------------------------------------
// Completions

#[derive(Debug, Serialize)]
pub struct TextChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

/// The legacy completions format: parallel lists, `top_logprobs` as `{token: logprob}` maps
/// holding the `n` most likely tokens and the sampled one, `text_offset` in characters from the
/// start of the completion (as vLLM counts them).
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

// ---------------------------------------------------------------------------------------------
// Models

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// vLLM's extension: the context a request may use.
    pub max_model_len: usize,
}

// ---------------------------------------------------------------------------------------------
// Log-probabilities

/// How a token is named in log-probability lists.
#[derive(Clone, Copy)]
pub struct TokenNamer<'a> {
    pub tokenizer: &'a TextTokenizer,
    /// vLLM's `return_tokens_as_token_ids`.
    pub as_ids: bool,
}

impl TokenNamer<'_> {
    /// The token's text (an incomplete UTF-8 piece with U+FFFD) and its raw bytes. Control
    /// tokens such as the end-of-generation token are empty, as llama-server reports them and
    /// as they appear in the content: the entries' bytes always add up to the text.
    pub fn name(&self, id: u32) -> (String, Vec<u8>) {
        let bytes = self.tokenizer.token_bytes(id, false).to_vec();
        let text = if self.as_ids {
            format!("token_id:{id}")
        } else {
            String::from_utf8_lossy(&bytes).into_owned()
        };
        (text, bytes)
    }
}

fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        NEG_INF_LOGPROB
    }
}

/// A log-probability format's list of tokens: one chunk's, or a whole answer's.
pub trait LogprobList: Default + Send {
    /// Appends one token. `offset` is the completion's length in characters before it; a
    /// format that reports offsets advances it past the token.
    fn push(&mut self, namer: TokenNamer<'_>, token: u32, lp: &TokenLogprobs, offset: &mut usize);
}

impl NamedLogprob {
    fn new(namer: TokenNamer<'_>, token: u32, logprob: f32) -> Self {
        let (token, bytes) = namer.name(token);
        Self {
            token,
            logprob: finite(logprob),
            bytes,
        }
    }
}

impl LogprobList for ChatLogprobs {
    fn push(&mut self, namer: TokenNamer<'_>, token: u32, lp: &TokenLogprobs, _: &mut usize) {
        self.content.push(ChatTokenLogprob {
            sampled: NamedLogprob::new(namer, token, lp.logprob),
            top_logprobs: lp
                .top
                .iter()
                .map(|&(id, logprob)| NamedLogprob::new(namer, id, logprob))
                .collect(),
        });
    }
}

impl LogprobList for CompletionLogprobs {
    fn push(&mut self, namer: TokenNamer<'_>, token: u32, lp: &TokenLogprobs, offset: &mut usize) {
        let (text, _) = namer.name(token);
        let mut top = Map::new();
        for &(id, logprob) in &lp.top {
            top.entry(namer.name(id).0)
                .or_insert_with(|| serde_json::Value::from(finite(logprob)));
        }
        top.entry(text.clone())
            .or_insert_with(|| serde_json::Value::from(finite(lp.logprob)));
        self.text_offset.push(*offset);
        *offset += String::from_utf8_lossy(namer.tokenizer.token_bytes(token, false))
            .chars()
            .count();
        self.tokens.push(text);
        self.token_logprobs.push(finite(lp.logprob));
        self.top_logprobs.push(top);
    }
}
