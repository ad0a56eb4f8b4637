//! What a request has been through so far: its attempts, redeliveries, rate limits and
//! streamed deltas, counted across deliveries (the counts travel in its retry headers).
//!
//! Every step of a delivery that changes a count goes through a method here, so that the
//! bookkeeping is pure and tested without a broker; `worker::settle` only calls them.

use crate::{
    contract::{ErrorKind, headers::RetryState},
    upstream::{
        call::Outcome,
        failure::{Class, Failure},
    },
};

use super::Republish;

/// The counts of one request, as they stand in the delivery being settled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Upstream attempts made, counting earlier deliveries.
    pub attempts: u32,
    /// Unsettled redeliveries counted before this delivery.
    pub redeliveries: u32,
    /// Unix seconds of the first transient failure.
    pub first_failure: Option<i64>,
    /// Unix ms of the first rate limit the request met, here or before.
    pub rate_limited_since_ms: Option<i64>,
    /// Rate limits met in this delivery.
    pub rate_limits: u32,
    /// Unix ms of the first outage the request met (every deployment of its model down),
    /// here or before.
    pub unavailable_since_ms: Option<i64>,
    /// An earlier attempt may have sent deltas that no restart marker has cleared since:
    /// the next attempt sends one first. Travels in [`RetryState::streamed`].
    pub restart: bool,
    /// An attempt of this delivery sent deltas.
    pub streamed_here: bool,
}

/// How an upstream attempt, as the worker ran it, ended.
#[derive(Debug)]
pub enum Attempted {
    /// The call came back with this (an answer, or a classified failure).
    Produced(Outcome),
    /// The request's deadline passed while the call ran: it was cut off.
    PastDeadline,
    /// The shutdown deadline came first (while it waited for a slot, or mid-call).
    Shutdown,
    /// Its caller cancelled it mid-call.
    Cancelled,
}

/// What an attempt leaves for the next decision.
#[derive(Debug, PartialEq)]
pub struct AfterAttempt {
    /// What it produced, for [`super::decide`].
    pub produced: Option<Outcome>,
    /// The worker is stopping: start nothing new.
    pub stopping: bool,
}

/// Why a request cut off at its deadline is dead-lettered.
pub const CUT_AT_DEADLINE: &str =
    "its deadline passed while the upstream call was running; the call was cut off";

impl Tally {
    /// The counts of a delivery as it arrives: its headers (which come from the
    /// publisher, so a time in the future is not one llmq set), and whether it may have
    /// streamed under a worker that never settled it.
    pub fn arrive(retry: &RetryState, streams: bool, redelivered: bool, now_ms: i64) -> Self {
        Self {
            attempts: retry.attempts,
            redeliveries: retry.redeliveries,
            first_failure: retry.first_failure,
            rate_limited_since_ms: retry.rate_limited_since_ms.filter(|since| *since <= now_ms),
            rate_limits: 0,
            unavailable_since_ms: retry.unavailable_since_ms.filter(|since| *since <= now_ms),
            restart: retry.streamed || (streams && redelivered),
            streamed_here: false,
        }
    }

    /// Counts what an attempt produced: an attempt when the upstream was called, the first
    /// failure's time, rate limits and outages met (which are not attempts).
    pub fn record(&mut self, outcome: &Outcome, now_ms: i64) {
        if outcome.called_upstream() {
            self.attempts = self.attempts.saturating_add(1);
        }
        match outcome {
            Outcome::Retry { .. } => {
                self.first_failure.get_or_insert(now_ms / 1000);
            }
            Outcome::RateLimited(_) => {
                self.rate_limits = self.rate_limits.saturating_add(1);
                self.rate_limited_since_ms.get_or_insert(now_ms);
            }
            Outcome::Unavailable(_) => {
                self.unavailable_since_ms.get_or_insert(now_ms);
            }
            Outcome::Done(_) | Outcome::Failed(_) | Outcome::Deferred { .. } => {}
        }
    }

    /// Whether the attempt just made sent deltas (`delta`), and what the next one must do
    /// about it: a restart marker sent (`marked`) clears what came before; deltas sent call
    /// for a marker next time.
    pub fn streamed(&mut self, marked: bool, delta: bool) -> bool {
        if marked {
            self.restart = false;
        }
        if delta {
            self.restart = true;
            self.streamed_here = true;
        }
        delta
    }

