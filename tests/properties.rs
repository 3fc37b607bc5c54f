//! Property tests (proptest) of the worker's boundaries, each with a fixed number of cases:
//!
//! - request parsing, both APIs: any JSON body — arbitrary values, and valid requests with
//!   fields removed or given values of the wrong type, out of range, huge, nested or strange
//!   text — is a valid request or a 400 naming a field (the parsers directly, then through the
//!   router against the scripted fake model);
//! - tokenizers: text encodes and decodes back to itself (the default model's, the fake
//!   model's, and a byte-level GGUF vocabulary's);
//! - chat templates: any conversation renders or is refused with an error, and a rendered one
//!   shows every message's content;
//! - `Last-Event-ID`: any sequence of attaches, each reading some events and disconnecting,
//!   receives every event exactly once and in order (the job record's follower, then the SSE
//!   route); any header value is a resumption or a 400 naming the header.
//!
//! A failure proptest finds is kept as a fixed regression test below its property.

mod common;

use std::cell::Cell;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use common::default_model::default_model_path;
use common::fake_backend::{EOS, MODEL, ScriptedBackend, script_tokens, tiny_tokenizer};
use common::tiny_models::byte_vocab;
use common::worker::worker_config;
use futures_util::{FutureExt, StreamExt};
use llm_worker_rbee::engine::{CancelReason, EngineEvent, ErrorCode, FinishSummary, JobSink};
use llm_worker_rbee::generation::{FinishReason, TokenStep};
use llm_worker_rbee::http::error::FieldError;
use llm_worker_rbee::http::fields::Rules;
use llm_worker_rbee::http::openai::OpenAiError;
use llm_worker_rbee::http::openai::request::{parse_chat, parse_completion};
use llm_worker_rbee::http::validation::{JobRules, parse_job_request};
use llm_worker_rbee::jobs::{JobFollower, JobRecord};
use llm_worker_rbee::model::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use llm_worker_rbee::model::gguf::GgufFile;
use llm_worker_rbee::model::gguf_tokenizer::GgufVocab;
use llm_worker_rbee::model::tokenizer::{TextTokenizer, byte_level_chars};
use llm_worker_rbee::worker::{Worker, WorkerConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};
use tower::ServiceExt;

/// Runs `test` on `cases` values of `strategy`; a failure panics with the smallest failing
/// value proptest found. Nothing is persisted: a failure becomes a regression test here.
fn check<S>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

/// `Err` as a failed case.
fn fail(message: String) -> TestCaseError {
    TestCaseError::fail(message)
}

/// How many cases a property accepted and refused: a property that only ever saw one outcome
/// tested less than it claims.
#[derive(Default)]
struct Outcomes {
    accepted: Cell<u32>,
    refused: Cell<u32>,
}

impl Outcomes {
    fn count(&self, accepted: bool) {
        let c = if accepted {
            &self.accepted
        } else {
            &self.refused
        };
        c.set(c.get() + 1);
    }

    fn assert_both(&self, what: &str, min_each: u32) {
        let (a, r) = (self.accepted.get(), self.refused.get());
        assert!(
            a >= min_each && r >= min_each,
            "{what}: {a} accepted and {r} refused; expected at least {min_each} of each"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Generators

/// Arbitrary Unicode text: any scalar values (controls, NUL, combining marks, astral planes),
/// mixed with the text that requests and templates usually hold.
fn text(max_chars: usize) -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::collection::vec(any::<char>(), 0..max_chars).prop_map(String::from_iter),
        2 => prop::collection::vec(
            prop_oneof![
                Just("Hello".to_string()),
                Just(" world".to_string()),
                Just(", ".to_string()),
                Just("\n".to_string()),
                Just("\n\n".to_string()),
                Just("  ".to_string()),
                Just("\t".to_string()),
                Just("wörld".to_string()),
                Just("日本語".to_string()),
                Just("🦀👍🏽".to_string()),
                Just("e\u{301}".to_string()),
                Just("{{ x }}".to_string()),
                Just("{% if %}".to_string()),
                Just("\"quoted\\\"".to_string()),
                Just("'".to_string()),
                Just("\u{0}".to_string()),
                Just("\u{feff}".to_string()),
                Just("\r\n".to_string()),
                "[a-zA-Z0-9 ]{1,6}",
            ],
            0..max_chars.div_ceil(3).max(1),
        )
        .prop_map(|parts| parts.concat()),
        1 => "[a-z ]{0,12}",
    ]
    .boxed()
}

fn json_number() -> BoxedStrategy<Value> {
    prop_oneof![
        (-3i64..40).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |x| serde_json::Number::from_f64(x)
            .map(Value::Number)),
        prop::sample::select(vec![
            0.0,
            -0.0,
            0.1,
            0.5,
            1.0,
            1.5,
            2.0,
            2.5,
            -1.0,
            -2.5,
            5.0,
            20.0,
            21.0,
            1e-300,
            9e15,
            1e16,
            4294967296.0,
            1e20,
            1e308,
            -1e308,
        ])
        .prop_map(|x| json!(x)),
        prop::sample::select(vec![i64::MIN, -1, u32::MAX as i64 + 1, i64::MAX])
            .prop_map(Value::from),
    ]
    .boxed()
}

/// Every field either API reads, and the names of their inner fields.
const FIELDS: &[&str] = &[
    "operation",
    "job_id",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
    "model",
    "response_format",
    "json_schema",
    "grammar",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "cache_prompt",
    "cache_salt",
    "messages",
    "logit_bias",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "return_tokens_as_token_ids",
    "add_generation_prompt",
    "chat_template_kwargs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_format",
    "functions",
    "function_call",
    "modalities",
    "audio",
    "prediction",
    "web_search_options",
    "echo",
    "suffix",
    "user",
];
const INNER_FIELDS: &[&str] = &[
    "type",
    "text",
    "role",
    "content",
    "name",
    "function",
    "arguments",
    "json_schema",
    "schema",
    "include_usage",
    "id",
    "tool_calls",
    "tool_call_id",
    "parameters",
    "strict",
    "regex",
    "choice",
    "json",
    "grammar",
    "enable_thinking",
    "description",
    "properties",
    "required",
];

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(FIELDS).prop_map(str::to_string),
        2 => prop::sample::select(INNER_FIELDS).prop_map(str::to_string),
        1 => text(8),
    ]
    .boxed()
}

