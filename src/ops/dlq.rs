//! `llmq dlq list | replay | purge`: the dead-letter queue, inspected and replayed.
//!
//! Listing takes messages with `basic.get` without acking them and puts them back in their
//! order: nothing is lost or reordered. Replaying
//! publishes each chosen dead letter back to the request exchange with publisher confirms,
//! and only then acks (removes) it from the DLQ.

use std::collections::HashSet;

use lapin::{
    BasicProperties,
    message::BasicGetMessage,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueuePurgeOptions,
    },
};
use serde::Serialize;

use super::{OpsError, open};
use crate::{
    broker::{
        publish::publish_confirmed,
        topology::{self, queue_depth},
    },
    config::{Config, TopologyConfig},
    contract::{
        ErrorKind,
        headers::{self, DeadLetterInfo},
        request::{self, Kind},
    },
    runtime::clock::unix_now,
};

/// A dead letter as `llmq dlq list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    /// The request's id.
    pub request_id: String,
    /// `x-error-kind`.
    pub error_kind: String,
    /// `x-error`.
    pub reason: String,
    /// `x-attempts`.
    pub attempts: u32,
    /// Seconds since it was dead-lettered.
    pub age_secs: i64,
    /// The routing key it came with.
    pub routing_key: String,
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every message in the DLQ.
    All,
    /// Only these request ids.
    Ids(HashSet<String>),
    /// Only dead letters of this kind (`x-error-kind`), e.g. `budget_exceeded` once the
    /// budgets reset.
    Kind(ErrorKind),
}

fn describe(m: &BasicGetMessage) -> DeadLetter {
    let d = &m.delivery;
    let info = DeadLetterInfo::read(&d.properties);
    DeadLetter {
        request_id: request::request_id_of_invalid(&d.data, &d.properties),
        age_secs: (unix_now() - info.last_failure.unwrap_or_else(unix_now)).max(0),
        routing_key: info
            .original_routing_key
            .unwrap_or_else(|| d.routing_key.to_string()),
        error_kind: info.kind,
        reason: info.reason,
        attempts: info.attempts,
    }
}

