//! One attempt for a job: [`Upstream::attempt`] makes the call through the router (or the
//! embedding batcher, which routes the same way) and turns the answer into an [`Outcome`].
//!
//! No broker here, so tests drive it against the mock upstream alone. What to do with an
//! outcome (publish, retry, dead-letter) is decided in [`crate::worker::decide`].

use std::{sync::Arc, time::Instant};

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, RequestPolicy},
    contract::{
        request::{Call, Job, Kind},
        response::JobResult,
    },
    runtime::metrics::Metrics,
    store::redis_conn::LazyConnection,
    upstream::{
        batch::Batcher,
        failure::{Failure, Retry},
        flow::ratelimit::{Budget, REDIS_TIMEOUT},
        flow::share::{NotEntered, Shares},
        flow::{
            admission::{Admission, Stop},
            limit::Flow,
        },
        http::{
            client::{ChatAnswer, EmbeddingAnswer},
            stream::Deltas,
        },
        routing::deployment::Deployment,
        routing::router::{Route, Routed, Router, Served},
        routing::standing::Standing,
    },
};

/// What became of one attempt. A failure is carried as it was classified where it
/// happened ([`Failure`]): its kind, labels and words are read from it, not derived again.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The upstream answered; this is the result.
    Done(Box<JobResult>),
    /// A transient failure: another attempt may succeed, not before its `retry_after` if
    /// the upstream said so; a throttle if the upstream pushed back (a timeout).
    Retry {
        /// What failed.
        failure: Failure,
        /// Another deployment can take the next attempt now: no backoff.
        elsewhere: bool,
    },
    /// A 429, or every deployment that can serve is unavailable, one of them cooling down
    /// after a 429: flow control, not an attempt. Bounded in time by
    /// `retry.max_rate_limited_secs`; its `retry_after`: how long until a deployment can
    /// serve (`None`: now).
    RateLimited(Failure),
    /// Every deployment that can serve is down (circuit breakers open), none cooling down
    /// after a 429: an outage, not an attempt. Bounded in time by
    /// `retry.max_unavailable_secs`; its `retry_after`: how long until one may be tried.
    Unavailable(Failure),
    /// Will never succeed: dead-lettered as its [`Failure::kind`].
    Failed(Failure),
    /// No call was made: the delivery waited (for a slot, a `Retry-After` pause or the
    /// budget) until half of `amqp.consumer_timeout_secs` since it was received. It goes to
    /// the retry queue so that the broker does not close the channel under it; this is not
    /// an upstream attempt and must not be counted as one.
    Deferred {
        /// How long it waited, for the retry header and the logs.
        reason: String,
    },
}

impl Outcome {
    /// The outcome of a failure, by its retry class.
    pub fn of_failure(failure: Failure, elsewhere: bool) -> Self {
        match failure.retry() {
            Retry::Transient | Retry::Throttle => Outcome::Retry { failure, elsewhere },
            Retry::RateLimited => Outcome::RateLimited(failure),
            Retry::Unavailable => Outcome::Unavailable(failure),
            Retry::Permanent => Outcome::Failed(failure),
        }
    }

    /// The outcome of a routed call that produced no answer.
    fn from_routed<T>(routed: Routed<T>) -> Option<Self> {
        Some(match routed {
            Routed::Served(_) | Routed::Deferred | Routed::Stopped => return None,
            Routed::RateLimited(failure) => Outcome::RateLimited(failure),
            Routed::Unavailable(failure) => Outcome::Unavailable(failure),
            Routed::Failed { failure, elsewhere } => Outcome::of_failure(failure, elsewhere),
            Routed::Unroutable(failure) => Outcome::Failed(failure),
        })
    }

    /// Whether it counts as an upstream attempt: rate limits, outages and deferrals do not
    /// (they are bounded in time instead).
    pub fn called_upstream(&self) -> bool {
        !matches!(
            self,
            Outcome::Deferred { .. } | Outcome::RateLimited(_) | Outcome::Unavailable(_)
        )
    }

    /// The failure, if it is one.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Outcome::Retry { failure, .. }
            | Outcome::RateLimited(failure)
            | Outcome::Unavailable(failure)
            | Outcome::Failed(failure) => Some(failure),
            Outcome::Done(_) | Outcome::Deferred { .. } => None,
        }
    }

    /// The `error_kind` label of a failed attempt, `None` for an answer or no call.
    pub fn failure_label(&self) -> Option<&'static str> {
        self.failure().map(Failure::label)
    }
}

/// One attempt's request: the job, whose it is, which attempt, since when its delivery
/// waits (for `latency_ms` and the hand-off time) and what hands it back unstarted.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The job.
    pub job: &'a Job,
    /// Its tenant, whose turn and caps it waits for.
    pub tenant: &'a str,
    /// 1 for the first attempt.
    pub number: u32,
    /// When its delivery arrived.
    pub started: Instant,
    /// The worker's shutdown.
    pub stop: &'a CancellationToken,
}

