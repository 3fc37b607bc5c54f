//! The one generation loop: what happens to a sequence's logits at every step, whoever asked
//! for the sequence (the rbee job API, the OpenAI API, tests and benchmarks all go through
//! [`SequenceGenerator`]).
//!
//! - [`sampler`]: logit bias, penalties, top-k / top-p / min-p, temperature, seeded draw;
//!   log-probabilities from the raw logits.
//! - [`stop`]: stop strings with partial matches withheld until resolved.
//! - [`rng`]: the seeded PRNG.
//! - [`constraint`]: structured output — a JSON schema, regex, choice or grammar as a per-token
//!   mask applied before sampling ([`gbnf`] reads llama.cpp's grammars).

pub(crate) mod constraint;
pub(crate) mod gbnf;
pub mod rng;
pub(crate) mod sampler;
pub(crate) mod stop;

use std::sync::Arc;

use crate::model::detokenizer::StreamingDetokenizer;
use crate::model::tokenizer::TextTokenizer;
pub use constraint::{Constraint, ConstraintError, ConstraintSpec, Grammars};
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
    /// Output must match this grammar (compiled, not yet started).
    pub constraint: Option<Constraint>,
    /// Reuse a cached prefix of the prompt and keep this sequence's cache for later requests
    /// (llama-server's `cache_prompt`).
    pub cache_prompt: bool,
    /// Only caches made under the same salt are reused (vLLM's `cache_salt`, with the caller's
    /// API key in it, so tenants never share).
    pub cache_salt: String,
}

impl GenerationParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
            logprobs: None,
            constraint: None,
            cache_prompt: true,
            cache_salt: String::new(),
        }
    }

    /// A copy without the constraint (a constraint's clone copies its parser state).
    pub fn clone_without_constraint(&self) -> Self {
        Self {
            sampling: self.sampling.clone(),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
            logprobs: self.logprobs,
            constraint: None,
            cache_prompt: self.cache_prompt,
            cache_salt: self.cache_salt.clone(),
        }
    }
}

/// Why a prompt and its output budget do not fit a context window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ContextFitError {
    #[error("produces no tokens")]
    EmptyPrompt,
    /// The requested `max_tokens` does not fit beside the prompt.
    #[error(
        "the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is {}, more than the \
         context ({context_length})",
        prompt_tokens.saturating_add(*max_tokens)
    )]
    TooLong {
        prompt_tokens: usize,
        max_tokens: usize,
        context_length: usize,
    },
    /// No `max_tokens` was requested and the prompt leaves no room for output.
    #[error(
        "the prompt ({prompt_tokens} tokens) leaves no room for output in the context \
         ({context_length})"
    )]
    NoRoom {
        prompt_tokens: usize,
        context_length: usize,
    },
}

