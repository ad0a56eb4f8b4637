//! Cancels kept in Redis for the whole fleet (with `idempotency.store = "redis"`): one
//! sorted set per identity, `<idempotency>:cancels:<identity>` ([`keys::cancels`]), of the
//! request ids it cancelled, each scored with when it is let go (Unix ms). A set holds at
//! most the identity's cap (`worker.max_cancels_per_identity`), checked and added in one
//! script, so a flood from one identity leaves at most that many whatever the replicas; the
//! key itself expires a TTL after its last cancel.

use std::{sync::Arc, time::Duration};

use redis::Script;

use super::{keys, redis_conn::LazyConnection};
use crate::contract::Identity;

/// Lets go of what expired, then adds `ARGV[4]` unless the set holds `ARGV[3]` (0: no cap)
/// already. 1 when it is remembered (now, or by another replica before), 0 when full.
const REMEMBER: &str = r"
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local cap = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  return 1
end
if cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
";

/// The fleet's cancels in Redis.
#[derive(Clone)]
pub struct SharedCancels {
    conn: Arc<LazyConnection>,
    /// `idempotency.key_prefix`.
    prefix: String,
}

impl SharedCancels {
    /// On `conn`, under `prefix`.
    pub fn new(conn: Arc<LazyConnection>, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_string(),
        }
    }

    /// Remembers `identity`'s cancel of `request_id` for `ttl` from `now_ms`, unless it has
    /// `cap` remembered already (0: no cap): whether it is remembered.
    pub async fn remember(
        &self,
        identity: &Identity,
        request_id: &str,
        ttl: Duration,
        cap: u64,
        now_ms: i64,
    ) -> Result<bool, String> {
        let mut conn = self.conn.get().await.map_err(|e| e.to_string())?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        Script::new(REMEMBER)
            .key(keys::cancels(&self.prefix, identity.as_str()))
            .arg(now_ms)
            .arg(ttl_ms)
            .arg(cap)
            .arg(request_id)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|remembered| remembered == 1)
            .map_err(|e| e.to_string())
    }

    /// Whether `identity`'s cancel of `request_id` is remembered at `now_ms`.
    pub async fn contains(
        &self,
        identity: &Identity,
        request_id: &str,
        now_ms: i64,
    ) -> Result<bool, String> {
        let mut conn = self.conn.get().await.map_err(|e| e.to_string())?;
        redis::cmd("ZSCORE")
            .arg(keys::cancels(&self.prefix, identity.as_str()))
            .arg(request_id)
            .query_async::<Option<f64>>(&mut conn)
            .await
            .map(|until| until.is_some_and(|until| until > now_ms as f64))
            .map_err(|e| e.to_string())
    }
}
