//! Tool calls as chat models write them: each model family writes calls as text in its own
//! format. This module (a) detects the format from the chat template source, (b) parses calls
//! out of generated text, whole ([`parse_reply`]) or streamed ([`ToolCallStream`]), and (c)
//! builds an llguidance grammar that forces a well-formed call ([`tool_call_grammar`]).
//!
//! References: llama.cpp `common/chat.cpp` (Hermes 2 Pro, Llama 3.x, Mistral Nemo and generic
//! parsers and grammars) and the model cards.
//!
//! | format       | models                      | a call as generated                                     |
//! |--------------|-----------------------------|---------------------------------------------------------|
//! | `Hermes`     | Qwen2.5, Qwen3, Hermes 2/3  | `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call |
//! | `Llama3Json` | Llama 3.1, 3.2, 3.3         | the whole reply is `{"name": ..., "parameters": {...}}`, several joined by `;` |
//! | `Mistral`    | Mistral v0.3, Nemo          | `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]` |
//! | `Generic`    | templates without tools     | `{"tool_calls": [...]}` or `{"response": "..."}`, taught by [`generic_system_prompt`] |
//!
//! `<|python_tag|>` and `[TOOL_CALLS]` are special tokens our detokenizer leaves out of the
//! text, so both are optional here: a reply that *starts* with the JSON is a call candidate.
//!
//! Parsing rules, the same for whole and streamed text because [`parse_reply`] is the stream
//! fed in one piece:
//! - text outside calls is content; whitespace right before and right after a call is dropped;
//! - text that turns out not to be a well-formed call is content, verbatim;
//! - a call's arguments are the compact re-serialization of the model's arguments object, so
//!   they are valid JSON whatever spacing the model used;
//! - a call is emitted (start, then its arguments in one fragment) once its JSON is complete:
//!   a call once emitted cannot be taken back, so nothing is emitted before it is known valid.

use serde_json::{Map, Value, json};

/// A function the client offers the model (OpenAI `tools[].function`).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments object.
    pub parameters: Value,
}

impl ToolSpec {
    /// A tool whose missing (or empty) parameters schema becomes "an object with no declared
    /// properties", as OpenAI treats it.
    pub fn new(
        name: impl Into<String>,
        description: Option<String>,
        parameters: Option<Value>,
    ) -> Self {
        let parameters = match parameters {
            Some(Value::Object(schema)) if !schema.is_empty() => Value::Object(schema),
            _ => default_parameters(),
        };
        Self {
            name: name.into(),
            description,
            parameters,
        }
    }
}

fn default_parameters() -> Value {
    json!({"type": "object", "properties": {}})
}

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    Mistral,
    Generic,
}

impl ToolFormat {
    /// The format a chat template teaches its model, recognised by the markers and phrases the
    /// template source contains; `Generic` when it shows no tool support.
    pub fn detect(template_source: &str) -> Self {
        // Qwen3-Coder and GLM-4.5 wrap XML-style arguments (`<function=...>`, `<arg_key>`)
        // in `<tool_call>`: not Hermes JSON, and not parsed here, so they fall back to Generic.
        let xml_arguments =
            template_source.contains("<function=") || template_source.contains("<arg_key>");
        if template_source.contains("<tool_call>") {
            if xml_arguments {
                Self::Generic
            } else {
                Self::Hermes
            }
        } else if template_source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if template_source.contains("<|python_tag|>")
            || template_source.contains("\"parameters\": dictionary of argument name")
            || template_source.contains("{\"name\": function name, \"parameters\"")
        {
            Self::Llama3Json
        } else {
            Self::Generic
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::Llama3Json => "llama3_json",
            Self::Mistral => "mistral",
            Self::Generic => "generic",
        }
    }

    /// Whether the template itself shows the tools to the model. For `Generic` it does not:
    /// the caller adds [`generic_system_prompt`] to the system message.
    pub fn renders_tools(self) -> bool {
        !matches!(self, Self::Generic)
    }

    /// The text that announces calls anywhere in a reply.
    fn marker(self) -> Option<&'static str> {
        match self {
            Self::Hermes => Some("<tool_call>"),
            Self::Llama3Json => Some("<|python_tag|>"),
            Self::Mistral => Some("[TOOL_CALLS]"),
            Self::Generic => None,
        }
    }

    /// The character that opens the call JSON (after the marker, or at the start of a reply).
    fn opener(self) -> char {
        match self {
            Self::Mistral => '[',
            Self::Hermes | Self::Llama3Json | Self::Generic => '{',
        }
    }

    /// A reply whose text starts with [`Self::opener`] is a call candidate even without the
    /// marker: for these formats the marker is a special token missing from our text.
    fn leads_with_json(self) -> bool {
        !matches!(self, Self::Hermes)
    }

    /// Keys the call object (for `Generic`, the reply object) may start with. Checking the
    /// first key early lets an ordinary JSON answer be shown as content without waiting for
    /// its end. Empty: no early check.
    fn first_keys(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => &[],
            Self::Llama3Json => &["name", "type", "parameters", "arguments"],
            Self::Mistral => &["name", "arguments", "id"],
            Self::Generic => &["tool_calls", "tool_call", "response"],
        }
    }
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// The id the model wrote (Mistral does); `None` otherwise, and the caller assigns one.
    pub id: Option<String>,
    pub name: String,
    /// Compact JSON text of the arguments object, as OpenAI sends it.
    pub arguments: String,
}

/// A whole reply: its content and its calls.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedReply {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
}

/// Parses a whole reply.
pub fn parse_reply(format: ToolFormat, text: &str) -> ParsedReply {
    let mut stream = ToolCallStream::new(format);
    let mut reply = ParsedReply::default();
    reply.extend(stream.push(text));
    reply.extend(stream.finish());
    reply
}

impl Extend<ReplyDelta> for ParsedReply {
    fn extend<I: IntoIterator<Item = ReplyDelta>>(&mut self, deltas: I) {
        for delta in deltas {
            match delta {
                ReplyDelta::Content(text) => self.content.push_str(&text),
                ReplyDelta::CallStart { id, name, .. } => self.tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                }),
                ReplyDelta::CallArguments { index, fragment } => {
                    if let Some(call) = self.tool_calls.get_mut(index) {
                        call.arguments.push_str(&fragment);
                    }
                }
            }
        }
    }
}

/// One piece of streamed output. A call's `CallStart` comes before its `CallArguments`;
/// `index` counts the calls of the reply from 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyDelta {
    Content(String),
    CallStart {
        index: usize,
        id: Option<String>,
        name: String,
    },
    CallArguments {
        index: usize,
        fragment: String,
    },
}

