//! What to do with a delivery, decided by a pure function of plain values.
//!
//! [`decide`] is asked again after each step the worker takes (asking the idempotency
//! store, an upstream attempt, an inline wait) with what that step produced, until it
//! answers with a terminal [`Decision`]: publish, republish elsewhere, dead-letter or hand
//! back. `worker::settle` carries decisions out and talks to the broker; nothing
//! here does, so every branch has a unit test below.

mod tally;
mod wait;

use std::time::Duration;

pub use tally::{AfterAttempt, Attempted, CUT_AT_DEADLINE, Tally};

use crate::{
    broker::retry::TIERS,
    config::OnStoreError,
    contract::{ErrorKind, request::InvalidRequest},
    upstream::call::Outcome,
    worker::policy::RetryPolicy,
};

/// Messages that come back this early (ms) before their not-before time wait again.
const NOT_BEFORE_SLACK_MS: i64 = 100;
/// A not-before further away than this (ms) is not one llmq set: ignored.
const MAX_NOT_BEFORE_MS: i64 = 48 * 3600 * 1000;

/// The idempotency store's answer for the request, so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Not asked yet.
    NotAsked,
    /// This worker holds the lease: it may call the upstream.
    Acquired,
    /// A result is stored: the request was answered before.
    Finished,
    /// A result is stored under this request id and identity for a different request.
    Conflict,
    /// Another worker holds the lease.
    Busy,
    /// The store could not be reached.
    Unavailable {
        /// Why.
        reason: String,
        /// How long the store has failed every claim (this outage so far): the request's
        /// wait grows with it ([`store_wait`]).
        down_for: Duration,
    },
}

/// Everything a decision depends on. Later needs (time spent rate limited, the
/// deployment, a deadline, a cancel tombstone, a tenant's budget) are new fields here and
/// new branches in [`decide`].
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// Why the message can never be served, when it did not parse.
    pub invalid: Option<&'a InvalidRequest>,
    /// The broker redelivers this message: an earlier delivery of it was never settled.
    pub redelivered: bool,
    /// The request streams to its `reply_to`: a delivery that was never settled may have
    /// sent deltas under its attempt's number, so that attempt counts.
    pub streams: bool,
    /// An attempt of this delivery sent deltas: the next attempt waits in a retry tier, so
    /// that its number is in the message before it streams (at most one attempt streams
    /// per delivery, and a crash then counts exactly that one).
    pub streamed_here: bool,
    /// Unsettled redeliveries counted before this delivery (its header).
    pub redeliveries: u32,
    /// Upstream attempts made for this request, counting earlier deliveries.
    pub attempts: u32,
    /// The message's not-before time (Unix ms), as the publisher's header says.
    pub not_before_ms: Option<i64>,
    /// Now (Unix ms).
    pub now_ms: i64,
    /// The idempotency store's answer.
    pub claim: Claim,
    /// What the last attempt in this delivery produced, if it has made one since the last
    /// inline wait.
    pub produced: Option<&'a Outcome>,
    /// The size of the answer's result, serialized, once there is one.
    pub result_bytes: Option<usize>,
    /// Largest result that may be published (`worker.max_result_bytes`).
    pub max_result_bytes: usize,
    /// The last publish made to settle the delivery, and what the broker said of it.
    pub sent: Option<Sent>,
    /// Unix ms of the first rate limit the request met (its header, or this delivery's).
    pub rate_limited_since_ms: Option<i64>,
    /// Rate limits met in this delivery so far, the last one included.
    pub rate_limits: u32,
    /// Unix ms of the first outage the request met: every deployment of its model down
    /// (its header, or this delivery's).
    pub unavailable_since_ms: Option<i64>,
    /// Unix ms after which the request is not called any more (its `deadline`, or its age
    /// limit).
    pub deadline_ms: Option<i64>,
    /// The caller cancelled the request (before it was reached, or while it ran).
    pub cancelled: bool,
    /// Whether the request's tenant may spend: asked before each call.
    pub budget: &'a Budget,
    /// The worker is shutting down (or past its deadline): start nothing new.
    pub stopping: bool,
    /// When and how often to retry.
    pub policy: &'a RetryPolicy,
    /// What to do when the idempotency store is down.
    pub on_store_error: OnStoreError,
    /// A uniform draw from [0, 1) for the backoff's jitter.
    pub jitter: f64,
}

/// Whether the request's tenant may spend, as far as it was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Budget {
    /// No budget applies to anyone: nothing to ask.
    Unlimited,
    /// Not asked for the next call yet.
    NotAsked,
    /// Asked: the tenant may spend.
    Within,
    /// Asked: what the call may cost does not fit in the tenant's day's or month's
    /// budget; why.
    Over(String),
    /// Asked: the tenant has a budget and a model the call may go to has no price (and
    /// there is no `[prices.default]`); why.
    Unpriced(String),
}

/// What a publish made to settle a delivery carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sending {
    /// The result (a new answer, or a stored one).
    Result,
    /// The request itself, to a retry tier or back to its queue.
    Republish,
    /// The request, to the dead-letter queue.
    DeadLetter,
    /// The `cancelled` notice to the caller.
    CancelNotice,
}

/// What the broker said of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Confirmed (and routed): the delivery may be acked.
    Confirmed,
    /// A queue refused it (a length limit with `reject-publish`).
    Refused,
    /// Not confirmed: nacked, returned unroutable, the channel lost, or no answer in time.
    Unconfirmed,
}

/// A publish made to settle a delivery, and what the broker said of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// What it carried.
    pub what: Sending,
    /// What the broker said.
    pub confirm: Confirm,
}

/// Where a delivery comes from, as far as moving it to its tenant's lane goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Lanes per work queue (`topology.lanes`).
    pub lanes: u16,
    /// It comes from a lane, not from the work queue.
    pub from_lane: bool,
    /// The broker redelivers it.
    pub redelivered: bool,
}

