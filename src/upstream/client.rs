//! The upstream: an OpenAI-compatible HTTP API (OpenAI, vLLM, Ollama, LiteLLM, the mock).
//!
//! Every failure is classified here, once: [`LlmError::Transient`] (429, 408, 409, 5xx,
//! timeouts, connection errors; retried, no sooner than `Retry-After`) or
//! [`LlmError::Permanent`] (other 4xx, answers that do not parse; dead-lettered at once).

use std::time::{Duration, SystemTime};

use reqwest::{StatusCode, Url, header};
use serde::{Deserialize, Serialize, ser::SerializeMap};
use serde_json::{Map, Value};

use crate::{
    config::{LlmConfig, Secret},
    contract::Usage,
};

/// Longest error text kept from an upstream answer.
const MAX_ERROR_TEXT: usize = 1024;

/// Most bytes read of a failed call's answer: enough for its error text.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// A failed upstream call, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// Worth retrying later.
    #[error("transient upstream failure: {message}")]
    Transient {
        /// What happened.
        message: String,
        /// The upstream's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
        /// The upstream pushed back (429 or a timeout): the concurrency limit should drop.
        throttle: bool,
    },
    /// Will fail the same way every time.
    #[error("permanent upstream failure: {message}")]
    Permanent {
        /// What happened.
        message: String,
    },
}

impl LlmError {
    /// Whether the upstream pushed back (429 or a timeout).
    pub fn is_throttle(&self) -> bool {
        matches!(self, LlmError::Transient { throttle: true, .. })
    }

    /// The upstream's `Retry-After`, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::Transient { retry_after, .. } => *retry_after,
            LlmError::Permanent { .. } => None,
        }
    }
}

/// What a chat completion returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatAnswer {
    /// The first choice's text (empty when the model answered only with tool calls).
    pub content: String,
    /// The model that answered, as the upstream names it.
    pub model: String,
    /// Token usage as reported.
    pub usage: Option<Usage>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
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
}

/// A pooled HTTP client for one upstream.
#[derive(Clone)]
pub struct LlmClient {
    http: reqwest::Client,
    chat_url: Endpoint,
    embeddings_url: Endpoint,
    /// `Bearer <api_key>`, built once and marked sensitive; `None` without a key, or when
    /// the key cannot be a header value (then each call sets it through reqwest, which
    /// reports the bad header as the call's error).
    auth: Option<header::HeaderValue>,
    api_key: Secret,
    /// `llm.max_response_bytes`: an answer is read up to this and refused beyond it.
    max_response_bytes: usize,
}

/// An upstream URL, parsed once rather than on every call (parsing showed up at 4% of the
/// worker's CPU); one that does not parse is kept as text so each call reports the error.
#[derive(Clone)]
enum Endpoint {
    Parsed(Url),
    Unparsed(String),
}

impl Endpoint {
    fn new(url: String) -> Self {
        match Url::parse(&url) {
            Ok(parsed) => Endpoint::Parsed(parsed),
            Err(_) => Endpoint::Unparsed(url),
        }
    }
}

/// A request body, serialized straight from the job's data: the extra params, then `model`
/// and the messages or inputs under `key` (which win over params of the same name).
struct Body<'a, T: Serialize + ?Sized> {
    model: &'a str,
    key: &'static str,
    value: &'a T,
    params: &'a Map<String, Value>,
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
        map.end()
    }
}

impl LlmClient {
    /// Builds the client: pooled keep-alive connections, the configured timeout.
    pub fn new(cfg: &LlmConfig) -> Result<Self, reqwest::Error> {
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
        Ok(Self {
            http,
            chat_url: Endpoint::new(format!("{base}/chat/completions")),
            embeddings_url: Endpoint::new(format!("{base}/embeddings")),
            auth,
            api_key: cfg.api_key.clone(),
            max_response_bytes: cfg.max_response_bytes,
        })
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
        };
        let answer: ChatResponse = self.post(&self.chat_url, &body).await?;
        let choice = answer
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| LlmError::Permanent {
                message: "upstream answer has no choices".into(),
            })?;
        Ok(ChatAnswer {
            content: choice.message.content.unwrap_or_default(),
            model: answer.model.unwrap_or_else(|| model.to_string()),
            usage: answer.usage,
            finish_reason: choice.finish_reason,
        })
    }

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
        };
        let answer: EmbeddingResponse = self.post(&self.embeddings_url, &body).await?;
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
        })
    }

    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        url: &Endpoint,
        body: &impl Serialize,
    ) -> Result<T, LlmError> {
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
        if let Some(auth) = &self.auth {
            req = req.header(header::AUTHORIZATION, auth.clone());
        } else if !self.api_key.is_empty() {
            req = req.bearer_auth(self.api_key.expose());
        }
        let resp = req.send().await.map_err(classify_reqwest)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let limit = if status.is_success() {
            self.max_response_bytes
        } else {
            MAX_ERROR_BODY.min(self.max_response_bytes)
        };
        let (bytes, cut) = read_bounded(resp, limit).await.map_err(classify_reqwest)?;
        if !status.is_success() {
            // Scrubbed before the final cut, so that a key at the cut is still recognised
            // whole; the generous first cut keeps the scrub's work bounded.
            let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4 * MAX_ERROR_TEXT)]);
            let text = super::scrub::scrub_secrets(&text);
            let text = crate::truncate(&text, MAX_ERROR_TEXT).to_string();
            let message = format!("HTTP {status}: {text}");
            return Err(if is_transient_status(status) {
                LlmError::Transient {
                    message,
                    retry_after,
                    throttle: status == StatusCode::TOO_MANY_REQUESTS,
                }
            } else {
                LlmError::Permanent { message }
            });
        }
        if cut {
            return Err(LlmError::Permanent {
                message: format!(
                    "upstream answer larger than llm.max_response_bytes ({limit} bytes); not read \
                     further"
                ),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| LlmError::Permanent {
            message: format!("unparseable upstream answer: {e}"),
        })
    }
}

/// Reads at most `limit` bytes of `resp`'s body as it streams in, never more: `true` when
/// the body is longer (its declared length, or what arrived), then what was read is a prefix
/// and the rest is left unread (the connection is dropped with the response).
async fn read_bounded(
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

fn classify_reqwest(e: reqwest::Error) -> LlmError {
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
struct ChatResponse {
    model: Option<String>,
    choices: Vec<ChatChoice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChatChoice {
    message: ChatMessage,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: Option<String>,
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
        };
        let text = serde_json::to_string(&body).expect("serializes");
        assert_eq!(
            serde_json::from_str::<Value>(&text).expect("JSON"),
            serde_json::json!({"model": "m", "temperature": 0.5, "messages": [{"role": "user", "content": "hi"}]})
        );
        assert_eq!(text.matches("\"model\"").count(), 1, "{text}");
    }

    async fn client_of(
        options: crate::tools::mock::MockOptions,
        max_response_bytes: usize,
    ) -> (crate::tools::mock::MockServer, LlmClient) {
        let mock = crate::tools::mock::MockServer::start(([127, 0, 0, 1], 0).into(), options)
            .await
            .expect("the mock listens");
        let cfg = LlmConfig {
            base_url: crate::config::SecretUrl::new(mock.base_url()),
            max_response_bytes,
            ..LlmConfig::default()
        };
        (mock, LlmClient::new(&cfg).expect("client"))
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
        assert_eq!(answer.map(|a| a.content.len()).ok(), Some(60_000));
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
