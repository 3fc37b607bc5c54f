//! NFAs over code points, built per lexeme to compare lexemes: can greedy matching of one
//! read on into another?

use std::collections::HashSet;

use super::grammar::{Grammar, Node, NodeId};
use super::lexemes::Lexeme;
use super::sets::{ByteSet, CharSet};
use super::{MAX_DEPTH, MAX_NFA_STATES, MAX_PRODUCT_STATES};

pub(super) struct Nfa {
    eps: Vec<Vec<u32>>,
    edges: Vec<Vec<(u32, u32, u32)>>,
    start: u32,
    accept: u32,
    /// Can reach `accept`.
    live: Vec<bool>,
    /// Matches only single characters.
    pub(super) single_char: bool,
    /// Characters every match starts with (up to a bound).
    pub(super) prefix: Vec<u32>,
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
    pub(super) fn of(g: &Grammar, lexeme: Lexeme, budget: &mut usize) -> Option<Nfa> {
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
pub(super) fn continuations(x: &Nfa, y: &Nfa, budget: &mut usize) -> Option<ByteSet> {
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
