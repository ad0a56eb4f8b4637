//! Settling one delivery: parse it, then ask [`decide`] what to do and carry that out,
//! feeding back what each step produced, until the delivery is acked or handed back.
//!
//! This is the imperative shell around the pure decision: it talks to the idempotency
//! store, the ledger, the upstream ([`super::attempt`]) and the broker, and keeps what
//! the steps so far produced in one [`Settling`], from which each [`Input`] is made. It
//! decides nothing itself; [`steps`] carries out each decision.

mod steps;

use std::{panic::AssertUnwindSafe, time::Instant};

use futures_util::FutureExt;
use lapin::message::Delivery;
use tracing::{Instrument, info_span};

use super::{
    Context,
    ack::ack_if_confirmed,
    cancel::Watch,
    decide::{Arrival, Budget, Claim, Input, Sent, Tally, decide, may_move},
    lanes::{Origin, Pressure},
    stream,
};
use crate::{
    broker::{
        publish::{Publisher, ReplyRoute, with_retries},
        topology,
    },
    contract::{
        ErrorKind, Identity,
        fingerprint::fingerprint,
        headers::RetryState,
        reply_to::ReplyToPolicy,
        request::{self, InvalidRequest, Job, Kind},
    },
    runtime::clock::unix_now_ms,
    store::idempotency,
    tenant::spend::Hold,
    upstream::call::Outcome,
};

/// Settles one delivery, or moves it to its tenant's lane ([`super::lanes`]); a panic
/// anywhere in it dead-letters the delivery, so it is neither lost nor left unacked until
/// the broker's consumer timeout.
pub(super) async fn handle(
    ctx: &Context,
    publisher: &Publisher,
    origin: Origin,
    delivery: &Delivery,
) {
    let kind = origin.kind;
    let settle = AssertUnwindSafe(async {
        let identity = Identity::of(&delivery.properties, &ctx.config.tenancy.header);
        let weight = ctx.tenants.limits(identity.as_str()).weight;
        let arrival = Arrival {
            lanes: ctx.config.topology.lanes,
            from_lane: origin.lane.is_some(),
            redelivered: delivery.redelivered,
        };
        if may_move(arrival)
            && let Some(lane) = lane_for(ctx, kind, identity.as_str(), weight)
        {
            return move_to_lane(ctx, publisher, delivery, &lane).await;
        }
        let _held = ctx.lanes.hold(kind, identity.as_str(), weight);
        settle(ctx, publisher, origin, delivery, identity).await
    });
    if settle.catch_unwind().await.is_err() {
        ctx.metrics
            .dead_lettered(kind.as_str(), ErrorKind::InternalError.as_str());
        Box::pin(steps::dead_letter_after_panic(publisher, delivery, ctx)).await;
    }
}

/// The lane a request of `tenant` moves to, when the tenant is over its share here.
fn lane_for(ctx: &Context, kind: Kind, tenant: &str, weight: u32) -> Option<String> {
    let router = ctx.upstream.router();
    // A batched embedding call carries up to `batch.max_items` requests.
    let per_call = match kind {
        Kind::Chat => 1,
        Kind::Embedding => ctx.config.batch.max_items.max(1),
    };
    let pressure = Pressure {
        weight,
        limit: router.limit().saturating_mul(per_call),
        waiting: router.waiting() > 0 || ctx.upstream.shares().waiting(tenant),
    };
    let queue = ctx.config.topology.work_queue(kind);
    let depth = |lane| ctx.health.lane_depth(&topology::lane_queue(queue, lane));
    let lane = ctx.lanes.route(kind, tenant, pressure, depth)?;
    Some(topology::lane_queue(queue, lane))
}

/// Moves a request to `lane` as it is (every property and header, its `user_id` too),
/// confirmed, then acks it; hands it back if the broker would not confirm.
async fn move_to_lane(ctx: &Context, publisher: &Publisher, delivery: &Delivery, lane: &str) {
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    let moved =
        with_retries(|| publisher.republish(delivery, "", lane, headers.clone(), None)).await;
    if moved.is_ok() {
        ctx.metrics.lane_moves.inc();
        // An embeddings lane is consumed while it is busy: this replica's slots take it up
        // now rather than at its next read.
        ctx.health.lane_moved_into(lane);
    }
    ack_if_confirmed(delivery, moved, &ctx.stop).await;
}

