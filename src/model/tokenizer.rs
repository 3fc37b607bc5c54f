//! The worker's text tokenizer: encoding with or without special-token parsing, decoding with or
//! without rendering special tokens, and the raw bytes of every token for streaming.
//!
//! Semantics follow llama.cpp (`src/llama-vocab.cpp`: `tokenize(text, add_special,
//! parse_special)`, `token_to_piece(token, special)`), which is what llama-server's `/tokenize`,
//! `/detokenize` and generated text use; the pipeline itself is HF `tokenizers`.
//!
//! - Encoding runs a HF `tokenizers` pipeline ([`HfPipeline`]). Two configured copies are kept:
//!   one that splits special tokens out of the text and one with `encode_special_tokens` set, so
//!   marker text such as `<|im_start|>` is tokenized as ordinary text. They share one model
//!   ([`SharedModel`]): the vocabulary and merge tables are most of a tokenizer's memory. Both
//!   are immutable after construction, so [`TextTokenizer`] is `Send + Sync` and needs no
//!   locking.
//! - Decoding concatenates per-token byte strings precomputed at construction (llama.cpp
//!   renders the same way: piece by piece, no clean-up) and converts the result to UTF-8 lossily.
//!   Control tokens render as their text only when asked to; user-defined tokens always render.
//!
//! How a piece maps to bytes ([`PieceEncoding`]):
//! - byte-level BPE (GPT-2 `bytes_to_unicode`): every character maps back to one byte; a piece
//!   with a character outside that alphabet is taken as UTF-8 text, like HF's `ByteLevel` decoder;
//! - SentencePiece: `▁` is a space and `<0xNN>` byte-fallback tokens are the byte `NN`;
//! - raw: the piece's UTF-8 text.
//!
//! For GGUF vocabularies the encoding follows `tokenizer.ggml.model`; for `tokenizer.json` it is
//! read from the decoder: `ByteLevel` → byte-level; `Metaspace`, or a sequence with
//! `Replace("▁", " ")`/`ByteFallback` → SentencePiece; anything else (WordPiece, CTC, no decoder)
//! → raw, a documented fallback that is exact only for vocabularies of plain text pieces.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokenizers::{
    DecoderWrapper, Model, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper, Tokenizer, TokenizerImpl,
};

use super::gguf_tokenizer::{GgufVocab, TokenType, build_gguf_tokenizer};

/// Errors from building or using a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("unsupported tokenizer model `{0}` (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error(
        "unsupported pre-tokenizer `{0}` (tokenizer.ggml.pre); supported: {list}",
        list = super::gguf_tokenizer::SUPPORTED_PRE_TOKENIZERS.join(", ")
    )]
    UnsupportedPreTokenizer(String),
    #[error("the vocabulary is empty")]
    EmptyVocabulary,
    #[error("the vocabulary has {0} tokens, more than token ids can address")]
    VocabularyTooLarge(usize),
    #[error("{field} has {actual} entries but the vocabulary has {expected} tokens")]
    InconsistentLength {
        field: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("token {piece:?} appears twice in the vocabulary (ids {first} and {second})")]
    DuplicateToken {
        piece: String,
        first: u32,
        second: u32,
    },
    #[error("tokenizer.ggml.merges is missing; a BPE vocabulary needs it")]
    MissingMerges,
    #[error("tokenizer.ggml.scores is missing; a SentencePiece vocabulary needs it")]
    MissingScores,
    #[error("bad merge #{index} {line:?}: {reason}")]
    BadMerge {
        index: usize,
        line: String,
        reason: &'static str,
    },
    #[error("token ids go up to {max_id} for only {tokens} tokens")]
    SparseIds { max_id: usize, tokens: usize },
    #[error("no {0} token id")]
    MissingSpecialToken(&'static str),
    #[error("token id {0} is not in the vocabulary")]
    UnknownTokenId(u32),
    #[error("cannot load tokenizer from {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("tokenizers: {0}")]
    Tokenizers(#[source] tokenizers::Error),
}

/// How a (non-special) token's piece maps to the bytes it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceEncoding {
    /// GPT-2 byte-level alphabet.
    ByteLevel,
    /// `▁` for spaces and `<0xNN>` byte-fallback tokens.
    SentencePiece,
    /// The piece is the text.
    Raw,
}

/// A `tokenizers::Tokenizer` whose model is a [`SharedModel`], so that clones share it.
pub type HfPipeline = TokenizerImpl<
    SharedModel,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// A HF tokenizer model (vocabulary, merges) behind an `Arc`. A 150k-token BPE's maps take
/// tens of MB, and [`TextTokenizer`] keeps two pipelines that differ only in how they treat
/// special-token text.
#[derive(Debug, Clone)]
pub struct SharedModel(Arc<ModelWrapper>);

impl SharedModel {
    pub fn new(model: impl Into<ModelWrapper>) -> Self {
        Self(Arc::new(model.into()))
    }
}