/// The one context-fit rule, applied by every API before a job is queued and by the engine
/// before it admits one: the prompt must have tokens, and the prompt plus the output budget
/// must fit the context. Returns the budget: `requested`, or all the room the context has left
/// when nothing was requested (OpenAI's default).
pub fn fit_max_tokens(
    prompt_tokens: usize,
    requested: Option<usize>,
    context_length: usize,
) -> Result<usize, ContextFitError> {
    if prompt_tokens == 0 {
        return Err(ContextFitError::EmptyPrompt);
    }
    match requested {
        Some(max_tokens) if prompt_tokens.saturating_add(max_tokens) > context_length => {
            Err(ContextFitError::TooLong {
                prompt_tokens,
                max_tokens,
                context_length,
            })
        }
        Some(max_tokens) => Ok(max_tokens),
        None if prompt_tokens >= context_length => Err(ContextFitError::NoRoom {
            prompt_tokens,
            context_length,
        }),
        None => Ok(context_length - prompt_tokens),
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    MaxTokens,
    /// An end-of-generation token was generated (it is the last token, its text is not
    /// emitted), or the output's grammar is complete (nothing but the end could follow).
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
    constraint: Option<Constraint>,
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
    /// The constraint, if any, is taken out of `params` (each sequence owns its parser state).
    pub fn new(
        mut params: GenerationParams,
        prompt: &[u32],
        tokenizer: Arc<TextTokenizer>,
        eog: Arc<[u32]>,
        context_length: usize,
    ) -> Self {
        Self {
            constraint: params.constraint.take(),
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

    /// The prompt, then every token generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The token to feed next (the last one sampled).
    pub fn last_token(&self) -> Option<u32> {
        (self.generated > 0).then(|| self.tokens[self.tokens.len() - 1])
    }

    /// The constraint, for computing its next mask while the forward pass runs.
    pub fn constraint_mut(&mut self) -> Option<&mut Constraint> {
        self.constraint.as_mut()
    }

    /// Samples the next token from `logits` (modified in place) and applies every stop rule.
    /// Fails only when the output's grammar cannot go on.
    pub fn step(&mut self, logits: &mut [f32]) -> Result<TokenStep, String> {
        // Log-probabilities describe the model's raw distribution, so keep the logits as they
        // were before the mask, bias and penalties touch them (only when asked: it is a
        // vocabulary copy).
        let raw = self.params.logprobs.map(|_| logits.to_vec());
        if let Some(c) = &mut self.constraint {
            c.apply(logits)
                .map_err(|e| format!("the output's {} constraint failed: {e}", c.kind()))?;
        }
        let token = self.sampler.sample(logits, &self.tokens);
        if !logits.get(token as usize).is_some_and(|l| l.is_finite()) {
            // The sampler skips what is not finite, so every logit was NaN or infinite: the
            // weights (or the activations) are broken, and any token would be a made-up one.
            return Err(
                "the model gave no finite logit (NaN or infinite values: a damaged \
                        model file?)"
                    .into(),
            );
        }
        let grammar_done = match &mut self.constraint {
            Some(c) => c
                .accept(token)
                .map_err(|e| format!("the output's {} constraint failed: {e}", c.kind()))?,
            None => false,
        };
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
        if finish.is_none() && grammar_done {
            finish = Some(FinishReason::Eos);
        }
        if finish.is_none() {
            // The context first: a budget that runs out exactly where the context does (the
            // OpenAI default, `context − prompt`) is reported as the context being full.
            if self.prompt_len + self.generated >= self.context_length {
                finish = Some(FinishReason::ContextFull);
            } else if self.generated >= self.params.max_tokens {
                finish = Some(FinishReason::MaxTokens);
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
        Ok(TokenStep {
            token,
            index,
            text,
            logprobs,
            finish,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_rule_gives_both_numbers() {
        let message = fit_max_tokens(60, Some(10), 64).unwrap_err().to_string();
        assert!(message.contains("60 tokens"));
        assert!(message.contains("max_tokens (10)"));
        assert!(message.contains("context (64)"));
        assert_eq!(fit_max_tokens(54, Some(10), 64), Ok(10));
        assert_eq!(fit_max_tokens(54, None, 64), Ok(10));
        assert_eq!(
            fit_max_tokens(64, None, 64),
            Err(ContextFitError::NoRoom {
                prompt_tokens: 64,
                context_length: 64
            })
        );
        assert_eq!(
            fit_max_tokens(0, Some(1), 64),
            Err(ContextFitError::EmptyPrompt)
        );
    }
    use crate::model::tokenizer::tests::gpt2;

    struct Fixture {
        tokenizer: Arc<TextTokenizer>,
        eog: u32,
    }

    impl Fixture {
        fn new() -> Self {
            let tokenizer = Arc::new(gpt2());
            let eog = tokenizer.token_to_id("<|im_end|>").unwrap();
            Self { tokenizer, eog }
        }

        fn id(&self, piece: &str) -> u32 {
            self.tokenizer.token_to_id(piece).unwrap()
        }

        fn generator(
            &self,
            params: GenerationParams,
            prompt: usize,
            ctx: usize,
        ) -> SequenceGenerator {
            let prompt = vec![self.id("hello"); prompt];
            let eog: Arc<[u32]> = Arc::from(vec![self.eog]);
            SequenceGenerator::new(params, &prompt, self.tokenizer.clone(), eog, ctx)
        }

        /// A greedy generator after a one-token prompt, with one stop string.
        fn stopping_at(&self, stop: &str, max_tokens: usize) -> SequenceGenerator {
            let params = GenerationParams {
                stop: vec![stop.into()],
                ..GenerationParams::greedy(max_tokens)
            };
            self.generator(params, 1, 100)
        }

        /// Greedy logits that pick `token`.
        fn logits(&self, token: u32) -> Vec<f32> {
            let mut l = vec![0.0; self.tokenizer.vocab_size()];
            l[token as usize] = 10.0;
            l
        }

        /// Feeds `tokens` until the generator finishes; returns the steps taken.
        fn run(&self, g: &mut SequenceGenerator, tokens: &[u32]) -> Vec<TokenStep> {
            let mut steps = Vec::new();
            for &t in tokens {
                let step = g.step(&mut self.logits(t)).unwrap();
                assert_eq!(step.token, t);
                let done = step.finish.is_some();
                steps.push(step);
                if done {
                    break;
                }
            }
            assert_eq!(
                g.is_finished(),
                steps.last().is_some_and(|s| s.finish.is_some())
            );
            steps
        }
    }

    fn finish(steps: &[TokenStep]) -> Option<FinishReason> {
        steps.last().and_then(|s| s.finish.clone())
    }

    fn text(steps: &[TokenStep]) -> String {
        steps.iter().map(|s| s.text.as_str()).collect()
    }

    #[test]
    fn a_token_that_breaks_the_grammar_is_never_sampled() {
        let f = Fixture::new();
        let grammars = Grammars::new(f.tokenizer.clone(), Arc::from(vec![f.eog]));
        let spec = ConstraintSpec::Regex("hello( world)*".into());
        let world = f.id("Ġworld");
        for seed in 0..50 {
            let mut params = GenerationParams::greedy(12);
            params.sampling.temperature = 1.0;
            params.sampling.seed = seed;
            params.constraint = Some(grammars.compile(&spec).unwrap());
            let mut g = f.generator(params, 1, 100);
            let mut rng = rng::Rng::new(seed);
            let mut text = String::new();
            loop {
                // Noise everywhere, and the most likely token is one the grammar never allows.
                let mut logits: Vec<f32> = (0..f.tokenizer.vocab_size())
                    .map(|_| (rng.next_f64() * 4.0) as f32)
                    .collect();
                logits[f.id("Ċ") as usize] = 20.0;
                logits[world as usize] += 2.0;
                let step = g.step(&mut logits).unwrap();
                text.push_str(&step.text);
                if step.finish.is_some() {
                    break;
                }
            }
            // The language, or a prefix of it where max_tokens cut it short.
            let mut rest = text
                .strip_prefix("hello")
                .unwrap_or_else(|| panic!("{text:?}"));
            while let Some(r) = rest.strip_prefix(" world") {
                rest = r;
            }
            assert!(" world".starts_with(rest), "seed {seed}: {text:?}");
        }
    }

    #[test]
    fn logits_without_a_finite_value_fail_the_step() {
        let f = Fixture::new();
        for temperature in [0.0, 0.8] {
            let mut params = GenerationParams::greedy(5);
            params.sampling.temperature = temperature;
            let mut g = f.generator(params, 2, 100);
            let mut logits = vec![f32::NAN; f.tokenizer.vocab_size()];
            let e = g.step(&mut logits).unwrap_err();
            assert!(e.contains("no finite logit"), "{e}");
            // One finite value is enough to go on.
            logits[3] = 1.0;
            assert_eq!(g.step(&mut logits).unwrap().token, 3);
        }
    }

    #[test]
    fn max_tokens_ends_after_exactly_that_many() {
        let f = Fixture::new();
        let mut g = f.generator(GenerationParams::greedy(3), 2, 100);
        let world = f.id("Ġworld");
        let steps = f.run(&mut g, &[world; 10]);
        assert_eq!(steps.len(), 3);
        assert_eq!(finish(&steps), Some(FinishReason::MaxTokens));
        assert_eq!(text(&steps), " world world world");
        assert_eq!(g.generated(), 3);
    }

    #[test]
    fn end_of_generation_token_ends_unless_ignored() {
        let f = Fixture::new();
        let world = f.id("Ġworld");
        let mut g = f.generator(GenerationParams::greedy(10), 2, 100);
        let steps = f.run(&mut g, &[world, f.eog, world]);
        assert_eq!(steps.len(), 2);
        assert_eq!(finish(&steps), Some(FinishReason::Eos));
        assert_eq!(text(&steps), " world", "the end token is not text");

        let mut params = GenerationParams::greedy(3);
        params.ignore_eos = true;
        let mut g = f.generator(params, 2, 100);
        let steps = f.run(&mut g, &[world, f.eog, world, world]);
        assert_eq!(steps.len(), 3);
        assert_eq!(finish(&steps), Some(FinishReason::MaxTokens));
    }

    #[test]
    fn a_full_context_ends_with_its_own_reason() {
        let f = Fixture::new();
        let world = f.id("Ġworld");
        // 3 prompt tokens in a context of 5: two more fit.
        let mut g = f.generator(GenerationParams::greedy(50), 3, 5);
        let steps = f.run(&mut g, &[world; 10]);
        assert_eq!(steps.len(), 2);
        assert_eq!(finish(&steps), Some(FinishReason::ContextFull));
        assert_eq!(finish(&steps).unwrap().as_str(), "context_full");
        // A budget ending exactly at the context's end: the context is what ran out.
        let mut g = f.generator(GenerationParams::greedy(2), 3, 5);
        assert_eq!(
            finish(&f.run(&mut g, &[world; 10])),
            Some(FinishReason::ContextFull)
        );
        // A budget ending before it: max_tokens.
        let mut g = f.generator(GenerationParams::greedy(1), 3, 5);
        assert_eq!(
            finish(&f.run(&mut g, &[world; 10])),
            Some(FinishReason::MaxTokens)
        );
    }

    #[test]
    fn stop_string_ends_and_is_withheld() {
        let f = Fixture::new();
        let mut g = f.stopping_at(" wor", 10);
        let steps = f.run(&mut g, &[f.id("hello"), f.id("Ġworld"), f.id("hello")]);
        assert_eq!(steps.len(), 2);
        assert_eq!(
            finish(&steps),
            Some(FinishReason::StopSequence(" wor".into()))
        );
        assert_eq!(text(&steps), "hello");
    }

    #[test]
    fn a_possible_stop_prefix_is_released_when_generation_ends() {
        let f = Fixture::new();
        let mut g = f.stopping_at(" world!", 2);
        let world = f.id("Ġworld");
        let steps = f.run(&mut g, &[f.id("hello"), world, world]);
        assert_eq!(steps[1].finish, Some(FinishReason::MaxTokens));
        // " world" could have begun " world!", so it was held back until the end.
        assert_eq!(text(&steps), "hello world");
    }
}
