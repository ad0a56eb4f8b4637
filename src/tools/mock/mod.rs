//! `llmq mock-llm`: a deterministic OpenAI-compatible upstream for local runs, docker
//! compose and the tests.
//!
//! `/v1/chat/completions` answers `mock reply to: <last message>`, `/v1/embeddings` answers a
//! vector derived from each input's hash, `/v1/models` lists `mock-model`. Latency and
//! failures are injectable, and can be changed while it runs (the tests do), and it counts
//! what it served.
//!
//! It can also behave as the deployments of a fleet do: serve some models only (404
//! `model_not_found`), be out of quota (429 `insufficient_quota`), cap concurrent calls
//! without saying so (429 `rate_limit_exceeded`), send OpenAI's `x-ratelimit-*` headers,
//! report a dated snapshot as the model, and require Azure's `api-key` header and
//! `api-version` query parameter. A call meets these checks in the order a provider makes
//! them: credentials, model, quota, concurrency; then its latency and injected failures.
//!
//! It speaks HTTP/1.1 and HTTP/2 without TLS (h2c, prior knowledge) on the same port, and
//! lets one HTTP/2 connection carry tens of thousands of calls at once: a client over h2c
//! multiplexes every call to a host on one connection.
//!
//! Here: the server, its state and what it counts. Beside it, by concern: `options` (the
//! command line), `gate` (the checks a call meets, its latency and injected failures),
//! `chat`, `stream` (server-sent events) and `embeddings`.

mod chat;
mod embeddings;
mod gate;
mod options;
mod stream;
#[cfg(test)]
mod testing;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, RwLock, atomic::AtomicU64},
    time::Duration,
};

use axum::{
    Json, Router,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use embeddings::{EMBEDDING_DIMS, REJECTED_INPUT, mock_embedding, mock_embedding_base64};
pub use options::MockOptions;

/// Calls one HTTP/2 connection may carry at once. A client multiplexes every call to a host
/// on one h2 connection and queues those past this limit, so it must exceed the most calls
/// anyone holds in flight (`llmq bench --inflight` is a u16); hyper's default is 200.
const MAX_H2_STREAMS: u32 = 1 << 16;

/// What the mock has served.
#[derive(Debug, Default)]
pub struct MockStats {
    /// Chat completion calls, failed ones included.
    pub chat_calls: AtomicU64,
    /// Embedding calls, failed ones included.
    pub embedding_calls: AtomicU64,
    /// Embedding inputs over all calls.
    pub embedding_items: AtomicU64,
    /// Injected failures.
    pub failures: AtomicU64,
    /// Calls whose latency was jittered (`latency_jitter_ms`).
    pub jittered: AtomicU64,
    /// Calls being answered right now (waiting out their latency): how many calls a client
    /// has in flight, as the mock sees it.
    pub in_flight: AtomicU64,
    /// The most calls it was answering at once, each counted from its arrival to its answer
    /// (calls refused before the concurrency check, for credentials, model or quota, are
    /// not counted): never above [`MockOptions::max_concurrency`].
    pub peak_in_flight: AtomicU64,
    /// Calls refused with 429 because [`MockOptions::max_concurrency`] calls were being
    /// answered.
    pub over_cap: AtomicU64,
    /// Streamed answers begun.
    pub streams: AtomicU64,
    /// Streamed answers cut off midway (`--fail-mid-stream-after`).
    pub streams_cut: AtomicU64,
    /// Chat calls seen when recording, in arrival order: the last message and when it came.
    pub prompts: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
    /// The same calls when recording, in the order they ended: the last message and when
    /// its handler finished (its answer made, or the call given up; a streamed answer when
    /// its body begins). With [`Self::prompts`], how many calls of one kind (a tenant's, by
    /// a prefix of their messages) were being answered at once.
    pub ends: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
    /// Streamed answers when recording ([`MockOptions::record_first_chunks`]), by their
    /// last message: the instant just before the first chunk after the role chunk went into
    /// the body. A later answer to the same message keeps the first instant.
    pub first_chunks: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Every chat and embeddings body as it arrived, in arrival order, when recording
    /// ([`MockOptions::record_bodies`]): what the client sent, field by field.
    pub bodies: std::sync::Mutex<Vec<Value>>,
}

struct MockState {
    /// Shared, so that a call reads them without copying their strings.
    options: RwLock<Arc<MockOptions>>,
    stats: Arc<MockStats>,
    /// Calls past the concurrency check, for spreading injected failures.
    calls: AtomicU64,
    /// Calls being answered, counted from arrival (see [`Admitted`](gate::Admitted)).
    answering: AtomicU64,
}

impl MockState {
    /// Keeps `body` in [`MockStats::bodies`] when recording.
    fn record_body(&self, body: &Value) {
        if self.options().record_bodies
            && let Ok(mut bodies) = self.stats.bodies.lock()
        {
            bodies.push(body.clone());
        }
    }

    /// The options as they are now.
    fn options(&self) -> Arc<MockOptions> {
        match self.options.read() {
            Ok(o) => Arc::clone(&o),
            Err(_) => Arc::default(),
        }
    }
}

/// A running mock, stopped when dropped.
pub struct MockServer {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<MockState>,
    stop: CancellationToken,
}

impl MockServer {
    /// Binds `addr` (port 0 picks a free one) and serves in the background.
    pub async fn start(addr: SocketAddr, options: MockOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState {
            options: RwLock::new(Arc::new(options)),
            stats: Arc::default(),
            calls: AtomicU64::new(0),
            answering: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, router(state.clone()), stop.clone()));
        Ok(Self { addr, state, stop })
    }

    /// `http://addr/v1`, the worker's `llm.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// What it served so far.
    pub fn stats(&self) -> &MockStats {
        &self.state.stats
    }

    /// Changes its behaviour from now on.
    pub fn set_options(&self, options: MockOptions) {
        if let Ok(mut o) = self.state.options.write() {
            *o = Arc::new(options);
        }
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves `app` over HTTP/1.1 and h2c until `stop`; then stops accepting, lets each
/// connection finish the calls it has (closing idle ones at once) and waits for them, as
/// `axum::serve(..).with_graceful_shutdown(..)` does. `axum::serve` cannot set HTTP/2's
/// limits, hence hyper's own server.
async fn serve(listener: TcpListener, app: Router, stop: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(MAX_H2_STREAMS);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let conn = builder
            .serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app.clone()),
            )
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that hangs up mid-call is the client's business.
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// After a failed `accept`: a connection given up before it was accepted is no concern;
/// anything else (out of file descriptors, most likely) is logged and waited out for a
/// second, so the loop does not spin, as axum does.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "mock upstream: accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// The OpenAI routes it serves.
fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat::chat))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models))
        .with_state(state)
}

