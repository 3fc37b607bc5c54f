//! `POST /v1/completions`: a raw prompt (text or token ids) run as one job per choice; the
//! answer as a `text_completion` or a stream of them.

use axum::response::Response;
use serde_json::{Map, Value};

use super::answer::{AnswerShape, Call, Endpoint, GenerationRequest, answer};
use super::error::OpenAiError;
use super::request::{CompletionRequest, Prompt, parse_completion};
use super::response::{CompletionLogprobs, TextChoice};
use crate::http::fields::Rules;
use crate::http::pipeline::tokenize_prompt;

impl GenerationRequest for CompletionRequest {
    fn parse(body: &Map<String, Value>, rules: &Rules<'_>) -> Result<Self, OpenAiError> {
        parse_completion(body, rules)
    }

    /// Tokenizes a text prompt; token ids are taken as they are.
    async fn respond(self, call: Call<'_>) -> Result<Response, OpenAiError> {
        let prompt_tokens = match self.prompt {
            Prompt::Tokens(ids) => ids,
            Prompt::Text(text) => tokenize_prompt(call.served.meta.tokenizer.clone(), text)
                .await?
                .map_err(|message| OpenAiError::invalid("prompt", message))?,
        };
        let shape = |index| Text { index };
        answer(call, shape, self.common, prompt_tokens).await
    }
}

/// The `text_completion` answer, whole or in chunks of the same shape.
struct Text {
    /// The choice's index.
    index: usize,
}

impl AnswerShape for Text {
    const ENDPOINT: Endpoint = Endpoint::COMPLETIONS;

    type Choice = TextChoice;
    type ChunkChoice = TextChoice;
    type Logprobs = CompletionLogprobs;

    fn token_chunk(
        &mut self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
    ) -> Option<TextChoice> {
        Some(TextChoice {
            text,
            index: self.index,
            logprobs,
            finish_reason: None,
        })
    }

    fn finish_chunks(&mut self, finish_reason: &'static str) -> Vec<TextChoice> {
        vec![self.choice(String::new(), None, finish_reason)]
    }

    fn choice(
        &mut self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: &'static str,
    ) -> TextChoice {
        TextChoice {
            text,
            index: self.index,
            logprobs,
            finish_reason: Some(finish_reason),
        }
    }
}
