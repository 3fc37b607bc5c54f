//! The step loop's state: which sequences hold a slot, how far each prompt has been read, and
//! one batched forward per [`Scheduler::step`].
//!
//! Each step drops cancelled sequences, gives every decoding sequence its one token, fills the
//! rest of the token budget with prompt chunks (oldest first, so a long prompt is read over
//! several steps while running streams keep flowing), runs one forward over all of them, and
//! samples for every sequence whose logits are a real next-token distribution.
//!
//! It is synchronous and owns the backend: the engine thread drives it, and tests drive it
//! directly.

use std::sync::Arc;
use std::time::SystemTime;

use super::backend::{BatchItem, DraftRequest, InferenceBackend, SeqId};
use super::job::{EngineEvent, ErrorCode, FinishSummary, GenerationJob};
use crate::generation::{Constraint, ContextFitError, SequenceGenerator, fit_max_tokens};
use crate::model::attention::TILED_MIN_ROWS;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences served at once (slots).
    pub max_sequences: usize,
    /// Tokens per forward: every decoding sequence's one token plus prompt chunks.
    pub batch_tokens: usize,
    /// Bytes of KV that finished sequences may keep for reuse (0: no prefix cache).
    pub prefix_cache_bytes: usize,
    /// Tokens a decoding sequence may have drafted (from its own context by prompt lookup, or
    /// by the backend's draft model) and verified in one forward; 0: no speculation.
    pub draft_tokens: usize,
    /// Bytes of KV the running sequences' reservations and the prefix cache may hold together
    /// (0: no budget but the slots). A job starts only when its reservation fits, so running
    /// sequences never run out of memory for a newcomer.
    pub kv_budget_bytes: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_sequences: 4,
            batch_tokens: 512,
            prefix_cache_bytes: 0,
            draft_tokens: 0,
            kv_budget_bytes: 0,
        }
    }
}

/// Speculation pays off only while the batch is small: beyond this many decoding sequences the
/// forward is already a matrix product over many rows.
const MAX_SPECULATING: usize = 4;
/// The n-grams prompt lookup matches, longest first.
const LOOKUP_NGRAM: std::ops::RangeInclusive<usize> = 3..=5;
/// Plain steps after a draft whose first token failed.
const DRAFT_PAUSE_STEPS: usize = 8;

/// Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
/// n-gram (the longest that occurs), at most `max`. Copy-heavy text (edits, summaries, code)
/// repeats its own context; elsewhere nothing is proposed.
pub fn lookup_draft(tokens: &[u32], max: usize) -> Vec<u32> {
    if max == 0 {
        return Vec::new();
    }
    for n in LOOKUP_NGRAM.rev() {
        if tokens.len() <= n {
            continue;
        }
        let suffix = &tokens[tokens.len() - n..];
        for start in (0..tokens.len() - n).rev() {
            if &tokens[start..start + n] == suffix {
                let from = start + n;
                return tokens[from..(from + max).min(tokens.len())].to_vec();
            }
        }
    }
    Vec::new()
}

/// The shortest shared prefix worth a copy instead of a prefill.
const MIN_REUSE_TOKENS: usize = 16;

/// A finished sequence's KV cache kept for reuse: the tokens whose keys and values it holds.
struct Parked {
    seq: SeqId,
    tokens: Vec<u32>,
    salt: String,
    bytes: usize,
    used: u64,
}

/// What the prefix cache did, for the engine's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Prompt tokens looked up.
    pub queries: u64,
    /// Tokens served from the cache.
    pub hits: u64,
    /// Bytes kept now.
    pub bytes: usize,
}

struct Running {
    seq: SeqId,
    job: GenerationJob,
    generator: SequenceGenerator,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// Of those, the ones copied from the prefix cache.
    cached: usize,
    /// Holds its slot without computing until another sequence with the same prompt has read
    /// it, then starts from a copy (the choices of one request: the prompt is read once).
    waiting: bool,
    /// This step's speculative tokens, fed after the last sampled one.
    draft: Vec<u32>,
    /// How many tokens the next draft may have: doubled while drafts hold, cut to what held
    /// when one fails.
    draft_cap: usize,
    /// Steps to decode plainly after drafts kept failing (a context with nothing to copy).
    draft_pause: usize,
    /// Bytes of KV held for it under the budget: what its prompt, `max_tokens` and a draft can
    /// fill, whether or not it gets that far.
    reserved: usize,
}

