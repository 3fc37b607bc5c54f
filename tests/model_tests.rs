//! The decoder on tiny random-weight models written by the tests: the GGUF and safetensors
//! paths agree, agree with Candle's own `candle-transformers` implementations, batching does
//! not change results, the accelerators' attention path (run here on the CPU device) agrees
//! with the CPU's, and broken files give typed errors instead of panics.

mod common;

use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::tiny_models::{
    Arch, NamedWeight, TempDir, TinySpec, gguf_writer, gguf_writer_typed, gguf_writer_with,
    random_weights, write_hf_dir, write_hf_dir_with,
};
use llm_worker_rbee::kernels::{QMatrix, ThreadPool, WeightType};
use llm_worker_rbee::model::ModelError;
use llm_worker_rbee::model::config::ModelConfig;
use llm_worker_rbee::model::decoder::{
    AttentionPath, CandlePathReason, Decoder, DecoderOptions, ForwardItem, ForwardPath,
    TensorTypeUse,
};
use llm_worker_rbee::model::gguf::{GgufError, GgufFile};
use llm_worker_rbee::model::weights::WeightStore;

const PROMPT: [u32; 5] = [3, 17, 200, 42, 99];
/// Relative logit tolerance between f32 computations that differ only in summation order: on
/// the CPU keys and values are stored as f16, where a 1-ulp f32 difference can round to a
/// different half (1e-3 relative) before it reaches the logits.
const F16_CACHE_TOLERANCE: f32 = 1e-3;
const CONTINUATION: [u32; 3] = [7, 250, 11];

struct Tiny {
    _dir: TempDir,
    spec: TinySpec,
    hf_dir: std::path::PathBuf,
    weights: Vec<NamedWeight>,
}

fn tiny(arch: Arch) -> Tiny {
    tiny_with(TinySpec::new(arch))
}

fn tiny_with(spec: TinySpec) -> Tiny {
    let arch = spec.arch;
    let dir = TempDir::new(arch.model_type());
    let weights = random_weights(&spec, 1234 + arch as u64);
    let hf_dir = dir.path().join("hf");
    write_hf_dir(&hf_dir, &spec, &weights);
    Tiny {
        _dir: dir,
        spec,
        hf_dir,
        weights,
    }
}

impl Tiny {
    fn gguf(&self, quant: Option<GgmlDType>) -> std::path::PathBuf {
        let tag = quant.map_or("f32".to_string(), |q| format!("{q:?}"));
        let path = self.hf_dir.with_file_name(format!("model-{tag}.gguf"));
        gguf_writer(&self.spec, &self.weights, quant)
            .write(&path)
            .expect("write gguf");
        path
    }

    fn hf_decoder(&self) -> Decoder {
        let cfg_text = std::fs::read_to_string(self.hf_dir.join("config.json")).expect("config");
        let cfg = ModelConfig::from_hf_json(&cfg_text, "config.json").expect("parse config");
        let store =
            WeightStore::open_safetensors(&self.hf_dir, &[self.hf_dir.join("model.safetensors")])
                .expect("open safetensors");
        Decoder::load(cfg, &store, &Device::Cpu, self.spec.context, Some(pool())).expect("load hf")
    }

    /// The safetensors model on the accelerators' path (Candle attention and KV tensors), run
    /// on the CPU device; `half`: dense matrices in half precision as on a GPU.
    fn device_decoder(&self, half: bool) -> Decoder {
        hf_dir_decoder(&self.hf_dir, self.spec.context, device_options(half))
    }
}

fn device_options(half: bool) -> DecoderOptions {
    DecoderOptions {
        // Given to show that the device path ignores the CPU kernels.
        cpu_pool: Some(pool()),
        attention: Some(AttentionPath::Device),
        half_weights: Some(half),
    }
}

/// A decoder for the single-file safetensors checkpoint in `dir`.
fn hf_dir_decoder(dir: &std::path::Path, context: usize, options: DecoderOptions) -> Decoder {
    let cfg_text = std::fs::read_to_string(dir.join("config.json")).expect("config");
    let cfg = ModelConfig::from_hf_json(&cfg_text, "config.json").expect("parse config");
    let store = WeightStore::open_safetensors(dir, &[dir.join("model.safetensors")])
        .expect("open safetensors");
    let decoder = Decoder::load_with(cfg, &store, &Device::Cpu, context, options).expect("load");
    assert!(!decoder.uses_cpu_path());
    decoder
}

fn pool() -> Arc<ThreadPool> {
    Arc::new(ThreadPool::new(2))
}

/// The GGUF path as served: matrices in place, our CPU kernels.
fn gguf_decoder(path: &std::path::Path) -> Decoder {
    gguf_decoder_with(path, Some(pool()))
}

/// `None`: Candle's own quantized kernels on copies of the weights.
fn gguf_decoder_with(path: &std::path::Path, cpu_pool: Option<Arc<ThreadPool>>) -> Decoder {
    let file = GgufFile::open(path).expect("open gguf");
    let cfg = ModelConfig::from_gguf(&file).expect("gguf config");
    let context = cfg.max_position_embeddings;
    Decoder::load(
        cfg,
        &WeightStore::Gguf(Arc::new(file)),
        &Device::Cpu,
        context,
        cpu_pool,
    )
    .expect("load gguf")
}

/// Logits after the prompt, then after each continuation token fed one at a time.
fn run(decoder: &Decoder) -> Vec<Vec<f32>> {
    let mut cache = decoder.new_cache();
    let mut out = Vec::new();
    let logits = decoder
        .forward(&mut [ForwardItem {
            cache: &mut cache,
            tokens: &PROMPT,
        }])
        .expect("prefill");
    out.push(row(&logits, 0));
    for t in CONTINUATION {
        let logits = decoder
            .forward(&mut [ForwardItem {
                cache: &mut cache,
                tokens: &[t],
            }])
            .expect("decode");
        out.push(row(&logits, 0));
    }
    out
}

fn row(logits: &[Vec<f32>], i: usize) -> Vec<f32> {
    logits[i].clone()
}

/// Largest |a - b| relative to the logits' scale.
fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn assert_close(what: &str, a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) {
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        let d = max_rel_diff(x, y);
        assert!(
            d <= tol,
            "{what}: step {step}: relative difference {d} > {tol}"
        );
    }
}

#[test]
fn gguf_and_safetensors_give_the_same_logits_for_every_architecture() {
    for arch in Arch::ALL {
        let mut spec = TinySpec::new(arch);
        // llama.cpp ignores `llama.attention.sliding_window` (its Mistral GGUFs attend to the
        // whole context) where Hugging Face's Mistral applies the window: keep it out of reach.
        spec.sliding_window = spec.sliding_window.map(|_| 64);
        let t = tiny_with(spec);
        let hf = run(&t.hf_decoder());
        let decoder = gguf_decoder(&t.gguf(None));
        assert!(
            decoder.uses_cpu_path(),
            "{arch:?}: the GGUF should run on the CPU path"
        );
        let gguf = run(&decoder);
        // The same GGUF through Candle's tensors (the accelerator path's code).
        let candle = run(&gguf_decoder_with(&t.gguf(None), None));
        assert_close(
            &format!("{arch:?} CPU path vs Candle path"),
            &gguf,
            &candle,
            F16_CACHE_TOLERANCE,
        );
        // Same f32 weights; only the rope pairing (GGUF llama permutes q/k) and summation order
        // differ, amplified where a value rounds differently into the f16 KV cache.
        assert_close(arch.model_type(), &hf, &gguf, F16_CACHE_TOLERANCE);
    }
}

