//! Where the tests find the default model and the llama.cpp reference outputs.

#![allow(dead_code)]

use std::path::PathBuf;

use llm_worker_rbee::backend::CandleInferenceBackend;
use llm_worker_rbee::model::LoadOptions;

/// `LLM_WORKER_MODEL`, else the file `scripts/fetch-default-model.sh` caches. A missing model
/// fails the test with the command that fetches it: these tests are never skipped.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("LLM_WORKER_MODEL") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "LLM_WORKER_MODEL={} does not exist",
            p.display()
        );
        return p;
    }
    let cache = std::env::var_os("LLM_WORKER_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/llm-worker-rbee"))
        })
        .expect("HOME or LLM_WORKER_CACHE must be set");
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-default-model.sh (the README's test command does)",
        p.display()
    );
    p
}

/// The default model with a 2048-token context, loaded on the blocking pool.
pub async fn load_default_model() -> CandleInferenceBackend {
    let path = default_model_path();
    tokio::task::spawn_blocking(move || {
        CandleInferenceBackend::load(
            &path,
            &LoadOptions {
                context_length: Some(2048),
                ..LoadOptions::default()
            },
        )
    })
    .await
    .expect("loader task")
    .expect("load the default model")
}

/// `LLM_WORKER_CONFORMANCE_DIR`, else `../shared/conformance` beside the checkout.
pub fn conformance_file(name: &str) -> PathBuf {
    std::env::var_os("LLM_WORKER_CONFORMANCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/conformance"))
        .join(name)
}

pub fn read_json(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
