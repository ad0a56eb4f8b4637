//! What a running worker shows the outside: readiness (connected, consuming, publishing not
//! blocked by a broker alarm), and the depths of its queues for the `llmq_queue_depth`
//! metric.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use lapin::{Channel, Connection, Event};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    broker::topology, config::TopologyConfig, runtime::metrics::Metrics, upstream::router::Router,
};

/// How often the work queues' depths are read for the metrics.
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// Readiness, for the admin endpoints and the tests.
#[derive(Debug, Default)]
pub struct Health {
    /// Connected to the broker with the topology declared.
    pub connected: AtomicBool,
    /// Consumer slots currently subscribed.
    pub consuming: AtomicUsize,
    /// The broker blocks the publishing connection (a memory or disk alarm): no result can be
    /// confirmed, so no new upstream call starts.
    pub blocked: AtomicBool,
}

impl Health {
    /// Connected, consuming and able to publish: ready for traffic.
    pub fn ready(&self) -> bool {
        self.connected.load(Relaxed)
            && self.consuming.load(Relaxed) > 0
            && !self.blocked.load(Relaxed)
    }
}

/// How often the publishing connection's state is read besides its events.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Follows the publishing connection until it fails: while the broker blocks it
/// (`connection.blocked`, a memory or disk alarm), [`Health::blocked`] is set and the flow
/// control holds every call not yet started; `connection.unblocked` releases them.
///
/// `events` must come from [`Connection::events_listener`] called before anything was
/// published: lapin drops the events nobody listens to.
pub(super) async fn follow_publishing(
    health: Arc<Health>,
    flow: Arc<Router>,
    conn: Arc<Connection>,
    events: impl Stream<Item = Event>,
) {
    let mut events = std::pin::pin!(events);
    let mut tick = tokio::time::interval(STATUS_EVERY);
    loop {
        let status = conn.status();
        let blocked = status.blocked();
        if health.blocked.swap(blocked, Relaxed) != blocked {
            flow.hold(blocked);
            if blocked {
                warn!(
                    "the broker blocks publishing (memory or disk alarm): readiness off, no new upstream calls until it unblocks"
                );
            } else {
                info!("the broker unblocked publishing; resuming upstream calls");
            }
        }
        if !status.connected() {
            return;
        }
        tokio::select! {
            event = events.next() => match event {
                Some(Event::ConnectionBlocked(reason)) => {
                    warn!(%reason, "connection.blocked from the broker");
                }
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => {}
        }
    }
}

/// Clears the blocked state when a new connection replaces a blocked one: the broker blocks
/// the new one only once it publishes, and says so.
pub(super) fn unblock(health: &Health, flow: &Router) {
    health.blocked.store(false, Relaxed);
    flow.hold(false);
}

/// Counts a subscribed slot in [`Health::consuming`] while alive.
pub(super) struct Consuming<'a>(&'a Health);

impl<'a> Consuming<'a> {
    pub(super) fn new(health: &'a Health) -> Self {
        health.consuming.fetch_add(1, Relaxed);
        Self(health)
    }
}

impl Drop for Consuming<'_> {
    fn drop(&mut self) {
        self.0.consuming.fetch_sub(1, Relaxed);
    }
}

/// Reads the ready messages of the work queues and the DLQ every [`DEPTH_EVERY`] until
/// `stop`.
pub(super) async fn poll_queue_depths(
    metrics: Arc<Metrics>,
    topo: TopologyConfig,
    conn: Arc<Connection>,
    stop: CancellationToken,
) {
    let queues = [
        &topo.processing_queue,
        &topo.embeddings_queue,
        &topo.dead_letter_queue,
    ];
    let mut channel: Option<Channel> = None;
    loop {
        if channel.as_ref().is_none_or(|c| !c.status().connected()) {
            channel = conn.create_channel().await.ok();
        }
        if let Some(ch) = &channel {
            for q in queues {
                match topology::queue_depth(ch, q).await {
                    Ok(depth) => metrics.queue_depth(q, depth.messages),
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