/// Candle's own implementation of the architecture, fed the same safetensors.
fn candle_reference(t: &Tiny) -> Vec<Vec<f32>> {
    use candle_transformers::models as m;
    let dev = Device::Cpu;
    let files = [t.hf_dir.join("model.safetensors")];
    // SAFETY: test files written above and not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &dev) }.expect("vb");
    let cfg_text = std::fs::read_to_string(t.hf_dir.join("config.json")).expect("config");
    let mut steps: Vec<Tensor> = Vec::new();
    let prompt = Tensor::new(&PROMPT[..], &dev)
        .and_then(|x| x.unsqueeze(0))
        .expect("input");
    let tok = |id: u32| {
        Tensor::new(&[id], &dev)
            .and_then(|x| x.unsqueeze(0))
            .expect("input")
    };
    match t.spec.arch {
        Arch::Llama => {
            let cfg: m::llama::LlamaConfig = serde_json::from_str(&cfg_text).expect("cfg");
            let cfg = cfg.into_config(false);
            let model = m::llama::Llama::load(vb, &cfg).expect("load");
            let mut cache = m::llama::Cache::new(true, DType::F32, &cfg, &dev).expect("cache");
            steps.push(model.forward(&prompt, 0, &mut cache).expect("fwd"));
            for (i, &id) in CONTINUATION.iter().enumerate() {
                steps.push(
                    model
                        .forward(&tok(id), PROMPT.len() + i, &mut cache)
                        .expect("fwd"),
                );
            }
        }
        Arch::Mistral => {
            let cfg: m::mistral::Config = serde_json::from_str(&cfg_text).expect("cfg");
            let mut model = m::mistral::Model::new(&cfg, vb).expect("load");
            steps.push(model.forward(&prompt, 0).expect("fwd"));
            for (i, &id) in CONTINUATION.iter().enumerate() {
                steps.push(model.forward(&tok(id), PROMPT.len() + i).expect("fwd"));
            }
        }
        Arch::Qwen2 => {
            let cfg: m::qwen2::Config = serde_json::from_str(&cfg_text).expect("cfg");
            let mut model = m::qwen2::ModelForCausalLM::new(&cfg, vb).expect("load");
            steps.push(model.forward(&prompt, 0).expect("fwd"));
            for (i, &id) in CONTINUATION.iter().enumerate() {
                steps.push(model.forward(&tok(id), PROMPT.len() + i).expect("fwd"));
            }
        }
        Arch::Qwen3 => {
            let cfg: m::qwen3::Config = serde_json::from_str(&cfg_text).expect("cfg");
            let mut model = m::qwen3::ModelForCausalLM::new(&cfg, vb).expect("load");
            steps.push(model.forward(&prompt, 0).expect("fwd"));
            for (i, &id) in CONTINUATION.iter().enumerate() {
                steps.push(model.forward(&tok(id), PROMPT.len() + i).expect("fwd"));
            }
        }
        Arch::Phi3 => {
            let cfg: m::phi3::Config = serde_json::from_str(&cfg_text).expect("cfg");
            let mut model = m::phi3::Model::new(&cfg, vb).expect("load");
            steps.push(model.forward(&prompt, 0).expect("fwd"));
            for (i, &id) in CONTINUATION.iter().enumerate() {
                steps.push(model.forward(&tok(id), PROMPT.len() + i).expect("fwd"));
            }
        }
    }
    steps
        .into_iter()
        .map(|l| {
            // Implementations return (1, vocab) or (1, 1, vocab) for the last position.
            l.flatten_all()
                .and_then(|l| {
                    let n = l.dim(0)?;
                    l.narrow(0, n - t.spec.vocab, t.spec.vocab)
                })
                .and_then(|l| l.to_dtype(DType::F32))
                .and_then(|l| l.to_vec1::<f32>())
                .expect("reference logits")
        })
        .collect()
}

#[test]
fn decoder_agrees_with_candle_transformers_for_every_architecture() {
    for arch in Arch::ALL {
        let mut spec = TinySpec::new(arch);
        // candle-transformers' Mistral lets a token see `window + 1` positions where Hugging Face
        // and llama.cpp see `window` (tested separately below): keep the window out of reach.
        spec.sliding_window = spec.sliding_window.map(|_| 64);
        let t = tiny_with(spec);
        let ours = run(&t.hf_decoder());
        let reference = candle_reference(&t);
        // Candle keeps keys and values in f32; ours are f16 on the CPU, as llama.cpp's.
        assert_close(
            &format!("{arch:?} vs candle-transformers"),
            &ours,
            &reference,
            F16_CACHE_TOLERANCE,
        );
        // The device path keeps them in f32 too: only summation order differs.
        let device = run(&t.device_decoder(false));
        assert_close(
            &format!("{arch:?} device path vs candle-transformers"),
            &device,
            &reference,
            F32_REORDER_TOLERANCE,
        );
    }
}

#[test]
fn quantized_gguf_agrees_with_candle_quantized_llama() {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let t = tiny(Arch::Llama);
    let f32_logits = run(&t.hf_decoder());
    for q in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::BF16,
    ] {
        let path = t.gguf(Some(q));
        let ours = run(&gguf_decoder(&path));
        let candle_path = run(&gguf_decoder_with(&path, None));
        // Both quantize activations to 8 bits per block, but Candle rounds half away from zero
        // with 1/d where ggml's x86 code (and ours) rounds half to even with 127/amax: a few
        // quants per block differ by one step. A wrong kernel is off by O(1).
        assert_close(
            &format!("{q:?} kernels vs Candle's"),
            &ours,
            &candle_path,
            1e-2,
        );

        let mut file = std::fs::File::open(&path).expect("open");
        let content =
            candle_core::quantized::gguf_file::Content::read(&mut file).expect("read gguf");
        let mut model =
            ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("load reference");
        let mut reference = Vec::new();
        let input = Tensor::new(&PROMPT[..], &Device::Cpu)
            .and_then(|x| x.unsqueeze(0))
            .expect("input");
        let first = model.forward(&input, 0).expect("fwd");
        reference.push(
            first
                .flatten_all()
                .and_then(|l| l.to_vec1::<f32>())
                .expect("logits"),
        );
        for (i, &id) in CONTINUATION.iter().enumerate() {
            let input = Tensor::new(&[id], &Device::Cpu)
                .and_then(|x| x.unsqueeze(0))
                .expect("input");
            let l = model.forward(&input, PROMPT.len() + i).expect("fwd");
            reference.push(
                l.flatten_all()
                    .and_then(|l| l.to_vec1::<f32>())
                    .expect("logits"),
            );
        }
        // The reference runs Candle's quantized kernels and an f32 cache (see both notes above).
        assert_close(
            &format!("{q:?} vs quantized_llama"),
            &ours,
            &reference,
            1e-2,
        );
        // And quantization keeps the model close to its f32 self.
        let tol = match q {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 0.25,
            GgmlDType::Q5K => 0.12,
            _ => 0.06,
        };
        assert_close(&format!("{q:?} vs f32"), &ours, &f32_logits, tol);
    }
}

