//! When to try a transient failure again: exponential backoff with full jitter, never
//! sooner than the upstream's `Retry-After`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetryConfig;

/// The retry policy of a worker.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    max_attempts: u32,
    schedule: ExponentialBuilder,
    max_delay: Duration,
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
        }
    }

    /// Upstream calls allowed per request.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
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
    fn attempts_are_bounded() {
        let p = policy();
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
    }
}
