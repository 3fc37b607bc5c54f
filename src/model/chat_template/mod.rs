//! Chat-template rendering that matches Hugging Face transformers.
//!
//! Models ship a Jinja chat template (GGUF metadata `tokenizer.chat_template`,
//! `chat_template` in `tokenizer_config.json`, or a `chat_template.jinja`
//! file). The prompt must be rendered exactly as transformers'
//! `apply_chat_template` renders it, or the model sees different tokens than
//! it was trained on.
//!
//! References:
//! - transformers `src/transformers/utils/chat_template_utils.py`
//!   (`_compile_jinja_template`, `render_jinja_template`): the environment is
//!   an `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`
//!   with the `loopcontrols` extension, the `{% generation %}` tag, a `tojson`
//!   filter that is `json.dumps(x, ensure_ascii=False, indent=..,
//!   separators=.., sort_keys=..)`, and the globals `raise_exception`,
//!   `strftime_now`, `dict` and `namespace`. The template is rendered with
//!   `messages`, `tools`, `documents`, `add_generation_prompt`, the special
//!   tokens and any extra keyword arguments.
//! - transformers docs, "Chat templates" / "Writing a chat template".
//! - Jinja2's default `Undefined` (missing keys render empty, attribute access
//!   on an undefined value fails), which minijinja's lenient mode mirrors.
//!
//! Python-only behaviour is recreated in the submodules: `python` (`str()`-style
//! printing of `None`, booleans, floats, lists and dicts, and Jinja2's type
//! tests), `json` (`tojson` as `json.dumps`) and `dates` (`strftime_now`).
//! This module builds the environment from them and owns the public API.
//! Python string/list/dict methods come from `minijinja_contrib::pycompat`.
//! Known gaps are listed on [`ChatTemplate`].

mod dates;
mod json;
mod python;

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Deserializer, Serialize};

use dates::strftime_now_fn;
use json::{json_to_value, tojson_filter};
use python::{is_callable, is_iterable, is_sequence, python_formatter, python_str, string_filter};

/// Name under which the single template lives inside its environment.
const TEMPLATE_NAME: &str = "chat_template";

/// Plain ChatML, used when a model carries no template of its own.
const CHATML_TEMPLATE: &str = "{%- for message in messages %}\
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// One message of a conversation, as the template sees it.
///
/// It reaches the template as a mapping, so both `message['role']` and
/// `message.role` work. Optional fields are left out of the mapping when they
/// are `None`, as transformers drops `None`-valued keys: templates test them
/// with `is defined` or `'tool_calls' in message`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    /// OpenAI clients send `null` content on tool-call turns; it reads as "".
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls, e.g. `[{"id": .., "type": "function", "function": {"name": .., "arguments": {..}}}]`.
    /// Templates pass `arguments` through `tojson`, so callers should hand
    /// them over as JSON objects rather than as encoded strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }

    /// The mapping the template sees; key order follows the struct.
    fn to_value(&self) -> Value {
        let mut pairs: Vec<(&str, Value)> = vec![
            ("role", Value::from(self.role.as_str())),
            ("content", Value::from(self.content.as_str())),
        ];
        if let Some(name) = &self.name {
            pairs.push(("name", Value::from(name.as_str())));
        }
        if let Some(calls) = &self.tool_calls {
            pairs.push(("tool_calls", json_to_value(calls)));
        }
        if let Some(id) = &self.tool_call_id {
            pairs.push(("tool_call_id", Value::from(id.as_str())));
        }
        Value::from_pairs(pairs)
    }
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// Why a template could not be built or rendered.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template does not compile.
    #[error("chat template syntax error{}: {message}", at_line(*.line))]
    Syntax {
        line: Option<usize>,
        message: String,
    },
    /// Rendering failed inside the template engine (undefined value, bad
    /// operand, unknown filter, ...).
    #[error("chat template render error{}: {message}", at_line(*.line))]
    Render {
        line: Option<usize>,
        message: String,
    },
    /// The template called `raise_exception(message)`: the conversation is
    /// one the model does not accept (e.g. roles that do not alternate).
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// A `tokenizer_config.json` whose chat template or special tokens have
    /// an unexpected shape.
    #[error("invalid tokenizer config: {0}")]
    InvalidConfig(String),
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// Carried as the source of the engine error that `raise_exception` returns,
/// so that it can be told apart from engine failures.
#[derive(Debug)]
struct RaisedException(String);

