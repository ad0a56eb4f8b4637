//! `llmq mock-llm`: a deterministic OpenAI-compatible upstream for local runs, docker
//! compose and the tests.
//!
//! `/v1/chat/completions` answers `mock reply to: <last message>`, `/v1/embeddings` answers a
//! vector derived from each input's hash, `/v1/models` lists `mock-model`. Latency and
//! failures are injectable, and can be changed while it runs (the tests do), and it counts
//! what it served.
//!
//! It speaks HTTP/1.1 and HTTP/2 without TLS (h2c, prior knowledge) on the same port, and
//! lets one HTTP/2 connection carry tens of thousands of calls at once: a client over h2c
//! multiplexes every call to a host on one connection.

use std::{
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::StreamExt;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An embedding input the mock refuses with 400 (the whole call, as real APIs do), to test
/// that one bad input in a batch fails only its own request.
pub const REJECTED_INPUT: &str = "__reject__";

/// Dimensions of the mock's embedding vectors.
pub const EMBEDDING_DIMS: usize = 8;

/// Calls one HTTP/2 connection may carry at once. A client multiplexes every call to a host
/// on one h2 connection and queues those past this limit, so it must exceed the most calls
/// anyone holds in flight (`llmq bench --inflight` is a u16); hyper's default is 200.
const MAX_H2_STREAMS: u32 = 1 << 16;

/// How the mock behaves.
#[derive(Debug, Clone, clap::Args)]
pub struct MockOptions {
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra delay per embedding input, in microseconds (batched calls cost more).
    #[arg(long, default_value_t = 0)]
    pub per_item_us: u64,
    /// Fraction of calls that fail, spread evenly and deterministically (0.25 = every 4th).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// The status of injected failures.
    #[arg(long, default_value_t = 500)]
    pub status: u16,
    /// `Retry-After` seconds sent with injected failures.
    #[arg(long)]
    pub retry_after: Option<u64>,
    /// The `error.message` of injected failures (default `injected failure <status>`), e.g.
    /// to echo a key as some providers do.
    #[arg(long)]
    pub error_message: Option<String>,
    /// Require this bearer token (401 otherwise).
    #[arg(long)]
    pub require_key: Option<String>,
    /// Keep every prompt in [`MockStats::prompts`] (tests; unbounded, so off by default).
    #[arg(skip)]
    pub record_prompts: bool,
    /// Answer chat calls with a reply of this many bytes, streamed in chunks without a
    /// `Content-Length` (made as it is sent, so a huge one costs the mock nothing); 0 = the
    /// usual short reply. Tests `llm.max_response_bytes`.
    #[arg(long, default_value_t = 0)]
    pub response_bytes: u64,
    /// Refuse (400, `context_length_exceeded`) chat calls whose messages are longer than
    /// this many bytes, as a model refuses a prompt beyond its context window.
    #[arg(long)]
    pub max_prompt_bytes: Option<usize>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            per_item_us: 0,
            error_rate: 0.0,
            status: 500,
            retry_after: None,
            error_message: None,
            require_key: None,
            record_prompts: false,
            response_bytes: 0,
            max_prompt_bytes: None,
        }
    }
}

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
    /// Calls being answered right now (waiting out their latency): how many calls a client
    /// has in flight, as the mock sees it.
    pub in_flight: AtomicU64,
    /// Chat calls seen when recording, in arrival order: the last message and when it came.
    pub prompts: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
}