impl Running {
    fn prompt_done(&self) -> bool {
        self.prefilled >= self.job.prompt_tokens.len()
    }

    /// The tokens whose keys and values the cache holds: the prompt read so far, then every
    /// generated token but the last (sampled, never fed).
    fn held(&self) -> &[u32] {
        if self.prompt_done() {
            let t = self.generator.tokens();
            &t[..t.len().saturating_sub(1)]
        } else {
            &self.job.prompt_tokens[..self.prefilled]
        }
    }
}

fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub struct Scheduler<B: InferenceBackend> {
    backend: B,
    config: SchedulerConfig,
    running: Vec<Running>,
    next_seq: u64,
    /// The prefix cache: finished sequences' caches, least recently used first to go.
    parked: Vec<Parked>,
    clock: u64,
    prefix_stats: PrefixCacheStats,
    spec_stats: SpeculationStats,
}

/// What speculation did: tokens drafted and, of those, accepted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpeculationStats {
    pub drafted: u64,
    pub accepted: u64,
}

impl<B: InferenceBackend> Scheduler<B> {
    pub fn new(backend: B, config: SchedulerConfig) -> Self {
        let per_position = backend.kv_bytes_per_position();
        let context = backend.meta().context_length;
        // More than every slot filling its context is never needed (and would only make the
        // usage figures look small); without a size per position there is nothing to budget.
        let kv_budget_bytes = if per_position == 0 {
            0
        } else {
            config.kv_budget_bytes.min(
                config
                    .max_sequences
                    .max(1)
                    .saturating_mul(context)
                    .saturating_mul(per_position),
            )
        };
        if kv_budget_bytes > 0 && kv_budget_bytes < context.saturating_mul(per_position) {
            tracing::warn!(
                kv_budget_mib = kv_budget_bytes >> 20,
                full_context_mib = context.saturating_mul(per_position) >> 20,
                "the KV memory budget is less than one sequence filling the context: a request \
                 that may need more runs only when nothing else does"
            );
        }
        let config = SchedulerConfig {
            max_sequences: config.max_sequences.max(1),
            batch_tokens: config.batch_tokens.max(1),
            kv_budget_bytes,
            ..config
        };
        Self {
            backend,
            config,
            running: Vec::new(),
            next_seq: 0,
            parked: Vec::new(),
            clock: 0,
            prefix_stats: PrefixCacheStats::default(),
            spec_stats: SpeculationStats::default(),
        }
    }

    /// Changes how many tokens a draft may have (0: off).
    pub fn set_draft_tokens(&mut self, n: usize) {
        self.config.draft_tokens = n;
    }

    /// Tokens drafted and accepted, so far.
    pub fn speculation_stats(&self) -> SpeculationStats {
        self.spec_stats
    }

    /// What the prefix cache has done so far, and holds now.
    pub fn prefix_cache_stats(&self) -> PrefixCacheStats {
        self.prefix_stats
    }

    /// Positions a job may fill: its prompt, its `max_tokens` and a draft, within the context.
    fn reserved_positions(&self, job: &GenerationJob) -> usize {
        job.prompt_tokens
            .len()
            .saturating_add(job.params.max_tokens)
            .saturating_add(self.config.draft_tokens)
            .min(self.backend.meta().context_length)
    }

    /// Positions the running sequences may hold at most: every slot filling its context, or
    /// what the KV budget holds if that is less.
    pub fn capacity_positions(&self) -> usize {
        let slots = self
            .config
            .max_sequences
            .saturating_mul(self.backend.meta().context_length);
        match self.backend.kv_bytes_per_position() {
            per if per > 0 && self.config.kv_budget_bytes > 0 => {
                slots.min(self.config.kv_budget_bytes / per)
            }
            _ => slots,
        }
    }

    /// Bytes of KV a reservation of `positions` holds under the budget (0 without one).
    fn reservation_bytes(&self, positions: usize) -> usize {
        if self.config.kv_budget_bytes == 0 {
            return 0;
        }
        positions * self.backend.kv_bytes_per_position()
    }

