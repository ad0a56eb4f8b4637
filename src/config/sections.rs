//! The sections of the configuration, each with its defaults.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};

use super::SecretUrl;
use crate::contract::request::Kind;

/// The broker a worker connects to when neither `amqp.url` nor `amqp.urls` is set.
pub const DEFAULT_AMQP_URL: &str = "amqp://llmq:llmq@127.0.0.1:5672/%2f";

/// Broker connection settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// One broker's `amqp://` or `amqps://` URL; its password is redacted wherever it is
    /// printed. `None` when the configuration does not set it (then [`DEFAULT_AMQP_URL`],
    /// unless `urls` is set), so that setting both is an error the default does not trip.
    /// Read the addresses through [`Self::addresses`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<SecretUrl>,
    /// Several brokers' URLs (the nodes of a cluster, each with its own credentials and
    /// vhost if need be), tried in turn; instead of `url`. `None` when not set, so that an
    /// empty list is an error rather than the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<SecretUrl>>,
    /// AMQP heartbeat, so a dead TCP connection is noticed within about two intervals.
    pub heartbeat_secs: u16,
    /// TLS settings for `amqps://` URLs.
    pub tls: TlsConfig,
    /// The broker's `consumer_timeout` in seconds (RabbitMQ's default, and
    /// `rabbitmq/rabbitmq.conf`'s, is 1800): a delivery held unacked longer gets its channel
    /// closed. The worker cannot ask the broker for it, so it is told here; a delivery that
    /// has waited half of it in the worker (for a slot, a pause or the budget) is handed to
    /// the retry queue instead of holding on.
    pub consumer_timeout_secs: u64,
}

/// TLS for `amqps://`: the system's roots are trusted unless a CA file is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA(s) that signed the broker's certificate.
    pub ca_file: String,
    /// PEM client certificate, for brokers that authenticate clients by certificate.
    pub client_cert: String,
    /// PEM (PKCS#8) private key of `client_cert`.
    pub client_key: String,
}

impl AmqpConfig {
    /// The broker addresses in the order they are tried: `urls`, else `url`, else
    /// [`DEFAULT_AMQP_URL`]. Every connection llmq opens goes to one of these.
    pub fn addresses(&self) -> &[SecretUrl] {
        static DEFAULT: std::sync::LazyLock<SecretUrl> =
            std::sync::LazyLock::new(|| SecretUrl::new(DEFAULT_AMQP_URL));
        match (&self.urls, &self.url) {
            (Some(urls), _) => urls,
            (None, Some(url)) => std::slice::from_ref(url),
            (None, None) => std::slice::from_ref(&*DEFAULT),
        }
    }

    /// How long a delivery may wait in the worker before a call starts: half of
    /// [`Self::consumer_timeout_secs`], so that the call and its publish still fit.
    pub fn hand_off_after(&self) -> Duration {
        Duration::from_secs(self.consumer_timeout_secs) / 2
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: None,
            urls: None,
            heartbeat_secs: 10,
            tls: TlsConfig::default(),
            consumer_timeout_secs: 1800,
        }
    }
}