/// Any JSON value, nested up to four levels.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        text(24).prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
    .boxed()
}

/// A change to a request: a field set to a value, or removed.
#[derive(Debug, Clone)]
enum Edit {
    Set(String, Value),
    Remove(String),
    /// A field of the `i`th message (modulo their count) set to a value.
    SetInMessage(usize, String, Value),
}

fn edits() -> BoxedStrategy<Vec<Edit>> {
    let edit = prop_oneof![
        4 => (key(), json_value()).prop_map(|(k, v)| Edit::Set(k, v)),
        1 => key().prop_map(Edit::Remove),
        2 => (any::<usize>(), key(), json_value()).prop_map(|(i, k, v)| Edit::SetInMessage(i, k, v)),
    ];
    prop::collection::vec(edit, 0..4).boxed()
}

fn apply(mut body: Value, edits: &[Edit]) -> Value {
    let Some(map) = body.as_object_mut() else {
        return body;
    };
    for edit in edits {
        match edit {
            Edit::Set(k, v) => {
                map.insert(k.clone(), v.clone());
            }
            Edit::Remove(k) => {
                map.remove(k);
            }
            Edit::SetInMessage(i, k, v) => {
                if let Some(Value::Array(messages)) = map.get_mut("messages")
                    && !messages.is_empty()
                {
                    let n = messages.len();
                    if let Some(m) = messages[i % n].as_object_mut() {
                        m.insert(k.clone(), v.clone());
                    }
                }
            }
        }
    }
    body
}

/// Optional sampling fields with values inside their ranges.
fn sampling_fields() -> BoxedStrategy<Map<String, Value>> {
    (
        proptest::option::of(0.0f64..=2.0),
        proptest::option::of(0.01f64..=1.0),
        proptest::option::of(0u64..50),
        proptest::option::of(any::<u32>()),
        proptest::option::of(prop::collection::vec("[a-z!]{1,4}", 0..3)),
        proptest::option::of(any::<bool>()),
    )
        .prop_map(|(temperature, top_p, top_k, seed, stop, logprobs)| {
            let mut m = Map::new();
            let mut put = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            };
            put("temperature", temperature.map(Value::from));
            put("top_p", top_p.map(Value::from));
            put("top_k", top_k.map(Value::from));
            put("seed", seed.map(Value::from));
            put("stop", stop.map(Value::from));
            put("logprobs", logprobs.map(Value::from));
            m
        })
        .boxed()
}

/// A valid job request, then edits.
fn job_body() -> BoxedStrategy<Value> {
    let valid = (text(24), 1usize..12, sampling_fields(), any::<bool>()).prop_map(
        |(prompt, max_tokens, mut m, with_model)| {
            let prompt = if prompt.is_empty() {
                "x".into()
            } else {
                prompt
            };
            m.insert("operation".into(), "infer".into());
            m.insert("prompt".into(), prompt.into());
            m.insert("max_tokens".into(), max_tokens.into());
            if with_model {
                m.insert("model".into(), MODEL.into());
            }
            Value::Object(m)
        },
    );
    prop_oneof![
        4 => (valid, edits()).prop_map(|(body, edits)| apply(body, &edits)),
        1 => json_value(),
    ]
    .boxed()
}

fn message() -> BoxedStrategy<Value> {
    let role = prop_oneof![
        6 => prop::sample::select(vec!["system", "developer", "user", "assistant", "tool"])
            .prop_map(str::to_string),
        1 => text(8),
    ];
    let content = prop_oneof![
        4 => text(24).prop_map(Value::from),
        1 => prop::collection::vec(text(8), 0..3).prop_map(|parts| {
            Value::Array(
                parts
                    .into_iter()
                    .map(|t| json!({"type": "text", "text": t}))
                    .collect(),
            )
        }),
        1 => Just(Value::Null),
    ];
    let call = ("[a-zA-Z0-9_-]{1,12}", "[a-z_]{1,8}", json_value()).prop_map(|(id, name, args)| {
        let args = match args {
            Value::String(s) => Value::String(s),
            other => Value::String(other.to_string()),
        };
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
    });
    let tool_calls = prop_oneof![
        3 => prop::collection::vec(call, 1..3).prop_map(Value::Array),
        1 => json_value(),
    ];
    (
        role,
        content,
        proptest::option::weighted(0.15, tool_calls),
        proptest::option::weighted(0.1, text(8)),
        proptest::option::weighted(0.1, "[a-zA-Z0-9_-]{1,12}"),
    )
        .prop_map(|(role, content, tool_calls, name, tool_call_id)| {
            let mut m = json!({"role": role, "content": content});
            let o = m.as_object_mut().expect("object");
            if let Some(calls) = tool_calls {
                o.insert("tool_calls".into(), calls);
            }
            if let Some(name) = name {
                o.insert("name".into(), name.into());
            }
            if let Some(id) = tool_call_id {
                o.insert("tool_call_id".into(), id.into());
            }
            m
        })
        .boxed()
}

/// The variables chat templates read, with any values: what `chat_template_kwargs` may set.
fn template_kwargs() -> BoxedStrategy<Value> {
    let name = prop::sample::select(vec![
        "tools",
        "documents",
        "enable_thinking",
        "add_generation_prompt",
        "messages",
        "bos_token",
        "eos_token",
        "date_string",
        "custom_tools",
        "tools_in_user_message",
        "builtin_tools",
        "reasoning_content",
    ])
    .prop_map(str::to_string);
    prop::collection::vec((prop_oneof![4 => name, 1 => text(8)], json_value()), 0..3)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
        .boxed()
}

/// A valid chat request (mostly: a role may be unknown, a tool call malformed), then edits;
/// with `chat_template_kwargs` in `kwargs` of the requests.
fn chat_body(kwargs: f64) -> BoxedStrategy<Value> {
    let kwargs_strategy = if kwargs > 0.0 {
        proptest::option::weighted(kwargs, template_kwargs()).boxed()
    } else {
        Just(None).boxed()
    };
    let valid = (
        prop::collection::vec(message(), 1..4),
        1usize..6,
        sampling_fields(),
        any::<bool>(),
        1usize..3,
        kwargs_strategy,
    )
        .prop_map(|(messages, max_tokens, mut m, stream, n, kwargs)| {
            m.insert("messages".into(), messages.into());
            m.insert("max_tokens".into(), max_tokens.into());
            m.insert("stream".into(), stream.into());
            m.insert("n".into(), n.into());
            if let Some(kwargs) = kwargs {
                m.insert("chat_template_kwargs".into(), kwargs);
            }
            Value::Object(m)
        });
    prop_oneof![
        4 => (valid, edits()).prop_map(|(body, edits)| apply(body, &edits)),
        1 => json_value(),
    ]
    .boxed()
}

