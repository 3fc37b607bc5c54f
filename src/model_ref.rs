//! `--model` as a path or as a model reference, resolved on this machine without network.
//!
//! A reference is `ORG/NAME` or `ORG/NAME:SUFFIX`, as the rbee keeper and hive pass it
//! (`TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF:tinyllama-1.1b-chat-v1.0.Q4_K_M.gguf`) and as
//! llama.cpp's `-hf` takes it (`bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M`). The suffix is a
//! GGUF file name or a quantization tag. It is looked up, in order, in:
//!
//! 1. rbee's model store: the hive's `model_download` copies the file to
//!    `{cache}/rbee/models/{id with '/' and ':' as '-'}/model.gguf` beside a `metadata.json`
//!    whose `artifact.path` names it (`{cache}`: `$XDG_CACHE_HOME`, else `~/.cache`);
//! 2. the Hugging Face hub cache: `models--ORG--NAME/snapshots/{revision}/` under
//!    `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `{cache}/huggingface/hub`; the revision is the
//!    one `refs/main` names, else the newest snapshot. Without a suffix a snapshot holding
//!    `config.json` is served as a safetensors directory; otherwise its one GGUF, or the first of
//!    Q4_K_M, Q5_K_M, Q4_0, Q5_0, Q8_0, F16 among several (rbee's download order).
//!
//! A reference found nowhere is an error naming every place looked at, before the worker
//! binds its port.

use std::path::{Path, PathBuf};

/// The quantizations tried, in order, when a reference names a repository of several GGUFs
/// and no file (the order rbee's hive downloads in).
const PREFERRED_QUANTS: [&str; 6] = ["Q4_K_M", "Q5_K_M", "Q4_0", "Q5_0", "Q8_0", "F16"];

/// Where `--model` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// No model named (or an empty `--model`, as the hive passes for a worker without one):
    /// the default model.
    Default,
    /// A file or directory given by its path.
    Path(PathBuf),
    /// A reference, and the file or directory it resolved to.
    Reference { reference: String, path: PathBuf },
}

impl ModelSource {
    /// The name the worker serves the model under when `--model-ref` does not set one: the
    /// reference itself (the queen matches jobs to workers on the exact string it spawned the
    /// worker with); `None` for a path or the default (the model's own name is used).
    pub fn served_name(&self) -> Option<&str> {
        match self {
            Self::Reference { reference, .. } => Some(reference),
            Self::Default | Self::Path(_) => None,
        }
    }
}

/// The directories references are looked up in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStores {
    /// rbee's model catalog, `{cache}/rbee/models`.
    pub rbee: PathBuf,
    /// The Hugging Face hub cache (the folder holding `models--ORG--NAME`).
    pub hf_hub: PathBuf,
}

impl ModelStores {
    /// The stores as this process's environment places them.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        let home = var("HOME").unwrap_or_else(|| PathBuf::from("/"));
        let cache = var("XDG_CACHE_HOME").unwrap_or_else(|| home.join(".cache"));
        let hf_hub = var("HF_HUB_CACHE")
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .unwrap_or_else(|| cache.join("huggingface").join("hub"));
        Self {
            rbee: cache.join("rbee").join("models"),
            hf_hub,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelRefError {
    #[error(
        "--model {given}: no such file or directory, and not a model reference (ORG/NAME[:QUANT])"
    )]
    NotFound { given: String },
    #[error("--model {given}: not a regular file or a directory")]
    NotAModel { given: String },
    #[error("--model {given}: {message}")]
    Unreadable { given: String, message: String },
    #[error("--model {reference}: model reference not found on this machine; looked in:{}", looked_list(.looked))]
    Unresolved {
        reference: String,
        /// Each place and what was (not) there.
        looked: Vec<String>,
    },
}

fn looked_list(looked: &[String]) -> String {
    looked.iter().map(|l| format!("\n  - {l}")).collect()
}

/// A parsed `ORG/NAME[:SUFFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reference<'a> {
    org: &'a str,
    name: &'a str,
    suffix: Option<&'a str>,
}

