//! The upstream: an OpenAI-compatible HTTP API (OpenAI, vLLM, Ollama, LiteLLM, the mock).
//!
//! Every failure is classified here, once, from its status and its error body:
//! - [`LlmError::RateLimited`]: a 429 (not a spent account), with when to come back
//!   (`Retry-After`, `retry-after-ms` or the `x-ratelimit-reset-*` of an exhausted budget);
//! - [`LlmError::QuotaExhausted`]: a 429 whose error type or code is `insufficient_quota`;
//! - [`LlmError::ContextLength`]: `context_length_exceeded`, or a 400 whose message says so;
//! - [`LlmError::Refused`]: 401, 403 and 404 (a key or a model this deployment lacks);
//! - [`LlmError::Transient`]: 408, 409, 5xx, timeouts, connection errors;
//! - [`LlmError::Permanent`]: other 4xx, answers that do not parse.
//!
//! Which deployment or model to try next for each is decided by [`crate::upstream::routing::router`].

use std::time::{Duration, SystemTime};

use reqwest::{StatusCode, Url, header};
use serde::{Deserialize, Serialize, ser::SerializeMap};
use serde_json::{Map, Value};

use std::collections::BTreeMap;

use crate::{
    config::{Secret, UpstreamConfig},
    contract::Usage,
};

/// Longest error text kept from an upstream answer.
const MAX_ERROR_TEXT: usize = 1024;

/// Most bytes read of a failed call's answer: enough for its error text.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A failed upstream call, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// Worth retrying later: 408, 409, 5xx, a timeout, a connection error.
    #[error("transient upstream failure: {message}")]
    Transient {
        /// What happened.
        message: String,
        /// The upstream's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
        /// The upstream pushed back (a timeout): the concurrency limit should drop.
        throttle: bool,
    },
    /// A 429 that is not a spent account: flow control, not a failure of the request.
    #[error("rate limited: {message}")]
    RateLimited {
        /// What happened.
        message: String,
        /// When to come back, if the upstream said (`Retry-After`, `retry-after-ms`, or the
        /// reset of an exhausted `x-ratelimit-*` budget). Without it, only the concurrency
        /// limit drops.
        retry_after: Option<Duration>,
    },
    /// A 429 whose error type or code is `insufficient_quota`: the account is spent.
    #[error("quota exhausted: {message}")]
    QuotaExhausted {
        /// What happened.
        message: String,
    },
    /// The prompt is longer than the model's context window.
    #[error("context length exceeded: {message}")]
    ContextLength {
        /// What happened.
        message: String,
    },
    /// 401, 403 or 404: this deployment cannot serve this model (a bad key, no access, a
    /// model it does not have); another deployment may.
    #[error("refused by the deployment: {message}")]
    Refused {
        /// What happened.
        message: String,
    },
    /// Will fail the same way every time.
    #[error("permanent upstream failure: {message}")]
    Permanent {
        /// What happened.
        message: String,
    },
}

impl LlmError {
    /// Whether the upstream pushed back (a 429 or a timeout).
    pub fn is_throttle(&self) -> bool {
        matches!(
            self,
            LlmError::Transient { throttle: true, .. } | LlmError::RateLimited { .. }
        )
    }

    /// When the upstream said to come back, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::Transient { retry_after, .. } | LlmError::RateLimited { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The outcome label of `llmq_upstream_calls_total`.
    pub fn label(&self) -> &'static str {
        match self {
            LlmError::Transient { .. } => "transient",
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::QuotaExhausted { .. } => "quota",
            LlmError::ContextLength { .. } => "context_length",
            LlmError::Refused { .. } => "auth",
            LlmError::Permanent { .. } => "permanent",
        }
    }
}

/// What a chat completion returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatAnswer {
    /// The first choice's text; `None` when the model answered only with tool calls.
    pub content: Option<String>,
    /// The first choice's `tool_calls`, verbatim.
    pub tool_calls: Option<Value>,
    /// The first choice's `refusal`, verbatim.
    pub refusal: Option<Value>,
    /// Every choice verbatim (`index`, `message`, `finish_reason`, `logprobs`).
    pub choices: Vec<Value>,
    /// The model that answered, as the upstream names it.
    pub model: String,
    /// Token usage as reported.
    pub usage: Option<Usage>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
    /// How long the deployment's `x-ratelimit-*` budget stays spent, when this answer used
    /// its last request or token.
    pub spent_for: Option<Duration>,
}