/// Names of everything the worker declares. Tests override them to run in parallel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
    /// `x-max-priority` of both work queues and their lanes when they are classic queues.
    /// Clients that declare the queue themselves must use the same value, so the default is
    /// the one common tutorials use. Quorum queues take no such argument (their priorities
    /// depend on the broker's version, see [`crate::broker::arguments`]).
    pub max_priority: u8,
    /// The type of the work queues, their lanes, the dead-letter queue, `results_queue` and
    /// `unroutable_queue` (see [`QueueType`]). The delayed-retry tiers are quorum queues
    /// either way.
    pub queue_type: QueueType,
    /// Lane queues per work queue for fair share between tenants: a tenant that holds more
    /// than its share of a saturated replica has its requests moved to
    /// `<work queue>.lane.<nn>`, the lane its name hashes to (see the README's Fair share
    /// section); 0 turns fair share's lanes off.
    pub lanes: u16,
    /// Direct exchange results are published to.
    pub results_exchange: String,
    /// Routing key of results on `results_exchange`.
    pub results_key: String,
    /// Durable queue that keeps results when nobody listens.
    pub results_queue: String,
    /// Which results also go to `results_exchange`, and whether `results_queue` is declared
    /// and bound to keep them (see [`KeepResults`]).
    pub keep_results: KeepResults,
    /// Direct exchange for dead letters (requests that cannot succeed).
    pub dead_letter_exchange: String,
    /// Queue that keeps dead letters.
    pub dead_letter_queue: String,
    /// Routing key of dead letters; the broker-side DLX policy uses the same one.
    pub dead_letter_key: String,
    /// Headers exchange in front of the delayed-retry queues.
    pub retry_exchange: String,
    /// Prefix of the delayed-retry queues (`<prefix>.5s`, `<prefix>.30s`, ...). Messages wait
    /// there for their per-message TTL, then dead-letter back to `request_exchange`
    /// (at-least-once: they are quorum queues). The default is not the old classic tiers'
    /// `llm_requests.retry`: a quorum queue cannot take a classic queue's name.
    pub retry_queue_prefix: String,
    /// Seconds a result copy waits in `results_queue` before the broker drops it (its
    /// per-message `expiration`, so the queue's declaration never changes); 0 keeps results
    /// until they are consumed. The copy sent to `reply_to` has none.
    pub results_ttl_secs: u64,
    /// Fanout exchange that the `alternate-exchange` policy (`rabbitmq/definitions.json`)
    /// names: whatever the request, dead-letter and retry exchanges cannot route ends there
    /// instead of being dropped.
    pub unroutable_exchange: String,
    /// Durable queue bound to `unroutable_exchange`, where unroutable messages wait for an
    /// operator.
    pub unroutable_queue: String,
    /// Fanout exchange for control messages (`{"cancel": "<request_id>"}`): every worker
    /// binds its own exclusive queue to it.
    pub control_exchange: String,
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
            queue_type: QueueType::default(),
            lanes: 16,
            results_exchange: "llm_results".into(),
            results_key: "result".into(),
            results_queue: "llm_results".into(),
            keep_results: KeepResults::default(),
            dead_letter_exchange: "llm_requests.dlx".into(),
            dead_letter_queue: "llm_processing.dlq".into(),
            dead_letter_key: "dead".into(),
            retry_exchange: "llm_requests.retry.q".into(),
            retry_queue_prefix: "llm_requests.retry.q".into(),
            unroutable_exchange: "llm_unroutable".into(),
            unroutable_queue: "llm_unroutable".into(),
            control_exchange: "llm_control".into(),
            results_ttl_secs: 86_400,
        }
    }
}

/// The type of the queues llmq declares. A queue's type cannot change in place: moving an
/// existing topology to the other type is `llmq topology convert`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Classic queues: one node holds each; what earlier versions declared, and the only
    /// type a client's tutorial-style declaration (`x-max-priority` 10) matches.
    #[default]
    Classic,
    /// Quorum queues: replicated over a cluster's nodes (Raft), so a queue survives the
    /// loss of a minority of them.
    Quorum,
}

impl QueueType {
    /// The other type: what `llmq topology convert` moves from.
    pub fn other(self) -> Self {
        match self {
            QueueType::Classic => QueueType::Quorum,
            QueueType::Quorum => QueueType::Classic,
        }
    }

    /// Its name in the configuration and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which results are copied to the results exchange, where `results_queue` keeps them for a
/// caller that reads later (the seed's fire-and-forget producer, an operator). A copy of
/// every result costs a persistent queue write per job and a day of disk, so by default a
/// caller that has its result on its `reply_to` does not get a second one.
///
/// Read from `"always"`, `"without_reply_to"` or `"never"`, and from the booleans of earlier
/// versions: `true` is `always` (what it did), `false` is `never`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepResults {
    /// Every result, besides its copy to `reply_to`: what earlier versions always did.
    Always,
    /// Only the results that did not reach a `reply_to`: the request has none (or one the
    /// policy refuses), or its reply queue refused the result or is gone.
    #[default]
    WithoutReplyTo,
    /// `results_queue` is not declared. A result with a working `reply_to` goes only there;
    /// the others still go to `results_exchange`, not mandatory, for whatever the users bind
    /// to it themselves.
    Never,
}

impl KeepResults {
    /// Whether `results_queue` is declared and bound, so that a result the results exchange
    /// cannot route is a failure (the queue must exist), not a drop.
    pub fn declares_queue(self) -> bool {
        self != KeepResults::Never
    }

