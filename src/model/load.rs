//! Loading a model from a path: a GGUF file, or a Hugging Face directory with `config.json`,
//! safetensors weights, `tokenizer.json`, and optionally `tokenizer_config.json` and
//! `generation_config.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use super::ModelError;
use super::chat_template::ChatTemplate;
use super::config::ModelConfig;
use super::decoder::Decoder;
use super::gguf::GgufFile;
use super::tokenizer::TextTokenizer;
use super::weights::WeightStore;
use crate::kernels::ThreadPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

impl ModelFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Gguf => "gguf",
            Self::Safetensors => "safetensors",
        }
    }
}

pub struct LoadOptions {
    pub device: Device,
    /// Serving context; `None` uses the model's trained context.
    pub context_length: Option<usize>,
    /// CPU compute threads; `None` uses one per physical core.
    pub threads: Option<usize>,
    /// On the CPU, multiply GGUF matrices in place with our kernels (`false`: Candle's).
    pub cpu_kernels: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            context_length: None,
            threads: None,
            cpu_kernels: true,
        }
    }
}

impl LoadOptions {
    fn cpu_pool(&self) -> Option<Arc<ThreadPool>> {
        (self.device.is_cpu() && self.cpu_kernels).then(|| {
            Arc::new(ThreadPool::with_spin(
                self.threads.unwrap_or_else(physical_cores).max(1),
                std::time::Duration::from_millis(2),
            ))
        })
    }
}

/// Physical cores (hyper-threads share their core's execution units, so extra compute threads
/// on them only add contention), falling back to the logical count.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cores = BTreeSet::new();
    for cpu in 0..logical {
        let base = format!("/sys/devices/system/cpu/cpu{cpu}/topology");
        let read = |f: &str| std::fs::read_to_string(format!("{base}/{f}")).ok();
        match (read("physical_package_id"), read("core_id")) {
            (Some(p), Some(c)) => {
                cores.insert((p.trim().to_string(), c.trim().to_string()));
            }
            _ => return logical,
        }
    }
    cores.len().clamp(1, logical)
}

/// A model ready to run: decoder, tokenizer, chat template and end-of-generation tokens.
pub struct LoadedModel {
    pub decoder: Decoder,
    pub tokenizer: Arc<TextTokenizer>,
    /// The model's own chat template, if it ships one.
    pub chat_template: Option<ChatTemplate>,
    /// Tokens that end generation, sorted.
    pub eog_tokens: Vec<u32>,
    /// A default served name: the file stem or the directory name.
    pub name: String,
    pub format: ModelFormat,
    pub path: PathBuf,
    pub load_time: Duration,
}

pub fn load_model(path: &Path, options: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let start = Instant::now();
    let meta = std::fs::metadata(path).map_err(|_| ModelError::MissingFile {
        path: path.to_path_buf(),
        what: "model file or directory".into(),
    })?;
    let parts = if meta.is_dir() {
        load_hf_dir(path)?
    } else {
        load_gguf(path)?
    };
    let decoder = Decoder::load(
        parts.cfg.clone(),
        &parts.store,
        &options.device,
        options
            .context_length
            .unwrap_or(parts.cfg.max_position_embeddings),
        options.cpu_pool(),
    )?;
    release_freed_heap();
    Ok(LoadedModel {
        decoder,
        tokenizer: Arc::new(parts.tokenizer),
        chat_template: parts.chat_template,
        eog_tokens: parts.eog_tokens,
        name: parts
            .name
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
        format: parts.format,
        path: path.to_path_buf(),
        load_time: start.elapsed(),
    })
}