impl fmt::Display for RaisedException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// A compiled chat template.
///
/// Compiled once, then rendered from any number of threads (`Send + Sync`).
///
/// Known differences from transformers (none affects the templates under
/// `tests/data/chat_templates`):
/// - `strftime_now` formats the current time in UTC; transformers uses the
///   host's local time.
/// - Looping over `none` renders nothing; Jinja2 raises `TypeError`. So a
///   tool-use-only template given no tools renders where transformers fails.
/// - No `%` string formatting (`'%s' % x`); `.format()` works.
/// - `range(..)`, `namespace(..)` and filter results such as `map(..)` are
///   plain lists/maps, not Python generators or objects: they print, measure
///   and serialize like lists/maps where Python would print a repr or raise.
/// - `~` prints very large or small floats in plain notation (`1e+20` in
///   Python); `{{ }}` output, `string` and `tojson` do match.
/// - Jinja2 filters not in minijinja or minijinja-contrib (`wordcount`,
///   `truncate` with positional arguments, `center`, `xmlattr`, ...) fail
///   at render time.
/// - Only `bos_token` and `eos_token` are provided among the special tokens;
///   others can be passed through [`render_with_context`](Self::render_with_context).
/// - Key order of mappings follows insertion order only when the
///   `preserve_order` features of `minijinja` and `serde_json` are enabled;
///   otherwise `tojson` of tool schemas comes out key-sorted.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `source`. Syntax errors come back as
    /// [`ChatTemplateError::Syntax`] with the template's line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| syntax_error(&e, source))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_formatter(python_formatter);
        env.add_filter("tojson", tojson_filter);
        env.add_filter("string", string_filter);
        env.add_test("iterable", is_iterable);
        env.add_test("sequence", is_sequence);
        env.add_test("callable", is_callable);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now_fn(None));
        env.add_template_owned(TEMPLATE_NAME, strip_generation_tags(source).into_owned())
            .map_err(|e| syntax_error(&e, source))?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Plain ChatML for models without a template:
    /// `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
    /// `<|im_start|>assistant\n` when a generation prompt is asked for. No
    /// default system prompt. bos is empty, eos is `<|im_end|>`.
    pub fn chatml() -> Self {
        // A constant template; the unit tests compile it.
        Self::new(CHATML_TEMPLATE, "", "<|im_end|>").expect("built-in ChatML template compiles")
    }

    /// Reads the template and special tokens from a Hugging Face
    /// `tokenizer_config.json`.
    ///
    /// `chat_template` may be a string, a list of `{"name", "template"}`
    /// objects, or an object mapping names to templates. `name` picks one of
    /// several named templates (`None` means `"default"`, as in
    /// transformers); with a single template, only `None` or `"default"` is
    /// accepted. `bos_token`/`eos_token` may be strings, `null`/missing
    /// (empty), or `{"content": ...}` objects.
    ///
    /// Returns `Ok(None)` when the config has no `chat_template` (newer
    /// models keep it in a separate `chat_template.jinja`: build that one
    /// with [`ChatTemplate::new`] and [`ChatTemplate::special_tokens_from_config`]).
    pub fn from_tokenizer_config(
        config: &serde_json::Value,
        name: Option<&str>,
    ) -> Result<Option<Self>, ChatTemplateError> {
        let Some(source) = select_template(config, name)? else {
            return Ok(None);
        };
        let (bos, eos) = Self::special_tokens_from_config(config)?;
        Self::new(source, &bos, &eos).map(Some)
    }

    /// `(bos_token, eos_token)` from a `tokenizer_config.json`; a missing or
    /// `null` token is the empty string.
    pub fn special_tokens_from_config(
        config: &serde_json::Value,
    ) -> Result<(String, String), ChatTemplateError> {
        let obj = config
            .as_object()
            .ok_or_else(|| ChatTemplateError::InvalidConfig("expected a JSON object".into()))?;
        Ok((
            special_token(obj, "bos_token")?,
            special_token(obj, "eos_token")?,
        ))
    }

    /// Pins the clock that `strftime_now` reads, for reproducible prompts
    /// (Llama 3.2 puts today's date in its system header).
    pub fn with_fixed_now(mut self, unix_seconds: i64) -> Self {
        self.env
            .add_function("strftime_now", strftime_now_fn(Some(unix_seconds)));
        self
    }

    /// Renders a conversation, as `apply_chat_template(messages,
    /// add_generation_prompt=..., tokenize=False)` does.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_context(messages, add_generation_prompt, &serde_json::Map::new())
    }

    /// Like [`render`](Self::render), with extra template variables, as the
    /// keyword arguments of `apply_chat_template`: `tools` (a list of JSON
    /// schemas), `documents`, `date_string`, `enable_thinking`, ... They
    /// override `bos_token`/`eos_token` but not `messages` or
    /// `add_generation_prompt`.
    pub fn render_with_context(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        // transformers always passes `tools` and `documents`, as None when
        // absent, so `tools is defined` holds.
        let mut ctx: Vec<(String, Value)> = vec![
            ("bos_token".into(), Value::from(self.bos_token.as_str())),
            ("eos_token".into(), Value::from(self.eos_token.as_str())),
            ("tools".into(), Value::from(())),
            ("documents".into(), Value::from(())),
        ];
        for (key, value) in extra {
            if key == "messages" || key == "add_generation_prompt" {
                continue;
            }
            ctx.retain(|(k, _)| k != key);
            ctx.push((key.clone(), json_to_value(value)));
        }
        let messages: Vec<Value> = messages.iter().map(ChatMessage::to_value).collect();
        ctx.push(("messages".into(), Value::from(messages)));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| render_error(&e))?;
        template
            .render(Value::from_pairs(ctx))
            .map_err(|e| render_error(&e))
    }

    /// The template source as given (before any internal rewriting).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

