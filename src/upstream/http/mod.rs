//! The HTTP side of a call:
//! - `client`: the OpenAI-compatible HTTP client, classifying every failure once;
//! - `stream`: a streamed chat answer (server-sent events), its deltas handed on as they
//!   arrive and merged into the whole answer;
//! - `scrub`: the secrets kept out of error texts.

pub mod client;
pub mod scrub;
pub mod stream;