/// Whether a delivery may move to its tenant's lane ([`crate::worker::lanes`] says whether
/// the tenant is over its share) instead of being settled here. Asked before it is parsed.
///
/// Only a request from the work queue moves. A redelivered one is settled where it is: its
/// redelivery is counted (and a stream it may have begun marked) there, and a request a lane
/// refuses does not come back to be moved again and again. Chat and embeddings alike: one
/// tenant's embedding backlog would otherwise hold every other tenant's embeddings behind it.
pub fn may_move(a: Arrival) -> bool {
    a.lanes > 0 && !a.from_lane && !a.redelivered
}

/// What the worker does next with a delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Ask the idempotency store for the request's lease (or its stored result).
    Claim,
    /// Ask whether the request's tenant may spend, before the next call.
    AskBudget,
    /// Make the next upstream attempt.
    Call,
    /// Store and publish the result the attempt produced (confirmed), then ack.
    Publish,
    /// Publish the stored result of a request answered before (confirmed), then ack.
    PublishStored,
    /// Wait here, then call again.
    RetryInline {
        /// How long.
        after: Duration,
    },
    /// Publish the request elsewhere (confirmed), then ack.
    Republish(Republish),
    /// Publish to the dead-letter queue (confirmed), tell the caller, then ack.
    DeadLetter {
        /// Why, as a kind.
        kind: ErrorKind,
        /// Why, in words.
        reason: String,
    },
    /// Give the delivery back to its queue (nack with requeue).
    HandBack,
    /// Answer `cancelled` (confirmed), then ack: the caller asked for it, so no dead letter.
    Cancelled,
    /// The outcome is confirmed: ack the delivery.
    Ack,
    /// The outcome could not be confirmed: hand the delivery back (nack with requeue) after
    /// a pause, so that a queue that stays missing or refusing is not a loop of one try a
    /// second.
    Nack,
}

/// A request moved to another queue, carrying its counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Republish {
    /// Where it goes.
    pub to: Destination,
    /// Its attempt count from now on.
    pub attempts: u32,
    /// Its unsettled-redelivery count from now on.
    pub redeliveries: u32,
    /// Why it moves, for the headers and the logs.
    pub reason: String,
}

/// Where a republished request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A delayed-retry tier, back to its work queue after `after`.
    RetryTier {
        /// The wait.
        after: Duration,
    },
    /// The tail of the queue it came from, with its redelivery counted: the broker's own
    /// count (`redelivered`) is a flag that never grows, so the count travels in a header.
    Requeue,
}

impl Decision {
    fn retry_tier(i: &Input<'_>, after: Duration, reason: impl Into<String>) -> Self {
        Decision::Republish(Republish {
            to: Destination::RetryTier { after },
            attempts: i.attempts,
            redeliveries: i.redeliveries,
            reason: reason.into(),
        })
    }
}

/// The next step for a delivery.
pub fn decide(i: &Input<'_>) -> Decision {
    if let Some(sent) = i.sent {
        return after_sent(i, sent);
    }
    if let Some(invalid) = i.invalid {
        return Decision::DeadLetter {
            kind: invalid.kind,
            reason: invalid.message.clone(),
        };
    }
    if i.redelivered {
        return after_redelivery(i);
    }
    if let Some(ended) = cancelled_or_expired(i) {
        return ended;
    }
    match i.produced {
        Some(produced) => after_outcome(i, produced),
        None => before_call(i),
    }
}

/// A delivery its worker never settled (a crash, a lost connection, a nack at the shutdown
/// deadline) comes back flagged; it is counted before anything else, so that a request that
/// kills its worker runs out of redeliveries, with no upstream call, whatever the
/// idempotency store.
fn after_redelivery(i: &Input<'_>) -> Decision {
    let redeliveries = i.redeliveries.saturating_add(1);
    if !i.policy.may_redeliver(redeliveries) {
        return Decision::DeadLetter {
            kind: ErrorKind::RedeliveryLimit,
            reason: format!(
                "delivered {redeliveries} times without being settled (its worker crashed \
                 or handed it back each time); not calling the upstream again"
            ),
        };
    }
    Decision::Republish(Republish {
        to: Destination::Requeue,
        attempts: i.attempts.saturating_add(u32::from(i.streams)),
        redeliveries,
        reason: "redelivered".into(),
    })
}

/// A cancelled request, or one past its deadline, is not called (again). An answer
/// already made is still published, and so is a stored one: the store is asked first, so
/// that a duplicate of a request answered in time gets its answer, not a second,
/// contradicting result. A failure keeps its own kind.
fn cancelled_or_expired(i: &Input<'_>) -> Option<Decision> {
    let past_deadline = i.deadline_ms.filter(|deadline| i.now_ms >= *deadline);
    if !(i.cancelled || past_deadline.is_some())
        || matches!(i.produced, Some(Outcome::Done(_) | Outcome::Failed(_)))
    {
        return None;
    }
    match (&i.claim, past_deadline) {
        (Claim::NotAsked, _) => Some(Decision::Claim),
        // Another worker's answer, or its lease: that worker answers (it hears the
        // cancel too, and cuts its call at the deadline); this one checks back later.
        (Claim::Finished | Claim::Conflict | Claim::Busy, _) => None,
        _ if i.cancelled => Some(Decision::Cancelled),
        (_, Some(deadline)) => Some(expired(i, deadline)),
        (_, None) => None,
    }
}