async fn settle(
    ctx: &Context,
    publisher: &Publisher,
    origin: Origin,
    delivery: &Delivery,
    identity: Identity,
) {
    let (mut settling, span) = arrive(ctx, publisher, origin, delivery, &identity);
    // `watch` fired already for a cancel this replica heard; only then is Redis spared.
    settling.tombstoned = settling.job.is_some()
        && !settling.watch.is_cancelled()
        && ctx
            .cancels
            .tombstoned(&identity, &settling.route.request_id)
            .await;
    settling.run().instrument(span).await;
}

/// A delivery as it arrives: parsed, its counts read, watched for a cancel (not yet
/// checked for a tombstone), and the span its settling runs in.
///
/// Not async: what it works with on the way (the parse, the headers read, the pieces the
/// state is made of) stays on its stack, not in every delivery's task while it waits.
fn arrive<'a>(
    ctx: &'a Context,
    publisher: &'a Publisher,
    origin: Origin,
    delivery: &'a Delivery,
    identity: &Identity,
) -> (Settling<'a>, tracing::Span) {
    let kind = origin.kind;
    let started = Instant::now();
    ctx.metrics.received(kind.as_str());
    let rules = &ctx.rules;
    let parsed = std::panic::catch_unwind(|| {
        request::parse(&delivery.data, &delivery.properties, kind, rules)
    })
    .unwrap_or_else(|_| {
        Err(InvalidRequest {
            kind: ErrorKind::InternalError,
            message: "the worker panicked while parsing this message".into(),
        })
    });
    let request_id = match &parsed {
        Ok(job) => job.request_id.clone(),
        Err(_) => request::request_id_of_invalid(&delivery.data, &delivery.properties),
    };
    let retry = RetryState::read(&delivery.properties);
    let span = info_span!(
        "job",
        %request_id,
        %identity,
        kind = kind.as_str(),
        priority = delivery.properties.priority().unwrap_or(0),
        attempt = retry.attempts + 1,
        delivery_tag = delivery.delivery_tag,
    );
    let key = identity.scope(&request_id);
    let route = route_of(delivery, &request_id, identity, &ctx.rules.reply_to);
    // Without a reply_to there is nowhere to stream to: only the result goes out.
    let streams = route.reply_to.is_some() && parsed.as_ref().is_ok_and(|job| job.stream);
    // Watched while it is settled here; a cancel heard before it was reached (here, or
    // with the Redis store anywhere) is a tombstone.
    let watch = ctx.cancels.watch(&key);
    let tally = Tally::arrive(&retry, streams, delivery.redelivered, unix_now_ms());
    // Only a store compares fingerprints: without one, no hash on the hot path.
    let fingerprint = match (&ctx.store, &parsed) {
        (idempotency::Store::Off, _) | (_, Err(_)) => String::new(),
        (_, Ok(job)) => fingerprint(job),
    };
    let (job, invalid) = match parsed {
        Ok(job) => (Some(job), None),
        Err(invalid) => (None, Some(invalid)),
    };
    let settling = Settling {
        ctx,
        publisher,
        delivery,
        kind,
        origin,
        key,
        fingerprint,
        tenant: identity.as_str().to_string(),
        watch,
        tombstoned: false,
        route,
        streams,
        not_before_ms: retry.not_before_ms,
        started,
        progress: stream::Progress::default(),
        prior: tally.attempts,
        tally,
        job,
        invalid,
        claimed: false,
        claim: Claim::NotAsked,
        budget: unasked(ctx),
        hold: None,
        produced: None,
        body: None,
        sent: None,
        stopping: false,
        calls: 0,
    };
    (settling, span)
}

/// The budget as it stands before a call: asked for again before each one.
fn unasked(ctx: &Context) -> Budget {
    if ctx.ledger.has_budgets() {
        Budget::NotAsked
    } else {
        Budget::Unlimited
    }
}

