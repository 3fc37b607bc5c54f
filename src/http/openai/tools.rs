//! Tool calling in `/v1/chat/completions`: the request's `tools`, `tool_choice` and
//! `parallel_tool_calls`, read and checked here; how the tools reach the prompt and how calls
//! come back out of the text is the model's tool format
//! ([`tool_calls`](crate::model::tool_calls)).
//!
//! | field | rule | default |
//! |---|---|---|
//! | `tools` | ≤ 128 `{"type": "function", "function": {"name", "description", "parameters", "strict"}}`; names 1–64 of `a-z A-Z 0-9 _ -`, unique | none |
//! | `tool_choice` | `none`, `auto`, `required`, or `{"type": "function", "function": {"name"}}` naming a tool | `auto` with tools |
//! | `parallel_tool_calls` | bool | true |
//!
//! `required` and a named function constrain the output with a grammar built from the tools'
//! schemas, so the call always parses; `auto` lets the model choose and parses what it wrote.
//! `none` leaves the tools out of the prompt.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::http::fields::Fields;
use crate::model::chat_template::ChatMessage;
use crate::model::tool_calls::{ToolChoice, ToolSpec, generic_system_prompt};

/// The most tools one request may list.
pub const MAX_TOOLS: usize = 128;

/// What the request asks of the tools.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<ToolSpec>,
    /// `None`: the model may answer or call (`auto`).
    pub forced: Option<ToolChoice>,
    pub parallel: bool,
}

impl Fields<'_> {
    /// The request's tools, or `None` when it has none (or `tool_choice` is `none`).
    pub fn tools(&mut self) -> Option<ToolRequest> {
        let tools = self.tool_list();
        let parallel = self.boolean("parallel_tool_calls").unwrap_or(true);
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
        let forced = match self.get("tool_choice") {
            None => Some(None),
            Some(Value::String(s)) => match s.as_str() {
                "none" => None,
                "auto" => Some(None),
                "required" if !tools.is_empty() => Some(Some(ToolChoice::Required)),
                "required" => {
                    self.fail("tool_choice", "`required` needs a non-empty `tools` list");
                    None
                }
                other => {
                    self.fail(
                        "tool_choice",
                        format!("unknown choice `{other}` (none, auto, required, or a function)"),
                    );
                    None
                }
            },
            Some(Value::Object(o)) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                match (o.get("type").and_then(Value::as_str), name) {
                    (Some("function"), Some(name)) if names.contains(&name) => {
                        Some(Some(ToolChoice::Named(name.to_string())))
                    }
                    (Some("function"), Some(name)) => {
                        self.fail(
                            "tool_choice.function.name",
                            format!("`{name}` is not one of the request's tools"),
                        );
                        None
                    }
                    (Some("function"), None) => {
                        self.fail("tool_choice.function.name", "required (a string)");
                        None
                    }
                    _ => {
                        self.fail(
                            "tool_choice",
                            "must be none, auto, required, or {\"type\": \"function\", \
                             \"function\": {\"name\": ...}}",
                        );
                        None
                    }
                }
            }
            Some(_) => {
                self.fail("tool_choice", "must be a string or an object");
                None
            }
        }?;
        if tools.is_empty() {
            return None;
        }
        Some(ToolRequest {
            tools,
            forced,
            parallel,
        })
    }

    fn tool_list(&mut self) -> Vec<ToolSpec> {
        let list = match self.get("tools") {
            None => return Vec::new(),
            Some(Value::Array(a)) => a,
            Some(_) => {
                self.fail("tools", "must be an array of tools");
                return Vec::new();
            }
        };
        if list.len() > MAX_TOOLS {
            self.fail("tools", format!("must list at most {MAX_TOOLS} tools"));
            return Vec::new();
        }
        let mut out: Vec<ToolSpec> = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let at = |field: &str| format!("tools[{i}].{field}");
            match item.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(other) => {
                    self.unsupported(
                        &at("type"),
                        format!("`{other}` tools are not supported (function only)"),
                    );
                    continue;
                }
                None => {
                    self.fail(&at("type"), "required (\"function\")");
                    continue;
                }
            }
            let Some(Value::Object(f)) = item.get("function") else {
                self.fail(&at("function"), "required (an object)");
                continue;
            };
            let name = match f.get("name") {
                Some(Value::String(n)) if valid_name(n) => n.clone(),
                Some(Value::String(_)) => {
                    self.fail(
                        &at("function.name"),
                        "must be 1–64 characters of a-z A-Z 0-9 _ -",
                    );
                    continue;
                }
                _ => {
                    self.fail(&at("function.name"), "required (a string)");
                    continue;
                }
            };
            if out.iter().any(|t| t.name == name) {
                self.fail(&at("function.name"), format!("`{name}` is listed twice"));
                continue;
            }
            let description = match f.get("description") {
                None | Some(Value::Null) => None,
                Some(Value::String(d)) => Some(d.clone()),
                Some(_) => {
                    self.fail(&at("function.description"), "must be a string");
                    continue;
                }
            };
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    self.fail(
                        &at("function.parameters"),
                        "must be a JSON schema (an object)",
                    );
                    continue;
                }
            };
            out.push(ToolSpec {
                name,
                description,
                parameters,
            });
        }
        out
    }
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The tools as the chat template receives them (`tools`): the request's own objects.
pub fn template_tools(tools: &[ToolSpec]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                let mut function = serde_json::Map::new();
                function.insert("name".into(), t.name.clone().into());
                if let Some(d) = &t.description {
                    function.insert("description".into(), d.clone().into());
                }
                function.insert("parameters".into(), t.parameters.clone());
                json!({"type": "function", "function": function})
            })
            .collect(),
    )
}

