//! `llm-worker-rbee-bench`: prompt-processing and generation speed in llama-bench's shape
//! (`-p 512 -n 128 -t 2`), peak RSS, and, given llama.cpp's `llama-bench`, the same tests run by
//! it in the same invocation with ours/llama.cpp ratios.

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use llm_worker_rbee::backend::CandleInferenceBackend;
use llm_worker_rbee::bench::{
    BenchConfig, BenchResult, bandwidth_probe, decode_weight_bytes, peak_rss_bytes, run, test_name,
};
use llm_worker_rbee::engine::InferenceBackend;
use llm_worker_rbee::model::LoadOptions;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Measure prompt processing and generation tokens/s (llama-bench shape)"
)]
struct Args {
    /// Model: a GGUF file or a Hugging Face safetensors directory (default: the default model).
    #[arg(short, long, env = "LLM_WORKER_MODEL")]
    model: Option<PathBuf>,
    /// Prompt tokens for the prompt-processing test (0 skips it).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens for the generation test (0 skips it).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    gen_tokens: usize,
    /// Compute threads.
    #[arg(short = 't', long, default_value_t = 2)]
    threads: usize,
    /// Timed repetitions of each test (after one warm-up).
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    /// Prompt tokens per forward.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    batch_size: usize,
    /// Tokens already in each sequence's context when a test starts, prefilled untimed
    /// (llama-bench's `-d`): decode and prefill at that depth, where attention costs more.
    #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
    depth: usize,
    /// Path of llama.cpp's `llama-bench`: runs the same tests with it and prints ratios.
    #[arg(long)]
    llama_bench: Option<PathBuf>,
    /// Measure structured output instead: grammar compile times, per-token mask time, and
    /// `--streams` sequences of `-n` tokens decoding with and without a JSON schema.
    #[arg(long)]
    structured: bool,
    /// Sequences decoding at once for `--structured`.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Sequences decoding together in the generation test (batched decode, aggregate
    /// tokens/s, reported as `tgNxS`; llama-bench has no such test, so no ratio).
    #[arg(long, default_value_t = 1, value_name = "S")]
    gen_streams: usize,
    /// Measure speculative decoding (prompt lookup, up to N draft tokens) against plain
    /// decoding, single stream, `-n` tokens.
    #[arg(long, value_name = "N")]
    speculative: Option<usize>,
    /// With `--speculative`: draft with this model (same vocabulary) instead of prompt lookup.
    #[arg(long, value_name = "PATH")]
    draft_model: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    // Candle reads its thread count from the environment when its pool starts.
    // SAFETY: single-threaded here; nothing else reads the environment concurrently.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    }
    let model = match args.model.clone() {
        Some(m) => m,
        None => match llm_worker_rbee::config::fetch_default_model() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        },
    };
    let mut backend = match CandleInferenceBackend::load(
        &model,
        &LoadOptions {
            threads: Some(args.threads),
            ..LoadOptions::default()
        },
    ) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if args.structured {
        structured(backend, &args, &model);
        return;
    }
    if let Some(draft) = args.speculative {
        if let Some(path) = &args.draft_model {
            let loaded = CandleInferenceBackend::load(
                path,
                &LoadOptions {
                    threads: Some(args.threads),
                    ..LoadOptions::default()
                },
            )
            .map_err(|e| e.to_string())
            .and_then(|d| backend.set_draft_model(d));
            if let Err(e) = loaded {
                eprintln!("error: the draft model {}: {e}", path.display());
                std::process::exit(1);
            }
        }
        speculative(backend, &args, &model, draft);
        return;
    }
    let config = BenchConfig {
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        gen_streams: args.gen_streams,
        repetitions: args.repetitions.max(1),
        batch_size: args.batch_size,
        depth: args.depth,
    };
    let ours = match run(&mut backend, &config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let rss = peak_rss_bytes().map_or("?".to_string(), |b| {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    });
    println!(
        "model: {}  threads: {}  peak RSS: {rss}",
        model.display(),
        args.threads
    );
    println!("| test | llm-worker-rbee t/s | llama.cpp t/s | ratio |");
    println!("|---|---|---|---|");
    let theirs = args
        .llama_bench
        .as_ref()
        .map(|bin| llama_bench(bin, &model, &args))
        .transpose()
        .unwrap_or_else(|e| {
            eprintln!("llama-bench failed: {e}");
            None
        })
        .unwrap_or_default();
    for r in &ours {
        let other = theirs.iter().find(|t| t.test == r.test);
        let (peer, ratio) = match other {
            Some(o) => (
                format!("{:.2} ± {:.2}", o.mean(), o.std_dev()),
                format!("{:.2}×", r.mean() / o.mean()),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {:.2} ± {:.2} | {peer} | {ratio} |",
            r.test,
            r.mean(),
            r.std_dev()
        );
    }
    bandwidth(&model, &args, &ours, &theirs);
}

/// Generation as weight bytes per second against the bandwidth probe: how far a decode is from
/// the memory bound.
fn bandwidth(model: &std::path::Path, args: &Args, ours: &[BenchResult], theirs: &[BenchResult]) {
    let (Some(step_bytes), Some(probe)) = (
        decode_weight_bytes(model),
        bandwidth_probe(model, args.threads),
    ) else {
        return;
    };
    println!(
        "\nbandwidth probe: {:.1} GB/s ({} threads summing the model file); one decode step reads {:.1} MB of weights",
        probe / 1e9,
        args.threads,
        step_bytes as f64 / 1e6
    );
    let streams = args.gen_streams.max(1) as f64;
    for r in ours.iter().filter(|r| r.test.starts_with("tg")) {
        let rate = |tps: f64| tps / streams * step_bytes as f64;
        let mut line = format!(
            "{}: {:.1} GB/s of weights, {:.0}% of the probe",
            r.test,
            rate(r.mean()) / 1e9,
            100.0 * rate(r.mean()) / probe
        );
        if let Some(o) = theirs.iter().find(|t| t.test == r.test) {
            line += &format!(
                "; llama.cpp {:.1} GB/s, {:.0}%",
                rate(o.mean()) / 1e9,
                100.0 * rate(o.mean()) / probe
            );
        }
        println!("{line}");
    }
}

/// Runs llama-bench with the same tests and parses its JSON output.
fn llama_bench(bin: &PathBuf, model: &PathBuf, args: &Args) -> Result<Vec<BenchResult>, String> {
    let out = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(["-p", &args.prompt_tokens.to_string()])
        .args(["-n", &args.gen_tokens.to_string()])
        .args(["-t", &args.threads.to_string()])
        .args(["-r", &args.repetitions.to_string()])
        .args(["-b", &args.batch_size.to_string()])
        .args(["-d", &args.depth.to_string()])
        .args(["-o", "json"])
        .output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("llama-bench JSON: {e}"))?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let n_prompt = row.get("n_prompt")?.as_u64()?;
            let n_gen = row.get("n_gen")?.as_u64()?;
            let test = if n_gen == 0 {
                format!("pp{n_prompt}")
            } else {
                format!("tg{n_gen}")
            };
            let depth = row.get("n_depth").and_then(|d| d.as_u64()).unwrap_or(0);
            let test = test_name(&test, depth as usize);
            let samples = row
                .get("samples_ts")?
                .as_array()?
                .iter()
                .filter_map(|v| v.as_f64())
                .collect();
            Some(BenchResult {
                test,
                tokens_per_second: samples,
            })
        })
        .collect())
}

