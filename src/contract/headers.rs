//! Every AMQP header llmq reads or writes, with its readers and writers.
//!
//! - On a request waiting for another attempt: [`ATTEMPTS`], [`REDELIVERIES`],
//!   [`FIRST_FAILURE`], [`RATE_LIMITED_SINCE`], [`UNAVAILABLE_SINCE`], [`NOT_BEFORE`],
//!   [`LAST_ERROR`] and [`RETRY_TIER`] ([`RetryState`],
//!   [`stamp_retry`], [`stamp_redelivery`]).
//! - On a dead letter: the `x-error-*` family ([`Failure`], [`stamp_dead_letter`],
//!   [`DeadLetterInfo`]).
//!
//! Writers take the current time as an argument, so everything here is pure.

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};

use super::error_kind::ErrorKind;

/// Upstream attempts made before this delivery (a count that travels with the message).
pub const ATTEMPTS: &str = "x-llmq-attempts";
/// Times the request was delivered again without being settled (a worker crashed, or
/// still held it at its shutdown deadline), counted apart from attempts.
pub const REDELIVERIES: &str = "x-llmq-redeliveries";
/// Unix seconds of the request's first failure.
pub const FIRST_FAILURE: &str = "x-llmq-first-failure";
/// Unix milliseconds of the first rate limit the request met (a 429, or every deployment
/// of its model cooling down after one): rate limits are bounded by the time since, not by
/// attempts.
pub const RATE_LIMITED_SINCE: &str = "x-llmq-rate-limited-since";
/// Unix milliseconds of the first time the request found every deployment of its model
/// down (circuit breakers open): outages are bounded by the time since, not by attempts.
pub const UNAVAILABLE_SINCE: &str = "x-llmq-unavailable-since";
/// Unix milliseconds before which the request must not be tried again.
pub const NOT_BEFORE: &str = "x-llmq-not-before";
/// An earlier attempt of a streamed request may have sent deltas to its `reply_to`: the
/// next attempt starts with a restart marker.
pub const STREAMED: &str = "x-llmq-streamed";
/// The last transient error, for people reading a retry queue.
pub const LAST_ERROR: &str = "x-llmq-last-error";
/// Which delayed-retry queue a message goes to. The retry exchange is a headers exchange,
/// which ignores header names starting with `x-` when matching, hence no prefix.
pub const RETRY_TIER: &str = "llmq-retry-tier";

/// The id of one mandatory publish, `<process nonce>.<channel>.<ticket>`, so that a
/// `basic.return` is matched to the publish it belongs to (lapin hands a return to whichever
/// confirm completes next, see [`crate::broker::returns`]). Overwritten on every mandatory
/// publish; meaningless to anyone else.
pub const PUBLISH_ID: &str = "x-llmq-publish-id";

/// A dead letter's [`ErrorKind`].
pub const ERROR_KIND: &str = "x-error-kind";
/// A dead letter's reason (at most [`MAX_ERROR_TEXT`] bytes).
pub const ERROR: &str = "x-error";
/// Upstream attempts made before the request was dead-lettered.
pub const DEAD_ATTEMPTS: &str = "x-attempts";
/// Unix seconds of the first failure (an AMQP timestamp).
pub const DEAD_FIRST_FAILURE: &str = "x-first-failure";
/// Unix seconds of the failure that dead-lettered it (an AMQP timestamp).
pub const DEAD_LAST_FAILURE: &str = "x-last-failure";
/// The replica that dead-lettered it.
pub const WORKER: &str = "x-worker";
/// The exchange the request was published to.
pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
/// The routing key the request was published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
/// The broker's own dead-lettering history (set by the retry tiers' hop back).
pub const X_DEATH: &str = "x-death";

