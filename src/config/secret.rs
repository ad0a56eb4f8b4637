//! Secrets that never print: an API key, and URLs whose password is hidden.
//!
//! `Debug` and `Display` hide them; `Serialize` writes the real value, because the one
//! serialized form of the configuration ([`Config::to_toml`](crate::config::Config::to_toml))
//! is the private file handed to a child `llmq` process
//! ([`child_command`](crate::config::child_command)), which needs the secrets to work. Never
//! log or return a serialized configuration.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string: prints as `***` in `Debug` and `Display`, so it never reaches a log.
/// `Serialize` writes the value itself (see the module documentation).
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

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
/// writes the URL with its password (see the module documentation).
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

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
