//! Command-line and environment configuration ([`WorkerArgs`]), and the checks and look-ups
//! that turn it into what the server runs with ([`ServerSettings`]).
//!
//! Every flag is also an environment variable (`LLM_WORKER_*`, and `LLORCH_API_TOKEN` for the
//! token as rbee's other services name it). The flags the hive passes today
//! (`--worker-id --model --device --port --queen-url`) are all accepted.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::heartbeat::{HeartbeatConfig, HiveUrlError};
use crate::http::auth::ApiKey;
use crate::logging::LogFormat;
use crate::model::chat_template::ChatTemplate;
use crate::model_ref::{self, ModelRefError, ModelSource, ModelStores};

/// The GGUF downloader and cache, embedded so the binary can fetch its default model anywhere.
const FETCH_DEFAULT_MODEL: &str = include_str!("../scripts/fetch-default-model.sh");

/// Default cap on the serving context. KV caches are f32 and grow with use, so the context
/// bounds what one sequence can hold: for a Llama-3-8B shape (32 layers, 8 KV heads of 128)
/// 8192 positions are 2 GiB per sequence, 8 GiB for four slots, whereas the model's own
/// 128 Ki positions would allow 32 GiB for a single sequence. Raise it with `--ctx-size`.
pub const DEFAULT_CTX_CAP: usize = 8192;

/// LLM inference worker for rbee: one model, the rbee job API over HTTP, continuous batching.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None)]
pub struct WorkerArgs {
    /// Model to serve: a GGUF file or a Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json), or a model reference ORG/NAME[:QUANT or :FILE.gguf] found in rbee's
    /// model store (~/.cache/rbee/models) or the Hugging Face hub cache, without network.
    /// Default: SmolLM2-135M-Instruct Q4_1, fetched once into ~/.cache/llm-worker-rbee (or
    /// $LLM_WORKER_CACHE).
    #[arg(long, env = "LLM_WORKER_MODEL", value_name = "PATH|REF")]
    pub model: Option<PathBuf>,

    /// A smaller model with the same vocabulary (e.g. SmolLM2-135M for a larger SmolLM2) that
    /// drafts tokens for speculative decoding, instead of prompt lookup: the model verifies up
    /// to --draft-tokens of them in one forward, so the output is exactly what it would write
    /// alone. Its KV caches are outside --kv-cache-mem.
    #[arg(long, env = "LLM_WORKER_MODEL_DRAFT", value_name = "PATH")]
    pub model_draft: Option<PathBuf>,

    /// Name clients use in `model` and that the worker reports (default: the reference given to
    /// --model, else the model file's or directory's name).
    #[arg(long, env = "LLM_WORKER_MODEL_REF", value_name = "ID")]
    pub model_ref: Option<String>,

    /// Jinja chat template for /v1/chat/completions, used instead of the model's own (a model
    /// without one gets plain ChatML). `bos_token` and `eos_token` come from the model.
    #[arg(long, env = "LLM_WORKER_CHAT_TEMPLATE", value_name = "FILE")]
    pub chat_template: Option<PathBuf>,

    /// This worker's id, as the hive knows it (default: a random one).
    #[arg(long, env = "LLM_WORKER_ID", value_name = "ID")]
    pub worker_id: Option<String>,

    /// Address to listen on. Anything but loopback requires an API token.
    #[arg(long, env = "LLM_WORKER_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0: any free port; the chosen one is logged).
    #[arg(long, env = "LLM_WORKER_PORT", default_value_t = 8080)]
    pub port: u16,

    /// GPU index for the cuda and metal builds (ignored by the cpu build).
    #[arg(long, env = "LLM_WORKER_DEVICE", default_value_t = 0, value_name = "N")]
    pub device: usize,

