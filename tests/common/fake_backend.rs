//! The scripted fake model every HTTP-level test runs against: a byte-level tokenizer without
//! merges (token `b` is byte `b`, so a prompt of n ASCII bytes is n tokens; 256 is
//! `<|im_start|>`, 257 `<|endoftext|>`, 258 `<|im_end|>`) and a backend that forces a known
//! token sequence, one token per step, optionally sleeping per step so that jobs are observably
//! queued and running, and optionally failing one step. It records every prompt it is given.

#![allow(dead_code)]

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_worker_rbee::engine::{BackendError, BatchItem, InferenceBackend, ModelMeta, SeqId};
use llm_worker_rbee::model::tokenizer::TextTokenizer;
use serde_json::json;

use super::tiny_models::byte_level_tokenizer_json;

/// The fake model's name.
pub const MODEL: &str = "tiny-test";
/// What the fake model writes unless a test gives it another script. "ö" is two tokens.
pub const SCRIPT: &str = "Hello, wörld! ";
/// A script of one token per character.
pub const ASCII_SCRIPT: &str = "Hello, world! ";

pub const IM_START: u32 = 256;
pub const EOS: u32 = 257;
pub const IM_END: u32 = 258;
pub const VOCAB: usize = 259;

/// The fake model's tokenizer.
pub fn tiny_tokenizer() -> Arc<TextTokenizer> {
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let spec = byte_level_tokenizer_json(vec![
        special(IM_START, "<|im_start|>"),
        special(EOS, "<|endoftext|>"),
        special(IM_END, "<|im_end|>"),
    ]);
    let hf = tokenizers::Tokenizer::from_str(&spec.to_string()).expect("tiny tokenizer.json");
    Arc::new(TextTokenizer::from_tokenizers(hf).expect("tiny tokenizer"))
}

/// The tokens of `text`, one per byte.
pub fn script_tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// How the fake model's faulty step goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `forward` returns an error.
    Error,
    /// `forward` panics.
    Panic,
}

/// One faulty forward: the `step`th call (counting from 0, over all sequences) goes wrong, the
/// ones before and after it do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub step: usize,
    pub kind: FaultKind,
}

impl Fault {
    /// What the error fault's `forward` returns.
    pub fn message(&self) -> String {
        format!("scripted failure at step {}", self.step)
    }
}

/// Forces, for every sequence, the tokens of `script` in order (cycling), one per step: the
/// scripted token gets logit 10, every other token 0.
pub struct ScriptedBackend {
    meta: ModelMeta,
    script: Vec<u32>,
    step_delay: Duration,
    steps_seen: HashMap<SeqId, usize>,
    /// Forward calls so far.
    steps: usize,
    pub fault: Option<Fault>,
    /// Every sequence's prompt (its first forward's tokens), in order of arrival.
    pub prompts: Arc<Mutex<Vec<Vec<u32>>>>,
    /// The KV bytes it claims per position (0: none, so no memory budget applies).
    pub kv_bytes_per_position: usize,
}

impl ScriptedBackend {
    /// The fake model with `context` positions, writing `script`.
    pub fn new(context: usize, script: Vec<u32>, step_delay: Duration) -> Self {
        Self {
            meta: ModelMeta {
                name: MODEL.into(),
                architecture: "llama".into(),
                format: "gguf".into(),
                device: "cpu:0".into(),
                context_length: context,
                vocab_size: VOCAB,
                tokenizer: tiny_tokenizer(),
                eog_tokens: vec![EOS, IM_END].into(),
                chat_template: None,
                compute: None,
            },
            script,
            step_delay,
            steps_seen: HashMap::new(),
            steps: 0,
            fault: None,
            prompts: Arc::new(Mutex::new(Vec::new())),
            kv_bytes_per_position: 0,
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
        let step = self.steps;
        self.steps += 1;
        if let Some(fault) = self.fault.filter(|f| f.step == step) {
            match fault.kind {
                FaultKind::Error => return Err(BackendError(fault.message())),
                FaultKind::Panic => panic!("scripted panic at step {step}"),
            }
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

    fn kv_bytes_per_position(&self) -> usize {
        self.kv_bytes_per_position
    }
}
