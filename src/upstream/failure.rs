//! One classification of failure. A failure is classified once, where it happens: by the
//! HTTP client (a timeout, a broken connection: [`Failure::of_transport`]), by the rules
//! below for an answer's status and what its error body said (each provider reads its own
//! body format, then [`Failure::of_answer`] applies the same rules), or by the router and
//! the worker for their own refusals ([`Failure::llmq`]). Everything else is read from the
//! [`Failure`]: the retry decision ([`Failure::retry`]), the dead letter's
//! [`ErrorKind`] ([`Failure::kind`]), the metric labels ([`Failure::call_label`],
//! [`Failure::label`]) and the words it is logged and reported with ([`Failure::reason`]).
//!
//! A new class is one variant of [`Class`] and its arms here; a new rule is one line of
//! [`Failure::of_answer`] and its test.

use std::{fmt, time::Duration};

use reqwest::StatusCode;

use crate::contract::ErrorKind;

/// Longest error text kept from an upstream answer.
pub const MAX_ERROR_TEXT: usize = 1024;

/// Every `outcome` label of `llmq_upstream_calls_total` for a failed call to a deployment
/// ([`Failure::call_label`]; a call that did not fail is `ok`), for the zeroed series of
/// `/metrics` at start-up.
pub const CALL_LABELS: [&str; 6] = [
    "transient",
    "rate_limited",
    "quota",
    "context_length",
    "auth",
    "permanent",
];

/// Every `error_kind` label of `llmq_requests_failed_total` for a failure a retry may fix
/// ([`Failure::label`]); one it may not is labelled with its [`ErrorKind`].
pub const RETRY_LABELS: [&str; 3] = ["transient", "throttled", "rate_limited"];

/// What kind of failure it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Worth retrying later: 408, 409, 5xx, a connection error, a broken stream.
    Transient,
    /// A timeout: the upstream pushed back, so the concurrency limit drops; retried.
    Throttle,
    /// A 429 that is not a spent account, or every deployment that can serve cooling down
    /// after one: flow control, not a failure of the request.
    RateLimited,
    /// Every deployment that can serve is down (its circuit breaker open after connection
    /// errors, timeouts or 5xx), none cooling down after a 429: an outage, waited out
    /// without using attempts. Only the router says so; no answer is classified so.
    Unavailable,
    /// A 429 whose error type or code is `insufficient_quota`: the account is spent.
    Quota,
    /// The prompt is longer than the model's context window.
    ContextLength,
    /// 401, 403 or 404: this deployment cannot serve this model (a bad key, no access, a
    /// model it does not have); another deployment may.
    Refused,
    /// Will fail the same way every time: another 4xx, an answer that does not parse or is
    /// too large.
    Permanent,
    /// Ended by llmq for a reason of the given kind (a model no deployment serves, a
    /// deadline passed, a panic): never retried.
    Ended(ErrorKind),
}

/// What the worker does with a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Another attempt, after a backoff.
    Transient,
    /// Another attempt, after a backoff; the upstream pushed back.
    Throttle,
    /// Flow control: wait (not an attempt), bounded by `retry.max_rate_limited_secs`.
    RateLimited,
    /// An outage: wait (not an attempt), bounded by `retry.max_unavailable_secs`.
    Unavailable,
    /// Never: dead-letter it now.
    Permanent,
}

impl Class {
    /// The words a failure of this class begins with when an upstream answered it.
    fn words(self) -> &'static str {
        match self {
            Class::Transient | Class::Throttle => "transient upstream failure",
            Class::RateLimited => "rate limited",
            Class::Unavailable => "upstream unavailable",
            Class::Quota => "quota exhausted",
            Class::ContextLength => "context length exceeded",
            Class::Refused => "refused by the deployment",
            Class::Permanent | Class::Ended(_) => "permanent upstream failure",
        }
    }
}

/// What a 429 that named a time holds back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pushback {
    /// The deployment, for the model, for that time: a rate (the default, as long as
    /// nothing says otherwise).
    #[default]
    Rate,
    /// The deployment, for the model, for that time: its budget is spent
    /// (`x-ratelimit-remaining-*: 0`), which no lower concurrency cures.
    Spent,
    /// Only the refused call: a concurrency cap, found while other calls to the deployment
    /// were running, whose limit was cut to them (see [`crate::upstream::flow::limit::Flow::on_capped`]).
    Cap,
}