    /// The hive (or queen) this worker reports to.
    #[arg(
        long,
        env = "LLM_WORKER_HIVE_URL",
        alias = "queen-url",
        value_name = "URL"
    )]
    pub hive_url: Option<String>,

    /// Sequences generated at once (slots); more jobs wait in the queue.
    #[arg(long, env = "LLM_WORKER_PARALLEL", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub parallel: u64,

    /// Jobs that may wait for a slot; beyond that, new jobs get 503 with Retry-After.
    #[arg(long, env = "LLM_WORKER_QUEUE_CAPACITY", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub queue_capacity: u64,

    /// Positions per sequence, prompt and output (default: the model's, at most 8192, which
    /// bounds KV-cache memory).
    #[arg(long, env = "LLM_WORKER_CTX_SIZE", value_name = "N", value_parser = clap::value_parser!(u64).range(16..))]
    pub ctx_size: Option<u64>,

    /// MiB of KV that finished requests keep so later prompts sharing their start skip its
    /// prefill (the prefix cache; 0 turns it off). Default: a quarter of the machine's memory,
    /// at most 8192 (llama-server's `--cache-ram`).
    #[arg(long, env = "LLM_WORKER_CACHE_RAM", value_name = "MIB")]
    pub cache_ram: Option<u64>,

    /// MiB of KV the running requests and the prefix cache may hold together. A request starts
    /// only when what it may fill (prompt plus max_tokens) fits; otherwise it waits in the
    /// queue, and the running ones never run short. 0: no budget but --parallel. Default: half
    /// the machine's memory.
    #[arg(long, env = "LLM_WORKER_KV_CACHE_MEM", value_name = "MIB")]
    pub kv_cache_mem: Option<u64>,

    /// Speculative decoding by prompt lookup: up to N tokens copied from a sequence's own
    /// context where its last words occurred before, verified in one forward (the output is
    /// exactly plain decoding's); 0 turns it off. Used while at most 4 sequences decode.
    #[arg(long, env = "LLM_WORKER_DRAFT_TOKENS", default_value_t = 8, value_name = "N", value_parser = clap::value_parser!(u64).range(0..=32))]
    pub draft_tokens: u64,

    /// Prompt tokens read per engine step, shared by all sequences being prefilled.
    #[arg(long, env = "LLM_WORKER_BATCH_SIZE", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub batch_size: u64,

    /// Compute threads (our CPU kernels' pool, and Candle's via RAYON_NUM_THREADS and
    /// CANDLE_NUM_THREADS; default: one per physical core).
    #[arg(long, env = "LLM_WORKER_THREADS", value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,

    /// File holding the API keys, one per line: `TOKEN` or `NAME TOKEN` (blank lines and `#`
    /// comments skipped). A job belongs to the key that created it; other keys are told it does
    /// not exist. Takes precedence over LLORCH_API_TOKEN.
    #[arg(long, env = "LLM_WORKER_API_TOKEN_FILE", value_name = "PATH")]
    pub api_token_file: Option<PathBuf>,

    /// API token clients must send as `Authorization: Bearer <token>`. Prefer the environment
    /// variable or --api-token-file: command lines are visible to other local users.
    #[arg(
        long,
        env = "LLORCH_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub api_token: Option<String>,

    /// Cancel a job when no client has watched its stream for this long ("5s", "500ms", "2m").
    #[arg(long, env = "LLM_WORKER_DETACH_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub detach_grace: Duration,

    /// On SIGTERM/SIGINT, how long running jobs may take to finish before they are cancelled
    /// (each stream then ends with its cancellation). The default fits the hive's kill window:
    /// it sends SIGKILL 2 s after SIGTERM. A standalone server may give more ("30s").
    #[arg(long, env = "LLM_WORKER_DRAIN_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// How long the model may take to load; past it the worker exits (code 1) saying so.
    #[arg(long, env = "LLM_WORKER_LOAD_TIMEOUT", default_value = "10m", value_parser = parse_interval)]
    pub load_timeout: Duration,

    /// How long a finished job's status and events stay available.
    #[arg(long, env = "LLM_WORKER_JOB_TTL", default_value = "5m", value_parser = parse_duration)]
    pub job_ttl: Duration,

    /// With --hive-url: how often the worker sends its heartbeat when nothing changes (it also
    /// sends one at once on start and one on every status change).
    #[arg(long, env = "LLM_WORKER_HEARTBEAT_INTERVAL", default_value = "30s", value_parser = parse_interval)]
    pub heartbeat_interval: Duration,

    /// Bearer token the heartbeat presents to the hive. Prefer the environment variable:
    /// command lines are visible to other local users.
    #[arg(
        long,
        env = "LLM_WORKER_HIVE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub hive_token: Option<String>,

    /// Open connections at most; one more is answered 503 (Retry-After) and closed at once.
    #[arg(long, env = "LLM_WORKER_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// A request's headers must arrive within this; a connection waiting for its first or, on
    /// keep-alive, its next request is closed after it too.
    #[arg(long, env = "LLM_WORKER_HEADER_TIMEOUT", default_value = "30s", value_parser = parse_interval)]
    pub header_timeout: Duration,

    /// A request body that sends nothing for this long fails and its connection is closed.
    /// Responses (SSE streams included) are never timed.
    #[arg(long, env = "LLM_WORKER_BODY_TIMEOUT", default_value = "30s", value_parser = parse_interval)]
    pub body_timeout: Duration,

    /// Require the API token on GET /metrics too (by default it is public, like /health).
    #[arg(long, env = "LLM_WORKER_METRICS_AUTH")]
    pub metrics_auth: bool,

    /// Log format: `pretty` (human-readable lines) or `json` (one object per line).
    #[arg(long, env = "LLORCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Print the build profile (`release` or `debug`) and exit, before any other flag is read
    /// (the hive asks this of an installed worker binary).
    #[arg(long)]
    pub build_info: bool,
}