/// Minimal JSON scanner: follows strings and nesting to find where a value that starts with
/// `{` or `[` ends, without parsing it.
#[derive(Debug, Clone, Copy, Default)]
struct JsonScan {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonScan {
    /// Feeds one character; true when it closes the outermost value.
    fn feed(&mut self, c: char) -> bool {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if c == '\\' {
                self.escaped = true;
            } else if c == '"' {
                self.in_string = false;
            }
            return false;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

/// A possible call whose JSON is being received.
#[derive(Debug, Clone)]
struct Candidate {
    /// The JSON text so far.
    raw: String,
    scan: JsonScan,
    json_done: bool,
    /// The first key has been checked (or needs no check).
    head_checked: bool,
    /// Whitespace between the JSON and a required closing tag.
    tail: String,
}

#[derive(Debug, Clone)]
enum State {
    /// JSON formats, before the first non-whitespace text: does the reply start with a call?
    Start,
    /// Ordinary text, watched for the format's marker.
    Content,
    /// After a marker, skipping whitespace up to the call's opening character.
    AfterMarker,
    Candidate(Candidate),
    /// After a call, dropping whitespace.
    AfterCall,
    /// Llama 3 after `;` between calls.
    AfterSeparator,
    /// Generic `{"response": "...`: decoding the string as it arrives.
    Response(JsonScan),
    /// Generic: the rest of the response object after its string, dropped.
    ResponseTail(JsonScan),
}

/// Parses a reply fed delta by delta, emitting what can be shown so far: content that cannot
/// be part of a call at once, and each call once its JSON is complete. Text that might start a
/// call (a trailing `<tool_`, a leading `{` or `[`) is withheld until decided.
#[derive(Debug, Clone)]
pub struct ToolCallStream {
    format: ToolFormat,
    state: State,
    /// Received text not yet examined.
    buf: String,
    /// Examined text whose fate depends on what follows: dropped if a call follows, emitted
    /// as content if not (whitespace before a call, a marker).
    held: String,
    calls: usize,
}

impl ToolCallStream {
    pub fn new(format: ToolFormat) -> Self {
        let state = if format.leads_with_json() {
            State::Start
        } else {
            State::Content
        };
        Self {
            format,
            state,
            buf: String::new(),
            held: String::new(),
            calls: 0,
        }
    }

    /// Feeds the next piece of generated text.
    pub fn push(&mut self, delta: &str) -> Vec<ReplyDelta> {
        self.buf.push_str(delta);
        super::run_steps(self, false, Self::step)
    }

    /// Ends the reply: decides everything still withheld.
    pub fn finish(&mut self) -> Vec<ReplyDelta> {
        let mut out = super::run_steps(self, true, Self::step);
        // Every state consumes all its text at the end; this only guards against losing text.
        if !self.held.is_empty() || !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.held) + &std::mem::take(&mut self.buf);
            push_content(&mut out, &rest);
        }
        out
    }

    /// Advances the state machine; false when it needs more text (or, at the end, is done).
    fn step(&mut self, last: bool, out: &mut Vec<ReplyDelta>) -> bool {
        let format = self.format;
        match std::mem::replace(&mut self.state, State::Content) {
            State::Start => {
                let moved = self.hold_leading_whitespace();
                if self.buf.is_empty() {
                    return self.wait_in(State::Start, moved, last, out);
                }
                if let Some(marker) = format.marker() {
                    if self.buf.starts_with(marker) {
                        self.held.push_str(marker);
                        self.buf.drain(..marker.len());
                        self.state = State::AfterMarker;
                        return true;
                    }
                    if !last && marker.starts_with(self.buf.as_str()) {
                        self.state = State::Start;
                        return moved;
                    }
                }
                self.open_candidate_or_content(out);
                true
            }
            State::Content => self.step_content(last, out),
            state @ (State::AfterMarker | State::AfterSeparator) => {
                let moved = self.hold_leading_whitespace();
                if self.buf.is_empty() {
                    return self.wait_in(state, moved, last, out);
                }
                self.open_candidate_or_content(out);
                true
            }
            State::Candidate(candidate) => self.step_candidate(candidate, last, out),
            State::AfterCall => {
                let dropped = self.drop_leading_whitespace();
                if self.buf.is_empty() {
                    self.state = State::AfterCall;
                    return dropped;
                }
                if format == ToolFormat::Llama3Json && self.buf.starts_with(';') {
                    self.buf.drain(..1);
                    self.held.push(';');
                    self.state = State::AfterSeparator;
                } else if format == ToolFormat::Llama3Json {
                    self.open_candidate_or_content(out);
                } else {
                    self.enter_content(out);
                }
                true
            }
            State::Response(scan) => self.step_response(scan, last, out),
            State::ResponseTail(mut scan) => {
                let mut consumed = 0;
                let mut closed = false;
                for (at, c) in self.buf.char_indices() {
                    consumed = at + c.len_utf8();
                    if scan.feed(c) {
                        closed = true;
                        break;
                    }
                }
                if last && !closed {
                    consumed = self.buf.len();
                }
                self.buf.drain(..consumed);
                self.state = if closed {
                    State::AfterCall
                } else {
                    State::ResponseTail(scan)
                };
                consumed > 0 || closed
            }
        }
    }

    /// A state that waits past whitespace for a call's first character has read all there is:
    /// at the end what it held is content, otherwise it stays in `state`. The step's result.
    fn wait_in(
        &mut self,
        state: State,
        moved: bool,
        last: bool,
        out: &mut Vec<ReplyDelta>,
    ) -> bool {
        if last {
            self.enter_content(out);
            return true;
        }
        self.state = state;
        moved
    }

    fn step_content(&mut self, last: bool, out: &mut Vec<ReplyDelta>) -> bool {
        self.state = State::Content;
        let Some(marker) = self.format.marker() else {
            if self.buf.is_empty() {
                return false;
            }
            let text = std::mem::take(&mut self.buf);
            push_content(out, &text);
            return true;
        };
        if let Some(at) = self.buf.find(marker) {
            let kept = self.buf[..at].trim_end().len();
            push_content(out, &self.buf[..kept]);
            self.held = self.buf[kept..at + marker.len()].to_owned();
            self.buf.drain(..at + marker.len());
            self.state = State::AfterMarker;
            return true;
        }
        let ready = if last {
            self.buf.len()
        } else {
            // Withhold a possible marker start, and the whitespace before it, which is
            // dropped if a call follows.
            let end = self.buf.len() - partial_marker_len(&self.buf, marker);
            self.buf[..end].trim_end().len()
        };
        if ready == 0 {
            return false;
        }
        let text: String = self.buf.drain(..ready).collect();
        push_content(out, &text);
        true
    }

    fn step_candidate(&mut self, mut c: Candidate, last: bool, out: &mut Vec<ReplyDelta>) -> bool {
        let mut consumed = 0;
        if !c.json_done {
            for (at, ch) in self.buf.char_indices() {
                consumed = at + ch.len_utf8();
                if c.scan.feed(ch) {
                    c.json_done = true;
                    break;
                }
            }
            c.raw.push_str(&self.buf[..consumed]);
            self.buf.drain(..consumed);
        }
        if !c.head_checked {
            match check_head(self.format, &c.raw) {
                Head::Undecided => {}
                Head::Reject => {
                    self.reject(c, out);
                    return true;
                }
                Head::Key { key, value_at } => {
                    if let Some(at) = value_at {
                        c.head_checked = true;
                        if self.format == ToolFormat::Generic
                            && key == "response"
                            && c.raw.as_bytes().get(at) == Some(&b'"')
                        {
                            self.start_response(c.raw, at);
                            return true;
                        }
                    }
                }
            }
        }
        if !c.json_done {
            if last {
                self.reject(c, out);
                return true;
            }
            self.state = State::Candidate(c);
            return consumed > 0;
        }
        if self.format == ToolFormat::Hermes {
            // The block must close with `</tool_call>`; an unclosed block at the very end of
            // the reply is accepted when its JSON is complete.
            const CLOSING: &str = "</tool_call>";
            let ws = self.buf.len() - self.buf.trim_start().len();
            c.tail.extend(self.buf.drain(..ws));
            // The closing tag joins the tail, which goes back to content if the JSON is no call.
            if self.buf.starts_with(CLOSING) {
                c.tail.extend(self.buf.drain(..CLOSING.len()));
            } else if CLOSING.starts_with(self.buf.as_str()) {
                if !last {
                    self.state = State::Candidate(c);
                    return consumed > 0 || ws > 0;
                }
                c.tail.push_str(&std::mem::take(&mut self.buf));
            } else {
                self.reject(c, out);
                return true;
            }
        }
        match parse_candidate(self.format, &c.raw) {
            Some(Parsed::Calls(calls)) => {
                self.held.clear();
                for call in calls {
                    let index = self.calls;
                    self.calls += 1;
                    out.push(ReplyDelta::CallStart {
                        index,
                        id: call.id,
                        name: call.name,
                    });
                    out.push(ReplyDelta::CallArguments {
                        index,
                        fragment: call.arguments,
                    });
                }
                self.state = State::AfterCall;
            }
            Some(Parsed::Response(text)) => {
                self.held.clear();
                push_content(out, &text);
                self.state = State::AfterCall;
            }
            None => self.reject(c, out),
        }
        true
    }