/// `/v1/models`: the two models it is named for (it answers for any unless `--models`).
async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [
            {"id": "mock-model", "object": "model", "owned_by": "llmq"},
            {"id": "mock-embedding", "object": "model", "owned_by": "llmq"}
        ]
    }))
}

/// An error answer in OpenAI's shape, `{"error": {"message", "type", "code"}}`, without
/// `code` when `None`.
fn api_error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let mut error = json!({"message": message, "type": kind});
    if let Some(code) = code {
        error["code"] = json!(code);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

/// The model an answer reports: the one asked for (`default` when none) with
/// `model_suffix`, as OpenAI names the dated snapshot that served an alias.
fn answered_model(options: &MockOptions, asked: Option<&str>, default: &str) -> String {
    let suffix = options.model_suffix.as_deref().unwrap_or_default();
    format!("{}{suffix}", asked.unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use std::{sync::atomic::Ordering, time::Duration};

    use serde_json::json;

    use super::{
        MockOptions,
        testing::{client, start, wait_until},
    };

    #[tokio::test]
    async fn http1_is_served_as_before() {
        let mock = start(MockOptions::default()).await;
        let response = client(false)
            .get(format!("{}/models", mock.base_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
        assert_eq!(response.status(), 200);
    }

    /// More calls than hyper's default of 200 streams, all at once on the one connection a
    /// client opens over h2c, each counted in flight.
    #[tokio::test]
    async fn h2c_holds_hundreds_of_calls_on_one_connection() {
        let calls = 300;
        let mock = start(MockOptions {
            latency_ms: 1_000,
            ..Default::default()
        })
        .await;
        let http = client(true);
        let url = format!("{}/chat/completions", mock.base_url());
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let tasks: Vec<_> = (0..calls)
            .map(|_| tokio::spawn(http.post(&url).json(&body).send()))
            .collect();
        let in_flight = &mock.stats().in_flight;
        let mut most = 0;
        let all = wait_until(|| {
            most = most.max(in_flight.load(Ordering::Relaxed));
            most == calls
        })
        .await;
        assert!(all, "at most {most} of {calls} calls in flight at once");
        for task in tasks {
            let response = task.await.unwrap().unwrap();
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            assert_eq!(response.status(), 200);
        }
        assert_eq!(mock.stats().chat_calls.load(Ordering::Relaxed), calls);
        assert_eq!(in_flight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn stops_listening_when_dropped() {
        let mock = start(MockOptions::default()).await;
        let addr = mock.addr;
        drop(mock);
        let mut refused = false;
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "still accepting on {addr}");
    }
}
