//! What a running worker shows the outside: readiness (connected, consuming, publishing not
//! blocked by a broker alarm), and the depths of its queues for the `llmq_queue_depth`
//! metric; the depths of the fair-share lanes for the worker itself too.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::{Stream, StreamExt};
use lapin::{Connection, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    broker::topology::{self, DepthReader},
    config::TopologyConfig,
    runtime::metrics::Metrics,
    upstream::routing::router::Router,
};

/// How often the depths of the work queues, their lanes and the DLQ are read.
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
    /// Each lane queue's last read, by name; see [`Health::lane_depth`].
    lane_depths: Mutex<HashMap<String, LaneRead>>,
}

/// A lane's last read.
#[derive(Debug, Clone, Copy)]
struct LaneRead {
    /// Its ready messages, once read.
    depth: Option<u32>,
    /// When it last held messages, as far as the reads saw.
    busy_at: Option<Instant>,
}

/// How long an embeddings lane is still consumed after it was last seen holding messages:
/// while its tenant's requests keep being moved in, consumers take them as they come and a
/// read may find it empty; a few reads in a row must, before it is left.
pub const LANE_LINGER: Duration = Duration::from_secs(30);

impl Health {
    /// Connected, consuming and able to publish: ready for traffic.
    pub fn ready(&self) -> bool {
        self.connected.load(Relaxed)
            && self.consuming.load(Relaxed) > 0
            && !self.blocked.load(Relaxed)
    }

    /// The ready messages of the lane queue named `queue` (`topology::lane_queue(work queue,
    /// lane)`) at its last read. Every lane of both work queues is read every 5 seconds, so
    /// the count is up to that old (requests moved in and taken out change it in between).
    /// `None` when it is not known: before the first read, when the last read failed (the
    /// lane does not exist), while the broker is unreachable, or for a name that is not a
    /// lane of this worker's topology.
    pub fn lane_depth(&self, queue: &str) -> Option<u32> {
        self.lane_depths().get(queue).and_then(|read| read.depth)
    }

    /// Whether the lane queue named `queue` held messages at a read within
    /// [`LANE_LINGER`]; not when it is not known (see [`Health::lane_depth`]): the lanes are
    /// read as soon as a session starts, and again every 5 seconds, so a lane that holds
    /// messages is found busy within that.
    pub fn lane_busy(&self, queue: &str) -> bool {
        self.lane_depths()
            .get(queue)
            .and_then(|read| read.busy_at)
            .is_some_and(|at| at.elapsed() < LANE_LINGER)
    }

    /// Records a lane's depth as read, `None` when it could not be read.
    fn set_lane_depth(&self, queue: &str, depth: Option<u32>) {
        let mut depths = self.lane_depths();
        match depth {
            Some(depth) => {
                let before = depths.get(queue).and_then(|read| read.busy_at);
                let busy_at = if depth > 0 {
                    Some(Instant::now())
                } else {
                    before
                };
                let depth = Some(depth);
                depths.insert(queue.to_string(), LaneRead { depth, busy_at });
            }
            None => {
                depths.remove(queue);
            }
        }
    }

    /// Notes that this replica just moved a request into the lane queue named `queue`: it
    /// is busy now, without waiting for the next read.
    pub fn lane_moved_into(&self, queue: &str) {
        let mut depths = self.lane_depths();
        let read = depths.entry(queue.to_string()).or_insert(LaneRead {
            depth: None,
            busy_at: None,
        });
        read.busy_at = Some(Instant::now());
    }

    /// Forgets every lane's depth: none can be read.
    fn forget_lane_depths(&self) {
        self.lane_depths().clear();
    }

