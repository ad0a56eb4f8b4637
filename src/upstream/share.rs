//! A tenant's share of the upstream, asked before its call waits for a deployment's slot:
//!
//! - its turn ([`Turn`]): the weight its calls wait with in every deployment's flow control,
//!   so that under contention tenants start calls in proportion to their weights;
//! - its own caps (`[tenants.<name>]`): calls at once (`max_inflight`), requests and tokens
//!   per minute. A call waits for them before it waits for a slot, so a tenant at its cap
//!   holds no slot and no place in the flow's queue: it waits without blocking anyone else.
//!
//! With `limits.redis_url` the caps hold for the whole fleet: the per-minute budgets are the
//! shared buckets of [`crate::upstream::ratelimit`], and the calls at once a Redis sorted set
//! of leases (one member per running call, scored by when its lease ends, so a crashed
//! replica's calls stop counting once their lease is over). Without Redis, or while it cannot
//! be reached, each replica holds the caps alone.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use redis::Script;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    config::{Config, TenantLimits, Tenants},
    runtime::clock::unix_now_ms,
    store::redis_conn::LazyConnection,
    upstream::{
        flow::Turn,
        ratelimit::{Budget, REDIS_TIMEOUT},
    },
};

/// Takes a lease if fewer than `ARGV[2]` unexpired leases are held: drops the leases that
/// ended before `ARGV[1]` (now, ms), then adds member `ARGV[4]` ending at `ARGV[3]`. The key
/// lives as long as its longest lease.
const LEASE_SCRIPT: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
  return 1
end
return 0
";

/// How often a call waiting for a fleet-wide lease asks again.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// Every tenant's share and caps, and the state of those that have caps.
pub struct Shares {
    tenants: Tenants,
    /// Caps of the tenants that have some, made on first use; at most `tenancy.max_tenants`.
    gates: moka::sync::Cache<String, Arc<Gate>>,
    /// For the fleet-wide caps: the budgets' Redis and key prefix.
    shared: Option<(Arc<LazyConnection>, String)>,
    limits: crate::config::LimitsConfig,
    /// How long a fleet-wide lease lasts: the longest a call can take, and some margin.
    lease: Duration,
}

/// One tenant's caps.
struct Gate {
    /// Calls at once on this replica.
    calls: Option<Arc<Semaphore>>,
    /// Calls at once in the fleet: the lease set's key and its size.
    fleet: Option<(String, u64)>,
    budget: Budget,
    /// Calls waiting for these caps now.
    waiting: AtomicUsize,
}

/// Why a call did not get past its tenant's caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotEntered {
    /// `until` came first: the delivery goes back to wait elsewhere.
    Deferred,
    /// Shutdown came first.
    Stopped,
}

/// A call let through its tenant's caps: holds its place under `max_inflight` until dropped,
/// and the tokens it took from the tenant's budget until [`Pass::settle`].
#[must_use = "the tenant's caps hold while the pass lives"]
pub struct Pass {
    _call: Option<OwnedSemaphorePermit>,
    _lease: Option<Lease>,
    gate: Option<Arc<Gate>>,
    tokens: u64,
}

/// A fleet-wide lease, given back on drop.
struct Lease {
    conn: Arc<LazyConnection>,
    key: String,
    member: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (conn, key, member) = (
            self.conn.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.member),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // If this fails, the lease ends on its own when its time is up.
            runtime.spawn(async move {
                if let Ok(mut conn) = conn.get().await {
                    let _: Result<i64, _> = redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&member)
                        .query_async(&mut conn)
                        .await;
                }
            });
        }
    }
}

impl Pass {
    /// The call used `actual` tokens (0: none reported): the tenant's token budget is
    /// corrected.
    pub async fn settle(mut self, actual: u64) {
        let taken = std::mem::take(&mut self.tokens);
        if let Some(gate) = &self.gate {
            gate.budget.settle(taken, actual).await;
        }
    }
}

