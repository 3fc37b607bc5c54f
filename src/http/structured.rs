//! Structured output as both APIs take it: the request fields that constrain the output
//! (OpenAI's `response_format`, vLLM's `structured_outputs` and its older `guided_*` fields,
//! llama-server's `json_schema` and `grammar`), read into one [`ConstraintSpec`], and compiled
//! off the async runtime into the job's [`Constraint`] before it is queued, so a schema or
//! grammar that cannot be used is a 400 naming the field.
//!
//! | field | value | constraint |
//! |---|---|---|
//! | `response_format` | `{"type": "text"}` | none |
//! | | `{"type": "json_object"}` (optional `schema`, llama-server) | any JSON object (or the schema) |
//! | | `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` | the schema (absent: any JSON) |
//! | `structured_outputs` (vLLM) | `{"json": schema or its text}`, `{"regex": ".."}`, `{"choice": [..]}`, `{"grammar": ".."}`, `{"json_object": true}` | as named; `grammar` is GBNF when it has `::=`, else Lark |
//! | `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (vLLM, older) | as above | as above |
//! | `json_schema` (llama-server) | a schema | the schema |
//! | `grammar` (llama-server) | GBNF; Lark after a `%llguidance` line | the grammar |
//!
//! At most one may be given. Each is at most [`MAX_CONSTRAINT_BYTES`] as JSON text.

use serde_json::Value;

use super::error::FieldError;
use super::fields::Fields;
use super::pipeline::off_the_runtime;
use crate::generation::{Constraint, ConstraintSpec};
use crate::jobs::ServedModel;

/// The largest schema or grammar a request may give (bytes of its JSON text).
pub const MAX_CONSTRAINT_BYTES: usize = 128 * 1024;

/// The constraint a request asked for, with the field that asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Requested {
    pub field: String,
    pub spec: ConstraintSpec,
}

