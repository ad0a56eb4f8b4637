//! The HTTP client of one deployment: pooled connections, timeouts, answers read up to a
//! bound, `Retry-After` and rate-limit headers. What goes over the wire is its
//! [`Provider`]'s (the OpenAI-compatible one by default: OpenAI, vLLM, Ollama, LiteLLM,
//! the mock).
//!
//! Every failure is classified once, where it happens ([`crate::upstream::failure`]): the
//! transport's here, an answer's by the rules there, from what its provider read of its
//! status and error body; a 429 comes back with when to come back (`Retry-After`,
//! `retry-after-ms` or the `x-ratelimit-reset-*` of an exhausted budget).
//!
//! Which deployment or model to try next for each is decided by [`crate::upstream::routing::router`].

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use reqwest::{Url, header};
use serde_json::{Map, Value};

pub use super::answer::{ChatAnswer, EmbeddingAnswer};
use super::{openai::OpenAi, provider::Provider};
use crate::upstream::failure::{Failure, Pushback};
use crate::{
    config::{Secret, UpstreamConfig},
    contract::request::Kind,
};

/// Most bytes read of a failed call's answer: enough for its error text.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A pooled HTTP client for one deployment.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    /// `[upstreams.<name>].headers`, values marked sensitive.
    headers: header::HeaderMap,
    pub(super) chat_url: Endpoint,
    embeddings_url: Endpoint,
    /// The headers that carry the key, as the provider sends it, built once and marked
    /// sensitive; none without a key. A value that cannot be a header is kept as text and
    /// set on each call through reqwest, which reports the bad header as the call's error.
    auth: Vec<(header::HeaderName, Result<header::HeaderValue, Secret>)>,
    /// The wire format.
    pub(super) provider: Arc<dyn Provider>,
    /// `llm.max_response_bytes`: an answer is read up to this and refused beyond it.
    pub(super) max_response_bytes: usize,
    /// The timeouts of streamed calls.
    pub(super) stream: StreamLimits,
    /// `max_tokens_field` is `max_completion_tokens`: a request's `max_tokens` is sent
    /// there.
    completion_field: bool,
}

