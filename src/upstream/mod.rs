//! The LLM side: the OpenAI-compatible HTTP client, flow control toward it (concurrency,
//! pauses, per-minute budgets), embedding batching, and the one place an upstream call is
//! made and accounted for.

pub mod batch;
pub mod call;
pub mod client;
pub mod deployment;
pub mod flow;
pub mod ratelimit;
pub mod scrub;
