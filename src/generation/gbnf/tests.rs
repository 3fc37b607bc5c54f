//! Tests: translations checked against llguidance itself and against a character-level
//! reference matcher over the parsed GBNF.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use llguidance::{Matcher, ParserFactory, api::TopLevelGrammar};

use super::grammar::{Grammar, Node, NodeId};
use super::*;

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
    let matcher = Matcher::new(factory().create_parser(TopLevelGrammar::from_lark(lark.clone())));
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
    // A whole-rule terminal `[a-z]+` would swallow the `x`; `block` recurses, so its pieces
    // are lexemes joined by Earley rules. The translation holds the lexeme or rule named.
    for (gbnf, accepted, rejected, lark_has) in [
        (
            "root ::= word \"x\"\nword ::= [a-z]+",
            &["abx", "xx", "axbx"][..],
            &["ab", "x", "abxa"][..],
            "ROOT: WORD \"x\"",
        ),
        (
            "root ::= block\nblock ::= \"(\" (word \"x\" | block)* \")\"\nword ::= [a-z]+",
            &["()", "(abx)", "(abxcx(xx))"],
            &["(ab)", "(abx", "(x)"],
            "block:",
        ),
    ] {
        let lark = check(gbnf, accepted, rejected);
        assert!(lark.contains(lark_has), "{lark}");
    }
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
    let undefined = "root ::= object\nobject ::= \"{\" value \"}\"\n";
    let cases = [
        (undefined, at(2, 16, Problem::UndefinedRule("value".into()))),
        ("item ::= \"a\"", GbnfError::NoRoot),
        ("root ::= \"abc", at(1, 10, Problem::UnterminatedString)),
        ("root ::= [a-z", at(1, 10, Problem::UnterminatedClass)),
        ("root ::= []", at(1, 10, Problem::EmptyClass)),
        ("root ::= \"\\q\"", at(1, 11, Problem::UnknownEscape('q'))),
        (
            "root ::= \"\\x4\"",
            at(
                1,
                11,
                Problem::ShortHexEscape {
                    escape: 'x',
                    digits: 2,
                },
            ),
        ),
        (
            "root ::= \"\\uD800\"",
            at(1, 11, Problem::InvalidCodePoint(0xD800)),
        ),
        (
            "root ::= [z-a]",
            at(1, 11, Problem::ReversedRange('z', 'a')),
        ),
        ("root ::= (\"a\"\n", at(2, 1, Problem::UnclosedGroup)),
        ("root ::= *", at(1, 10, Problem::NothingToRepeat('*'))),
        (
            "root ::= \"a\"{3,2}",
            at(1, 13, Problem::ReversedRepetition { min: 3, max: 2 }),
        ),
        (
            "root ::= \"a\"{2001}",
            at(1, 13, Problem::TooManyRepetitions(2001)),
        ),
        (
            "root ::= \"a\"\nroot ::= \"b\"",
            at(2, 1, Problem::DuplicateRule("root".into())),
        ),
        ("root = \"a\"", at(1, 6, Problem::ExpectedDefinition)),
        ("root ::= \"a\" )", at(1, 14, Problem::Unexpected(')'))),
        ("root ::= \"a\"\n| \"b\"", at(2, 1, Problem::ExpectedName)),
        (
            "root ::= !<think>",
            at(1, 10, Problem::NegatedTokenText("<think>".into())),
        ),
        (
            "root ::= <a b>",
            at(1, 10, Problem::InvalidToken("<a b>".into())),
        ),
    ];
    for (gbnf, want) in cases {
        assert_eq!(error(gbnf), want, "{gbnf:?}");
    }
    assert_eq!(
        error(undefined).to_string(),
        "line 2, column 16: undefined rule `value`"
    );
    assert_eq!(error("item ::= \"a\"").to_string(), "no `root` rule");
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
