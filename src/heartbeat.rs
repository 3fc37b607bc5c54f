//! The heartbeat: with `--hive-url`, the worker tells its hive who it is and how it is doing by
//! `POST`ing a [`WorkerHeartbeat`] (JSON) to `{hive}/v1/worker-heartbeat`, with
//! `Authorization: Bearer <--hive-token>` when a token is set. Without `--hive-url` nothing is
//! sent and no task runs.
//!
//! When:
//! - at once on start, with status `starting` (the model loads after the listener is bound);
//! - at every lifecycle transition, as a snapshot taken by the code that causes it at that
//!   instant (`ready` when the model is attached, `draining` on the stop signal, `stopping`
//!   once the engine has stopped, `stopped` last), sent in order;
//! - when the status sampled every `status_poll` differs from the last one sent (`ready ↔
//!   busy`), at most once per `min_change_gap`, so a worker flapping under load cannot flood
//!   the hive (a change shorter than the poll may go unreported; the hive always ends up with
//!   the current status);
//! - every `interval` since the last heartbeat that got through.
//!
//! One task sends, one request at a time, each bounded by `request_timeout`. Serving never
//! waits for it: transitions are handed over with `try_send` on a small bounded queue (a full
//! queue drops the snapshot; the next poll reports the state). While the hive is unreachable
//! (a transport error or a non-2xx answer) the task retries with jittered exponential backoff,
//! from `backoff_base` up to `interval`, and logs once when the outage begins and once when it
//! ends; snapshots queued meanwhile are history and are dropped, the retry sends the current
//! state.
//!
//! The client speaks plain HTTP only: the hive is on the worker's own network, and a TLS stack
//! would roughly double this crate's dependency tree for a link that does not need it. An
//! `https` hive URL is refused at startup with that explanation.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::http::auth::fingerprint;
use crate::jobs::JobRegistry;
use crate::timestamp::rfc3339;
use crate::worker_info::{WorkerIdentity, WorkerInfo, WorkerStatus};

/// Appended to the hive's URL.
pub const HEARTBEAT_PATH: &str = "/v1/worker-heartbeat";
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_STATUS_POLL: Duration = Duration::from_millis(100);
pub const DEFAULT_MIN_CHANGE_GAP: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Lifecycle snapshots waiting to be sent (there are five in a worker's whole life).
const TRANSITION_QUEUE: usize = 8;

/// The heartbeat's body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    pub worker: WorkerInfo,
    /// When the snapshot was taken (RFC 3339, UTC).
    pub timestamp: String,
}

#[derive(Debug, thiserror::Error)]
#[error("--hive-url {url}: {reason}")]
pub struct HiveUrlError {
    pub url: String,
    pub reason: String,
}

/// Where and how to send heartbeats.
#[derive(Clone)]
pub struct HeartbeatConfig {
    /// `{hive}/v1/worker-heartbeat`.
    pub endpoint: reqwest::Url,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    pub interval: Duration,
    pub request_timeout: Duration,
    pub status_poll: Duration,
    pub min_change_gap: Duration,
    pub backoff_base: Duration,
}

impl std::fmt::Debug for HeartbeatConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatConfig")
            .field("endpoint", &redacted(&self.endpoint))
            .field("token", &self.token.as_deref().map(fingerprint))
            .field("interval", &self.interval)
            .field("request_timeout", &self.request_timeout)
            .field("status_poll", &self.status_poll)
            .field("min_change_gap", &self.min_change_gap)
            .field("backoff_base", &self.backoff_base)
            .finish()
    }
}

impl HeartbeatConfig {
    /// Heartbeats to the hive at `hive_url` (`http://host:port`, optionally with a path
    /// prefix), with the default timings and no token.
    pub fn new(hive_url: &str) -> Result<Self, HiveUrlError> {
        Ok(Self {
            endpoint: endpoint(hive_url)?,
            token: None,
            interval: DEFAULT_INTERVAL,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            status_poll: DEFAULT_STATUS_POLL,
            min_change_gap: DEFAULT_MIN_CHANGE_GAP,
            backoff_base: DEFAULT_BACKOFF_BASE,
        })
    }
}

