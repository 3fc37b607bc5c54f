//! The GBNF reader: text to a [`Grammar`], following llama.cpp's parser (a rule ends at a
//! newline unless inside parentheses or after `|`).

use std::collections::HashMap;

use super::grammar::{Grammar, Node, NodeId, RuleDef, RuleId, TokenRef};
use super::sets::CharSet;
use super::{GbnfError, MAX_DEPTH, MAX_REPETITIONS, Problem};

pub(super) struct Parser<'a> {
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
    pub(super) fn new(src: &'a str) -> Self {
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

    pub(super) fn parse(mut self) -> Result<Grammar, GbnfError> {
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
