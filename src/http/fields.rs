//! [`Fields`]: typed access to a JSON request body, and the rules both front doors check, in
//! one place: each number's range and the message that states it, the counts (`max_tokens`,
//! log-probability alternatives, `repeat_last_n`), the seed and the stop strings. The rbee job
//! API's [`validation`](super::validation) and the OpenAI [`request`](super::openai::request)
//! readers both read through it; each reports the collected [`FieldError`]s in its own shape.
//!
//! Where the two APIs differ on purpose, the [`Dialect`] says so in one place: `top_p` (the job
//! API refuses 0), `top_k`, the seed (OpenAI takes negative seeds, -1 for random), the stop
//! strings (OpenAI ignores empty ones and allows more), what a non-boolean is told, and which
//! numbers count as integers (OpenAI takes `5.0`).

use serde_json::{Map, Value};

use super::error::FieldError;
use super::structured::Requested;
use crate::generation::rng::random_seed;
use crate::generation::{GenerationParams, SamplingParams};
use crate::jobs::ServedModel;

/// The most alternatives a token's log-probabilities may list.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A number field's allowed range: `min..=max`, or `min` excluded when `above_min`.
#[derive(Debug, Clone, Copy)]
pub struct NumberRule {
    pub field: &'static str,
    pub min: f64,
    pub max: f64,
    pub above_min: bool,
}

impl NumberRule {
    const fn between(field: &'static str, min: f64, max: f64) -> Self {
        Self {
            field,
            min,
            max,
            above_min: false,
        }
    }

    const fn above(field: &'static str, min: f64, max: f64) -> Self {
        Self {
            above_min: true,
            ..Self::between(field, min, max)
        }
    }

    pub fn allows(&self, x: f64) -> bool {
        let low = if self.above_min {
            x > self.min
        } else {
            x >= self.min
        };
        low && x <= self.max
    }

    /// The rule in words ("must be between 0 and 2").
    pub fn message(&self) -> String {
        if self.above_min {
            format!("must be greater than {} and at most {}", self.min, self.max)
        } else {
            format!("must be between {} and {}", self.min, self.max)
        }
    }
}

pub const TEMPERATURE: NumberRule = NumberRule::between("temperature", 0.0, 2.0);
/// OpenAI's `top_p`.
pub const TOP_P: NumberRule = NumberRule::between("top_p", 0.0, 1.0);
/// The job API's `top_p`: 0 is refused.
pub const TOP_P_ABOVE_ZERO: NumberRule = NumberRule::above("top_p", 0.0, 1.0);
pub const MIN_P: NumberRule = NumberRule::between("min_p", 0.0, 1.0);
pub const REPETITION_PENALTY: NumberRule = NumberRule::above("repetition_penalty", 0.0, 2.0);
pub const PRESENCE_PENALTY: NumberRule = NumberRule::between("presence_penalty", -2.0, 2.0);
pub const FREQUENCY_PENALTY: NumberRule = NumberRule::between("frequency_penalty", -2.0, 2.0);

/// What a request is checked against: the served model's name, vocabulary and context.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// The only name `model` may carry.
    pub model_id: &'a str,
    pub vocab_size: usize,
    pub context_length: usize,
}

impl<'a> Rules<'a> {
    /// The served model's name, vocabulary and context.
    pub fn of(served: &'a ServedModel) -> Self {
        Self {
            model_id: &served.model_id,
            vocab_size: served.meta.vocab_size,
            context_length: served.meta.context_length,
        }
    }
}

/// Which API's wording and leniency a [`Fields`] reader applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The rbee job API.
    Job,
    /// The OpenAI-compatible API.
    OpenAi,
}

impl Dialect {
    /// How many stop strings a request may give, and how long each may be (bytes).
    pub fn stop_limits(self) -> (usize, usize) {
        match self {
            Self::Job => (4, 100),
            Self::OpenAi => (16, 256),
        }
    }
}

/// Typed access to a JSON body's fields, collecting one [`FieldError`] per broken rule; `null`
/// counts as absent.
pub struct Fields<'a> {
    body: &'a Map<String, Value>,
    dialect: Dialect,
    errors: Vec<FieldError>,
}

impl<'a> Fields<'a> {
    pub fn new(body: &'a Map<String, Value>, dialect: Dialect) -> Self {
        Self {
            body,
            dialect,
            errors: Vec::new(),
        }
    }

