//! Key-like strings taken out of upstream error text before it reaches logs, dead-letter
//! headers or error results: providers echo a rejected key ("Incorrect API key provided:
//! sk-proj-...") and proxies echo request headers.

use std::{borrow::Cow, sync::LazyLock};

use regex::{Captures, Regex};

/// What a secret is replaced with; whatever named it (`sk-`, `Bearer `, `api-key: `) stays.
const MASK: &str = "***";

/// One pass over the text: each alternative captures what stays in `keep`.
static SECRETS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?x)
        # OpenAI-style keys: sk-..., sk-proj-..., sk-ant-... (and a truncated one).
        \b(?P<sk>sk-)[A-Za-z0-9_\-]{6,}
        # Bearer tokens, wherever they appear.
        | (?P<bearer>(?i:\bbearer)\s+)[A-Za-z0-9._~+/\-]+=*
        # key: value and key=value forms, quoted or not, JSON included.
        | (?P<key>(?i:\b(?:x-)?(?:api[-_]?key|access[-_]?token|auth[-_]?token|secret[-_]?key|client[-_]?secret|password))
              ["']?\s*[:=]\s*["']?)
          [^\s"',;&}\]]+
        "#,
    )
    .expect("constant pattern")
});

/// `text` with every key-like string masked; borrowed when there was none.
pub fn scrub_secrets(text: &str) -> Cow<'_, str> {
    SECRETS.replace_all(text, |caps: &Captures| {
        let keep = ["sk", "bearer", "key"]
            .into_iter()
            .find_map(|name| caps.name(name))
            .map_or("", |m| m.as_str());
        format!("{keep}{MASK}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_keys() {
        assert_eq!(
            scrub_secrets("Incorrect API key provided: sk-abc123DEF456ghi789. See docs."),
            "Incorrect API key provided: sk-***. See docs."
        );
        assert_eq!(
            scrub_secrets("key sk-proj-Ab_cd-EF12gh34IJ56kl78 rejected"),
            "key sk-*** rejected"
        );
        assert_eq!(
            scrub_secrets(r#"{"error":{"message":"bad key sk-ant-api03-XYZxyz0123"}}"#),
            r#"{"error":{"message":"bad key sk-***"}}"#
        );
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(
            scrub_secrets("Authorization: Bearer eyJhbGciOi.J9.abc-def_ghi== was refused"),
            "Authorization: Bearer *** was refused"
        );
        assert_eq!(scrub_secrets("bearer abc123"), "bearer ***");
    }

    #[test]
    fn key_value_forms() {
        assert_eq!(
            scrub_secrets("header api-key: 0123abcd was invalid"),
            "header api-key: *** was invalid"
        );
        assert_eq!(
            scrub_secrets(r#"{"api_key": "AIzaSyA-1234", "x": 1}"#),
            r#"{"api_key": "***", "x": 1}"#
        );
        assert_eq!(
            scrub_secrets("x-api-key=abc&access_token=def"),
            "x-api-key=***&access_token=***"
        );
        assert_eq!(scrub_secrets("Password: hunter2"), "Password: ***");
    }

    #[test]
    fn ordinary_text_is_borrowed_untouched() {
        for text in [
            "HTTP 500: injected failure",
            "the task-abcdefghij failed",
            "model gpt-4o-mini is overloaded; ask again",
            "skip-this sk-short",
        ] {
            assert!(
                matches!(scrub_secrets(text), Cow::Borrowed(t) if t == text),
                "{text}"
            );
        }
    }
}