    /// Generic `{"response": "`: from here the string is shown as it arrives.
    fn start_response(&mut self, raw: String, quote_at: usize) {
        let mut scan = JsonScan::default();
        raw[..=quote_at].chars().for_each(|c| {
            scan.feed(c);
        });
        self.buf.insert_str(0, &raw[quote_at + 1..]);
        self.held.clear();
        self.state = State::Response(scan);
    }

    fn step_response(&mut self, mut scan: JsonScan, last: bool, out: &mut Vec<ReplyDelta>) -> bool {
        let mut text = String::new();
        let mut at = 0;
        let mut closed = false;
        while let Some(c) = self.buf[at..].chars().next() {
            if c == '"' {
                scan.feed(c);
                at += 1;
                closed = true;
                break;
            }
            if c == '\\' {
                let Some((decoded, len)) = decode_escape(&self.buf[at..], last) else {
                    break;
                };
                text.push_str(&decoded);
                self.buf[at..at + len].chars().for_each(|c| {
                    scan.feed(c);
                });
                at += len;
                continue;
            }
            text.push(c);
            scan.feed(c);
            at += c.len_utf8();
        }
        self.buf.drain(..at);
        push_content(out, &text);
        self.state = if closed {
            State::ResponseTail(scan)
        } else {
            State::Response(scan)
        };
        at > 0
    }

    /// At the call's opening character: start a candidate; anything else is content.
    fn open_candidate_or_content(&mut self, out: &mut Vec<ReplyDelta>) {
        if self.buf.starts_with(self.format.opener()) {
            self.state = State::Candidate(Candidate {
                raw: String::new(),
                scan: JsonScan::default(),
                json_done: false,
                head_checked: self.format.first_keys().is_empty(),
                tail: String::new(),
            });
        } else {
            self.enter_content(out);
        }
    }

    /// Not a call after all: what was held is content, and the candidate's text goes back to
    /// be read as content (it may still contain a marker).
    fn reject(&mut self, c: Candidate, out: &mut Vec<ReplyDelta>) {
        self.buf.insert_str(0, &(c.raw + &c.tail));
        self.enter_content(out);
    }

    fn enter_content(&mut self, out: &mut Vec<ReplyDelta>) {
        let held = std::mem::take(&mut self.held);
        push_content(out, &held);
        self.state = State::Content;
    }

    fn hold_leading_whitespace(&mut self) -> bool {
        let ws = self.buf.len() - self.buf.trim_start().len();
        self.held.extend(self.buf.drain(..ws));
        ws > 0
    }

    fn drop_leading_whitespace(&mut self) -> bool {
        let ws = self.buf.len() - self.buf.trim_start().len();
        self.buf.drain(..ws);
        ws > 0
    }
}

/// Appends content, merging it into a previous content delta and skipping empty text.
fn push_content(out: &mut Vec<ReplyDelta>, text: &str) {
    if text.is_empty() {
        return;
    }
    if let Some(ReplyDelta::Content(previous)) = out.last_mut() {
        previous.push_str(text);
    } else {
        out.push(ReplyDelta::Content(text.to_owned()));
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `marker`.
fn partial_marker_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && text.ends_with(&marker[..n]))
        .unwrap_or(0)
}

/// What the start of a candidate's JSON says.
#[derive(Debug, PartialEq, Eq)]
enum Head<'a> {
    /// Too short to tell.
    Undecided,
    /// Cannot be a call.
    Reject,
    /// The first key is acceptable; `value_at` is the byte offset of its value, once seen.
    Key {
        key: &'a str,
        value_at: Option<usize>,
    },
}

/// Checks the first key of a candidate (`{"key": value` or, for Mistral, `[{"key": value`).
fn check_head(format: ToolFormat, raw: &str) -> Head<'_> {
    let keys = format.first_keys();
    let bytes = raw.as_bytes();
    let skip_ws = |mut i: usize| {
        while bytes
            .get(i)
            .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            i += 1;
        }
        i
    };
    let mut i = 0;
    if format == ToolFormat::Mistral {
        i = skip_ws(1);
        match bytes.get(i) {
            None => return Head::Undecided,
            Some(b'{') => {}
            Some(_) => return Head::Reject,
        }
    }
    i = skip_ws(i + 1);
    match bytes.get(i) {
        None => return Head::Undecided,
        Some(b'"') => {}
        Some(_) => return Head::Reject,
    }
    let key_start = i + 1;
    let Some(key_len) = bytes[key_start..].iter().position(|&b| b == b'"') else {
        let partial = &bytes[key_start..];
        return if keys.iter().any(|k| k.as_bytes().starts_with(partial)) {
            Head::Undecided
        } else {
            Head::Reject
        };
    };
    let key = &raw[key_start..key_start + key_len];
    if !keys.contains(&key) {
        return Head::Reject;
    }
    i = skip_ws(key_start + key_len + 1);
    match bytes.get(i) {
        None => {
            return Head::Key {
                key,
                value_at: None,
            };
        }
        Some(b':') => {}
        Some(_) => return Head::Reject,
    }
    i = skip_ws(i + 1);
    let value_at = (i < bytes.len()).then_some(i);
    Head::Key { key, value_at }
}

/// Decodes the JSON string escape at the start of `text` (which starts with `\`): the decoded
/// text and the bytes consumed, or `None` when more text is needed to decide. Malformed
/// escapes are kept verbatim, as the model wrote them.
fn decode_escape(text: &str, last: bool) -> Option<(String, usize)> {
    let bytes = text.as_bytes();
    let simple = |s: &str| Some((s.to_owned(), 2));
    match bytes.get(1) {
        None => (last).then(|| ("\\".to_owned(), 1)),
        Some(b'"') => simple("\""),
        Some(b'\\') => simple("\\"),
        Some(b'/') => simple("/"),
        Some(b'b') => simple("\u{8}"),
        Some(b'f') => simple("\u{c}"),
        Some(b'n') => simple("\n"),
        Some(b'r') => simple("\r"),
        Some(b't') => simple("\t"),
        Some(b'u') => {
            let code = match hex4(bytes, 2) {
                Hex::Value(code) => code,
                Hex::Short if !last => return None,
                Hex::Short | Hex::Invalid => return Some(("\\".to_owned(), 1)),
            };
            if (0xD800..0xDC00).contains(&code) {
                // A high surrogate pairs with a following `\uDC00`–`\uDFFF`.
                let low = match (bytes.get(6), bytes.get(7)) {
                    (Some(b'\\'), Some(b'u')) => hex4(bytes, 8),
                    (None, _) | (Some(b'\\'), None) => Hex::Short,
                    _ => Hex::Invalid,
                };
                match low {
                    Hex::Value(low) if (0xDC00..0xE000).contains(&low) => {
                        let c = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                        Some((char::from_u32(c).unwrap_or('\u{FFFD}').to_string(), 12))
                    }
                    Hex::Short if !last => None,
                    _ => Some(('\u{FFFD}'.to_string(), 6)),
                }
            } else {
                Some((char::from_u32(code).unwrap_or('\u{FFFD}').to_string(), 6))
            }
        }
        Some(_) => Some(("\\".to_owned(), 1)),
    }
}