    /// The lane depths; a panic while they were held left them whole (each write is one map
    /// operation), so a poisoned lock is used as it is.
    fn lane_depths(&self) -> std::sync::MutexGuard<'_, HashMap<String, LaneRead>> {
        self.lane_depths
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

/// Reads the ready messages of the work queues, their `lanes` in use (an earlier setting's
/// or another replica's too, as last found) and the DLQ every
/// [`DEPTH_EVERY`] until `stop`: all of them for the `llmq_queue_depth` metric, the lanes for
/// [`Health::lane_depth`] too. One passive declare each, on one channel while it lasts.
pub(super) async fn poll_queue_depths(
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    topo: TopologyConfig,
    lanes: watch::Receiver<super::prefetch::LaneSet>,
    conn: Arc<Connection>,
    stop: CancellationToken,
) {
    let queues = [
        topo.processing_queue.clone(),
        topo.embeddings_queue.clone(),
        topo.dead_letter_queue.clone(),
    ];
    let mut reader = DepthReader::new(&conn);
    loop {
        // The lanes in use as last found: another replica may have declared more.
        let lanes: Vec<String> = [&topo.processing_queue, &topo.embeddings_queue]
            .into_iter()
            .zip(lanes.borrow().iter())
            .flat_map(|(queue, lanes)| lanes.iter().map(|lane| topology::lane_queue(queue, *lane)))
            .collect();
        if read_depths(&mut reader, &queues, &lanes, &health, &metrics)
            .await
            .is_err()
        {
            // The connection is gone; the next session's poll reads them again.
            health.forget_lane_depths();
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(DEPTH_EVERY) => {}
        }
    }
    reader.close().await;
}

/// One round of [`poll_queue_depths`]. A queue that cannot be read (it does not exist) keeps
/// its last metric value and has no lane depth; an error means the connection is gone.
async fn read_depths(
    reader: &mut DepthReader<'_>,
    queues: &[String],
    lanes: &[String],
    health: &Health,
    metrics: &Metrics,
) -> Result<(), lapin::Error> {
    for queue in queues {
        if let Some(depth) = reader.read(queue).await? {
            metrics.queue_depth(queue, depth.messages);
        }
    }
    for lane in lanes {
        let depth = reader.read(lane).await?.map(|d| d.messages);
        if let Some(messages) = depth {
            metrics.queue_depth(lane, messages);
        }
        health.set_lane_depth(lane, depth);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_depth_is_known_from_its_read_until_a_read_fails() {
        let health = Health::default();
        let lane = topology::lane_queue("llm_processing", 3);
        assert_eq!(health.lane_depth(&lane), None, "not read yet");
        health.set_lane_depth(&lane, Some(7));
        assert_eq!(health.lane_depth(&lane), Some(7));
        assert_eq!(health.lane_depth("llm_processing.lane.04"), None);
        health.set_lane_depth(&lane, None);
        assert_eq!(health.lane_depth(&lane), None, "the lane is missing");
        health.set_lane_depth(&lane, Some(0));
        health.forget_lane_depths();
        assert_eq!(health.lane_depth(&lane), None, "the broker is unreachable");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_is_busy_until_it_was_seen_empty_for_a_while() {
        let health = Health::default();
        let lane = topology::lane_queue("llm_embeddings", 3);
        assert!(!health.lane_busy(&lane), "not read yet");
        health.set_lane_depth(&lane, Some(0));
        assert!(!health.lane_busy(&lane), "never seen holding any");
        health.set_lane_depth(&lane, Some(5));
        tokio::time::advance(LANE_LINGER / 2).await;
        health.set_lane_depth(&lane, Some(0));
        assert!(health.lane_busy(&lane), "held messages a moment ago");
        tokio::time::advance(LANE_LINGER / 2).await;
        assert!(!health.lane_busy(&lane), "empty for {LANE_LINGER:?}");
        health.lane_moved_into(&lane);
        assert!(health.lane_busy(&lane), "a request was moved into it");
        assert_eq!(health.lane_depth(&lane), Some(0), "as last read");
        health.forget_lane_depths();
        assert!(
            !health.lane_busy(&lane),
            "the broker is unreachable: not known"
        );
    }
}