#[test]
fn batched_forward_equals_each_sequence_alone() {
    let t = tiny(Arch::Qwen2);
    let decoder = t.hf_decoder();
    let prompts: [&[u32]; 3] = [&[5, 6, 7, 8, 9, 10, 11], &[100, 101], &[42]];
    // Alone.
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut cache = decoder.new_cache();
            let mut out = vec![row(
                &decoder
                    .forward(&mut [ForwardItem {
                        cache: &mut cache,
                        tokens: p,
                    }])
                    .expect("prefill"),
                0,
            )];
            for t in [1u32, 2] {
                out.push(row(
                    &decoder
                        .forward(&mut [ForwardItem {
                            cache: &mut cache,
                            tokens: &[t],
                        }])
                        .expect("decode"),
                    0,
                ));
            }
            out
        })
        .collect();
    // Together: the three prompts in one forward, then two decode steps for all three.
    let mut caches: Vec<_> = prompts.iter().map(|_| decoder.new_cache()).collect();
    let mut together: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 3];
    let mut feeds: Vec<Vec<&[u32]>> = vec![prompts.to_vec(), vec![&[1]; 3], vec![&[2]; 3]];
    for feed in feeds.drain(..) {
        let mut items: Vec<ForwardItem<'_>> = caches
            .iter_mut()
            .zip(&feed)
            .map(|(cache, tokens)| ForwardItem { cache, tokens })
            .collect();
        let logits = decoder.forward(&mut items).expect("batched forward");
        for (i, out) in together.iter_mut().enumerate() {
            out.push(row(&logits, i));
        }
    }
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        // A matmul over more rows may sum in another order; the f16 cache amplifies that.
        assert_close(&format!("sequence {i}"), a, b, F16_CACHE_TOLERANCE);
    }
}

#[test]
fn sliding_window_hides_tokens_that_left_the_window() {
    let t = tiny(Arch::Mistral);
    let decoder = t.hf_decoder();
    let window = t.spec.sliding_window.expect("mistral spec has a window");
    let last = |prefix: &[u32]| {
        let mut tokens = prefix.to_vec();
        tokens.extend_from_slice(&[9, 8, 7, 6, 5, 4]);
        let mut cache = decoder.new_cache();
        let logits = decoder
            .forward(&mut [ForwardItem {
                cache: &mut cache,
                tokens: &tokens,
            }])
            .expect("forward");
        row(&logits, 0)
    };
    assert_eq!(window, 6);
    // The last position attends to exactly the last 6 tokens in layer 0, but deeper layers see
    // earlier positions through them; with 2 layers the receptive field is 2 * (6 - 1) + 1.
    let a = last(&[1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 18]);
    let b = last(&[200, 201, 202, 10, 11, 12, 13, 14, 15, 16, 17, 18]);
    assert!(
        max_rel_diff(&a, &b) < 1e-6,
        "tokens outside the receptive field changed the logits"
    );
    let c = last(&[1, 2, 3, 10, 11, 12, 13, 14, 15, 16, 17, 250]);
    assert!(
        max_rel_diff(&a, &c) > 1e-3,
        "a token inside the window did not matter"
    );
}

/// llama.cpp does not apply Phi-3's `sliding_window` (the converter writes 2047 or 262144; its
/// loader turns the window off), so neither do we, from GGUF or from `config.json`: past the
/// window the logits are the whole-context computation's.
#[test]
fn phi3_ignores_its_sliding_window_as_llama_cpp_does() {
    let mut spec = TinySpec::new(Arch::Phi3);
    spec.sliding_window = Some(16);
    let windowed = tiny_with(spec.clone());
    spec.sliding_window = None;
    let plain = tiny_with(spec);
    let prompt = token_stream(5, 40);
    let last = |decoder: &Decoder| {
        assert_eq!(decoder.config().sliding_window, None);
        let mut cache = decoder.new_cache();
        let logits = decoder
            .forward(&mut [ForwardItem {
                cache: &mut cache,
                tokens: &prompt,
            }])
            .expect("forward");
        row(&logits, 0)
    };
    let gguf = windowed.gguf(None);
    let file = GgufFile::open(&gguf).expect("open");
    assert_eq!(
        file.get_usize("phi3.attention.sliding_window")
            .expect("key"),
        Some(16),
        "the test file carries the window"
    );
    let with_key = last(&gguf_decoder(&gguf));
    let without_key = last(&gguf_decoder(&plain.gguf(None)));
    assert_eq!(with_key, without_key, "the GGUF window changed the logits");
    let candle = last(&gguf_decoder_with(&gguf, None));
    assert!(max_rel_diff(&with_key, &candle) < F16_CACHE_TOLERANCE);
    let hf_text = std::fs::read_to_string(windowed.hf_dir.join("config.json")).expect("config");
    assert!(hf_text.contains("\"sliding_window\": 16"), "{hf_text}");
    let hf = last(&windowed.hf_decoder());
    assert!(max_rel_diff(&with_key, &hf) < F16_CACHE_TOLERANCE);
}

#[test]
fn context_overflow_is_an_error_before_any_work() {
    let t = tiny(Arch::Llama);
    let decoder = t.hf_decoder();
    let mut cache = decoder.new_cache();
    let too_long = vec![1u32; t.spec.context + 1];
    let err = decoder
        .forward(&mut [ForwardItem {
            cache: &mut cache,
            tokens: &too_long,
        }])
        .map(|_| ())
        .expect_err("must refuse");
    assert!(matches!(err, ModelError::ContextOverflow { .. }), "{err}");
    assert_eq!(cache.len(), 0);
    let err = decoder
        .forward(&mut [ForwardItem {
            cache: &mut cache,
            tokens: &[300],
        }])
        .map(|_| ())
        .expect_err("out of vocabulary");
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn truncated_gguf_files_give_errors_at_every_cut() {
    let t = tiny(Arch::Qwen3);
    let path = t.gguf(Some(GgmlDType::Q8_0));
    let bytes = std::fs::read(&path).expect("read");
    let cut_path = path.with_file_name("cut.gguf");
    let mut cuts: Vec<usize> = (0..64).collect();
    cuts.extend((64..bytes.len()).step_by(bytes.len() / 97 + 1));
    cuts.push(bytes.len() - 1);
    for cut in cuts {
        std::fs::write(&cut_path, &bytes[..cut]).expect("write");
        let result = GgufFile::open(&cut_path).and_then(|f| f.vocab().map(|_| f));
        match result {
            Err(GgufError::Corrupt { .. } | GgufError::BadMagic { .. }) => {}
            Err(e) => panic!("cut at {cut}: unexpected error kind: {e}"),
            Ok(_) => panic!("cut at {cut} of {}: accepted a truncated file", bytes.len()),
        }
    }
}

#[test]
fn corrupt_headers_give_typed_errors_not_panics() {
    let t = tiny(Arch::Llama);
    let good = std::fs::read(t.gguf(None)).expect("read");
    let dir = TempDir::new("corrupt");
    let p = dir.path().join("x.gguf");
    let open = |bytes: &[u8]| {
        std::fs::write(&p, bytes).expect("write");
        GgufFile::open(&p)
    };
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(open(&b), Err(GgufError::BadMagic { .. })));
    let mut b = good.clone();
    b[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(matches!(
        open(&b),
        Err(GgufError::UnsupportedVersion { version: 9, .. })
    ));
    let mut b = good.clone();
    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes()); // metadata count
    assert!(matches!(open(&b), Err(GgufError::Corrupt { .. })));
    let mut b = good.clone();
    b[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes()); // first key's length
    assert!(matches!(open(&b), Err(GgufError::Corrupt { .. })));
    let err = GgufFile::open(&dir.path().join("missing.gguf")).expect_err("missing");
    assert!(err.to_string().contains("missing.gguf"), "{err}");
}

