//! Configuration: defaults, then a TOML file, then `LLMQ_*` environment variables.
//!
//! Every key has a default, so an empty file (or none) is a valid configuration. Nested keys
//! map to environment variables with `__`: `worker.prefetch` is `LLMQ_WORKER__PREFETCH`.
//! [`Config::load`] reports every problem at once (unknown keys, wrong types, values out of
//! range), each naming its key; the binary exits 64 (EX_USAGE) on any of them.
//!
//! One file per concern: `sections` (the section structs and their defaults), `secret`
//! (values that never print), `load` (the layering and how errors are described) and
//! `validate` (the rules); every public name is re-exported here.

mod load;
mod secret;
mod sections;
mod validate;

use serde::Deserialize;

pub use secret::{Secret, SecretUrl, redact_url};
pub use sections::{
    AdminConfig, AmqpConfig, BatchConfig, IdempotencyConfig, LimitsConfig, LlmConfig, LogConfig,
    LogFormat, OnStoreError, RetryConfig, StoreKind, TlsConfig, TopologyConfig, WorkerConfig,
};

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

/// Every problem found in a configuration, each naming its key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem.
    pub problems: Vec<String>,
}

impl Config {
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
}

/// `worker.prefetch` -> `LLMQ_WORKER__PREFETCH`.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}