/// Returns the heap that building something big freed to the system. Building a tokenizer
/// allocates and frees hundreds of thousands of short strings (metadata, vocabulary copies);
/// glibc keeps the holes they leave in its arenas resident, for a 128k vocabulary tens of MB.
pub(crate) fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks malloc's own free lists; it is safe from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What a format's loader finds before the decoder is built.
struct ModelParts<'a> {
    cfg: ModelConfig,
    store: WeightStore,
    tokenizer: TextTokenizer,
    chat_template: Option<ChatTemplate>,
    eog_tokens: Vec<u32>,
    format: ModelFormat,
    /// The served name's source: the file stem or the directory name.
    name: Option<&'a std::ffi::OsStr>,
}

fn load_gguf(path: &Path) -> Result<ModelParts<'_>, ModelError> {
    let mut file = GgufFile::open(path)?;
    let cfg = ModelConfig::from_gguf(&file)?;
    let vocab = file.take_vocab()?;
    let tokenizer = TextTokenizer::from_gguf_vocab(&vocab).map_err(|e| ModelError::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let token_text = |id: Option<u32>| -> String {
        id.and_then(|i| vocab.tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    };
    let chat_template = file.get_str("tokenizer.chat_template")?.and_then(|source| {
        usable_template(
            path,
            ChatTemplate::new(
                source,
                &token_text(vocab.bos_token_id),
                &token_text(vocab.eos_token_id),
            ),
        )
    });
    let mut explicit = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
        "tokenizer.ggml.fim_pad_token_id",
        "tokenizer.ggml.fim_rep_token_id",
        "tokenizer.ggml.fim_sep_token_id",
    ] {
        if let Some(id) = file.get_usize(key)? {
            explicit.push(id as u32);
        }
    }
    Ok(ModelParts {
        eog_tokens: end_of_generation_tokens(&vocab.tokens, &explicit),
        cfg,
        store: WeightStore::Gguf(Arc::new(file)),
        tokenizer,
        chat_template,
        format: ModelFormat::Gguf,
        name: path.file_stem(),
    })
}

/// A chat template that does not compile is not a reason to refuse the model (its completions
/// API works without one): like llama.cpp, warn and serve plain ChatML for chat requests.
fn usable_template<T, E: std::fmt::Display>(path: &Path, template: Result<T, E>) -> Option<T> {
    template
        .inspect_err(|e| {
            tracing::warn!(
                path = %path.display(),
                "the model's chat template is unusable ({e}); chat requests use ChatML"
            );
        })
        .ok()
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, ModelError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// The safetensors files of a checkpoint: `model.safetensors`, or the shards an index lists.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    let Some(index) = read_json(&index_path)? else {
        return Err(ModelError::MissingFile {
            path: dir.to_path_buf(),
            what: "model.safetensors or model.safetensors.index.json".into(),
        });
    };
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Json {
            path: index_path.clone(),
            message: "no weight_map object".into(),
        })?;
    let mut files = BTreeSet::new();
    for v in map.values() {
        let name = v.as_str().ok_or_else(|| ModelError::Json {
            path: index_path.clone(),
            message: "weight_map values must be file names".into(),
        })?;
        if name.contains('/') || name.contains("..") {
            return Err(ModelError::Json {
                path: index_path.clone(),
                message: format!("shard name {name:?} leaves the model directory"),
            });
        }
        files.insert(name.to_string());
    }
    let mut paths = Vec::with_capacity(files.len());
    for name in files {
        let p = dir.join(&name);
        if !p.is_file() {
            return Err(ModelError::MissingFile {
                path: p,
                what: "safetensors shard listed in the index".into(),
            });
        }
        paths.push(p);
    }
    Ok(paths)
}

