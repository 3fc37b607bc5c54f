//! Which pieces of the grammar become llguidance lexemes, and the grammar-level plan that
//! combines them; conflicting lexemes are split until none is left.

use std::collections::{HashMap, HashSet, VecDeque};

use super::analysis::Analysis;
use super::grammar::{Grammar, Node, NodeId, RuleId, TokenRef};
use super::nfa::{Nfa, continuations};
use super::sets::{ByteSet, CharSet};
use super::{TOTAL_NFA_STATES, TOTAL_PRODUCT_STATES};

/// A piece of the grammar matched as one llguidance lexeme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Lexeme {
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
pub(super) enum Out {
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

pub(super) struct Plan {
    /// Grammar-level rules reachable from `root`, root first.
    pub(super) rules: Vec<(RuleId, Out)>,
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
    pub(super) fn settle(g: &Grammar, a: &Analysis) -> Plan {
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