// ---------------------------------------------------------------------------
// tokenizer_config.json

fn select_template<'a>(
    config: &'a serde_json::Value,
    name: Option<&str>,
) -> Result<Option<&'a str>, ChatTemplateError> {
    let obj = config
        .as_object()
        .ok_or_else(|| ChatTemplateError::InvalidConfig("expected a JSON object".into()))?;
    let wanted = name.unwrap_or("default");
    match obj.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => {
            if wanted == "default" {
                Ok(Some(s))
            } else {
                Err(ChatTemplateError::InvalidConfig(format!(
                    "chat template {wanted:?} requested, but the config has a single unnamed template"
                )))
            }
        }
        Some(serde_json::Value::Array(list)) => {
            let mut names = Vec::new();
            for entry in list {
                let entry_name = entry.get("name").and_then(|v| v.as_str());
                let template = entry.get("template").and_then(|v| v.as_str());
                let (Some(entry_name), Some(template)) = (entry_name, template) else {
                    return Err(ChatTemplateError::InvalidConfig(
                        "chat_template list entries must be {\"name\": string, \"template\": string}"
                            .into(),
                    ));
                };
                if entry_name == wanted {
                    return Ok(Some(template));
                }
                names.push(entry_name);
            }
            Err(missing_named_template(wanted, &names))
        }
        Some(serde_json::Value::Object(map)) => match map.get(wanted) {
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ChatTemplateError::InvalidConfig(format!(
                "chat template {wanted:?} is not a string"
            ))),
            None => {
                let names: Vec<&str> = map.keys().map(String::as_str).collect();
                Err(missing_named_template(wanted, &names))
            }
        },
        Some(other) => Err(ChatTemplateError::InvalidConfig(format!(
            "chat_template must be a string or a list of named templates, got {}",
            json_type_name(other)
        ))),
    }
}

fn missing_named_template(wanted: &str, names: &[&str]) -> ChatTemplateError {
    ChatTemplateError::InvalidConfig(format!(
        "no chat template named {wanted:?} (available: {})",
        names.join(", ")
    ))
}

