//! What a request may ask for: the limits and allowlists [`super::request::parse`] checks,
//! built once at start-up (the `reply_to` pattern compiled then, not per message).
//!
//! Every field of a message comes from a stranger: a `max_tokens` of 2^32, an `n` of 99, a
//! `store: true` that keeps the caller's data at the provider, a `reply_to` naming one of
//! llmq's own queues, no `user_id` where tenants are held to limits. Each is refused as
//! `invalid_request`, before any upstream call.

use std::collections::BTreeSet;

use super::{identity::IdentityRule, reply_to::ReplyToPolicy};

/// Default of `llm.max_tokens_cap`.
pub const DEFAULT_MAX_TOKENS_CAP: u64 = 32_768;
/// Default of `llm.max_n`.
pub const DEFAULT_MAX_N: u64 = 4;
/// Default of `llm.allowed_params`: the OpenAI chat and embeddings fields whose cost the
/// caps bound (`max_tokens_cap`, `max_n`) and that keep nothing at the provider. Left out,
/// each for its reason (the README's table says them all): `store` and `metadata` (stored
/// completions: the provider keeps the conversation), `service_tier` (a dearer tier),
/// `audio` and `modalities` (audio output, dearer per token, and the result would not carry
/// it), `prediction` (rejected predicted tokens are billed beyond what the caps bound),
/// `web_search_options` (searches billed per call), `functions` and `function_call`
/// (deprecated for `tools`).
pub const DEFAULT_ALLOWED_PARAMS: [&str; 23] = [
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "reasoning_effort",
    "verbosity",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "logprobs",
    "top_logprobs",
    "dimensions",
    "encoding_format",
];
/// Body fields llmq sets itself: never accepted in `params`, whatever the allowlist says.
/// (A request streams with the top-level `"stream": true`; llmq then sets both `stream`
/// and `stream_options` upstream.)
pub const RESERVED_PARAMS: [&str; 5] = ["model", "messages", "input", "stream", "stream_options"];
/// Parameters capped by [`Rules::max_tokens_cap`].
const TOKEN_PARAMS: [&str; 2] = ["max_tokens", "max_completion_tokens"];

/// The limits a request is checked against.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Bodies larger than this are `too_large`, refused before parsing.
    pub max_body_bytes: usize,
    /// Highest `max_tokens` / `max_completion_tokens`.
    pub max_tokens_cap: u64,
    /// Highest `n` (choices per chat request; each is paid for).
    pub max_n: u64,
    /// Models a request may name; empty allows any.
    pub allowed_models: BTreeSet<String>,
    /// Parameters a request may send, in `params` or at the top level:
    /// `llm.allowed_params` and `llm.extra_allowed_params` together.
    pub allowed_params: BTreeSet<String>,
    /// Where the identity is read from, and whether a request must carry one.
    pub identity: IdentityRule,
    /// Where results may be sent.
    pub reply_to: ReplyToPolicy,
    /// `worker.max_age_secs`: a request older than this (from its `timestamp`) is expired;
    /// 0 = no age limit.
    pub max_age_secs: u64,
}

impl Default for Rules {
    /// The configuration's defaults, with no queue of llmq's known: for tests and tools.
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_tokens_cap: DEFAULT_MAX_TOKENS_CAP,
            max_n: DEFAULT_MAX_N,
            allowed_models: BTreeSet::new(),
            allowed_params: DEFAULT_ALLOWED_PARAMS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            identity: IdentityRule::default(),
            reply_to: ReplyToPolicy::default(),
            max_age_secs: 0,
        }
    }
}

impl Rules {
    /// Why `model` may not be asked for, if it may not.
    pub fn check_model(&self, model: &str) -> Result<(), String> {
        if self.allowed_models.is_empty() || self.allowed_models.contains(model) {
            return Ok(());
        }
        Err(format!(
            "field `model`: {model:?} is not one of llm.allowed_models"
        ))
    }

    /// Why the parameter `key` with `value` may not be sent upstream, if it may not.
    pub fn check_param(&self, key: &str, value: &serde_json::Value) -> Result<(), String> {
        if RESERVED_PARAMS.contains(&key) {
            return Err(format!(
                "field `params.{key}`: set by llmq, not allowed in params"
            ));
        }
        if !self.allowed_params.contains(key) {
            return Err(format!(
                "parameter `{key}` is not allowed (llm.allowed_params)"
            ));
        }
        let cap = if TOKEN_PARAMS.contains(&key) {
            Some((self.max_tokens_cap, "llm.max_tokens_cap"))
        } else if key == "n" {
            Some((self.max_n, "llm.max_n"))
        } else {
            None
        };
        if let Some((cap, cap_key)) = cap {
            match value.as_u64() {
                Some(v) if (1..=cap).contains(&v) => {}
                Some(v) if v > cap => {
                    return Err(format!("parameter `{key}`: {v} is over {cap_key} = {cap}"));
                }
                _ => {
                    return Err(format!(
                        "parameter `{key}`: must be a whole number from 1 to {cap}, got {value}"
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn any_model_unless_restricted() {
        let mut rules = Rules::default();
        assert_eq!(rules.check_model("anything"), Ok(()));
        rules.allowed_models = ["a".to_string()].into();
        assert_eq!(rules.check_model("a"), Ok(()));
        assert_eq!(
            rules.check_model("b"),
            Err("field `model`: \"b\" is not one of llm.allowed_models".into())
        );
    }

    #[test]
    fn params_off_the_allowlist_are_named() {
        let rules = Rules::default();
        assert_eq!(rules.check_param("temperature", &json!(0.2)), Ok(()));
        assert_eq!(rules.check_param("user", &json!("u1")), Ok(()));
        assert_eq!(
            rules.check_param("store", &json!(true)),
            Err("parameter `store` is not allowed (llm.allowed_params)".into())
        );
        assert!(rules.check_param("service_tier", &json!("flex")).is_err());
    }

    #[test]
    fn reserved_params_are_refused_even_when_allowed() {
        let mut rules = Rules::default();
        rules.allowed_params.insert("stream".into());
        for key in RESERVED_PARAMS {
            assert_eq!(
                rules.check_param(key, &json!(true)),
                Err(format!(
                    "field `params.{key}`: set by llmq, not allowed in params"
                ))
            );
        }
    }

    #[test]
    fn caps() {
        let rules = Rules::default();
        assert_eq!(rules.check_param("max_tokens", &json!(32_768)), Ok(()));
        assert_eq!(
            rules.check_param("max_tokens", &json!(4_294_967_295u64)),
            Err("parameter `max_tokens`: 4294967295 is over llm.max_tokens_cap = 32768".into())
        );
        assert!(
            rules
                .check_param("max_completion_tokens", &json!(32_769))
                .is_err()
        );
        assert_eq!(rules.check_param("n", &json!(4)), Ok(()));
        assert_eq!(
            rules.check_param("n", &json!(99)),
            Err("parameter `n`: 99 is over llm.max_n = 4".into())
        );
        for bad in [json!(0), json!(-1), json!(1.5), json!("5"), json!(null)] {
            let e = rules.check_param("n", &bad).expect_err("refused");
            assert!(e.contains("whole number from 1 to 4"), "{bad}: {e}");
        }
    }
}
