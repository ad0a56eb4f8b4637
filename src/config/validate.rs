//! Rules for values that parse but make no sense: one function per section, each adding to
//! one list of problems, so that every problem is reported at once.

use std::fmt::Display;

use crate::contract::{reply_to::check_pattern, rules::RESERVED_PARAMS};

use super::{
    AdminConfig, AmqpConfig, BatchConfig, Config, IdempotencyConfig, LimitsConfig, LlmConfig,
    LogConfig, RetryConfig, RoutingConfig, SecretUrl, StoreKind, TopologyConfig, WorkerConfig,
    env_name,
};

impl Config {
    /// Checks values that parse but make no sense; one line per problem, each naming its key.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Problems::default();
        validate_amqp(&self.amqp, &mut p);
        validate_llm(&self.llm, &mut p);
        validate_stream(self, &mut p);
        validate_worker(&self.worker, &mut p);
        validate_shutdown(self, &mut p);
        validate_upstreams(self, &mut p);
        validate_routing(&self.routing, &mut p);
        validate_tenants(self, &mut p);
        validate_cancels(self, &mut p);
        validate_batch(&self.batch, &self.worker, &mut p);
        validate_admin(&self.admin, &mut p);
        validate_limits(&self.limits, &mut p);
        validate_retry(&self.retry, &mut p);
        validate_idempotency(&self.idempotency, &mut p);
        validate_topology(&self.topology, &mut p);
        validate_lanes(&self.topology, &mut p);
        validate_log(&self.log, &mut p);
        validate_waits(self, &mut p);
        validate_request_limits(&self.llm, &mut p);
        validate_reply_to_pattern(&self.worker, &mut p);
        p.0
    }
}

/// The problems found so far, each as `key (ENV_NAME): message`.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    /// Records `message` against `key`.
    fn add(&mut self, key: &str, message: impl Display) {
        self.0.push(format!("{key} ({}): {message}", env_name(key)));
    }

    /// Records `message` against `key` unless `ok`.
    fn check(&mut self, ok: bool, key: &str, message: impl Display) {
        if !ok {
            self.add(key, message);
        }
    }

    /// Checks that `key` holds a URL with one of `schemes`; returns it if so. The URL is only
    /// ever quoted redacted.
    fn url(&mut self, key: &str, value: &SecretUrl, schemes: &[&str]) -> Option<url::Url> {
        match url::Url::parse(value.expose()) {
            Ok(u) if schemes.contains(&u.scheme()) => Some(u),
            Ok(u) => {
                let wanted = schemes.join(" or ");
                self.add(key, format!("scheme must be {wanted}, got {}", u.scheme()));
                None
            }
            Err(e) => {
                self.add(key, format!("not a URL ({e}): {value}"));
                None
            }
        }
    }
}

fn validate_amqp(amqp: &AmqpConfig, p: &mut Problems) {
    match (&amqp.url, &amqp.urls) {
        (Some(_), Some(_)) => p.add(
            "amqp.urls",
            "amqp.url and amqp.urls are both set: set amqp.url for one broker, or amqp.urls \
             for several, not both",
        ),
        (None, Some(urls)) if urls.is_empty() => p.add(
            "amqp.urls",
            "must list at least one broker URL (leave it out for amqp.url)",
        ),
        _ => {}
    }
    if let Some(url) = &amqp.url {
        amqp_url(p, "amqp.url", "", url);
    }
    let urls = amqp.urls.as_deref().unwrap_or_default();
    for (i, url) in urls.iter().enumerate() {
        let which = format!("address {} of {}: ", i + 1, urls.len());
        amqp_url(p, "amqp.urls", &which, url);
    }
    let tls = &amqp.tls;
    for (key, path) in [
        ("amqp.tls.ca_file", &tls.ca_file),
        ("amqp.tls.client_cert", &tls.client_cert),
        ("amqp.tls.client_key", &tls.client_key),
    ] {
        if !path.is_empty() {
            p.check(
                std::path::Path::new(path).is_file(),
                key,
                format!("no such file: {path}"),
            );
        }
    }
    p.check(
        tls.client_cert.is_empty() == tls.client_key.is_empty(),
        "amqp.tls.client_key",
        "amqp.tls.client_cert and amqp.tls.client_key go together",
    );
}

/// Checks one broker URL of `key`; `which` says which of a list it is (`address 2 of 3: `).
fn amqp_url(p: &mut Problems, key: &str, which: &str, url: &SecretUrl) {
    match url::Url::parse(url.expose()) {
        Ok(u) if !["amqp", "amqps"].contains(&u.scheme()) => p.add(
            key,
            format!("{which}scheme must be amqp or amqps, got {}", u.scheme()),
        ),
        Ok(u) => p.check(
            u.has_host() && !u.cannot_be_a_base(),
            key,
            format!("{which}needs a host: amqp://user:password@host:5672/vhost, got {url}"),
        ),
        Err(e) => p.add(key, format!("{which}not a URL ({e}): {url}")),
    }
}

fn validate_llm(llm: &LlmConfig, p: &mut Problems) {
    p.url("llm.base_url", &llm.base_url, &["http", "https"]);
    p.check(!llm.model.is_empty(), "llm.model", "must not be empty");
    p.check(
        !llm.embedding_model.is_empty(),
        "llm.embedding_model",
        "must not be empty",
    );
    p.check(
        (1..=3600).contains(&llm.timeout_secs),
        "llm.timeout_secs",
        "must be between 1 and 3600",
    );
    p.check(
        llm.max_response_bytes >= 1024,
        "llm.max_response_bytes",
        "must be at least 1024",
    );
}

/// Streamed calls: their timeouts, and how often deltas go out.
fn validate_stream(c: &Config, p: &mut Problems) {
    let llm = &c.llm;
    p.check(
        (1..=3600).contains(&llm.stream_idle_timeout_secs),
        "llm.stream_idle_timeout_secs",
        "must be between 1 and 3600",
    );
    p.check(
        llm.stream_max_secs <= 3600,
        "llm.stream_max_secs",
        "must be at most 3600 (0: each deployment's timeout_secs)",
    );
    p.check(
        c.stream.flush_ms <= 10_000,
        "stream.flush_ms",
        "must be at most 10000",
    );
}

