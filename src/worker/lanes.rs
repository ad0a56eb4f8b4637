//! Fair share's lanes: which requests leave a work queue for their tenant's lane.
//!
//! Weighted admission ([`crate::upstream::flow`]) can only share what a replica holds, and
//! a replica holds the head of the work queue: behind a tenant's backlog of thousands, the
//! next tenant's requests wait, whatever the weights. So a tenant that holds more than its
//! share of what a replica holds, while requests wait there, has its next requests from the
//! work queue moved (a confirmed republish that keeps every property, its `user_id`
//! included, then the ack) to its lane, `<work queue>.lane.<nn>` ([`topology::lane_of`]). A
//! move costs the broker one publish and one delivery, so the backlog leaves the work queue
//! at the broker's speed rather than the upstream's, and the requests behind it are reached.
//! Every replica consumes the work queue and every lane, each with its own prefetch, so each
//! tenant with work has requests in hand and admission shares the calls by weight.
//!
//! A tenant's share counts one more tenant of weight 1 than the replica holds requests of:
//! whoever waits unseen behind the backlog. That is what moves a tenant alone with a
//! backlog, which is what lets the next tenant be reached. But a fleet that only ever serves
//! one tenant gains nothing by it and would pay a move for every request of every backlog,
//! so the unseen tenant counts only where tenants are in use: the request names its sender
//! (a `user_id`, or the tenancy header: it is not [`ANONYMOUS`]), the configuration names
//! tenants (a `[tenants.<name>]` section or `tenancy.header`), or the replica saw two
//! different tenants within [`SEEN_FOR`].
//!
//! While a tenant is bound to its lane, all its requests from the work queue go there, so
//! they stay in order behind the ones moved before. The binding lasts [`BIND_FOR`] after the
//! tenant was last seen over its share, and while its lane held messages when last read, at
//! most [`HELD_BY_DEPTH`] longer: a lane's depth cannot say whose messages it holds.
//!
//! Two tenants may hash to one lane. A tenant is not bound to a lane another tenant is bound
//! to here: its requests would queue behind the other's backlog, first in, first out. It
//! stays in the work queue instead, which the backlog has left, and its requests in hand are
//! shared by weight as everyone's are.
//!
//! Chat and embeddings are counted apart, and both move. For embeddings a replica's share
//! is counted in requests (its call limit times the requests a batched call carries), and
//! an embeddings lane is consumed only while it holds messages, sharing the embeddings'
//! byte budget with the work queue ([`super::prefetch`]), so that a tenant moved there
//! still fills whole batches.
//! The tenant is always read from each message's identity, never from the lane it came
//! from: anyone may publish into a queue by name.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

use crate::{
    broker::topology,
    config::TopologyConfig,
    contract::{ANONYMOUS, request::Kind},
};

/// Where a delivery comes from: a work queue, or one of its lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The work queue's kind.
    pub kind: Kind,
    /// The lane, `None` for the work queue itself.
    pub lane: Option<u16>,
}

impl Origin {
    /// The queue it came from, where it goes back to when handed back.
    pub fn queue(&self, topo: &TopologyConfig) -> String {
        let work = topo.work_queue(self.kind);
        match self.lane {
            Some(lane) => topology::lane_queue(work, lane),
            None => work.to_string(),
        }
    }
}

/// How long a tenant stays bound to its lane after it was last over its share: longer than
/// the lanes' depths take to be read again, so a lane is seen empty before it is left.
pub const BIND_FOR: Duration = Duration::from_secs(15);

/// How much longer a binding holds while its lane still holds messages.
pub const HELD_BY_DEPTH: Duration = Duration::from_secs(300);

/// How recently two different tenants must have been seen for the unseen one to count.
pub const SEEN_FOR: Duration = Duration::from_secs(600);

/// This replica's view of who holds what, and who is bound to a lane.
pub struct Lanes {
    /// Lanes per work queue (`topology.lanes`); 0: no lanes, nothing moves.
    count: u16,
    /// Most tenants bound at once (`tenancy.max_tenants`).
    max_bound: usize,
    /// The configuration names tenants: several are known from the start.
    several: bool,
    state: Mutex<State>,
}

/// A tenant's requests of one kind.
type Key = (Kind, String);