    /// Counts an attempt as the worker ran it (after [`Tally::streamed`], whose answer is
    /// `streamed`), and says what the next decision sees.
    pub fn attempted(&mut self, attempted: Attempted, streamed: bool, now_ms: i64) -> AfterAttempt {
        let produced = match attempted {
            Attempted::Produced(outcome) => outcome,
            // The call was made (and may have been paid for): it counts.
            Attempted::PastDeadline => Outcome::Failed(Failure::llmq(
                Class::Ended(ErrorKind::Expired),
                CUT_AT_DEADLINE,
            )),
            Attempted::Shutdown => {
                // A stream cut off by the shutdown deadline was paid for, and its deltas went
                // out under this attempt's number.
                if streamed {
                    self.attempts = self.attempts.saturating_add(1);
                }
                return AfterAttempt {
                    produced: None,
                    stopping: true,
                };
            }
            Attempted::Cancelled => {
                return AfterAttempt {
                    produced: None,
                    stopping: false,
                };
            }
        };
        self.record(&produced, now_ms);
        AfterAttempt {
            produced: Some(produced),
            stopping: false,
        }
    }

    /// The retry headers of the request as it is handed back as it stands (at shutdown).
    pub fn retry_state(&self) -> RetryState {
        RetryState {
            attempts: self.attempts,
            redeliveries: self.redeliveries,
            first_failure: self.first_failure,
            not_before_ms: None,
            rate_limited_since_ms: self.rate_limited_since_ms,
            unavailable_since_ms: self.unavailable_since_ms,
            streamed: self.restart,
        }
    }

