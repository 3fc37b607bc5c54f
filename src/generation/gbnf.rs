//! GBNF grammars (llama.cpp's `grammar` field) translated to llguidance's Lark dialect.
//!
//! References: llama.cpp `grammars/README.md` and `src/llama-grammar.cpp` (the syntax this
//! parser follows), llguidance `python/llguidance/gbnf_to_lark.py` (its own converter) and
//! `src/lark/` (the dialect we emit).
//!
//! GBNF is a character-level grammar: no lexer, no implicit whitespace. llguidance splits a
//! grammar into lexemes (terminals, literals, regexes), which its lexer matches greedily (the
//! longest match, without backtracking), and an Earley parser over the lexemes. One lexeme per
//! character keeps the language but makes every byte a parser step. One terminal per purely
//! lexical rule, which is what llguidance's Python converter does, is fast but can change the
//! language: with `word ::= [a-z]+` and `root ::= word "x"`, the terminal `[a-z]+` swallows the
//! `x` and "abx" is refused.
//!
//! So a lexical piece (no recursion, no token) becomes one terminal only when greedy matching
//! provably ends it where the character grammar may: no character that can continue one of its
//! matches, or continue it into a match of another lexeme with a common first byte, may follow it
//! in the grammar. Characters are compared by UTF-8 lead byte because the lexer reads bytes. A
//! piece that fails is split (a run of symbols drops its last symbol, an alternation or repetition
//! moves to the grammar level, a rule becomes a Lark rule) until every lexeme passes; single
//! characters always pass. Within a terminal the regex engine sees the whole piece, so
//! `root ::= [a-z]+ "x"` stays one exact terminal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

/// Why a GBNF grammar was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GbnfError {
    #[error("line {line}, column {column}: {problem}")]
    At {
        line: usize,
        column: usize,
        problem: Problem,
    },
    #[error("no `root` rule")]
    NoRoot,
}

/// What is wrong at a place in a GBNF grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("unterminated string")]
    UnterminatedString,
    #[error("unterminated character class")]
    UnterminatedClass,
    #[error("character class matches no character")]
    EmptyClass,
    #[error("unknown escape `\\{0}`")]
    UnknownEscape(char),
    #[error("`\\{escape}` needs {digits} hex digits")]
    ShortHexEscape { escape: char, digits: usize },
    #[error("U+{0:X} is not a Unicode scalar value")]
    InvalidCodePoint(u32),
    #[error("range `{0}-{1}` is reversed")]
    ReversedRange(char, char),
    #[error("expected a rule name")]
    ExpectedName,
    #[error("expected `::=` after the rule name")]
    ExpectedDefinition,
    #[error("expected `)`")]
    UnclosedGroup,
    #[error("expected {0}")]
    Expected(&'static str),
    #[error("unexpected `{0}`")]
    Unexpected(char),
    #[error("`{0}` has nothing to repeat")]
    NothingToRepeat(char),
    #[error("repetition count {0} is over the limit of {MAX_REPETITIONS}")]
    TooManyRepetitions(u64),
    #[error("repetition `{{{min},{max}}}` has its maximum below its minimum")]
    ReversedRepetition { min: u32, max: u32 },
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("token `{0}` is not a single tokenizer token name (no spaces or angle brackets)")]
    InvalidToken(String),
    #[error("negated token `!{0}` must name the token by id, as `!<[id]>`")]
    NegatedTokenText(String),
    #[error("rule `{0}` is defined twice")]
    DuplicateRule(String),
    #[error("undefined rule `{0}`")]
    UndefinedRule(String),
}

/// llama.cpp refuses larger minimum counts and treats larger maximums as unbounded.
const MAX_REPETITIONS: u64 = 2000;
/// Bounds the recursion of every pass over the expression tree.
const MAX_DEPTH: usize = 256;
/// NFA states per lexeme; a bigger piece is split rather than analysed.
const MAX_NFA_STATES: usize = 20_000;
/// State pairs explored when comparing two lexemes; past it the pair counts as a conflict.
const MAX_PRODUCT_STATES: usize = 20_000;
/// The whole translation's analysis work, so that no grammar costs more than a fraction of a
/// second. Past it, pieces are split unexamined: slower to match, the same language.
const TOTAL_NFA_STATES: usize = 250_000;
const TOTAL_PRODUCT_STATES: usize = 300_000;

/// A GBNF grammar as llguidance Lark text; `root` is the start rule.
pub fn gbnf_to_lark(gbnf: &str) -> Result<String, GbnfError> {
    let grammar = Parser::new(gbnf).parse()?;
    let analysis = Analysis::new(&grammar);
    let plan = Plan::settle(&grammar, &analysis);
    Ok(Emitter::new(&grammar).emit(&plan))
}

// ---------------------------------------------------------------------------------------------
// Syntax tree

type NodeId = usize;
type RuleId = usize;

/// A node's children always have smaller ids, so one forward pass sees children first.
#[derive(Debug, Clone)]
enum Node {
    /// One code point from the set.
    Chars(CharSet),
    /// At least one character.
    Literal(Vec<char>),
    /// Matches the empty string when it has no items.
    Seq(Vec<NodeId>),
    /// At least two alternatives.
    Alt(Vec<NodeId>),
    Repeat {
        item: NodeId,
        min: u32,
        max: Option<u32>,
    },
    Rule(RuleId),
    Token(TokenRef),
}

#[derive(Debug, Clone)]
enum TokenRef {
    Id {
        id: u32,
        negated: bool,
    },
    /// `<name>` with the angle brackets.
    Text(String),
}

impl TokenRef {
    fn lark(&self) -> String {
        match self {
            Self::Id { id, negated: false } => format!("<[{id}]>"),
            Self::Id { id, negated: true } => format!("<[^{id}]>"),
            Self::Text(text) => text.clone(),
        }
    }
}

struct RuleDef {
    name: String,
    body: Option<NodeId>,
    /// Where the rule was first named, for "undefined rule".
    first_use: usize,
}

struct Grammar {
    nodes: Vec<Node>,
    rules: Vec<RuleDef>,
    root: RuleId,
}

impl Grammar {
    fn body(&self, rule: RuleId) -> NodeId {
        // Every rule has a body once parsing succeeded; an empty sequence is a harmless stand-in.
        self.rules[rule].body.unwrap_or(0)
    }

    /// Items `start..end` of a sequence node (none for any other node).
    fn run_items(&self, seq: NodeId, start: usize, end: usize) -> &[NodeId] {
        match &self.nodes[seq] {
            Node::Seq(items) => items.get(start..end).unwrap_or_default(),
            _ => &[],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parser (follows llama.cpp's: a rule ends at a newline unless inside parentheses or after `|`)

struct Parser<'a> {
    src: &'a str,
    pos: usize,
    nodes: Vec<Node>,
    depth: Vec<usize>,
    /// Open parentheses.
    groups: usize,
    rules: Vec<RuleDef>,
    by_name: HashMap<String, RuleId>,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        // Node 0 is the empty sequence, the stand-in `Grammar::body` falls back to.
        Self {
            src,
            pos: 0,
            nodes: vec![Node::Seq(Vec::new())],
            depth: vec![1],
            groups: 0,
            rules: Vec::new(),
            by_name: HashMap::new(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.src[self.pos..].chars().nth(n)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn error(&self, at: usize, problem: Problem) -> GbnfError {
        let before = &self.src[..at];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        GbnfError::At {
            line,
            column,
            problem,
        }
    }

    fn push(&mut self, node: Node) -> Result<NodeId, GbnfError> {
        let children: Vec<NodeId> = match &node {
            Node::Seq(items) | Node::Alt(items) => items.clone(),
            Node::Repeat { item, .. } => vec![*item],
            _ => Vec::new(),
        };
        let depth = 1 + children.iter().map(|&c| self.depth[c]).max().unwrap_or(0);
        if depth > MAX_DEPTH {
            return Err(self.error(self.pos, Problem::TooDeep));
        }
        self.nodes.push(node);
        self.depth.push(depth);
        Ok(self.nodes.len() - 1)
    }

    fn skip_space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '\r' | '\n' if newlines => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\r' && c != '\n') {
                        self.bump();
                    }
                }
                _ => break,
            }
        }
    }

    fn parse(mut self) -> Result<Grammar, GbnfError> {
        self.skip_space(true);
        while self.peek().is_some() {
            self.parse_rule()?;
        }
        if let Some(rule) = self
            .rules
            .iter()
            .filter(|r| r.body.is_none())
            .min_by_key(|r| r.first_use)
        {
            return Err(self.error(rule.first_use, Problem::UndefinedRule(rule.name.clone())));
        }
        let root = match self.by_name.get("root") {
            Some(&root) => root,
            None => return Err(GbnfError::NoRoot),
        };
        Ok(Grammar {
            nodes: self.nodes,
            rules: self.rules,
            root,
        })
    }

    fn rule_id(&mut self, name: &str, at: usize) -> RuleId {
        if let Some(&id) = self.by_name.get(name) {
            return id;
        }
        self.rules.push(RuleDef {
            name: name.to_string(),
            body: None,
            first_use: at,
        });
        self.by_name.insert(name.to_string(), self.rules.len() - 1);
        self.rules.len() - 1
    }