/// The conversation for a template that knows nothing of tools (the generic format): the
/// tools and the reply format join the system message, and earlier calls and results become
/// text in that format, so the model sees its own kind of answer in the history.
pub fn generic_conversation(
    messages: &mut Vec<ChatMessage>,
    tools: &[ToolSpec],
    template_source: &str,
) {
    let instructions = generic_system_prompt(tools);
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{instructions}", first.content);
        }
        _ => messages.insert(0, ChatMessage::new("system", instructions)),
    }
    // A template without a `tool` role of its own gets results as user turns.
    let knows_tool_role =
        template_source.contains("'tool'") || template_source.contains("\"tool\"");
    for m in messages.iter_mut() {
        if let Some(calls) = m.tool_calls.take() {
            let calls: Vec<Value> = calls
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| {
                            let f = c.get("function").unwrap_or(c);
                            json!({
                                "name": f.get("name").cloned().unwrap_or(Value::Null),
                                "arguments": f.get("arguments").cloned().unwrap_or(json!({})),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            m.content = json!({"tool_calls": calls}).to_string();
        } else if m.role == "tool" {
            m.content = json!({"tool_response": {
                "tool_call_id": m.tool_call_id.clone(),
                "content": m.content.clone(),
            }})
            .to_string();
            if !knows_tool_role {
                m.role = "user".into();
            }
        }
    }
}

/// Mistral's templates refuse call ids that are not nine alphanumerics, which is not what
/// OpenAI clients send back (`call_…`). Each such id in the history becomes nine alphanumerics
/// derived from it, the same in the assistant's call and in the tool result that answers it.
pub fn mistral_call_ids(messages: &mut [ChatMessage]) {
    fn nine(id: &str) -> String {
        if id.len() == 9 && id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return id.to_string();
        }
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let digest = Sha256::digest(id.as_bytes());
        digest[..9]
            .iter()
            .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
            .collect()
    }
    for m in messages.iter_mut() {
        if let Some(id) = &m.tool_call_id {
            m.tool_call_id = Some(nine(id));
        }
        if let Some(Value::Array(calls)) = &mut m.tool_calls {
            for call in calls {
                if let Some(Value::String(id)) = call.get_mut("id") {
                    *id = nine(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::FieldError;
    use crate::http::fields::read_openai;

    fn read(body: Value) -> (Option<ToolRequest>, Vec<FieldError>) {
        read_openai(body, |f| f.tools())
    }

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}})
    }

    #[test]
    fn tools_and_choices_read() {
        let (t, e) = read(json!({"tools": [weather()]}));
        assert!(e.is_empty());
        let t = t.unwrap();
        assert_eq!(t.tools[0].name, "get_weather");
        assert_eq!(t.forced, None);
        assert!(t.parallel);
        let (t, _) = read(json!({"tools": [weather()], "tool_choice": "required",
            "parallel_tool_calls": false}));
        let t = t.unwrap();
        assert_eq!(t.forced, Some(ToolChoice::Required));
        assert!(!t.parallel);
        let (t, _) = read(json!({"tools": [weather()],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}));
        assert_eq!(
            t.unwrap().forced,
            Some(ToolChoice::Named("get_weather".into()))
        );
        let (t, e) = read(json!({"tools": [weather()], "tool_choice": "none"}));
        assert!(t.is_none() && e.is_empty());
        let (t, e) = read(json!({"tools": [], "tool_choice": "auto"}));
        assert!(t.is_none() && e.is_empty());
        let (t, _) = read(json!({"tools": [{"type": "function", "function": {"name": "f"}}]}));
        assert_eq!(t.unwrap().tools[0].parameters["type"], "object");
    }

    #[test]
    fn broken_tools_name_the_field() {
        let cases = [
            (json!({"tools": {}}), "tools"),
            (
                json!({"tools": [{"type": "function"}]}),
                "tools[0].function",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
                "tools[0].function.name",
            ),
            (
                json!({"tools": [weather(), weather()]}),
                "tools[1].function.name",
            ),
            (
                json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}),
                "tools[0].function.parameters",
            ),
            (
                json!({"tools": [weather()], "tool_choice": "sometimes"}),
                "tool_choice",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice.function.name",
            ),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": [weather()], "parallel_tool_calls": 1}),
                "parallel_tool_calls",
            ),
        ];
        for (body, field) in cases {
            let (_, e) = read(body.clone());
            assert_eq!(e.first().map(|e| e.field.as_str()), Some(field), "{body}");
        }
        let (_, e) = read(json!({"tools": [{"type": "code_interpreter"}]}));
        assert_eq!(e[0].code, "unsupported_parameter");
    }

    #[test]
    fn mistral_ids_become_nine_alphanumerics_consistently() {
        let call = json!([{"id": "call_abc123XYZ789def456", "type": "function",
                           "function": {"name": "f", "arguments": {}}}]);
        let mut messages = vec![
            ChatMessage {
                tool_calls: Some(call),
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("call_abc123XYZ789def456".into()),
                ..ChatMessage::new("tool", "42")
            },
            ChatMessage {
                tool_call_id: Some("Ab3dE6gH9".into()),
                ..ChatMessage::new("tool", "7")
            },
        ];
        mistral_call_ids(&mut messages);
        let id = messages[0].tool_calls.as_ref().unwrap()[0]["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(id.len(), 9);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        assert_eq!(messages[1].tool_call_id.as_deref(), Some(id.as_str()));
        assert_eq!(messages[2].tool_call_id.as_deref(), Some("Ab3dE6gH9"));
    }
}
