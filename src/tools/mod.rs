//! Tools for users: the mock upstream, the benchmark, the `llmq publish` client and the
//! health-check probe.

pub mod bench;
pub mod client;
pub mod mock;
pub mod probe;