    fn parse_name(&mut self) -> Result<&'a str, GbnfError> {
        let start = self.pos;
        while self.peek().is_some_and(is_word_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error(start, Problem::ExpectedName));
        }
        Ok(&self.src[start..self.pos])
    }

    fn parse_rule(&mut self) -> Result<(), GbnfError> {
        let at = self.pos;
        let name = self.parse_name()?;
        self.skip_space(false);
        if !self.src[self.pos..].starts_with("::=") {
            return Err(self.error(self.pos, Problem::ExpectedDefinition));
        }
        self.pos += 3;
        self.skip_space(true);
        let body = self.parse_alternatives(false)?;
        match self.peek() {
            None | Some('\r' | '\n') => {}
            Some(c) => return Err(self.error(self.pos, Problem::Unexpected(c))),
        }
        let id = self.rule_id(name, at);
        if self.rules[id].body.is_some() {
            return Err(self.error(at, Problem::DuplicateRule(name.to_string())));
        }
        self.rules[id].body = Some(body);
        self.skip_space(true);
        Ok(())
    }

    fn parse_alternatives(&mut self, nested: bool) -> Result<NodeId, GbnfError> {
        let mut alternatives = vec![self.parse_sequence(nested)?];
        while self.peek() == Some('|') {
            self.bump();
            self.skip_space(true);
            alternatives.push(self.parse_sequence(nested)?);
        }
        if alternatives.len() == 1 {
            return Ok(alternatives[0]);
        }
        self.push(Node::Alt(alternatives))
    }

    fn parse_sequence(&mut self, nested: bool) -> Result<NodeId, GbnfError> {
        let mut items: Vec<NodeId> = Vec::new();
        while let Some(c) = self.peek() {
            let at = self.pos;
            match c {
                '"' => {
                    let chars = self.parse_literal()?;
                    let node = if chars.is_empty() {
                        Node::Seq(Vec::new())
                    } else {
                        Node::Literal(chars)
                    };
                    items.push(self.push(node)?);
                }
                '[' => {
                    let class = self.parse_class()?;
                    items.push(self.push(Node::Chars(class))?);
                }
                '.' => {
                    self.bump();
                    items.push(self.push(Node::Chars(CharSet::full()))?);
                }
                '<' | '!' => {
                    let token = self.parse_token()?;
                    items.push(self.push(Node::Token(token))?);
                }
                '(' => {
                    // The parser recurses per group, whether or not the group makes a node.
                    self.groups += 1;
                    if self.groups > MAX_DEPTH {
                        return Err(self.error(at, Problem::TooDeep));
                    }
                    self.bump();
                    self.skip_space(true);
                    let inner = self.parse_alternatives(true)?;
                    self.groups -= 1;
                    if self.peek() != Some(')') {
                        return Err(self.error(self.pos, Problem::UnclosedGroup));
                    }
                    self.bump();
                    items.push(inner);
                }
                '*' | '+' | '?' | '{' => {
                    let Some(last) = items.pop() else {
                        return Err(self.error(at, Problem::NothingToRepeat(c)));
                    };
                    let (min, max) = match c {
                        '*' => {
                            self.bump();
                            (0, None)
                        }
                        '+' => {
                            self.bump();
                            (1, None)
                        }
                        '?' => {
                            self.bump();
                            (0, Some(1))
                        }
                        _ => self.parse_count(nested)?,
                    };
                    items.push(self.repeat(last, min, max)?);
                }
                c if is_word_char(c) => {
                    let name = self.parse_name()?;
                    let id = self.rule_id(name, at);
                    items.push(self.push(Node::Rule(id))?);
                }
                _ => break,
            }
            self.skip_space(nested);
        }
        match items.len() {
            1 => Ok(items[0]),
            _ => self.push(Node::Seq(items)),
        }
    }

    fn repeat(&mut self, item: NodeId, min: u32, max: Option<u32>) -> Result<NodeId, GbnfError> {
        match max {
            Some(0) => self.push(Node::Seq(Vec::new())),
            Some(1) if min == 1 => Ok(item),
            _ if matches!(&self.nodes[item], Node::Seq(items) if items.is_empty()) => Ok(item),
            _ => self.push(Node::Repeat { item, min, max }),
        }
    }

    /// `{m}`, `{m,}` or `{m,n}`, the `{` not yet consumed.
    fn parse_count(&mut self, nested: bool) -> Result<(u32, Option<u32>), GbnfError> {
        let open = self.pos;
        self.bump();
        self.skip_space(nested);
        let min = self.parse_int()?;
        self.skip_space(nested);
        let max = match self.bump() {
            Some('}') => Some(min),
            Some(',') => {
                self.skip_space(nested);
                let max = if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    Some(self.parse_int()?)
                } else {
                    None
                };
                self.skip_space(nested);
                if self.bump() != Some('}') {
                    return Err(self.error(self.pos, Problem::Expected("`}`")));
                }
                max
            }
            _ => return Err(self.error(self.pos, Problem::Expected("`,` or `}`"))),
        };
        if min > MAX_REPETITIONS {
            return Err(self.error(open, Problem::TooManyRepetitions(min)));
        }
        let min = min as u32;
        let max = match max {
            Some(max) if max > MAX_REPETITIONS => None,
            Some(max) if (max as u32) < min => {
                return Err(self.error(
                    open,
                    Problem::ReversedRepetition {
                        min,
                        max: max as u32,
                    },
                ));
            }
            max => max.map(|m| m as u32),
        };
        Ok((min, max))
    }

    fn parse_int(&mut self) -> Result<u64, GbnfError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(self.error(start, Problem::Expected("a number")));
        }
        // Saturating: anything this large is over every limit anyway.
        Ok(self.src[start..self.pos].parse().unwrap_or(u64::MAX))
    }

    /// One possibly escaped character of a literal or class, as a code point.
    fn parse_char(&mut self) -> Result<u32, GbnfError> {
        let at = self.pos;
        let Some(c) = self.bump() else {
            return Err(self.error(at, Problem::Expected("a character")));
        };
        if c != '\\' {
            return Ok(c as u32);
        }
        let Some(escape) = self.bump() else {
            return Err(self.error(at, Problem::Expected("an escaped character")));
        };
        let digits = match escape {
            'x' => 2,
            'u' => 4,
            'U' => 8,
            't' => return Ok('\t' as u32),
            'r' => return Ok('\r' as u32),
            'n' => return Ok('\n' as u32),
            '\\' | '"' | '[' | ']' | '-' => return Ok(escape as u32),
            other => return Err(self.error(at, Problem::UnknownEscape(other))),
        };
        let hex = self.src[self.pos..]
            .chars()
            .take(digits)
            .take_while(char::is_ascii_hexdigit)
            .count();
        if hex != digits {
            return Err(self.error(at, Problem::ShortHexEscape { escape, digits }));
        }
        let value = u32::from_str_radix(&self.src[self.pos..self.pos + digits], 16)
            .map_err(|_| self.error(at, Problem::ShortHexEscape { escape, digits }))?;
        self.pos += digits;
        Ok(value)
    }

    fn parse_literal(&mut self) -> Result<Vec<char>, GbnfError> {
        let open = self.pos;
        self.bump();
        let mut chars = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.error(open, Problem::UnterminatedString)),
                Some('"') => {
                    self.bump();
                    return Ok(chars);
                }
                Some(_) => {
                    let at = self.pos;
                    let c = self.parse_char()?;
                    let c = char::from_u32(c)
                        .ok_or_else(|| self.error(at, Problem::InvalidCodePoint(c)))?;
                    chars.push(c);
                }
            }
        }
    }

    fn parse_class(&mut self) -> Result<CharSet, GbnfError> {
        let open = self.pos;
        self.bump();
        let negated = self.peek() == Some('^');
        if negated {
            self.bump();
        }
        let mut ranges = Vec::new();
        loop {
            let at = self.pos;
            match self.peek() {
                None => return Err(self.error(open, Problem::UnterminatedClass)),
                Some(']') => {
                    self.bump();
                    break;
                }
                Some(_) => {
                    let lo = self.class_char()?;
                    let hi =
                        if self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c != ']') {
                            self.bump();
                            self.class_char()?
                        } else {
                            lo
                        };
                    if hi < lo {
                        let show =
                            |c: u32| char::from_u32(c).unwrap_or(char::REPLACEMENT_CHARACTER);
                        return Err(self.error(at, Problem::ReversedRange(show(lo), show(hi))));
                    }
                    ranges.push((lo, hi));
                }
            }
        }
        let mut set = CharSet::new(ranges);
        if negated {
            set = set.complement();
        }
        if set.is_empty() {
            return Err(self.error(open, Problem::EmptyClass));
        }
        Ok(set)
    }

    /// A class endpoint: surrogates are allowed (and dropped from the set), beyond Unicode is not.
    fn class_char(&mut self) -> Result<u32, GbnfError> {
        let at = self.pos;
        let c = self.parse_char()?;
        if c > CharSet::MAX {
            return Err(self.error(at, Problem::InvalidCodePoint(c)));
        }
        Ok(c)
    }

    fn parse_token(&mut self) -> Result<TokenRef, GbnfError> {
        let at = self.pos;
        let negated = self.peek() == Some('!');
        if negated {
            self.bump();
        }
        if self.peek() != Some('<') {
            return Err(self.error(self.pos, Problem::Expected("`<` after `!`")));
        }
        if self.peek_at(1) == Some('[') {
            self.pos += 2;
            let id = self.parse_int()?;
            if self.bump() != Some(']') || self.bump() != Some('>') {
                return Err(self.error(self.pos, Problem::Expected("`]>`")));
            }
            let id =
                u32::try_from(id).map_err(|_| self.error(at, Problem::Expected("a token id")))?;
            return Ok(TokenRef::Id { id, negated });
        }
        let start = self.pos;
        let Some(len) = self.src[start..].find('>') else {
            return Err(self.error(at, Problem::Expected("`>`")));
        };
        let text = &self.src[start..start + len + 1];
        self.pos = start + len + 1;
        let inner = &text[1..text.len() - 1];
        if inner.is_empty() || inner.contains(|c: char| c.is_whitespace() || c == '<') {
            return Err(self.error(at, Problem::InvalidToken(text.to_string())));
        }
        if negated {
            return Err(self.error(at, Problem::NegatedTokenText(text.to_string())));
        }
        Ok(TokenRef::Text(text.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Character and byte sets

/// Sorted, disjoint, non-adjacent code point ranges, never containing a surrogate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CharSet(Vec<(u32, u32)>);

impl CharSet {
    const MAX: u32 = 0x10FFFF;
    const SURROGATES: (u32, u32) = (0xD800, 0xDFFF);

    fn new(ranges: Vec<(u32, u32)>) -> Self {
        let mut pieces = Vec::new();
        for (lo, hi) in ranges {
            let (s_lo, s_hi) = Self::SURROGATES;
            if hi < s_lo || lo > s_hi {
                pieces.push((lo, hi));
                continue;
            }
            if lo < s_lo {
                pieces.push((lo, s_lo - 1));
            }
            if hi > s_hi {
                pieces.push((s_hi + 1, hi));
            }
        }
        pieces.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::new();
        for (lo, hi) in pieces {
            match merged.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Self(merged)
    }

    fn full() -> Self {
        Self::new(vec![(0, Self::MAX)])
    }

    fn single(c: char) -> Self {
        Self(vec![(c as u32, c as u32)])
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn complement(&self) -> Self {
        let mut gaps = Vec::new();
        let mut next = 0u32;
        for &(lo, hi) in &self.0 {
            if lo > next {
                gaps.push((next, lo - 1));
            }
            next = hi + 1;
        }
        if next <= Self::MAX {
            gaps.push((next, Self::MAX));
        }
        Self::new(gaps)
    }

    fn lead_bytes(&self) -> ByteSet {
        let mut bytes = ByteSet::default();
        for &(lo, hi) in &self.0 {
            bytes.insert_code_points(lo, hi);
        }
        bytes
    }
}

/// A set of bytes: here, first bytes of UTF-8 encodings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn insert(&mut self, b: u8) {
        self.0[usize::from(b >> 6)] |= 1 << (b & 63);
    }

    /// Adds the lead bytes of every code point in `lo..=hi`.
    fn insert_code_points(&mut self, lo: u32, hi: u32) {
        // Per encoding length, lead bytes grow with the code point and cover every value between.
        for (seg_lo, seg_hi) in [
            (0, 0x7F),
            (0x80, 0x7FF),
            (0x800, 0xFFFF),
            (0x10000, 0x10FFFF),
        ] {
            let (a, b) = (lo.max(seg_lo), hi.min(seg_hi));
            if a <= b {
                for byte in lead_byte(a)..=lead_byte(b) {
                    self.insert(byte);
                }
            }
        }
    }

    fn union(&mut self, other: &ByteSet) -> bool {
        let before = self.0;
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
        before != self.0
    }

    fn intersects(&self, other: &ByteSet) -> bool {
        self.0.iter().zip(other.0).any(|(a, b)| a & b != 0)
    }
}

fn lead_byte(c: u32) -> u8 {
    match c {
        0..=0x7F => c as u8,
        0x80..=0x7FF => 0xC0 | (c >> 6) as u8,
        0x800..=0xFFFF => 0xE0 | (c >> 12) as u8,
        _ => 0xF0 | (c >> 18) as u8,
    }
}

// ---------------------------------------------------------------------------------------------
// Analysis: which rules are lexical, and FIRST / FOLLOW sets over the character grammar

struct Analysis {
    /// No token and no recursion anywhere below: can be one regex.
    lexical_rule: Vec<bool>,
    lexical: Vec<bool>,
    nullable: Vec<bool>,
    /// Lead bytes of the characters a node's matches can start with.
    first: Vec<ByteSet>,
    /// Lead bytes of the characters that can come right after a node's match.
    follow: Vec<ByteSet>,
}

impl Analysis {
    fn new(g: &Grammar) -> Self {
        let n = g.nodes.len();
        let mut a = Self {
            lexical_rule: vec![false; g.rules.len()],
            lexical: vec![false; n],
            nullable: vec![false; n],
            first: vec![ByteSet::default(); n],
            follow: vec![ByteSet::default(); n],
        };
        // Least fixpoints: a rule becomes lexical once everything it names is, so recursive
        // rules never do; nullability and FIRST only grow.
        loop {
            for id in 0..n {
                a.lexical[id] = match &g.nodes[id] {
                    Node::Chars(_) | Node::Literal(_) => true,
                    Node::Seq(items) | Node::Alt(items) => items.iter().all(|&i| a.lexical[i]),
                    Node::Repeat { item, .. } => a.lexical[*item],
                    Node::Rule(r) => a.lexical_rule[*r],
                    Node::Token(_) => false,
                };
            }
            let mut changed = false;
            for r in 0..g.rules.len() {
                let lexical = a.lexical[g.body(r)];
                changed |= lexical != a.lexical_rule[r];
                a.lexical_rule[r] = lexical;
            }
            if !changed {
                break;
            }
        }
        let mut changed = true;
        while changed {
            changed = false;
            for id in 0..n {
                let (nullable, first) = match &g.nodes[id] {
                    Node::Chars(set) => (false, set.lead_bytes()),
                    Node::Literal(chars) => (false, CharSet::single(chars[0]).lead_bytes()),
                    Node::Seq(items) => {
                        let mut first = ByteSet::default();
                        let mut nullable = true;
                        for &i in items {
                            first.union(&a.first[i]);
                            if !a.nullable[i] {
                                nullable = false;
                                break;
                            }
                        }
                        (nullable, first)
                    }
                    Node::Alt(items) => {
                        let mut first = ByteSet::default();
                        for &i in items {
                            first.union(&a.first[i]);
                        }
                        (items.iter().any(|&i| a.nullable[i]), first)
                    }
                    Node::Repeat { item, min, .. } => {
                        (*min == 0 || a.nullable[*item], a.first[*item])
                    }
                    Node::Rule(r) => {
                        let body = g.body(*r);
                        (a.nullable[body], a.first[body])
                    }
                    // A token is not a character: it starts with no character's lead byte.
                    Node::Token(_) => (false, ByteSet::default()),
                };
                changed |= nullable != a.nullable[id];
                a.nullable[id] = nullable;
                changed |= a.first[id].union(&first);
            }
        }
        // FOLLOW flows from parents to children, so visit parents (higher ids) first.
        let mut changed = true;
        while changed {
            changed = false;
            for id in (0..n).rev() {
                let follow = a.follow[id];
                match &g.nodes[id] {
                    Node::Seq(items) => {
                        for (k, &item) in items.iter().enumerate() {
                            let (rest_first, rest_nullable) = a.first_of(&items[k + 1..]);
                            let mut f = rest_first;
                            if rest_nullable {
                                f.union(&follow);
                            }
                            changed |= a.follow[item].union(&f);
                        }
                    }
                    Node::Alt(items) => {
                        for &item in items {
                            changed |= a.follow[item].union(&follow);
                        }
                    }
                    Node::Repeat { item, max, .. } => {
                        let mut f = follow;
                        if *max != Some(1) {
                            f.union(&a.first[*item]);
                        }
                        changed |= a.follow[*item].union(&f);
                    }
                    Node::Rule(r) => changed |= a.follow[g.body(*r)].union(&follow),
                    Node::Chars(_) | Node::Literal(_) | Node::Token(_) => {}
                }
            }
        }
        a
    }

    /// FIRST of a sequence of nodes, and whether all of them are nullable.
    fn first_of(&self, items: &[NodeId]) -> (ByteSet, bool) {
        let mut first = ByteSet::default();
        for &i in items {
            first.union(&self.first[i]);
            if !self.nullable[i] {
                return (first, false);
            }
        }
        (first, true)
    }
}

// ---------------------------------------------------------------------------------------------
// Lexemes and the grammar-level plan

/// A piece of the grammar matched as one llguidance lexeme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Lexeme {
    /// A non-nullable lexical node (never a sequence: those are runs).
    Node(NodeId),
    /// Items `start..end` (at least two) of a sequence, all lexical, not all nullable.
    Run {
        seq: NodeId,
        start: usize,
        end: usize,
    },
    /// `item{1,max}` of a lexical `item{0,max}` node, made optional at the grammar level.
    Plus(NodeId),
    /// One character of a literal that was split.
    Char { literal: NodeId, index: usize },
}

/// The grammar-level shape of a rule body: lexemes combined by Earley rules.
#[derive(Debug, Clone)]
enum Out {
    Lexeme(Lexeme),
    Seq(Vec<Out>),
    Alt(Vec<Out>),
    Repeat {
        item: Box<Out>,
        min: u32,
        max: Option<u32>,
    },
    Rule(RuleId),
    Token(TokenRef),
}

struct Plan {
    /// Grammar-level rules reachable from `root`, root first.
    rules: Vec<(RuleId, Out)>,
}

struct PlanBuilder<'g> {
    g: &'g Grammar,
    a: &'g Analysis,
    split: &'g HashSet<Lexeme>,
    /// Runs too big to analyse: split into their items at once.
    apart: &'g HashSet<Lexeme>,
    lexemes: Vec<Lexeme>,
    queued: HashSet<RuleId>,
    queue: VecDeque<RuleId>,
}

impl PlanBuilder<'_> {
    fn node(&mut self, n: NodeId) -> Out {
        let (g, a) = (self.g, self.a);
        if let Node::Seq(items) = &g.nodes[n] {
            return self.items(n, items);
        }
        if a.lexical[n] && !a.nullable[n] && !self.split.contains(&Lexeme::Node(n)) {
            return self.lexeme(Lexeme::Node(n));
        }
        match &g.nodes[n] {
            Node::Chars(_) => self.lexeme(Lexeme::Node(n)),
            Node::Literal(chars) if chars.len() == 1 => self.lexeme(Lexeme::Node(n)),
            Node::Literal(chars) => Out::Seq(
                (0..chars.len())
                    .map(|index| self.lexeme(Lexeme::Char { literal: n, index }))
                    .collect(),
            ),
            // Sequences went to `items` above.
            Node::Seq(_) => Out::Seq(Vec::new()),
            Node::Alt(items) => Out::Alt(items.iter().map(|&i| self.node(i)).collect()),
            &Node::Repeat { item, min, max } => {
                // `x{0,n}` with a lexical x: one optional lexeme `x{1,n}` rather than n
                // grammar-level steps, when that lexeme passes.
                let plus = Lexeme::Plus(n);
                if min == 0
                    && max != Some(1)
                    && a.lexical[item]
                    && !a.nullable[item]
                    && !self.split.contains(&plus)
                {
                    return Out::Repeat {
                        item: Box::new(self.lexeme(plus)),
                        min: 0,
                        max: Some(1),
                    };
                }
                Out::Repeat {
                    item: Box::new(self.node(item)),
                    min,
                    max,
                }
            }
            &Node::Rule(r) => {
                if self.queued.insert(r) {
                    self.queue.push_back(r);
                }
                Out::Rule(r)
            }
            Node::Token(t) => Out::Token(t.clone()),
        }
    }

    /// A sequence: maximal runs of lexical items become run lexemes.
    fn items(&mut self, seq: NodeId, items: &[NodeId]) -> Out {
        let mut out = Vec::new();
        let mut k = 0;
        while k < items.len() {
            if !self.a.lexical[items[k]] {
                out.push(self.node(items[k]));
                k += 1;
                continue;
            }
            let start = k;
            while k < items.len() && self.a.lexical[items[k]] {
                k += 1;
            }
            out.push(self.run(seq, items, start, k));
        }
        flatten_seq(out)
    }

    fn run(&mut self, seq: NodeId, items: &[NodeId], start: usize, end: usize) -> Out {
        if end - start == 1 {
            return self.node(items[start]);
        }
        let lexeme = Lexeme::Run { seq, start, end };
        let nullable = items[start..end].iter().all(|&i| self.a.nullable[i]);
        if nullable || self.apart.contains(&lexeme) {
            return flatten_seq(items[start..end].iter().map(|&i| self.node(i)).collect());
        }
        if !self.split.contains(&lexeme) {
            return self.lexeme(lexeme);
        }
        // A greedy match overruns at its end, so give up the last symbol first.
        let head = self.run(seq, items, start, end - 1);
        let tail = self.node(items[end - 1]);
        flatten_seq(vec![head, tail])
    }

    fn lexeme(&mut self, lexeme: Lexeme) -> Out {
        self.lexemes.push(lexeme);
        Out::Lexeme(lexeme)
    }
}

