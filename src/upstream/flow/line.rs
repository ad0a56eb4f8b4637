//! The line for a deployment's per-minute budgets: calls waiting for requests and tokens
//! are served one at a time, the first of the line taking what the budgets hold as they
//! refill until its charge is paid, and tenants take turns by what they were charged.
//!
//! Without a line, every waiter polled the budget on its own: whoever polled first took,
//! and a call with a huge estimate (`max_tokens` near the cap, times `n`) drove the bucket a
//! minute into debt, which every other tenant's call then waited out, holding its slot. Now
//! a call is charged at most the bucket's capacity, never starts into debt, and waits here
//! before it takes a slot; between tenants the line is weighted fair queueing on the charge:
//! a tenant's calls are served in the order of their finish tags (its pass plus the call's
//! charge divided by its weight), so a tenant whose calls are charged a minute of the
//! budget each waits its minute while another's small calls go by, and each tenant gets its
//! weight's share of the budget. Within a tenant, the highest priority first, then the
//! earliest. A tenant that comes back after a while starts at the pass last served: no
//! credit for the time away.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    sync::{Mutex, MutexGuard},
};

use tokio::sync::Notify;

use super::turn::Turn;

/// What a charge of one token, divided by a weight of 1, adds to a tenant's pass (weights
/// are at most 1000, so every step stays distinct).
const SCALE: u128 = 1000;

/// The calls waiting for a deployment's budgets.
#[derive(Default)]
pub struct Line {
    state: Mutex<State>,
    /// Told whenever the first of the line may have changed.
    changed: Notify,
}

#[derive(Default)]
struct State {
    tenants: HashMap<u64, Tenant>,
    /// The pass of the tenant served last: where a tenant that comes back starts.
    now: u128,
    seq: u64,
    len: usize,
}

/// One tenant's waiting calls.
#[derive(Default)]
struct Tenant {
    pass: u128,
    /// By priority (highest first), then arrival: what each adds to the pass when served.
    waiting: BTreeMap<(Reverse<u8>, u64), u128>,
}

/// A call's place in the line; it leaves the line when dropped.
pub struct Place<'a> {
    line: &'a Line,
    tenant: u64,
    key: (Reverse<u8>, u64),
    served: bool,
}

impl Line {
    fn state(&self) -> MutexGuard<'_, State> {
        // Plain counters: a panic while holding the lock leaves them usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls waiting in the line.
    pub fn len(&self) -> usize {
        self.state().len
    }

    /// Whether no call waits in the line.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Joins the line with a charge of `charge` tokens (requests count as tokens here: a
    /// call with no token budget is charged 1).
    pub fn join(&self, turn: Turn, charge: u64) -> Place<'_> {
        let mut s = self.state();
        s.seq += 1;
        let key = (Reverse(turn.priority), s.seq);
        let now = s.now;
        let step = u128::from(charge.max(1)) * SCALE / u128::from(turn.weight.max(1));
        let tenant = s.tenants.entry(turn.tenant).or_default();
        if tenant.waiting.is_empty() {
            tenant.pass = tenant.pass.max(now);
        }
        tenant.waiting.insert(key, step.max(1));
        s.len += 1;
        drop(s);
        self.changed.notify_waiters();
        Place {
            line: self,
            tenant: turn.tenant,
            key,
            served: false,
        }
    }

    /// Resolves once the first of the line may have changed. Create it before looking, so
    /// that a change in between is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// The first of the line: the tenant whose first call has the lowest finish tag (the
    /// earliest call breaks ties), and that call.
    fn first(s: &State) -> Option<(u64, (Reverse<u8>, u64))> {
        s.tenants
            .iter()
            .filter_map(|(id, t)| {
                let (key, step) = t.waiting.first_key_value()?;
                Some(((t.pass.saturating_add(*step), key.1), *id, *key))
            })
            .min_by_key(|(tag, _, _)| *tag)
            .map(|(_, id, key)| (id, key))
    }

    /// Removes a call; a served one moves its tenant's pass by its step.
    fn remove(&self, tenant: u64, key: (Reverse<u8>, u64), served: bool) {
        let mut s = self.state();
        let mut now = s.now;
        let Some(t) = s.tenants.get_mut(&tenant) else {
            return;
        };
        let Some(step) = t.waiting.remove(&key) else {
            return;
        };
        if served {
            now = now.max(t.pass);
            t.pass = t.pass.saturating_add(step);
        }
        s.now = now;
        s.len -= 1;
        // A tenant without waiters whose pass fell behind would start at `now` anyway.
        s.tenants
            .retain(|_, t| !t.waiting.is_empty() || t.pass > now);
        drop(s);
        self.changed.notify_waiters();
    }
}