/// What an embeddings call returned.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingAnswer {
    /// One vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// The model that answered.
    pub model: String,
    /// Token usage as reported.
    pub usage: Option<Usage>,
    /// As [`ChatAnswer::spent_for`].
    pub spent_for: Option<Duration>,
}

/// A pooled HTTP client for one deployment.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    /// `[upstreams.<name>].headers`, values marked sensitive.
    headers: header::HeaderMap,
    pub(super) chat_url: Endpoint,
    embeddings_url: Endpoint,
    /// `Bearer <api_key>`, built once and marked sensitive; `None` without a key, or when
    /// the key cannot be a header value (then each call sets it through reqwest, which
    /// reports the bad header as the call's error).
    auth: Option<header::HeaderValue>,
    api_key: Secret,
    /// `llm.max_response_bytes`: an answer is read up to this and refused beyond it.
    pub(super) max_response_bytes: usize,
    /// The timeouts of streamed calls.
    pub(super) stream: StreamLimits,
}

/// An upstream URL, parsed once rather than on every call (parsing showed up at 4% of the
/// worker's CPU); one that does not parse is kept as text so each call reports the error.
#[derive(Clone)]
pub(super) enum Endpoint {
    Parsed(Url),
    Unparsed(String),
}

impl Endpoint {
    /// `url` with `query` appended.
    fn new(url: String, query: &BTreeMap<String, String>) -> Self {
        match Url::parse(&url) {
            Ok(mut parsed) => {
                if !query.is_empty() {
                    parsed.query_pairs_mut().extend_pairs(query);
                }
                Endpoint::Parsed(parsed)
            }
            Err(_) => Endpoint::Unparsed(url),
        }
    }
}

/// A request body, serialized straight from the job's data: the extra params, then `model`
/// and the messages or inputs under `key` (which win over params of the same name).
pub(super) struct Body<'a, T: Serialize + ?Sized> {
    pub(super) model: &'a str,
    pub(super) key: &'static str,
    pub(super) value: &'a T,
    pub(super) params: &'a Map<String, Value>,
    /// Ask for server-sent events, with usage in the last chunk.
    pub(super) stream: bool,
}

impl<T: Serialize + ?Sized> Serialize for Body<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in self.params {
            if k != "model" && k != self.key {
                map.serialize_entry(k, v)?;
            }
        }
        map.serialize_entry("model", self.model)?;
        map.serialize_entry(self.key, self.value)?;
        // `stream` and `stream_options` are reserved: never among the params.
        if self.stream {
            map.serialize_entry("stream", &true)?;
            map.serialize_entry(
                "stream_options",
                &serde_json::json!({"include_usage": true}),
            )?;
        }
        map.end()
    }
}

impl LlmClient {
    /// Builds the client of one deployment: pooled keep-alive connections, its timeout,
    /// headers and query; answers are read up to `max_response_bytes`.
    pub fn new(cfg: &UpstreamConfig, max_response_bytes: usize) -> Result<Self, reqwest::Error> {
        crate::install_crypto_provider();
        let base = cfg.base_url.expose().trim_end_matches('/');
        let mut http = reqwest::Client::builder();
        if cfg.http2_prior_knowledge && base.starts_with("http://") {
            http = http.http2_prior_knowledge();
        }
        let http = http
            .timeout(cfg.timeout())
            .connect_timeout(Duration::from_secs(10).min(cfg.timeout()))
            // Every idle connection is kept (for 90 s): with fewer than the calls in flight,
            // connections would be closed and reopened all the time.
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("llmq/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let auth = (!cfg.api_key.is_empty())
            .then(|| header::HeaderValue::try_from(format!("Bearer {}", cfg.api_key.expose())))
            .and_then(Result::ok)
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        // Validation checks the names; a value that cannot be a header is left out rather
        // than sent mangled (the deployment then refuses the calls, and says why).
        let mut headers = header::HeaderMap::new();
        for (name, value) in &cfg.headers {
            if let (Ok(name), Ok(mut value)) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                header::HeaderValue::from_str(value.expose()),
            ) {
                value.set_sensitive(true);
                headers.insert(name, value);
            }
        }
        Ok(Self {
            http,
            headers,
            chat_url: Endpoint::new(format!("{base}/chat/completions"), &cfg.query),
            embeddings_url: Endpoint::new(format!("{base}/embeddings"), &cfg.query),
            auth,
            api_key: cfg.api_key.clone(),
            max_response_bytes,
            stream: StreamLimits::default(),
        })
    }