fn flatten_seq(parts: Vec<Out>) -> Out {
    let mut flat = Vec::new();
    for part in parts {
        match part {
            Out::Seq(inner) => flat.extend(inner),
            other => flat.push(other),
        }
    }
    if flat.len() == 1 {
        flat.pop().unwrap_or(Out::Seq(Vec::new()))
    } else {
        Out::Seq(flat)
    }
}

/// What the conflict check needs to know about one lexeme.
struct LexemeInfo {
    first: ByteSet,
    follow: ByteSet,
    /// `None` when the piece is too big to analyse.
    nfa: Option<Nfa>,
}

impl Plan {
    fn build(
        g: &Grammar,
        a: &Analysis,
        split: &HashSet<Lexeme>,
        apart: &HashSet<Lexeme>,
    ) -> (Plan, Vec<Lexeme>) {
        let mut b = PlanBuilder {
            g,
            a,
            split,
            apart,
            lexemes: Vec::new(),
            queued: HashSet::from([g.root]),
            queue: VecDeque::from([g.root]),
        };
        let mut rules = Vec::new();
        while let Some(r) = b.queue.pop_front() {
            let out = b.node(g.body(r));
            rules.push((r, out));
        }
        (Plan { rules }, b.lexemes)
    }

    /// Splits conflicting lexemes until none is left.
    fn settle(g: &Grammar, a: &Analysis) -> Plan {
        let mut split = HashSet::new();
        let mut apart = HashSet::new();
        let mut infos: HashMap<Lexeme, LexemeInfo> = HashMap::new();
        let mut pairs: HashMap<(Lexeme, Lexeme), Option<ByteSet>> = HashMap::new();
        let mut nfa_budget = TOTAL_NFA_STATES;
        let mut product_budget = TOTAL_PRODUCT_STATES;
        loop {
            let (plan, lexemes) = Plan::build(g, a, &split, &apart);
            for &l in &lexemes {
                infos
                    .entry(l)
                    .or_insert_with(|| lexeme_info(g, a, l, &mut nfa_budget));
            }
            // Only lexemes that can match two characters or more can be read on into. Sorted by
            // forced prefix, the ones whose prefix agrees with a given one are found by search.
            let mut longer: Vec<(Lexeme, &LexemeInfo, &Nfa)> = lexemes
                .iter()
                .filter_map(|l| {
                    let info = &infos[l];
                    let nfa = info.nfa.as_ref()?;
                    (!nfa.single_char).then_some((*l, info, nfa))
                })
                .collect();
            longer.sort_by(|x, y| x.2.prefix.cmp(&y.2.prefix));
            let mut conflicts = HashSet::new();
            if product_budget == 0 {
                // Out of analysis: only single characters are known to be safe.
                conflicts.extend(longer.iter().map(|&(p, ..)| p));
            }
            for &o in &lexemes {
                let info_o = &infos[&o];
                let Some(nfa_o) = &info_o.nfa else {
                    conflicts.insert(o);
                    apart.insert(o);
                    continue;
                };
                if product_budget == 0 {
                    continue;
                }
                for &(p, info_p, nfa_p) in agreeing(&longer, &nfa_o.prefix) {
                    if !info_o.first.intersects(&info_p.first) {
                        continue;
                    }
                    // Characters that continue a match of `o` into a longer match of `p`: if one
                    // of them may follow `o`, the lexer would read on where the grammar stops.
                    let ext = pairs
                        .entry((o, p))
                        .or_insert_with(|| continuations(nfa_o, nfa_p, &mut product_budget));
                    if ext.is_none_or(|ext| ext.intersects(&info_o.follow)) {
                        conflicts.insert(p);
                    }
                }
            }
            let before = split.len();
            split.extend(conflicts.into_iter().filter(|&l| splittable(g, l)));
            if split.len() == before {
                return plan;
            }
        }
    }
}

