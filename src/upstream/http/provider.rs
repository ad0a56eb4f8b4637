//! The seam between llmq and a provider's wire format. The HTTP client owns the transport
//! (pooled connections, timeouts, bounded reads, `Retry-After`, the framing of server-sent
//! events); a [`Provider`] owns only what differs between providers: where a call goes,
//! how the key is sent, the request body, and how an answer, an error body or a stream
//! event reads back into llmq's types.
//!
//! A provider with another wire format (Anthropic's Messages API, for one) is one more
//! module implementing [`Provider`], its name in [`crate::config::PROVIDERS`] and in
//! [`super::client::provider_named`]; `[upstreams.<name>].provider` picks it.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Map, Value};

use super::answer::{ChatAnswer, EmbeddingAnswer};
use crate::{contract::request::Kind, upstream::failure::Failure};

/// What one event of a streamed answer carried, in llmq's terms.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A chunk in the OpenAI chunk shape (`model`, `usage`, `choices[].delta`,
    /// `finish_reason`, `logprobs`): the shape llmq hands deltas on in, whatever the
    /// provider sends.
    Chunk(Map<String, Value>),
    /// The end of the answer.
    Done,
    /// Nothing for the answer (a ping, an event the provider sends for its own reasons).
    Nothing,
}

/// One provider's wire format. Every method is pure: no I/O, so each is unit tested
/// without a server.
pub trait Provider: Send + Sync {
    /// The path of a call of `kind` under the deployment's `base_url`.
    fn path(&self, kind: Kind) -> &'static str;

    /// The headers that carry `api_key` (never empty when called).
    fn auth(&self, api_key: &str) -> Vec<(&'static str, String)>;

    /// The body of a chat call for `model` (as the deployment knows it); `stream`: ask for
    /// server-sent events.
    fn chat_body(
        &self,
        model: &str,
        messages: &[Value],
        params: &Map<String, Value>,
        stream: bool,
    ) -> Result<Vec<u8>, Failure>;

    /// The body of an embeddings call.
    fn embedding_body(
        &self,
        model: &str,
        input: &[String],
        params: &Map<String, Value>,
    ) -> Result<Vec<u8>, Failure>;

    /// A successful chat answer's body read; `model`: what was asked for, when the answer
    /// does not say.
    fn chat_answer(&self, body: &[u8], model: &str) -> Result<ChatAnswer, Failure>;

    /// A successful embeddings answer's body read: one vector per input, in input order.
    fn embedding_answer(
        &self,
        body: &[u8],
        model: &str,
        inputs: usize,
    ) -> Result<EmbeddingAnswer, Failure>;

    /// A failed answer, classified once from its status and its error body.
    fn failure(&self, status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> Failure;

    /// One server-sent event's `data` read (an error the provider sends in the stream is
    /// classified here).
    fn stream_event(&self, data: &str) -> Result<Event, Failure>;
}