    /// Bytes of KV reserved by the running sequences.
    pub fn reserved_bytes(&self) -> usize {
        self.running.iter().map(|r| r.reserved).sum()
    }

    /// Whether `job` may start now: a free slot, and room in the KV budget for its reservation,
    /// made by dropping kept prefixes (least recently used first) if need be. A job that does
    /// not fit waits; one that would not fit even alone still runs when nothing else does.
    pub fn make_room_for(&mut self, job: &GenerationJob) -> bool {
        if !self.has_free_slot() {
            return false;
        }
        let budget = self.config.kv_budget_bytes;
        if budget == 0 {
            return true;
        }
        let need = self.reservation_bytes(self.reserved_positions(job));
        let reserved = self.reserved_bytes();
        if reserved + need > budget {
            return self.running.is_empty();
        }
        while reserved + need + self.prefix_stats.bytes > budget && self.evict_oldest() {}
        true
    }

    /// Drops the least recently used kept prefix; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self
            .parked
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| p.used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let p = self.parked.remove(oldest);
        self.prefix_stats.bytes -= p.bytes;
        self.backend.release(p.seq);
        true
    }

    fn fresh_seq(&mut self) -> SeqId {
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        seq
    }

    /// Starts `seq` from the longest cached prefix of `prompt` under the same salt — a finished
    /// sequence's kept cache or a running sequence's — leaving at least one prompt token to read
    /// (its logits are the first sample's). Returns the tokens reused.
    fn reuse_prefix(&mut self, seq: SeqId, prompt: &[u32], salt: &str) -> usize {
        // The prompt's last rows are read again rather than copied when the prompt is long
        // enough for the tiled attention path: it then computes them exactly as a prefill of
        // the whole prompt would, so a cached prompt samples as an uncached one.
        let tail = if prompt.len() >= TILED_MIN_ROWS + MIN_REUSE_TOKENS {
            TILED_MIN_ROWS
        } else {
            1
        };
        let limit = prompt.len().saturating_sub(tail);
        let parked = self
            .parked
            .iter()
            .enumerate()
            .filter(|(_, p)| p.salt == salt)
            .map(|(i, p)| (shared_prefix(&p.tokens, prompt).min(limit), Some(i), p.seq));
        let running = self
            .running
            .iter()
            .filter(|r| !r.waiting && r.job.params.cache_salt == salt)
            .map(|r| (shared_prefix(r.held(), prompt).min(limit), None, r.seq));
        let best = parked
            .chain(running)
            .max_by_key(|&(len, parked, _)| (len, parked.is_some()));
        let Some((len, parked, from)) = best.filter(|&(len, ..)| len >= MIN_REUSE_TOKENS) else {
            return 0;
        };
        match self.backend.copy_prefix(from, seq, len) {
            Ok(true) => {
                if let Some(i) = parked {
                    self.clock += 1;
                    self.parked[i].used = self.clock;
                }
                self.prefix_stats.hits += len as u64;
                len
            }
            // A kept cache that cannot be copied is not worth keeping.
            Ok(false) | Err(_) => {
                if let Some(i) = parked {
                    let p = self.parked.remove(i);
                    self.prefix_stats.bytes -= p.bytes;
                    self.backend.release(p.seq);
                }
                0
            }
        }
    }

    /// Whether a running sequence is still reading the same prompt under the same salt: one
    /// worth waiting for rather than reading the prompt a second time.
    fn prompt_being_read(&self, prompt: &[u32], salt: &str) -> bool {
        self.running.iter().any(|r| {
            !r.waiting
                && !r.prompt_done()
                && r.job.params.cache_salt == salt
                && r.job.prompt_tokens == prompt
        })
    }

    /// Starts the waiting sequences whose prompt has been read by another (or whose reader is
    /// gone), from a copy of it.
    fn start_waiting(&mut self) {
        let ready: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let r = &self.running[i];
                r.waiting && !self.prompt_being_read(&r.job.prompt_tokens, &r.job.params.cache_salt)
            })
            .collect();
        for i in ready {
            let r = &self.running[i];
            let (seq, prompt, salt) = (
                r.seq,
                r.job.prompt_tokens.clone(),
                r.job.params.cache_salt.clone(),
            );
            let cached = self.reuse_prefix(seq, &prompt, &salt);
            let positions = self.reserved_positions(&self.running[i].job);
            self.backend.limit_positions(seq, positions);
            let r = &mut self.running[i];
            r.waiting = false;
            r.prefilled = cached;
            r.cached = cached;
        }
    }

    /// Keeps a finished sequence's cache for later prompts, or frees it. An older entry whose
    /// tokens this one extends is dropped (this one serves every prompt it would); the least
    /// recently used go while the cache is over its budget.
    fn park(&mut self, r: Running) {
        let budget = self.config.prefix_cache_bytes;
        let held = r.held();
        if budget == 0 || !r.job.params.cache_prompt || held.len() < MIN_REUSE_TOKENS {
            self.backend.release(r.seq);
            return;
        }
        let tokens = held.to_vec();
        let Some(bytes) = self.backend.keep_prefix(r.seq, tokens.len()) else {
            return;
        };
        let salt = r.job.params.cache_salt.clone();
        let subsumed: Vec<usize> = self
            .parked
            .iter()
            .enumerate()
            .filter(|(_, p)| p.salt == salt && tokens.starts_with(&p.tokens))
            .map(|(i, _)| i)
            .collect();
        for i in subsumed.into_iter().rev() {
            let p = self.parked.remove(i);
            self.prefix_stats.bytes -= p.bytes;
            self.backend.release(p.seq);
        }
        self.clock += 1;
        self.prefix_stats.bytes += bytes;
        self.parked.push(Parked {
            seq: r.seq,
            tokens,
            salt,
            bytes,
            used: self.clock,
        });
        while self.prefix_stats.bytes > budget && self.evict_oldest() {}
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn has_free_slot(&self) -> bool {
        self.running.len() < self.config.max_sequences
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty()
    }

    /// Gives a job a slot. Jobs that cannot run are ended here with their terminal event.
    pub fn admit(&mut self, job: GenerationJob) {
        if let Some(reason) = job.sink.cancel_requested() {
            job.sink.emit(EngineEvent::Cancelled { reason });
            return;
        }
        let meta = self.backend.meta();
        let fit = fit_max_tokens(
            job.prompt_tokens.len(),
            Some(job.params.max_tokens),
            meta.context_length,
        );
        let problem = if let Err(e) = fit {
            Some(match e {
                ContextFitError::EmptyPrompt => format!("the prompt {e}"),
                _ => e.to_string(),
            })
        } else {
            job.prompt_tokens
                .iter()
                .find(|&&t| t as usize >= meta.vocab_size)
                .map(|t| {
                    format!(
                        "token id {t} is outside the vocabulary ({})",
                        meta.vocab_size
                    )
                })
        };
        if let Some(message) = problem {
            job.sink.emit(EngineEvent::Failed {
                code: ErrorCode::InvalidRequest,
                message,
            });
            return;
        }
        // The constraint moves to the generator rather than being cloned (its parser state
        // is the sequence's own).
        let mut job = job;
        let mut params = job.params.clone_without_constraint();
        params.constraint = job.params.constraint.take();
        let generator = SequenceGenerator::new(
            params,
            &job.prompt_tokens,
            meta.tokenizer.clone(),
            meta.eog_tokens.clone(),
            meta.context_length,
        );
        job.sink.emit(EngineEvent::Started {
            at: SystemTime::now(),
        });
        let seq = self.fresh_seq();
        let caching = job.params.cache_prompt && self.config.prefix_cache_bytes > 0;
        let salt = job.params.cache_salt.clone();
        if caching {
            self.prefix_stats.queries += job.prompt_tokens.len() as u64;
        }
        let waiting = caching && self.prompt_being_read(&job.prompt_tokens, &salt);
        let cached = if caching && !waiting {
            self.reuse_prefix(seq, &job.prompt_tokens, &salt)
        } else {
            0
        };
        let positions = self.reserved_positions(&job);
        self.backend.limit_positions(seq, positions);
        let reserved = self.reservation_bytes(positions);
        self.running.push(Running {
            seq,
            job,
            generator,
            prefilled: cached,
            cached,
            waiting,
            draft: Vec::new(),
            draft_cap: 2,
            draft_pause: 0,
            reserved,
        });
    }

    /// Drops sequences whose job was cancelled, with their terminal event.
    pub fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            match self.running[i].job.sink.cancel_requested() {
                Some(reason) => {
                    let r = self.running.remove(i);
                    r.job.sink.emit(EngineEvent::Cancelled { reason });
                    // What it read is as good as any other prefix.
                    self.park(r);
                }
                None => i += 1,
            }
        }
    }

    /// One forward over every running sequence. Returns the number of tokens processed.
    pub fn step(&mut self) -> usize {
        self.drop_cancelled();
        self.start_waiting();
        if self.running.is_empty() {
            return 0;
        }

        // (running index, token range within the prompt or None for a decode token)
        let mut plan: Vec<(usize, Option<(usize, usize)>)> = Vec::with_capacity(self.running.len());
        let mut budget = self.config.batch_tokens;
        let decoding = self.running.iter().filter(|r| r.prompt_done()).count();
        let speculate = self.config.draft_tokens > 0
            && self.backend.verifies_drafts()
            && decoding <= MAX_SPECULATING;
        let context = self.backend.meta().context_length;
        let draft_model = self.backend.has_draft_model();
        // (running index, most tokens to draft) for the draft model.
        let mut to_draft: Vec<(usize, usize)> = Vec::new();
        for (i, r) in self.running.iter_mut().enumerate() {
            if r.prompt_done() {
                r.draft.clear();
                // Not under a grammar: each drafted position would need its own mask first.
                if r.draft_pause > 0 {
                    r.draft_pause -= 1;
                } else if speculate && r.generator.constraint_mut().is_none() {
                    let tokens = r.generator.tokens();
                    // The cache holds all but the last token; the draft follows it.
                    let room = context.saturating_sub(tokens.len() + 1);
                    let cap = r.draft_cap.min(self.config.draft_tokens).min(room);
                    if draft_model {
                        to_draft.push((i, cap));
                    } else {
                        r.draft = lookup_draft(tokens, cap);
                    }
                }
            }
        }
        if !to_draft.is_empty() {
            let requests: Vec<DraftRequest<'_>> = to_draft
                .iter()
                .map(|&(i, max)| DraftRequest {
                    seq: self.running[i].seq,
                    tokens: self.running[i].generator.tokens(),
                    max,
                })
                .collect();
            match self.backend.propose(&requests) {
                Ok(drafts) => {
                    for (&(i, max), mut draft) in to_draft.iter().zip(drafts) {
                        draft.truncate(max);
                        self.running[i].draft = draft;
                    }
                }
                // Drafts only save time: without them the step decodes plainly.
                Err(e) => tracing::warn!("the draft model failed; decoding without drafts: {e}"),
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.prompt_done() {
                plan.push((i, None));
                budget = budget.saturating_sub(1 + r.draft.len());
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.prompt_done() || r.waiting {
                continue;
            }
            if budget == 0 && !plan.is_empty() {
                break;
            }
            let remaining = r.job.prompt_tokens.len() - r.prefilled;
            let chunk = remaining.min(budget.max(1));
            plan.push((i, Some((r.prefilled, r.prefilled + chunk))));
            budget = budget.saturating_sub(chunk);
        }

        // The step's tokens are copied out (a prompt chunk at most), so the sequences' grammar
        // constraints can be borrowed mutably beside the forward.
        let tokens: Vec<(SeqId, Vec<u32>, usize)> = plan
            .iter()
            .map(|&(i, range)| {
                let r = &self.running[i];
                let tokens = match range {
                    Some((a, b)) => r.job.prompt_tokens[a..b].to_vec(),
                    None => [&[r.generator.last_token().unwrap_or(0)], r.draft.as_slice()].concat(),
                };
                let logit_rows = if range.is_none() { tokens.len() } else { 1 };
                (r.seq, tokens, logit_rows)
            })
            .collect();
        let batch: Vec<BatchItem<'_>> = tokens
            .iter()
            .map(|(seq, tokens, logit_rows)| BatchItem {
                seq: *seq,
                tokens,
                logit_rows: *logit_rows,
            })
            .collect();
        let rows_expected: usize = batch.iter().map(|b| b.logit_rows).sum();
        let n_tokens: usize = batch.iter().map(|b| b.tokens.len()).sum();

        // Every sequence sampled after this forward has its grammar's mask computed while the
        // forward runs, on a thread of its own.
        let sampled: Vec<bool> = {
            let mut v = vec![false; self.running.len()];
            for &(i, range) in &plan {
                let r = &self.running[i];
                v[i] = range.is_none_or(|(_, end)| end >= r.job.prompt_tokens.len());
            }
            v
        };
        let masks: Vec<&mut Constraint> = self
            .running
            .iter_mut()
            .zip(&sampled)
            .filter(|(_, sampled)| **sampled)
            .filter_map(|(r, _)| r.generator.constraint_mut())
            .collect();
        let backend = &mut self.backend;
        let forward = if masks.is_empty() {
            backend.forward(&batch)
        } else {
            std::thread::scope(|s| {
                s.spawn(move || masks.into_iter().for_each(Constraint::prepare));
                backend.forward(&batch)
            })
        };

        let logits = match forward {
            Ok(l) if l.len() == rows_expected => l,
            Ok(l) => {
                let message = format!(
                    "backend returned {} rows of logits for {rows_expected}",
                    l.len()
                );
                self.fail_planned(&plan, &message);
                return n_tokens;
            }
            Err(e) => {
                self.fail_planned(&plan, &e.to_string());
                return n_tokens;
            }
        };
        let mut rows_of: Vec<Vec<Vec<f32>>> = Vec::with_capacity(batch.len());
        let mut logits = logits.into_iter();
        for b in &batch {
            rows_of.push(logits.by_ref().take(b.logit_rows).collect());
        }
        drop(batch);

        let mut finished = Vec::new();
        for ((i, range), rows) in plan.into_iter().zip(rows_of) {
            let r = &mut self.running[i];
            if let Some((_, end)) = range {
                r.prefilled = end;
                if !r.prompt_done() {
                    continue;
                }
            }
            // The cache now ends with the last sampled token and the draft; row j's logits
            // follow draft token j (row 0: the last sampled token). Each row is sampled as plain
            // decoding would sample it, and the next row counts only while the sample equals
            // the drafted token: the output is exactly plain decoding's, faster when drafts hold.
            let held_before = r.generator.tokens().len().saturating_sub(1);
            let draft = std::mem::take(&mut r.draft);
            let mut used = 0;
            let mut failed = None;
            let mut ended = None;
            for (j, mut row) in rows.into_iter().enumerate() {
                used = j;
                let step = match r.generator.step(&mut row) {
                    Ok(step) => step,
                    Err(message) => {
                        failed = Some(message);
                        break;
                    }
                };
                let token = step.token;
                let finish = step.finish.clone();
                r.job.sink.emit(EngineEvent::Token(step));
                if finish.is_some() {
                    ended = finish;
                    break;
                }
                if draft.get(j) != Some(&token) {
                    break;
                }
            }
            if !draft.is_empty() {
                self.backend.truncate(r.seq, held_before + 1 + used);
                self.spec_stats.drafted += draft.len() as u64;
                self.spec_stats.accepted += used as u64;
                // A verified row costs about what a decoded one does on a small model: draft
                // only as far as drafts have been holding, and stop for a while when they fail.
                r.draft_cap = if used == draft.len() {
                    (r.draft_cap * 2).min(self.config.draft_tokens)
                } else {
                    used.max(1)
                };
                if used == 0 {
                    r.draft_pause = DRAFT_PAUSE_STEPS;
                }
            }
            if let Some(message) = failed {
                r.job.sink.emit(EngineEvent::Failed {
                    code: ErrorCode::InferenceFailed,
                    message,
                });
                finished.push(i);
            } else if let Some(reason) = ended {
                r.job.sink.emit(EngineEvent::Finished(FinishSummary {
                    reason,
                    tokens_in: r.job.prompt_tokens.len(),
                    tokens_cached: r.cached,
                    tokens_out: r.generator.generated(),
                    seed: r.job.params.sampling.seed,
                }));
                finished.push(i);
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let r = self.running.remove(i);
            self.park(r);
        }
        n_tokens
    }

    fn fail_planned(&mut self, plan: &[(usize, Option<(usize, usize)>)], message: &str) {
        let failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
        for &i in &failed {
            self.running[i].job.sink.emit(EngineEvent::Failed {
                code: ErrorCode::InferenceFailed,
                message: message.to_string(),
            });
        }
        self.remove(failed);
    }

    fn remove(&mut self, mut indices: Vec<usize>) {
        indices.sort_unstable();
        for i in indices.into_iter().rev() {
            let r = self.running.remove(i);
            self.backend.release(r.seq);
        }
    }

    /// Fails every running sequence (after an internal error).
    pub fn fail_all(&mut self, message: &str) {
        for r in self.running.drain(..) {
            self.backend.release(r.seq);
            r.job.sink.emit(EngineEvent::Failed {
                code: ErrorCode::InferenceFailed,
                message: message.to_string(),
            });
        }
    }

    /// Cancels every running sequence (shutdown).
    pub fn cancel_all(&mut self, reason: super::job::CancelReason) {
        for r in self.running.drain(..) {
            self.backend.release(r.seq);
            r.job.sink.emit(EngineEvent::Cancelled { reason });
        }
    }

    /// Positions the running sequences occupy in their KV caches (prompt read so far plus
    /// generated tokens).
    pub fn positions_in_use(&self) -> usize {
        self.running
            .iter()
            .map(|r| r.prefilled + r.generator.generated())
            .sum()
    }

    /// Ids of the jobs holding slots.
    pub fn running_job_ids(&self) -> Vec<String> {
        self.running.iter().map(|r| r.job.id.clone()).collect()
    }
}

/// A sink that keeps every event, for tests and the bench command.
#[derive(Default)]
pub struct CollectingSink {
    events: std::sync::Mutex<Vec<EngineEvent>>,
    cancel: std::sync::Mutex<Option<super::job::CancelReason>>,
}

impl CollectingSink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn events(&self) -> Vec<EngineEvent> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    pub fn cancel(&self, reason: super::job::CancelReason) {
        if let Ok(mut c) = self.cancel.lock() {
            *c = Some(reason);
        }
    }

    pub fn is_done(&self) -> bool {
        self.events
            .lock()
            .map(|e| e.last().is_some_and(EngineEvent::is_terminal))
            .unwrap_or(true)
    }
}

impl super::job::JobSink for CollectingSink {
    fn emit(&self, event: EngineEvent) {
        if let Ok(mut e) = self.events.lock() {
            e.push(event);
        }
    }

    fn cancel_requested(&self) -> Option<super::job::CancelReason> {
        self.cancel.lock().ok().and_then(|c| *c)
    }
}

#[cfg(test)]
mod tests {
    use super::lookup_draft;

    #[test]
    fn prompt_lookup_copies_what_followed_the_latest_match() {
        // "1 2 3" occurred before, followed by 4 5 6; the latest occurrence wins.
        let t = [1, 2, 3, 4, 5, 6, 9, 1, 2, 3, 7, 8, 1, 2, 3];
        assert_eq!(lookup_draft(&t, 2), vec![7, 8]);
        assert_eq!(lookup_draft(&t, 8), vec![7, 8, 1, 2, 3]);
        // Longest n-gram first: "4 9 1" matches as a trigram only.
        let t = [5, 4, 9, 1, 6, 7, 4, 9, 1];
        assert_eq!(lookup_draft(&t, 3), vec![6, 7, 4]);
        // Bigrams are too weak a signal to draft from.
        assert!(lookup_draft(&[5, 9, 1, 6, 9, 1], 3).is_empty());
        // Nothing repeats: no draft; no room: no draft.
        assert!(lookup_draft(&[1, 2, 3, 4], 4).is_empty());
        assert!(lookup_draft(&[1, 2, 1, 2], 0).is_empty());
        assert!(lookup_draft(&[1], 4).is_empty());
    }
}