enum Hex {
    Value(u32),
    /// Hex digits so far, but fewer than four.
    Short,
    Invalid,
}

fn hex4(bytes: &[u8], at: usize) -> Hex {
    let digits = &bytes[at.min(bytes.len())..(at + 4).min(bytes.len())];
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return Hex::Invalid;
    }
    if digits.len() < 4 {
        return Hex::Short;
    }
    Hex::Value(digits.iter().fold(0, |acc, &d| {
        acc * 16 + (d as char).to_digit(16).unwrap_or(0)
    }))
}

/// A complete candidate, understood.
enum Parsed {
    Calls(Vec<ToolCall>),
    /// Generic `{"response": ...}` whose value is not a string (a JSON reply): its compact text.
    Response(String),
}

fn parse_candidate(format: ToolFormat, raw: &str) -> Option<Parsed> {
    let value: Value = serde_json::from_str(raw).ok()?;
    let calls = match format {
        ToolFormat::Hermes | ToolFormat::Llama3Json => vec![call_from_value(format, &value)?],
        ToolFormat::Mistral => calls_from_array(format, &value)?,
        ToolFormat::Generic => {
            let reply = value.as_object()?;
            if let Some(calls) = reply.get("tool_calls") {
                calls_from_array(format, calls)?
            } else if let Some(call) = reply.get("tool_call") {
                vec![call_from_value(format, call)?]
            } else {
                return match reply.get("response")? {
                    Value::String(text) => Some(Parsed::Response(text.clone())),
                    other => Some(Parsed::Response(serde_json::to_string(other).ok()?)),
                };
            }
        }
    };
    Some(Parsed::Calls(calls))
}

fn calls_from_array(format: ToolFormat, value: &Value) -> Option<Vec<ToolCall>> {
    let items = value.as_array().filter(|items| !items.is_empty())?;
    items
        .iter()
        .map(|item| call_from_value(format, item))
        .collect()
}

/// A call object `{"name": ..., "arguments"|"parameters": {...}, "id"?: ...}`.
fn call_from_value(format: ToolFormat, value: &Value) -> Option<ToolCall> {
    let call = value.as_object()?;
    let name = call.get("name")?.as_str().filter(|name| !name.is_empty())?;
    if format == ToolFormat::Llama3Json {
        // The whole reply is the call here, so be strict: an ordinary JSON answer that
        // happens to have a "name" must stay content.
        let known = |key: &str| matches!(key, "name" | "parameters" | "arguments" | "type");
        if !call.keys().all(|key| known(key)) || call.get("type").is_some_and(|t| t != "function") {
            return None;
        }
    }
    let arguments = match call.get("arguments").or_else(|| call.get("parameters")) {
        None if format == ToolFormat::Llama3Json => return None,
        None | Some(Value::Null) => "{}".to_owned(),
        Some(arguments @ Value::Object(_)) => serde_json::to_string(arguments).ok()?,
        // Some models write the arguments as a JSON string, as the OpenAI API carries them.
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text).ok()? {
            arguments @ Value::Object(_) => serde_json::to_string(&arguments).ok()?,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ToolCall {
        id: call.get("id").and_then(Value::as_str).map(str::to_owned),
        name: name.to_owned(),
        arguments,
    })
}

/// An id for a call the model did not give one. Mistral's template requires exactly nine
/// alphanumerics; others get OpenAI's `call_` style. `seed` makes it unique (e.g. job id and
/// call index mixed); the same seed gives the same id.
pub fn call_id(format: ToolFormat, seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let length = if format == ToolFormat::Mistral { 9 } else { 24 };
    let mut state = seed;
    let mut id = String::with_capacity(length + 5);
    if format != ToolFormat::Mistral {
        id.push_str("call_");
    }
    for _ in 0..length {
        // splitmix64: well-spread characters from consecutive seeds.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        id.push(ALPHABET[(z % ALPHABET.len() as u64) as usize] as char);
    }
    id
}

/// System-prompt text that teaches a model without template tool support (`Generic`) the
/// JSON reply format and lists the tools, modelled on llama.cpp's generic format. The caller
/// adds it to the system message (or makes it the system message).
pub fn generic_system_prompt(tools: &[ToolSpec]) -> String {
    let mut prompt =
        String::from("You can call the following tools to answer the user's request:\n");
    for tool in tools {
        let mut entry = Map::new();
        entry.insert("name".into(), Value::String(tool.name.clone()));
        if let Some(description) = &tool.description {
            entry.insert("description".into(), Value::String(description.clone()));
        }
        entry.insert("parameters".into(), tool.parameters.clone());
        prompt.push_str(&Value::Object(entry).to_string());
        prompt.push('\n');
    }
    prompt.push_str(
        "\nRespond in JSON format, either with `tool_calls` (a request to call tools) or with \
         `response` (a reply to the user's request).\n\
         To call tools:\n\
         {\"tool_calls\": [{\"name\": \"<tool name>\", \"arguments\": {<arguments as the tool's parameters describe>}}]}\n\
         To reply to the user:\n\
         {\"response\": \"<your reply>\"}",
    );
    prompt
}

/// What the client demands of the reply when it demands a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// At least one call, of any tool (`tool_choice: "required"`).
    Required,
    /// Exactly one call, of this function (`tool_choice: {"type": "function", ...}`).
    Named(String),
}

/// An llguidance Lark grammar that forces a well-formed call in `format`: for `Required`, one
/// call of any tool, or one or more when `parallel` (Llama 3 always gets exactly one, as its
/// template teaches); for `Named`, exactly one call of that function. The arguments follow
/// each tool's parameters schema. For `Mistral` it produces the call array without the
/// `[TOOL_CALLS]` control token.
///
/// JSON is forced into Python's `json.dumps` spacing (`{"a": 1, "b": 2}`), the form the
/// templates render past calls in, and which leaves the model no room for endless whitespace.
/// Note the grammar starts the call at the first generated token: a thinking model gets no
/// room to think first.
pub fn tool_call_grammar(
    format: ToolFormat,
    tools: &[ToolSpec],
    choice: &ToolChoice,
    parallel: bool,
) -> String {
    let chosen: Vec<(usize, &ToolSpec)> = match choice {
        ToolChoice::Required => tools.iter().enumerate().collect(),
        ToolChoice::Named(name) => tools
            .iter()
            .enumerate()
            .filter(|(_, tool)| &tool.name == name)
            .take(1)
            .collect(),
    };
    let many = parallel && *choice == ToolChoice::Required;
    let mut defs = Map::new();
    let call = if chosen.is_empty() {
        // The caller rejects a choice no tool satisfies; should one slip through, the grammar
        // still forces a well-formed call (of the named function, or of any name).
        let name = match choice {
            ToolChoice::Named(name) => json!({"const": name}),
            ToolChoice::Required => json!({"type": "string", "minLength": 1}),
        };
        call_object(format, name, default_parameters())
    } else {
        any_call_schema(format, &chosen, &mut defs)
    };
    match format {
        ToolFormat::Hermes => {
            let start = if many {
                r#"start: block ("\n" block)*"#
            } else {
                "start: block"
            };
            format!(
                "{start}\nblock: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {}\n",
                json_root(call, defs)
            )
        }
        ToolFormat::Llama3Json => format!("start: %json {}\n", json_root(call, defs)),
        ToolFormat::Mistral => {
            format!(
                "start: %json {}\n",
                json_root(calls_array(call, many), defs)
            )
        }
        ToolFormat::Generic => format!(
            "start: %json {}\n",
            json_root(generic_calls_object(call, many), defs)
        ),
    }
}

