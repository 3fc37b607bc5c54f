//! Property tests of the GGUF reader and the loading built on it: a valid tiny model file,
//! truncated anywhere or with bytes (and whole length fields) changed anywhere, loads or is
//! refused with an error — never a panic, and never an allocation the file does not justify.
//!
//! Allocation is measured by this binary's own counting `#[global_allocator]`: the peak of live
//! heap bytes above what was live before a load, across every thread (the tests of this binary
//! run one at a time, so nothing else allocates meanwhile). The memory map itself is not heap.
//! The bound is a small multiple of the file's size plus a constant: parsed metadata costs a
//! few times its encoded size (a one-byte `u8` item is a 32-byte `GgufValue`), and a tokenizer
//! and a chat template cost a fixed amount to build. A length field read from the file and
//! trusted (`Vec::with_capacity(n)` before checking `n` against the bytes left) breaks it by
//! orders of magnitude.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::gguf_writer::GgufWriter;
use common::tiny_models::{
    Arch, TempDir, TinySpec, byte_vocab, gguf_writer, random_weights, write_gpt2_tokenizer,
};
use llm_worker_rbee::kernels::WeightType;
use llm_worker_rbee::model::config::ModelConfig;
use llm_worker_rbee::model::gguf::{GgufFile, GgufValue};
use llm_worker_rbee::model::tokenizer::TextTokenizer;
use llm_worker_rbee::model::{LoadOptions, load_model};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

// ---------------------------------------------------------------------------------------------
// The counting allocator

struct CountingAlloc;

/// Heap bytes live now, and the most live since the last [`measure`] began.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl CountingAlloc {
    fn grew(by: usize) {
        let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn shrank(by: usize) {
        LIVE.fetch_sub(by, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are atomics
// and never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        Self::shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                Self::grew(new_size - layout.size());
            } else {
                Self::shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The tests of this binary run one at a time, so that the allocator counts only the load
/// under measurement.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f`; its result and the peak of heap bytes it had live beyond those live before.
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let out = f();
    let peak = PEAK.load(Ordering::SeqCst);
    (out, peak.saturating_sub(base))
}

/// What loading a file of `len` bytes may allocate at its peak: 64 bytes a byte (an array of
/// one-byte items costs 32 bytes an item, reserved at once, plus the copies a load makes) and
/// 1 MiB for the fixed costs of a tokenizer and a chat template (about 100 KiB today).
fn allocation_bound(len: usize) -> usize {
    64 * len + (1 << 20)
}

// ---------------------------------------------------------------------------------------------
// The files and their mutations

/// A small file that exercises every part of the reader: every metadata value type, nested
/// arrays, a byte-level vocabulary, a chat template, and tensors of several types and ranks.
fn metadata_rich_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama");
    w.metadata("general.name", "props");
    w.metadata("general.alignment", 32u32);
    w.metadata("llama.block_count", 1u32);
    w.metadata("llama.context_length", 64u32);
    w.metadata("llama.embedding_length", 32u32);
    w.metadata("llama.feed_forward_length", 64u32);
    w.metadata("llama.attention.head_count", 2u32);
    w.metadata("llama.attention.head_count_kv", 1u32);
    w.metadata("llama.rope.freq_base", 10_000f32);
    w.metadata("llama.attention.layer_norm_rms_epsilon", 1e-5f32);
    for (key, value) in [
        ("props.u8", GgufValue::U8(7)),
        ("props.i8", GgufValue::I8(-7)),
        ("props.u16", GgufValue::U16(700)),
        ("props.i16", GgufValue::I16(-700)),
        ("props.i32", GgufValue::I32(-70_000)),
        ("props.u64", GgufValue::U64(7 << 40)),
        ("props.i64", GgufValue::I64(-7 << 40)),
        ("props.f64", GgufValue::F64(0.5)),
        (
            "props.bytes",
            GgufValue::Array((0..40).map(GgufValue::U8).collect()),
        ),
        (
            "props.nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I16(1), GgufValue::I16(2)]),
                GgufValue::Array(vec![GgufValue::I16(3)]),
            ]),
        ),
    ] {
        w.metadata(key, value);
    }
    write_gpt2_tokenizer(&mut w, byte_vocab(), 256);
    w.metadata(
        "tokenizer.chat_template",
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}",
    );
    w.tensor_f32("token_embd.weight", &[4, 8], &[0.5; 32]);
    w.tensor("norm.f16", &[16], WeightType::F16, vec![0; 32]);
    w.tensor("q8.weight", &[2, 32], WeightType::Q8_0, vec![0; 68]);
    w.tensor("cube.weight", &[2, 2, 2, 2], WeightType::F32, vec![0; 64]);
    w.to_bytes()
}

