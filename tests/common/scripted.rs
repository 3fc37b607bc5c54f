//! A scripted fake model for the HTTP tests: a byte-level tokenizer without merges (token `b`
//! is byte `b`, 256 is `<|im_start|>`, 257 `<|endoftext|>`, 258 `<|im_end|>`) and a backend
//! that forces a known token sequence, one token per step, optionally sleeping per step so
//! that jobs are observably queued and running. It records every prompt it is given.

#![allow(dead_code)]

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_worker_rbee::engine::{BackendError, BatchItem, InferenceBackend, ModelMeta, SeqId};
use llm_worker_rbee::model::tokenizer::TextTokenizer;
use serde_json::{Value, json};

pub const IM_START: u32 = 256;
pub const EOS: u32 = 257;
pub const IM_END: u32 = 258;
pub const VOCAB: usize = 259;

/// GPT-2's byte-to-character map: the piece of byte-level token `b`.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return char::from(b);
    }
    let offset = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + offset).unwrap_or('?')
}

pub fn tiny_tokenizer() -> Arc<TextTokenizer> {
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_level_char(b).to_string(), Value::from(b)))
        .collect();
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(IM_START, "<|im_start|>"), special(EOS, "<|endoftext|>"),
                         special(IM_END, "<|im_end|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    let hf = tokenizers::Tokenizer::from_str(&spec.to_string()).expect("tiny tokenizer.json");
    Arc::new(TextTokenizer::from_tokenizers(hf).expect("tiny tokenizer"))
}

/// The tokens of `text`, one per byte.
pub fn script_tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Forces, for every sequence, the tokens of `script` in order (cycling), one per step: the
/// scripted token gets logit 10, every other token 0.
pub struct ScriptedBackend {
    meta: ModelMeta,
    script: Vec<u32>,
    step_delay: Duration,
    steps_seen: HashMap<SeqId, usize>,
    /// Every sequence's prompt (its first forward's tokens), in order of arrival.
    pub prompts: Arc<Mutex<Vec<Vec<u32>>>>,
}

impl ScriptedBackend {
    pub fn new(name: &str, context: usize, script: Vec<u32>, step_delay: Duration) -> Self {
        Self {
            meta: ModelMeta {
                name: name.into(),
                architecture: "llama".into(),
                format: "gguf".into(),
                device: "cpu:0".into(),
                context_length: context,
                vocab_size: VOCAB,
                tokenizer: tiny_tokenizer(),
                eog_tokens: vec![EOS, IM_END].into(),
                chat_template: None,
            },
            script,
            step_delay,
            steps_seen: HashMap::new(),
            prompts: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl InferenceBackend for ScriptedBackend {
    fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    fn forward(&mut self, batch: &[BatchItem<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        if !self.step_delay.is_zero() {
            std::thread::sleep(self.step_delay);
        }
        Ok(batch
            .iter()
            .map(|item| {
                let k = self.steps_seen.entry(item.seq).or_insert(0);
                if *k == 0 {
                    self.prompts
                        .lock()
                        .expect("prompts lock")
                        .push(item.tokens.to_vec());
                }
                let token = self.script[*k % self.script.len()];
                *k += 1;
                let mut logits = vec![0.0; self.meta.vocab_size];
                logits[token as usize] = 10.0;
                logits
            })
            .collect())
    }

    fn release(&mut self, seq: SeqId) {
        self.steps_seen.remove(&seq);
    }
}
