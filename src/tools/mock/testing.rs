//! Helpers of the mock's unit tests: start one, call it as a client would.

use std::time::{Duration, Instant};

use axum::http::header;
use serde_json::{Value, json};

use super::{MockOptions, MockServer};

/// A mock with `options` on a free port.
pub(super) async fn start(options: MockOptions) -> MockServer {
    MockServer::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .unwrap()
}

/// A client; over h2c (HTTP/2 with prior knowledge) when `h2c`.
pub(super) fn client(h2c: bool) -> reqwest::Client {
    crate::install_crypto_provider();
    let builder = reqwest::Client::builder();
    let builder = if h2c {
        builder.http2_prior_knowledge()
    } else {
        builder
    };
    builder.build().unwrap()
}

/// Polls `done` every 10 ms for up to 10 s.
pub(super) async fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// A chat request for `model` with one short user message.
pub(super) fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// A chat call for `model` to `mock` (its path may carry a query string).
pub(super) async fn chat(mock: &MockServer, path: &str, model: &str) -> reqwest::Response {
    client(false)
        .post(format!("{}{path}", mock.base_url()))
        .json(&chat_body(model))
        .send()
        .await
        .unwrap()
}

/// An embeddings call of two inputs for `model` to `mock`.
pub(super) async fn embed(mock: &MockServer, model: &str) -> reqwest::Response {
    client(false)
        .post(format!("{}/embeddings", mock.base_url()))
        .json(&json!({"model": model, "input": ["a", "b"]}))
        .send()
        .await
        .unwrap()
}

/// The status, the `error` object and whether `Retry-After` came.
pub(super) async fn refusal(response: reqwest::Response) -> (u16, Value, bool) {
    let status = response.status().as_u16();
    let retry_after = response.headers().contains_key(header::RETRY_AFTER);
    let body: Value = response.json().await.unwrap();
    (status, body["error"].clone(), retry_after)
}

/// The `data:` payloads of a server-sent event stream, comments and blank lines left out.
pub(super) fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}