/// Longest error text written to a header.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Reads an integer header of any AMQP integer type (or a timestamp).
pub fn get_i64(props: &BasicProperties, name: &str) -> Option<i64> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match *value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(v)),
        AMQPValue::ShortInt(v) => Some(i64::from(v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(v)),
        AMQPValue::LongInt(v) => Some(i64::from(v)),
        AMQPValue::LongUInt(v) => Some(i64::from(v)),
        AMQPValue::LongLongInt(v) => Some(v),
        AMQPValue::Timestamp(v) => i64::try_from(v).ok(),
        _ => None,
    }
}

/// Reads a non-negative integer header that fits a `u32`, e.g. an attempt count.
pub fn get_u32(props: &BasicProperties, name: &str) -> Option<u32> {
    u32::try_from(get_i64(props, name)?).ok()
}

/// Reads a string header.
pub fn get_str(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn count(n: u32) -> AMQPValue {
    AMQPValue::LongInt(i32::try_from(n).unwrap_or(i32::MAX))
}

/// What a request carries of its earlier attempts. Every value comes from the publisher
/// and may be forged: readers bound what they do with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryState {
    /// Upstream attempts already made ([`ATTEMPTS`]).
    pub attempts: u32,
    /// Unsettled deliveries already counted ([`REDELIVERIES`]).
    pub redeliveries: u32,
    /// Unix seconds of the first failure ([`FIRST_FAILURE`]).
    pub first_failure: Option<i64>,
    /// Unix milliseconds before which it must not be tried ([`NOT_BEFORE`]).
    pub not_before_ms: Option<i64>,
    /// Unix milliseconds of the first rate limit ([`RATE_LIMITED_SINCE`]).
    pub rate_limited_since_ms: Option<i64>,
    /// Unix milliseconds of the first outage ([`UNAVAILABLE_SINCE`]).
    pub unavailable_since_ms: Option<i64>,
    /// Deltas may have gone out before ([`STREAMED`]).
    pub streamed: bool,
}

impl RetryState {
    /// Reads the retry headers of a delivery.
    pub fn read(props: &BasicProperties) -> Self {
        Self {
            attempts: get_u32(props, ATTEMPTS).unwrap_or(0),
            redeliveries: get_u32(props, REDELIVERIES).unwrap_or(0),
            first_failure: get_i64(props, FIRST_FAILURE),
            not_before_ms: get_i64(props, NOT_BEFORE),
            rate_limited_since_ms: get_i64(props, RATE_LIMITED_SINCE),
            unavailable_since_ms: get_i64(props, UNAVAILABLE_SINCE),
            streamed: get_i64(props, STREAMED).is_some_and(|v| v > 0),
        }
    }
}

/// Stamps a request bound for the delayed-retry tier `tier`.
pub fn stamp_retry(headers: &mut FieldTable, tier: &str, state: &RetryState, last_error: &str) {
    headers.insert(RETRY_TIER.into(), long_string(tier));
    stamp_counts(headers, state);
    if let Some(not_before) = state.not_before_ms {
        headers.insert(NOT_BEFORE.into(), AMQPValue::LongLongInt(not_before));
    }
    headers.insert(
        LAST_ERROR.into(),
        long_string(crate::truncate(last_error, MAX_ERROR_TEXT)),
    );
    if let Some(first) = state.first_failure {
        headers.insert(FIRST_FAILURE.into(), AMQPValue::LongLongInt(first));
    }
}

/// Stamps a request going back to its own queue after an unsettled delivery, with its
/// counts (`state.redeliveries` already counting this one).
pub fn stamp_redelivery(headers: &mut FieldTable, state: &RetryState) {
    stamp_counts(headers, state);
}

fn stamp_counts(headers: &mut FieldTable, state: &RetryState) {
    headers.insert(ATTEMPTS.into(), count(state.attempts));
    if let Some(since) = state.rate_limited_since_ms {
        headers.insert(RATE_LIMITED_SINCE.into(), AMQPValue::LongLongInt(since));
    }
    if let Some(since) = state.unavailable_since_ms {
        headers.insert(UNAVAILABLE_SINCE.into(), AMQPValue::LongLongInt(since));
    }
    if state.streamed {
        headers.insert(STREAMED.into(), count(1));
    }
    // The count only grows (a replay starts a message afresh by dropping it): a zero needs
    // no header.
    if state.redeliveries > 0 {
        headers.insert(REDELIVERIES.into(), count(state.redeliveries));
    }
}

