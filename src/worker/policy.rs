//! When to try a transient failure again: exponential backoff with full jitter, never
//! sooner than the upstream's `Retry-After`, for at most `retry.max_attempts` calls. Short
//! waits happen in the worker, longer ones in the delayed-retry tiers
//! ([`crate::broker::retry`]). Pure: the random draw is an argument.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetryConfig;

/// The retry policy of a worker.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    max_redeliveries: u32,
    schedule: ExponentialBuilder,
    max_delay: Duration,
    inline_max: Duration,
    max_rate_limited: Duration,
    max_unavailable: Duration,
}

impl RetryPolicy {
    /// From the `[retry]` section.
    pub fn new(cfg: &RetryConfig) -> Self {
        let max_delay = Duration::from_secs(cfg.max_delay_secs);
        Self {
            max_attempts: cfg.max_attempts,
            max_redeliveries: cfg.max_redeliveries,
            schedule: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(cfg.initial_delay_ms))
                .with_max_delay(max_delay)
                .with_factor(2.0)
                .without_max_times(),
            max_delay,
            inline_max: Duration::from_millis(cfg.inline_max_ms),
            max_rate_limited: Duration::from_secs(cfg.max_rate_limited_secs),
            max_unavailable: Duration::from_secs(cfg.max_unavailable_secs),
        }
    }

    /// The cap of one backoff delay (`retry.max_delay_secs`).
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// Longest a request may wait out rate limits in all (`retry.max_rate_limited_secs`).
    pub fn max_rate_limited(&self) -> Duration {
        self.max_rate_limited
    }

    /// Longest a request may wait out outages in all (`retry.max_unavailable_secs`).
    pub fn max_unavailable(&self) -> Duration {
        self.max_unavailable
    }

    /// Longest wait done in the worker rather than in a retry queue.
    pub fn inline_max(&self) -> Duration {
        self.inline_max
    }

    /// Whether a delivery that is the `redeliveries`-th unsettled redelivery of its request
    /// may still be processed.
    pub fn may_redeliver(&self, redeliveries: u32) -> bool {
        redeliveries <= self.max_redeliveries
    }

    /// Whether another attempt is allowed after `attempts` calls.
    pub fn may_retry(&self, attempts: u32) -> bool {
        attempts < self.max_attempts
    }

    /// The wait after the `attempts`-th failed call: `jitter` (a uniform draw from [0, 1))
    /// times the exponential step (full jitter, so retries of a burst spread out), but never
    /// less than `retry_after`.
    pub fn delay(&self, attempts: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let step = self
            .schedule
            .build()
            .nth(attempts.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay)
            .min(self.max_delay);
        let jittered = step.mul_f64(jitter.clamp(0.0, 1.0));
        jittered.max(retry_after.unwrap_or(Duration::ZERO))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The policy the decision tests use too.
    pub(crate) fn policy() -> RetryPolicy {
        RetryPolicy::new(&RetryConfig {
            max_attempts: 5,
            initial_delay_ms: 100,
            max_delay_secs: 2,
            inline_max_ms: 1000,
            max_redeliveries: 3,
            max_rate_limited_secs: 600,
            max_unavailable_secs: 300,
        })
    }

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_scales_them() {
        let p = policy();
        for attempts in 1..=20 {
            let bound = Duration::from_millis(100 * 2u64.pow(attempts.min(10) - 1))
                .min(Duration::from_secs(2));
            // backon computes the steps in floating point: compare to the millisecond.
            let ms = |jitter| p.delay(attempts, None, jitter).as_millis();
            assert_eq!(ms(1.0), bound.as_millis(), "attempt {attempts}");
            assert_eq!(ms(0.5), (bound / 2).as_millis(), "attempt {attempts}");
            assert_eq!(p.delay(attempts, None, 0.0), Duration::ZERO);
        }
        assert_eq!(p.delay(1, None, 7.0), Duration::from_millis(100), "clamped");
    }

    #[test]
    fn retry_after_is_a_floor_even_past_the_cap() {
        let p = policy();
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(1)), 0.3),
            Duration::from_secs(1)
        );
        assert_eq!(
            p.delay(9, Some(Duration::from_secs(7)), 1.0),
            Duration::from_secs(7)
        );
        assert_eq!(
            p.delay(9, Some(Duration::from_millis(10)), 1.0),
            Duration::from_secs(2),
            "a short Retry-After does not cut the backoff"
        );
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy();
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
    }
}
