//! The worker: consumer tasks that take deliveries and settle each one.
//!
//! `worker.consumers` slots, each with its own consuming channel (`basic.qos` =
//! `worker.prefetch`) subscribed to both work queues, and its own confirm-mode publishing
//! channel. Every delivery is handled in its own task, so one slow upstream call never
//! blocks the others; in flight per replica is bounded by the prefetch.
//!
//! Settling a delivery: parse ([`crate::request`]), call ([`crate::process`]) with retries
//! ([`crate::retry`]), then publish the result or the dead letter and wait for the broker's
//! confirm ([`crate::publish`]), and only then ack. A delivery whose outcome cannot be
//! confirmed is nacked back to its queue, never acked.

use std::{
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Connection,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    },
    types::FieldTable,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    amqp,
    config::Config,
    process::{Outcome, Processor},
    publish::{Failure, PublishError, Publisher, ReplyRoute, unix_now},
    request::{self, Job, Kind},
    response::JobResult,
    retry::RetryPolicy,
    topology,
};

/// Why the worker stopped other than by a shutdown request.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] amqp::ConnectError),
    /// A broker operation failed at start-up.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The connection failed while consuming.
    #[error("broker connection lost: {0}")]
    ConnectionLost(SessionEnd),
    /// The HTTP client could not be built.
    #[error("cannot build the upstream HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// Why a consumer session ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// A broker operation failed.
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// The broker cancelled the subscription (its queue was deleted).
    #[error("the broker cancelled the consumer (queue deleted?)")]
    Cancelled,
    /// The confirm channel closed (e.g. the results exchange was deleted).
    #[error("the publishing channel closed")]
    PublisherClosed,
}

/// Publishing attempts for one outcome before the delivery is handed back to its queue.
const PUBLISH_ATTEMPTS: u32 = 5;
/// Pause before a consumer slot reopens its channels after a channel-level failure.
const SLOT_RESTART_DELAY: Duration = Duration::from_secs(1);

/// What every delivery task shares.
struct Context {
    config: Config,
    processor: Processor,
    policy: RetryPolicy,
    /// Cancelled on shutdown (or a fatal error): stop taking deliveries, cut retry waits short.
    stop: CancellationToken,
}

/// Runs the worker until `shutdown` is cancelled (then drains in-flight work within
/// `worker.shutdown_grace_secs` and returns `Ok`) or the broker connection fails.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let worker = config.worker.worker_id();
    let processor = Processor::new(&config.llm, worker.clone())?;
    let conn = amqp::connect(&config.amqp, &format!("llmq worker {worker}")).await?;
    let setup = conn.create_channel().await?;
    topology::declare(&setup, &config.topology).await?;
    info!(
        url = %config.amqp.url,
        worker = %worker,
        consumers = config.worker.consumers,
        prefetch = config.worker.prefetch,
        queues = ?[&config.topology.processing_queue, &config.topology.embeddings_queue],
        upstream = %config.llm.base_url,
        "worker started"
    );
    let ctx = Arc::new(Context {
        policy: RetryPolicy::new(&config.retry),
        processor,
        stop: shutdown.child_token(),
        config,
    });
    let conn = Arc::new(conn);
    let tracker = TaskTracker::new();
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..ctx.config.worker.consumers {
        slots.spawn(consumer_slot(
            ctx.clone(),
            conn.clone(),
            slot,
            tracker.clone(),
        ));
    }
    let mut outcome = Ok(());
    while let Some(joined) = slots.join_next().await {
        let failed = match joined {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(join) => {
                error!(error = %join, "a consumer task panicked");
                continue;
            }
        };
        if outcome.is_ok() {
            error!(error = %failed, "stopping: the broker connection failed");
            outcome = Err(WorkerError::ConnectionLost(failed));
        }
        ctx.stop.cancel();
    }

    tracker.close();
    let grace = Duration::from_secs(ctx.config.worker.shutdown_grace_secs);
    info!(
        in_flight = tracker.len(),
        grace_secs = grace.as_secs(),
        "draining in-flight work"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            unfinished = tracker.len(),
            "shutdown grace period over; unfinished requests go back to the broker"
        );
    }
    if conn.status().connected()
        && let Err(e) = conn.close(200, "llmq worker shutdown".into()).await
    {
        warn!(error = %e, "closing the broker connection failed");
    }
    info!("worker stopped");
    outcome
}

