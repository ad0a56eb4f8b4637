//! One step of work: a job and its attempt number in, an [`Outcome`] out.
//!
//! No broker here, so tests drive it against the mock upstream alone. Deciding what to do
//! with the outcome (publish, wait and retry, dead-letter) is [`crate::worker`]'s job.

use std::time::{Duration, Instant};

use crate::{
    config::{BatchConfig, LlmConfig},
    contract::request::{Call, Job},
    contract::response::JobResult,
    upstream::batch::Batcher,
    upstream::client::{LlmClient, LlmError},
};

/// What became of one attempt.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The upstream answered; publish this result.
    Done(Box<JobResult>),
    /// A transient failure; try again, not before `after` if the upstream said so.
    Retry {
        /// The upstream's `Retry-After`.
        after: Option<Duration>,
        /// What failed.
        reason: String,
        /// The upstream pushed back (429 or a timeout).
        throttle: bool,
    },
    /// Will never succeed; dead-letter it.
    DeadLetter {
        /// `invalid_request`, `too_large`, `upstream_permanent`, `retries_exhausted`, ...
        kind: &'static str,
        /// Why, for the `x-error` header and the error result.
        reason: String,
    },
}

/// Makes upstream calls for jobs and turns answers into results.
#[derive(Clone)]
pub struct Processor {
    llm: LlmClient,
    /// Embedding calls go through the micro-batcher unless batching is off.
    batcher: Option<Batcher>,
    chat_model: String,
    embedding_model: String,
    worker: String,
}

impl Processor {
    /// A processor for the configured upstream; `worker` names this replica in results.
    /// Starts the embedding batcher, so it must run inside the runtime.
    pub fn new(
        cfg: &LlmConfig,
        batch: &BatchConfig,
        flow: std::sync::Arc<crate::upstream::flow::Flow>,
        metrics: std::sync::Arc<crate::runtime::metrics::Metrics>,
        worker: String,
    ) -> Result<Self, reqwest::Error> {
        let llm = LlmClient::new(cfg)?;
        let batcher = (batch.max_items > 1).then(|| {
            Batcher::spawn(
                llm.clone(),
                flow,
                metrics,
                batch.max_items,
                Duration::from_millis(batch.max_wait_ms),
            )
        });
        Ok(Self {
            llm,
            batcher,
            chat_model: cfg.model.clone(),
            embedding_model: cfg.embedding_model.clone(),
            worker,
        })
    }

    /// Whether embedding calls are batched (and take their flow slots per batch).
    pub fn batches_embeddings(&self) -> bool {
        self.batcher.is_some()
    }

    /// This replica's name.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// Makes the `attempt`-th upstream call for `job`; `started` is when its delivery
    /// arrived, for `latency_ms`.
    pub async fn attempt(&self, job: &Job, attempt: u32, started: Instant) -> Outcome {
        let mut result = JobResult::ok(job.request_id.clone(), self.worker.clone());
        result.kind = Some(job.kind().as_str());
        result.metadata = job.metadata.clone();
        result.attempts = attempt;
        let answer = match &job.call {
            Call::Chat { messages, params } => {
                let model = job.model.as_deref().unwrap_or(&self.chat_model);
                self.llm.chat(model, messages, params).await.map(|a| {
                    result.model = Some(a.model);
                    result.content = Some(a.content);
                    result.finish_reason = a.finish_reason;
                    result.usage = a.usage;
                })
            }
            Call::Embedding {
                input,
                single,
                params,
            } => {
                let model = job.model.as_deref().unwrap_or(&self.embedding_model);
                let answer = match &self.batcher {
                    Some(batcher) => {
                        let tokens = job.token_estimate(0);
                        batcher
                            .embed(model, input, params, job.priority, tokens)
                            .await
                    }
                    None => self.llm.embed(model, input, params).await,
                };
                answer.map(|a| {
                    result.model = Some(a.model);
                    result.usage = a.usage;
                    if *single {
                        result.embedding = a.vectors.into_iter().next();
                    } else {
                        result.embeddings = Some(a.vectors);
                    }
                })
            }
        };
        match answer {
            Ok(()) => {
                result.latency_ms =
                    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                Outcome::Done(Box::new(result))
            }
            Err(e @ LlmError::Transient { .. }) => Outcome::Retry {
                after: e.retry_after(),
                throttle: e.is_throttle(),
                reason: e.to_string(),
            },
            Err(e @ LlmError::Permanent { .. }) => Outcome::DeadLetter {
                kind: "upstream_permanent",
                reason: e.to_string(),
            },
        }
    }
}
