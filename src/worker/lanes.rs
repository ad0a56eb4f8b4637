//! Fair share's lanes: which requests leave the work queue for their tenant's lane.
//!
//! Weighted admission ([`crate::upstream::flow`]) can only share what a replica holds, and
//! a replica holds the head of the work queue: behind a tenant's backlog of thousands, the
//! next tenant's requests wait, whatever the weights. So a tenant that holds more than its
//! share of a replica while its requests wait has its next requests from the work queue
//! moved (a confirmed republish that keeps every property, its `user_id` included, then the
//! ack) to its lane, `<work queue>.lane.<nn>` ([`topology::lane_of`]). A move costs the
//! broker one publish and one delivery, so the backlog leaves the work queue at the
//! broker's speed rather than the upstream's, and the requests behind it are reached.
//! Every replica consumes the work queue and every lane, each with its own prefetch, so each
//! tenant with work has requests in hand and admission shares the calls by weight.
//!
//! While a tenant is bound to its lane, all its requests from the work queue go there, so
//! they stay in order behind the ones moved before. The binding lasts [`BIND_FOR`] after
//! the tenant was last seen over its share, and while its lane last held messages.
//!
//! Two tenants may hash to one lane. A tenant is not bound to a lane another tenant is bound
//! to here: its requests would queue behind the other's backlog, first in, first out. It
//! stays in the work queue instead, which the backlog has left, and its requests in hand
//! are shared by weight as everyone's are.
//!
//! The tenant is always read from each message's identity, never from the lane it came
//! from: anyone may publish into a queue by name.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::broker::topology;

/// How long a tenant stays bound to its lane after it was last over its share: longer than
/// the lanes' depths take to be read again, so a lane is seen empty before it is left.
pub const BIND_FOR: Duration = Duration::from_secs(15);

/// This replica's view of who holds what, and who is bound to a lane.
pub struct Lanes {
    /// Lanes per work queue (`topology.lanes`); 0: no lanes, nothing moves.
    count: u16,
    /// Most tenants bound at once (`tenancy.max_tenants`).
    max_bound: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Deliveries in hand per tenant (received, not yet settled), and its weight.
    held: HashMap<String, (usize, u32)>,
    /// The sum of the weights of the tenants in `held`.
    weights: u64,
    /// Tenants bound to their lane.
    bound: HashMap<String, Binding>,
}

/// A tenant bound to its lane.
#[derive(Debug, Clone, Copy)]
struct Binding {
    lane: u16,
    /// Until when at least.
    until: Instant,
}

impl Binding {
    /// Whether it still holds: within its time, or its lane held messages when last read.
    fn holds(&self, now: Instant, depth: &impl Fn(u16) -> Option<u32>) -> bool {
        now < self.until || depth(self.lane).is_some_and(|d| d > 0)
    }
}

/// What a replica knows when a request of a tenant comes from the work queue.
#[derive(Debug, Clone, Copy)]
pub struct Pressure {
    /// The tenant's weight.
    pub weight: u32,
    /// Calls this replica may run at once (the sum of its deployments' limits).
    pub limit: usize,
    /// Whether requests wait here: for a deployment's slot, or the tenant's own for its
    /// caps.
    pub waiting: bool,
}

/// A delivery counted in hand for its tenant until dropped.
pub struct Held<'a> {
    lanes: &'a Lanes,
    tenant: String,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut s = self.lanes.state();
        if let Some((count, weight)) = s.held.get_mut(&self.tenant) {
            *count -= 1;
            if *count == 0 {
                let weight = u64::from(*weight);
                s.held.remove(&self.tenant);
                s.weights = s.weights.saturating_sub(weight);
            }
        }
    }
}

impl Lanes {
    /// `count` lanes per work queue; at most `max_bound` tenants bound at once.
    pub fn new(count: u16, max_bound: u64) -> Self {
        Self {
            count,
            max_bound: usize::try_from(max_bound).unwrap_or(usize::MAX),
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain counters: a panic while holding the lock leaves them usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a delivery of `tenant` (of `weight`) in hand until the guard is dropped.
    pub fn hold(&self, tenant: &str, weight: u32) -> Held<'_> {
        let mut s = self.state();
        let entry = s.held.entry(tenant.to_string()).or_insert((0, weight));
        entry.0 += 1;
        if entry.0 == 1 {
            s.weights += u64::from(weight);
        }
        Held {
            lanes: self,
            tenant: tenant.to_string(),
        }
    }

    /// The lane a request of `tenant` from the work queue moves to, or `None` for it to be
    /// settled here. `depth` reads a lane's ready messages as last polled.
    pub fn route(
        &self,
        tenant: &str,
        pressure: Pressure,
        depth: impl Fn(u16) -> Option<u32>,
    ) -> Option<u16> {
        let lane = topology::lane_of(tenant, self.count)?;
        let now = Instant::now();
        let mut s = self.state();
        let binding = Binding {
            lane,
            until: now + BIND_FOR,
        };
        if pressure.waiting && s.over_share(tenant, pressure) {
            if let Some(bound) = s.bound.get_mut(tenant) {
                *bound = binding;
                return Some(lane);
            }
            // Too many tenants bound, or the lane is another's: this one is settled here,
            // in the work queue's order.
            if s.bound.len() >= self.max_bound || s.lane_taken(lane, now, &depth) {
                return None;
            }
            s.bound.insert(tenant.to_string(), binding);
            return Some(lane);
        }
        if s.bound.get(tenant)?.holds(now, &depth) {
            return Some(lane);
        }
        s.bound.remove(tenant);
        None
    }

    /// Tenants bound to their lane now.
    pub fn bound(&self) -> usize {
        self.state().bound.len()
    }
}

impl State {
    /// Whether another tenant is bound to `lane`; bindings found over are dropped.
    fn lane_taken(&mut self, lane: u16, now: Instant, depth: &impl Fn(u16) -> Option<u32>) -> bool {
        let mut taken = false;
        self.bound.retain(|_, b| {
            let holds = b.holds(now, depth);
            taken |= holds && b.lane == lane;
            holds
        });
        taken
    }

