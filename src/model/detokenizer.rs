//! Streaming detokenization: generated token ids in, UTF-8 text deltas out.
//!
//! A token is a byte string (see [`TextTokenizer::token_bytes`]); a character may span several
//! tokens (byte-fallback tokens `<0xF0>` `<0x9F>` …, or byte-level pieces that cut a multi-byte
//! character). The detokenizer accumulates bytes and emits the longest prefix that is complete
//! UTF-8, holding back only an incomplete trailing character. Invalid sequences are replaced by
//! U+FFFD exactly as [`String::from_utf8_lossy`] replaces them (one per maximal invalid
//! subpart), as soon as they are known to be invalid, so the stream never stalls.
//!
//! Invariant: the concatenation of all [`push`](StreamingDetokenizer::push) results and
//! [`finish`](StreamingDetokenizer::finish) equals `String::from_utf8_lossy` of the
//! concatenated token bytes, i.e. [`TextTokenizer::decode`]`(ids, false)` — with one deliberate
//! exception: for SentencePiece vocabularies with a space prefix, `decode` drops one leading
//! space of the first token (the prefix the encoder added to a whole text). Generated tokens
//! continue a prompt, so a leading space there is real text; the detokenizer keeps it, as
//! llama-server does for generated content. Special (control) tokens contribute nothing.
//!
//! Reference: llama.cpp `common_token_to_piece` / llama-server's incomplete-UTF-8 hold-back
//! (`validate_utf8`); HF tokenizers' `DecodeStream` solves the same problem by re-decoding.

use std::sync::Arc;

use super::tokenizer::TextTokenizer;

/// Turns a stream of token ids into text deltas. One per generated sequence.
#[derive(Debug, Clone)]
pub struct StreamingDetokenizer {
    tokenizer: Arc<TextTokenizer>,
    /// Bytes not yet emitted: at most an incomplete UTF-8 character (≤ 3 bytes) between calls.
    pending: Vec<u8>,
}

impl StreamingDetokenizer {
    pub fn new(tokenizer: Arc<TextTokenizer>) -> Self {
        Self {
            tokenizer,
            pending: Vec::with_capacity(8),
        }
    }

    /// Add one token; returns the text that became complete (possibly empty). Unknown ids and
    /// special tokens add no text.
    pub fn push(&mut self, id: u32) -> String {
        let bytes = self.tokenizer.token_bytes(id, false);
        if bytes.is_empty() {
            return String::new();
        }
        self.pending.extend_from_slice(bytes);
        self.drain_complete()
    }