fn endpoint(hive_url: &str) -> Result<reqwest::Url, HiveUrlError> {
    let fail = |reason: &str| HiveUrlError {
        url: hive_url.to_string(),
        reason: reason.to_string(),
    };
    let mut url = reqwest::Url::parse(hive_url.trim()).map_err(|e| fail(&e.to_string()))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(fail(
                "https is not supported: this worker talks plain HTTP to a hive on its own \
                 network; use http://, or a TLS-terminating proxy next to the worker",
            ));
        }
        _ => return Err(fail("not an http:// URL")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(fail("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(fail(
            "a query or fragment has no place in the hive's address",
        ));
    }
    let path = format!("{}{HEARTBEAT_PATH}", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

/// The URL with any password masked, for logs.
fn redacted(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}

/// What a heartbeat describes: the worker's identity and its registry (which holds the
/// worker's state). The registry is held weakly, so a heartbeat never keeps a dropped worker's
/// engine alive.
#[derive(Clone)]
pub struct StatusSource {
    identity: Arc<WorkerIdentity>,
    registry: Weak<JobRegistry>,
}

impl StatusSource {
    pub fn new(identity: Arc<WorkerIdentity>, registry: &Arc<JobRegistry>) -> Self {
        Self {
            identity,
            registry: Arc::downgrade(registry),
        }
    }

    /// `None` once the worker is gone.
    fn status(&self) -> Option<WorkerStatus> {
        let registry = self.registry.upgrade()?;
        Some(WorkerStatus::of(&registry))
    }

    /// The worker as of now; `None` once the worker is gone.
    pub fn snapshot(&self) -> Option<WorkerHeartbeat> {
        let registry = self.registry.upgrade()?;
        Some(WorkerHeartbeat {
            worker: WorkerInfo::collect(&self.identity, &registry),
            timestamp: rfc3339(SystemTime::now()),
        })
    }
}

/// The running heartbeat: a handle on its task.
pub struct Heartbeat {
    source: StatusSource,
    transitions: mpsc::Sender<WorkerHeartbeat>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
    /// How long [`Heartbeat::finish`] waits for the last heartbeats.
    finish_budget: Duration,
}

impl Heartbeat {
    /// Starts the heartbeat task on the current tokio runtime and queues the first heartbeat.
    /// `None` (logged) when there is no runtime or the HTTP client cannot be built: the worker
    /// then serves without a heartbeat rather than not at all.
    pub fn start(config: HeartbeatConfig, source: StatusSource) -> Option<Self> {
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("heartbeat disabled: the worker was built outside a tokio runtime");
                return None;
            }
        };
        let client = match reqwest::Client::builder()
            // The hive is reached directly, whatever proxy the environment names.
            .no_proxy()
            .connect_timeout(config.request_timeout)
            .user_agent(concat!("llm-worker-rbee/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("heartbeat disabled: cannot build the HTTP client: {e}");
                return None;
            }
        };
        tracing::info!(
            hive = %redacted(&config.endpoint),
            interval = ?config.interval,
            token_fingerprint = config.token.as_deref().map(fingerprint).as_deref().unwrap_or("none"),
            "sending heartbeats to the hive"
        );
        let (transitions, queued) = mpsc::channel(TRANSITION_QUEUE);
        let (stop, stopped) = oneshot::channel();
        let finish_budget = config.request_timeout * 2 + Duration::from_secs(1);
        let link = HiveLink {
            client,
            source: source.clone(),
            last_sent: None,
            last_sent_at: None,
            next_periodic: Instant::now() + config.interval,
            backoff: config.backoff_base,
            outage: None,
            config,
        };
        let heartbeat = Self {
            source,
            transitions,
            stop: Mutex::new(Some(stop)),
            task: Mutex::new(None),
            finish_budget,
        };
        // The first heartbeat, at once: `starting` (or whatever is true by now).
        heartbeat.transition();
        *lock(&heartbeat.task) = Some(runtime.spawn(link.run(queued, stopped)));
        Some(heartbeat)
    }

    /// Reports the worker's state as of now, in order with the other transitions. Never waits.
    pub fn transition(&self) {
        if let Some(beat) = self.source.snapshot() {
            // A full queue means the hive is far behind; the next poll sends the current state.
            let _ = self.transitions.try_send(beat);
        }
    }

    /// Sends what is still queued and a last heartbeat (`stopped` once the worker's lifecycle
    /// says so), then ends the task. Waits at most twice the request timeout plus a second.
    pub async fn finish(&self) {
        if let Some(stop) = lock(&self.stop).take() {
            let _ = stop.send(());
        }
        let Some(mut task) = lock(&self.task).take() else {
            return;
        };
        if tokio::time::timeout(self.finish_budget, &mut task)
            .await
            .is_err()
        {
            task.abort();
            tracing::warn!(
                "the hive did not take the last heartbeat within {:?}; giving up",
                self.finish_budget
            );
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Only ever holds an `Option` being taken or set: a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("cannot encode the heartbeat: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Transport(reqwest::Error),
    #[error("the hive answered {0}")]
    Status(reqwest::StatusCode),
}

/// The hive has not taken a heartbeat since `since`.
struct Outage {
    since: Instant,
    failures: u32,
    retry_at: Instant,
}

/// The task's state.
struct HiveLink {
    client: reqwest::Client,
    config: HeartbeatConfig,
    source: StatusSource,
    last_sent: Option<WorkerStatus>,
    last_sent_at: Option<Instant>,
    next_periodic: Instant,
    /// The next retry's delay before jitter.
    backoff: Duration,
    outage: Option<Outage>,
}

impl HiveLink {
    async fn run(
        mut self,
        mut transitions: mpsc::Receiver<WorkerHeartbeat>,
        mut stop: oneshot::Receiver<()>,
    ) {
        loop {
            let wake_at = self.wake_at();
            let beat = tokio::select! {
                biased;
                stopped = &mut stop => {
                    // An error means the handle was dropped without `finish`: end quietly.
                    if stopped.is_ok() {
                        self.last_words(&mut transitions).await;
                    }
                    return;
                }
                queued = transitions.recv() => match queued {
                    None => return,
                    // During an outage a queued snapshot is history: the retry sends the
                    // current state.
                    Some(_) if self.outage.is_some() => continue,
                    Some(beat) => beat,
                },
                () = tokio::time::sleep_until(wake_at.into()) => {
                    if !self.due() {
                        continue;
                    }
                    match self.source.snapshot() {
                        Some(beat) => beat,
                        None => return,
                    }
                }
            };
            self.deliver(&beat).await;
        }
    }

    fn wake_at(&self) -> Instant {
        match &self.outage {
            Some(outage) => outage.retry_at,
            None => self
                .next_periodic
                .min(Instant::now() + self.config.status_poll),
        }
    }

    /// Whether a heartbeat is due now (periodic, retry, or a changed status past the gap).
    fn due(&self) -> bool {
        let now = Instant::now();
        if let Some(outage) = &self.outage {
            return now >= outage.retry_at;
        }
        if now >= self.next_periodic {
            return true;
        }
        // A gone worker is "due": the snapshot then says so and the task ends.
        let Some(status) = self.source.status() else {
            return true;
        };
        self.last_sent != Some(status)
            && self
                .last_sent_at
                .is_none_or(|at| now >= at + self.config.min_change_gap)
    }

    /// Sends one heartbeat and updates the schedule; true if the hive took it.
    async fn deliver(&mut self, beat: &WorkerHeartbeat) -> bool {
        let result = self.post(beat).await;
        let now = Instant::now();
        match result {
            Ok(()) => {
                if let Some(outage) = self.outage.take() {
                    tracing::info!(
                        hive = %redacted(&self.config.endpoint),
                        failed_attempts = outage.failures,
                        outage_s = now.saturating_duration_since(outage.since).as_secs(),
                        "hive reachable again; heartbeats resumed"
                    );
                }
                self.backoff = self.config.backoff_base;
                self.last_sent = Some(beat.worker.status);
                self.last_sent_at = Some(now);
                self.next_periodic = now + self.config.interval;
                true
            }
            Err(error) => {
                let error = with_sources(&error);
                let retry_at = now + jittered(self.backoff);
                let cap = self.config.interval.max(self.config.backoff_base);
                self.backoff = (self.backoff * 2).min(cap);
                match &mut self.outage {
                    None => {
                        tracing::warn!(
                            hive = %redacted(&self.config.endpoint),
                            %error,
                            "hive unreachable; retrying heartbeats with backoff (logged once per outage)"
                        );
                        self.outage = Some(Outage {
                            since: now,
                            failures: 1,
                            retry_at,
                        });
                    }
                    Some(outage) => {
                        tracing::debug!(%error, failures = outage.failures + 1, "heartbeat failed again");
                        outage.failures += 1;
                        outage.retry_at = retry_at;
                    }
                }
                false
            }
        }
    }

    async fn post(&self, beat: &WorkerHeartbeat) -> Result<(), SendError> {
        let body = serde_json::to_vec(beat)?;
        let mut request = self
            .client
            .post(self.config.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(self.config.request_timeout)
            .body(body);
        if let Some(token) = &self.config.token {
            request = request.bearer_auth(token);
        }
        // Without the URL: it may carry credentials, and the log line names the hive anyway.
        let response = request
            .send()
            .await
            .map_err(|e| SendError::Transport(e.without_url()))?;
        let status = response.status();
        // Read the (small) answer so the connection can be reused.
        let _ = response.bytes().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(SendError::Status(status))
        }
    }

    /// On `finish`: the transitions not yet sent (unless the hive is unreachable), then the
    /// final state.
    async fn last_words(&mut self, transitions: &mut mpsc::Receiver<WorkerHeartbeat>) {
        while let Ok(beat) = transitions.try_recv() {
            if self.outage.is_none() {
                self.deliver(&beat).await;
            }
        }
        if self.last_sent == Some(WorkerStatus::Stopped) {
            return;
        }
        let Some(beat) = self.source.snapshot() else {
            return;
        };
        if !self.deliver(&beat).await {
            tracing::warn!(
                status = beat.worker.status.as_str(),
                "the hive did not get the last heartbeat"
            );
        }
    }
}

/// The error and its causes ("error sending request: client error (Connect): tcp connect
/// error: Connection refused"): the top line alone rarely says what went wrong.
fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    text
}

/// `delay` scaled by a random factor in [0.5, 1), so workers that lost the same hive do not
/// retry in lockstep.
fn jittered(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    delay.mul_f64(0.5 + 0.5 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = |u: &str| endpoint(u).map(|u| u.to_string());
        assert_eq!(
            e("http://hive:7835").unwrap(),
            "http://hive:7835/v1/worker-heartbeat"
        );
        assert_eq!(
            e("http://hive:7835/").unwrap(),
            "http://hive:7835/v1/worker-heartbeat"
        );
        assert_eq!(
            e("http://10.0.0.2/rbee/").unwrap(),
            "http://10.0.0.2/rbee/v1/worker-heartbeat"
        );
        let https = e("https://hive").unwrap_err().to_string();
        assert!(https.contains("https is not supported"), "{https}");
        assert!(e("ftp://hive").is_err());
        assert!(e("hive:7835").is_err());
        assert!(e("http://hive/?x=1").is_err());
        assert!(e("not a url").is_err());
    }

    #[test]
    fn passwords_never_reach_a_log_line() {
        let url = endpoint("http://user:s3cret@hive:1").unwrap();
        let shown = redacted(&url);
        assert!(!shown.contains("s3cret"), "{shown}");
        let mut config = HeartbeatConfig::new("http://user:s3cret@hive:1").unwrap();
        config.token = Some("hive-token".into());
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("hive-token"),
            "{debug}"
        );
    }

    #[test]
    fn jitter_stays_within_half_and_whole() {
        let d = Duration::from_millis(1000);
        for _ in 0..100 {
            let j = jittered(d);
            assert!(j >= d / 2 && j <= d, "{j:?}");
        }
    }
}
