//! Constrained decoding: a request's JSON schema, regex, choice list or grammar becomes a
//! per-token mask that the sampler applies before anything else, so only text in the
//! constraint's language can be generated.
//!
//! The masks come from `llguidance` (an Earley parser over a lexer, with the token trie built
//! here from our own tokenizer's bytes). [`Grammars`] belongs to the served model: it builds the
//! trie once, on first use, compiles each constraint off the engine thread and keeps the
//! compiled parsers by their text, so a repeated schema costs a clone. Each sequence owns a
//! [`Constraint`]: its mask is computed while the forward pass runs (see the scheduler), and the
//! sampled token is fed back to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::earley::{BiasComputer, ParserRecognizer};
use llguidance::toktrie::{
    InferenceCapabilities, Recognizer, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv,
};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};

use super::gbnf::gbnf_to_lark;
use crate::model::tokenizer::TextTokenizer;
use crate::model::tool_calls::json_grammar_options;

/// Compiled grammars kept per model (least recently used dropped first).
const CACHE_ENTRIES: usize = 64;

/// What a request asks its output to match, as the client wrote it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A JSON schema.
    JsonSchema(Value),
    /// A regular expression the whole output matches.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// llguidance's Lark dialect.
    Lark(String),
    /// llama.cpp's GBNF (`root` is the start rule).
    Gbnf(String),
}

impl ConstraintSpec {
    /// The kind, as logs and errors name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::JsonObject => "json_object",
            Self::JsonSchema(_) => "json_schema",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Lark(_) => "lark",
            Self::Gbnf(_) => "gbnf",
        }
    }

    /// The text the compiled grammar is cached under.
    fn cache_key(&self) -> String {
        match self {
            Self::JsonObject => "json_object".to_string(),
            Self::JsonSchema(v) => format!("json_schema\0{v}"),
            Self::Regex(r) => format!("regex\0{r}"),
            Self::Choice(c) => format!("choice\0{}", Value::from(c.clone())),
            Self::Lark(g) => format!("lark\0{g}"),
            Self::Gbnf(g) => format!("gbnf\0{g}"),
        }
    }

    fn to_grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(json_defaults(json!({"type": "object"})))
            }
            Self::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err("a JSON schema must be an object".into());
                }
                TopLevelGrammar::from_json_schema(json_defaults(schema.clone()))
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Choice(choices) => {
                if choices.is_empty() {
                    return Err("must list at least one choice".into());
                }
                let alternatives: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Self::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Self::Gbnf(text) => {
                TopLevelGrammar::from_lark(gbnf_to_lark(text).map_err(|e| e.to_string())?)
            }
        })
    }
}

/// Our JSON options ([`json_grammar_options`]), unless the schema sets its own `x-guidance`.
fn json_defaults(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema
        && !map.contains_key("x-guidance")
    {
        map.insert("x-guidance".into(), json_grammar_options(false));
    }
    schema
}

/// A Lark string literal for `text` (JSON escapes are Lark's).
pub fn lark_string(text: &str) -> String {
    Value::from(text).to_string()
}

/// Why a constraint cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConstraintError(pub String);

/// The served model's grammar compiler and cache.
pub struct Grammars {
    tokenizer: Arc<TextTokenizer>,
    eog: Arc<[u32]>,
    factory: OnceLock<Result<Factory, String>>,
    cache: Mutex<Cache>,
}

/// llguidance's parser factory and the one token trie it and every parser read.
struct Factory {
    parsers: ParserFactory,
    env: Arc<TrieEnv>,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<String, (Matcher, u64)>,
    clock: u64,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.tokenizer.vocab_size())
            .finish()
    }
}