    /// The same client with these timeouts for streamed calls.
    pub fn with_stream_limits(self, stream: StreamLimits) -> Self {
        Self { stream, ..self }
    }

    /// `POST {base_url}/chat/completions`.
    pub async fn chat(
        &self,
        model: &str,
        messages: &[Value],
        params: &Map<String, Value>,
    ) -> Result<ChatAnswer, LlmError> {
        let body = Body {
            model,
            key: "messages",
            value: messages,
            params,
            stream: false,
        };
        let (answer, spent_for): (ChatResponse, _) = self.post(&self.chat_url, &body).await?;
        chat_answer(answer, model, spent_for)
    }
}

/// The timeouts of a streamed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Longest silence: before the answer's headers, and between two chunks
    /// (`llm.stream_idle_timeout_secs`). Comments count: they are how proxies keep a
    /// stream alive.
    pub idle: Duration,
    /// Longest stream, from the call to its last chunk (`llm.stream_max_secs`).
    pub total: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            total: Duration::from_secs(300),
        }
    }
}

/// An answer longer than `llm.max_response_bytes` (`limit`): it would be again.
pub(crate) fn too_large(limit: usize) -> LlmError {
    LlmError::Permanent {
        message: format!(
            "upstream answer larger than llm.max_response_bytes ({limit} bytes); not read \
             further"
        ),
    }
}

/// A successful answer's body parsed; `cut`: it was longer than `limit` and not read
/// further.
pub(super) fn parse_body<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    cut: bool,
    limit: usize,
    spent_for: Option<Duration>,
) -> Result<(T, Option<Duration>), LlmError> {
    if cut {
        return Err(too_large(limit));
    }
    let parsed = serde_json::from_slice(bytes).map_err(|e| LlmError::Permanent {
        message: format!("unparseable upstream answer: {e}"),
    })?;
    Ok((parsed, spent_for))
}

/// A chat completion's answer read: the first choice for the top-level fields, every choice
/// kept as sent.
pub(super) fn chat_answer(
    answer: ChatResponse,
    model: &str,
    spent_for: Option<Duration>,
) -> Result<ChatAnswer, LlmError> {
    let first = answer.choices.first().ok_or_else(|| LlmError::Permanent {
        message: "upstream answer has no choices".into(),
    })?;
    let message = Some(
        first
            .get("message")
            .and_then(Value::as_object)
            .ok_or_else(|| LlmError::Permanent {
                message: "unparseable upstream answer: choices[0] has no message".into(),
            })?,
    );
    let field = |name: &str| {
        message
            .and_then(|m| m.get(name))
            .filter(|v| !v.is_null())
            .cloned()
    };
    let content = match field("content") {
        None => None,
        Some(Value::String(text)) => Some(text),
        Some(other) => {
            return Err(LlmError::Permanent {
                message: format!(
                    "unparseable upstream answer: choices[0].message.content is {}",
                    crate::contract::request::json_type(&other)
                ),
            });
        }
    };
    let (tool_calls, refusal) = (field("tool_calls"), field("refusal"));
    let finish_reason = first
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(ChatAnswer {
        content,
        tool_calls,
        refusal,
        model: answer.model.unwrap_or_else(|| model.to_string()),
        usage: answer.usage,
        finish_reason,
        spent_for,
        choices: answer.choices,
    })
}

