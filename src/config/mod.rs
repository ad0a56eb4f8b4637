//! Configuration: defaults, then a TOML file, then `LLMQ_*` environment variables.
//!
//! Every key has a default, so an empty file (or none) is a valid configuration. Nested keys
//! map to environment variables with `__`: `worker.prefetch` is `LLMQ_WORKER__PREFETCH`.
//! [`Config::load`] reports every problem at once (unknown keys, wrong types, values out of
//! range), each naming its key; the binary exits 64 (EX_USAGE) on any of them.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
    value::{Dict, Value},
};
use serde::{Deserialize, Deserializer, de::DeserializeOwned};

/// The environment variable prefix; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "LLMQ_";

/// The whole configuration of a worker (and of the built-in tools that talk to the broker).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Broker connection.
    pub amqp: AmqpConfig,
    /// Exchange, queue and routing-key names.
    pub topology: TopologyConfig,
    /// The OpenAI-compatible upstream.
    pub llm: LlmConfig,
    /// Consumers, prefetch, limits on messages.
    pub worker: WorkerConfig,
    /// Retries of transient upstream failures.
    pub retry: RetryConfig,
    /// Deduplication by request_id.
    pub idempotency: IdempotencyConfig,
    /// Fleet-wide rate limits.
    pub limits: LimitsConfig,
    /// Embedding micro-batching.
    pub batch: BatchConfig,
    /// The admin HTTP server.
    pub admin: AdminConfig,
    /// Log format and filter.
    pub log: LogConfig,
}

/// Broker connection settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://` or `amqps://` URL; its password is redacted wherever it is printed.
    pub url: SecretUrl,
    /// AMQP heartbeat, so a dead TCP connection is noticed within about two intervals.
    pub heartbeat_secs: u16,
    /// TLS settings for `amqps://` URLs.
    pub tls: TlsConfig,
}

/// TLS for `amqps://`: the system's roots are trusted unless a CA file is given.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA(s) that signed the broker's certificate.
    pub ca_file: String,
    /// PEM client certificate, for brokers that authenticate clients by certificate.
    pub client_cert: String,
    /// PEM (PKCS#8) private key of `client_cert`.
    pub client_key: String,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: SecretUrl("amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            heartbeat_secs: 10,
            tls: TlsConfig::default(),
        }
    }
}

/// Names of everything the worker declares. Tests override them to run in parallel.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyConfig {
    /// Direct exchange that callers publish requests to.
    pub request_exchange: String,
    /// Work queue for chat requests.
    pub processing_queue: String,
    /// Routing key binding `processing_queue` to `request_exchange`.
    pub processing_key: String,
    /// Work queue for embedding requests.
    pub embeddings_queue: String,
    /// Routing key binding `embeddings_queue` to `request_exchange`.
    pub embeddings_key: String,
    /// `x-max-priority` of both work queues. Clients that declare the queue themselves must
    /// use the same value, so the default is the one common tutorials use.
    pub max_priority: u8,
    /// Direct exchange results are published to.
    pub results_exchange: String,
    /// Routing key of results on `results_exchange`.
    pub results_key: String,
    /// Durable queue that keeps results when nobody listens.
    pub results_queue: String,
    /// Whether to declare and bind `results_queue`. Off: results only reach `reply_to` and
    /// whatever the users bind to `results_exchange` themselves.
    pub keep_results: bool,
    /// Direct exchange for dead letters (requests that cannot succeed).
    pub dead_letter_exchange: String,
    /// Queue that keeps dead letters.
    pub dead_letter_queue: String,
    /// Routing key of dead letters; the broker-side DLX policy uses the same one.
    pub dead_letter_key: String,
    /// Headers exchange in front of the delayed-retry queues.
    pub retry_exchange: String,
    /// Prefix of the delayed-retry queues (`<prefix>.5s`, `<prefix>.30s`, ...). Messages wait
    /// there for their per-message TTL, then dead-letter back to `request_exchange`.
    pub retry_queue_prefix: String,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            request_exchange: "llm_requests".into(),
            processing_queue: "llm_processing".into(),
            processing_key: "process".into(),
            embeddings_queue: "llm_embeddings".into(),
            embeddings_key: "embed".into(),
            max_priority: 10,
            results_exchange: "llm_results".into(),
            results_key: "result".into(),
            results_queue: "llm_results".into(),
            keep_results: true,
            dead_letter_exchange: "llm_requests.dlx".into(),
            dead_letter_queue: "llm_processing.dlq".into(),
            dead_letter_key: "dead".into(),
            retry_exchange: "llm_requests.retry".into(),
            retry_queue_prefix: "llm_requests.retry".into(),
        }
    }
}