    /// Every broken rule found, in the order the fields were read.
    pub fn into_errors(self) -> Vec<FieldError> {
        self.errors
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// llama-server's `cache_prompt` (default true) and vLLM's `cache_salt` (default none).
    pub fn cache_policy(&mut self) -> (bool, String) {
        let cache_prompt = self.boolean("cache_prompt").unwrap_or(true);
        let salt = match self.get("cache_salt") {
            None => String::new(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => {
                self.fail("cache_salt", "must be a non-empty string");
                String::new()
            }
        };
        (cache_prompt, salt)
    }

    /// The engine's parameters from what the API read its own way, completed by the fields
    /// both read last: the output constraint (returned apart: it is compiled later) and the
    /// cache policy.
    pub fn generation_params(
        &mut self,
        sampling: SamplingParams,
        max_tokens: usize,
        stop: Vec<String>,
        ignore_eos: bool,
        logprobs: Option<usize>,
    ) -> (GenerationParams, Option<Requested>) {
        let constraint = self.constraint();
        let (cache_prompt, cache_salt) = self.cache_policy();
        let params = GenerationParams {
            sampling,
            max_tokens,
            stop,
            ignore_eos,
            logprobs,
            constraint: None,
            cache_prompt,
            cache_salt,
        };
        (params, constraint)
    }

    /// How many broken rules were found so far.
    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    /// The field's value, `None` when absent or `null`.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.body.get(name).filter(|v| !v.is_null())
    }

    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// Records a broken rule.
    pub fn fail(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(FieldError::new(name, message));
    }

    /// Records a feature that is known but not implemented.
    pub fn unsupported(&mut self, name: &str, message: impl Into<String>) {
        self.errors.push(FieldError::unsupported(name, message));
    }

    /// An integer, or `None` (a broken rule recorded unless absent). Integers beyond `i64` read
    /// as `i64::MAX` (a huge count, which the range rules treat as "too many"); OpenAI also
    /// takes a float with no fraction, such as `5.0`.
    pub fn int(&mut self, name: &str) -> Option<i64> {
        let value = self.get(name)?;
        let n = match self.dialect {
            Dialect::Job => value
                .as_i64()
                .or_else(|| value.is_u64().then_some(i64::MAX)),
            Dialect::OpenAi => value
                .as_i64()
                .or_else(|| value.is_u64().then_some(i64::MAX))
                .or_else(|| {
                    value
                        .as_f64()
                        .filter(|x| x.fract() == 0.0 && x.abs() < 9.0e15)
                        .map(|x| x as i64)
                }),
        };
        if n.is_none() {
            self.fail(name, "must be an integer");
        }
        n
    }

    pub fn boolean(&mut self, name: &str) -> Option<bool> {
        match self.get(name)? {
            Value::Bool(b) => Some(*b),
            _ => {
                let message = match self.dialect {
                    Dialect::Job => "must be true or false",
                    Dialect::OpenAi => "must be a boolean",
                };
                self.fail(name, message);
                None
            }
        }
    }

    pub fn string(&mut self, name: &str) -> Option<&'a str> {
        match self.get(name)? {
            Value::String(s) => Some(s),
            _ => {
                self.fail(name, "must be a string");
                None
            }
        }
    }

    pub fn number(&mut self, name: &str) -> Option<f64> {
        let n = self.get(name)?.as_f64();
        if n.is_none() {
            self.fail(name, "must be a number");
        }
        n
    }

    /// The number `rule` names, if present and within its range, as `f32`.
    pub fn ranged(&mut self, rule: &NumberRule) -> Option<f32> {
        let n = self.number(rule.field)?;
        if rule.allows(n) {
            Some(n as f32)
        } else {
            self.fail(rule.field, rule.message());
            None
        }
    }

    /// A count of at least 1 (`max_tokens`, `max_completion_tokens`). Counts beyond `i64`
    /// keep their value, so that a refusal names the number the client sent.
    pub fn count(&mut self, name: &str) -> Option<usize> {
        if let Some(n) = self.get(name)?.as_u64().filter(|&n| n >= 1) {
            return Some(usize::try_from(n).unwrap_or(usize::MAX));
        }
        match self.int(name)? {
            n if n >= 1 => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            _ => {
                self.fail(name, "must be at least 1");
                None
            }
        }
    }

    /// How many alternatives to list with each token's log-probability: 0 to
    /// [`MAX_TOP_LOGPROBS`].
    pub fn alternatives(&mut self, name: &str) -> Option<usize> {
        match self.int(name)? {
            n if (0..=MAX_TOP_LOGPROBS).contains(&n) => Some(n as usize),
            _ => {
                self.fail(name, format!("must be between 0 and {MAX_TOP_LOGPROBS}"));
                None
            }
        }
    }

