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

fn start() -> (WorkerProcess, String) {
    let worker = WorkerProcess::start(|command| {
        command
            .args([
                "--port",
                "0",
                "--header-timeout",
                "1s",
                "--body-timeout",
                "1s",
            ])
            .args(["--max-connections", &CAP.to_string()])
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
