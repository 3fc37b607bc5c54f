//! `POST /v1/completions`: a raw prompt (text or token ids) run as one job per choice; the
//! answer as a `text_completion` or a stream of them.

use axum::extract::State;
use axum::response::Response;

use super::OpenAiJson;
use super::answer::{AnswerShape, answer};
use super::error::OpenAiError;
use super::request::{Prompt, parse_completion};
use super::response::{CompletionLogprobs, TextChoice, TokenNamer};
use super::run::ready;
use crate::generation::TokenLogprobs;
use crate::http::AppState;
use crate::http::auth::Caller;
use crate::http::fields::Rules;
use crate::http::pipeline::tokenize_prompt;
use crate::jobs::JobApi;

pub async fn completions(
    State(app): State<AppState>,
    caller: Caller,
    OpenAiJson(body): OpenAiJson,
) -> Result<Response, OpenAiError> {
    let served = ready(&app)?;
    let meta = &served.meta;
    let request = parse_completion(&body, &Rules::of(served))?;
    drop(body);

    let prompt_tokens = match request.prompt {
        Prompt::Tokens(ids) => ids,
        Prompt::Text(text) => tokenize_prompt(meta.tokenizer.clone(), text)
            .await?
            .map_err(|message| OpenAiError::invalid("prompt", message))?,
    };

    let shape = |index| Text { offset: 0, index };
    answer(&app, &caller, served, shape, request.common, prompt_tokens).await
}

/// The `text_completion` answer, whole or in chunks of the same shape.
struct Text {
    /// Characters answered so far, for `text_offset`.
    offset: usize,
    /// The choice's index.
    index: usize,
}

impl AnswerShape for Text {
    const API: JobApi = JobApi::OpenAiCompletions;
    const ID_PREFIX: &'static str = "cmpl";
    const PROMPT_PARAM: &'static str = "prompt";
    const OBJECT: &'static str = "text_completion";
    const CHUNK_OBJECT: &'static str = "text_completion";

    type Choice = TextChoice;
    type ChunkChoice = TextChoice;
    type Logprobs = CompletionLogprobs;

    fn push_logprobs(
        &mut self,
        logprobs: &mut CompletionLogprobs,
        namer: TokenNamer<'_>,
        token: u32,
        lp: &TokenLogprobs,
    ) {
        logprobs.push(namer, token, lp, &mut self.offset);
    }

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