#[test]
fn unsupported_tensor_types_and_architectures_are_named() {
    use common::gguf_writer::GgufWriter;
    use llm_worker_rbee::model::gguf::GgufValue;
    let dir = TempDir::new("unsupported");
    let p = dir.path().join("iq.gguf");
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama");
    w.tensor(
        "blk.0.attn_q.weight",
        &[256],
        llm_worker_rbee::kernels::WeightType::F32,
        vec![0; 1024],
    );
    let mut bytes = w.to_bytes();
    // Rewrite the tensor's type id (after name, n_dims and one dim) to IQ2_XXS (16).
    let name = b"blk.0.attn_q.weight";
    let pos = bytes
        .windows(name.len())
        .position(|win| win == name)
        .expect("tensor entry")
        + name.len()
        + 4
        + 8;
    bytes[pos..pos + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&p, &bytes).expect("write");
    let err = GgufFile::open(&p).expect_err("IQ type");
    assert!(
        matches!(&err, GgufError::UnsupportedTensorType { name, type_id: 16, .. } if name == "blk.0.attn_q.weight"),
        "{err}"
    );

    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String("mamba".into()));
    w.write(&p).expect("write");
    let file = GgufFile::open(&p).expect("open");
    let err = ModelConfig::from_gguf(&file).expect_err("unsupported arch");
    assert!(err.to_string().contains("mamba"), "{err}");
    // The same through the loader the worker uses.
    let err = llm_worker_rbee::model::load_model(&p, &Default::default())
        .map(|_| ())
        .expect_err("unsupported arch");
    assert!(err.to_string().contains("\"mamba\""), "{err}");

    // An unknown model_type in config.json is refused by name, not misread as llama; so is
    // Gemma 3's multimodal config (only its text model, gemma3_text, is read).
    let mut cfg_json = TinySpec::new(Arch::Llama).config_json();
    cfg_json["model_type"] = "mamba".into();
    let err = ModelConfig::from_hf_json(&cfg_json.to_string(), "config.json")
        .expect_err("unknown model_type");
    assert!(err.to_string().contains("\"mamba\""), "{err}");
    cfg_json["model_type"] = "gemma3".into();
    cfg_json["text_config"] = serde_json::json!({});
    let err = ModelConfig::from_hf_json(&cfg_json.to_string(), "config.json")
        .expect_err("multimodal gemma3");
    assert!(err.to_string().contains("gemma3_text"), "{err}");

    // LongRoPE factors are read for Phi-3 (tests/families.rs runs them against llama.cpp); in a
    // file of another architecture, whose llama.cpp graph ignores them, they are refused rather
    // than silently dropped.
    for (arch, accepted) in [(Arch::Phi3, true), (Arch::Llama, false)] {
        let t = tiny(arch);
        let mut w = gguf_writer(&t.spec, &random_weights(&t.spec, 3), None);
        let half = t.spec.head_dim / 2;
        w.tensor_f32("rope_factors_long.weight", &[half], &vec![1.5; half]);
        w.tensor_f32("rope_factors_short.weight", &[half], &vec![1.0; half]);
        w.write(&p).expect("write");
        let file = GgufFile::open(&p).expect("open");
        match ModelConfig::from_gguf(&file) {
            Ok(_) => assert!(accepted, "{arch:?}: LongRoPE factors accepted"),
            Err(err) => {
                assert!(!accepted, "{arch:?}: {err}");
                assert!(err.to_string().contains("rope_factors_"), "{err}");
            }
        }
    }
}

#[test]
fn wrong_shapes_and_missing_tensors_name_the_tensor() {
    let t = tiny(Arch::Qwen2);
    // Shape mismatch: claim a larger FFN than the weights have.
    let mut cfg_json = t.spec.config_json();
    cfg_json["intermediate_size"] = 768.into();
    std::fs::write(t.hf_dir.join("config.json"), cfg_json.to_string()).expect("write");
    let cfg = ModelConfig::from_hf_json(&cfg_json.to_string(), "config.json").expect("cfg");
    let store = WeightStore::open_safetensors(&t.hf_dir, &[t.hf_dir.join("model.safetensors")])
        .expect("open");
    let err = Decoder::load(cfg, &store, &Device::Cpu, 64, None)
        .map(|_| ())
        .expect_err("shape");
    match err {
        ModelError::ShapeMismatch {
            tensor,
            expected,
            got,
            ..
        } => {
            assert!(tensor.contains("mlp"), "{tensor}");
            assert_eq!(expected[0], 768);
            assert_eq!(got[0], 512);
        }
        other => panic!("expected a shape mismatch, got {other}"),
    }

    // Missing tensor: a GGUF without the final norm.
    let weights: Vec<NamedWeight> = random_weights(&t.spec, 5)
        .into_iter()
        .filter(|w| w.name != "model.norm.weight")
        .collect();
    let path = t.hf_dir.with_file_name("missing-norm.gguf");
    gguf_writer(&t.spec, &weights, None)
        .write(&path)
        .expect("write");
    let file = GgufFile::open(&path).expect("open");
    let cfg = ModelConfig::from_gguf(&file).expect("cfg");
    let err = Decoder::load(
        cfg,
        &WeightStore::Gguf(Arc::new(file)),
        &Device::Cpu,
        64,
        Some(pool()),
    )
    .map(|_| ())
    .expect_err("missing");
    assert!(
        matches!(&err, ModelError::MissingTensor { tensor, .. } if tensor == "output_norm.weight"),
        "{err}"
    );
}

