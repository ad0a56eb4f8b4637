//! The worker: a broker connection kept alive, consumer slots, and the settling of every
//! delivery.
//!
//! `worker.consumers` slots, each with its own consuming channel (`basic.qos` =
//! `worker.prefetch`) subscribed to both work queues, and its own confirm-mode publishing
//! channel. Every delivery is handled in its own task, so one slow upstream call never
//! blocks the others; in flight per replica is bounded by the prefetch.
//!
//! Settling a delivery: parse ([`crate::contract::request`]), deduplicate ([`crate::store::idempotency`]), call
//! ([`crate::upstream::call`]) with retries ([`crate::broker::retry`]), then publish the result, the retry or
//! the dead letter and wait for the broker's confirm ([`crate::broker::publish`]), and only then ack.
//! A delivery whose outcome cannot be confirmed is handed back to its queue, never acked.
//!
//! A lost connection is reopened with backoff, the topology redeclared and consuming resumed;
//! deliveries of the dead connection are redelivered by the broker, and the idempotency store
//! absorbs the duplicates.

use std::{
    panic::AssertUnwindSafe,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use backon::{BackoffBuilder, ExponentialBuilder};
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
    broker::connection,
    broker::publish::{Failure, PublishError, Publisher, ReplyRoute, unix_now, unix_now_ms},
    broker::retry::{self, RetryPolicy},
    broker::topology,
    config::{Config, OnStoreError},
    contract::request::{self, Job, Kind},
    contract::response::JobResult,
    runtime::metrics::Metrics,
    store::idempotency::{Claim, Store},
    upstream::call::{Outcome, Processor},
    upstream::flow::Flow,
    upstream::ratelimit::Budget,
};

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The HTTP client could not be built.
    #[error("cannot build the upstream HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The idempotency store is misconfigured.
    #[error(transparent)]
    Store(#[from] crate::store::idempotency::StoreError),
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
/// After the shutdown grace period, how long aborted tasks get to hand their work back.
const ABORT_GRACE: Duration = Duration::from_secs(3);
/// Messages that come back this early (ms) before their not-before time wait again.
const NOT_BEFORE_SLACK_MS: i64 = 100;
/// A not-before further away than this (ms) is not one llmq set: ignored.
const MAX_NOT_BEFORE_MS: i64 = 48 * 3600 * 1000;
/// How long closing the connection may take at shutdown (a blocked broker never answers).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What every delivery task shares.
struct Context {
    config: Config,
    processor: Processor,
    policy: RetryPolicy,
    store: Store,
    /// Concurrency limit, pauses and budgets toward the upstream.
    flow: Arc<Flow>,
    /// Readiness for the admin endpoints.
    health: Arc<Health>,
    /// Prometheus metrics.
    metrics: Arc<Metrics>,
    /// Cancelled on shutdown: stop taking deliveries, cut retry waits short.
    stop: CancellationToken,
    /// Cancelled when the shutdown grace period is over: abandon upstream calls.
    abort: CancellationToken,
}

/// Runs the worker until `shutdown` is cancelled, then drains in-flight work within
/// `worker.shutdown_grace_secs` and returns. Broker outages are waited out, not returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), WorkerError> {
    Worker::new(config, shutdown)?.run().await;
    Ok(())
}

/// What a running worker shows the outside (readiness, metrics, tests).
#[derive(Debug, Default)]
pub struct Health {
    /// Connected to the broker with the topology declared.
    pub connected: std::sync::atomic::AtomicBool,
    /// Consumer slots currently subscribed.
    pub consuming: std::sync::atomic::AtomicUsize,
    /// Broker connections lost and reopened since start.
    pub reconnects: std::sync::atomic::AtomicU64,
}

impl Health {
    /// Connected and consuming: ready for traffic.
    pub fn ready(&self) -> bool {
        self.connected.load(Relaxed) && self.consuming.load(Relaxed) > 0
    }
}

/// A worker, built and not yet running.
pub struct Worker {
    ctx: Arc<Context>,
}

