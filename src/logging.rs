//! Structured logs with `tracing`: `--log-format pretty` (one human-readable line per event)
//! or `json` (one JSON object per line, fields at the top level, the current span under
//! `span`), filtered by `RUST_LOG` (default `info`).
//!
//! What the lines carry at info level: a startup line (URL, model, device, threads, load
//! time), one line per finished job inside the job's span (`job_id`, `api`; tokens in and out,
//! tokens/s, time to first token, outcome and reason), and lifecycle and heartbeat-outage
//! lines. Never prompt or generated text, and never a token: API and hive tokens appear only as
//! fingerprints.
//!
//! Lines go through a bounded non-blocking writer: a stalled or full stderr drops lines rather
//! than stalling the thread that logs, which may be the engine thread.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Lines the writer holds before it drops new ones. The channel's slots are allocated and
/// touched up front (32 bytes each), so tracing-appender's default of 128,000 lines would be
/// 4 MB of resident memory for a log that writes a few lines per request.
const BUFFERED_LINES: usize = 8192;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (colored on a terminal).
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Keeps the background writer alive; dropping it flushes what is buffered.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<tracing_appender::non_blocking::WorkerGuard>,
}

/// Installs the global subscriber. A no-op (with an inert guard) when one is already set, as
/// in tests that run the server in-process.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Pretty => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    LogGuard {
        _writer: installed.is_ok().then_some(guard),
    }
}