/// The lexemes of `sorted` (by forced prefix) whose prefix and `prefix` agree up to the shorter:
/// only those can share a match start.
fn agreeing<'s, 'a>(
    sorted: &'s [(Lexeme, &'a LexemeInfo, &'a Nfa)],
    prefix: &[u32],
) -> impl Iterator<Item = &'s (Lexeme, &'a LexemeInfo, &'a Nfa)> {
    let equal_to = |q: &[u32]| {
        let lo = sorted.partition_point(|x| x.2.prefix.as_slice() < q);
        let hi = sorted.partition_point(|x| x.2.prefix.as_slice() <= q);
        &sorted[lo..hi]
    };
    // Shorter prefixes of `prefix`, each a run of equal keys; then every key extending it, which
    // sort together right after it.
    let shorter = (0..prefix.len()).flat_map(move |k| equal_to(&prefix[..k]));
    let start = sorted.partition_point(|x| x.2.prefix.as_slice() < prefix);
    let extending = sorted[start..]
        .iter()
        .take_while(move |x| x.2.prefix.starts_with(prefix));
    shorter.chain(extending)
}

fn splittable(g: &Grammar, lexeme: Lexeme) -> bool {
    match lexeme {
        Lexeme::Node(n) => match &g.nodes[n] {
            Node::Chars(_) | Node::Token(_) => false,
            Node::Literal(chars) => chars.len() > 1,
            _ => true,
        },
        Lexeme::Run { .. } | Lexeme::Plus(_) => true,
        Lexeme::Char { .. } => false,
    }
}

fn lexeme_info(g: &Grammar, a: &Analysis, lexeme: Lexeme, budget: &mut usize) -> LexemeInfo {
    let (first, follow) = match lexeme {
        Lexeme::Node(n) | Lexeme::Plus(n) => {
            let first = match g.nodes[n] {
                Node::Repeat { item, .. } => a.first[item],
                _ => a.first[n],
            };
            (first, a.follow[n])
        }
        Lexeme::Run { seq, start, end } => {
            let items = g.run_items(seq, start, end);
            let last = items.last().map_or(ByteSet::default(), |&i| a.follow[i]);
            (a.first_of(items).0, last)
        }
        Lexeme::Char { literal, index } => match &g.nodes[literal] {
            Node::Literal(chars) => {
                let follow = match chars.get(index + 1) {
                    Some(&next) => CharSet::single(next).lead_bytes(),
                    None => a.follow[literal],
                };
                (CharSet::single(chars[index]).lead_bytes(), follow)
            }
            _ => (ByteSet::default(), ByteSet::default()),
        },
    };
    LexemeInfo {
        first,
        follow,
        nfa: Nfa::of(g, lexeme, budget),
    }
}

