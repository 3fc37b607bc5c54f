//! The GBNF syntax tree: nodes, rule definitions and the parsed grammar.

use super::sets::CharSet;

pub(super) type NodeId = usize;
pub(super) type RuleId = usize;

/// A node's children always have smaller ids, so one forward pass sees children first.
#[derive(Debug, Clone)]
pub(super) enum Node {
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
pub(super) enum TokenRef {
    Id {
        id: u32,
        negated: bool,
    },
    /// `<name>` with the angle brackets.
    Text(String),
}

impl TokenRef {
    pub(super) fn lark(&self) -> String {
        match self {
            Self::Id { id, negated: false } => format!("<[{id}]>"),
            Self::Id { id, negated: true } => format!("<[^{id}]>"),
            Self::Text(text) => text.clone(),
        }
    }
}

pub(super) struct RuleDef {
    pub(super) name: String,
    pub(super) body: Option<NodeId>,
    /// Where the rule was first named, for "undefined rule".
    pub(super) first_use: usize,
}

pub(super) struct Grammar {
    pub(super) nodes: Vec<Node>,
    pub(super) rules: Vec<RuleDef>,
    pub(super) root: RuleId,
}

impl Grammar {
    pub(super) fn body(&self, rule: RuleId) -> NodeId {
        // Every rule has a body once parsing succeeded; an empty sequence is a harmless stand-in.
        self.rules[rule].body.unwrap_or(0)
    }

    /// Items `start..end` of a sequence node (none for any other node).
    pub(super) fn run_items(&self, seq: NodeId, start: usize, end: usize) -> &[NodeId] {
        match &self.nodes[seq] {
            Node::Seq(items) => items.get(start..end).unwrap_or_default(),
            _ => &[],
        }
    }
}
