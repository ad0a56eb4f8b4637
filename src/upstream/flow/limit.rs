//! Flow control toward one deployment: how many calls may run at once, and when.
//!
//! - A concurrency limit between `worker.min_inflight` and the deployment's `max_inflight`,
//!   adapted by AIMD. A 429 that names no time to wait cuts it to the number of other calls
//!   that were running when the refused call started or when its answer came, whichever is
//!   more: the provider refused a call beyond its cap, so that count is at least the cap,
//!   and the limit lands on it instead of far below (halving alone averages
//!   about 0.75 of a hard cap). At or above a limit a 429 cut, growth slows to one per
//!   [`PROBE_WINDOWS`] windows, so a hidden cap is probed rarely. A timeout halves the limit
//!   (at most once per [`DECREASE_COOLDOWN`]). Each window of `limit` successes adds one.
//!   Deliveries waiting for a slot start by their tenant's share ([`Turn`]): stride
//!   scheduling across tenants by weight, and within a tenant highest priority first, then in
//!   arrival order.
//! - A hold while the broker blocks publishing (a memory or disk alarm): a result could not
//!   be confirmed, so no call starts until the broker unblocks.
//! - Request and token budgets per minute ([`crate::upstream::flow::ratelimit`]), local or
//!   fleet-wide, waited for in the deployment's [`line::Line`] before a slot is taken: a call
//!   waiting for its budget holds no slot, and tenants take turns by what they are charged.
//!
//! `Retry-After` is not handled here: it cools the deployment down for one model
//! ([`crate::upstream::routing::standing`]), so its other models and the other deployments keep
//! serving. The limit is published on a watch channel so that the prefetch follows it.