impl Model for SharedModel {
    type Trainer = <ModelWrapper as Model>::Trainer;

    fn tokenize(&self, sequence: &str) -> tokenizers::Result<Vec<tokenizers::Token>> {
        self.0.tokenize(sequence)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.0.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.0.id_to_token(id)
    }

    fn get_vocab(&self) -> HashMap<String, u32> {
        self.0.get_vocab()
    }

    fn get_vocab_size(&self) -> usize {
        self.0.get_vocab_size()
    }

    fn save(&self, folder: &Path, prefix: Option<&str>) -> tokenizers::Result<Vec<PathBuf>> {
        self.0.save(folder, prefix)
    }

    fn get_trainer(&self) -> Self::Trainer {
        self.0.get_trainer()
    }
}

/// Serialized as the model itself, so a pipeline reads and writes plain `tokenizer.json`.
impl Serialize for SharedModel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SharedModel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ModelWrapper::deserialize(deserializer).map(Self::new)
    }
}

/// `t` as a pipeline, with a copy of its model behind an `Arc` (its other parts are small).
fn pipeline_from_tokenizer(t: &Tokenizer) -> Result<HfPipeline, TokenizerError> {
    let mut p = HfPipeline::new(SharedModel::new(t.get_model().clone()));
    p.with_normalizer(t.get_normalizer().cloned())
        .map_err(TokenizerError::Tokenizers)?;
    p.with_pre_tokenizer(t.get_pre_tokenizer().cloned())
        .with_post_processor(t.get_post_processor().cloned())
        .with_decoder(t.get_decoder().cloned())
        .with_added_vocabulary(t.get_added_vocabulary().clone())
        .with_truncation(t.get_truncation().cloned())
        .map_err(TokenizerError::Tokenizers)?
        .with_padding(t.get_padding().cloned());
    Ok(p)
}

/// A tokenizer shared by all requests of the worker. Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    /// Splits special tokens written in the text into their ids.
    parse_special: HfPipeline,
    /// Same pipeline with `encode_special_tokens`: special-token text is ordinary text.
    literal: HfPipeline,
    /// Piece per id (empty for ids with no token).
    pieces: PackedTable,
    /// Whether an id has a token (`tokenizer.json` ids may have gaps).
    known: Vec<bool>,
    /// Rendered bytes per id (for special tokens: their text).
    bytes: PackedTable,
    /// Special tokens are rendered only with `render_special`.
    special: Vec<bool>,
    bos: Option<u32>,
    eos: Option<u32>,
    strip_leading_space: bool,
    piece_encoding: PieceEncoding,
}

/// Byte strings indexed by token id, packed into one buffer. A heap block per token would cost
/// more than the text itself: allocator overhead on 150k short strings, for each table.
#[derive(Clone, Default)]
struct PackedTable {
    data: Vec<u8>,
    /// `ends[id]`: where the id's string ends in `data`; it starts where the previous one ends.
    ends: Vec<usize>,
}

impl PackedTable {
    fn with_capacity(ids: usize) -> Self {
        Self {
            data: Vec::new(),
            ends: Vec::with_capacity(ids),
        }
    }

    /// Appends the string of the next id.
    fn push(&mut self, s: &[u8]) {
        self.data.extend_from_slice(s);
        self.ends.push(self.data.len());
    }

    fn get(&self, id: usize) -> Option<&[u8]> {
        let end = *self.ends.get(id)?;
        let start = id.checked_sub(1).map_or(0, |prev| self.ends[prev]);
        Some(&self.data[start..end])
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.inner.bos)
            .field("eos", &self.inner.eos)
            .field("piece_encoding", &self.inner.piece_encoding)
            .finish()
    }
}

impl TextTokenizer {
    /// Build from GGUF metadata, reproducing llama.cpp's tokenizer for the file.
    pub fn from_gguf_vocab(v: &GgufVocab) -> Result<Self, TokenizerError> {
        let g = build_gguf_tokenizer(v)?;
        let encoding = g.piece_encoding;
        let types = g.token_types;
        let table = |id: u32, piece: &str| -> (Vec<u8>, bool) {
            let ty = types.get(id as usize).copied().unwrap_or(TokenType::Normal);
            match ty {
                // llama.cpp renders control/unknown/user-defined tokens as their raw text.
                TokenType::Control | TokenType::Unknown => (piece.as_bytes().to_vec(), true),
                TokenType::UserDefined => (piece.as_bytes().to_vec(), false),
                TokenType::Byte => (
                    parse_byte_token(piece)
                        .map(|b| vec![b])
                        .unwrap_or_else(|| piece_bytes(piece, encoding)),
                    false,
                ),
                TokenType::Normal => (piece_bytes(piece, encoding), false),
                // llama.cpp's `token_to_piece` renders nothing for these.
                TokenType::Unused | TokenType::Undefined => (Vec::new(), false),
            }
        };
        Self::build(
            g.tokenizer,
            table,
            g.bos_token_id,
            g.eos_token_id,
            g.strip_leading_space,
            encoding,
        )
    }