impl Drop for Pass {
    /// Unsettled tokens are given back: the call used none that anyone knows of.
    fn drop(&mut self) {
        let tokens = std::mem::take(&mut self.tokens);
        if tokens == 0 {
            return;
        }
        if let (Some(gate), Ok(runtime)) =
            (self.gate.clone(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(async move { gate.budget.settle(tokens, 0).await });
        }
    }
}

impl Shares {
    /// The tenants of `config`; `shared` is the budgets' Redis (`limits.redis_url`).
    pub fn new(config: &Config, shared: Option<Arc<LazyConnection>>) -> Self {
        Self {
            tenants: crate::config::Tenants::new(&config.tenants),
            gates: moka::sync::Cache::new(config.tenancy.max_tenants),
            shared: shared.map(|conn| (conn, config.limits.key_prefix.clone())),
            limits: config.limits.clone(),
            lease: Duration::from_secs(config.longest_attempt_secs()) + Duration::from_secs(30),
        }
    }

    /// The turn a call of `tenant` at `priority` waits with.
    pub fn turn(&self, tenant: &str, priority: u8) -> Turn {
        Turn::new(tenant, self.tenants.limits(tenant).weight, priority)
    }

    /// Waits until `tenant` may make one more call of about `tokens` tokens: under its
    /// `max_inflight`, then within its per-minute budgets; until `until` at most, or until
    /// `stop`.
    pub async fn enter(
        &self,
        tenant: &str,
        tokens: u64,
        until: Instant,
        stop: &CancellationToken,
    ) -> Result<Pass, NotEntered> {
        let limits = self.tenants.limits(tenant);
        if !has_caps(limits) {
            return Ok(Pass {
                _call: None,
                _lease: None,
                gate: None,
                tokens: 0,
            });
        }
        let gate = self
            .gates
            .get_with_by_ref(tenant, || Arc::new(self.gate(tenant, limits)));
        let wait = async {
            let _waiting = Waiting::new(&gate.waiting);
            let call = match &gate.calls {
                // The semaphore is never closed.
                Some(calls) => calls.clone().acquire_owned().await.ok(),
                None => None,
            };
            let lease = match &gate.fleet {
                Some((key, cap)) => self.lease(key, *cap).await,
                None => None,
            };
            let tokens = gate.budget.take(tokens).await;
            Pass {
                _call: call,
                _lease: lease,
                gate: Some(gate.clone()),
                tokens,
            }
        };
        tokio::select! {
            biased;
            pass = wait => Ok(pass),
            () = tokio::time::sleep_until(until) => Err(NotEntered::Deferred),
            () = stop.cancelled() => Err(NotEntered::Stopped),
        }
    }

