//! The worker's life: its two broker connections (consuming, publishing) kept alive
//! (reconnect with backoff, redeclare the topology), the consumer slots run on them, and at
//! shutdown the drain of in-flight work within `worker.shutdown_grace_secs`, after which
//! unfinished work is handed back. A broker alarm blocks only the publishing connection, so
//! the drain can still ack and nack.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::{Connection, Event};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use super::{
    Context, health,
    subscribe::{self, Links, SessionEnd},
};
use crate::{
    broker::{
        arguments, connection, publish,
        topology::{self, DeclareError},
        version::{self, BrokerVersion},
    },
    config::QueueType,
};

/// After the shutdown grace period, how long aborted tasks get to hand their work back.
const ABORT_GRACE: Duration = Duration::from_secs(3);
/// How long closing a connection may take at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects, consumes until shutdown or a lost connection, reconnects; then drains.
pub(super) async fn run(ctx: Arc<Context>) {
    let tracker = TaskTracker::new();
    let last = consume_until_stopped(&ctx, &tracker).await;
    drain(&ctx, &tracker).await;
    if let Some(links) = last {
        close(&links, "llmq worker shutdown").await;
    }
    info!("worker stopped");
}

/// Sets up the connections and consumes on them, again after every lost connection, until
/// shutdown: at the broker addresses in turn (see [`connection::Rotation`]), starting after
/// the last one that failed. Returns the last connections consumed on: they stay open for
/// the drain to ack and nack on.
async fn consume_until_stopped(ctx: &Arc<Context>, tracker: &TaskTracker) -> Option<Links> {
    let worker = ctx.worker().to_string();
    let conn_name = format!("llmq worker {worker}");
    let mut backoff = reconnect_backoff();
    let mut rotation = connection::Rotation::new(ctx.config.amqp.addresses().len());
    let mut last: Option<Links> = None;
    while !ctx.stop.is_cancelled() {
        let (links, events) = match set_up(ctx, &conn_name, &mut rotation, &mut backoff).await {
            Setup::Ready(links, events) => (links, events),
            Setup::Retry => continue,
            Setup::Stopped => break,
        };
        rotation.connected();
        health::unblock(&ctx.health, ctx.upstream.router());
        backoff = reconnect_backoff();
        let addresses = ctx.config.amqp.addresses();
        info!(
            url = %addresses[rotation.next()],
            address = rotation.next() + 1,
            addresses = addresses.len(),
            worker = %worker,
            consumers = ctx.config.worker.consumers,
            max_inflight = ctx.config.worker.max_inflight,
            queues = ?[&ctx.config.topology.processing_queue, &ctx.config.topology.embeddings_queue],
            upstreams = ?ctx.upstream.router().deployments().iter().map(|d| d.name()).collect::<Vec<_>>(),
            "connected; consuming"
        );
        ctx.health.connected.store(true, Relaxed);
        let lost = consume_on(ctx, &links, events, tracker).await;
        ctx.health.connected.store(false, Relaxed);
        last = Some(links);
        match lost {
            None => break,
            Some(e) => {
                ctx.metrics.reconnects.inc();
                rotation.lost();
                warn!(
                    error = %e,
                    next = %addresses[rotation.next()],
                    "broker connection lost; reconnecting"
                );
            }
        }
    }
    last
}

/// The publishing connection's events (blocked, unblocked, closed), boxed: lapin's stream
/// type cannot be named, and is taken once per connection.
type Events = std::pin::Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

/// What one attempt to set up the connections came to.
enum Setup {
    /// Connected, the topology declared, impersonation refused: ready to consume, with the
    /// publishing connection's events.
    Ready(Links, Events),
    /// A step failed (logged, and the backoff waited out): try again.
    Retry,
    /// Shutdown came first.
    Stopped,
}