// ---------------------------------------------------------------------------------------------
// NFAs over code points, to compare lexemes

struct Nfa {
    eps: Vec<Vec<u32>>,
    edges: Vec<Vec<(u32, u32, u32)>>,
    start: u32,
    accept: u32,
    /// Can reach `accept`.
    live: Vec<bool>,
    /// Matches only single characters.
    single_char: bool,
    /// Characters every match starts with (up to a bound).
    prefix: Vec<u32>,
}

struct NfaBuilder<'g> {
    g: &'g Grammar,
    limit: usize,
    eps: Vec<Vec<u32>>,
    edges: Vec<Vec<(u32, u32, u32)>>,
}

impl NfaBuilder<'_> {
    fn state(&mut self) -> Option<u32> {
        if self.eps.len() >= self.limit {
            return None;
        }
        self.eps.push(Vec::new());
        self.edges.push(Vec::new());
        Some(self.eps.len() as u32 - 1)
    }

    fn eps(&mut self, from: u32, to: u32) {
        self.eps[from as usize].push(to);
    }

    fn chars(&mut self, set: &CharSet) -> Option<(u32, u32)> {
        let (s, e) = (self.state()?, self.state()?);
        for &(lo, hi) in &set.0 {
            self.edges[s as usize].push((lo, hi, e));
        }
        Some((s, e))
    }

    fn seq(&mut self, parts: &[NodeId], depth: usize) -> Option<(u32, u32)> {
        let s = self.state()?;
        let mut cur = s;
        for &p in parts {
            let (a, b) = self.node(p, depth)?;
            self.eps(cur, a);
            cur = b;
        }
        Some((s, cur))
    }

    fn repeat(
        &mut self,
        item: NodeId,
        min: u32,
        max: Option<u32>,
        depth: usize,
    ) -> Option<(u32, u32)> {
        let s = self.state()?;
        let mut cur = s;
        for _ in 0..min {
            let (a, b) = self.node(item, depth)?;
            self.eps(cur, a);
            cur = b;
        }
        match max {
            None => {
                let (a, b) = self.node(item, depth)?;
                let hub = self.state()?;
                self.eps(cur, hub);
                self.eps(hub, a);
                self.eps(b, hub);
                Some((s, hub))
            }
            Some(max) => {
                let end = self.state()?;
                for _ in min..max {
                    let (a, b) = self.node(item, depth)?;
                    self.eps(cur, a);
                    self.eps(cur, end);
                    cur = b;
                }
                self.eps(cur, end);
                Some((s, end))
            }
        }
    }

    fn node(&mut self, n: NodeId, depth: usize) -> Option<(u32, u32)> {
        // Rule references nest without bound in the text, so count them here.
        if depth > MAX_DEPTH {
            return None;
        }
        let g = self.g;
        match &g.nodes[n] {
            Node::Chars(set) => self.chars(set),
            Node::Literal(chars) => {
                let s = self.state()?;
                let mut cur = s;
                for &c in chars {
                    let (a, b) = self.chars(&CharSet::single(c))?;
                    self.eps(cur, a);
                    cur = b;
                }
                Some((s, cur))
            }
            Node::Seq(items) => self.seq(items, depth + 1),
            Node::Alt(items) => {
                let (s, e) = (self.state()?, self.state()?);
                for &i in items {
                    let (a, b) = self.node(i, depth + 1)?;
                    self.eps(s, a);
                    self.eps(b, e);
                }
                Some((s, e))
            }
            &Node::Repeat { item, min, max } => self.repeat(item, min, max, depth + 1),
            &Node::Rule(r) => self.node(g.body(r), depth + 1),
            // Lexical pieces hold no tokens; treat one as unanalysable.
            Node::Token(_) => None,
        }
    }
}

impl Nfa {
    fn of(g: &Grammar, lexeme: Lexeme, budget: &mut usize) -> Option<Nfa> {
        let mut b = NfaBuilder {
            g,
            limit: MAX_NFA_STATES.min(*budget),
            eps: Vec::new(),
            edges: Vec::new(),
        };
        let (start, accept) = match lexeme {
            Lexeme::Node(n) => b.node(n, 0)?,
            Lexeme::Run { seq, start, end } => b.seq(g.run_items(seq, start, end), 0)?,
            Lexeme::Plus(n) => match g.nodes[n] {
                Node::Repeat { item, max, .. } => b.repeat(item, 1, max, 0)?,
                _ => return None,
            },
            Lexeme::Char { literal, index } => match &g.nodes[literal] {
                Node::Literal(chars) => b.chars(&CharSet::single(*chars.get(index)?))?,
                _ => return None,
            },
        };
        let NfaBuilder { eps, edges, .. } = b;
        *budget -= eps.len();
        // Liveness: reverse reachability from `accept`.
        let mut reverse: Vec<Vec<u32>> = vec![Vec::new(); eps.len()];
        for (from, targets) in eps.iter().enumerate() {
            for &to in targets {
                reverse[to as usize].push(from as u32);
            }
        }
        for (from, targets) in edges.iter().enumerate() {
            for &(_, _, to) in targets {
                reverse[to as usize].push(from as u32);
            }
        }
        let mut live = vec![false; eps.len()];
        live[accept as usize] = true;
        let mut stack = vec![accept];
        while let Some(s) = stack.pop() {
            for &p in &reverse[s as usize] {
                if !live[p as usize] {
                    live[p as usize] = true;
                    stack.push(p);
                }
            }
        }
        let mut nfa = Nfa {
            eps,
            edges,
            start,
            accept,
            live,
            single_char: false,
            prefix: Vec::new(),
        };
        let start_set = nfa.closure([start]);
        nfa.single_char = start_set.iter().all(|&s| {
            nfa.edges[s as usize]
                .iter()
                .filter(|e| nfa.live[e.2 as usize])
                .all(|e| !nfa.has_live_edge(&nfa.closure([e.2])))
        });
        nfa.prefix = nfa.forced_prefix();
        Some(nfa)
    }

    fn forced_prefix(&self) -> Vec<u32> {
        let mut prefix = Vec::new();
        let mut states = self.closure([self.start]);
        while prefix.len() < 64 && !states.contains(&self.accept) {
            let mut next = None;
            for &s in &states {
                for &(lo, hi, _) in self.edges[s as usize]
                    .iter()
                    .filter(|e| self.live[e.2 as usize])
                {
                    if lo != hi || next.is_some_and(|c| c != lo) {
                        return prefix;
                    }
                    next = Some(lo);
                }
            }
            let Some(c) = next else { break };
            prefix.push(c);
            states = self.closure(self.step(&states, c));
        }
        prefix
    }

    /// Live states reachable through empty moves, sorted.
    fn closure(&self, from: impl IntoIterator<Item = u32>) -> Vec<u32> {
        // Closures are mostly a handful of states: a linear scan beats hashing until they grow.
        let mut states = Vec::new();
        let mut seen = HashSet::new();
        let mut stack: Vec<u32> = from.into_iter().collect();
        while let Some(s) = stack.pop() {
            if !self.live[s as usize] {
                continue;
            }
            let new = if states.len() < 32 {
                !states.contains(&s)
            } else {
                if seen.is_empty() {
                    seen.extend(states.iter().copied());
                }
                seen.insert(s)
            };
            if new {
                states.push(s);
                stack.extend(&self.eps[s as usize]);
            }
        }
        states.sort_unstable();
        states
    }

    fn has_live_edge(&self, states: &[u32]) -> bool {
        states.iter().any(|&s| {
            self.edges[s as usize]
                .iter()
                .any(|e| self.live[e.2 as usize])
        })
    }

    /// States reached from `states` on code point `c`.
    fn step(&self, states: &[u32], c: u32) -> Vec<u32> {
        let mut targets = Vec::new();
        for &s in states {
            for &(a, b, t) in &self.edges[s as usize] {
                if a <= c && c <= b {
                    targets.push(t);
                }
            }
        }
        targets
    }
}

/// Lead bytes of the characters `c` such that `w c` starts a match of `y` for some match `w` of
/// `x`; `None` when the product is too big to explore.
fn continuations(x: &Nfa, y: &Nfa, budget: &mut usize) -> Option<ByteSet> {
    let limit = MAX_PRODUCT_STATES.min(*budget);
    if limit == 0 {
        return None;
    }
    let mut ext = ByteSet::default();
    let start = (x.closure([x.start]), y.closure([y.start]));
    let mut seen = HashSet::from([start.clone()]);
    let mut queue = vec![start];
    while let Some((sx, sy)) = queue.pop() {
        if sx.is_empty() || sy.is_empty() {
            continue;
        }
        if sx.contains(&x.accept) {
            for &s in &sy {
                for &(lo, hi, t) in &y.edges[s as usize] {
                    if y.live[t as usize] {
                        ext.insert_code_points(lo, hi);
                    }
                }
            }
        }
        let mut bounds = Vec::new();
        for (nfa, states) in [(x, &sx), (y, &sy)] {
            for &s in states.iter() {
                for &(lo, hi, _) in &nfa.edges[s as usize] {
                    bounds.push(lo);
                    bounds.push(hi + 1);
                }
            }
        }
        bounds.sort_unstable();
        bounds.dedup();
        // Between two consecutive bounds every code point moves both sides alike.
        for w in bounds.windows(2) {
            let lo = w[0];
            let tx = x.closure(x.step(&sx, lo));
            if tx.is_empty() {
                continue;
            }
            let ty = y.closure(y.step(&sy, lo));
            if ty.is_empty() {
                continue;
            }
            let next = (tx, ty);
            if !seen.contains(&next) {
                if seen.len() >= limit {
                    *budget -= limit;
                    return None;
                }
                seen.insert(next.clone());
                queue.push(next);
            }
        }
    }
    *budget -= seen.len();
    Some(ext)
}