/// A valid completion request (text or token ids), then edits.
fn completion_body() -> BoxedStrategy<Value> {
    let prompt = prop_oneof![
        text(24).prop_map(Value::from),
        text(24).prop_map(|t| json!([t])),
        prop::collection::vec(0u32..300, 0..8).prop_map(|ids| json!(ids)),
    ];
    let valid = (prompt, 1usize..6, sampling_fields(), any::<bool>()).prop_map(
        |(prompt, max_tokens, mut m, stream)| {
            m.insert("prompt".into(), prompt);
            m.insert("max_tokens".into(), max_tokens.into());
            m.insert("stream".into(), stream.into());
            Value::Object(m)
        },
    );
    prop_oneof![
        4 => (valid, edits()).prop_map(|(body, edits)| apply(body, &edits)),
        1 => json_value(),
    ]
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// Request parsing: the parsers

const CONTEXT: usize = 512;
const RULES: Rules<'static> = Rules {
    model_id: MODEL,
    vocab_size: 259,
    context_length: CONTEXT,
};

/// The field a refusal names, without its path (`messages[0].content` → `messages`).
fn root(field: &str) -> &str {
    field.split(['[', '.']).next().unwrap_or(field)
}

/// A refused field must be one the body has, or one the API requires.
fn names_a_field(body: &Map<String, Value>, field: &str, required: &[&str]) -> bool {
    let r = root(field);
    !field.is_empty() && (body.contains_key(r) || required.contains(&r))
}

fn check_field_errors(
    body: &Map<String, Value>,
    errors: &[FieldError],
    required: &[&str],
) -> Result<(), TestCaseError> {
    for e in errors {
        if !names_a_field(body, &e.field, required) || e.message.is_empty() {
            return Err(fail(format!(
                "a refusal that names no field of the body: {e:?}"
            )));
        }
    }
    Ok(())
}

fn check_openai_error(
    body: &Map<String, Value>,
    e: &OpenAiError,
    required: &[&str],
) -> Result<(), TestCaseError> {
    let param = e.param.as_deref().unwrap_or("");
    let ok = match e.status {
        StatusCode::BAD_REQUEST => names_a_field(body, param, required) && !e.message.is_empty(),
        StatusCode::NOT_FOUND => param == "model" && e.code == Some("model_not_found"),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(fail(format!("not a 400 naming a field: {e:?}")))
    }
}

#[test]
fn job_requests_parse_or_name_their_broken_fields() {
    let rules = JobRules {
        model: RULES,
        operation_required: true,
    };
    let outcomes = Outcomes::default();
    check(3000, job_body(), |body| {
        let Value::Object(map) = body else {
            return Ok(());
        };
        let mut errors = Vec::new();
        let draft = parse_job_request(&map, &rules, &mut errors);
        outcomes.count(errors.is_empty());
        check_field_errors(&map, &errors, &["prompt", "operation"])?;
        if errors.is_empty() && draft.prompt.is_empty() {
            return Err(fail("accepted without a prompt".into()));
        }
        Ok(())
    });
    outcomes.assert_both("job requests", 300);
}

#[test]
fn chat_requests_parse_or_name_their_broken_fields() {
    let outcomes = Outcomes::default();
    check(3000, chat_body(0.3), |body| {
        let Value::Object(map) = body else {
            return Ok(());
        };
        let parsed = parse_chat(&map, &RULES);
        outcomes.count(parsed.is_ok());
        match parsed {
            Ok(request) if request.messages.is_empty() => {
                Err(fail("accepted without messages".into()))
            }
            Ok(_) => Ok(()),
            Err(e) => check_openai_error(&map, &e, &["messages"]),
        }
    });
    outcomes.assert_both("chat requests", 300);
}

#[test]
fn completion_requests_parse_or_name_their_broken_fields() {
    let outcomes = Outcomes::default();
    check(3000, completion_body(), |body| {
        let Value::Object(map) = body else {
            return Ok(());
        };
        let parsed = parse_completion(&map, &RULES);
        outcomes.count(parsed.is_ok());
        match parsed {
            Ok(_) => Ok(()),
            Err(e) => check_openai_error(&map, &e, &["prompt"]),
        }
    });
    outcomes.assert_both("completion requests", 300);
}

// ---------------------------------------------------------------------------------------------
// Request parsing: through the router

/// A multi-threaded runtime and a worker serving the fake model, with no socket: requests go
/// to the router with `oneshot`.
struct InProcess {
    rt: tokio::runtime::Runtime,
    worker: Worker,
}

impl InProcess {
    /// The fake model writing `script` (one token per `step_delay`), chat requests rendered
    /// with `template`.
    fn start(script: Vec<u32>, step_delay: Duration, template: Option<ChatTemplate>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let worker = rt.block_on(async {
            let worker = Worker::new(WorkerConfig {
                queue_capacity: 16,
                chat_template: template.map(Arc::new),
                ..worker_config(2)
            });
            worker
                .attach(ScriptedBackend::new(CONTEXT, script, step_delay))
                .expect("attach the fake model");
            worker
        });
        Self { rt, worker }
    }

    fn router(&self) -> Router {
        self.worker.router()
    }

    /// Sends a request; the status, the content type and the whole body (an SSE body to its
    /// end).
    fn send(&self, request: Request<Body>) -> (StatusCode, String, Vec<u8>) {
        self.rt.block_on(async {
            let response = tokio::time::timeout(common::WAIT, self.router().oneshot(request))
                .await
                .expect("an answer within the wait")
                .expect("infallible");
            let status = response.status();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = tokio::time::timeout(
                common::WAIT,
                axum::body::to_bytes(response.into_body(), usize::MAX),
            )
            .await
            .expect("the body ends within the wait")
            .expect("a readable body");
            (status, content_type, body.to_vec())
        })
    }

