//! The result contract: what a caller receives on `llm_results` and on its `reply_to`.
//!
//! `{"request_id", "status": "ok", "kind", "model", "upstream", "upstream_model",
//! "fallback_from", "content" | "embedding" | "embeddings",
//! "usage", "attempts", "latency_ms", "worker", "metadata"}`, or on failure
//! `{"request_id", "status": "error", "kind", "error": {"kind", "message"}, "attempts", ...}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{error_kind::ErrorKind, usage::Usage};

/// One result message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobResult {
    /// The request's id (also the AMQP `message_id` of the result).
    pub request_id: String,
    /// `ok`, `error` or `cancelled`.
    pub status: Status,
    /// `chat` or `embedding`, when the request got far enough to tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// The routing name of the model that answered: the request's (or the default), or
    /// the fallback that answered instead. Prices and fallbacks key on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The deployment that answered (`[upstreams.<name>]`, or `default`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The model as the upstream reported it (a dated snapshot, an Azure deployment's model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_model: Option<String>,
    /// The model the request asked for, when a fallback answered instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_from: Option<String>,
    /// Chat answer text: a string, or `null` when the model answered only with tool calls
    /// (always present in a chat `ok` result).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// The tool calls the model made, verbatim, when it made any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// The model's refusal, verbatim, when it refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Value>,
    /// Every choice verbatim (`index`, `message`, `finish_reason`, `logprobs`), when there
    /// is more than one or logprobs were asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<Value>>,
    /// Why generation stopped (chat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The vector, when the request's `input` was one string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vector>,
    /// The vectors, when the request's `input` was a list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<Vec<Vector>>,
    /// Token usage as the upstream reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Why the request failed, on `status: error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Upstream calls made for this request.
    pub attempts: u32,
    /// Milliseconds from the delivery reaching the worker to the result being ready.
    pub latency_ms: u64,
    /// The worker that produced the result.
    pub worker: String,
    /// Who the request belongs to (its identity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// What the answer cost in USD, when the model that answered has a price
    /// (`[prices]`): counted in whole micro-dollars.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// The request's `metadata`, untouched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
}

/// One embedding as the upstream sent it, and as the result carries it: a list of numbers,
/// or, for a request with `encoding_format: "base64"`, the base64 text of its
/// little-endian `f32`s, passed on untouched.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Vector {
    /// `[0.1, -0.2, ...]`.
    Floats(Vec<f32>),
    /// `encoding_format: "base64"`.
    Base64(String),
}

impl<'de> Deserialize<'de> for Vector {
    /// A list or a string, read straight from the answer (an untagged enum would buffer
    /// every vector once more on the way).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vector;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of numbers or a base64 string")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vector, E> {
                Ok(Vector::Base64(v.to_string()))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Vector, E> {
                Ok(Vector::Base64(v))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Vector, A::Error> {
                let floats =
                    Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Vector::Floats(floats))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Result status.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The upstream answered.
    Ok,
    /// The request was dead-lettered; see `error`.
    Error,
    /// The caller cancelled the request (`{"cancel": "<request_id>"}` on the control
    /// exchange); it was not answered, and not dead-lettered.
    Cancelled,
}

/// The failure of a dead-lettered request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorInfo {
    /// Why, as in the dead letter's `x-error-kind`.
    pub kind: ErrorKind,
    /// The reason, at most 1 KiB.
    pub message: String,
}

impl JobResult {
    /// An empty `ok` result, filled in by the caller.
    pub fn ok(request_id: String, worker: String) -> Self {
        Self {
            request_id,
            status: Status::Ok,
            kind: None,
            model: None,
            upstream: None,
            upstream_model: None,
            fallback_from: None,
            content: None,
            tool_calls: None,
            refusal: None,
            choices: None,
            finish_reason: None,
            embedding: None,
            embeddings: None,
            usage: None,
            error: None,
            attempts: 0,
            latency_ms: 0,
            worker,
            tenant: None,
            cost_usd: None,
            metadata: None,
        }
    }

    /// An `error` result.
    pub fn error(request_id: String, worker: String, kind: ErrorKind, message: &str) -> Self {
        Self {
            status: Status::Error,
            error: Some(ErrorInfo {
                kind,
                message: message.to_string(),
            }),
            ..Self::ok(request_id, worker)
        }
    }

    /// A `cancelled` result.
    pub fn cancelled(request_id: String, worker: String) -> Self {
        Self {
            status: Status::Cancelled,
            ..Self::ok(request_id, worker)
        }
    }

    /// The JSON body.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain structs of strings, numbers and JSON values cannot fail; an
        // empty object is a safe answer should serde ever disagree.
        let mut body = Vec::with_capacity(512);
        match serde_json::to_writer(&mut body, self) {
            Ok(()) => body,
            Err(_) => b"{}".to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_vector_is_kept_as_the_upstream_sent_it() {
        let floats: Vector = serde_json::from_value(json!([0.5, -1.0])).expect("numbers");
        assert_eq!(floats, Vector::Floats(vec![0.5, -1.0]));
        assert_eq!(
            serde_json::to_value(&floats).expect("serializes"),
            json!([0.5, -1.0])
        );
        let text: Vector = serde_json::from_value(json!("AACAPw==")).expect("base64");
        assert_eq!(text, Vector::Base64("AACAPw==".into()));
        assert_eq!(
            serde_json::to_value(&text).expect("serializes"),
            json!("AACAPw==")
        );
        assert!(serde_json::from_value::<Vector>(json!({"x": 1})).is_err());
        assert!(serde_json::from_value::<Vector>(json!(["a"])).is_err());
    }
}