fn special_token(
    obj: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<String, ChatTemplateError> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        // transformers' serialized AddedToken: {"__type": "AddedToken", "content": ..., ...}
        Some(serde_json::Value::Object(token)) => match token.get("content") {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            _ => Err(ChatTemplateError::InvalidConfig(format!(
                "{key} object has no string \"content\""
            ))),
        },
        Some(other) => Err(ChatTemplateError::InvalidConfig(format!(
            "{key} must be a string, null or {{\"content\": ...}}, got {}",
            json_type_name(other)
        ))),
    }
}

fn json_type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------
// Errors

fn describe(err: &Error) -> String {
    match err.detail() {
        Some(detail) => format!("{}: {detail}", err.kind()),
        None => err.kind().to_string(),
    }
}

fn syntax_error(err: &Error, source: &str) -> ChatTemplateError {
    let line = err.line();
    let mut message = describe(err);
    let text = line
        .and_then(|l| source.lines().nth(l.saturating_sub(1)))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    if let Some(text) = text {
        let short: String = text.chars().take(120).collect();
        let _ = write!(message, " (in `{short}`)");
    }
    ChatTemplateError::Syntax { line, message }
}

fn render_error(err: &Error) -> ChatTemplateError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return ChatTemplateError::Raised(raised.0.clone());
        }
        cur = e.source();
    }
    ChatTemplateError::Render {
        line: err.line(),
        message: describe(err),
    }
}