use std::{
    cmp::Ordering,
    collections::{BinaryHeap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::{
    sync::{oneshot, watch},
    time::Instant,
};

use crate::upstream::flow::{
    line,
    ratelimit::{Budget, MAX_WAIT},
    turn::Turn,
};

/// Shortest time between two decreases, so a burst of 429s from calls that were all in
/// flight together halves the limit once, not once per call.
pub const DECREASE_COOLDOWN: Duration = Duration::from_secs(1);

/// At or above the limit a 429 last cut to, the limit grows by one per this many windows
/// of successes instead of one: probing a hidden cap costs a refused call each time.
pub const PROBE_WINDOWS: usize = 8;

/// The replica's flow control.
pub struct Flow {
    state: Mutex<State>,
    min: usize,
    max: usize,
    limit_tx: watch::Sender<usize>,
    /// `true` while new calls are held (see [`Flow::hold`]).
    held: watch::Sender<bool>,
    budget: Budget,
    /// The calls waiting for the budget.
    line: line::Line,
}

struct State {
    limit: usize,
    in_flight: usize,
    waiters: Waiters,
    seq: u64,
    successes: usize,
    last_decrease: Option<Instant>,
    /// The limit a 429 last cut to: the deployment's cap, as far as it is known.
    ceiling: Option<usize>,
    /// A call succeeded since the last 429: the deployment still answers at this
    /// concurrency, so a 429 now is its cap, not a rate.
    answered: bool,
}

/// What one step of a weight-1 tenant advances its pass by; a tenant of weight `w` advances
/// by `STRIDE / w` (weights are at most 1000, so the steps stay distinct).
const STRIDE: u64 = 1 << 20;

/// The calls waiting for a slot, by tenant: stride scheduling. Each tenant has a pass; the
/// slot goes to the waiting tenant with the lowest (the earliest waiter breaks ties), whose
/// pass then grows by `STRIDE / weight`, so under contention tenants start calls in
/// proportion to their weights. A tenant that starts waiting again keeps its pass, but never
/// more than one weight-1 step behind the pass last served: a moment without a request in
/// hand (its next one is on its way from the broker) costs it no turn, while time spent idle
/// earns no credit to crowd the others out later. A new tenant starts one step behind, so
/// it is served at once. Within a tenant the highest priority goes first, then the earliest.
#[derive(Default)]
struct Waiters {
    /// Tenants waiting, and those whose pass is still ahead of the credit a newcomer gets.
    lines: HashMap<u64, Line>,
    /// The pass of the tenant served last.
    now: u64,
    len: usize,
}

/// One tenant's waiting calls.
struct Line {
    pass: u64,
    stride: u64,
    waiters: BinaryHeap<Waiter>,
}

impl Waiters {
    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lowest pass a tenant may wait with: one weight-1 step behind the last served.
    fn floor(&self) -> u64 {
        self.now.saturating_sub(STRIDE)
    }

    fn push(&mut self, turn: Turn, waiter: Waiter) {
        let floor = self.floor();
        let line = self.lines.entry(turn.tenant).or_insert_with(|| Line {
            pass: floor,
            stride: 0,
            waiters: BinaryHeap::new(),
        });
        if line.waiters.is_empty() {
            line.pass = line.pass.max(floor);
        }
        // The weight of its latest request counts (a configuration reload changes it).
        line.stride = STRIDE / u64::from(turn.weight.max(1));
        line.waiters.push(waiter);
        self.len += 1;
    }

    /// The next waiter: the head of the waiting line with the lowest pass.
    fn pop(&mut self) -> Option<Waiter> {
        let (&tenant, _) = self
            .lines
            .iter()
            .filter(|(_, line)| !line.waiters.is_empty())
            .min_by_key(|(_, line)| {
                let head = line.waiters.peek().map_or(u64::MAX, |w| w.seq);
                (line.pass, head)
            })?;
        let line = self.lines.get_mut(&tenant)?;
        let waiter = line.waiters.pop()?;
        // Never backwards: a newcomer served one step behind must not pull the floor down
        // for the next one.
        self.now = self.now.max(line.pass);
        line.pass = line.pass.saturating_add(line.stride);
        self.len -= 1;
        // A line without waiters whose pass fell to the floor would start there anyway.
        let floor = self.floor();
        self.lines
            .retain(|_, line| !line.waiters.is_empty() || line.pass > floor);
        Some(waiter)
    }
}

struct Waiter {
    priority: u8,
    seq: u64,
    tx: oneshot::Sender<Permit>,
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.priority == other.priority && self.seq == other.seq
    }
}
impl Eq for Waiter {}
impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Waiter {
    /// Higher priority first; within a priority, the earlier arrival first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// A running upstream call's slot; released on drop, and the tokens it still holds given
/// back (a call dropped mid-flight consumed none the budget can know of).
pub struct Permit {
    flow: Option<Arc<Flow>>,
    /// Tokens taken from the budget for this call and not settled yet (the estimate, or less
    /// when the debt bound cut the charge).
    tokens: u64,
}

impl Permit {
    /// Tokens taken from the budget for this call and not settled yet.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Takes the tokens over, for the caller to settle with [`Flow::settle_tokens`]; the
    /// permit gives nothing back on drop then.
    pub fn take_tokens(&mut self) -> u64 {
        std::mem::take(&mut self.tokens)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(flow) = self.flow.take() {
            flow.refund_detached(self.take_tokens());
            flow.release();
        }
    }
}

/// What a call took from the budgets before it has a slot: given back if it never gets one.
struct Taken {
    flow: Arc<Flow>,
    tokens: u64,
    request: bool,
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.flow.refund_detached(self.tokens);
        if self.request
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let flow = self.flow.clone();
            runtime.spawn(async move { flow.budget.give_back_request().await });
        }
    }
}

