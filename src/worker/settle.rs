//! Settling one delivery: parse it, then ask [`decide`] what to do and carry that out
//! until the delivery is published somewhere (confirmed) and acked, or handed back.
//!
//! This is the imperative shell around the pure decision: it talks to the idempotency
//! store, the upstream and the broker, and feeds what each step produced back into the
//! decision's [`Input`].

use std::{
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{
    Context,
    decide::{Claim, Decision, Destination, Input, Republish, decide},
    lanes::{Origin, Pressure},
};
use crate::{
    broker::{
        publish::{PublishError, Publisher, Reply, ReplyRoute, with_retries},
        topology,
    },
    contract::{
        ErrorKind, Identity, Usage,
        fingerprint::fingerprint,
        headers::{Failure, RetryState},
        reply_to::ReplyToPolicy,
        request::{self, InvalidRequest, Job, Kind},
        response::JobResult,
    },
    runtime::clock::{unix_now, unix_now_ms},
    store::idempotency,
    upstream::{call::Outcome, router::Route},
    worker::{cancel::Watch, stream},
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
        // A redelivered request is settled where it is: its redelivery is counted (and a
        // stream it may have begun marked) there, and a request a lane refuses does not
        // come back to be moved again and again.
        if origin.lane.is_none()
            && !delivery.redelivered
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
        Box::pin(dead_letter_after_panic(publisher, delivery, ctx)).await;
    }
}

/// The lane a request of `tenant` from the `kind` work queue moves to, if any.
fn lane_for(ctx: &Context, kind: Kind, tenant: &str, weight: u32) -> Option<String> {
    let topo = &ctx.config.topology;
    // Embeddings are not moved: a batched call carries many requests, so a lane would need
    // as many in hand to keep its tenant's calls full, beyond `batch.max_buffered_bytes`.
    // Their fair share is admission by weight over what the replica holds.
    if topo.lanes == 0 || kind == Kind::Embedding {
        return None;
    }
    let queue = match kind {
        Kind::Chat => &topo.processing_queue,
        Kind::Embedding => &topo.embeddings_queue,
    };
    let router = ctx.upstream.router();
    let per_call = match kind {
        Kind::Chat => 1,
        Kind::Embedding => ctx.config.batch.max_items.max(1),
    };
    let pressure = Pressure {
        weight,
        limit: router.limit().saturating_mul(per_call),
        waiting: router.waiting() > 0 || ctx.upstream.shares().waiting(tenant),
    };
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
    let prior = retry.attempts;
    let span = info_span!(
        "job",
        %request_id,
        %identity,
        kind = kind.as_str(),
        priority = delivery.properties.priority().unwrap_or(0),
        attempt = prior + 1,
        delivery_tag = delivery.delivery_tag,
    );
    let key = identity.scope(&request_id);
    let route = route_of(delivery, &request_id, &ctx.rules.reply_to);
    // Without a reply_to there is nowhere to stream to: only the result goes out.
    let streams = route.reply_to.is_some() && parsed.as_ref().is_ok_and(|job| job.stream);
    // Watched while it is settled here; a cancel heard before it was reached (here, or
    // with the Redis store anywhere) is a tombstone.
    let watch = ctx.cancels.watch(&key);
    // `watch` fired already for a cancel this replica heard; only then is Redis spared.
    let tombstoned = parsed.is_ok() && !watch.is_cancelled() && ctx.cancels.tombstoned(&key).await;
    let settling = Settling {
        ctx,
        publisher,
        delivery,
        kind,
        origin,
        key,
        tenant: identity.as_str().to_string(),
        over_budget: None,
        watch,
        tombstoned,
        route,
        streams,
        // A delivery its worker never settled may have streamed under its attempt.
        restart: retry.streamed || (streams && delivery.redelivered),
        progress: stream::Progress::default(),
        streamed_here: false,
        attempts: prior,
        redeliveries: retry.redeliveries,
        first_failure: retry.first_failure,
        // The header comes from the publisher: a time in the future is not one llmq set.
        rate_limited_since_ms: retry
            .rate_limited_since_ms
            .filter(|since| *since <= unix_now_ms()),
        rate_limits: 0,
        claimed: false,
    };
    settling
        .run(parsed, retry.not_before_ms, started)
        .instrument(span)
        .await;
}