    /// Reads the number-valued sampling fields into `s` in this order: `temperature`, `top_p`
    /// (by the API's own rule), `min_p`, `repetition_penalty`, `presence_penalty`,
    /// `frequency_penalty`; then `top_k` and `repeat_last_n` (-1: the whole context). An absent
    /// or broken field keeps the default already in `s`.
    pub fn sampling(&mut self, s: &mut SamplingParams, context_length: usize) {
        let top_p = match self.dialect {
            Dialect::Job => &TOP_P_ABOVE_ZERO,
            Dialect::OpenAi => &TOP_P,
        };
        let fields: [(&NumberRule, &mut f32); 6] = [
            (&TEMPERATURE, &mut s.temperature),
            (top_p, &mut s.top_p),
            (&MIN_P, &mut s.min_p),
            (&REPETITION_PENALTY, &mut s.repetition_penalty),
            (&PRESENCE_PENALTY, &mut s.presence_penalty),
            (&FREQUENCY_PENALTY, &mut s.frequency_penalty),
        ];
        for (rule, value) in fields {
            if let Some(x) = self.ranged(rule) {
                *value = x;
            }
        }
        match (self.dialect, self.int("top_k")) {
            (_, None) | (Dialect::OpenAi, Some(-1 | 0)) => {}
            (_, Some(k)) if k >= 0 => s.top_k = usize::try_from(k).unwrap_or(usize::MAX),
            (Dialect::Job, Some(_)) => self.fail("top_k", "must be 0 (off) or more"),
            (Dialect::OpenAi, Some(_)) => {
                self.fail("top_k", "must be -1 or 0 (off), or a positive count")
            }
        }
        match self.int("repeat_last_n") {
            None => {}
            Some(-1) => s.repeat_last_n = context_length,
            Some(n) if n >= 0 => s.repeat_last_n = n as usize,
            Some(_) => self.fail("repeat_last_n", "must be -1 (whole context) or more"),
        }
    }

    /// The seed; random when absent (and, for OpenAI, when -1). OpenAI's other negative
    /// seeds are valid int64s and stay deterministic; the job API refuses them.
    pub fn seed(&mut self) -> u64 {
        let Some(v) = self.get("seed") else {
            return random_seed();
        };
        match (v.as_u64(), v.as_i64(), self.dialect) {
            (Some(seed), _, _) => seed,
            (None, Some(-1), Dialect::OpenAi) => random_seed(),
            (None, Some(n), Dialect::OpenAi) => n as u64,
            (None, Some(_), Dialect::Job) => {
                self.fail("seed", "must not be negative");
                0
            }
            (None, None, _) => {
                self.fail("seed", "must be an integer");
                0
            }
        }
    }

    /// `stop`: a string or an array of strings, within [`Dialect::stop_limits`]. OpenAI
    /// ignores empty strings; the job API refuses them.
    pub fn stop_strings(&mut self) -> Vec<String> {
        let openai = self.dialect == Dialect::OpenAi;
        let list: Vec<&'a Value> = match self.get("stop") {
            None => return Vec::new(),
            Some(Value::String(s)) if s.is_empty() && openai => return Vec::new(),
            Some(Value::Array(items)) => items.iter().collect(),
            Some(one @ Value::String(_)) => vec![one],
            Some(_) => {
                self.fail("stop", "must be a string or an array of strings");
                return Vec::new();
            }
        };
        let (max_strings, max_bytes) = self.dialect.stop_limits();
        if list.len() > max_strings {
            if openai {
                self.fail(
                    "stop",
                    format!("at most {max_strings} stop sequences are supported"),
                );
                return Vec::new();
            }
            self.fail(
                "stop",
                format!("at most {max_strings} stop strings, got {}", list.len()),
            );
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, item) in list.into_iter().enumerate() {
            let field = format!("stop[{i}]");
            match item {
                Value::String(s) if s.is_empty() && openai => {}
                Value::String(s) if s.is_empty() => self.fail(&field, "must not be empty"),
                Value::String(s) if s.len() > max_bytes => self.fail(
                    &field,
                    format!("is {} bytes, at most {max_bytes} allowed", s.len()),
                ),
                Value::String(s) => out.push(s.clone()),
                _ => self.fail(&field, "must be a string"),
            }
        }
        out
    }
}

/// Reads a test body (a JSON object) with `read` as the OpenAI readers do; what it read, and
/// every broken rule it found.
#[cfg(test)]
pub fn read_openai<T>(
    body: Value,
    read: impl FnOnce(&mut Fields<'_>) -> T,
) -> (T, Vec<FieldError>) {
    let Value::Object(map) = body else {
        panic!("test bodies are objects")
    };
    let mut f = Fields::new(&map, Dialect::OpenAi);
    let out = read(&mut f);
    (out, f.into_errors())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_include_their_ends_unless_open() {
        let allows = |rule: NumberRule, x: f64| rule.allows(x);
        assert!(allows(TEMPERATURE, 0.0) && allows(TEMPERATURE, 2.0));
        assert!(!allows(TEMPERATURE, -0.1) && !allows(TEMPERATURE, 2.1));
        assert!(allows(TOP_P, 0.0) && allows(TOP_P, 1.0));
        assert!(!allows(TOP_P_ABOVE_ZERO, 0.0) && allows(TOP_P_ABOVE_ZERO, 1.0));
        assert!(!allows(REPETITION_PENALTY, 0.0) && allows(REPETITION_PENALTY, 2.0));
        assert!(allows(PRESENCE_PENALTY, -2.0) && !allows(FREQUENCY_PENALTY, 2.5));
        assert_eq!(TEMPERATURE.message(), "must be between 0 and 2");
        assert_eq!(PRESENCE_PENALTY.message(), "must be between -2 and 2");
        assert_eq!(
            TOP_P_ABOVE_ZERO.message(),
            "must be greater than 0 and at most 1"
        );
    }
}