/// Waits in the worker against the broker's `consumer_timeout`: a delivery waits for a slot
/// up to half of it, then a call and an inline retry wait may still follow, and all of it
/// must end before the broker closes the channel.
fn validate_waits(c: &Config, p: &mut Problems) {
    let consumer_timeout = c.amqp.consumer_timeout_secs;
    let half_ms = c.amqp.hand_off_after().as_millis();
    let longest = c.longest_attempt_secs();
    // A timeout out of its range is reported by its own rule.
    if !(1..=3600).contains(&longest) {
        return;
    }
    let key = if c.llm.stream_max_secs > c.longest_call_secs() {
        "llm.stream_max_secs".to_string()
    } else {
        timeout_key(c)
    };
    let call_ms = u128::from(longest) * 1000;
    if call_ms >= half_ms {
        p.add(
            &key,
            format!(
                "must be below half of amqp.consumer_timeout_secs ({consumer_timeout} s): a call \
                 may start just before a waiting delivery is handed to the retry queue"
            ),
        );
        return;
    }
    p.check(
        call_ms + u128::from(c.retry.inline_max_ms) < half_ms,
        "retry.inline_max_ms",
        format!(
            "plus {key} must stay below half of amqp.consumer_timeout_secs \
             ({consumer_timeout} s): an inline wait and a call may follow the longest wait"
        ),
    );
}

/// The key of the longest call timeout: `llm.timeout_secs`, or the deployment's.
fn timeout_key(c: &Config) -> String {
    let longest = c.longest_call_secs();
    match c.upstreams.iter().find(|(_, u)| u.timeout_secs == longest) {
        Some((name, _)) => format!("upstreams.{name}.timeout_secs"),
        None => "llm.timeout_secs".into(),
    }
}

fn validate_worker(worker: &WorkerConfig, p: &mut Problems) {
    p.check(
        (1..=1024).contains(&worker.consumers),
        "worker.consumers",
        "must be between 1 and 1024",
    );
    p.check(
        worker.max_inflight >= 1,
        "worker.max_inflight",
        "must be at least 1",
    );
    // With no valid ceiling the floor has nothing to be checked against.
    p.check(
        worker.max_inflight == 0 || (1..=worker.max_inflight).contains(&worker.min_inflight),
        "worker.min_inflight",
        "must be between 1 and worker.max_inflight",
    );
    p.check(
        worker.max_body_bytes >= 64,
        "worker.max_body_bytes",
        "must be at least 64",
    );
    p.check(
        worker.max_result_bytes >= 1024,
        "worker.max_result_bytes",
        "must be at least 1024",
    );
}

/// The shutdown grace covers one upstream call: a call started just before SIGTERM can
/// finish, and its result be published, instead of being cut off and made again elsewhere.
fn validate_shutdown(c: &Config, p: &mut Problems) {
    let longest = c.longest_call_secs();
    // With no valid timeout the grace has nothing to be checked against.
    if (1..=3600).contains(&longest) {
        p.check(
            c.worker.shutdown_grace_secs >= longest,
            "worker.shutdown_grace_secs",
            format!(
                "must be at least {} ({longest}), so that a call started just before \
                 SIGTERM can finish",
                timeout_key(c)
            ),
        );
    }
}

/// Each deployment of `[upstreams]`: a name usable as a metric label and a Redis key, a
/// URL, a timeout and a weight that make sense.
fn validate_upstreams(c: &Config, p: &mut Problems) {
    for (name, u) in &c.upstreams {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        let good_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_' || ch == '-');
        p.check(
            good_name,
            &format!("upstreams.{name}"),
            "a deployment's name is 1 to 64 lowercase letters, digits, '_' or '-' (environment \
             variables are read lowercased, so LLMQ_UPSTREAMS__OPENAI__... sets `openai`)",
        );
        p.url(&key("base_url"), &u.base_url, &["http", "https"]);
        p.check(
            super::PROVIDERS.contains(&u.provider.as_str()),
            &key("provider"),
            format!(
                "unknown provider {:?}; known: {}",
                u.provider,
                super::PROVIDERS.join(", ")
            ),
        );
        p.check(
            super::llm::MAX_TOKENS_FIELDS.contains(&u.max_tokens_field.as_str()),
            &key("max_tokens_field"),
            format!(
                "must be one of {}",
                super::llm::MAX_TOKENS_FIELDS.join(", ")
            ),
        );
        p.check(
            (1..=3600).contains(&u.timeout_secs),
            &key("timeout_secs"),
            "must be between 1 and 3600",
        );
        p.check(
            (1..=10_000).contains(&u.weight),
            &key("weight"),
            "must be between 1 and 10000",
        );
        p.check(
            u.max_inflight >= 1,
            &key("max_inflight"),
            "must be at least 1",
        );
        p.check(
            u.models.iter().all(|m| !m.is_empty()),
            &key("models"),
            "a model name must not be empty",
        );
        for header in u.headers.keys() {
            p.check(
                reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_ok(),
                &key("headers"),
                format!("{header:?} is not a header name"),
            );
        }
    }
    // Every model a fallback names must be served by some deployment.
    let deployments = c.deployments();
    let served = |m: &str| deployments.iter().any(|(_, u)| u.serves(m));
    for (section, map) in [
        ("routing.fallbacks", &c.routing.fallbacks),
        (
            "routing.context_window_fallbacks",
            &c.routing.context_window_fallbacks,
        ),
    ] {
        for (model, to) in map {
            for target in to {
                p.check(
                    served(target),
                    section,
                    format!("{model} falls back to {target}, which no deployment serves"),
                );
            }
        }
    }
}

fn validate_routing(r: &RoutingConfig, p: &mut Problems) {
    for (key, n) in [
        ("routing.auth_failures", r.auth_failures),
        ("routing.breaker_failures", r.breaker_failures),
    ] {
        p.check(n >= 1, key, "must be at least 1");
    }
    for (key, secs) in [
        ("routing.quota_cooldown_secs", r.quota_cooldown_secs),
        ("routing.breaker_cooldown_secs", r.breaker_cooldown_secs),
        ("routing.auth_cooldown_secs", r.auth_cooldown_secs),
    ] {
        p.check(
            (1..=86_400).contains(&secs),
            key,
            "must be between 1 and 86400",
        );
    }
    p.check(
        r.fallback_after_secs <= 3600,
        "routing.fallback_after_secs",
        "must be at most 3600",
    );
}