/// Why the worker refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "refusing to listen on {host} without an API token: anyone who can reach it could use \
         the worker. Set one with LLORCH_API_TOKEN=<token> or --api-token-file <path>, or listen \
         on 127.0.0.1"
    )]
    NoTokenForPublicHost { host: String },
    #[error("--host {host}: not an IP address or `localhost`")]
    BadHost { host: String },
    #[error("cannot read the API token file {path}: {message}")]
    TokenFile { path: PathBuf, message: String },
    #[error("{at}: the key {name} or its token is already listed")]
    DuplicateKey { at: String, name: String },
    #[error("the API token (from {source_name}) is empty")]
    EmptyToken { source_name: String },
    #[error("the token from {source_name} {reason}: a client could never present it as sent")]
    UnusableToken { source_name: String, reason: String },
    #[error("cannot fetch the default model: {0}")]
    FetchModel(String),
    #[error("--chat-template {path}: {message}")]
    ChatTemplate { path: PathBuf, message: String },
    #[error(transparent)]
    HiveUrl(#[from] HiveUrlError),
    #[error(transparent)]
    Model(#[from] ModelRefError),
}

/// Validated settings the server starts from.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub bind: SocketAddr,
    /// The API keys clients must present one of (none: authentication off).
    pub api_keys: Vec<ApiKey>,
    /// Set when `--hive-url` is given.
    pub heartbeat: Option<HeartbeatConfig>,
    /// `--model`, resolved (a reference to the file it names).
    pub model: ModelSource,
}

impl WorkerArgs {
    /// Checks the listening address against the token and reads the token.
    pub fn settings(&self) -> Result<ServerSettings, ConfigError> {
        let api_keys = self.api_keys()?;
        let ip = parse_host(&self.host)?;
        if !ip.is_loopback() && api_keys.is_empty() {
            return Err(ConfigError::NoTokenForPublicHost {
                host: self.host.clone(),
            });
        }
        Ok(ServerSettings {
            bind: SocketAddr::new(ip, self.port),
            api_keys,
            heartbeat: self.heartbeat()?,
            model: model_ref::resolve(self.model.as_deref(), &ModelStores::from_env())?,
        })
    }