/// A token string from a config field that is either a string or `{"content": ...}`.
fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn load_hf_dir(dir: &Path) -> Result<ModelParts<'_>, ModelError> {
    let config_path = dir.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).map_err(|_| ModelError::MissingFile {
            path: config_path.clone(),
            what: "config.json".into(),
        })?;
    let cfg = ModelConfig::from_hf_json(&config_text, &config_path.display().to_string())?;

    let tokenizer_path = dir.join("tokenizer.json");
    if !tokenizer_path.is_file() {
        return Err(ModelError::MissingFile {
            path: tokenizer_path,
            what: "tokenizer.json".into(),
        });
    }
    let tokenizer =
        TextTokenizer::from_tokenizer_json(&tokenizer_path).map_err(|e| ModelError::Tokenizer {
            path: tokenizer_path.clone(),
            message: e.to_string(),
        })?;

    let tokenizer_config_path = dir.join("tokenizer_config.json");
    let tokenizer_config = read_json(&tokenizer_config_path)?;
    let mut chat_template = tokenizer_config.as_ref().and_then(|tc| {
        usable_template(
            &tokenizer_config_path,
            ChatTemplate::from_tokenizer_config(tc, None),
        )
        .flatten()
    });
    // Newer checkpoints keep the template in its own file.
    let jinja = dir.join("chat_template.jinja");
    if chat_template.is_none()
        && let Ok(source) = std::fs::read_to_string(&jinja)
    {
        let (bos, eos) = match &tokenizer_config {
            Some(tc) => usable_template(
                &tokenizer_config_path,
                ChatTemplate::special_tokens_from_config(tc),
            )
            .unwrap_or_default(),
            None => (String::new(), String::new()),
        };
        chat_template = usable_template(&jinja, ChatTemplate::new(&source, &bos, &eos));
    }

    let mut explicit = Vec::new();
    if let Some(eos) = token_string(tokenizer_config.as_ref().and_then(|c| c.get("eos_token")))
        && let Some(id) = tokenizer.token_to_id(&eos)
    {
        explicit.push(id);
    }
    let generation_config = read_json(&dir.join("generation_config.json"))?;
    for source in [
        generation_config.as_ref(),
        Some(&serde_json::from_str::<serde_json::Value>(&config_text).unwrap_or_default()),
    ]
    .into_iter()
    .flatten()
    {
        match source.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => explicit.extend(n.as_u64().map(|v| v as u32)),
            Some(serde_json::Value::Array(a)) => {
                explicit.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
            }
            _ => {}
        }
    }
    let pieces: Vec<String> = (0..tokenizer.vocab_size() as u32)
        .map(|id| tokenizer.id_to_piece(id).unwrap_or_default().to_string())
        .collect();
    let files = safetensors_files(dir)?;
    Ok(ModelParts {
        eog_tokens: end_of_generation_tokens(&pieces, &explicit),
        store: WeightStore::open_safetensors(dir, &files)?,
        cfg,
        tokenizer,
        chat_template,
        format: ModelFormat::Safetensors,
        name: dir.file_name(),
    })
}

/// Token texts that end generation, as llama.cpp recognises them (end-of-turn markers and the
/// fill-in-the-middle control tokens), in addition to the ids a model declares.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    // fill-in-the-middle pad / repo / file-separator tokens
    "<|fim_pad|>",
    "<fim-pad>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

/// The end-of-generation set: declared ids plus tokens whose text is a known end marker.
pub fn end_of_generation_tokens(tokens: &[String], explicit: &[u32]) -> Vec<u32> {
    let mut set: BTreeSet<u32> = explicit
        .iter()
        .copied()
        .filter(|&id| (id as usize) < tokens.len())
        .collect();
    for (id, text) in tokens.iter().enumerate() {
        if EOG_TEXTS.contains(&text.as_str()) {
            set.insert(id as u32);
        }
    }
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eog_set_matches_llama_cpp_for_smollm2_vocab() {
        let tokens: Vec<String> = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<repo_name>",
            "<reponame>",
            "<file_sep>",
            "hello",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(end_of_generation_tokens(&tokens, &[2]), vec![0, 2, 4]);
    }

    #[test]
    fn explicit_ids_outside_the_vocabulary_are_ignored() {
        let tokens = vec!["a".to_string(), "b".to_string()];
        assert_eq!(end_of_generation_tokens(&tokens, &[1, 7]), vec![1]);
    }
}
