//! The binary's connection limits and timeouts, over raw TCP: slow or idle clients are closed
//! within the timeouts, a stalled body fails, the connection cap answers 503 at once, and
//! neither `/health` nor a long SSE stream is disturbed by any of it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::default_model::default_model_path;
use common::process::WorkerProcess;

const TIMEOUT: Duration = Duration::from_secs(1);
/// How late a close may come after its timeout (scheduling on a busy 2-core machine).
const SLACK: Duration = Duration::from_secs(3);
const CAP: usize = 6;

/// The tests here measure timeouts on a 2-core machine: one at a time, so that neither's
/// worker slows the other's clock checks.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn start() -> (WorkerProcess, String) {
    start_with("1s", CAP)
}

fn start_with(timeout: &str, cap: usize) -> (WorkerProcess, String) {
    let worker = WorkerProcess::start(|command| {
        command
            .args(["--port", "0", "--header-timeout", timeout])
            .args(["--body-timeout", timeout])
            .args(["--max-connections", &cap.to_string()])
            .arg("--model")
            .arg(default_model_path());
    });
    let addr = worker.wait_for_line(
        common::WAIT,
        "the worker never said where it listens",
        |line| {
            let rest = line.split("listening on http://").nth(1)?;
            Some(rest.split_whitespace().next()?.to_string())
        },
    );
    (worker, addr)
}

/// Reads until the peer closes; returns what it sent and when it closed (`None`: still open
/// after `limit`).
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let start = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into(), Some(start.elapsed())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (String::from_utf8_lossy(&got).into(), Some(start.elapsed())),
        }
    }
    (String::from_utf8_lossy(&got).into(), None)
}

fn get(addr: &str, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_until_closed(&mut s, common::WAIT).0
}