/// The OpenAI-compatible upstream.
#[derive(Debug, Clone, Deserialize)]
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
    /// Deadline of one upstream call. Keep it well under the broker's consumer timeout.
    pub timeout_secs: u64,
    /// Requests per minute this replica (or, with `limits.redis_url`, the fleet) may send;
    /// 0 = no limit.
    pub max_requests_per_minute: u64,
    /// Tokens per minute (estimated as prompt characters / 4 + `max_tokens`, corrected by the
    /// reported usage); 0 = no limit.
    pub max_tokens_per_minute: u64,
    /// `max_tokens` assumed for the token estimate of a chat request that sets none.
    pub default_max_tokens: u64,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            base_url: SecretUrl("http://127.0.0.1:8080/v1".into()),
            api_key: Secret::default(),
            model: "gpt-4o-mini".into(),
            embedding_model: "text-embedding-3-small".into(),
            timeout_secs: 60,
            max_requests_per_minute: 0,
            max_tokens_per_minute: 0,
            default_max_tokens: 256,
        }
    }
}

impl TopologyConfig {
    /// Every exchange and queue named `<prefix>.<role>` (routing keys unchanged): an isolated
    /// copy of the topology, as the tests and the benchmark use to run side by side.
    pub fn with_prefix(&self, p: &str) -> Self {
        Self {
            request_exchange: format!("{p}.requests"),
            processing_queue: format!("{p}.processing"),
            embeddings_queue: format!("{p}.embeddings"),
            results_exchange: format!("{p}.results"),
            results_queue: format!("{p}.results"),
            dead_letter_exchange: format!("{p}.dlx"),
            dead_letter_queue: format!("{p}.dlq"),
            retry_exchange: format!("{p}.retry"),
            retry_queue_prefix: format!("{p}.retry"),
            ..self.clone()
        }
    }
}

impl LlmConfig {
    /// [`Self::timeout_secs`] as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// Consumers and per-message limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Consumer tasks, each on its own channel.
    pub consumers: u16,
    /// `basic.qos` of each consumer. 0 (the default) follows the concurrency limit, so a
    /// throttled replica does not hoard messages another replica could take: the consumers
    /// share the limit plus a quarter equally (rounded up, at least 1), and the embeddings
    /// consumers take `batch.max_items` times that, since one batched call carries that many
    /// messages.
    pub prefetch: u16,
    /// Most upstream calls running at once in this replica (the AIMD ceiling).
    pub max_inflight: u16,
    /// The AIMD floor: 429s and timeouts never push the limit below this.
    pub min_inflight: u16,
    /// Name of this worker in results and logs; empty means the host name.
    pub id: String,
    /// Bodies larger than this are dead-lettered as `too_large` without being parsed.
    pub max_body_bytes: usize,
    /// On SIGTERM, how long in-flight work may take to finish before it is handed back.
    pub shutdown_grace_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            consumers: 4,
            prefetch: 0,
            max_inflight: 256,
            min_inflight: 4,
            id: String::new(),
            max_body_bytes: 1024 * 1024,
            shutdown_grace_secs: 30,
        }
    }
}

impl WorkerConfig {
    /// The worker's name: [`Self::id`], else the host name, else `llmq-<pid>`.
    pub fn worker_id(&self) -> String {
        if !self.id.is_empty() {
            return self.id.clone();
        }
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("llmq-{}", std::process::id()))
    }
}