    fn heartbeat(&self) -> Result<Option<HeartbeatConfig>, ConfigError> {
        let Some(url) = &self.hive_url else {
            return Ok(None);
        };
        let mut config = HeartbeatConfig::new(url)?;
        config.interval = self.heartbeat_interval;
        if let Some(token) = &self.hive_token {
            let token = token.trim();
            if token.is_empty() {
                return Err(ConfigError::EmptyToken {
                    source_name: "--hive-token".into(),
                });
            }
            check_token(token, "--hive-token", 1)?;
            config.token = Some(token.to_string());
        }
        Ok(Some(config))
    }

    /// The API keys: `--api-token-file` (one key per line, `TOKEN` or `NAME TOKEN`; blank
    /// lines and `#` comments skipped; unnamed keys are `default`, then `key2`, `key3`, …), else
    /// `LLORCH_API_TOKEN` (one key, `default`), else none.
    fn api_keys(&self) -> Result<Vec<ApiKey>, ConfigError> {
        let path = match (&self.api_token_file, &self.api_token) {
            (Some(path), _) => path,
            (None, Some(token)) => {
                let token = token.trim();
                let source_name = "LLORCH_API_TOKEN";
                if token.is_empty() {
                    return Err(ConfigError::EmptyToken {
                        source_name: source_name.into(),
                    });
                }
                check_token(token, source_name, MIN_API_TOKEN_CHARS)?;
                return Ok(vec![ApiKey::new("default", token)]);
            }
            (None, None) => return Ok(Vec::new()),
        };
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::TokenFile {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let source_name = path.display().to_string();
        let mut keys: Vec<ApiKey> = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = format!("{source_name} line {}", n + 1);
            let (name, token) = match line.split_once(char::is_whitespace) {
                Some((name, token)) => (name.to_string(), token.trim()),
                None if keys.is_empty() => ("default".to_string(), line),
                None => (format!("key{}", keys.len() + 1), line),
            };
            check_token(token, &at, MIN_API_TOKEN_CHARS)?;
            if keys.iter().any(|k| k.name == name || k.token == token) {
                return Err(ConfigError::DuplicateKey { at, name });
            }
            keys.push(ApiKey::new(name, token));
        }
        if keys.is_empty() {
            return Err(ConfigError::EmptyToken { source_name });
        }
        Ok(keys)
    }

    /// `--chat-template`, read and compiled (before the model loads, so a broken template
    /// stops the worker at once). Its `bos_token`/`eos_token` are supplied per request from
    /// the served model's tokenizer.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>, ConfigError> {
        let Some(path) = &self.chat_template else {
            return Ok(None);
        };
        let fail = |message: String| ConfigError::ChatTemplate {
            path: path.clone(),
            message,
        };
        let source = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        ChatTemplate::new(&source, "", "")
            .map(Some)
            .map_err(|e| fail(e.to_string()))
    }

    /// The serving context to ask the loader for.
    pub fn context_length(&self) -> usize {
        self.ctx_size.map_or(DEFAULT_CTX_CAP, |n| n as usize)
    }

    /// The prefix cache's budget in bytes: `--cache-ram`, else a quarter of the machine's
    /// memory (at most 8 GiB).
    pub fn prefix_cache_bytes(&self) -> usize {
        const MIB: usize = 1 << 20;
        match self.cache_ram {
            Some(mib) => usize::try_from(mib)
                .unwrap_or(usize::MAX)
                .saturating_mul(MIB),
            None => total_memory_bytes().map_or(1024 * MIB, |total| (total / 4).min(8192 * MIB)),
        }
    }

    /// The KV budget in bytes: `--kv-cache-mem`, else half the machine's memory (the scheduler
    /// never uses more than every slot filling its context).
    pub fn kv_budget_bytes(&self) -> usize {
        const MIB: usize = 1 << 20;
        match self.kv_cache_mem {
            Some(mib) => usize::try_from(mib)
                .unwrap_or(usize::MAX)
                .saturating_mul(MIB),
            None => total_memory_bytes().map_or(usize::MAX, |total| total / 2),
        }
    }

    /// Exports the thread count for Candle's and rayon's pools. Must run before any thread
    /// that reads them starts.
    pub fn apply_threads(&self) {
        if let Some(n) = self.threads {
            // SAFETY: called at the top of `main`, before the runtime or any other thread
            // exists, so nothing reads the environment concurrently.
            unsafe {
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
                std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
            }
        }
    }

    /// The name the model is served and reported under before and after loading, when it is
    /// known from the flags alone: `--model-ref`, else a model reference given to `--model`.
    pub fn served_name(&self, model: &ModelSource) -> Option<String> {
        self.model_ref
            .clone()
            .or_else(|| model.served_name().map(str::to_string))
    }
}

