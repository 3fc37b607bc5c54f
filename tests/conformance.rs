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
