//! Consumer slots: each a consuming channel subscribed to both work queues and their lanes
//! ([`super::lanes`]), with its own confirm-mode publishing channel, and a prefetch that
//! follows the concurrency limit. The
//! consuming channels live on one connection and the publishing ones on another
//! ([`Links`]), so that a broker blocking publishers can never stop an ack or a nack.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Connection,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    Context, ack,
    health::Consuming,
    lanes::Origin,
    prefetch::{LaneSet, Plan},
    settle,
};
use crate::{
    broker::{publish::Publisher, topology},
    contract::headers::RetryState,
    contract::request::Kind,
};

/// Pause before a consumer slot reopens its channels after a channel-level failure.
const SLOT_RESTART_DELAY: Duration = Duration::from_secs(1);

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
    /// The publishing connection failed.
    #[error("the publishing connection closed")]
    PublishingLost,
}

/// The connections a session runs on (see [`crate::broker::connection::Connections`]).
#[derive(Clone)]
pub(super) struct Links {
    /// Consuming channels: deliveries, acks, nacks, cancels. Never blocked by the broker.
    pub consume: Arc<Connection>,
    /// Confirm-mode publishing channels: results, retries, dead letters.
    pub publish: Arc<Connection>,
    /// Lanes to consume per work queue (chat, embeddings): `topology.lanes`, and those of an
    /// earlier, larger setting still there or another replica's larger one
    /// ([`lanes_in_use`]), looked for again every [`LANE_SCAN_EVERY`] ([`follow_lanes`]):
    /// each slot subscribes again when they change.
    pub lanes: Arc<watch::Sender<LaneSet>>,
}

/// How often the lanes in use are looked for again: a replica with a larger
/// `topology.lanes` (one started during a rolling change of it) declares lanes this one did
/// not know of at its start, and moves requests into them; once it stops, they would be
/// consumed by nobody.
pub(super) const LANE_SCAN_EVERY: Duration = Duration::from_secs(10);

impl Links {
    /// Both connections are up.
    pub fn connected(&self) -> bool {
        self.consume.status().connected() && self.publish.status().connected()
    }
}

/// The lanes to consume of each work queue (chat, embeddings): the configured ones, and any
/// an earlier setting with more left, or another replica with more declared, so that none is
/// left with requests nobody takes.
pub(super) async fn lanes_in_use(
    conn: &Connection,
    topo: &crate::config::TopologyConfig,
) -> Result<LaneSet, lapin::Error> {
    let mut lanes = LaneSet::default();
    for (found, queue) in lanes
        .iter_mut()
        .zip([&topo.processing_queue, &topo.embeddings_queue])
    {
        *found = topology::lanes_in_use(conn, queue, topo.lanes).await?;
        let left: Vec<String> = found
            .iter()
            .filter(|lane| **lane >= topo.lanes)
            .map(|lane| topology::lane_queue(queue, *lane))
            .collect();
        if !left.is_empty() {
            warn!(
                configured = topo.lanes,
                left = ?left,
                "lanes beyond topology.lanes are there (an earlier, larger setting, or another replica's): consuming them too, moving nothing into them; delete them once empty and unused"
            );
        }
    }
    Ok(lanes)
}

/// Keeps one consumer slot subscribed: a channel-level failure (a channel closed by the
/// broker, a consumer cancelled because its queue was deleted) reopens the channels after a
/// pause, redeclaring the topology; a connection-level failure is returned.
pub(super) async fn consumer_slot(
    ctx: Arc<Context>,
    links: Links,
    slot: u16,
    tracker: TaskTracker,
    stop: CancellationToken,
) -> Result<(), SessionEnd> {
    loop {
        let failure = match session(&ctx, &links, slot, &tracker, &stop).await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if !links.connected() {
            return Err(failure);
        }
        warn!(slot, error = %failure, "consumer channel failed; reopening");
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SLOT_RESTART_DELAY) => {}
        }
        debug!(slot, "redeclaring the topology");
        if let Err(e) = topology::declare_on(&links.consume, &ctx.config.topology).await {
            warn!(slot, error = %e, "redeclaring the topology failed");
        }
        // A consumer cancelled by the broker may be an old lane's, deleted by an operator.
        match lanes_in_use(&links.consume, &ctx.config.topology).await {
            Ok(lanes) => {
                links.lanes.send_if_modified(|known| replace(known, lanes));
            }
            Err(e) => warn!(slot, error = %e, "looking for the lanes failed"),
        }
        debug!(slot, "resubscribing");
    }
}