struct MockState {
    options: RwLock<MockOptions>,
    stats: Arc<MockStats>,
    calls: AtomicU64,
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
            options: RwLock::new(options),
            stats: Arc::default(),
            calls: AtomicU64::new(0),
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
            *o = options;
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

fn router(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
        .with_state(state)
}

/// Counts a call in [`MockStats::in_flight`] while alive, so a client that hangs up
/// mid-wait is not counted forever.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Checks the key, waits the latency, and decides whether this call fails.
async fn gate(state: &MockState, headers: &HeaderMap, items: u64) -> Option<Response> {
    let options = match state.options.read() {
        Ok(o) => o.clone(),
        Err(_) => MockOptions::default(),
    };
    if let Some(key) = &options.require_key {
        let expected = format!("Bearer {key}");
        if headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            != Some(&expected)
        {
            let body =
                json!({"error": {"message": "invalid api key", "type": "invalid_request_error"}});
            return Some((StatusCode::UNAUTHORIZED, Json(body)).into_response());
        }
    }
    let delay = Duration::from_millis(options.latency_ms)
        + Duration::from_micros(options.per_item_us.saturating_mul(items));
    if !delay.is_zero() {
        let _serving = InFlight::new(&state.stats.in_flight);
        tokio::time::sleep(delay).await;
    }
    let n = state.calls.fetch_add(1, Ordering::Relaxed);
    let rate = options.error_rate.clamp(0.0, 1.0);
    // Fails call n when the running count of failures due steps up: evenly spread, no RNG.
    let fail = ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor();
    if !fail {
        return None;
    }
    state.stats.failures.fetch_add(1, Ordering::Relaxed);
    let status = StatusCode::from_u16(options.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = options
        .error_message
        .unwrap_or_else(|| format!("injected failure {status}"));
    let body = json!({"error": {"message": message, "type": "mock_error"}});
    let mut response = (status, Json(body)).into_response();
    if let Some(secs) = options.retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Some(response)
}

async fn chat(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.stats.chat_calls.fetch_add(1, Ordering::Relaxed);
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default();
    let (record, response_bytes, max_prompt_bytes) = state
        .options
        .read()
        .map(|o| (o.record_prompts, o.response_bytes, o.max_prompt_bytes))
        .unwrap_or((false, 0, None));
    if record && let Ok(mut prompts) = state.stats.prompts.lock() {
        prompts.push((last.clone(), std::time::Instant::now()));
    }
    let prompt_bytes = body["messages"].to_string().len();
    if max_prompt_bytes.is_some_and(|max| prompt_bytes > max) {
        let body = json!({"error": {
            "message": format!("prompt of {prompt_bytes} bytes exceeds the context window"),
            "type": "invalid_request_error",
            "code": "context_length_exceeded"
        }});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    if let Some(failure) = gate(&state, &headers, 1).await {
        return failure;
    }
    if response_bytes > 0 {
        return huge_reply(
            body["model"].as_str().unwrap_or("mock-model"),
            response_bytes,
        );
    }
    let content = format!("mock reply to: {last}");
    let prompt_tokens = body["messages"].to_string().len() / 4;
    let completion_tokens = content.len() / 4;
    Json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": body["model"].as_str().unwrap_or("mock-model"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    }))
    .into_response()
}

/// A chat answer whose reply is `bytes` of `x`, streamed in 64 KiB chunks made as they are
/// sent, without a `Content-Length`.
fn huge_reply(model: &str, bytes: u64) -> Response {
    const CHUNK: usize = 64 * 1024;
    static PADDING: [u8; CHUNK] = [b'x'; CHUNK];
    let head =
        json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model})
            .to_string();
    // `{...,"model":"m"` + `,"choices":[...content":"xxx..."},"finish_reason":"stop"}]}`
    let head = format!(
        "{},\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"",
        head.trim_end_matches('}')
    );
    let tail = "\"},\"finish_reason\":\"stop\"}]}";
    let padding = futures_util::stream::unfold(bytes, |left| async move {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(CHUNK);
        (n > 0).then(|| (Bytes::from_static(&PADDING[..n]), left - n as u64))
    });
    let stream = futures_util::stream::once(async move { Bytes::from(head) })
        .chain(padding)
        .chain(futures_util::stream::once(async move {
            Bytes::from_static(tail.as_bytes())
        }))
        .map(Ok::<_, std::convert::Infallible>);
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

async fn embeddings(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        _ => {
            let body = json!({"error": {"message": "input must be a string or a list", "type": "invalid_request_error"}});
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    };
    state.stats.embedding_calls.fetch_add(1, Ordering::Relaxed);
    if inputs.iter().any(|i| i == REJECTED_INPUT) {
        let body = json!({"error": {"message": "input rejected", "type": "invalid_request_error"}});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    state
        .stats
        .embedding_items
        .fetch_add(inputs.len() as u64, Ordering::Relaxed);
    if let Some(failure) = gate(&state, &headers, inputs.len() as u64).await {
        return failure;
    }
    let tokens: usize = inputs.iter().map(|s| s.len() / 4 + 1).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"object": "embedding", "index": i, "embedding": mock_embedding(s)}))
        .collect();
    Json(json!({
        "object": "list",
        "model": body["model"].as_str().unwrap_or("mock-embedding"),
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    }))
    .into_response()
}

async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [
            {"id": "mock-model", "object": "model", "owned_by": "llmq"},
            {"id": "mock-embedding", "object": "model", "owned_by": "llmq"}
        ]
    }))
}

/// The deterministic vector the mock returns for `input`: [`EMBEDDING_DIMS`] values in
/// [-1, 1] from its SHA-256.
pub fn mock_embedding(input: &str) -> Vec<f32> {
    let digest = Sha256::digest(input.as_bytes());
    digest
        .iter()
        .take(EMBEDDING_DIMS)
        .map(|b| (f32::from(*b) / 127.5) - 1.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    async fn start(options: MockOptions) -> MockServer {
        MockServer::start("127.0.0.1:0".parse().unwrap(), options)
            .await
            .unwrap()
    }

    fn client(h2c: bool) -> reqwest::Client {
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
    async fn wait_until(mut done: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

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
    async fn a_huge_reply_streams_valid_json_of_that_size() {
        let mock = start(MockOptions {
            response_bytes: 200_000,
            ..Default::default()
        })
        .await;
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let response = client(false)
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.content_length(), None, "streamed");
        let answer: Value = response.json().await.unwrap();
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content.len(), 200_000);
        assert!(content.bytes().all(|b| b == b'x'));
        assert_eq!(answer["model"], "m");
    }

    #[tokio::test]
    async fn a_prompt_beyond_the_context_window_is_refused() {
        let mock = start(MockOptions {
            max_prompt_bytes: Some(100),
            ..Default::default()
        })
        .await;
        let url = format!("{}/chat/completions", mock.base_url());
        let http = client(false);
        let long =
            json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(100)}]});
        let response = http.post(&url).json(&long).send().await.unwrap();
        assert_eq!(response.status(), 400);
        let short = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        let response = http.post(&url).json(&short).send().await.unwrap();
        assert_eq!(response.status(), 200);
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