/// Keeps one consumer slot subscribed: a channel-level failure (a channel closed by the
/// broker, a consumer cancelled because its queue was deleted) reopens the channels after a
/// pause, redeclaring the topology; a connection-level failure ends the worker.
async fn consumer_slot(
    ctx: Arc<Context>,
    conn: Arc<Connection>,
    slot: u16,
    tracker: TaskTracker,
) -> Result<(), SessionEnd> {
    loop {
        let failure = match session(&ctx, &conn, slot, &tracker).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !conn.status().connected() {
            return Err(failure);
        }
        warn!(slot, error = %failure, "consumer channel failed; reopening");
        tokio::select! {
            _ = ctx.stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SLOT_RESTART_DELAY) => {}
        }
        let setup = conn.create_channel().await?;
        if let Err(e) = topology::declare(&setup, &ctx.config.topology).await {
            warn!(slot, error = %e, "redeclaring the topology failed");
        }
        let _ = setup.close(200, "topology declared".into()).await;
    }
}

/// One subscription of a slot, until shutdown or a failure.
async fn session(
    ctx: &Arc<Context>,
    conn: &Connection,
    slot: u16,
    tracker: &TaskTracker,
) -> Result<(), SessionEnd> {
    let topo = &ctx.config.topology;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(ctx.config.worker.prefetch, BasicQosOptions::default())
        .await?;
    let publisher = Publisher::open(conn, topo.clone()).await?;
    let tag = |queue: &str| format!("llmq-{}-{slot}-{queue}", ctx.processor.worker());
    let chat_tag = tag("chat");
    let embed_tag = tag("embed");
    let chat = channel
        .basic_consume(
            topo.processing_queue.as_str().into(),
            chat_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let embed = channel
        .basic_consume(
            topo.embeddings_queue.as_str().into(),
            embed_tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut deliveries = futures_util::stream::select(
        chat.map(|d| (Kind::Chat, d)),
        embed.map(|d| (Kind::Embedding, d)),
    );
    debug!(slot, "consuming");
    loop {
        let next = tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => {
                for tag in [chat_tag, embed_tag] {
                    let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                }
                return Ok(());
            }
            next = deliveries.next() => next,
        };
        match next {
            Some((kind, Ok(delivery))) => {
                tracker.spawn(handle(ctx.clone(), publisher.clone(), kind, delivery));
            }
            Some((_, Err(e))) => return Err(e.into()),
            None => return Err(SessionEnd::Cancelled),
        }
        if !publisher.is_usable() {
            return Err(SessionEnd::PublisherClosed);
        }
    }
}

/// Settles one delivery: parse, call with retries, publish confirmed, then ack.
async fn handle(ctx: Arc<Context>, publisher: Publisher, kind: Kind, delivery: Delivery) {
    let started = Instant::now();
    let max_body = ctx.config.worker.max_body_bytes;
    let parsed = std::panic::catch_unwind(|| {
        request::parse(&delivery.data, &delivery.properties, kind, max_body)
    })
    .unwrap_or_else(|_| {
        Err(request::InvalidRequest {
            kind: "internal_error",
            message: "the worker panicked while parsing this message".into(),
        })
    });
    let job = match parsed {
        Ok(job) => job,
        Err(invalid) => {
            let request_id = request::request_id_of_invalid(&delivery.data, &delivery.properties);
            let span = info_span!("job", %request_id, delivery_tag = delivery.delivery_tag);
            let route = route_of(&delivery, &request_id);
            let outcome = Outcome::DeadLetter {
                kind: invalid.kind,
                reason: invalid.message,
            };
            settle(
                &ctx,
                &publisher,
                &delivery,
                &route,
                None,
                outcome,
                0,
                unix_now(),
            )
            .instrument(span)
            .await;
            return;
        }
    };
    let span = info_span!(
        "job",
        request_id = %job.request_id,
        kind = job.kind().as_str(),
        priority = job.priority,
        delivery_tag = delivery.delivery_tag,
    );
    process_job(ctx, publisher, delivery, job, started)
        .instrument(span)
        .await;
}

async fn process_job(
    ctx: Arc<Context>,
    publisher: Publisher,
    delivery: Delivery,
    job: Job,
    started: Instant,
) {
    let route = ReplyRoute {
        request_id: job.request_id.clone(),
        correlation_id: job.correlation_id.clone(),
        reply_to: job.reply_to.clone(),
    };
    let mut attempt = 0;
    let mut first_failure = None;
    let outcome = loop {
        attempt += 1;
        let outcome = AssertUnwindSafe(ctx.processor.attempt(&job, attempt, started))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Outcome::DeadLetter {
                kind: "internal_error",
                reason: "the worker panicked while processing this request".into(),
            });
        let Outcome::Retry { after, reason } = outcome else {
            break outcome;
        };
        first_failure.get_or_insert_with(unix_now);
        if !ctx.policy.may_retry(attempt) {
            break Outcome::DeadLetter {
                kind: "retries_exhausted",
                reason: format!("gave up after {attempt} attempts; last error: {reason}"),
            };
        }
        let delay = ctx.policy.delay(attempt, after);
        warn!(attempt, delay_ms = delay.as_millis() as u64, error = %reason, "transient failure; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = ctx.stop.cancelled() => {
                info!(attempt, "shutting down during a retry wait; handing the request back");
                nack(&delivery).await;
                return;
            }
        }
    };
    let first = first_failure.unwrap_or_else(unix_now);
    settle(
        &ctx,
        &publisher,
        &delivery,
        &route,
        Some(&job),
        outcome,
        attempt,
        first,
    )
    .await;
}