impl Fields<'_> {
    /// The request's output constraint, if it asked for one; broken fields are recorded.
    pub fn constraint(&mut self) -> Option<Requested> {
        let mut found: Vec<Requested> = Vec::new();
        let mut given: Vec<&'static str> = Vec::new();
        for field in [
            "response_format",
            "structured_outputs",
            "guided_json",
            "guided_regex",
            "guided_choice",
            "guided_grammar",
            "json_schema",
            "grammar",
        ] {
            let Some(value) = self.get(field) else {
                continue;
            };
            let errors_before = self.error_count();
            if let Some(text) = too_big(value) {
                self.fail(field, text);
                given.push(field);
                continue;
            }
            let spec = match field {
                "response_format" => self.response_format(value),
                "structured_outputs" => self.structured_outputs(value),
                "guided_json" => self.schema_or_text(field, value),
                "guided_regex" => self.text(field, value).map(ConstraintSpec::Regex),
                "guided_choice" => self.choices(field, value),
                "guided_grammar" => self.text(field, value).map(grammar_text),
                "json_schema" => self.schema(field, value).map(ConstraintSpec::JsonSchema),
                _ => self.text(field, value).map(llama_grammar),
            };
            // `response_format: {"type": "text"}` asks for nothing.
            if spec.is_none() && self.error_count() == errors_before {
                continue;
            }
            given.push(field);
            if let Some(spec) = spec {
                found.push(Requested {
                    field: spec_field(field, value, &spec),
                    spec,
                });
            }
        }
        if given.len() > 1 {
            self.fail(
                given[1],
                format!(
                    "only one output constraint per request (also given: {})",
                    given[0]
                ),
            );
            return None;
        }
        found.pop()
    }

    fn response_format(&mut self, value: &Value) -> Option<ConstraintSpec> {
        const FIELD: &str = "response_format";
        let Value::Object(o) = value else {
            self.fail(FIELD, "must be an object");
            return None;
        };
        match o.get("type").and_then(Value::as_str) {
            Some("text") => None,
            Some("json_object") => match o.get("schema") {
                None | Some(Value::Null) => Some(ConstraintSpec::JsonObject),
                Some(s) => self
                    .schema("response_format.schema", s)
                    .map(ConstraintSpec::JsonSchema),
            },
            Some("json_schema") => {
                let inner = o
                    .get("json_schema")
                    .or_else(|| o.get("schema").map(|_| value));
                let schema = match inner {
                    Some(Value::Object(js)) => js.get("schema").filter(|s| !s.is_null()),
                    Some(_) => {
                        self.fail("response_format.json_schema", "must be an object");
                        return None;
                    }
                    None => {
                        self.fail(
                            "response_format.json_schema",
                            "required when type is json_schema",
                        );
                        return None;
                    }
                };
                if let Some(Value::Object(js)) = o.get("json_schema")
                    && let Some(name) = js.get("name")
                    && !name.is_string()
                {
                    self.fail("response_format.json_schema.name", "must be a string");
                }
                match schema {
                    // OpenAI allows a schema-less json_schema: any JSON value.
                    None => Some(ConstraintSpec::JsonSchema(serde_json::json!({}))),
                    Some(s) => self
                        .schema("response_format.json_schema.schema", s)
                        .map(ConstraintSpec::JsonSchema),
                }
            }
            Some(other) => {
                self.fail(
                    "response_format.type",
                    format!("unknown type `{other}` (text, json_object, json_schema)"),
                );
                None
            }
            None => {
                self.fail("response_format.type", "required (a string)");
                None
            }
        }
    }

    fn structured_outputs(&mut self, value: &Value) -> Option<ConstraintSpec> {
        const FIELD: &str = "structured_outputs";
        let Value::Object(o) = value else {
            self.fail(FIELD, "must be an object");
            return None;
        };
        let kinds: Vec<(&String, &Value)> = o
            .iter()
            .filter(|(k, v)| {
                !v.is_null()
                    && matches!(
                        k.as_str(),
                        "json" | "regex" | "choice" | "grammar" | "json_object" | "structural_tag"
                    )
            })
            .filter(|(k, v)| k.as_str() != "json_object" || **v != Value::Bool(false))
            .collect();
        let [(kind, v)] = kinds.as_slice() else {
            self.fail(
                FIELD,
                "must set exactly one of json, regex, choice, grammar, json_object",
            );
            return None;
        };
        let field = format!("{FIELD}.{kind}");
        match kind.as_str() {
            "json" => self.schema_or_text(&field, v),
            "regex" => self.text(&field, v).map(ConstraintSpec::Regex),
            "choice" => self.choices(&field, v),
            "grammar" => self.text(&field, v).map(grammar_text),
            "json_object" => match v {
                Value::Bool(true) => Some(ConstraintSpec::JsonObject),
                _ => {
                    self.fail(&field, "must be true");
                    None
                }
            },
            _ => {
                self.unsupported(&field, "structural tags are not supported");
                None
            }
        }
    }

    fn text(&mut self, field: &str, value: &Value) -> Option<String> {
        match value {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::String(_) => {
                self.fail(field, "must not be empty");
                None
            }
            _ => {
                self.fail(field, "must be a string");
                None
            }
        }
    }

    fn schema(&mut self, field: &str, value: &Value) -> Option<Value> {
        match value {
            Value::Object(_) | Value::Bool(_) => Some(value.clone()),
            _ => {
                self.fail(field, "must be a JSON schema (an object)");
                None
            }
        }
    }

    /// A schema, or its JSON text (vLLM takes either).
    fn schema_or_text(&mut self, field: &str, value: &Value) -> Option<ConstraintSpec> {
        let schema = match value {
            Value::String(s) => match serde_json::from_str::<Value>(s) {
                Ok(v) => v,
                Err(e) => {
                    self.fail(field, format!("is not JSON: {e}"));
                    return None;
                }
            },
            v => v.clone(),
        };
        self.schema(field, &schema).map(ConstraintSpec::JsonSchema)
    }

    fn choices(&mut self, field: &str, value: &Value) -> Option<ConstraintSpec> {
        let Value::Array(items) = value else {
            self.fail(field, "must be an array of strings");
            return None;
        };
        let choices: Option<Vec<String>> = items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect();
        match choices {
            Some(c) if !c.is_empty() && c.iter().all(|s| !s.is_empty()) => {
                Some(ConstraintSpec::Choice(c))
            }
            Some(c) if c.is_empty() => {
                self.fail(field, "must list at least one choice");
                None
            }
            Some(_) => {
                self.fail(field, "choices must not be empty strings");
                None
            }
            None => {
                self.fail(field, "must be an array of strings");
                None
            }
        }
    }
}

/// The field a compile error names: the innermost one that holds the schema or grammar.
fn spec_field(field: &str, value: &Value, spec: &ConstraintSpec) -> String {
    match (field, spec) {
        ("structured_outputs", ConstraintSpec::JsonSchema(_)) => "structured_outputs.json".into(),
        ("structured_outputs", ConstraintSpec::Regex(_)) => "structured_outputs.regex".into(),
        ("structured_outputs", ConstraintSpec::Choice(_)) => "structured_outputs.choice".into(),
        ("structured_outputs", ConstraintSpec::Gbnf(_) | ConstraintSpec::Lark(_)) => {
            "structured_outputs.grammar".into()
        }
        ("response_format", ConstraintSpec::JsonSchema(_)) => {
            if value.get("json_schema").is_some() {
                "response_format.json_schema.schema".into()
            } else {
                "response_format.schema".into()
            }
        }
        _ => field.to_string(),
    }
}

fn too_big(value: &Value) -> Option<String> {
    let len = match value {
        Value::String(s) => s.len(),
        v => v.to_string().len(),
    };
    (len > MAX_CONSTRAINT_BYTES).then(|| {
        format!("is {len} bytes, more than the {MAX_CONSTRAINT_BYTES} a constraint may have")
    })
}

/// vLLM's `grammar`: GBNF when it defines rules with `::=`, else llguidance's Lark.
fn grammar_text(text: String) -> ConstraintSpec {
    if text.contains("::=") {
        ConstraintSpec::Gbnf(text)
    } else {
        ConstraintSpec::Lark(text)
    }
}