/// The first `limit` dead letters, left in place and in order.
pub async fn list(config: &Config, limit: usize) -> Result<Vec<DeadLetter>, OpsError> {
    let (conn, channel) = open(config, "llmq dlq list").await?;
    let queue = config.topology.dead_letter_queue.as_str();
    let count = queue_depth(&channel, queue).await?.messages;
    let mut out = Vec::new();
    let mut taken = Vec::new();
    for _ in 0..limit.min(count as usize) {
        match channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        {
            Some(m) => {
                out.push(describe(&m));
                taken.push(m);
            }
            None => break,
        }
    }
    requeue_in_order(&taken).await?;
    let _ = channel.close(200, "listed".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// Moves the chosen dead letters back to the request exchange (confirmed before each is
/// removed from the DLQ); returns the replayed ones. `reset_attempts` gives them a fresh
/// attempt count; without it a request that ran out of attempts dead-letters again at once.
pub async fn replay(
    config: &Config,
    selection: &Selection,
    reset_attempts: bool,
) -> Result<Vec<DeadLetter>, OpsError> {
    let (conn, channel) = open(config, "llmq dlq replay").await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let topo = &config.topology;
    let queue = topo.dead_letter_queue.as_str();
    let count = queue_depth(&channel, queue).await?.messages;
    let mut replayed = Vec::new();
    let mut kept = Vec::new();
    for _ in 0..count {
        let Some(m) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
        else {
            break;
        };
        let info = describe(&m);
        let chosen = match selection {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&info.request_id),
            Selection::Kind(kind) => info.error_kind == kind.as_str(),
        };
        if !chosen {
            kept.push(m);
            continue;
        }
        let key = replay_key(topo, &info.routing_key);
        let props = cleaned(&m.delivery.properties, reset_attempts);
        let exchange = &topo.request_exchange;
        let data = &m.delivery.data;
        if let Err(source) = publish_confirmed(&publisher, exchange, &key, true, data, props).await
        {
            let _ = channel.close(200, "replay stopped".into()).await;
            return Err(OpsError::NotConfirmed {
                request_id: info.request_id,
                source,
            });
        }
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed.push(info);
    }
    requeue_in_order(&kept).await?;
    let _ = channel.close(200, "replayed".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(replayed)
}

/// Puts taken messages back in their order: nacked one by one, first first. A classic queue
/// puts a requeued message back where it was, whatever the order of the nacks; a quorum
/// queue delivers requeued messages first, in the order they came back, so they must come
/// back in the order they were taken.
async fn requeue_in_order(taken: &[BasicGetMessage]) -> Result<(), OpsError> {
    for m in taken {
        m.delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await?;
    }
    Ok(())
}

/// The work key of the kind a dead letter was delivered as, read from the routing key it
/// came with: a work key, or the name of a work queue or of one of its lanes (a request
/// counted as redelivered, given back at a shutdown or moved to its tenant's lane was
/// republished to its queue by name, through the default exchange). Anything else goes to
/// the chat key, where a request's own `kind` field still decides what it is.
fn replay_key(topo: &TopologyConfig, original: &str) -> String {
    let by_key = Kind::ALL
        .into_iter()
        .find(|k| topo.work_key(*k) == original);
    let by_queue = || {
        Kind::ALL.into_iter().find(|k| {
            let queue = topo.work_queue(*k);
            original == queue || topology::lane_number(original, queue).is_some()
        })
    };
    let kind = by_key.or_else(by_queue).unwrap_or(Kind::Chat);
    topo.work_key(kind).to_string()
}

/// The properties without the failure headers (and, on request, the attempt count).
fn cleaned(props: &BasicProperties, reset_attempts: bool) -> BasicProperties {
    props
        .clone()
        .with_headers(headers::for_replay(props, reset_attempts))
}

/// How many dead letters the DLQ holds (what `llmq dlq purge` asks about).
pub async fn count(config: &Config) -> Result<u32, OpsError> {
    let (conn, channel) = open(config, "llmq dlq purge").await?;
    let depth = queue_depth(&channel, &config.topology.dead_letter_queue).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(depth?.messages)
}

/// Empties the DLQ; returns how many messages it held.
pub async fn purge(config: &Config) -> Result<u32, OpsError> {
    let (conn, channel) = open(config, "llmq dlq purge").await?;
    let n = channel
        .queue_purge(
            config.topology.dead_letter_queue.as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(n)
}

/// The table `llmq dlq list` prints.
pub fn table(items: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:<38} {:<20} {:>8} {:>8}  reason\n",
        "request_id", "error_kind", "attempts", "age_s"
    );
    for d in items {
        out.push_str(&format!(
            "{:<38} {:<20} {:>8} {:>8}  {}\n",
            d.request_id,
            d.error_kind,
            d.attempts,
            d.age_secs,
            crate::truncate(&d.reason, 120)
        ));
    }
    out
}

/// One JSON object per line, as `llmq dlq list --json` prints them.
pub fn json_lines(items: &[DeadLetter]) -> String {
    items
        .iter()
        .map(|d| serde_json::to_string(d).unwrap_or_default() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_is_replayed_to_the_work_key_of_its_queue() {
        let topo = TopologyConfig::default();
        let (chat, embed) = (topo.processing_key.as_str(), topo.embeddings_key.as_str());
        for (original, key) in [
            (chat, chat),
            (embed, embed),
            ("llm_processing", chat),
            ("llm_embeddings", embed),
            ("llm_processing.lane.0a", chat),
            ("llm_embeddings.lane.0a", embed),
            ("llm_embeddings.lane.ff", embed),
            // Not a lane: the chat key, where the body's `kind` decides.
            ("llm_embeddings.lane.0A", chat),
            ("llm_embeddings.lane.100", chat),
            ("llm_embeddings.other", chat),
            ("", chat),
        ] {
            assert_eq!(replay_key(&topo, original), key, "{original:?}");
        }
    }
}