/// The tiny Llama (one layer, 32 wide, f32) written as GGUF.
fn tiny_model_gguf() -> Vec<u8> {
    let spec = TinySpec {
        hidden: 32,
        intermediate: 64,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 16,
        context: 64,
        ..TinySpec::new(Arch::Llama)
    };
    gguf_writer(&spec, &random_weights(&spec, 11), None).to_bytes()
}

/// Where the metadata and tensor directory end and the tensor data begins.
fn data_start(bytes: &[u8], dir: &Path) -> usize {
    let path = dir.join("valid.gguf");
    std::fs::write(&path, bytes).expect("write the valid file");
    let file = GgufFile::open(&path).expect("the valid file opens");
    file.tensor_names()
        .map(|n| file.tensor_info(n).expect("listed tensor").offset)
        .min()
        .unwrap_or(bytes.len())
}

/// One change to a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// One byte set to `value`.
    Byte { at: Index, value: u8 },
    /// `width` (4 or 8) bytes set to a little-endian value: a length, count, type or offset
    /// field given a value of the reader's worst cases.
    Word { at: Index, width: usize, value: u64 },
    /// The file cut at `at`.
    Truncate { at: Index },
}

/// The values a corrupt length or count field most likely takes.
fn field_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX / 2 + 1),
        Just(u64::from(u32::MAX)),
        Just(1 << 31),
        Just(1 << 32),
        Just(1 << 40),
        0..1024u64,
        any::<u64>(),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::Byte { at, value }),
        4 => (any::<Index>(), prop_oneof![Just(4usize), Just(8)], field_value())
            .prop_map(|(at, width, value)| Mutation::Word { at, width, value }),
        1 => any::<Index>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

/// A list of changes, and whether they fall anywhere in the file (`false`: in the metadata and
/// tensor directory, where the reader's decisions are).
fn mutations() -> impl Strategy<Value = (Vec<Mutation>, bool)> {
    (
        prop::collection::vec(mutation(), 1..5),
        prop::bool::weighted(0.2),
    )
}

