//! The sampling-parameter rules both front doors check, in one place: each number's range and
//! the message that states it, the counts (`max_tokens`, log-probability alternatives,
//! `repeat_last_n`), and [`FieldReader`], the typed access to a JSON body that the job API's
//! [`validation`](super::validation) and the OpenAI [`request`](super::openai::request) readers
//! both build on.
//!
//! Where the two APIs differ on purpose, each keeps its own rule: `top_p` (the job API refuses
//! 0, OpenAI allows it), `top_k`, `seed`, the defaults, stop strings, what a non-boolean is
//! told, and which numbers count as integers.

use serde_json::{Map, Value};

use crate::generation::SamplingParams;

/// The most alternatives a token's log-probabilities may list.
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A number field's allowed range and the message that states it.
#[derive(Debug, Clone, Copy)]
pub struct NumberRule {
    pub field: &'static str,
    pub allows: fn(f64) -> bool,
    pub message: &'static str,
}

pub const TEMPERATURE: NumberRule = NumberRule {
    field: "temperature",
    allows: |t| (0.0..=2.0).contains(&t),
    message: "must be between 0 and 2",
};
/// OpenAI's `top_p`.
pub const TOP_P: NumberRule = NumberRule {
    field: "top_p",
    allows: |p| (0.0..=1.0).contains(&p),
    message: "must be between 0 and 1",
};
/// The job API's `top_p`: 0 is refused.
pub const TOP_P_ABOVE_ZERO: NumberRule = NumberRule {
    field: "top_p",
    allows: |p| p > 0.0 && p <= 1.0,
    message: "must be greater than 0 and at most 1",
};
pub const MIN_P: NumberRule = NumberRule {
    field: "min_p",
    allows: |p| (0.0..=1.0).contains(&p),
    message: "must be between 0 and 1",
};
pub const REPETITION_PENALTY: NumberRule = NumberRule {
    field: "repetition_penalty",
    allows: |p| p > 0.0 && p <= 2.0,
    message: "must be greater than 0 and at most 2",
};
pub const PRESENCE_PENALTY: NumberRule = NumberRule {
    field: "presence_penalty",
    allows: |p| (-2.0..=2.0).contains(&p),
    message: "must be between -2 and 2",
};
pub const FREQUENCY_PENALTY: NumberRule = NumberRule {
    field: "frequency_penalty",
    allows: |p| (-2.0..=2.0).contains(&p),
    message: "must be between -2 and 2",
};

/// Typed access to a JSON body's fields; `null` counts as absent. Each API records a broken
/// rule in its own error type and reads integers its own way; the rest is shared.
pub trait FieldReader<'a> {
    /// What a field that should be a boolean and is not is told.
    const NOT_A_BOOLEAN: &'static str;

    /// The body being read.
    fn body(&self) -> &'a Map<String, Value>;

    /// The field's value, `None` when absent or `null`.
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.body().get(name).filter(|v| !v.is_null())
    }

    /// Records a broken rule.
    fn fail(&mut self, name: &str, message: impl Into<String>);

    /// An integer, or `None` (a broken rule recorded unless absent).
    fn int(&mut self, name: &str) -> Option<i64>;

    fn boolean(&mut self, name: &str) -> Option<bool> {
        match self.get(name)? {
            Value::Bool(b) => Some(*b),
            _ => {
                self.fail(name, Self::NOT_A_BOOLEAN);
                None
            }
        }
    }

    fn number(&mut self, name: &str) -> Option<f64> {
        let n = self.get(name)?.as_f64();
        if n.is_none() {
            self.fail(name, "must be a number");
        }
        n
    }

    /// The number `rule` names, if present and within its range, as `f32`.
    fn ranged(&mut self, rule: &NumberRule) -> Option<f32> {
        let n = self.number(rule.field)?;
        if (rule.allows)(n) {
            Some(n as f32)
        } else {
            self.fail(rule.field, rule.message);
            None
        }
    }

    /// A count of at least 1 (`max_tokens`, `max_completion_tokens`).
    fn count(&mut self, name: &str) -> Option<usize> {
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
    fn alternatives(&mut self, name: &str) -> Option<usize> {
        match self.int(name)? {
            n if (0..=MAX_TOP_LOGPROBS).contains(&n) => Some(n as usize),
            _ => {
                self.fail(name, format!("must be between 0 and {MAX_TOP_LOGPROBS}"));
                None
            }
        }
    }
}

/// Reads the number-valued sampling fields into `s` in this order: `temperature`, `top_p` (by
/// the API's own rule), `min_p`, `repetition_penalty`, `presence_penalty`,
/// `frequency_penalty`. An absent or broken field keeps the default already in `s`.
pub fn read_sampling_numbers<'a>(
    f: &mut impl FieldReader<'a>,
    s: &mut SamplingParams,
    top_p: &NumberRule,
) {
    let fields: [(&NumberRule, &mut f32); 6] = [
        (&TEMPERATURE, &mut s.temperature),
        (top_p, &mut s.top_p),
        (&MIN_P, &mut s.min_p),
        (&REPETITION_PENALTY, &mut s.repetition_penalty),
        (&PRESENCE_PENALTY, &mut s.presence_penalty),
        (&FREQUENCY_PENALTY, &mut s.frequency_penalty),
    ];
    for (rule, value) in fields {
        if let Some(x) = f.ranged(rule) {
            *value = x;
        }
    }
}

/// `repeat_last_n`: how many recent tokens the penalties look at; -1 is the whole context.
pub fn read_repeat_last_n<'a>(
    f: &mut impl FieldReader<'a>,
    s: &mut SamplingParams,
    context_length: usize,
) {
    match f.int("repeat_last_n") {
        None => {}
        Some(-1) => s.repeat_last_n = context_length,
        Some(n) if n >= 0 => s.repeat_last_n = n as usize,
        Some(_) => f.fail("repeat_last_n", "must be -1 (whole context) or more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_include_their_ends_unless_open() {
        let allows = |rule: NumberRule, x: f64| (rule.allows)(x);
        assert!(allows(TEMPERATURE, 0.0) && allows(TEMPERATURE, 2.0));
        assert!(!allows(TEMPERATURE, -0.1) && !allows(TEMPERATURE, 2.1));
        assert!(allows(TOP_P, 0.0) && allows(TOP_P, 1.0));
        assert!(!allows(TOP_P_ABOVE_ZERO, 0.0) && allows(TOP_P_ABOVE_ZERO, 1.0));
        assert!(!allows(REPETITION_PENALTY, 0.0) && allows(REPETITION_PENALTY, 2.0));
        assert!(allows(PRESENCE_PENALTY, -2.0) && !allows(FREQUENCY_PENALTY, 2.5));
    }
}