/// Retries of transient failures (429, 5xx, timeouts, connection errors).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Upstream calls per request at most, the first one included.
    pub max_attempts: u32,
    /// First backoff delay; each later one doubles, with full jitter.
    pub initial_delay_ms: u64,
    /// Cap of one backoff delay (a longer `Retry-After` still wins).
    pub max_delay_secs: u64,
    /// Waits up to this long happen in the worker; longer ones go through the durable retry
    /// queues, so they hold no prefetch slot and cannot hit the broker's consumer timeout.
    pub inline_max_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay_ms: 500,
            max_delay_secs: 30,
            inline_max_ms: 2000,
        }
    }
}

/// Deduplication by `request_id`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// `memory` (per replica), `redis` (fleet-wide) or `off`.
    pub store: StoreKind,
    /// How long finished results are remembered.
    pub ttl_secs: u64,
    /// Redis URL for `store = "redis"`; its password is redacted when printed.
    pub redis_url: SecretUrl,
    /// Results kept at most by the memory store.
    pub memory_capacity: u64,
    /// Prefix of the Redis keys (`<prefix>:result:<id>`, `<prefix>:lease:<id>`).
    pub key_prefix: String,
    /// When the store cannot be reached: `requeue` (default: the request waits in the retry
    /// queue, nothing is lost, nothing is duplicated) or `proceed` (process without dedupe).
    pub on_store_error: OnStoreError,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Memory,
            ttl_secs: 86_400,
            redis_url: SecretUrl("redis://127.0.0.1:6379".into()),
            memory_capacity: 10_000,
            key_prefix: "llmq".into(),
            on_store_error: OnStoreError::Requeue,
        }
    }
}

/// Fleet-wide rate limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// When set, `llm.max_requests_per_minute` and `llm.max_tokens_per_minute` are one budget
    /// shared by every replica through this Redis; empty = per replica.
    pub redis_url: SecretUrl,
    /// Prefix of the budget keys.
    pub key_prefix: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            redis_url: SecretUrl(String::new()),
            key_prefix: "llmq:limits".into(),
        }
    }
}

/// The admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address; empty turns the server off.
    pub addr: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            addr: "0.0.0.0:9090".into(),
        }
    }
}

impl AdminConfig {
    /// The address to listen on, if the server is on.
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        self.addr.parse().ok()
    }
}

/// Embedding micro-batching.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most inputs in one `/embeddings` call; 1 turns batching off.
    pub max_items: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_items: 64,
            max_wait_ms: 10,
        }
    }
}

/// Which idempotency store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// No deduplication.
    Off,
    /// Per replica.
    Memory,
    /// Fleet-wide.
    Redis,
}

/// What to do when the idempotency store is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Put the request back (through the retry queue) until the store answers.
    Requeue,
    /// Process it anyway, without deduplication.
    Proceed,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter, e.g. `info` or `llmq=debug,lapin=warn`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info,lapin=warn".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A secret string: prints as `***` in `Debug` and `Display`, so it never reaches a log.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A URL whose password prints as `***` (`amqp://user:***@host:5672/%2f`).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The URL with its password, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL as it may be printed.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretUrl)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of a URL with `***`; a string that does not parse is hidden whole
/// past its scheme, since it may still hold a password.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        // Without a host (`amqp:user:pw@host`) the parser sees no password to replace.
        Ok(url) if url.cannot_be_a_base() || !url.has_host() => format!("{}://***", url.scheme()),
        Ok(mut url) => {
            if url.password().is_some() && url.set_password(Some("***")).is_err() {
                return format!("{}://***", url.scheme());
            }
            url.to_string()
        }
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None => "***".into(),
        },
    }
}