impl LlmClient {
    /// `POST {base_url}/embeddings`.
    pub async fn embed(
        &self,
        model: &str,
        input: &[String],
        params: &Map<String, Value>,
    ) -> Result<EmbeddingAnswer, LlmError> {
        let body = Body {
            model,
            key: "input",
            value: input,
            params,
            stream: false,
        };
        let (answer, spent_for): (EmbeddingResponse, _) =
            self.post(&self.embeddings_url, &body).await?;
        let mut data = answer.data;
        if data.len() != input.len() {
            return Err(LlmError::Permanent {
                message: format!(
                    "upstream returned {} embeddings for {} inputs",
                    data.len(),
                    input.len()
                ),
            });
        }
        data.sort_by_key(|d| d.index);
        Ok(EmbeddingAnswer {
            vectors: data.into_iter().map(|d| d.embedding).collect(),
            model: answer.model.unwrap_or_else(|| model.to_string()),
            usage: answer.usage,
            spent_for,
        })
    }

    /// Posts `body` and reads the answer: the parsed body and how long the deployment's
    /// rate-limit budget stays spent, if this call spent it.
    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        url: &Endpoint,
        body: &impl Serialize,
    ) -> Result<(T, Option<Duration>), LlmError> {
        let (resp, spent_for) = self.send(url, body, None).await?;
        self.parse(resp, spent_for).await
    }

    /// Reads a successful answer whole (at most `llm.max_response_bytes`) and parses it.
    async fn parse<T: for<'de> Deserialize<'de>>(
        &self,
        resp: reqwest::Response,
        spent_for: Option<Duration>,
    ) -> Result<(T, Option<Duration>), LlmError> {
        let limit = self.max_response_bytes;
        let (bytes, cut) = read_bounded(resp, limit).await.map_err(classify_reqwest)?;
        parse_body(&bytes, cut, limit, spent_for)
    }

    /// Posts `body` (with `timeout` in place of the deployment's, for a stream) and returns
    /// a successful answer unread, with how long the deployment's rate-limit budget stays
    /// spent if this call spent it; a failed one is read (its error text) and classified.
    pub(super) async fn send(
        &self,
        url: &Endpoint,
        body: &impl Serialize,
        timeout: Option<Duration>,
    ) -> Result<(reqwest::Response, Option<Duration>), LlmError> {
        let body = serde_json::to_vec(body).map_err(|e| LlmError::Permanent {
            message: format!("cannot serialize the request: {e}"),
        })?;
        let req = match url {
            Endpoint::Parsed(url) => self.http.post(url.clone()),
            Endpoint::Unparsed(url) => self.http.post(url.as_str()),
        };
        let mut req = req
            .header(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            )
            .body(body);
        if !self.headers.is_empty() {
            req = req.headers(self.headers.clone());
        }
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth.clone());
        } else if !self.api_key.is_empty() {
            req = req.bearer_auth(self.api_key.expose());
        }
        if let Some(timeout) = timeout {
            req = req.timeout(timeout);
        }
        let resp = req.send().await.map_err(classify_reqwest)?;
        let status = resp.status();
        let spent_for = spent_for(resp.headers());
        if status.is_success() {
            return Ok((resp, spent_for));
        }
        let retry_after = retry_after(resp.headers()).or(spent_for);
        let limit = MAX_ERROR_BODY.min(self.max_response_bytes);
        let (bytes, _) = read_bounded(resp, limit).await.map_err(classify_reqwest)?;
        Err(classify_failure(status, &bytes, retry_after))
    }
}

