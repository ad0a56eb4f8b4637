//! One attempt for a job: [`Upstream::attempt`] makes the call through the deployment (or
//! the embedding batcher, which uses the same [`Deployment::call`]) and turns the answer into
//! an [`Outcome`].
//!
//! No broker here, so tests drive it against the mock upstream alone. What to do with an
//! outcome (publish, retry, dead-letter) is decided in [`crate::worker::decide`].

use std::{sync::Arc, time::Instant};

use tokio_util::sync::CancellationToken;

use crate::{
    config::{BatchConfig, LlmConfig},
    contract::{
        ErrorKind,
        request::{Call, Job, Kind},
        response::JobResult,
    },
    runtime::metrics::Metrics,
    upstream::{
        batch::Batcher,
        client::{ChatAnswer, EmbeddingAnswer, LlmClient, LlmError},
        deployment::{Deployment, Slot},
        flow::Flow,
    },
};

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The upstream answered; this is the result.
    Done(Box<JobResult>),
    /// A transient failure: another attempt may succeed, not before `after` if the upstream
    /// said so.
    Retry {
        /// The upstream's `Retry-After`.
        after: Option<std::time::Duration>,
        /// What failed.
        reason: String,
        /// The upstream pushed back (429 or a timeout).
        throttle: bool,
    },
    /// Will never succeed.
    Failed {
        /// Why, for the dead letter and the error result.
        kind: ErrorKind,
        /// What happened.
        reason: String,
    },
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
    /// The outcome of a failed call, classified once where the failure happened.
    fn from_error(e: LlmError) -> Self {
        match e {
            LlmError::Transient {
                retry_after,
                throttle,
                ..
            } => Outcome::Retry {
                after: retry_after,
                throttle,
                reason: e.to_string(),
            },
            LlmError::Permanent { .. } => Outcome::Failed {
                kind: ErrorKind::UpstreamPermanent,
                reason: e.to_string(),
            },
        }
    }

    /// Whether the upstream was called: every outcome but [`Outcome::Deferred`] counts as
    /// an attempt.
    pub fn called_upstream(&self) -> bool {
        !matches!(self, Outcome::Deferred { .. })
    }

    /// The `error_kind` label of a failed attempt, `None` for an answer or no call.
    pub fn failure_label(&self) -> Option<&'static str> {
        match self {
            Outcome::Done(_) | Outcome::Deferred { .. } => None,
            Outcome::Retry { throttle: true, .. } => Some("throttled"),
            Outcome::Retry { .. } => Some("transient"),
            Outcome::Failed { kind, .. } => Some(kind.as_str()),
        }
    }
}

/// What the upstream answered to one job.
enum Answer {
    Chat(ChatAnswer),
    Embedding(EmbeddingAnswer),
}

/// Makes upstream calls for jobs and turns answers into results.
#[derive(Clone)]
pub struct Upstream {
    deployment: Deployment,
    /// Embedding calls go through the micro-batcher unless batching is off.
    batcher: Option<Batcher>,
    chat_model: String,
    embedding_model: String,
    default_max_tokens: u64,
    /// Longest a delivery waits for its call to start, counted from when it was received:
    /// half of `amqp.consumer_timeout_secs`.
    hand_off_after: std::time::Duration,
    worker: String,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// The configured upstream; `worker` names this replica in results; a delivery waits at
    /// most `hand_off_after` since it was received for its call to start. Starts the
    /// embedding batcher, so it must run inside the runtime.
    pub fn new(
        cfg: &LlmConfig,
        batch: &BatchConfig,
        flow: Arc<Flow>,
        metrics: Arc<Metrics>,
        worker: String,
        hand_off_after: std::time::Duration,
    ) -> Result<Self, reqwest::Error> {
        let deployment = Deployment::new(LlmClient::new(cfg)?, flow, metrics.clone());
        let batcher = (batch.max_items > 1).then(|| {
            Batcher::spawn(
                deployment.clone(),
                batch.max_items,
                std::time::Duration::from_millis(batch.max_wait_ms),
            )
        });
        Ok(Self {
            deployment,
            batcher,
            chat_model: cfg.model.clone(),
            embedding_model: cfg.embedding_model.clone(),
            default_max_tokens: cfg.default_max_tokens,
            hand_off_after,
            worker,
            metrics,
        })
    }