// ---------------------------------------------------------------------------------------------
// Lark text

struct Emitter<'g> {
    g: &'g Grammar,
    used: HashSet<String>,
    rule_names: Vec<String>,
    term_names: Vec<String>,
    /// Rules whose terminal form has been queued for definition.
    term_wanted: Vec<bool>,
    term_queue: VecDeque<RuleId>,
    /// Anonymous terminal definitions, deduplicated by their text.
    anonymous: HashMap<String, String>,
    anonymous_defs: Vec<(String, String)>,
    anonymous_count: HashMap<RuleId, usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
/// Where an expression goes: what it must be parenthesized against.
enum Prec {
    Alt,
    Seq,
    /// An item of a sequence.
    Item,
    /// What a repetition applies to.
    Operand,
}

impl<'g> Emitter<'g> {
    fn new(g: &'g Grammar) -> Self {
        let mut e = Self {
            g,
            used: HashSet::from(["start".to_string()]),
            rule_names: Vec::new(),
            term_names: Vec::new(),
            term_wanted: vec![false; g.rules.len()],
            term_queue: VecDeque::new(),
            anonymous: HashMap::new(),
            anonymous_defs: Vec::new(),
            anonymous_count: HashMap::new(),
        };
        // Every GBNF name claims both Lark spellings first, so generated names never take them.
        for r in &g.rules {
            let base = sanitize(&r.name);
            let rule = e.fresh(base.to_lowercase());
            let term = e.fresh(base.to_uppercase());
            e.rule_names.push(rule);
            e.term_names.push(term);
        }
        e
    }

    fn fresh(&mut self, base: String) -> String {
        let mut name = base.clone();
        let mut k = 2;
        while self.used.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.used.insert(name.clone());
        name
    }

    fn emit(mut self, plan: &Plan) -> String {
        let mut text = format!("start: {}\n", self.rule_names[self.g.root]);
        for (r, out) in &plan.rules {
            let body = self.out(*r, out, Prec::Alt);
            let _ = writeln!(text, "{}: {body}", self.rule_names[*r]);
        }
        let mut terms = Vec::new();
        while let Some(r) = self.term_queue.pop_front() {
            let body = self.term(self.g.body(r), Prec::Alt);
            terms.push((self.term_names[r].clone(), body));
        }
        for (name, body) in terms.iter().chain(&self.anonymous_defs) {
            let _ = writeln!(text, "{name}: {body}");
        }
        text
    }

    fn out(&mut self, rule: RuleId, out: &Out, prec: Prec) -> String {
        match out {
            Out::Lexeme(l) => self.lexeme(rule, *l),
            Out::Seq(items) if items.is_empty() => "\"\"".to_string(),
            Out::Seq(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|i| self.out(rule, i, Prec::Item))
                    .collect();
                wrap(parts.join(" "), prec > Prec::Seq)
            }
            Out::Alt(items) => {
                let parts: Vec<String> =
                    items.iter().map(|i| self.out(rule, i, Prec::Seq)).collect();
                wrap(parts.join(" | "), prec > Prec::Alt)
            }
            Out::Repeat { item, min, max } => {
                let text = format!(
                    "{}{}",
                    self.out(rule, item, Prec::Operand),
                    repetition(*min, *max)
                );
                wrap(text, prec == Prec::Operand)
            }
            Out::Rule(r) => self.rule_names[*r].clone(),
            Out::Token(t) => t.lark(),
        }
    }

    fn want_term(&mut self, r: RuleId) -> String {
        if !self.term_wanted[r] {
            self.term_wanted[r] = true;
            self.term_queue.push_back(r);
        }
        self.term_names[r].clone()
    }

    fn lexeme(&mut self, rule: RuleId, lexeme: Lexeme) -> String {
        let g = self.g;
        let whole_body = match lexeme {
            Lexeme::Node(n) => n == g.body(rule),
            Lexeme::Run { seq, start, end } => {
                seq == g.body(rule)
                    && start == 0
                    && matches!(&g.nodes[seq], Node::Seq(items) if items.len() == end)
            }
            _ => false,
        };
        if whole_body {
            return self.want_term(rule);
        }
        let def = match lexeme {
            Lexeme::Node(n) => match &g.nodes[n] {
                Node::Chars(_) | Node::Literal(_) => return self.term(n, Prec::Item),
                &Node::Rule(r) => return self.want_term(r),
                _ => self.term(n, Prec::Alt),
            },
            Lexeme::Char { literal, index } => match &g.nodes[literal] {
                Node::Literal(chars) => return lark_string(&chars[index..=index]),
                _ => return "\"\"".to_string(),
            },
            Lexeme::Run { seq, start, end } => {
                let parts: Vec<String> = (g.run_items(seq, start, end).iter())
                    .map(|&i| self.term(i, Prec::Item))
                    .collect();
                parts.join(" ")
            }
            Lexeme::Plus(n) => match g.nodes[n] {
                Node::Repeat { item, max, .. } => {
                    format!("{}{}", self.term(item, Prec::Operand), repetition(1, max))
                }
                _ => self.term(n, Prec::Alt),
            },
        };
        if let Some(name) = self.anonymous.get(&def) {
            return name.clone();
        }
        let count = self.anonymous_count.entry(rule).or_insert(0);
        *count += 1;
        let base = format!("{}_{count}", self.term_names[rule]);
        let name = self.fresh(base);
        self.anonymous.insert(def.clone(), name.clone());
        self.anonymous_defs.push((name.clone(), def));
        name
    }

    /// A lexical node as a Lark terminal expression.
    fn term(&mut self, n: NodeId, prec: Prec) -> String {
        let g = self.g;
        match &g.nodes[n] {
            Node::Chars(set) => format!("/{}/", regex_class(set)),
            Node::Literal(chars) => lark_string(chars),
            Node::Seq(items) if items.is_empty() => "\"\"".to_string(),
            Node::Seq(items) => {
                let parts: Vec<String> = items.iter().map(|&i| self.term(i, Prec::Item)).collect();
                wrap(parts.join(" "), prec > Prec::Seq)
            }
            Node::Alt(items) => {
                let parts: Vec<String> = items.iter().map(|&i| self.term(i, Prec::Seq)).collect();
                wrap(parts.join(" | "), prec > Prec::Alt)
            }
            &Node::Repeat { item, min, max } => {
                let text = format!("{}{}", self.term(item, Prec::Operand), repetition(min, max));
                wrap(text, prec == Prec::Operand)
            }
            &Node::Rule(r) => self.want_term(r),
            // Never reached (lexical pieces hold no tokens); llguidance would name the problem.
            Node::Token(t) => t.lark(),
        }
    }
}

fn wrap(text: String, parens: bool) -> String {
    if parens { format!("({text})") } else { text }
}

fn repetition(min: u32, max: Option<u32>) -> String {
    match (min, max) {
        (0, None) => "*".to_string(),
        (1, None) => "+".to_string(),
        (0, Some(1)) => "?".to_string(),
        (m, None) => format!("{{{m},}}"),
        (m, Some(n)) if m == n => format!("{{{m}}}"),
        (m, Some(n)) => format!("{{{m},{n}}}"),
    }
}

/// `[a-zA-Z0-9_-]+` as a Lark name stem: `-` becomes `_`, and a leading non-letter gets `r_`.
fn sanitize(name: &str) -> String {
    let stem: String = name
        .chars()
        .map(|c| if c == '-' { '_' } else { c })
        .collect();
    if stem.starts_with(|c: char| c.is_ascii_alphabetic()) {
        stem
    } else {
        format!("r_{stem}")
    }
}

