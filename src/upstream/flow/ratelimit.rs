//! Request and token budgets per minute (`llm.max_requests_per_minute`,
//! `llm.max_tokens_per_minute`): token buckets, per replica or, with `limits.redis_url`,
//! shared by the whole fleet through an atomic Redis script so that N replicas do not
//! multiply the provider's limit by N.
//!
//! Token costs are estimates (prompt characters / 4 + `max_tokens`) taken before the call and
//! corrected by the reported usage afterwards; a call that produced no usage (an error, a
//! timeout, a cancelled call) gives its whole charge back. A bucket may run into debt, which
//! later calls wait out, but never deeper than one minute of capacity: one request with an
//! absurd estimate delays the others by a minute at most, not for hours.
//!
//! A deployment's calls take from its budgets through its [`super::line::Line`], a part at a
//! time ([`Budget::try_request`], [`Budget::take_some_tokens`]): a call is charged at most the
//! bucket's capacity and never starts into debt, only a usage correction can take a bucket
//! below zero. A tenant's own budgets ([`Budget::take_request`], [`Budget::take_tokens`])
//! serve one tenant's calls, whose debt is its own to wait out.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::Script;
use tokio::time::Instant;
use tracing::warn;

use crate::{
    config::LimitsConfig,
    store::{keys, redis_conn::LazyConnection},
};

/// The atomic bucket: refills by elapsed server time, then by `ARGV[4]` (a [`Mode`]): `0`
/// takes `cost` while the bucket is above zero (a large request runs into debt that later
/// ones wait out, instead of starving), else answers how many milliseconds to wait; `2`
/// takes what the bucket holds up to `cost` and answers how long until the rest is there;
/// `1` (a usage correction) always applies. A negative cost refunds. The level stays within
/// one capacity of debt and one capacity of credit. Answers `{wait_ms, charged}`: what was
/// taken, for an exact refund later.
const BUCKET_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local mode = ARGV[4]
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or cap
local ts = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
local wait = 0
local charged = 0
if mode == '2' and cost > 0 then
  if tokens > 0 then
    charged = math.floor(math.min(tokens, cost))
    tokens = tokens - charged
  end
  if charged < cost then
    wait = math.max(1, math.ceil((cost - charged - tokens) / rate))
  end
elseif mode == '1' or cost <= 0 or tokens > 0 then
  local after = math.min(cap, math.max(-cap, tokens - cost))
  charged = tokens - after
  tokens = after
else
  wait = math.max(1, math.ceil(-tokens / rate))
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
return {wait, math.floor(charged)}
";

/// Longest a Redis connect or script call may take before the replica limits itself alone.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a replica limits itself alone after the shared budget's Redis failed.
const REDIS_BACKOFF: Duration = Duration::from_secs(10);

/// Longest single wait before the budget is asked again.
pub(super) const MAX_WAIT: Duration = Duration::from_secs(5);

/// A per-minute budget of requests and of tokens.
pub struct Budget {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

enum Bucket {
    Local(LocalBucket),
    Shared(Box<SharedBucket>),
}

/// How a take treats a bucket (`ARGV[4]` of [`BUCKET_SCRIPT`]).
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// All of the cost once the bucket is above zero, into debt if need be.
    Whole,
    /// A usage correction: always, within one capacity of debt.
    Force,
    /// What the bucket holds, up to the cost.
    Partial,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Whole => "0",
            Mode::Force => "1",
            Mode::Partial => "2",
        }
    }
}

impl Budget {
    /// No limits.
    pub fn unlimited() -> Self {
        Self {
            requests: None,
            tokens: None,
        }
    }

