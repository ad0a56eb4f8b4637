//! Rules for values that parse but make no sense.

use super::{Config, StoreKind, env_name};

impl Config {
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