impl Worker {
    /// Builds the upstream client, the flow control and the idempotency store.
    pub fn new(config: Config, shutdown: CancellationToken) -> Result<Self, WorkerError> {
        let worker = config.worker.worker_id();
        let flow = Flow::new(
            usize::from(config.worker.min_inflight),
            usize::from(config.worker.max_inflight),
            Budget::new(
                config.llm.max_requests_per_minute,
                config.llm.max_tokens_per_minute,
                &config.limits,
            ),
        );
        let metrics = Arc::new(Metrics::default());
        let processor = Processor::new(
            &config.llm,
            &config.batch,
            flow.clone(),
            metrics.clone(),
            worker,
        )?;
        let lease = config.llm.timeout()
            + Duration::from_millis(config.retry.inline_max_ms)
            + Duration::from_secs(10);
        let store = Store::new(&config.idempotency, lease)?;
        Ok(Self {
            ctx: Arc::new(Context {
                policy: RetryPolicy::new(&config.retry),
                processor,
                store,
                flow,
                health: Arc::default(),
                metrics,
                stop: shutdown,
                abort: CancellationToken::new(),
                config,
            }),
        })
    }

    /// The flow control (concurrency limit, in flight, waiting).
    pub fn flow(&self) -> Arc<Flow> {
        self.ctx.flow.clone()
    }

    /// Connection and consumer state.
    pub fn health(&self) -> Arc<Health> {
        self.ctx.health.clone()
    }

    /// The worker's Prometheus metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.ctx.metrics.clone()
    }

    /// Runs until the shutdown token is cancelled, then drains.
    pub async fn run(self) {
        run_worker(self.ctx).await
    }
}

async fn run_worker(ctx: Arc<Context>) {
    let worker = ctx.processor.worker().to_string();
    let tracker = TaskTracker::new();
    let mut backoff = reconnect_backoff();
    let mut last_conn: Option<Arc<Connection>> = None;
    let conn_name = format!("llmq worker {worker}");
    while !ctx.stop.is_cancelled() {
        let conn = tokio::select! {
            _ = ctx.stop.cancelled() => break,
            conn = connection::connect(&ctx.config.amqp, &conn_name) => conn,
        };
        let conn = match conn {
            Ok(conn) => Arc::new(conn),
            Err(e) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "broker unreachable");
                pause(&ctx.stop, delay).await;
                continue;
            }
        };
        if let Err(e) = declare(&conn, &ctx.config).await {
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "declaring the topology failed");
            let _ = conn.close(200, "topology failed".into()).await;
            pause(&ctx.stop, delay).await;
            continue;
        }
        backoff = reconnect_backoff();
        info!(
            url = %ctx.config.amqp.url,
            worker = %worker,
            consumers = ctx.config.worker.consumers,
            max_inflight = ctx.config.worker.max_inflight,
            queues = ?[&ctx.config.topology.processing_queue, &ctx.config.topology.embeddings_queue],
            upstream = %ctx.config.llm.base_url,
            "connected; consuming"
        );
        ctx.health.connected.store(true, Relaxed);
        let lost = consume_on(&ctx, &conn, &tracker).await;
        ctx.health.connected.store(false, Relaxed);
        last_conn = Some(conn);
        match lost {
            None => break,
            Some(e) => {
                ctx.health.reconnects.fetch_add(1, Relaxed);
                ctx.metrics.reconnects.inc();
                warn!(error = %e, "broker connection lost; reconnecting");
            }
        }
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
            "shutdown grace period over; handing unfinished requests back to the broker"
        );
        ctx.abort.cancel();
        let _ = tokio::time::timeout(ABORT_GRACE, tracker.wait()).await;
    }
    if let Some(conn) = last_conn
        && conn.status().connected()
    {
        match tokio::time::timeout(
            CLOSE_TIMEOUT,
            conn.close(200, "llmq worker shutdown".into()),
        )
        .await
        {
            Ok(Ok(())) => {}
            // Channels closing at the same time make lapin report the close as failed.
            Ok(Err(e)) => debug!(error = %e, "closing the broker connection"),
            Err(_) => warn!("the broker did not answer the close; exiting anyway"),
        }
    }
    info!("worker stopped");
}