fn wait_ready(addr: &str) {
    let start = Instant::now();
    while !get(addr, "/health").starts_with("HTTP/1.1 200") {
        assert!(start.elapsed() < common::WAIT, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn slow_idle_and_stalled_clients_are_closed_and_the_cap_answers_503() {
    let _serial = one_at_a_time();
    let (_worker, addr) = start();
    wait_ready(&addr);

    // A long stream, running through all of what follows: responses are never timed.
    let stream_addr = addr.clone();
    let long_stream = std::thread::spawn(move || {
        let body = r#"{"operation":"infer","prompt":"Count slowly to one hundred:","max_tokens":400,"temperature":0,"ignore_eos":true}"#;
        let mut s = TcpStream::connect(&stream_addr).unwrap();
        write!(
            s,
            "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let created = read_until_closed(&mut s, common::WAIT).0;
        let sse_url = created
            .split("\"sse_url\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("sse_url")
            .to_string();
        let started = Instant::now();
        let mut s = TcpStream::connect(&stream_addr).unwrap();
        write!(
            s,
            "GET {sse_url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let (text, closed) = read_until_closed(&mut s, Duration::from_secs(60));
        (text, closed, started.elapsed())
    });

    // Slow headers: one byte every 300 ms never completes a request.
    let mut slow = TcpStream::connect(&addr).unwrap();
    let slow_closed = std::thread::spawn(move || {
        let start = Instant::now();
        for byte in b"GET /health HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxx\r\n" {
            if slow.write_all(&[*byte]).is_err() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("a header trickled over {:?} was never cut", start.elapsed());
    });
    // Idle: connected, never a byte.
    let mut idle = TcpStream::connect(&addr).unwrap();
    // Keep-alive after a response.
    let mut kept = TcpStream::connect(&addr).unwrap();
    write!(kept, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // A body that stalls after 10 of 100 bytes.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    write!(
        stalled,
        "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"prompt\":"
    )
    .unwrap();

    // Meanwhile the worker serves.
    assert!(get(&addr, "/health").starts_with("HTTP/1.1 200"));

    let (_, idle_closed) = read_until_closed(&mut idle, TIMEOUT + SLACK);
    assert!(idle_closed.is_some(), "an idle connection stayed open");
    let (kept_text, kept_closed) = read_until_closed(&mut kept, TIMEOUT + SLACK);
    assert!(kept_text.starts_with("HTTP/1.1 200"), "{kept_text}");
    assert!(
        kept_closed.is_some(),
        "an idle keep-alive connection stayed open"
    );
    let (stalled_text, stalled_closed) = read_until_closed(&mut stalled, TIMEOUT + SLACK);
    assert!(
        stalled_closed.is_some(),
        "a stalled body kept its connection"
    );
    assert!(
        stalled_text.is_empty() || stalled_text.starts_with("HTTP/1.1 4"),
        "{stalled_text}"
    );
    let slow_for = slow_closed.join().unwrap();
    assert!(
        slow_for < TIMEOUT + SLACK,
        "slow headers cut after {slow_for:?}"
    );

    // The cap: CAP idle connections held, the next one is answered 503 at once.
    let held: Vec<TcpStream> = (0..CAP)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut over = TcpStream::connect(&addr).unwrap();
    let (over_text, over_closed) = read_until_closed(&mut over, Duration::from_secs(2));
    assert!(over_text.starts_with("HTTP/1.1 503"), "{over_text}");
    assert!(over_text.contains("Retry-After: 1"), "{over_text}");
    assert!(over_closed.is_some());
    drop(held);
    // Once they are gone, connections are taken again.
    let start = Instant::now();
    while !get(&addr, "/health").starts_with("HTTP/1.1 200") {
        assert!(start.elapsed() < common::WAIT, "the cap never freed");
        std::thread::sleep(Duration::from_millis(100));
    }

    let (text, closed, took) = long_stream.join().unwrap();
    assert!(closed.is_some(), "the stream never ended");
    assert!(
        took > TIMEOUT,
        "the stream took only {took:?}: it proves nothing"
    );
    assert!(text.contains("event: end"), "{text}");
    assert!(text.contains("data: [DONE]"), "{text}");
}

/// The worker's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The worker's descriptor count once it has held still for 300 ms (at most 3 s): the
/// readiness probe's connection may still be open on the worker's side when the probe returns,
/// and a baseline that counts it is one more than the worker holds once it closes.
fn settled_fds(pid: u32) -> usize {
    let start = Instant::now();
    let mut count = open_fds(pid);
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_millis(300) && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
        let now = open_fds(pid);
        if now != count {
            count = now;
            since = Instant::now();
        }
    }
    count
}

/// Whether the peer has closed `stream` (non-blocking read: end of file or an error
/// other than "would block").
fn closed_now(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// One connection under watch: when it was last used (no later than the worker's timer
/// started), and how long after that the worker closed it.
struct Watched {
    stream: TcpStream,
    since: Instant,
    closed_after: Option<Duration>,
}

impl Watched {
    fn new(stream: TcpStream, since: Instant) -> Self {
        stream.set_nonblocking(true).unwrap();
        Self {
            stream,
            since,
            closed_after: None,
        }
    }
}

#[test]
fn hundreds_of_slow_and_idle_connections_are_closed_while_the_worker_serves() {
    let _serial = one_at_a_time();
    const SLOW: usize = 500;
    const IDLE: usize = 200;
    let timeout = Duration::from_secs(3);
    let (worker, addr) = start_with("3s", 1024);
    wait_ready(&addr);
    let fds_at_start = settled_fds(worker.pid());
    assert!(fds_at_start > 0, "cannot read the worker's descriptors");

    // Slow headers: a partial request line, then one more byte per round below.
    let mut slow: Vec<Watched> = (0..SLOW)
        .map(|_| {
            let mut stream = TcpStream::connect(&addr).unwrap();
            let since = Instant::now();
            stream.write_all(b"G").unwrap();
            Watched::new(stream, since)
        })
        .collect();
    // Accepting may lag behind the connects on a busy machine; the header timer starts at the
    // accept, which is why the closes below get more slack than the small test's.
    let counted = Instant::now();
    let mut held = open_fds(worker.pid());
    while held < fds_at_start + SLOW && counted.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        held = open_fds(worker.pid());
    }
    assert!(
        held >= fds_at_start + SLOW,
        "the worker holds {held} descriptors, {fds_at_start} before {SLOW} connections"
    );

    // Idle keep-alive connections, each after one answered request (all asked first, so that
    // none waits long for the others).
    // The worker's timer starts after its answer, so timing from the request overstates.
    let mut asked: Vec<(TcpStream, Instant)> = (0..IDLE)
        .map(|_| {
            let mut stream = TcpStream::connect(&addr).unwrap();
            write!(stream, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            (stream, Instant::now())
        })
        .collect();
    let mut idle: Vec<Watched> = asked
        .drain(..)
        .map(|(mut stream, since)| {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).unwrap();
            assert!(
                buf[..n].starts_with(b"HTTP/1.1 200"),
                "{}",
                String::from_utf8_lossy(&buf[..n])
            );
            Watched::new(stream, since)
        })
        .collect();
    // A generation runs meanwhile, on a connection of its own.
    let gen_addr = addr.clone();
    let generation = std::thread::spawn(move || {
        let body = r#"{"prompt":"The capital of France is","max_tokens":32,"temperature":0,"ignore_eos":true}"#;
        let mut s = TcpStream::connect(&gen_addr).unwrap();
        write!(
            s,
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        read_until_closed(&mut s, common::WAIT).0
    });

    let slack = 2 * SLACK;
    let deadline = Instant::now() + timeout + slack + Duration::from_secs(2);
    let mut health_checks = 0;
    while Instant::now() < deadline
        && (slow.iter().any(|w| w.closed_after.is_none())
            || idle.iter().any(|w| w.closed_after.is_none()))
    {
        for w in slow.iter_mut().filter(|w| w.closed_after.is_none()) {
            // Writing to a connection the worker closed fails, or the read below sees the end.
            if w.stream.write_all(b"E").is_err() || closed_now(&mut w.stream) {
                w.closed_after = Some(w.since.elapsed());
            }
        }
        for w in idle.iter_mut().filter(|w| w.closed_after.is_none()) {
            if closed_now(&mut w.stream) {
                w.closed_after = Some(w.since.elapsed());
            }
        }
        let health = get(&addr, "/health");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        health_checks += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(health_checks >= 4, "only {health_checks} health checks");
    for (kind, watched) in [("slow-header", &slow), ("idle keep-alive", &idle)] {
        let open = watched.iter().filter(|w| w.closed_after.is_none()).count();
        assert_eq!(open, 0, "{open} {kind} connections still open");
        let latest = watched.iter().filter_map(|w| w.closed_after).max().unwrap();
        assert!(
            latest < timeout + slack,
            "a {kind} connection was closed only after {latest:?}"
        );
    }

    let answer = generation.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"completion_tokens\":32"), "{answer}");

    drop(slow);
    drop(idle);
    let start = Instant::now();
    while open_fds(worker.pid()) > fds_at_start {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker holds {} descriptors, {fds_at_start} at the start",
            open_fds(worker.pid())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
