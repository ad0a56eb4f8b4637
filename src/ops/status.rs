//! `llmq status`: depths and consumers of every queue of the topology.

use std::fmt::Write;

use serde::Serialize;

use super::OpsError;
use crate::{
    broker::{connection, retry, topology},
    config::Config,
};

/// One queue in `llmq status`.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    /// Its name.
    pub queue: String,
    /// Ready messages.
    pub messages: u32,
    /// Consumers subscribed.
    pub consumers: u32,
}

/// Depths and consumers of every queue of the topology (missing ones are skipped).
pub async fn status(config: &Config) -> Result<Vec<QueueStatus>, OpsError> {
    let conn = connection::connect(&config.amqp, "llmq status").await?;
    let t = &config.topology;
    let mut queues = vec![
        t.processing_queue.clone(),
        t.embeddings_queue.clone(),
        t.results_queue.clone(),
        t.dead_letter_queue.clone(),
        t.unroutable_queue.clone(),
    ];
    queues.extend(
        retry::TIERS
            .iter()
            .map(|tier| topology::retry_queue(t, tier.name)),
    );
    let mut out = Vec::new();
    for queue in queues {
        // A passive declare of a missing queue closes its channel: one channel per queue.
        let channel = conn.create_channel().await?;
        if let Ok(depth) = topology::queue_depth(&channel, &queue).await {
            out.push(QueueStatus {
                queue,
                messages: depth.messages,
                consumers: depth.consumers,
            });
            let _ = channel.close(200, "ok".into()).await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// The table `llmq status` prints.
pub fn table(queues: &[QueueStatus]) -> String {
    let mut out = format!("{:<48} {:>10} {:>10}\n", "queue", "messages", "consumers");
    for q in queues {
        let _ = writeln!(
            out,
            "{:<48} {:>10} {:>10}",
            q.queue, q.messages, q.consumers
        );
    }
    out
}
