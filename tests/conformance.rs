//! Conformance with llama.cpp on the default model, under the rule in
//! `shared/conformance/README.md`:
//! - tokenization: every case of `tokenize.json` gives llama.cpp's ids with and without
//!   special-token parsing, and decoding gives llama-server's `/detokenize` text;
//! - generation: every case of `generate.json` has the same prompt ids, and greedy decoding
//!   through the engine's scheduler gives llama.cpp's tokens step by step until the end or
//!   until a divergence at a near-tie (reference top-2 margin < 0.5), with each matched
//!   token's log-probability within 0.25 of llama.cpp's.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::conformance_rule::{Outcome, compare, ids};
use common::default_model::{conformance_file, default_model_path, read_json};
use llm_worker_rbee::backend::CandleInferenceBackend;
use llm_worker_rbee::engine::{
    CollectingSink, EngineEvent, GenerationJob, InferenceBackend, Scheduler, SchedulerConfig,
};
use llm_worker_rbee::generation::GenerationParams;
use llm_worker_rbee::model::LoadOptions;
use llm_worker_rbee::model::detokenizer::StreamingDetokenizer;
use llm_worker_rbee::model::gguf::read_vocab;
use llm_worker_rbee::model::tokenizer::TextTokenizer;

#[test]
fn tokenize_json_matches_llama_cpp() {
    let model = default_model_path();
    let vocab = read_vocab(&model).expect("read GGUF tokenizer metadata");
    let tok = Arc::new(TextTokenizer::from_gguf_vocab(&vocab).expect("build tokenizer"));
    let cases = read_json(&conformance_file("tokenize.json"));
    let cases = cases.as_array().expect("list of cases");
    assert!(!cases.is_empty());

    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want_special = ids(&case["ids_parse_special"]);
        let want_plain = ids(&case["ids_no_special"]);
        let mut errors = Vec::new();

        let got = tok.encode(text, true).expect("encode");
        if got != want_special {
            errors.push(format!("parse_special: got {got:?}, want {want_special:?}"));
        }
        let got = tok.encode(text, false).expect("encode");
        if got != want_plain {
            errors.push(format!("no_special: got {got:?}, want {want_plain:?}"));
        }
        // add_bos_token is false for this model: add_special changes nothing.
        let got = tok.encode_with_special(text, true, true).expect("encode");
        if got != want_special {
            errors.push(format!("add_special: got {got:?}"));
        }
        for (field, list) in [
            ("detokenized", &want_special),
            ("detokenized_no_special", &want_plain),
        ] {
            let got = tok.decode(list, true).expect("decode");
            if got != case[field].as_str().expect(field) {
                errors.push(format!("{field}: got {got:?}"));
            }
        }
        // Streaming the ids gives the same text as decoding them at once.
        let mut stream = StreamingDetokenizer::new(tok.clone());
        let mut streamed: String = want_special.iter().map(|&id| stream.push(id)).collect();
        streamed.push_str(&stream.finish());
        if streamed != tok.decode(&want_special, false).expect("decode") {
            errors.push(format!("streamed: got {streamed:?}"));
        }

        if !errors.is_empty() {
            failures.push(format!("{text:?}:\n  {}", errors.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn greedy_generation_matches_llama_cpp() {
    let model = default_model_path();
    let backend =
        CandleInferenceBackend::load(&model, &LoadOptions::default()).expect("load model");
    let cases = read_json(&conformance_file("generate.json"));
    let cases = cases.as_array().expect("list of cases");
    assert!(!cases.is_empty());
    let tokenizer = backend.meta().tokenizer.clone();

    // Every case at once: the scheduler batches them into shared forwards, so this also runs
    // the batched path the server uses.
    let mut scheduler = Scheduler::new(
        backend,
        SchedulerConfig {
            max_sequences: cases.len(),
            batch_tokens: 512,
            prefix_cache_bytes: 0,
            draft_tokens: 0,
            kv_budget_bytes: 0,
        },
    );
    let mut sinks = Vec::new();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want_prompt = ids(&case["prompt_ids"]);
        let got_prompt = tokenizer.encode(prompt, true).expect("encode");
        if got_prompt != want_prompt {
            failures.push(format!(
                "case {i}: prompt ids {got_prompt:?}, want {want_prompt:?}"
            ));
        }
        let mut params =
            GenerationParams::greedy(case["n_predict"].as_u64().expect("n_predict") as usize);
        params.logprobs = Some(0);
        let sink = CollectingSink::new();
        scheduler.admit(GenerationJob {
            id: format!("case-{i}"),
            prompt_tokens: got_prompt,
            params,
            sink: sink.clone(),
        });
        sinks.push(sink);
    }
    let start = Instant::now();
    while !scheduler.is_idle() {
        scheduler.step();
    }
    let elapsed = start.elapsed();

    let mut generated = 0;
    for (i, (case, sink)) in cases.iter().zip(&sinks).enumerate() {
        let outcome = outcome(&sink.events()).unwrap_or_else(|e| panic!("case {i}: {e}"));
        generated += outcome.tokens.len();
        match compare(case, &outcome) {
            Ok(summary) => eprintln!("case {i}: {summary}"),
            Err(e) => failures.push(format!(
                "case {i} ({:?}): {e}",
                case["prompt"].as_str().unwrap_or("")
            )),
        }
    }
    eprintln!(
        "{} cases, {generated} tokens generated in {:.2}s",
        cases.len(),
        elapsed.as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The default model behind a scheduler configured as `config`.
fn model_scheduler(config: SchedulerConfig) -> Scheduler<CandleInferenceBackend> {
    let backend = CandleInferenceBackend::load(&default_model_path(), &LoadOptions::default())
        .expect("load model");
    Scheduler::new(backend, config)
}

/// Greedy parameters for `max_tokens`, with or without the prefix cache.
fn greedy(max_tokens: usize, cache: bool) -> GenerationParams {
    let mut params = GenerationParams::greedy(max_tokens);
    params.cache_prompt = cache;
    params
}

/// Runs `jobs` through `scheduler`, all admitted at once or one at a time; returns each job's
/// tokens and how many prompt tokens came from the cache.
fn run_jobs(
    scheduler: &mut Scheduler<CandleInferenceBackend>,
    jobs: &[(Vec<u32>, GenerationParams)],
    together: bool,
) -> Vec<(Vec<u32>, usize)> {
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for (i, (prompt, params)) in jobs.iter().enumerate() {
        let sink = CollectingSink::new();
        scheduler.admit(GenerationJob {
            id: format!("job-{i}"),
            prompt_tokens: prompt.clone(),
            params: params.clone(),
            sink: sink.clone(),
        });
        pending.push(sink);
        if !together {
            while !scheduler.is_idle() {
                scheduler.step();
            }
        }
    }
    while !scheduler.is_idle() {
        scheduler.step();
    }
    for sink in pending {
        let events = sink.events();
        let tokens = events
            .iter()
            .filter_map(|e| match e {
                EngineEvent::Token(step) => Some(step.token),
                _ => None,
            })
            .collect();
        let cached = events
            .iter()
            .find_map(|e| match e {
                EngineEvent::Finished(s) => Some(s.tokens_cached),
                _ => None,
            })
            .expect("every job finishes");
        out.push((tokens, cached));
    }
    out
}

#[test]
fn the_prefix_cache_gives_the_same_greedy_tokens_cold_warm_single_and_batched() {
    let cases = read_json(&conformance_file("generate.json"));
    let cases = cases.as_array().expect("list of cases");
    let mut scheduler = model_scheduler(SchedulerConfig {
        max_sequences: cases.len() + 1,
        batch_tokens: 512,
        prefix_cache_bytes: 512 << 20,
        draft_tokens: 0,
        kv_budget_bytes: 0,
    });
    let tokenizer = scheduler.backend().meta().tokenizer.clone();
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            tokenizer
                .encode(c["prompt"].as_str().expect("prompt"), true)
                .unwrap()
        })
        .filter(|p| p.len() > 16)
        .collect();
    assert!(prompts.len() >= 3, "enough conformance prompts to reuse");
    let n = 12;
    let uncached: Vec<_> = prompts
        .iter()
        .map(|p| (p.clone(), greedy(n, false)))
        .collect();
    let cached: Vec<_> = prompts
        .iter()
        .map(|p| (p.clone(), greedy(n, true)))
        .collect();
    let reference = run_jobs(&mut scheduler, &uncached, false);
    assert!(reference.iter().all(|(_, c)| *c == 0));

    // Cold (nothing cached yet: each prompt is prefilled, then kept), batched.
    let cold = run_jobs(&mut scheduler, &cached, true);
    // Warm: every prompt but its last token comes from the cache, one at a time and batched.
    let warm_single = run_jobs(&mut scheduler, &cached, false);
    let warm_batched = run_jobs(&mut scheduler, &cached, true);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(cold[i].0, reference[i].0, "prompt {i} cold");
        assert_eq!(cold[i].1, 0, "prompt {i}: nothing was cached before it");
        for (run, name) in [
            (&warm_single, "warm single"),
            (&warm_batched, "warm batched"),
        ] {
            assert_eq!(run[i].0, reference[i].0, "prompt {i} {name}");
            assert_eq!(
                run[i].1,
                p.len() - reread(p.len()),
                "prompt {i} {name}: cached tokens"
            );
        }
    }

    // The next turn of a conversation: the earlier prompt, what the model wrote, then more.
    // Everything the cache holds (the prompt and all but the last generated token) is reused.
    let more = tokenizer.encode(" And then?", true).unwrap();
    let turns: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&reference)
        .map(|(p, (out, _))| [p.as_slice(), out.as_slice(), more.as_slice()].concat())
        .collect();
    let plain: Vec<_> = turns
        .iter()
        .map(|t| (t.clone(), greedy(n, false)))
        .collect();
    let reused: Vec<_> = turns.iter().map(|t| (t.clone(), greedy(n, true))).collect();
    let want = run_jobs(&mut scheduler, &plain, true);
    let got = run_jobs(&mut scheduler, &reused, true);
    for (i, p) in prompts.iter().enumerate() {
        assert_eq!(got[i].0, want[i].0, "turn {i}");
        let held = p.len() + reference[i].0.len() - 1;
        let turn = turns[i].len();
        assert_eq!(
            got[i].1,
            held.min(turn - reread(turn)),
            "turn {i}: cached tokens"
        );
    }
}

#[test]
fn the_kv_budget_bounds_the_caches_and_queues_what_does_not_fit() {
    const MAX_TOKENS: usize = 80;
    let per_position = {
        let s = model_scheduler(SchedulerConfig::default());
        s.backend().kv_bytes_per_position()
    };
    assert_eq!(per_position, 2 * 30 * 3 * 64 * 2, "SmolLM2-135M's f16 KV");
    // Room for two reservations of up to 120 positions: four slots, but two jobs at a time, and
    // kept prefixes only in what is left.
    let budget = 2 * 120 * per_position;
    let mut scheduler = model_scheduler(SchedulerConfig {
        max_sequences: 4,
        batch_tokens: 512,
        prefix_cache_bytes: 64 << 20,
        draft_tokens: 0,
        kv_budget_bytes: budget,
    });
    let tokenizer = scheduler.backend().meta().tokenizer.clone();
    let sinks: Vec<_> = (0..5).map(|_| CollectingSink::new()).collect();
    // Pairs that share a start long enough to be copied from the prefix cache (a copy is
    // memory too).
    let history = "The history of the printing press begins with Johannes Gutenberg, a \
                   goldsmith who lived in the German city of Mainz";
    let bread = "A simple recipe for bread needs flour, water, salt and yeast, mixed in a large \
                 bowl and left to rise";
    let mut queue: std::collections::VecDeque<GenerationJob> = [
        history.to_string(),
        bread.to_string(),
        format!("{history} around 1440."),
        "Rivers carry sediment from the mountains".to_string(),
        format!("{bread} overnight."),
    ]
    .iter()
    .enumerate()
    .map(|(i, prompt)| {
        let prompt_tokens = tokenizer.encode(prompt, true).unwrap();
        assert!(prompt_tokens.len() + MAX_TOKENS <= 120);
        let mut params = greedy(MAX_TOKENS, true);
        params.ignore_eos = true;
        GenerationJob {
            id: format!("job-{i}"),
            prompt_tokens,
            params,
            sink: sinks[i].clone(),
        }
    })
    .collect();
    let mut most_running = 0;
    while !queue.is_empty() || !scheduler.is_idle() {
        while let Some(job) = queue.front() {
            if !scheduler.make_room_for(job) {
                break;
            }
            let job = queue.pop_front().unwrap();
            scheduler.admit(job);
        }
        most_running = most_running.max(scheduler.running());
        scheduler.step();
        let held = scheduler.backend().kv_cache_bytes();
        assert!(
            held <= budget,
            "the caches hold {held} bytes, over the budget of {budget}"
        );
        assert!(scheduler.reserved_bytes() <= budget);
    }
    assert_eq!(most_running, 2);
    assert!(
        scheduler.prefix_cache_stats().hits >= 16,
        "the shared starts were not copied: {:?}",
        scheduler.prefix_cache_stats()
    );
    for (i, sink) in sinks.iter().enumerate() {
        let events = sink.events();
        let tokens = events
            .iter()
            .filter(|e| matches!(e, EngineEvent::Token(_)))
            .count();
        assert_eq!(tokens, MAX_TOKENS, "job {i}");
        assert!(
            matches!(events.last(), Some(EngineEvent::Finished(_))),
            "job {i}: {:?}",
            events.last()
        );
    }
}

#[test]
fn a_cached_prompt_samples_exactly_as_an_uncached_one() {
    let mut scheduler = model_scheduler(SchedulerConfig {
        max_sequences: 2,
        batch_tokens: 512,
        prefix_cache_bytes: 64 << 20,
        draft_tokens: 0,
        kv_budget_bytes: 0,
    });
    let tokenizer = scheduler.backend().meta().tokenizer.clone();
    // Short prompts read their last token again, long ones their last 64 (the tiled attention
    // path an uncached prefill takes): either way the logits, and so the sampled tokens at
    // temperature 1, are the ones an uncached run gets.
    let short = tokenizer
        .encode(
            "Once upon a time, in a small village by the sea, there lived an old fisherman and his",
            true,
        )
        .unwrap();
    let long = tokenizer
        .encode(
            &"The river bends past the old mill and the stone bridge. ".repeat(12),
            true,
        )
        .unwrap();
    assert!(short.len() > 16 && short.len() < 80 && long.len() >= 80);
    for prompt in [short, long] {
        let sampled = |cache: bool| {
            let mut params = greedy(24, cache);
            params.sampling.temperature = 1.0;
            params.sampling.seed = 5;
            vec![(prompt.clone(), params)]
        };
        let uncached = run_jobs(&mut scheduler, &sampled(false), false).remove(0);
        let cold = run_jobs(&mut scheduler, &sampled(true), false).remove(0);
        let warm = run_jobs(&mut scheduler, &sampled(true), false).remove(0);
        assert_eq!(cold.0, uncached.0, "{} tokens cold", prompt.len());
        assert_eq!(warm.0, uncached.0, "{} tokens warm", prompt.len());
        assert_eq!(warm.1, prompt.len() - reread(prompt.len()));
    }
}

#[test]
fn speculative_decoding_gives_exactly_the_plain_tokens() {
    let config = |draft_tokens| SchedulerConfig {
        max_sequences: 4,
        batch_tokens: 512,
        prefix_cache_bytes: 0,
        draft_tokens,
        kv_budget_bytes: 0,
    };
    let mut plain = model_scheduler(config(0));
    let mut speculative = model_scheduler(config(8));
    let tokenizer = plain.backend().meta().tokenizer.clone();
    // Text seen before and begun again: the model copies it, and the drafts hold.
    let code = "fn area(width: u32, height: u32) -> u32 {\n    width * height\n}\n\n\
                fn perimeter(width: u32, height: u32) -> u32 {\n    2 * (width + height)\n}\n";
    let copy = format!("{code}\n// Again:\n\n{}", &code[..30]);
    let mut prompts: Vec<Vec<u32>> = vec![tokenizer.encode(&copy, true).unwrap()];
    prompts.extend(conformance_prompts(&tokenizer, 4));
    for temperature in [0.0, 1.0] {
        let jobs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut params = greedy(40, false);
                params.sampling.temperature = temperature;
                params.sampling.seed = i as u64;
                (p.clone(), params)
            })
            .collect();
        // One at a time: speculation is for few streams.
        let want = run_jobs(&mut plain, &jobs, false);
        let got = run_jobs(&mut speculative, &jobs, false);
        assert_eq!(got, want, "temperature {temperature}");
        let stats = speculative.speculation_stats();
        assert!(
            stats.accepted > 0,
            "the copy prompt's drafts were accepted: {stats:?}"
        );
    }
}