/// The class of a failed answer, from its status and its error body (`error.type`,
/// `error.code`, `error.message`, as OpenAI, Azure, vLLM and LiteLLM send them).
pub(crate) fn classify_failure(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> LlmError {
    // Scrubbed before the final cut, so that a key at the cut is still recognised whole;
    // the generous first cut keeps the scrub's work bounded.
    let text = String::from_utf8_lossy(&body[..body.len().min(4 * MAX_ERROR_TEXT)]);
    let text = super::scrub::scrub_secrets(&text);
    let text = crate::truncate(&text, MAX_ERROR_TEXT).to_string();
    let message = format!("HTTP {status}: {text}");
    let error: Value = serde_json::from_slice::<Value>(body)
        .ok()
        .map(|v| v.get("error").cloned().unwrap_or(v))
        .unwrap_or(Value::Null);
    let field = |name: &str| {
        error
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let (kind, code) = (field("type"), field("code"));
    let said = |what: &str| kind == what || code == what;
    let lower = text.to_ascii_lowercase();
    match status.as_u16() {
        429 if said("insufficient_quota") => LlmError::QuotaExhausted { message },
        429 => LlmError::RateLimited {
            message,
            retry_after,
        },
        _ if said("context_length_exceeded") => LlmError::ContextLength { message },
        400 | 413 | 422 if says_context_length(&lower) => LlmError::ContextLength { message },
        401 | 403 | 404 => LlmError::Refused { message },
        _ if is_transient_status(status) => LlmError::Transient {
            message,
            retry_after,
            throttle: false,
        },
        _ => LlmError::Permanent { message },
    }
}

/// Whether an error text says the prompt is over the context window (vLLM, Ollama and
/// LiteLLM word it differently from OpenAI's code).
fn says_context_length(lower: &str) -> bool {
    [
        "context length",
        "context window",
        "maximum context",
        "context_length",
    ]
    .iter()
    .any(|p| lower.contains(p))
}

/// `Retry-After` (seconds or an HTTP date), or Azure's and OpenAI's `retry-after-ms`.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    text("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64((ms / 1000.0).min(86_400.0)))
        .or_else(|| text(header::RETRY_AFTER.as_str()).and_then(parse_retry_after))
}

/// How long an exhausted `x-ratelimit-*` budget stays spent: the longest reset of a
/// request or token budget whose remaining count is 0.
fn spent_for(headers: &header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    ["requests", "tokens"]
        .into_iter()
        .filter(|budget| {
            text(&format!("x-ratelimit-remaining-{budget}"))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|left| left <= 0.0)
        })
        .filter_map(|budget| text(&format!("x-ratelimit-reset-{budget}")).and_then(parse_reset))
        .max()
}

/// A reset time as OpenAI writes it (`1s`, `6m0s`, `20ms`, `1h2m3.5s`), or plain seconds.
/// At most a day.
pub fn parse_reset(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let mut total = 0.0;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit..];
    }
    (total.is_finite() && !value.is_empty()).then(|| Duration::from_secs_f64(total.min(86_400.0)))
}

/// Reads at most `limit` bytes of `resp`'s body as it streams in, never more: `true` when
/// the body is longer (its declared length, or what arrived), then what was read is a prefix
/// and the rest is left unread (the connection is dropped with the response).
pub(super) async fn read_bounded(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let declared = resp.content_length().unwrap_or(0);
    if declared > limit as u64 {
        return Ok((Vec::new(), true));
    }
    // The declared length is within the limit here, so reserving it is bounded too.
    let mut body = Vec::with_capacity(usize::try_from(declared).unwrap_or(0));
    while let Some(chunk) = resp.chunk().await? {
        let room = limit - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body, true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body, false))
}

/// 429, 408, 409 and 5xx may succeed later; every other failure status will not.
pub fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
}

pub(super) fn classify_reqwest(e: reqwest::Error) -> LlmError {
    // Timeouts, refused or reset connections and broken bodies are all worth a retry; the
    // URL is left out because it may carry credentials.
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut message = kind.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    LlmError::Transient {
        message,
        retry_after: None,
        throttle: e.is_timeout(),
    }
}

/// `Retry-After` as seconds or as an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(86_400)),
    )
}