/// A failed call, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure.
    pub class: Class,
    /// When to come back, if the upstream said (`Retry-After`, `retry-after-ms`, the reset
    /// of an exhausted `x-ratelimit-*` budget) or the router knows (a cooldown's end).
    pub retry_after: Option<Duration>,
    /// For a 429 with a time: whether that time holds the deployment or only this call.
    pub pushback: Pushback,
    /// What happened, whole: for the logs, the error result and the dead letter.
    reason: String,
    /// Where in `reason` what happened starts, after the class's words.
    said_at: usize,
}

impl Failure {
    /// A failure of an upstream call: `message` after its class's words.
    pub fn upstream(class: Class, message: impl fmt::Display) -> Self {
        let words = class.words();
        Self {
            class,
            retry_after: None,
            pushback: Pushback::Rate,
            reason: format!("{words}: {message}"),
            said_at: words.len() + 2,
        }
    }

    /// A failure llmq itself decided (the router's, the worker's): `reason` as it is.
    pub fn llmq(class: Class, reason: impl Into<String>) -> Self {
        Self {
            class,
            retry_after: None,
            pushback: Pushback::Rate,
            reason: reason.into(),
            said_at: 0,
        }
    }

    /// A transient failure of an upstream call.
    pub fn transient(message: impl fmt::Display) -> Self {
        Self::upstream(Class::Transient, message)
    }

    /// A permanent failure of an upstream call.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::upstream(Class::Permanent, message)
    }

    /// The same failure, to come back after `after`.
    pub fn after(self, after: Option<Duration>) -> Self {
        Self {
            retry_after: after,
            ..self
        }
    }

    /// The same failure, handled as a transient one, its words kept: a refusal not
    /// confirmed yet (`routing.auth_failures`) is retried as any transient failure.
    pub fn as_transient(self) -> Self {
        Self {
            class: Class::Transient,
            ..self
        }
    }

    /// The same failure, as `pushback` says of its deployment.
    pub fn with_pushback(self, pushback: Pushback) -> Self {
        Self { pushback, ..self }
    }

    /// The same failure, said of the deployment `name`.
    pub fn at(self, name: &str) -> Self {
        Self {
            reason: format!("{name}: {}", self.reason),
            said_at: 0,
            ..self
        }
    }

    /// What happened, whole.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// What happened, without the class's words.
    pub fn message(&self) -> &str {
        &self.reason[self.said_at..]
    }

    /// What the worker does with it.
    pub fn retry(&self) -> Retry {
        match self.class {
            Class::Transient => Retry::Transient,
            Class::Throttle => Retry::Throttle,
            Class::RateLimited => Retry::RateLimited,
            Class::Unavailable => Retry::Unavailable,
            Class::Quota
            | Class::ContextLength
            | Class::Refused
            | Class::Permanent
            | Class::Ended(_) => Retry::Permanent,
        }
    }

    /// The kind of the dead letter and error result when it ends the request: now for a
    /// permanent failure, once the attempts or the rate-limited time run out for the others.
    pub fn kind(&self) -> ErrorKind {
        match self.class {
            Class::Transient | Class::Throttle => ErrorKind::RetriesExhausted,
            Class::RateLimited => ErrorKind::RateLimited,
            Class::Unavailable => ErrorKind::UpstreamUnavailable,
            Class::Quota => ErrorKind::QuotaExhausted,
            Class::ContextLength | Class::Refused | Class::Permanent => {
                ErrorKind::UpstreamPermanent
            }
            Class::Ended(kind) => kind,
        }
    }

    /// Whether the upstream pushed back (a 429 or a timeout): the concurrency limit drops.
    pub fn is_throttle(&self) -> bool {
        matches!(self.class, Class::Throttle | Class::RateLimited)
    }

    /// The `outcome` label of `llmq_upstream_calls_total` for a call that failed so.
    pub fn call_label(&self) -> &'static str {
        match self.class {
            Class::Transient | Class::Throttle => "transient",
            Class::RateLimited => "rate_limited",
            Class::Unavailable => "upstream_unavailable",
            Class::Quota => "quota",
            Class::ContextLength => "context_length",
            Class::Refused => "auth",
            Class::Permanent => "permanent",
            Class::Ended(kind) => kind.as_str(),
        }
    }

    /// The `error_kind` label of `llmq_requests_failed_total` for an attempt that failed so.
    pub fn label(&self) -> &'static str {
        match self.retry() {
            Retry::Transient => "transient",
            Retry::Throttle => "throttled",
            Retry::RateLimited => "rate_limited",
            Retry::Unavailable => "upstream_unavailable",
            Retry::Permanent => self.kind().as_str(),
        }
    }

    /// The rules for a failed answer: its `status`, and what its error body said, as its
    /// provider read it (`kind` and `code`, lowercase; `text`, the body's text, at most
    /// [`MAX_ERROR_TEXT`] bytes and scrubbed of secrets).
    pub fn of_answer(
        status: StatusCode,
        kind: &str,
        code: &str,
        text: &str,
        retry_after: Option<Duration>,
    ) -> Self {
        let said = |what: &str| kind == what || code == what;
        let class = match status.as_u16() {
            429 if said("insufficient_quota") => Class::Quota,
            429 => Class::RateLimited,
            _ if said("context_length_exceeded") => Class::ContextLength,
            400 | 413 | 422 if says_context_length(&text.to_ascii_lowercase()) => {
                Class::ContextLength
            }
            401 | 403 | 404 => Class::Refused,
            _ if is_transient_status(status) => Class::Transient,
            _ => Class::Permanent,
        };
        let failure = Self::upstream(class, format_args!("HTTP {status}: {text}"));
        match class {
            Class::RateLimited | Class::Transient => failure.after(retry_after),
            _ => failure,
        }
    }

    /// A call that got no answer: a timeout is pushback; a refused or reset connection,
    /// a broken body, any other transport error is transient. The URL is left out, as it
    /// may carry credentials.
    pub fn of_transport(e: &reqwest::Error) -> Self {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else {
            "request failed"
        };
        let mut message = what.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        let class = match e.is_timeout() {
            true => Class::Throttle,
            false => Class::Transient,
        };
        Self::upstream(class, message)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Failure {}

/// 429, 408, 409 and 5xx may succeed later; every other failure status will not.
pub fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 429) || status.is_server_error()
}