fn apply(valid: &[u8], header_len: usize, mutations: &[Mutation], anywhere: bool) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    for m in mutations {
        let region = if anywhere {
            bytes.len()
        } else {
            header_len.min(bytes.len())
        };
        if region == 0 {
            break;
        }
        match m {
            Mutation::Byte { at, value } => bytes[at.index(region)] = *value,
            Mutation::Word { at, width, value } => {
                let start = at.index(region);
                let end = (start + width).min(bytes.len());
                bytes[start..end].copy_from_slice(&value.to_le_bytes()[..end - start]);
            }
            Mutation::Truncate { at } => bytes.truncate(at.index(region)),
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------------
// What a load does with a file

/// Everything the worker reads from a GGUF without building the decoder: the header, every
/// tensor's bytes, the architecture, the vocabulary and the tokenizer built from it.
fn read_everything(path: &Path) -> Result<(), String> {
    let file = GgufFile::open(path).map_err(|e| e.to_string())?;
    for name in file.tensor_names() {
        let info = file
            .tensor_info(name)
            .ok_or("a listed tensor has no info")?;
        let bytes = file.tensor_bytes(info);
        assert_eq!(bytes.len(), info.n_bytes, "{name}");
        assert_eq!(
            info.n_bytes,
            info.dims.iter().product::<usize>() / info.ty.block_size() * info.ty.block_bytes()
        );
    }
    let config = ModelConfig::from_gguf(&file).map(|_| ());
    let tokenizer = file
        .vocab()
        .map_err(|e| e.to_string())
        .and_then(|v| TextTokenizer::from_gguf_vocab(&v).map_err(|e| e.to_string()));
    if let Ok(t) = &tokenizer {
        // A tokenizer built from a changed vocabulary still encodes and decodes.
        let ids = t.encode("hello, wörld", false).map_err(|e| e.to_string())?;
        t.decode(&ids, true).map_err(|e| e.to_string())?;
    }
    config.map_err(|e| e.to_string())?;
    tokenizer.map(|_| ())
}

/// The worker's whole load: decoder, tokenizer, chat template.
fn load(path: &Path) -> Result<(), String> {
    let options = LoadOptions {
        threads: Some(1),
        ..LoadOptions::default()
    };
    load_model(path, &options)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Writes each changed file to `dir` and runs `what` on it: it returns or fails, and its
/// allocation stays within [`allocation_bound`].
fn check_mutations(
    cases: u32,
    valid: &[u8],
    dir: &Path,
    what: fn(&Path) -> Result<(), String>,
) -> usize {
    let header_len = data_start(valid, dir);
    let path = dir.join("mutated.gguf");
    let refused = std::cell::Cell::new(0usize);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&mutations(), |(mutations, anywhere)| {
        let bytes = apply(valid, header_len, &mutations, anywhere);
        std::fs::write(&path, &bytes).expect("write the changed file");
        let (result, peak) = measure(|| what(&path));
        refused.set(refused.get() + usize::from(result.is_err()));
        let bound = allocation_bound(bytes.len());
        if peak > bound {
            return Err(TestCaseError::fail(format!(
                "a {}-byte file allocated {peak} bytes at its peak (bound {bound}); result: {result:?}",
                bytes.len()
            )));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    refused.get()
}

// ---------------------------------------------------------------------------------------------
// The properties

#[test]
fn changed_files_are_read_or_refused_within_bounded_memory() {
    let _serial = one_at_a_time();
    let dir = TempDir::new("gguf-props-read");
    let valid = metadata_rich_gguf();
    let valid_path = dir.path().join("valid.gguf");
    std::fs::write(&valid_path, &valid).expect("write");
    let (result, peak) = measure(|| read_everything(&valid_path));
    result.expect("the unchanged file reads");
    eprintln!(
        "the unchanged {}-byte file: {peak} bytes at the peak",
        valid.len()
    );
    assert!(peak <= allocation_bound(valid.len()), "{peak}");

    let refused = check_mutations(5000, &valid, dir.path(), read_everything);
    // The mutations are meant to hit the reader's checks, not to be ignored.
    assert!(
        refused > 1000,
        "only {refused} of 5000 changed files were refused"
    );
}

#[test]
fn changed_models_load_or_are_refused_within_bounded_memory() {
    let _serial = one_at_a_time();
    let dir = TempDir::new("gguf-props-load");
    let valid = tiny_model_gguf();
    let valid_path = dir.path().join("valid.gguf");
    std::fs::write(&valid_path, &valid).expect("write");
    let (result, peak) = measure(|| load(&valid_path));
    result.expect("the unchanged model loads");
    eprintln!(
        "the unchanged {}-byte file: {peak} bytes at the peak",
        valid.len()
    );
    assert!(peak <= allocation_bound(valid.len()), "{peak}");

    check_mutations(2000, &valid, dir.path(), load);
}

/// Every position of the metadata and tensor directory in turn holds a huge length: wherever
/// it lands (a string's length, an array's count, the metadata or tensor count, a dimension,
/// an offset), the file is refused, or read, without allocating for the length.
#[test]
fn a_huge_length_anywhere_in_the_header_allocates_nothing_for_it() {
    let _serial = one_at_a_time();
    let dir = TempDir::new("gguf-props-sweep");
    let valid = metadata_rich_gguf();
    let header_len = data_start(&valid, dir.path());
    let path = dir.path().join("swept.gguf");
    for at in 0..header_len {
        let mut bytes = valid.clone();
        let end = (at + 8).min(bytes.len());
        bytes[at..end].copy_from_slice(&(1u64 << 40).to_le_bytes()[..end - at]);
        std::fs::write(&path, &bytes).expect("write");
        let (result, peak) = measure(|| read_everything(&path));
        assert!(
            peak <= allocation_bound(bytes.len()),
            "2^40 at byte {at}: {peak} bytes allocated at the peak; result: {result:?}"
        );
    }
}

/// Each of the model's hyper-parameters and special token ids in turn takes values from 0 to
/// `u32::MAX`: the model loads or is refused, without allocating for the value.
#[test]
fn any_hyperparameter_value_loads_or_is_refused_within_bounded_memory() {
    let _serial = one_at_a_time();
    let dir = TempDir::new("gguf-props-hparams");
    let valid = tiny_model_gguf();
    let path = dir.path().join("hparams.gguf");
    let keys = [
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.attention.key_length",
        "llama.attention.value_length",
        "llama.rope.dimension_count",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.vocab_size",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
    ];
    for key in keys {
        let found = valid
            .windows(key.len())
            .position(|w| w == key.as_bytes())
            .unwrap_or_else(|| panic!("{key} is in the file"));
        // The key, its 4-byte type, then its 4-byte value.
        let at = found + key.len() + 4;
        for value in [0u32, 1, 3, 1 << 20, 1 << 30, u32::MAX] {
            let mut bytes = valid.clone();
            bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            std::fs::write(&path, &bytes).expect("write");
            let (result, peak) = measure(|| load(&path));
            assert!(
                peak <= allocation_bound(bytes.len()),
                "{key} = {value}: {peak} bytes allocated at the peak; result: {result:?}"
            );
        }
    }
}

/// The measurement itself sees an allocation, freed or not.
#[test]
fn the_allocator_counts_the_peak() {
    let _serial = one_at_a_time();
    // The previous test's thread may still be freeing a little as this one measures.
    let slack = 64 << 10;
    let (_, peak) = measure(|| std::hint::black_box(vec![1u8; 3 << 20]).len());
    assert!(peak >= (3 << 20) - slack, "{peak}");
    let (kept, peak) = measure(|| std::hint::black_box(vec![1u8; 1 << 20]));
    assert!(peak >= (1 << 20) - slack && kept.len() == 1 << 20, "{peak}");
}

// ---------------------------------------------------------------------------------------------
// What a loaded model keeps

/// The loader takes the tokenizer's lists out of the parsed metadata instead of copying them:
/// kept, a 150k vocabulary's strings stay on the heap beside the tokenizer built from them.
#[test]
fn take_vocab_moves_the_tokenizer_lists_out_of_the_metadata() {
    let _serial = one_at_a_time();
    let dir = TempDir::new("gguf-props-take-vocab");
    let path = dir.path().join("vocab.gguf");
    std::fs::write(&path, metadata_rich_gguf()).expect("write");
    let mut file = GgufFile::open(&path).expect("open");
    let copied = file.vocab().expect("vocab");
    let taken = file.take_vocab().expect("take_vocab");
    assert_eq!(taken.tokens, copied.tokens);
    assert_eq!(taken.merges, copied.merges);
    assert_eq!(taken.token_types, copied.token_types);
    assert_eq!(taken.scores, copied.scores);
    assert_eq!(taken.model, copied.model);
    assert_eq!(taken.eos_token_id, copied.eos_token_id);
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.scores",
    ] {
        assert!(file.get(key).is_none(), "{key} is still held");
    }
    assert!(file.get("tokenizer.ggml.model").is_some());
    assert!(file.get("general.architecture").is_some());
}

/// A matrix used in place holds the memory map, not the parsed file: the metadata goes when
/// the loader's store does, and the weights still read.
#[test]
fn a_mapped_matrix_keeps_the_map_not_the_parsed_file() {
    use candle_core::{DType, Device};
    use llm_worker_rbee::model::weights::{
        DenseDType, Placement, RawWeight, WeightName, WeightStore,
    };
    let _serial = one_at_a_time();
    let dir = TempDir::new("gguf-props-mapped");
    let path = dir.path().join("mapped.gguf");
    std::fs::write(&path, metadata_rich_gguf()).expect("write");
    let file = std::sync::Arc::new(GgufFile::open(&path).expect("open"));
    let parsed = std::sync::Arc::downgrade(&file);
    let shape = file
        .tensor_info("token_embd.weight")
        .expect("embedding")
        .shape();
    let store = WeightStore::Gguf(file);
    let at = Placement {
        device: &Device::Cpu,
        dense: DenseDType::Exactly(DType::F32),
        in_place: true,
    };
    let weight = store
        .load(WeightName::TokenEmbedding, &shape, at)
        .expect("load")
        .expect("present");
    assert!(matches!(weight, RawWeight::Mapped(_)));
    drop(store);
    assert!(
        parsed.upgrade().is_none(),
        "the parsed file outlived its store"
    );
    let values = weight.to_dense_f32(&Device::Cpu).expect("read");
    let values: Vec<f32> = values.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(values, vec![0.5; 32]);
}