/// Sets `known` to `found`; whether it changed.
fn replace(known: &mut LaneSet, found: LaneSet) -> bool {
    let changed = *known != found;
    *known = found;
    changed
}

/// Looks for the lanes in use on `conn` every [`LANE_SCAN_EVERY`] until `stop`, and
/// publishes them to the slots when they changed: a lane another replica declared since is
/// consumed here too, without waiting for a reconnect.
pub(super) async fn follow_lanes(
    conn: Arc<Connection>,
    topo: crate::config::TopologyConfig,
    lanes: Arc<watch::Sender<LaneSet>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(LANE_SCAN_EVERY) => {}
        }
        match lanes_in_use(&conn, &topo).await {
            Ok(found) => {
                if lanes.send_if_modified(|known| replace(known, found)) {
                    info!(lanes = ?*lanes.borrow(), "the lanes in use changed; consuming them");
                }
            }
            // The connection is gone: the next session looks again.
            Err(e) => debug!(error = %e, "looking for the lanes failed"),
        }
    }
}

/// Shortest time between two resubscriptions of a slot when the prefetch follows the
/// concurrency limit.
const RESUBSCRIBE_EVERY: Duration = Duration::from_secs(1);

/// How often a slot looks whether the embeddings lanes holding messages changed: the
/// depths are read every 5 s ([`super::health`]), and a lane this replica moves a request
/// into is busy at once.
const PLAN_EVERY: Duration = Duration::from_secs(1);