/// Whether an error text says the prompt is over the context window (vLLM, Ollama and
/// LiteLLM word it differently from OpenAI's code).
fn says_context_length(lower: &str) -> bool {
    [
        "context length",
        "context window",
        "maximum context",
        "context_length",
    ]
    .iter()
    .any(|p| lower.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, kind: &str, code: &str, text: &str) -> Failure {
        let status = StatusCode::from_u16(status).expect("status");
        Failure::of_answer(status, kind, code, text, Some(Duration::from_secs(7)))
    }

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

    #[test]
    fn a_server_error_is_transient_and_keeps_its_retry_after() {
        for status in [500, 503, 408, 409] {
            let f = answer(status, "", "", "busy");
            assert_eq!(f.class, Class::Transient, "{status}");
            assert_eq!(f.retry_after, Some(Duration::from_secs(7)));
        }
        let f = answer(503, "", "", "busy");
        assert_eq!(
            f.reason(),
            "transient upstream failure: HTTP 503 Service Unavailable: busy"
        );
        assert_eq!(f.message(), "HTTP 503 Service Unavailable: busy");
    }

    #[test]
    fn a_429_is_a_rate_limit_unless_the_quota_is_spent() {
        let limited = answer(429, "rate_limit_error", "", "slow down");
        assert_eq!(limited.class, Class::RateLimited);
        assert_eq!(limited.retry_after, Some(Duration::from_secs(7)));
        for (kind, code) in [("insufficient_quota", ""), ("", "insufficient_quota")] {
            let spent = answer(429, kind, code, "x");
            assert_eq!(spent.class, Class::Quota);
            assert_eq!(spent.retry_after, None, "a spent account is not waited for");
        }
    }

    #[test]
    fn the_context_length_by_code_or_by_words() {
        let by_code = answer(400, "", "context_length_exceeded", "too long");
        assert_eq!(by_code.class, Class::ContextLength);
        for status in [400, 413, 422] {
            let by_words = answer(
                status,
                "",
                "",
                "This model's Maximum Context length is 4096",
            );
            assert_eq!(by_words.class, Class::ContextLength, "{status}");
        }
        assert_eq!(
            answer(500, "", "", "maximum context").class,
            Class::Transient,
            "words count on a 4xx only"
        );
    }

    #[test]
    fn a_refusal_is_401_403_or_404_and_other_4xx_are_permanent() {
        for status in [401, 403, 404] {
            assert_eq!(answer(status, "", "", "").class, Class::Refused, "{status}");
        }
        for status in [400, 413, 422] {
            let f = answer(status, "", "", "bad temperature");
            assert_eq!(f.class, Class::Permanent, "{status}");
            assert_eq!(f.retry_after, None);
        }
    }

    #[tokio::test]
    async fn a_timeout_is_pushback_and_a_refused_connection_transient() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let silent = format!("http://{}/", listener.local_addr().expect("address"));
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .expect("a client");
        let timed_out = http.get(&silent).send().await.expect_err("no answer");
        let f = Failure::of_transport(&timed_out);
        assert_eq!(f.class, Class::Throttle);
        assert!(
            f.reason()
                .starts_with("transient upstream failure: timed out"),
            "{f}"
        );
        drop(listener);
        let refused = http.get(&silent).send().await.expect_err("nothing listens");
        assert_eq!(Failure::of_transport(&refused).class, Class::Transient);
    }

    #[test]
    fn every_class_yields_its_decision_kind_and_labels() {
        let cases = [
            (
                Class::Transient,
                Retry::Transient,
                ErrorKind::RetriesExhausted,
                "transient",
                "transient",
            ),
            (
                Class::Throttle,
                Retry::Throttle,
                ErrorKind::RetriesExhausted,
                "transient",
                "throttled",
            ),
            (
                Class::RateLimited,
                Retry::RateLimited,
                ErrorKind::RateLimited,
                "rate_limited",
                "rate_limited",
            ),
            (
                Class::Unavailable,
                Retry::Unavailable,
                ErrorKind::UpstreamUnavailable,
                "upstream_unavailable",
                "upstream_unavailable",
            ),
            (
                Class::Quota,
                Retry::Permanent,
                ErrorKind::QuotaExhausted,
                "quota",
                "quota_exhausted",
            ),
            (
                Class::ContextLength,
                Retry::Permanent,
                ErrorKind::UpstreamPermanent,
                "context_length",
                "upstream_permanent",
            ),
            (
                Class::Refused,
                Retry::Permanent,
                ErrorKind::UpstreamPermanent,
                "auth",
                "upstream_permanent",
            ),
            (
                Class::Permanent,
                Retry::Permanent,
                ErrorKind::UpstreamPermanent,
                "permanent",
                "upstream_permanent",
            ),
            (
                Class::Ended(ErrorKind::InvalidRequest),
                Retry::Permanent,
                ErrorKind::InvalidRequest,
                "invalid_request",
                "invalid_request",
            ),
        ];
        for (class, retry, kind, call, label) in cases {
            let f = Failure::upstream(class, "x");
            assert_eq!(
                (f.retry(), f.kind(), f.call_label(), f.label()),
                (retry, kind, call, label),
                "{class:?}"
            );
        }
        assert!(Failure::upstream(Class::Throttle, "x").is_throttle());
        assert!(Failure::upstream(Class::RateLimited, "x").is_throttle());
        assert!(!Failure::transient("x").is_throttle());
        assert!(
            !Failure::llmq(Class::Unavailable, "x").is_throttle(),
            "an outage is not pushback"
        );
    }

    /// The label lists the metrics are seeded with hold every label a failure can have.
    #[test]
    fn every_label_is_listed_for_the_metrics() {
        let classes = [
            Class::Transient,
            Class::Throttle,
            Class::RateLimited,
            Class::Quota,
            Class::ContextLength,
            Class::Refused,
            Class::Permanent,
        ];
        for class in classes {
            let f = Failure::upstream(class, "x");
            assert!(CALL_LABELS.contains(&f.call_label()), "{class:?}");
            let label = f.label();
            let listed =
                RETRY_LABELS.contains(&label) || ErrorKind::ALL.iter().any(|k| k.as_str() == label);
            assert!(listed, "{class:?}: {label}");
        }
        for kind in ErrorKind::ALL {
            let f = Failure::llmq(Class::Ended(kind), "x");
            assert_eq!(f.label(), kind.as_str());
        }
        // Only the router says `Unavailable` (no call was made): labelled as its kind.
        let outage = Failure::llmq(Class::Unavailable, "x");
        assert_eq!(outage.label(), ErrorKind::UpstreamUnavailable.as_str());
    }

    #[test]
    fn llmq_words_stay_as_they_are() {
        let f = Failure::llmq(
            Class::Ended(ErrorKind::InvalidRequest),
            "no upstream serves",
        );
        assert_eq!(
            (f.reason(), f.message()),
            ("no upstream serves", "no upstream serves")
        );
        let at = Failure::upstream(Class::RateLimited, "HTTP 429").at("a");
        assert_eq!(at.reason(), "a: rate limited: HTTP 429");
    }
}
