//! When to try a transient failure again: exponential backoff with full jitter, never
//! sooner than the upstream's `Retry-After`; and where to wait.
//!
//! Short waits (up to `retry.inline_max_ms`) happen in the worker. Longer ones go through
//! durable delayed-retry queues: the request is republished, with its attempt count in a
//! header, to a queue whose messages expire after their per-message TTL and dead-letter back
//! to the request exchange. The queues are tiered by delay, because a classic queue only
//! expires the message at its head: a 10 s retry never waits behind a 10 min one.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetryConfig;

/// Upstream attempts made before this delivery (a count that travels with the message).
pub const ATTEMPTS_HEADER: &str = "x-llmq-attempts";
/// Unix seconds of the request's first failure.
pub const FIRST_FAILURE_HEADER: &str = "x-llmq-first-failure";
/// Unix milliseconds before which the request must not be tried again.
pub const NOT_BEFORE_HEADER: &str = "x-llmq-not-before";
/// The last transient error, for people reading a retry queue.
pub const LAST_ERROR_HEADER: &str = "x-llmq-last-error";
/// Which delayed-retry queue a message goes to (the retry exchange is a headers exchange,
/// which ignores header names starting with `x-` when matching, hence no prefix).
pub const TIER_HEADER: &str = "llmq-retry-tier";

/// One delayed-retry queue: messages waiting up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Suffix of the queue name and value of [`TIER_HEADER`].
    pub name: &'static str,
    /// Longest wait it takes.
    pub max: Duration,
}

/// The delayed-retry tiers, shortest first.
pub const TIERS: [Tier; 5] = [
    Tier {
        name: "5s",
        max: Duration::from_secs(5),
    },
    Tier {
        name: "30s",
        max: Duration::from_secs(30),
    },
    Tier {
        name: "2m",
        max: Duration::from_secs(120),
    },
    Tier {
        name: "10m",
        max: Duration::from_secs(600),
    },
    Tier {
        name: "1h",
        max: Duration::from_secs(3600),
    },
];

/// The tier for a wait of `delay`, and the wait it actually gets there (a wait longer than
/// the last tier is cut to it; the not-before header sends the message round again).
pub fn tier_for(delay: Duration) -> (Tier, Duration) {
    let last = TIERS[TIERS.len() - 1];
    let tier = TIERS
        .iter()
        .copied()
        .find(|t| delay <= t.max)
        .unwrap_or(last);
    (tier, delay.min(tier.max))
}

/// The retry policy of a worker.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    schedule: ExponentialBuilder,
    max_delay: Duration,
    inline_max: Duration,
}

impl RetryPolicy {
    /// From the `[retry]` section.
    pub fn new(cfg: &RetryConfig) -> Self {
        let max_delay = Duration::from_secs(cfg.max_delay_secs);
        Self {
            max_attempts: cfg.max_attempts,
            schedule: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(cfg.initial_delay_ms))
                .with_max_delay(max_delay)
                .with_factor(2.0)
                .without_max_times(),
            max_delay,
            inline_max: Duration::from_millis(cfg.inline_max_ms),
        }
    }

    /// Upstream calls allowed per request.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Longest wait done in the worker rather than in a retry queue.
    pub fn inline_max(&self) -> Duration {
        self.inline_max
    }

    /// Whether another attempt is allowed after `attempts` calls.
    pub fn may_retry(&self, attempts: u32) -> bool {
        attempts < self.max_attempts
    }

    /// The wait after the `attempts`-th failed call: a uniform draw from zero to the
    /// exponential step (full jitter, so retries of a burst spread out), but never less than
    /// `retry_after`.
    pub fn delay(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let step = self
            .schedule
            .build()
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        let jittered = step.mul_f64(fastrand::f64());
        jittered.max(retry_after.unwrap_or(Duration::ZERO))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(&RetryConfig {
            max_attempts: 5,
            initial_delay_ms: 100,
            max_delay_secs: 2,
            inline_max_ms: 1000,
        })
    }

    #[test]
    fn delays_are_capped_and_jittered() {
        let p = policy();
        for attempts in 1..=20 {
            let bound = Duration::from_millis(100 * 2u64.pow(attempts.min(10) - 1))
                .min(Duration::from_secs(2));
            for _ in 0..50 {
                let d = p.delay(attempts, None);
                assert!(d <= bound, "attempt {attempts}: {d:?} > {bound:?}");
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| p.delay(3, None)).collect();
        assert!(spread.len() > 10, "full jitter spreads delays");
    }

    #[test]
    fn retry_after_is_a_floor_even_past_the_cap() {
        let p = policy();
        for _ in 0..50 {
            assert!(p.delay(1, Some(Duration::from_secs(1))) >= Duration::from_secs(1));
            assert_eq!(
                p.delay(1, Some(Duration::from_secs(7))),
                Duration::from_secs(7)
            );
        }
    }

    #[test]
    fn tiers_never_shorten_a_wait() {
        assert_eq!(tier_for(Duration::from_secs(3)).0.name, "5s");
        assert_eq!(tier_for(Duration::from_secs(5)).0.name, "5s");
        assert_eq!(tier_for(Duration::from_secs(6)).0.name, "30s");
        assert_eq!(tier_for(Duration::from_secs(6)).1, Duration::from_secs(6));
        let (t, d) = tier_for(Duration::from_secs(7200));
        assert_eq!((t.name, d), ("1h", Duration::from_secs(3600)));
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy();
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
    }
}
