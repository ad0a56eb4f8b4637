//! The HTTP side of a call:
//! - `client`: the HTTP client of a deployment: the transport, whatever the provider, and
//!   `answer`, what a call answered in llmq's terms;
//! - `provider`: the seam between llmq and a provider's wire format, and `openai`, the
//!   OpenAI-compatible one (requests, answers, error bodies and stream events);
//! - `stream`: a streamed chat answer (server-sent events), its deltas handed on as they
//!   arrive and merged into the whole answer;
//! - `sse`: the framing of the event stream (whole, bounded lines) before its parser;
//! - `scrub`: the secrets kept out of error texts.

pub mod answer;
pub mod client;
pub mod openai;
pub mod provider;
pub mod scrub;
mod sse;
pub mod stream;