/// `--structured`: prints compile times, mask time and the constrained/plain decode ratio.
fn structured(backend: impl InferenceBackend, args: &Args, model: &std::path::Path) {
    let report = match llm_worker_rbee::bench::structured(
        backend,
        args.streams.max(1),
        args.gen_tokens.max(1),
        args.repetitions.max(1),
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!("model: {}  threads: {}", model.display(), args.threads);
    println!(
        "| measure | value |\n|---|---|\n| first compile (token trie + small schema) | {:.1} ms |",
        report.first_compile_ms
    );
    for (name, ms) in &report.compile_ms {
        println!("| compile: {name} | {ms:.2} ms |");
    }
    let (p50, p95, n) = report.mask_us;
    println!("| mask per token, p50 / p95 ({n} tokens) | {p50:.0} / {p95:.0} µs |");
    let (plain, constrained) = (mean(&report.plain_tps), mean(&report.constrained_tps));
    println!(
        "| {} streams × {} tokens, plain | {plain:.1} tok/s |",
        args.streams, args.gen_tokens
    );
    println!(
        "| {} streams × {} tokens, JSON schema | {constrained:.1} tok/s |",
        args.streams, args.gen_tokens
    );
    println!("| constrained / plain | {:.3} |", constrained / plain);
}

/// `--speculative N`: prints plain and speculative decode rates and their ratio.
fn speculative(backend: impl InferenceBackend, args: &Args, model: &std::path::Path, draft: usize) {
    let report = match llm_worker_rbee::bench::speculative(
        backend,
        args.gen_tokens.max(2),
        args.repetitions.max(1),
        draft,
    ) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let drafter = args.draft_model.as_ref().map_or_else(
        || "prompt lookup".to_string(),
        |p| format!("draft model {}", p.display()),
    );
    println!(
        "model: {}  threads: {}  draft tokens: {draft} ({drafter})",
        model.display(),
        args.threads
    );
    println!("| prompt | plain tok/s | speculative tok/s | ratio | drafted | accepted |");
    println!("|---|---|---|---|---|---|");
    for (kind, plain, fast, drafted, accepted) in report.rows {
        println!(
            "| {kind} | {plain:.1} | {fast:.1} | {:.2}× | {drafted} | {accepted} |",
            fast / plain
        );
    }
}