#[derive(Deserialize)]
pub(super) struct ChatResponse {
    model: Option<String>,
    /// Kept verbatim: tool calls, refusals, logprobs and whatever a provider adds.
    choices: Vec<Value>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    model: Option<String>,
    data: Vec<EmbeddingData>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EmbeddingData {
    #[serde(default)]
    index: usize,
    embedding: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        for s in [429, 408, 409, 500, 502, 503, 504] {
            assert!(
                is_transient_status(StatusCode::from_u16(s).expect("status")),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(
                !is_transient_status(StatusCode::from_u16(s).expect("status")),
                "{s}"
            );
        }
    }

    #[test]
    fn body_puts_model_and_messages_over_params() {
        let mut params = Map::new();
        params.insert("temperature".into(), Value::from(0.5));
        params.insert("model".into(), Value::from("ignored"));
        let messages = [serde_json::json!({"role": "user", "content": "hi"})];
        let body = Body {
            model: "m",
            key: "messages",
            value: &messages[..],
            params: &params,
            stream: false,
        };
        let text = serde_json::to_string(&body).expect("serializes");
        assert_eq!(
            serde_json::from_str::<Value>(&text).expect("JSON"),
            serde_json::json!({"model": "m", "temperature": 0.5, "messages": [{"role": "user", "content": "hi"}]})
        );
        assert_eq!(text.matches("\"model\"").count(), 1, "{text}");
        let streamed = Body {
            stream: true,
            ..body
        };
        assert_eq!(
            serde_json::to_value(&streamed).expect("serializes"),
            serde_json::json!({"model": "m", "temperature": 0.5, "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}})
        );
    }

    async fn client_of(
        options: crate::tools::mock::MockOptions,
        max_response_bytes: usize,
    ) -> (crate::tools::mock::MockServer, LlmClient) {
        let mock = crate::tools::mock::MockServer::start(([127, 0, 0, 1], 0).into(), options)
            .await
            .expect("the mock listens");
        let cfg = UpstreamConfig {
            base_url: crate::config::SecretUrl::new(mock.base_url()),
            ..UpstreamConfig::default()
        };
        (
            mock,
            LlmClient::new(&cfg, max_response_bytes).expect("client"),
        )
    }

    fn hello() -> Vec<Value> {
        vec![serde_json::json!({"role": "user", "content": "hi"})]
    }

    #[tokio::test]
    async fn an_answer_within_max_response_bytes_is_read() {
        let (_mock, client) = client_of(
            crate::tools::mock::MockOptions {
                response_bytes: 60_000,
                ..Default::default()
            },
            64 * 1024,
        )
        .await;
        let answer = client.chat("m", &hello(), &Map::new()).await;
        assert_eq!(
            answer.map(|a| a.content.unwrap_or_default().len()).ok(),
            Some(60_000)
        );
    }

    #[tokio::test]
    async fn an_endless_answer_is_cut_at_max_response_bytes() {
        let (_mock, client) = client_of(
            crate::tools::mock::MockOptions {
                // A terabyte: read to the end, this test would never finish.
                response_bytes: 1 << 40,
                ..Default::default()
            },
            64 * 1024,
        )
        .await;
        let answer = tokio::time::timeout(
            Duration::from_secs(10),
            client.chat("m", &hello(), &Map::new()),
        )
        .await
        .expect("cut off, not read to the end");
        let Err(LlmError::Permanent { message }) = answer else {
            panic!("a permanent failure: {answer:?}");
        };
        assert_eq!(
            message,
            "upstream answer larger than llm.max_response_bytes (65536 bytes); not read further"
        );
    }

    fn failure(status: u16, body: serde_json::Value) -> LlmError {
        let status = StatusCode::from_u16(status).expect("status");
        classify_failure(status, body.to_string().as_bytes(), None)
    }

    #[test]
    fn failures_are_classified_by_status_and_error_body() {
        let quota = serde_json::json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}});
        assert!(matches!(
            failure(429, quota),
            LlmError::QuotaExhausted { .. }
        ));
        let code_only =
            serde_json::json!({"error": {"message": "x", "code": "insufficient_quota"}});
        assert!(matches!(
            failure(429, code_only),
            LlmError::QuotaExhausted { .. }
        ));
        let limited =
            serde_json::json!({"error": {"message": "slow down", "type": "rate_limit_error"}});
        assert!(matches!(
            failure(429, limited),
            LlmError::RateLimited { .. }
        ));
        assert!(matches!(
            failure(429, serde_json::json!("plain")),
            LlmError::RateLimited { .. }
        ));
        let context = serde_json::json!({"error": {"message": "too long", "code": "context_length_exceeded"}});
        assert!(matches!(
            failure(400, context),
            LlmError::ContextLength { .. }
        ));
        // vLLM words it in the message only.
        let vllm = serde_json::json!({"object": "error", "message": "This model's maximum context length is 4096 tokens", "type": "BadRequestError", "code": 400});
        assert!(matches!(failure(400, vllm), LlmError::ContextLength { .. }));
        let other = serde_json::json!({"error": {"message": "bad temperature"}});
        assert!(matches!(failure(400, other), LlmError::Permanent { .. }));
        for status in [401, 403, 404] {
            assert!(
                matches!(
                    failure(status, serde_json::json!({})),
                    LlmError::Refused { .. }
                ),
                "{status}"
            );
        }
        for status in [500, 503, 408] {
            assert!(
                matches!(
                    failure(status, serde_json::json!({})),
                    LlmError::Transient { .. }
                ),
                "{status}"
            );
        }
    }

