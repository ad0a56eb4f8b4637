//! A tenant's share of the upstream, asked before its call waits for a deployment's slot:
//!
//! - its turn ([`Turn`]): the weight its calls wait with in every deployment's flow control,
//!   so that under contention tenants start calls in proportion to their weights;
//! - its own caps (`[tenants.<name>]`): calls at once (`max_inflight`), requests and tokens
//!   per minute. A call waits for them before it waits for a slot, so a tenant at its cap
//!   holds no slot and no place in the flow's queue: it waits without blocking anyone else.
//!   Its calls at once are a [`Flow`] of its own at a fixed limit, so those waiting for its
//!   `max_inflight` start highest priority first, then in arrival order.
//!
//! With `limits.redis_url` the caps hold for the whole fleet: the per-minute budgets are the
//! shared buckets of [`crate::upstream::flow::ratelimit`], and the calls at once a Redis sorted set
//! of leases (one member per call, scored by when its lease ends on the Redis server's
//! clock, renewed while the call holds it, so a crashed replica's calls stop counting a
//! minute after it died).
//! Without Redis, or while it cannot be reached, each replica holds the caps alone.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use redis::Script;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    config::{Config, TenantLimits, Tenants},
    store::{keys, redis_conn::LazyConnection},
    upstream::{
        flow::limit::{Flow, Permit},
        flow::ratelimit::{Budget, REDIS_TIMEOUT},
        flow::turn::Turn,
    },
};

/// Takes a lease if fewer than `ARGV[1]` unexpired leases are held: drops the leases that
/// ended (by the server's clock), then adds member `ARGV[3]` ending `ARGV[2]` ms from now.
/// The key lives at least as long as its longest lease; its expiry is only ever raised.
const LEASE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  if redis.call('PTTL', KEYS[1]) < lease then
    redis.call('PEXPIRE', KEYS[1], lease)
  end
  return 1
end
return 0
";

/// Renews a lease still held: its member's end moves `ARGV[2]` ms past now; the key's expiry
/// is only ever raised.
const RENEW_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', now + lease, ARGV[1])
if redis.call('PTTL', KEYS[1]) < lease then
  redis.call('PEXPIRE', KEYS[1], lease)
end
return 1
";

/// How long a fleet-wide lease lasts unless renewed.
const LEASE: Duration = Duration::from_secs(60);

/// How often a held lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(20);

/// How often a call waiting for a fleet-wide lease asks again.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// Every tenant's share and caps, and the state of those that have caps.
pub struct Shares {
    tenants: Tenants,
    /// Caps of the tenants that have some, made on first use. Past `max_gates`, the gates
    /// no call holds are dropped; one in use never is, or its cap would start again from
    /// nothing beside the calls that hold it.
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    max_gates: usize,
    /// For the fleet-wide caps: the budgets' Redis and key prefix.
    shared: Option<(Arc<LazyConnection>, String)>,
    limits: crate::config::LimitsConfig,
}

/// One tenant's caps.
struct Gate {
    /// Calls at once on this replica: a flow control of fixed limit (no AIMD signal is ever
    /// given to it, and no budget), for its waiters' order, highest priority first.
    calls: Option<Arc<Flow>>,
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
/// and what it took from the tenant's budgets until [`Pass::settle`].
#[must_use = "the tenant's caps hold while the pass lives"]
pub struct Pass {
    _call: Option<Permit>,
    _lease: Option<Lease>,
    gate: Option<Arc<Gate>>,
    tokens: u64,
}

/// A fleet-wide lease, given back on drop, and renewed meanwhile.
struct Lease {
    conn: Arc<LazyConnection>,
    key: String,
    member: String,
    /// Stops the renewals when the lease is dropped.
    _renewing: Option<tokio_util::sync::DropGuard>,
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
    /// The call is over: it used `actual` tokens (0: none reported), and `called` says
    /// whether it reached the upstream. The tenant's token budget is corrected, and a call
    /// that never reached the upstream (it waited too long for a slot, every deployment was
    /// cooling down, shutdown) gives its request back.
    pub async fn settle(mut self, actual: u64, called: bool) {
        let taken = std::mem::take(&mut self.tokens);
        if let Some(gate) = &self.gate {
            gate.budget.settle(taken, actual).await;
            if !called {
                gate.budget.give_back_request().await;
            }
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
            gates: Mutex::default(),
            max_gates: usize::try_from(config.tenancy.max_tenants).unwrap_or(usize::MAX),
            shared: shared.map(|conn| (conn, config.limits.key_prefix.clone())),
            limits: config.limits.clone(),
        }
    }

    /// The turn a call of `tenant` at `priority` waits with.
    pub fn turn(&self, tenant: &str, priority: u8) -> Turn {
        Turn::new(tenant, self.tenants.limits(tenant).weight, priority)
    }