/// One delivery being settled, and what the steps so far have produced.
struct Settling<'a> {
    ctx: &'a Context,
    publisher: &'a Publisher,
    delivery: &'a Delivery,
    kind: Kind,
    /// The queue it came from (a work queue or one of its lanes): where it is handed back.
    origin: Origin,
    /// The request id scoped by the sender's identity: the idempotency store's key.
    key: String,
    /// The request's fingerprint, compared by the idempotency store (empty without one).
    fingerprint: String,
    /// Who the request belongs to (its identity).
    tenant: String,
    /// Fires when the caller cancels the request.
    watch: Watch,
    /// The caller cancelled it before it was reached.
    tombstoned: bool,
    route: ReplyRoute,
    /// Deltas of the answer go to `reply_to` as it is generated.
    streams: bool,
    /// The message's not-before time, from its header.
    not_before_ms: Option<i64>,
    /// When it was received.
    started: Instant,
    /// What the running attempt has streamed.
    progress: stream::Progress,
    /// Attempts made before this delivery.
    prior: u32,
    /// Its counts, as they stand.
    tally: Tally,
    /// The request, when it parsed.
    job: Option<Job>,
    /// Why it can never be served, when it did not.
    invalid: Option<InvalidRequest>,
    /// This worker holds the request's lease in the idempotency store.
    claimed: bool,
    /// The idempotency store's answer.
    claim: Claim,
    /// Whether its tenant may spend on the next call.
    budget: Budget,
    /// What the next call holds of its tenant's budget, until it is settled.
    hold: Option<Hold>,
    /// What the last attempt produced, since the last inline wait.
    produced: Option<Outcome>,
    /// The result to publish: the answer serialized, or the one stored before.
    body: Option<Vec<u8>>,
    /// The last publish made to settle it, and what the broker said.
    sent: Option<Sent>,
    /// The worker is shutting down: start nothing new.
    stopping: bool,
    /// Calls started in this delivery: every one after the first renews the lease.
    calls: u32,
}

impl Settling<'_> {
    /// What the decision sees, made in this one place from what the steps produced.
    fn input(&self) -> Input<'_> {
        let ctx = self.ctx;
        Input {
            invalid: self.invalid.as_ref(),
            redelivered: self.delivery.redelivered,
            streams: self.streams,
            streamed_here: self.tally.streamed_here,
            redeliveries: self.tally.redeliveries,
            attempts: self.tally.attempts,
            not_before_ms: self.not_before_ms,
            now_ms: unix_now_ms(),
            claim: self.claim.clone(),
            produced: self.produced.as_ref(),
            result_bytes: self.body.as_ref().map(Vec::len),
            max_result_bytes: ctx.config.worker.max_result_bytes,
            sent: self.sent,
            rate_limited_since_ms: self.tally.rate_limited_since_ms,
            rate_limits: self.tally.rate_limits,
            unavailable_since_ms: self.tally.unavailable_since_ms,
            deadline_ms: self.job.as_ref().and_then(|j| j.deadline_ms),
            cancelled: self.tombstoned || self.watch.is_cancelled(),
            budget: &self.budget,
            stopping: self.stopping,
            policy: &ctx.policy,
            on_store_error: ctx.config.idempotency.on_store_error,
            jitter: fastrand::f64(),
        }
    }

    /// Asks for a decision, carries it out, and asks again until the delivery is settled.
    ///
    /// By reference: an async fn keeps what it takes by value twice in its state, as the
    /// argument and as the local it is moved to.
    async fn run(&mut self) {
        // Which model and deployment the attempts go to, carried from one to the next.
        let mut route = self.job.as_ref().map(|job| {
            let mut route = self.ctx.upstream.route(job);
            // Rate limits and outages met before count toward
            // `routing.fallback_after_secs` too.
            let (limited, down) = (
                self.tally.rate_limited_since_ms,
                self.tally.unavailable_since_ms,
            );
            route.unavailable_since = limited.into_iter().chain(down).min();
            route
        });
        loop {
            let decision = decide(&self.input());
            if self.carry_out(decision, route.as_mut()).await.is_break() {
                return;
            }
        }
    }
}

/// Where the delivery's result goes. A `reply_to` the policy refuses is dropped, so that
/// nothing is ever published to it (the request is dead-lettered for it by `parse`, and its
/// error result goes only to the results exchange).
fn route_of(
    delivery: &Delivery,
    request_id: &str,
    identity: &Identity,
    reply_to: &ReplyToPolicy,
) -> ReplyRoute {
    let p = &delivery.properties;
    ReplyRoute {
        request_id: request_id.to_string(),
        correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
        reply_to: p
            .reply_to()
            .as_ref()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty() && reply_to.allows(s, identity.as_str())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `handle` returns, without making one.
    fn size_of_handle<'a, F, Fut>(_: F) -> usize
    where
        F: FnOnce(&'a Context, &'a Publisher, Origin, &'a Delivery) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every delivery in flight holds this future (1,250 of them at a prefetch of 1,000):
    /// a large state added to it, or a future kept across an await that need not be, costs
    /// its size that many times. About 4.4 KiB in a test build; past the bound, box the
    /// rare branch that grew, or find what is kept twice.
    #[test]
    fn a_delivery_in_flight_stays_small() {
        let size = size_of_handle(handle);
        assert!(size <= 4864, "a delivery's future takes {size} bytes");
    }
}
