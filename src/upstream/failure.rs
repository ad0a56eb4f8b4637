//! A failed upstream call, classified once where it happens: by the HTTP client (the
//! transport), its provider (an answer's status and error body, a stream's error event)
//! or the router (no deployment can serve).

use std::time::Duration;

use reqwest::StatusCode;

/// Longest error text kept from an upstream answer.
pub const MAX_ERROR_TEXT: usize = 1024;

/// A failed upstream call, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// Worth retrying later: 408, 409, 5xx, a timeout, a connection error.
    #[error("transient upstream failure: {message}")]
    Transient {
        /// What happened.
        message: String,
        /// The upstream's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
        /// The upstream pushed back (a timeout): the concurrency limit should drop.
        throttle: bool,
    },
    /// A 429 that is not a spent account: flow control, not a failure of the request.
    #[error("rate limited: {message}")]
    RateLimited {
        /// What happened.
        message: String,
        /// When to come back, if the upstream said (`Retry-After`, `retry-after-ms`, or the
        /// reset of an exhausted `x-ratelimit-*` budget). Without it, only the concurrency
        /// limit drops.
        retry_after: Option<Duration>,
    },
    /// A 429 whose error type or code is `insufficient_quota`: the account is spent.
    #[error("quota exhausted: {message}")]
    QuotaExhausted {
        /// What happened.
        message: String,
    },
    /// The prompt is longer than the model's context window.
    #[error("context length exceeded: {message}")]
    ContextLength {
        /// What happened.
        message: String,
    },
    /// 401, 403 or 404: this deployment cannot serve this model (a bad key, no access, a
    /// model it does not have); another deployment may.
    #[error("refused by the deployment: {message}")]
    Refused {
        /// What happened.
        message: String,
    },
    /// Will fail the same way every time.
    #[error("permanent upstream failure: {message}")]
    Permanent {
        /// What happened.
        message: String,
    },
}

impl LlmError {
    /// Whether the upstream pushed back (a 429 or a timeout).
    pub fn is_throttle(&self) -> bool {
        matches!(
            self,
            LlmError::Transient { throttle: true, .. } | LlmError::RateLimited { .. }
        )
    }

    /// When the upstream said to come back, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            LlmError::Transient { retry_after, .. } | LlmError::RateLimited { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The outcome label of `llmq_upstream_calls_total`.
    pub fn label(&self) -> &'static str {
        match self {
            LlmError::Transient { .. } => "transient",
            LlmError::RateLimited { .. } => "rate_limited",
            LlmError::QuotaExhausted { .. } => "quota",
            LlmError::ContextLength { .. } => "context_length",
            LlmError::Refused { .. } => "auth",
            LlmError::Permanent { .. } => "permanent",
        }
    }
}

/// 429, 408, 409 and 5xx may succeed later; every other failure status will not.
pub fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        for s in [429, 408, 409, 500, 502, 503, 504] {
            assert!(
                is_transient_status(StatusCode::from_u16(s).expect("status")),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(
                !is_transient_status(StatusCode::from_u16(s).expect("status")),
                "{s}"
            );
        }
    }
}
