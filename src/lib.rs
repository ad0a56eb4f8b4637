//! llmq: a fleet of RabbitMQ workers that call OpenAI-compatible LLM APIs.
//!
//! A message's path through the service, one module per stage:
//!
//! 1. [`config`]: defaults, `config.toml`, `LLMQ_*` environment; validated once.
//! 2. [`topology`]: exchanges and queues declared idempotently at start-up.
//! 3. [`consume`]: consumer tasks, one channel each, every delivery processed concurrently.
//! 4. [`request`]: the message body and properties parsed and validated into a [`request::Job`].
//! 5. [`llm`]: the upstream call, every failure classified as transient or permanent.
//! 6. [`process`]: one step of work as a function returning an [`process::Outcome`].
//! 7. [`retry`]: the backoff policy for transient failures, and the delayed-retry queues.
//! 8. [`dedupe`]: idempotency by request_id (stored results and leases).
//! 9. [`response`]: the result message sent back to callers.
//! 10. [`publish`]: confirmed publishing of results and dead letters, then the ack.
//!
//! Around them: [`admin`] and [`metrics`] (`/metrics`, `/healthz`, `/readyz`), [`shutdown`]
//! (signals, cancellation), [`telemetry`] (logs), [`amqp`]
//! (connections) and the built-in tools [`mock`] (an OpenAI-compatible mock upstream) and
//! [`client`] (`llmq publish`), [`dlq`] (`llmq dlq`, `llmq status`, `llmq topology`) and
//! [`bench`] (`llmq bench`).
#![deny(unsafe_code)]
#![warn(clippy::unwrap_in_result, clippy::unwrap_used, missing_docs)]

pub mod broker;
pub mod config;
pub mod contract;
pub mod ops;
pub mod runtime;
pub mod store;
pub mod tools;
pub mod upstream;
pub mod worker;

/// Installs ring as the process's rustls crypto provider (reqwest is built without one, so
/// that no C toolchain for aws-lc is needed). Safe to call more than once.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err means another provider was installed first, which serves just as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(super::truncate("ééé", 3), "é");
        assert_eq!(super::truncate("abc", 3), "abc");
    }
}
