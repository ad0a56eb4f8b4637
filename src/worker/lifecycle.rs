//! The worker's life: a broker connection kept alive (reconnect with backoff, redeclare the
//! topology), the consumer slots run on it, and at shutdown the drain of in-flight work
//! within `worker.shutdown_grace_secs`, after which unfinished work is handed back.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::Connection;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use super::{
    Context, health,
    subscribe::{self, SessionEnd},
};
use crate::broker::{connection, publish, topology};

/// After the shutdown grace period, how long aborted tasks get to hand their work back.
const ABORT_GRACE: Duration = Duration::from_secs(3);
/// How long closing the connection may take at shutdown (a blocked broker never answers).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects, consumes until shutdown or a lost connection, reconnects; then drains.
pub(super) async fn run(ctx: Arc<Context>) {
    let worker = ctx.worker().to_string();
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
        if let Err(e) = topology::declare_on(&conn, &ctx.config.topology).await {
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "declaring the topology failed");
            let _ = conn.close(200, "topology failed".into()).await;
            pause(&ctx.stop, delay).await;
            continue;
        }
        if let Err(e) = publish::check_impersonation(&conn).await {
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            error!(error = %e, retry_in_ms = delay.as_millis() as u64, "not consuming");
            let _ = conn.close(200, "impersonation refused".into()).await;
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

/// Consumes on `conn` until shutdown (`None`) or until the connection fails (`Some`).
async fn consume_on(
    ctx: &Arc<Context>,
    conn: &Arc<Connection>,
    tracker: &TaskTracker,
) -> Option<SessionEnd> {
    let lost = ctx.stop.child_token();
    tokio::spawn(health::poll_queue_depths(
        ctx.metrics.clone(),
        ctx.config.topology.clone(),
        conn.clone(),
        lost.clone(),
    ));
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..ctx.config.worker.consumers {
        slots.spawn(subscribe::consumer_slot(
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
