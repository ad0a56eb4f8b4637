//! Configuration: defaults, then a TOML file, then `LLMQ_*` environment variables.
//!
//! Every key has a default, so an empty file (or none) is a valid configuration. Nested keys
//! map to environment variables with `__`: `worker.prefetch` is `LLMQ_WORKER__PREFETCH`.
//! [`Config::load`] reports every problem at once (unknown keys, wrong types, values out of
//! range), each naming its key; the binary exits 64 (EX_USAGE) on any of them.
//!
//! One file per concern: `sections` (the section structs and their defaults), `llm`
//! (`[llm]`'s request policy and default deployment, and `[upstreams]`), `secret`
//! (values that never print), `load` (the layering and how errors are described),
//! `validate` (the rules), `child` (handing the whole configuration to a child `llmq`
//! process) and `fields` (a section's keys as serde knows them, for code that goes over
//! every section or key without listing them); every public name is re-exported here.

mod child;
mod fields;
mod llm;
mod load;
mod memory;
mod rules;
mod secret;
mod sections;
mod tenancy;
mod validate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use child::{ChildConfigError, ChildConfigFile, child_command, clean_command};
pub use llm::{LlmConfig, PROVIDERS, RequestPolicy, UpstreamConfig};
pub use secret::{Secret, SecretUrl, redact_url};
pub use sections::{
    AdminConfig, AmqpConfig, BatchConfig, DEFAULT_AMQP_URL, IdempotencyConfig, KeepResults,
    LimitsConfig, LogConfig, LogFormat, OnStoreError, QueueType, RetryConfig, RoutingConfig,
    StoreKind, StreamConfig, TlsConfig, TopologyConfig, WorkerConfig,
};
pub use tenancy::{
    DEFAULT_TENANT, OTHER_TENANTS, PriceConfig, Switch, TenancyConfig, TenantConfig, TenantLimits,
    Tenants, Usd,
};
pub use validate::MAX_LANES;

/// The environment variable prefix; `__` separates nesting levels.
pub const ENV_PREFIX: &str = "LLMQ_";

/// The whole configuration of a worker (and of the built-in tools that talk to the broker).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Broker connection.
    pub amqp: AmqpConfig,
    /// Exchange, queue and routing-key names.
    pub topology: TopologyConfig,
    /// Request policy and defaults; without `[upstreams]`, also the one deployment.
    pub llm: LlmConfig,
    /// The deployments by name; empty: `[llm]` is one deployment named `default`.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Fallbacks, cooldowns and circuit breakers between deployments.
    pub routing: RoutingConfig,
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
    /// Streaming deltas to `reply_to`.
    pub stream: StreamConfig,
    /// Who a request belongs to.
    pub tenancy: TenancyConfig,
    /// What each tenant may use; `default` for every tenant without a section.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Model (routing name) -> USD per million tokens.
    pub prices: BTreeMap<String, PriceConfig>,
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

/// The name of the deployment `[llm]` makes when there is no `[upstreams]`.
pub const DEFAULT_UPSTREAM: &str = "default";

impl Config {
    /// Whether the configuration says several tenants send: a `[tenants.<name>]` section
    /// other than `default`, or `tenancy.header` (a gateway publishing for its tenants).
    pub fn names_tenants(&self) -> bool {
        !self.tenancy.header.is_empty() || self.tenants.keys().any(|name| name != DEFAULT_TENANT)
    }

    /// `tenancy.require_user_id` as it applies: as set, else on whenever a `[tenants.<name>]`
    /// section ([`DEFAULT_TENANT`]'s too) is configured, since its limits and budgets hold
    /// only for requests that carry their identity.
    pub fn requires_user_id(&self) -> bool {
        self.tenancy.require_user_id.or(!self.tenants.is_empty())
    }

    /// The deployments requests are routed to: `[upstreams]`, or `[llm]`'s connection keys
    /// as one deployment named [`DEFAULT_UPSTREAM`] that serves any model.
    pub fn deployments(&self) -> Vec<(String, UpstreamConfig)> {
        if !self.upstreams.is_empty() {
            return self
                .upstreams
                .iter()
                .map(|(name, u)| (name.clone(), u.clone()))
                .collect();
        }
        let default = self.llm.default_deployment(self.worker.max_inflight);
        vec![(DEFAULT_UPSTREAM.to_string(), default)]
    }

