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
//!
//! The stages, one file each: `parse` reads the text into a `grammar` tree, `analysis` finds
//! the lexical rules and FIRST / FOLLOW sets (over the byte sets of `sets`), `lexemes` chooses
//! the terminals, checking them pairwise with the automata of `nfa`, and `emit` writes the Lark
//! text.

mod analysis;
mod emit;
mod grammar;
mod lexemes;
mod nfa;
mod parse;
mod sets;
#[cfg(test)]
mod tests;

use analysis::Analysis;
use emit::Emitter;
use lexemes::Plan;
use parse::Parser;

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