impl Flow {
    /// A flow starting at `max` concurrent calls.
    pub fn new(min: usize, max: usize, budget: Budget) -> Arc<Self> {
        let max = max.max(1);
        let min = min.clamp(1, max);
        let (limit_tx, _) = watch::channel(max);
        Arc::new(Self {
            state: Mutex::new(State {
                limit: max,
                in_flight: 0,
                waiters: Waiters::default(),
                seq: 0,
                successes: 0,
                last_decrease: None,
                ceiling: None,
                answered: false,
            }),
            min,
            max,
            limit_tx,
            held: watch::Sender::new(false),
            budget,
            line: line::Line::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain counters behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current concurrency limit.
    pub fn limit(&self) -> usize {
        self.state().limit
    }

    /// Calls running now.
    pub fn in_flight(&self) -> usize {
        self.state().in_flight
    }

    /// Deliveries waiting for the budget or a slot.
    pub fn waiting(&self) -> usize {
        self.state().waiters.len() + self.line.len()
    }

    /// Follows the concurrency limit.
    pub fn watch_limit(&self) -> watch::Receiver<usize> {
        self.limit_tx.subscribe()
    }

    /// The highest limit it may reach.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether a call could start now without waiting for a slot.
    pub fn has_room(&self) -> bool {
        let s = self.state();
        s.in_flight < s.limit && s.waiters.is_empty()
    }

    /// Waits for the request and token budgets in the [`line::Line`] (`tokens` is the call's
    /// estimate), then for a slot (by `turn`: its tenant's share, then its priority), then
    /// for any [`hold`](Self::hold). Callers bound the wait (shutdown, their own deadline)
    /// by dropping it; what was taken by then goes back.
    pub async fn acquire(self: &Arc<Self>, turn: Turn, tokens: u64) -> Permit {
        let mut taken = self.take_budget(turn, tokens).await;
        let mut permit = self.slot(turn).await;
        // Checked after the slot: a call waiting for one when the hold began must not start
        // when it gets it. The sender lives in `self`, so the wait cannot fail.
        let _ = self.held.subscribe().wait_for(|held| !*held).await;
        permit.tokens = std::mem::take(&mut taken.tokens);
        taken.request = false;
        permit
    }

    /// Waits in the line until this call is first, then takes from the budgets as they
    /// refill until one request and its charge (`tokens`, at most the token bucket's
    /// capacity) are taken. Dropped before, it leaves the line and gives back what it took.
    async fn take_budget(self: &Arc<Self>, turn: Turn, tokens: u64) -> Taken {
        let mut taken = Taken {
            flow: self.clone(),
            tokens: 0,
            request: false,
        };
        if self.budget.is_unlimited() {
            return taken;
        }
        let charge = self
            .budget
            .token_capacity()
            .map_or(0, |cap| tokens.min(cap));
        let place = self.line.join(turn, charge);
        loop {
            let changed = self.line.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !place.is_first() {
                changed.await;
                continue;
            }
            let wait = if taken.request {
                None
            } else {
                self.budget.try_request().await
            };
            let wait = match wait {
                Some(wait) => wait,
                None => {
                    taken.request = true;
                    let (got, wait) = self.budget.take_some_tokens(charge - taken.tokens).await;
                    taken.tokens += got;
                    if taken.tokens >= charge {
                        place.served();
                        return taken;
                    }
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait.min(MAX_WAIT)) => {}
                () = changed => {}
            }
        }
    }

    async fn slot(self: &Arc<Self>, turn: Turn) -> Permit {
        let rx = {
            let mut s = self.state();
            if s.in_flight < s.limit && s.waiters.is_empty() {
                s.in_flight += 1;
                return Permit {
                    flow: Some(self.clone()),
                    tokens: 0,
                };
            }
            let (tx, rx) = oneshot::channel();
            s.seq += 1;
            let seq = s.seq;
            let priority = turn.priority;
            s.waiters.push(turn, Waiter { priority, seq, tx });
            rx
        };
        // The sender lives in the heap until granted; a closed channel cannot happen while
        // the flow exists, but wait again rather than run unpermitted if it ever does.
        match rx.await {
            Ok(permit) => permit,
            Err(_) => Box::pin(self.slot(turn)).await,
        }
    }

    fn release(self: &Arc<Self>) {
        let mut s = self.state();
        s.in_flight = s.in_flight.saturating_sub(1);
        self.grant(&mut s);
    }

    /// Hands free slots to the waiters, best first.
    fn grant(self: &Arc<Self>, s: &mut State) {
        while s.in_flight < s.limit {
            let Some(waiter) = s.waiters.pop() else {
                break;
            };
            s.in_flight += 1;
            let permit = Permit {
                flow: Some(self.clone()),
                tokens: 0,
            };
            if let Err(mut unwanted) = waiter.tx.send(permit) {
                // The waiter gave up (its delivery was handed back); take the slot back
                // without re-entering the lock.
                unwanted.flow = None;
                s.in_flight -= 1;
            }
        }
    }

    /// A call succeeded: after a window of `limit` successes the limit grows by one
    /// ([`PROBE_WINDOWS`] windows at or above the last 429's cut).
    pub fn on_success(self: &Arc<Self>) {
        let mut s = self.state();
        s.successes += 1;
        s.answered = true;
        let windows = match s.ceiling {
            Some(ceiling) if s.limit >= ceiling => PROBE_WINDOWS,
            _ => 1,
        };
        if s.successes >= s.limit.saturating_mul(windows) && s.limit < self.max {
            s.successes = 0;
            s.limit += 1;
            let limit = s.limit;
            self.grant(&mut s);
            drop(s);
            self.limit_tx.send_replace(limit);
        }
    }

    /// A call was refused with a 429 while `others` other calls to the deployment were
    /// running: the cap is at most `others`, so the limit drops to it (a
    /// 429 never raises it). Every 429 of a burst may lower it further. Answers whether it
    /// did lower it.
    pub fn on_rate_limited(&self, others: usize) -> bool {
        let mut s = self.state();
        let limit = others.clamp(self.min, s.limit.max(self.min));
        s.successes = 0;
        s.answered = false;
        s.ceiling = Some(limit);
        if limit == s.limit {
            return false;
        }
        s.limit = limit;
        drop(s);
        self.limit_tx.send_replace(limit);
        true
    }

    /// A call let in when the limit was `admitted_at` was refused with a 429 that named a
    /// time while `others` other calls to the deployment were running. Answers whether that
    /// is a concurrency cap: other calls were running, and the limit could be cut to them
    /// (as [`Self::on_rate_limited`] does), or more ran than the limit allows (the tail of
    /// the burst that found the cap, let in above a limit cut since), or calls succeeded
    /// since the last 429 (the provider's count of calls at once lags the answers it sent).
    /// Not one when it came alone, or when the limit is at its floor, the call within it,
    /// and nothing succeeds any more: the 429s go on at the reduced limit, so they are a
    /// rate.
    pub fn on_capped(&self, others: usize, admitted_at: usize) -> bool {
        if others == 0 {
            return false;
        }
        let (answered, limit) = {
            let s = self.state();
            (s.answered, s.limit)
        };
        self.on_rate_limited(others) || others >= limit || admitted_at > limit || answered
    }

    /// A call timed out: halve the limit, once per cooldown.
    pub fn on_timeout(&self) {
        let mut s = self.state();
        let now = Instant::now();
        if s.last_decrease
            .is_some_and(|at| now.duration_since(at) < DECREASE_COOLDOWN)
        {
            return;
        }
        s.last_decrease = Some(now);
        s.successes = 0;
        let limit = (s.limit / 2).max(self.min);
        if limit != s.limit {
            s.limit = limit;
            drop(s);
            self.limit_tx.send_replace(limit);
        }
    }

    /// Holds (`true`) or releases (`false`) every call not yet started, for as long as the
    /// broker blocks publishing: their results could not be confirmed. Calls already running
    /// are not affected.
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Whether new calls are held.
    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Corrects the token budget once the real usage is known: `taken` were taken, `actual`
    /// were used (0 gives them all back).
    pub async fn settle_tokens(&self, taken: u64, actual: u64) {
        self.budget.settle(taken, actual).await;
    }

    /// The budget, for tests that look at its level.
    #[cfg(test)]
    pub(crate) fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Gives `tokens` back to the budget from where no one can wait for it (a call dropped
    /// mid-flight): in a task of its own, if a runtime is there to run it.
    pub fn refund_detached(self: &Arc<Self>, tokens: u64) {
        if tokens == 0 {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let flow = self.clone();
            runtime.spawn(async move { flow.settle_tokens(tokens, 0).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(min: usize, max: usize) -> Arc<Flow> {
        Flow::new(min, max, Budget::unlimited())
    }

    #[tokio::test(start_paused = true)]
    async fn limit_bounds_concurrency_and_releases() {
        let f = flow(1, 2);
        let a = f.acquire(Turn::anyone(0), 0).await;
        let _b = f.acquire(Turn::anyone(0), 0).await;
        assert_eq!(f.in_flight(), 2);
        let waiting = tokio::spawn({
            let f = f.clone();
            async move { f.acquire(Turn::anyone(0), 0).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(f.waiting(), 1);
        drop(a);
        let _c = waiting.await.unwrap();
        assert_eq!(f.in_flight(), 2);
        assert_eq!(f.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_start_highest_priority_first() {
        let f = flow(1, 1);
        let held = f.acquire(Turn::anyone(0), 0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, priority) in [1u8, 9, 5, 9, 0].into_iter().enumerate() {
            let (f, order) = (f.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = f.acquire(Turn::anyone(priority), 0).await;
                order.lock().unwrap().push((priority, i));
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![(9, 1), (9, 3), (5, 2), (1, 0), (0, 4)]
        );
    }

    /// Calls started by a flow of one slot for waiters queued as `(tenant, weight,
    /// priority)`, in the order they started.
    async fn started_order(waiting: &[(&'static str, u32, u8)]) -> Vec<(&'static str, u8)> {
        let f = flow(1, 1);
        let held = f.acquire(Turn::anyone(0), 0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for &(tenant, weight, priority) in waiting {
            let (f, order) = (f.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = f.acquire(Turn::new(tenant, weight, priority), 0).await;
                order.lock().unwrap().push((tenant, priority));
            }));
            tokio::task::yield_now().await;
        }
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(order).unwrap().into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn tenants_start_calls_by_weight_whatever_the_order_they_came_in() {
        // Alice's eight came first; Bob (weight 1) and Carol (weight 2) came after.
        let mut waiting = vec![("alice", 1, 0); 8];
        waiting.extend([("bob", 1, 0); 4]);
        waiting.extend([("carol", 2, 0); 8]);
        let order = started_order(&waiting).await;
        let first: Vec<&str> = order.iter().take(8).map(|(t, _)| *t).collect();
        // Passes: alice and bob step 4, carol 2; ties go to the earliest waiter.
        assert_eq!(
            first,
            [
                "alice", "bob", "carol", "carol", "alice", "bob", "carol", "carol"
            ]
        );
        assert_eq!(order.len(), 20, "every waiter started");
    }

    #[tokio::test(start_paused = true)]
    async fn within_a_tenant_priority_then_arrival_decides() {
        let order = started_order(&[
            ("alice", 1, 1),
            ("bob", 1, 0),
            ("alice", 1, 9),
            ("alice", 1, 5),
            ("bob", 1, 7),
        ])
        .await;
        assert_eq!(
            order,
            [
                ("alice", 9),
                ("bob", 7),
                ("bob", 0),
                ("alice", 5),
                ("alice", 1)
            ],
            "weights decide between tenants (equal passes: the earlier head first), \
             priorities within each"
        );
    }

    #[test]
    fn a_newcomer_is_served_at_once_but_earns_no_credit_for_its_absence() {
        let mut w = Waiters::default();
        let (turn_a, turn_b) = (Turn::new("a", 1, 0), Turn::new("b", 1, 0));
        let waiter = |seq| Waiter {
            priority: 0,
            seq,
            tx: oneshot::channel().0,
        };
        for seq in 0..100 {
            w.push(turn_a, waiter(seq));
        }
        // A alone is served fifty times: its pass runs ahead.
        for seq in 0..50 {
            assert_eq!(w.pop().map(|w| w.seq), Some(seq));
        }
        // B arrives: it does not get fifty turns in a row for the time it was away.
        for seq in 100..110 {
            w.push(turn_b, waiter(seq));
        }
        let served: Vec<u64> = std::iter::from_fn(|| w.pop().map(|w| w.seq))
            .take(5)
            .collect();
        // B starts one step behind A's last pass: one turn of credit, then they alternate.
        assert_eq!(served, [100, 101, 50, 102, 51]);
        assert_eq!(w.len(), 55);
    }

    #[test]
    fn a_tenant_with_one_request_in_hand_at_a_time_keeps_its_weight() {
        let mut w = Waiters::default();
        let (alice, bob) = (Turn::new("alice", 3, 0), Turn::new("bob", 1, 0));
        let waiter = |seq| Waiter {
            priority: 0,
            seq,
            tx: oneshot::channel().0,
        };
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        for _ in 0..1000 {
            w.push(bob, waiter(next()));
        }
        w.push(alice, waiter(next()));
        // Alice's next request arrives only once her last has started: her line empties
        // after every turn.
        let mut alices = 0;
        for _ in 0..400 {
            let served = w.pop().expect("a waiter");
            if served.seq > 1000 {
                alices += 1;
                w.push(alice, waiter(next()));
            }
        }
        assert_eq!(alices, 300, "3:1, as if she always had one waiting");
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_halve_once_per_burst_and_successes_climb_back() {
        let f = flow(4, 64);
        let mut limits = f.watch_limit();
        for _ in 0..50 {
            f.on_timeout();
        }
        assert_eq!(f.limit(), 32, "a burst halves once");
        assert_eq!(*limits.borrow_and_update(), 32, "the prefetch follows");
        tokio::time::advance(DECREASE_COOLDOWN).await;
        f.on_timeout();
        assert_eq!(f.limit(), 16);
        for _ in 0..10 {
            tokio::time::advance(DECREASE_COOLDOWN).await;
            f.on_timeout();
        }
        assert_eq!(f.limit(), 4, "never below the floor");
        for _ in 0..4 {
            f.on_success();
        }
        assert_eq!(f.limit(), 5, "a window of successes adds one");
        for _ in 0..5 {
            f.on_success();
        }
        assert_eq!(f.limit(), 6);
        for _ in 0..10_000 {
            f.on_success();
        }
        assert_eq!(f.limit(), 64, "never above the ceiling");
    }

    #[test]
    fn a_429_cuts_to_the_calls_running_and_probes_slowly_above() {
        let f = flow(4, 256);
        // 40 calls started together against a cap of 32: the refused ones saw 32 to 39
        // others; whichever answers first, the burst ends at the lowest.
        for others in [37, 39, 32, 35] {
            f.on_rate_limited(others);
        }
        assert_eq!(f.limit(), 32, "the cap, not half of it");
        f.on_rate_limited(200);
        assert_eq!(f.limit(), 32, "a 429 never raises the limit");
        for _ in 0..32 * (PROBE_WINDOWS - 1) {
            f.on_success();
        }
        assert_eq!(f.limit(), 32, "at the cap, growth waits several windows");
        for _ in 0..32 {
            f.on_success();
        }
        assert_eq!(f.limit(), 33, "then probes one above");
        f.on_timeout();
        assert_eq!(f.limit(), 16, "a timeout halves");
        for _ in 0..16 {
            f.on_success();
        }
        assert_eq!(
            f.limit(),
            17,
            "below the last cut, growth is one per window"
        );
        f.on_rate_limited(1);
        assert_eq!(f.limit(), 4, "never below the floor");
    }

    #[test]
    fn a_429_with_a_time_is_a_cap_while_the_limit_can_come_down() {
        let f = flow(4, 64);
        assert!(f.on_capped(40, 64), "cut from 64 to 40");
        assert_eq!(f.limit(), 40);
        assert!(f.on_capped(50, 64), "the tail of the burst that found it");
        assert_eq!(f.limit(), 40, "never raised");
        assert!(f.on_capped(10, 40), "cut again");
        assert!(f.on_capped(20, 10), "more running than the limit: its tail");
        assert!(!f.on_capped(0, 64), "alone: a rate, whatever the limit");
        assert_eq!(f.limit(), 10);
        assert!(f.on_capped(3, 10));
        assert_eq!(f.limit(), 4, "down to the floor");
        assert!(f.on_capped(5, 4), "more running than the floor: its tail");
        assert!(!f.on_capped(3, 4), "at the floor, within it: a rate");
        f.on_success();
        assert!(
            f.on_capped(3, 4),
            "at the floor, but answers came since the last 429: the cap, just met"
        );
        assert!(
            !f.on_capped(3, 4),
            "and nothing since: the 429s go on, a rate"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_waiters_do_not_leak_slots() {
        let f = flow(1, 1);
        let held = f.acquire(Turn::anyone(0), 0).await;
        let abandoned = tokio::spawn({
            let f = f.clone();
            async move { f.acquire(Turn::anyone(0), 0).await }
        });
        tokio::task::yield_now().await;
        abandoned.abort();
        let _ = abandoned.await;
        drop(held);
        assert_eq!(f.in_flight(), 0);
        let _p = f.acquire(Turn::anyone(0), 0).await;
        assert_eq!(f.in_flight(), 1);
    }
    /// Read-through item 12: Alice's calls are each estimated beyond the deployment's
    /// token budget (a huge `max_tokens` times `n`). The first is charged the whole minute
    /// and runs; her second waits for the next minute without a slot, while Bob's small
    /// calls are served from what refills, at once. Before, her first drove the bucket a
    /// minute into debt and every call waited it out, each holding a slot.
    #[tokio::test(start_paused = true)]
    async fn a_huge_estimate_waits_its_minute_without_a_slot_while_small_calls_go_by() {
        let budget = Budget::new(0, 600, &crate::config::LimitsConfig::default(), None, None);
        let f = Flow::new(2, 2, budget);
        let start = Instant::now();
        let first = f.acquire(Turn::new("alice", 1, 0), 1_000_000).await;
        assert_eq!(
            first.tokens(),
            600,
            "charged the bucket's capacity, not into debt"
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (tenant, tokens) in [("alice", 1_000_000), ("bob", 10), ("bob", 10), ("bob", 10)] {
            let (f, order) = (f.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let permit = f.acquire(Turn::new(tenant, 1, 0), tokens).await;
                order.lock().unwrap().push((tenant, start.elapsed()));
                permit.tokens()
            }));
            tokio::task::yield_now().await;
        }
        // Ten tokens a second: Bob's three are paid within three seconds.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(
            order
                .lock()
                .unwrap()
                .iter()
                .map(|(t, _)| *t)
                .collect::<Vec<_>>(),
            ["bob", "bob", "bob"]
        );
        assert_eq!(
            f.in_flight(),
            1,
            "Alice's second holds no slot while it waits"
        );
        assert_eq!(f.waiting(), 1, "it waits for the budget");
        let second = tasks.swap_remove(0).await.unwrap();
        assert_eq!(second, 600);
        let (_, at) = order.lock().unwrap()[3];
        assert!(
            (Duration::from_secs(60)..Duration::from_secs(64)).contains(&at),
            "a minute for a minute's budget: {at:?}"
        );
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_stops_new_calls_until_released() {
        let f = flow(1, 2);
        f.hold(true);
        let held = tokio::spawn({
            let f = f.clone();
            async move { f.acquire(Turn::anyone(0), 0).await }
        });
        // Long past any wait: still held.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!held.is_finished(), "no call starts while held");
        f.hold(false);
        let _permit = held.await.unwrap();
        assert_eq!(f.in_flight(), 1);
        assert!(!f.is_held());
    }
}
