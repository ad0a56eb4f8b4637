//! Operating llmq: the admin HTTP endpoints and the `dlq`, `status` and `topology` commands.

pub mod admin;
pub mod dlq;
