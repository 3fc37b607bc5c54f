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

use super::backend::{BatchItem, InferenceBackend, SeqId};
use super::job::{EngineEvent, ErrorCode, FinishSummary, GenerationJob};
use crate::generation::{Constraint, ContextFitError, SequenceGenerator, fit_max_tokens};

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences served at once (slots).
    pub max_sequences: usize,
    /// Tokens per forward: every decoding sequence's one token plus prompt chunks.
    pub batch_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_sequences: 4,
            batch_tokens: 512,
        }
    }
}

struct Running {
    seq: SeqId,
    job: GenerationJob,
    generator: SequenceGenerator,
    /// Prompt tokens already in the cache.
    prefilled: usize,
}

impl Running {
    fn prompt_done(&self) -> bool {
        self.prefilled >= self.job.prompt_tokens.len()
    }
}

pub struct Scheduler<B: InferenceBackend> {
    backend: B,
    config: SchedulerConfig,
    running: Vec<Running>,
    next_seq: u64,
}

impl<B: InferenceBackend> Scheduler<B> {
    pub fn new(backend: B, config: SchedulerConfig) -> Self {
        let config = SchedulerConfig {
            max_sequences: config.max_sequences.max(1),
            batch_tokens: config.batch_tokens.max(1),
        };
        Self {
            backend,
            config,
            running: Vec::new(),
            next_seq: 0,
        }
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
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        self.running.push(Running {
            seq,
            job,
            generator,
            prefilled: 0,
        });
    }

    /// Drops sequences whose job was cancelled, with their terminal event.
    pub fn drop_cancelled(&mut self) {
        let backend = &mut self.backend;
        self.running
            .retain(|r| match r.job.sink.cancel_requested() {
                Some(reason) => {
                    backend.release(r.seq);
                    r.job.sink.emit(EngineEvent::Cancelled { reason });
                    false
                }
                None => true,
            });
    }

    /// One forward over every running sequence. Returns the number of tokens processed.
    pub fn step(&mut self) -> usize {
        self.drop_cancelled();
        if self.running.is_empty() {
            return 0;
        }

        // (running index, token range within the prompt or None for a decode token)
        let mut plan: Vec<(usize, Option<(usize, usize)>)> = Vec::with_capacity(self.running.len());
        let mut budget = self.config.batch_tokens;
        for (i, r) in self.running.iter().enumerate() {
            if r.prompt_done() {
                plan.push((i, None));
                budget = budget.saturating_sub(1);
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if r.prompt_done() {
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
        let tokens: Vec<(SeqId, Vec<u32>)> = plan
            .iter()
            .map(|&(i, range)| {
                let r = &self.running[i];
                let tokens = match range {
                    Some((a, b)) => r.job.prompt_tokens[a..b].to_vec(),
                    None => vec![r.generator.last_token().unwrap_or(0)],
                };
                (r.seq, tokens)
            })
            .collect();
        let batch: Vec<BatchItem<'_>> = tokens
            .iter()
            .map(|(seq, tokens)| BatchItem { seq: *seq, tokens })
            .collect();
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
            Ok(l) if l.len() == batch.len() => l,
            Ok(l) => {
                let message = format!(
                    "backend returned {} rows for {} sequences",
                    l.len(),
                    batch.len()
                );
                self.fail_planned(&plan, &message);
                return n_tokens;
            }
            Err(e) => {
                self.fail_planned(&plan, &e.to_string());
                return n_tokens;
            }
        };
        drop(batch);

        let mut finished = Vec::new();
        for ((i, range), mut row) in plan.into_iter().zip(logits) {
            let r = &mut self.running[i];
            if let Some((_, end)) = range {
                r.prefilled = end;
                if !r.prompt_done() {
                    continue;
                }
            }
            let step = match r.generator.step(&mut row) {
                Ok(step) => step,
                Err(message) => {
                    r.job.sink.emit(EngineEvent::Failed {
                        code: ErrorCode::InferenceFailed,
                        message,
                    });
                    finished.push(i);
                    continue;
                }
            };
            let finish = step.finish.clone();
            r.job.sink.emit(EngineEvent::Token(step));
            if let Some(reason) = finish {
                r.job.sink.emit(EngineEvent::Finished(FinishSummary {
                    reason,
                    tokens_in: r.job.prompt_tokens.len(),
                    tokens_out: r.generator.generated(),
                    seed: r.job.params.sampling.seed,
                }));
                finished.push(i);
            }
        }
        self.remove(finished);
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
