//! `[llm]` and `[upstreams.<name>]`: the request policy, and the deployments that serve it.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::{Secret, SecretUrl};
use crate::contract::rules::{DEFAULT_ALLOWED_PARAMS, DEFAULT_MAX_N, DEFAULT_MAX_TOKENS_CAP};

/// The wire formats a deployment may speak (`[upstreams.<name>].provider`); the first is
/// the default. A new one is a name here and its module beside the OpenAI-compatible one.
pub const PROVIDERS: [&str; 1] = ["openai"];

/// `[llm]`: two jobs under one section, kept apart in code. Its keys deserialize as they
/// always have (same names, same `LLMQ_LLM__*` variables); read them through the view of
/// the job at hand:
/// - [`LlmConfig::policy`]: the request policy, whatever deployment serves the request
///   (default models, `default_max_tokens`, response and streaming limits, the caps and
///   allow-lists of [`crate::contract::Rules`]);
/// - [`LlmConfig::default_deployment`]: the implicit deployment `default`, used when no
///   `[upstreams]` is configured (its connection keys: those [`UpstreamConfig`] has too).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LlmConfig {
    /// Base URL including `/v1`; requests go to `{base_url}/chat/completions` and
    /// `{base_url}/embeddings`.
    pub base_url: SecretUrl,
    /// Bearer token; empty falls back to `OPENAI_API_KEY`, and stays empty for servers that
    /// need none (vLLM, Ollama).
    pub api_key: Secret,
    /// Chat model used when a request names none.
    pub model: String,
    /// Embedding model used when a request names none.
    pub embedding_model: String,
    /// Deadline of one upstream call; with `retry.inline_max_ms` it must stay below half of
    /// `amqp.consumer_timeout_secs`.
    pub timeout_secs: u64,
    /// Longest silence of a streamed call (`"stream": true`): before its answer starts, and
    /// between two chunks (keep-alive comments count). A stream silent longer is cut off
    /// and retried.
    pub stream_idle_timeout_secs: u64,
    /// Longest streamed call, first byte to last, in place of the deployment's
    /// `timeout_secs`; 0 = that `timeout_secs`. With `retry.inline_max_ms` it must stay
    /// below half of `amqp.consumer_timeout_secs`.
    pub stream_max_secs: u64,
    /// Requests per minute this replica (or, with `limits.redis_url`, the fleet) may send;
    /// 0 = no limit.
    pub max_requests_per_minute: u64,
    /// Tokens per minute (estimated as prompt characters / 4 + `max_tokens`, corrected by the
    /// reported usage); 0 = no limit.
    pub max_tokens_per_minute: u64,
    /// `max_tokens` assumed for the token estimate of a chat request that sets none.
    pub default_max_tokens: u64,
    /// Speak HTTP/2 without TLS (h2c, "prior knowledge") to a plain-`http` upstream that
    /// supports it: calls share a few connections instead of one each. HTTPS upstreams
    /// negotiate HTTP/2 by themselves (ALPN) and ignore this.
    pub http2_prior_knowledge: bool,
    /// Largest upstream answer read; a larger one is cut off as it streams in and the
    /// request is dead-lettered as `upstream_permanent`, so one answer cannot exhaust memory.
    pub max_response_bytes: usize,
    /// Highest `max_tokens` / `max_completion_tokens` a request may ask for; over it is
    /// `invalid_request`.
    pub max_tokens_cap: u64,
    /// Highest `n` (choices, each paid for) a chat request may ask for.
    pub max_n: u64,
    /// Models a request may name; empty allows any. Checked before routing; a request that
    /// names none gets `model` / `embedding_model`, which are not checked.
    pub allowed_models: Vec<String>,
    /// Parameters a request may send, in `params` or at the top level as in OpenAI's body;
    /// any other is `invalid_request`, naming it. The default holds the fields that widen
    /// neither cost nor data retention (`store`, `service_tier` are not in it).
    pub allowed_params: Vec<String>,
    /// Parameters allowed on top of `allowed_params`, so that adding one does not restate
    /// the defaults.
    pub extra_allowed_params: Vec<String>,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            base_url: SecretUrl::new("http://127.0.0.1:8080/v1"),
            api_key: Secret::default(),
            model: "gpt-4o-mini".into(),
            embedding_model: "text-embedding-3-small".into(),
            timeout_secs: 60,
            stream_idle_timeout_secs: 60,
            stream_max_secs: 0,
            max_requests_per_minute: 0,
            max_tokens_per_minute: 0,
            default_max_tokens: 256,
            http2_prior_knowledge: false,
            max_response_bytes: 16 * 1024 * 1024,
            max_tokens_cap: DEFAULT_MAX_TOKENS_CAP,
            max_n: DEFAULT_MAX_N,
            allowed_models: Vec::new(),
            allowed_params: DEFAULT_ALLOWED_PARAMS.map(String::from).to_vec(),
            extra_allowed_params: Vec::new(),
        }
    }
}