#[test]
fn load_model_reads_weights_tokenizer_template_and_stop_tokens_from_both_formats() {
    use llm_worker_rbee::model::chat_template::ChatMessage;
    use llm_worker_rbee::model::{LoadOptions, ModelFormat, load_model};
    let t = tiny(Arch::Qwen3);
    let gguf = t.gguf(Some(GgmlDType::Q8_0));
    for (path, format) in [
        (t.hf_dir.clone(), ModelFormat::Safetensors),
        (gguf, ModelFormat::Gguf),
    ] {
        let model = load_model(&path, &LoadOptions::default()).expect("load");
        assert_eq!(model.format, format);
        assert_eq!(model.decoder.uses_cpu_path(), format == ModelFormat::Gguf);
        assert!(
            model.eog_tokens.contains(&2),
            "{format:?}: {:?}",
            model.eog_tokens
        );
        let ids = model.tokenizer.encode("hi!", false).expect("encode");
        assert_eq!(ids, vec![u32::from(b'h'), u32::from(b'i'), u32::from(b'!')]);
        let template = model.chat_template.as_ref().expect("template");
        let prompt = template
            .render(&[ChatMessage::new("user", "hi")], true)
            .expect("render");
        assert_eq!(prompt, "<user>hi<assistant>");
        let mut cache = model.decoder.new_cache();
        let logits = model
            .decoder
            .forward(&mut [ForwardItem {
                cache: &mut cache,
                tokens: &ids,
            }])
            .expect("forward");
        assert_eq!(logits[0].len(), t.spec.vocab);
        assert!(logits[0].iter().all(|l| l.is_finite()));
    }
}

#[test]
fn a_chat_template_that_does_not_compile_leaves_the_model_usable() {
    use llm_worker_rbee::model::{LoadOptions, load_model};
    let t = tiny(Arch::Llama);
    let broken = "{% for m in messages %}<{{ m['role'] }}>";
    let gguf = t.hf_dir.with_file_name("broken-template.gguf");
    let mut writer = gguf_writer(&t.spec, &random_weights(&t.spec, 5), None);
    writer.metadata("tokenizer.chat_template", broken);
    writer.write(&gguf).expect("write");
    let config_path = t.hf_dir.join("tokenizer_config.json");
    let config = std::fs::read_to_string(&config_path).expect("read");
    let mut config: serde_json::Value = serde_json::from_str(&config).expect("json");
    config["chat_template"] = broken.into();
    std::fs::write(&config_path, config.to_string()).expect("write");
    for path in [gguf, t.hf_dir.clone()] {
        let model = load_model(&path, &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(model.chat_template.is_none(), "{}", path.display());
        assert!(model.tokenizer.encode("hi", false).is_ok());
    }
}

// The accelerators' path (Candle attention over KV tensors, `AttentionPath::Device`), which the
// CUDA and Metal builds run, checked here on the CPU device against the CPU's host path.

/// Relative logit tolerance between two runs of the device path that differ only in how rows
/// are grouped into matmuls (batching, chunking): f32 throughout, so only summation order
/// differs (observed: about 1e-6).
const F32_REORDER_TOLERANCE: f32 = 1e-5;

/// Deterministic token ids below the tiny vocabulary.
fn token_stream(seed: u32, len: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (x >> 16) % 256
        })
        .collect()
}

/// Tokens fed to each of three sequences at each step (0: the sequence sits the step out).
/// Sequence 0 reaches 270 positions at step 3, past the first cache allocation (256).
const SCHEDULE: [[usize; 7]; 3] = [
    [100, 1, 60, 109, 1, 1, 1],
    [9, 1, 1, 0, 1, 1, 1],
    [0, 0, 13, 7, 1, 1, 1],
];

struct ScheduleRun {
    /// Per sequence, the logits after each chunk it was fed.
    logits: Vec<Vec<Vec<f32>>>,
    /// Per step, sequence 0's cache bytes after it.
    first_cache_bytes: Vec<usize>,
}

/// Runs `chunks[s]` of `streams[s]` for every sequence; `together`: one forward per step over
/// every sequence fed that step, else each sequence alone.
fn run_schedule(
    decoder: &Decoder,
    streams: &[Vec<u32>],
    chunks: &[Vec<usize>],
    together: bool,
) -> ScheduleRun {
    let mut caches: Vec<_> = streams.iter().map(|_| decoder.new_cache()).collect();
    let mut fed = vec![0usize; streams.len()];
    let mut logits = vec![Vec::new(); streams.len()];
    let mut first_cache_bytes = Vec::new();
    let steps = chunks.iter().map(Vec::len).max().unwrap_or(0);
    for step in 0..steps {
        let active: Vec<usize> = (0..streams.len())
            .filter(|&s| chunks[s].get(step).copied().unwrap_or(0) > 0)
            .collect();
        let groups: Vec<Vec<usize>> = if together {
            vec![active]
        } else {
            active.into_iter().map(|s| vec![s]).collect()
        };
        for group in groups {
            let mut items = Vec::new();
            for (s, cache) in caches.iter_mut().enumerate() {
                if group.contains(&s) {
                    let n = chunks[s][step];
                    items.push(ForwardItem {
                        cache,
                        tokens: &streams[s][fed[s]..fed[s] + n],
                    });
                }
            }
            let out = decoder.forward(&mut items).expect("forward");
            drop(items);
            for (i, &s) in group.iter().enumerate() {
                fed[s] += chunks[s][step];
                logits[s].push(out[i].clone());
                assert_eq!(caches[s].len(), fed[s]);
            }
        }
        first_cache_bytes.push(caches[0].allocated_bytes());
    }
    ScheduleRun {
        logits,
        first_cache_bytes,
    }
}