    fn gates(&self) -> MutexGuard<'_, HashMap<String, Arc<Gate>>> {
        // A map of Arcs: a panic while holding the lock leaves it usable.
        self.gates.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `tenant`'s gate, made on first use.
    fn gate_of(&self, tenant: &str, limits: &TenantLimits) -> Arc<Gate> {
        let mut gates = self.gates();
        if let Some(gate) = gates.get(tenant) {
            return gate.clone();
        }
        if gates.len() >= self.max_gates {
            // Only the map holds them: no call is waiting or running under them.
            gates.retain(|_, gate| Arc::strong_count(gate) > 1);
        }
        let gate = Arc::new(self.gate(tenant, limits));
        gates.insert(tenant.to_string(), gate.clone());
        gate
    }

    /// Waits until `tenant` may make one more call of about `tokens` tokens at `priority`:
    /// under its `max_inflight`, then within its per-minute budgets; until `until` at most,
    /// or until `stop`.
    pub async fn enter(
        &self,
        tenant: &str,
        priority: u8,
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
        let gate = self.gate_of(tenant, limits);
        let wait = async {
            let _waiting = Waiting::new(&gate.waiting);
            let call = match &gate.calls {
                Some(calls) => Some(calls.acquire(Turn::anyone(priority), 0).await),
                None => None,
            };
            let lease = match &gate.fleet {
                Some((key, cap)) => self.lease(key, *cap).await,
                None => None,
            };
            gate.budget.take_request().await;
            // Should the wait for tokens be given up, the request taken goes back.
            let refund = RequestRefund(Some(gate.clone()));
            let tokens = gate.budget.take_tokens(tokens).await;
            refund.disarm();
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
        let scope = keys::tenant_scope(tenant);
        let calls = usize::try_from(limits.max_inflight)
            .ok()
            .filter(|n| *n > 0)
            .map(|cap| Flow::new(cap, cap, Budget::unlimited()));
        let fleet = match (&self.shared, limits.max_inflight) {
            (Some((_, prefix)), cap) if cap > 0 => {
                Some((keys::tenant_inflight(prefix, tenant), cap))
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
        self.gates()
            .get(tenant)
            .is_some_and(|gate| gate.waiting.load(Relaxed) > 0)
    }

    /// Waits for one of the `cap` fleet-wide leases of `key`. `None` when Redis cannot be
    /// reached: the replica's own cap holds alone meanwhile.
    async fn lease(&self, key: &str, cap: u64) -> Option<Lease> {
        let (conn, _) = self.shared.as_ref()?;
        // Made before the first try: however this wait ends (a reply too late, the caller
        // gone), the member is removed, not left to count until its lease runs out.
        let mut lease = Lease {
            conn: conn.clone(),
            key: key.to_string(),
            member: uuid::Uuid::new_v4().simple().to_string(),
            _renewing: None,
        };
        let lease_ms = u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX);
        loop {
            let taken = async {
                let mut c = conn.get().await.map_err(|e| e.to_string())?;
                Script::new(LEASE_SCRIPT)
                    .key(key)
                    .arg(cap)
                    .arg(lease_ms)
                    .arg(&lease.member)
                    .invoke_async::<i64>(&mut c)
                    .await
                    .map_err(|e| format!("{:?}", e.kind()))
            };
            match tokio::time::timeout(REDIS_TIMEOUT, taken).await {
                Ok(Ok(1)) => {
                    lease._renewing = Some(lease.renew_while_held());
                    return Some(lease);
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

impl Lease {
    /// Renews the lease every [`RENEW_EVERY`] until the returned guard is dropped.
    fn renew_while_held(&self) -> tokio_util::sync::DropGuard {
        let stop = CancellationToken::new();
        let (conn, key, member) = (self.conn.clone(), self.key.clone(), self.member.clone());
        let lease_ms = u64::try_from(LEASE.as_millis()).unwrap_or(u64::MAX);
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    () = tokio::time::sleep(RENEW_EVERY) => {}
                }
                let renew = async {
                    let mut c = conn.get().await.ok()?;
                    Script::new(RENEW_SCRIPT)
                        .key(&key)
                        .arg(&member)
                        .arg(lease_ms)
                        .invoke_async::<i64>(&mut c)
                        .await
                        .ok()
                };
                // A renewal that fails leaves the lease to end a minute after the last.
                let _ = tokio::time::timeout(REDIS_TIMEOUT, renew).await;
            }
        });
        stop.drop_guard()
    }
}

/// Gives a request taken from a tenant's budget back when dropped before [`Self::disarm`]:
/// its call waited for tokens and was given up.
struct RequestRefund(Option<Arc<Gate>>);

impl RequestRefund {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RequestRefund {
    fn drop(&mut self) {
        if let (Some(gate), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move { gate.budget.give_back_request().await });
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
        let a1 = s.enter("alice", 0, 0, far(), &stop).await.unwrap();
        let _a2 = s.enter("alice", 0, 0, far(), &stop).await.unwrap();
        let soon = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            s.enter("alice", 0, 0, soon, &stop).await.err(),
            Some(NotEntered::Deferred),
            "a third waits until its time is up"
        );
        for _ in 0..10 {
            let _bob = s
                .enter("bob", 0, 0, soon, &stop)
                .await
                .expect("bob has no cap");
        }
        drop(a1);
        let _a3 = s
            .enter("alice", 0, 0, soon, &stop)
            .await
            .expect("a place came free");
        stop.cancel();
        assert_eq!(
            s.enter("alice", 0, 0, far(), &stop).await.err(),
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
            let _ = s.enter("carol", 0, 0, far(), &stop).await.unwrap();
        }
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited <= Duration::from_millis(1100),
            "61 at once, the 62nd a second later: {waited:?}"
        );
        // Each tenant without a section has its own budget from [tenants.default].
        let dave = Instant::now();
        let _ = s.enter("dave", 0, 0, far(), &stop).await.unwrap();
        assert_eq!(dave.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_waiting_at_a_cap_start_highest_priority_first() {
        let s = Arc::new(shares(&[(
            "alice",
            TenantConfig {
                max_inflight: Some(1),
                ..Default::default()
            },
        )]));
        let stop = CancellationToken::new();
        let first = s.enter("alice", 0, 0, far(), &stop).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for priority in [1u8, 9, 5] {
            let (s, order, stop) = (s.clone(), order.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let _pass = s.enter("alice", priority, 0, far(), &stop).await.unwrap();
                order.lock().unwrap().push(priority);
            }));
            tokio::task::yield_now().await;
        }
        assert!(s.waiting("alice"));
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [9, 5, 1]);
        assert!(!s.waiting("alice"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_gate_in_use_is_never_dropped_for_room() {
        let mut config = Config::default();
        config.tenancy.max_tenants = 2;
        config.tenants.insert(
            "default".into(),
            TenantConfig {
                max_inflight: Some(1),
                ..Default::default()
            },
        );
        let s = Shares::new(&config, None);
        let stop = CancellationToken::new();
        let held = s.enter("alice", 0, 0, far(), &stop).await.unwrap();
        for other in ["bob", "carol", "dave"] {
            drop(s.enter(other, 0, 0, far(), &stop).await.unwrap());
        }
        let soon = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            s.enter("alice", 0, 0, soon, &stop).await.err(),
            Some(NotEntered::Deferred),
            "alice's cap still counts the call she holds"
        );
        drop(held);
        assert!(s.gates().len() <= 3, "unused gates were dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_reached_the_upstream_gives_its_request_back() {
        let s = shares(&[(
            "alice",
            TenantConfig {
                max_requests_per_minute: Some(1),
                ..Default::default()
            },
        )]);
        let stop = CancellationToken::new();
        for _ in 0..10 {
            let pass = s.enter("alice", 0, 0, far(), &stop).await.unwrap();
            pass.settle(0, false).await;
        }
        let start = Instant::now();
        let pass = s.enter("alice", 0, 0, far(), &stop).await.unwrap();
        assert_eq!(start.elapsed(), Duration::ZERO, "nothing was spent");
        pass.settle(0, true).await;
        let pass = s.enter("alice", 0, 0, far(), &stop).await.unwrap();
        pass.settle(0, true).await;
        assert!(
            s.enter(
                "alice",
                0,
                0,
                Instant::now() + Duration::from_secs(1),
                &stop
            )
            .await
            .is_err(),
            "two calls made: the budget of one a minute is spent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_given_up_while_it_waits_for_tokens_gives_its_request_back() {
        let s = shares(&[(
            "alice",
            TenantConfig {
                max_requests_per_minute: Some(2),
                max_tokens_per_minute: Some(100),
                ..Default::default()
            },
        )]);
        let stop = CancellationToken::new();
        let first = s.enter("alice", 0, 100, far(), &stop).await.unwrap();
        // It used twice its estimate: the bucket is a minute in debt.
        first.settle(200, true).await;
        // The second takes a request, then waits for tokens in vain.
        let soon = Instant::now() + Duration::from_millis(100);
        assert_eq!(
            s.enter("alice", 0, 50, soon, &stop).await.err(),
            Some(NotEntered::Deferred)
        );
        tokio::task::yield_now().await;
        let start = Instant::now();
        let third = s.enter("alice", 0, 0, far(), &stop).await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the deferred call's request came back: one of two is left"
        );
        third.settle(0, true).await;
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
        assert_eq!(keys::tenant_segment("a:b%c"), "a%3Ab%25c");
    }
}