impl LlmConfig {
    /// [`Self::timeout_secs`] as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// One deployment of `[upstreams.<name>]`. Without any, `[llm]`'s
/// connection keys make one deployment named `default`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL including `/v1` (for Azure OpenAI, `https://<resource>.openai.azure.com/openai/deployments/<deployment>`
    /// style bases work too: calls go to `{base_url}/chat/completions`).
    pub base_url: SecretUrl,
    /// Bearer token; empty sends none (vLLM, Ollama, or Azure's `api-key` in `headers`).
    pub api_key: Secret,
    /// Its wire format, one of [`PROVIDERS`]: `openai` (OpenAI-compatible: OpenAI, Azure
    /// OpenAI, vLLM, Ollama, LiteLLM).
    pub provider: String,
    /// Routing names of the models it serves; empty or `["*"]` serves any.
    pub models: Vec<String>,
    /// Its share of traffic among the healthy deployments serving a model.
    pub weight: u32,
    /// This deployment's AIMD ceiling: calls to it running at once in this replica.
    pub max_inflight: u16,
    /// Its requests per minute (fleet-wide with `limits.redis_url`); 0 = no limit.
    pub max_requests_per_minute: u64,
    /// Its tokens per minute (fleet-wide with `limits.redis_url`); 0 = no limit.
    pub max_tokens_per_minute: u64,
    /// Deadline of one call to it.
    pub timeout_secs: u64,
    /// The name this deployment knows a routing model by (Azure deployment names); models
    /// not listed are sent as they are.
    pub model_names: BTreeMap<String, String>,
    /// Extra headers sent with every call, values secret (Azure's `api-key`).
    pub headers: BTreeMap<String, Secret>,
    /// Extra query parameters of every call (Azure's `api-version`).
    pub query: BTreeMap<String, String>,
    /// Speak HTTP/2 without TLS (h2c) to a plain-`http` deployment that supports it.
    pub http2_prior_knowledge: bool,
    /// The field this deployment takes a chat call's output bound in: `max_tokens`, or
    /// `max_completion_tokens` (OpenAI's reasoning models refuse `max_tokens`). A request's
    /// `max_tokens` is sent in it when the request does not set that field itself.
    pub max_tokens_field: String,
}

/// The values of `upstreams.<name>.max_tokens_field`.
pub const MAX_TOKENS_FIELDS: [&str; 2] = ["max_tokens", "max_completion_tokens"];

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: SecretUrl::new(""),
            api_key: Secret::default(),
            provider: PROVIDERS[0].to_string(),
            models: Vec::new(),
            weight: 1,
            max_inflight: 256,
            max_requests_per_minute: 0,
            max_tokens_per_minute: 0,
            timeout_secs: 60,
            model_names: BTreeMap::new(),
            headers: BTreeMap::new(),
            query: BTreeMap::new(),
            http2_prior_knowledge: false,
            max_tokens_field: MAX_TOKENS_FIELDS[0].to_string(),
        }
    }
}

impl UpstreamConfig {
    /// [`Self::timeout_secs`] as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// Whether it serves the routing model `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == "*" || m == model)
    }

    /// The name it knows `model` by.
    pub fn upstream_name<'a>(&'a self, model: &'a str) -> &'a str {
        self.model_names.get(model).map_or(model, String::as_str)
    }
}

/// `[llm]`'s first job: what every request is held to and answered with, whichever
/// deployment serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPolicy {
    /// Chat model of a request that names none.
    pub chat_model: String,
    /// Embedding model of a request that names none.
    pub embedding_model: String,
    /// `max_tokens` assumed for the token estimate of a chat request that sets none.
    pub default_max_tokens: u64,
    /// Largest answer read.
    pub max_response_bytes: usize,
    /// Longest silence of a streamed call.
    pub stream_idle: Duration,
    /// Longest streamed call; `None`: the deployment's own call timeout.
    pub stream_max: Option<Duration>,
}

impl LlmConfig {
    /// The request policy: the first of `[llm]`'s two jobs.
    pub fn policy(&self) -> RequestPolicy {
        RequestPolicy {
            chat_model: self.model.clone(),
            embedding_model: self.embedding_model.clone(),
            default_max_tokens: self.default_max_tokens,
            max_response_bytes: self.max_response_bytes,
            stream_idle: Duration::from_secs(self.stream_idle_timeout_secs),
            stream_max: (self.stream_max_secs > 0)
                .then(|| Duration::from_secs(self.stream_max_secs)),
        }
    }

    /// The implicit deployment `default`, the second job: what serves the requests when
    /// `[upstreams]` names no deployment; `max_inflight` is `worker.max_inflight`.
    pub fn default_deployment(&self, max_inflight: u16) -> UpstreamConfig {
        UpstreamConfig {
            base_url: self.base_url.clone(),
            api_key: self.api_key.clone(),
            max_inflight,
            max_requests_per_minute: self.max_requests_per_minute,
            max_tokens_per_minute: self.max_tokens_per_minute,
            timeout_secs: self.timeout_secs,
            http2_prior_knowledge: self.http2_prior_knowledge,
            ..UpstreamConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_deployment_takes_the_connection_keys_and_the_policy_the_rest() {
        let llm = LlmConfig {
            base_url: SecretUrl::new("http://llm.internal:8000/v1"),
            api_key: Secret::new("sk-1"),
            timeout_secs: 30,
            max_requests_per_minute: 60,
            max_tokens_per_minute: 6000,
            http2_prior_knowledge: true,
            model: "m".into(),
            stream_max_secs: 90,
            ..LlmConfig::default()
        };
        let d = llm.default_deployment(7);
        assert_eq!(
            (d.base_url.expose(), d.api_key.expose(), d.timeout_secs),
            ("http://llm.internal:8000/v1", "sk-1", 30)
        );
        assert_eq!(
            (
                d.max_inflight,
                d.max_requests_per_minute,
                d.max_tokens_per_minute
            ),
            (7, 60, 6000)
        );
        assert!(d.http2_prior_knowledge);
        assert_eq!(d.provider, "openai");
        let policy = llm.policy();
        assert_eq!(policy.chat_model, "m");
        assert_eq!(policy.stream_max, Some(Duration::from_secs(90)));
        assert_eq!(LlmConfig::default().policy().stream_max, None);
    }
}
