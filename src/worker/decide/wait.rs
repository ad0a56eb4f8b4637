//! Waits that use no attempt: a rate limit (429s) and an outage (every deployment of the
//! model down). Each is bounded by the time since the request first met it, counted across
//! deliveries by its own header, and each ends in a dead letter of its own kind, so that an
//! outage never reads as a rate limit.

use std::time::Duration;

use super::{Decision, Input, ends_past_deadline};
use crate::contract::ErrorKind;

/// What a request is waiting out, and for how long it may.
struct Bound<'a> {
    /// Unix ms of the first such wait (from its header: a time in the future counts as now).
    since_ms: Option<i64>,
    /// Longest in all.
    limit: Duration,
    /// The dead letter's kind past it.
    kind: ErrorKind,
    /// The words of the dead letter: "<what> for N s in all (<key> is M)".
    what: &'a str,
    /// The configuration key of `limit`.
    key: &'a str,
}

/// After a rate limit (a 429, or every deployment cooling down after one): no attempt is
/// used; the request waits until a deployment can serve, here or in a retry tier, for at
/// most `retry.max_rate_limited_secs` since the first rate limit it met. A 429 that named
/// no time, with nowhere else to go, is retried after a short backoff that grows with each
/// one in this delivery (the deployment's lowered concurrency limit does the rest).
pub(super) fn after_rate_limit(i: &Input<'_>, after: Option<Duration>, reason: &str) -> Decision {
    let bound = Bound {
        since_ms: i.rate_limited_since_ms,
        limit: i.policy.max_rate_limited(),
        kind: ErrorKind::RateLimited,
        what: "rate limited",
        key: "retry.max_rate_limited_secs",
    };
    if let Some(over) = past(i, &bound, after, reason) {
        return over;
    }
    let delay = match after {
        Some(after) => after,
        // The first 429 of a delivery is retried at once: the limit that caused it is lower
        // now. Later ones back off, so a deployment answering nothing but 429s is not
        // spun on.
        None if i.rate_limits <= 1 => Duration::ZERO,
        None => i
            .policy
            .delay(i.rate_limits - 1, None, i.jitter)
            .min(i.policy.inline_max()),
    };
    wait(i, delay, reason)
}

/// After an outage (every deployment of the model down, its breaker open, none cooling
/// down after a 429): no attempt is used; the request waits until a breaker lets a call
/// through, for at most `retry.max_unavailable_secs` since it first found none, then is
/// dead-lettered `upstream_unavailable`.
pub(super) fn after_unavailable(i: &Input<'_>, after: Option<Duration>, reason: &str) -> Decision {
    let bound = Bound {
        since_ms: i.unavailable_since_ms,
        limit: i.policy.max_unavailable(),
        kind: ErrorKind::UpstreamUnavailable,
        what: "upstream unavailable",
        key: "retry.max_unavailable_secs",
    };
    if let Some(over) = past(i, &bound, after, reason) {
        return over;
    }
    // The router always says when a breaker lets a call through; without a time, the
    // first backoff step, so that an outage is never spun on.
    let delay = after.unwrap_or_else(|| i.policy.delay(1, None, i.jitter));
    wait(i, delay, reason)
}

/// The dead letter of a request that waited as long as `bound` allows, or whose next wait
/// (`after`) would end past it: the request would only come back to be dead-lettered (a
/// Retry-After of a day must not park it for a day).
fn past(
    i: &Input<'_>,
    bound: &Bound<'_>,
    after: Option<Duration>,
    reason: &str,
) -> Option<Decision> {
    let since = bound
        .since_ms
        .filter(|since| *since <= i.now_ms)
        .unwrap_or(i.now_ms);
    let waited = Duration::from_millis(i.now_ms.saturating_sub(since).unsigned_abs());
    let limit = bound.limit;
    if waited < limit && waited + after.unwrap_or(Duration::ZERO) <= limit {
        return None;
    }
    let told = match after {
        Some(after) if waited < limit => format!(", and told to wait {} s more", after.as_secs()),
        _ => String::new(),
    };
    Some(Decision::DeadLetter {
        kind: bound.kind,
        reason: format!(
            "{} for {} s in all ({} is {}){told}; last: {reason}",
            bound.what,
            waited.as_secs(),
            bound.key,
            limit.as_secs(),
        ),
    })
}

/// Waits `delay`: here when it is short, else in a retry tier (counts unchanged); expired
/// now rather than after a wait that would end past the deadline.
fn wait(i: &Input<'_>, delay: Duration, reason: &str) -> Decision {
    if let Some(expired) = ends_past_deadline(i, delay) {
        return expired;
    }
    if delay > i.policy.inline_max() {
        Decision::retry_tier(i, delay, reason)
    } else if i.stopping {
        Decision::HandBack
    } else {
        Decision::RetryInline { after: delay }
    }
}
