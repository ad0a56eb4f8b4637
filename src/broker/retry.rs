//! The delayed-retry tiers: where a request waits when its next attempt is far off (the
//! policy of when to retry is [`crate::worker::policy`]).
//!
//! Long waits go through durable delayed-retry queues: the request is republished, with its
//! attempt count in a header, to a queue whose messages expire after their per-message TTL
//! and dead-letter back to the request exchange. The queues are quorum queues that
//! dead-letter at least once (the broker keeps an expired message until its work queue
//! confirms it, see [`crate::broker::topology::retry_queue_arguments`]). They are tiered by
//! delay, because a queue only expires the message at its head: a 10 s retry never waits
//! behind a 10 min one.

use std::time::Duration;

/// One delayed-retry queue: messages waiting up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    /// Suffix of the queue name and value of the [`crate::contract::headers::RETRY_TIER`]
    /// header.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_never_shorten_a_wait() {
        assert_eq!(tier_for(Duration::from_secs(3)).0.name, "5s");
        assert_eq!(tier_for(Duration::from_secs(5)).0.name, "5s");
        assert_eq!(tier_for(Duration::from_secs(6)).0.name, "30s");
        assert_eq!(tier_for(Duration::from_secs(6)).1, Duration::from_secs(6));
        let (t, d) = tier_for(Duration::from_secs(7200));
        assert_eq!((t.name, d), ("1h", Duration::from_secs(3600)));
    }
}