/// A Lark string literal (JSON string syntax).
fn lark_string(chars: &[char]) -> String {
    let mut s = String::from("\"");
    for &c in chars {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

/// A regex character class, negated when that is shorter.
fn regex_class(set: &CharSet) -> String {
    let complement = set.complement();
    if complement.is_empty() {
        return "[\\x{0}-\\x{10FFFF}]".to_string();
    }
    let (ranges, negated) = if complement.0.len() < set.0.len() {
        (&complement, true)
    } else {
        (set, false)
    };
    let mut s = String::from(if negated { "[^" } else { "[" });
    for &(lo, hi) in &ranges.0 {
        s.push_str(&class_char(lo));
        if hi > lo {
            if hi > lo + 1 {
                s.push('-');
            }
            s.push_str(&class_char(hi));
        }
    }
    s.push(']');
    s
}

fn class_char(c: u32) -> String {
    match char::from_u32(c) {
        Some(ch) if ch.is_ascii_alphanumeric() => ch.to_string(),
        // `/` would end the Lark regex token.
        Some('/') | None => format!("\\x{{{c:X}}}"),
        Some(ch) if "\\.+*?()|[]{}^$#&-~".contains(ch) => format!("\\{ch}"),
        Some(ch) if ch == ' ' || ch.is_ascii_graphic() => ch.to_string(),
        Some(ch) if !ch.is_ascii() && ch.is_alphanumeric() => ch.to_string(),
        Some(_) => format!("\\x{{{c:X}}}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::OnceLock;

    use llguidance::{Matcher, ParserFactory, api::TopLevelGrammar};

    fn factory() -> &'static ParserFactory {
        static FACTORY: OnceLock<ParserFactory> = OnceLock::new();
        FACTORY.get_or_init(|| {
            // Token id b is byte b; a few special tokens follow (`<|tool|>` is 256).
            let env = toktrie::ApproximateTokEnv::single_byte_env();
            let mut factory = ParserFactory::new_simple(&env).unwrap();
            factory.set_stderr_log_level(0);
            factory
        })
    }

    /// The translation, compiled by llguidance.
    fn compile(gbnf: &str) -> (String, Matcher) {
        let lark = gbnf_to_lark(gbnf).unwrap_or_else(|e| panic!("{e}\n{gbnf}"));
        let matcher =
            Matcher::new(factory().create_parser(TopLevelGrammar::from_lark(lark.clone())));
        assert!(!matcher.is_error(), "{:?}\n{lark}", matcher.get_error());
        (lark, matcher)
    }

    fn accepts_tokens(matcher: &Matcher, tokens: &[u32]) -> bool {
        let mut m = matcher.deep_clone();
        m.consume_tokens(tokens).is_ok() && m.is_accepting().unwrap_or(false)
    }

    fn accepts(matcher: &Matcher, text: &str) -> bool {
        accepts_tokens(matcher, &text.bytes().map(u32::from).collect::<Vec<_>>())
    }

    /// The translation accepts `accepted` and refuses `rejected`, and so does the reference.
    fn check(gbnf: &str, accepted: &[&str], rejected: &[&str]) -> String {
        let (lark, m) = compile(gbnf);
        let g = Parser::new(gbnf).parse().unwrap();
        for (texts, expected) in [(accepted, true), (rejected, false)] {
            for text in texts {
                assert_eq!(
                    Reference::accepts(&g, text),
                    expected,
                    "reference on {text:?}"
                );
                assert_eq!(accepts(&m, text), expected, "{text:?}\n{lark}");
            }
        }
        lark
    }

    /// A character-level GBNF recognizer (no left recursion), the reference for the translation.
    struct Reference<'g> {
        g: &'g Grammar,
        text: Vec<char>,
        memo: HashMap<(NodeId, usize), BTreeSet<usize>>,
    }

    impl Reference<'_> {
        fn accepts(g: &Grammar, text: &str) -> bool {
            let mut r = Reference {
                g,
                text: text.chars().collect(),
                memo: HashMap::new(),
            };
            let len = r.text.len();
            r.ends(g.body(g.root), 0).contains(&len)
        }

        fn ends(&mut self, n: NodeId, start: usize) -> BTreeSet<usize> {
            if let Some(ends) = self.memo.get(&(n, start)) {
                return ends.clone();
            }
            self.memo.insert((n, start), BTreeSet::new());
            let g = self.g;
            let ends = match &g.nodes[n] {
                Node::Chars(set) => match self.text.get(start) {
                    Some(&c)
                        if set
                            .0
                            .iter()
                            .any(|&(lo, hi)| lo <= c as u32 && c as u32 <= hi) =>
                    {
                        BTreeSet::from([start + 1])
                    }
                    _ => BTreeSet::new(),
                },
                Node::Literal(chars) => {
                    if self.text[start..].starts_with(chars) {
                        BTreeSet::from([start + chars.len()])
                    } else {
                        BTreeSet::new()
                    }
                }
                Node::Seq(items) => {
                    let mut at = BTreeSet::from([start]);
                    for &item in items {
                        at = at.iter().flat_map(|&p| self.ends(item, p)).collect();
                    }
                    at
                }
                Node::Alt(items) => items.iter().flat_map(|&i| self.ends(i, start)).collect(),
                &Node::Repeat { item, min, max } => {
                    let mut result = BTreeSet::new();
                    let mut at = BTreeSet::from([start]);
                    let limit = max.unwrap_or(min + self.text.len() as u32 + 1);
                    if min == 0 {
                        result.insert(start);
                    }
                    for k in 1..=limit {
                        at = at.iter().flat_map(|&p| self.ends(item, p)).collect();
                        if k >= min {
                            result.extend(at.iter().copied());
                        }
                        if at.is_empty() {
                            break;
                        }
                    }
                    result
                }
                &Node::Rule(r) => self.ends(g.body(r), start),
                Node::Token(_) => BTreeSet::new(),
            };
            self.memo.insert((n, start), ends.clone());
            ends
        }
    }

    /// Every string over `alphabet` up to `max_len` characters: llguidance on the translation
    /// agrees with the character-level reference.
    fn agrees_with_reference(gbnf: &str, alphabet: &str, max_len: usize) {
        let (lark, m) = compile(gbnf);
        let g = Parser::new(gbnf).parse().unwrap();
        let alphabet: Vec<char> = alphabet.chars().collect();
        let mut texts = vec![String::new()];
        let mut accepted = 0;
        for _ in 0..=max_len {
            let mut next = Vec::new();
            for text in &texts {
                let expected = Reference::accepts(&g, text);
                accepted += usize::from(expected);
                assert_eq!(accepts(&m, text), expected, "{text:?}\n{lark}");
                next.extend(alphabet.iter().map(|c| format!("{text}{c}")));
            }
            texts = next;
        }
        assert!(accepted > 0, "the test accepts nothing\n{lark}");
    }

    fn error(gbnf: &str) -> GbnfError {
        match gbnf_to_lark(gbnf) {
            Ok(lark) => panic!("accepted {gbnf:?} as\n{lark}"),
            Err(e) => e,
        }
    }

    fn at(line: usize, column: usize, problem: Problem) -> GbnfError {
        GbnfError::At {
            line,
            column,
            problem,
        }
    }

    #[test]
    fn yes_or_no() {
        check(
            "root ::= \"yes\" | \"no\"",
            &["yes", "no"],
            &["", "y", "Yes", "yesno", "no "],
        );
    }

    #[test]
    fn repetition_counts() {
        check("root ::= [0-9]{3}", &["123", "000"], &["12", "1234", ""]);
        check("root ::= \"ab\"{2,}", &["abab", "ababab"], &["ab", "aba"]);
        check(
            "root ::= [a-z]{1,3} \"!\"",
            &["a!", "abc!"],
            &["!", "abcd!"],
        );
        check(
            "root ::= \"x\"{0,2} \"y\"{0}",
            &["", "x", "xx"],
            &["xxx", "y"],
        );
        check(
            "root ::= (\"a\" | \"bc\") { 2 , 3 }",
            &["abc", "bcbca"],
            &["a", "aaaa"],
        );
    }

    #[test]
    fn list() {
        let lark = check(
            "root ::= item+\nitem ::= \"- \" [^\\r\\n]+ \"\\n\"",
            &["- milk\n", "- milk\n- two eggs\n", "- a - b\n"],
            &["", "- \n", "- milk", "-milk\n", "- milk\n\n"],
        );
        // Each item ends at its newline: one terminal.
        assert!(
            lark.contains("ITEM: \"- \" /[^\\x{A}\\x{D}]/+ \"\\n\""),
            "{lark}"
        );
    }

    #[test]
    fn lexeme_boundaries_keep_the_language() {
        // A whole-rule terminal `[a-z]+` would swallow the `x`.
        let lark = check(
            "root ::= word \"x\"\nword ::= [a-z]+",
            &["abx", "xx", "axbx"],
            &["ab", "x", "abxa"],
        );
        assert!(lark.contains("ROOT: WORD \"x\""), "{lark}");
        check("root ::= [a-z]+ \"x\"", &["abx", "xx"], &["ab", "x"]);
        check(
            "root ::= \"a\" [a-z]* \"a\"",
            &["aa", "aba", "abca", "aaa"],
            &["a", "ab", "aab"],
        );
        check(
            "root ::= (\"ab\" | \"abc\") \"c\"",
            &["abc", "abcc"],
            &["ab", "abccc"],
        );
    }

    #[test]
    fn boundaries_between_grammar_level_lexemes() {
        // `block` recurses, so its pieces are lexemes joined by Earley rules.
        let lark = check(
            "root ::= block\nblock ::= \"(\" (word \"x\" | block)* \")\"\nword ::= [a-z]+",
            &["()", "(abx)", "(abxcx(xx))"],
            &["(ab)", "(abx", "(x)"],
        );
        assert!(lark.contains("block:"), "{lark}");
    }

    #[test]
    fn left_recursion_is_fine_for_earley() {
        // llama.cpp refuses left recursion; llguidance's Earley parser handles it.
        let (lark, m) = compile("root ::= root \"a\" | \"b\"");
        assert!(accepts(&m, "b") && accepts(&m, "baa"), "{lark}");
        assert!(!accepts(&m, "ab"), "{lark}");
    }

    #[test]
    fn agrees_with_a_character_level_reference() {
        let grammars = [
            ("root ::= word \"x\"\nword ::= [a-z]+", "ax"),
            ("root ::= (\"ab\" | \"abc\") \"c\"", "abc"),
            ("root ::= item+\nitem ::= \"a\"+ \"b\"?", "ab"),
            ("root ::= \"a\" [a-z]* \"a\"", "ab"),
            ("root ::= (\"ab\"{1,2} \"a\"?){2}", "ab"),
            ("root ::= (\"a\"? \"b\"*)* \"c\" (\"a\"*)*", "abc"),
            (
                "root ::= (kw | id) ws \"=\" ws id\nkw ::= \"if\" | \"in\"\n\
                 id ::= [a-z] [a-z0-9]*\nws ::= \" \"*",
                "if =",
            ),
            (
                "root ::= (expr \"=\" ws num \"\\n\")+\nexpr ::= num ([-+] num)* | \"(\" ws expr \")\" ws\n\
                 num ::= [0-9]+ ws\nws ::= [ \\n]*",
                "1+= \n(",
            ),
            (
                "root ::= value\nvalue ::= \"[\" ws (value (\",\" ws value)*)? \"]\" ws | \
                 \"\\\"\" [a-z]* \"\\\"\" ws | [0-9]+ ws\nws ::= | \" \"",
                "[],\"a1 ",
            ),
            // é and ê share their first UTF-8 byte: the lexer must not read on into ê.
            ("root ::= a \"ê\"\na ::= \"a\" \"é\"?", "aéê"),
        ];
        for (gbnf, alphabet) in grammars {
            let len = if alphabet.chars().count() > 5 { 4 } else { 6 };
            agrees_with_reference(gbnf, alphabet, len);
        }
    }

    #[test]
    fn json() {
        let lark = check(
            JSON,
            &[
                "{}",
                "{\"a\":1}",
                "{ \"a\": [1, -2.5e3, true, null], \"b\": {\"c\": \"x\\n\\u00e9\\\"\"} }",
                "{\"\": []}\n",
                "{\"a\":\n  \"b\"}",
            ],
            &[
                "",
                "[]",
                "{\"a\"}",
                "{\"a\":01}",
                "{\"a\":1,}",
                "{\"a\":\"\\q\"}",
                "{\"a\":\"line\nbreak\"}",
                "{\"a\":tru}",
                "{\"a\":1}}",
            ],
        );
        // Strings and numbers lex as one unit each.
        assert!(lark.contains("\nSTRING: "), "{lark}");
        assert!(lark.contains("\nNUMBER: "), "{lark}");
    }

    #[test]
    fn arithmetic() {
        check(
            ARITHMETIC,
            &["1+2=3\n", "(x +y1) *2 = z\n", "a=b\nc = (d)\n", "x_y=1 \n"],
            &["1+2=3", "=3\n", "1+=2\n", "(1=2\n", "A=1\n"],
        );
    }

    #[test]
    fn chess() {
        check(
            CHESS,
            &[
                "1. e4 e5\n2. Nf3 Nc6\n",
                "1. d4 d5\n2. c4 dxc4\n3. O-O O-O-O\n",
                "1. e4 e5\n10. Qxf7# Ke7\n",
            ],
            &["1. e4 e5\n", "1. e9 e5\n2. Nf3 Nc6\n", "1. e4 e5\n2. Nf3\n"],
        );
    }

    #[test]
    fn unicode_classes_and_escapes() {
        check(
            "root ::= [一-龯]+",
            &["漢字", "一"],
            &["", "abc", "ひ", "漢a"],
        );
        check(
            "root ::= \"\\u00e9\" [\\U0001F600-\\U0001F64F] \"\\x41\"",
            &["é😀A", "é🙏A"],
            &["e😀A", "é😀a"],
        );
        check("root ::= [ぁ-ゟ]{2} \"!\"", &["ひら!"], &["ひ!", "ひらが!"]);
    }

    #[test]
    fn negated_classes_and_any_character() {
        check(
            "root ::= \"\\\"\" [^\"\\\\]* \"\\\"\"",
            &["\"\"", "\"abc\"", "\"é\n\""],
            &["\"a\"b\"", "\"a\\\"", "\"abc"],
        );
        check(
            "root ::= \"<\" . . \">\"",
            &["<ab>", "<é\n>", "<>>>"],
            &["<a>", "<abc>"],
        );
        check("root ::= [^a-z]+", &["ABC", "123 é"], &["aB", ""]);
    }

    #[test]
    fn escapes_in_strings_and_classes() {
        check(
            "root ::= \"tab\\there\\n \\\"q\\\" \\\\ \\x41\"",
            &["tab\there\n \"q\" \\ A"],
            &["tab\\there"],
        );
        check("root ::= [\\[\\]\\-\\\\/^]+", &["[]-\\/^"], &["a"]);
        check("root ::= [a-]+ [-z]", &["a--z", "a-"], &["b"]);
    }

    #[test]
    fn multi_line_rules_and_comments() {
        check(
            "# A greeting.\n\
             root ::= (\n\
             \x20   \"hello\"   # English\n\
             \x20 | \"bonjour\" # French\n\
             ) \" \" name # then a name\n\
             \n\
             name ::= [A-Z] [a-z]* |\n\
             \x20   \"you\"\r\n\
             # the end\n",
            &["hello World", "bonjour you"],
            &["hello", "hello world", "hola you"],
        );
    }

    #[test]
    fn rule_names_map_to_unique_lark_names() {
        let lark = check(
            "root ::= json-value Value value start 1st Root\njson-value ::= \"a\"\n\
             Value ::= \"b\"\nvalue ::= \"c\" value?\nstart ::= \"d\"\n1st ::= \"e\"\n\
             Root ::= \"f\"",
            &["abcdef", "abccdef"],
            &["abdef"],
        );
        for line in lark.lines() {
            let name = line.split(':').next().unwrap_or_default();
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && name.starts_with(|c: char| c.is_ascii_alphabetic()),
                "{line}"
            );
        }
        assert_eq!(lark.lines().filter(|l| l.starts_with("start:")).count(), 1);
    }

    #[test]
    fn token_references() {
        let (lark, m) = compile("root ::= <|tool|> [a-z]+ <[257]>");
        assert!(accepts_tokens(&m, &[256, u32::from(b'a'), 257]), "{lark}");
        assert!(!accepts_tokens(&m, &[256, 257]), "{lark}");
        assert!(!accepts_tokens(&m, &[u32::from(b'a'), 257]), "{lark}");
        let (lark, m) = compile("root ::= <[256]> !<[257]>* <[257]>");
        assert!(accepts_tokens(&m, &[256, 1, 258, 257]), "{lark}");
        assert!(!accepts_tokens(&m, &[256, 257, 257]), "{lark}");
    }

    #[test]
    fn errors_name_the_place_and_the_problem() {
        let e = error("root ::= object\nobject ::= \"{\" value \"}\"\n");
        assert_eq!(e, at(2, 16, Problem::UndefinedRule("value".into())));
        assert_eq!(e.to_string(), "line 2, column 16: undefined rule `value`");
        assert_eq!(error("item ::= \"a\""), GbnfError::NoRoot);
        assert_eq!(error("item ::= \"a\"").to_string(), "no `root` rule");
        assert_eq!(
            error("root ::= \"abc"),
            at(1, 10, Problem::UnterminatedString)
        );
        assert_eq!(
            error("root ::= [a-z"),
            at(1, 10, Problem::UnterminatedClass)
        );
        assert_eq!(error("root ::= []"), at(1, 10, Problem::EmptyClass));
        assert_eq!(
            error("root ::= \"\\q\""),
            at(1, 11, Problem::UnknownEscape('q'))
        );
        assert_eq!(
            error("root ::= \"\\x4\""),
            at(
                1,
                11,
                Problem::ShortHexEscape {
                    escape: 'x',
                    digits: 2
                }
            )
        );
        assert_eq!(
            error("root ::= \"\\uD800\""),
            at(1, 11, Problem::InvalidCodePoint(0xD800))
        );
        assert_eq!(
            error("root ::= [z-a]"),
            at(1, 11, Problem::ReversedRange('z', 'a'))
        );
        assert_eq!(error("root ::= (\"a\"\n"), at(2, 1, Problem::UnclosedGroup));
        assert_eq!(
            error("root ::= *"),
            at(1, 10, Problem::NothingToRepeat('*'))
        );
        assert_eq!(
            error("root ::= \"a\"{3,2}"),
            at(1, 13, Problem::ReversedRepetition { min: 3, max: 2 })
        );
        assert_eq!(
            error("root ::= \"a\"{2001}"),
            at(1, 13, Problem::TooManyRepetitions(2001))
        );
        assert_eq!(
            error("root ::= \"a\"\nroot ::= \"b\""),
            at(2, 1, Problem::DuplicateRule("root".into()))
        );
        assert_eq!(error("root = \"a\""), at(1, 6, Problem::ExpectedDefinition));
        assert_eq!(
            error("root ::= \"a\" )"),
            at(1, 14, Problem::Unexpected(')'))
        );
        assert_eq!(
            error("root ::= \"a\"\n| \"b\""),
            at(2, 1, Problem::ExpectedName)
        );
        assert_eq!(
            error("root ::= !<think>"),
            at(1, 10, Problem::NegatedTokenText("<think>".into()))
        );
        assert_eq!(
            error("root ::= <a b>"),
            at(1, 10, Problem::InvalidToken("<a b>".into()))
        );
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(300), ")".repeat(300));
        assert!(matches!(
            error(&deep),
            GbnfError::At {
                problem: Problem::TooDeep,
                ..
            }
        ));
    }

    #[test]
    fn big_repetitions_fall_back_to_the_grammar_level() {
        // Too big to analyse as one lexeme, so it is split; the language stays.
        let lark = check(
            "root ::= (\"ab\" [0-9]?){2000} \"!\"",
            &[
                &format!("{}!", "ab".repeat(2000)),
                &format!("{}!", "ab1".repeat(2000)),
            ],
            &["!", &format!("{}!", "ab".repeat(1999))],
        );
        assert!(lark.contains("{2000}"), "{lark}");
    }

    const JSON: &str = r#"
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"#;

    const ARITHMETIC: &str = r#"
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
"#;

    /// After llama.cpp's `grammars/chess.gbnf`.
    const CHESS: &str = r#"
# Two moves on the first line, then one or more numbered lines.
root ::= (
    "1. " move " " move "\n"
    ([1-9] [0-9]? ". " move " " move "\n")+
)
move ::= (pawn | nonpawn | castle) [+#]?
pawn ::= [a-h] [1-8] | [a-h] "x" [a-h] [1-8]
nonpawn ::= [NBKQR] [a-h]? [1-8]? "x"? [a-h] [1-8]
castle ::= "O-O" "-O"?
"#;
}
