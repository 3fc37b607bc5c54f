//! Our GGUF tokenizers against llama.cpp's own tokenizer test suite (`test-tokenizer-0`): the
//! vocabulary-only GGUFs of real model families (`models/ggml-vocab-*.gguf`) with their input
//! texts (`.inp`) and the token ids llama.cpp produces (`.out`), taken from the pinned
//! llama.cpp source by `scripts/fetch-llamacpp-vocabs.sh` (the README's test command runs it).
//!
//! This is what checks the SentencePiece (`llama`) path on real vocabularies (Llama 2, Mistral,
//! TinyLlama and Phi-3 use it) and the BPE pre-tokenizers beyond the default model's.

use std::path::PathBuf;

use llm_worker_rbee::model::gguf::GgufFile;
use llm_worker_rbee::model::tokenizer::TextTokenizer;

/// `LLM_WORKER_VOCAB_DIR`, else where the fetch script caches them. Missing files fail the test
/// with the command that fetches them: never skipped.
fn vocab_dir() -> PathBuf {
    let dir = std::env::var_os("LLM_WORKER_VOCAB_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/llm-worker-rbee/llamacpp-vocabs"))
        })
        .expect("HOME or LLM_WORKER_VOCAB_DIR must be set");
    assert!(
        dir.join("ggml-vocab-llama-spm.gguf").is_file(),
        "{} has no llama.cpp vocabularies: run scripts/fetch-llamacpp-vocabs.sh (the README's \
         test command does)",
        dir.display()
    );
    dir
}

/// The cases of one vocabulary, read as `test-tokenizer-0` reads them.
fn cases(dir: &std::path::Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| {
        let p = dir.join(format!("ggml-vocab-{name}.gguf.{ext}"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let inputs = read("inp");
    let outputs = read("out");
    // Each text is followed by the separator (a final one included, which ends the list).
    let mut inputs: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    if inputs.last() == Some(&"") {
        inputs.pop();
    }
    let outputs: Vec<&str> = outputs.lines().collect();
    assert_eq!(inputs.len(), outputs.len(), "{name}: inputs vs outputs");
    inputs
        .into_iter()
        .zip(outputs)
        .map(|(text, ids)| {
            let ids = ids
                .split_whitespace()
                .map(|t| t.parse().expect("token id"))
                .collect();
            (text.to_string(), ids)
        })
        .collect()
}

fn tokenizer(dir: &std::path::Path, name: &str) -> TextTokenizer {
    let path = dir.join(format!("ggml-vocab-{name}.gguf"));
    let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let vocab = file.vocab().unwrap_or_else(|e| panic!("{name}: {e}"));
    TextTokenizer::from_gguf_vocab(&vocab).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every case of `name` tokenizes to llama.cpp's ids (no special-token parsing, no BOS, as
/// `test-tokenizer-0` runs), and decodes back to its text where llama.cpp's does.
fn check(name: &str) {
    let dir = vocab_dir();
    let t = tokenizer(&dir, name);
    let cases = cases(&dir, name);
    assert!(cases.len() > 20, "{name}: {} cases", cases.len());
    let mut failures = Vec::new();
    for (text, want) in &cases {
        match t.encode_with_special(text, false, false) {
            Ok(got) if &got == want => {}
            Ok(got) => failures.push(format!("{text:?}: got {got:?}, want {want:?}")),
            Err(e) => failures.push(format!("{text:?}: {e}")),
        }
        match t.decode(want, false) {
            Ok(back) if &back == text => {}
            Ok(back) => failures.push(format!("{text:?}: decodes to {back:?}")),
            Err(e) => failures.push(format!("{text:?}: decode: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn llama_spm_matches_llama_cpp() {
    check("llama-spm");
}

#[test]
fn phi_3_matches_llama_cpp() {
    check("phi-3");
}

#[test]
fn llama_bpe_matches_llama_cpp() {
    check("llama-bpe");
}

#[test]
fn qwen2_matches_llama_cpp() {
    check("qwen2");
}

#[test]
fn gpt_2_matches_llama_cpp() {
    check("gpt-2");
}

#[test]
fn starcoder_matches_llama_cpp() {
    check("starcoder");
}

#[test]
fn command_r_refact_and_mpt_match_llama_cpp() {
    for name in ["command-r", "refact", "mpt"] {
        check(name);
    }
}

#[test]
fn falcon_matches_llama_cpp() {
    check("falcon");
}

#[test]
fn deepseek_llm_matches_llama_cpp() {
    check("deepseek-llm");
}

#[test]
fn deepseek_coder_matches_llama_cpp() {
    check("deepseek-coder");
}

#[test]
fn qwen35_matches_llama_cpp() {
    check("qwen35");
}

/// Families whose pre-tokenizer or tokenizer model we do not implement are refused at load,
/// naming what is missing, rather than tokenized almost right.
#[test]
fn unsupported_families_are_refused_by_name() {
    let dir = vocab_dir();
    for (name, named) in [("bert-bge", "bert"), ("gemma-4", "gemma4")] {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let vocab = file.vocab().unwrap_or_else(|e| panic!("{name}: {e}"));
        let err = TextTokenizer::from_gguf_vocab(&vocab)
            .err()
            .unwrap_or_else(|| panic!("{name}: loaded, but it is not supported"));
        assert!(err.to_string().contains(named), "{name}: {err}");
    }
}