impl ModelSource {
    /// The file or directory to load; the default model is fetched if not cached. Blocking.
    pub fn local_path(&self) -> Result<PathBuf, ConfigError> {
        match self {
            Self::Path(path) | Self::Reference { path, .. } => Ok(path.clone()),
            Self::Default => fetch_default_model(),
        }
    }
}

/// Shorter API tokens are refused: they can be guessed.
pub const MIN_API_TOKEN_CHARS: usize = 8;

/// A bearer token must travel in a header as it is: printable ASCII without spaces (anything
/// else would be refused or altered on the way, so every request would be turned away).
fn check_token(token: &str, source_name: &str, min_chars: usize) -> Result<(), ConfigError> {
    let reason = if !token.bytes().all(|b| b.is_ascii_graphic()) {
        Some("holds characters other than printable ASCII (or a space)".to_string())
    } else if token.len() < min_chars {
        Some(format!("is shorter than {min_chars} characters"))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ConfigError::UnusableToken {
            source_name: source_name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn parse_host(host: &str) -> Result<IpAddr, ConfigError> {
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| ConfigError::BadHost {
            host: host.to_string(),
        })
}

/// Runs the embedded fetch script (`bash -s`); it prints the cached path on its last line.
pub fn fetch_default_model() -> Result<PathBuf, ConfigError> {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let fail = |m: String| ConfigError::FetchModel(m);
    let mut child = Command::new("bash")
        .arg("-s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| fail(format!("cannot run bash: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(FETCH_DEFAULT_MODEL.as_bytes())
            .map_err(|e| fail(format!("cannot feed the fetch script to bash: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| fail(format!("fetch script: {e}")))?;
    if !output.status.success() {
        return Err(fail(format!("fetch script exited with {}", output.status)));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| fail("the fetch script printed no path".into()))
}

/// A [`parse_duration`] that is not zero.
fn parse_interval(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// `"5"`, `"5s"`, `"1.5s"`, `"500ms"`, `"2m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (e.g. 5s, 500ms, 2m)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("unknown unit `{other}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{text}`: {e}"))
}

/// The machine's memory (Linux `MemTotal`), if known.
fn total_memory_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> WorkerArgs {
        let mut argv = vec!["worker"];
        argv.extend_from_slice(extra);
        WorkerArgs::try_parse_from(argv).unwrap()
    }

    #[test]
    fn the_flags_the_hive_passes_start_the_worker() {
        let a = args(&[
            "--worker-id",
            "w1",
            "--model",
            "/m.gguf",
            "--device",
            "1",
            "--port",
            "9001",
            "--queen-url",
            "http://q:7833",
        ]);
        assert_eq!(a.worker_id.as_deref(), Some("w1"));
        assert_eq!(a.device, 1);
        assert_eq!(a.port, 9001);
        assert_eq!(a.hive_url.as_deref(), Some("http://q:7833"));
        assert_eq!(a.parallel, 4);
        assert_eq!(a.queue_capacity, 64);
        assert_eq!(a.context_length(), DEFAULT_CTX_CAP);
    }

    #[test]
    fn a_public_host_needs_a_token() {
        let err = args(&["--host", "0.0.0.0"]).settings().unwrap_err();
        let message = err.to_string();
        assert!(message.contains("LLORCH_API_TOKEN"), "{message}");
        assert!(
            args(&["--host", "0.0.0.0", "--api-token", "t0ken-long"])
                .settings()
                .is_ok()
        );
        assert!(args(&["--host", "localhost"]).settings().is_ok());
        assert!(args(&["--host", "::1"]).settings().is_ok());
        assert!(args(&["--host", "example.com"]).settings().is_err());
    }

    #[test]
    fn token_file_wins_and_is_trimmed() {
        let dir = std::env::temp_dir().join(format!("llm-worker-token-{}", std::process::id()));
        std::fs::write(&dir, "  file-token\n").unwrap();
        let a = args(&[
            "--api-token-file",
            dir.to_str().unwrap(),
            "--api-token",
            "env",
        ]);
        assert_eq!(
            a.settings().unwrap().api_keys,
            vec![ApiKey::new("default", "file-token")]
        );
        std::fs::write(&dir, "\n").unwrap();
        assert!(matches!(a.settings(), Err(ConfigError::EmptyToken { .. })));
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn tokens_that_cannot_be_presented_are_refused_at_start() {
        for bad in ["pässwort-long", "two words here", "short"] {
            let err = args(&["--api-token", bad]).settings().unwrap_err();
            assert!(
                matches!(err, ConfigError::UnusableToken { .. }),
                "{bad}: {err}"
            );
        }
        assert!(args(&["--api-token", " padded-token\n"]).settings().is_ok());
        let err = args(&["--hive-url", "http://h", "--hive-token", "hïve"])
            .settings()
            .unwrap_err();
        assert!(matches!(err, ConfigError::UnusableToken { .. }), "{err}");
    }

    #[test]
    fn hive_flags() {
        let a = args(&["--hive-url", "http://hive:7835/", "--hive-token", " t "]);
        let hb = a.settings().unwrap().heartbeat.unwrap();
        assert_eq!(hb.endpoint.as_str(), "http://hive:7835/v1/worker-heartbeat");
        assert_eq!(hb.token.as_deref(), Some("t"));
        assert_eq!(hb.interval, Duration::from_secs(30));
        assert!(args(&[]).settings().unwrap().heartbeat.is_none());
        let a = args(&["--hive-url", "http://h", "--heartbeat-interval", "2s"]);
        assert_eq!(
            a.settings().unwrap().heartbeat.unwrap().interval,
            Duration::from_secs(2)
        );
        assert!(WorkerArgs::try_parse_from(["w", "--heartbeat-interval", "0s"]).is_err());
        assert!(matches!(
            args(&["--hive-url", "https://h"]).settings(),
            Err(ConfigError::HiveUrl(_))
        ));
        assert!(matches!(
            args(&["--hive-url", "http://h", "--hive-token", " "]).settings(),
            Err(ConfigError::EmptyToken { .. })
        ));
        let a = args(&["--metrics-auth", "--log-format", "json"]);
        assert!(a.metrics_auth);
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(args(&[]).log_format, LogFormat::Pretty);
        assert!(!args(&[]).metrics_auth);
    }

    #[test]
    fn chat_template_file_is_read_and_compiled() {
        assert!(args(&[]).chat_template().unwrap().is_none());
        let path = std::env::temp_dir().join(format!("llm-worker-tmpl-{}", std::process::id()));
        std::fs::write(&path, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
        let a = args(&["--chat-template", path.to_str().unwrap()]);
        assert!(a.chat_template().unwrap().is_some());
        std::fs::write(&path, "{% for m in messages %}").unwrap();
        let err = a.chat_template().unwrap_err().to_string();
        assert!(err.starts_with("--chat-template"), "{err}");
        let _ = std::fs::remove_file(&path);
        assert!(a.chat_template().is_err(), "a missing file");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