/// Reconnection delays: 0.5 s doubling to 30 s, jittered, forever.
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

async fn pause(stop: &CancellationToken, delay: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

async fn declare(conn: &Connection, config: &Config) -> Result<(), lapin::Error> {
    let setup = conn.create_channel().await?;
    topology::declare(&setup, &config.topology).await?;
    let _ = setup.close(200, "topology declared".into()).await;
    Ok(())
}

/// Consumes on `conn` until shutdown (`None`) or until the connection fails (`Some`).
async fn consume_on(
    ctx: &Arc<Context>,
    conn: &Arc<Connection>,
    tracker: &TaskTracker,
) -> Option<SessionEnd> {
    let lost = ctx.stop.child_token();
    tokio::spawn(poll_queue_depths(ctx.clone(), conn.clone(), lost.clone()));
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..ctx.config.worker.consumers {
        slots.spawn(consumer_slot(
            ctx.clone(),
            conn.clone(),
            slot,
            tracker.clone(),
            lost.clone(),
        ));
    }
    let mut failure = None;
    while let Some(joined) = slots.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
                lost.cancel();
            }
            Err(join) => error!(error = %join, "a consumer task panicked"),
        }
    }
    if ctx.stop.is_cancelled() {
        None
    } else {
        failure
    }
}

/// How often the work queues' depths are read for the metrics.
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// Reads the ready messages of the work queues and the DLQ for `llmq_queue_depth`.
async fn poll_queue_depths(ctx: Arc<Context>, conn: Arc<Connection>, stop: CancellationToken) {
    let t = &ctx.config.topology;
    let queues = [
        &t.processing_queue,
        &t.embeddings_queue,
        &t.dead_letter_queue,
    ];
    let mut channel = None;
    loop {
        if channel
            .as_ref()
            .is_none_or(|c: &lapin::Channel| !c.status().connected())
        {
            channel = conn.create_channel().await.ok();
        }
        if let Some(ch) = &channel {
            for q in queues {
                let passive = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                match ch
                    .queue_declare(q.as_str().into(), passive, FieldTable::default())
                    .await
                {
                    Ok(info) => ctx.metrics.queue_depth(q, info.message_count()),
                    // A missing queue closes the channel; it is reopened next round.
                    Err(_) => break,
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(DEPTH_EVERY) => {}
        }
    }
}

/// Keeps one consumer slot subscribed: a channel-level failure (a channel closed by the
/// broker, a consumer cancelled because its queue was deleted) reopens the channels after a
/// pause, redeclaring the topology; a connection-level failure is returned.
async fn consumer_slot(
    ctx: Arc<Context>,
    conn: Arc<Connection>,
    slot: u16,
    tracker: TaskTracker,
    stop: CancellationToken,
) -> Result<(), SessionEnd> {
    loop {
        let failure = match session(&ctx, &conn, slot, &tracker, &stop).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !conn.status().connected() {
            return Err(failure);
        }
        warn!(slot, error = %failure, "consumer channel failed; reopening");
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SLOT_RESTART_DELAY) => {}
        }
        debug!(slot, "redeclaring the topology");
        if let Err(e) = declare(&conn, &ctx.config).await {
            warn!(slot, error = %e, "redeclaring the topology failed");
        }
        debug!(slot, "resubscribing");
    }
}

/// Counts a subscribed slot in [`Health::consuming`] while alive.
struct Consuming<'a>(&'a Health);

impl<'a> Consuming<'a> {
    fn new(health: &'a Health) -> Self {
        health.consuming.fetch_add(1, Relaxed);
        Self(health)
    }
}

impl Drop for Consuming<'_> {
    fn drop(&mut self) {
        self.0.consuming.fetch_sub(1, Relaxed);
    }
}