/// Every problem found in a configuration, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl Config {
    /// Loads defaults, then `path` (or `./config.toml` if it exists), then `LLMQ_*`
    /// environment variables, then the `OPENAI_API_KEY` fallback.
    ///
    /// An explicit `path` that does not exist is an error; the implicit `./config.toml` is
    /// optional.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let file: Option<PathBuf> = match path {
            Some(p) if !p.exists() => {
                problems.push(format!("config file {}: not found", p.display()));
                None
            }
            Some(p) => Some(p.to_path_buf()),
            None => Some(PathBuf::from("config.toml")).filter(|p| p.exists()),
        };
        let mut figment = Figment::new();
        if let Some(file) = &file {
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only nested names are keys (every key lives in a section), so that an unrelated
        // LLMQ_SOMETHING in the environment is no error, while a typo such as
        // LLMQ_WORKER__PREFECH still is.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        let mut config = Self::from_figment(&figment, &mut problems);
        if config.llm.api_key.is_empty()
            && let Ok(key) = std::env::var("OPENAI_API_KEY")
        {
            config.llm.api_key = Secret::new(key);
        }
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Extracts each section on its own, so that a problem in one does not hide the others.
    fn from_figment(figment: &Figment, problems: &mut Vec<String>) -> Self {
        let mut config = Config::default();
        let root: Dict = match figment.extract() {
            Ok(root) => root,
            Err(e) => {
                problems.push(without_source(&e.to_string()));
                return config;
            }
        };
        for (key, value) in &root {
            match key.as_str() {
                "amqp" => section(key, value, &mut config.amqp, problems),
                "topology" => section(key, value, &mut config.topology, problems),
                "llm" => section(key, value, &mut config.llm, problems),
                "worker" => section(key, value, &mut config.worker, problems),
                "retry" => section(key, value, &mut config.retry, problems),
                "idempotency" => section(key, value, &mut config.idempotency, problems),
                "limits" => section(key, value, &mut config.limits, problems),
                "batch" => section(key, value, &mut config.batch, problems),
                "admin" => section(key, value, &mut config.admin, problems),
                "log" => section(key, value, &mut config.log, problems),
                other => problems.push(format!(
                    "{other} ({}): unknown key; sections are amqp, topology, llm, worker, retry, idempotency, limits, batch, admin, log",
                    env_name(other)
                )),
            }
        }
        config
    }

    /// The `LLMQ_*` environment that gives a child `llmq` process this configuration (the
    /// benchmark and the tests start workers this way). Secrets are included: never log it.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let (t, w, r) = (&self.topology, &self.worker, &self.retry);
        let pairs: [(&str, String); 35] = [
            ("amqp.url", self.amqp.url.expose().into()),
            ("amqp.heartbeat_secs", self.amqp.heartbeat_secs.to_string()),
            ("topology.request_exchange", t.request_exchange.clone()),
            ("topology.processing_queue", t.processing_queue.clone()),
            ("topology.processing_key", t.processing_key.clone()),
            ("topology.embeddings_queue", t.embeddings_queue.clone()),
            ("topology.embeddings_key", t.embeddings_key.clone()),
            ("topology.results_exchange", t.results_exchange.clone()),
            ("topology.results_key", t.results_key.clone()),
            ("topology.results_queue", t.results_queue.clone()),
            ("topology.keep_results", t.keep_results.to_string()),
            (
                "topology.dead_letter_exchange",
                t.dead_letter_exchange.clone(),
            ),
            ("topology.dead_letter_queue", t.dead_letter_queue.clone()),
            ("topology.retry_exchange", t.retry_exchange.clone()),
            ("topology.retry_queue_prefix", t.retry_queue_prefix.clone()),
            ("llm.base_url", self.llm.base_url.expose().into()),
            ("llm.api_key", self.llm.api_key.expose().into()),
            ("llm.timeout_secs", self.llm.timeout_secs.to_string()),
            ("worker.id", w.id.clone()),
            ("worker.consumers", w.consumers.to_string()),
            ("worker.prefetch", w.prefetch.to_string()),
            ("worker.max_inflight", w.max_inflight.to_string()),
            ("worker.min_inflight", w.min_inflight.to_string()),
            (
                "worker.shutdown_grace_secs",
                w.shutdown_grace_secs.to_string(),
            ),
            ("retry.max_attempts", r.max_attempts.to_string()),
            ("retry.initial_delay_ms", r.initial_delay_ms.to_string()),
            ("retry.max_delay_secs", r.max_delay_secs.to_string()),
            ("retry.inline_max_ms", r.inline_max_ms.to_string()),
            (
                "idempotency.store",
                format!("{:?}", self.idempotency.store).to_lowercase(),
            ),
            (
                "idempotency.redis_url",
                self.idempotency.redis_url.expose().into(),
            ),
            (
                "idempotency.key_prefix",
                self.idempotency.key_prefix.clone(),
            ),
            ("batch.max_items", self.batch.max_items.to_string()),
            ("batch.max_wait_ms", self.batch.max_wait_ms.to_string()),
            (
                "log.format",
                format!("{:?}", self.log.format).to_lowercase(),
            ),
            ("admin.addr", self.admin.addr.clone()),
        ];
        pairs
            .into_iter()
            .filter(|(key, value)| !(value.is_empty() && *key == "worker.id"))
            .map(|(key, value)| (env_name(key), value))
            .collect()
    }

    /// Checks values that parse but make no sense; one line per problem.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut check = |ok: bool, key: &str, msg: &str| {
            if !ok {
                p.push(format!("{key} ({}): {msg}", env_name(key)));
            }
        };
        match url::Url::parse(self.amqp.url.expose()) {
            Ok(u) if !matches!(u.scheme(), "amqp" | "amqps") => check(
                false,
                "amqp.url",
                &format!("scheme must be amqp or amqps, got {}", u.scheme()),
            ),
            Ok(u) => check(
                u.has_host() && !u.cannot_be_a_base(),
                "amqp.url",
                &format!(
                    "needs a host: amqp://user:password@host:5672/vhost, got {}",
                    self.amqp.url
                ),
            ),
            Err(e) => check(
                false,
                "amqp.url",
                &format!("not a URL ({e}): {}", self.amqp.url),
            ),
        }
        match url::Url::parse(self.llm.base_url.expose()) {
            Ok(u) => check(
                matches!(u.scheme(), "http" | "https"),
                "llm.base_url",
                &format!("scheme must be http or https, got {}", u.scheme()),
            ),
            Err(e) => check(
                false,
                "llm.base_url",
                &format!("not a URL ({e}): {}", self.llm.base_url),
            ),
        }
        let tls = &self.amqp.tls;
        for (key, path) in [
            ("amqp.tls.ca_file", &tls.ca_file),
            ("amqp.tls.client_cert", &tls.client_cert),
            ("amqp.tls.client_key", &tls.client_key),
        ] {
            if !path.is_empty() {
                check(
                    std::path::Path::new(path).is_file(),
                    key,
                    &format!("no such file: {path}"),
                );
            }
        }
        check(
            tls.client_cert.is_empty() == tls.client_key.is_empty(),
            "amqp.tls.client_key",
            "amqp.tls.client_cert and amqp.tls.client_key go together",
        );
        check(!self.llm.model.is_empty(), "llm.model", "must not be empty");
        check(
            !self.llm.embedding_model.is_empty(),
            "llm.embedding_model",
            "must not be empty",
        );
        check(
            (1..=3600).contains(&self.llm.timeout_secs),
            "llm.timeout_secs",
            "must be between 1 and 3600",
        );
        check(
            (1..=1024).contains(&self.worker.consumers),
            "worker.consumers",
            "must be between 1 and 1024",
        );
        check(
            self.worker.max_inflight >= 1,
            "worker.max_inflight",
            "must be at least 1",
        );
        check(
            self.worker.max_inflight == 0
                || (1..=self.worker.max_inflight).contains(&self.worker.min_inflight),
            "worker.min_inflight",
            "must be between 1 and worker.max_inflight",
        );
        check(
            (1..=2048).contains(&self.batch.max_items),
            "batch.max_items",
            "must be between 1 and 2048",
        );
        check(
            self.batch.max_wait_ms <= 10_000,
            "batch.max_wait_ms",
            "must be at most 10000",
        );
        check(
            self.admin.addr.is_empty() || self.admin.socket_addr().is_some(),
            "admin.addr",
            "must be host:port, like 0.0.0.0:9090 (or empty to turn it off)",
        );
        let limits_url = self.limits.redis_url.expose();
        if !limits_url.is_empty() {
            match url::Url::parse(limits_url) {
                Ok(u) => check(
                    matches!(u.scheme(), "redis" | "rediss"),
                    "limits.redis_url",
                    &format!("scheme must be redis or rediss, got {}", u.scheme()),
                ),
                Err(e) => check(
                    false,
                    "limits.redis_url",
                    &format!("not a URL ({e}): {}", self.limits.redis_url),
                ),
            }
        }
        check(
            self.worker.max_body_bytes >= 64,
            "worker.max_body_bytes",
            "must be at least 64",
        );
        check(
            self.retry.max_attempts >= 1,
            "retry.max_attempts",
            "must be at least 1",
        );
        check(
            self.retry.initial_delay_ms >= 1,
            "retry.initial_delay_ms",
            "must be at least 1",
        );
        check(
            self.retry.max_delay_secs >= 1,
            "retry.max_delay_secs",
            "must be at least 1",
        );
        check(
            self.idempotency.ttl_secs >= 1,
            "idempotency.ttl_secs",
            "must be at least 1",
        );
        check(
            self.idempotency.memory_capacity >= 1,
            "idempotency.memory_capacity",
            "must be at least 1",
        );
        if self.idempotency.store == StoreKind::Redis {
            match url::Url::parse(self.idempotency.redis_url.expose()) {
                Ok(u) => check(
                    matches!(u.scheme(), "redis" | "rediss"),
                    "idempotency.redis_url",
                    &format!("scheme must be redis or rediss, got {}", u.scheme()),
                ),
                Err(e) => check(
                    false,
                    "idempotency.redis_url",
                    &format!("not a URL ({e}): {}", self.idempotency.redis_url),
                ),
            }
        }
        check(
            self.topology.max_priority >= 1,
            "topology.max_priority",
            "must be between 1 and 255",
        );
        let t = &self.topology;
        for (key, value) in [
            ("topology.request_exchange", &t.request_exchange),
            ("topology.processing_queue", &t.processing_queue),
            ("topology.embeddings_queue", &t.embeddings_queue),
            ("topology.results_exchange", &t.results_exchange),
            ("topology.results_queue", &t.results_queue),
            ("topology.dead_letter_exchange", &t.dead_letter_exchange),
            ("topology.dead_letter_queue", &t.dead_letter_queue),
            ("topology.retry_exchange", &t.retry_exchange),
            ("topology.retry_queue_prefix", &t.retry_queue_prefix),
        ] {
            check(
                !value.is_empty() && value.len() <= 255,
                key,
                "must be 1 to 255 bytes",
            );
            check(
                !value.starts_with("amq."),
                key,
                "names starting with amq. are reserved by the broker",
            );
        }
        check(
            t.processing_queue != t.embeddings_queue,
            "topology.embeddings_queue",
            "must differ from topology.processing_queue",
        );
        check(
            t.processing_key != t.embeddings_key,
            "topology.embeddings_key",
            "must differ from topology.processing_key",
        );
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            check(false, "log.level", &format!("not a valid filter: {e}"));
        }
        p
    }
}

