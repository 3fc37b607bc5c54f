//! A scripted fake model for HTTP-level tests (the same shape as `tests/http_jobs.rs`'s): a
//! byte-level tokenizer (token `b` is byte `b`, so a prompt of n ASCII bytes is n tokens) and
//! a backend that forces the bytes of a script in order, one token per step, optionally
//! sleeping per step so that jobs are observably running and queued.

#![allow(dead_code)]

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use llm_worker_rbee::engine::{BackendError, BatchItem, InferenceBackend, ModelMeta, SeqId};
use llm_worker_rbee::model::tokenizer::TextTokenizer;
use serde_json::{Value, json};

pub const MODEL: &str = "tiny-test";
pub const CONTEXT: usize = 512;
pub const EOS: u32 = 257;
pub const SCRIPT: &str = "Hello, world! ";

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

fn tiny_tokenizer() -> Arc<TextTokenizer> {
    let vocab: serde_json::Map<String, Value> = (0..=255u8)
        .map(|b| (byte_level_char(b).to_string(), Value::from(b)))
        .collect();
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": EOS, "content": "<|endoftext|>", "single_word": false,
                          "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
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

pub struct ScriptedBackend {
    meta: ModelMeta,
    script: Vec<u32>,
    step_delay: Duration,
    steps_seen: HashMap<SeqId, usize>,
}

impl ScriptedBackend {
    pub fn new(step_delay: Duration) -> Self {
        Self {
            meta: ModelMeta {
                name: MODEL.into(),
                architecture: "llama".into(),
                format: "gguf".into(),
                device: "cpu:0".into(),
                context_length: CONTEXT,
                vocab_size: 258,
                tokenizer: tiny_tokenizer(),
                eog_tokens: vec![EOS].into(),
                chat_template: None,
            },
            script: SCRIPT.bytes().map(u32::from).collect(),
            step_delay,
            steps_seen: HashMap::new(),
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

/// A greedy rbee job body.
pub fn infer(prompt: &str, max_tokens: usize) -> Value {
    json!({"operation": "infer", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// Serves `router` on an ephemeral loopback port; returns its base URL.
pub async fn serve_on(listener: tokio::net::TcpListener, router: axum::Router) -> String {
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    base
}