/// Shortest time between two resubscriptions of a slot when the prefetch follows the
/// concurrency limit.
const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(1);

/// A delivery from one of a slot's consumers, or the end of that consumer's stream.
type Tagged = (String, Kind, Option<Result<Delivery, lapin::Error>>);

/// The merged deliveries of a slot's consumers.
type Streams = futures_util::stream::SelectAll<
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Tagged> + Send>>,
>;

/// One subscription of a slot, until `stop` or a failure.
///
/// When `worker.prefetch` is 0 the prefetch follows the concurrency limit. RabbitMQ applies
/// `basic.qos` to consumers created after it, so a new limit means new consumers: the slot
/// subscribes again with the new prefetch and cancels the old consumers, whose unacked
/// deliveries stay valid on the same channel and whose buffered ones are still handled.
async fn session(
    ctx: &Arc<Context>,
    conn: &Connection,
    slot: u16,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), SessionEnd> {
    let channel = conn.create_channel().await?;
    let publisher = Publisher::open(conn, ctx.config.topology.clone()).await?;
    let mut limit = ctx.flow.watch_limit();
    let mut current = *limit.borrow_and_update();
    let prefetches = |limit: usize| {
        (
            prefetch_for(&ctx.config, limit, Kind::Chat),
            prefetch_for(&ctx.config, limit, Kind::Embedding),
        )
    };
    let mut generation = 0u32;
    let mut streams = Streams::new();
    let mut live = subscribe(ctx, &channel, slot, generation, current, &mut streams).await?;
    let _consuming = Consuming::new(&ctx.health);
    let mut cancelled: Vec<String> = Vec::new();
    let mut last_change = Instant::now();
    let mut resubscribe_at: Option<Instant> = None;
    debug!(slot, prefetch = ?prefetches(current), "consuming");
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                for tag in &live {
                    let _ = channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                }
                // Deliveries already buffered but never started go back now, so another
                // replica can take them while this one drains.
                while let Some(Some((_, _, item))) = streams.next().now_or_never() {
                    if let Some(Ok(delivery)) = item {
                        nack(&delivery).await;
                    }
                }
                return Ok(());
            }
            changed = limit.changed(), if ctx.config.worker.prefetch == 0 => {
                if changed.is_err() {
                    continue;
                }
                let wanted = *limit.borrow_and_update();
                if prefetches(wanted) != prefetches(current) && resubscribe_at.is_none() {
                    // Let the limit settle for a moment; whatever it is then wins. The loop
                    // keeps dispatching meanwhile.
                    resubscribe_at = Some(last_change + RESUBSCRIBE_EVERY);
                }
                continue;
            }
            _ = tokio::time::sleep_until(resubscribe_at.unwrap_or_else(Instant::now).into()), if resubscribe_at.is_some() => {
                resubscribe_at = None;
                let wanted = *limit.borrow();
                if prefetches(wanted) == prefetches(current) {
                    continue;
                }
                generation += 1;
                let old = std::mem::take(&mut live);
                live = subscribe(ctx, &channel, slot, generation, wanted, &mut streams).await?;
                for tag in old {
                    channel
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await?;
                    cancelled.push(tag);
                }
                debug!(slot, from = ?prefetches(current), to = ?prefetches(wanted), "prefetch follows the concurrency limit");
                current = wanted;
                last_change = Instant::now();
                continue;
            }
            next = streams.next() => next,
        };
        match next {
            Some((_, kind, Some(Ok(delivery)))) => {
                // The task keeps the consuming channel open until it has acked: dropping the
                // last handle closes the channel, and the broker would requeue the delivery.
                let keep_open = channel.clone();
                let (ctx, publisher) = (ctx.clone(), publisher.clone());
                tracker.spawn(async move {
                    let task = handle(&ctx, &publisher, kind, &delivery);
                    if AssertUnwindSafe(task).catch_unwind().await.is_err() {
                        ctx.metrics.dead_lettered(kind.as_str(), "internal_error");
                        dead_letter_after_panic(&publisher, &delivery, ctx.processor.worker())
                            .await;
                    }
                    drop(keep_open);
                });
            }
            Some((_, _, Some(Err(e)))) => return Err(e.into()),
            Some((tag, _, None)) => {
                // A stream we cancelled ends quietly; any other was cancelled by the broker.
                if let Some(i) = cancelled.iter().position(|t| *t == tag) {
                    cancelled.swap_remove(i);
                } else {
                    return Err(SessionEnd::Cancelled);
                }
            }
            None => return Err(SessionEnd::Cancelled),
        }
        if !publisher.is_usable() {
            return Err(SessionEnd::PublisherClosed);
        }
    }
}