#[test]
fn device_path_on_the_cpu_matches_the_host_path_for_every_architecture() {
    for arch in Arch::ALL {
        let mut spec = TinySpec::new(arch);
        // Room to grow the cache past its first 256 positions; Mistral keeps its 6-token window
        // so chunks longer than the window go through the mask.
        spec.context = 512;
        let t = tiny_with(spec);
        let host = t.hf_decoder();
        let device = t.device_decoder(false);
        assert_eq!(host.attention_path(), AttentionPath::Host);
        assert_eq!(device.attention_path(), AttentionPath::Device);

        let streams: Vec<Vec<u32>> = (0..3).map(|s| token_stream(s + arch as u32, 300)).collect();
        let chunks: Vec<Vec<usize>> = SCHEDULE.iter().map(|c| c.to_vec()).collect();
        let on_host = run_schedule(&host, &streams, &chunks, true);
        let batched = run_schedule(&device, &streams, &chunks, true);
        let alone = run_schedule(&device, &streams, &chunks, false);
        // Sequence 0's cache grew at step 3, keeping what it held.
        let bytes = &batched.first_cache_bytes;
        assert!(
            bytes[3] == 2 * bytes[2] && bytes[0] == bytes[2],
            "{arch:?}: cache bytes per step {bytes:?}"
        );
        for s in 0..3 {
            // Host keys and values are f16 (see F16_CACHE_TOLERANCE); the device's are f32.
            assert_close(
                &format!("{arch:?} sequence {s}: device vs host"),
                &batched.logits[s],
                &on_host.logits[s],
                F16_CACHE_TOLERANCE,
            );
            assert_close(
                &format!("{arch:?} sequence {s}: device batched vs alone"),
                &batched.logits[s],
                &alone.logits[s],
                F32_REORDER_TOLERANCE,
            );
        }
        // Sequence 0's 270-token prompt in one forward instead of four chunks.
        let whole = vec![vec![270, 1, 1, 1]];
        let at_once = run_schedule(&device, &streams[..1], &whole, false);
        assert_close(
            &format!("{arch:?}: prompt in chunks vs at once"),
            &batched.logits[0][3..],
            &at_once.logits[0],
            F32_REORDER_TOLERANCE,
        );
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy generation of `n` tokens after `prompt`, fed in chunks of `chunk`: the ids and the
/// logits each was chosen from.
fn greedy(decoder: &Decoder, prompt: &[u32], chunk: usize, n: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = decoder.new_cache();
    let mut last = Vec::new();
    for part in prompt.chunks(chunk) {
        last = decoder
            .forward(&mut [ForwardItem {
                cache: &mut cache,
                tokens: part,
            }])
            .expect("prefill")
            .remove(0);
    }
    let (mut ids, mut steps) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let next = argmax(&last);
        ids.push(next);
        steps.push(last);
        last = decoder
            .forward(&mut [ForwardItem {
                cache: &mut cache,
                tokens: &[next],
            }])
            .expect("decode")
            .remove(0);
    }
    (ids, steps)
}

#[test]
fn device_path_greedy_continuation_equals_the_host_path() {
    for arch in Arch::ALL {
        let mut spec = TinySpec::new(arch);
        spec.context = 512;
        let t = tiny_with(spec);
        // 245 prompt tokens in chunks of 64, then 24 decoded: the cache grows mid-decode.
        let prompt = token_stream(7 + arch as u32, 245);
        let (host_ids, host_logits) = greedy(&t.hf_decoder(), &prompt, 64, 24);
        let (device_ids, _) = greedy(&t.device_decoder(false), &prompt, 64, 24);
        // The paths' logits differ by up to F16_CACHE_TOLERANCE, so only a near-tie could pick
        // differently; these seeds have none (the closest top two are 4.9e-3 of the scale
        // apart), so the ids must be equal. (Llama and Qwen2, with tied embeddings, repeat one
        // token; the others vary.)
        if let Some(step) = (0..host_ids.len()).find(|&i| host_ids[i] != device_ids[i]) {
            let l = &host_logits[step];
            let scale = l.iter().fold(1f32, |m, v| m.max(v.abs()));
            let mut sorted = l.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            panic!(
                "{arch:?}: greedy ids diverge at step {step} (host top-2 margin {} of scale \
                 {scale}): host {host_ids:?}, device {device_ids:?}",
                sorted[0] - sorted[1]
            );
        }
    }
}

#[test]
fn device_path_runs_gguf_weights_float_and_quantized() {
    for arch in Arch::ALL {
        let t = tiny(arch);
        for (quant, tol) in [
            (None, F16_CACHE_TOLERANCE),
            // Both quantize activations to 8 bits before each matmul (Candle's kernels here,
            // ours on the CPU path), so the f16-vs-f32 cache difference above flips a few
            // activation quants per block; observed up to 0.034. A wrong mask, position or
            // cache copy moves logits by O(0.1) or more.
            (Some(GgmlDType::Q8_0), 5e-2),
        ] {
            let path = t.gguf(quant);
            let host = gguf_decoder(&path);
            let file = GgufFile::open(&path).expect("open gguf");
            let cfg = ModelConfig::from_gguf(&file).expect("gguf config");
            let device = Decoder::load_with(
                cfg,
                &WeightStore::Gguf(Arc::new(file)),
                &Device::Cpu,
                t.spec.context,
                device_options(false),
            )
            .expect("load");
            assert!(host.uses_cpu_path() && !device.uses_cpu_path());
            assert_close(
                &format!("{arch:?} {quant:?}: device vs CPU path"),
                &run(&device),
                &run(&host),
                tol,
            );
        }
    }
}

/// [`run`] on the model in `dir`, loaded by `load_model` as the CPU worker serves it.
fn load_and_run(dir: &std::path::Path) -> Vec<Vec<f32>> {
    use llm_worker_rbee::model::{LoadOptions, load_model};
    let model = load_model(dir, &LoadOptions::default()).expect("load");
    run(&model.decoder)
}

#[test]
fn half_precision_weights_stay_close_to_f32_on_the_device_path() {
    for arch in Arch::ALL {
        let t = tiny(arch);
        let full = run(&t.device_decoder(false));
        let half = run(&t.device_decoder(true));
        // F32 matrices become F16 and every matmul input is rounded to F16 (2^-11 relative);
        // two layers of that moved the logits by up to 1.2e-3 here.
        assert_close(&format!("{arch:?} f16 weights"), &half, &full, 5e-3);
        assert!(
            half.iter()
                .zip(&full)
                .any(|(a, b)| max_rel_diff(a, b) > 0.0),
            "{arch:?}: half precision changed nothing: were the matrices converted?"
        );
        // A BF16 checkpoint stays BF16 (8-bit mantissa, 2^-8 relative per rounding): up to
        // 8e-3 observed against the f32 checkpoint.
        let bf16_dir = t.hf_dir.with_file_name("hf-bf16");
        write_hf_dir_with(&bf16_dir, &t.spec, &t.weights, DType::BF16, 1);
        let bf16 = run(&hf_dir_decoder(
            &bf16_dir,
            t.spec.context,
            device_options(true),
        ));
        assert_close(&format!("{arch:?} bf16 weights"), &bf16, &full, 3e-2);
    }
}

#[test]
fn f16_and_bf16_safetensors_load_and_match_f32() {
    for arch in Arch::ALL {
        let t = tiny(arch);
        let full = load_and_run(&t.hf_dir);
        // On the CPU the stored halves are widened to f32, so only the weights' rounding
        // differs: 2^-11 relative for F16, 2^-8 for BF16 (observed: up to 1.1e-3 and 6e-3).
        for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
            let dir = t.hf_dir.with_file_name(format!("hf-{dtype:?}"));
            write_hf_dir_with(&dir, &t.spec, &t.weights, dtype, 1);
            assert_close(
                &format!("{arch:?} {dtype:?} checkpoint vs f32"),
                &load_and_run(&dir),
                &full,
                tol,
            );
        }
    }
}

#[test]
fn sharded_safetensors_give_the_same_logits_as_one_file() {
    for arch in Arch::ALL {
        let t = tiny(arch);
        let dir = t.hf_dir.with_file_name("hf-sharded");
        write_hf_dir_with(&dir, &t.spec, &t.weights, DType::F32, 2);
        assert!(!dir.join("model.safetensors").exists());
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("index"),
        )
        .expect("index json");
        let shards: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .expect("weight map")
            .values()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(shards.len(), 2, "{shards:?}");
        // The same f32 values through the same code: bit for bit.
        assert_eq!(load_and_run(&dir), load_and_run(&t.hf_dir), "{arch:?}");
    }
}

