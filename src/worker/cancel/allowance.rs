//! How many cancels each identity may have remembered: cancels come from anyone allowed to
//! publish to the control exchange, for request ids that may never arrive, and every
//! replica hears each one. So per identity, a cancel is remembered only within a rate
//! (`worker.cancels_per_minute`, a minute's worth at once, then evenly) and while fewer
//! than `worker.max_cancels_per_identity` of its cancels are remembered; any other is
//! dropped and counted (`llmq_cancels_dropped_total`). A flood fills its sender's own
//! allowance, never another's.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

/// Why a cancel was not remembered: the `reason` of `llmq_cancels_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Its identity sent more than `worker.cancels_per_minute`.
    RateLimited,
    /// Its identity has `worker.max_cancels_per_identity` cancels remembered already.
    Full,
    /// It carries no identity where requests must (`tenancy.require_user_id`): no request it
    /// could cancel is ever served.
    NoIdentity,
}

impl Dropped {
    /// Every reason, for the metric's zeroed series.
    pub const ALL: [Dropped; 3] = [Dropped::RateLimited, Dropped::Full, Dropped::NoIdentity];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::RateLimited => "rate_limited",
            Dropped::Full => "full",
            Dropped::NoIdentity => "no_identity",
        }
    }
}

/// The bounds every identity is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Cancels remembered per minute, a minute's worth at once; 0: no rate limit.
    pub per_minute: u64,
    /// Cancels remembered at once; 0: no cap.
    pub cap: u64,
    /// How long each is remembered.
    pub ttl: Duration,
}

/// Expiry times are kept in about this many groups, each the cancels remembered within
/// one slice of the TTL: an identity's allowance stays small whatever its cap, and a cancel
/// counts at most a slice longer than it is remembered.
const SLICES: u32 = 64;

/// One identity's allowance.
#[derive(Debug)]
struct Allowance {
    /// Cancels it may still send at once.
    tokens: f64,
    /// When `tokens` was last refilled.
    refilled: Instant,
    /// Its remembered cancels in groups, oldest first: (when the group is let go, how many).
    /// A group takes the cancels whose TTL ends within a slice of its first one's, and is let
    /// go a slice after that.
    remembered: VecDeque<(Instant, u64)>,
    /// The sum of `remembered`'s counts.
    count: u64,
}

impl Allowance {
    fn new(limits: &Limits, now: Instant) -> Self {
        Self {
            tokens: limits.per_minute as f64,
            refilled: now,
            remembered: VecDeque::new(),
            count: 0,
        }
    }

    /// Whether one more cancel may be remembered at `now`; if so, it is counted.
    fn admit(&mut self, limits: &Limits, now: Instant) -> Result<(), Dropped> {
        while let Some(&(until, n)) = self.remembered.front()
            && until <= now
        {
            self.remembered.pop_front();
            self.count -= n;
        }
        if limits.cap > 0 && self.count >= limits.cap {
            return Err(Dropped::Full);
        }
        if limits.per_minute > 0 {
            let burst = limits.per_minute as f64;
            let refill = now.saturating_duration_since(self.refilled).as_secs_f64() * burst / 60.0;
            self.tokens = (self.tokens + refill).min(burst);
            self.refilled = now;
            if self.tokens < 1.0 {
                return Err(Dropped::RateLimited);
            }
            self.tokens -= 1.0;
        }
        if limits.cap > 0 {
            let until = now + limits.ttl;
            match self.remembered.back_mut() {
                Some((let_go, n)) if until <= *let_go => *n += 1,
                _ => self.remembered.push_back((until + limits.ttl / SLICES, 1)),
            }
            self.count += 1;
        }
        Ok(())
    }
}

/// Every identity's allowance, for as many identities as `tenancy.max_tenants`.
pub struct Allowances {
    limits: Limits,
    /// By identity; one idle for a TTL has nothing remembered and a full rate, so it goes.
    per: moka::sync::Cache<String, Arc<Mutex<Allowance>>>,
}

