//! Request and token budgets per minute (`llm.max_requests_per_minute`,
//! `llm.max_tokens_per_minute`): token buckets, per replica or, with `limits.redis_url`,
//! shared by the whole fleet through an atomic Redis script so that N replicas do not
//! multiply the provider's limit by N.
//!
//! Token costs are estimates (prompt characters / 4 + `max_tokens`) taken before the call and
//! corrected by the reported usage afterwards; a bucket may run into debt, which later calls
//! wait out.

use std::{sync::Mutex, time::Duration};

use redis::{Script, aio::ConnectionManager};
use tokio::{sync::OnceCell, time::Instant};
use tracing::warn;

use crate::config::LimitsConfig;

/// The atomic bucket: refills by elapsed server time, takes `cost` while the bucket is above
/// zero (a large request runs into debt that later ones wait out, instead of starving), else
/// answers how many milliseconds to wait. `force` (a usage correction) always applies; a
/// negative cost refunds.
const BUCKET_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local force = ARGV[4] == '1'
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or cap
local ts = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local wait = 0
if force or cost <= 0 or tokens > 0 then
  tokens = tokens - cost
else
  wait = math.max(1, math.ceil(-tokens / rate))
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
return wait
";

/// How long a replica limits itself alone after the shared budget's Redis failed.
const REDIS_BACKOFF: Duration = Duration::from_secs(10);

/// Longest single wait before the budget is asked again.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// A per-minute budget of requests and of tokens.
pub struct Budget {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

enum Bucket {
    Local(LocalBucket),
    Shared(Box<SharedBucket>),
}

impl Budget {
    /// No limits.
    pub fn unlimited() -> Self {
        Self {
            requests: None,
            tokens: None,
        }
    }

    /// From `llm.max_requests_per_minute`, `llm.max_tokens_per_minute` (0 = no limit) and,
    /// when `limits.redis_url` is set, shared through Redis.
    pub fn new(requests_per_minute: u64, tokens_per_minute: u64, limits: &LimitsConfig) -> Self {
        let shared = (!limits.redis_url.expose().is_empty())
            .then(|| redis::Client::open(limits.redis_url.expose()).ok())
            .flatten();
        let bucket = |per_minute: u64, name: &str| -> Option<Bucket> {
            if per_minute == 0 {
                return None;
            }
            Some(match &shared {
                Some(client) => Bucket::Shared(Box::new(SharedBucket {
                    client: client.clone(),
                    conn: OnceCell::new(),
                    down_until: Mutex::new(None),
                    key: format!("{}:{name}", limits.key_prefix),
                    capacity: per_minute,
                    fallback: LocalBucket::new(per_minute),
                })),
                None => Bucket::Local(LocalBucket::new(per_minute)),
            })
        };
        Self {
            requests: bucket(requests_per_minute, "requests"),
            tokens: bucket(tokens_per_minute, "tokens"),
        }
    }

    /// Waits until one request and `tokens` tokens are in the budget, and takes them.
    pub async fn take(&self, tokens: u64) {
        if let Some(b) = &self.requests {
            b.take(1).await;
        }
        if let Some(b) = &self.tokens {
            b.take(tokens).await;
        }
    }

    /// Corrects the token budget: the call used `actual` tokens, `estimated` were taken.
    pub async fn settle(&self, estimated: u64, actual: u64) {
        if let Some(b) = &self.tokens
            && estimated != actual
        {
            b.adjust(estimated as i64 - actual as i64).await;
        }
    }
}

impl Bucket {
    async fn take(&self, cost: u64) {
        match self {
            Bucket::Local(b) => b.take(cost).await,
            Bucket::Shared(b) => b.take(cost).await,
        }
    }