fn raise_exception(message: &Value) -> Result<Value, Error> {
    let message = python_str(message);
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

// ---------------------------------------------------------------------------
// Template source rewriting

/// transformers registers a `{% generation %}...{% endgeneration %}` block
/// tag that only marks assistant spans; it renders its body unchanged.
/// minijinja has no custom tags, so the pair becomes `{% if true %}` /
/// `{% endif %}`, which keeps the whitespace-control markers as they were.
fn strip_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        let (before, tag) = rest.split_at(pos);
        out.push_str(before);
        let body = &tag[2..];
        let marker_len = body
            .chars()
            .next()
            .filter(|c| *c == '-' || *c == '+')
            .map_or(0, char::len_utf8);
        let after_marker = &body[marker_len..];
        let trimmed = after_marker.trim_start();
        let ws_len = after_marker.len() - trimmed.len();
        let word_len = trimmed
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(trimmed.len());
        let word = &trimmed[..word_len];
        let replacement = match word {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(rep) => {
                out.push_str("{%");
                out.push_str(&body[..marker_len + ws_len]);
                out.push_str(rep);
                rest = &trimmed[word_len..];
            }
            None => {
                out.push_str("{%");
                rest = body;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    /// Where the rendering fixtures live: `tests/data/chat_templates` under the
    /// crate root, unless `CHAT_TEMPLATE_FIXTURES_DIR` was set at build time (a
    /// crate that compiles this module from another checkout sets it).
    fn fixtures_dir() -> PathBuf {
        match option_env!("CHAT_TEMPLATE_FIXTURES_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat_templates"),
        }
    }

    pub(super) fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    pub(super) fn render_src(
        src: &str,
        messages: &[ChatMessage],
    ) -> Result<String, ChatTemplateError> {
        ChatTemplate::new(src, "<s>", "</s>")?.render(messages, false)
    }

    #[test]
    fn chatml_renders_plain_chatml() {
        let t = ChatTemplate::chatml();
        let m = msgs(&[
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello"),
            ("user", "Bye"),
        ]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&msgs(&[("user", "Hi")]), false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
        assert_eq!(t.render(&[], true).unwrap(), "<|im_start|>assistant\n");
        assert_eq!(t.source(), CHATML_TEMPLATE);
        assert_eq!(t.eos_token(), "<|im_end|>");
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let src = "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}";
        match ChatTemplate::new(src, "", "") {
            Err(ChatTemplateError::Syntax { line, message }) => {
                assert_eq!(line, Some(3));
                assert!(message.contains("syntax error"), "{message}");
                assert!(message.contains("{% if %}"), "{message}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        let err = ChatTemplate::new("{{ messages[0] ", "", "").unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::Syntax { line: Some(1), .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("chat template syntax error at line 1: "),
            "{err}"
        );
        let err = ChatTemplate::new("a\n{% endfor %}", "", "").unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::Syntax { line: Some(2), .. }),
            "{err:?}"
        );
    }

    #[test]
    fn raise_exception_surfaces_as_raised() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('First message must be from the user!') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&msgs(&[("user", "x")]), false).unwrap(), "ok");
        let err = t.render(&msgs(&[("assistant", "x")]), false).unwrap_err();
        assert_eq!(
            err,
            ChatTemplateError::Raised("First message must be from the user!".into())
        );
        // Raised inside a macro and a loop still reads as Raised.
        let src = "{% macro check(m) %}{% if m.role == 'tool' %}{{ raise_exception('no tools: ' ~ m.content) }}{% endif %}{% endmacro %}\
                   {% for m in messages %}{{ check(m) }}{% endfor %}";
        let err = render_src(src, &msgs(&[("user", "a"), ("tool", "b")])).unwrap_err();
        assert_eq!(err, ChatTemplateError::Raised("no tools: b".into()));
    }

    #[test]
    fn render_errors_are_not_raised() {
        // Attribute access on an undefined value fails, as in Jinja2.
        let err = render_src("{{ messages[0]['role'] }}", &[]).unwrap_err();
        assert!(
            matches!(err, ChatTemplateError::Render { line: Some(1), .. }),
            "{err:?}"
        );
        let err = render_src("{{ raise_exception() }}", &[]).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render { .. }), "{err:?}");
        let err = render_src("{{ messages | nosuchfilter }}", &[]).unwrap_err();
        assert!(matches!(err, ChatTemplateError::Render { .. }), "{err:?}");
    }

    #[test]
    fn undefined_is_lenient_like_jinja2() {
        let m = msgs(&[("user", "hi")]);
        let src = "[{{ messages[0].name }}][{{ messages[0]['nope'] }}][{{ nothing }}]\
                   {{ messages[0].name is defined }} {{ nothing is defined }} {{ tools is defined }} {{ tools is none }}\
                   {% for x in nothing %}never{% endfor %}{% if nothing %}never{% endif %}";
        assert_eq!(render_src(src, &m).unwrap(), "[][][]False False True True");
        let mut named = ChatMessage::new("user", "hi");
        named.name = Some("bob".into());
        assert_eq!(
            render_src("{{ messages[0].name }} {{ 'name' in messages[0] }} {{ 'tool_calls' in messages[0] }}", &[named]).unwrap(),
            "bob True False"
        );
    }

    #[test]
    fn environment_has_what_hf_templates_use() {
        let m = msgs(&[
            ("system", "  sys  "),
            ("user", "a b  c"),
            ("assistant", "x"),
        ]);
        let src = "{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|\
                   {{ messages[0].content.strip() }}|{{ messages[1]['content'].split() }}|\
                   {{ messages[1].content.upper() }}|{{ messages[2].content.startswith('x') }}|\
                   {% for k, v in messages[0].items() %}{{ k }}={{ v|trim }};{% endfor %}|\
                   {% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}\
                   {% set ns.n = ns.n + 1 %}{% if m.role == 'assistant' %}{% break %}{% endif %}{% endfor %}{{ ns.n }}|\
                   {{ dict(a=1)['a'] }}|{{ messages[-1]['role'] }}|{{ (messages | length) }}|{{ 'x'.join(['a', 'b']) }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<s>|</s>|True|sys|['a', 'b', 'c']|A B  C|True|role=system;content=sys;|2|1|assistant|3|axb"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_are_on() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        assert_eq!(
            render_src(src, &msgs(&[("user", "a"), ("user", "b")])).unwrap(),
            "a\nb\n"
        );
        // A single trailing newline is dropped, like Jinja2's keep_trailing_newline=False.
        assert_eq!(render_src("x\n", &[]).unwrap(), "x");
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%}\n {{ m.content }} {%- endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "u"), ("assistant", "a")]), false)
                .unwrap(),
            "ua"
        );
        assert_eq!(t.source(), src);
        assert_eq!(
            strip_generation_tags("{{ 'generation' }}"),
            "{{ 'generation' }}"
        );
        assert_eq!(
            strip_generation_tags("{%+ generation %}x{% endgeneration -%}"),
            "{%+ if true %}x{% endif -%}"
        );
    }

    #[test]
    fn extra_context_and_defaults() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{{ date_string }}{{ tools | length }}{{ messages | length }}",
            "<s>",
            "",
        )
        .unwrap();
        let extra =
            json!({"bos_token": "B", "date_string": "D", "tools": [1, 2], "messages": "ignored"});
        let extra = extra.as_object().unwrap();
        assert_eq!(
            t.render_with_context(&msgs(&[("user", "u")]), false, extra)
                .unwrap(),
            "BD21"
        );
    }

    #[test]
    fn tool_calls_reach_the_template() {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(
            json!([{"type": "function", "function": {"name": "f", "arguments": {"b": 1, "a": "x"}}}]),
        );
        let tool = ChatMessage {
            tool_call_id: Some("c1".into()),
            ..ChatMessage::new("tool", "42")
        };
        let src = "{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{{ m.tool_calls[0].function.arguments | tojson }}\
                   {% else %}[{{ m.tool_call_id }}:{{ m.content }}]{% endif %}{% endfor %}";
        assert_eq!(
            render_src(src, &[call, tool]).unwrap(),
            r#"f{"b": 1, "a": "x"}[c1:42]"#
        );
    }

    #[test]
    fn chat_message_serde() {
        let m: ChatMessage =
            serde_json::from_value(json!({"role": "assistant", "content": null, "tool_calls": []}))
                .unwrap();
        assert_eq!(m.content, "");
        assert_eq!(m.tool_calls, Some(json!([])));
        let m: ChatMessage = serde_json::from_value(json!({"role": "user"})).unwrap();
        assert_eq!(m, ChatMessage::new("user", ""));
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"role": "user", "content": ""})
        );
    }

    #[test]
    fn from_tokenizer_config_shapes() {
        // A plain string, with AddedToken-style and null special tokens.
        let cfg = json!({
            "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
        });
        let t = ChatTemplate::from_tokenizer_config(&cfg, None)
            .unwrap()
            .unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "hi")]), false).unwrap(),
            "<s>hi</s>"
        );
        assert_eq!(
            ChatTemplate::special_tokens_from_config(&cfg).unwrap(),
            ("<s>".into(), "</s>".into())
        );
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&cfg, Some("tool_use")),
            Err(ChatTemplateError::InvalidConfig(_))
        ));
        assert!(
            ChatTemplate::from_tokenizer_config(&cfg, Some("default"))
                .unwrap()
                .is_some()
        );

        // A list of named templates: "default" unless asked otherwise.
        let cfg = json!({
            "chat_template": [
                {"name": "default", "template": "D{{ bos_token }}"},
                {"name": "tool_use", "template": "T"},
            ],
            "bos_token": null,
        });
        let t = ChatTemplate::from_tokenizer_config(&cfg, None)
            .unwrap()
            .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "D");
        assert_eq!(t.bos_token(), "");
        let t = ChatTemplate::from_tokenizer_config(&cfg, Some("tool_use"))
            .unwrap()
            .unwrap();
        assert_eq!(t.source(), "T");
        match ChatTemplate::from_tokenizer_config(&cfg, Some("rag")) {
            Err(ChatTemplateError::InvalidConfig(msg)) => {
                assert!(msg.contains("default, tool_use"), "{msg}")
            }
            other => panic!("{other:?}"),
        }

        // A list without a default.
        let cfg = json!({"chat_template": [{"name": "rag", "template": "R"}]});
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&cfg, None),
            Err(ChatTemplateError::InvalidConfig(_))
        ));

        // A name -> template object.
        let cfg = json!({"chat_template": {"default": "O"}});
        assert_eq!(
            ChatTemplate::from_tokenizer_config(&cfg, None)
                .unwrap()
                .unwrap()
                .source(),
            "O"
        );

        // No template at all.
        assert!(
            ChatTemplate::from_tokenizer_config(&json!({"bos_token": "<s>"}), None)
                .unwrap()
                .is_none()
        );
        assert!(
            ChatTemplate::from_tokenizer_config(&json!({"chat_template": null}), None)
                .unwrap()
                .is_none()
        );

        // Malformed shapes.
        for cfg in [
            json!([]),
            json!({"chat_template": 3}),
            json!({"chat_template": [{"name": "default"}]}),
            json!({"chat_template": "x", "eos_token": 5}),
            json!({"chat_template": "x", "eos_token": {"id": 5}}),
        ] {
            assert!(
                matches!(
                    ChatTemplate::from_tokenizer_config(&cfg, None),
                    Err(ChatTemplateError::InvalidConfig(_))
                ),
                "{cfg}"
            );
        }

        // A template that does not compile is a syntax error, not a config error.
        let cfg = json!({"chat_template": "{% if %}"});
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&cfg, None),
            Err(ChatTemplateError::Syntax { .. })
        ));
    }

    #[test]
    fn renders_from_many_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
        let t = std::sync::Arc::new(ChatTemplate::chatml());
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let t = t.clone();
                std::thread::spawn(move || {
                    let content = format!("m{i}");
                    let out = t.render(&[ChatMessage::new("user", content.as_str())], false);
                    (out, format!("<|im_start|>user\n{content}<|im_end|>\n"))
                })
            })
            .collect();
        for h in handles {
            let (out, want) = h.join().unwrap();
            assert_eq!(out.unwrap(), want);
        }
    }

    // -----------------------------------------------------------------------
    // Fixtures generated by scripts/gen-chat-template-fixtures.py from the real
    // templates, rendered by transformers.

    #[derive(Deserialize)]
    struct Fixtures {
        fixed_now_unix: i64,
        templates: std::collections::BTreeMap<String, FixtureTemplate>,
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct FixtureTemplate {
        file: String,
        bos_token: String,
        eos_token: String,
    }

    #[derive(Deserialize)]
    struct Case {
        name: String,
        template: String,
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
        #[serde(default)]
        extra_context: serde_json::Map<String, serde_json::Value>,
        bos_token: String,
        eos_token: String,
        #[serde(default)]
        expected: Option<String>,
        #[serde(default)]
        expected_error: Option<ExpectedError>,
    }

    #[derive(Deserialize)]
    struct ExpectedError {
        kind: String,
        message: String,
    }

    #[test]
    fn renders_real_templates_like_transformers() {
        let dir = fixtures_dir();
        let text = std::fs::read_to_string(dir.join("cases.json"))
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.join("cases.json").display()));
        let fixtures: Fixtures = serde_json::from_str(&text).unwrap();
        let mut compiled = std::collections::BTreeMap::new();
        for (name, t) in &fixtures.templates {
            let source = std::fs::read_to_string(dir.join(&t.file)).unwrap();
            let template = ChatTemplate::new(&source, &t.bos_token, &t.eos_token)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .with_fixed_now(fixtures.fixed_now_unix);
            compiled.insert(name.clone(), template);
        }
        assert!(
            fixtures.cases.len() >= 50,
            "only {} cases",
            fixtures.cases.len()
        );
        let mut failures = Vec::new();
        for case in &fixtures.cases {
            let template = &compiled[&case.template];
            assert_eq!(template.bos_token(), case.bos_token, "{}", case.name);
            assert_eq!(template.eos_token(), case.eos_token, "{}", case.name);
            let got = template.render_with_context(
                &case.messages,
                case.add_generation_prompt,
                &case.extra_context,
            );
            match (&case.expected, &case.expected_error, got) {
                (Some(want), _, Ok(got)) if *want == got => {}
                (_, Some(want), Err(ChatTemplateError::Raised(msg)))
                    if want.kind == "raised" && want.message == msg => {}
                (_, Some(want), Err(ChatTemplateError::Render { .. })) if want.kind == "render" => {
                }
                (want, want_err, got) => failures.push(format!(
                    "{}:\n  expected {:?} / {:?}\n  got      {:?}",
                    case.name,
                    want,
                    want_err.as_ref().map(|e| (&e.kind, &e.message)),
                    got
                )),
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} cases differ:\n{}",
            failures.len(),
            fixtures.cases.len(),
            failures.join("\n")
        );
    }
}
