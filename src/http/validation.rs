//! The rbee job request: its wire fields, their defaults, and validation into a typed
//! [`JobDraft`].
//!
//! The body is read as a JSON object and each known field is checked on its own, so one 400
//! lists every broken rule (a wrong type included) instead of stopping at the first. Fields
//! this worker does not know, such as the queen's `hive_id`, `worker_id`, `device` and
//! `stream`, are accepted and ignored.
//!
//! | field | type | rule | default |
//! |---|---|---|---|
//! | `operation` | string | `"infer"`; required on `/v1/jobs` | — |
//! | `job_id` | string | 1–128 of `A-Z a-z 0-9 . _ : -` | generated |
//! | `prompt` | string | non-empty; tokens + `max_tokens` ≤ context | required |
//! | `max_tokens` | integer | ≥ 1 | 256 |
//! | `temperature` | number | 0–2 (0 = greedy) | 0.8 |
//! | `top_p` | number | (0, 1] | 0.95 |
//! | `top_k` | integer | ≥ 0 (0 = off) | 40 |
//! | `min_p` | number | 0–1 | 0.05 |
//! | `repetition_penalty` | number | (0, 2] | 1.0 |
//! | `repeat_last_n` | integer | ≥ -1 (-1 = whole context) | 64 |
//! | `presence_penalty`, `frequency_penalty` | number | −2–2 | 0 |
//! | `seed` | integer | ≥ 0 | random (reported in `end`) |
//! | `stop` | string or array | ≤ 4 strings, each 1–100 bytes | none |
//! | `logprobs` | bool or integer | integer: alternatives, 0–20 | off |
//! | `top_logprobs` | integer | 0–20 (implies `logprobs`) | 0 |
//! | `ignore_eos` | bool | | false |
//! | `model` | string | the served model's name | the served one |
//! | `response_format`, `json_schema`, `grammar`, `structured_outputs`, `guided_*` | | one output constraint ([`structured`](super::structured)) | none |
//! | `cache_prompt` | bool | reuse a cached prefix of the prompt, keep this one's | true |
//! | `cache_salt` | string | caches are shared only under the same salt (and API key) | none |
//!
//! The sampling defaults are llama-server's.

use serde_json::{Map, Value};

use super::error::FieldError;
use super::fields::{Dialect, Fields, Rules};
use super::structured::Requested;
use crate::generation::{GenerationParams, SamplingParams};

pub const DEFAULT_MAX_TOKENS: usize = 256;
const MAX_JOB_ID_CHARS: usize = 128;

/// What a job request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct JobRules<'a> {
    pub model: Rules<'a>,
    /// `/v1/jobs` requires `operation`; `/v1/inference` also takes the queen's legacy body.
    pub operation_required: bool,
}

/// A request whose fields passed their own rules; the prompt still has to be tokenized and
/// fitted to the context ([`fit_max_tokens`](crate::generation::fit_max_tokens)).
#[derive(Debug, Clone, PartialEq)]
pub struct JobDraft {
    pub job_id: Option<String>,
    pub prompt: String,
    pub params: GenerationParams,
    /// The output constraint asked for, still to be compiled.
    pub constraint: Option<Requested>,
}

/// Reads every known field, pushing one [`FieldError`] per broken rule. The draft holds
/// defaults where a field was invalid; it is only used when `errors` stays empty.
pub fn parse_job_request(
    body: &Map<String, Value>,
    rules: &JobRules<'_>,
    errors: &mut Vec<FieldError>,
) -> JobDraft {
    let mut f = Fields::new(body, Dialect::Job);

    match f.string("operation") {
        Some("infer") => {}
        Some(other) => f.fail(
            "operation",
            format!("unknown operation `{other}` (supported: infer)"),
        ),
        None if rules.operation_required && !f.has("operation") => {
            f.fail("operation", "required (\"infer\")")
        }
        None => {}
    }

    let job_id = f.string("job_id").map(str::to_string);
    if let Some(id) = &job_id
        && !valid_job_id(id)
    {
        f.fail(
            "job_id",
            format!("must be 1–{MAX_JOB_ID_CHARS} characters of A-Z a-z 0-9 . _ : -"),
        );
    }

    let prompt = match f.string("prompt") {
        Some("") => {
            f.fail("prompt", "must not be empty");
            String::new()
        }
        Some(p) => p.to_string(),
        None => {
            if !f.has("prompt") {
                f.fail("prompt", "required");
            }
            String::new()
        }
    };

    let max_tokens = f.count("max_tokens").unwrap_or(DEFAULT_MAX_TOKENS);

    // llama-server's defaults.
    let mut sampling = SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        ..SamplingParams::greedy()
    };
    f.sampling(&mut sampling, rules.model.context_length);
    sampling.seed = f.seed();

    let stop = f.stop_strings();
    let logprobs = logprobs(&mut f);
    let ignore_eos = f.boolean("ignore_eos").unwrap_or(false);
    let (params, constraint) =
        f.generation_params(sampling, max_tokens, stop, ignore_eos, logprobs);

    if let Some(model) = f.string("model")
        && model != rules.model.model_id
    {
        let message = format!(
            "this worker serves `{}`, not `{model}`",
            rules.model.model_id
        );
        f.fail("model", message);
    }
    errors.extend(f.into_errors());

    JobDraft {
        job_id,
        prompt,
        params,
        constraint,
    }
}