    fn gate(&self, tenant: &str, limits: &TenantLimits) -> Gate {
        let scope = format!("tenant:{}", escape(tenant));
        let calls = usize::try_from(limits.max_inflight)
            .ok()
            .filter(|n| *n > 0)
            .map(|n| Arc::new(Semaphore::new(n.min(Semaphore::MAX_PERMITS))));
        let fleet = match (&self.shared, limits.max_inflight) {
            (Some((_, prefix)), cap) if cap > 0 => {
                Some((format!("{prefix}:{scope}:inflight"), cap))
            }
            _ => None,
        };
        Gate {
            calls,
            fleet,
            budget: Budget::new(
                limits.max_requests_per_minute,
                limits.max_tokens_per_minute,
                &self.limits,
                self.shared.as_ref().map(|(conn, _)| conn.clone()),
                Some(&scope),
            ),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Whether calls of `tenant` wait for its own caps now.
    pub fn waiting(&self, tenant: &str) -> bool {
        self.gates
            .get(tenant)
            .is_some_and(|gate| gate.waiting.load(Relaxed) > 0)
    }

    /// Waits for one of the `cap` fleet-wide leases of `key`. `None` when Redis cannot be
    /// reached: the replica's own cap holds alone meanwhile.
    async fn lease(&self, key: &str, cap: u64) -> Option<Lease> {
        let (conn, _) = self.shared.as_ref()?;
        let member = uuid::Uuid::new_v4().simple().to_string();
        let lease_ms = i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX);
        loop {
            let now = unix_now_ms();
            let taken = async {
                let mut c = conn.get().await.map_err(|e| e.to_string())?;
                Script::new(LEASE_SCRIPT)
                    .key(key)
                    .arg(now)
                    .arg(cap)
                    .arg(now.saturating_add(lease_ms))
                    .arg(&member)
                    .invoke_async::<i64>(&mut c)
                    .await
                    .map_err(|e| format!("{:?}", e.kind()))
            };
            match tokio::time::timeout(REDIS_TIMEOUT, taken).await {
                Ok(Ok(1)) => {
                    return Some(Lease {
                        conn: conn.clone(),
                        key: key.to_string(),
                        member,
                    });
                }
                Ok(Ok(_)) => tokio::time::sleep(LEASE_POLL).await,
                Ok(Err(e)) => {
                    warn!(error = %e, "the fleet-wide tenant cap is unreachable; this replica holds it alone");
                    return None;
                }
                Err(_) => {
                    warn!("the fleet-wide tenant cap timed out; this replica holds it alone");
                    return None;
                }
            }
        }
    }
}

/// Counts a call waiting for its tenant's caps while alive.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Relaxed);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Whether a tenant with `limits` has a cap of its own to wait for.
fn has_caps(limits: &TenantLimits) -> bool {
    limits.max_inflight > 0
        || limits.max_requests_per_minute > 0
        || limits.max_tokens_per_minute > 0
}

/// A tenant's name as a Redis key segment: `%` and `:` escaped, so no two names share keys.
fn escape(tenant: &str) -> String {
    tenant.replace('%', "%25").replace(':', "%3A")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::TenantConfig;

    fn shares(sections: &[(&str, TenantConfig)]) -> Shares {
        let config = Config {
            tenants: sections
                .iter()
                .map(|(name, section)| (name.to_string(), section.clone()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        };
        Shares::new(&config, None)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_at_its_cap_waits_and_others_do_not() {
        let s = shares(&[(
            "alice",
            TenantConfig {
                max_inflight: Some(2),
                ..Default::default()
            },
        )]);
        let stop = CancellationToken::new();
        let a1 = s.enter("alice", 0, far(), &stop).await.unwrap();
        let _a2 = s.enter("alice", 0, far(), &stop).await.unwrap();
        let soon = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            s.enter("alice", 0, soon, &stop).await.err(),
            Some(NotEntered::Deferred),
            "a third waits until its time is up"
        );
        for _ in 0..10 {
            let _bob = s
                .enter("bob", 0, soon, &stop)
                .await
                .expect("bob has no cap");
        }
        drop(a1);
        let _a3 = s
            .enter("alice", 0, soon, &stop)
            .await
            .expect("a place came free");
        stop.cancel();
        assert_eq!(
            s.enter("alice", 0, far(), &stop).await.err(),
            Some(NotEntered::Stopped)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_over_its_requests_per_minute_waits_for_the_next() {
        let s = shares(&[(
            "default",
            TenantConfig {
                max_requests_per_minute: Some(60),
                ..Default::default()
            },
        )]);
        let stop = CancellationToken::new();
        let start = Instant::now();
        // The bucket lends while it is above zero: the 61st goes into debt, the 62nd waits
        // for it to be paid.
        for _ in 0..62 {
            let _ = s.enter("carol", 0, far(), &stop).await.unwrap();
        }
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited <= Duration::from_millis(1100),
            "61 at once, the 62nd a second later: {waited:?}"
        );
        // Each tenant without a section has its own budget from [tenants.default].
        let dave = Instant::now();
        let _ = s.enter("dave", 0, far(), &stop).await.unwrap();
        assert_eq!(dave.elapsed(), Duration::ZERO);
    }

    #[test]
    fn weights_come_from_the_tenants_section() {
        let s = shares(&[(
            "alice",
            TenantConfig {
                weight: Some(3),
                ..Default::default()
            },
        )]);
        assert_eq!(s.turn("alice", 7).weight, 3);
        assert_eq!(s.turn("alice", 7).priority, 7);
        assert_eq!(s.turn("bob", 0).weight, 1);
        assert_ne!(s.turn("alice", 0).tenant, s.turn("bob", 0).tenant);
        assert_eq!(escape("a:b%c"), "a%3Ab%25c");
    }
}