#[derive(Default)]
struct State {
    /// Deliveries in hand (received, not yet settled), and the tenant's weight.
    held: HashMap<Key, (usize, u32)>,
    /// Per kind (chat, embeddings): the deliveries in hand, and the weights of the tenants
    /// in `held`.
    totals: [(usize, u64); 2],
    /// Tenants bound to their lane.
    bound: HashMap<Key, Binding>,
    /// The last two different tenants seen, and when.
    recent: [Option<(String, Instant)>; 2],
}

/// A tenant bound to its lane.
#[derive(Debug, Clone, Copy)]
struct Binding {
    lane: u16,
    /// Until when at least.
    until: Instant,
}

impl Binding {
    /// Whether it still holds: within its time, or a while longer if its lane held messages
    /// when last read.
    fn holds(&self, now: Instant, depth: &impl Fn(u16) -> Option<u32>) -> bool {
        now < self.until
            || (now < self.until + HELD_BY_DEPTH && depth(self.lane).is_some_and(|d| d > 0))
    }
}

/// What the replica knows when a request comes from a work queue.
#[derive(Debug, Clone, Copy)]
pub struct Pressure {
    /// The tenant's weight.
    pub weight: u32,
    /// Requests of this kind the replica may have called at once: its call limit (times the
    /// requests a batched call carries, for embeddings).
    pub limit: usize,
    /// Whether requests wait here: for a deployment's slot, or the tenant's own caps.
    pub waiting: bool,
}

/// A delivery counted in hand for its tenant until dropped.
pub struct Held<'a> {
    lanes: &'a Lanes,
    key: Key,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut s = self.lanes.state();
        let kind = self.key.0.index();
        s.totals[kind].0 = s.totals[kind].0.saturating_sub(1);
        if let Some((count, weight)) = s.held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                let weight = u64::from(*weight);
                s.held.remove(&self.key);
                s.totals[kind].1 = s.totals[kind].1.saturating_sub(weight);
            }
        }
    }
}

impl Lanes {
    /// `count` lanes per work queue; at most `max_bound` tenants bound at once; `several`
    /// when the configuration names tenants.
    pub fn new(count: u16, max_bound: u64, several: bool) -> Self {
        Self {
            count,
            max_bound: usize::try_from(max_bound).unwrap_or(usize::MAX),
            several,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain counters: a panic while holding the lock leaves them usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a `kind` delivery of `tenant` (of `weight`) in hand until the guard is
    /// dropped.
    pub fn hold(&self, kind: Kind, tenant: &str, weight: u32) -> Held<'_> {
        let key = (kind, tenant.to_string());
        let now = Instant::now();
        let mut s = self.state();
        s.seen(tenant, now);
        let entry = s.held.entry(key.clone()).or_insert((0, weight));
        entry.0 += 1;
        let first = entry.0 == 1;
        let totals = &mut s.totals[kind.index()];
        totals.0 += 1;
        if first {
            totals.1 += u64::from(weight);
        }
        Held { lanes: self, key }
    }

    /// The lane a `kind` request of `tenant` from the work queue moves to, or `None` for it
    /// to be settled here. `depth` reads a lane's ready messages as last polled.
    pub fn route(
        &self,
        kind: Kind,
        tenant: &str,
        pressure: Pressure,
        depth: impl Fn(u16) -> Option<u32>,
    ) -> Option<u16> {
        let lane = topology::lane_of(tenant, self.count)?;
        let now = Instant::now();
        let key = (kind, tenant.to_string());
        let mut s = self.state();
        let unseen = self.several || tenant != ANONYMOUS || s.several_seen(now);
        if pressure.waiting && s.over_share(&key, pressure, unseen) {
            let binding = Binding {
                lane,
                until: now + BIND_FOR,
            };
            if let Some(bound) = s.bound.get_mut(&key) {
                *bound = binding;
                return Some(lane);
            }
            s.bound.retain(|_, b| b.holds(now, &depth));
            let taken = s
                .bound
                .iter()
                .any(|((k, _), b)| *k == kind && b.lane == lane);
            // Too many tenants bound, or the lane is another's: this one is settled here,
            // in the work queue's order.
            if taken || s.bound.len() >= self.max_bound {
                return None;
            }
            s.bound.insert(key, binding);
            return Some(lane);
        }
        if s.bound.get(&key)?.holds(now, &depth) {
            return Some(lane);
        }
        s.bound.remove(&key);
        None
    }

    /// Tenants bound to their lane now, of both kinds.
    #[cfg(test)]
    pub fn bound(&self) -> usize {
        self.state().bound.len()
    }
}

impl State {
    /// Notes that `tenant` was seen at `now`.
    fn seen(&mut self, tenant: &str, now: Instant) {
        for (name, at) in self.recent.iter_mut().flatten() {
            if name == tenant {
                *at = now;
                return;
            }
        }
        // A new one takes the place of the one seen longest ago.
        let oldest = match &self.recent {
            [None, _] => 0,
            [_, None] => 1,
            [Some((_, a)), Some((_, b))] => usize::from(b < a),
        };
        self.recent[oldest] = Some((tenant.to_string(), now));
    }