#[test]
fn generation_config_eos_token_ids_join_the_end_of_generation_set() {
    use llm_worker_rbee::model::{LoadOptions, load_model};
    let t = tiny(Arch::Llama);
    let eog = || {
        load_model(&t.hf_dir, &LoadOptions::default())
            .expect("load")
            .eog_tokens
    };
    // config.json and tokenizer_config.json declare 2.
    assert_eq!(eog(), vec![2]);
    for (eos, expected) in [
        (serde_json::json!(7), vec![2, 7]),
        (serde_json::json!([7, 9]), vec![2, 7, 9]),
    ] {
        std::fs::write(
            t.hf_dir.join("generation_config.json"),
            serde_json::json!({"bos_token_id": 1, "eos_token_id": eos}).to_string(),
        )
        .expect("write generation config");
        assert_eq!(eog(), expected, "eos_token_id {eos}");
    }
}

/// The one matrix of [`mixed_gguf`] stored in another type than the others' Q8_0.
const MIXED_TENSOR: &str = "blk.1.attn_v.weight";

/// `t`'s weights as a Q8_0 GGUF, with [`MIXED_TENSOR`] as `mixed` when given.
fn mixed_gguf(t: &Tiny, mixed: Option<GgmlDType>) -> std::path::PathBuf {
    let path = t.hf_dir.with_file_name(format!(
        "mixed-{}.gguf",
        mixed.map_or("none".into(), |q| format!("{q:?}"))
    ));
    let quant = |name: &str| match mixed {
        Some(q) if name == MIXED_TENSOR => Some(q),
        _ => Some(GgmlDType::Q8_0),
    };
    gguf_writer_with(&t.spec, &t.weights, quant)
        .write(&path)
        .expect("write gguf");
    path
}

thread_local! {
    /// Where this thread's log lines go while [`with_logs`] runs.
    static CAPTURE: std::cell::RefCell<Option<Arc<std::sync::Mutex<Vec<u8>>>>> =
        const { std::cell::RefCell::new(None) };
}

/// The writer of the one global subscriber: the calling thread's capture buffer, if any.
struct ThreadCapture;

impl std::io::Write for ThreadCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with_borrow(|c| {
            if let Some(c) = c {
                c.lock().expect("log buffer").extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with this thread's info-and-above log lines captured; returns `f`'s result and
/// the lines. One global subscriber serves every thread: a per-thread scoped one
/// (`with_default`) can miss events when another test thread, without it, reaches the same
/// call site first and `tracing` caches that the site is never enabled.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_writer(|| ThreadCapture)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
    });
    let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
    CAPTURE.with_borrow_mut(|c| *c = Some(buffer.clone()));
    let out = f();
    CAPTURE.with_borrow_mut(|c| *c = None);
    let text = String::from_utf8(buffer.lock().expect("log buffer").clone()).expect("utf-8");
    (out, text.lines().map(str::to_string).collect())
}

fn tensor_type<'a>(types: &'a [TensorTypeUse], dtype: &str) -> &'a TensorTypeUse {
    types
        .iter()
        .find(|t| t.dtype == dtype)
        .unwrap_or_else(|| panic!("no {dtype} in {types:?}"))
}

#[test]
fn the_compute_path_says_which_path_runs_and_why() {
    use llm_worker_rbee::model::{LoadOptions, load_model};
    let t = tiny(Arch::Llama);
    let matrices = t.weights.iter().filter(|w| w.shape.len() == 2).count();
    let vectors = t.weights.len() - matrices;

    // Every type supported: the CPU kernels' path, every tensor on it, no warning.
    let (model, logs) = with_logs(|| load_model(&mixed_gguf(&t, None), &LoadOptions::default()));
    let model = model.expect("load");
    let compute = model.decoder.compute_path();
    assert!(model.decoder.uses_cpu_path());
    assert_eq!(compute.forward, ForwardPath::CpuKernels);
    assert_eq!(compute.reason(), None);
    assert_eq!(compute.path_name(), "cpu-kernels");
    assert_eq!(
        compute.cpu_kernels,
        Some(llm_worker_rbee::kernels::detect())
    );
    let q8 = tensor_type(&compute.tensor_types, "Q8_0");
    assert_eq!(
        (q8.count, q8.cpu_kernels, q8.path()),
        (matrices, matrices, "cpu-kernels")
    );
    let f32s = tensor_type(&compute.tensor_types, "F32");
    assert_eq!((f32s.count, f32s.path()), (vectors, "cpu-kernels"));
    assert!(!logs.iter().any(|l| l.contains("WARN")), "{logs:#?}");
    let info: Vec<_> = logs
        .iter()
        .filter(|l| l.contains("compute path:"))
        .collect();
    assert_eq!(info.len(), 1, "{logs:#?}");
    assert!(info[0].contains(" INFO "), "{}", info[0]);
    assert!(
        info[0].contains(&format!(
            "compute path: cpu-kernels; Q8_0×{matrices} cpu-kernels, F32×{vectors} cpu-kernels"
        )),
        "{}",
        info[0]
    );

    // Every GGUF type the loader reads is one the kernels read too, so a file that mixes them
    // stays on the kernels' path and lists each type there (a matrix of a type they did not
    // read would send the whole forward to Candle with a warning naming it).
    for (dtype, name) in [
        (GgmlDType::Q3K, "Q3_K"),
        (GgmlDType::Q2K, "Q2_K"),
        (GgmlDType::BF16, "BF16"),
    ] {
        let path = mixed_gguf(&t, Some(dtype));
        let (model, logs) = with_logs(|| load_model(&path, &LoadOptions::default()));
        let model = model.expect("load");
        let compute = model.decoder.compute_path();
        assert_eq!(compute.forward, ForwardPath::CpuKernels, "{name}");
        let mixed = tensor_type(&compute.tensor_types, name);
        assert_eq!(
            (mixed.count, mixed.cpu_kernels, mixed.path()),
            (1, 1, "cpu-kernels")
        );
        let q8 = tensor_type(&compute.tensor_types, "Q8_0");
        assert_eq!((q8.count, q8.path()), (matrices - 1, "cpu-kernels"));
        assert!(!logs.iter().any(|l| l.contains(" WARN ")), "{logs:#?}");
        assert!(
            logs.iter().any(|l| l.contains(" INFO ")
                && l.contains("compute path: cpu-kernels;")
                && l.contains(&format!("{name}×1 cpu-kernels"))),
            "{logs:#?}"
        );
    }
    let path = mixed_gguf(&t, Some(GgmlDType::Q3K));

    // Paths chosen by the device or the options are reasons too, but no warning.
    let (decoders, logs) = with_logs(|| {
        let file = GgufFile::open(&path).expect("open gguf");
        let cfg = ModelConfig::from_gguf(&file).expect("gguf config");
        let store = WeightStore::Gguf(Arc::new(file));
        let load = |options| {
            Decoder::load_with(cfg.clone(), &store, &Device::Cpu, 64, options).expect("load")
        };
        [
            load(DecoderOptions::default()),
            load(device_options(false)),
            t.hf_decoder(),
        ]
    });
    let reasons: Vec<_> = decoders
        .iter()
        .map(|d| d.compute_path().reason().cloned())
        .collect();
    assert_eq!(
        reasons,
        [
            Some(CandlePathReason::KernelsDisabled),
            Some(CandlePathReason::DeviceAttention),
            Some(CandlePathReason::Safetensors),
        ]
    );
    assert!(!logs.iter().any(|l| l.contains(" WARN ")), "{logs:#?}");
    assert_eq!(
        tensor_type(&decoders[2].compute_path().tensor_types, "F32").path(),
        "candle"
    );
}