/// Connects both connections to the address `rotation` is at, declares the topology (and
/// finds the lanes in use), and checks that the broker refuses impersonation. A failed step
/// is logged, its connections closed, and the rotation moved on to the next address; after a
/// whole round of failures, the next delay of `backoff` is waited out first (shutdown cuts
/// it short).
async fn set_up(
    ctx: &Context,
    conn_name: &str,
    rotation: &mut connection::Rotation,
    backoff: &mut impl Iterator<Item = Duration>,
) -> Setup {
    let addresses = ctx.config.amqp.addresses();
    // Never out of range: the rotation goes round these, and there is at least one
    // (`Worker::new`).
    let url = &addresses[rotation.next()];
    let conns = tokio::select! {
        _ = ctx.stop.cancelled() => return Setup::Stopped,
        conns = connection::connect_pair(&ctx.config.amqp, url, conn_name) => conns,
    };
    let conns = match conns {
        Ok(conns) => conns,
        Err(e) => {
            let delay = after_failure(rotation, backoff);
            let next = &addresses[rotation.next()];
            warn!(error = %e, %next, retry_in_ms = delay.as_millis() as u64, "broker unreachable");
            pause(&ctx.stop, delay).await;
            return Setup::Retry;
        }
    };
    // Listen before anything is published: lapin drops the events nobody listens to.
    let events: Events = Box::pin(conns.publish.events_listener());
    let links = Links {
        consume: Arc::new(conns.consume),
        publish: Arc::new(conns.publish),
        lanes: Arc::new(tokio::sync::watch::Sender::default()),
    };
    // Only quorum queues' priorities depend on it: classic ones open no extra connection.
    let version = match ctx.config.topology.queue_type {
        QueueType::Quorum => version::announced(url, &ctx.config.amqp.tls).await,
        QueueType::Classic => None,
    };
    let declared = match topology::declare_on(&links.consume, &ctx.config.topology).await {
        Ok(()) => subscribe::lanes_in_use(&links.consume, &ctx.config.topology)
            .await
            .map_err(DeclareError::from),
        Err(e) => Err(e),
    };
    match declared {
        Ok(lanes) => {
            log_queue_type(ctx, version);
            links.lanes.send_replace(lanes);
        }
        // Waiting would not change it: the fleet must be stopped and the topology moved.
        Err(e @ DeclareError::TypeMismatch { .. }) => {
            close(&links, "queue type mismatch").await;
            ctx.refuse(e);
            return Setup::Stopped;
        }
        Err(e) => {
            let delay = after_failure(rotation, backoff);
            warn!(error = %e, %url, retry_in_ms = delay.as_millis() as u64, "declaring the topology failed");
            close(&links, "topology failed").await;
            pause(&ctx.stop, delay).await;
            return Setup::Retry;
        }
    }
    // On the publishing connection: the probe publishes, and a connection that publishes
    // is one the broker may block.
    let checked = tokio::select! {
        _ = ctx.stop.cancelled() => {
            close(&links, "llmq worker shutdown").await;
            return Setup::Stopped;
        }
        checked = publish::check_impersonation(&links.publish) => checked,
    };
    if let Err(e) = checked {
        let delay = after_failure(rotation, backoff);
        error!(error = %e, %url, retry_in_ms = delay.as_millis() as u64, "not consuming");
        close(&links, "impersonation refused").await;
        pause(&ctx.stop, delay).await;
        return Setup::Retry;
    }
    Setup::Ready(links, events)
}

/// Says what the work queues are and what a message's priority does in them on this broker.
fn log_queue_type(ctx: &Context, version: Option<BrokerVersion>) {
    let topo = &ctx.config.topology;
    let queues = arguments::work_queues(topo.queue_type, topo.max_priority, version);
    match topo.queue_type {
        QueueType::Classic => info!(
            queue_type = %topo.queue_type,
            priorities = %queues.priorities,
            "topology declared"
        ),
        QueueType::Quorum => info!(
            queue_type = %topo.queue_type,
            broker_version = %version.map_or_else(|| "unknown".to_string(), |v| v.to_string()),
            priorities = %queues.priorities,
            "topology declared"
        ),
    }
}

