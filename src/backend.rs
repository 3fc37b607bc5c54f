//! [`CandleInferenceBackend`]: a loaded model (GGUF or safetensors) on a Candle device, with one
//! KV cache per live sequence.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;

use crate::engine::{BackendError, BatchItem, DraftRequest, InferenceBackend, ModelMeta, SeqId};
use crate::generation::sampler::argmax;
use crate::model::decoder::{AttentionPath, Decoder, ForwardItem, SequenceCache};
use crate::model::{LoadOptions, ModelError, load_model};

pub struct CandleInferenceBackend {
    decoder: Decoder,
    caches: HashMap<SeqId, SequenceCache>,
    meta: ModelMeta,
    load_time: Duration,
    /// A smaller model of the same vocabulary that drafts tokens for speculative decoding.
    draft: Option<Box<DraftModel>>,
}

/// The draft model: its own caches, under the same sequence ids, and the tokens each holds.
struct DraftModel {
    model: CandleInferenceBackend,
    held: HashMap<SeqId, Vec<u32>>,
}

impl DraftModel {
    /// Brings each sequence's draft cache up to its tokens (keeping what still matches, reading
    /// the rest), then extends it greedily, one batched forward per drafted position.
    fn propose(&mut self, requests: &[DraftRequest<'_>]) -> Result<Vec<Vec<u32>>, BackendError> {
        let mut drafts = vec![Vec::new(); requests.len()];
        // What each sequence feeds next: the tokens its cache lacks, then its last draft.
        let mut feeds: Vec<Vec<u32>> = Vec::with_capacity(requests.len());
        for r in requests {
            let held = self.held.entry(r.seq).or_default();
            let shared = held
                .iter()
                .zip(r.tokens)
                .take_while(|(a, b)| a == b)
                .count()
                // The last token is fed again if need be: its logits give the first draft.
                .min(r.tokens.len().saturating_sub(1));
            held.truncate(shared);
            self.model.truncate(r.seq, shared);
            feeds.push(if r.max > 0 {
                r.tokens[shared..].to_vec()
            } else {
                Vec::new()
            });
        }
        loop {
            let live: Vec<usize> = (0..requests.len())
                .filter(|&i| !feeds[i].is_empty() && drafts[i].len() < requests[i].max)
                .collect();
            if live.is_empty() {
                return Ok(drafts);
            }
            let batch: Vec<BatchItem<'_>> = live
                .iter()
                .map(|&i| BatchItem {
                    seq: requests[i].seq,
                    tokens: &feeds[i],
                    logit_rows: 1,
                })
                .collect();
            let logits = self.model.forward(&batch)?;
            drop(batch);
            for (&i, row) in live.iter().zip(logits) {
                let token = argmax(&row);
                drafts[i].push(token);
                let fed = std::mem::replace(&mut feeds[i], vec![token]);
                self.held.entry(requests[i].seq).or_default().extend(fed);
            }
        }
    }

    fn release(&mut self, seq: SeqId) {
        self.held.remove(&seq);
        self.model.release(seq);
    }
}

/// The name this build gives a device, as reported to the hive.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu:0".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

impl CandleInferenceBackend {
    /// Loads a GGUF file or a Hugging Face safetensors directory.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Self, ModelError> {
        let model = load_model(path, options)?;
        let cfg = model.decoder.config();
        let meta = ModelMeta {
            name: model.name.clone(),
            architecture: cfg.architecture.name().to_string(),
            format: model.format.name().to_string(),
            device: device_name(&options.device),
            context_length: model.decoder.context_length(),
            vocab_size: cfg.vocab_size,
            tokenizer: model.tokenizer.clone(),
            eog_tokens: model.eog_tokens.clone().into(),
            chat_template: model.chat_template.map(Arc::new),
            compute: Some(Arc::new(model.decoder.compute_path().clone())),
        };
        Ok(Self {
            decoder: model.decoder,
            caches: HashMap::new(),
            meta,
            load_time: model.load_time,
            draft: None,
        })
    }