/// For `Generic` with `tool_choice: "auto"`: the reply is JSON either way, a
/// `{"tool_calls": [...]}` or a `{"response": "..."}`, as llama.cpp constrains it. Small models
/// without tool training keep to the format only under this grammar.
pub fn generic_auto_grammar(tools: &[ToolSpec], parallel: bool) -> String {
    let response = json!({
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": false,
    });
    let chosen: Vec<(usize, &ToolSpec)> = tools.iter().enumerate().collect();
    let mut defs = Map::new();
    let root = if chosen.is_empty() {
        response
    } else {
        let call = any_call_schema(ToolFormat::Generic, &chosen, &mut defs);
        json!({"anyOf": [generic_calls_object(call, parallel), response]})
    };
    format!("start: %json {}\n", json_root(root, defs))
}

fn calls_array(call: Value, many: bool) -> Value {
    let mut array = json!({"type": "array", "items": call, "minItems": 1});
    if !many {
        array["maxItems"] = json!(1);
    }
    array
}

fn generic_calls_object(call: Value, many: bool) -> Value {
    json!({
        "type": "object",
        "properties": {"tool_calls": calls_array(call, many)},
        "required": ["tool_calls"],
        "additionalProperties": false,
    })
}

/// The schema of one call of any of `tools` (each with its index in the request's list).
fn any_call_schema(
    format: ToolFormat,
    tools: &[(usize, &ToolSpec)],
    defs: &mut Map<String, Value>,
) -> Value {
    let mut options: Vec<Value> = tools
        .iter()
        .map(|&(index, tool)| call_schema(format, index, tool, defs))
        .collect();
    if options.len() == 1 {
        options.remove(0)
    } else {
        json!({"anyOf": options})
    }
}

fn call_schema(
    format: ToolFormat,
    index: usize,
    tool: &ToolSpec,
    defs: &mut Map<String, Value>,
) -> Value {
    let arguments = parameters_schema(index, tool, defs);
    call_object(format, json!({"const": tool.name}), arguments)
}

/// `{"name": ..., "arguments": ...}` (Llama 3: `"parameters"`), in that order, nothing else.
fn call_object(format: ToolFormat, name: Value, arguments: Value) -> Value {
    let arguments_key = if format == ToolFormat::Llama3Json {
        "parameters"
    } else {
        "arguments"
    };
    let mut properties = Map::new();
    properties.insert("name".into(), name);
    properties.insert(arguments_key.into(), arguments);
    json!({
        "type": "object",
        "properties": properties,
        "required": ["name", arguments_key],
        "additionalProperties": false,
    })
}

/// A tool's parameters schema as embedded in the call schema. Local references (`#/$defs/x`,
/// pydantic's habit) point at the root of the tool's own schema, which is no longer the root:
/// such a schema moves under the root's `$defs` and its references are rewritten to match.
fn parameters_schema(index: usize, tool: &ToolSpec, defs: &mut Map<String, Value>) -> Value {
    let parameters = match &tool.parameters {
        Value::Object(schema) if !schema.is_empty() => tool.parameters.clone(),
        _ => default_parameters(),
    };
    if !has_local_ref(&parameters) {
        return parameters;
    }
    let key = format!("tool{index}");
    let base = format!("#/$defs/{key}");
    let mut moved = parameters;
    rebase_local_refs(&mut moved, &base);
    defs.insert(key, moved);
    json!({"$ref": base})
}

fn has_local_ref(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => map.iter().any(|(key, value)| {
            (key == "$ref" && value.as_str().is_some_and(|r| r.starts_with('#')))
                || has_local_ref(value)
        }),
        Value::Array(items) => items.iter().any(has_local_ref),
        _ => false,
    }
}

fn rebase_local_refs(schema: &mut Value, base: &str) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(reference) if key == "$ref" => {
                        if let Some(pointer) = reference.strip_prefix('#') {
                            *reference = format!("{base}{pointer}");
                        }
                    }
                    _ => rebase_local_refs(value, base),
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| rebase_local_refs(item, base)),
        _ => {}
    }
}

/// The `%json` body: the schema with the moved definitions and llguidance's JSON options.
fn json_root(mut root: Value, defs: Map<String, Value>) -> String {
    if let Value::Object(map) = &mut root {
        if !defs.is_empty() {
            map.insert("$defs".into(), Value::Object(defs));
        }
        // Client tool schemas may use keywords llguidance does not implement: ignore those
        // rather than fail the request.
        map.insert("x-guidance".into(), json_grammar_options(true));
    }
    root.to_string()
}