/// llama-server's `grammar`: GBNF, or Lark after a `%llguidance` first line (as llama.cpp
/// built with llguidance reads it).
fn llama_grammar(text: String) -> ConstraintSpec {
    let trimmed = text.trim_start();
    match trimmed.strip_prefix("%llguidance") {
        Some(rest) => ConstraintSpec::Lark(
            rest.split_once('\n')
                .map_or("", |(_, body)| body)
                .to_string(),
        ),
        None => ConstraintSpec::Gbnf(text),
    }
}

/// Compiles the request's constraint with the served model's grammars: at once when it is
/// cached, else on the blocking pool. A constraint that cannot be compiled is the field's error.
pub async fn compile(
    served: &ServedModel,
    requested: Requested,
) -> Result<Result<Constraint, FieldError>, super::error::ApiError> {
    let grammars = served.grammars.clone();
    let size = if grammars.is_cached(&requested.spec) {
        0
    } else {
        usize::MAX
    };
    off_the_runtime(size, move || {
        grammars.compile(&requested.spec).map_err(|e| {
            FieldError::new(
                requested.field,
                format!("cannot be used as a {}: {e}", requested.spec.kind()),
            )
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::http::fields::read_openai;

    fn read(body: Value) -> (Option<Requested>, Vec<FieldError>) {
        read_openai(body, |f| f.constraint())
    }

    fn spec(body: Value) -> ConstraintSpec {
        let (c, errors) = read(body.clone());
        assert!(errors.is_empty(), "{body}: {errors:?}");
        c.unwrap_or_else(|| panic!("{body}: no constraint")).spec
    }

    fn error(body: Value) -> FieldError {
        let (_, errors) = read(body.clone());
        errors
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{body}: no error"))
    }

    #[test]
    fn every_spelling_reads() {
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            spec(json!({"response_format": {"type": "json_object"}})),
            ConstraintSpec::JsonObject
        );
        assert_eq!(
            spec(json!({"response_format": {"type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": true}}})),
            ConstraintSpec::JsonSchema(schema.clone())
        );
        assert_eq!(
            spec(json!({"response_format": {"type": "json_object", "schema": schema}})),
            ConstraintSpec::JsonSchema(schema.clone())
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"json": schema.to_string()}})),
            ConstraintSpec::JsonSchema(schema.clone())
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"regex": "a+", "json_object": false}})),
            ConstraintSpec::Regex("a+".into())
        );
        assert_eq!(
            spec(json!({"guided_choice": ["x", "y"]})),
            ConstraintSpec::Choice(vec!["x".into(), "y".into()])
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"grammar": "root ::= \"a\""}})),
            ConstraintSpec::Gbnf("root ::= \"a\"".into())
        );
        assert_eq!(
            spec(json!({"structured_outputs": {"grammar": "start: \"a\""}})),
            ConstraintSpec::Lark("start: \"a\"".into())
        );
        assert_eq!(
            spec(json!({"json_schema": schema})),
            ConstraintSpec::JsonSchema(schema)
        );
        assert_eq!(
            spec(json!({"grammar": "root ::= [0-9]+"})),
            ConstraintSpec::Gbnf("root ::= [0-9]+".into())
        );
        assert_eq!(
            spec(json!({"grammar": "%llguidance {}\nstart: /[0-9]+/"})),
            ConstraintSpec::Lark("start: /[0-9]+/".into())
        );
        let (c, errors) = read(json!({"response_format": {"type": "text"}}));
        assert!(c.is_none() && errors.is_empty());
    }

    #[test]
    fn broken_fields_are_named() {
        let cases = [
            (
                json!({"response_format": {"type": "xml"}}),
                "response_format.type",
            ),
            (json!({"response_format": {}}), "response_format.type"),
            (json!({"response_format": "json"}), "response_format"),
            (
                json!({"response_format": {"type": "json_schema"}}),
                "response_format.json_schema",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}),
                "response_format.json_schema.schema",
            ),
            (json!({"structured_outputs": {}}), "structured_outputs"),
            (
                json!({"structured_outputs": {"regex": "a", "choice": ["a"]}}),
                "structured_outputs",
            ),
            (
                json!({"structured_outputs": {"choice": []}}),
                "structured_outputs.choice",
            ),
            (
                json!({"structured_outputs": {"json": "{not json"}}),
                "structured_outputs.json",
            ),
            (json!({"grammar": ""}), "grammar"),
            (json!({"grammar": 5}), "grammar"),
            (
                json!({"grammar": "root ::= \"a\"", "json_schema": {}}),
                "grammar",
            ),
            (
                json!({"grammar": "x".repeat(MAX_CONSTRAINT_BYTES + 1)}),
                "grammar",
            ),
        ];
        for (body, field) in cases {
            assert_eq!(error(body.clone()).field, field, "{body}");
        }
        let e = error(json!({"structured_outputs": {"structural_tag": {}}}));
        assert_eq!(e.code, "unsupported_parameter");
    }
}