/// `[tenancy]` and `[tenants]`: `other` is the label of every tenant without a section, so
/// no section may take it; weights are positive.
fn validate_tenants(c: &Config, p: &mut Problems) {
    p.check(
        c.tenancy.header.len() <= 128,
        "tenancy.header",
        "must be at most 128 bytes (an AMQP header name)",
    );
    p.check(
        c.tenancy.max_tenants >= 1,
        "tenancy.max_tenants",
        "must be at least 1",
    );
    p.check(
        !c.tenants.contains_key(super::OTHER_TENANTS),
        "tenants.other",
        "`other` is the metric label of every tenant without a section; it cannot name one",
    );
    for (name, tenant) in &c.tenants {
        p.check(
            tenant.weight.is_none_or(|w| (1..=1000).contains(&w)),
            &format!("tenants.{name}.weight"),
            "must be between 1 and 1000",
        );
    }
}

fn validate_batch(batch: &BatchConfig, worker: &WorkerConfig, p: &mut Problems) {
    p.check(
        batch.max_buffered_bytes >= worker.max_body_bytes as u64,
        "batch.max_buffered_bytes",
        "must be at least worker.max_body_bytes, so one embedding request fits",
    );
    p.check(
        (1..=2048).contains(&batch.max_items),
        "batch.max_items",
        "must be between 1 and 2048",
    );
    p.check(
        batch.max_wait_ms <= 10_000,
        "batch.max_wait_ms",
        "must be at most 10000",
    );
}

fn validate_admin(admin: &AdminConfig, p: &mut Problems) {
    p.check(
        admin.addr.is_empty() || admin.socket_addr().is_some(),
        "admin.addr",
        "must be host:port, like 0.0.0.0:9090 (or empty to turn it off)",
    );
}

fn validate_limits(limits: &LimitsConfig, p: &mut Problems) {
    // Empty means per-replica budgets.
    if !limits.redis_url.expose().is_empty() {
        p.url("limits.redis_url", &limits.redis_url, &["redis", "rediss"]);
    }
}

fn validate_cancels(c: &Config, p: &mut Problems) {
    let x = &c.topology.control_exchange;
    p.check(
        !x.is_empty() && x.len() <= 200 && !x.starts_with("amq."),
        "topology.control_exchange",
        "must be 1 to 200 bytes and not start with amq. (each worker's queue is <name>.<uuid>)",
    );
    p.check(
        (1..=30 * 86_400).contains(&c.worker.cancel_ttl_secs),
        "worker.cancel_ttl_secs",
        "must be between 1 and 2592000 (30 days)",
    );
}

fn validate_retry(retry: &RetryConfig, p: &mut Problems) {
    for (key, n) in [
        ("retry.max_attempts", u64::from(retry.max_attempts)),
        ("retry.initial_delay_ms", retry.initial_delay_ms),
        ("retry.max_delay_secs", retry.max_delay_secs),
    ] {
        p.check(n >= 1, key, "must be at least 1");
    }
    for (key, secs) in [
        ("retry.max_rate_limited_secs", retry.max_rate_limited_secs),
        ("retry.max_unavailable_secs", retry.max_unavailable_secs),
    ] {
        p.check(
            (1..=86_400).contains(&secs),
            key,
            "must be between 1 and 86400",
        );
    }
    p.check(
        retry.max_redeliveries >= 1,
        "retry.max_redeliveries",
        "must be at least 1 (0 would dead-letter every request a crash or a shutdown handed back)",
    );
}

fn validate_idempotency(idempotency: &IdempotencyConfig, p: &mut Problems) {
    p.check(
        idempotency.ttl_secs >= 1,
        "idempotency.ttl_secs",
        "must be at least 1",
    );
    p.check(
        idempotency.memory_max_bytes >= 1024,
        "idempotency.memory_max_bytes",
        "must be at least 1024",
    );
    // The URL only matters to the Redis store.
    if idempotency.store == StoreKind::Redis {
        p.url(
            "idempotency.redis_url",
            &idempotency.redis_url,
            &["redis", "rediss"],
        );
    }
}

/// The longest results expiration: well within what a per-message TTL takes.
const MAX_RESULTS_TTL_SECS: u64 = 30 * 86_400;

fn validate_topology(t: &TopologyConfig, p: &mut Problems) {
    p.check(
        t.max_priority >= 1,
        "topology.max_priority",
        "must be between 1 and 255",
    );
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
        ("topology.unroutable_exchange", &t.unroutable_exchange),
        ("topology.unroutable_queue", &t.unroutable_queue),
    ] {
        p.check(
            !value.is_empty() && value.len() <= 255,
            key,
            "must be 1 to 255 bytes",
        );
        p.check(
            !value.starts_with("amq."),
            key,
            "names starting with amq. are reserved by the broker",
        );
    }
    p.check(
        t.processing_queue != t.embeddings_queue,
        "topology.embeddings_queue",
        "must differ from topology.processing_queue",
    );
    p.check(
        t.results_ttl_secs <= MAX_RESULTS_TTL_SECS,
        "topology.results_ttl_secs",
        format!("must be at most {MAX_RESULTS_TTL_SECS} (30 days)"),
    );
    p.check(
        t.processing_key != t.embeddings_key,
        "topology.embeddings_key",
        "must differ from topology.processing_key",
    );
}

/// The most lanes per work queue: a lane's name ends in two hex digits.
pub const MAX_LANES: u16 = 256;

/// The fair-share lanes, `<work queue>.lane.<nn>`: few enough to be named with two hex
/// digits, and every lane's name within the broker's 255 bytes. A work queue name too long
/// for any name is reported by [`validate_topology`].
fn validate_lanes(t: &TopologyConfig, p: &mut Problems) {
    p.check(
        t.lanes <= MAX_LANES,
        "topology.lanes",
        format!("must be at most {MAX_LANES} (0 turns the lanes off)"),
    );
    if t.lanes == 0 {
        return;
    }
    let longest = 255 - ".lane.00".len();
    for (key, queue) in [
        ("topology.processing_queue", &t.processing_queue),
        ("topology.embeddings_queue", &t.embeddings_queue),
    ] {
        p.check(
            queue.len() <= longest || queue.len() > 255,
            key,
            format!(
                "must be at most {longest} bytes while topology.lanes is not 0: its lanes are \
                 named <queue>.lane.<nn>"
            ),
        );
    }
}