/// One delivery being settled, and what the steps so far have changed.
struct Settling<'a> {
    ctx: &'a Context,
    publisher: &'a Publisher,
    delivery: &'a Delivery,
    kind: Kind,
    /// The queue it came from (a work queue or one of its lanes): where it is handed back.
    origin: Origin,
    /// The request id scoped by the sender's identity: the idempotency store's key.
    key: String,
    /// Who the request belongs to (its identity).
    tenant: String,
    /// Why its tenant may not be called now, asked before each call.
    over_budget: Option<String>,
    /// Fires when the caller cancels the request.
    watch: Watch,
    /// The caller cancelled it before it was reached.
    tombstoned: bool,
    route: ReplyRoute,
    /// Deltas of the answer go to `reply_to` as it is generated.
    streams: bool,
    /// An earlier attempt may have sent deltas that no restart marker has cleared since:
    /// the next attempt sends one first. Travels in [`RetryState::streamed`].
    restart: bool,
    /// What the running attempt has streamed.
    progress: stream::Progress,
    /// An attempt of this delivery sent deltas.
    streamed_here: bool,
    /// Upstream attempts made for this request, counting earlier deliveries.
    attempts: u32,
    /// Unsettled redeliveries counted before this delivery.
    redeliveries: u32,
    /// Unix seconds of the first transient failure.
    first_failure: Option<i64>,
    /// Unix ms of the first rate limit the request met, here or before.
    rate_limited_since_ms: Option<i64>,
    /// Rate limits met in this delivery.
    rate_limits: u32,
    /// This worker holds the request's lease in the idempotency store.
    claimed: bool,
}

