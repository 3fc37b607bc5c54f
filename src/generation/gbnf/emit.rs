//! The plan as llguidance Lark text: rule and terminal names, expressions, regex classes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

use super::grammar::{Grammar, Node, NodeId, RuleId};
use super::lexemes::{Lexeme, Out, Plan};
use super::sets::CharSet;

pub(super) struct Emitter<'g> {
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
    pub(super) fn new(g: &'g Grammar) -> Self {
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

    pub(super) fn emit(mut self, plan: &Plan) -> String {
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