/// The caps and allowlists requests are checked against.
fn validate_request_limits(llm: &LlmConfig, p: &mut Problems) {
    p.check(
        llm.max_tokens_cap >= 1,
        "llm.max_tokens_cap",
        "must be at least 1",
    );
    p.check(llm.max_n >= 1, "llm.max_n", "must be at least 1");
    p.check(
        llm.allowed_models.iter().all(|m| !m.is_empty()),
        "llm.allowed_models",
        "must not contain an empty name (an empty list allows any model)",
    );
    for (key, names) in [
        ("llm.allowed_params", &llm.allowed_params),
        ("llm.extra_allowed_params", &llm.extra_allowed_params),
    ] {
        p.check(
            names.iter().all(|k| !k.is_empty()),
            key,
            "must not contain an empty name",
        );
        let reserved: Vec<&str> = RESERVED_PARAMS
            .into_iter()
            .filter(|r| names.iter().any(|k| k == r))
            .collect();
        p.check(
            reserved.is_empty(),
            key,
            format!("{} set by llmq, never by a request", reserved.join(", ")),
        );
    }
}

fn validate_reply_to_pattern(worker: &WorkerConfig, p: &mut Problems) {
    if let Err(e) = check_pattern(&worker.reply_to_pattern) {
        p.add("worker.reply_to_pattern", format!("not a valid regex: {e}"));
    }
}

fn validate_log(log: &LogConfig, p: &mut Problems) {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
        p.add("log.level", format!("not a valid filter: {e}"));
    }
}

#[cfg(test)]
mod tests {
    //! One test per rule: a configuration that breaks only that rule yields exactly one
    //! problem, worded as users see it.

    use super::*;
    use crate::config::{Secret, StoreKind};

    /// The one problem of the default configuration changed by `change`.
    fn only_problem(change: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::default();
        change(&mut c);
        let mut p = c.validate();
        assert_eq!(p.len(), 1, "expected exactly one problem: {p:?}");
        p.remove(0)
    }

    /// A file that exists, for the TLS keys.
    fn existing_file() -> tempfile::NamedTempFile {
        tempfile::NamedTempFile::new().expect("temp file")
    }

    #[test]
    fn the_defaults_break_no_rule() {
        assert_eq!(Config::default().validate(), Vec::<String>::new());
    }

    #[test]
    fn amqp_url_scheme() {
        assert_eq!(
            only_problem(|c| c.amqp.url = Some(SecretUrl::new("http://u:pw@host/"))),
            "amqp.url (LLMQ_AMQP__URL): scheme must be amqp or amqps, got http"
        );
    }

    #[test]
    fn amqp_url_needs_a_host() {
        assert_eq!(
            only_problem(|c| c.amqp.url = Some(SecretUrl::new("amqp:u:pw@host"))),
            "amqp.url (LLMQ_AMQP__URL): needs a host: amqp://user:password@host:5672/vhost, \
             got amqp://***"
        );
    }

    #[test]
    fn amqp_url_must_parse() {
        assert_eq!(
            only_problem(|c| c.amqp.url = Some(SecretUrl::new("amqp://u:pw@[::1"))),
            "amqp.url (LLMQ_AMQP__URL): not a URL (invalid IPv6 address): amqp://***"
        );
    }

    /// `amqp.urls` = these URLs.
    fn urls(list: &[&str]) -> Option<Vec<SecretUrl>> {
        Some(list.iter().map(|u| SecretUrl::new(*u)).collect())
    }

    #[test]
    fn amqp_url_and_urls_are_not_both_set() {
        assert_eq!(
            only_problem(|c| {
                c.amqp.url = Some(SecretUrl::new("amqp://u:pw@a/%2f"));
                c.amqp.urls = urls(&["amqp://u:pw@b/%2f"]);
            }),
            "amqp.urls (LLMQ_AMQP__URLS): amqp.url and amqp.urls are both set: set amqp.url \
             for one broker, or amqp.urls for several, not both"
        );
    }

    #[test]
    fn amqp_urls_is_not_empty() {
        assert_eq!(
            only_problem(|c| c.amqp.urls = urls(&[])),
            "amqp.urls (LLMQ_AMQP__URLS): must list at least one broker URL (leave it out for \
             amqp.url)"
        );
    }

    #[test]
    fn amqp_urls_are_each_checked_and_named_by_position() {
        assert_eq!(
            only_problem(|c| c.amqp.urls = urls(&["amqp://u:pw@a/%2f", "http://u:pw@b/"])),
            "amqp.urls (LLMQ_AMQP__URLS): address 2 of 2: scheme must be amqp or amqps, got http"
        );
        assert_eq!(
            only_problem(|c| c.amqp.urls = urls(&["amqp:u:pw@a", "amqps://u:pw@b/%2f"])),
            "amqp.urls (LLMQ_AMQP__URLS): address 1 of 2: needs a host: \
             amqp://user:password@host:5672/vhost, got amqp://***"
        );
        assert_eq!(
            only_problem(|c| c.amqp.urls = urls(&["amqp://u:pw@[::1"])),
            "amqp.urls (LLMQ_AMQP__URLS): address 1 of 1: not a URL (invalid IPv6 address): \
             amqp://***"
        );
    }

    #[test]
    fn the_addresses_are_urls_else_url_else_the_default() {
        let mut c = Config::default();
        let expose = |c: &Config| -> Vec<String> {
            c.amqp
                .addresses()
                .iter()
                .map(|u| u.expose().to_string())
                .collect()
        };
        assert_eq!(expose(&c), [crate::config::DEFAULT_AMQP_URL]);
        c.amqp.url = Some(SecretUrl::new("amqp://u:pw@a/%2f"));
        assert_eq!(expose(&c), ["amqp://u:pw@a/%2f"]);
        c.amqp.url = None;
        c.amqp.urls = urls(&["amqp://u:pw@b/%2f", "amqps://v:pw@c/other"]);
        assert_eq!(expose(&c), ["amqp://u:pw@b/%2f", "amqps://v:pw@c/other"]);
    }

    #[test]
    fn tls_files_must_exist() {
        let file = existing_file();
        let exists = file.path().display().to_string();
        let missing = String::from("/nonexistent/x.pem");
        // A client certificate needs its key and the other way round: the partner exists.
        for (key, ca_file, client_cert, client_key) in [
            ("ca_file", &missing, "", ""),
            ("client_cert", &exists, &missing, &exists),
            ("client_key", &exists, &exists, &missing),
        ] {
            let problem = only_problem(|c| {
                c.amqp.tls.ca_file = ca_file.clone();
                c.amqp.tls.client_cert = client_cert.into();
                c.amqp.tls.client_key = client_key.into();
            });
            let env = format!("LLMQ_AMQP__TLS__{}", key.to_ascii_uppercase());
            assert_eq!(
                problem,
                format!("amqp.tls.{key} ({env}): no such file: {missing}")
            );
        }
    }

