//! The `bench` measurement, in llama-bench's shape: prompt processing (`pp N`: one forward over
//! an N-token prompt) and text generation (`tg N`: N single-token forwards from an empty
//! context), each repeated and reported as mean ± standard deviation tokens/s, plus peak RSS.
//!
//! It drives the backend's batched forward directly with random token ids (as llama-bench
//! does), so it measures the model code, not sampling or HTTP.

use std::time::Instant;

use crate::engine::{BatchItem, InferenceBackend, SeqId};
use crate::generation::rng::Rng;

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub repetitions: usize,
    /// Prompt tokens per forward (llama-bench's `-b`/`-ub`).
    pub batch_size: usize,
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
    let mut seq = 0u64;
    let mut results = Vec::new();
    let mut next_seq = || {
        seq += 1;
        SeqId(seq)
    };
    if config.prompt_tokens > 0 {
        let mut samples = Vec::new();
        for rep in 0..=config.repetitions {
            let tokens = random_tokens(&mut rng, config.prompt_tokens, vocab);
            let id = next_seq();
            let start = Instant::now();
            for chunk in tokens.chunks(config.batch_size.max(1)) {
                backend
                    .forward(&[BatchItem {
                        seq: id,
                        tokens: chunk,
                    }])
                    .map_err(|e| e.to_string())?;
            }
            let secs = start.elapsed().as_secs_f64();
            backend.release(id);
            if rep > 0 {
                samples.push(config.prompt_tokens as f64 / secs);
            }
        }
        results.push(BenchResult {
            test: format!("pp{}", config.prompt_tokens),
            tokens_per_second: samples,
        });
    }
    if config.gen_tokens > 0 {
        let mut samples = Vec::new();
        for rep in 0..=config.repetitions {
            let id = next_seq();
            let mut token = random_tokens(&mut rng, 1, vocab)[0];
            let start = Instant::now();
            for _ in 0..config.gen_tokens {
                backend
                    .forward(&[BatchItem {
                        seq: id,
                        tokens: &[token],
                    }])
                    .map_err(|e| e.to_string())?;
                token = (token + 1) % vocab as u32;
            }
            let secs = start.elapsed().as_secs_f64();
            backend.release(id);
            if rep > 0 {
                samples.push(config.gen_tokens as f64 / secs);
            }
        }
        results.push(BenchResult {
            test: format!("tg{}", config.gen_tokens),
            tokens_per_second: samples,
        });
    }
    Ok(results)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