    /// End of stream: returns whatever is left, an incomplete character becoming U+FFFD.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Emit all complete text from `pending`, keeping only a trailing incomplete sequence.
    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(s) => {
                    out.push_str(s);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid_end = start + e.valid_up_to();
                    // The prefix up to `valid_up_to` was just validated.
                    if let Ok(s) = std::str::from_utf8(&self.pending[start..valid_end]) {
                        out.push_str(s);
                    }
                    match e.error_len() {
                        // Invalid whatever follows: replace, as from_utf8_lossy would.
                        Some(len) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid_end + len;
                        }
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::tokenizer::tests::{gpt2, llama};
    use super::*;

    /// Small deterministic PRNG for property tests (no extra dependency).
    pub(crate) struct XorShift(pub u64);

    impl XorShift {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn stream(t: &Arc<TextTokenizer>, ids: &[u32]) -> (Vec<String>, String) {
        let mut d = StreamingDetokenizer::new(t.clone());
        let deltas = ids.iter().map(|&id| d.push(id)).collect();
        let tail = d.finish();
        assert_eq!(d.pending_bytes(), 0);
        (deltas, tail)
    }

    #[test]
    fn emoji_split_across_byte_fallback_tokens() {
        let t = Arc::new(llama());
        let ids: Vec<u32> = ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "▁hello"]
            .iter()
            .map(|p| t.token_to_id(p).unwrap())
            .collect();
        let mut d = StreamingDetokenizer::new(t.clone());
        assert_eq!(d.push(ids[0]), "");
        assert_eq!(d.pending_bytes(), 1);
        assert_eq!(d.push(ids[1]), "");
        assert_eq!(d.push(ids[2]), "");
        assert_eq!(d.pending_bytes(), 3);
        assert_eq!(d.push(ids[3]), "😀");
        assert_eq!(d.pending_bytes(), 0);
        // A continuation keeps its leading space.
        assert_eq!(d.push(ids[4]), " hello");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn cjk_split_across_byte_level_pieces() {
        let t = Arc::new(gpt2());
        // "你" = E4 BD A0 → byte-level "ä" + "½ł" (two tokens in the tiny vocabulary).
        let ids = t.encode("你好", true).unwrap();
        assert_eq!(t.id_to_piece(ids[0]), Some("ä"));
        assert_eq!(t.id_to_piece(ids[1]), Some("½ł"));
        let (deltas, tail) = stream(&t, &ids);
        assert_eq!(deltas[0], "");
        assert_eq!(deltas[1], "你");
        assert_eq!(deltas.concat() + &tail, "你好");
        assert_eq!(deltas.last().map(String::as_str), Some("好"));
    }

    #[test]
    fn special_tokens_are_silent() {
        let t = Arc::new(gpt2());
        let ids = t.encode("<|im_start|>hello<|im_end|>", true).unwrap();
        let (deltas, tail) = stream(&t, &ids);
        assert_eq!(deltas, vec!["", "hello", ""]);
        assert_eq!(tail, "");
    }

    #[test]
    fn invalid_sequences_do_not_stall() {
        let t = Arc::new(llama());
        let b = |x: u8| t.token_to_id(&format!("<0x{x:02X}>")).unwrap();
        let mut d = StreamingDetokenizer::new(t.clone());
        // A lone continuation byte is invalid at once.
        assert_eq!(d.push(b(0x80)), "\u{FFFD}");
        // 0xFF can never start a character.
        assert_eq!(d.push(b(0xFF)), "\u{FFFD}");
        // A lead byte followed by ASCII: replaced when the ASCII arrives.
        assert_eq!(d.push(b(0xE4)), "");
        assert_eq!(d.push(b(b'a')), "\u{FFFD}a");
        // Two bytes of a three-byte character, then a new lead byte: one U+FFFD for the
        // truncated character, the new one stays pending.
        assert_eq!(d.push(b(0xE4)), "");
        assert_eq!(d.push(b(0xBD)), "");
        assert_eq!(d.push(b(0xF0)), "\u{FFFD}");
        assert_eq!(d.pending_bytes(), 1);
        // Truncated at the end of the stream.
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.pending_bytes(), 0);
        // Surrogate encodings are invalid (ED A0 80).
        assert_eq!(d.push(b(0xED)), "");
        assert_eq!(d.push(b(0xA0)), "\u{FFFD}\u{FFFD}");
        assert_eq!(d.push(b(0x80)), "\u{FFFD}");
        assert_eq!(d.finish(), "");
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let t = Arc::new(gpt2());
        let mut d = StreamingDetokenizer::new(t.clone());
        assert_eq!(d.push(u32::MAX), "");
        assert_eq!(d.pending_bytes(), 0);
    }

    /// Deltas + finish == decode(ids, false), over random ids (bytes, pieces, specials).
    #[test]
    fn deltas_concatenate_to_decode() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        for t in [gpt2(), llama()] {
            let t = Arc::new(t);
            let n = t.vocab_size();
            for round in 0..3000 {
                let len = rng.below(24);
                let ids: Vec<u32> = (0..len).map(|_| rng.below(n) as u32).collect();
                let (deltas, tail) = stream(&t, &ids);
                let streamed = deltas.concat() + &tail;
                let mut expected = t.decode(&ids, false).unwrap();
                let first_visible = ids.iter().find(|&&id| !t.token_bytes(id, false).is_empty());
                if t.strips_leading_space()
                    && first_visible.is_some_and(|&id| t.token_bytes(id, false)[0] == b' ')
                {
                    expected.insert(0, ' ');
                }
                assert_eq!(streamed, expected, "round {round}, ids {ids:?}");
                // Every delta is emitted as soon as it is complete: the held-back part is
                // never a complete character.
                let mut d = StreamingDetokenizer::new(t.clone());
                for &id in &ids {
                    d.push(id);
                    assert!(d.pending_bytes() <= 3);
                }
            }
        }
    }
}
