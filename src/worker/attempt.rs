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
    config::Usd,
    contract::{ErrorKind, Usage, request::Job},
    runtime::clock::unix_now_ms,
    tenant::spend::Spent,
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
    /// What the call holds of its tenant's budget: what an answer without usage costs.
    pub held: Usd,
}

impl Attempt<'_> {
    /// Runs the attempt. A cancel drops the call where it is (its HTTP call, its wait for a
    /// slot or a batch), which gives back its permit and token estimate.
    ///
    /// What it cost its tenant is reckoned after the race: a cancel that comes then must
    /// not drop an answer already made and paid for. Tokens delivered are tokens charged
    /// ([`Self::spent`]).
    pub async fn run(&self, route: &mut Route) -> (Attempted, Spent) {
        let watch = self.watch;
        let mut attempted = tokio::select! {
            attempted = self.call(route) => attempted,
            () = watch.cancelled() => {
                info!("cancelled by its caller mid-call");
                Attempted::Cancelled
            }
        };
        let spent = self.spent(&mut attempted, route);
        (attempted, spent)
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

    /// What the attempt cost its tenant, for the ledger. An answer: its usage at its
    /// model's price, named in the result with the tenant; without usage, what it held (all
    /// it could have cost) and its token estimate. An attempt that streamed deltas and then
    /// ended without an answer (its deadline, a cancel, `llm.stream_max_secs`, a failure):
    /// its prompt and what it streamed, at 4 bytes a token, at the requested model's price.
    /// Anything else generated nothing that was delivered, and costs nothing.
    fn spent(&self, attempted: &mut Attempted, route: &Route) -> Spent {
        let ctx = self.ctx;
        if let Attempted::Produced(Outcome::Done(result)) = attempted {
            let usage = result.usage.as_ref();
            let cost = match (&result.model, usage) {
                (Some(model), Some(usage)) => ctx.prices.cost(model, usage),
                _ => None,
            };
            let tokens = usage.and_then(Usage::total);
            let priced = match (cost, tokens) {
                (Some(cost), _) => Some(cost),
                (None, None) if self.held != Usd::ZERO => Some(self.held),
                _ => None,
            };
            let tokens = tokens.unwrap_or_else(|| self.job.token_estimate(0));
            result.tenant = Some(self.tenant.to_string());
            result.cost_usd = priced.map(Usd::dollars);
            let cost = priced.unwrap_or(Usd::ZERO);
            ctx.metrics
                .tenant_answered(ctx.tenants.label(self.tenant), tokens, cost.dollars());
            return Spent {
                cost,
                tokens,
                answered: true,
            };
        }
        let streamed = self
            .progress
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        if streamed == 0 {
            return Spent::default();
        }
        let (prompt, completion) = (self.job.token_estimate(0), streamed.div_ceil(4));
        let mut cost = ctx
            .prices
            .at_most(&route.requested, prompt, completion)
            .unwrap_or(Usd::ZERO);
        if self.held != Usd::ZERO {
            // Never more than was held: the hold is the bound the budget was checked with.
            cost = cost.min(self.held);
        }
        Spent {
            cost,
            tokens: prompt.saturating_add(completion),
            answered: false,
        }
    }
}
