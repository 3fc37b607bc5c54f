//! The `bench` measurement, in llama-bench's shape: prompt processing (`pp N`: one forward over
//! an N-token prompt) and text generation (`tg N`: N single-token forwards from an empty
//! context; `tg NxS`: S sequences decoding together, one forward of S rows per step), each
//! repeated and reported as mean ± standard deviation tokens/s, plus peak RSS. With a depth D
//! (llama-bench's `-d`) every sequence first holds D tokens, prefilled untimed, and the tests
//! are named as llama-bench names them (`tg128 @ d512`).
//!
//! It drives the backend's batched forward directly with random token ids (as llama-bench
//! does), so it measures the model code, not sampling or HTTP.

use std::path::Path;
use std::time::Instant;

use crate::engine::{BatchItem, InferenceBackend, SeqId};
use crate::generation::rng::Rng;
use crate::model::gguf::GgufFile;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Sequences decoding together in the generation test (one forward per step for all);
    /// reported as `tgNxS`, aggregate tokens/s.
    pub gen_streams: usize,
    pub repetitions: usize,
    /// Prompt tokens per forward (llama-bench's `-b`/`-ub`).
    pub batch_size: usize,
    /// Tokens already in each sequence's context when a test starts (llama-bench's `-d`).
    pub depth: usize,
}

impl BenchConfig {
    /// A test's name at this config's depth: see [`test_name`].
    pub fn test_name(&self, test: &str) -> String {
        test_name(test, self.depth)
    }
}

/// A test's name as llama-bench prints it: `pp512`, `tg128`, and at a depth `tg128 @ d512`.
pub fn test_name(test: &str, depth: usize) -> String {
    match depth {
        0 => test.to_string(),
        d => format!("{test} @ d{d}"),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    /// "pp512", "tg128".
    pub test: String,
    pub tokens_per_second: Vec<f64>,
}

impl BenchResult {
    pub fn mean(&self) -> f64 {
        self.tokens_per_second.iter().sum::<f64>() / self.tokens_per_second.len().max(1) as f64
    }

    pub fn std_dev(&self) -> f64 {
        let n = self.tokens_per_second.len();
        if n < 2 {
            return 0.0;
        }
        let m = self.mean();
        (self
            .tokens_per_second
            .iter()
            .map(|x| (x - m).powi(2))
            .sum::<f64>()
            / (n - 1) as f64)
            .sqrt()
    }
}

fn random_tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect()
}

