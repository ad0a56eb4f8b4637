//! The fleet's standing in Redis: one hash per deployment, `<limits.key_prefix>:upstream:<name>`,
//! whose fields say what the deployment is held out of until when (Unix ms), written by
//! the replica that learned it and read by every replica each second
//! ([`super::standing::Standing::sync`]); the scripts that keep it exact and bounded.

use std::{collections::HashMap, sync::Arc};

use redis::AsyncCommands;
use tracing::debug;

use super::out::{MAX_MODELS_OUT, Scope, Why};
use crate::store::redis_conn::LazyConnection;

/// Removes `ARGV[1]` from the hash `KEYS[1]` unless it holds a time later than `ARGV[2]`:
/// closing a breaker must not erase an opening another replica wrote since.
const DELETE_IF_PAST: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
if v <= tonumber(ARGV[2]) then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
";

/// Sets `ARGV[1]` of the hash `KEYS[1]` to `ARGV[2]` and renews the hash's time (`ARGV[6]`
/// ms). A field new to the hash whose name starts with `ARGV[4]` (a reason and `:`, for a
/// model's field) is one of at most `ARGV[5]` of that reason: those past `ARGV[3]` (now)
/// are removed, and at the bound it takes the place of the one ending soonest, or is left
/// out when every one ends later.
const SET_WITHIN_CAP: &str = r"
local h, field, untl = KEYS[1], ARGV[1], tonumber(ARGV[2])
local now, prefix, max = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
if prefix ~= '' and redis.call('HEXISTS', h, field) == 0 then
  local all = redis.call('HGETALL', h)
  local count, soonest, soonest_at = 0, nil, nil
  for i = 1, #all, 2 do
    local f, v = all[i], tonumber(all[i + 1]) or 0
    if string.sub(f, 1, #prefix) == prefix then
      if v <= now then
        redis.call('HDEL', h, f)
      else
        count = count + 1
        if soonest_at == nil or v < soonest_at then soonest, soonest_at = f, v end
      end
    end
  end
  if count >= max then
    if soonest_at >= untl then return 0 end
    redis.call('HDEL', h, soonest)
  end
end
redis.call('HSET', h, field, ARGV[2])
redis.call('PEXPIRE', h, ARGV[6])
return 1
";

/// Longest a shared entry lives in Redis without being written again (a day: the longest
/// cooldown validation allows).
const SHARED_TTL_MS: i64 = 86_400_000;

/// Redis, shared by the fleet.
pub(super) struct Shared {
    conn: Arc<LazyConnection>,
    prefix: String,
}

impl Shared {
    /// The fleet's standing through `conn`, under `<prefix>:upstream:`.
    pub(super) fn new(conn: Arc<LazyConnection>, prefix: String) -> Self {
        Self { conn, prefix }
    }

    /// The hash of one deployment: `<limits.key_prefix>:upstream:<name>`.
    fn key(&self, name: &str) -> String {
        crate::store::keys::upstream(&self.prefix, name)
    }

    /// Writes a change made at `now` to deployment `name`'s hash, in a task of its own: the
    /// call path never waits on it. A time of `-now` removes the field if it holds no time
    /// later than `now`; a model's field is one of at most [`MAX_MODELS_OUT`] of its reason.
    pub(super) fn write(&self, name: &str, field: Field, until_ms: i64, now: i64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = self.key(name);
        let conn = self.conn.clone();
        runtime.spawn(async move {
            let Ok(mut conn) = conn.get().await else {
                return;
            };
            let capped = field.capped();
            let field = field.to_string();
            let written: redis::RedisResult<()> = if until_ms <= 0 {
                redis::Script::new(DELETE_IF_PAST)
                    .key(&key)
                    .arg(&field)
                    .arg(-until_ms)
                    .invoke_async(&mut conn)
                    .await
            } else {
                redis::Script::new(SET_WITHIN_CAP)
                    .key(&key)
                    .arg(&field)
                    .arg(until_ms)
                    .arg(now)
                    .arg(capped.unwrap_or_default())
                    .arg(MAX_MODELS_OUT)
                    .arg(SHARED_TTL_MS)
                    .invoke_async(&mut conn)
                    .await
            };
            if let Err(e) = written {
                debug!(error = %e, "could not share an upstream's state through Redis");
            }
        });
    }

    /// Reads the fields of each deployment's hash in force at `now`, in the order of
    /// `names`, removing those past; `None` when Redis could not answer.
    pub(super) async fn read(&self, names: &[String], now: i64) -> Option<Vec<Vec<(Field, i64)>>> {
        let mut conn = self.conn.get().await.ok()?;
        let mut all = Vec::with_capacity(names.len());
        for name in names {
            let fields: redis::RedisResult<HashMap<String, i64>> =
                conn.hgetall(self.key(name)).await;
            let fields = match fields {
                Ok(fields) => fields,
                Err(e) => {
                    debug!(error = %e, "could not read the fleet's upstream state from Redis");
                    return None;
                }
            };
            let expired: Vec<&String> = fields
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(field, _)| field)
                .collect();
            if !expired.is_empty() {
                // Left by replicas long gone; removing a field another replica has just
                // renewed costs nothing worse than a second look at that deployment.
                let removed: redis::RedisResult<()> = conn.hdel(self.key(name), &expired).await;
                if let Err(e) = removed {
                    debug!(error = %e, "could not prune the fleet's upstream state in Redis");
                }
            }
            let live = fields
                .into_iter()
                .filter(|(_, until)| *until > now)
                .filter_map(|(field, until)| Some((Field::parse(&field)?, until)))
                .collect();
            all.push(live);
        }
        Some(all)
    }
}

/// A field of a deployment's hash in Redis; its value is a Unix ms time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Field {
    /// `breaker`: open until then.
    Breaker,
    /// `<why>` (every model) or `<why>:<model>`: out until then.
    Out(Why, Scope),
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Breaker => f.write_str("breaker"),
            Field::Out(why, Scope::All) => f.write_str(why.as_str()),
            Field::Out(why, Scope::Model(model)) => write!(f, "{}:{model}", why.as_str()),
        }
    }
}

impl Field {
    /// For a model's field, the prefix its reason's fields share in Redis (`<why>:`), which
    /// [`MAX_MODELS_OUT`] bounds.
    fn capped(&self) -> Option<String> {
        match self {
            Field::Out(why, Scope::Model(_)) => Some(format!("{}:", why.as_str())),
            Field::Breaker | Field::Out(_, Scope::All) => None,
        }
    }

    pub(super) fn parse(s: &str) -> Option<Self> {
        if s == "breaker" {
            return Some(Field::Breaker);
        }
        match s.split_once(':') {
            Some((why, model)) => Some(Field::Out(Why::parse(why)?, Scope::Model(model.into()))),
            None => Some(Field::Out(Why::parse(s)?, Scope::All)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        for f in [
            Field::Breaker,
            Field::Out(Why::RateLimited, Scope::Model("gpt-4o".into())),
            Field::Out(Why::Quota, Scope::All),
            Field::Out(Why::Refused, Scope::Model("*".into())),
            Field::Out(Why::Refused, Scope::Model("a:b".into())),
        ] {
            assert_eq!(Field::parse(&f.to_string()), Some(f));
        }
        assert_eq!(Field::parse("nonsense"), None);
    }
}
