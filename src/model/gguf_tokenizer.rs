//! Build a HF `tokenizers` pipeline from the `tokenizer.ggml.*` metadata of a GGUF file,
//! behaving like llama.cpp's own tokenizer for the same file.
//!
//! References:
//! - llama.cpp `src/llama-vocab.cpp`: `llama_vocab::impl::load` (metadata keys, defaults, the
//!   `tokenizer.ggml.pre` name → `LLAMA_VOCAB_PRE_TYPE_*` table), `llm_tokenizer_bpe` (the
//!   pre-tokenizer regex lists per type), `llm_tokenizer_spm_session` (SentencePiece merging by
//!   score with byte fallback), `tokenizer_st_partition` (control/user-defined token matching),
//!   `token_to_piece` (rendering).
//! - HF tokenizers: `models::bpe::BPE` (rank-ordered merges, `byte_fallback`, `ignore_merges`),
//!   `pre_tokenizers::{split::Split, byte_level::ByteLevel}`, `AddedVocabulary`
//!   (special vs. non-special added tokens, `encode_special_tokens`).
//!
//! Two vocabulary types are supported:
//! - `gpt2`: byte-level BPE. The pre-tokenizer is a sequence of `Split(regex, Isolated)` steps,
//!   one per regex llama.cpp uses for the `pre` type (llama.cpp applies its regexes the same way:
//!   each one splits the fragments left by the previous one, keeping matched and unmatched parts),
//!   followed by `ByteLevel` without its own regex or prefix space.
//! - `llama`: SentencePiece BPE with byte fallback. Merges are derived from the token scores (see
//!   [`spm_merges`]); spaces become `▁` and a `▁` is prepended to every text fragment, exactly
//!   where llama.cpp adds its space prefix (at the start and after each special token).
//!
//! Unknown `pre` values are an error, not a silent fallback: llama.cpp itself refuses to load
//! them ("unknown pre-tokenizer type"), and a wrong pre-tokenizer produces plausible but
//! different token ids, which would only show up as degraded generations. A missing `pre` (or
//! `default`) gets llama.cpp's `LLAMA_VOCAB_PRE_TYPE_DEFAULT` regex list, not plain GPT-2;
//! `gpt2` is accepted as an alias of llama.cpp's `gpt-2`.
//!
//! Token types: control (3) and unknown (2) tokens become special added tokens (split out of
//! the text only with `parse_special`, rendered only on request); user-defined (4) tokens become
//! non-special added tokens (always split out and rendered), as in llama.cpp. BOS/EOS are added
//! by a template post-processor only when `add_bos_token`/`add_eos_token` (or llama.cpp's
//! per-type default) ask for them.
//!
//! Known differences from llama.cpp (none affects the conformance corpus):
//! - Unicode tables: HF's regex engine (Oniguruma) knows Unicode 16, llama.cpp's own tables an
//!   older version. About 4,400 code points assigned in Unicode 16 (Egyptian Hieroglyphs
//!   Extended-A, Garay, Todhri, …) count as letters/digits here but not in llama.cpp, so text
//!   containing them can be pre-tokenized differently. A differential test of the `smollm`
//!   splitting against a port of llama.cpp's splitter found no other difference.
//! - Overlapping special tokens: HF matches leftmost-longest, llama.cpp tries the longest token
//!   text first everywhere. They differ only when two special tokens overlap in the text.
//! - llama.cpp's by-name attribute fixes for particular models (phi-3 `rstrip`, gpt-oss
//!   `<|channel|>` as user-defined, gemma4 `</s>`) are not reproduced; its forcing of
//!   end-of-generation/FIM tokens to control type is ([`EOG_LIKE_TEXTS`]).
//! - A merge whose parts or result are not tokens is rejected (llama.cpp keeps it, though it can
//!   never produce a token); HF's BPE cannot represent it.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior,
};