/// What the upstream answered to one job.
enum Answer {
    Chat(ChatAnswer),
    Embedding(EmbeddingAnswer),
}

/// Makes upstream calls for jobs and turns answers into results.
#[derive(Clone)]
pub struct Upstream {
    router: Arc<Router>,
    /// Every tenant's turn and caps.
    shares: Arc<Shares>,
    /// Embedding calls go through the micro-batcher unless batching is off.
    batcher: Option<Batcher>,
    /// `[llm]`'s request policy: default models and `max_tokens`.
    policy: RequestPolicy,
    /// Longest a delivery waits for its call to start, counted from when it was received:
    /// half of `amqp.consumer_timeout_secs`.
    hand_off_after: std::time::Duration,
    worker: String,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// The deployments of `config` (`[upstreams]`, or `[llm]` as `default`), their router
    /// and its shared state; `worker` names this replica in results. Starts the embedding
    /// batcher and the router's tasks, so it must run inside the runtime.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        worker: String,
    ) -> Result<Self, reqwest::Error> {
        let limits = &config.limits;
        // One Redis connection for the budgets and the fleet's shared state, made on first
        // use.
        let shared = (!limits.redis_url.expose().is_empty())
            .then(|| redis::Client::open(limits.redis_url.expose()).ok())
            .flatten()
            .map(|client| Arc::new(LazyConnection::new(client, REDIS_TIMEOUT)));
        let policy = config.llm.policy();
        let mut deployments = Vec::new();
        let mut names = Vec::new();
        for (name, spec) in config.deployments() {
            let scope = (name != crate::config::DEFAULT_UPSTREAM).then_some(name.as_str());
            let budget = Budget::new(
                spec.max_requests_per_minute,
                spec.max_tokens_per_minute,
                limits,
                shared.clone(),
                scope,
            );
            let flow = Flow::new(
                usize::from(config.worker.min_inflight),
                usize::from(spec.max_inflight),
                budget,
            );
            deployments.push(Deployment::build(
                &name,
                spec,
                &policy,
                flow,
                metrics.clone(),
            )?);
            names.push(name);
        }
        let shares = Arc::new(Shares::new(config, shared.clone()));
        let standing = Arc::new(Standing::new(
            names,
            config.routing.clone(),
            shared.map(|conn| (conn, limits.key_prefix.clone())),
        ));
        let router = Arc::new(Router::new(
            deployments,
            standing,
            config.routing.clone(),
            metrics.clone(),
            usize::from(config.worker.max_inflight),
        ));
        let batch = &config.batch;
        let batcher = (batch.max_items > 1).then(|| {
            Batcher::spawn(
                router.clone(),
                batch.max_items,
                std::time::Duration::from_millis(batch.max_wait_ms),
            )
        });
        Ok(Self {
            router,
            shares,
            batcher,
            policy,
            hand_off_after: config.amqp.hand_off_after(),
            worker,
            metrics,
        })
    }

    /// This replica's name.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Every tenant's turn and caps.
    pub fn shares(&self) -> &Shares {
        &self.shares
    }

    /// The router: the deployments, their state and the flow control.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// A fresh route for `job`: its model (or the default of its kind) and its fallbacks.
    pub fn route(&self, job: &Job) -> Route {
        let default = match job.kind() {
            Kind::Chat => &self.policy.chat_model,
            Kind::Embedding => &self.policy.embedding_model,
        };
        self.router.route(job.model.as_deref().unwrap_or(default))
    }

    /// Makes the `attempt.number`-th upstream call for `attempt.job` along `route`. The
    /// call first waits for its tenant's caps, then for a slot in its tenant's turn
    /// ([`Shares`]). `None` when `attempt.stop` was cancelled while it waited for those or
    /// for its embedding batch to start: nothing was called, the request goes back to its
    /// queue. [`Outcome::Deferred`] when the call could not start within the hand-off time.
    ///
    /// With `deltas`, a chat call streams: each delta goes there as it arrives, and the
    /// outcome is the same as without.
    pub async fn attempt(
        &self,
        attempt: Attempt<'_>,
        route: &mut Route,
        deltas: Option<&Deltas>,
    ) -> Option<Outcome> {
        let Attempt {
            job,
            tenant,
            number,
            started,
            stop,
        } = attempt;
        let until = tokio::time::Instant::from_std(started) + self.hand_off_after;
        let deferred = || Outcome::Deferred {
            reason: format!(
                "waited {} s for an upstream slot, a pause or the budget: half of \
                 amqp.consumer_timeout_secs",
                started.elapsed().as_secs()
            ),
        };
        let estimate = match job.kind() {
            Kind::Chat => job.token_estimate(self.policy.default_max_tokens),
            Kind::Embedding => job.token_estimate(0),
        };
        let entered = self
            .shares
            .enter(tenant, job.priority, estimate, until, stop)
            .await;
        let pass = match entered {
            Ok(pass) => pass,
            Err(NotEntered::Stopped) => return None,
            Err(NotEntered::Deferred) => return Some(deferred()),
        };
        let admission = Admission {
            turn: self.shares.turn(tenant, job.priority),
            tokens: job.token_estimate(self.policy.default_max_tokens),
            until,
            stop: Stop::One(stop.clone()),
        };
        let outcome = match self.call(job, route, admission, deltas).await {
            Routed::Stopped => None,
            Routed::Deferred => Some(deferred()),
            // The result is built only for an answer, and only once the call is over: a
            // call in flight holds no copy of the request's id or metadata.
            Routed::Served(served) => Some(Outcome::Done(Box::new(
                self.result(job, number, started, served),
            ))),
            other => Outcome::from_routed(other),
        };
        // An answer without usage is charged its estimate: tokens delivered are tokens
        // charged, never refunded.
        let (used, called) = match &outcome {
            Some(Outcome::Done(result)) => (
                result
                    .usage
                    .as_ref()
                    .and_then(|u| u.total())
                    .unwrap_or(estimate),
                true,
            ),
            Some(other) => (0, other.called_upstream()),
            None => (0, false),
        };
        pass.settle(used, called).await;
        let outcome = outcome?;
        if let Some(label) = outcome.failure_label() {
            self.metrics.failed(job.kind().as_str(), label);
        }
        Some(outcome)
    }

    /// The call for `job` along `route`, let in as `admission` says: through the router,
    /// or for an embedding, through the batcher unless batching is off (the batcher takes
    /// one slot per batched call).
    async fn call(
        &self,
        job: &Job,
        route: &mut Route,
        admission: Admission,
        deltas: Option<&Deltas>,
    ) -> Routed<Answer> {
        match &job.call {
            Call::Chat { messages, params } => self
                .router
                .call(
                    route,
                    Kind::Chat,
                    &admission,
                    |deployment, model| async move {
                        let client = deployment.client();
                        match deltas {
                            // Boxed: a streamed call's state is much larger than a plain
                            // one's, and inline every call in flight would carry it.
                            Some(deltas) => {
                                Box::pin(client.chat_stream(&model, messages, params, deltas)).await
                            }
                            None => client.chat(&model, messages, params).await,
                        }
                    },
                )
                .await
                .map(Answer::Chat),
            Call::Embedding { input, params, .. } => match &self.batcher {
                Some(batcher) => {
                    let admission = Admission {
                        tokens: job.token_estimate(0),
                        ..admission
                    };
                    let model = route.requested.clone();
                    match batcher.embed(&model, input, params, admission).await {
                        Some(routed) => routed.map(Answer::Embedding),
                        None => Routed::Stopped,
                    }
                }
                None => self
                    .router
                    .call(
                        route,
                        Kind::Embedding,
                        &admission,
                        |deployment, model| async move {
                            deployment.client().embed(&model, input, params).await
                        },
                    )
                    .await
                    .map(Answer::Embedding),
            },
        }
    }

    /// The `ok` result of an answer to `job`.
    fn result(
        &self,
        job: &Job,
        attempt: u32,
        started: Instant,
        served: Served<Answer>,
    ) -> JobResult {
        let mut result = JobResult::ok(job.request_id.clone(), self.worker.clone());
        result.kind = Some(job.kind().as_str());
        result.metadata = job.metadata.clone();
        result.attempts = attempt;
        result.latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        result.model = Some(served.model);
        result.upstream = Some(served.upstream);
        result.fallback_from = served.fallback_from;
        match served.answer {
            Answer::Chat(a) => {
                result.upstream_model = Some(a.model);
                result.content = Some(a.content.map_or(Value::Null, Value::String));
                result.tool_calls = a.tool_calls;
                result.refusal = a.refusal;
                result.finish_reason = a.finish_reason;
                result.usage = a.usage;
                let logprobs = match &job.call {
                    Call::Chat { params, .. } => params.get("logprobs") == Some(&Value::Bool(true)),
                    Call::Embedding { .. } => false,
                };
                if a.choices.len() > 1 || logprobs {
                    result.choices = Some(a.choices);
                }
            }
            Answer::Embedding(a) => {
                result.upstream_model = Some(a.model);
                result.usage = a.usage;
                match &job.call {
                    Call::Embedding { single: true, .. } => {
                        result.embedding = a.vectors.into_iter().next();
                    }
                    _ => result.embeddings = Some(a.vectors),
                }
            }
        }
        result
    }
}