    /// This replica's name.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Makes the `attempt`-th upstream call for `job`; `started` is when its delivery
    /// arrived, for `latency_ms` and the hand-off. `None` when `stop` was cancelled while it
    /// waited for a slot or for its embedding batch to start: nothing was called, the request
    /// goes back to its queue. [`Outcome::Deferred`] when the call could not start within the
    /// hand-off time.
    pub async fn attempt(
        &self,
        job: &Job,
        attempt: u32,
        started: Instant,
        stop: &CancellationToken,
    ) -> Option<Outcome> {
        let until = tokio::time::Instant::from_std(started) + self.hand_off_after;
        let deferred = || Outcome::Deferred {
            reason: format!(
                "waited {} s for an upstream slot, a pause or the budget: half of \
                 amqp.consumer_timeout_secs",
                started.elapsed().as_secs()
            ),
        };
        let answer = match &job.call {
            Call::Chat { messages, params } => {
                let model = job.model.as_deref().unwrap_or(&self.chat_model);
                let Some(slot) = self.admit(job, until, stop).await? else {
                    return Some(deferred());
                };
                let call = self.deployment.client().chat(model, messages, params);
                self.deployment
                    .call(Kind::Chat, slot, call)
                    .await
                    .map(Answer::Chat)
            }
            Call::Embedding { input, params, .. } => {
                let model = job.model.as_deref().unwrap_or(&self.embedding_model);
                match &self.batcher {
                    // The batcher takes one slot per batched call.
                    Some(batcher) => {
                        let tokens = job.token_estimate(0);
                        let embedded = batcher
                            .embed(model, input, params, job.priority, tokens, until, stop)
                            .await?;
                        let Some(embedded) = embedded else {
                            return Some(deferred());
                        };
                        embedded
                    }
                    None => {
                        let Some(slot) = self.admit(job, until, stop).await? else {
                            return Some(deferred());
                        };
                        let call = self.deployment.client().embed(model, input, params);
                        self.deployment.call(Kind::Embedding, slot, call).await
                    }
                }
                .map(Answer::Embedding)
            }
        };
        // The result is built only for an answer, and only once the call is over: a call in
        // flight holds no copy of the request's id or metadata.
        let outcome = match answer {
            Ok(answer) => Outcome::Done(Box::new(self.result(job, attempt, started, answer))),
            Err(e) => Outcome::from_error(e),
        };
        if let Some(label) = outcome.failure_label() {
            self.metrics.failed(job.kind().as_str(), label);
        }
        Some(outcome)
    }

    /// The `ok` result of an answer to `job`.
    fn result(&self, job: &Job, attempt: u32, started: Instant, answer: Answer) -> JobResult {
        let mut result = JobResult::ok(job.request_id.clone(), self.worker.clone());
        result.kind = Some(job.kind().as_str());
        result.metadata = job.metadata.clone();
        result.attempts = attempt;
        result.latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match answer {
            Answer::Chat(a) => {
                result.model = Some(a.model);
                result.content = Some(a.content);
                result.finish_reason = a.finish_reason;
                result.usage = a.usage;
            }
            Answer::Embedding(a) => {
                result.model = Some(a.model);
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

    /// A slot for `job`'s call (`Some(None)` when none came before `until`), or `None` when
    /// `stop` comes first. A slot free right away wins over shutdown: the work starts, and
    /// shutdown lets it finish. Every wait before a call is in here (a slot, a `Retry-After`
    /// pause, a broker alarm's hold, the budgets), so `until` bounds them all.
    async fn admit(
        &self,
        job: &Job,
        until: tokio::time::Instant,
        stop: &CancellationToken,
    ) -> Option<Option<Slot>> {
        let estimate = job.token_estimate(self.default_max_tokens);
        tokio::select! {
            biased;
            slot = self.deployment.admit(job.priority, estimate, until) => Some(slot),
            _ = stop.cancelled() => None,
        }
    }
}