use super::tokenizer::{HfPipeline, PieceEncoding, SharedModel, TokenizerError};

/// Tokenizer metadata as read from GGUF (`tokenizer.ggml.*`); filled by the GGUF loader.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: pre-tokenizer name (BPE only).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the piece of every id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.scores` (SentencePiece merge priorities).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.merges`: `"left right"` lines in rank order (BPE).
    pub merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece; llama.cpp's default is true).
    pub add_space_prefix: Option<bool>,
}

/// Token type as stored in `tokenizer.ggml.token_type` (llama.cpp `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Values outside 0..=6 are `Undefined`, as in llama.cpp.
    pub fn from_gguf(value: i32) -> Self {
        match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Tokens that are matched in text only with `parse_special` and rendered only with
    /// `render_special` (llama.cpp: `LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_UNKNOWN`).
    pub fn is_special(self) -> bool {
        matches!(self, Self::Control | Self::Unknown)
    }
}

/// Everything [`build_gguf_tokenizer`] derives from a [`GgufVocab`]: the HF pipeline plus the
/// facts the worker needs that a `tokenizers::Tokenizer` cannot express.
#[derive(Clone)]
pub struct GgufTokenizer {
    pub tokenizer: HfPipeline,
    /// Token type per id, after llama.cpp's by-name fixes (see [`EOG_LIKE_TEXTS`]).
    pub token_types: Vec<TokenType>,
    /// How a normal token's piece maps to bytes.
    pub piece_encoding: PieceEncoding,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    /// SentencePiece with a space prefix: full-text decoding drops the first leading space.
    pub strip_leading_space: bool,
}

/// Build the HF tokenizer for a GGUF vocabulary. See [`build_gguf_tokenizer`].
pub fn tokenizer_from_gguf_vocab(v: &GgufVocab) -> Result<HfPipeline, TokenizerError> {
    Ok(build_gguf_tokenizer(v)?.tokenizer)
}

