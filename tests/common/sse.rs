//! A small Server-Sent Events client for the HTTP tests: reads a `reqwest` response body and
//! yields events as the spec frames them (blank-line separated, `:` comments skipped).

#![allow(dead_code)]

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<u64>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }

    pub fn name(&self) -> &str {
        self.event.as_deref().unwrap_or("")
    }

    /// `[DONE]`, `[ERROR] …` or `[CANCELLED]`.
    pub fn is_sentinel(&self) -> bool {
        self.event.is_none() && self.data.starts_with('[')
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self.name(), "end" | "error")
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>;

pub struct SseReader {
    body: ByteStream,
    buf: String,
    pub comments: usize,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: Box::pin(response.bytes_stream()),
            buf: String::new(),
            comments: 0,
        }
    }

    /// The next event, or `None` when the body ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(event) = self.parse(&block) {
                    return Some(event);
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Like `next`, failing the test after `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<SseEvent> {
        tokio::time::timeout(timeout, self.next())
            .await
            .expect("timed out waiting for an SSE event")
    }

    fn parse(&mut self, block: &str) -> Option<SseEvent> {
        let mut event = None;
        let mut id = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_string()),
                "id" => id = value.parse().ok(),
                "data" => data.push(value),
                _ => {}
            }
        }
        if event.is_none() && id.is_none() && data.is_empty() {
            return None;
        }
        Some(SseEvent {
            event,
            id,
            data: data.join("\n"),
        })
    }

    /// Every event until the body ends (bounded by `timeout`).
    pub async fn collect(&mut self, timeout: Duration) -> Vec<SseEvent> {
        let mut out = Vec::new();
        let read = async {
            while let Some(e) = self.next().await {
                out.push(e);
            }
        };
        tokio::time::timeout(timeout, read)
            .await
            .expect("timed out waiting for the SSE stream to end");
        out
    }
}

/// Checks the shape every finished stream must have: events with names and increasing ids,
/// exactly one terminal event, then exactly one sentinel that matches it, then nothing.
pub fn assert_well_formed_ending(events: &[SseEvent]) -> (&SseEvent, &SseEvent) {
    assert!(events.len() >= 2, "stream too short: {events:?}");
    let sentinel = &events[events.len() - 1];
    let terminal = &events[events.len() - 2];
    assert!(
        sentinel.is_sentinel(),
        "last is not a sentinel: {sentinel:?}"
    );
    assert!(
        terminal.is_terminal(),
        "second to last is not terminal: {terminal:?}"
    );
    let terminals = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminals, 1, "exactly one terminal event: {events:?}");
    let mut last_id = 0;
    for e in &events[..events.len() - 1] {
        let id = e.id.unwrap_or_else(|| panic!("event without id: {e:?}"));
        assert!(id > last_id, "ids must increase: {events:?}");
        last_id = id;
        assert_eq!(
            e.json()["type"].as_str(),
            e.event.as_deref(),
            "type = event name"
        );
    }
    let json = terminal.json();
    let expected = match (terminal.name(), json["code"].as_str()) {
        ("end", _) => "[DONE]".to_string(),
        ("error", Some("CANCELLED")) => "[CANCELLED]".to_string(),
        _ => format!("[ERROR] {}", json["message"].as_str().unwrap_or_default()),
    };
    assert_eq!(sentinel.data, expected);
    (terminal, sentinel)
}