    /// The values a configuration may give, for error messages.
    const EXPECTED: &str = "\"always\", \"without_reply_to\" or \"never\" (true and false, from earlier versions, \
         are always and never)";
}

impl<'de> Deserialize<'de> for KeepResults {
    /// A string, or a boolean of earlier versions (in TOML or an environment variable, which
    /// figment reads as a boolean when it is `true` or `false`).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = KeepResults;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(KeepResults::EXPECTED)
            }

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<KeepResults, E> {
                Ok(if v {
                    KeepResults::Always
                } else {
                    KeepResults::Never
                })
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeepResults, E> {
                match v {
                    "always" | "true" => Ok(KeepResults::Always),
                    "without_reply_to" => Ok(KeepResults::WithoutReplyTo),
                    "never" | "false" => Ok(KeepResults::Never),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
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
            unroutable_exchange: format!("{p}.unroutable"),
            unroutable_queue: format!("{p}.unroutable"),
            control_exchange: format!("{p}.control"),
            ..self.clone()
        }
    }

    /// The work queue of requests of `kind`.
    pub fn work_queue(&self, kind: Kind) -> &str {
        match kind {
            Kind::Chat => &self.processing_queue,
            Kind::Embedding => &self.embeddings_queue,
        }
    }

    /// The routing key that brings requests of `kind` to their work queue.
    pub fn work_key(&self, kind: Kind) -> &str {
        match kind {
            Kind::Chat => &self.processing_key,
            Kind::Embedding => &self.embeddings_key,
        }
    }
}

/// How requests move between deployments and models.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// Model -> models to try, in order, when none of its deployments can serve.
    pub fallbacks: BTreeMap<String, Vec<String>>,
    /// Model -> models to go to at once on a context-length error.
    pub context_window_fallbacks: BTreeMap<String, Vec<String>>,
    /// How long a deployment whose account is spent (`insufficient_quota`) is out of
    /// rotation.
    pub quota_cooldown_secs: u64,
    /// Consecutive failures (connection errors, timeouts, 5xx) that open a deployment's
    /// circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps its deployment out before one probe call (half-open).
    pub breaker_cooldown_secs: u64,
    /// How long every deployment of a model may be failing or cooling down before its
    /// requests go to the fallbacks; 0 = at once.
    pub fallback_after_secs: u64,
    /// How long a deployment that answered 401, 403 or 404 `model_not_found` is out for that
    /// model, once `auth_failures` in a row confirmed it.
    pub auth_cooldown_secs: u64,
    /// Refusals (401, 403, 404) in a row from a deployment for one model, with no other
    /// answer between, that take it out for that model: one alone may be a glitch, and
    /// taking the model out dead-letters its backlog without a call. Until then a refused
    /// attempt moves to another deployment, or is retried as a transient failure.
    pub auth_failures: u32,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            fallbacks: BTreeMap::new(),
            context_window_fallbacks: BTreeMap::new(),
            quota_cooldown_secs: 300,
            breaker_failures: 5,
            breaker_cooldown_secs: 30,
            fallback_after_secs: 0,
            auth_cooldown_secs: 300,
            auth_failures: 3,
        }
    }
}

