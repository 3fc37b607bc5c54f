//! Which rules are lexical, and FIRST / FOLLOW sets (by lead byte) over the character grammar.

use super::grammar::{Grammar, Node, NodeId};
use super::sets::{ByteSet, CharSet};

pub(super) struct Analysis {
    /// No token and no recursion anywhere below: can be one regex.
    lexical_rule: Vec<bool>,
    pub(super) lexical: Vec<bool>,
    pub(super) nullable: Vec<bool>,
    /// Lead bytes of the characters a node's matches can start with.
    pub(super) first: Vec<ByteSet>,
    /// Lead bytes of the characters that can come right after a node's match.
    pub(super) follow: Vec<ByteSet>,
}

impl Analysis {
    pub(super) fn new(g: &Grammar) -> Self {
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
    pub(super) fn first_of(&self, items: &[NodeId]) -> (ByteSet, bool) {
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