/// What the worker knows about a terminal failure, written to the dead letter's headers.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    /// [`ERROR_KIND`].
    pub kind: ErrorKind,
    /// [`ERROR`] (truncated to [`MAX_ERROR_TEXT`]).
    pub reason: &'a str,
    /// [`DEAD_ATTEMPTS`].
    pub attempts: u32,
    /// Unix seconds of the first failure.
    pub first_failure: i64,
    /// This worker.
    pub worker: &'a str,
}

/// Stamps a dead letter: the failure, the time `now` (Unix seconds), and where the request
/// was first published so it can be replayed there.
pub fn stamp_dead_letter(
    headers: &mut FieldTable,
    failure: &Failure<'_>,
    now: i64,
    exchange: &str,
    routing_key: &str,
) {
    let ts = |t: i64| AMQPValue::Timestamp(u64::try_from(t).unwrap_or(0));
    headers.insert(ERROR_KIND.into(), long_string(failure.kind.as_str()));
    headers.insert(
        ERROR.into(),
        long_string(crate::truncate(failure.reason, MAX_ERROR_TEXT)),
    );
    headers.insert(DEAD_ATTEMPTS.into(), count(failure.attempts));
    headers.insert(DEAD_FIRST_FAILURE.into(), ts(failure.first_failure));
    headers.insert(DEAD_LAST_FAILURE.into(), ts(now));
    headers.insert(WORKER.into(), long_string(failure.worker));
    headers.insert(ORIGINAL_EXCHANGE.into(), long_string(exchange));
    headers.insert(ORIGINAL_ROUTING_KEY.into(), long_string(routing_key));
}

/// A dead letter's headers, as `llmq dlq list` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// [`ERROR_KIND`] as written (`unknown` when absent).
    pub kind: String,
    /// [`ERROR`].
    pub reason: String,
    /// [`DEAD_ATTEMPTS`].
    pub attempts: u32,
    /// [`DEAD_LAST_FAILURE`].
    pub last_failure: Option<i64>,
    /// [`ORIGINAL_ROUTING_KEY`].
    pub original_routing_key: Option<String>,
}

impl DeadLetterInfo {
    /// Reads a dead letter's headers.
    pub fn read(props: &BasicProperties) -> Self {
        Self {
            kind: get_str(props, ERROR_KIND).unwrap_or_else(|| "unknown".into()),
            reason: get_str(props, ERROR).unwrap_or_default(),
            attempts: get_u32(props, DEAD_ATTEMPTS).unwrap_or(0),
            last_failure: get_i64(props, DEAD_LAST_FAILURE),
            original_routing_key: get_str(props, ORIGINAL_ROUTING_KEY),
        }
    }
}