/// After an attempt in this delivery produced something.
fn after_outcome(i: &Input<'_>, produced: &Outcome) -> Decision {
    match produced {
        Outcome::Done(_) => after_answer(i),
        Outcome::Failed(failure) => Decision::DeadLetter {
            kind: failure.kind(),
            reason: failure.reason().to_string(),
        },
        Outcome::Retry { failure, elsewhere } => {
            after_transient(i, failure.retry_after, *elsewhere, failure.reason())
        }
        Outcome::RateLimited(failure) => {
            wait::after_rate_limit(i, failure.retry_after, failure.reason())
        }
        Outcome::Unavailable(failure) => {
            wait::after_unavailable(i, failure.retry_after, failure.reason())
        }
        // Waited too long for a call to start, and none was made: not an attempt.
        Outcome::Deferred { reason } => Decision::retry_tier(i, TIERS[0].max, reason.clone()),
    }
}

/// Nothing produced yet in this delivery (or since an inline wait): ask the store, then the
/// budget, then call; or give back when stopping.
fn before_call(i: &Input<'_>) -> Decision {
    if i.stopping {
        return Decision::HandBack;
    }
    match &i.claim {
        Claim::NotAsked => return not_before(i).unwrap_or(Decision::Claim),
        Claim::Finished => return Decision::PublishStored,
        Claim::Conflict => {
            return Decision::DeadLetter {
                kind: ErrorKind::IdempotencyConflict,
                reason: "this request_id was answered before for a different request; \
                         use a new request_id for a new request"
                    .into(),
            };
        }
        Claim::Busy => {
            return Decision::retry_tier(i, TIERS[0].max, "duplicate in progress");
        }
        Claim::Unavailable { reason, down_for } if i.on_store_error == OnStoreError::Requeue => {
            return Decision::retry_tier(i, store_wait(*down_for, i.jitter), reason.clone());
        }
        Claim::Unavailable { .. } | Claim::Acquired => {}
    }
    // Checked after the store, so that a finished request redelivered after its last
    // attempt gets its stored result instead of a dead letter.
    if !i.policy.may_retry(i.attempts) {
        return Decision::DeadLetter {
            kind: ErrorKind::RetriesExhausted,
            reason: format!(
                "{} attempts already made (counting deliveries interrupted by a worker crash)",
                i.attempts
            ),
        };
    }
    // Asked once the store had its say: a duplicate of a request answered before its
    // tenant ran out still gets its answer. Asked before each call: spend made meanwhile
    // (by this request's own earlier attempt, or the fleet's) counts.
    match i.budget {
        Budget::NotAsked => Decision::AskBudget,
        Budget::Over(why) => Decision::DeadLetter {
            kind: ErrorKind::BudgetExceeded,
            reason: why.clone(),
        },
        Budget::Unpriced(why) => Decision::DeadLetter {
            kind: ErrorKind::InvalidRequest,
            reason: why.clone(),
        },
        Budget::Unlimited | Budget::Within => Decision::Call,
    }
}

/// Longest a request waits in a retry tier for the idempotency store to come back.
const MAX_STORE_WAIT: Duration = Duration::from_secs(300);

/// How long a request waits for an idempotency store that has been down for `down_for`
/// (`on_store_error = "requeue"`): from the first tier's 5 s, about as long again as the
/// outage has lasted (times 1 to 2 by `jitter`, so that a backlog does not all come back at
/// once), at most [`MAX_STORE_WAIT`]. A long outage costs each waiting request a pass
/// through the worker every few minutes, not every 5 s, and the requests waiting come back
/// within minutes of its end.
pub fn store_wait(down_for: Duration, jitter: f64) -> Duration {
    down_for
        .mul_f64(1.0 + jitter.clamp(0.0, 1.0))
        .clamp(TIERS[0].max, MAX_STORE_WAIT)
}

/// Back before its time (a wait longer than the last retry tier): wait again. The header
/// comes from the publisher: saturate, and ignore a time beyond any wait llmq sets, so a
/// forged one can neither overflow nor park a request forever.
fn not_before(i: &Input<'_>) -> Option<Decision> {
    let early = i.not_before_ms?.saturating_sub(i.now_ms);
    (early > NOT_BEFORE_SLACK_MS && early <= MAX_NOT_BEFORE_MS).then(|| {
        let wait = Duration::from_millis(early.unsigned_abs());
        Decision::retry_tier(i, wait, "waiting for not-before")
    })
}

/// After a publish that settles the delivery: ack once it is confirmed. A result the
/// results queue refused waits in a retry tier for the longest backoff
/// (`retry.max_delay_secs`) and publishes its stored result when it comes back, instead of
/// spinning on a full queue; a refused `cancelled` notice is dropped (the caller asked for
/// the cancel, and the request must not spin); anything else unconfirmed is handed back.
fn after_sent(i: &Input<'_>, sent: Sent) -> Decision {
    match (sent.what, sent.confirm) {
        (_, Confirm::Confirmed) | (Sending::CancelNotice, Confirm::Refused) => Decision::Ack,
        (Sending::Result, Confirm::Refused) => {
            Decision::retry_tier(i, i.policy.max_delay(), RESULTS_REFUSED)
        }
        (_, Confirm::Refused | Confirm::Unconfirmed) => Decision::Nack,
    }
}

/// Why a request waits when its result could not be published.
const RESULTS_REFUSED: &str = "the results queue refused the result";

/// After an answer: publish it, unless it is too large.
fn after_answer(i: &Input<'_>) -> Decision {
    match i.result_bytes {
        Some(bytes) if bytes > i.max_result_bytes => Decision::DeadLetter {
            kind: ErrorKind::ResultTooLarge,
            reason: format!(
                "the result is {bytes} bytes, more than worker.max_result_bytes ({})",
                i.max_result_bytes
            ),
        },
        _ => Decision::Publish,
    }
}