    fn post(&self, path: &str, body: &Value) -> (StatusCode, String, Vec<u8>) {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).expect("serializable")))
            .expect("request");
        self.send(request)
    }

    fn get(&self, path: &str, last_event_id: Option<HeaderValue>) -> Request<Body> {
        let mut request = Request::get(path).body(Body::empty()).expect("request");
        if let Some(v) = last_event_id {
            request.headers_mut().insert("last-event-id", v);
        }
        request
    }
}

fn json_of(bytes: &[u8]) -> Result<Value, TestCaseError> {
    serde_json::from_slice(bytes).map_err(|e| {
        fail(format!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(bytes)
        ))
    })
}

/// The last `data:` line of an SSE body.
fn last_data(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or("")
        .to_string()
}

/// The job API's answer to `sent`: a job (whose stream then ends with a sentinel), or a 400
/// naming the broken fields (the body, when it is not an object), or a 409 for a job id in
/// use.
fn check_job_answer(
    w: &InProcess,
    sent: &Value,
    status: StatusCode,
    bytes: &[u8],
) -> Result<(), TestCaseError> {
    let answer = json_of(bytes)?;
    let error = &answer["error"];
    match status.as_u16() {
        200 => {
            let id = answer["job_id"]
                .as_str()
                .ok_or_else(|| fail(format!("{answer}")))?;
            let path = format!("/v1/jobs/{id}/stream");
            prop_assert_eq!(answer["sse_url"].as_str(), Some(path.as_str()));
            let (status, content_type, events) = w.send(w.get(&path, None));
            prop_assert_eq!(status, StatusCode::OK);
            prop_assert_eq!(content_type, "text/event-stream");
            let sentinel = last_data(&events);
            prop_assert!(
                sentinel == "[DONE]" || sentinel.starts_with("[ERROR]"),
                "the stream ended with {:?}",
                sentinel
            );
        }
        400 => {
            prop_assert_eq!(&error["code"], "INVALID_REQUEST");
            let message = error["message"].as_str().unwrap_or("");
            let Some(body) = sent.as_object() else {
                prop_assert!(message.contains("JSON object"), "{}", answer);
                return Ok(());
            };
            let details = error["details"].as_array().cloned().unwrap_or_default();
            prop_assert!(!details.is_empty(), "a 400 without details: {}", answer);
            for d in &details {
                let field = d["field"].as_str().unwrap_or("");
                prop_assert!(
                    names_a_field(body, field, &["prompt", "operation"]),
                    "{} names no field of {}",
                    answer,
                    sent
                );
            }
            if let [one] = details.as_slice() {
                prop_assert!(
                    message.starts_with(one["field"].as_str().unwrap_or("?")),
                    "{}",
                    answer
                );
            }
        }
        409 => {
            prop_assert!(sent["job_id"].is_string(), "{}", answer);
            prop_assert_eq!(&error["code"], "JOB_ID_IN_USE");
        }
        _ => return Err(fail(format!("{status} for {sent}: {answer}"))),
    }
    Ok(())
}

/// An OpenAI route's answer to `sent`: a completion (JSON, or SSE ending with `[DONE]`), a
/// 400 whose `param` names a field, or a 404 for another model's name.
fn check_openai_answer(
    sent: &Value,
    required: &str,
    status: StatusCode,
    content_type: &str,
    bytes: &[u8],
) -> Result<(), TestCaseError> {
    if status == StatusCode::OK {
        if content_type == "text/event-stream" {
            prop_assert_eq!(last_data(bytes), "[DONE]");
            let text = String::from_utf8_lossy(bytes);
            prop_assert!(
                !text.contains("\"error\""),
                "an error in the stream: {}",
                text
            );
        } else {
            let answer = json_of(bytes)?;
            let n = sent["n"].as_f64().map_or(1, |n| n as usize);
            prop_assert_eq!(
                answer["choices"].as_array().map(Vec::len),
                Some(n),
                "{}",
                answer
            );
        }
        return Ok(());
    }
    let answer = json_of(bytes)?;
    let error = &answer["error"];
    let param = error["param"].as_str().unwrap_or("");
    let message = error["message"].as_str().unwrap_or("");
    match status.as_u16() {
        400 => {
            prop_assert_eq!(&error["type"], "invalid_request_error");
            prop_assert!(!message.is_empty());
            match sent.as_object() {
                None => prop_assert!(message.contains("JSON object"), "{}", answer),
                Some(body) => prop_assert!(
                    names_a_field(body, param, &[required]),
                    "{} names no field of {}",
                    answer,
                    sent
                ),
            }
        }
        404 => {
            prop_assert_eq!(param, "model");
            prop_assert!(sent["model"].is_string() && sent["model"] != MODEL);
        }
        _ => return Err(fail(format!("{status} for {sent}: {answer}"))),
    }
    Ok(())
}

/// The fake model ends every answer at once (its script is the end-of-text token), so a
/// request that is accepted costs one step; `ignore_eos` runs to `max_tokens`. Chat requests
/// are rendered with `template` (a fixture's file name; `None`: ChatML).
fn request_worker(template: Option<(&str, &str, &str)>) -> InProcess {
    let template = template.map(|(file, bos, eos)| {
        let source = std::fs::read_to_string(template_path(file)).expect("template");
        ChatTemplate::new(&source, bos, eos).expect("compiles")
    });
    InProcess::start(vec![EOS], Duration::ZERO, template)
}

#[test]
fn the_job_route_answers_any_body_with_a_job_or_a_400_naming_a_field() {
    let w = request_worker(None);
    let outcomes = Outcomes::default();
    check(1000, job_body(), |body| {
        let (status, _, bytes) = w.post("/v1/jobs", &body);
        outcomes.count(status.is_success());
        check_job_answer(&w, &body, status, &bytes)
    });
    outcomes.assert_both("the job route", 100);
}

/// Templates that read tools and thinking (Qwen3), raise on conversations they refuse
/// (Llama 3.1, Mistral Nemo, which also rewrites tool call ids), and plain ChatML.
const CHAT_TEMPLATES: [Option<(&str, &str, &str)>; 4] = [
    Some(("qwen3-0.6b.jinja", "", "<|im_end|>")),
    Some((
        "llama-3.1-8b-instruct.jinja",
        "<|begin_of_text|>",
        "<|eot_id|>",
    )),
    Some(("mistral-nemo-instruct-2407.jinja", "<s>", "</s>")),
    None,
];

