//! Why a request ends in the dead-letter queue: one enum that gives the `x-error-kind` header
//! value, the `error.kind` of the error result and the `error_kind` metric label.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// The kind of a terminal failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The message is not a request llmq can serve (bad JSON, a missing or wrong field).
    InvalidRequest,
    /// The body is larger than `worker.max_body_bytes`.
    TooLarge,
    /// The upstream refused the request in a way a retry cannot fix (4xx, an unparsable
    /// answer).
    UpstreamPermanent,
    /// Transient failures used up `retry.max_attempts`.
    RetriesExhausted,
    /// The worker itself failed (a panic while handling the message).
    InternalError,
    /// The message was delivered again and again without being settled (its worker
    /// crashed, or still held it at its shutdown deadline) more than `retry.max_redeliveries` times.
    RedeliveryLimit,
    /// The answer, serialized, is larger than `worker.max_result_bytes`.
    ResultTooLarge,
    /// The `request_id` was answered before for a different request of the same identity.
    IdempotencyConflict,
    /// Rate limits (429s, deployments of the model cooling down after them) lasted longer
    /// than `retry.max_rate_limited_secs` in all.
    RateLimited,
    /// No deployment could serve the model because of failures (circuit breakers open after
    /// connection errors, timeouts or 5xx) for longer than `retry.max_unavailable_secs` in
    /// all: an outage, not a rate limit; replayable once the upstream is back.
    UpstreamUnavailable,
    /// Every deployment that could serve the model, and every fallback, answered
    /// `insufficient_quota`: the accounts are spent.
    QuotaExhausted,
    /// The request's deadline (its `deadline`, or `timestamp` plus `worker.max_age_secs`)
    /// passed before it was answered.
    Expired,
    /// Its tenant had spent its day's or month's budget (`max_usd_per_day`,
    /// `max_usd_per_month`): not called; replayable once the budget resets.
    BudgetExceeded,
}

impl ErrorKind {
    /// Every kind, for listings and tests.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::InvalidRequest,
        ErrorKind::TooLarge,
        ErrorKind::UpstreamPermanent,
        ErrorKind::RetriesExhausted,
        ErrorKind::InternalError,
        ErrorKind::RedeliveryLimit,
        ErrorKind::ResultTooLarge,
        ErrorKind::IdempotencyConflict,
        ErrorKind::RateLimited,
        ErrorKind::UpstreamUnavailable,
        ErrorKind::QuotaExhausted,
        ErrorKind::Expired,
        ErrorKind::BudgetExceeded,
    ];

    /// The wire name: the `x-error-kind` value, `error.kind` and the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::UpstreamPermanent => "upstream_permanent",
            ErrorKind::RetriesExhausted => "retries_exhausted",
            ErrorKind::InternalError => "internal_error",
            ErrorKind::RedeliveryLimit => "redelivery_limit",
            ErrorKind::ResultTooLarge => "result_too_large",
            ErrorKind::IdempotencyConflict => "idempotency_conflict",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::UpstreamUnavailable => "upstream_unavailable",
            ErrorKind::QuotaExhausted => "quota_exhausted",
            ErrorKind::Expired => "expired",
            ErrorKind::BudgetExceeded => "budget_exceeded",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an [`ErrorKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error kind {0:?}")]
pub struct UnknownErrorKind(pub String);

impl FromStr for ErrorKind {
    type Err = UnknownErrorKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownErrorKind(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_and_match_serde() {
        for kind in ErrorKind::ALL {
            assert_eq!(kind.as_str().parse::<ErrorKind>(), Ok(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap_or_default(),
                serde_json::Value::String(kind.as_str().into())
            );
        }
        assert!("retries-exhausted".parse::<ErrorKind>().is_err());
    }
}