/// Runs the configured tests; a warm-up run of each precedes the timed repetitions.
pub fn run<B: InferenceBackend>(
    backend: &mut B,
    config: &BenchConfig,
) -> Result<Vec<BenchResult>, String> {
    let vocab = backend.meta().vocab_size;
    let mut rng = Rng::new(1);
    let mut results = Vec::new();
    let mut timer = Timer {
        repetitions: config.repetitions,
        seq: 0,
        depth: config.depth,
        batch_size: config.batch_size.max(1),
    };
    if config.prompt_tokens > 0 {
        let samples = timer.run(backend, 1, config.prompt_tokens, |backend, ids| {
            let tokens = random_tokens(&mut rng, config.prompt_tokens, vocab);
            for chunk in tokens.chunks(config.batch_size.max(1)) {
                backend
                    .forward(&[BatchItem {
                        seq: ids[0],
                        tokens: chunk,
                        logit_rows: 1,
                    }])
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        })?;
        results.push(BenchResult {
            test: config.test_name(&format!("pp{}", config.prompt_tokens)),
            tokens_per_second: samples,
        });
    }
    if config.gen_tokens > 0 {
        let streams = config.gen_streams.max(1);
        let samples = timer.run(
            backend,
            streams,
            config.gen_tokens * streams,
            |backend, ids| {
                let mut tokens = random_tokens(&mut rng, ids.len(), vocab);
                for _ in 0..config.gen_tokens {
                    let items: Vec<BatchItem<'_>> = ids
                        .iter()
                        .zip(&tokens)
                        .map(|(&seq, token)| BatchItem {
                            seq,
                            tokens: std::slice::from_ref(token),
                            logit_rows: 1,
                        })
                        .collect();
                    backend.forward(&items).map_err(|e| e.to_string())?;
                    for token in &mut tokens {
                        *token = (*token + 1) % vocab as u32;
                    }
                }
                Ok(())
            },
        )?;
        results.push(BenchResult {
            test: config.test_name(&if streams == 1 {
                format!("tg{}", config.gen_tokens)
            } else {
                format!("tg{}x{streams}", config.gen_tokens)
            }),
            tokens_per_second: samples,
        });
    }
    Ok(results)
}

/// Times the repetitions of one test, each on fresh sequences released afterwards.
struct Timer {
    repetitions: usize,
    seq: u64,
    /// Random tokens each sequence is given, untimed, before a run.
    depth: usize,
    batch_size: usize,
}

impl Timer {
    /// One warm-up and `repetitions` timed runs of `body` over `streams` new sequences; each
    /// timed run gives `tokens` per its seconds.
    fn run<B: InferenceBackend>(
        &mut self,
        backend: &mut B,
        streams: usize,
        tokens: usize,
        mut body: impl FnMut(&mut B, &[SeqId]) -> Result<(), String>,
    ) -> Result<Vec<f64>, String> {
        let mut samples = Vec::new();
        for rep in 0..=self.repetitions {
            let ids: Vec<SeqId> = (0..streams)
                .map(|_| {
                    self.seq += 1;
                    SeqId(self.seq)
                })
                .collect();
            let mut rng = Rng::new(self.seq);
            let vocab = backend.meta().vocab_size;
            for &seq in &ids {
                let context = random_tokens(&mut rng, self.depth, vocab);
                for chunk in context.chunks(self.batch_size) {
                    backend
                        .forward(&[BatchItem {
                            seq,
                            tokens: chunk,
                            logit_rows: 1,
                        }])
                        .map_err(|e| e.to_string())?;
                }
            }
            let start = Instant::now();
            body(backend, &ids)?;
            let secs = start.elapsed().as_secs_f64();
            for &id in &ids {
                backend.release(id);
            }
            if rep > 0 {
                samples.push(tokens as f64 / secs);
            }
        }
        Ok(samples)
    }
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Weight bytes one decode step reads from a GGUF file: every tensor, less the token embedding
/// where the file has a separate output matrix (a lookup reads one row of it), and each
/// expert tensor only in the share of experts a token uses. `None` for other formats.
pub fn decode_weight_bytes(path: &Path) -> Option<u64> {
    let file = GgufFile::open(path).ok()?;
    let arch = file.get_str("general.architecture").ok()??.to_string();
    let experts = file.get_usize(&format!("{arch}.expert_count")).ok()?;
    let used = file.get_usize(&format!("{arch}.expert_used_count")).ok()?;
    let tied = file.tensor_info("output.weight").is_none();
    let mut bytes = 0f64;
    for name in file.tensor_names() {
        let info = file.tensor_info(name)?;
        let share = match (experts, used) {
            (Some(e), Some(u)) if e > 0 && name.contains("_exps.") => u as f64 / e as f64,
            _ if name == "token_embd.weight" && !tied => 0.0,
            _ => 1.0,
        };
        bytes += info.n_bytes as f64 * share;
    }
    Some(bytes as u64)
}

/// The memory-bandwidth bound of a decode on this machine: `threads` threads summing the
/// mapped model file (in the page cache once the model has run), each a contiguous share; the
/// best of three passes, bytes per second. A decode step cannot read its weights faster.
pub fn bandwidth_probe(path: &Path, threads: usize) -> Option<f64> {
    let file = std::fs::File::open(path).ok()?;
    // SAFETY: read-only map of a model file that nothing writes while the bench runs (as the
    // loader's own map).
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let bytes: &[u8] = &map;
    let share = bytes.len().div_ceil(threads.max(1)).next_multiple_of(64);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let start = Instant::now();
        let sum = std::thread::scope(|s| {
            let parts: Vec<_> = bytes
                .chunks(share)
                .map(|part| s.spawn(move || sum_words(part)))
                .collect();
            parts
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.min(start.elapsed().as_secs_f64());
    }
    Some(bytes.len() as f64 / best)
}

/// Wrapping sum of the little-endian u64 words of `bytes` (eight running sums per 64-byte line,
/// so the loop is bound by loads, not by one addition chain).
fn sum_words(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    let mut lines = bytes.chunks_exact(64);
    for line in &mut lines {
        for (a, word) in acc.iter_mut().zip(line.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            *a = a.wrapping_add(u64::from_le_bytes(w));
        }
    }
    let tail = lines.remainder().iter().map(|&b| u64::from(b)).sum::<u64>();
    acc.iter().fold(tail, |s, &a| s.wrapping_add(a))
}

/// What `--structured` measures: grammar compile times, the per-token mask time, and the
/// aggregate decode rate of several streams with and without a JSON-schema constraint.
#[derive(Debug, Clone)]
pub struct StructuredReport {
    /// The first compile: the token trie from the vocabulary plus a small schema.
    pub first_compile_ms: f64,
    /// (schema, milliseconds) for schemas compiled after the trie exists.
    pub compile_ms: Vec<(&'static str, f64)>,
    /// Per-token mask computation, microseconds: (p50, p95, samples).
    pub mask_us: (f64, f64, usize),
    /// Aggregate tokens/s of the streams, per repetition.
    pub plain_tps: Vec<f64>,
    pub constrained_tps: Vec<f64>,
}

/// A schema whose language cannot end within a few hundred tokens, so every constrained
/// stream runs its whole budget as the plain ones do.
fn long_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 16},
                        "n": {"type": "integer", "minimum": 0, "maximum": 999},
                        "kind": {"enum": ["a", "b", "c"]}
                    },
                    "required": ["name", "n", "kind"],
                    "additionalProperties": false
                },
                "minItems": 500
            }
        },
        "required": ["items"],
        "additionalProperties": false
    })
}