impl Allowances {
    /// Holds each of at most `identities` identities to `limits`.
    pub fn new(limits: Limits, identities: u64) -> Self {
        Self {
            limits,
            per: moka::sync::Cache::builder()
                .max_capacity(identities)
                .time_to_idle(limits.ttl.max(Duration::from_secs(60)))
                .build(),
        }
    }

    /// Whether a cancel of `identity` may be remembered at `now`; if so, it is counted.
    pub fn admit(&self, identity: &str, now: Instant) -> Result<(), Dropped> {
        let allowance = self.per.get_with_by_ref(identity, || {
            Arc::new(Mutex::new(Allowance::new(&self.limits, now)))
        });
        // Plain counters: a panic while they were held left them usable.
        let mut allowance = allowance.lock().unwrap_or_else(|e| e.into_inner());
        allowance.admit(&self.limits, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn admitted(a: &Allowances, identity: &str, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| a.admit(identity, now).is_ok()).count()
    }

    #[test]
    fn a_flood_is_held_to_the_cap_of_its_own_identity() {
        let limits = Limits {
            per_minute: 0,
            cap: 50,
            ttl: HOUR,
        };
        let a = Allowances::new(limits, 100);
        let now = Instant::now();
        assert_eq!(admitted(&a, "mallory", 1000, now), 50);
        assert_eq!(a.admit("mallory", now), Err(Dropped::Full));
        assert_eq!(
            admitted(&a, "alice", 10, now),
            10,
            "another's allowance is whole"
        );
        // Once remembered ones expire (at most a slice late), there is room again.
        let later = now + HOUR + HOUR / SLICES;
        assert_eq!(admitted(&a, "mallory", 1000, later), 50);
    }

    #[test]
    fn a_minute_s_worth_at_once_then_evenly() {
        let limits = Limits {
            per_minute: 60,
            cap: 0,
            ttl: HOUR,
        };
        let a = Allowances::new(limits, 100);
        let now = Instant::now();
        assert_eq!(admitted(&a, "mallory", 500, now), 60);
        assert_eq!(a.admit("mallory", now), Err(Dropped::RateLimited));
        assert_eq!(
            admitted(&a, "mallory", 500, now + Duration::from_secs(10)),
            10
        );
        assert_eq!(
            admitted(&a, "mallory", 500, now + Duration::from_secs(1000)),
            60,
            "refilled to a minute's worth, no more"
        );
        assert_eq!(admitted(&a, "bob", 500, now), 60, "each identity its own");
    }

    #[test]
    fn a_full_allowance_spends_no_rate() {
        let limits = Limits {
            per_minute: 10,
            cap: 5,
            ttl: Duration::from_secs(60),
        };
        let a = Allowances::new(limits, 100);
        let now = Instant::now();
        assert_eq!(admitted(&a, "m", 100, now), 5);
        let later = now + Duration::from_secs(61) + Duration::from_secs(60) / SLICES;
        // 5 tokens were left, and a minute refilled them all.
        assert_eq!(admitted(&a, "m", 100, later), 5);
    }

    #[test]
    fn expiries_are_kept_in_few_groups_whatever_the_cap() {
        let limits = Limits {
            per_minute: 0,
            cap: 1_000_000,
            ttl: Duration::from_secs(640),
        };
        let mut allowance = Allowance::new(&limits, Instant::now());
        let start = Instant::now();
        for i in 0..10_000u32 {
            let now = start + Duration::from_millis(u64::from(i) * 64);
            assert_eq!(allowance.admit(&limits, now), Ok(()));
        }
        assert_eq!(allowance.count, 10_000);
        assert!(
            allowance.remembered.len() <= SLICES as usize + 1,
            "{} groups",
            allowance.remembered.len()
        );
        // A steady trickle: what is counted is what the TTL (and one slice) holds.
        let limits = Limits {
            ttl: Duration::from_secs(64),
            ..limits
        };
        let mut allowance = Allowance::new(&limits, start);
        for i in 0..600u64 {
            let now = start + Duration::from_secs(i);
            assert_eq!(allowance.admit(&limits, now), Ok(()));
            assert!(
                allowance.count <= 64 + 1 + 1,
                "{} at {i} s",
                allowance.count
            );
        }
        assert!(allowance.count >= 64, "{}", allowance.count);
    }
}