impl Settling<'_> {
    /// Asks for a decision, carries it out, and asks again until one is final.
    async fn run(
        mut self,
        parsed: Result<Job, InvalidRequest>,
        not_before_ms: Option<i64>,
        started: Instant,
    ) {
        let ctx = self.ctx;
        let (job, invalid) = match parsed {
            Ok(job) => (Some(job), None),
            Err(invalid) => (None, Some(invalid)),
        };
        let prior = self.attempts;
        // Only a store compares fingerprints: without one, no hash on the hot path.
        let fingerprint = match (&ctx.store, &job) {
            (idempotency::Store::Off, _) | (_, None) => String::new(),
            (_, Some(job)) => fingerprint(job),
        };
        let mut claim = Claim::NotAsked;
        // The result to publish: the answer serialized, or the one stored before.
        let mut body: Option<Vec<u8>> = None;
        let mut produced: Option<Outcome> = None;
        let mut stopping = false;
        let mut results_refused = false;
        // Which model and deployment the attempts go to, carried from one to the next.
        let mut route = job.as_ref().map(|job| {
            let mut route = ctx.upstream.route(job);
            // Rate limits met before count toward `routing.fallback_after_secs` too.
            route.unavailable_since = self.rate_limited_since_ms;
            route
        });
        // Calls started in this delivery: every one after the first renews the lease.
        let mut calls = 0u32;
        // The tenant's budget was asked about for the next call.
        let mut budget_asked = false;
        loop {
            let decision = decide(&Input {
                invalid: invalid.as_ref(),
                redelivered: self.delivery.redelivered,
                streams: self.streams,
                streamed_here: self.streamed_here,
                redeliveries: self.redeliveries,
                attempts: self.attempts,
                not_before_ms,
                now_ms: unix_now_ms(),
                claim: claim.clone(),
                produced: produced.as_ref(),
                result_bytes: body.as_ref().map(Vec::len),
                max_result_bytes: ctx.config.worker.max_result_bytes,
                results_refused,
                rate_limited_since_ms: self.rate_limited_since_ms,
                rate_limits: self.rate_limits,
                deadline_ms: job.as_ref().and_then(|j| j.deadline_ms),
                cancelled: self.tombstoned || self.watch.is_cancelled(),
                over_budget: self.over_budget.as_deref(),
                stopping,
                policy: &ctx.policy,
                on_store_error: ctx.config.idempotency.on_store_error,
                jitter: fastrand::f64(),
            });
            let (Some(job), Some(route)) = (job.as_ref(), route.as_mut()) else {
                return Box::pin(self.finish(decision, None, produced.as_ref())).await;
            };
            match decision {
                Decision::Claim => {
                    claim = self.claim(&fingerprint, &mut body).await;
                }
                // Without budgets there is nothing to ask: no second decision per call.
                Decision::Call if !budget_asked && ctx.ledger.has_budgets() => {
                    // Asked before each call: spend made meanwhile (by this request's own
                    // earlier attempt, or the fleet's) counts.
                    budget_asked = true;
                    let limits = ctx.tenants.limits(&self.tenant);
                    self.over_budget = ctx
                        .ledger
                        .over_budget(&self.tenant, limits, unix_now())
                        .await;
                }
                Decision::Call => {
                    budget_asked = false;
                    // A later call of this delivery (a retry, or after a rate limit, which
                    // counts no attempt) may come long after the lease was taken.
                    if calls > 0 || self.attempts > prior {
                        ctx.store.renew(&self.key, ctx.worker()).await;
                    }
                    calls += 1;
                    // A cancel drops the call where it is (its HTTP call, its wait for a
                    // slot or a batch), which gives back its permit and token estimate.
                    let attempted = tokio::select! {
                        attempted = self.attempt(job, route, started) => Some(attempted),
                        () = self.watch.cancelled() => None,
                    };
                    let streamed = self.streamed();
                    match attempted {
                        Some(Some(mut outcome)) => {
                            self.account(&mut outcome).await;
                            body = self.record(&outcome);
                            produced = Some(outcome);
                        }
                        Some(None) => {
                            // A stream cut off by the shutdown deadline was paid for, and
                            // its deltas went out under this attempt's number.
                            if streamed {
                                self.attempts += 1;
                            }
                            stopping = true;
                        }
                        None => info!("cancelled by its caller mid-call"),
                    }
                }
                Decision::Publish | Decision::PublishStored => {
                    let Some(result) = body.as_deref() else {
                        // decide publishes only once there is a result.
                        return self.hand_back().await;
                    };
                    let answered = match (&decision, &produced) {
                        (Decision::Publish, Some(Outcome::Done(result))) => Some(&**result),
                        _ => None,
                    };
                    match Box::pin(self.publish(&fingerprint, result, answered)).await {
                        Ok(()) => return ack(self.delivery).await,
                        Err(e) if e.refused() => {
                            warn!(error = %e, "the results queue refused the result; the request waits in a retry queue");
                            results_refused = true;
                        }
                        Err(e) => {
                            error!(error = %e, "the result could not be confirmed by the broker; handing the request back");
                            self.release().await;
                            return nack_after_a_pause(self.delivery, &ctx.stop).await;
                        }
                    }
                }
                Decision::RetryInline { after } => {
                    let reason = failure_reason(produced.as_ref());
                    if matches!(produced, Some(Outcome::RateLimited { .. })) {
                        debug!(delay_ms = millis(after), reason = %reason, "rate limited; trying again");
                    } else {
                        ctx.metrics.retried(self.kind.as_str());
                        warn!(attempt = self.attempts, delay_ms = millis(after), error = %reason, "transient failure; retrying");
                    }
                    produced = None;
                    tokio::select! {
                        _ = tokio::time::sleep(after) => {}
                        () = self.watch.cancelled() => {}
                        _ = ctx.stop.cancelled() => {
                            info!(attempt = self.attempts, "shutting down during a retry wait; handing the request back");
                            stopping = true;
                        }
                    }
                }
                // Boxed: publishing is the largest state of a delivery's task, and every
                // delivery in flight would carry its size while it waits for the upstream.
                terminal => {
                    return Box::pin(self.finish(terminal, Some(job), produced.as_ref())).await;
                }
            }
        }
    }

    /// Counts what an attempt produced; an answer comes back serialized, the result to
    /// publish.
    fn record(&mut self, outcome: &Outcome) -> Option<Vec<u8>> {
        if outcome.called_upstream() {
            self.attempts += 1;
        }
        match outcome {
            Outcome::Retry { .. } => {
                self.first_failure.get_or_insert_with(unix_now);
                None
            }
            Outcome::RateLimited { .. } => {
                self.rate_limits = self.rate_limits.saturating_add(1);
                self.rate_limited_since_ms.get_or_insert_with(unix_now_ms);
                None
            }
            Outcome::Done(result) => Some(result.to_bytes()),
            Outcome::Failed { .. } | Outcome::Deferred { .. } => None,
        }
    }

    /// Puts an answer on its tenant's account: the result names the tenant and its cost
    /// (when the model has a price), and the ledger and the metrics count it.
    async fn account(&self, outcome: &mut Outcome) {
        let Outcome::Done(result) = outcome else {
            return;
        };
        let ctx = self.ctx;
        let usage = result.usage.as_ref();
        let cost = match (&result.model, usage) {
            (Some(model), Some(usage)) => ctx.prices.cost(model, usage),
            _ => None,
        };
        let tokens = usage.and_then(Usage::total).unwrap_or(0);
        result.tenant = Some(self.tenant.clone());
        result.cost_usd = cost.map(crate::config::Usd::dollars);
        let cost = cost.unwrap_or_default();
        ctx.ledger
            .record(&self.tenant, cost, tokens, unix_now())
            .await;
        ctx.metrics
            .tenant_answered(ctx.tenants.label(&self.tenant), tokens, cost.dollars());
    }

    /// Asks the idempotency store for the request's lease.
    async fn claim(&mut self, fingerprint: &str, stored: &mut Option<Vec<u8>>) -> Claim {
        let ctx = self.ctx;
        match ctx.store.claim(&self.key, ctx.worker(), fingerprint).await {
            Ok(idempotency::Claim::Acquired) => {
                self.claimed = true;
                Claim::Acquired
            }
            Ok(idempotency::Claim::Done(body)) => {
                info!("duplicate of a finished request; re-publishing the stored result");
                *stored = Some(body);
                Claim::Finished
            }
            Ok(idempotency::Claim::Conflict) => Claim::Conflict,
            Ok(idempotency::Claim::Busy) => {
                debug!("another worker is processing this request; checking back later");
                Claim::Busy
            }
            Err(e) => {
                warn!(error = %e, on_store_error = ?ctx.config.idempotency.on_store_error, "idempotency store unreachable");
                Claim::Unavailable(e.to_string())
            }
        }
    }

    /// Whether the attempt just made sent deltas, and what the next one must do about it:
    /// a restart marker clears what came before; deltas sent call for a marker next time.
    fn streamed(&mut self) -> bool {
        let progress = std::mem::take(&mut self.progress);
        let (marked, delta) = (progress.marked.into_inner(), progress.delta.into_inner());
        if marked {
            self.restart = false;
        }
        if delta {
            self.restart = true;
            self.streamed_here = true;
        }
        delta
    }

    /// The next upstream attempt, or `None` when shutdown came first (while it waited for a
    /// slot, or past the deadline mid-call). A streamed one sends its deltas to `reply_to`
    /// as they come, all of them confirmed before it returns.
    async fn attempt(&self, job: &Job, route: &mut Route, started: Instant) -> Option<Outcome> {
        let ctx = self.ctx;
        let attempt = self.attempts + 1;
        let upstream = &ctx.upstream;
        let call = async move {
            if !self.streams {
                return upstream
                    .attempt(job, &self.tenant, route, attempt, started, &ctx.stop, None)
                    .await;
            }
            let (deltas, pieces) = tokio::sync::mpsc::unbounded_channel();
            let out = stream::Out {
                publisher: self.publisher,
                route: &self.route,
                attempt,
                flush: ctx.config.stream.flush(),
                indexed: job.choices() > 1,
                metrics: &ctx.metrics,
            };
            let call = async move {
                // Dropping the sender at the end of the call ends the forwarding.
                let deltas = deltas;
                upstream
                    .attempt(
                        job,
                        &self.tenant,
                        route,
                        attempt,
                        started,
                        &ctx.stop,
                        Some(&deltas),
                    )
                    .await
            };
            let forward = stream::forward(out, pieces, self.restart, &self.progress);
            // Boxed: a streamed call and its forwarding side by side would make every
            // delivery's task about 3 KiB larger, streamed or not.
            Box::pin(futures_util::future::join(call, forward)).await.0
        };
        let call = AssertUnwindSafe(call);
        let mut call = std::pin::pin!(call.catch_unwind());
        // A call still running at the request's deadline is cut off there (dropping it
        // gives back its slot and its token estimate).
        let deadline = job.deadline_ms.map(|ms| {
            let left = ms.saturating_sub(unix_now_ms()).max(0).unsigned_abs();
            tokio::time::Instant::now() + Duration::from_millis(left)
        });
        let past_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut past_deadline = std::pin::pin!(past_deadline);
        loop {
            tokio::select! {
                () = &mut past_deadline => {
                    info!(attempt, "the request's deadline passed mid-call; cut off");
                    return Some(Outcome::Failed {
                        kind: ErrorKind::Expired,
                        reason: "its deadline passed while the upstream call was running; the \
                                 call was cut off"
                            .into(),
                    });
                }
                outcome = &mut call => return match outcome {
                    Ok(outcome) => outcome,
                    Err(_) => Some(Outcome::Failed {
                        kind: ErrorKind::InternalError,
                        reason: "the worker panicked while processing this request".into(),
                    }),
                },
                // The wait for a slot or a budget can outlast the lease (up to half the
                // consumer timeout): keep it.
                _ = tokio::time::sleep(ctx.lease_renewal), if self.claimed => {
                    ctx.store.renew(&self.key, ctx.worker()).await;
                }
                _ = ctx.abort.cancelled() => {
                    info!(attempt, "shutdown deadline reached mid-call; handing the request back");
                    return None;
                }
            }
        }
    }

    /// Carries out a final decision.
    async fn finish(&self, decision: Decision, job: Option<&Job>, produced: Option<&Outcome>) {
        match decision {
            Decision::Republish(move_to) => {
                match (produced, move_to.to) {
                    (Some(Outcome::Retry { .. }), Destination::RetryTier { after }) => {
                        self.ctx.metrics.retried(self.kind.as_str());
                        warn!(attempt = self.attempts, delay_ms = millis(after), error = %move_to.reason, "transient failure; retrying through the retry queue");
                    }
                    (Some(Outcome::RateLimited { .. }), Destination::RetryTier { after }) => {
                        info!(delay_ms = millis(after), reason = %move_to.reason, "rate limited; waiting in the retry queue");
                    }
                    (_, Destination::Requeue) => {
                        self.ctx.metrics.redelivered.inc();
                        info!(
                            redeliveries = move_to.redeliveries,
                            "redelivered (an earlier delivery was never settled); counted and requeued"
                        );
                    }
                    _ => debug!(reason = %move_to.reason, "waiting in the retry queue"),
                }
                self.republish(&move_to).await
            }
            Decision::DeadLetter { kind, reason } => self.dead_letter(job, kind, &reason).await,
            Decision::HandBack => self.give_back().await,
            Decision::Cancelled => self.cancelled().await,
            // Not final, or carried out by `run` itself.
            Decision::Claim
            | Decision::Call
            | Decision::RetryInline { .. }
            | Decision::Publish
            | Decision::PublishStored => self.hand_back().await,
        }
    }

    /// Stores (when it is a new answer) and publishes a result; the caller acks once it is
    /// confirmed.
    async fn publish(
        &self,
        fingerprint: &str,
        body: &[u8],
        answered: Option<&JobResult>,
    ) -> Result<(), PublishError> {
        let ctx = self.ctx;
        if answered.is_some()
            && let Err(e) = ctx
                .store
                .save(&self.key, ctx.worker(), fingerprint, body)
                .await
        {
            warn!(error = %e, "could not store the result; a duplicate would call the upstream again");
        }
        let publish_started = Instant::now();
        let reply = self.publisher.result_body(&self.route, body).await?;
        self.replied(reply);
        ctx.metrics.published(publish_started.elapsed());
        if let Some(result) = answered {
            let tokens = result.usage.as_ref().and_then(Usage::total).unwrap_or(0);
            ctx.metrics.succeeded(self.kind.as_str(), tokens);
            debug!(
                attempts = self.attempts,
                latency_ms = result.latency_ms,
                "done"
            );
        }
        Ok(())
    }

    /// Logs and counts a reply the caller's `reply_to` refused.
    fn replied(&self, reply: Reply) {
        if let Reply::Refused(why) = reply {
            self.ctx.metrics.replies_refused.inc();
            warn!(
                reply_to = ?self.route.reply_to,
                error = %why,
                "the reply_to queue refused the result; it is on the results exchange only"
            );
        }
    }

    /// Moves the request to another queue (confirmed), then acks.
    async fn republish(&self, to: &Republish) {
        self.release().await;
        let topo = &self.ctx.config.topology;
        let state = RetryState {
            attempts: to.attempts,
            redeliveries: to.redeliveries,
            first_failure: self.first_failure,
            not_before_ms: None,
            rate_limited_since_ms: self.rate_limited_since_ms,
            streamed: self.restart,
        };
        let published = match to.to {
            Destination::RetryTier { after } => {
                let key = match self.kind {
                    Kind::Chat => &topo.processing_key,
                    Kind::Embedding => &topo.embeddings_key,
                };
                with_retries(|| {
                    self.publisher
                        .retry(self.delivery, key, after, state, &to.reason)
                })
                .await
            }
            Destination::Requeue => {
                let queue = self.origin.queue(topo);
                with_retries(|| self.publisher.requeue(self.delivery, &queue, state)).await
            }
        };
        ack_if_confirmed(self.delivery, published, &self.ctx.stop).await;
    }

    /// Dead-letters the delivery (confirmed), tells the caller, then acks.
    async fn dead_letter(&self, job: Option<&Job>, kind: ErrorKind, reason: &str) {
        let ctx = self.ctx;
        let failure = Failure {
            kind,
            reason,
            attempts: self.attempts,
            first_failure: self.first_failure.unwrap_or_else(unix_now),
            worker: ctx.worker(),
        };
        let published = with_retries(|| self.publisher.dead_letter(self.delivery, &failure)).await;
        // Error results are not stored: a replayed dead letter (`llmq dlq replay`) must be
        // processed again, not answered with its old error. And a request handed back because
        // its dead letter was not confirmed must not find its own lease in the way.
        self.release().await;
        if published.is_ok() {
            error!(error_kind = %kind, attempts = self.attempts, reason = %reason, "dead-lettered");
            ctx.metrics.dead_lettered(self.kind.as_str(), kind.as_str());
            // The caller hears of it too, so that an RPC caller never waits forever. The dead
            // letter is the durable record; this result is best effort.
            let mut result = JobResult::error(
                self.route.request_id.clone(),
                ctx.worker().to_string(),
                kind,
                crate::truncate(reason, 1024),
            );
            result.attempts = self.attempts;
            result.kind = Some(self.kind.as_str());
            result.tenant = Some(self.tenant.clone());
            result.metadata = job.and_then(|j| j.metadata.clone());
            match self
                .publisher
                .result_body(&self.route, &result.to_bytes())
                .await
            {
                Ok(reply) => self.replied(reply),
                Err(e) => {
                    warn!(error = %e, "the error result could not be published; the dead letter is kept")
                }
            }
        }
        ack_if_confirmed(self.delivery, published, &self.ctx.stop).await;
    }

    /// Answers `cancelled` (confirmed) and acks: the caller asked, so no dead letter.
    async fn cancelled(&self) {
        let ctx = self.ctx;
        self.release().await;
        let mut result = JobResult::cancelled(self.route.request_id.clone(), ctx.worker().into());
        result.attempts = self.attempts;
        result.tenant = Some(self.tenant.clone());
        result.kind = Some(self.kind.as_str());
        let published = match self
            .publisher
            .result_body(&self.route, &result.to_bytes())
            .await
        {
            Ok(reply) => {
                self.replied(reply);
                info!(
                    attempts = self.attempts,
                    "cancelled by its caller; answered cancelled"
                );
                ctx.metrics.cancelled.inc();
                Ok(())
            }
            // The caller asked for the cancel; a results queue that refuses the notice must
            // not make the request spin.
            Err(e) if e.refused() => {
                warn!(error = %e, "the results queue refused the cancelled notice; the request is dropped as asked");
                ctx.metrics.cancelled.inc();
                Ok(())
            }
            Err(e) => Err(e),
        };
        ack_if_confirmed(self.delivery, published, &ctx.stop).await;
    }

    /// Gives the delivery back at a graceful shutdown, with the attempts made in it, and
    /// the lease with it ([`give_back`]).
    async fn give_back(&self) {
        self.release().await;
        let state = RetryState {
            attempts: self.attempts,
            redeliveries: self.redeliveries,
            first_failure: self.first_failure,
            not_before_ms: None,
            rate_limited_since_ms: self.rate_limited_since_ms,
            streamed: self.restart,
        };
        give_back(self.ctx, self.publisher, self.origin, self.delivery, state).await;
    }

    /// Gives the delivery back to its queue, and the lease with it.
    async fn hand_back(&self) {
        self.release().await;
        nack(self.delivery).await;
    }

    async fn release(&self) {
        if self.claimed {
            let ctx = self.ctx;
            ctx.store.release(&self.key, ctx.worker()).await;
        }
    }
}