    /// Load a HF `tokenizer.json` (with any `added_tokens_decoder` entries of
    /// `tokenizer_config.json` already merged into its `added_tokens`).
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, TokenizerError> {
        let t = HfPipeline::from_file(path).map_err(|source| TokenizerError::Load {
            path: path.to_owned(),
            source,
        })?;
        Self::from_pipeline(t)
    }

    /// Wrap an existing HF tokenizer. Special tokens are its added tokens marked `special`; the
    /// piece encoding comes from its decoder (see the module docs); BOS/EOS are taken from a
    /// template post-processor when it adds them (override with
    /// [`with_special_token_ids`](Self::with_special_token_ids)).
    pub fn from_tokenizers(t: Tokenizer) -> Result<Self, TokenizerError> {
        Self::from_pipeline(pipeline_from_tokenizer(&t)?)
    }

    fn from_pipeline(t: HfPipeline) -> Result<Self, TokenizerError> {
        let decoder = t
            .get_decoder()
            .and_then(|d| serde_json::to_value(d).ok())
            .unwrap_or(serde_json::Value::Null);
        let (encoding, strip) = encoding_from_decoder(&decoder);
        let processor = t
            .get_post_processor()
            .and_then(|p| serde_json::to_value(p).ok())
            .unwrap_or(serde_json::Value::Null);
        let (bos, eos) = template_bos_eos(&processor);
        let specials: std::collections::HashSet<u32> = t
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, tok)| tok.special)
            .map(|(id, _)| *id)
            .collect();
        let table = |id: u32, piece: &str| -> (Vec<u8>, bool) {
            (sentencepiece_or(piece, encoding), specials.contains(&id))
        };
        Self::build(t, table, bos, eos, strip, encoding)
    }

    /// Replace the BOS/EOS ids (e.g. from `tokenizer_config.json` or `generation_config.json`).
    pub fn with_special_token_ids(self, bos: Option<u32>, eos: Option<u32>) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.bos = bos;
        inner.eos = eos;
        Self {
            inner: Arc::new(inner),
        }
    }

    fn build(
        tokenizer: HfPipeline,
        table: impl Fn(u32, &str) -> (Vec<u8>, bool),
        bos: Option<u32>,
        eos: Option<u32>,
        strip_leading_space: bool,
        piece_encoding: PieceEncoding,
    ) -> Result<Self, TokenizerError> {
        let vocab = tokenizer.get_vocab(true);
        let size = vocab.values().max().map_or(0, |&max| max as usize + 1);
        // Tables are indexed by id; refuse ids far beyond the token count rather than
        // allocating for them.
        if size > 2 * vocab.len() + 1024 {
            return Err(TokenizerError::SparseIds {
                max_id: size - 1,
                tokens: vocab.len(),
            });
        }
        let mut by_id: Vec<Option<String>> = vec![None; size];
        for (piece, id) in vocab {
            by_id[id as usize] = Some(piece);
        }
        let mut pieces = PackedTable::with_capacity(size);
        let mut bytes = PackedTable::with_capacity(size);
        let mut known = vec![false; size];
        let mut special = vec![false; size];
        for (id, piece) in (0u32..).zip(by_id) {
            let Some(piece) = piece else {
                pieces.push(b"");
                bytes.push(b"");
                continue;
            };
            let (b, s) = table(id, &piece);
            bytes.push(&b);
            pieces.push(piece.as_bytes());
            known[id as usize] = true;
            special[id as usize] = s;
        }
        pieces.data.shrink_to_fit();
        bytes.data.shrink_to_fit();
        let mut parse_special = tokenizer;
        parse_special.set_encode_special_tokens(false);
        let mut literal = parse_special.clone();
        literal.set_encode_special_tokens(true);
        Ok(Self {
            inner: Arc::new(Inner {
                parse_special,
                literal,
                pieces,
                known,
                bytes,
                special,
                bos: bos.filter(|&id| (id as usize) < size),
                eos: eos.filter(|&id| (id as usize) < size),
                strip_leading_space,
                piece_encoding,
            }),
        })
    }

    /// Token ids of `text`, without BOS/EOS. With `parse_special`, special-token text (e.g.
    /// `<|im_start|>`) becomes the token's id; without it, it is tokenized as ordinary text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode_with_special(text, parse_special, false)
    }

    /// Like [`encode`](Self::encode); `add_special` adds BOS (and EOS) as the model's settings
    /// ask (GGUF `add_bos_token`/`add_eos_token`; the `tokenizer.json` post-processor).
    pub fn encode_with_special(
        &self,
        text: &str,
        parse_special: bool,
        add_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let t = if parse_special {
            &self.inner.parse_special
        } else {
            &self.inner.literal
        };
        let encoding = t
            .encode_fast(text, add_special)
            .map_err(TokenizerError::Tokenizers)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`. `render_special`: special tokens as their text (llama-server
    /// `/detokenize`); otherwise omitted (generated text). Invalid UTF-8 becomes U+FFFD.
    /// For SentencePiece vocabularies with a space prefix, one leading space of the first
    /// rendered token is dropped (the prefix the encoder added); see [`StreamingDetokenizer`]
    /// for continuations.
    ///
    /// [`StreamingDetokenizer`]: super::detokenizer::StreamingDetokenizer
    pub fn decode(&self, ids: &[u32], render_special: bool) -> Result<String, TokenizerError> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        let mut first = true;
        for &id in ids {
            if !self.inner.known.get(id as usize).copied().unwrap_or(false) {
                return Err(TokenizerError::UnknownTokenId(id));
            }
            let b = self.token_bytes(id, render_special);
            if b.is_empty() {
                continue;
            }
            if first && self.inner.strip_leading_space && b[0] == b' ' {
                out.extend_from_slice(&b[1..]);
            } else {
                out.extend_from_slice(b);
            }
            first = false;
        }
        Ok(match String::from_utf8(out) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The raw bytes one token stands for (byte-level characters mapped back to bytes, `<0xNN>`
    /// to the byte, `▁` to a space). Empty for an unknown id and for a special token when
    /// `render_special` is false.
    pub fn token_bytes(&self, id: u32, render_special: bool) -> &[u8] {
        let i = id as usize;
        match self.inner.bytes.get(i) {
            Some(b) if render_special || !self.inner.special[i] => b,
            _ => &[],
        }
    }

    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.inner.parse_special.token_to_id(piece)
    }

    /// The vocabulary piece of `id` (e.g. `Ġworld`, `▁world`, `<|im_end|>`).
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        if !*self.inner.known.get(id as usize)? {
            return None;
        }
        // Packed from `&str`s, so always UTF-8.
        std::str::from_utf8(self.inner.pieces.get(id as usize)?).ok()
    }

    /// One past the largest token id, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.pieces.len()
    }

    /// Control (and unknown-type) tokens, i.e. those hidden unless `render_special`.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .special
            .get(id as usize)
            .copied()
            .unwrap_or(false)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos
    }

    /// Whether [`decode`](Self::decode) drops a leading space (SentencePiece space prefix).
    pub fn strips_leading_space(&self) -> bool {
        self.inner.strip_leading_space
    }

    pub fn piece_encoding(&self) -> PieceEncoding {
        self.inner.piece_encoding
    }

    /// The underlying HF tokenizer (special tokens parsed).
    pub fn hf_tokenizer(&self) -> &HfPipeline {
        &self.inner.parse_special
    }
}

/// GPT-2's `bytes_to_unicode`: the character standing for each byte in byte-level BPE pieces.
pub fn byte_level_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            b as u32
        } else {
            let c = next;
            next += 1;
            c
        };
        // All codes are below 0x144, valid scalar values.
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// Inverse of [`byte_level_chars`], indexed by code point (all below 0x144).
fn byte_level_decoder() -> &'static [Option<u8>] {
    use std::sync::OnceLock;
    static TABLE: OnceLock<Vec<Option<u8>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![None; 0x144];
        for (b, c) in (0u8..=255).zip(byte_level_chars()) {
            if let Some(slot) = t.get_mut(c as usize) {
                *slot = Some(b);
            }
        }
        t
    })
}

/// Bytes of a normal token's piece under `encoding` (no `<0xNN>` handling).
fn piece_bytes(piece: &str, encoding: PieceEncoding) -> Vec<u8> {
    match encoding {
        PieceEncoding::ByteLevel => {
            let table = byte_level_decoder();
            let mapped: Option<Vec<u8>> = piece
                .chars()
                .map(|c| table.get(c as usize).copied().flatten())
                .collect();
            // A piece with a character outside the byte alphabet is plain text (as in HF's
            // ByteLevel decoder), e.g. an added token containing a real space.
            mapped.unwrap_or_else(|| piece.as_bytes().to_vec())
        }
        PieceEncoding::SentencePiece => piece.replace('▁', " ").into_bytes(),
        PieceEncoding::Raw => piece.as_bytes().to_vec(),
    }
}

/// For `tokenizer.json` vocabularies, where byte tokens are recognised by their form.
fn sentencepiece_or(piece: &str, encoding: PieceEncoding) -> Vec<u8> {
    if encoding == PieceEncoding::SentencePiece
        && let Some(b) = parse_byte_token(piece)
    {
        return vec![b];
    }
    piece_bytes(piece, encoding)
}

/// `<0xNN>` → `NN`.
fn parse_byte_token(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Piece encoding and leading-space strip from a serialized HF decoder.
fn encoding_from_decoder(decoder: &serde_json::Value) -> (PieceEncoding, bool) {
    let ty = decoder.get("type").and_then(|t| t.as_str()).unwrap_or("");
    match ty {
        "ByteLevel" => (PieceEncoding::ByteLevel, false),
        "Metaspace" => {
            let never = decoder.get("prepend_scheme").and_then(|p| p.as_str()) == Some("never");
            (PieceEncoding::SentencePiece, !never)
        }
        "Sequence" => {
            let parts: &[serde_json::Value] = decoder
                .get("decoders")
                .and_then(|d| d.as_array())
                .map_or(&[], Vec::as_slice);
            let mut encoding = PieceEncoding::Raw;
            let mut strip = false;
            for part in parts {
                let ty = part.get("type").and_then(|t| t.as_str()).unwrap_or("");
                match ty {
                    "ByteLevel" => encoding = PieceEncoding::ByteLevel,
                    "ByteFallback" => encoding = PieceEncoding::SentencePiece,
                    "Replace"
                        if part.pointer("/pattern/String").and_then(|p| p.as_str())
                            == Some("▁") =>
                    {
                        encoding = PieceEncoding::SentencePiece;
                    }
                    "Metaspace" => {
                        let (e, s) = encoding_from_decoder(part);
                        encoding = e;
                        strip |= s;
                    }
                    "Strip" => {
                        let content = part.get("content").and_then(|c| c.as_str());
                        let start = part.get("start").and_then(|s| s.as_u64()).unwrap_or(0);
                        strip |= content == Some(" ") && start > 0;
                    }
                    _ => {}
                }
            }
            (encoding, strip && encoding == PieceEncoding::SentencePiece)
        }
        _ => (PieceEncoding::Raw, false),
    }
}

/// BOS/EOS added by a serialized template post-processor (`TemplateProcessing`, possibly inside
/// a `Sequence`; `RobertaProcessing`/`BertProcessing` give their CLS/SEP).
fn template_bos_eos(processor: &serde_json::Value) -> (Option<u32>, Option<u32>) {
    let ty = processor.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let id_at = |v: &serde_json::Value, ptr: &str| {
        v.pointer(ptr)
            .and_then(|x| x.as_u64())
            .and_then(|x| u32::try_from(x).ok())
    };
    match ty {
        "TemplateProcessing" => {
            let single: &[serde_json::Value] = processor
                .get("single")
                .and_then(|s| s.as_array())
                .map_or(&[], Vec::as_slice);
            let special_id = |piece: Option<&serde_json::Value>| {
                let name = piece?.pointer("/SpecialToken/id")?.as_str()?;
                let tok = processor.get("special_tokens")?.get(name)?;
                id_at(tok, "/ids/0")
            };
            (special_id(single.first()), {
                let last = single.last();
                if single.len() > 1 {
                    special_id(last)
                } else {
                    None
                }
            })
        }
        "RobertaProcessing" | "BertProcessing" => {
            (id_at(processor, "/cls/1"), id_at(processor, "/sep/1"))
        }
        "Sequence" => processor
            .get("processors")
            .and_then(|p| p.as_array())
            .into_iter()
            .flatten()
            .map(template_bos_eos)
            .find(|(b, e)| b.is_some() || e.is_some())
            .unwrap_or((None, None)),
        _ => (None, None),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync + Clone>() {}

    #[test]
    fn text_tokenizer_is_send_sync() {
        assert_send_sync::<TextTokenizer>();
    }

    #[test]
    fn byte_level_alphabet_round_trips() {
        let chars = byte_level_chars();
        assert_eq!(chars[b'A' as usize], 'A');
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        let table = byte_level_decoder();
        for (b, c) in (0u8..=255).zip(chars) {
            assert_eq!(table[c as usize], Some(b));
        }
        let distinct: std::collections::HashSet<char> = chars.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    /// Byte-level vocabulary: 256 byte characters, a few merges, control and user-defined tokens.
    pub(crate) fn tiny_gpt2() -> GgufVocab {
        let mut tokens: Vec<String> = byte_level_chars().iter().map(|c| c.to_string()).collect();
        let mut merges = Vec::new();
        let mut add = |a: &str, b: &str, tokens: &mut Vec<String>| {
            merges.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
        };
        for (a, b) in [
            ("h", "e"),
            ("l", "l"),
            ("he", "ll"),
            ("hell", "o"),
            ("Ġ", "w"),
            ("o", "r"),
            ("Ġw", "or"),
            ("Ġwor", "l"),
            ("Ġworl", "d"),
            // "你" = E4 BD A0 → "ä½ł"; merge its last two bytes only, so it spans two tokens.
            ("½", "ł"),
            ("1", "2"),
        ] {
            add(a, b, &mut tokens);
        }
        let mut types = vec![1; tokens.len()];
        for (t, ty) in [("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool>", 4)] {
            tokens.push(t.into());
            types.push(ty);
        }
        let bos = tokens.len() as u32 - 3;
        GgufVocab {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens,
            token_types: Some(types),
            merges: Some(merges),
            bos_token_id: Some(bos),
            eos_token_id: Some(bos + 1),
            add_bos_token: Some(false),
            ..Default::default()
        }
    }

    /// SentencePiece vocabulary with byte fallback (`<0x00>`..`<0xFF>`) and scored merges.
    pub(crate) fn tiny_llama() -> GgufVocab {
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0, 0.0, 0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        let normal = [
            "▁", "h", "e", "l", "o", "w", "r", "d", "a", "b", "c", "你", "▁h", "he", "ll", "▁he",
            "llo", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "ab", "bc", "abc", "▁a", "ca",
        ];
        for (i, p) in normal.iter().enumerate() {
            tokens.push((*p).into());
            types.push(1);
            // Longer/later pieces get lower scores, like SentencePiece BPE (score = -rank).
            scores.push(-(i as f32));
        }
        tokens.push("<tool>".into());
        types.push(4);
        scores.push(0.0);
        GgufVocab {
            model: "llama".into(),
            tokens,
            token_types: Some(types),
            scores: Some(scores),
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unknown_token_id: Some(0),
            add_bos_token: Some(true),
            ..Default::default()
        }
    }

    pub(crate) fn gpt2() -> TextTokenizer {
        TextTokenizer::from_gguf_vocab(&tiny_gpt2()).unwrap()
    }

    pub(crate) fn llama() -> TextTokenizer {
        TextTokenizer::from_gguf_vocab(&tiny_llama()).unwrap()
    }

    fn id(t: &TextTokenizer, piece: &str) -> u32 {
        t.token_to_id(piece).unwrap()
    }

    /// `text` encodes (special tokens parsed) to the ids of `pieces` and decodes back to itself.
    fn assert_round_trip(t: &TextTokenizer, text: &str, pieces: &[&str]) -> Vec<u32> {
        let ids = t.encode(text, true).unwrap();
        let want: Vec<u32> = pieces.iter().map(|piece| id(t, piece)).collect();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(t.decode(&ids, false).unwrap(), text);
        ids
    }

    #[test]
    fn gpt2_encode_decode() {
        let t = gpt2();
        assert_round_trip(&t, "hello world", &["hello", "Ġworld"]);
        assert_eq!(t.token_bytes(id(&t, "Ġworld"), false), b" world");
        assert_eq!(t.id_to_piece(id(&t, "Ġworld")), Some("Ġworld"));
        assert_eq!(t.vocab_size(), tiny_gpt2().tokens.len());
        assert_eq!(t.piece_encoding(), PieceEncoding::ByteLevel);
    }

    #[test]
    fn both_pipelines_share_one_model() {
        // The model is most of a tokenizer's memory; a deep copy per pipeline doubled it.
        let json = std::env::temp_dir().join(format!("tok-share-{}.json", std::process::id()));
        super::super::gguf_tokenizer::tokenizer_from_gguf_vocab(&tiny_gpt2())
            .unwrap()
            .save(&json, false)
            .unwrap();
        for t in [
            gpt2(),
            llama(),
            TextTokenizer::from_tokenizer_json(&json).unwrap(),
            TextTokenizer::from_tokenizers(bpe_without_merges(&[("a", 0)])).unwrap(),
        ] {
            let (a, b) = (&t.inner.parse_special, &t.inner.literal);
            assert!(Arc::ptr_eq(&a.get_model().0, &b.get_model().0));
        }
        std::fs::remove_file(json).unwrap();
    }

    #[test]
    fn gpt2_special_tokens_parse_and_render() {
        let t = gpt2();
        let start = id(&t, "<|im_start|>");
        let text = "<|im_start|>hello<|im_end|>";
        let parsed = t.encode(text, true).unwrap();
        assert_eq!(parsed, vec![start, id(&t, "hello"), id(&t, "<|im_end|>")]);
        let literal = t.encode(text, false).unwrap();
        assert!(!literal.contains(&start));
        assert_eq!(t.decode(&literal, false).unwrap(), text);
        assert_eq!(t.decode(&parsed, true).unwrap(), text);
        assert_eq!(t.decode(&parsed, false).unwrap(), "hello");
        assert!(t.is_special(start));
        assert!(t.token_bytes(start, false).is_empty());
        assert_eq!(t.token_bytes(start, true), b"<|im_start|>");
        // User-defined tokens are split out either way and always rendered.
        let tool = id(&t, "<tool>");
        assert!(!t.is_special(tool));
        assert_eq!(t.encode("hello<tool>", false).unwrap()[1], tool);
        assert_eq!(t.decode(&[tool], false).unwrap(), "<tool>");
        assert_eq!(t.bos_token_id(), Some(start));
        assert_eq!(t.eos_token_id(), Some(id(&t, "<|im_end|>")));
    }

    #[test]
    fn add_special_follows_add_bos() {
        let t = gpt2();
        assert_eq!(
            t.encode_with_special("hello", true, true).unwrap(),
            t.encode("hello", true).unwrap()
        );
        let mut v = tiny_gpt2();
        v.add_bos_token = Some(true);
        let t = TextTokenizer::from_gguf_vocab(&v).unwrap();
        let ids = t.encode_with_special("hello", true, true).unwrap();
        assert_eq!(ids, vec![t.bos_token_id().unwrap(), id(&t, "hello")]);
    }

    #[test]
    fn decode_rejects_unknown_ids() {
        let t = gpt2();
        let n = t.vocab_size() as u32;
        assert!(matches!(
            t.decode(&[n], false),
            Err(TokenizerError::UnknownTokenId(x)) if x == n
        ));
        assert!(t.token_bytes(n, true).is_empty());
        assert_eq!(t.id_to_piece(n), None);
    }

    #[test]
    fn llama_spm_encode_decode() {
        let t = llama();
        let ids = assert_round_trip(&t, "hello world", &["▁hello", "▁world"]);
        assert_eq!(t.token_bytes(ids[0], false), b" hello");
        assert!(t.strips_leading_space());
        // BOS is added (add_bos_token) and hidden unless rendered.
        let with_bos = t.encode_with_special("hello", true, true).unwrap();
        assert_eq!(with_bos, vec![1, id(&t, "▁hello")]);
        assert_eq!(t.decode(&with_bos, false).unwrap(), "hello");
        assert_eq!(t.decode(&with_bos, true).unwrap(), "<s> hello");
        // Characters outside the vocabulary fall back to byte tokens.
        let bytes = ["▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"];
        assert_round_trip(&t, "😀", &bytes);
        assert_eq!(t.token_bytes(id(&t, "<0x0A>"), false), b"\n");
    }

    #[test]
    fn llama_space_prefix_after_special_tokens() {
        let t = llama();
        // llama.cpp prefixes a space at the start and after every special token.
        let ids = t.encode("<s>hello", true).unwrap();
        assert_eq!(ids, vec![1, id(&t, "▁hello")]);
        let ids = t.encode("hello<tool>world", true).unwrap();
        assert_eq!(
            ids,
            vec![id(&t, "▁hello"), id(&t, "<tool>"), id(&t, "▁world")]
        );
        // Without parse_special, "<s>" is text.
        let ids = t.encode("<s>", false).unwrap();
        assert!(!ids.contains(&1));
        assert_eq!(t.decode(&ids, false).unwrap(), "<s>");
        // No prefix when add_space_prefix is false.
        let mut v = tiny_llama();
        v.add_space_prefix = Some(false);
        let t2 = TextTokenizer::from_gguf_vocab(&v).unwrap();
        assert_eq!(
            t2.encode("hello", true).unwrap(),
            vec![id(&t2, "he"), id(&t2, "llo")]
        );
        assert!(!t2.strips_leading_space());
    }

    /// llama.cpp's `llm_tokenizer_spm_session::tokenize`, transcribed for comparison.
    fn reference_spm(v: &GgufVocab, text: &str) -> Vec<u32> {
        let ids: std::collections::HashMap<&str, u32> = (0u32..)
            .zip(&v.tokens)
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let scores = v.scores.as_ref().unwrap();
        let text = format!(" {text}").replace(' ', "▁");
        // Symbols: (start, len) in bytes; merged ones have len 0.
        let mut syms: Vec<(usize, usize)> = text
            .char_indices()
            .map(|(i, c)| (i, c.len_utf8()))
            .collect();
        let mut next: Vec<Option<usize>> = (0..syms.len())
            .map(|i| (i + 1 < syms.len()).then_some(i + 1))
            .collect();
        let mut prev: Vec<Option<usize>> = (0..syms.len()).map(|i| i.checked_sub(1)).collect();
        loop {
            // Best bigram: highest score, then leftmost.
            let mut best: Option<(f32, usize, usize)> = None;
            let mut i = Some(0).filter(|_| !syms.is_empty());
            while let Some(l) = i {
                if let Some(r) = next[l] {
                    let s = &text[syms[l].0..syms[r].0 + syms[r].1];
                    if let Some(&tid) = ids.get(s) {
                        let score = scores[tid as usize];
                        if best.is_none_or(|(bs, _, _)| score > bs) {
                            best = Some((score, l, r));
                        }
                    }
                }
                i = next[l];
            }
            let Some((_, l, r)) = best else { break };
            syms[l].1 += syms[r].1;
            syms[r].1 = 0;
            next[l] = next[r];
            if let Some(n) = next[r] {
                prev[n] = Some(l);
            }
        }
        let mut out = Vec::new();
        let mut i = Some(0).filter(|_| !syms.is_empty());
        while let Some(k) = i {
            let s = &text[syms[k].0..syms[k].0 + syms[k].1];
            match ids.get(s) {
                Some(&tid) => out.push(tid),
                None => {
                    for b in s.bytes() {
                        out.push(ids[format!("<0x{b:02X}>").as_str()]);
                    }
                }
            }
            i = next[k];
        }
        let _ = prev;
        out
    }

    #[test]
    fn spm_merges_match_llama_cpp_algorithm() {
        let v = tiny_llama();
        let t = TextTokenizer::from_gguf_vocab(&v).unwrap();
        let alphabet: Vec<char> = "abcdehlorw 你😀".chars().collect();
        let mut rng = super::super::detokenizer::tests::XorShift(0x9E37_79B9_7F4A_7C15);
        for _ in 0..2000 {
            let len = rng.below(12);
            let text: String = (0..len)
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            if text.is_empty() {
                continue;
            }
            assert_eq!(
                t.encode(&text, false).unwrap(),
                reference_spm(&v, &text),
                "text {text:?}"
            );
            assert_eq!(
                t.decode(&t.encode(&text, false).unwrap(), false).unwrap(),
                text
            );
        }
    }

    #[test]
    fn tokenizer_json_round_trip() {
        // Serialize the GGUF-built pipelines and load them back as tokenizer.json files.
        for (v, text) in [
            (tiny_gpt2(), "<|im_start|>hello world 你"),
            (tiny_llama(), "<s>hello world 😀"),
        ] {
            let hf = super::super::gguf_tokenizer::tokenizer_from_gguf_vocab(&v).unwrap();
            let dir =
                std::env::temp_dir().join(format!("tok-json-{}-{}", std::process::id(), v.model));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("tokenizer.json");
            hf.save(&path, false).unwrap();
            let from_json = TextTokenizer::from_tokenizer_json(&path).unwrap();
            let from_gguf = TextTokenizer::from_gguf_vocab(&v).unwrap();
            for parse in [true, false] {
                let a = from_json.encode_with_special(text, parse, true).unwrap();
                let b = from_gguf.encode_with_special(text, parse, true).unwrap();
                assert_eq!(a, b);
                for render in [true, false] {
                    assert_eq!(
                        from_json.decode(&a, render).unwrap(),
                        from_gguf.decode(&b, render).unwrap()
                    );
                }
            }
            assert_eq!(from_json.piece_encoding(), from_gguf.piece_encoding());
            assert_eq!(
                from_json.strips_leading_space(),
                from_gguf.strips_leading_space()
            );
            assert_eq!(
                from_json.bos_token_id(),
                if v.model == "llama" { Some(1) } else { None }
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
        assert!(matches!(
            TextTokenizer::from_tokenizer_json(Path::new("/nonexistent/tokenizer.json")),
            Err(TokenizerError::Load { .. })
        ));
    }

    #[test]
    fn piece_encoding_from_decoder_json() {
        use tokenizers::DecoderWrapper;
        use tokenizers::decoders::byte_fallback::ByteFallback;
        use tokenizers::decoders::sequence::Sequence;
        use tokenizers::decoders::wordpiece::WordPiece;
        use tokenizers::normalizers::Replace;
        use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
        let detect = |d: DecoderWrapper| encoding_from_decoder(&serde_json::to_value(d).unwrap());
        assert_eq!(
            detect(Metaspace::new('▁', PrependScheme::Always, true).into()),
            (PieceEncoding::SentencePiece, true)
        );
        assert_eq!(
            detect(Metaspace::new('▁', PrependScheme::Never, true).into()),
            (PieceEncoding::SentencePiece, false)
        );
        // Gemma style: no leading-space strip.
        let gemma = Sequence::new(vec![
            Replace::new("▁", " ").unwrap().into(),
            ByteFallback::new().into(),
        ]);
        assert_eq!(detect(gemma.into()), (PieceEncoding::SentencePiece, false));
        assert_eq!(
            detect(WordPiece::new("##".into(), true).into()),
            (PieceEncoding::Raw, false)
        );
        assert_eq!(
            encoding_from_decoder(&serde_json::Value::Null),
            (PieceEncoding::Raw, false)
        );
        assert_eq!(
            sentencepiece_or("<0x0A>", PieceEncoding::SentencePiece),
            b"\n"
        );
        assert_eq!(sentencepiece_or("<0x0A>", PieceEncoding::Raw), b"<0x0A>");
        assert_eq!(piece_bytes("a b", PieceEncoding::ByteLevel), b"a b");
        assert_eq!(piece_bytes("ĠaĊ", PieceEncoding::ByteLevel), b" a\n");
    }

    /// A Hugging Face BPE tokenizer over `vocab` without merges: each piece is one token.
    pub(crate) fn bpe_without_merges(vocab: &[(&str, u32)]) -> Tokenizer {
        use tokenizers::models::bpe::{BPE, Vocab};
        let vocab: Vocab = vocab.iter().map(|&(p, id)| (p.to_owned(), id)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        Tokenizer::new(bpe)
    }

    #[test]
    fn sparse_ids_are_rejected() {
        let sparse = bpe_without_merges(&[("a", 0), ("b", 4_000_000_000)]);
        assert!(matches!(
            TextTokenizer::from_tokenizers(sparse),
            Err(TokenizerError::SparseIds { .. })
        ));
    }

    #[test]
    fn with_special_token_ids_overrides() {
        let t = gpt2().with_special_token_ids(Some(0), None);
        assert_eq!(t.bos_token_id(), Some(0));
        assert_eq!(t.eos_token_id(), None);
    }
}
