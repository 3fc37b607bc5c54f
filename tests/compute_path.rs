//! `GET /info` says how the served model computes: `compute` with its path, the reason when it
//! is Candle's, each tensor type's path and the CPU kernels' selection; absent while loading.

mod common;

use common::tiny_models::{Arch, TempDir, TinySpec, gguf_writer_typed, random_weights};
use common::worker::{Setup, TestWorker, serve};
use llm_worker_rbee::backend::CandleInferenceBackend;
use llm_worker_rbee::kernels::WeightType;
use llm_worker_rbee::model::LoadOptions;
use llm_worker_rbee::setup_worker_with_backend;
use serde_json::{Value, json};

/// The tiny Llama's one matrix stored in another type in the mixed files; the others are Q8_0.
const MIXED_TENSOR: &str = "blk.0.attn_q.weight";

/// `/info` of a worker serving the GGUF at `path`, with our CPU kernels on or off.
async fn info_of(path: &std::path::Path, cpu_kernels: bool) -> Value {
    let path = path.to_path_buf();
    let backend = tokio::task::spawn_blocking(move || {
        CandleInferenceBackend::load(
            &path,
            &LoadOptions {
                threads: Some(1),
                cpu_kernels,
                ..LoadOptions::default()
            },
        )
    })
    .await
    .expect("loader task")
    .expect("load");
    let base = serve(setup_worker_with_backend(backend, None)).await;
    let r = reqwest::get(format!("{base}/info"))
        .await
        .expect("GET /info");
    assert_eq!(r.status(), 200);
    r.json().await.expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_reports_the_compute_path_and_every_tensor_type() {
    let spec = TinySpec::new(Arch::Llama);
    let weights = random_weights(&spec, 77);
    let matrices = weights.iter().filter(|w| w.shape.len() == 2).count();
    let vectors = weights.len() - matrices;
    let dir = TempDir::new("compute-path");
    let write = |name: &str, mixed: WeightType| {
        let path = dir.path().join(name);
        gguf_writer_typed(&spec, &weights, |tensor| {
            Some(if tensor == MIXED_TENSOR {
                mixed
            } else {
                WeightType::Q8_0
            })
        })
        .write(&path)
        .expect("write gguf");
        path
    };
    let kernels = llm_worker_rbee::kernels::detect().to_string();

    let info = info_of(&write("q8_0.gguf", WeightType::Q8_0), true).await;
    assert_eq!(
        info["compute"],
        json!({
            "path": "cpu-kernels",
            "reason": null,
            "tensor_types": {
                "Q8_0": {"count": matrices, "path": "cpu-kernels"},
                "F32": {"count": vectors, "path": "cpu-kernels"},
            },
            "cpu_kernels": kernels,
        }),
        "{info}"
    );

    // Every type llama-quantize mixes in (and BF16) is read by the kernels: each is listed
    // under its own name, on their path.
    for (dtype, name) in [
        (WeightType::Q3K, "Q3_K"),
        (WeightType::Q2K, "Q2_K"),
        (WeightType::BF16, "BF16"),
        (WeightType::IQ4NL, "IQ4_NL"),
        (WeightType::IQ4XS, "IQ4_XS"),
    ] {
        let info = info_of(&write(&format!("{name}.gguf"), dtype), true).await;
        assert_eq!(
            info["compute"],
            json!({
                "path": "cpu-kernels",
                "reason": null,
                "tensor_types": {
                    name: {"count": 1, "path": "cpu-kernels"},
                    "Q8_0": {"count": matrices - 1, "path": "cpu-kernels"},
                    "F32": {"count": vectors, "path": "cpu-kernels"},
                },
                "cpu_kernels": kernels,
            }),
            "{info}"
        );
    }

    // Candle's path: the reason, and every tensor type on it.
    let info = info_of(&write("q3_k.gguf", WeightType::Q3K), false).await;
    let compute = &info["compute"];
    assert_eq!(compute["path"], "candle", "{info}");
    let reason = compute["reason"].as_str().expect("a reason");
    assert!(reason.contains("turned off"), "{reason}");
    assert_eq!(
        compute["tensor_types"],
        json!({
            "Q3_K": {"count": 1, "path": "candle"},
            "Q8_0": {"count": matrices - 1, "path": "candle"},
            "F32": {"count": vectors, "path": "candle"},
        }),
        "{info}"
    );
}

#[tokio::test]
async fn info_has_no_compute_while_the_model_loads() {
    let w = TestWorker::start(Setup {
        attach: false,
        ..Setup::default()
    })
    .await;
    let (status, info) = w.get_json("/info").await;
    assert_eq!(status, 200);
    assert_eq!(info["status"], "starting");
    assert!(info.get("compute").is_none(), "{info}");
}
