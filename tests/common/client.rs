//! An HTTP client for a worker under test, in process or a real binary: the API token when
//! there is one, JSON answers, and the job API's create, stream, run and cancel.

#![allow(dead_code)]

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};

use super::WAIT;
use super::sse::{SseEvent, SseReader, assert_well_formed_ending};

/// A greedy rbee job body.
pub fn infer(prompt: &str, max_tokens: usize) -> Value {
    json!({"operation": "infer", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

#[derive(Clone)]
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
    /// Sent as a bearer token with every request.
    pub token: Option<String>,
    /// How long a job's stream may take to end.
    pub wait: Duration,
}

impl Client {
    pub fn new(base: String, token: Option<&str>) -> Self {
        Self {
            base,
            http: reqwest::Client::new(),
            token: token.map(str::to_string),
            wait: WAIT,
        }
    }

    /// A request to `path`, with the token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// The status and the JSON body (`null` when there is none).
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.request(Method::GET, path).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates a job and returns its id.
    pub async fn create(&self, body: Value) -> String {
        let r = self.post("/v1/jobs", &body).await;
        assert_eq!(
            r.status(),
            200,
            "create failed: {}",
            r.text().await.unwrap()
        );
        let v: Value = r.json().await.unwrap();
        let id = v["job_id"].as_str().unwrap().to_string();
        assert_eq!(v["sse_url"], format!("/v1/jobs/{id}/stream"));
        id
    }

    /// The job's event stream, resumed after `last_event_id` when given.
    pub async fn stream(&self, id: &str, last_event_id: Option<u64>) -> SseReader {
        let mut rb = self.request(Method::GET, &format!("/v1/jobs/{id}/stream"));
        if let Some(last) = last_event_id {
            rb = rb.header("Last-Event-ID", last.to_string());
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        assert_eq!(r.headers()["x-accel-buffering"], "no");
        SseReader::new(r)
    }

    /// Runs a job to its end, which must be `[DONE]`, and returns its events.
    pub async fn run(&self, body: Value) -> Vec<SseEvent> {
        let id = self.create(body).await;
        let events = self.stream(&id, None).await.collect(self.wait).await;
        assert_eq!(
            assert_well_formed_ending(&events).1.data,
            "[DONE]",
            "{events:?}"
        );
        events
    }

    /// Cancels a job; the status.
    pub async fn delete(&self, id: &str) -> u16 {
        self.request(Method::DELETE, &format!("/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The job's `state` (`?` when there is none).
    pub async fn job_state(&self, id: &str) -> String {
        let (_, v) = self.get_json(&format!("/v1/jobs/{id}")).await;
        v["state"].as_str().unwrap_or("?").to_string()
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.request(Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn slots_busy(&self) -> u64 {
        self.get_json("/health").await.1["slots_busy"]
            .as_u64()
            .unwrap()
    }
}
