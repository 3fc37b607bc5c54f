//! Accepting HTTP connections so that no client can hold one without using it.
//!
//! - At most `max_connections` are open at once; one more is answered at once with a 503
//!   (`Retry-After`) and closed, before anything of it is read.
//! - A request's headers must arrive within `header_timeout`. hyper's timer for this also runs
//!   while a connection waits for its first request and, on keep-alive, for its next one, so an
//!   idle connection is closed after the same time (slowloris: a header trickled a byte at a
//!   time is closed too).
//! - A request body must not stall for longer than `body_timeout` between two chunks; the
//!   request then fails (the handler's body read gets an error) and the connection closes.
//! - Responses are never timed: an SSE stream lasts as long as its job, with keep-alive comments.
//!
//! HTTP/1.1 only: rbee's hive and queen, the OpenAI clients and load balancers speak it, and
//! one protocol keeps these guarantees easy to state. On stop, the listener closes and open
//! connections finish their responses (streams end with their jobs' terminal events).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceBuilder;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// How connections are bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// The body of the answer to a connection over the cap.
const OVER_CAP_BODY: &str = r#"{"error":{"code":"TOO_MANY_CONNECTIONS","message":"too many open connections; retry in 1 s","retry_after_s":1}}"#;

/// The whole answer to a connection over the cap: written, then the connection is closed.
fn over_cap_response() -> String {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{OVER_CAP_BODY}",
        OVER_CAP_BODY.len()
    )
}

/// Serves `router` on `listener` within `limits` until `stop` turns true, then waits for the
/// open connections to finish their responses.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let service = ServiceBuilder::new()
        .layer(RequestBodyTimeoutLayer::new(limits.body_timeout))
        .service(router);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(service.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // A closed or timed-out connection is the client's business, not an error of ours.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Descriptors kept out of the connections' share: the model file, the listener, the log and
/// the heartbeat's sockets.
pub const RESERVED_FDS: u64 = 64;

/// Raises the soft open-file limit to the hard one, as Go's runtime and nginx do, so that
/// `--max-connections` and not the usual soft default of 1024 decides when clients are refused.
/// Returns the soft limit in force afterwards.
#[cfg(unix)]
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        // macOS refuses an unlimited soft limit; a million is more than any worker needs.
        let wanted = libc::rlimit {
            rlim_cur: limit.rlim_max.min(1 << 20),
            rlim_max: limit.rlim_max,
        };
        // SAFETY: `wanted` is a valid rlimit; failure leaves the old limit in force.
        if wanted.rlim_cur > limit.rlim_cur
            && unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0
        {
            limit = wanted;
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(not(unix))]
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    Ok(u64::MAX)
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(over_cap_response().as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let soft = raise_open_file_limit().unwrap();
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `now` is a valid, writable rlimit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
        assert_eq!(now.rlim_cur, soft);
        assert_eq!(soft, now.rlim_max.min(1 << 20));
    }

    #[test]
    fn the_over_cap_answer_is_well_formed() {
        let text = over_cap_response();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(body.len(), length);
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "TOO_MANY_CONNECTIONS");
    }
}
