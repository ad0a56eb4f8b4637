//! llmq: a fleet of RabbitMQ workers that call OpenAI-compatible LLM APIs.
//!
//! A message's path through the service, one folder per layer (no module imports from a
//! layer above it):
//!
//! 1. [`contract`]: what crosses the wire: the request parsed and validated into a
//!    [`contract::request::Job`], the result, every header, the error kinds, token usage.
//! 2. [`config`]: defaults, `config.toml`, `LLMQ_*` environment; validated once.
//! 3. [`runtime`]: metrics, logs, the clock and shutdown, used by everything above.
//! 4. [`broker`]: connections, the topology, confirmed publishing, the delayed-retry tiers.
//! 5. [`store`]: idempotency by request id (stored results and leases).
//! 6. [`tenant`]: who a request belongs to, what its answer cost, what each tenant spent.
//! 7. [`upstream`]: the OpenAI-compatible client, flow control, budgets, embedding batching,
//!    and the one owner of an upstream call.
//! 8. [`worker`]: the path of one delivery: consume, decide (a pure function), settle.
//! 9. [`ops`]: the admin HTTP endpoints and the `dlq`, `status`, `topology`, `usage`
//!    commands.
//! 10. [`tools`]: the mock upstream, the benchmark, the `llmq publish` client.
//!
//! [`app`] wires the worker, the admin server and shutdown for the binary and the tests.
#![deny(unsafe_code)]
#![warn(clippy::unwrap_in_result, clippy::unwrap_used, missing_docs)]

pub mod app;
pub mod broker;
pub mod config;
pub mod contract;
pub mod ops;
pub mod runtime;
pub mod store;
pub mod tenant;
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