/// After a transient failure: give up, wait here, or wait in a retry tier; no wait at all
/// when another deployment can take the next attempt now.
fn after_transient(
    i: &Input<'_>,
    retry_after: Option<Duration>,
    elsewhere: bool,
    reason: &str,
) -> Decision {
    if !i.policy.may_retry(i.attempts) {
        return Decision::DeadLetter {
            kind: ErrorKind::RetriesExhausted,
            reason: format!(
                "gave up after {} attempts; last error: {reason}",
                i.attempts
            ),
        };
    }
    let delay = if elsewhere {
        Duration::ZERO
    } else {
        i.policy.delay(i.attempts, retry_after, i.jitter)
    };
    if let Some(expired) = ends_past_deadline(i, delay) {
        return expired;
    }
    if delay > i.policy.inline_max() || i.streamed_here {
        Decision::retry_tier(i, delay, reason)
    } else if i.stopping {
        Decision::HandBack
    } else {
        Decision::RetryInline { after: delay }
    }
}

/// The dead letter of a request whose deadline passed.
fn expired(i: &Input<'_>, deadline_ms: i64) -> Decision {
    Decision::DeadLetter {
        kind: ErrorKind::Expired,
        reason: format!(
            "its deadline passed {} ms ago; not calling the upstream (again)",
            i.now_ms.saturating_sub(deadline_ms)
        ),
    }
}