/// Publishes what an outcome produced, confirmed, then acks; or hands the delivery back.
#[allow(clippy::too_many_arguments)]
async fn settle(
    ctx: &Context,
    publisher: &Publisher,
    delivery: &Delivery,
    route: &ReplyRoute,
    job: Option<&Job>,
    outcome: Outcome,
    attempts: u32,
    first_failure: i64,
) {
    let worker = ctx.processor.worker();
    let (kind, reason) = match outcome {
        Outcome::Done(result) => {
            let published = with_publish_retries(|| publisher.result(route, &result)).await;
            if published.is_ok() {
                debug!(attempts, latency_ms = result.latency_ms, "done");
            }
            return finish(delivery, published).await;
        }
        Outcome::DeadLetter { kind, reason } => (kind, reason),
        // Retries are decided before settling; one reaching here has run out of them.
        Outcome::Retry { reason, .. } => ("retries_exhausted", reason),
    };
    let failure = Failure {
        kind,
        reason: &reason,
        attempts,
        first_failure,
        worker,
    };
    let published = with_publish_retries(|| publisher.dead_letter(delivery, &failure)).await;
    if published.is_ok() {
        error!(error_kind = kind, attempts, reason = %reason, "dead-lettered");
        // The caller hears of it too, so that an RPC caller never waits forever. The dead
        // letter is the durable record; this result is best effort.
        let mut result = JobResult::error(
            route.request_id.clone(),
            worker.to_string(),
            kind,
            crate::truncate(&reason, 1024),
        );
        result.attempts = attempts;
        result.kind = job.map(|j| j.kind().as_str());
        result.metadata = job.and_then(|j| j.metadata.clone());
        if let Err(e) = publisher.result(route, &result).await {
            warn!(error = %e, "the error result could not be published; the dead letter is kept");
        }
    }
    finish(delivery, published).await;
}

/// Acks a delivery whose outcome the broker confirmed; hands it back otherwise.
async fn finish(delivery: &Delivery, published: Result<(), PublishError>) {
    match published {
        Ok(()) => ack(delivery).await,
        Err(e) => {
            error!(error = %e, "the outcome could not be confirmed by the broker; handing the request back");
            nack(delivery).await;
        }
    }
}

/// Publishes with a few quick retries: a nack or a closed queue may clear up within
/// seconds; a dead channel will not, so it is not retried.
async fn with_publish_retries<F, Fut>(mut publish: F) -> Result<(), PublishError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), PublishError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        tries += 1;
        match publish().await {
            Ok(()) => return Ok(()),
            Err(e @ PublishError::Broker { .. }) => return Err(e),
            Err(e) if tries >= PUBLISH_ATTEMPTS => return Err(e),
            Err(e) => {
                warn!(error = %e, tries, "publish not confirmed; trying again");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
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

async fn nack(delivery: &Delivery) {
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

fn route_of(delivery: &Delivery, request_id: &str) -> ReplyRoute {
    let p = &delivery.properties;
    ReplyRoute {
        request_id: request_id.to_string(),
        correlation_id: p.correlation_id().as_ref().map(|s| s.to_string()),
        reply_to: p
            .reply_to()
            .as_ref()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty()),
    }
}
