//! What makes two requests the same request, for idempotency: a hash of the fields that
//! decide the answer. A duplicate `request_id` whose fingerprint differs from the stored
//! one is a conflict (`idempotency_conflict`), never answered with the stored result, as
//! with Stripe's idempotency keys.
//!
//! Hashed: the kind, the model asked for, and the call (chat messages with the system
//! prompt folded in, or embedding inputs, and every parameter: `max_tokens`, `temperature`,
//! `params`). Left out: `request_id`, `timestamp`, `deadline` and `metadata`, which a client
//! may change when it resends. Object keys are hashed in sorted order, so the order a client
//! serialises them in does not matter.

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::request::{Call, Job};

/// A request's fingerprint: 64 hex digits of SHA-256 over its canonical form.
pub fn fingerprint(job: &Job) -> String {
    let mut h = Sha256::new();
    h.update(job.kind().as_str().as_bytes());
    h.update([0]);
    h.update(job.model.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    match &job.call {
        Call::Chat { messages, params } => {
            h.update(b"messages");
            for m in messages {
                canonical(&mut h, m);
            }
            h.update(b"params");
            for (k, v) in sorted(params) {
                canonical_str(&mut h, k);
                canonical(&mut h, v);
            }
        }
        Call::Embedding {
            input,
            single,
            params,
        } => {
            h.update(if *single { b"one" } else { b"all" });
            h.update(b"input");
            for text in input {
                canonical_str(&mut h, text);
            }
            h.update(b"params");
            for (k, v) in sorted(params) {
                canonical_str(&mut h, k);
                canonical(&mut h, v);
            }
        }
    }
    hex(&h.finalize())
}

/// A string as [`canonical`] feeds a `Value::String`, without making one.
fn canonical_str(h: &mut Sha256, s: &str) {
    h.update(b"s");
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

fn sorted(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

/// Feeds a JSON value in a form that is unambiguous (every value tagged and
/// length-prefixed) and independent of key order.
fn canonical(h: &mut Sha256, v: &Value) {
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            let s = n.to_string();
            h.update(b"d");
            h.update((s.len() as u64).to_be_bytes());
            h.update(s.as_bytes());
        }
        Value::String(s) => canonical_str(h, s),
        Value::Array(items) => {
            h.update(b"a");
            h.update((items.len() as u64).to_be_bytes());
            for item in items {
                canonical(h, item);
            }
        }
        Value::Object(map) => {
            h.update(b"o");
            h.update((map.len() as u64).to_be_bytes());
            for (k, v) in sorted(map) {
                canonical_str(h, k);
                canonical(h, v);
            }
        }
    }
}

/// Lowercase hex, two digits a byte: by table, as `write!("{b:02x}")` a byte at a time cost
/// about 3% of the worker's instructions per job.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use serde_json::json;

    use super::*;
    use crate::contract::request::{Kind, parse};

    fn of(body: Value) -> String {
        let body = body.to_string();
        let job = parse(
            body.as_bytes(),
            &BasicProperties::default(),
            Kind::Chat,
            &crate::contract::Rules::default(),
        );
        fingerprint(&job.expect("a valid request"))
    }

    #[test]
    fn hex_is_two_lowercase_digits_a_byte_as_stored_keys_have_them() {
        let bytes = [0x00, 0x0f, 0x10, 0xa5, 0xff];
        let formatted: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&bytes), "000f10a5ff");
        assert_eq!(hex(&bytes), formatted);
    }

    #[test]
    fn resending_with_other_metadata_or_key_order_is_the_same_request() {
        let a = of(
            json!({"request_id": "r1", "prompt": "hi", "temperature": 0.5,
            "params": {"top_p": 1, "stop": ["x"]}, "metadata": {"try": 1}}),
        );
        let b = of(
            json!({"params": {"stop": ["x"], "top_p": 1}, "temperature": 0.5,
            "prompt": "hi", "request_id": "r1", "metadata": {"try": 2}, "timestamp": 5}),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn any_field_that_decides_the_answer_changes_it() {
        let base = json!({"request_id": "r1", "prompt": "hi"});
        let fp = of(base.clone());
        for (field, value) in [
            ("prompt", json!("hello")),
            ("model", json!("gpt-4o")),
            ("system", json!("be brief")),
            ("max_tokens", json!(7)),
            ("temperature", json!(0.1)),
            ("params", json!({"seed": 1})),
        ] {
            let mut other = base.clone();
            other[field] = value;
            assert_ne!(of(other), fp, "{field} decides the answer");
        }
        let embed = json!({"request_id": "r1", "kind": "embedding", "input": "hi"});
        let many = json!({"request_id": "r1", "kind": "embedding", "input": ["hi"]});
        assert_ne!(of(embed.clone()), fp);
        assert_ne!(
            of(embed),
            of(many),
            "one input and a list of one answer differently"
        );
    }
}