/// Deserializes one section; on failure, finds every bad key by deserializing each key
/// alone (all fields have defaults, so a one-key section fails only for that key).
fn section<T: DeserializeOwned>(
    name: &str,
    value: &Value,
    out: &mut T,
    problems: &mut Vec<String>,
) {
    match value.deserialize::<T>() {
        Ok(v) => *out = v,
        Err(_) => {
            let Value::Dict(_, dict) = value else {
                problems.push(format!(
                    "{name} ({}): must be a table of keys",
                    env_name(name)
                ));
                return;
            };
            let mut good = Dict::new();
            for (key, v) in dict {
                let mut one = Dict::new();
                one.insert(key.clone(), v.clone());
                match Value::from(one).deserialize::<T>() {
                    Ok(_) => {
                        good.insert(key.clone(), v.clone());
                    }
                    Err(e) => {
                        let full = format!("{name}.{key}");
                        problems.push(format!(
                            "{full} ({}): {}",
                            env_name(&full),
                            describe(key, &e)
                        ));
                    }
                }
            }
            // The good keys still apply, so that validation sees (and reports) their values.
            if let Ok(v) = Value::from(good).deserialize::<T>() {
                *out = v;
            }
        }
    }
}

/// Keys whose values are secret or may hold one: their errors never quote the value.
const SECRET_KEYS: [&str; 3] = ["api_key", "url", "redis_url"];