    /// The retry headers of the request as a decision moves it, with that decision's counts.
    pub fn moved(&self, to: &Republish) -> RetryState {
        RetryState {
            attempts: to.attempts,
            redeliveries: to.redeliveries,
            ..self.retry_state()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{contract::response::JobResult, worker::decide::Destination};

    const NOW: i64 = 1_700_000_000_000;

    fn retry() -> Outcome {
        Outcome::Retry {
            failure: Failure::llmq(Class::Transient, "HTTP 503"),
            elsewhere: false,
        }
    }

    fn rate_limited() -> Outcome {
        Outcome::RateLimited(
            Failure::llmq(Class::RateLimited, "HTTP 429").after(Some(Duration::from_secs(1))),
        )
    }

    #[test]
    fn arrival_reads_the_headers_and_ignores_a_rate_limit_in_the_future() {
        let headers = RetryState {
            attempts: 2,
            redeliveries: 1,
            first_failure: Some(5),
            not_before_ms: None,
            rate_limited_since_ms: Some(NOW + 1),
            unavailable_since_ms: Some(NOW + 1),
            streamed: false,
        };
        let t = Tally::arrive(&headers, false, false, NOW);
        assert_eq!(
            t,
            Tally {
                attempts: 2,
                redeliveries: 1,
                first_failure: Some(5),
                ..Tally::default()
            }
        );
        let past = RetryState {
            rate_limited_since_ms: Some(NOW - 1),
            unavailable_since_ms: Some(NOW - 2),
            ..headers
        };
        let t = Tally::arrive(&past, false, false, NOW);
        assert_eq!(
            (t.rate_limited_since_ms, t.unavailable_since_ms),
            (Some(NOW - 1), Some(NOW - 2))
        );
    }

    #[test]
    fn a_restart_marker_is_owed_after_a_streamed_header_or_a_redelivered_stream() {
        let clean = RetryState::default();
        assert!(!Tally::arrive(&clean, true, false, NOW).restart);
        assert!(
            Tally::arrive(&clean, true, true, NOW).restart,
            "a crashed stream"
        );
        assert!(
            !Tally::arrive(&clean, false, true, NOW).restart,
            "not a stream"
        );
        let streamed = RetryState {
            streamed: true,
            ..clean
        };
        assert!(Tally::arrive(&streamed, false, false, NOW).restart);
    }

    #[test]
    fn attempts_count_calls_not_rate_limits_or_deferrals() {
        let mut t = Tally::default();
        t.record(&retry(), NOW);
        assert_eq!((t.attempts, t.first_failure), (1, Some(NOW / 1000)));
        t.record(&retry(), NOW + 5000);
        assert_eq!(
            (t.attempts, t.first_failure),
            (2, Some(NOW / 1000)),
            "the first failure stays"
        );
        t.record(&rate_limited(), NOW + 6000);
        t.record(&rate_limited(), NOW + 7000);
        assert_eq!(
            (t.attempts, t.rate_limits, t.rate_limited_since_ms),
            (2, 2, Some(NOW + 6000))
        );
        let outage = || {
            Outcome::Unavailable(
                Failure::llmq(Class::Unavailable, "breaker open")
                    .after(Some(Duration::from_secs(1))),
            )
        };
        t.record(&outage(), NOW + 8000);
        t.record(&outage(), NOW + 9000);
        assert_eq!(
            (t.attempts, t.rate_limits, t.unavailable_since_ms),
            (2, 2, Some(NOW + 8000)),
            "an outage waited out is no attempt and no rate limit"
        );
        t.record(
            &Outcome::Deferred {
                reason: "waited".into(),
            },
            NOW,
        );
        assert_eq!(t.attempts, 2);
        t.record(
            &Outcome::Done(Box::new(JobResult::ok("r".into(), "w".into()))),
            NOW,
        );
        assert_eq!(t.attempts, 3);
    }

    #[test]
    fn deltas_owe_a_marker_and_a_marker_clears_it() {
        let mut t = Tally::default();
        assert!(!t.streamed(false, false));
        assert_eq!((t.restart, t.streamed_here), (false, false));
        assert!(t.streamed(false, true));
        assert_eq!((t.restart, t.streamed_here), (true, true));
        assert!(!t.streamed(true, false), "a marker, then nothing");
        assert_eq!((t.restart, t.streamed_here), (false, true));
        assert!(t.streamed(true, true), "a marker, then deltas again");
        assert!(t.restart);
    }

    #[test]
    fn a_call_cut_at_its_deadline_counts_and_expires() {
        let mut t = Tally::default();
        let after = t.attempted(Attempted::PastDeadline, false, NOW);
        assert_eq!(
            after,
            AfterAttempt {
                produced: Some(Outcome::Failed(Failure::llmq(
                    Class::Ended(ErrorKind::Expired),
                    CUT_AT_DEADLINE
                ))),
                stopping: false
            }
        );
        assert_eq!(t.attempts, 1);
    }

    #[test]
    fn a_shutdown_mid_call_counts_the_attempt_only_if_it_streamed() {
        let mut t = Tally::default();
        let after = t.attempted(Attempted::Shutdown, false, NOW);
        assert_eq!(
            after,
            AfterAttempt {
                produced: None,
                stopping: true
            }
        );
        assert_eq!(t.attempts, 0);
        let after = t.attempted(Attempted::Shutdown, true, NOW);
        assert!(after.stopping);
        assert_eq!(t.attempts, 1, "its deltas went out under this number");
    }

    #[test]
    fn a_cancel_mid_call_counts_nothing_and_a_produced_outcome_is_recorded() {
        let mut t = Tally::default();
        let after = t.attempted(Attempted::Cancelled, true, NOW);
        assert_eq!(
            (after.produced, after.stopping, t.attempts),
            (None, false, 0)
        );
        let after = t.attempted(Attempted::Produced(retry()), false, NOW);
        assert_eq!(after.produced, Some(retry()));
        assert_eq!(t.attempts, 1);
    }

    #[test]
    fn headers_carry_the_counts_and_a_move_s_own() {
        let t = Tally {
            attempts: 3,
            redeliveries: 1,
            first_failure: Some(9),
            rate_limited_since_ms: Some(NOW),
            rate_limits: 4,
            unavailable_since_ms: Some(NOW + 1),
            restart: true,
            streamed_here: true,
        };
        let state = t.retry_state();
        assert_eq!(
            state,
            RetryState {
                attempts: 3,
                redeliveries: 1,
                first_failure: Some(9),
                not_before_ms: None,
                rate_limited_since_ms: Some(NOW),
                unavailable_since_ms: Some(NOW + 1),
                streamed: true,
            }
        );
        let moved = t.moved(&Republish {
            to: Destination::Requeue,
            attempts: 4,
            redeliveries: 2,
            reason: "redelivered".into(),
        });
        assert_eq!((moved.attempts, moved.redeliveries), (4, 2));
        assert_eq!(moved.first_failure, Some(9));
    }
}
