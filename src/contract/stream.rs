//! The messages of a streamed answer on the caller's `reply_to`, before its result:
//!
//! - a delta `{"request_id", "status": "delta", "attempt", "seq", "delta"}` (plus the
//!   choice's `index` when the request asked for several, or the choice is not the first),
//!   AMQP `type` [`DELTA`], `message_id` `<request_id>:<attempt>:<seq>`;
//! - a restart marker `{"request_id", "status": "restart", "attempt"}`, AMQP `type`
//!   [`RESTART`], `message_id` `<request_id>:<attempt>:restart`: an earlier attempt may
//!   have sent deltas, and the caller drops the partial text it holds.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The AMQP `type` and `status` of a delta message.
pub const DELTA: &str = "delta";
/// The AMQP `type` and `status` of a restart marker.
pub const RESTART: &str = "restart";

/// One delta of one choice.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Delta<'a> {
    /// The request's id.
    pub request_id: &'a str,
    /// Always [`DELTA`].
    pub status: &'a str,
    /// The attempt that generated it: a later attempt starts again at `seq` 0.
    pub attempt: u32,
    /// Its place in the attempt's deltas, from 0.
    pub seq: u64,
    /// The choice it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// What the choice gained, as OpenAI's chunk `delta` (text, tool-call fragments).
    pub delta: Map<String, Value>,
}

impl<'a> Delta<'a> {
    /// A delta of `attempt`.
    pub fn new(
        request_id: &'a str,
        attempt: u32,
        seq: u64,
        index: Option<u64>,
        delta: Map<String, Value>,
    ) -> Self {
        Self {
            request_id,
            status: DELTA,
            attempt,
            seq,
            index,
            delta,
        }
    }

    /// Its AMQP `message_id`.
    pub fn message_id(&self) -> String {
        format!("{}:{}:{}", self.request_id, self.attempt, self.seq)
    }

    /// Its body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The marker that clears an earlier attempt's deltas.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Restart<'a> {
    /// The request's id.
    pub request_id: &'a str,
    /// Always [`RESTART`].
    pub status: &'a str,
    /// The attempt whose deltas follow.
    pub attempt: u32,
}

impl<'a> Restart<'a> {
    /// The marker before `attempt`'s deltas.
    pub fn new(request_id: &'a str, attempt: u32) -> Self {
        Self {
            request_id,
            status: RESTART,
            attempt,
        }
    }

    /// Its AMQP `message_id`.
    pub fn message_id(&self) -> String {
        format!("{}:{}:restart", self.request_id, self.attempt)
    }

    /// Its body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_delta_reads_as_documented() {
        let text = json!({"content": "Hel"});
        let Value::Object(delta) = text else {
            panic!("an object");
        };
        let d = Delta::new("r1", 2, 5, None, delta.clone());
        assert_eq!(d.message_id(), "r1:2:5");
        let body: Value = serde_json::from_slice(&d.to_bytes()).unwrap_or_default();
        assert_eq!(
            body,
            json!({"request_id": "r1", "status": "delta", "attempt": 2, "seq": 5, "delta": {"content": "Hel"}})
        );
        let indexed = Delta::new("r1", 1, 0, Some(1), delta);
        let body: Value = serde_json::from_slice(&indexed.to_bytes()).unwrap_or_default();
        assert_eq!(body["index"], 1);
    }

    #[test]
    fn a_restart_reads_as_documented() {
        let r = Restart::new("r1", 3);
        assert_eq!(r.message_id(), "r1:3:restart");
        let body: Value = serde_json::from_slice(&r.to_bytes()).unwrap_or_default();
        assert_eq!(
            body,
            json!({"request_id": "r1", "status": "restart", "attempt": 3})
        );
    }
}