/// Waits for the work in flight for `worker.shutdown_grace_secs`, then aborts what is left
/// (which hands its delivery back) and gives it [`ABORT_GRACE`] to do so.
async fn drain(ctx: &Context, tracker: &TaskTracker) {
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
}

/// Closes both connections, each within [`CLOSE_TIMEOUT`]. Closing the consuming one hands
/// back whatever is still unacked. A blocked publishing connection is left to close when the
/// broker unblocks it: lapin cannot write the close before, and nothing waits on it.
async fn close(links: &Links, why: &str) {
    let close_one = |conn: Arc<Connection>, which: &'static str| {
        let why = why.to_string();
        async move {
            if !conn.status().connected() {
                return;
            }
            if conn.status().blocked() {
                warn!(
                    connection = which,
                    "the broker blocks this connection; not waiting for its close"
                );
                return;
            }
            match tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, why.into())).await {
                Ok(Ok(())) => {}
                // Channels closing at the same time make lapin report the close as failed.
                Ok(Err(e)) => {
                    debug!(connection = which, error = %e, "closing the broker connection")
                }
                Err(_) => warn!(
                    connection = which,
                    "the broker did not answer the close; exiting anyway"
                ),
            }
        }
    };
    tokio::join!(
        close_one(links.consume.clone(), "consume"),
        close_one(links.publish.clone(), "publish"),
    );
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

/// How long to wait after the address at `rotation` failed: nothing while other addresses
/// of the round are left to try, else the next delay of `backoff` (which never ends; 30 s
/// should it).
fn after_failure(
    rotation: &mut connection::Rotation,
    backoff: &mut impl Iterator<Item = Duration>,
) -> Duration {
    if rotation.failed() {
        backoff.next().unwrap_or(Duration::from_secs(30))
    } else {
        Duration::ZERO
    }
}

/// Waits `delay`, or until shutdown.
async fn pause(stop: &CancellationToken, delay: Duration) {
    if delay.is_zero() {
        return;
    }
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(delay) => {}
    }
}

/// Consumes on `links` until shutdown (`None`) or until a connection fails (`Some`);
/// follows the publishing connection's `events` for broker alarms meanwhile.
async fn consume_on(
    ctx: &Arc<Context>,
    links: &Links,
    events: impl futures_util::Stream<Item = Event>,
    tracker: &TaskTracker,
) -> Option<SessionEnd> {
    let lost = ctx.stop.child_token();
    tokio::spawn(super::cancel::listen(
        links.consume.clone(),
        ctx.config.topology.control_exchange.clone(),
        ctx.cancels.clone(),
        lost.clone(),
    ));
    tokio::spawn(health::poll_queue_depths(
        ctx.health.clone(),
        ctx.metrics.clone(),
        ctx.config.topology.clone(),
        links.lanes.subscribe(),
        links.consume.clone(),
        lost.clone(),
    ));
    tokio::spawn(subscribe::follow_lanes(
        links.consume.clone(),
        ctx.config.topology.clone(),
        links.lanes.clone(),
        lost.clone(),
    ));
    let publishing = health::follow_publishing(
        ctx.health.clone(),
        ctx.upstream.router().clone(),
        links.publish.clone(),
        events,
    );
    let mut publishing = std::pin::pin!(publishing);
    let mut publishing_over = false;
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..ctx.config.worker.consumers {
        slots.spawn(subscribe::consumer_slot(
            ctx.clone(),
            links.clone(),
            slot,
            tracker.clone(),
            lost.clone(),
        ));
    }
    let mut failure = None;
    loop {
        let joined = tokio::select! {
            joined = slots.join_next() => joined,
            () = &mut publishing, if !publishing_over => {
                publishing_over = true;
                failure.get_or_insert(SessionEnd::PublishingLost);
                lost.cancel();
                continue;
            }
        };
        match joined {
            None => break,
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => {
                failure.get_or_insert(e);
                lost.cancel();
            }
            Some(Err(join)) => error!(error = %join, "a consumer task panicked"),
        }
    }
    if ctx.stop.is_cancelled() {
        None
    } else {
        failure
    }
}