/// A key's error, without its value when the key is secret.
fn describe(key: &str, e: &figment::Error) -> String {
    if SECRET_KEYS.contains(&key) {
        use figment::error::Kind;
        match &e.kind {
            Kind::InvalidType(_, expected) => {
                format!("invalid type (value hidden), expected {expected}")
            }
            Kind::InvalidValue(_, expected) => {
                format!("invalid value (hidden), expected {expected}")
            }
            _ => "invalid value (hidden)".into(),
        }
    } else {
        e.kind.to_string()
    }
}

/// A configuration file error without the quoted source line (it may hold a secret).
fn without_source(message: &str) -> String {
    let mut lines = message.lines().filter(|l| {
        let t = l.trim_start();
        !(t.starts_with('|')
            || t.chars().next().is_some_and(|c| c.is_ascii_digit()) && t.contains(" | "))
    });
    let first = lines.next().unwrap_or("").trim();
    let rest: Vec<&str> = lines
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('^'))
        .collect();
    if rest.is_empty() {
        first.to_string()
    } else {
        format!("{first}: {}", rest.join(" "))
    }
}

/// `worker.prefetch` -> `LLMQ_WORKER__PREFETCH`.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

#[cfg(test)]
// figment's Jail API fixes the closure's error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    /// Loads inside a jail (its own cwd and environment) with `file` as `./config.toml`.
    fn problems(file: Option<&str>, vars: &[(&str, &str)]) -> Vec<String> {
        let mut out = Vec::new();
        Jail::expect_with(|jail| {
            jail.clear_env();
            if let Some(text) = file {
                jail.create_file("config.toml", text)?;
            }
            for (k, v) in vars {
                jail.set_env(k, v);
            }
            if let Err(e) = Config::load(None) {
                out = e.problems;
            }
            Ok(())
        });
        out
    }

    #[test]
    fn defaults_are_valid() {
        assert!(problems(None, &[]).is_empty());
        let c = Config::default();
        assert_eq!(c.topology.request_exchange, "llm_requests");
        assert_eq!(c.topology.max_priority, 10);
        assert_eq!(c.worker.consumers, 4);
        assert_eq!(c.worker.prefetch, 0, "follows the concurrency limit");
        assert_eq!(c.worker.max_inflight, 256);
        assert_eq!(c.llm.timeout_secs, 60);
        assert!(c.validate().is_empty());
    }

    #[test]
    fn env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("c.toml", "[worker]\nprefetch = 7\nconsumers = 2\n")?;
            jail.set_env("LLMQ_WORKER__PREFETCH", "9");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.worker.prefetch, 9);
            assert_eq!(c.worker.consumers, 2);
            Ok(())
        });
    }

    #[test]
    fn api_key_falls_back_to_openai_api_key() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("OPENAI_API_KEY", "sk-x");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.llm.api_key.expose(), "sk-x");
            jail.set_env("LLMQ_LLM__API_KEY", "sk-y");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.llm.api_key.expose(), "sk-y");
            Ok(())
        });
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let p = problems(
            Some("[worker]\nprefetch = \"many\"\nconsumers = -1\nbogus = 1\n[nope]\nx = 1\n"),
            &[
                ("LLMQ_LLM__BASE_URL", "not a url"),
                ("LLMQ_RETRY__MAX_ATTEMPTS", "0"),
            ],
        );
        let all = p.join("\n");
        assert!(
            all.contains("worker.prefetch (LLMQ_WORKER__PREFETCH)"),
            "{all}"
        );
        assert!(all.contains("worker.consumers"), "{all}");
        assert!(all.contains("worker.bogus"), "{all}");
        assert!(all.contains("nope"), "{all}");
        assert!(all.contains("llm.base_url"), "{all}");
        assert!(all.contains("retry.max_attempts"), "{all}");
        assert_eq!(p.len(), 6, "{all}");
        // Unrelated LLMQ_ variables are not keys; typos in a section are.
        assert!(problems(None, &[("LLMQ_HOME", "/x")]).is_empty());
        let p = problems(None, &[("LLMQ_WORKER__PREFECH", "1")]);
        assert!(p.len() == 1 && p[0].starts_with("worker.prefech"), "{p:?}");
        // A bad key does not hide a bad value next to it.
        let p = problems(
            Some("[worker]\nmax_inflight = 0\nconsumers = \"four\"\n"),
            &[],
        )
        .join("\n");
        assert!(
            p.contains("worker.max_inflight") && p.contains("worker.consumers"),
            "{p}"
        );
    }

    #[test]
    fn range_rules() {
        let cases = [
            ("LLMQ_WORKER__CONSUMERS", "0", "worker.consumers"),
            ("LLMQ_WORKER__MAX_INFLIGHT", "0", "worker.max_inflight"),
            ("LLMQ_WORKER__MIN_INFLIGHT", "300", "worker.min_inflight"),
            ("LLMQ_BATCH__MAX_ITEMS", "0", "batch.max_items"),
            ("LLMQ_LIMITS__REDIS_URL", "http://x", "limits.redis_url"),
            ("LLMQ_LLM__TIMEOUT_SECS", "0", "llm.timeout_secs"),
            ("LLMQ_AMQP__URL", "http://x", "amqp.url"),
            ("LLMQ_LLM__MODEL", "", "llm.model"),
            (
                "LLMQ_TOPOLOGY__PROCESSING_QUEUE",
                "amq.x",
                "topology.processing_queue",
            ),
            (
                "LLMQ_TOPOLOGY__EMBEDDINGS_KEY",
                "process",
                "topology.embeddings_key",
            ),
            ("LLMQ_LOG__FORMAT", "xml", "log.format"),
            ("LLMQ_LOG__LEVEL", "[[[", "log.level"),
            ("LLMQ_WORKER__MAX_BODY_BYTES", "1", "worker.max_body_bytes"),
        ];
        for (var, value, key) in cases {
            let p = problems(None, &[(var, value)]);
            assert!(
                p.len() == 1 && p[0].starts_with(key),
                "{var}={value}: {p:?}"
            );
        }
    }

    #[test]
    fn to_env_round_trips() {
        let mut c = Config::default();
        c.worker.max_inflight = 77;
        c.topology.processing_queue = "q-x".into();
        c.batch.max_items = 3;
        let env = c.to_env();
        Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in &env {
                jail.set_env(k, v);
            }
            let back = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(back.worker.max_inflight, 77);
            assert_eq!(back.topology.processing_queue, "q-x");
            assert_eq!(back.batch.max_items, 3);
            assert_eq!(back.idempotency.store, StoreKind::Memory);
            Ok(())
        });
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/llmq.toml"))).expect_err("missing");
        assert!(e.problems[0].contains("not found"), "{e}");
    }

    #[test]
    fn secrets_never_print() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("LLMQ_AMQP__URL", "amqp://user:canary-pw@host:5672/%2f");
            jail.set_env("LLMQ_LLM__API_KEY", "sk-canary");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            let printed = format!("{c:?} {} {}", c.amqp.url, c.llm.api_key);
            assert!(!printed.contains("canary"), "{printed}");
            assert!(
                printed.contains("amqp://user:***@host:5672/%2f"),
                "{printed}"
            );
            Ok(())
        });
        for (var, value) in [
            ("LLMQ_AMQP__URL", "amqp://u:canary-pw@[bad/"),
            ("LLMQ_AMQP__URL", "amqp:u:canary-pw@host"),
            ("LLMQ_LLM__API_KEY", "12345canary"),
            ("LLMQ_LLM__API_KEY", "[\"canary\"]"),
        ] {
            let bad = problems(None, &[(var, value)]).join(" ");
            assert!(
                !bad.is_empty() || var.contains("API_KEY"),
                "{var}={value} accepted"
            );
            assert!(!bad.contains("canary"), "{bad}");
        }
        let bad = problems(Some("[llm]\napi_key = sk-canary-unquoted\n"), &[]).join(" ");
        assert!(bad.contains("line 2"), "{bad}");
        assert!(!bad.contains("canary"), "{bad}");
        assert_eq!(redact_url("amqp:u:canary@h"), "amqp://***");
    }
}