    #[test]
    fn tls_client_cert_and_key_go_together() {
        let cert = existing_file();
        assert_eq!(
            only_problem(|c| c.amqp.tls.client_cert = cert.path().display().to_string()),
            "amqp.tls.client_key (LLMQ_AMQP__TLS__CLIENT_KEY): amqp.tls.client_cert and \
             amqp.tls.client_key go together"
        );
    }

    #[test]
    fn llm_base_url_scheme() {
        assert_eq!(
            only_problem(|c| c.llm.base_url = SecretUrl::new("ftp://nowhere")),
            "llm.base_url (LLMQ_LLM__BASE_URL): scheme must be http or https, got ftp"
        );
    }

    #[test]
    fn llm_base_url_must_parse() {
        assert_eq!(
            only_problem(|c| c.llm.base_url = SecretUrl::new("not a url")),
            "llm.base_url (LLMQ_LLM__BASE_URL): not a URL (relative URL without a base): ***"
        );
    }

    #[test]
    fn llm_model_not_empty() {
        assert_eq!(
            only_problem(|c| c.llm.model.clear()),
            "llm.model (LLMQ_LLM__MODEL): must not be empty"
        );
    }

    #[test]
    fn llm_embedding_model_not_empty() {
        assert_eq!(
            only_problem(|c| c.llm.embedding_model.clear()),
            "llm.embedding_model (LLMQ_LLM__EMBEDDING_MODEL): must not be empty"
        );
    }

    #[test]
    fn llm_timeout_range() {
        for secs in [0, 3601] {
            assert_eq!(
                only_problem(|c| c.llm.timeout_secs = secs),
                "llm.timeout_secs (LLMQ_LLM__TIMEOUT_SECS): must be between 1 and 3600"
            );
        }
    }

    #[test]
    fn llm_max_response_bytes_at_least_1024() {
        assert_eq!(
            only_problem(|c| c.llm.max_response_bytes = 1023),
            "llm.max_response_bytes (LLMQ_LLM__MAX_RESPONSE_BYTES): must be at least 1024"
        );
    }

    #[test]
    fn llm_timeout_below_half_the_consumer_timeout() {
        for (timeout, consumer_timeout) in [(900, 1800), (60, 120), (5, 0)] {
            assert_eq!(
                only_problem(|c| {
                    c.llm.timeout_secs = timeout;
                    c.llm.stream_max_secs = 1;
                    c.worker.shutdown_grace_secs = timeout;
                    c.amqp.consumer_timeout_secs = consumer_timeout;
                }),
                format!(
                    "llm.timeout_secs (LLMQ_LLM__TIMEOUT_SECS): must be below half of \
                     amqp.consumer_timeout_secs ({consumer_timeout} s): a call may start just \
                     before a waiting delivery is handed to the retry queue"
                )
            );
        }
        let mut c = Config::default();
        c.llm.timeout_secs = 1;
        c.llm.stream_max_secs = 1;
        c.retry.inline_max_ms = 100;
        c.amqp.consumer_timeout_secs = 3;
        assert!(c.validate().is_empty(), "1.1 s of 1.5 s");
        // A stream is a call too, and the longer one is named.
        c.llm.stream_max_secs = 2;
        assert_eq!(
            c.validate(),
            [
                "llm.stream_max_secs (LLMQ_LLM__STREAM_MAX_SECS): must be below half of \
              amqp.consumer_timeout_secs (3 s): a call may start just before a waiting \
              delivery is handed to the retry queue"
            ]
        );
    }

    #[test]
    fn other_names_no_tenant_and_weights_are_positive() {
        let p = only_problem(|c| {
            c.tenants.insert("other".into(), Default::default());
        });
        assert!(p.starts_with("tenants.other"), "{p}");
        let p = only_problem(|c| {
            c.tenants.insert(
                "alice".into(),
                crate::config::TenantConfig {
                    weight: Some(0),
                    ..Default::default()
                },
            );
        });
        assert!(
            p.starts_with("tenants.alice.weight") && p.ends_with("must be between 1 and 1000"),
            "{p}"
        );
    }

    #[test]
    fn stream_timeouts_and_flush_are_bounded() {
        assert_eq!(
            only_problem(|c| c.llm.stream_idle_timeout_secs = 0),
            "llm.stream_idle_timeout_secs (LLMQ_LLM__STREAM_IDLE_TIMEOUT_SECS): must be between 1 \
             and 3600"
        );
        assert_eq!(
            only_problem(|c| c.stream.flush_ms = 10_001),
            "stream.flush_ms (LLMQ_STREAM__FLUSH_MS): must be at most 10000"
        );
    }

    #[test]
    fn retry_inline_max_and_a_call_below_half_the_consumer_timeout() {
        assert_eq!(
            only_problem(|c| {
                c.llm.timeout_secs = 60;
                c.llm.stream_max_secs = 60;
                c.retry.inline_max_ms = 840_000;
            }),
            "retry.inline_max_ms (LLMQ_RETRY__INLINE_MAX_MS): plus llm.timeout_secs must stay \
             below half of amqp.consumer_timeout_secs (1800 s): an inline wait and a call may \
             follow the longest wait"
        );
    }

    #[test]
    fn worker_consumers_range() {
        for n in [0, 1025] {
            assert_eq!(
                only_problem(|c| c.worker.consumers = n),
                "worker.consumers (LLMQ_WORKER__CONSUMERS): must be between 1 and 1024"
            );
        }
    }

    #[test]
    fn worker_max_inflight_at_least_1() {
        assert_eq!(
            only_problem(|c| c.worker.max_inflight = 0),
            "worker.max_inflight (LLMQ_WORKER__MAX_INFLIGHT): must be at least 1"
        );
    }

    #[test]
    fn worker_min_inflight_within_max() {
        for (min, max) in [(0, 256), (9, 8)] {
            assert_eq!(
                only_problem(|c| {
                    c.worker.min_inflight = min;
                    c.worker.max_inflight = max;
                }),
                "worker.min_inflight (LLMQ_WORKER__MIN_INFLIGHT): must be between 1 and \
                 worker.max_inflight"
            );
        }
    }