    /// The longest call any deployment may take, which the shutdown grace and the consumer
    /// timeout must cover.
    pub fn longest_call_secs(&self) -> u64 {
        self.deployments()
            .iter()
            .map(|(_, u)| u.timeout_secs)
            .max()
            .unwrap_or(self.llm.timeout_secs)
    }

    /// The longest attempt, streamed or not, which the consumer timeout and the idempotency
    /// lease must cover. (The shutdown grace covers only [`Self::longest_call_secs`]: a
    /// stream still running at the shutdown deadline goes back to its queue and restarts,
    /// with its restart marker.)
    pub fn longest_attempt_secs(&self) -> u64 {
        // 0: each deployment's own timeout, which the longest call covers.
        self.longest_call_secs().max(self.llm.stream_max_secs)
    }

    /// `[llm]` connection keys that `[upstreams]` makes meaningless: each deployment has its
    /// own. Set ones are named in a warning at start-up.
    pub fn ignored_llm_keys(&self) -> Vec<String> {
        if self.upstreams.is_empty() {
            return Vec::new();
        }
        let (set, default) = (values(&self.llm), values(&LlmConfig::default()));
        llm_connection_keys()
            .filter(|key| set.get(*key) != default.get(*key))
            .map(|key| format!("llm.{key}"))
            .collect()
    }

    /// What start-up should warn about: `[llm]` connection keys that `[upstreams]` makes
    /// meaningless, and default models no deployment serves (a request naming no model
    /// would be `invalid_request`).
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .ignored_llm_keys()
            .into_iter()
            .map(|key| {
                format!("{key} is set, but [upstreams] is configured: each deployment has its own; ignored")
            })
            .collect();
        let deployments = self.deployments();
        for (key, model) in [
            ("llm.model", &self.llm.model),
            ("llm.embedding_model", &self.llm.embedding_model),
        ] {
            if !deployments.iter().any(|(_, u)| u.serves(model)) {
                out.push(format!(
                    "{key} = {model:?} is served by no deployment: requests that name no model \
                     will be dead-lettered as invalid_request"
                ));
            }
        }
        out
    }

    /// The whole configuration as TOML, every key included: the file a child `llmq` process
    /// is started with, so that it runs with exactly this configuration. Derived from
    /// `Serialize`, so a new key cannot be left out. Secrets are written in clear (see
    /// [`Secret`]): never log the result; [`child_command`] puts it in a private file.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// The configuration as TOML with every secret hidden (API keys as `***`, URLs with
    /// their password as `***`): what `llmq config check` prints.
    pub fn to_redacted_toml(&self) -> Result<String, toml::ser::Error> {
        secret::redacted(|| toml::to_string(self))
    }
}

/// `[llm]`'s connection keys, which make the default deployment: those a deployment of
/// `[upstreams]` has too, as their `Deserialize` names them, so that a key added to both is
/// warned about without being listed. ([`Config::deployments`] copies each; a test holds it
/// to this list.)
fn llm_connection_keys() -> impl Iterator<Item = &'static str> {
    let upstream = fields::of::<UpstreamConfig>();
    fields::of::<LlmConfig>()
        .iter()
        .copied()
        .filter(|key| upstream.contains(key))
}

/// A section's values by key, as it serializes; empty should it not (a map keyed by
/// something other than strings), which only costs a start-up warning.
fn values(section: &impl Serialize) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(section) {
        Ok(serde_json::Value::Object(values)) => values,
        _ => serde_json::Map::new(),
    }
}

/// `worker.prefetch` -> `LLMQ_WORKER__PREFETCH`.
pub fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', "__").to_ascii_uppercase()
    )
}