fn valid_job_id(id: &str) -> bool {
    (1..=MAX_JOB_ID_CHARS).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// `logprobs: true | n` and `top_logprobs: n` → `Some(alternatives)`.
fn logprobs(f: &mut Fields<'_>) -> Option<usize> {
    let top = f.alternatives("top_logprobs");
    let asked = match f.get("logprobs") {
        None => None,
        Some(Value::Bool(b)) => b.then_some(0),
        Some(Value::Number(_)) => f.alternatives("logprobs"),
        Some(_) => {
            f.fail("logprobs", "must be true, false or an integer");
            None
        }
    };
    match (asked, top) {
        (Some(a), Some(t)) => Some(a.max(t)),
        (Some(a), None) => Some(a),
        (None, t) => t,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const RULES: JobRules<'static> = JobRules {
        model: Rules {
            model_id: "tiny",
            vocab_size: 100,
            context_length: 64,
        },
        operation_required: true,
    };

    fn parse(body: Value) -> (JobDraft, Vec<FieldError>) {
        let mut errors = Vec::new();
        let Value::Object(map) = body else {
            panic!("test bodies are objects")
        };
        let draft = parse_job_request(&map, &RULES, &mut errors);
        (draft, errors)
    }

    fn fields(errors: &[FieldError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn a_full_valid_request() {
        let (d, errors) = parse(json!({
            "operation": "infer", "prompt": "hi", "max_tokens": 5, "temperature": 0,
            "top_p": 0.5, "top_k": 3, "min_p": 0.1, "repetition_penalty": 1.1,
            "repeat_last_n": -1, "presence_penalty": -1, "frequency_penalty": 2,
            "seed": 7, "stop": ["a", "b"], "logprobs": true, "top_logprobs": 3,
            "model": "tiny", "job_id": "job-1", "hive_id": "h", "worker_id": 3,
            "device": "cpu:0", "stream": true
        }));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(d.job_id.as_deref(), Some("job-1"));
        assert_eq!(d.params.max_tokens, 5);
        assert_eq!(d.params.sampling.temperature, 0.0);
        assert_eq!(d.params.sampling.top_k, 3);
        assert_eq!(d.params.sampling.repeat_last_n, 64);
        assert_eq!(d.params.sampling.seed, 7);
        assert_eq!(d.params.stop, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(d.params.logprobs, Some(3));
    }

    #[test]
    fn every_broken_rule_is_listed() {
        let (_, errors) = parse(json!({
            "operation": "infer", "prompt": "", "max_tokens": 0, "temperature": 2.5,
            "top_p": 0, "min_p": 1.5, "repetition_penalty": 0, "presence_penalty": 3,
            "frequency_penalty": -3, "stop": ["1", "2", "3", "4", "5"], "model": "other",
            "seed": -1, "top_k": -2, "logprobs": 50
        }));
        let expected = "prompt max_tokens temperature top_p min_p repetition_penalty \
                        presence_penalty frequency_penalty top_k seed stop logprobs model";
        assert_eq!(fields(&errors).join(" "), expected);
    }

    #[test]
    fn wrong_types_are_field_errors() {
        let (_, errors) = parse(json!({
            "operation": "infer", "prompt": 5, "max_tokens": "ten", "temperature": "hot",
            "stop": [1, "x".repeat(101)], "ignore_eos": "yes", "logprobs": "all"
        }));
        let expected = "prompt max_tokens temperature stop[0] stop[1] logprobs ignore_eos";
        assert_eq!(fields(&errors).join(" "), expected);
    }

    #[test]
    fn operation_rules() {
        let (_, errors) = parse(json!({"prompt": "hi"}));
        assert_eq!(fields(&errors), vec!["operation"]);
        let (_, errors) = parse(json!({"operation": "train", "prompt": "hi"}));
        assert!(errors[0].message.contains("unknown operation `train`"));
        let mut errors = Vec::new();
        let legacy = JobRules {
            operation_required: false,
            ..RULES
        };
        let Value::Object(map) = json!({"prompt": "hi", "max_tokens": 3, "temperature": 0.7})
        else {
            unreachable!()
        };
        let d = parse_job_request(&map, &legacy, &mut errors);
        assert!(errors.is_empty());
        assert_eq!(d.params.max_tokens, 3);
    }

    #[test]
    fn defaults_and_a_random_seed() {
        let (d, errors) = parse(json!({"operation": "infer", "prompt": "hi", "stop": "x"}));
        assert!(errors.is_empty());
        assert_eq!(d.params.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(d.params.stop, vec!["x".to_string()]);
        assert_eq!(d.params.logprobs, None);
        let (d2, _) = parse(json!({"operation": "infer", "prompt": "hi"}));
        assert!(d.params.sampling.seed < (1 << 53));
        assert_ne!(d.params.sampling.seed, d2.params.sampling.seed);
    }

    #[test]
    fn job_ids() {
        assert!(valid_job_id("job-abc_1.2:3"));
        assert!(!valid_job_id(""));
        assert!(!valid_job_id("a b"));
        assert!(!valid_job_id("../x"));
        assert!(!valid_job_id(&"a".repeat(129)));
    }
}