/// Sets the prefetch and subscribes to both work queues; returns the consumer tags.
async fn subscribe(
    ctx: &Context,
    channel: &lapin::Channel,
    slot: u16,
    generation: u32,
    limit: usize,
    streams: &mut Streams,
) -> Result<Vec<String>, lapin::Error> {
    let topo = &ctx.config.topology;
    let mut tags = Vec::with_capacity(2);
    for (kind, queue) in [
        (Kind::Chat, &topo.processing_queue),
        (Kind::Embedding, &topo.embeddings_queue),
    ] {
        let tag = format!(
            "llmq-{}-{slot}.{generation}-{}",
            ctx.processor.worker(),
            kind.as_str()
        );
        // basic.qos applies to the consumers created after it.
        channel
            .basic_qos(
                prefetch_for(&ctx.config, limit, kind),
                BasicQosOptions::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let (t1, t2) = (tag.clone(), tag.clone());
        // The end marker tells a cancelled consumer apart from an idle one.
        let stream = consumer
            .map(move |d| (t1.clone(), kind, Some(d)))
            .chain(futures_util::stream::iter([(t2, kind, None)]));
        streams.push(Box::pin(stream));
        tags.push(tag);
    }
    Ok(tags)
}

/// Each consumer's prefetch: fixed by `worker.prefetch`, else an equal share of the limit
/// plus a quarter.
/// The limit counts upstream calls, and a batched embedding call carries up to
/// `batch.max_items` messages, so the embeddings consumers take that many times more.
fn prefetch_for(config: &Config, limit: usize, kind: Kind) -> u16 {
    if config.worker.prefetch > 0 {
        return config.worker.prefetch;
    }
    let per_call = match kind {
        Kind::Chat => 1,
        Kind::Embedding => config.batch.max_items.max(1),
    };
    let consumers = usize::from(config.worker.consumers.max(1));
    // A quarter more than the calls allowed: deliveries whose result is being confirmed still
    // count against the prefetch, and a few waiting ones let the highest priority go first.
    let wanted = limit.saturating_mul(per_call).saturating_mul(5) / 4;
    let share = wanted.div_ceil(consumers).max(1);
    u16::try_from(share).unwrap_or(u16::MAX)
}

/// One delivery being settled.
struct Settling<'a> {
    ctx: &'a Context,
    publisher: &'a Publisher,
    delivery: &'a Delivery,
    kind: Kind,
    route: ReplyRoute,
}