#[test]
fn the_chat_route_answers_any_body_with_a_completion_or_a_400_naming_a_field() {
    for template in CHAT_TEMPLATES {
        let w = request_worker(template);
        let outcomes = Outcomes::default();
        check(500, chat_body(0.0), |body| {
            let (status, content_type, bytes) = w.post("/v1/chat/completions", &body);
            outcomes.count(status.is_success());
            check_openai_answer(&body, "messages", status, &content_type, &bytes)
                .map_err(|e| fail(format!("{template:?}: {e}")))
        });
        outcomes.assert_both(&format!("the chat route with {template:?}"), 5);
    }
}

/// Found by the chat route property: request values a template cannot render — a template
/// variable given a value it cannot use through `chat_template_kwargs`, or a tool call in the
/// history that is not a call — failed the rendering and were answered with a 500. They are the
/// client's mistake: a 400 naming the field.
#[test]
fn request_values_the_template_cannot_render_are_400s() {
    let qwen3 = CHAT_TEMPLATES[0];
    let llama = CHAT_TEMPLATES[1];
    let user = json!([{"role": "user", "content": "hi"}]);
    let fixed = [
        (
            qwen3,
            json!({"messages": user, "chat_template_kwargs": {"tools": 5}}),
        ),
        (
            llama,
            json!({"messages": user, "chat_template_kwargs": {"date_string": null}}),
        ),
        (
            qwen3,
            json!({"messages": [{"role": "assistant", "content": "", "tool_calls": [null]}]}),
        ),
    ];
    for (template, body) in fixed {
        let w = request_worker(template);
        let (status, content_type, bytes) = w.post("/v1/chat/completions", &body);
        if let Err(e) = check_openai_answer(&body, "messages", status, &content_type, &bytes) {
            panic!("{template:?}: {e}");
        }
    }
    for template in CHAT_TEMPLATES {
        let w = request_worker(template);
        check(500, chat_body(0.5), |body| {
            let (status, content_type, bytes) = w.post("/v1/chat/completions", &body);
            check_openai_answer(&body, "messages", status, &content_type, &bytes)
                .map_err(|e| fail(format!("{template:?}: {e}")))
        });
    }
}

#[test]
fn the_completions_route_answers_any_body_with_a_completion_or_a_400_naming_a_field() {
    let w = request_worker(None);
    let outcomes = Outcomes::default();
    check(1000, completion_body(), |body| {
        let (status, content_type, bytes) = w.post("/v1/completions", &body);
        outcomes.count(status.is_success());
        check_openai_answer(&body, "prompt", status, &content_type, &bytes)
    });
    outcomes.assert_both("the completions route", 100);
}

// ---------------------------------------------------------------------------------------------
// Tokenizers

/// The default model's tokenizer (GPT-2 byte-level BPE, SmolLM2's vocabulary).
fn default_tokenizer() -> TextTokenizer {
    let file = GgufFile::open(&default_model_path()).expect("open the default model");
    TextTokenizer::from_gguf_vocab(&file.vocab().expect("vocabulary")).expect("tokenizer")
}

/// A GGUF byte-level vocabulary without merges (the tiny test models').
fn byte_gguf_tokenizer() -> TextTokenizer {
    let vocab = GgufVocab {
        model: "gpt2".into(),
        pre: Some("default".into()),
        tokens: byte_vocab(),
        token_types: Some(vec![1; 256]),
        scores: None,
        merges: Some(Vec::new()),
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        unknown_token_id: None,
        padding_token_id: None,
        add_bos_token: Some(false),
        add_eos_token: None,
        add_space_prefix: None,
    };
    TextTokenizer::from_gguf_vocab(&vocab).expect("tokenizer")
}

/// Text, and text with the tokenizer's special-token markers in it.
fn tokenizer_text(markers: Vec<String>) -> BoxedStrategy<String> {
    if markers.is_empty() {
        return text(48);
    }
    let piece = prop_oneof![
        4 => text(16),
        1 => prop::sample::select(markers),
    ];
    prop::collection::vec(piece, 0..6)
        .prop_map(|p| p.concat())
        .boxed()
}

/// The bytes no token of `tokenizer`'s byte-level alphabet stands for.
fn bytes_without_a_token(tokenizer: &TextTokenizer) -> Vec<u8> {
    let chars = byte_level_chars();
    (0..=255u8)
        .filter(|&b| {
            tokenizer
                .token_to_id(&chars[b as usize].to_string())
                .is_none()
        })
        .collect()
}

/// Byte-level tokenizers have no normalizer and, when every byte has a token, encode any text;
/// so every string round-trips exactly: marker text encoded literally, and markers parsed as
/// special tokens and rendered back.
///
/// A vocabulary may lack tokens for bytes its training text never had (SmolLM2's lacks the
/// control characters 04, 06, 13, 14, 16, 1D and the UTF-8 lead bytes C0, C1, F1, F2, F5–FF,
/// so also every character from U+40000 to U+BFFFF). Such bytes are dropped when encoding, as
/// llama.cpp's BPE tokenizer drops them, and cannot round-trip: the characters holding them
/// are left out of the generated text.
fn check_round_trips(tokenizer: &TextTokenizer, markers: &[&str], cases: u32) {
    let markers: Vec<String> = markers.iter().map(|m| m.to_string()).collect();
    for m in &markers {
        assert!(tokenizer.token_to_id(m).is_some(), "{m} is a token");
    }
    let missing = bytes_without_a_token(tokenizer);
    let representable = move |s: String| -> String {
        s.chars()
            .filter(|c| {
                let mut buf = [0; 4];
                !c.encode_utf8(&mut buf)
                    .bytes()
                    .any(|b| missing.contains(&b))
            })
            .collect()
    };
    check(
        cases,
        tokenizer_text(markers).prop_map(representable),
        |s| {
            let literal = tokenizer
                .encode(&s, false)
                .map_err(|e| fail(e.to_string()))?;
            let back = tokenizer
                .decode(&literal, true)
                .map_err(|e| fail(e.to_string()))?;
            prop_assert_eq!(&back, &s, "literal: {:?}", literal);
            let parsed = tokenizer
                .encode(&s, true)
                .map_err(|e| fail(e.to_string()))?;
            let back = tokenizer
                .decode(&parsed, true)
                .map_err(|e| fail(e.to_string()))?;
            prop_assert_eq!(&back, &s, "special tokens parsed: {:?}", parsed);
            // Without markers both encodings agree, and rendering specials changes nothing.
            if literal == parsed {
                let plain = tokenizer
                    .decode(&parsed, false)
                    .map_err(|e| fail(e.to_string()))?;
                prop_assert_eq!(&plain, &s);
            }
            Ok(())
        },
    );
}