    /// Whether `tenant` holds more than its share of the calls: the limit split by weight
    /// between the tenants in hand and one more of weight 1, the tenant not seen yet whose
    /// requests may wait behind. At least two in hand: a single request is never moved.
    fn over_share(&self, tenant: &str, p: Pressure) -> bool {
        let held = self.held.get(tenant).map_or(0, |(count, _)| *count);
        if held < 2 {
            return false;
        }
        let weights = self.weights.saturating_add(1);
        let share = (p.limit as u64).saturating_mul(u64::from(p.weight)) / weights.max(1);
        held as u64 > share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(weight: u32, limit: usize) -> Pressure {
        Pressure {
            weight,
            limit,
            waiting: true,
        }
    }

    fn empty(_: u16) -> Option<u32> {
        Some(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_over_its_share_of_a_busy_replica_moves_and_stays_bound() {
        let lanes = Lanes::new(16, 100);
        let alice = topology::lane_of("alice", 16);
        let _held: Vec<_> = (0..6).map(|_| lanes.hold("alice", 1)).collect();
        let _bob = lanes.hold("bob", 1);
        // Limit 10, alice and bob in hand and one unseen: alice's share is 10/3.
        assert_eq!(
            lanes.route(
                "alice",
                Pressure {
                    waiting: false,
                    ..busy(1, 10)
                },
                empty
            ),
            None,
            "nothing waits: nothing moves"
        );
        assert_eq!(lanes.route("alice", busy(1, 10), empty), alice);
        assert_eq!(
            lanes.route("bob", busy(1, 10), empty),
            None,
            "bob holds one"
        );
        // Bound: alice's next requests follow, even below her share.
        drop(_held);
        let calm = Pressure {
            waiting: false,
            ..busy(1, 10)
        };
        assert_eq!(lanes.route("alice", calm, empty), alice);
        tokio::time::advance(BIND_FOR).await;
        assert_eq!(
            lanes.route("alice", calm, |_| Some(3)),
            alice,
            "her lane still holds requests"
        );
        assert_eq!(lanes.route("alice", calm, empty), None, "released");
        assert_eq!(lanes.bound(), 0);
    }

    #[test]
    fn weights_widen_the_share_and_a_tenant_alone_still_leaves_room() {
        let lanes = Lanes::new(16, 100);
        let _held: Vec<_> = (0..8).map(|_| lanes.hold("alice", 3)).collect();
        // Alone with weight 3: her share is 3/4 of 10, and she holds 8.
        assert!(lanes.route("alice", busy(3, 10), empty).is_some());
        let lanes = Lanes::new(16, 100);
        let _held: Vec<_> = (0..7).map(|_| lanes.hold("alice", 3)).collect();
        assert_eq!(lanes.route("alice", busy(3, 10), empty), None, "7 of 7.5");
    }

    #[test]
    fn no_lanes_or_too_many_bound_settles_in_place() {
        let off = Lanes::new(0, 100);
        let _held: Vec<_> = (0..50).map(|_| off.hold("alice", 1)).collect();
        assert_eq!(off.route("alice", busy(1, 10), empty), None);
        let full = Lanes::new(16, 1);
        let _a: Vec<_> = (0..50).map(|_| full.hold("alice", 1)).collect();
        let _b: Vec<_> = (0..50).map(|_| full.hold("bob", 1)).collect();
        assert!(full.route("alice", busy(1, 10), empty).is_some());
        assert_eq!(full.route("bob", busy(1, 10), empty), None);
    }

    #[test]
    fn a_tenant_whose_lane_is_taken_stays_in_the_work_queue() {
        let lanes = Lanes::new(16, 100);
        // Two names that hash to one lane.
        let first = "tenant-0";
        let lane = topology::lane_of(first, 16);
        let second = (1..)
            .map(|i| format!("tenant-{i}"))
            .find(|t| topology::lane_of(t, 16) == lane)
            .expect("a name on the same lane");
        let _a: Vec<_> = (0..20).map(|_| lanes.hold(first, 1)).collect();
        let _b: Vec<_> = (0..20).map(|_| lanes.hold(&second, 1)).collect();
        assert_eq!(lanes.route(first, busy(1, 10), empty), lane);
        assert_eq!(
            lanes.route(&second, busy(1, 10), empty),
            None,
            "not behind the first one's backlog"
        );
        // Another lane is free.
        let other = (1..)
            .map(|i| format!("other-{i}"))
            .find(|t| topology::lane_of(t, 16) != lane)
            .expect("a name on another lane");
        let _c: Vec<_> = (0..20).map(|_| lanes.hold(&other, 1)).collect();
        assert!(lanes.route(&other, busy(1, 10), empty).is_some());
    }

    #[test]
    fn held_counts_and_weights_come_back_to_zero() {
        let lanes = Lanes::new(16, 100);
        {
            let _a = lanes.hold("alice", 3);
            let _b = lanes.hold("alice", 3);
            let _c = lanes.hold("bob", 1);
            assert_eq!(lanes.state().weights, 4);
        }
        let s = lanes.state();
        assert!(s.held.is_empty());
        assert_eq!(s.weights, 0);
    }
}
