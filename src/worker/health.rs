//! What a running worker shows the outside: readiness, and the depths of its queues for
//! the `llmq_queue_depth` metric.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::{broker::topology, config::TopologyConfig, runtime::metrics::Metrics};

/// How often the work queues' depths are read for the metrics.
const DEPTH_EVERY: Duration = Duration::from_secs(5);

/// Readiness, for the admin endpoints and the tests.
#[derive(Debug, Default)]
pub struct Health {
    /// Connected to the broker with the topology declared.
    pub connected: AtomicBool,
    /// Consumer slots currently subscribed.
    pub consuming: AtomicUsize,
}

impl Health {
    /// Connected and consuming: ready for traffic.
    pub fn ready(&self) -> bool {
        self.connected.load(Relaxed) && self.consuming.load(Relaxed) > 0
    }
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