fn parse_reference(text: &str) -> Option<Reference<'_>> {
    let (repo, suffix) = match text.split_once(':') {
        Some((repo, suffix)) => (repo, Some(suffix)),
        None => (text, None),
    };
    let (org, name) = repo.split_once('/')?;
    // Hugging Face repository names: letters, digits, '-', '_', '.'; not starting with '.'.
    let valid = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !valid(org) || !valid(name) {
        return None;
    }
    if let Some(s) = suffix
        && (s.is_empty() || s.contains('/') || s.contains(".."))
    {
        return None;
    }
    Some(Reference { org, name, suffix })
}

/// Resolves `--model` (`None`: not given).
pub fn resolve(model: Option<&Path>, stores: &ModelStores) -> Result<ModelSource, ModelRefError> {
    let Some(model) = model else {
        return Ok(ModelSource::Default);
    };
    if model.as_os_str().is_empty() {
        return Ok(ModelSource::Default);
    }
    match std::fs::metadata(model) {
        // A FIFO, a device or a socket would leave the loader waiting or reading forever.
        Ok(meta) if !meta.is_file() && !meta.is_dir() => {
            return Err(ModelRefError::NotAModel {
                given: model.display().to_string(),
            });
        }
        Ok(_) => return Ok(ModelSource::Path(model.to_path_buf())),
        // There, but unreadable (permissions, a symlink loop): say so, not "not found".
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(ModelRefError::Unreadable {
                given: model.display().to_string(),
                message: e.to_string(),
            });
        }
        Err(_) => {}
    }
    let given = model.to_string_lossy().into_owned();
    let Some(reference) = parse_reference(&given) else {
        return Err(ModelRefError::NotFound { given });
    };
    let mut looked = Vec::new();
    if let Some(path) = in_rbee_store(&given, &stores.rbee, &mut looked) {
        return Ok(ModelSource::Reference {
            reference: given,
            path,
        });
    }
    if let Some(path) = in_hf_cache(&reference, &stores.hf_hub, &mut looked) {
        return Ok(ModelSource::Reference {
            reference: given,
            path,
        });
    }
    Err(ModelRefError::Unresolved {
        reference: given,
        looked,
    })
}

fn in_rbee_store(id: &str, store: &Path, looked: &mut Vec<String>) -> Option<PathBuf> {
    let dir = store.join(id.replace(['/', ':'], "-"));
    let file = dir.join("model.gguf");
    if file.is_file() {
        return Some(file);
    }
    let metadata = dir.join("metadata.json");
    let recorded = std::fs::read(&metadata)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v["artifact"]["path"].as_str().map(PathBuf::from));
    match recorded {
        Some(path) if path.exists() => Some(path),
        Some(path) => {
            looked.push(format!(
                "{} (rbee's model store: its metadata names {}, which does not exist)",
                metadata.display(),
                path.display()
            ));
            None
        }
        None => {
            looked.push(format!("{} (rbee's model store)", file.display()));
            None
        }
    }
}

