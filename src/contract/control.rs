//! Messages on the control exchange (`topology.control_exchange`, fanout): today one, the
//! cancel `{"cancel": "<request_id>"}`, scoped by its sender's identity as the request is.

use serde::{Deserialize, Serialize};

use super::request::MAX_REQUEST_ID;

/// Largest control message read; anything longer is not a cancel.
pub const MAX_CONTROL_BYTES: usize = 4096;

/// A caller's cancel of one of its requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// The request's id, as its publisher gave it.
    pub cancel: String,
}

impl Cancel {
    /// The cancel of `request_id`.
    pub fn new(request_id: impl Into<String>) -> Self {
        Self {
            cancel: request_id.into(),
        }
    }

    /// Reads a control message: `None` for anything that is not a cancel of a possible
    /// request id (too long a message, another shape, an empty or over-long id, which no
    /// request has and which would only fill the tombstones).
    pub fn parse(body: &[u8]) -> Option<Self> {
        if body.len() > MAX_CONTROL_BYTES {
            return None;
        }
        serde_json::from_slice::<Self>(body)
            .ok()
            .filter(|c| !c.cancel.is_empty() && c.cancel.len() <= MAX_REQUEST_ID)
    }

    /// Its body.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_round_trips_and_anything_else_is_ignored() {
        let c = Cancel::new("r1");
        assert_eq!(c.to_bytes(), br#"{"cancel":"r1"}"#);
        assert_eq!(Cancel::parse(&c.to_bytes()), Some(c));
        assert_eq!(Cancel::parse(br#"{"cancel":""}"#), None);
        assert_eq!(Cancel::parse(br#"{"stop":"r1"}"#), None);
        assert_eq!(Cancel::parse(b"not json"), None);
        let long = Cancel::new("x".repeat(MAX_REQUEST_ID + 1)).to_bytes();
        assert_eq!(Cancel::parse(&long), None);
        let at_limit = Cancel::new("x".repeat(MAX_REQUEST_ID));
        assert_eq!(Cancel::parse(&at_limit.to_bytes()), Some(at_limit));
        let huge = format!(
            r#"{{"cancel":"r1","pad":"{}"}}"#,
            "x".repeat(MAX_CONTROL_BYTES)
        );
        assert_eq!(Cancel::parse(huge.as_bytes()), None, "over 4 KiB");
    }
}