#[test]
fn a_draft_model_gives_exactly_the_plain_tokens() {
    let config = |draft_tokens| SchedulerConfig {
        max_sequences: 4,
        batch_tokens: 512,
        prefix_cache_bytes: 0,
        draft_tokens,
        kv_budget_bytes: 0,
    };
    let mut plain = model_scheduler(config(0));
    // The default model drafting for itself: the same vocabulary, and drafts that mostly hold
    // (the draft decodes one row at a time, the verifying forward several: near-ties may differ).
    let load = || {
        CandleInferenceBackend::load(&default_model_path(), &LoadOptions::default())
            .expect("load model")
    };
    let mut backend = load();
    backend.set_draft_model(load()).expect("same vocabulary");
    assert!(backend.has_draft_model());
    let mut speculative = Scheduler::new(backend, config(6));
    let tokenizer = plain.backend().meta().tokenizer.clone();
    let prompts = conformance_prompts(&tokenizer, 4);
    for temperature in [0.0, 1.0] {
        let jobs: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut params = greedy(32, false);
                params.sampling.temperature = temperature;
                params.sampling.seed = i as u64;
                (p.clone(), params)
            })
            .collect();
        let before = speculative.speculation_stats();
        // One at a time, then all four at once (each drafting in the same batched forwards).
        let want = run_jobs(&mut plain, &jobs, false);
        assert_eq!(
            run_jobs(&mut speculative, &jobs, false),
            want,
            "temperature {temperature}, one at a time"
        );
        assert_eq!(
            run_jobs(&mut speculative, &jobs, true),
            want,
            "temperature {temperature}, together"
        );
        let after = speculative.speculation_stats();
        let (drafted, accepted) = (
            after.drafted - before.drafted,
            after.accepted - before.accepted,
        );
        assert!(drafted > 0, "nothing was drafted");
        if temperature == 0.0 {
            assert!(
                accepted * 10 >= drafted * 8,
                "greedy drafts of the model itself held {accepted} of {drafted} times"
            );
        } else {
            assert!(accepted > 0, "no sampled draft held");
        }
    }
}