/// llama-quantize's Q4_K_M stores many matrices of models whose hidden size is not a multiple of
/// 256 as Q5_0 (some files Q5_1): a GGUF of those runs on our CPU kernels, every matrix read in
/// place, close to Candle's own quantized kernels and to the f32 model.
#[test]
fn q5_0_and_q5_1_matrices_run_on_the_cpu_kernels() {
    let t = tiny(Arch::Qwen2);
    // Attention and embedding matrices Q5_0, the feed-forward ones Q5_1.
    let types = [WeightType::Q5_0, WeightType::Q5_1, WeightType::Q5_0];
    let (path, ours) = run_typed_on_kernels(&t, "model-q5.gguf", types);
    // Same activation-rounding difference as in `quantized_gguf_agrees_with_candle_quantized_llama`.
    assert_close(
        "Q5_0/Q5_1 kernels vs Candle's",
        &ours,
        &run(&gguf_decoder_with(&path, None)),
        1e-2,
    );
    assert_close("Q5_0/Q5_1 vs f32", &ours, &run(&t.hf_decoder()), 0.12);
}

/// llama-quantize's Q2_K and Q3_K_M files store most matrices as Q2_K and Q3_K; BF16 is the
/// dense type of many converted checkpoints. A GGUF of those runs on our CPU kernels, every
/// matrix read in place, close to Candle's own kernels on the same file.
#[test]
fn q2_k_q3_k_and_bf16_matrices_run_on_the_cpu_kernels() {
    let t = tiny(Arch::Llama);
    // Attention matrices Q3_K, feed-forward Q2_K, embeddings and output BF16.
    let types = [WeightType::Q3K, WeightType::Q2K, WeightType::BF16];
    let (path, ours) = run_typed_on_kernels(&t, "model-q2k-q3k-bf16.gguf", types);
    // Same activation-rounding difference as in `quantized_gguf_agrees_with_candle_quantized_llama`.
    assert_close(
        "Q2_K/Q3_K/BF16 kernels vs Candle's",
        &ours,
        &run(&gguf_decoder_with(&path, None)),
        1e-2,
    );
}

/// llama-quantize's IQ4_XS files store most matrices as IQ4_XS and mix in IQ4_NL (rows that are
/// not a multiple of 256); Candle has neither type. A GGUF of those runs on our CPU kernels,
/// every matrix read in place, close to the same file with those matrices stored as F32 of
/// their dequantized values; with the kernels off it still loads (the IQ4 matrices dequantized
/// at load for Candle's path) and gives that F32 file's logits.
#[test]
fn iq4_nl_and_iq4_xs_matrices_run_on_the_cpu_kernels() {
    let t = tiny(Arch::Llama);
    // Attention matrices IQ4_NL, feed-forward IQ4_XS, the embeddings (tied output) Q8_0.
    let types = [WeightType::IQ4NL, WeightType::IQ4XS, WeightType::Q8_0];
    let (path, ours) = run_typed_on_kernels(&t, "model-iq4.gguf", types);
    let twin = t.hf_dir.with_file_name("model-iq4-as-f32.gguf");
    write_dequantized_iq4(&path, &twin);
    // The IQ4 matrices see Q8_0/Q8_K-rounded activations, the F32 ones the f32 activations.
    assert_close(
        "IQ4 kernels vs the dequantized F32 file",
        &ours,
        &run(&gguf_decoder(&twin)),
        1e-2,
    );

    // Candle's path: the same dense f32 matrices as the F32 file's, so the same logits.
    let candle = gguf_decoder_with(&path, None);
    let compute = candle.compute_path();
    assert_eq!(compute.reason(), Some(&CandlePathReason::KernelsDisabled));
    for dtype in ["IQ4_NL", "IQ4_XS"] {
        assert_eq!(tensor_type(&compute.tensor_types, dtype).path(), "candle");
    }
    assert_close(
        "IQ4 on Candle's path vs the dequantized F32 file",
        &run(&candle),
        &run(&gguf_decoder_with(&twin, None)),
        0.0,
    );
}

/// `t`'s weights as the GGUF `file_name` (beside its Hugging Face directory) with its attention
/// matrices, feed-forward matrices and other matrices (embeddings, output) stored as `types`
/// says, run on our CPU kernels: the whole forward runs there and every stored type is read in
/// place. Returns the file and its logits ([`run`]), all finite.
fn run_typed_on_kernels(
    t: &Tiny,
    file_name: &str,
    types: [WeightType; 3],
) -> (std::path::PathBuf, Vec<Vec<f32>>) {
    let [attn, ffn, other] = types;
    let quant = |name: &str| {
        Some(if name.contains("attn_") {
            attn
        } else if name.contains("ffn_") {
            ffn
        } else {
            other
        })
    };
    let path = t.hf_dir.with_file_name(file_name);
    gguf_writer_typed(&t.spec, &t.weights, quant)
        .write(&path)
        .expect("write gguf");
    let decoder = gguf_decoder(&path);
    assert!(decoder.uses_cpu_path());
    let compute = decoder.compute_path();
    assert_eq!(compute.forward, ForwardPath::CpuKernels);
    assert_eq!(compute.path_name(), "cpu-kernels");
    for ty in types {
        assert!(tensor_type(&compute.tensor_types, &ty.to_string()).count > 0);
    }
    for ty in &compute.tensor_types {
        assert_eq!(
            (ty.cpu_kernels, ty.path()),
            (ty.count, "cpu-kernels"),
            "{file_name}: {}",
            ty.dtype
        );
    }
    let logits = run(&decoder);
    assert!(logits.iter().flatten().all(|l| l.is_finite()));
    (path, logits)
}

/// `path`'s GGUF written to `out` with every IQ4_NL and IQ4_XS tensor stored as F32, its values
/// dequantized by the kernels; everything else as it was.
fn write_dequantized_iq4(path: &std::path::Path, out: &std::path::Path) {
    use common::gguf_writer::GgufWriter;
    let file = GgufFile::open(path).expect("open gguf");
    let mut w = GgufWriter::new();
    for (key, value) in file.metadata() {
        w.metadata(key, value.clone());
    }
    for name in file.tensor_names() {
        let info = file.tensor_info(name).expect("listed tensor");
        let (shape, bytes) = (info.shape(), file.tensor_bytes(info));
        if !matches!(info.ty, WeightType::IQ4NL | WeightType::IQ4XS) {
            w.tensor(name, &shape, info.ty, bytes.to_vec());
            continue;
        }
        let cols = info.dims[0];
        let m = QMatrix::new(info.ty, bytes.len() / info.ty.row_bytes(cols), cols, bytes)
            .expect("matrix");
        let mut values = vec![0f32; m.rows * cols];
        for (r, row) in values.chunks_exact_mut(cols).enumerate() {
            llm_worker_rbee::kernels::dequantize_row(&m, r, row).expect("dequantize");
        }
        w.tensor_f32(name, &shape, &values);
    }
    w.write(out).expect("write gguf");
}