    async fn adjust(&self, refund: i64) {
        match self {
            Bucket::Local(b) => b.adjust(refund),
            Bucket::Shared(b) => b.adjust(refund).await,
        }
    }
}

/// A token bucket in this process: `capacity` per minute, refilled continuously.
pub struct LocalBucket {
    capacity: f64,
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl LocalBucket {
    /// A full bucket of `per_minute`.
    pub fn new(per_minute: u64) -> Self {
        let capacity = per_minute.max(1) as f64;
        Self {
            capacity,
            per_sec: capacity / 60.0,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    /// Waits until the bucket is above zero, then takes all of `cost` (possibly into debt).
    pub async fn take(&self, cost: u64) {
        loop {
            let wait = self.try_take(cost as f64);
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait.min(MAX_WAIT)).await;
        }
    }

    fn try_take(&self, cost: f64) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, at) = *s;
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * self.per_sec).min(self.capacity);
        if tokens > 0.0 || cost <= 0.0 {
            *s = (tokens - cost, now);
            Duration::ZERO
        } else {
            *s = (tokens, now);
            Duration::from_secs_f64(-tokens / self.per_sec).max(Duration::from_millis(1))
        }
    }

    /// Gives back (positive) or charges (negative) tokens.
    pub fn adjust(&self, refund: i64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = (s.0 + refund as f64).min(self.capacity);
    }
}

/// A token bucket in Redis, shared by every replica.
struct SharedBucket {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    /// After a failure, Redis is left alone (the local bucket serves) until then.
    down_until: Mutex<Option<Instant>>,
    key: String,
    capacity: u64,
    /// Used while Redis cannot be reached, so the replica still limits itself.
    fallback: LocalBucket,
}

impl SharedBucket {
    /// Whether Redis failed recently (the local bucket serves meanwhile).
    fn is_down(&self) -> bool {
        let until = *self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    fn mark_down(&self) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + REDIS_BACKOFF);
    }

    async fn call(&self, cost: i64, force: bool) -> Result<u64, redis::RedisError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                // No retries here: a caller waiting on Redis holds a flow slot.
                let cfg = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(1)))
                    .set_response_timeout(Some(Duration::from_secs(1)))
                    .set_number_of_retries(0);
                self.client.get_connection_manager_with_config(cfg).await
            })
            .await?;
        let mut conn = conn.clone();
        let per_ms = self.capacity as f64 / 60_000.0;
        Script::new(BUCKET_SCRIPT)
            .key(&self.key)
            .arg(self.capacity)
            .arg(per_ms)
            .arg(cost)
            .arg(if force { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
    }

    async fn take(&self, cost: u64) {
        loop {
            if self.is_down() {
                return self.fallback.take(cost).await;
            }
            match self.call(cost as i64, false).await {
                Ok(0) => return,
                Ok(wait_ms) => {
                    tokio::time::sleep(Duration::from_millis(wait_ms).min(MAX_WAIT)).await;
                }
                Err(e) => {
                    warn!(error = %e.kind_str(), "shared rate limit unreachable; limiting this replica alone for a while");
                    self.mark_down();
                    return self.fallback.take(cost).await;
                }
            }
        }
    }

    async fn adjust(&self, refund: i64) {
        if self.is_down() || self.call(-refund, true).await.is_err() {
            self.fallback.adjust(refund);
        }
    }
}

trait KindStr {
    fn kind_str(&self) -> String;
}

impl KindStr for redis::RedisError {
    /// The error without anything that could quote the URL.
    fn kind_str(&self) -> String {
        format!("{:?}", self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn local_bucket_holds_the_budget_over_a_window() {
        let b = LocalBucket::new(60); // one per second
        let start = Instant::now();
        for _ in 0..60 {
            b.take(1).await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(10),
            "a full bucket serves a burst"
        );
        for _ in 0..30 {
            b.take(1).await;
        }
        let spent = start.elapsed();
        assert!(
            spent >= Duration::from_secs(29) && spent <= Duration::from_secs(31),
            "then one per second: {spent:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn usage_corrections_refund_and_charge() {
        let b = LocalBucket::new(600); // ten per second
        b.take(600).await;
        b.adjust(300); // the call used half its estimate
        let start = Instant::now();
        b.take(300).await;
        assert!(start.elapsed() < Duration::from_millis(10));
        b.adjust(-600); // a call used far more than estimated: debt
        let start = Instant::now();
        b.take(1).await;
        assert!(
            start.elapsed() >= Duration::from_secs(59),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_bucket_still_goes_through() {
        let b = LocalBucket::new(100);
        b.take(1000).await;
        let start = Instant::now();
        b.take(100).await;
        assert!(
            start.elapsed() >= Duration::from_secs(60 * 9),
            "it left debt behind"
        );
    }
}