// figment's Jail API fixes the closure's error type.
#[allow(clippy::result_large_err)]
#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        path::Path,
    };

    use figment::Jail;

    use super::*;

    /// A valid configuration in which every key differs from its default. The struct
    /// literals name every field, so a new key does not compile until it is set here.
    fn every_key_changed(tls_dir: &Path) -> Config {
        let file = |name: &str| tls_dir.join(name).display().to_string();
        Config {
            amqp: AmqpConfig {
                // `url` and `urls` exclude each other: `urls` here (two brokers, each with its
                // own credentials), `url` in `one_broker_url_loads_back_equal`.
                url: None,
                urls: Some(vec![
                    SecretUrl::new("amqps://user:pw@broker.example:5671/vhost"),
                    SecretUrl::new("amqps://other:pw2@broker-2.example:5671/vhost"),
                ]),
                heartbeat_secs: 30,
                tls: TlsConfig {
                    ca_file: file("ca.pem"),
                    client_cert: file("cert.pem"),
                    client_key: file("key.pem"),
                },
                consumer_timeout_secs: 600,
            },
            topology: TopologyConfig {
                request_exchange: "x.requests".into(),
                processing_queue: "x.processing".into(),
                processing_key: "x-process".into(),
                embeddings_queue: "x.embeddings".into(),
                embeddings_key: "x-embed".into(),
                max_priority: 5,
                queue_type: QueueType::Quorum,
                lanes: 4,
                results_exchange: "x.results".into(),
                results_key: "x-result".into(),
                results_queue: "x.results-kept".into(),
                keep_results: KeepResults::Never,
                dead_letter_exchange: "x.dlx".into(),
                dead_letter_queue: "x.dlq".into(),
                dead_letter_key: "x-dead".into(),
                retry_exchange: "x.retry".into(),
                retry_queue_prefix: "x.retry-q".into(),
                results_ttl_secs: 60,
                unroutable_exchange: "x.unroutable".into(),
                unroutable_queue: "x.unroutable-kept".into(),
                control_exchange: "x.control".into(),
            },
            llm: LlmConfig {
                base_url: SecretUrl::new("https://api.example/v1"),
                api_key: Secret::new("sk-test"),
                model: "chat-model".into(),
                embedding_model: "embedding-model".into(),
                timeout_secs: 5,
                stream_idle_timeout_secs: 4,
                stream_max_secs: 6,
                max_requests_per_minute: 100,
                max_tokens_per_minute: 10_000,
                default_max_tokens: 99,
                http2_prior_knowledge: true,
                max_response_bytes: 1 << 20,
                max_tokens_cap: 1000,
                max_n: 2,
                allowed_models: vec!["chat-model".into(), "other-model".into()],
                allowed_params: vec!["temperature".into(), "seed".into()],
                extra_allowed_params: vec!["store".into()],
            },
            worker: WorkerConfig {
                consumers: 3,
                prefetch: 5,
                max_inflight: 50,
                min_inflight: 2,
                id: "worker-1".into(),
                max_body_bytes: 4096,
                shutdown_grace_secs: 7,
                max_result_bytes: 5000,
                reply_to_pattern: "replies\\..+".into(),
                max_age_secs: 3600,
                cancel_ttl_secs: 60,
                cancels_per_minute: 30,
                max_cancels_per_identity: 100,
            },
            retry: RetryConfig {
                max_attempts: 2,
                initial_delay_ms: 10,
                max_delay_secs: 3,
                inline_max_ms: 100,
                max_redeliveries: 2,
                max_rate_limited_secs: 60,
                max_unavailable_secs: 45,
            },
            upstreams: BTreeMap::from([(
                "azure".to_string(),
                UpstreamConfig {
                    base_url: SecretUrl::new("https://res.openai.azure.com/openai/deployments/d"),
                    api_key: Secret::new("sk-azure"),
                    provider: "openai".into(),
                    models: vec!["chat-model".into(), "gpt-4.1".into()],
                    weight: 3,
                    max_inflight: 32,
                    max_requests_per_minute: 600,
                    max_tokens_per_minute: 90_000,
                    timeout_secs: 6,
                    model_names: BTreeMap::from([("chat-model".into(), "my-deployment".into())]),
                    headers: BTreeMap::from([("api-key".into(), Secret::new("azure-key"))]),
                    query: BTreeMap::from([("api-version".into(), "2024-10-21".into())]),
                    http2_prior_knowledge: true,
                    max_tokens_field: "max_completion_tokens".into(),
                },
            )]),
            routing: RoutingConfig {
                fallbacks: BTreeMap::from([("chat-model".into(), vec!["gpt-4.1".into()])]),
                context_window_fallbacks: BTreeMap::from([(
                    "chat-model".into(),
                    vec!["gpt-4.1".into()],
                )]),
                quota_cooldown_secs: 60,
                breaker_failures: 2,
                breaker_cooldown_secs: 5,
                fallback_after_secs: 3,
                auth_cooldown_secs: 60,
                auth_failures: 2,
            },
            idempotency: IdempotencyConfig {
                store: StoreKind::Redis,
                ttl_secs: 300,
                redis_url: SecretUrl::new("redis://:pw@cache.example:6380/1"),
                memory_max_bytes: 5000,
                key_prefix: "dedupe".into(),
                on_store_error: OnStoreError::Proceed,
            },
            limits: LimitsConfig {
                redis_url: SecretUrl::new("rediss://cache.example:6380/2"),
                key_prefix: "budget".into(),
            },
            batch: BatchConfig {
                max_items: 8,
                max_wait_ms: 20,
                max_buffered_bytes: 1 << 20,
            },
            stream: StreamConfig { flush_ms: 25 },
            tenancy: TenancyConfig {
                header: "x-tenant".into(),
                max_tenants: 50,
                require_user_id: Switch::Off,
            },
            tenants: BTreeMap::from([
                (
                    DEFAULT_TENANT.into(),
                    TenantConfig {
                        max_inflight: Some(20),
                        max_usd_per_month: Some(Usd(100_000_000)),
                        ..Default::default()
                    },
                ),
                (
                    "Alice:Corp".into(),
                    TenantConfig {
                        weight: Some(3),
                        max_inflight: Some(0),
                        max_requests_per_minute: Some(600),
                        max_tokens_per_minute: Some(90_000),
                        max_usd_per_day: Some(Usd(50_000_000)),
                        max_usd_per_month: Some(Usd(1_000_000_000)),
                    },
                ),
            ]),
            prices: BTreeMap::from([(
                "gpt-4o-mini".into(),
                PriceConfig {
                    input_per_mtok: Usd(150_000),
                    output_per_mtok: Usd(600_000),
                    cached_input_per_mtok: Some(Usd(75_000)),
                    max_output_tokens: Some(16_384),
                },
            )]),
            admin: AdminConfig {
                addr: "127.0.0.1:9191".into(),
            },
            log: LogConfig {
                format: LogFormat::Json,
                level: "llmq=debug".into(),
            },
        }
    }

    /// Every leaf of a TOML document by its dotted key. A table empty in the defaults (a
    /// map keyed by the user: deployments, fallbacks, tenants, prices) is one leaf, whatever
    /// it holds: its entries' structs name every field instead.
    fn leaves(
        prefix: &str,
        value: &toml::Value,
        maps: &BTreeSet<String>,
        out: &mut BTreeMap<String, toml::Value>,
    ) {
        match value {
            toml::Value::Table(table) if !table.is_empty() && !maps.contains(prefix) => {
                for (key, v) in table {
                    let key = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    leaves(&key, v, maps, out);
                }
            }
            leaf => {
                out.insert(prefix.to_string(), leaf.clone());
            }
        }
    }

    /// The leaves of `config` serialized, maps keyed by the user whole.
    fn keys(config: &Config) -> BTreeMap<String, toml::Value> {
        let serialized = |config: &Config| {
            let text = config.to_toml().expect("serializes");
            text.parse::<toml::Value>().expect("TOML")
        };
        let mut defaults = BTreeMap::new();
        leaves(
            "",
            &serialized(&Config::default()),
            &BTreeSet::new(),
            &mut defaults,
        );
        let maps: BTreeSet<String> = defaults
            .into_iter()
            .filter(|(_, v)| v.as_table().is_some_and(toml::Table::is_empty))
            .map(|(key, _)| key)
            .collect();
        let mut out = BTreeMap::new();
        leaves("", &serialized(config), &maps, &mut out);
        out
    }

    #[test]
    fn the_test_configuration_changes_every_key() {
        let defaults = keys(&Config::default());
        let changed = keys(&every_key_changed(Path::new("/tls")));
        // Keys that are unset by default have no TOML form and are left out of the defaults:
        // `amqp.url` and `amqp.urls`, of which the changed configuration sets `amqp.urls`.
        let mut expected: BTreeSet<&str> = defaults.keys().map(String::as_str).collect();
        expected.insert("amqp.urls");
        assert_eq!(
            expected,
            changed.keys().map(String::as_str).collect::<BTreeSet<_>>(),
            "every key is serialized, empty or not"
        );
        for (key, default) in &defaults {
            assert_ne!(&changed[key], default, "{key} keeps its default");
        }
        for key in [
            "amqp.tls.ca_file",
            "idempotency.ttl_secs",
            "limits.redis_url",
            "log.level",
            "upstreams",
            "routing.fallbacks",
            "tenants",
        ] {
            assert!(defaults.contains_key(key), "{key}");
        }
    }

    #[test]
    fn user_ids_are_required_where_tenants_are_configured_unless_said_otherwise() {
        let mut c = Config::default();
        assert!(
            !c.requires_user_id(),
            "no tenants: anonymous requests are served"
        );
        c.tenants
            .insert(DEFAULT_TENANT.into(), TenantConfig::default());
        assert!(
            c.requires_user_id(),
            "[tenants.default] is a tenant section"
        );
        c.tenants.clear();
        c.tenants.insert("alice".into(), TenantConfig::default());
        assert!(c.requires_user_id());
        c.tenancy.require_user_id = Switch::Off;
        assert!(!c.requires_user_id(), "false always wins");
        c.tenants.clear();
        c.tenancy.require_user_id = Switch::On;
        assert!(c.requires_user_id(), "true always wins");
    }

    #[test]
    fn to_toml_loads_back_equal() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            for name in ["ca.pem", "cert.pem", "key.pem"] {
                jail.create_file(name, "-----BEGIN CERTIFICATE-----")?;
            }
            let config = every_key_changed(jail.directory());
            jail.create_file("child.toml", &config.to_toml().map_err(|e| e.to_string())?)?;
            let back = Config::load(Some(Path::new("child.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(back, config);
            // The defaults too: nothing is written that would not load.
            jail.create_file(
                "default.toml",
                &Config::default().to_toml().map_err(|e| e.to_string())?,
            )?;
            let back = Config::load(Some(Path::new("default.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(back, Config::default());
            Ok(())
        });
    }

    /// `amqp.url`, which the configuration with every key changed leaves unset, since it
    /// sets `amqp.urls`.
    #[test]
    fn one_broker_url_loads_back_equal() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let mut config = Config::default();
            config.amqp.url = Some(SecretUrl::new("amqps://user:pw@broker.example:5671/vhost"));
            let text = config.to_toml().map_err(|e| e.to_string())?;
            assert!(!text.contains("urls"), "an unset key is left out: {text}");
            jail.create_file("child.toml", &text)?;
            let back = Config::load(Some(Path::new("child.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(back, config);
            Ok(())
        });
    }

    #[test]
    fn secrets_are_serialized_but_never_printed() {
        let config = every_key_changed(Path::new("/tls"));
        let text = config.to_toml().expect("serializes");
        assert!(
            text.contains("sk-test") && text.contains("user:pw@broker"),
            "{text}"
        );
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("sk-test") && !printed.contains(":pw@"),
            "{printed}"
        );
    }

    #[test]
    fn the_default_deployment_takes_every_connection_key_of_llm() {
        let mut config = every_key_changed(Path::new("/tls"));
        let keys: Vec<&str> = llm_connection_keys().collect();
        assert_eq!(
            keys,
            [
                "base_url",
                "api_key",
                "timeout_secs",
                "max_requests_per_minute",
                "max_tokens_per_minute",
                "http2_prior_knowledge"
            ]
        );
        let ignored: Vec<String> = keys.iter().map(|key| format!("llm.{key}")).collect();
        assert_eq!(config.ignored_llm_keys(), ignored, "each set, each named");
        config.upstreams.clear();
        let deployments = config.deployments();
        let (llm, default) = (values(&config.llm), values(&deployments[0].1));
        for key in keys {
            assert_eq!(default.get(key), llm.get(key), "{key}");
        }
        assert_eq!(deployments[0].1.max_inflight, config.worker.max_inflight);
    }
}