/// How JSON is written under a grammar, the one definition for schemas and tool calls
/// (llguidance's `x-guidance` options): no free whitespace (a small model given free whitespace
/// can spend its whole budget on newlines), `, ` and `: ` between items as Python's
/// `json.dumps` writes them (and the templates render past calls), and `oneOf` read as `anyOf`
/// (Pydantic writes `oneOf` for unions whose branches cannot overlap in practice). `lenient`
/// also ignores keywords llguidance does not implement.
pub fn json_grammar_options(lenient: bool) -> Value {
    let mut options = json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
        "coerce_one_of": true,
    });
    if lenient {
        options["lenient"] = true.into();
    }
    options
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: Option<&str>, name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: id.map(str::to_owned),
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        }
    }

    fn reply(content: &str, tool_calls: Vec<ToolCall>) -> ParsedReply {
        ParsedReply {
            content: content.to_owned(),
            tool_calls,
        }
    }

    // ---- format detection ----

    #[test]
    fn formats_are_detected_from_template_sources() {
        let qwen = "{%- if tools %}...<tools>\n{%- for tool in tools %}{{ tool | tojson }}{%- endfor %}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags";
        let llama31 =
            "{%- if builtin_tools is defined or tool_calls|length > 0 %}{{- \"<|python_tag|>\" }}";
        let llama32 = "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.";
        let mistral = "{%- if message.tool_calls is defined %}{{- \"[TOOL_CALLS] [\" }}";
        let smollm = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}";
        assert_eq!(ToolFormat::detect(qwen), ToolFormat::Hermes);
        assert_eq!(ToolFormat::detect(llama31), ToolFormat::Llama3Json);
        assert_eq!(ToolFormat::detect(llama32), ToolFormat::Llama3Json);
        assert_eq!(ToolFormat::detect(mistral), ToolFormat::Mistral);
        assert_eq!(ToolFormat::detect(smollm), ToolFormat::Generic);
        let qwen3_coder = "<tool_call>\n<function={{ tool_call.name }}>\n<parameter=";
        assert_eq!(ToolFormat::detect(qwen3_coder), ToolFormat::Generic);
        assert!(!ToolFormat::Generic.renders_tools());
        assert!(ToolFormat::Hermes.renders_tools());
        assert_eq!(ToolFormat::Llama3Json.name(), "llama3_json");
    }

    // ---- whole-reply parsing ----

    /// `text` parses, in `format`, to `content` and `calls`.
    fn assert_reply(format: ToolFormat, text: &str, content: &str, calls: Vec<ToolCall>) {
        let want = reply(content, calls);
        assert_eq!(parse_reply(format, text), want, "{format:?} {text:?}");
    }

    /// Each of `texts` is, in `format`, content as it stands.
    fn assert_content(format: ToolFormat, texts: &[&str]) {
        for text in texts {
            assert_reply(format, text, text, vec![]);
        }
    }

    #[test]
    fn hermes_calls_and_leading_content() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>";
        let weather = call(None, "get_weather", r#"{"city":"Paris","days":2}"#);
        let time = call(None, "get_time", "{}");
        assert_reply(
            ToolFormat::Hermes,
            text,
            "Let me check.",
            vec![weather, time],
        );
    }

    #[test]
    fn hermes_tolerates_spacing_and_an_unterminated_last_block() {
        let text = "<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":[1, 2]}}</tool_call>  <tool_call>\n\n  {\"name\": \"g\", \"arguments\": {\"b\": true}}  \n";
        let (f, g) = (
            call(None, "f", r#"{"a":[1,2]}"#),
            call(None, "g", r#"{"b":true}"#),
        );
        assert_reply(ToolFormat::Hermes, text, "", vec![f, g]);
        let partial_close = "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_";
        assert_reply(
            ToolFormat::Hermes,
            partial_close,
            "",
            vec![call(None, "f", "{}")],
        );
    }

    #[test]
    fn hermes_malformed_blocks_are_content() {
        let truncated = "Sure.\n<tool_call>\n{\"name\": \"f\", \"argum";
        let no_name = "<tool_call>{\"arguments\": {}}</tool_call>";
        let trailing_junk = "<tool_call>{\"name\": \"f\"} oops</tool_call>";
        assert_content(ToolFormat::Hermes, &[truncated, no_name, trailing_junk]);
        // A bad block does not hide a good one after it; whitespace around a call is dropped.
        let then_good = "<tool_call>oops <tool_call>{\"name\": \"f\"}</tool_call> done";
        let f = call(None, "f", "{}");
        assert_reply(
            ToolFormat::Hermes,
            then_good,
            "<tool_call>oopsdone",
            vec![f],
        );
    }

    #[test]
    fn hermes_string_arguments_and_closing_tag_inside_strings() {
        let text = "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_call>";
        assert_reply(
            ToolFormat::Hermes,
            text,
            "",
            vec![call(None, "f", r#"{"x":1}"#)],
        );
        let tricky = "<tool_call>{\"name\": \"write\", \"arguments\": {\"text\": \"a } </tool_call> b\"}}</tool_call>";
        let write = call(None, "write", r#"{"text":"a } </tool_call> b"}"#);
        assert_reply(ToolFormat::Hermes, tricky, "", vec![write]);
    }

    #[test]
    fn plain_text_is_content_in_every_format() {
        for format in [
            ToolFormat::Hermes,
            ToolFormat::Llama3Json,
            ToolFormat::Mistral,
            ToolFormat::Generic,
        ] {
            assert_content(format, &["  The answer is 4 < 5, [see] {this}.\n", ""]);
        }
    }

    #[test]
    fn llama3_json_calls() {
        let f = || call(None, "f", "{}");
        for (text, content, calls) in [
            (
                " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
                "",
                vec![call(None, "get_weather", r#"{"city":"Paris"}"#)],
            ),
            (
                "{\"type\": \"function\", \"name\": \"f\", \"arguments\": {\"a\": 1}}",
                "",
                vec![call(None, "f", r#"{"a":1}"#)],
            ),
            (
                "<|python_tag|>{\"name\": \"f\", \"parameters\": {}}",
                "",
                vec![f()],
            ),
            (
                "{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"g\", \"parameters\": {\"b\": 2}}",
                "",
                vec![f(), call(None, "g", r#"{"b":2}"#)],
            ),
            (
                "Calling now. <|python_tag|>{\"name\": \"f\", \"parameters\": {}}",
                "Calling now.",
                vec![f()],
            ),
            (
                "{\"name\": \"f\", \"parameters\": {}}; and then",
                "; and then",
                vec![f()],
            ),
        ] {
            assert_reply(ToolFormat::Llama3Json, text, content, calls);
        }
    }

    /// JSON and brackets that are not calls in a format stay content there.
    #[test]
    fn answers_that_are_not_calls_stay_content() {
        for (format, texts) in [
            (
                ToolFormat::Llama3Json,
                &[
                    "{\"name\": \"Bob\", \"age\": 3}",
                    "{\"name\": \"Bob\"}",
                    "{\"type\": \"person\", \"name\": \"Bob\", \"parameters\": {}}",
                    "{\"city\": \"Paris\"}",
                    "{}",
                    "{\"name\": \"f\", \"parameters\": {}",
                    "Sure: {\"name\": \"f\", \"parameters\": {}}",
                ][..],
            ),
            (
                ToolFormat::Mistral,
                &[
                    "[1, 2, 3]",
                    "[{\"x\": 1}]",
                    "[]",
                    "[{\"name\": \"f\"",
                    "[see below] ok",
                ],
            ),
            (
                ToolFormat::Generic,
                &[
                    "{\"answer\": 4}",
                    "{\"tool_calls\": []}",
                    "Just text.",
                    "{\"tool_calls\": [{\"name\": \"f\"",
                ],
            ),
        ] {
            assert_content(format, texts);
        }
    }

    #[test]
    fn mistral_call_lists() {
        let text = "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": \"a1B2c3D4e\"}, {\"name\": \"g\", \"arguments\": {}}]";
        let calls = || {
            vec![
                call(Some("a1B2c3D4e"), "get_weather", r#"{"city":"Paris"}"#),
                call(None, "g", "{}"),
            ]
        };
        for prefix in ["", "[TOOL_CALLS]", "[TOOL_CALLS] "] {
            assert_reply(ToolFormat::Mistral, &format!("{prefix}{text}"), "", calls());
        }
        let spaced = "\n [ {\"name\": \"f\", \"arguments\": {\"x\": \"y\"}} ]\n";
        let f = call(None, "f", r#"{"x":"y"}"#);
        assert_reply(ToolFormat::Mistral, spaced, "", vec![f]);
    }

    #[test]
    fn generic_replies() {
        let calls = "{\"tool_calls\": [{\"name\": \"f\", \"arguments\": {\"a\": 1}}, {\"name\": \"g\", \"arguments\": {}, \"id\": \"call_1\"}]}";
        let (f, g) = (
            call(None, "f", r#"{"a":1}"#),
            call(Some("call_1"), "g", "{}"),
        );
        assert_reply(ToolFormat::Generic, calls, "", vec![f, g]);
        let single = "{\"tool_call\": {\"name\": \"f\", \"arguments\": {}}}";
        assert_reply(ToolFormat::Generic, single, "", vec![call(None, "f", "{}")]);
        let response = " {\"response\": \"Hello \\\"you\\\"\\n\\u00e9\\ud83d\\ude00 \\/ done\"}\n";
        assert_reply(
            ToolFormat::Generic,
            response,
            "Hello \"you\"\né😀 / done",
            vec![],
        );
        let json_response = "{\"response\": {\"a\": [1, 2]}}";
        assert_reply(ToolFormat::Generic, json_response, r#"{"a":[1,2]}"#, vec![]);
    }

    #[test]
    fn generic_response_with_broken_escapes_is_kept_verbatim() {
        let text = "{\"response\": \"a\\qb \\u12 \\ud800x \\udc00 end";
        let kept = "a\\qb \\u12 \u{FFFD}x \u{FFFD} end";
        assert_reply(ToolFormat::Generic, text, kept, vec![]);
    }

    // ---- streaming ----

    fn stream(format: ToolFormat, pieces: &[&str]) -> Vec<ReplyDelta> {
        let mut stream = ToolCallStream::new(format);
        let mut deltas = Vec::new();
        for piece in pieces {
            deltas.extend(stream.push(piece));
        }
        deltas.extend(stream.finish());
        deltas
    }

    /// Folds deltas into a reply, checking each call starts before its arguments.
    fn fold(deltas: &[ReplyDelta]) -> ParsedReply {
        let mut out = ParsedReply::default();
        for delta in deltas {
            match delta {
                ReplyDelta::Content(text) => out.content.push_str(text),
                ReplyDelta::CallStart { index, id, name } => {
                    assert_eq!(*index, out.tool_calls.len(), "calls start in order");
                    out.tool_calls.push(ToolCall {
                        id: id.clone(),
                        name: name.clone(),
                        arguments: String::new(),
                    });
                }
                ReplyDelta::CallArguments { index, fragment } => {
                    let call = out
                        .tool_calls
                        .get_mut(*index)
                        .expect("arguments after their start");
                    call.arguments.push_str(fragment);
                }
            }
        }
        out
    }

    fn assert_split_invariant(format: ToolFormat, text: &str) {
        let whole = parse_reply(format, text);
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for &cut in &cuts {
            let got = fold(&stream(format, &[&text[..cut], &text[cut..]]));
            assert_eq!(got, whole, "{format:?} {text:?} cut at {cut}");
        }
        // Three pieces, over a sample of cut pairs to keep the test quick.
        let step = (cuts.len() / 40).max(1);
        for &a in cuts.iter().step_by(step) {
            for &b in cuts.iter().filter(|&&b| b >= a).step_by(step) {
                let got = fold(&stream(format, &[&text[..a], &text[a..b], &text[b..]]));
                assert_eq!(got, whole, "{format:?} {text:?} cut at {a} and {b}");
            }
        }
        let chars: Vec<String> = text.chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(
            fold(&stream(format, &pieces)),
            whole,
            "{format:?} {text:?} by chars"
        );
    }

    const SAMPLES: &[&str] = &[
        "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>",
        "<tool_call>{\"name\":\"f\",\"arguments\":{\"a\":\"x</tool_call>y\"}}</tool_call> after the call",
        "<tool_call>oops <tool_call>{\"name\": \"f\"}</tool_call> done",
        "Sure.\n<tool_call>\n{\"name\": \"f\", \"argum",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_",
        " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"Zürich ✓\"}}",
        "{\"name\": \"f\", \"parameters\": {}}; {\"name\": \"g\", \"parameters\": {\"b\": 2}} ;x",
        "<|python_tag|>{\"name\": \"f\", \"parameters\": {}}",
        "Calling now. <|python_tag|>{\"name\": \"f\", \"parameters\": {}}",
        "{\"name\": \"Bob\", \"age\": 3} is a person",
        "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"x\": [1, {\"y\": \"]\"}]}, \"id\": \"abcdefghi\"}]",
        "[{\"name\": \"f\", \"arguments\": {}}] trailing words",
        "[see below] ok [TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]",
        "{\"tool_calls\": [{\"name\": \"f\", \"arguments\": {\"a\": 1}}]}",
        "  {\"response\": \"Hello \\\"you\\\"\\n\\u00e9\\ud83d\\ude00 \\/ done\"}\n and after",
        "{\"response\": \"a\\qb \\u12 \\ud800x \\udc00 end",
        "{\"response\": {\"a\": [1, 2]}}",
        "{\"answer\": 4}",
        "  plain words, with < and [ and { inside.  ",
        "",
        "   \n",
    ];

    #[test]
    fn streamed_reply_equals_whole_reply_at_every_cut() {
        for format in [
            ToolFormat::Hermes,
            ToolFormat::Llama3Json,
            ToolFormat::Mistral,
            ToolFormat::Generic,
        ] {
            for text in SAMPLES {
                assert_split_invariant(format, text);
            }
        }
    }

    /// Pushing the pieces of `steps` in turn into a new stream of `format`: each gives the
    /// content paired with it (no delta for ""). Returns the stream.
    fn assert_streamed_content(format: ToolFormat, steps: &[(&str, &str)]) -> ToolCallStream {
        let mut s = ToolCallStream::new(format);
        for &(piece, content) in steps {
            let want = match content {
                "" => vec![],
                _ => vec![ReplyDelta::Content(content.into())],
            };
            assert_eq!(s.push(piece), want, "{format:?} {piece:?}");
        }
        s
    }

    #[test]
    fn content_is_emitted_promptly_and_possible_markers_withheld() {
        let hermes = [
            ("Hello wor", "Hello wor"),
            ("ld <tool_", "ld"),
            ("x> ok", " <tool_x> ok"),
        ];
        assert_streamed_content(ToolFormat::Hermes, &hermes);
        let bob = [
            ("{\"na", ""),
            ("me\": \"Bob\", \"a", ""),
            ("ge\": 3}", "{\"name\": \"Bob\", \"age\": 3}"),
        ];
        assert_streamed_content(ToolFormat::Llama3Json, &bob);
        // A JSON answer is shown as soon as its first key rules out a call.
        assert_streamed_content(ToolFormat::Llama3Json, &[("{\"ci", "{\"ci")]);
        assert_streamed_content(ToolFormat::Mistral, &[("[", ""), ("1, 2]", "[1, 2]")]);
    }

    #[test]
    fn call_is_emitted_when_its_json_is_complete() {
        let mut s = ToolCallStream::new(ToolFormat::Hermes);
        assert_eq!(
            s.push("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}"),
            vec![]
        );
        assert_eq!(
            s.push("\n</tool_call>"),
            vec![
                ReplyDelta::CallStart {
                    index: 0,
                    id: None,
                    name: "f".into()
                },
                ReplyDelta::CallArguments {
                    index: 0,
                    fragment: r#"{"a":1}"#.into()
                },
            ]
        );
        assert_eq!(s.finish(), vec![]);

        let mut s = ToolCallStream::new(ToolFormat::Llama3Json);
        assert_eq!(s.push("{\"name\": \"f\", \"parameters\": {\"a\""), vec![]);
        assert_eq!(s.push(": 1}}").len(), 2);
    }

    #[test]
    fn generic_response_streams_as_it_arrives() {
        let steps = [
            ("{\"response\": \"Hel", "Hel"),
            ("lo\\", "lo"),
            ("n wor", "\n wor"),
            ("ld\"}", "ld"),
        ];
        let mut s = assert_streamed_content(ToolFormat::Generic, &steps);
        assert_eq!(s.finish(), vec![]);
    }

    // ---- call ids and the generic prompt ----

    #[test]
    fn call_ids_have_the_expected_shape() {
        let mistral = call_id(ToolFormat::Mistral, 7);
        assert_eq!(mistral.len(), 9);
        assert!(mistral.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(mistral, call_id(ToolFormat::Mistral, 8));
        assert_eq!(mistral, call_id(ToolFormat::Mistral, 7));
        let openai = call_id(ToolFormat::Hermes, 7);
        assert!(openai.starts_with("call_") && openai.len() == 29);
    }

    fn weather_tools() -> Vec<ToolSpec> {
        vec![
            ToolSpec::new(
                "get_weather",
                Some("Current weather in a city".into()),
                Some(json!({
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": "string", "enum": ["c", "f"]},
                    },
                    "required": ["city"],
                })),
            ),
            ToolSpec::new("get_time", None, None),
        ]
    }

    #[test]
    fn generic_prompt_lists_tools_and_the_format() {
        let prompt = generic_system_prompt(&weather_tools());
        assert!(prompt.contains(r#"{"name":"get_weather","description":"Current weather in a city","parameters":{"type":"object""#));
        assert!(
            prompt
                .contains(r#"{"name":"get_time","parameters":{"type":"object","properties":{}}}"#)
        );
        assert!(prompt.contains(r#"{"tool_calls": [{"name": "#));
        assert!(prompt.contains(r#"{"response": "#));
    }

    // ---- grammars ----

    fn accepts(lark: &str, text: &str) -> bool {
        use llguidance::{Matcher, ParserFactory, api::TopLevelGrammar};
        let env = toktrie::ApproximateTokEnv::single_byte_env();
        let mut factory = ParserFactory::new_simple(&env).unwrap();
        factory.quiet();
        let parser = factory.create_parser(TopLevelGrammar::from_lark(lark.to_owned()));
        let mut matcher = Matcher::new(parser);
        assert!(
            !matcher.is_error(),
            "grammar does not compile: {:?}\n{lark}",
            matcher.get_error()
        );
        let tokens: Vec<u32> = text.bytes().map(u32::from).collect();
        matcher.consume_tokens(&tokens).is_ok() && matcher.is_accepting().unwrap_or(false)
    }

    fn grammar(format: ToolFormat, choice: &ToolChoice, parallel: bool) -> String {
        tool_call_grammar(format, &weather_tools(), choice, parallel)
    }

    #[test]
    fn hermes_grammar_forces_blocks() {
        let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>";
        let two = format!(
            "{one}\n<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{}}}}\n</tool_call>"
        );
        let required = grammar(ToolFormat::Hermes, &ToolChoice::Required, false);
        assert!(accepts(&required, one));
        assert!(!accepts(&required, &two));
        assert!(!accepts(
            &required,
            &one.replace("get_weather", "get_wether")
        ));
        assert!(
            !accepts(&required, &one.replace("\"city\": \"Paris\", ", "")),
            "required argument"
        );
        assert!(!accepts(&required, &one.replace("\"c\"", "\"k\"")), "enum");
        assert!(!accepts(&required, &format!("Sure. {one}")));
        let parallel = grammar(ToolFormat::Hermes, &ToolChoice::Required, true);
        assert!(accepts(&parallel, one));
        assert!(accepts(&parallel, &two));
        let named = grammar(
            ToolFormat::Hermes,
            &ToolChoice::Named("get_time".into()),
            true,
        );
        assert!(accepts(
            &named,
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"
        ));
        assert!(!accepts(&named, one));
        // What the grammar produces, the parser understands.
        assert_eq!(parse_reply(ToolFormat::Hermes, &two).tool_calls.len(), 2);
    }

    #[test]
    fn llama3_grammar_forces_one_call() {
        let text = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        let required = grammar(ToolFormat::Llama3Json, &ToolChoice::Required, true);
        assert!(accepts(&required, text));
        assert!(!accepts(&required, &text.replace("get_weather", "nope")));
        assert!(!accepts(&required, &format!("{text}; {text}")));
        assert!(!accepts(
            &required,
            &text.replace("parameters", "arguments")
        ));
        let named = grammar(
            ToolFormat::Llama3Json,
            &ToolChoice::Named("get_weather".into()),
            false,
        );
        assert!(accepts(&named, text));
        assert!(!accepts(
            &named,
            "{\"name\": \"get_time\", \"parameters\": {}}"
        ));
        assert_eq!(
            parse_reply(ToolFormat::Llama3Json, text).tool_calls.len(),
            1
        );
    }

    #[test]
    fn mistral_grammar_forces_a_call_array() {
        let one = "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]";
        let two = "[{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_time\", \"arguments\": {}}]";
        let required = grammar(ToolFormat::Mistral, &ToolChoice::Required, false);
        assert!(accepts(&required, one));
        assert!(!accepts(&required, two));
        assert!(!accepts(&required, "[]"));
        assert!(!accepts(
            &required,
            &one.replace("get_weather", "get_weathers")
        ));
        let parallel = grammar(ToolFormat::Mistral, &ToolChoice::Required, true);
        assert!(accepts(&parallel, two));
        let named = grammar(
            ToolFormat::Mistral,
            &ToolChoice::Named("get_time".into()),
            true,
        );
        assert!(!accepts(&named, one));
        assert!(accepts(
            &named,
            "[{\"name\": \"get_time\", \"arguments\": {}}]"
        ));
        assert_eq!(parse_reply(ToolFormat::Mistral, two).tool_calls.len(), 2);
    }

    #[test]
    fn generic_grammars() {
        let calls =
            "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]}";
        let required = grammar(ToolFormat::Generic, &ToolChoice::Required, true);
        assert!(accepts(&required, calls));
        assert!(!accepts(&required, &calls.replace("get_weather", "x")));
        assert!(!accepts(&required, "{\"response\": \"hi\"}"));
        let auto = generic_auto_grammar(&weather_tools(), true);
        assert!(accepts(&auto, calls));
        assert!(accepts(&auto, "{\"response\": \"hi \\\"there\\\"\"}"));
        assert!(!accepts(&auto, "hi"));
        assert!(accepts(
            &generic_auto_grammar(&[], false),
            "{\"response\": \"hi\"}"
        ));
        assert_eq!(parse_reply(ToolFormat::Generic, calls).tool_calls.len(), 1);
    }

    #[test]
    fn unsatisfiable_choices_still_give_a_call_grammar() {
        let named = tool_call_grammar(
            ToolFormat::Hermes,
            &weather_tools(),
            &ToolChoice::Named("x".into()),
            false,
        );
        assert!(accepts(
            &named,
            "<tool_call>\n{\"name\": \"x\", \"arguments\": {}}\n</tool_call>"
        ));
        assert!(!accepts(
            &named,
            "<tool_call>\n{\"name\": \"y\", \"arguments\": {}}\n</tool_call>"
        ));
        let any = tool_call_grammar(ToolFormat::Mistral, &[], &ToolChoice::Required, true);
        assert!(accepts(
            &any,
            "[{\"name\": \"y\", \"arguments\": {\"a\": 1}}]"
        ));
        assert!(!accepts(&any, "[{\"name\": \"\", \"arguments\": {}}]"));
    }

    #[test]
    fn schemas_with_local_refs_and_odd_names_compile() {
        let tools = vec![ToolSpec::new(
            "make \"it\" so\\now",
            None,
            Some(json!({
                "type": "object",
                "properties": {"item": {"$ref": "#/$defs/Item"}},
                "required": ["item"],
                "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
            })),
        )];
        let lark = tool_call_grammar(ToolFormat::Hermes, &tools, &ToolChoice::Required, false);
        let text = "<tool_call>\n{\"name\": \"make \\\"it\\\" so\\\\now\", \"arguments\": {\"item\": {\"n\": 3}}}\n</tool_call>";
        assert!(accepts(&lark, text));
        assert!(!accepts(&lark, &text.replace("3", "\"three\"")));
        assert_eq!(
            parse_reply(ToolFormat::Hermes, text).tool_calls[0].name,
            "make \"it\" so\\now"
        );
    }
}
