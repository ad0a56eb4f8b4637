//! Secrets that never print: an API key, and URLs whose password is hidden.
//!
//! `Debug` and `Display` hide them; `Serialize` writes the real value, because the
//! serialized form of the configuration ([`Config::to_toml`](crate::config::Config::to_toml))
//! is the private file handed to a child `llmq` process
//! ([`child_command`](crate::config::child_command)), which needs the secrets to work. Never
//! log or return it. The one form that may be printed is
//! [`Config::to_redacted_toml`](crate::config::Config::to_redacted_toml) (`llmq config
//! check`): serialized inside [`redacted`], every secret writes itself hidden.

use std::{cell::Cell, fmt};

use serde::{Deserialize, Serialize, Serializer};

thread_local! {
    /// Set while [`redacted`] runs on this thread: secrets serialize hidden.
    static REDACTING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every [`Secret`] and [`SecretUrl`] serialized as it prints (`***`, a URL
/// with its password hidden). Serialization is synchronous, so the thread's flag covers
/// exactly what `f` serializes; it is reset even if `f` panics.
pub fn redacted<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            REDACTING.with(|r| r.set(self.0));
        }
    }
    let _reset = Reset(REDACTING.with(|r| r.replace(true)));
    f()
}

fn redacting() -> bool {
    REDACTING.with(Cell::get)
}

/// A secret string: prints as `***` in `Debug` and `Display`, so it never reaches a log.
/// `Serialize` writes the value itself, except inside [`redacted`] (see the module
/// documentation).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match redacting() {
            // An unset secret stays visibly unset.
            true if !self.0.is_empty() => s.serialize_str("***"),
            _ => s.serialize_str(&self.0),
        }
    }
}

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A URL whose password prints as `***` (`amqp://user:***@host:5672/%2f`). `Serialize`
/// writes the URL with its password, except inside [`redacted`] (see the module
/// documentation).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if redacting() {
            s.serialize_str(&self.redacted())
        } else {
            s.serialize_str(&self.0)
        }
    }
}

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
    /// The URL with its password, for the one place that connects.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The URL as it may be printed.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Replaces the password of a URL with `***`; a string that does not parse is hidden whole
/// past its scheme, since it may still hold a password.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        // Without a host (`amqp:user:pw@host`) the parser sees no password to replace.
        Ok(url) if url.cannot_be_a_base() || !url.has_host() => format!("{}://***", url.scheme()),
        Ok(mut url) => {
            if url.password().is_some() && url.set_password(Some("***")).is_err() {
                return format!("{}://***", url.scheme());
            }
            url.to_string()
        }
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None => "***".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn a_redacted_configuration_hides_every_secret_and_only_there() {
        let mut c = Config::default();
        c.amqp.url = Some(SecretUrl::new("amqp://u:canary-amqp@broker:5672/%2f"));
        c.llm.api_key = Secret::new("sk-canary-key");
        c.idempotency.redis_url = SecretUrl::new("redis://:canary-redis@cache:6379");
        let redacted = c.to_redacted_toml().unwrap();
        assert!(!redacted.contains("canary"), "{redacted}");
        assert!(
            redacted.contains("amqp://u:***@broker:5672/%2f"),
            "{redacted}"
        );
        assert!(redacted.contains("api_key = \"***\""), "{redacted}");
        // The child's file, serialized after, still carries them: the flag was reset.
        let full = c.to_toml().unwrap();
        for secret in ["canary-amqp", "sk-canary-key", "canary-redis"] {
            assert!(full.contains(secret), "{secret}");
        }
        // An unset key stays visibly unset.
        let unset = Config::default().to_redacted_toml().unwrap();
        assert!(unset.contains("api_key = \"\""), "{unset}");
    }
}
