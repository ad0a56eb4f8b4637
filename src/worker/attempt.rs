//! One upstream attempt as a delivery's task runs it: the call (streamed to `reply_to` when
//! asked), raced against the request's deadline, its caller's cancel and the shutdown
//! deadline, with the idempotency lease kept while it waits; an answer is put on its
//! tenant's account. What the attempt means for the request is [`super::decide`]'s.

use std::{
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use futures_util::FutureExt;
use tracing::info;

use super::{
    Context,
    cancel::Watch,
    decide::Attempted,
    stream::{self, Progress},
};
use crate::{
    broker::publish::{Publisher, ReplyRoute},
    contract::{ErrorKind, Usage, request::Job},
    runtime::clock::{unix_now, unix_now_ms},
    upstream::{
        call::{Attempt as UpstreamAttempt, Outcome},
        failure::{Class, Failure},
        routing::router::Route,
    },
};

/// One attempt of one request, and what it needs of its delivery.
pub(super) struct Attempt<'a> {
    pub ctx: &'a Context,
    /// The delivery's publishing channel, for the deltas.
    pub publisher: &'a Publisher,
    /// Where deltas go.
    pub reply: &'a ReplyRoute,
    pub job: &'a Job,
    /// Who pays for it.
    pub tenant: &'a str,
    /// The idempotency store's key of the request.
    pub key: &'a str,
    /// The attempt's number (`attempts` once it is made).
    pub number: u32,
    /// When the delivery was received: its wait for a slot is bounded from there.
    pub started: Instant,
    /// Deltas go to `reply_to` as the answer is generated.
    pub streams: bool,
    /// A restart marker goes first.
    pub restart: bool,
    /// This worker holds the request's lease: keep it while the attempt waits.
    pub claimed: bool,
    /// What the attempt streamed, read after it even when it was dropped midway.
    pub progress: &'a Progress,
    /// Fires when the caller cancels the request.
    pub watch: &'a Watch,
}

impl Attempt<'_> {
    /// Runs the attempt. A cancel drops the call where it is (its HTTP call, its wait for a
    /// slot or a batch), which gives back its permit and token estimate.
    ///
    /// An answer is put on its tenant's account after the race: a cancel that comes while
    /// the ledger is written (to Redis) must not drop an answer already made and paid for.
    pub async fn run(&self, route: &mut Route) -> Attempted {
        let watch = self.watch;
        let attempted = tokio::select! {
            attempted = self.call(route) => attempted,
            () = watch.cancelled() => {
                info!("cancelled by its caller mid-call");
                Attempted::Cancelled
            }
        };
        match attempted {
            Attempted::Produced(mut outcome) => {
                self.account(&mut outcome).await;
                Attempted::Produced(outcome)
            }
            other => other,
        }
    }

    /// The call, streamed or not, cut off at the request's deadline or the shutdown
    /// deadline; a panic in it is an internal error of this request.
    async fn call(&self, route: &mut Route) -> Attempted {
        let ctx = self.ctx;
        let number = self.number;
        let call = AssertUnwindSafe(self.upstream(route));
        let mut call = std::pin::pin!(call.catch_unwind());
        // A call still running at the request's deadline is cut off there (dropping it
        // gives back its slot and its token estimate).
        let deadline = self.job.deadline_ms.map(|ms| {
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
        let outcome = loop {
            tokio::select! {
                () = &mut past_deadline => {
                    info!(attempt = number, "the request's deadline passed mid-call; cut off");
                    return Attempted::PastDeadline;
                }
                outcome = &mut call => break match outcome {
                    Ok(outcome) => outcome,
                    Err(_) => Some(Outcome::Failed(Failure::llmq(
                        Class::Ended(ErrorKind::InternalError),
                        "the worker panicked while processing this request",
                    ))),
                },
                // The wait for a slot or a budget can outlast the lease (up to half the
                // consumer timeout): keep it. Boxed: it is rare, and inline every call in
                // flight would carry its state.
                _ = tokio::time::sleep(ctx.lease_renewal), if self.claimed => {
                    Box::pin(ctx.store.renew(self.key, ctx.worker())).await;
                }
                _ = ctx.abort.cancelled() => {
                    info!(attempt = number, "shutdown deadline reached mid-call; handing the request back");
                    return Attempted::Shutdown;
                }
            }
        };
        match outcome {
            Some(outcome) => Attempted::Produced(outcome),
            // Shutdown came first, while it waited for a slot.
            None => Attempted::Shutdown,
        }
    }

    /// The upstream call; a streamed one sends its deltas to `reply_to` as they come, all
    /// of them confirmed before it returns.
    async fn upstream(&self, route: &mut Route) -> Option<Outcome> {
        let ctx = self.ctx;
        let upstream = &ctx.upstream;
        let (job, tenant, number) = (self.job, self.tenant, self.number);
        let request = UpstreamAttempt {
            job,
            tenant,
            number,
            started: self.started,
            stop: &ctx.stop,
        };
        if !self.streams {
            return upstream.attempt(request, route, None).await;
        }
        let (deltas, pieces) = tokio::sync::mpsc::unbounded_channel();
        let out = stream::Out {
            publisher: self.publisher,
            route: self.reply,
            attempt: number,
            flush: ctx.config.stream.flush(),
            indexed: job.choices() > 1,
            metrics: &ctx.metrics,
        };
        let call = async move {
            // Dropping the sender at the end of the call ends the forwarding.
            let deltas = deltas;
            upstream.attempt(request, route, Some(&deltas)).await
        };
        let forward = stream::forward(out, pieces, self.restart, self.progress);
        // Boxed: side by side inline, the streamed call and its forwarding would make every
        // delivery's task (streamed or not) about 3 KiB larger.
        Box::pin(futures_util::future::join(call, forward)).await.0
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
        result.tenant = Some(self.tenant.to_string());
        result.cost_usd = cost.map(crate::config::Usd::dollars);
        let cost = cost.unwrap_or_default();
        ctx.ledger
            .record(self.tenant, cost, tokens, unix_now())
            .await;
        ctx.metrics
            .tenant_answered(ctx.tenants.label(self.tenant), tokens, cost.dollars());
    }
}