impl Place<'_> {
    /// Whether this call is the first of the line, the one that takes from the budgets.
    pub fn is_first(&self) -> bool {
        Line::first(&self.line.state()) == Some((self.tenant, self.key))
    }

    /// Its charge is paid: it leaves the line, and its tenant's pass moves on.
    pub fn served(mut self) {
        self.served = true;
        self.line.remove(self.tenant, self.key, true);
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if !self.served {
            self.line.remove(self.tenant, self.key, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves the line to the end, each first in turn: `(tenant, charge)` in the order
    /// served.
    fn served_order(calls: &[(&'static str, u32, u64)]) -> Vec<(&'static str, u64)> {
        let line = Line::default();
        let mut places: Vec<(Place<'_>, &'static str, u64)> = calls
            .iter()
            .map(|&(tenant, weight, charge)| {
                (
                    line.join(Turn::new(tenant, weight, 0), charge),
                    tenant,
                    charge,
                )
            })
            .collect();
        let mut order = Vec::new();
        while let Some(i) = places.iter().position(|(p, _, _)| p.is_first()) {
            let (place, tenant, charge) = places.remove(i);
            place.served();
            order.push((tenant, charge));
        }
        assert!(places.is_empty(), "every call was first once");
        assert_eq!(line.len(), 0);
        order
    }

    #[test]
    fn small_calls_go_by_a_tenant_whose_calls_cost_a_minute_each() {
        // Alice's three calls of 6000 came first, then Bob's five of 15.
        let mut calls = vec![("alice", 1, 6000); 3];
        calls.extend([("bob", 1, 15); 5]);
        let order: Vec<&str> = served_order(&calls).iter().map(|(t, _)| *t).collect();
        assert_eq!(
            order,
            ["bob", "bob", "bob", "bob", "bob", "alice", "alice", "alice"],
            "finish tags: Bob's 15 to 75, Alice's 6000 on"
        );
    }

    #[test]
    fn equal_charges_alternate_and_weights_share() {
        let mut calls = vec![("alice", 1, 10); 4];
        calls.extend([("bob", 1, 10); 4]);
        let order: Vec<&str> = served_order(&calls).iter().map(|(t, _)| *t).collect();
        assert_eq!(
            order,
            [
                "alice", "bob", "alice", "bob", "alice", "bob", "alice", "bob"
            ]
        );
        let mut calls = vec![("alice", 3, 10); 6];
        calls.extend([("bob", 1, 10); 2]);
        let order: Vec<&str> = served_order(&calls).iter().map(|(t, _)| *t).collect();
        assert_eq!(
            order,
            [
                "alice", "alice", "alice", "bob", "alice", "alice", "alice", "bob"
            ],
            "three of Alice's charge for one of Bob's"
        );
    }

    #[test]
    fn within_a_tenant_priority_then_arrival() {
        let line = Line::default();
        let low = line.join(Turn::new("alice", 1, 1), 10);
        let high = line.join(Turn::new("alice", 1, 9), 10);
        assert!(high.is_first() && !low.is_first());
        drop(high);
        assert!(low.is_first(), "a call that left gives its place up");
        assert_eq!(line.len(), 1);
    }

    #[test]
    fn a_tenant_back_after_a_while_gets_no_credit_for_it() {
        let line = Line::default();
        for _ in 0..50 {
            line.join(Turn::new("alice", 1, 0), 10).served();
        }
        let alice: Vec<Place<'_>> = (0..5)
            .map(|_| line.join(Turn::new("alice", 1, 0), 10))
            .collect();
        let bob: Vec<Place<'_>> = (0..5)
            .map(|_| line.join(Turn::new("bob", 1, 0), 10))
            .collect();
        let mut order = Vec::new();
        let mut all: Vec<(Place<'_>, &str)> = alice
            .into_iter()
            .map(|p| (p, "alice"))
            .chain(bob.into_iter().map(|p| (p, "bob")))
            .collect();
        while let Some(i) = all.iter().position(|(p, _)| p.is_first()) {
            let (place, tenant) = all.remove(i);
            place.served();
            order.push(tenant);
        }
        assert_eq!(
            order,
            [
                "bob", "alice", "bob", "alice", "bob", "alice", "bob", "alice", "bob", "alice"
            ],
            "Bob starts one step behind Alice's last, as the slots' line does, not fifty"
        );
    }
}