/// Build the HF tokenizer for a GGUF vocabulary together with token types and settings.
///
/// Never panics on bad metadata; every inconsistency is a [`TokenizerError`].
pub fn build_gguf_tokenizer(v: &GgufVocab) -> Result<GgufTokenizer, TokenizerError> {
    let kind = match v.model.as_str() {
        "gpt2" => VocabKind::Bpe,
        "llama" => VocabKind::Spm,
        other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
    };
    let n = v.tokens.len();
    if n == 0 {
        return Err(TokenizerError::EmptyVocabulary);
    }
    if u32::try_from(n).is_err() {
        return Err(TokenizerError::VocabularyTooLarge(n));
    }
    // Like llama.cpp: longer per-token arrays are accepted, shorter ones are an error.
    let per_token = [
        (
            "tokenizer.ggml.token_type",
            v.token_types.as_ref().map(Vec::len),
        ),
        ("tokenizer.ggml.scores", v.scores.as_ref().map(Vec::len)),
    ];
    for (field, len) in per_token {
        if let Some(actual) = len.filter(|&len| len < n) {
            return Err(TokenizerError::InconsistentLength {
                field,
                expected: n,
                actual,
            });
        }
    }

    // llama.cpp renames empty pieces so that every id stays addressable.
    let pieces: Vec<String> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                t.clone()
            }
        })
        .collect();
    let mut vocab: HashMap<String, u32> = HashMap::with_capacity(n);
    for (id, piece) in (0u32..).zip(&pieces) {
        if let Some(first) = vocab.insert(piece.clone(), id) {
            return Err(TokenizerError::DuplicateToken {
                piece: piece.clone(),
                first,
                second: id,
            });
        }
    }

    let mut token_types: Vec<TokenType> = match &v.token_types {
        Some(types) => types[..n]
            .iter()
            .map(|&t| TokenType::from_gguf(t))
            .collect(),
        None => vec![TokenType::Normal; n],
    };
    // llama.cpp forces end-of-generation / FIM looking tokens to control type, fixing models
    // converted with them as normal tokens; do the same so parsing and rendering agree.
    for (piece, ty) in pieces.iter().zip(token_types.iter_mut()) {
        if EOG_LIKE_TEXTS.contains(&piece.as_str()) && *ty != TokenType::Control {
            *ty = TokenType::Control;
        }
    }

    let in_range = |id: Option<u32>| id.filter(|&id| (id as usize) < n);
    // llama.cpp's SentencePiece defaults; its BPE defaults (11) are GPT-2 specific, so BPE
    // vocabularies without explicit ids get none.
    let (default_bos, default_eos, default_unk) = match kind {
        VocabKind::Spm => (in_range(Some(1)), in_range(Some(2)), in_range(Some(0))),
        VocabKind::Bpe => (None, None, None),
    };
    // Out-of-range ids are ignored (llama.cpp warns and keeps its default).
    let bos_token_id = in_range(v.bos_token_id).or(default_bos);
    let eos_token_id = in_range(v.eos_token_id).or(default_eos);
    let unknown_token_id = in_range(v.unknown_token_id).or(default_unk);
    let padding_token_id = in_range(v.padding_token_id);

    let (model, spec) = match kind {
        VocabKind::Bpe => {
            let spec = pre_tokenizer_spec(v.pre.as_deref())?;
            let merges = v.merges.as_ref().ok_or(TokenizerError::MissingMerges)?;
            let merges = parse_merges(merges, &vocab)?;
            let model = BPE::builder()
                .vocab_and_merges(to_bpe_vocab(vocab), merges)
                .ignore_merges(spec.ignore_merges)
                .build()
                .map_err(TokenizerError::Tokenizers)?;
            (model, Some(spec))
        }
        VocabKind::Spm => {
            let scores = v.scores.as_ref().ok_or(TokenizerError::MissingScores)?;
            let merges = spm_merges(&pieces, &scores[..n], &token_types, &vocab);
            let mut builder = BPE::builder()
                .vocab_and_merges(to_bpe_vocab(vocab), merges)
                .byte_fallback(true)
                .fuse_unk(true);
            if let Some(unk) = unknown_token_id {
                builder = builder.unk_token(pieces[unk as usize].clone());
            }
            (builder.build().map_err(TokenizerError::Tokenizers)?, None)
        }
    };

    let add_space_prefix = v.add_space_prefix.unwrap_or(true);
    let mut tokenizer = HfPipeline::new(SharedModel::new(model));
    let piece_encoding;
    let strip_leading_space;
    match &spec {
        Some(spec) => {
            let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
            for re in spec.regexes {
                let split = Split::new(
                    SplitPattern::Regex((*re).to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(TokenizerError::Tokenizers)?;
                steps.push(split.into());
            }
            steps.push(ByteLevel::new(false, false, false).into());
            tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
            tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
            piece_encoding = PieceEncoding::ByteLevel;
            strip_leading_space = false;
        }
        None => {
            let replace = Replace::new(" ", "▁").map_err(TokenizerError::Tokenizers)?;
            let normalizer: NormalizerWrapper = if add_space_prefix {
                NormalizerSequence::new(vec![Prepend::new("▁".to_owned()).into(), replace.into()])
                    .into()
            } else {
                replace.into()
            };
            tokenizer
                .with_normalizer(Some(normalizer))
                .map_err(TokenizerError::Tokenizers)?;
            let mut decoders: Vec<DecoderWrapper> = vec![
                Replace::new("▁", " ")
                    .map_err(TokenizerError::Tokenizers)?
                    .into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            if add_space_prefix {
                decoders.push(Strip::new(' ', 1, 0).into());
            }
            tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
            piece_encoding = PieceEncoding::SentencePiece;
            strip_leading_space = add_space_prefix;
        }
    }

    // Control and unknown tokens are special (split out only with parse_special); user-defined
    // tokens are always split out, as llama.cpp's `tokenizer_st_partition` does. None of them is
    // normalized: llama.cpp matches them against the raw text.
    let special: Vec<AddedToken> = pieces
        .iter()
        .zip(&token_types)
        .filter(|(_, ty)| ty.is_special())
        .map(|(p, _)| AddedToken::from(p.clone(), true).normalized(false))
        .collect();
    let user_defined: Vec<AddedToken> = pieces
        .iter()
        .zip(&token_types)
        .filter(|(_, ty)| **ty == TokenType::UserDefined)
        .map(|(p, _)| AddedToken::from(p.clone(), false).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(special)
        .map_err(TokenizerError::Tokenizers)?;
    tokenizer
        .add_tokens(user_defined)
        .map_err(TokenizerError::Tokenizers)?;

    let add_bos = v
        .add_bos_token
        .unwrap_or(spec.as_ref().is_none_or(|s| s.add_bos_default));
    let add_eos = v.add_eos_token.unwrap_or(false);
    if add_bos && bos_token_id.is_none() {
        return Err(TokenizerError::MissingSpecialToken(
            "BOS (add_bos_token is true)",
        ));
    }
    if add_eos && eos_token_id.is_none() {
        return Err(TokenizerError::MissingSpecialToken(
            "EOS (add_eos_token is true)",
        ));
    }
    if add_bos || add_eos {
        let mut specials = Vec::new();
        let mut single = Vec::new();
        if let Some(bos) = bos_token_id.filter(|_| add_bos) {
            specials.push(special_template_token("BOS", bos, &pieces)?);
            single.push("BOS");
        }
        single.push("$A");
        if let Some(eos) = eos_token_id.filter(|_| add_eos) {
            specials.push(special_template_token("EOS", eos, &pieces)?);
            single.push("EOS");
        }
        let mut pair = single.clone();
        pair.extend(single.iter().map(|p| if *p == "$A" { "$B:1" } else { *p }));
        let processor = TemplateProcessing::builder()
            .try_single(single)
            .map_err(template_error)?
            .try_pair(pair)
            .map_err(template_error)?
            .special_tokens(specials)
            .build()
            .map_err(|e| template_error(e.to_string()))?;
        tokenizer.with_post_processor(Some(processor));
    }

    Ok(GgufTokenizer {
        tokenizer,
        token_types,
        piece_encoding,
        bos_token_id,
        eos_token_id,
        unknown_token_id,
        padding_token_id,
        add_bos,
        add_eos,
        strip_leading_space,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum VocabKind {
    Bpe,
    Spm,
}

/// Token texts that llama.cpp (`llama_vocab::impl::load`, EOT/EOM/EOG and FIM detection) turns
/// into control tokens whatever their stored type.
pub const EOG_LIKE_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<|eom_id|>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|fim_pad|>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<fim-prefix>",
    "<fim-suffix>",
    "<fim-middle>",
    "<fim-pad>",
    "<fim-repo>",
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<fim_pad>",
    "<reponame>",
];

// llama.cpp regexes, unescaped from its C++ string literals.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek LLM's letter runs: the Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee and other
/// cased scripts, listed as ranges (the tokenizer's own regex).
const RE_DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\u{B5}\u{C0}-\u{D6}\u{D8}-\u{F6}\u{F8}-\u{1BA}\u{1BC}-\u{1BF}\u{1C4}-\u{293}\u{295}-\u{2AF}\u{370}-\u{373}\u{376}\u{377}\u{37B}-\u{37D}\u{37F}\u{386}\u{388}-\u{38A}\u{38C}\u{38E}-\u{3A1}\u{3A3}-\u{3F5}\u{3F7}-\u{481}\u{48A}-\u{52F}\u{531}-\u{556}\u{10A0}-\u{10C5}\u{13A0}-\u{13F5}\u{13F8}-\u{13FD}\u{1C90}-\u{1CBA}\u{1CBD}-\u{1CBF}\u{1D00}-\u{1D2B}\u{1D6B}-\u{1D77}\u{1D79}-\u{1D9A}\u{1E00}-\u{1F15}\u{1F18}-\u{1F1D}\u{1F20}-\u{1F45}\u{1F48}-\u{1F4D}\u{1F50}-\u{1F57}\u{1F59}\u{1F5B}\u{1F5D}\u{1F5F}-\u{1F7D}\u{1F80}-\u{1FB4}\u{1FB6}-\u{1FBC}\u{1FBE}\u{1FC2}-\u{1FC4}\u{1FC6}-\u{1FCC}\u{1FD0}-\u{1FD3}\u{1FD6}-\u{1FDB}\u{1FE0}-\u{1FEC}\u{1FF2}-\u{1FF4}\u{1FF6}-\u{1FFC}\u{2102}\u{2107}\u{210A}-\u{2113}\u{2115}\u{2119}-\u{211D}\u{2124}\u{2126}\u{2128}\u{212A}-\u{212D}\u{212F}-\u{2134}\u{2139}\u{213C}-\u{213F}\u{2145}-\u{2149}\u{214E}\u{2183}\u{2184}\u{2C00}-\u{2C7B}\u{2C7E}-\u{2CE4}\u{2CEB}-\u{2CEE}\u{2CF2}\u{2CF3}\u{A640}-\u{A66D}\u{A680}-\u{A69B}\u{A722}-\u{A76F}\u{A771}-\u{A787}\u{A78B}-\u{A78E}\u{AB70}-\u{ABBF}\u{FB00}-\u{FB06}\u{FB13}-\u{FB17}\u{FF21}-\u{FF3A}\u{FF41}-\u{FF5A}\u{10400}-\u{1044F}\u{104B0}-\u{104D3}\u{104D8}-\u{104FB}\u{10C80}-\u{10CB2}\u{10CC0}-\u{10CF2}\u{118A0}-\u{118DF}\u{1E900}-\u{1E943}]+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer settings for one llama.cpp `LLAMA_VOCAB_PRE_TYPE_*`.
struct PreTokenizerSpec {
    regexes: &'static [&'static str],
    /// llama.cpp `ignore_merges`: a pre-token that is itself in the vocabulary is emitted whole.
    ignore_merges: bool,
    /// llama.cpp's `add_bos` default for the type, used when `add_bos_token` is absent.
    add_bos_default: bool,
}

/// The `pre` names (and their llama.cpp aliases) this module supports.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt-2",
    "gpt2",
    "phi-2",
    "mpt",
    "olmo",
    "jais",
    "gigachat",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "dbrx",
    "smaug-bpe",
    "qwen2",
    "deepseek-r1-qwen",
    "stablelm2",
    "megrez",
    "qwen35",
    "falcon",
    "deepseek-coder",
    "deepseek-llm",
];

fn pre_tokenizer_spec(pre: Option<&str>) -> Result<PreTokenizerSpec, TokenizerError> {
    let spec = |regexes, ignore_merges, add_bos_default| PreTokenizerSpec {
        regexes,
        ignore_merges,
        add_bos_default,
    };
    Ok(match pre.unwrap_or("") {
        // LLAMA_VOCAB_PRE_TYPE_DEFAULT (also used when the key is missing).
        "" | "default" => spec(
            &[
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        // LLAMA_VOCAB_PRE_TYPE_GPT2 and types sharing its regex. llama.cpp spells the name
        // `gpt-2`; `gpt2` is accepted as an alias.
        "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "gigachat" => {
            spec(&[RE_GPT2], false, false)
        }
        // LLAMA_VOCAB_PRE_TYPE_STARCODER and types sharing it: every digit on its own, then GPT-2.
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(&[r"\p{N}", RE_GPT2], false, false)
        }
        // LLAMA_VOCAB_PRE_TYPE_LLAMA3.
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => spec(&[RE_LLAMA3], true, true),
        // LLAMA_VOCAB_PRE_TYPE_DBRX / SMAUG: the Llama 3 regex without its other settings.
        "dbrx" | "smaug-bpe" => spec(&[RE_LLAMA3], false, false),
        // LLAMA_VOCAB_PRE_TYPE_QWEN2 / STABLELM2.
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => spec(&[RE_QWEN2], false, false),
        // LLAMA_VOCAB_PRE_TYPE_QWEN35: Qwen2's regex with combining marks inside words.
        "qwen35" => spec(&[RE_QWEN35], false, false),
        // LLAMA_VOCAB_PRE_TYPE_FALCON.
        "falcon" => spec(
            &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        // LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER.
        "deepseek-coder" => spec(
            &[
                r"[\r\n]",
                r"\s?\p{L}+",
                r"\s?\p{P}+",
                "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
                r"\p{N}",
            ],
            false,
            false,
        ),
        // LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_LLM.
        "deepseek-llm" => spec(
            &[
                r"[\r\n]",
                RE_DEEPSEEK_LLM_LETTERS,
                "\\s?[!-/:-~\u{FF01}-\u{FF0F}\u{FF1A}-\u{FF5E}\u{2018}-\u{201F}\u{3000}-\u{3002}]+",
                r"\s+$",
                "[\u{4E00}-\u{9FA5}\u{800}-\u{4E00}\u{AC00}-\u{D7FF}]+",
                r"\p{N}+",
            ],
            false,
            false,
        ),
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_owned())),
    })
}

fn to_bpe_vocab(vocab: HashMap<String, u32>) -> Vocab {
    vocab.into_iter().collect()
}

/// Parse `"left right"` merge lines. The separator is the first space after the first byte (as
/// in llama.cpp). Duplicate pairs keep their first (best) rank, as llama.cpp's `bpe_ranks`
/// does. A merge whose parts or result are not tokens is an error: HF BPE cannot represent it.
fn parse_merges(
    lines: &[String],
    vocab: &HashMap<String, u32>,
) -> Result<Vec<(String, String)>, TokenizerError> {
    let mut seen: std::collections::HashSet<(&str, &str)> =
        std::collections::HashSet::with_capacity(lines.len());
    let mut merges = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        let bad = |reason: &'static str| TokenizerError::BadMerge {
            index,
            line: line.clone(),
            reason,
        };
        let first_len = line.chars().next().map_or(0, char::len_utf8);
        let sep = line
            .get(first_len..)
            .and_then(|rest| rest.find(' '))
            .map(|p| p + first_len)
            .ok_or_else(|| bad("no space separating the two parts"))?;
        let (left, right) = (&line[..sep], &line[sep + 1..]);
        if left.is_empty() || right.is_empty() {
            return Err(bad("empty part"));
        }
        if !vocab.contains_key(left) || !vocab.contains_key(right) {
            return Err(bad("a part is not in the vocabulary"));
        }
        if !vocab.contains_key(&format!("{left}{right}")) {
            return Err(bad("the merged token is not in the vocabulary"));
        }
        if seen.insert((left, right)) {
            merges.push((left.to_owned(), right.to_owned()));
        }
    }
    Ok(merges)
}