    #[test]
    fn worker_shutdown_grace_covers_llm_timeout() {
        assert_eq!(
            only_problem(|c| {
                c.llm.timeout_secs = 60;
                c.worker.shutdown_grace_secs = 59;
            }),
            "worker.shutdown_grace_secs (LLMQ_WORKER__SHUTDOWN_GRACE_SECS): must be at least \
             llm.timeout_secs (60), so that a call started just before SIGTERM can finish"
        );
        let mut equal = Config::default();
        equal.worker.shutdown_grace_secs = equal.llm.timeout_secs;
        assert!(equal.validate().is_empty(), "equal is enough");
    }

    #[test]
    fn worker_max_body_bytes_at_least_64() {
        assert_eq!(
            only_problem(|c| c.worker.max_body_bytes = 63),
            "worker.max_body_bytes (LLMQ_WORKER__MAX_BODY_BYTES): must be at least 64"
        );
    }

    #[test]
    fn batch_max_items_range() {
        for n in [0, 2049] {
            assert_eq!(
                only_problem(|c| c.batch.max_items = n),
                "batch.max_items (LLMQ_BATCH__MAX_ITEMS): must be between 1 and 2048"
            );
        }
    }

    #[test]
    fn batch_max_wait_at_most_10s() {
        assert_eq!(
            only_problem(|c| c.batch.max_wait_ms = 10_001),
            "batch.max_wait_ms (LLMQ_BATCH__MAX_WAIT_MS): must be at most 10000"
        );
    }

    #[test]
    fn admin_addr_is_host_and_port() {
        assert_eq!(
            only_problem(|c| c.admin.addr = "localhost".into()),
            "admin.addr (LLMQ_ADMIN__ADDR): must be host:port, like 0.0.0.0:9090 (or empty to \
             turn it off)"
        );
        let mut off = Config::default();
        off.admin.addr.clear();
        assert!(off.validate().is_empty(), "empty turns the server off");
    }

    #[test]
    fn limits_redis_url_scheme() {
        assert_eq!(
            only_problem(|c| c.limits.redis_url = SecretUrl::new("http://x")),
            "limits.redis_url (LLMQ_LIMITS__REDIS_URL): scheme must be redis or rediss, got http"
        );
    }

    #[test]
    fn limits_redis_url_must_parse() {
        assert_eq!(
            only_problem(|c| c.limits.redis_url = SecretUrl::new("redis://:pw@[::1")),
            "limits.redis_url (LLMQ_LIMITS__REDIS_URL): not a URL (invalid IPv6 address): \
             redis://***"
        );
    }

    #[test]
    fn retry_max_attempts_at_least_1() {
        assert_eq!(
            only_problem(|c| c.retry.max_attempts = 0),
            "retry.max_attempts (LLMQ_RETRY__MAX_ATTEMPTS): must be at least 1"
        );
    }

    #[test]
    fn retry_initial_delay_at_least_1() {
        assert_eq!(
            only_problem(|c| c.retry.initial_delay_ms = 0),
            "retry.initial_delay_ms (LLMQ_RETRY__INITIAL_DELAY_MS): must be at least 1"
        );
    }

    #[test]
    fn retry_max_delay_at_least_1() {
        assert_eq!(
            only_problem(|c| c.retry.max_delay_secs = 0),
            "retry.max_delay_secs (LLMQ_RETRY__MAX_DELAY_SECS): must be at least 1"
        );
    }

    #[test]
    fn idempotency_ttl_at_least_1() {
        assert_eq!(
            only_problem(|c| c.idempotency.ttl_secs = 0),
            "idempotency.ttl_secs (LLMQ_IDEMPOTENCY__TTL_SECS): must be at least 1"
        );
    }

    #[test]
    fn worker_max_result_bytes_at_least_1024() {
        assert_eq!(
            only_problem(|c| c.worker.max_result_bytes = 1000),
            "worker.max_result_bytes (LLMQ_WORKER__MAX_RESULT_BYTES): must be at least 1024"
        );
    }

    #[test]
    fn batch_max_buffered_bytes_fits_one_request() {
        assert_eq!(
            only_problem(|c| c.batch.max_buffered_bytes = 1000),
            "batch.max_buffered_bytes (LLMQ_BATCH__MAX_BUFFERED_BYTES): must be at least \
             worker.max_body_bytes, so one embedding request fits"
        );
    }

    #[test]
    fn retry_max_redeliveries_at_least_1() {
        assert!(only_problem(|c| c.retry.max_redeliveries = 0).starts_with(
            "retry.max_redeliveries (LLMQ_RETRY__MAX_REDELIVERIES): must be at least 1"
        ));
    }

    #[test]
    fn topology_results_ttl_at_most_30_days() {
        assert_eq!(
            only_problem(|c| c.topology.results_ttl_secs = 30 * 86_400 + 1),
            "topology.results_ttl_secs (LLMQ_TOPOLOGY__RESULTS_TTL_SECS): must be at most 2592000 (30 days)"
        );
    }

    #[test]
    fn idempotency_memory_max_bytes_at_least_1024() {
        assert_eq!(
            only_problem(|c| c.idempotency.memory_max_bytes = 1023),
            "idempotency.memory_max_bytes (LLMQ_IDEMPOTENCY__MEMORY_MAX_BYTES): must be at least 1024"
        );
    }

    #[test]
    fn idempotency_redis_url_scheme_when_the_store_is_redis() {
        assert_eq!(
            only_problem(|c| {
                c.idempotency.store = StoreKind::Redis;
                c.idempotency.redis_url = SecretUrl::new("http://x");
            }),
            "idempotency.redis_url (LLMQ_IDEMPOTENCY__REDIS_URL): scheme must be redis or \
             rediss, got http"
        );
        let mut memory = Config::default();
        memory.idempotency.redis_url = SecretUrl::new("http://x");
        assert!(memory.validate().is_empty(), "unused by the memory store");
    }

    #[test]
    fn idempotency_redis_url_must_parse() {
        assert_eq!(
            only_problem(|c| {
                c.idempotency.store = StoreKind::Redis;
                c.idempotency.redis_url = SecretUrl::new("redis://:pw@[::1");
            }),
            "idempotency.redis_url (LLMQ_IDEMPOTENCY__REDIS_URL): not a URL (invalid IPv6 \
             address): redis://***"
        );
    }

    #[test]
    fn topology_max_priority_at_least_1() {
        assert_eq!(
            only_problem(|c| c.topology.max_priority = 0),
            "topology.max_priority (LLMQ_TOPOLOGY__MAX_PRIORITY): must be between 1 and 255"
        );
    }