/// A dead letter's headers made ready for replay: the failure and retry headers dropped,
/// and the attempt count kept (the dead letter's, which is the final one) or, with
/// `reset_attempts`, dropped with the first failure so the request starts afresh.
pub fn for_replay(props: &BasicProperties, reset_attempts: bool) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(old) = props.headers() {
        for (k, v) in old.inner() {
            let name = k.as_str();
            let drop = name.starts_with(ERROR)
                || matches!(
                    name,
                    DEAD_ATTEMPTS
                        | DEAD_FIRST_FAILURE
                        | DEAD_LAST_FAILURE
                        | WORKER
                        | ORIGINAL_EXCHANGE
                        | ORIGINAL_ROUTING_KEY
                        | X_DEATH
                        | NOT_BEFORE
                        | RETRY_TIER
                        | LAST_ERROR
                        | REDELIVERIES
                        | RATE_LIMITED_SINCE
                        | UNAVAILABLE_SINCE
                )
                || (reset_attempts && matches!(name, ATTEMPTS | FIRST_FAILURE));
            if !drop {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    if !reset_attempts {
        let n = get_u32(props, DEAD_ATTEMPTS).max(get_u32(props, ATTEMPTS));
        if let Some(n) = n {
            headers.insert(ATTEMPTS.into(), count(n));
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(headers: FieldTable) -> BasicProperties {
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn integers_of_every_width_read_and_forged_ones_do_not_panic() {
        let mut h = FieldTable::default();
        h.insert("a".into(), AMQPValue::ShortShortUInt(7));
        h.insert("b".into(), AMQPValue::LongLongInt(-3));
        h.insert("c".into(), AMQPValue::Timestamp(u64::MAX));
        h.insert("d".into(), long_string("12"));
        let p = props(h);
        assert_eq!(get_u32(&p, "a"), Some(7));
        assert_eq!(get_i64(&p, "b"), Some(-3));
        assert_eq!(get_u32(&p, "b"), None, "negative is no count");
        assert_eq!(get_i64(&p, "c"), None, "out of range");
        assert_eq!(get_i64(&p, "d"), None, "a string is not a number");
        assert_eq!(get_str(&p, "d").as_deref(), Some("12"));
        assert_eq!(get_str(&p, "missing"), None);
    }

    #[test]
    fn retry_stamp_reads_back() {
        let mut h = FieldTable::default();
        let state = RetryState {
            attempts: 3,
            redeliveries: 2,
            first_failure: Some(1_700_000_000),
            not_before_ms: Some(1_700_000_000_500),
            rate_limited_since_ms: Some(1_700_000_000_250),
            unavailable_since_ms: Some(1_700_000_000_125),
            streamed: true,
        };
        stamp_retry(&mut h, "30s", &state, &"e".repeat(5000));
        let p = props(h);
        assert_eq!(RetryState::read(&p), state);
        assert_eq!(get_str(&p, RETRY_TIER).as_deref(), Some("30s"));
        assert_eq!(
            get_str(&p, LAST_ERROR).map(|s| s.len()),
            Some(MAX_ERROR_TEXT)
        );
    }

    #[test]
    fn dead_letter_stamp_reads_back_and_replay_strips_it() {
        let mut h = FieldTable::default();
        h.insert("x-custom".into(), long_string("kept"));
        stamp_retry(
            &mut h,
            "5s",
            &RetryState {
                attempts: 2,
                rate_limited_since_ms: Some(1),
                unavailable_since_ms: Some(2),
                ..Default::default()
            },
            "boom",
        );
        let failure = Failure {
            kind: ErrorKind::RetriesExhausted,
            reason: "gave up",
            attempts: 4,
            first_failure: 100,
            worker: "w1",
        };
        stamp_dead_letter(&mut h, &failure, 200, "llm_requests", "chat");
        let p = props(h);
        assert_eq!(
            DeadLetterInfo::read(&p),
            DeadLetterInfo {
                kind: "retries_exhausted".into(),
                reason: "gave up".into(),
                attempts: 4,
                last_failure: Some(200),
                original_routing_key: Some("chat".into()),
            }
        );
        let kept = props(for_replay(&p, false));
        let mut names: Vec<String> = kept
            .headers()
            .as_ref()
            .map(|h| h.inner().keys().map(|k| k.to_string()).collect())
            .unwrap_or_default();
        names.sort();
        assert_eq!(names, vec!["x-custom".to_string(), ATTEMPTS.to_string()]);
        assert_eq!(get_u32(&kept, ATTEMPTS), Some(4), "the final count");
        let reset = props(for_replay(&p, true));
        assert_eq!(get_u32(&reset, ATTEMPTS), None);
        assert_eq!(get_str(&reset, "x-custom").as_deref(), Some("kept"));
    }
}