/// The reason of a transient failure, for logs.
fn failure_reason(produced: Option<&Outcome>) -> &str {
    match produced {
        Some(
            Outcome::Retry { reason, .. }
            | Outcome::Failed { reason, .. }
            | Outcome::RateLimited { reason, .. },
        ) => reason,
        _ => "",
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Gives a delivery back at a graceful shutdown: republished to the tail of the queue it came
/// from (its lane, for a request from a lane, so its tenant's order holds) with
/// `state` (confirmed), then acked. A nack would bring it back flagged `redelivered`, which
/// cannot be told from a crash, so every shutdown would count as a redelivery, and the
/// attempts made in this delivery would be forgotten. A delivery that arrived redelivered
/// and was never started keeps that redelivery in its count. Nacked when the republish
/// cannot be confirmed (past the shutdown deadline, on a blocked broker).
pub(super) async fn give_back(
    ctx: &Context,
    publisher: &Publisher,
    origin: Origin,
    delivery: &Delivery,
    state: RetryState,
) {
    let state = RetryState {
        redeliveries: state
            .redeliveries
            .saturating_add(u32::from(delivery.redelivered)),
        ..state
    };
    let queue = origin.queue(&ctx.config.topology);
    match publisher.requeue(delivery, &queue, state).await {
        Ok(()) => ack(delivery).await,
        Err(e) => {
            debug!(error = %e, "could not requeue at shutdown; handing the request back");
            nack(delivery).await;
        }
    }
}

/// After a panic anywhere in handling a delivery: dead-letter it (confirmed) and ack.
async fn dead_letter_after_panic(publisher: &Publisher, delivery: &Delivery, ctx: &Context) {
    error!(
        delivery_tag = delivery.delivery_tag,
        "the worker panicked while handling a message; dead-lettering it"
    );
    let failure = Failure {
        kind: ErrorKind::InternalError,
        reason: "the worker panicked while handling this message",
        attempts: RetryState::read(&delivery.properties).attempts,
        first_failure: unix_now(),
        worker: ctx.worker(),
    };
    let published = with_retries(|| publisher.dead_letter(delivery, &failure)).await;
    ack_if_confirmed(delivery, published, &ctx.stop).await;
}

/// How long a delivery whose outcome the broker would not confirm is held before it is
/// handed back: the broker redelivers it at once, and a queue that stays missing or
/// refusing must not turn that into a loop of one try a second.
const HAND_BACK_PAUSE: Duration = Duration::from_secs(5);

/// Acks a delivery whose outcome the broker confirmed; hands it back otherwise (after a
/// pause).
async fn ack_if_confirmed(
    delivery: &Delivery,
    published: Result<(), PublishError>,
    stop: &CancellationToken,
) {
    match published {
        Ok(()) => ack(delivery).await,
        Err(e) => {
            error!(error = %e, "the outcome could not be confirmed by the broker; handing the request back");
            nack_after_a_pause(delivery, stop).await;
        }
    }
}

/// Hands a delivery back after [`HAND_BACK_PAUSE`], or at once when the worker stops.
async fn nack_after_a_pause(delivery: &Delivery, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(HAND_BACK_PAUSE) => {}
        _ = stop.cancelled() => {}
    }
    nack(delivery).await;
}

async fn ack(delivery: &Delivery) {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => {
            warn!("ack not sent: the delivery's channel is gone; the broker redelivers the request")
        }
        Err(e) => warn!(error = %e, "ack failed; the broker redelivers the request"),
    }
}

/// Hands a delivery back to its queue (nack with requeue).
pub(super) async fn nack(delivery: &Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    match delivery.acker.nack(requeue).await {
        Ok(true) => {}
        Ok(false) => {
            debug!("nack not sent: the delivery's channel is gone; the broker requeues it")
        }
        Err(e) => {
            warn!(error = %e, "nack failed; the broker requeues the request when the channel closes")
        }
    }
}

/// Where the delivery's result goes. A `reply_to` the policy refuses is dropped, so that
/// nothing is ever published to it (the request is dead-lettered for it by `parse`, and its
/// error result goes only to the results exchange).
fn route_of(delivery: &Delivery, request_id: &str, reply_to: &ReplyToPolicy) -> ReplyRoute {
    let p = &delivery.properties;
    ReplyRoute {
        request_id: request_id.to_string(),
        correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
        reply_to: p
            .reply_to()
            .as_ref()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty() && reply_to.allows(s)),
    }
}