#[test]
fn a_draft_model_of_another_vocabulary_is_refused() {
    use common::tiny_models::{Arch, TinySpec, gguf_writer, random_weights};
    let spec = TinySpec::new(Arch::Llama);
    let dir = tempfile_dir("draft-vocab");
    let path = dir.join("tiny.gguf");
    gguf_writer(&spec, &random_weights(&spec, 1), None)
        .write(&path)
        .expect("write gguf");
    let mut backend = CandleInferenceBackend::load(&default_model_path(), &LoadOptions::default())
        .expect("load model");
    let tiny = CandleInferenceBackend::load(&path, &LoadOptions::default()).expect("load tiny");
    let err = backend.set_draft_model(tiny).unwrap_err();
    assert!(err.contains("vocabulary"), "{err}");
    assert!(!backend.has_draft_model());
}

/// The first `n` prompts of llama.cpp's greedy generation cases, tokenized.
fn conformance_prompts(tokenizer: &TextTokenizer, n: usize) -> Vec<Vec<u32>> {
    let cases = read_json(&conformance_file("generate.json"));
    cases
        .as_array()
        .expect("list of cases")
        .iter()
        .take(n)
        .map(|c| {
            tokenizer
                .encode(c["prompt"].as_str().unwrap(), true)
                .unwrap()
        })
        .collect()
}

/// A fresh directory for this test's files under the target directory.
fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).expect("create dir");
    dir
}

/// The prompt tokens read again after a cache hit: the tiled attention path's minimum for long
/// prompts (so they are computed as an uncached prefill computes them), else the last one.
fn reread(prompt: usize) -> usize {
    if prompt >= 64 + 16 { 64 } else { 1 }
}

fn outcome(events: &[EngineEvent]) -> Result<Outcome, String> {
    let mut tokens = Vec::new();
    let mut logprobs = Vec::new();
    for e in events {
        match e {
            EngineEvent::Token(step) => {
                tokens.push(step.token);
                logprobs.push(step.logprobs.as_ref().ok_or("no logprobs")?.logprob);
            }
            EngineEvent::Finished(summary) => {
                return Ok(Outcome {
                    tokens,
                    logprobs,
                    finish: summary.reason.clone(),
                });
            }
            EngineEvent::Failed { message, .. } => return Err(format!("failed: {message}")),
            EngineEvent::Cancelled { reason } => return Err(format!("cancelled: {reason:?}")),
            _ => {}
        }
    }
    Err("no terminal event".into())
}