    #[test]
    fn topology_names_1_to_255_bytes() {
        for name in [String::new(), "q".repeat(256)] {
            assert_eq!(
                only_problem(|c| c.topology.results_exchange = name),
                "topology.results_exchange (LLMQ_TOPOLOGY__RESULTS_EXCHANGE): must be 1 to 255 \
                 bytes"
            );
        }
    }

    #[test]
    fn topology_names_not_amq() {
        assert_eq!(
            only_problem(|c| c.topology.dead_letter_queue = "amq.dlq".into()),
            "topology.dead_letter_queue (LLMQ_TOPOLOGY__DEAD_LETTER_QUEUE): names starting with \
             amq. are reserved by the broker"
        );
    }

    #[test]
    fn topology_work_queues_differ() {
        assert_eq!(
            only_problem(|c| c.topology.embeddings_queue = c.topology.processing_queue.clone()),
            "topology.embeddings_queue (LLMQ_TOPOLOGY__EMBEDDINGS_QUEUE): must differ from \
             topology.processing_queue"
        );
    }

    #[test]
    fn topology_work_keys_differ() {
        assert_eq!(
            only_problem(|c| c.topology.embeddings_key = c.topology.processing_key.clone()),
            "topology.embeddings_key (LLMQ_TOPOLOGY__EMBEDDINGS_KEY): must differ from \
             topology.processing_key"
        );
    }

    #[test]
    fn topology_lanes_at_most_256() {
        assert_eq!(
            only_problem(|c| c.topology.lanes = 257),
            "topology.lanes (LLMQ_TOPOLOGY__LANES): must be at most 256 (0 turns the lanes off)"
        );
        for fine in [0, 1, 256] {
            let mut c = Config::default();
            c.topology.lanes = fine;
            assert_eq!(c.validate(), Vec::<String>::new(), "{fine} lanes");
        }
    }

    #[test]
    fn topology_work_queue_names_leave_room_for_their_lanes() {
        assert_eq!(
            only_problem(|c| c.topology.embeddings_queue = "q".repeat(248)),
            "topology.embeddings_queue (LLMQ_TOPOLOGY__EMBEDDINGS_QUEUE): must be at most 247 \
             bytes while topology.lanes is not 0: its lanes are named <queue>.lane.<nn>"
        );
        let mut c = Config::default();
        c.topology.processing_queue = "q".repeat(247);
        assert_eq!(c.validate(), Vec::<String>::new(), "247 bytes leave room");
        c.topology.processing_queue = "q".repeat(255);
        c.topology.lanes = 0;
        assert_eq!(c.validate(), Vec::<String>::new(), "no lanes, no limit");
    }

    #[test]
    fn llm_max_tokens_cap_at_least_1() {
        assert_eq!(
            only_problem(|c| c.llm.max_tokens_cap = 0),
            "llm.max_tokens_cap (LLMQ_LLM__MAX_TOKENS_CAP): must be at least 1"
        );
    }

    #[test]
    fn llm_max_n_at_least_1() {
        assert_eq!(
            only_problem(|c| c.llm.max_n = 0),
            "llm.max_n (LLMQ_LLM__MAX_N): must be at least 1"
        );
    }

    #[test]
    fn llm_allowed_models_no_empty_name() {
        assert_eq!(
            only_problem(|c| c.llm.allowed_models = vec!["m".into(), String::new()]),
            "llm.allowed_models (LLMQ_LLM__ALLOWED_MODELS): must not contain an empty name (an \
             empty list allows any model)"
        );
    }

    #[test]
    fn llm_allowed_params_no_empty_name() {
        assert_eq!(
            only_problem(|c| c.llm.allowed_params.push(String::new())),
            "llm.allowed_params (LLMQ_LLM__ALLOWED_PARAMS): must not contain an empty name"
        );
    }

    #[test]
    fn llm_allowed_params_not_reserved() {
        assert_eq!(
            only_problem(|c| {
                c.llm.allowed_params.push("stream".into());
                c.llm.allowed_params.push("model".into());
            }),
            "llm.allowed_params (LLMQ_LLM__ALLOWED_PARAMS): model, stream set by llmq, never \
             by a request"
        );
    }

    #[test]
    fn llm_extra_allowed_params_follow_the_same_rules() {
        assert_eq!(
            only_problem(|c| c.llm.extra_allowed_params.push(String::new())),
            "llm.extra_allowed_params (LLMQ_LLM__EXTRA_ALLOWED_PARAMS): must not contain an \
             empty name"
        );
        assert_eq!(
            only_problem(|c| c.llm.extra_allowed_params.push("stream_options".into())),
            "llm.extra_allowed_params (LLMQ_LLM__EXTRA_ALLOWED_PARAMS): stream_options set by \
             llmq, never by a request"
        );
    }

    #[test]
    fn worker_reply_to_pattern_is_a_regex() {
        let problem = only_problem(|c| c.worker.reply_to_pattern = "replies.(".into());
        assert!(
            problem.starts_with(
                "worker.reply_to_pattern (LLMQ_WORKER__REPLY_TO_PATTERN): not a valid regex: "
            ),
            "{problem}"
        );
        // A pattern cannot close the group that anchors it to the whole name.
        assert!(
            only_problem(|c| c.worker.reply_to_pattern = "a)|(b".into())
                .contains("not a valid regex")
        );
        // With the identity placeholder, as it will be used: an identity in its place.
        assert!(
            only_problem(|c| c.worker.reply_to_pattern = "{identity}.(".into())
                .contains("not a valid regex")
        );
        let mut c = Config::default();
        c.worker.reply_to_pattern = r"replies\.{identity}\..+".into();
        assert_eq!(c.validate(), Vec::<String>::new());
    }

    #[test]
    fn log_level_is_a_filter() {
        let problem = only_problem(|c| c.log.level = "[[[".into());
        assert!(
            problem.starts_with("log.level (LLMQ_LOG__LEVEL): not a valid filter: "),
            "{problem}"
        );
    }

    #[test]
    fn secrets_are_never_quoted() {
        let mut c = Config::default();
        c.amqp.url = Some(SecretUrl::new("amqp://u:canary@[::1"));
        c.amqp.urls = Some(vec![SecretUrl::new("amqp:u:canary@host")]);
        c.llm.base_url = SecretUrl::new("gopher://u:canary@host/");
        c.llm.api_key = Secret::new("canary");
        c.limits.redis_url = SecretUrl::new("redis://:canary@[::1");
        let all = c.validate().join("\n");
        assert!(!all.is_empty());
        assert!(!all.contains("canary"), "{all}");
    }