/// The provider named `name` (one of [`crate::config::PROVIDERS`]), `None` for another.
pub fn provider_named(name: &str) -> Option<Arc<dyn Provider>> {
    match name {
        "openai" => Some(Arc::new(OpenAi)),
        _ => None,
    }
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
        // Validation refuses a provider it does not know.
        let provider = provider_named(&cfg.provider).unwrap_or_else(|| Arc::new(OpenAi));
        let auth = match cfg.api_key.is_empty() {
            true => Vec::new(),
            false => provider
                .auth(cfg.api_key.expose())
                .into_iter()
                .map(|(name, value)| {
                    let sendable = header::HeaderValue::try_from(value.as_str()).map(|mut v| {
                        v.set_sensitive(true);
                        v
                    });
                    (
                        header::HeaderName::from_static(name),
                        sendable.map_err(|_| Secret::new(value)),
                    )
                })
                .collect(),
        };
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
            chat_url: Endpoint::new(format!("{base}{}", provider.path(Kind::Chat)), &cfg.query),
            embeddings_url: Endpoint::new(
                format!("{base}{}", provider.path(Kind::Embedding)),
                &cfg.query,
            ),
            auth,
            provider,
            max_response_bytes,
            stream: StreamLimits::default(),
            completion_field: cfg.max_tokens_field == "max_completion_tokens",
        })
    }

    /// The same client with these timeouts for streamed calls.
    pub fn with_stream_limits(self, stream: StreamLimits) -> Self {
        Self { stream, ..self }
    }

    /// A chat call (`POST {base_url}/chat/completions` for OpenAI).
    pub async fn chat(
        &self,
        model: &str,
        messages: &[Value],
        params: &Map<String, Value>,
    ) -> Result<ChatAnswer, Failure> {
        let params = self.output_bound_field(params);
        let body = self.provider.chat_body(model, messages, &params, false)?;
        let (answer, spent_for) = self.post(&self.chat_url, body).await?;
        let mut answer = self.provider.chat_answer(&answer, model)?;
        answer.spent_for = spent_for;
        Ok(answer)
    }

    /// `params` with the output bound in the field this deployment takes: a `max_tokens`
    /// moved to `max_completion_tokens` when the deployment takes that and the request did
    /// not set it.
    pub(super) fn output_bound_field<'p>(
        &self,
        params: &'p Map<String, Value>,
    ) -> std::borrow::Cow<'p, Map<String, Value>> {
        if !self.completion_field
            || !params.contains_key("max_tokens")
            || params.contains_key("max_completion_tokens")
        {
            return std::borrow::Cow::Borrowed(params);
        }
        let mut moved = params.clone();
        if let Some(bound) = moved.remove("max_tokens") {
            moved.insert("max_completion_tokens".into(), bound);
        }
        std::borrow::Cow::Owned(moved)
    }

    /// An embeddings call (`POST {base_url}/embeddings` for OpenAI).
    pub async fn embed(
        &self,
        model: &str,
        input: &[String],
        params: &Map<String, Value>,
    ) -> Result<EmbeddingAnswer, Failure> {
        let body = self.provider.embedding_body(model, input, params)?;
        let (answer, spent_for) = self.post(&self.embeddings_url, body).await?;
        let mut answer = self
            .provider
            .embedding_answer(&answer, model, input.len())?;
        answer.spent_for = spent_for;
        Ok(answer)
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
pub(crate) fn too_large(limit: usize) -> Failure {
    Failure::permanent(format!(
        "upstream answer larger than llm.max_response_bytes ({limit} bytes); not read \
             further"
    ))
}

impl LlmClient {
    /// Posts `body` and reads a successful answer whole (at most `llm.max_response_bytes`):
    /// its body and how long the deployment's rate-limit budget stays spent, if this call
    /// spent it.
    async fn post(
        &self,
        url: &Endpoint,
        body: Vec<u8>,
    ) -> Result<(Vec<u8>, Option<Duration>), Failure> {
        let (resp, spent_for) = self.send(url, body, None).await?;
        Ok((self.read_whole(resp).await?, spent_for))
    }

    /// A successful answer's body read whole, refused beyond `llm.max_response_bytes`.
    pub(super) async fn read_whole(&self, resp: reqwest::Response) -> Result<Vec<u8>, Failure> {
        let limit = self.max_response_bytes;
        match read_bounded(resp, limit)
            .await
            .map_err(|e| Failure::of_transport(&e))?
        {
            (_, true) => Err(too_large(limit)),
            (bytes, false) => Ok(bytes),
        }
    }

    /// Posts `body` (with `timeout` in place of the deployment's, for a stream) and returns
    /// a successful answer unread, with how long the deployment's rate-limit budget stays
    /// spent if this call spent it; a failed one is read (its error text) and classified.
    pub(super) async fn send(
        &self,
        url: &Endpoint,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(reqwest::Response, Option<Duration>), Failure> {
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
        for (name, value) in &self.auth {
            req = match value {
                Ok(value) => req.header(name, value.clone()),
                Err(text) => req.header(name, text.expose()),
            };
        }
        if let Some(timeout) = timeout {
            req = req.timeout(timeout);
        }
        let resp = req.send().await.map_err(|e| Failure::of_transport(&e))?;
        let status = resp.status();
        let spent_for = spent_for(resp.headers());
        if status.is_success() {
            return Ok((resp, spent_for));
        }
        let retry_after = retry_after(resp.headers()).or(spent_for);
        let limit = MAX_ERROR_BODY.min(self.max_response_bytes);
        let (bytes, _) = read_bounded(resp, limit)
            .await
            .map_err(|e| Failure::of_transport(&e))?;
        let failure = self.provider.failure(status, &bytes, retry_after);
        // A spent budget holds the whole deployment, whatever else is running.
        Err(match spent_for {
            Some(_) => failure.with_pushback(Pushback::Spent),
            None => failure,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::failure::Class;

    #[test]
    fn every_listed_provider_is_built_and_no_other() {
        for name in crate::config::PROVIDERS {
            assert!(provider_named(name).is_some(), "{name}");
        }
        assert!(provider_named("anthropic").is_none());
        assert!(provider_named("").is_none());
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
        let Err(
            failure @ Failure {
                class: Class::Permanent,
                ..
            },
        ) = answer
        else {
            panic!("a permanent failure: {answer:?}");
        };
        assert_eq!(
            failure.message(),
            "upstream answer larger than llm.max_response_bytes (65536 bytes); not read further"
        );
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
            matches!(answer, Err(ref f) if f.class == Class::Refused),
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
        let Err(
            failure @ Failure {
                class: Class::RateLimited,
                ..
            },
        ) = answer
        else {
            panic!("rate limited: {answer:?}");
        };
        assert_eq!(
            failure.retry_after,
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
