//! What a call answered, in llmq's terms whatever the provider's wire format.

use std::time::Duration;

use serde_json::Value;

use crate::contract::{Usage, response::Vector};

/// What a chat completion returned.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatAnswer {
    /// The first choice's text; `None` when the model answered only with tool calls.
    pub content: Option<String>,
    /// The first choice's `tool_calls`, verbatim.
    pub tool_calls: Option<Value>,
    /// The first choice's `refusal`, verbatim.
    pub refusal: Option<Value>,
    /// Every choice verbatim (`index`, `message`, `finish_reason`, `logprobs`).
    pub choices: Vec<Value>,
    /// The model that answered, as the upstream names it.
    pub model: String,
    /// Token usage as reported.
    pub usage: Option<Usage>,
    /// Why generation stopped.
    pub finish_reason: Option<String>,
    /// How long the deployment's `x-ratelimit-*` budget stays spent, when this answer used
    /// its last request or token.
    pub spent_for: Option<Duration>,
}

/// What an embeddings call returned.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingAnswer {
    /// One vector per input, in input order.
    pub vectors: Vec<Vector>,
    /// The model that answered.
    pub model: String,
    /// Token usage as reported.
    pub usage: Option<Usage>,
    /// As [`ChatAnswer::spent_for`].
    pub spent_for: Option<Duration>,
}