    /// A configuration with one valid deployment `a`, changed by `change`.
    fn with_upstream(change: impl FnOnce(&mut crate::config::UpstreamConfig)) -> String {
        only_problem(|c| {
            let mut u = crate::config::UpstreamConfig {
                base_url: SecretUrl::new("http://127.0.0.1:8000/v1"),
                ..Default::default()
            };
            change(&mut u);
            c.upstreams.insert("a".into(), u);
        })
    }

    #[test]
    fn upstream_rules() {
        assert_eq!(
            with_upstream(|u| u.base_url = SecretUrl::new("ftp://x")),
            "upstreams.a.base_url (LLMQ_UPSTREAMS__A__BASE_URL): scheme must be http or https, got ftp"
        );
        assert_eq!(
            with_upstream(|u| u.provider = "anthropic".into()),
            "upstreams.a.provider (LLMQ_UPSTREAMS__A__PROVIDER): unknown provider \"anthropic\"; known: openai"
        );
        assert_eq!(
            with_upstream(|u| u.weight = 0),
            "upstreams.a.weight (LLMQ_UPSTREAMS__A__WEIGHT): must be between 1 and 10000"
        );
        assert_eq!(
            with_upstream(|u| u.max_inflight = 0),
            "upstreams.a.max_inflight (LLMQ_UPSTREAMS__A__MAX_INFLIGHT): must be at least 1"
        );
        assert_eq!(
            with_upstream(|u| u.timeout_secs = 0),
            "upstreams.a.timeout_secs (LLMQ_UPSTREAMS__A__TIMEOUT_SECS): must be between 1 and 3600"
        );
        assert_eq!(
            with_upstream(|u| u.models = vec![String::new()]),
            "upstreams.a.models (LLMQ_UPSTREAMS__A__MODELS): a model name must not be empty"
        );
        assert_eq!(
            with_upstream(|u| {
                u.headers.insert("bad header".into(), Secret::new("v"));
            }),
            "upstreams.a.headers (LLMQ_UPSTREAMS__A__HEADERS): \"bad header\" is not a header name"
        );
        let p = only_problem(|c| {
            c.upstreams.insert(
                "bad name!".into(),
                crate::config::UpstreamConfig {
                    base_url: SecretUrl::new("http://127.0.0.1:8000/v1"),
                    ..Default::default()
                },
            );
        });
        assert!(p.contains("1 to 64 lowercase letters"), "{p}");
    }

    #[test]
    fn the_longest_deployment_timeout_bounds_the_grace_and_the_waits() {
        assert_eq!(
            with_upstream(|u| u.timeout_secs = 90),
            "worker.shutdown_grace_secs (LLMQ_WORKER__SHUTDOWN_GRACE_SECS): must be at least \
             upstreams.a.timeout_secs (90), so that a call started just before SIGTERM can finish"
        );
        let p = only_problem(|c| {
            c.amqp.consumer_timeout_secs = 100;
            c.worker.shutdown_grace_secs = 60;
            c.upstreams.insert(
                "a".into(),
                crate::config::UpstreamConfig {
                    base_url: SecretUrl::new("http://127.0.0.1:8000/v1"),
                    timeout_secs: 50,
                    ..Default::default()
                },
            );
            c.llm.timeout_secs = 10;
            c.llm.stream_max_secs = 10;
        });
        assert!(p.starts_with("upstreams.a.timeout_secs"), "{p}");
    }

    #[test]
    fn fallbacks_name_served_models() {
        let p = only_problem(|c| {
            c.upstreams.insert(
                "a".into(),
                crate::config::UpstreamConfig {
                    base_url: SecretUrl::new("http://127.0.0.1:8000/v1"),
                    models: vec!["gpt-4o".into()],
                    ..Default::default()
                },
            );
            c.routing.fallbacks = [("gpt-4o".into(), vec!["gpt-4o-mini".into()])].into();
        });
        assert_eq!(
            p,
            "routing.fallbacks (LLMQ_ROUTING__FALLBACKS): gpt-4o falls back to gpt-4o-mini, which no deployment serves"
        );
    }

    #[test]
    fn routing_rules() {
        assert_eq!(
            only_problem(|c| c.routing.auth_failures = 0),
            "routing.auth_failures (LLMQ_ROUTING__AUTH_FAILURES): must be at least 1"
        );
        assert_eq!(
            only_problem(|c| c.routing.breaker_failures = 0),
            "routing.breaker_failures (LLMQ_ROUTING__BREAKER_FAILURES): must be at least 1"
        );
        assert_eq!(
            only_problem(|c| c.routing.quota_cooldown_secs = 0),
            "routing.quota_cooldown_secs (LLMQ_ROUTING__QUOTA_COOLDOWN_SECS): must be between 1 and 86400"
        );
        assert_eq!(
            only_problem(|c| c.routing.fallback_after_secs = 3601),
            "routing.fallback_after_secs (LLMQ_ROUTING__FALLBACK_AFTER_SECS): must be at most 3600"
        );
        assert_eq!(
            only_problem(|c| c.retry.max_rate_limited_secs = 0),
            "retry.max_rate_limited_secs (LLMQ_RETRY__MAX_RATE_LIMITED_SECS): must be between 1 and 86400"
        );
        assert_eq!(
            only_problem(|c| c.retry.max_unavailable_secs = 0),
            "retry.max_unavailable_secs (LLMQ_RETRY__MAX_UNAVAILABLE_SECS): must be between 1 and 86400"
        );
    }

    #[test]
    fn cancel_rules() {
        assert_eq!(
            only_problem(|c| c.topology.control_exchange = "amq.control".into()),
            "topology.control_exchange (LLMQ_TOPOLOGY__CONTROL_EXCHANGE): must be 1 to 200 bytes \
             and not start with amq. (each worker's queue is <name>.<uuid>)"
        );
        assert!(
            only_problem(|c| c.topology.control_exchange = "x".repeat(201))
                .starts_with("topology.control_exchange")
        );
        assert_eq!(
            only_problem(|c| c.worker.cancel_ttl_secs = 0),
            "worker.cancel_ttl_secs (LLMQ_WORKER__CANCEL_TTL_SECS): must be between 1 and 2592000 \
             (30 days)"
        );
    }
}