    #[test]
    fn reset_times_as_openai_writes_them() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_reset("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_reset("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_reset("5x"), None);
        assert_eq!(parse_reset(""), None);
    }

    #[test]
    fn an_exhausted_budget_says_how_long_it_stays_spent() {
        let mut h = header::HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-requests",
            "0".parse().expect("value"),
        );
        h.insert("x-ratelimit-reset-requests", "1s".parse().expect("value"));
        h.insert(
            "x-ratelimit-remaining-tokens",
            "1000".parse().expect("value"),
        );
        h.insert("x-ratelimit-reset-tokens", "6m0s".parse().expect("value"));
        assert_eq!(
            spent_for(&h),
            Some(Duration::from_secs(1)),
            "only the spent one"
        );
        h.insert("x-ratelimit-remaining-tokens", "0".parse().expect("value"));
        assert_eq!(spent_for(&h), Some(Duration::from_secs(360)), "the longest");
        assert_eq!(spent_for(&header::HeaderMap::new()), None);
        let mut r = header::HeaderMap::new();
        r.insert("retry-after-ms", "250".parse().expect("value"));
        r.insert(header::RETRY_AFTER, "9".parse().expect("value"));
        assert_eq!(
            retry_after(&r),
            Some(Duration::from_millis(250)),
            "the precise one wins"
        );
    }

    #[tokio::test]
    async fn azure_style_headers_and_query_are_sent() {
        let mock = crate::tools::mock::MockServer::start(
            ([127, 0, 0, 1], 0).into(),
            crate::tools::mock::MockOptions {
                require_header: Some("api-key: azure-secret".into()),
                require_query: Some("api-version=2024-10-21".into()),
                ..Default::default()
            },
        )
        .await
        .expect("the mock listens");
        let bare = UpstreamConfig {
            base_url: crate::config::SecretUrl::new(mock.base_url()),
            ..UpstreamConfig::default()
        };
        let refused = LlmClient::new(&bare, 1 << 20).expect("client");
        let answer = refused.chat("m", &hello(), &Map::new()).await;
        assert!(
            matches!(answer, Err(LlmError::Refused { .. })),
            "{answer:?}"
        );
        let azure = UpstreamConfig {
            headers: [("api-key".to_string(), Secret::new("azure-secret"))].into(),
            query: [("api-version".to_string(), "2024-10-21".to_string())].into(),
            ..bare
        };
        let client = LlmClient::new(&azure, 1 << 20).expect("client");
        let answer = client.chat("m", &hello(), &Map::new()).await;
        assert!(answer.is_ok(), "{answer:?}");
        let answer = client.embed("e", &["x".to_string()], &Map::new()).await;
        assert!(answer.is_ok(), "the embeddings URL too: {answer:?}");
    }

    #[tokio::test]
    async fn an_exhausted_rate_limit_budget_is_a_retry_after() {
        let (_mock, client) = client_of(
            crate::tools::mock::MockOptions {
                error_rate: 1.0,
                status: 429,
                retry_after: Some(7),
                rate_limit_headers: true,
                ..Default::default()
            },
            1 << 20,
        )
        .await;
        let answer = client.chat("m", &hello(), &Map::new()).await;
        let Err(LlmError::RateLimited { retry_after, .. }) = answer else {
            panic!("rate limited: {answer:?}");
        };
        assert_eq!(
            retry_after,
            Some(Duration::from_secs(7)),
            "from x-ratelimit-reset-requests"
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        let later = SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(later)).expect("date");
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