/// Derive BPE merges from SentencePiece scores.
///
/// llama.cpp's SPM tokenizer starts from single characters and repeatedly merges the adjacent
/// pair whose concatenation is a token with the highest score (ties: leftmost pair). A rank-based
/// BPE behaves the same if, for every token `t` and every split `t = a + b` with `a` and `b`
/// tokens, there is a merge `(a, b)` ranked by `t`'s score (best first): HF BPE then always
/// applies the available pair with the best score, leftmost first among equal ranks.
///
/// Known differences, none of which occur with ordinary vocabularies: distinct tokens with
/// exactly equal scores are ordered by id here but by position in llama.cpp; llama.cpp can merge
/// through a character that is not itself a token, which HF turns into byte tokens first.
/// Byte tokens take no part in merges.
pub fn spm_merges(
    pieces: &[String],
    scores: &[f32],
    types: &[TokenType],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, usize, String, String)> = Vec::new();
    for ((id, piece), (&score, &ty)) in (0u32..).zip(pieces).zip(scores.iter().zip(types)) {
        if ty == TokenType::Byte {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((score, id, split, left.to_owned(), right.to_owned()));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked.into_iter().map(|(_, _, _, l, r)| (l, r)).collect()
}

fn special_template_token(
    name: &str,
    id: u32,
    pieces: &[String],
) -> Result<SpecialToken, TokenizerError> {
    let piece = pieces
        .get(id as usize)
        .cloned()
        .ok_or(TokenizerError::UnknownTokenId(id))?;
    SpecialToken::new(name.to_owned(), vec![id], vec![piece]).map_err(TokenizerError::Tokenizers)
}

fn template_error(e: String) -> TokenizerError {
    TokenizerError::Tokenizers(e.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::super::tokenizer::tests::tiny_gpt2 as tiny_gpt2_vocab;

    fn ids(t: &HfPipeline, text: &str) -> Vec<u32> {
        t.encode_fast(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn gpt2_bpe_and_special_tokens() {
        let v = tiny_gpt2_vocab();
        let t = tokenizer_from_gguf_vocab(&v).unwrap();
        let id = |s: &str| t.token_to_id(s).unwrap();
        assert_eq!(ids(&t, "hello world"), vec![id("hello"), id("Ġworld")]);
        // smollm splits digits one by one, so the "12" merge never applies.
        assert_eq!(ids(&t, "12"), vec![id("1"), id("2")]);
        assert_eq!(
            ids(&t, "<|im_start|>hello<tool>"),
            vec![id("<|im_start|>"), id("hello"), id("<tool>")]
        );
    }

    #[test]
    fn gpt2_pre_tokenizer_keeps_digit_runs() {
        let mut v = tiny_gpt2_vocab();
        v.pre = Some("gpt-2".into());
        let t = tokenizer_from_gguf_vocab(&v).unwrap();
        assert_eq!(ids(&t, "12"), vec![t.token_to_id("12").unwrap()]);
    }

    #[test]
    fn every_supported_pre_tokenizer_builds() {
        for pre in SUPPORTED_PRE_TOKENIZERS {
            let mut v = tiny_gpt2_vocab();
            v.pre = Some((*pre).to_owned());
            let t = tokenizer_from_gguf_vocab(&v).unwrap_or_else(|e| panic!("{pre}: {e}"));
            let hello = t.token_to_id("hello").unwrap();
            assert_eq!(ids(&t, "hello"), vec![hello], "{pre}");
        }
        // Missing `pre` is llama.cpp's DEFAULT type: punctuation runs are split off first.
        let splits = |pre: Option<&str>, text: &str| -> Vec<String> {
            use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
            let mut v = tiny_gpt2_vocab();
            v.pre = pre.map(str::to_owned);
            let t = tokenizer_from_gguf_vocab(&v).unwrap();
            let mut p = PreTokenizedString::from(text);
            t.get_pre_tokenizer().unwrap().pre_tokenize(&mut p).unwrap();
            p.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(_, (a, b), _)| text[a..b].to_owned())
                .collect()
        };
        assert_eq!(splits(None, "a $b"), ["a", " ", "$", "b"]);
        assert_eq!(splits(Some("default"), "a $b"), ["a", " ", "$", "b"]);
        assert_eq!(splits(Some("gpt-2"), "a $b 12"), ["a", " $", "b", " 12"]);
        assert_eq!(
            splits(Some("smollm"), "a $b 12"),
            ["a", " $", "b", " ", "1", "2"]
        );
        assert_eq!(splits(Some("llama-bpe"), "a 1234"), ["a", " ", "123", "4"]);
        assert_eq!(splits(Some("qwen2"), "a 12"), ["a", " ", "1", "2"]);
    }

    #[test]
    fn bos_is_added_only_when_requested() {
        let mut v = tiny_gpt2_vocab();
        let t = tokenizer_from_gguf_vocab(&v).unwrap();
        assert_eq!(t.encode_fast("hello", true).unwrap().get_ids().len(), 1);
        v.add_bos_token = Some(true);
        let t = tokenizer_from_gguf_vocab(&v).unwrap();
        let got = t.encode_fast("hello", true).unwrap().get_ids().to_vec();
        assert_eq!(
            got,
            vec![v.bos_token_id.unwrap(), t.token_to_id("hello").unwrap()]
        );
        assert_eq!(t.encode_fast("hello", false).unwrap().get_ids().len(), 1);
    }

    #[test]
    fn llama3_family_defaults_to_bos() {
        let mut v = tiny_gpt2_vocab();
        v.pre = Some("llama-bpe".into());
        v.add_bos_token = None;
        let g = build_gguf_tokenizer(&v).unwrap();
        assert!(g.add_bos);
        v.bos_token_id = None;
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::MissingSpecialToken(_))
        ));
    }

    #[test]
    fn metadata_errors() {
        let base = tiny_gpt2_vocab();

        let mut v = base.clone();
        v.model = "bert".into();
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::UnsupportedModel(m)) if m == "bert"
        ));

        let mut v = base.clone();
        v.pre = Some("no-such-pre".into());
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::UnsupportedPreTokenizer(_))
        ));

        let mut v = base.clone();
        v.merges = None;
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::MissingMerges)
        ));

        let mut v = base.clone();
        v.merges.as_mut().unwrap().push("nospace".into());
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::BadMerge { reason, .. }) if reason.contains("space")
        ));

        let mut v = base.clone();
        v.merges.as_mut().unwrap().push("zz zz".into());
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::BadMerge { .. })
        ));

        // Parts exist, result does not (would make HF's BPE builder fail or panic).
        let mut v = base.clone();
        v.merges.as_mut().unwrap().push("hello Ġworld".into());
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::BadMerge { .. })
        ));

        let mut v = base.clone();
        v.token_types.as_mut().unwrap().pop();
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::InconsistentLength { .. })
        ));

        let mut v = base.clone();
        v.tokens.push("hello".into());
        v.token_types.as_mut().unwrap().push(1);
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::DuplicateToken { .. })
        ));

        let mut v = base.clone();
        v.tokens.clear();
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::EmptyVocabulary)
        ));

        let mut v = base;
        v.model = "llama".into();
        v.scores = None;
        assert!(matches!(
            build_gguf_tokenizer(&v),
            Err(TokenizerError::MissingScores)
        ));
    }

    #[test]
    fn merge_lines_split_after_first_char() {
        // A part may start with a space-like char; the separator search starts after it.
        let vocab: HashMap<String, u32> = [("a", 0), ("b", 1), ("ab", 2)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let m = parse_merges(&["a b".into(), "a b".into()], &vocab).unwrap();
        assert_eq!(m, vec![("a".to_owned(), "b".to_owned())]);
        assert!(parse_merges(&[" ab".into()], &vocab).is_err());
    }

    #[test]
    fn eog_like_tokens_become_control() {
        let mut v = tiny_gpt2_vocab();
        let end = v.tokens.iter().position(|t| t == "<|im_end|>").unwrap();
        // Mark <|im_end|> as normal: llama.cpp (and we) still treat it as control.
        v.token_types.as_mut().unwrap()[end] = 1;
        let g = build_gguf_tokenizer(&v).unwrap();
        assert_eq!(g.token_types[end], TokenType::Control);
    }
}