    /// A deployment's budgets per minute (0 = no limit), shared through Redis when `shared`
    /// (the connection to `limits.redis_url`) is given. The keys are
    /// `<limits.key_prefix>:<scope>:requests` and `:tokens`, or without the scope for the
    /// `default` deployment (the keys of the versions before `[upstreams]`).
    pub fn new(
        requests_per_minute: u64,
        tokens_per_minute: u64,
        limits: &LimitsConfig,
        shared: Option<Arc<LazyConnection>>,
        scope: Option<&str>,
    ) -> Self {
        let prefix = keys::bucket_prefix(&limits.key_prefix, scope);
        let bucket = |per_minute: u64, name: &str| -> Option<Bucket> {
            if per_minute == 0 {
                return None;
            }
            Some(match &shared {
                Some(conn) => Bucket::Shared(Box::new(SharedBucket {
                    conn: conn.clone(),
                    down_until: Mutex::new(None),
                    key: keys::bucket(&prefix, name),
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

    /// Whether it limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }

    /// The most tokens one call is charged, the token bucket's capacity: a call whose
    /// estimate is larger would wait for more than a full minute's budget (its usage settles
    /// the difference). `None` without a token budget.
    pub fn token_capacity(&self) -> Option<u64> {
        match &self.tokens {
            Some(Bucket::Local(b)) => Some(b.capacity as u64),
            Some(Bucket::Shared(b)) => Some(b.capacity),
            None => None,
        }
    }

    /// Takes one request from the request budget if it holds one: `None` when taken (or
    /// there is no request budget), else how long until it does.
    pub async fn try_request(&self) -> Option<Duration> {
        let b = self.requests.as_ref()?;
        match b.take_some(1).await {
            (1, _) => None,
            (_, wait) => Some(wait),
        }
    }

    /// Takes what the token budget holds, up to `tokens`: the tokens taken, and how long
    /// until the rest is there (zero once all were taken, or without a token budget).
    pub async fn take_some_tokens(&self, tokens: u64) -> (u64, Duration) {
        match &self.tokens {
            Some(b) => b.take_some(tokens).await,
            None => (0, Duration::ZERO),
        }
    }

    /// Waits until the request budget holds one request, and takes it (a tenant's own).
    pub async fn take_request(&self) {
        if let Some(b) = &self.requests {
            b.take(1).await;
        }
    }

    /// Waits until the token budget is above zero and takes `tokens`, into debt if need be (a
    /// tenant's own): answers the tokens taken, `tokens` or less when the debt bound cut the
    /// charge. That is what [`Self::settle`] corrects and a call without usage gives back.
    pub async fn take_tokens(&self, tokens: u64) -> u64 {
        match &self.tokens {
            Some(b) => b.take(tokens).await,
            None => 0,
        }
    }

    /// Gives back a request taken, for a call that never reached the upstream.
    pub async fn give_back_request(&self) {
        if let Some(b) = &self.requests {
            b.adjust(1).await;
        }
    }

    /// Corrects the token budget: the call used `actual` tokens, `taken` were taken (0 used
    /// gives everything back).
    pub async fn settle(&self, taken: u64, actual: u64) {
        if let Some(b) = &self.tokens
            && taken != actual
        {
            let refund = i64::try_from(taken)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(actual).unwrap_or(i64::MAX));
            b.adjust(refund).await;
        }
    }
}

#[cfg(test)]
impl Budget {
    /// The level of a local token bucket as last stored (refill is added on the next take).
    pub(crate) fn stored_tokens(&self) -> Option<f64> {
        match &self.tokens {
            Some(Bucket::Local(b)) => Some(b.state.lock().unwrap_or_else(|e| e.into_inner()).0),
            _ => None,
        }
    }
}

impl Bucket {
    async fn take(&self, cost: u64) -> u64 {
        match self {
            Bucket::Local(b) => b.take(cost).await,
            Bucket::Shared(b) => b.take(cost).await,
        }
    }

    async fn take_some(&self, cost: u64) -> (u64, Duration) {
        match self {
            Bucket::Local(b) => b.take_some(cost),
            Bucket::Shared(b) => b.take_some(cost).await,
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

    /// Waits until the bucket is above zero, then takes `cost`, into debt if need be but
    /// never deeper than one capacity; answers what was taken.
    pub async fn take(&self, cost: u64) -> u64 {
        loop {
            match self.try_take(cost as f64) {
                Ok(charged) => return charged,
                Err(wait) => tokio::time::sleep(wait.min(MAX_WAIT)).await,
            }
        }
    }

    fn try_take(&self, cost: f64) -> Result<u64, Duration> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, at) = *s;
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * self.per_sec).min(self.capacity);
        if tokens > 0.0 || cost <= 0.0 {
            let after = (tokens - cost).clamp(-self.capacity, self.capacity);
            *s = (after, now);
            // Rounded down, so that giving it back never adds a token that was not taken.
            Ok((tokens - after).max(0.0).floor() as u64)
        } else {
            *s = (tokens, now);
            Err(Duration::from_secs_f64(-tokens / self.per_sec).max(Duration::from_millis(1)))
        }
    }

    /// Takes what the bucket holds, up to `cost`, never into debt: the tokens taken (whole
    /// ones), and how long until the rest is there (zero once all were taken).
    pub fn take_some(&self, cost: u64) -> (u64, Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (tokens, at) = *s;
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * self.per_sec).min(self.capacity);
        let cost = cost as f64;
        let charged = if tokens > 0.0 {
            tokens.min(cost).floor()
        } else {
            0.0
        };
        let after = tokens - charged;
        *s = (after, now);
        let left = cost - charged;
        let wait = if left <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((left - after) / self.per_sec).max(Duration::from_millis(1))
        };
        (charged as u64, wait)
    }

    /// Gives back (positive) or charges (negative) tokens, within one capacity of debt.
    pub fn adjust(&self, refund: i64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 = (s.0 + refund as f64).clamp(-self.capacity, self.capacity);
    }
}

/// A token bucket in Redis, shared by every replica.
struct SharedBucket {
    /// Shared with the other bucket; concurrent callers share one connect attempt.
    conn: Arc<LazyConnection>,
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

    /// Runs the bucket script: `(wait_ms, charged)`, or why Redis could not answer.
    async fn call(&self, cost: i64, mode: Mode) -> Result<(u64, i64), String> {
        // No retries here: a caller waiting on Redis holds a flow slot.
        let mut conn = self.conn.get().await.map_err(|e| e.to_string())?;
        let per_ms = self.capacity as f64 / 60_000.0;
        Script::new(BUCKET_SCRIPT)
            .key(&self.key)
            .arg(self.capacity)
            .arg(per_ms)
            .arg(cost)
            .arg(mode.arg())
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.kind_str())
    }

    async fn take(&self, cost: u64) -> u64 {
        let cost_arg = i64::try_from(cost).unwrap_or(i64::MAX);
        loop {
            if self.is_down() {
                return self.fallback.take(cost).await;
            }
            match self.call(cost_arg, Mode::Whole).await {
                Ok((0, charged)) => return u64::try_from(charged).unwrap_or(0),
                Ok((wait_ms, _)) => {
                    tokio::time::sleep(Duration::from_millis(wait_ms).min(MAX_WAIT)).await;
                }
                Err(e) => {
                    warn!(error = %e, "shared rate limit unreachable; limiting this replica alone for a while");
                    self.mark_down();
                    return self.fallback.take(cost).await;
                }
            }
        }
    }

    /// [`LocalBucket::take_some`] in Redis.
    async fn take_some(&self, cost: u64) -> (u64, Duration) {
        if !self.is_down() {
            let cost_arg = i64::try_from(cost).unwrap_or(i64::MAX);
            match self.call(cost_arg, Mode::Partial).await {
                Ok((wait_ms, charged)) => {
                    return (
                        u64::try_from(charged).unwrap_or(0),
                        Duration::from_millis(wait_ms),
                    );
                }
                Err(e) => {
                    warn!(error = %e, "shared rate limit unreachable; limiting this replica alone for a while");
                    self.mark_down();
                }
            }
        }
        self.fallback.take_some(cost)
    }

    async fn adjust(&self, refund: i64) {
        if self.is_down()
            || self
                .call(refund.saturating_neg(), Mode::Force)
                .await
                .is_err()
        {
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
    async fn a_request_larger_than_the_bucket_goes_through_into_one_minute_of_debt_at_most() {
        let b = LocalBucket::new(100);
        assert_eq!(
            b.take(1000).await,
            200,
            "a full bucket, down to one capacity of debt"
        );
        let one_minute = Duration::from_secs(60)..Duration::from_millis(60_010);
        let start = Instant::now();
        b.take(100).await;
        assert!(
            one_minute.contains(&start.elapsed()),
            "one minute, not nine: {:?}",
            start.elapsed()
        );
        b.adjust(-1_000_000);
        let start = Instant::now();
        b.take(1).await;
        assert!(
            one_minute.contains(&start.elapsed()),
            "a usage correction is bounded by one minute of debt too: {:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_huge_estimate_given_back_leaves_the_bucket_as_it_was() {
        let b = LocalBucket::new(100_000);
        assert_eq!(b.take(40_000).await, 40_000);
        let taken = b.take(u64::from(u32::MAX)).await;
        assert_eq!(taken, 160_000, "60 000 left, down to -100 000");
        b.adjust(i64::try_from(taken).expect("fits"));
        let start = Instant::now();
        for _ in 0..50 {
            assert_eq!(b.take(257).await, 257);
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the budget is whole again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_take_never_goes_into_debt_and_says_how_long_the_rest_takes() {
        let b = LocalBucket::new(600); // ten a second
        assert_eq!(b.take_some(1000), (600, Duration::from_secs(40)));
        assert_eq!(b.take_some(10), (0, Duration::from_secs(1)));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(b.take_some(10), (5, Duration::from_millis(500)));
        assert_eq!(b.take_some(0), (0, Duration::ZERO));
        b.adjust(-600);
        assert_eq!(
            b.take_some(10),
            (0, Duration::from_secs(61)),
            "a usage correction's debt is waited out first"
        );
    }

    /// A shared bucket at a key of its own in the Redis at `REDIS_URL`, deleted on drop.
    struct SharedFixture {
        bucket: SharedBucket,
        client: redis::Client,
    }

    impl SharedFixture {
        fn new(per_minute: u64) -> Self {
            let url =
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
            let client = redis::Client::open(url).expect("URL");
            let key = format!(
                "llmq-test-bucket-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..10]
            );
            let bucket = SharedBucket {
                conn: Arc::new(LazyConnection::new(client.clone(), REDIS_TIMEOUT)),
                down_until: Mutex::new(None),
                key,
                capacity: per_minute,
                fallback: LocalBucket::new(per_minute),
            };
            Self { bucket, client }
        }

        async fn level(&self) -> String {
            let mut conn = self
                .client
                .get_multiplexed_async_connection()
                .await
                .expect("the Redis at REDIS_URL answers");
            redis::cmd("HGET")
                .arg(&self.bucket.key)
                .arg("tokens")
                .query_async(&mut conn)
                .await
                .expect("HGET")
        }

        async fn delete(self) {
            let mut conn = self
                .client
                .get_multiplexed_async_connection()
                .await
                .expect("the Redis at REDIS_URL answers");
            let deleted: u32 = redis::cmd("DEL")
                .arg(&self.bucket.key)
                .query_async(&mut conn)
                .await
                .expect("DEL");
            assert_eq!(deleted, 1);
        }
    }

    #[tokio::test]
    async fn the_shared_bucket_bounds_debt_and_gives_a_charge_back() {
        // 60 a minute: a second's refill is a thousandth of a token, so levels are exact.
        let f = SharedFixture::new(60);
        let taken = f.bucket.take(u64::from(u32::MAX)).await;
        assert!(!f.bucket.is_down(), "Redis answered");
        assert_eq!(taken, 120, "from 60 down to -60, not to -4 294 967 235");
        assert_eq!(f.level().await, "-60");
        f.bucket.adjust(i64::try_from(taken).expect("fits")).await;
        assert_eq!(f.level().await, "60", "given back, capped at capacity");
        f.bucket.adjust(-1_000_000).await;
        assert_eq!(f.level().await, "-60", "a correction is bounded too");
        f.delete().await;
    }

    #[tokio::test]
    async fn the_shared_bucket_takes_what_it_holds_without_debt() {
        let f = SharedFixture::new(60);
        let (taken, wait) = f.bucket.take_some(100).await;
        assert!(!f.bucket.is_down(), "Redis answered");
        assert_eq!(taken, 60, "a full bucket, no further");
        assert!(
            (Duration::from_secs(39)..=Duration::from_secs(40)).contains(&wait),
            "forty tokens at one a second: {wait:?}"
        );
        let (taken, wait) = f.bucket.take_some(10).await;
        assert_eq!(taken, 0, "nothing below zero");
        assert!(wait >= Duration::from_secs(9), "{wait:?}");
        f.delete().await;
    }
}