/// Consumers and per-message limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
    /// On SIGTERM, how long in-flight work may take to finish before it is handed back. At
    /// least `llm.timeout_secs`; the default also leaves a result time to be confirmed.
    pub shutdown_grace_secs: u64,
    /// A result larger than this, serialized, is not published: the request gets a small
    /// `result_too_large` error result and a dead letter. The default is RabbitMQ 4.x's
    /// default `max_message_size`.
    pub max_result_bytes: usize,
    /// A regex every `reply_to` must match whole (besides never naming one of llmq's own
    /// queues); `{identity}` in it stands for the request's identity, regex-escaped. Empty:
    /// [`crate::contract::reply_to::TENANT_PATTERN`] (a tenant's own `<identity>.*` queues
    /// and server-named `amq.gen-*` ones) where identities are required
    /// ([`super::Config::requires_user_id`]), no restriction otherwise.
    /// `amq.rabbitmq.reply-to` is always allowed.
    pub reply_to_pattern: String,
    /// Requests older than this (from the body's `timestamp`, else the AMQP `timestamp`
    /// property) are expired: not called, dead-lettered `expired`; 0 = no age limit.
    pub max_age_secs: u64,
    /// How long a cancel is remembered for requests not reached yet: in Redis when
    /// `idempotency.store = "redis"` (fleet-wide), else in each replica. At most
    /// `max_age_secs` when that is set: an older request is expired, not called, anyway.
    pub cancel_ttl_secs: u64,
    /// Cancels each identity may have remembered per minute (a minute's worth at once, then
    /// evenly); more are dropped and counted. 0: no limit.
    pub cancels_per_minute: u64,
    /// Cancels each identity may have remembered at once; more are dropped and counted. 0:
    /// no cap.
    pub max_cancels_per_identity: u64,
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
            shutdown_grace_secs: 75,
            max_result_bytes: 16 * 1024 * 1024,
            reply_to_pattern: String::new(),
            max_age_secs: 0,
            cancel_ttl_secs: 3600,
            cancels_per_minute: 600,
            max_cancels_per_identity: 10_000,
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
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
    /// A delivery that arrives redelivered (its previous delivery was never settled: the
    /// worker crashed, lost its connection, or was past its shutdown deadline) more than
    /// this many times is dead-lettered as `redelivery_limit`, without an upstream call.
    /// Counted apart from attempts, in the `x-llmq-redeliveries` header.
    pub max_redeliveries: u32,
    /// Longest a request may wait out rate limits (429s, deployments cooling down after
    /// them) in all, counted from the first one and across deliveries; such waits use up no
    /// attempts. Past it the request is dead-lettered as `rate_limited`.
    pub max_rate_limited_secs: u64,
    /// Longest a request may wait out an outage (every deployment of its model down: circuit
    /// breakers open after connection errors, timeouts or 5xx) in all, counted from the
    /// first time it found none and across deliveries; such waits use up no attempts. Past
    /// it the request is dead-lettered as `upstream_unavailable`.
    pub max_unavailable_secs: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay_ms: 500,
            max_delay_secs: 30,
            inline_max_ms: 2000,
            max_redeliveries: 5,
            max_rate_limited_secs: 600,
            max_unavailable_secs: 300,
        }
    }
}

/// Deduplication by `request_id`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// `memory` (per replica), `redis` (fleet-wide) or `off`.
    pub store: StoreKind,
    /// How long finished results are remembered.
    pub ttl_secs: u64,
    /// Redis URL for `store = "redis"`; its password is redacted when printed.
    pub redis_url: SecretUrl,
    /// Bytes of results kept at most by the memory store (each weighs its body plus its
    /// key); the least used go first. Leases of requests in flight are kept apart and never
    /// evicted for room.
    pub memory_max_bytes: u64,
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
            redis_url: SecretUrl::new("redis://127.0.0.1:6379"),
            memory_max_bytes: 32 * 1024 * 1024,
            key_prefix: "llmq".into(),
            on_store_error: OnStoreError::Requeue,
        }
    }
}

/// Fleet-wide rate limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
            redis_url: SecretUrl::new(""),
            key_prefix: "llmq:limits".into(),
        }
    }
}

/// The admin HTTP server: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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

/// Streaming to `reply_to`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// After a stream's first delta (sent at once), deltas are coalesced into at most one
    /// message per this many milliseconds; 0 sends each chunk as it comes.
    pub flush_ms: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self { flush_ms: 50 }
    }
}

impl StreamConfig {
    /// [`Self::flush_ms`] as a duration.
    pub fn flush(&self) -> Duration {
        Duration::from_millis(self.flush_ms)
    }
}

/// Embedding micro-batching.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most inputs in one `/embeddings` call; 1 turns batching off.
    pub max_items: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub max_wait_ms: u64,
    /// Bytes of embedding requests a replica buffers at most: the embeddings consumers'
    /// prefetch is at most this divided by `worker.max_body_bytes` (RabbitMQ ignores a
    /// prefetch in bytes), shared between the consumers.
    pub max_buffered_bytes: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_items: 64,
            max_wait_ms: 10,
            max_buffered_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Which idempotency store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Put the request back (through the retry queue) until the store answers.
    Requeue,
    /// Process it anyway, without deduplication.
    Proceed,
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}