/// Expired now, rather than after a wait that would end past the deadline.
fn ends_past_deadline(i: &Input<'_>, wait: Duration) -> Option<Decision> {
    let deadline = i.deadline_ms?;
    let wait_ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
    (i.now_ms.saturating_add(wait_ms) >= deadline).then(|| expired(i, deadline))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        contract::response::JobResult,
        upstream::failure::{Class, Failure},
        worker::policy::tests::policy,
    };

    const NOW: i64 = 1_700_000_000_000;

    /// A fresh delivery of a valid request: nothing asked, nothing produced.
    fn fresh(policy: &RetryPolicy) -> Input<'_> {
        Input {
            invalid: None,
            redelivered: false,
            streams: false,
            streamed_here: false,
            redeliveries: 0,
            attempts: 0,
            not_before_ms: None,
            now_ms: NOW,
            claim: Claim::NotAsked,
            produced: None,
            result_bytes: None,
            max_result_bytes: 1000,
            sent: None,
            rate_limited_since_ms: None,
            rate_limits: 0,
            unavailable_since_ms: None,
            deadline_ms: None,
            cancelled: false,
            budget: &Budget::Unlimited,
            stopping: false,
            policy,
            on_store_error: OnStoreError::Requeue,
            jitter: 1.0,
        }
    }

    fn tier(after: Duration, attempts: u32, reason: &str) -> Decision {
        Decision::Republish(Republish {
            to: Destination::RetryTier { after },
            attempts,
            redeliveries: 0,
            reason: reason.into(),
        })
    }

    fn transient(after: Option<Duration>) -> Outcome {
        Outcome::Retry {
            failure: Failure::llmq(Class::Transient, "HTTP 503").after(after),
            elsewhere: false,
        }
    }

    fn rate_limited(after: Option<Duration>) -> Outcome {
        Outcome::RateLimited(Failure::llmq(Class::RateLimited, "HTTP 429").after(after))
    }

    #[test]
    fn a_cancel_wins_over_everything_but_an_answer() {
        let p = policy();
        let cancelled = Input {
            cancelled: true,
            ..fresh(&p)
        };
        assert_eq!(decide(&cancelled), Decision::Claim, "a stored answer first");
        let acquired = Input {
            claim: Claim::Acquired,
            ..cancelled.clone()
        };
        assert_eq!(decide(&acquired), Decision::Cancelled);
        let stored = Input {
            claim: Claim::Finished,
            ..cancelled.clone()
        };
        assert_eq!(
            decide(&stored),
            Decision::PublishStored,
            "answered before the cancel: the answer stands"
        );
        let busy = Input {
            claim: Claim::Busy,
            ..cancelled.clone()
        };
        assert!(
            matches!(decide(&busy), Decision::Republish(_)),
            "the worker holding it answers; this one checks back"
        );
        let redelivered = Input {
            redelivered: true,
            ..acquired.clone()
        };
        assert!(
            matches!(decide(&redelivered), Decision::Republish(_)),
            "redeliveries are still counted, so a cancel that cannot be answered is bounded"
        );
        let failed = transient(None);
        let mid_retry = Input {
            cancelled: true,
            attempts: 2,
            claim: Claim::Acquired,
            produced: Some(&failed),
            ..fresh(&p)
        };
        assert_eq!(decide(&mid_retry), Decision::Cancelled);
        let answer = Outcome::Done(Box::new(JobResult::ok("r".into(), "w".into())));
        let answered = Input {
            cancelled: true,
            claim: Claim::Acquired,
            produced: Some(&answer),
            result_bytes: Some(10),
            ..fresh(&p)
        };
        assert_eq!(decide(&answered), Decision::Publish, "too late to cancel");
    }

    #[test]
    fn past_its_deadline_a_request_is_not_called_nor_retried() {
        let p = policy();
        assert_eq!(
            decide(&Input {
                deadline_ms: Some(NOW),
                ..fresh(&p)
            }),
            Decision::Claim,
            "a stored answer first"
        );
        let late = Input {
            deadline_ms: Some(NOW),
            claim: Claim::Acquired,
            ..fresh(&p)
        };
        assert!(
            matches!(
                decide(&late),
                Decision::DeadLetter {
                    kind: ErrorKind::Expired,
                    ..
                }
            ),
            "{:?}",
            decide(&late)
        );
        let in_time = Input {
            deadline_ms: Some(NOW + 1),
            ..fresh(&p)
        };
        assert_eq!(decide(&in_time), Decision::Claim);
        // A retry whose wait would end past the deadline is not waited for.
        let failed = transient(Some(Duration::from_millis(500)));
        let retry = Input {
            attempts: 1,
            claim: Claim::Acquired,
            produced: Some(&failed),
            deadline_ms: Some(NOW + 400),
            ..fresh(&p)
        };
        assert!(matches!(
            decide(&retry),
            Decision::DeadLetter {
                kind: ErrorKind::Expired,
                ..
            }
        ));
        let soon_enough = Input {
            deadline_ms: Some(NOW + 600),
            ..retry.clone()
        };
        assert_eq!(
            decide(&soon_enough),
            Decision::RetryInline {
                after: Duration::from_millis(500)
            }
        );
        // An answer made in time is published; a stored one too.
        let answer = Outcome::Done(Box::new(JobResult::ok("r".into(), "w".into())));
        let answered = Input {
            claim: Claim::Acquired,
            produced: Some(&answer),
            result_bytes: Some(10),
            deadline_ms: Some(NOW - 1),
            ..fresh(&p)
        };
        assert_eq!(decide(&answered), Decision::Publish);
        let stored = Input {
            claim: Claim::Finished,
            deadline_ms: Some(NOW - 1),
            ..fresh(&p)
        };
        assert_eq!(decide(&stored), Decision::PublishStored);
    }

    #[test]
    fn a_transient_failure_with_another_deployment_free_is_retried_at_once() {
        let p = policy();
        let produced = Outcome::Retry {
            failure: Failure::llmq(Class::Transient, "connection refused"),
            elsewhere: true,
        };
        let i = Input {
            attempts: 1,
            claim: Claim::Acquired,
            produced: Some(&produced),
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            Decision::RetryInline {
                after: Duration::ZERO
            }
        );
        let last = Input { attempts: 5, ..i };
        assert!(
            matches!(
                decide(&last),
                Decision::DeadLetter {
                    kind: ErrorKind::RetriesExhausted,
                    ..
                }
            ),
            "it still counts as an attempt"
        );
    }

    #[test]
    fn rate_limits_use_no_attempts_and_are_bounded_in_time() {
        let p = policy();
        let produced = rate_limited(None);
        // Out of attempts, yet a rate limit is waited out all the same.
        let i = Input {
            attempts: 5,
            claim: Claim::Acquired,
            produced: Some(&produced),
            rate_limited_since_ms: Some(NOW - 1000),
            rate_limits: 1,
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            Decision::RetryInline {
                after: Duration::ZERO
            },
            "the first 429 without a time: again at once"
        );
        let again = Input {
            rate_limits: 3,
            ..i.clone()
        };
        // backon computes the steps in floating point: compare to the millisecond.
        let Decision::RetryInline { after } = decide(&again) else {
            panic!("inline: {:?}", decide(&again));
        };
        assert_eq!(after.as_millis(), 200, "later ones back off");
        let said = rate_limited(Some(Duration::from_millis(700)));
        let told = Input {
            produced: Some(&said),
            ..i.clone()
        };
        assert_eq!(
            decide(&told),
            Decision::RetryInline {
                after: Duration::from_millis(700)
            }
        );
        let long = rate_limited(Some(Duration::from_secs(20)));
        let parked = Input {
            produced: Some(&long),
            ..i.clone()
        };
        assert_eq!(
            decide(&parked),
            tier(Duration::from_secs(20), 5, "HTTP 429"),
            "a long wait goes to a retry tier, counts unchanged"
        );
        let too_long = rate_limited(Some(Duration::from_secs(86_400)));
        let a_day = Input {
            produced: Some(&too_long),
            ..i.clone()
        };
        assert!(
            matches!(
                decide(&a_day),
                Decision::DeadLetter {
                    kind: ErrorKind::RateLimited,
                    ..
                }
            ),
            "a wait past the limit is not begun: {:?}",
            decide(&a_day)
        );
        let forged = Input {
            rate_limited_since_ms: Some(i64::MAX),
            ..i.clone()
        };
        assert_eq!(
            decide(&forged),
            decide(&i),
            "a time in the future counts as now"
        );
        let over = Input {
            rate_limited_since_ms: Some(NOW - 600_000),
            ..i
        };
        assert!(
            matches!(
                decide(&over),
                Decision::DeadLetter {
                    kind: ErrorKind::RateLimited,
                    ..
                }
            ),
            "{:?}",
            decide(&over)
        );
    }

    fn outage(after: Option<Duration>) -> Outcome {
        Outcome::Unavailable(Failure::llmq(Class::Unavailable, "breaker open").after(after))
    }

    #[test]
    fn an_outage_uses_no_attempts_and_ends_upstream_unavailable_on_its_own_clock() {
        let p = policy();
        let produced = outage(Some(Duration::from_millis(700)));
        // Out of attempts, yet an outage is waited out all the same.
        let i = Input {
            attempts: 5,
            claim: Claim::Acquired,
            produced: Some(&produced),
            unavailable_since_ms: Some(NOW - 1000),
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            Decision::RetryInline {
                after: Duration::from_millis(700)
            }
        );
        let long = outage(Some(Duration::from_secs(30)));
        let parked = Input {
            produced: Some(&long),
            ..i.clone()
        };
        assert_eq!(
            decide(&parked),
            tier(Duration::from_secs(30), 5, "breaker open"),
            "a breaker's cooldown goes to a retry tier, counts unchanged"
        );
        let untold = outage(None);
        let backed_off = Input {
            produced: Some(&untold),
            jitter: 1.0,
            ..i.clone()
        };
        assert_eq!(
            decide(&backed_off),
            Decision::RetryInline {
                after: Duration::from_millis(100)
            },
            "never spun on"
        );
        // Its own clock: a long rate limit before does not end it, ...
        let after_429s = Input {
            rate_limited_since_ms: Some(NOW - 599_000),
            ..i.clone()
        };
        assert_eq!(decide(&after_429s), decide(&i));
        // ... and past retry.max_unavailable_secs (300 s) it ends as an outage, not a rate
        // limit.
        let over = Input {
            unavailable_since_ms: Some(NOW - 300_000),
            ..i.clone()
        };
        let Decision::DeadLetter { kind, reason } = decide(&over) else {
            panic!("dead-lettered: {:?}", decide(&over));
        };
        assert_eq!(kind, ErrorKind::UpstreamUnavailable);
        assert_eq!(
            reason,
            "upstream unavailable for 300 s in all (retry.max_unavailable_secs is 300); last: breaker open"
        );
        let too_long = outage(Some(Duration::from_secs(600)));
        let not_begun = Input {
            produced: Some(&too_long),
            ..i.clone()
        };
        assert!(
            matches!(
                decide(&not_begun),
                Decision::DeadLetter {
                    kind: ErrorKind::UpstreamUnavailable,
                    ..
                }
            ),
            "a wait past the limit is not begun: {:?}",
            decide(&not_begun)
        );
        let forged = Input {
            unavailable_since_ms: Some(i64::MAX),
            ..i.clone()
        };
        assert_eq!(
            decide(&forged),
            decide(&i),
            "a time in the future counts as now"
        );
    }

    #[test]
    fn an_invalid_request_is_dead_lettered_with_its_reason() {
        let p = policy();
        let invalid = InvalidRequest {
            kind: ErrorKind::TooLarge,
            message: "body of 9 bytes".into(),
        };
        let i = Input {
            invalid: Some(&invalid),
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            Decision::DeadLetter {
                kind: ErrorKind::TooLarge,
                reason: "body of 9 bytes".into()
            }
        );
    }

    #[test]
    fn a_fresh_request_asks_the_store_then_calls() {
        let p = policy();
        assert_eq!(decide(&fresh(&p)), Decision::Claim);
        let i = Input {
            claim: Claim::Acquired,
            ..fresh(&p)
        };
        assert_eq!(decide(&i), Decision::Call);
    }

    #[test]
    fn early_arrival_waits_again_in_a_retry_tier() {
        let p = policy();
        let i = Input {
            attempts: 2,
            not_before_ms: Some(NOW + 40_000),
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            tier(Duration::from_secs(40), 2, "waiting for not-before")
        );
    }

    #[test]
    fn not_before_within_slack_past_or_forged_is_ignored() {
        let p = policy();
        for nb in [
            NOW + 50,
            NOW - 10_000,
            NOW + MAX_NOT_BEFORE_MS + 1,
            i64::MIN,
            i64::MAX,
        ] {
            let i = Input {
                not_before_ms: Some(nb),
                ..fresh(&p)
            };
            assert_eq!(decide(&i), Decision::Claim, "not_before {nb}");
        }
    }

    #[test]
    fn a_finished_duplicate_gets_its_stored_result_even_out_of_attempts() {
        let p = policy();
        let i = Input {
            claim: Claim::Finished,
            attempts: 99,
            ..fresh(&p)
        };
        assert_eq!(decide(&i), Decision::PublishStored);
    }

    #[test]
    fn a_duplicate_in_progress_checks_back_from_the_first_tier() {
        let p = policy();
        let i = Input {
            claim: Claim::Busy,
            attempts: 1,
            ..fresh(&p)
        };
        assert_eq!(decide(&i), tier(TIERS[0].max, 1, "duplicate in progress"));
    }

    #[test]
    fn store_down_requeues_or_proceeds_as_configured() {
        let p = policy();
        let down = Input {
            claim: Claim::Unavailable {
                reason: "redis refused".into(),
                down_for: Duration::ZERO,
            },
            ..fresh(&p)
        };
        assert_eq!(decide(&down), tier(TIERS[0].max, 0, "redis refused"));
        let proceed = Input {
            on_store_error: OnStoreError::Proceed,
            ..down
        };
        assert_eq!(decide(&proceed), Decision::Call);
    }

    #[test]
    fn a_long_store_outage_backs_off_up_to_a_bound() {
        let p = policy();
        let down_for = |secs| Input {
            claim: Claim::Unavailable {
                reason: "redis refused".into(),
                down_for: Duration::from_secs(secs),
            },
            jitter: 0.5,
            ..fresh(&p)
        };
        let wait = |secs| match decide(&down_for(secs)) {
            Decision::Republish(Republish {
                to: Destination::RetryTier { after },
                attempts: 0,
                ..
            }) => after,
            other => panic!("a retry tier, no attempt: {other:?}"),
        };
        assert_eq!(wait(0), Duration::from_secs(5), "the first tier at first");
        assert_eq!(wait(2), Duration::from_secs(5));
        assert_eq!(
            wait(20),
            Duration::from_secs(30),
            "then as long again, jittered"
        );
        assert_eq!(wait(120), Duration::from_secs(180));
        assert_eq!(wait(3600), MAX_STORE_WAIT, "bounded");
        assert_eq!(
            store_wait(Duration::from_secs(20), 0.0),
            Duration::from_secs(20)
        );
        assert_eq!(
            store_wait(Duration::from_secs(20), 7.0),
            Duration::from_secs(40),
            "the jitter is clamped"
        );
    }

    #[test]
    fn a_request_out_of_attempts_on_arrival_is_dead_lettered() {
        let p = policy();
        let i = Input {
            claim: Claim::Acquired,
            attempts: 5,
            ..fresh(&p)
        };
        let Decision::DeadLetter { kind, reason } = decide(&i) else {
            panic!("expected a dead letter");
        };
        assert_eq!(kind, ErrorKind::RetriesExhausted);
        assert!(reason.starts_with("5 attempts already made"), "{reason}");
    }

    #[test]
    fn an_answer_is_published_even_while_stopping() {
        let p = policy();
        let done = Outcome::Done(Box::new(JobResult::ok("r".into(), "w".into())));
        let i = Input {
            claim: Claim::Acquired,
            attempts: 1,
            produced: Some(&done),
            stopping: true,
            ..fresh(&p)
        };
        assert_eq!(decide(&i), Decision::Publish);
    }

    #[test]
    fn a_permanent_failure_is_dead_lettered_with_its_kind() {
        let p = policy();
        let failed = Outcome::Failed(Failure::llmq(Class::Permanent, "HTTP 400"));
        let i = Input {
            claim: Claim::Acquired,
            attempts: 1,
            produced: Some(&failed),
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            Decision::DeadLetter {
                kind: ErrorKind::UpstreamPermanent,
                reason: "HTTP 400".into()
            }
        );
    }

    #[test]
    fn a_short_backoff_waits_inline() {
        let p = policy();
        let failed = transient(None);
        let i = Input {
            claim: Claim::Acquired,
            attempts: 2,
            produced: Some(&failed),
            jitter: 0.5,
            ..fresh(&p)
        };
        let Decision::RetryInline { after } = decide(&i) else {
            panic!("expected an inline retry");
        };
        assert_eq!(after.as_millis(), 100, "half the second step (200 ms)");
    }

    #[test]
    fn after_an_attempt_that_streamed_the_next_waits_in_a_tier() {
        let p = policy();
        let failed = transient(None);
        let i = Input {
            claim: Claim::Acquired,
            attempts: 2,
            produced: Some(&failed),
            jitter: 0.5,
            streams: true,
            streamed_here: true,
            ..fresh(&p)
        };
        let Decision::Republish(Republish {
            to: Destination::RetryTier { after },
            attempts: 2,
            ..
        }) = decide(&i)
        else {
            panic!("its attempt count is in the message before the next attempt streams");
        };
        assert_eq!(after.as_millis(), 100, "the same backoff");
    }

    #[test]
    fn a_retry_after_past_the_inline_limit_goes_through_a_tier() {
        let p = policy();
        let failed = transient(Some(Duration::from_secs(3)));
        let i = Input {
            claim: Claim::Acquired,
            attempts: 1,
            produced: Some(&failed),
            jitter: 0.0,
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            tier(Duration::from_secs(3), 1, "HTTP 503"),
            "Retry-After is a floor under the backoff"
        );
    }

    #[test]
    fn a_transient_failure_on_the_last_attempt_is_exhausted() {
        let p = policy();
        let failed = transient(None);
        let i = Input {
            claim: Claim::Acquired,
            attempts: 5,
            produced: Some(&failed),
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            Decision::DeadLetter {
                kind: ErrorKind::RetriesExhausted,
                reason: "gave up after 5 attempts; last error: HTTP 503".into()
            }
        );
    }

    #[test]
    fn a_deferred_call_waits_in_the_first_tier_without_an_attempt() {
        let p = policy();
        let deferred = Outcome::Deferred {
            reason: "waited 900 s".into(),
        };
        let i = Input {
            claim: Claim::Acquired,
            attempts: 4,
            produced: Some(&deferred),
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            tier(TIERS[0].max, 4, "waited 900 s"),
            "the count stays, even one short of the last attempt"
        );
    }

    #[test]
    fn stopping_hands_back_instead_of_waiting_or_calling() {
        let p = policy();
        let failed = transient(None);
        let waiting = Input {
            claim: Claim::Acquired,
            attempts: 1,
            produced: Some(&failed),
            stopping: true,
            jitter: 0.5,
            ..fresh(&p)
        };
        assert_eq!(decide(&waiting), Decision::HandBack, "no inline wait");
        let interrupted = Input {
            produced: None,
            ..waiting
        };
        assert_eq!(decide(&interrupted), Decision::HandBack, "no new call");
        let fresh_stopping = Input {
            stopping: true,
            ..fresh(&p)
        };
        assert_eq!(decide(&fresh_stopping), Decision::HandBack);
    }

    #[test]
    fn a_tenant_over_budget_is_not_called_but_gets_a_stored_answer() {
        let p = policy();
        let why = "tenant \"alice\" has spent $1.000000 of its max_usd_per_day $1.000000";
        let spent = Budget::Over(why.into());
        let over = Input {
            claim: Claim::Acquired,
            budget: &spent,
            ..fresh(&p)
        };
        assert_eq!(
            decide(&over),
            Decision::DeadLetter {
                kind: ErrorKind::BudgetExceeded,
                reason: why.into()
            }
        );
        let stored = Input {
            claim: Claim::Finished,
            ..over.clone()
        };
        assert_eq!(decide(&stored), Decision::PublishStored);
        let answered = Outcome::Done(Box::new(JobResult::ok("r".into(), "w".into())));
        let late = Input {
            produced: Some(&answered),
            result_bytes: Some(10),
            ..over
        };
        assert_eq!(
            decide(&late),
            Decision::Publish,
            "an answer made is published"
        );
    }

    #[test]
    fn an_unpriced_model_under_a_budget_is_an_invalid_request_without_a_call() {
        let p = policy();
        let why = "model \"m\" has no [prices.\"m\"] and there is no [prices.default]";
        let unpriced = Budget::Unpriced(why.into());
        let asked = Input {
            claim: Claim::Acquired,
            budget: &unpriced,
            ..fresh(&p)
        };
        assert_eq!(
            decide(&asked),
            Decision::DeadLetter {
                kind: ErrorKind::InvalidRequest,
                reason: why.into()
            }
        );
    }

    #[test]
    fn a_redelivery_is_counted_and_requeued_before_anything_else() {
        let p = policy();
        let i = Input {
            redelivered: true,
            redeliveries: 2,
            attempts: 1,
            ..fresh(&p)
        };
        assert_eq!(
            decide(&i),
            Decision::Republish(Republish {
                to: Destination::Requeue,
                attempts: 1,
                redeliveries: 3,
                reason: "redelivered".into(),
            }),
            "the attempt count is left alone"
        );
        // A stream's unsettled attempt may have sent deltas under its number: it counts,
        // so that the next attempt's deltas have ids of their own.
        let streamed = Input { streams: true, ..i };
        assert_eq!(
            decide(&streamed),
            Decision::Republish(Republish {
                to: Destination::Requeue,
                attempts: 2,
                redeliveries: 3,
                reason: "redelivered".into(),
            })
        );
    }

    #[test]
    fn past_max_redeliveries_is_dead_lettered_without_a_call() {
        let p = policy();
        let at_limit = Input {
            redelivered: true,
            redeliveries: 2,
            ..fresh(&p)
        };
        assert!(
            matches!(decide(&at_limit), Decision::Republish(_)),
            "the 3rd of 3"
        );
        let over = Input {
            redeliveries: 3,
            ..at_limit.clone()
        };
        let Decision::DeadLetter { kind, reason } = decide(&over) else {
            panic!("expected a dead letter");
        };
        assert_eq!(kind, ErrorKind::RedeliveryLimit);
        assert!(reason.starts_with("delivered 4 times"), "{reason}");
        let forged = Input {
            redeliveries: u32::MAX,
            ..at_limit
        };
        assert!(matches!(decide(&forged), Decision::DeadLetter { .. }));
    }

    #[test]
    fn a_result_over_max_result_bytes_is_dead_lettered() {
        let p = policy();
        let done = Outcome::Done(Box::new(JobResult::ok("r".into(), "w".into())));
        let i = Input {
            claim: Claim::Acquired,
            attempts: 1,
            produced: Some(&done),
            result_bytes: Some(1001),
            ..fresh(&p)
        };
        let Decision::DeadLetter { kind, .. } = decide(&i) else {
            panic!("expected a dead letter");
        };
        assert_eq!(kind, ErrorKind::ResultTooLarge);
        let fits = Input {
            result_bytes: Some(1000),
            ..i
        };
        assert_eq!(decide(&fits), Decision::Publish);
    }

    #[test]
    fn a_refused_result_waits_in_a_retry_tier_fresh_or_stored() {
        let p = policy();
        let done = Outcome::Done(Box::new(JobResult::ok("r".into(), "w".into())));
        let answered = Input {
            claim: Claim::Acquired,
            attempts: 1,
            produced: Some(&done),
            result_bytes: Some(10),
            sent: Some(refused(Sending::Result)),
            ..fresh(&p)
        };
        let wait = tier(p.max_delay(), 1, RESULTS_REFUSED);
        assert_eq!(decide(&answered), wait);
        let stored = Input {
            claim: Claim::Finished,
            attempts: 1,
            sent: Some(refused(Sending::Result)),
            ..fresh(&p)
        };
        assert_eq!(decide(&stored), wait);
    }

    fn refused(what: Sending) -> Sent {
        Sent {
            what,
            confirm: Confirm::Refused,
        }
    }

    #[test]
    fn a_confirmed_outcome_is_acked_an_unconfirmed_one_handed_back() {
        let p = policy();
        let all = [
            Sending::Result,
            Sending::Republish,
            Sending::DeadLetter,
            Sending::CancelNotice,
        ];
        for what in all {
            let sent = |confirm| Input {
                claim: Claim::Acquired,
                attempts: 1,
                sent: Some(Sent { what, confirm }),
                ..fresh(&p)
            };
            assert_eq!(decide(&sent(Confirm::Confirmed)), Decision::Ack, "{what:?}");
            assert_eq!(
                decide(&sent(Confirm::Unconfirmed)),
                Decision::Nack,
                "{what:?}"
            );
        }
        let refused_at = |what| Input {
            sent: Some(refused(what)),
            ..fresh(&p)
        };
        assert_eq!(
            decide(&refused_at(Sending::CancelNotice)),
            Decision::Ack,
            "a refused cancelled notice is dropped as asked: the request must not spin"
        );
        assert_eq!(decide(&refused_at(Sending::Republish)), Decision::Nack);
        assert_eq!(decide(&refused_at(Sending::DeadLetter)), Decision::Nack);
    }

    #[test]
    fn the_budget_is_asked_before_each_call_when_budgets_exist() {
        let p = policy();
        let acquired = Input {
            claim: Claim::Acquired,
            ..fresh(&p)
        };
        assert_eq!(decide(&acquired), Decision::Call, "no budgets: no question");
        let ask = Input {
            budget: &Budget::NotAsked,
            ..acquired.clone()
        };
        assert_eq!(decide(&ask), Decision::AskBudget);
        let within = Input {
            budget: &Budget::Within,
            ..acquired.clone()
        };
        assert_eq!(decide(&within), Decision::Call);
        let before_the_store = Input {
            budget: &Budget::NotAsked,
            ..fresh(&p)
        };
        assert_eq!(
            decide(&before_the_store),
            Decision::Claim,
            "the store first: a stored answer needs no budget"
        );
        let exhausted = Input { attempts: 5, ..ask };
        assert!(
            matches!(
                decide(&exhausted),
                Decision::DeadLetter {
                    kind: ErrorKind::RetriesExhausted,
                    ..
                }
            ),
            "no question for a call that will not be made"
        );
    }

    #[test]
    fn only_a_request_fresh_from_the_work_queue_may_move_to_a_lane() {
        let a = Arrival {
            lanes: 16,
            from_lane: false,
            redelivered: false,
        };
        assert!(may_move(a));
        assert!(!may_move(Arrival { lanes: 0, ..a }), "lanes off");
        assert!(
            !may_move(Arrival {
                from_lane: true,
                ..a
            }),
            "already in its lane"
        );
        assert!(
            !may_move(Arrival {
                redelivered: true,
                ..a
            }),
            "settled where it is"
        );
    }

    #[test]
    fn a_conflicting_duplicate_is_dead_lettered_never_answered() {
        let p = policy();
        let i = Input {
            claim: Claim::Conflict,
            ..fresh(&p)
        };
        let Decision::DeadLetter { kind, .. } = decide(&i) else {
            panic!("expected a dead letter");
        };
        assert_eq!(kind, ErrorKind::IdempotencyConflict);
    }
}