/// A typical structured-output schema: nested objects, arrays, enums, bounded numbers, an
/// optional field.
fn person_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "favourite": {"enum": ["red", "green", "blue"]},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}
                },
                "required": ["city", "zip"],
                "additionalProperties": false
            },
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]}
        },
        "required": ["name", "age", "favourite", "address", "tags", "score", "nickname"],
        "additionalProperties": false
    })
}

/// A schema with many properties, as function-calling schemas grow.
fn wide_schema() -> serde_json::Value {
    let mut properties = serde_json::Map::new();
    for i in 0..40 {
        let p = match i % 4 {
            0 => serde_json::json!({"type": "string"}),
            1 => serde_json::json!({"type": "integer"}),
            2 => serde_json::json!({"type": "boolean"}),
            _ => serde_json::json!({"type": "array", "items": {"type": "number"}}),
        };
        properties.insert(format!("field_{i}"), p);
    }
    serde_json::json!({"type": "object", "properties": properties, "additionalProperties": false})
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Runs the structured-output measurement on `backend` (moved into a scheduler).
pub fn structured<B: InferenceBackend>(
    backend: B,
    streams: usize,
    tokens: usize,
    repetitions: usize,
) -> Result<StructuredReport, String> {
    use crate::engine::{CollectingSink, EngineEvent, GenerationJob, Scheduler, SchedulerConfig};
    use crate::generation::{ConstraintSpec, GenerationParams, Grammars};

    let meta = backend.meta().clone();
    let grammars = Grammars::new(meta.tokenizer.clone(), meta.eog_tokens.clone());
    let timed = |spec: &ConstraintSpec| -> Result<f64, String> {
        let start = Instant::now();
        grammars.compile(spec).map_err(|e| e.to_string())?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    let first_compile_ms = timed(&ConstraintSpec::JsonObject)?;
    let mut compile_ms = Vec::new();
    for (name, schema) in [
        ("person (nested, enum, bounds, anyOf)", person_schema()),
        ("40 properties", wide_schema()),
        ("array of 500+ objects", long_schema()),
    ] {
        compile_ms.push((name, timed(&ConstraintSpec::JsonSchema(schema))?));
    }

    // Mask time: sequences sampled at temperature 1 from random logits under the schemas.
    let mut rng = Rng::new(7);
    let mut mask_us = Vec::new();
    for schema in [person_schema(), long_schema()] {
        for _ in 0..8 {
            let mut c = grammars
                .compile(&ConstraintSpec::JsonSchema(schema.clone()))
                .map_err(|e| e.to_string())?;
            for _ in 0..96 {
                let start = Instant::now();
                c.prepare();
                mask_us.push(start.elapsed().as_secs_f64() * 1e6);
                let mut logits: Vec<f32> = (0..meta.vocab_size)
                    .map(|_| (rng.next_f64() * 8.0) as f32)
                    .collect();
                c.apply(&mut logits)?;
                let best = logits
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map_or(0, |(i, _)| i as u32);
                if c.accept(best)? {
                    break;
                }
            }
        }
    }
    mask_us.sort_by(f64::total_cmp);
    let mask = (
        percentile(&mask_us, 0.5),
        percentile(&mask_us, 0.95),
        mask_us.len(),
    );

    // Aggregate decode rate: `streams` sequences at once, plain and constrained in turns.
    let mut scheduler = Scheduler::new(
        backend,
        SchedulerConfig {
            max_sequences: streams,
            batch_tokens: 512,
            prefix_cache_bytes: 0,
            draft_tokens: 0,
            kv_budget_bytes: 0,
        },
    );
    let long = ConstraintSpec::JsonSchema(long_schema());
    let mut plain_tps = Vec::new();
    let mut constrained_tps = Vec::new();
    for rep in 0..=repetitions {
        for constrained in [false, true] {
            let mut sinks = Vec::new();
            for s in 0..streams {
                let mut params = GenerationParams::greedy(tokens);
                params.ignore_eos = true;
                if constrained {
                    params.constraint = Some(grammars.compile(&long).map_err(|e| e.to_string())?);
                }
                let sink = CollectingSink::new();
                scheduler.admit(GenerationJob {
                    id: format!("bench-{rep}-{s}"),
                    prompt_tokens: random_tokens(&mut rng, 16, meta.vocab_size),
                    params,
                    sink: sink.clone(),
                });
                sinks.push(sink);
            }
            let start = Instant::now();
            while !scheduler.is_idle() {
                scheduler.step();
            }
            let secs = start.elapsed().as_secs_f64();
            let generated: usize = sinks
                .iter()
                .map(|s| {
                    s.events()
                        .iter()
                        .filter(|e| matches!(e, EngineEvent::Token(_)))
                        .count()
                })
                .sum();
            if generated != streams * tokens {
                return Err(format!(
                    "{generated} tokens generated, {} expected",
                    streams * tokens
                ));
            }
            if rep > 0 {
                let tps = generated as f64 / secs;
                if constrained {
                    constrained_tps.push(tps);
                } else {
                    plain_tps.push(tps);
                }
            }
        }
    }
    Ok(StructuredReport {
        first_compile_ms,
        compile_ms,
        mask_us: mask,
        plain_tps,
        constrained_tps,
    })
}

/// What `--speculative` measures: single-stream decode with prompt-lookup drafts against plain
/// decoding, on a prompt that asks for a copy and on one with nothing to copy.
#[derive(Debug, Clone)]
pub struct SpeculativeReport {
    /// (prompt kind, plain tok/s, speculative tok/s, drafted, accepted)
    pub rows: Vec<(&'static str, f64, f64, u64, u64)>,
}

/// Runs the speculative-decoding measurement (greedy, `tokens` generated per run, the best of
/// `repetitions` runs each way, alternating).
pub fn speculative<B: InferenceBackend>(
    backend: B,
    tokens: usize,
    repetitions: usize,
    draft_tokens: usize,
) -> Result<SpeculativeReport, String> {
    use crate::engine::{CollectingSink, EngineEvent, GenerationJob, Scheduler, SchedulerConfig};
    use crate::generation::GenerationParams;

    let tokenizer = backend.meta().tokenizer.clone();
    let code = "fn area(width: u32, height: u32) -> u32 {\n    let w = width as u64;\n    \
                let h = height as u64;\n    (w * h) as u32\n}\n\nfn perimeter(width: u32, \
                height: u32) -> u32 {\n    2 * (width + height)\n}\n";
    let prompts = [
        (
            "copy: code seen before, repeated",
            format!(
                "{code}\n// The same functions, unchanged:\n\n{}",
                &code[..40]
            ),
        ),
        (
            "nothing to copy: a story",
            "<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a \
             message in a bottle.<|im_end|>\n<|im_start|>assistant\n"
                .to_string(),
        ),
    ];
    let mut scheduler = Scheduler::new(
        backend,
        SchedulerConfig {
            max_sequences: 1,
            batch_tokens: 512,
            prefix_cache_bytes: 0,
            draft_tokens: 0,
            kv_budget_bytes: 0,
        },
    );
    let mut rows = Vec::new();
    for (kind, text) in prompts {
        let prompt = tokenizer.encode(&text, true).map_err(|e| e.to_string())?;
        let mut best = [0f64; 2];
        let mut outputs: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        let before = scheduler.speculation_stats();
        for rep in 0..=repetitions {
            for (k, draft) in [0, draft_tokens].into_iter().enumerate() {
                scheduler.set_draft_tokens(draft);
                let mut params = GenerationParams::greedy(tokens);
                params.ignore_eos = true;
                let sink = CollectingSink::new();
                scheduler.admit(GenerationJob {
                    id: format!("spec-{rep}-{k}"),
                    prompt_tokens: prompt.clone(),
                    params,
                    sink: sink.clone(),
                });
                // The prompt first, untimed: decode is what speculation changes.
                scheduler.step();
                let start = Instant::now();
                while !scheduler.is_idle() {
                    scheduler.step();
                }
                let secs = start.elapsed().as_secs_f64();
                let out: Vec<u32> = sink
                    .events()
                    .iter()
                    .filter_map(|e| match e {
                        EngineEvent::Token(s) => Some(s.token),
                        _ => None,
                    })
                    .collect();
                if rep > 0 {
                    best[k] = best[k].max((out.len() - 1) as f64 / secs);
                }
                outputs[k] = out;
            }
        }
        if outputs[0] != outputs[1] {
            return Err(format!("{kind}: speculative output differs from plain"));
        }
        let after = scheduler.speculation_stats();
        rows.push((
            kind,
            best[0],
            best[1],
            after.drafted - before.drafted,
            after.accepted - before.accepted,
        ));
    }
    Ok(SpeculativeReport { rows })
}