fn in_hf_cache(r: &Reference<'_>, hub: &Path, looked: &mut Vec<String>) -> Option<PathBuf> {
    let repo = hub.join(format!("models--{}--{}", r.org, r.name));
    let Some(snapshot) = snapshot_dir(&repo) else {
        looked.push(format!(
            "{} (Hugging Face hub cache: no snapshot)",
            repo.join("snapshots").display()
        ));
        return None;
    };
    let place = format!("{} (Hugging Face hub cache", snapshot.display());
    if r.suffix.is_none() && snapshot.join("config.json").is_file() {
        return Some(snapshot);
    }
    let ggufs = gguf_files(&snapshot);
    let names: Vec<String> = ggufs
        .iter()
        .map(|p| p.strip_prefix(&snapshot).unwrap_or(p).display().to_string())
        .collect();
    let found = |what: &str| format!("{place}: {what}; GGUF files there: {})", list(&names));
    match r.suffix {
        Some(suffix) if suffix.to_ascii_lowercase().ends_with(".gguf") => {
            let hit = ggufs.iter().find(|p| {
                p.strip_prefix(&snapshot)
                    .is_ok_and(|rel| rel == Path::new(suffix))
                    || p.file_name().is_some_and(|n| n == suffix)
            });
            if hit.is_none() {
                looked.push(found(&format!("no file {suffix}")));
            }
            hit.cloned()
        }
        Some(tag) => {
            let hits: Vec<&PathBuf> = ggufs.iter().filter(|p| has_quant(p, tag)).collect();
            match hits.as_slice() {
                [one] => Some((*one).clone()),
                [] => {
                    looked.push(found(&format!("no GGUF quantized as {tag}")));
                    None
                }
                _ => {
                    looked.push(found(&format!("several GGUFs match {tag}; name the file")));
                    None
                }
            }
        }
        None => {
            if let [one] = ggufs.as_slice() {
                return Some(one.clone());
            }
            let preferred = PREFERRED_QUANTS
                .iter()
                .find_map(|q| ggufs.iter().find(|p| has_quant(p, q)));
            if preferred.is_none() {
                looked.push(found(
                    "no config.json and no single GGUF to choose; add :QUANT",
                ));
            }
            preferred.cloned()
        }
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The snapshot `refs/main` names, else the most recently modified one.
fn snapshot_dir(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if !rev.trim().is_empty() && dir.is_dir() {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// The model GGUFs of a snapshot (top level and one folder down; projector files excluded),
/// sorted by path.
fn gguf_files(snapshot: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![(snapshot.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            // Hub snapshots are symlinks into `blobs/`: follow them.
            if path.is_dir() && depth == 0 {
                dirs.push((path, depth + 1));
            } else if path.is_file() {
                let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
                if name.ends_with(".gguf") && !name.starts_with("mmproj") {
                    found.push(path);
                }
            }
        }
    }
    found.sort();
    found
}

/// Whether a GGUF's file name carries quantization `tag` (case-insensitive, as a whole word:
/// `Q4_K` does not match `…Q4_K_M.gguf`).
fn has_quant(path: &Path, tag: &str) -> bool {
    let Some(stem) = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_uppercase())
    else {
        return false;
    };
    let tag = tag.to_ascii_uppercase();
    let before = |c: Option<char>| c.is_none_or(|c| !c.is_ascii_alphanumeric());
    let after = |c: Option<char>| c.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
    stem.match_indices(&tag).any(|(at, _)| {
        before(stem[..at].chars().next_back()) && after(stem[at + tag.len()..].chars().next())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(PathBuf);

    impl Tmp {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "llm-worker-model-ref-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn stores(&self) -> ModelStores {
            ModelStores {
                rbee: self.0.join("rbee/models"),
                hf_hub: self.0.join("hub"),
            }
        }

        fn file(&self, rel: &str) -> PathBuf {
            let path = self.0.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"GGUF").unwrap();
            path
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn resolve_str(text: &str, stores: &ModelStores) -> Result<ModelSource, ModelRefError> {
        resolve(Some(Path::new(text)), stores)
    }

    fn path_of(source: ModelSource) -> PathBuf {
        match source {
            ModelSource::Reference { path, .. } | ModelSource::Path(path) => path,
            ModelSource::Default => panic!("resolved to the default model"),
        }
    }

    #[test]
    fn references_parse_as_the_hive_and_llama_cpp_write_them() {
        let r = parse_reference("TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF:tiny.Q4_K_M.gguf").unwrap();
        assert_eq!(
            (r.org, r.name, r.suffix),
            (
                "TheBloke",
                "TinyLlama-1.1B-Chat-v1.0-GGUF",
                Some("tiny.Q4_K_M.gguf")
            )
        );
        assert_eq!(parse_reference("org/name").unwrap().suffix, None);
        for bad in [
            "name",
            "/abs/path.gguf",
            "a/b/c",
            "org/",
            "org/name:",
            "http://x/y",
            "./m/x",
        ] {
            assert_eq!(parse_reference(bad), None, "{bad}");
        }
    }

    #[test]
    fn paths_and_the_default_need_no_lookup() {
        let tmp = Tmp::new("paths");
        let file = tmp.file("m.gguf");
        assert_eq!(resolve(None, &tmp.stores()), Ok(ModelSource::Default));
        assert_eq!(
            resolve(Some(Path::new("")), &tmp.stores()),
            Ok(ModelSource::Default)
        );
        assert_eq!(
            resolve(Some(&file), &tmp.stores()),
            Ok(ModelSource::Path(file.clone()))
        );
        let err = resolve_str("/no/such/model.gguf", &tmp.stores()).unwrap_err();
        assert!(matches!(err, ModelRefError::NotFound { .. }), "{err}");
        let err = resolve_str("/dev/zero", &tmp.stores()).unwrap_err();
        assert!(matches!(err, ModelRefError::NotAModel { .. }), "{err}");
        let looped = tmp.0.join("loop.gguf");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        let err = resolve(Some(&looped), &tmp.stores()).unwrap_err();
        assert!(matches!(err, ModelRefError::Unreadable { .. }), "{err}");
    }

    #[test]
    fn the_rbee_store_by_file_or_metadata() {
        let tmp = Tmp::new("rbee");
        let id = "TheBloke/Tiny-GGUF:tiny.Q4_K_M.gguf";
        let file = tmp.file("rbee/models/TheBloke-Tiny-GGUF-tiny.Q4_K_M.gguf/model.gguf");
        let source = resolve_str(id, &tmp.stores()).unwrap();
        assert_eq!(source.served_name(), Some(id));
        assert_eq!(path_of(source), file);

        let elsewhere = tmp.file("elsewhere/x.gguf");
        let meta = tmp.0.join("rbee/models/org-other/metadata.json");
        std::fs::create_dir_all(meta.parent().unwrap()).unwrap();
        let json = serde_json::json!({"artifact": {"id": "org/other", "path": elsewhere}});
        std::fs::write(&meta, json.to_string()).unwrap();
        assert_eq!(
            path_of(resolve_str("org/other", &tmp.stores()).unwrap()),
            elsewhere
        );
    }

    #[test]
    fn the_hub_cache_by_revision_file_and_quant() {
        let tmp = Tmp::new("hub");
        let snap = "hub/models--org--Model-GGUF/snapshots/abc123";
        let q4 = tmp.file(&format!("{snap}/model-Q4_K_M.gguf"));
        let q8 = tmp.file(&format!("{snap}/model-Q8_0.gguf"));
        tmp.file(&format!("{snap}/mmproj-model-f16.gguf"));
        tmp.file("hub/models--org--Model-GGUF/snapshots/old/model-Q8_0.gguf");
        let refs = tmp.0.join("hub/models--org--Model-GGUF/refs");
        std::fs::create_dir_all(&refs).unwrap();
        std::fs::write(refs.join("main"), "abc123").unwrap();
        let stores = tmp.stores();

        assert_eq!(
            path_of(resolve_str("org/Model-GGUF:Q8_0", &stores).unwrap()),
            q8
        );
        assert_eq!(
            path_of(resolve_str("org/Model-GGUF:q4_k_m", &stores).unwrap()),
            q4
        );
        assert_eq!(
            path_of(resolve_str("org/Model-GGUF:model-Q8_0.gguf", &stores).unwrap()),
            q8
        );
        // No suffix: Q4_K_M comes first in the preferred order.
        assert_eq!(path_of(resolve_str("org/Model-GGUF", &stores).unwrap()), q4);
        // A whole-word match only.
        let err = resolve_str("org/Model-GGUF:Q4_K", &stores)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no GGUF quantized as Q4_K"), "{err}");
        assert!(err.contains("model-Q4_K_M.gguf, model-Q8_0.gguf"), "{err}");
    }

    #[test]
    fn a_safetensors_snapshot_is_served_as_a_directory() {
        let tmp = Tmp::new("st");
        let config = tmp.file("hub/models--org--Dense/snapshots/r1/config.json");
        let source = resolve_str("org/Dense", &tmp.stores()).unwrap();
        assert_eq!(path_of(source), config.parent().unwrap());
    }

    #[test]
    fn an_unresolved_reference_names_every_place() {
        let tmp = Tmp::new("missing");
        let err = resolve_str("org/Nothing:Q4_1", &tmp.stores()).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("org-Nothing-Q4_1/model.gguf"), "{message}");
        assert!(
            message.contains("models--org--Nothing/snapshots"),
            "{message}"
        );
        assert!(message.contains("rbee's model store"), "{message}");
        assert!(message.contains("Hugging Face hub cache"), "{message}");
    }

    #[test]
    fn stores_follow_the_environment_conventions() {
        let stores = ModelStores::from_env();
        assert!(stores.rbee.ends_with("rbee/models"));
        assert!(stores.hf_hub.is_absolute());
    }
}