    /// Drafts with `draft` (speculative decoding). Its vocabulary must be this model's, token
    /// for token: a draft is a list of token ids.
    pub fn set_draft_model(&mut self, draft: CandleInferenceBackend) -> Result<(), String> {
        let (ours, theirs) = (&self.meta.tokenizer, &draft.meta.tokenizer);
        if ours.vocab_size() != theirs.vocab_size() {
            return Err(format!(
                "the draft model's vocabulary has {} tokens, the model's {}",
                theirs.vocab_size(),
                ours.vocab_size()
            ));
        }
        if let Some(id) = (0..ours.vocab_size() as u32).find(|&id| {
            ours.id_to_piece(id).unwrap_or_default() != theirs.id_to_piece(id).unwrap_or_default()
        }) {
            return Err(format!(
                "the draft model's token {id} is {:?}, the model's {:?}: not the same vocabulary",
                theirs.id_to_piece(id).unwrap_or_default(),
                ours.id_to_piece(id).unwrap_or_default()
            ));
        }
        if draft.meta.context_length < self.meta.context_length {
            return Err(format!(
                "the draft model's context ({}) is shorter than the model's ({})",
                draft.meta.context_length, self.meta.context_length
            ));
        }
        self.draft = Some(Box::new(DraftModel {
            model: draft,
            held: HashMap::new(),
        }));
        Ok(())
    }

    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Live sequences.
    pub fn sequences(&self) -> usize {
        self.caches.len()
    }
}

impl InferenceBackend for CandleInferenceBackend {
    fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    fn forward(&mut self, batch: &[BatchItem<'_>]) -> Result<Vec<Vec<f32>>, BackendError> {
        // Take the caches out of the map so the decoder can hold all of them mutably at once.
        let mut caches: Vec<SequenceCache> = batch
            .iter()
            .map(|b| {
                self.caches
                    .remove(&b.seq)
                    .unwrap_or_else(|| self.decoder.new_cache())
            })
            .collect();
        let result = {
            let mut items: Vec<ForwardItem<'_>> = caches
                .iter_mut()
                .zip(batch)
                .map(|(cache, b)| ForwardItem {
                    cache,
                    tokens: b.tokens,
                })
                .collect();
            let logit_rows: Vec<usize> = batch.iter().map(|b| b.logit_rows).collect();
            self.decoder.forward_with_logits(&mut items, &logit_rows)
        };
        for (cache, b) in caches.into_iter().zip(batch) {
            self.caches.insert(b.seq, cache);
        }
        result.map_err(|e| BackendError(e.to_string()))
    }

    fn release(&mut self, seq: SeqId) {
        self.caches.remove(&seq);
        if let Some(d) = &mut self.draft {
            d.release(seq);
        }
    }

    fn verifies_drafts(&self) -> bool {
        true
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(cache) = self.caches.get_mut(&seq) {
            cache.truncate(len);
        }
    }

    fn copy_prefix(&mut self, from: SeqId, to: SeqId, len: usize) -> Result<bool, BackendError> {
        let Some(source) = self.caches.get(&from).filter(|c| c.len() >= len) else {
            return Ok(false);
        };
        let copy = self
            .decoder
            .copy_cache_prefix(source, len)
            .map_err(|e| BackendError(format!("copying a cached prefix: {e}")))?;
        self.caches.insert(to, copy);
        Ok(true)
    }

    fn keep_prefix(&mut self, seq: SeqId, len: usize) -> Option<usize> {
        // A kept prefix is only copied from: it drafts nothing.
        if let Some(d) = &mut self.draft {
            d.release(seq);
        }
        let mut cache = self.caches.remove(&seq)?;
        if cache.len() < len || self.decoder.shrink_cache(&mut cache, len).is_err() {
            return None;
        }
        let bytes = cache.allocated_bytes();
        self.caches.insert(seq, cache);
        Some(bytes)
    }

    fn kv_cache_bytes(&self) -> usize {
        match self.decoder.attention_path() {
            // Blocks shared between caches (a reused prefix, `n` > 1) count once.
            AttentionPath::Host => self.decoder.kv_bytes_alive(),
            AttentionPath::Device => self
                .caches
                .values()
                .map(SequenceCache::allocated_bytes)
                .sum(),
        }
    }

    fn kv_bytes_per_position(&self) -> usize {
        self.decoder.kv_bytes_per_position()
    }

    fn has_draft_model(&self) -> bool {
        self.draft.is_some()
    }

    fn propose(&mut self, requests: &[DraftRequest<'_>]) -> Result<Vec<Vec<u32>>, BackendError> {
        match &mut self.draft {
            Some(d) => d.propose(requests),
            None => Ok(vec![Vec::new(); requests.len()]),
        }
    }

    fn limit_positions(&mut self, seq: SeqId, positions: usize) {
        let decoder = &self.decoder;
        self.caches
            .entry(seq)
            .or_insert_with(|| decoder.new_cache())
            .set_limit(positions);
    }
}
