//! The one generation loop: what happens to a sequence's logits at every step, whoever asked
//! for the sequence (the rbee job API, the OpenAI API, tests and benchmarks all go through
//! [`SequenceGenerator`]).
//!
//! - [`sampler`]: logit bias, penalties, top-k / top-p / min-p, temperature, seeded draw;
//!   log-probabilities from the raw logits.
//! - [`stop`]: stop strings with partial matches withheld until resolved.
//! - [`rng`]: the seeded PRNG.

pub mod rng;
pub mod sampler;
pub mod stop;

use std::sync::Arc;

use crate::model::detokenizer::StreamingDetokenizer;
use crate::model::tokenizer::TextTokenizer;
use sampler::{Sampler, token_logprobs};
pub use sampler::{SamplingParams, TokenLogprobs};
use stop::{StopOutcome, StopStrings};

/// Everything that shapes one sequence's generation, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    /// At least 1.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Keep generating through end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// Report log-probabilities: `Some(n)` with the `n` most likely alternatives.
    pub logprobs: Option<usize>,
}

impl GenerationParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    MaxTokens,
    /// An end-of-generation token was generated (it is the last token, its text is not emitted).
    Eos,
    StopSequence(String),
    /// The context window is full.
    ContextFull,
}

impl FinishReason {
    /// The rbee wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::Eos => "eos",
            Self::StopSequence(_) => "stop_sequence",
            Self::ContextFull => "context_full",
        }
    }
}

/// The outcome of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStep {
    pub token: u32,
    /// 0-based index among generated tokens.
    pub index: usize,
    /// Text that became visible with this token (may be empty while a UTF-8 character or a
    /// possible stop string is incomplete).
    pub text: String,
    pub logprobs: Option<TokenLogprobs>,
    pub finish: Option<FinishReason>,
}

/// One sequence's generation state: sampler, streaming detokenizer and stop conditions.
pub struct SequenceGenerator {
    params: GenerationParams,
    sampler: Sampler,
    detokenizer: StreamingDetokenizer,
    stops: StopStrings,
    eog: Arc<[u32]>,
    /// Prompt then generated tokens (the penalties' history).
    tokens: Vec<u32>,
    prompt_len: usize,
    context_length: usize,
    generated: usize,
    finished: bool,
}

impl SequenceGenerator {
    pub fn new(
        params: GenerationParams,
        prompt: &[u32],
        tokenizer: Arc<TextTokenizer>,
        eog: Arc<[u32]>,
        context_length: usize,
    ) -> Self {
        Self {
            sampler: Sampler::new(params.sampling.clone()),
            stops: StopStrings::new(params.stop.clone()),
            detokenizer: StreamingDetokenizer::new(tokenizer),
            params,
            eog,
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            context_length,
            generated: 0,
            finished: false,
        }
    }

    pub fn params(&self) -> &GenerationParams {
        &self.params
    }

    pub fn generated(&self) -> usize {
        self.generated
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The token to feed next (the last one sampled).
    pub fn last_token(&self) -> Option<u32> {
        (self.generated > 0).then(|| self.tokens[self.tokens.len() - 1])
    }

    /// Samples the next token from `logits` (modified in place) and applies every stop rule.
    pub fn step(&mut self, logits: &mut [f32]) -> TokenStep {
        // Log-probabilities describe the model's raw distribution, so keep the logits as they
        // were before bias and penalties touch them (only when asked: it is a vocabulary copy).
        let raw = self.params.logprobs.map(|_| logits.to_vec());
        let token = self.sampler.sample(logits, &self.tokens);
        let logprobs = self
            .params
            .logprobs
            .zip(raw)
            .map(|(n, raw)| token_logprobs(&raw, token, n));
        let index = self.generated;
        self.generated += 1;
        self.tokens.push(token);

        let mut finish = None;
        let mut text = String::new();
        if !self.params.ignore_eos && self.eog.contains(&token) {
            finish = Some(FinishReason::Eos);
        } else {
            let delta = self.detokenizer.push(token);
            self.feed_stops(&delta, &mut text, &mut finish);
        }
        if finish.is_none() {
            if self.generated >= self.params.max_tokens {
                finish = Some(FinishReason::MaxTokens);
            } else if self.prompt_len + self.generated >= self.context_length {
                finish = Some(FinishReason::ContextFull);
            }
        }
        if finish
            .as_ref()
            .is_some_and(|f| !matches!(f, FinishReason::StopSequence(_)))
        {
            // Whatever was withheld (an incomplete character, a possible stop string) is final
            // now; it may still complete a stop string.
            let tail = self.detokenizer.finish();
            let mut stopped = None;
            self.feed_stops(&tail, &mut text, &mut stopped);
            match stopped {
                Some(s) => finish = Some(s),
                None => text.push_str(&self.stops.flush()),
            }
        }
        self.finished = finish.is_some();
        TokenStep {
            token,
            index,
            text,
            logprobs,
            finish,
        }
    }

    fn feed_stops(&mut self, delta: &str, text: &mut String, finish: &mut Option<FinishReason>) {
        match self.stops.push(delta) {
            StopOutcome::Continue(t) => text.push_str(&t),
            StopOutcome::Stopped { text: t, stop } => {
                text.push_str(&t);
                *finish = Some(FinishReason::StopSequence(stop));
            }
        }
    }
}
