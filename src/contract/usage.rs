//! Token usage as an upstream reports it, typed where llmq reads it and verbatim elsewhere.
//!
//! The counts llmq uses (budgets, metrics) are fields; everything else the upstream sends
//! (`prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`,
//! a batch's `batched_with`, ...) is kept in [`Usage::other`] and passed on to the caller
//! untouched, so pricing can read it later.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// The `usage` object of an upstream answer and of a result.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    /// Tokens in the prompt (or the embedding inputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// Tokens generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// Tokens billed in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_tokens: Option<u64>,
    /// Every other field, verbatim (including a count above that was not a whole number).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Usage {
    /// Reads a usage object leniently: a count that is not a non-negative integer stays in
    /// [`Usage::other`] as it came, rather than failing the whole answer.
    pub fn from_map(mut map: Map<String, Value>) -> Self {
        let mut take = |name: &str| match map.get(name).and_then(Value::as_u64) {
            Some(n) => {
                map.remove(name);
                Some(n)
            }
            None => None,
        };
        let prompt_tokens = take("prompt_tokens");
        let completion_tokens = take("completion_tokens");
        let total_tokens = take("total_tokens");
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens,
            other: map,
        }
    }

    /// Tokens used in all: `total_tokens`, else prompt plus completion, when reported.
    pub fn total(&self) -> Option<u64> {
        self.total_tokens.or_else(|| {
            let (p, c) = (self.prompt_tokens, self.completion_tokens);
            (p.is_some() || c.is_some()).then(|| p.unwrap_or(0).saturating_add(c.unwrap_or(0)))
        })
    }
}

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Map::deserialize(d).map(Self::from_map)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let raw = json!({
            "prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 8},
            "completion_tokens_details": {"reasoning_tokens": 2}
        });
        let usage: Usage = serde_json::from_value(raw.clone()).unwrap_or_default();
        assert_eq!(usage.total(), Some(15));
        assert_eq!(usage.other["prompt_tokens_details"]["cached_tokens"], 8);
        assert_eq!(serde_json::to_value(&usage).ok(), Some(raw));
    }

    #[test]
    fn odd_counts_are_kept_not_fatal() {
        let usage: Usage = serde_json::from_value(json!({"prompt_tokens": 4, "total_tokens": -1}))
            .unwrap_or_default();
        assert_eq!(usage.prompt_tokens, Some(4));
        assert_eq!(usage.total_tokens, None);
        assert_eq!(usage.other["total_tokens"], -1);
        assert_eq!(usage.total(), Some(4), "falls back to prompt + completion");
        assert_eq!(Usage::default().total(), None);
    }
}