impl Grammars {
    /// Cheap: the token trie is built on the first compile.
    pub fn new(tokenizer: Arc<TextTokenizer>, eog: Arc<[u32]>) -> Self {
        Self {
            tokenizer,
            eog,
            factory: OnceLock::new(),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The parser factory, built by the first call. Not at model load: the trie takes about
    /// 4.5 MB for a 128k vocabulary (building it, about 17 MB more for a moment), which a
    /// worker that is never asked for structured output should not hold; the first
    /// constrained request waits for it instead (about 0.1 s).
    fn factory(&self) -> Result<&Factory, ConstraintError> {
        self.factory
            .get_or_init(|| {
                let built = build_factory(&self.tokenizer, &self.eog);
                if let Err(e) = &built {
                    tracing::warn!(error = %e, "structured output is unavailable for this model");
                }
                // The build's scratch (every token's bytes, an intermediate trie) is freed now.
                crate::model::load::release_freed_heap();
                built
            })
            .as_ref()
            .map_err(|e| ConstraintError(format!("the tokenizer cannot drive grammars: {e}")))
    }

    /// Whether the token trie exists (built, or failed to build).
    #[cfg(test)]
    pub(crate) fn trie_built(&self) -> bool {
        self.factory.get().is_some()
    }

    /// Whether `spec` is compiled already (a cache hit needs no blocking thread).
    pub fn is_cached(&self, spec: &ConstraintSpec) -> bool {
        self.cache
            .lock()
            .is_ok_and(|c| c.entries.contains_key(&spec.cache_key()))
    }

    /// A fresh constraint for one sequence. Compiling may take milliseconds (a large schema,
    /// the first use building the trie): call it off the async runtime unless
    /// [`is_cached`](Self::is_cached).
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, ConstraintError> {
        let key = spec.cache_key();
        if let Ok(mut cache) = self.cache.lock() {
            cache.clock += 1;
            let now = cache.clock;
            if let Some((matcher, used)) = cache.entries.get_mut(&key) {
                *used = now;
                return Ok(Constraint::new(spec.kind(), matcher.clone(), &self.eog));
            }
        }
        let grammar = spec.to_grammar().map_err(ConstraintError)?;
        let factory = self.factory()?;
        let matcher = Matcher::new(factory.parsers.create_parser(grammar).map(|mut parser| {
            // Our trie computes the masks, not the factory's (see `build_factory`).
            parser.bias_computer = factory.env.clone();
            parser
        }));
        if let Some(e) = matcher.get_error() {
            return Err(ConstraintError(first_line(&e)));
        }
        if let Ok(mut cache) = self.cache.lock() {
            if cache.entries.len() >= CACHE_ENTRIES
                && let Some(oldest) = cache
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, used))| *used)
                    .map(|(k, _)| k.clone())
            {
                cache.entries.remove(&oldest);
            }
            let now = cache.clock;
            cache.entries.insert(key, (matcher.clone(), now));
        }
        Ok(Constraint::new(spec.kind(), matcher, &self.eog))
    }
}

/// An llguidance error on one line, cut short: some carry the parser's state or the whole
/// grammar after what is wrong.
fn first_line(e: &str) -> String {
    const MAX_CHARS: usize = 400;
    let one_line = e.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

/// The token trie from our tokenizer's bytes: special tokens behind llguidance's marker byte
/// (so no grammar can produce them by their text), every end-of-generation token as EOS.
///
/// One trie serves everything. `ParserFactory::new` always builds a `SlicedBiasComputer`,
/// which keeps two filtered copies of the trie it is given (`trie_with_children` and
/// `trie_without_children` of its top slice, both the whole vocabulary when there are no
/// slices: about 6 MB each for a 128k vocabulary, each built through a scratch tree of about
/// 8 MB) and computes masks with the first. So the factory is built while our environment
/// still shows a one-token stub (the copies are a few bytes), the real trie is put in after,
/// and each parser computes its masks with [`TrieEnv`] instead: the same `add_bias` walk the
/// slicer does without slices, over the same tokens. (Should a later llguidance read the
/// slicer's copies directly, every mask would come out empty, which the constraint tests see.)
fn build_factory(tokenizer: &Arc<TextTokenizer>, eog: &[u32]) -> Result<Factory, String> {
    let vocab = tokenizer.vocab_size();
    let words: Vec<Vec<u8>> = (0..vocab as u32)
        .map(|id| {
            let bytes = tokenizer.token_bytes(id, true);
            if tokenizer.is_special(id) {
                let mut w = Vec::with_capacity(bytes.len() + 1);
                w.push(TokTrie::SPECIAL_TOKEN_MARKER);
                w.extend_from_slice(bytes);
                w
            } else {
                bytes.to_vec()
            }
        })
        .collect();
    let eos = tokenizer
        .eos_token_id()
        .filter(|e| eog.contains(e))
        .or_else(|| eog.first().copied())
        .ok_or("the model has no end-of-generation token")?;
    let mut info = TokRxInfo::new(vocab as u32, eos);
    info.tok_bos = tokenizer.bos_token_id();
    let env = Arc::new(TrieEnv {
        trie: OnceLock::new(),
        stub: TokTrie::from(&TokRxInfo::new(1, 0), &[Vec::new()]),
        tokenizer: tokenizer.clone(),
    });
    let shared: TokEnv = env.clone();
    // No token slices: llguidance's default JSON-string slices keep about a dozen filtered
    // copies of the trie (60 MB against 18 MB for a 128k vocabulary) to speed up masks inside
    // strings (p95 0.3 against 1.1 ms there), and masks are computed while the forward runs.
    let mut parsers = ParserFactory::new(&shared, InferenceCapabilities::default(), &[])
        .map_err(|e| e.to_string())?;
    parsers.quiet();
    // The token bytes go before the copy that sets the end tokens (which also drops the
    // spare capacity the build leaves), so that at most two large things are alive at once.
    let trie = TokTrie::from(&info, &words);
    drop(words);
    let trie = trie.with_eos_tokens(eog);
    if env.trie.set(trie).is_err() {
        unreachable!("the trie is set once, here");
    }
    Ok(Factory { parsers, env })
}

/// llguidance's view of our tokenizer: the trie, and our encoder for the text it needs as
/// tokens (forced prefixes). It also computes every parser's masks, on that trie.
struct TrieEnv {
    /// Set right after the factory is built (see [`build_factory`]).
    trie: OnceLock<TokTrie>,
    /// What the factory sees while it is built.
    stub: TokTrie,
    tokenizer: Arc<TextTokenizer>,
}

impl TokenizerEnv for TrieEnv {
    fn tok_trie(&self) -> &TokTrie {
        self.trie.get().unwrap_or(&self.stub)
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode(text, false)
                .unwrap_or_else(|_| self.tok_trie().greedy_tokenize(s)),
            Err(_) => self.tok_trie().greedy_tokenize(s),
        }
    }
}

