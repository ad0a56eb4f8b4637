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

use std::{
    collections::HashMap,
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
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
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
    /// Up to this many milliseconds more, spread evenly and deterministically over the
    /// calls, as a provider's answer times vary: calls started together do not end together.
    #[arg(long, default_value_t = 0)]
    pub latency_jitter_ms: u64,
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
    /// Keep every prompt in [`MockStats::prompts`], and when its call ended in
    /// [`MockStats::ends`] (tests; unbounded, so off by default).
    #[arg(skip)]
    pub record_prompts: bool,
    /// Note when each streamed answer's first content chunk goes out, in
    /// [`MockStats::first_chunks`] (`llmq bench`; unbounded, so off by default).
    #[arg(skip)]
    pub record_first_chunks: bool,
    /// Answer chat calls with a reply of this many bytes, streamed in chunks without a
    /// `Content-Length` (made as it is sent, so a huge one costs the mock nothing); 0 = the
    /// usual short reply. Tests `llm.max_response_bytes`.
    #[arg(long, default_value_t = 0)]
    pub response_bytes: u64,
    /// Refuse (400, `context_length_exceeded`) chat calls whose messages are longer than
    /// this many bytes, as a model refuses a prompt beyond its context window.
    #[arg(long)]
    pub max_prompt_bytes: Option<usize>,
    /// The only models it serves (`--models a,b`): a chat or embeddings call for another
    /// gets 404 `model_not_found`, as a deployment that lacks the model answers. Empty: any.
    #[arg(long, value_delimiter = ',')]
    pub models: Vec<String>,
    /// Answer every chat and embeddings call 429 `insufficient_quota`, without
    /// `Retry-After`: an account out of credit, which waiting does not cure.
    #[arg(long)]
    pub insufficient_quota: bool,
    /// Calls it answers at once, each counted from its arrival to its answer (its latency
    /// included): a call beyond them is refused at once with 429 `rate_limit_exceeded` and
    /// no `Retry-After`, as a provider enforces a concurrency cap it does not announce.
    /// Counted in [`MockStats::over_cap`] and [`MockStats::peak_in_flight`].
    #[arg(long)]
    pub max_concurrency: Option<u64>,
    /// Send injected 429s with OpenAI's `x-ratelimit-remaining-requests: 0` and
    /// `x-ratelimit-reset-requests: <retry_after or 1>s` instead of `Retry-After`.
    #[arg(long)]
    pub rate_limit_headers: bool,
    /// Milliseconds between the chunks of a streamed answer (a request with
    /// `"stream": true` is answered with server-sent events).
    #[arg(long, default_value_t = 0)]
    pub chunk_ms: u64,
    /// Cut every streamed answer off after this many chunks (the connection drops without
    /// `[DONE]`), as an upstream failing mid-stream does.
    #[arg(long)]
    pub fail_mid_stream_after: Option<u64>,
    /// With `--fail-mid-stream-after`, the fraction of streamed answers cut off: the first
    /// of every 1/rate (0.5 cuts the 1st, 3rd, 5th...), so that a retry of a cut stream
    /// gets through.
    #[arg(long, default_value_t = 1.0)]
    pub fail_mid_stream_rate: f64,
    /// Break a stream off with an error event (`data: {"error": {...}}`, then the end of
    /// the body), as OpenAI and vLLM report a failure mid-stream, instead of dropping the
    /// connection.
    #[arg(long)]
    pub mid_stream_error: bool,
    /// Appended to the requested model in answers (`--model-suffix -2024-07-18`), as
    /// OpenAI reports the dated snapshot that served an alias.
    #[arg(long, allow_hyphen_values = true)]
    pub model_suffix: Option<String>,
    /// Require this header, `name: value` (401 otherwise), as Azure OpenAI requires
    /// `api-key`. A value without a `:` matches no call.
    #[arg(long, value_parser = header_requirement)]
    pub require_header: Option<String>,
    /// Require this query parameter, `name=value` (401 otherwise), as Azure OpenAI
    /// requires `api-version`. A value without a `=` matches no call.
    #[arg(long, value_parser = query_requirement)]
    pub require_query: Option<String>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            latency_jitter_ms: 0,
            per_item_us: 0,
            error_rate: 0.0,
            status: 500,
            retry_after: None,
            error_message: None,
            require_key: None,
            record_prompts: false,
            record_first_chunks: false,
            response_bytes: 0,
            max_prompt_bytes: None,
            models: Vec::new(),
            insufficient_quota: false,
            max_concurrency: None,
            rate_limit_headers: false,
            chunk_ms: 0,
            fail_mid_stream_after: None,
            fail_mid_stream_rate: 1.0,
            mid_stream_error: false,
            model_suffix: None,
            require_header: None,
            require_query: None,
        }
    }
}

