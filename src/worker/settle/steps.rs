//! The steps [`super::Settling::run`] carries out, each feeding what it produced back
//! into the delivery's state: asking the idempotency store and the ledger, an upstream
//! attempt ([`crate::worker::attempt`]), an inline wait, and the confirmed publishes that
//! end a delivery (its result, a move to another queue, a dead letter, a `cancelled`
//! notice, a give-back at shutdown).

use std::{
    ops::ControlFlow,
    time::{Duration, Instant},
};

use lapin::message::Delivery;
use tracing::{debug, error, info, warn};

use super::{Settling, unasked};
use crate::{
    broker::publish::{PublishError, Publisher, Reply, with_retries},
    config::Usd,
    contract::{
        ErrorKind, Usage,
        headers::{Failure, RetryState},
        response::JobResult,
    },
    runtime::clock::{unix_now, unix_now_ms},
    store::idempotency,
    tenant::spend::{Hold, Reserve, Spent},
    upstream::{call::Outcome, routing::router::Route},
    worker::{
        Context,
        ack::{ack, ack_if_confirmed, give_back, nack, nack_after_a_pause},
        attempt::Attempt,
        decide::{Budget, Claim, Confirm, Decision, Destination, Republish, Sending, Sent},
    },
};

impl Settling<'_> {
    /// Carries out one decision; `Break` once the delivery is acked or handed back.
    /// `route` is where its attempts go, `None` for a request that did not parse.
    pub(super) async fn carry_out(
        &mut self,
        decision: Decision,
        route: Option<&mut Route>,
    ) -> ControlFlow<()> {
        if decision != Decision::Call {
            // Held for a call that is not made after all (a cancel came meanwhile).
            self.release_hold().await;
        }
        match decision {
            Decision::Claim if self.job.is_some() => self.claim().await,
            Decision::AskBudget => self.ask_budget(route.as_deref()).await,
            Decision::Call => match route {
                Some(route) => self.call(route).await,
                None => {
                    self.hand_back().await;
                    return ControlFlow::Break(());
                }
            },
            Decision::Publish | Decision::PublishStored => {
                // Boxed: publishing is the largest state of a delivery's task, and every
                // delivery in flight would carry its size while it waits for the upstream.
                Box::pin(self.publish(decision == Decision::Publish)).await;
            }
            Decision::RetryInline { after } => self.wait(after).await,
            Decision::Republish(to) => Box::pin(self.republish(&to)).await,
            Decision::DeadLetter { kind, reason } => {
                Box::pin(self.dead_letter(kind, &reason)).await;
            }
            Decision::Cancelled => Box::pin(self.cancelled()).await,
            Decision::HandBack => {
                self.give_back().await;
                return ControlFlow::Break(());
            }
            Decision::Ack => {
                ack(self.delivery).await;
                return ControlFlow::Break(());
            }
            Decision::Nack => {
                self.release().await;
                nack_after_a_pause(self.delivery, &self.ctx.stop).await;
                return ControlFlow::Break(());
            }
            // Only a request that parsed is claimed.
            Decision::Claim => {
                self.hand_back().await;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// Asks the idempotency store for the request's lease.
    pub(super) async fn claim(&mut self) {
        let ctx = self.ctx;
        self.claim = match ctx
            .store
            .claim(&self.key, ctx.worker(), &self.fingerprint)
            .await
        {
            Ok(idempotency::Claim::Acquired) => {
                self.claimed = true;
                Claim::Acquired
            }
            Ok(idempotency::Claim::Done(body)) => {
                info!("duplicate of a finished request; re-publishing the stored result");
                self.body = Some(body);
                Claim::Finished
            }
            Ok(idempotency::Claim::Conflict) => Claim::Conflict,
            Ok(idempotency::Claim::Busy) => {
                debug!("another worker is processing this request; checking back later");
                Claim::Busy
            }
            Err(e) => {
                let down_for = ctx.store.down_for();
                warn!(error = %e, down_for_secs = down_for.as_secs(), on_store_error = ?ctx.config.idempotency.on_store_error, "idempotency store unreachable");
                Claim::Unavailable {
                    reason: e.to_string(),
                    down_for,
                }
            }
        };
    }

    /// Holds what the next call may cost against its tenant's budgets, if it has any: its
    /// prompt and output bounds at the highest price of the models its route may try. A
    /// request that sets no output bound is given one first (the lowest
    /// `max_output_tokens` of those models, else `llm.max_tokens_cap`), so that what is
    /// held is a true bound.
    pub(super) async fn ask_budget(&mut self, route: Option<&Route>) {
        let ctx = self.ctx;
        let limits = ctx.tenants.limits(&self.tenant);
        let budgeted = !(limits.max_usd_per_day.is_zero() && limits.max_usd_per_month.is_zero());
        let (Some(job), Some(route), true) = (self.job.as_mut(), route, budgeted) else {
            self.budget = Budget::Within;
            return;
        };
        let models = route.models();
        let most = lowest_max_output(ctx, route).unwrap_or(ctx.config.llm.max_tokens_cap);
        job.bound_output(most);
        let (input, output) = (job.input_bound(), job.output_bound().unwrap_or(most));
        let mut amount = Usd::ZERO;
        for model in models {
            match ctx.prices.at_most(model, input, output) {
                Some(at_most) => amount = amount.max(at_most),
                None => {
                    self.budget = Budget::Unpriced(format!(
                        "model {model:?} has no price ([prices.\"{model}\"]) and there is no \
                         [prices.default]: tenant {:?} has a budget, so only priced models \
                         may be called",
                        self.tenant
                    ));
                    return;
                }
            }
        }
        self.budget = match ctx
            .ledger
            .reserve(&self.tenant, limits, amount, unix_now())
            .await
        {
            Reserve::NoBudget => Budget::Within,
            Reserve::Held(hold) => {
                self.hold = Some(hold);
                Budget::Within
            }
            Reserve::Over(why) => Budget::Over(why),
        };
    }

    /// Gives back what was held for a call that was not made.
    async fn release_hold(&mut self) {
        if let Some(hold) = self.hold.take() {
            let ctx = self.ctx;
            ctx.ledger
                .settle(&self.tenant, Some(hold), Spent::default(), unix_now())
                .await;
        }
    }

    /// Makes the next upstream attempt and counts what it produced.
    pub(super) async fn call(&mut self, route: &mut Route) {
        let ctx = self.ctx;
        // A later call of this delivery (a retry, or after a rate limit, which counts no
        // attempt) may come long after the lease was taken.
        if self.calls > 0 || self.tally.attempts > self.prior {
            ctx.store.renew(&self.key, ctx.worker()).await;
        }
        self.calls += 1;
        // Never a bound above what the models it may go to generate.
        if let (Some(job), Some(most)) = (self.job.as_mut(), lowest_max_output(ctx, route))
            && job.output_bound().is_some()
        {
            job.bound_output(most);
        }
        let Some(job) = self.job.as_ref() else {
            return;
        };
        let hold = self.hold.take();
        let held = hold.as_ref().map_or(Usd::ZERO, Hold::amount);
        let (attempted, spent) = Attempt {
            ctx,
            publisher: self.publisher,
            reply: &self.route,
            job,
            tenant: &self.tenant,
            key: &self.key,
            number: self.tally.attempts + 1,
            started: self.started,
            streams: self.streams,
            restart: self.tally.restart,
            claimed: self.claimed,
            progress: &self.progress,
            watch: &self.watch,
            held,
        }
        .run(route)
        .await;
        if hold.is_some() || spent != Spent::default() {
            ctx.ledger
                .settle(&self.tenant, hold, spent, unix_now())
                .await;
        }
        let progress = std::mem::take(&mut self.progress);
        let streamed = self
            .tally
            .streamed(progress.marked.into_inner(), progress.delta.into_inner());
        let after = self.tally.attempted(attempted, streamed, unix_now_ms());
        self.body = match &after.produced {
            Some(Outcome::Done(result)) => Some(result.to_bytes()),
            _ => None,
        };
        self.produced = after.produced;
        self.stopping |= after.stopping;
        self.budget = unasked(ctx);
    }

    /// Waits before the next call; a cancel or the shutdown cuts the wait short.
    pub(super) async fn wait(&mut self, after: Duration) {
        let ctx = self.ctx;
        let reason = failure_reason(self.produced.as_ref());
        if matches!(self.produced, Some(Outcome::RateLimited(_))) {
            debug!(delay_ms = millis(after), reason = %reason, "rate limited; trying again");
        } else if matches!(self.produced, Some(Outcome::Unavailable(_))) {
            debug!(delay_ms = millis(after), reason = %reason, "no deployment can serve (an outage); trying again");
        } else {
            ctx.metrics.retried(self.kind.as_str());
            warn!(attempt = self.tally.attempts, delay_ms = millis(after), error = %reason, "transient failure; retrying");
        }
        self.produced = None;
        tokio::select! {
            _ = tokio::time::sleep(after) => {}
            () = self.watch.cancelled() => {}
            _ = ctx.stop.cancelled() => {
                info!(attempt = self.tally.attempts, "shutting down during a retry wait; handing the request back");
                self.stopping = true;
            }
        }
    }

    /// Stores (when it is a new answer) and publishes the result.
    pub(super) async fn publish(&mut self, fresh: bool) {
        let ctx = self.ctx;
        let Some(body) = self.body.as_deref() else {
            // decide publishes only once there is a result.
            self.sent = Some(sent(Sending::Result, Err(Confirm::Unconfirmed)));
            return;
        };
        let answered = match (fresh, &self.produced) {
            (true, Some(Outcome::Done(result))) => Some(&**result),
            _ => None,
        };
        if answered.is_some()
            && let Err(e) = ctx
                .store
                .save(&self.key, ctx.worker(), &self.fingerprint, body)
                .await
        {
            warn!(error = %e, "could not store the result; a duplicate would call the upstream again");
        }
        let publish_started = Instant::now();
        let confirm = match self.publisher.result_body(&self.route, body).await {
            Ok(reply) => {
                self.replied(reply);
                ctx.metrics.published(publish_started.elapsed());
                if let Some(result) = answered {
                    let tokens = result.usage.as_ref().and_then(Usage::total).unwrap_or(0);
                    ctx.metrics.succeeded(self.kind.as_str(), tokens);
                    debug!(
                        attempts = self.tally.attempts,
                        latency_ms = result.latency_ms,
                        "done"
                    );
                }
                Ok(())
            }
            Err(e) if e.refused() => {
                warn!(error = %e, "the results queue refused the result; the request waits in a retry queue");
                Err(Confirm::Refused)
            }
            Err(e) if e.channel_lost() => {
                warn!(error = %e, "the result could not be confirmed: the broker connection is lost; the request goes back to the queue");
                Err(Confirm::Unconfirmed)
            }
            Err(e) => {
                error!(error = %e, "the result could not be confirmed by the broker; handing the request back");
                Err(Confirm::Unconfirmed)
            }
        };
        self.sent = Some(sent(Sending::Result, confirm));
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

    /// Moves the request to another queue (confirmed).
    pub(super) async fn republish(&mut self, to: &Republish) {
        self.log_move(to);
        self.release().await;
        let topo = &self.ctx.config.topology;
        let state = self.tally.moved(to);
        let published = match to.to {
            Destination::RetryTier { after } => {
                let key = topo.work_key(self.kind);
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
        self.sent = Some(sent(Sending::Republish, unconfirmed(published)));
    }

    fn log_move(&self, to: &Republish) {
        match (&self.produced, to.to) {
            (Some(Outcome::Retry { .. }), Destination::RetryTier { after }) => {
                self.ctx.metrics.retried(self.kind.as_str());
                warn!(attempt = self.tally.attempts, delay_ms = millis(after), error = %to.reason, "transient failure; retrying through the retry queue");
            }
            (Some(Outcome::RateLimited(_)), Destination::RetryTier { after }) => {
                info!(delay_ms = millis(after), reason = %to.reason, "rate limited; waiting in the retry queue");
            }
            (Some(Outcome::Unavailable(_)), Destination::RetryTier { after }) => {
                info!(delay_ms = millis(after), reason = %to.reason, "no deployment can serve (an outage); waiting in the retry queue");
            }
            (_, Destination::Requeue) => {
                self.ctx.metrics.redelivered.inc();
                info!(
                    redeliveries = to.redeliveries,
                    "redelivered (an earlier delivery was never settled); counted and requeued"
                );
            }
            _ => debug!(reason = %to.reason, "waiting in the retry queue"),
        }
    }

    /// Dead-letters the delivery (confirmed), then tells the caller.
    pub(super) async fn dead_letter(&mut self, kind: ErrorKind, reason: &str) {
        let ctx = self.ctx;
        let failure = Failure {
            kind,
            reason,
            attempts: self.tally.attempts,
            first_failure: self.tally.first_failure.unwrap_or_else(unix_now),
            worker: ctx.worker(),
        };
        let published = with_retries(|| self.publisher.dead_letter(self.delivery, &failure)).await;
        // Error results are not stored: a replayed dead letter (`llmq dlq replay`) must be
        // processed again, not answered with its old error. And a request handed back because
        // its dead letter was not confirmed must not find its own lease in the way.
        self.release().await;
        if published.is_ok() {
            error!(error_kind = %kind, attempts = self.tally.attempts, reason = %reason, "dead-lettered");
            ctx.metrics.dead_lettered(self.kind.as_str(), kind.as_str());
            // The caller hears of it too, so that an RPC caller never waits forever. The dead
            // letter is the durable record; this result is best effort.
            let mut result = JobResult::error(
                self.route.request_id.clone(),
                ctx.worker().to_string(),
                kind,
                crate::truncate(reason, 1024),
            );
            result.attempts = self.tally.attempts;
            result.kind = Some(self.kind.as_str());
            result.tenant = Some(self.tenant.clone());
            result.metadata = self.job.as_ref().and_then(|j| j.metadata.clone());
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
        self.sent = Some(sent(Sending::DeadLetter, unconfirmed(published)));
    }

    /// Answers `cancelled` (confirmed): the caller asked, so no dead letter.
    pub(super) async fn cancelled(&mut self) {
        let ctx = self.ctx;
        self.release().await;
        let mut result = JobResult::cancelled(self.route.request_id.clone(), ctx.worker().into());
        result.attempts = self.tally.attempts;
        result.tenant = Some(self.tenant.clone());
        result.kind = Some(self.kind.as_str());
        let confirm = match self
            .publisher
            .result_body(&self.route, &result.to_bytes())
            .await
        {
            Ok(reply) => {
                self.replied(reply);
                info!(
                    attempts = self.tally.attempts,
                    "cancelled by its caller; answered cancelled"
                );
                ctx.metrics.cancelled.inc();
                Ok(())
            }
            Err(e) if e.refused() => {
                warn!(error = %e, "the results queue refused the cancelled notice; the request is dropped as asked");
                ctx.metrics.cancelled.inc();
                Err(Confirm::Refused)
            }
            Err(e) if e.channel_lost() => {
                warn!(error = %e, "the cancelled notice could not be confirmed: the broker connection is lost; the request goes back to the queue");
                Err(Confirm::Unconfirmed)
            }
            Err(e) => {
                error!(error = %e, "the cancelled notice could not be confirmed by the broker; handing the request back");
                Err(Confirm::Unconfirmed)
            }
        };
        self.sent = Some(sent(Sending::CancelNotice, confirm));
    }

    /// Gives the delivery back at a graceful shutdown, with the attempts made in it, and
    /// the lease with it ([`give_back`]).
    pub(super) async fn give_back(&mut self) {
        self.release().await;
        let state = self.tally.retry_state();
        give_back(self.ctx, self.publisher, self.origin, self.delivery, state).await;
    }

    /// Gives the delivery back to its queue, and the lease with it.
    pub(super) async fn hand_back(&mut self) {
        self.release().await;
        nack(self.delivery).await;
    }

    /// Gives up the request's lease, once.
    pub(super) async fn release(&mut self) {
        if std::mem::take(&mut self.claimed) {
            let ctx = self.ctx;
            ctx.store.release(&self.key, ctx.worker()).await;
        }
    }
}

/// A publish made, as [`decide`] hears of it.
fn sent(what: Sending, confirm: Result<(), Confirm>) -> Sent {
    Sent {
        what,
        confirm: confirm.err().unwrap_or(Confirm::Confirmed),
    }
}

/// A publish whose every failure counts as unconfirmed (a move or a dead letter: a refusal
/// there is handed back like any other failure).
fn unconfirmed(published: Result<(), PublishError>) -> Result<(), Confirm> {
    published.map_err(|e| {
        if e.channel_lost() {
            warn!(error = %e, "the outcome could not be confirmed: the broker connection is lost; the request goes back to the queue");
        } else {
            error!(error = %e, "the outcome could not be confirmed by the broker; handing the request back");
        }
        Confirm::Unconfirmed
    })
}

/// The reason of a transient failure, for logs.
fn failure_reason(produced: Option<&Outcome>) -> &str {
    produced
        .and_then(Outcome::failure)
        .map_or("", |failure| failure.reason())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// After a panic anywhere in handling a delivery: dead-letter it (confirmed) and ack.
pub(super) async fn dead_letter_after_panic(
    publisher: &Publisher,
    delivery: &Delivery,
    ctx: &Context,
) {
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

/// The lowest `max_output_tokens` of the models `route` may try, when any has one.
fn lowest_max_output(ctx: &Context, route: &Route) -> Option<u64> {
    route
        .models()
        .iter()
        .filter_map(|m| ctx.prices.of(m).and_then(|p| p.max_output_tokens))
        .min()
}