/// What llguidance's slicer does without slices: the tokens whose bytes the lexer accepts,
/// found by walking the trie.
impl BiasComputer for TrieEnv {
    fn compute_bias(&self, rec: &mut ParserRecognizer<'_>, start: &[u8]) -> SimpleVob {
        let trie = self.tok_trie();
        let mut set = trie.alloc_token_set();
        if !rec.cancellation_requested() {
            trie.add_bias(rec, &mut set, start);
        }
        set
    }

    fn trie(&self) -> &TokTrie {
        self.tok_trie()
    }
}

/// One sequence's constraint: where its grammar stands, and the mask for its next token.
pub struct Constraint {
    kind: &'static str,
    matcher: Matcher,
    eog: Arc<[u32]>,
    /// Computed ahead of the sample that uses it (during the forward pass).
    mask: Option<Result<SimpleVob, String>>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("kind", &self.kind)
            .finish()
    }
}

/// Two constraints are alike when they constrain the same way (parameters compare equal when
/// they would generate alike).
impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self {
            kind: self.kind,
            matcher: self.matcher.deep_clone(),
            eog: self.eog.clone(),
            mask: None,
        }
    }
}

impl Constraint {
    fn new(kind: &'static str, matcher: Matcher, eog: &Arc<[u32]>) -> Self {
        Self {
            kind,
            matcher,
            eog: eog.clone(),
            mask: None,
        }
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Computes the next token's mask now (the scheduler calls it while the forward runs);
    /// [`apply`](Self::apply) uses it, or computes it itself when it was not prepared.
    pub fn prepare(&mut self) {
        if self.mask.is_none() {
            self.mask = Some(
                self.matcher
                    .compute_mask_or_eos()
                    .map_err(|e| first_line(&e.to_string())),
            );
        }
    }

    /// Sets every logit the grammar does not allow to −∞. Errors when the grammar cannot go
    /// on (it should not happen: only allowed tokens are fed back).
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare();
        let mask = self
            .mask
            .take()
            .unwrap_or_else(|| Err("no mask".to_string()))?;
        // Every end-of-generation token stands for EOS, whichever one the trie calls EOS.
        let eos_allowed = self.eog.iter().any(|&t| mask.is_allowed(t));
        let limit = mask.len();
        for (id, logit) in logits.iter_mut().enumerate() {
            let allowed = id < limit && mask.is_allowed(id as u32)
                || (eos_allowed && self.eog.contains(&(id as u32)));
            if !allowed {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Feeds the sampled token to the grammar. Returns whether the grammar is complete (no
    /// token but end-of-generation may follow).
    pub fn accept(&mut self, token: u32) -> Result<bool, String> {
        self.mask = None;
        if self.eog.contains(&token) {
            return Ok(true);
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| first_line(&e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generation::rng::Rng;
    use crate::model::tokenizer::tests::gpt2;

    fn grammars() -> (Grammars, Arc<TextTokenizer>, u32) {
        let tokenizer = Arc::new(gpt2());
        let eog = tokenizer.token_to_id("<|im_end|>").unwrap();
        (
            Grammars::new(tokenizer.clone(), Arc::from(vec![eog])),
            tokenizer,
            eog,
        )
    }

    /// Samples under the constraint from random logits until it ends; returns the text.
    fn generate(c: &mut Constraint, tok: &TextTokenizer, eog: u32, seed: u64) -> (String, bool) {
        let mut rng = Rng::new(seed);
        let mut out = Vec::new();
        for _ in 0..64 {
            let mut logits: Vec<f32> = (0..tok.vocab_size())
                .map(|_| (rng.next_f64() * 10.0) as f32)
                .collect();
            c.apply(&mut logits).unwrap();
            // A temperature-1 draw over whatever is left.
            let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert!(max.is_finite(), "the mask left no token");
            let weights: Vec<f64> = logits.iter().map(|&l| f64::from(l - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut r = rng.next_f64() * total;
            let mut token = 0;
            for (i, w) in weights.iter().enumerate() {
                if *w > 0.0 {
                    token = i as u32;
                    if r < *w {
                        break;
                    }
                    r -= w;
                }
            }
            if token == eog {
                return (tok.decode(&out, false).unwrap(), true);
            }
            out.push(token);
            if c.accept(token).unwrap() {
                return (tok.decode(&out, false).unwrap(), true);
            }
        }
        (tok.decode(&out, false).unwrap(), false)
    }

    #[test]
    fn a_choice_only_ever_produces_one_of_its_strings() {
        let (g, tok, eog) = grammars();
        let spec = ConstraintSpec::Choice(vec!["yes".into(), "no".into(), "hello world".into()]);
        for seed in 0..40 {
            let mut c = g.compile(&spec).unwrap();
            let (text, done) = generate(&mut c, &tok, eog, seed);
            assert!(done, "seed {seed}: {text:?} did not end");
            assert!(
                ["yes", "no", "hello world"].contains(&text.as_str()),
                "seed {seed}: {text:?}"
            );
        }
    }

    #[test]
    fn a_regex_is_matched_by_every_sample() {
        let (g, tok, eog) = grammars();
        let spec = ConstraintSpec::Regex("[a-c]{2,4}-[0-9]".into());
        for seed in 0..40 {
            let mut c = g.compile(&spec).unwrap();
            let (text, done) = generate(&mut c, &tok, eog, seed);
            assert!(done, "{text:?}");
            let (left, right) = text.split_once('-').unwrap();
            assert!((2..=4).contains(&left.len()), "{text:?}");
            assert!(left.chars().all(|c| ('a'..='c').contains(&c)), "{text:?}");
            assert!(right.len() == 1 && right.chars().all(|c| c.is_ascii_digit()));
        }
    }

    #[test]
    fn a_json_schema_gives_parseable_json_of_its_shape() {
        let (g, tok, eog) = grammars();
        let spec = ConstraintSpec::JsonSchema(json!({
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
            "required": ["ok", "n"],
            "additionalProperties": false
        }));
        for seed in 0..20 {
            let mut c = g.compile(&spec).unwrap();
            let (text, done) = generate(&mut c, &tok, eog, seed);
            assert!(done, "{text:?}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["ok"].is_boolean(), "{text}");
            assert!([1, 2, 3].contains(&v["n"].as_i64().unwrap()), "{text}");
            assert_eq!(v.as_object().unwrap().len(), 2, "{text}");
        }
    }

    #[test]
    fn broken_constraints_are_errors_that_say_why() {
        let (g, _, _) = grammars();
        let e = g
            .compile(&ConstraintSpec::JsonSchema(json!({"type": "frobnicate"})))
            .unwrap_err();
        assert!(!e.0.is_empty() && !e.0.contains('\n'), "{e}");
        assert!(g.compile(&ConstraintSpec::Regex("(".into())).is_err());
        assert!(
            g.compile(&ConstraintSpec::Lark("start: nope".into()))
                .is_err()
        );
        assert!(g.compile(&ConstraintSpec::Choice(vec![])).is_err());
        assert!(g.compile(&ConstraintSpec::JsonSchema(json!(5))).is_err());
    }

    #[test]
    fn compiled_grammars_are_reused() {
        let (g, _, _) = grammars();
        let spec = ConstraintSpec::Regex("a+".into());
        assert!(!g.is_cached(&spec));
        let a = g.compile(&spec).unwrap();
        assert!(g.is_cached(&spec));
        let b = g.compile(&spec).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn the_end_token_is_allowed_only_where_the_grammar_may_end() {
        let (g, tok, eog) = grammars();
        let mut c = g.compile(&ConstraintSpec::Regex("(ab)+".into())).unwrap();
        let mut logits = vec![0.0; tok.vocab_size()];
        c.apply(&mut logits).unwrap();
        assert_eq!(logits[eog as usize], f32::NEG_INFINITY);
        let a = tok.token_to_id("a").unwrap();
        let b = tok.token_to_id("b").unwrap();
        assert!(logits[a as usize].is_finite());
        assert_eq!(logits[b as usize], f32::NEG_INFINITY);
        assert!(!c.accept(a).unwrap());
        assert!(!c.accept(b).unwrap());
        let mut logits = vec![0.0; tok.vocab_size()];
        c.apply(&mut logits).unwrap();
        assert!(logits[eog as usize].is_finite(), "(ab)+ may end after ab");
        assert!(logits[a as usize].is_finite());
    }
}