/// `--require-header`: `name: value` with a valid header name and value.
fn header_requirement(s: &str) -> Result<String, String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}` is not `name: value`"))?;
    HeaderName::try_from(name.trim()).map_err(|e| format!("header name `{name}`: {e}"))?;
    HeaderValue::try_from(value.trim()).map_err(|e| format!("header value: {e}"))?;
    Ok(s.to_string())
}

/// `--require-query`: `name=value`.
fn query_requirement(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((name, _)) if !name.is_empty() => Ok(s.to_string()),
        _ => Err(format!("`{s}` is not `name=value`")),
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
}

struct MockState {
    /// Shared, so that a call reads them without copying their strings.
    options: RwLock<Arc<MockOptions>>,
    stats: Arc<MockStats>,
    /// Calls past the concurrency check, for spreading injected failures.
    calls: AtomicU64,
    /// Calls being answered, counted from arrival (see [`Admitted`]).
    answering: AtomicU64,
}

impl MockState {
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

/// A call's place among those being answered, from its arrival until its answer is made;
/// given back when dropped, so a client that hangs up mid-call frees its place.
struct Admitted<'a>(&'a AtomicU64);

impl<'a> Admitted<'a> {
    /// Takes a place, or `None` when `cap` calls hold one already. The count moves from
    /// below the cap to one more in a single atomic step: calls arriving together cannot
    /// take more places than there are, and a refused call never shows in the count (as it
    /// would for a moment with an add undone on refusal, refusing a call that had room).
    fn new(state: &'a MockState, cap: Option<u64>) -> Option<Self> {
        let before = state
            .answering
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                cap.is_none_or(|cap| n < cap).then_some(n + 1)
            })
            .ok()?;
        state
            .stats
            .peak_in_flight
            .fetch_max(before + 1, Ordering::Relaxed);
        Some(Self(&state.answering))
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What [`gate`] looks at in a chat or embeddings call.
struct Call<'r> {
    headers: &'r HeaderMap,
    /// The raw query string, if any.
    query: Option<&'r str>,
    /// The model asked for, `""` when none.
    model: &'r str,
    /// Embedding inputs; 1 for a chat call.
    items: u64,
}

/// OpenAI's headers that say a request budget is spent and when it refills.
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

/// Makes a provider's checks in its order (credentials, model, quota, concurrency), waits
/// the latency and decides whether this call fails. `Ok` is the call's place among those
/// being answered, for the handler to hold until its answer is made.
async fn gate<'s>(
    state: &'s MockState,
    options: &MockOptions,
    call: &Call<'_>,
) -> Result<Admitted<'s>, Response> {
    if !authorized(options, call) {
        return Err(api_error(
            StatusCode::UNAUTHORIZED,
            "invalid api key",
            "invalid_request_error",
            None,
        ));
    }
    if !options.models.is_empty() && !options.models.iter().any(|m| m == call.model) {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            &format!("The model `{}` does not exist", call.model),
            "invalid_request_error",
            Some("model_not_found"),
        ));
    }
    if options.insufficient_quota {
        return Err(api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            Some("insufficient_quota"),
        ));
    }
    let Some(admitted) = Admitted::new(state, options.max_concurrency) else {
        state.stats.over_cap.fetch_add(1, Ordering::Relaxed);
        return Err(api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many concurrent requests",
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        ));
    };
    let jitter = match options.latency_jitter_ms {
        0 => 0,
        spread => {
            // A stride through 0..=spread coprime with most spreads: calls in a row differ.
            let n = state.stats.jittered.fetch_add(1, Ordering::Relaxed);
            n.wrapping_mul(7919) % (spread + 1)
        }
    };
    let delay = Duration::from_millis(options.latency_ms + jitter)
        + Duration::from_micros(options.per_item_us.saturating_mul(call.items));
    if !delay.is_zero() {
        let _serving = InFlight::new(&state.stats.in_flight);
        tokio::time::sleep(delay).await;
    }
    match injected_failure(state, options) {
        Some(failure) => Err(failure),
        None => Ok(admitted),
    }
}

/// Whether the call carries the bearer key, the header and the query parameter that the
/// options require.
fn authorized(options: &MockOptions, call: &Call<'_>) -> bool {
    let key = options.require_key.as_ref().is_none_or(|key| {
        call.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {key}").as_str())
    });
    let named_header = options.require_header.as_ref().is_none_or(|required| {
        required.split_once(':').is_some_and(|(name, value)| {
            call.headers.get(name.trim()).and_then(|v| v.to_str().ok()) == Some(value.trim())
        })
    });
    let query = options.require_query.as_ref().is_none_or(|required| {
        required.split_once('=').is_some_and(|(name, value)| {
            url::form_urlencoded::parse(call.query.unwrap_or_default().as_bytes())
                .any(|(k, v)| k == name && v == value)
        })
    });
    key && named_header && query
}

/// Fails call n of those past the concurrency check when the running count of failures
/// due at `error_rate` steps up: evenly spread, no RNG.
fn injected_failure(state: &MockState, options: &MockOptions) -> Option<Response> {
    let n = state.calls.fetch_add(1, Ordering::Relaxed);
    let rate = options.error_rate.clamp(0.0, 1.0);
    let fail = ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor();
    if !fail {
        return None;
    }
    state.stats.failures.fetch_add(1, Ordering::Relaxed);
    let status = StatusCode::from_u16(options.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = options
        .error_message
        .clone()
        .unwrap_or_else(|| format!("injected failure {status}"));
    let mut response = api_error(status, &message, "mock_error", None);
    let headers = response.headers_mut();
    if options.rate_limit_headers && status == StatusCode::TOO_MANY_REQUESTS {
        let reset = format!("{}s", options.retry_after.unwrap_or(1));
        headers.insert(REMAINING_REQUESTS, HeaderValue::from_static("0"));
        if let Ok(v) = HeaderValue::from_str(&reset) {
            headers.insert(RESET_REQUESTS, v);
        }
    } else if let Some(secs) = options.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    Some(response)
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

async fn chat(
    State(state): State<Arc<MockState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.stats.chat_calls.fetch_add(1, Ordering::Relaxed);
    let options = state.options();
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default();
    if options.record_prompts
        && let Ok(mut prompts) = state.stats.prompts.lock()
    {
        prompts.push((last.clone(), std::time::Instant::now()));
    }
    // Dropped last, whichever way the handler returns.
    let _end = options.record_prompts.then(|| CallEnd {
        stats: Arc::clone(&state.stats),
        prompt: last.clone(),
    });
    let prompt_bytes = body["messages"].to_string().len();
    if options
        .max_prompt_bytes
        .is_some_and(|max| prompt_bytes > max)
    {
        return api_error(
            StatusCode::BAD_REQUEST,
            &format!("prompt of {prompt_bytes} bytes exceeds the context window"),
            "invalid_request_error",
            Some("context_length_exceeded"),
        );
    }
    let call = Call {
        headers: &headers,
        query: query.as_deref(),
        model: body["model"].as_str().unwrap_or_default(),
        items: 1,
    };
    let _admitted = match gate(&state, &options, &call).await {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal,
    };
    let model = answered_model(&options, body["model"].as_str(), "mock-model");
    if options.response_bytes > 0 {
        return huge_reply(&model, options.response_bytes);
    }
    let prompt_tokens = prompt_bytes / 4;
    // `n` choices (1 to 8); each a text reply, or, when the request offers tools and the
    // last message is not a tool's answer, a call of the first tool. Choice `i` > 0 says
    // which it is, so the choices differ.
    let n = body["n"].as_u64().unwrap_or(1).clamp(1, 8);
    let last_role = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["role"].as_str())
        .unwrap_or("user");
    let tool = body["tools"]
        .as_array()
        .and_then(|t| t.first())
        .and_then(|t| t["function"]["name"].as_str())
        .filter(|_| last_role != "tool");
    let mut completion_tokens = 0;
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            let suffix = if i == 0 { String::new() } else { format!(" (choice {i})") };
            let logprobs = (body["logprobs"] == json!(true))
                .then(|| json!({"content": [{"token": "mock", "logprob": -0.1, "bytes": [109, 111, 99, 107], "top_logprobs": []}]}));
            match tool {
                Some(name) => {
                    completion_tokens += 10;
                    json!({
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": null,
                            "tool_calls": [{
                                "id": format!("call_mock_{i}"),
                                "type": "function",
                                "function": {"name": name, "arguments": format!("{{\"question\":{}}}", json!(format!("{last}{suffix}")))}
                            }]
                        },
                        "logprobs": logprobs,
                        "finish_reason": "tool_calls"
                    })
                }
                None => {
                    let content = format!("mock reply to: {last}{suffix}");
                    completion_tokens += content.len() / 4;
                    json!({
                        "index": i,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": "stop"
                    })
                }
            }
        })
        .collect();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens
    });
    if body["stream"] == json!(true) {
        let with_usage = body["stream_options"]["include_usage"] == json!(true);
        let events = sse_events(&model, &choices, with_usage.then_some(&usage));
        let n = state.stats.streams.fetch_add(1, Ordering::Relaxed);
        let rate = options.fail_mid_stream_rate.clamp(0.0, 1.0);
        let cut = ((n + 1) as f64 * rate).ceil() > (n as f64 * rate).ceil();
        let cut = options.fail_mid_stream_after.filter(|_| cut);
        if cut.is_some() {
            state.stats.streams_cut.fetch_add(1, Ordering::Relaxed);
        }
        let first_chunk = options.record_first_chunks.then(|| FirstChunk {
            stats: Arc::clone(&state.stats),
            key: last.clone(),
        });
        return sse_reply(events, cut, &options, first_chunk);
    }
    Json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens
        }
    }))
    .into_response()
}

/// Notes in [`MockStats::ends`] when a recorded chat call's handler is done, however it
/// returns (or is dropped, when the client hangs up).
struct CallEnd {
    stats: Arc<MockStats>,
    /// The call's last message.
    prompt: String,
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        if let Ok(mut ends) = self.stats.ends.lock() {
            ends.push((std::mem::take(&mut self.prompt), std::time::Instant::now()));
        }
    }
}

/// Where the first content comes in [`sse_events`]' list: after the comment and the first
/// choice's role chunk.
const FIRST_CONTENT_EVENT: usize = 2;

/// Notes when a streamed answer's first content goes out
/// ([`MockOptions::record_first_chunks`]).
struct FirstChunk {
    stats: Arc<MockStats>,
    /// The answer's last message.
    key: String,
}

impl FirstChunk {
    fn note(self) {
        if let Ok(mut seen) = self.stats.first_chunks.lock() {
            seen.entry(self.key).or_insert_with(std::time::Instant::now);
        }
    }
}

/// The server-sent events of a streamed answer with these `choices`, as OpenAI sends them:
/// per choice a first chunk with the role, the text word by word (or each tool call in two
/// fragments: its id and name, then its arguments), a last chunk with the finish reason;
/// then, when asked for, a usage-only chunk with empty `choices`; then `[DONE]`. A comment
/// line comes first, as proxies' keep-alives do.
fn sse_events(model: &str, choices: &[Value], usage: Option<&Value>) -> Vec<String> {
    let chunk = |choices: Value| {
        let body = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": choices
        });
        format!("data: {body}\n\n")
    };
    let mut events = vec![": keep-alive\n\n".to_string()];
    for choice in choices {
        let index = &choice["index"];
        let message = &choice["message"];
        events.push(chunk(json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])));
        if let Some(text) = message["content"].as_str() {
            for (i, word) in text.split(' ').enumerate() {
                let piece = if i == 0 {
                    word.to_string()
                } else {
                    format!(" {word}")
                };
                events.push(chunk(
                    json!([{"index": index, "delta": {"content": piece}, "finish_reason": null}]),
                ));
            }
        }
        for (i, call) in message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let head = json!({"index": i, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}});
            let tail =
                json!({"index": i, "function": {"arguments": call["function"]["arguments"]}});
            for part in [head, tail] {
                events.push(chunk(json!([{"index": index, "delta": {"tool_calls": [part]}, "finish_reason": null}])));
            }
        }
        events.push(chunk(
            json!([{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}]),
        ));
    }
    if let Some(usage) = usage {
        let body = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [], "usage": usage
        });
        events.push(format!("data: {body}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_string());
    events
}

/// Sends `events` as `text/event-stream`, `chunk_ms` apart; with `cut`, the body breaks
/// off after that many: the connection drops (no `[DONE]`), or with `--mid-stream-error`
/// an error event ends it. `first_chunk` notes when the first content goes out.
fn sse_reply(
    events: Vec<String>,
    cut: Option<u64>,
    options: &MockOptions,
    first_chunk: Option<FirstChunk>,
) -> Response {
    let pace = Duration::from_millis(options.chunk_ms);
    let cut = cut.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let error_event = options.mid_stream_error;
    let stream = futures_util::stream::unfold(
        (events.into_iter().enumerate(), pace, first_chunk),
        move |(mut events, pace, mut first_chunk)| async move {
            let (i, event) = events.next()?;
            if cut.is_some_and(|cut| i > cut) {
                return None;
            }
            if cut.is_some_and(|cut| i == cut) {
                if error_event {
                    let error = json!({"error": {"message": "the model failed mid-stream", "type": "server_error", "code": null}});
                    return Some((
                        Ok(Bytes::from(format!("data: {error}\n\n"))),
                        (events, pace, first_chunk),
                    ));
                }
                let broken = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut");
                return Some((Err(broken), (events, pace, first_chunk)));
            }
            if i > 0 && !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            if i == FIRST_CONTENT_EVENT
                && let Some(first) = first_chunk.take()
            {
                first.note();
            }
            Some((Ok(Bytes::from(event)), (events, pace, first_chunk)))
        },
    );
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
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
    RawQuery(query): RawQuery,
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
            return api_error(
                StatusCode::BAD_REQUEST,
                "input must be a string or a list",
                "invalid_request_error",
                None,
            );
        }
    };
    state.stats.embedding_calls.fetch_add(1, Ordering::Relaxed);
    if inputs.iter().any(|i| i == REJECTED_INPUT) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "input rejected",
            "invalid_request_error",
            None,
        );
    }
    state
        .stats
        .embedding_items
        .fetch_add(inputs.len() as u64, Ordering::Relaxed);
    let options = state.options();
    let call = Call {
        headers: &headers,
        query: query.as_deref(),
        model: body["model"].as_str().unwrap_or_default(),
        items: inputs.len() as u64,
    };
    let _admitted = match gate(&state, &options, &call).await {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal,
    };
    let tokens: usize = inputs.iter().map(|s| s.len() / 4 + 1).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"object": "embedding", "index": i, "embedding": mock_embedding(s)}))
        .collect();
    Json(json!({
        "object": "list",
        "model": answered_model(&options, body["model"].as_str(), "mock-embedding"),
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

    fn chat_body(model: &str) -> Value {
        json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    }

    /// A chat call for `model` to `mock` (its path may carry a query string).
    async fn chat(mock: &MockServer, path: &str, model: &str) -> reqwest::Response {
        client(false)
            .post(format!("{}{path}", mock.base_url()))
            .json(&chat_body(model))
            .send()
            .await
            .unwrap()
    }

    async fn embed(mock: &MockServer, model: &str) -> reqwest::Response {
        client(false)
            .post(format!("{}/embeddings", mock.base_url()))
            .json(&json!({"model": model, "input": ["a", "b"]}))
            .send()
            .await
            .unwrap()
    }

    /// The status, the `error` object and whether `Retry-After` came.
    async fn refusal(response: reqwest::Response) -> (u16, Value, bool) {
        let status = response.status().as_u16();
        let retry_after = response.headers().contains_key(header::RETRY_AFTER);
        let body: Value = response.json().await.unwrap();
        (status, body["error"].clone(), retry_after)
    }

    #[test]
    fn the_defaults_are_the_command_line_s_and_every_flag_parses() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            mock: MockOptions,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from([&["mock-llm"], args].concat()).map(|c| c.mock)
        };
        let none = parse(&[]).unwrap();
        assert_eq!(format!("{none:?}"), format!("{:?}", MockOptions::default()));
        let all = parse(&[
            "--models",
            "a,b",
            "--insufficient-quota",
            "--max-concurrency",
            "3",
            "--rate-limit-headers",
            "--model-suffix",
            "-2024-07-18",
            "--require-header",
            "api-key: secret",
            "--require-query",
            "api-version=2024-10-21",
        ])
        .unwrap();
        assert_eq!(all.models, ["a", "b"]);
        assert!(all.insufficient_quota && all.rate_limit_headers);
        assert_eq!(all.max_concurrency, Some(3));
        assert_eq!(all.model_suffix.as_deref(), Some("-2024-07-18"));
        assert_eq!(all.require_header.as_deref(), Some("api-key: secret"));
        assert_eq!(all.require_query.as_deref(), Some("api-version=2024-10-21"));
        assert!(parse(&["--require-header", "api-key"]).is_err());
        assert!(parse(&["--require-header", "bad name: x"]).is_err());
        assert!(parse(&["--require-query", "api-version"]).is_err());
    }

    #[tokio::test]
    async fn a_model_off_the_list_is_not_found() {
        let mock = start(MockOptions {
            models: vec!["gpt-4o".into(), "text-embedding-3-small".into()],
            ..Default::default()
        })
        .await;
        let (status, error, _) = refusal(chat(&mock, "/chat/completions", "gpt-4").await).await;
        assert_eq!(status, 404);
        assert_eq!(
            error,
            json!({"message": "The model `gpt-4` does not exist", "type": "invalid_request_error", "code": "model_not_found"})
        );
        let (status, error, _) = refusal(embed(&mock, "gpt-4").await).await;
        assert_eq!((status, &error["code"]), (404, &json!("model_not_found")));
        assert_eq!(
            chat(&mock, "/chat/completions", "gpt-4o").await.status(),
            200
        );
        assert_eq!(embed(&mock, "text-embedding-3-small").await.status(), 200);
        // The list may change while it runs.
        mock.set_options(MockOptions::default());
        assert_eq!(
            chat(&mock, "/chat/completions", "gpt-4").await.status(),
            200
        );
    }

    #[tokio::test]
    async fn out_of_quota_every_call_is_refused_without_retry_after() {
        let mock = start(MockOptions {
            insufficient_quota: true,
            // Not sent with a quota refusal: waiting does not cure it.
            retry_after: Some(5),
            ..Default::default()
        })
        .await;
        let quota = json!({
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "code": "insufficient_quota"
        });
        for response in [
            chat(&mock, "/chat/completions", "m").await,
            embed(&mock, "e").await,
        ] {
            assert_eq!(refusal(response).await, (429, quota.clone(), false));
        }
        mock.set_options(MockOptions::default());
        assert_eq!(chat(&mock, "/chat/completions", "m").await.status(), 200);
    }

    /// 10 calls at once against a cap of 3: exactly 3 answered, 7 refused at once.
    #[tokio::test]
    async fn calls_beyond_the_concurrency_cap_are_refused_at_once() {
        let mock = start(MockOptions {
            max_concurrency: Some(3),
            latency_ms: 1_500,
            retry_after: Some(5),
            ..Default::default()
        })
        .await;
        let http = client(true);
        let url = format!("{}/chat/completions", mock.base_url());
        let started = Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| tokio::spawn(http.post(&url).json(&chat_body("m")).send()))
            .collect();
        let mut refused = Vec::new();
        let mut answered = 0;
        for task in tasks {
            let response = task.await.unwrap().unwrap();
            if response.status() == 200 {
                answered += 1;
            } else {
                refused.push(refusal(response).await);
            }
        }
        assert_eq!(answered, 3);
        let over_cap = json!({"message": "Too many concurrent requests", "type": "rate_limit_error", "code": "rate_limit_exceeded"});
        assert_eq!(refused, vec![(429, over_cap, false); 7]);
        let stats = mock.stats();
        assert_eq!(stats.over_cap.load(Ordering::Relaxed), 7);
        assert_eq!(stats.peak_in_flight.load(Ordering::Relaxed), 3);
        assert_eq!(stats.chat_calls.load(Ordering::Relaxed), 10);
        assert!(started.elapsed() < Duration::from_millis(3_000), "one wave");
        // Every place was given back.
        mock.set_options(MockOptions {
            max_concurrency: Some(3),
            ..Default::default()
        });
        let again: Vec<_> = (0..3)
            .map(|_| tokio::spawn(http.post(&url).json(&chat_body("m")).send()))
            .collect();
        for task in again {
            assert_eq!(task.await.unwrap().unwrap().status(), 200);
        }
    }

    #[tokio::test]
    async fn a_client_hanging_up_mid_call_gives_its_place_back() {
        let mock = start(MockOptions {
            max_concurrency: Some(1),
            latency_ms: 60_000,
            ..Default::default()
        })
        .await;
        let gave_up = client(false)
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&chat_body("m"))
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(gave_up.is_err_and(|e| e.is_timeout()));
        let in_flight = &mock.stats().in_flight;
        assert!(wait_until(|| in_flight.load(Ordering::Relaxed) == 0).await);
        mock.set_options(MockOptions {
            max_concurrency: Some(1),
            ..Default::default()
        });
        assert_eq!(chat(&mock, "/chat/completions", "m").await.status(), 200);
        assert_eq!(mock.stats().over_cap.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn injected_429s_can_carry_openai_s_rate_limit_headers() {
        let limited = |retry_after| MockOptions {
            error_rate: 1.0,
            status: 429,
            retry_after,
            rate_limit_headers: true,
            ..Default::default()
        };
        let mock = start(limited(Some(7))).await;
        let header = |r: &reqwest::Response, name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let response = chat(&mock, "/chat/completions", "m").await;
        assert_eq!(response.status(), 429);
        assert_eq!(
            header(&response, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        assert_eq!(
            header(&response, "x-ratelimit-reset-requests").as_deref(),
            Some("7s")
        );
        assert_eq!(header(&response, "retry-after"), None);
        mock.set_options(limited(None));
        let response = embed(&mock, "e").await;
        assert_eq!(
            header(&response, "x-ratelimit-reset-requests").as_deref(),
            Some("1s")
        );
        // Without the flag, Retry-After as before.
        mock.set_options(MockOptions {
            rate_limit_headers: false,
            ..limited(Some(7))
        });
        let response = chat(&mock, "/chat/completions", "m").await;
        assert_eq!(header(&response, "retry-after").as_deref(), Some("7"));
        assert_eq!(header(&response, "x-ratelimit-reset-requests"), None);
    }

    #[tokio::test]
    async fn answers_name_the_dated_snapshot() {
        let mock = start(MockOptions {
            model_suffix: Some("-2024-07-18".into()),
            ..Default::default()
        })
        .await;
        let answer: Value = chat(&mock, "/chat/completions", "gpt-4o-mini")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(answer["model"], "gpt-4o-mini-2024-07-18");
        let answer: Value = embed(&mock, "e").await.json().await.unwrap();
        assert_eq!(answer["model"], "e-2024-07-18");
    }

    #[tokio::test]
    async fn azure_s_header_and_query_parameter_are_required_when_asked() {
        let mock = start(MockOptions {
            require_header: Some("api-key: secret".into()),
            require_query: Some("api-version=2024-10-21".into()),
            ..Default::default()
        })
        .await;
        let url = format!("{}/chat/completions", mock.base_url());
        let send = |key: Option<&'static str>, query: &'static str| {
            let mut request = client(false)
                .post(format!("{url}{query}"))
                .json(&chat_body("m"));
            if let Some(key) = key {
                request = request.header("api-key", key);
            }
            async move { request.send().await.unwrap().status() }
        };
        let good = "?api-version=2024-10-21";
        assert_eq!(send(Some("secret"), good).await, 200);
        assert_eq!(
            send(Some("secret"), "?x=1&api-version=2024-10-21").await,
            200
        );
        assert_eq!(send(None, good).await, 401);
        assert_eq!(send(Some("wrong"), good).await, 401);
        assert_eq!(send(Some("secret"), "").await, 401);
        assert_eq!(send(Some("secret"), "?api-version=2024-02-01").await, 401);
        let (status, error, _) = refusal(embed(&mock, "e").await).await;
        assert_eq!(
            (status, &error["message"]),
            (401, &json!("invalid api key"))
        );
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

    /// The `data:` payloads of a server-sent event stream, comments and blank lines left out.
    fn data_lines(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn a_streamed_answer_is_sent_as_openai_chunks() {
        let mock = start(MockOptions {
            chunk_ms: 1,
            ..MockOptions::default()
        })
        .await;
        let body = json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true}, "n": 2,
            "messages": [{"role": "user", "content": "hi there"}]
        });
        let resp = client(false)
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        let text = resp.text().await.unwrap();
        assert!(text.starts_with(": keep-alive"), "{text}");
        let data = data_lines(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let text_of = |index: u64| -> String {
            chunks
                .iter()
                .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
                .filter(|c| c["index"] == index)
                .filter_map(|c| c["delta"]["content"].as_str().map(str::to_string))
                .collect()
        };
        assert_eq!(text_of(0), "mock reply to: hi there");
        assert_eq!(text_of(1), "mock reply to: hi there (choice 1)");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]), "a usage-only last chunk");
        assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }

    #[tokio::test]
    async fn a_streamed_answer_s_first_content_is_noted_when_recording() {
        let mock = start(MockOptions::default()).await;
        let url = format!("{}/chat/completions", mock.base_url());
        let stream = |text: &str| {
            let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": text}]});
            let request = client(false).post(&url).json(&body);
            async move { request.send().await.unwrap().text().await.unwrap() }
        };
        stream("not recorded").await;
        mock.set_options(MockOptions {
            record_first_chunks: true,
            ..MockOptions::default()
        });
        let before = Instant::now();
        let text = stream("recorded").await;
        let after = Instant::now();
        assert!(text.contains("mock"), "{text}");
        let seen = mock.stats().first_chunks.lock().unwrap();
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["recorded"]);
        assert!((before..=after).contains(&seen["recorded"]));
    }

    #[tokio::test]
    async fn streamed_tool_calls_come_in_fragments_and_a_stream_can_break_off() {
        let mock = start(MockOptions::default()).await;
        let body = json!({
            "model": "m", "stream": true,
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
            "messages": [{"role": "user", "content": "weather?"}]
        });
        let url = format!("{}/chat/completions", mock.base_url());
        let text = client(false)
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let fragments: Vec<Value> = data_lines(&text)
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]
                    .as_object()
                    .cloned()
            })
            .map(Value::Object)
            .collect();
        assert_eq!(fragments.len(), 2, "{text}");
        assert_eq!(fragments[0]["function"]["name"], "get_weather");
        assert_eq!(fragments[0]["id"], "call_mock_0");
        assert!(
            fragments[1]["function"]["arguments"]
                .as_str()
                .unwrap()
                .contains("weather?")
        );

        // Paced, so that the head and the first chunks are out before the cut.
        mock.set_options(MockOptions {
            fail_mid_stream_after: Some(3),
            chunk_ms: 20,
            ..MockOptions::default()
        });
        let resp = client(false).post(&url).json(&body).send().await.unwrap();
        assert!(resp.status().is_success(), "the stream starts well");
        assert!(resp.text().await.is_err(), "and breaks off");

        // Every other stream cut, the first of each two, with an error event.
        mock.set_options(MockOptions {
            fail_mid_stream_after: Some(2),
            fail_mid_stream_rate: 0.5,
            mid_stream_error: true,
            ..MockOptions::default()
        });
        let mut bodies = Vec::new();
        for _ in 0..4 {
            let resp = client(false).post(&url).json(&body).send().await.unwrap();
            bodies.push(
                resp.text()
                    .await
                    .expect("an error event ends the body cleanly"),
            );
        }
        for (i, text) in bodies.iter().enumerate() {
            let data = data_lines(text);
            if i % 2 == 0 {
                assert_eq!(data.len(), 2, "{text}");
                assert!(data[1].contains("\"error\""), "{text}");
            } else {
                assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
            }
        }
    }
}