#[test]
fn the_default_models_tokenizer_round_trips_any_text() {
    let t = default_tokenizer();
    check_round_trips(&t, &["<|im_start|>", "<|im_end|>", "<|endoftext|>"], 2000);
}

#[test]
fn the_fake_models_tokenizer_round_trips_any_text() {
    let t = tiny_tokenizer();
    check_round_trips(&t, &["<|im_start|>", "<|im_end|>", "<|endoftext|>"], 1000);
    // Without merges, a token is a byte.
    check(200, text(32), |s| {
        prop_assert_eq!(t.encode(&s, false).unwrap(), script_tokens(&s));
        Ok(())
    });
}

#[test]
fn a_byte_level_gguf_vocabulary_round_trips_any_text() {
    check_round_trips(&byte_gguf_tokenizer(), &[], 1000);
}

// ---------------------------------------------------------------------------------------------
// Chat templates

fn template_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/chat_templates")
        .join(name)
}

/// How a template shows the first message when it is the system prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SystemPrompt {
    /// Always shown.
    Shown,
    /// Put into the first user turn: lost when no message follows (Mistral v0.2).
    InFirstUserTurn,
    /// Put into the last user turn: lost unless the conversation ends with one (Mistral
    /// Nemo).
    InLastUserTurn,
}

/// The templates under test: the fixtures (with the special tokens their models use), the
/// default model's own, and ChatML.
fn templates() -> Vec<(String, ChatTemplate, SystemPrompt)> {
    let fixtures = [
        (
            "smollm2-135m-instruct.jinja",
            "<|im_start|>",
            "<|im_end|>",
            SystemPrompt::Shown,
        ),
        (
            "llama-3.1-8b-instruct.jinja",
            "<|begin_of_text|>",
            "<|eot_id|>",
            SystemPrompt::Shown,
        ),
        (
            "llama-3.2-3b-instruct.jinja",
            "<|begin_of_text|>",
            "<|eot_id|>",
            SystemPrompt::Shown,
        ),
        (
            "qwen2.5-7b-instruct.jinja",
            "",
            "<|im_end|>",
            SystemPrompt::Shown,
        ),
        ("qwen3-0.6b.jinja", "", "<|im_end|>", SystemPrompt::Shown),
        (
            "mistral-7b-instruct-v0.2.jinja",
            "<s>",
            "</s>",
            SystemPrompt::InFirstUserTurn,
        ),
        (
            "mistral-nemo-instruct-2407.jinja",
            "<s>",
            "</s>",
            SystemPrompt::InLastUserTurn,
        ),
        (
            "phi-3-mini-4k-instruct.jinja",
            "<s>",
            "<|endoftext|>",
            SystemPrompt::Shown,
        ),
        (
            "phi-3.5-mini-instruct.jinja",
            "<s>",
            "<|endoftext|>",
            SystemPrompt::Shown,
        ),
    ];
    let mut out: Vec<(String, ChatTemplate, SystemPrompt)> = fixtures
        .into_iter()
        .map(|(file, bos, eos, system)| {
            let source = std::fs::read_to_string(template_path(file)).expect("template");
            let t = ChatTemplate::new(&source, bos, eos)
                .unwrap_or_else(|e| panic!("{file}: {e}"))
                .with_fixed_now(1_726_395_630);
            (file.to_string(), t, system)
        })
        .collect();
    let file = GgufFile::open(&default_model_path()).expect("open the default model");
    let vocab = file.vocab().expect("vocabulary");
    let token = |id: Option<u32>| {
        id.and_then(|i| vocab.tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };
    let source = file
        .get_str("tokenizer.chat_template")
        .expect("a string")
        .expect("the default model has a template");
    let own = ChatTemplate::new(
        source,
        &token(vocab.bos_token_id),
        &token(vocab.eos_token_id),
    )
    .expect("the default model's template compiles");
    out.push(("the default model's".into(), own, SystemPrompt::Shown));
    out.push(("ChatML".into(), ChatTemplate::chatml(), SystemPrompt::Shown));
    out
}

/// Well-formed tool calls, or any JSON in their place.
fn tool_calls() -> BoxedStrategy<Value> {
    let call = ("[a-zA-Z0-9]{9}", "[a-z_]{1,8}", json_value()).prop_map(|(id, name, args)| {
        json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
    });
    prop_oneof![
        3 => prop::collection::vec(call, 1..3).prop_map(Value::Array),
        1 => json_value(),
    ]
    .boxed()
}

fn chat_message() -> BoxedStrategy<ChatMessage> {
    let role = prop_oneof![
        8 => prop::sample::select(vec!["system", "user", "assistant", "tool"])
            .prop_map(str::to_string),
        1 => text(8),
    ];
    (
        role,
        text(40),
        proptest::option::weighted(0.2, text(8)),
        proptest::option::weighted(0.2, tool_calls()),
        proptest::option::weighted(0.2, "[a-zA-Z0-9]{9}"),
    )
        .prop_map(
            |(role, content, name, tool_calls, tool_call_id)| ChatMessage {
                role,
                content,
                name,
                tool_calls,
                tool_call_id,
            },
        )
        .boxed()
}

/// Characters both Rust and Python strip as whitespace, and then some: a shorter needle is
/// still found wherever the whole content is.
fn trimmed(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The messages whose content the template must show: the standard roles' without tool calls
/// (a call replaces the content in the Llama templates), a first system message only where
/// the template keeps it, and Qwen3's assistant messages only without `</think>` (it splits the
/// thinking out of them).
fn shown_contents<'m>(
    name: &str,
    system: SystemPrompt,
    messages: &'m [ChatMessage],
) -> Vec<&'m str> {
    let last_is_user = messages.last().is_some_and(|m| m.role == "user");
    messages
        .iter()
        .enumerate()
        .filter(|(i, m)| {
            matches!(m.role.as_str(), "system" | "user" | "assistant")
                && m.tool_calls.is_none()
                && !(name.starts_with("qwen3") && m.content.contains("</think>"))
                && !(*i == 0
                    && m.role == "system"
                    && match system {
                        SystemPrompt::Shown => false,
                        SystemPrompt::InFirstUserTurn => messages.len() < 2,
                        SystemPrompt::InLastUserTurn => !last_is_user || messages.len() < 2,
                    })
        })
        .map(|(_, m)| trimmed(&m.content))
        .collect()
}