/// A delivery from one of a slot's consumers, or the end of that consumer's stream.
type Tagged = (String, Origin, Option<Result<Delivery, lapin::Error>>);

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
    links: &Links,
    slot: u16,
    tracker: &TaskTracker,
    stop: &CancellationToken,
) -> Result<(), SessionEnd> {
    let channel = links.consume.create_channel().await?;
    // A blocked publishing connection writes nothing, not even channel.open: shutdown must
    // not wait for it.
    let publisher = tokio::select! {
        _ = stop.cancelled() => return Ok(()),
        publisher = Publisher::open(&links.publish, ctx.config.topology.clone(), ctx.abort.clone()) => publisher?,
    };
    let mut limit = ctx.upstream.router().watch_limit();
    let mut current = *limit.borrow_and_update();
    let mut lanes = links.lanes.subscribe();
    let in_use = lanes.borrow_and_update().clone();
    let mut consumers =
        Consumers::subscribe(ctx, plan(ctx, current, &in_use), &channel, slot).await?;
    let _consuming = Consuming::new(&ctx.health);
    let mut last_change = Instant::now();
    let mut resubscribe_at: Option<Instant> = None;
    let mut look_again = tokio::time::interval(PLAN_EVERY);
    debug!(slot, plan = ?consumers.plan, "consuming");
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => {
                consumers.unsubscribe(ctx, &publisher, &channel).await;
                return Ok(());
            }
            changed = limit.changed(), if ctx.config.worker.prefetch == 0 => {
                if changed.is_err() {
                    continue;
                }
                let wanted = *limit.borrow_and_update();
                if plan(ctx, wanted, &lanes.borrow()) != consumers.plan && resubscribe_at.is_none() {
                    // Let the limit settle for a moment; whatever it is then wins. The loop
                    // keeps dispatching meanwhile.
                    resubscribe_at = Some(last_change + RESUBSCRIBE_EVERY);
                }
                continue;
            }
            _ = tokio::time::sleep_until(resubscribe_at.unwrap_or_else(Instant::now).into()), if resubscribe_at.is_some() => {
                resubscribe_at = None;
                let wanted = *limit.borrow();
                let next = plan(ctx, wanted, &lanes.borrow_and_update());
                if next == consumers.plan {
                    continue;
                }
                debug!(slot, from = ?consumers.plan, to = ?next, "prefetch follows the concurrency limit");
                consumers.resubscribe(ctx, next, &channel, slot).await?;
                current = wanted;
                last_change = Instant::now();
                continue;
            }
            // Its sender is in `links`, alive as long as the session.
            Ok(()) = lanes.changed() => {
                let next = plan(ctx, current, &lanes.borrow_and_update());
                debug!(slot, lanes = ?next.lanes, "consuming the lanes in use now");
                consumers.resubscribe(ctx, next, &channel, slot).await?;
                continue;
            }
            _ = look_again.tick() => {
                // Embeddings lanes that began or ceased to hold messages.
                let next = plan(ctx, current, &lanes.borrow());
                if next != consumers.plan {
                    debug!(slot, lanes = ?next.lanes, "consuming the embeddings lanes that hold messages");
                    consumers.resubscribe(ctx, next, &channel, slot).await?;
                    last_change = Instant::now();
                }
                continue;
            }
            next = consumers.streams.next() => next,
        };
        match next {
            Some((_, origin, Some(Ok(delivery)))) => {
                settle_in_task(ctx, &publisher, &channel, tracker, origin, delivery);
            }
            Some((_, _, Some(Err(e)))) => return Err(e.into()),
            Some((tag, _, None)) => {
                // A stream we cancelled ends quietly; any other was cancelled by the broker.
                if !consumers.forget_cancelled(&tag) {
                    // The channel is still open: the other consumers' buffered deliveries
                    // go back now, not once every task on this channel is over.
                    consumers.unsubscribe(ctx, &publisher, &channel).await;
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

/// The slot's plan under the concurrency limit `limit` with the lanes `in_use`: when it
/// changes, the slot subscribes again. An embeddings lane is consumed while it holds
/// messages, or did a moment ago ([`super::health::Health::lane_busy`]).
fn plan(ctx: &Context, limit: usize, in_use: &LaneSet) -> Plan {
    let queue = &ctx.config.topology.embeddings_queue;
    Plan::new(&ctx.config, limit, in_use, |lane| {
        ctx.health.lane_busy(&topology::lane_queue(queue, lane))
    })
}

/// Settles a delivery in a task of its own, tracked for the drain.
fn settle_in_task(
    ctx: &Arc<Context>,
    publisher: &Publisher,
    channel: &lapin::Channel,
    tracker: &TaskTracker,
    origin: Origin,
    delivery: Delivery,
) {
    // The task keeps the consuming channel open until it has acked: dropping the last
    // handle closes the channel, and the broker would requeue the delivery.
    let keep_open = channel.clone();
    let (ctx, publisher) = (ctx.clone(), publisher.clone());
    // Boxed: a delivery's future is about 10 KiB, and tokio moves a task's future several
    // times while spawning it and once more when it ends.
    tracker.spawn(Box::pin(async move {
        settle::handle(&ctx, &publisher, origin, &delivery).await;
        drop(keep_open);
    }));
}

/// A session's consumers on its channel: those of the current subscription, and those it
/// cancelled for a new plan whose streams have not ended yet.
struct Consumers {
    /// What the current subscription consumes, and with which prefetch.
    plan: Plan,
    /// The current subscription's consumer tags.
    live: Vec<String>,
    /// Tags the slot cancelled itself: the end of their stream is expected.
    cancelled: Vec<String>,
    /// Every consumer's deliveries, merged, each ending with a marker.
    streams: Streams,
    /// Counts the subscriptions, so that a new consumer's tag is never an old one's.
    generation: u32,
}

impl Consumers {
    /// The first subscription of a session.
    async fn subscribe(
        ctx: &Context,
        plan: Plan,
        channel: &lapin::Channel,
        slot: u16,
    ) -> Result<Self, lapin::Error> {
        let generation = 0;
        let mut streams = Streams::new();
        let live = subscribe(ctx, &plan, channel, slot, generation, &mut streams).await?;
        Ok(Self {
            plan,
            live,
            cancelled: Vec::new(),
            streams,
            generation,
        })
    }

    /// Subscribes again following `plan`, then cancels the consumers before: their
    /// deliveries stay valid on the channel, and their buffered ones still come.
    async fn resubscribe(
        &mut self,
        ctx: &Context,
        plan: Plan,
        channel: &lapin::Channel,
        slot: u16,
    ) -> Result<(), lapin::Error> {
        self.generation += 1;
        let old = std::mem::take(&mut self.live);
        self.live = subscribe(
            ctx,
            &plan,
            channel,
            slot,
            self.generation,
            &mut self.streams,
        )
        .await?;
        self.plan = plan;
        for tag in old {
            channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await?;
            self.cancelled.push(tag);
        }
        Ok(())
    }

    /// Whether the slot cancelled the consumer `tag` itself, which it then forgets: its
    /// stream ended as expected.
    fn forget_cancelled(&mut self, tag: &str) -> bool {
        match self.cancelled.iter().position(|t| t == tag) {
            Some(i) => {
                self.cancelled.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// [`unsubscribe`] the current consumers.
    async fn unsubscribe(
        &mut self,
        ctx: &Context,
        publisher: &Publisher,
        channel: &lapin::Channel,
    ) {
        unsubscribe(ctx, publisher, channel, &self.live, &mut self.streams).await;
    }
}

/// At shutdown, or when the broker cancelled one of the consumers: cancels the others, and
/// gives back at once the deliveries buffered but never started ([`ack::give_back`]: requeued with their counts, not counted as a
/// redelivery), so another replica can take them while this one drains.
async fn unsubscribe(
    ctx: &Context,
    publisher: &Publisher,
    channel: &lapin::Channel,
    live: &[String],
    streams: &mut Streams,
) {
    for tag in live {
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    let mut buffered = Vec::new();
    while let Some(Some((_, origin, item))) = streams.next().now_or_never() {
        if let Some(Ok(delivery)) = item {
            buffered.push((origin, delivery));
        }
    }
    let give_back = buffered.iter().map(|(origin, delivery)| {
        let state = RetryState::read(&delivery.properties);
        ack::give_back(ctx, publisher, *origin, delivery, state)
    });
    futures_util::future::join_all(give_back).await;
}

/// Subscribes to both work queues and the lanes of each that `plan` names, each consumer
/// with its kind's prefetch; returns the consumer tags. The broker delivers only from queues
/// that hold messages, so an idle chat lane costs a consumer and nothing more.
async fn subscribe(
    ctx: &Context,
    plan: &Plan,
    channel: &lapin::Channel,
    slot: u16,
    generation: u32,
    streams: &mut Streams,
) -> Result<Vec<String>, lapin::Error> {
    let topo = &ctx.config.topology;
    let mut tags = Vec::new();
    for kind in Kind::ALL {
        let queue = topo.work_queue(kind);
        let lanes = plan.lanes[kind.index()]
            .iter()
            .map(|&lane| (Some(lane), topology::lane_queue(queue, lane)));
        // basic.qos applies to the consumers created after it: set before each kind's.
        channel
            .basic_qos(plan.prefetch(kind), BasicQosOptions::default())
            .await?;
        for (lane, queue) in std::iter::once((None, queue.to_string())).chain(lanes) {
            let origin = Origin { kind, lane };
            let mut tag = format!(
                "llmq-{}-{slot}.{generation}-{}",
                ctx.worker(),
                kind.as_str()
            );
            if let Some(lane) = lane {
                tag.push_str(&format!("-lane.{lane:02x}"));
            }
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
                .map(move |d| (t1.clone(), origin, Some(d)))
                .chain(futures_util::stream::iter([(t2, origin, None)]));
            streams.push(Box::pin(stream));
            tags.push(tag);
        }
    }
    Ok(tags)
}