/// Settles one delivery: parse, deduplicate, call with retries, publish confirmed, then ack.
async fn handle(ctx: &Context, publisher: &Publisher, kind: Kind, delivery: &Delivery) {
    let started = Instant::now();
    ctx.metrics.received(kind.as_str());
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
    let attempts = prior_attempts(delivery);
    let request_id = match &parsed {
        Ok(job) => job.request_id.clone(),
        Err(_) => request::request_id_of_invalid(&delivery.data, &delivery.properties),
    };
    let span = info_span!(
        "job",
        %request_id,
        kind = kind.as_str(),
        priority = delivery.properties.priority().unwrap_or(0),
        attempt = attempts + 1,
        delivery_tag = delivery.delivery_tag,
    );
    let s = Settling {
        ctx,
        publisher,
        delivery,
        kind,
        route: route_of(delivery, &request_id),
    };
    async {
        match parsed {
            Ok(job) => s.process(job, attempts, started).await,
            Err(invalid) => {
                let outcome = Outcome::DeadLetter {
                    kind: invalid.kind,
                    reason: invalid.message,
                };
                s.settle(None, outcome, attempts, None).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Upstream attempts made before this delivery: the count in its header, plus one when the
/// broker redelivers it (its previous delivery was being processed when a worker died or
/// handed it back), so a message that keeps killing workers still runs out of attempts.
fn prior_attempts(delivery: &Delivery) -> u32 {
    request::header_u32(&delivery.properties, retry::ATTEMPTS_HEADER)
        .unwrap_or(0)
        .saturating_add(u32::from(delivery.redelivered))
}

impl Settling<'_> {
    async fn process(&self, job: Job, prior: u32, started: Instant) {
        let ctx = self.ctx;
        let props = &self.delivery.properties;
        let mut first_failure = request::header_i64(props, retry::FIRST_FAILURE_HEADER);
        // Back before its time (a wait longer than the last retry tier): wait again.
        if let Some(not_before) = request::header_i64(props, retry::NOT_BEFORE_HEADER) {
            // The header comes from the message: saturate, and ignore a time beyond any wait
            // llmq sets, so a forged one can neither overflow nor park a request forever.
            let early = not_before.saturating_sub(unix_now_ms());
            if early > NOT_BEFORE_SLACK_MS && early <= MAX_NOT_BEFORE_MS {
                let attempts = request::header_u32(props, retry::ATTEMPTS_HEADER).unwrap_or(0);
                let wait = Duration::from_millis(early as u64);
                return self
                    .schedule_retry(wait, attempts, first_failure, "waiting for not-before")
                    .await;
            }
        }
        match ctx
            .store
            .claim(&job.request_id, ctx.processor.worker())
            .await
        {
            Ok(Claim::Acquired) => {}
            Ok(Claim::Done(body)) => {
                info!("duplicate of a finished request; re-publishing the stored result");
                let published =
                    with_publish_retries(|| self.publisher.result_body(&self.route, &body)).await;
                return finish(self.delivery, published).await;
            }
            Ok(Claim::Busy) => {
                debug!("another worker is processing this request; checking back later");
                let wait = retry::TIERS[0].max;
                return self
                    .schedule_retry(wait, prior, first_failure, "duplicate in progress")
                    .await;
            }
            Err(e) => match ctx.config.idempotency.on_store_error {
                OnStoreError::Requeue => {
                    warn!(error = %e, "idempotency store unreachable; requeueing the request");
                    let wait = retry::TIERS[0].max;
                    return self
                        .schedule_retry(wait, prior, first_failure, &e.to_string())
                        .await;
                }
                OnStoreError::Proceed => {
                    warn!(error = %e, "idempotency store unreachable; processing without deduplication");
                }
            },
        }
        // Checked after the lookup, so that a finished request redelivered after its last
        // attempt gets its stored result instead of a dead letter.
        if !ctx.policy.may_retry(prior) {
            let outcome = Outcome::DeadLetter {
                kind: "retries_exhausted",
                reason: format!(
                    "{prior} attempts already made (counting deliveries interrupted by a worker crash)"
                ),
            };
            return self.settle(Some(&job), outcome, prior, first_failure).await;
        }
        let mut attempt = prior;
        let estimate = job.token_estimate(ctx.config.llm.default_max_tokens);
        let outcome = loop {
            attempt += 1;
            if attempt > prior + 1 {
                ctx.store
                    .renew(&job.request_id, ctx.processor.worker())
                    .await;
            }
            // Waiting for a slot is not in-flight work: on shutdown it goes straight back.
            // Batched embeddings take their slot per upstream call, in the batcher.
            let permit = if job.kind() == Kind::Embedding && ctx.processor.batches_embeddings() {
                None
            } else {
                tokio::select! {
                    // A slot free right away means the work starts: shutdown lets it finish.
                    biased;
                    permit = ctx.flow.acquire(job.priority, estimate) => Some(permit),
                    _ = ctx.stop.cancelled() => {
                        ctx.store.release(&job.request_id, ctx.processor.worker()).await;
                        return nack(self.delivery).await;
                    }
                }
            };
            let call_started = Instant::now();
            let call =
                AssertUnwindSafe(ctx.processor.attempt(&job, attempt, started)).catch_unwind();
            let outcome = tokio::select! {
                outcome = call => outcome.unwrap_or_else(|_| Outcome::DeadLetter {
                    kind: "internal_error",
                    reason: "the worker panicked while processing this request".into(),
                }),
                _ = ctx.abort.cancelled() => {
                    info!(attempt, "shutdown deadline reached mid-call; handing the request back");
                    ctx.store.release(&job.request_id, ctx.processor.worker()).await;
                    return nack(self.delivery).await;
                }
            };
            // A batched call reports its latency and AIMD feedback itself, once per call.
            let batched = permit.is_none();
            drop(permit);
            let kind = self.kind.as_str();
            if !batched {
                ctx.metrics.upstream_call(kind, call_started.elapsed());
            }
            match &outcome {
                Outcome::Done(result) => {
                    if !batched {
                        ctx.flow.on_success();
                    }
                    let used = result
                        .usage
                        .as_ref()
                        .and_then(|u| u["total_tokens"].as_u64())
                        .unwrap_or(estimate);
                    ctx.flow.settle_tokens(estimate, used).await;
                }
                Outcome::Retry {
                    after, throttle, ..
                } => {
                    let why = if *throttle { "throttled" } else { "transient" };
                    ctx.metrics.failed(kind, why);
                    if *throttle && !batched {
                        ctx.flow.on_throttle();
                    }
                    if let Some(after) = after
                        && !batched
                    {
                        ctx.flow.pause_for(*after);
                    }
                }
                Outcome::DeadLetter {
                    kind: error_kind, ..
                } => ctx.metrics.failed(kind, error_kind),
            }
            let Outcome::Retry { after, reason, .. } = outcome else {
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
            ctx.metrics.retried(self.kind.as_str());
            if delay > ctx.policy.inline_max() {
                ctx.store
                    .release(&job.request_id, ctx.processor.worker())
                    .await;
                warn!(attempt, delay_ms = delay.as_millis() as u64, error = %reason, "transient failure; retrying through the retry queue");
                return self
                    .schedule_retry(delay, attempt, first_failure, &reason)
                    .await;
            }
            warn!(attempt, delay_ms = delay.as_millis() as u64, error = %reason, "transient failure; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = ctx.stop.cancelled() => {
                    info!(attempt, "shutting down during a retry wait; handing the request back");
                    ctx.store.release(&job.request_id, ctx.processor.worker()).await;
                    return nack(self.delivery).await;
                }
            }
        };
        self.settle(Some(&job), outcome, attempt, first_failure)
            .await;
    }

    /// Sends the delivery to a delayed-retry queue (confirmed), then acks it.
    async fn schedule_retry(
        &self,
        wait: Duration,
        attempts: u32,
        first_failure: Option<i64>,
        reason: &str,
    ) {
        let topo = &self.ctx.config.topology;
        let key = match self.kind {
            Kind::Chat => &topo.processing_key,
            Kind::Embedding => &topo.embeddings_key,
        };
        let published = with_publish_retries(|| {
            self.publisher
                .retry(self.delivery, key, wait, attempts, first_failure, reason)
        })
        .await;
        finish(self.delivery, published).await;
    }

    /// Publishes what an outcome produced, confirmed, then acks; or hands the delivery back.
    async fn settle(
        &self,
        job: Option<&Job>,
        outcome: Outcome,
        attempts: u32,
        first_failure: Option<i64>,
    ) {
        let ctx = self.ctx;
        let worker = ctx.processor.worker();
        let (kind, reason) = match outcome {
            Outcome::Done(result) => {
                let body = result.to_bytes();
                self.save(&body).await;
                let publish_started = Instant::now();
                let published =
                    with_publish_retries(|| self.publisher.result_body(&self.route, &body)).await;
                if published.is_ok() {
                    ctx.metrics.published(publish_started.elapsed());
                    let tokens = result
                        .usage
                        .as_ref()
                        .and_then(|u| u["total_tokens"].as_u64())
                        .unwrap_or(0);
                    ctx.metrics.succeeded(self.kind.as_str(), tokens);
                    debug!(attempts, latency_ms = result.latency_ms, "done");
                }
                return finish(self.delivery, published).await;
            }
            Outcome::DeadLetter { kind, reason } => (kind, reason),
            // Retries are decided before settling; one reaching here has run out of them.
            Outcome::Retry { reason, .. } => ("retries_exhausted", reason),
        };
        let failure = Failure {
            kind,
            reason: &reason,
            attempts,
            first_failure: first_failure.unwrap_or_else(unix_now),
            worker,
        };
        let published =
            with_publish_retries(|| self.publisher.dead_letter(self.delivery, &failure)).await;
        if published.is_ok() {
            error!(error_kind = kind, attempts, reason = %reason, "dead-lettered");
            ctx.metrics.dead_lettered(self.kind.as_str(), kind);
            // The caller hears of it too, so that an RPC caller never waits forever. The dead
            // letter is the durable record; this result is best effort.
            let mut result = JobResult::error(
                self.route.request_id.clone(),
                worker.to_string(),
                kind,
                crate::truncate(&reason, 1024),
            );
            result.attempts = attempts;
            result.kind = Some(self.kind.as_str());
            result.metadata = job.and_then(|j| j.metadata.clone());
            let body = result.to_bytes();
            // Error results are not stored: a replayed dead letter (`llmq dlq replay`) must
            // be processed again, not answered with its old error.
            if job.is_some() {
                let worker = ctx.processor.worker();
                ctx.store.release(&self.route.request_id, worker).await;
            }
            if let Err(e) = self.publisher.result_body(&self.route, &body).await {
                warn!(error = %e, "the error result could not be published; the dead letter is kept");
            }
        }
        finish(self.delivery, published).await;
    }

    async fn save(&self, body: &[u8]) {
        let worker = self.ctx.processor.worker();
        if let Err(e) = self
            .ctx
            .store
            .save(&self.route.request_id, worker, body)
            .await
        {
            warn!(error = %e, "could not store the result; a duplicate would call the upstream again");
        }
    }
}

/// A panic anywhere in handling a delivery: dead-letter it (confirmed) and ack, so it is
/// neither lost nor left unacked until the broker's consumer timeout.
async fn dead_letter_after_panic(publisher: &Publisher, delivery: &Delivery, worker: &str) {
    error!(
        delivery_tag = delivery.delivery_tag,
        "the worker panicked while handling a message; dead-lettering it"
    );
    let failure = Failure {
        kind: "internal_error",
        reason: "the worker panicked while handling this message",
        attempts: prior_attempts(delivery),
        first_failure: unix_now(),
        worker,
    };
    let published = with_publish_retries(|| publisher.dead_letter(delivery, &failure)).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_follows_the_limit_with_headroom() {
        let mut c = Config::default();
        c.worker.consumers = 4;
        c.batch.max_items = 64;
        assert_eq!(prefetch_for(&c, 256, Kind::Chat), 80);
        assert_eq!(prefetch_for(&c, 4, Kind::Chat), 2);
        assert_eq!(
            prefetch_for(&c, 16, Kind::Embedding),
            320,
            "a batched call carries 64"
        );
        assert_eq!(prefetch_for(&c, 100_000, Kind::Embedding), u16::MAX);
        c.worker.prefetch = 7;
        assert_eq!(
            prefetch_for(&c, 256, Kind::Chat),
            7,
            "a fixed prefetch wins"
        );
    }
}