#[test]
fn any_conversation_renders_or_is_refused_and_shows_every_message() {
    let templates = templates();
    let strategy = (
        prop::collection::vec(chat_message(), 0..6),
        any::<bool>(),
        proptest::option::weighted(0.2, json_value()),
    );
    for (name, template, system) in &templates {
        let outcomes = Outcomes::default();
        check(
            500,
            strategy.clone(),
            |(messages, add_generation_prompt, tools)| {
                let mut extra = Map::new();
                if let Some(tools) = tools {
                    extra.insert("tools".into(), tools);
                }
                let result = template.render_with_context(&messages, add_generation_prompt, &extra);
                outcomes.count(result.is_ok());
                let text = match result {
                    // The template refused the conversation, or failed on a value it cannot
                    // use; either way with a message saying so.
                    Err(e @ (ChatTemplateError::Raised(_) | ChatTemplateError::Render { .. })) => {
                        prop_assert!(e.to_string().len() > 30, "{}: {}", name, e);
                        return Ok(());
                    }
                    Err(e) => return Err(fail(format!("{name}: {e}"))),
                    Ok(text) => text,
                };
                if !extra.is_empty() {
                    // Tools may reshape the conversation (a tool prompt in the first user turn).
                    return Ok(());
                }
                for content in shown_contents(name, *system, &messages) {
                    prop_assert!(
                        text.contains(content),
                        "{}: {:?} is not in the prompt {:?}",
                        name,
                        content,
                        text
                    );
                }
                Ok(())
            },
        );
        let rendered = outcomes.accepted.get();
        assert!(
            rendered >= 10,
            "{name}: only {rendered} conversations rendered"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Last-Event-ID: the job record's follower

/// One step of a client's life against a job that is still producing events.
#[derive(Debug, Clone)]
enum Step {
    /// The engine logs this many more events (tokens, or queue updates before the start).
    Produce(usize),
    /// The client attaches after the last event it received, receives up to this many events
    /// (what the follower has; it does not wait) and disconnects.
    Attach(usize),
}

fn steps() -> impl Strategy<Value = (usize, Vec<Step>, u8)> {
    let step = prop_oneof![
        (1usize..6).prop_map(Step::Produce),
        (0usize..8).prop_map(Step::Attach),
    ];
    (0usize..3, prop::collection::vec(step, 0..30), 0u8..3)
}

fn token(index: usize) -> EngineEvent {
    EngineEvent::Token(TokenStep {
        token: index as u32,
        index,
        text: format!("t{index}"),
        logprobs: None,
        finish: None,
    })
}

/// The events a client following `record` after `after` receives before it stops waiting,
/// at most `limit`; the events a batch held beyond those never reached it.
fn receive(record: &Arc<JobRecord>, after: u64, limit: usize) -> Vec<(u64, EngineEvent)> {
    let mut follower = JobFollower::new(record.clone(), after);
    let mut got = Vec::new();
    while got.len() < limit {
        match follower.next_batch().now_or_never() {
            Some(batch) if !batch.is_empty() => {
                got.extend(batch.into_iter().take(limit - got.len()));
            }
            // Ended, or nothing to read now.
            _ => break,
        }
    }
    got
}

#[test]
fn reattaching_after_the_last_event_received_receives_each_event_once_in_order() {
    check(3000, steps(), |(queued, steps, ending)| {
        let max_tokens = 64;
        let record = JobRecord::new("job".into(), max_tokens);
        let mut produced_tokens = 0;
        let mut started = false;
        let mut queue_left = queued;
        let produce = |n: usize, started: &mut bool, tokens: &mut usize, queue: &mut usize| {
            for _ in 0..n {
                if *queue > 0 {
                    // Queue updates replace each other in the log.
                    record.emit(EngineEvent::Queued { position: *queue });
                    *queue -= 1;
                } else if !*started {
                    record.emit(EngineEvent::Started {
                        at: std::time::SystemTime::UNIX_EPOCH,
                    });
                    *started = true;
                } else if *tokens < max_tokens {
                    record.emit(token(*tokens));
                    *tokens += 1;
                }
            }
        };
        let mut received: Vec<(u64, EngineEvent)> = Vec::new();
        let last = |received: &[(u64, EngineEvent)]| received.last().map_or(0, |(id, _)| *id);
        for step in &steps {
            match step {
                Step::Produce(n) => {
                    produce(*n, &mut started, &mut produced_tokens, &mut queue_left)
                }
                Step::Attach(k) => {
                    let got = receive(&record, last(&received), *k);
                    received.extend(got);
                }
            }
        }
        produce(2, &mut started, &mut produced_tokens, &mut queue_left);
        record.emit(match ending {
            0 => EngineEvent::Cancelled {
                reason: CancelReason::Client,
            },
            1 => EngineEvent::Failed {
                code: ErrorCode::InferenceFailed,
                message: "boom".into(),
            },
            _ => EngineEvent::Finished(FinishSummary {
                reason: FinishReason::MaxTokens,
                tokens_in: 1,
                tokens_cached: 0,
                tokens_out: produced_tokens,
                seed: 0,
            }),
        });
        // Then the client reads on to the end, one event per attach.
        let mut attaches = 0;
        while received.last().is_none_or(|(_, e)| !e.is_terminal()) {
            attaches += 1;
            prop_assert!(attaches < 1000, "no end after {} attaches", attaches);
            let got = receive(&record, last(&received), 1);
            prop_assert!(!got.is_empty(), "nothing after {}", last(&received));
            received.extend(got);
        }
        // After the end, nothing more.
        prop_assert!(receive(&record, last(&received), 10).is_empty());

        let log = record.events_after(0, usize::MAX);
        let ids: Vec<u64> = received.iter().map(|(id, _)| *id).collect();
        prop_assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids not increasing: {:?}",
            ids
        );
        // Queue updates a client saw may have been replaced since; every other event it
        // received exactly once, as logged.
        let not_queued = |events: &[(u64, EngineEvent)]| -> Vec<(u64, EngineEvent)> {
            events
                .iter()
                .filter(|(_, e)| !matches!(e, EngineEvent::Queued { .. }))
                .cloned()
                .collect()
        };
        prop_assert_eq!(not_queued(&received), not_queued(&log));
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Last-Event-ID: through the SSE route

/// One SSE event as received: its name, id and data (`None` name: the sentinel).
#[derive(Debug, Clone, PartialEq)]
struct Received {
    event: Option<String>,
    id: Option<u64>,
    data: String,
}

/// Reads up to `limit` events of a stream response, then drops it (the client disconnects).
async fn read_events(body: Body, limit: usize) -> Vec<Received> {
    let mut chunks = body.into_data_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    while out.len() < limit {
        if let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut e = Received {
                event: None,
                id: None,
                data: String::new(),
            };
            let mut any = false;
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => e.event = Some(value.to_string()),
                    "id" => e.id = value.parse().ok(),
                    "data" => e.data.push_str(value),
                    _ => continue,
                }
                any = true;
            }
            if any {
                out.push(e);
            }
            continue;
        }
        match tokio::time::timeout(common::WAIT, chunks.next()).await {
            Ok(Some(Ok(chunk))) => buf.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(_) => break,
            Err(_) => panic!("no event within the wait"),
        }
    }
    out
}

/// How a client writes `Last-Event-ID`: the server trims it and reads a decimal number.
fn header(id: u64, style: u8) -> HeaderValue {
    let text = match style % 4 {
        0 => id.to_string(),
        1 => format!(" {id}\t"),
        2 => format!("000{id}"),
        _ => format!("+{id}"),
    };
    HeaderValue::from_str(&text).expect("a header value")
}

#[test]
fn reattaching_to_the_sse_route_receives_each_event_once_in_order() {
    // One token per millisecond, so that some attaches find the job running.
    let w = InProcess::start(
        script_tokens("Hello, world! "),
        Duration::from_millis(1),
        None,
    );
    let strategy = (
        1usize..24,
        prop::collection::vec((0usize..6, any::<u8>()), 0..12),
        0u64..3,
    );
    check(64, strategy, |(max_tokens, attaches, wait_ms)| {
        let (status, _, bytes) = w.post(
            "/v1/jobs",
            &json!({"operation": "infer", "prompt": "Hi", "max_tokens": max_tokens, "temperature": 0}),
        );
        prop_assert_eq!(status, StatusCode::OK);
        let id = json_of(&bytes)?["job_id"].as_str().unwrap().to_string();
        let path = format!("/v1/jobs/{id}/stream");
        let stream = |last: Option<HeaderValue>, limit: usize| {
            w.rt.block_on(async {
                let response = w
                    .router()
                    .oneshot(w.get(&path, last))
                    .await
                    .expect("infallible");
                assert_eq!(response.status(), StatusCode::OK);
                read_events(response.into_body(), limit).await
            })
        };
        let mut received: Vec<Received> = Vec::new();
        let mut last_id: Option<u64> = None;
        let mut plan = attaches.into_iter();
        let mut rounds = 0;
        while received.last().is_none_or(|e| e.event.is_some()) {
            rounds += 1;
            prop_assert!(rounds < 500, "no sentinel after {} attaches", rounds);
            // The attaches planned, then one at a time to the end.
            let (limit, style) = plan.next().unwrap_or((1, 0));
            std::thread::sleep(Duration::from_millis(wait_ms));
            let got = stream(last_id.map(|id| header(id, style)), limit);
            if let Some(id) = got.iter().rev().find_map(|e| e.id) {
                last_id = Some(id);
            }
            received.extend(got);
        }
        let whole = stream(None, usize::MAX);
        prop_assert_eq!(&received, &whole);
        prop_assert!(whole.last().is_some_and(|e| e.data == "[DONE]"));
        Ok(())
    });
}

#[test]
fn any_last_event_id_resumes_or_is_a_400_naming_the_header() {
    let w = InProcess::start(script_tokens("Hello, world! "), Duration::ZERO, None);
    let (status, _, bytes) = w.post(
        "/v1/jobs",
        &json!({"operation": "infer", "prompt": "Hi", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(status, StatusCode::OK);
    let id = serde_json::from_slice::<Value>(&bytes).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/v1/jobs/{id}/stream");
    let whole = w.rt.block_on(async {
        let response = w.router().oneshot(w.get(&path, None)).await.unwrap();
        read_events(response.into_body(), usize::MAX).await
    });
    let newest = whole
        .iter()
        .filter_map(|e| e.id)
        .max()
        .expect("events with ids");
    let value = prop_oneof![
        (0..newest + 3, any::<u8>()).prop_map(|(id, style)| header(id, style).as_bytes().to_vec()),
        prop::collection::vec(
            prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff],
            0..12
        ),
        prop::sample::select(vec![
            b"-1".to_vec(),
            b"18446744073709551615".to_vec(),
            b"18446744073709551616".to_vec(),
            b"1e3".to_vec(),
            b"0x1".to_vec(),
            b"   ".to_vec(),
            "\u{e9}".as_bytes().to_vec(),
        ]),
    ];
    check(512, value, |raw| {
        let Ok(value) = HeaderValue::from_bytes(&raw) else {
            return Ok(());
        };
        let (status, _, body) = w.send(w.get(&path, Some(value)));
        let resumable = std::str::from_utf8(&raw)
            .ok()
            .filter(|t| t.is_ascii())
            .map(str::trim)
            .is_some_and(|t| t.is_empty() || t.parse::<u64>().is_ok_and(|n| n <= newest));
        if resumable {
            prop_assert_eq!(
                status,
                StatusCode::OK,
                "{:?}",
                String::from_utf8_lossy(&body)
            );
        } else {
            prop_assert_eq!(status, StatusCode::BAD_REQUEST);
            let answer = json_of(&body)?;
            prop_assert_eq!(&answer["error"]["details"][0]["field"], "Last-Event-ID");
        }
        Ok(())
    });
}
