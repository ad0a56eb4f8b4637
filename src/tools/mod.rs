//! Tools for users: the mock upstream, the benchmark and the `llmq publish` client.

pub mod bench;
pub mod client;
pub mod mock;