    /// Whether two different tenants were seen within [`SEEN_FOR`].
    fn several_seen(&self, now: Instant) -> bool {
        self.recent
            .iter()
            .all(|seen| seen.as_ref().is_some_and(|(_, at)| now < *at + SEEN_FOR))
    }

    /// Whether `key` holds more requests than its share of the replica's calls: the limit
    /// split by weight between the tenants in hand, and with `unseen` one more of weight 1.
    /// Holding more means requests of its wait in hand, in the way of those behind them. At
    /// least two in hand: a single request is never moved. Without `unseen`, a tenant that
    /// is all the replica holds has nobody to make way for.
    fn over_share(&self, key: &Key, p: Pressure, unseen: bool) -> bool {
        let held = self.held.get(key).map_or(0, |(count, _)| *count);
        if held < 2 {
            return false;
        }
        let (total, weights) = self.totals[key.0.index()];
        if !unseen && held >= total {
            return false;
        }
        // Holding two or more, the tenant's own weight is in `weights` already.
        let weights = weights + u64::from(unseen);
        let share = (p.limit as u64).saturating_mul(u64::from(p.weight)) / weights.max(1);
        held as u64 > share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: Pressure = Pressure {
        weight: 1,
        limit: 10,
        waiting: true,
    };
    const CALM: Pressure = Pressure {
        weight: 1,
        limit: 10,
        waiting: false,
    };

    fn empty(_: u16) -> Option<u32> {
        Some(0)
    }

    fn hold_n<'a>(lanes: &'a Lanes, tenant: &str, weight: u32, n: usize) -> Vec<Held<'a>> {
        (0..n)
            .map(|_| lanes.hold(Kind::Chat, tenant, weight))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_over_its_share_of_a_busy_replica_moves_and_stays_bound() {
        let lanes = Lanes::new(16, 100, false);
        let alice = topology::lane_of("alice", 16);
        let held = hold_n(&lanes, "alice", 1, 6);
        let _bob = hold_n(&lanes, "bob", 1, 2);
        // A limit of 10; alice, bob and one unseen: alice's share is 10/3.
        assert_eq!(
            lanes.route(Kind::Chat, "alice", CALM, empty),
            None,
            "nothing waits: nothing moves"
        );
        assert_eq!(lanes.route(Kind::Chat, "alice", BUSY, empty), alice);
        assert_eq!(
            lanes.route(Kind::Chat, "bob", BUSY, empty),
            None,
            "within 10/3"
        );
        assert_eq!(
            lanes.route(Kind::Embedding, "alice", BUSY, empty),
            None,
            "embeddings are counted apart: she holds none"
        );
        // Bound: alice's next requests follow, even below her share.
        drop(held);
        assert_eq!(lanes.route(Kind::Chat, "alice", CALM, empty), alice);
        tokio::time::advance(BIND_FOR).await;
        assert_eq!(
            lanes.route(Kind::Chat, "alice", CALM, |_| Some(3)),
            alice,
            "her lane still holds requests"
        );
        tokio::time::advance(HELD_BY_DEPTH).await;
        assert_eq!(
            lanes.route(Kind::Chat, "alice", CALM, |_| Some(3)),
            None,
            "a lane's depth holds a binding for a while only"
        );
        assert_eq!(lanes.bound(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn anonymous_alone_moves_only_once_several_are_known() {
        let lanes = Lanes::new(16, 100, false);
        let _held = hold_n(&lanes, ANONYMOUS, 1, 20);
        assert_eq!(
            lanes.route(Kind::Chat, ANONYMOUS, BUSY, empty),
            None,
            "a fleet that names no sender pays no moves"
        );
        drop(lanes.hold(Kind::Chat, "bob", 1));
        assert!(
            lanes.route(Kind::Chat, ANONYMOUS, BUSY, empty).is_some(),
            "Bob was seen: whoever waits behind the backlog counts"
        );
        let lanes = Lanes::new(16, 100, false);
        drop(lanes.hold(Kind::Chat, "bob", 1));
        tokio::time::advance(SEEN_FOR).await;
        let _held = hold_n(&lanes, ANONYMOUS, 1, 20);
        assert_eq!(
            lanes.route(Kind::Chat, ANONYMOUS, BUSY, empty),
            None,
            "Bob was seen too long ago"
        );
        let configured = Lanes::new(16, 100, true);
        let _held = hold_n(&configured, ANONYMOUS, 1, 20);
        assert!(
            configured
                .route(Kind::Chat, ANONYMOUS, BUSY, empty)
                .is_some(),
            "the configuration names tenants"
        );
        let named = Lanes::new(16, 100, false);
        let _held = hold_n(&named, "alice", 1, 20);
        assert!(
            named.route(Kind::Chat, "alice", BUSY, empty).is_some(),
            "a sender with a name: tenants are in use"
        );
    }

    #[test]
    fn weights_widen_the_share() {
        let lanes = Lanes::new(16, 100, true);
        let _a = hold_n(&lanes, "alice", 3, 8);
        let _b = hold_n(&lanes, "bob", 1, 2);
        // A limit of 10; alice 3, bob 1, unseen 1: alice's share is 6.
        let heavy = Pressure { weight: 3, ..BUSY };
        assert!(lanes.route(Kind::Chat, "alice", heavy, empty).is_some());
        let lanes = Lanes::new(16, 100, true);
        let _a = hold_n(&lanes, "alice", 3, 6);
        let _b = hold_n(&lanes, "bob", 1, 4);
        assert_eq!(
            lanes.route(Kind::Chat, "alice", heavy, empty),
            None,
            "6 of 6"
        );
    }

    #[test]
    fn no_lanes_or_too_many_bound_settles_in_place() {
        let off = Lanes::new(0, 100, true);
        let _held = hold_n(&off, "alice", 1, 50);
        assert_eq!(off.route(Kind::Chat, "alice", BUSY, empty), None);
        let full = Lanes::new(16, 1, true);
        let _a = hold_n(&full, "alice", 1, 50);
        let _b = hold_n(&full, "bob", 1, 50);
        assert!(full.route(Kind::Chat, "alice", BUSY, empty).is_some());
        assert_eq!(full.route(Kind::Chat, "bob", BUSY, empty), None);
    }

    #[test]
    fn a_tenant_whose_lane_is_taken_stays_in_the_work_queue() {
        let lanes = Lanes::new(16, 100, true);
        // Two names that hash to one lane.
        let first = "tenant-0";
        let lane = topology::lane_of(first, 16);
        let second = (1..)
            .map(|i| format!("tenant-{i}"))
            .find(|t| topology::lane_of(t, 16) == lane)
            .expect("a name on the same lane");
        let _a = hold_n(&lanes, first, 1, 20);
        let _b = hold_n(&lanes, &second, 1, 20);
        assert_eq!(lanes.route(Kind::Chat, first, BUSY, empty), lane);
        assert_eq!(
            lanes.route(Kind::Chat, &second, BUSY, empty),
            None,
            "not behind the first one's backlog"
        );
        // Another lane is free.
        let other = (1..)
            .map(|i| format!("other-{i}"))
            .find(|t| topology::lane_of(t, 16) != lane)
            .expect("a name on another lane");
        let _c = hold_n(&lanes, &other, 1, 20);
        assert!(lanes.route(Kind::Chat, &other, BUSY, empty).is_some());
    }

    #[test]
    fn held_counts_and_weights_come_back_to_zero() {
        let lanes = Lanes::new(16, 100, false);
        {
            let _a = lanes.hold(Kind::Chat, "alice", 3);
            let _b = lanes.hold(Kind::Chat, "alice", 3);
            let _c = lanes.hold(Kind::Chat, "bob", 1);
            let _d = lanes.hold(Kind::Embedding, "bob", 1);
            let s = lanes.state();
            assert_eq!(s.totals, [(3, 4), (1, 1)]);
        }
        let s = lanes.state();
        assert!(s.held.is_empty());
        assert_eq!(s.totals, [(0, 0), (0, 0)]);
    }
}
