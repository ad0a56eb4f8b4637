//! Queue tooling in the same binary: `llmq dlq list | replay | purge`, `llmq status`,
//! `llmq topology`.
//!
//! Listing takes messages with `basic.get` without acking them and puts them back in their
//! order: nothing is lost or reordered. Replaying
//! publishes each chosen dead letter back to the request exchange with publisher confirms,
//! and only then acks (removes) it from the DLQ.

use std::collections::HashSet;

use lapin::{
    BasicProperties, Channel, Connection,
    message::BasicGetMessage,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde::Serialize;

use crate::{
    broker::connection,
    broker::publish::{header_str, unix_now},
    broker::retry,
    broker::topology,
    config::{Config, TopologyConfig},
    contract::request,
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

/// Why a queue command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    /// A broker operation failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// A republished dead letter was not confirmed; it stays in the DLQ.
    #[error("the broker did not confirm the replay of {0}; it stays in the dead-letter queue")]
    NotConfirmed(String),
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every message in the DLQ.
    All,
    /// Only these request ids.
    Ids(HashSet<String>),
}

async fn open(config: &Config, name: &str) -> Result<(Connection, Channel), OpsError> {
    let conn = connection::connect(&config.amqp, name).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}

async fn depth(channel: &Channel, queue: &str) -> Result<(u32, u32), OpsError> {
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

fn describe(m: &BasicGetMessage) -> DeadLetter {
    let d = &m.delivery;
    let headers = d.properties.headers().clone().unwrap_or_default();
    let last = request::header_i64(&d.properties, "x-last-failure").unwrap_or_else(unix_now);
    DeadLetter {
        request_id: request::request_id_of_invalid(&d.data, &d.properties),
        error_kind: header_str(&headers, "x-error-kind").unwrap_or_else(|| "unknown".into()),
        reason: header_str(&headers, "x-error").unwrap_or_default(),
        attempts: request::header_u32(&d.properties, "x-attempts").unwrap_or(0),
        age_secs: (unix_now() - last).max(0),
        routing_key: header_str(&headers, "x-original-routing-key")
            .unwrap_or_else(|| d.routing_key.to_string()),
    }
}

/// The first `limit` dead letters, left in place and in order.
pub async fn list(config: &Config, limit: usize) -> Result<Vec<DeadLetter>, OpsError> {
    let (conn, channel) = open(config, "llmq dlq list").await?;
    let queue = config.topology.dead_letter_queue.as_str();
    let (count, _) = depth(&channel, queue).await?;
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
    let (count, _) = depth(&channel, queue).await?;
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
        };
        if !chosen {
            kept.push(m);
            continue;
        }
        let key = replay_key(topo, &info.routing_key);
        let props = cleaned(&m.delivery.properties, reset_attempts);
        let confirm = publisher
            .basic_publish(
                topo.request_exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &m.delivery.data,
                props,
            )
            .await?
            .await?;
        if !matches!(confirm, lapin::Confirmation::Ack(None)) {
            let _ = channel.close(200, "replay stopped".into()).await;
            return Err(OpsError::NotConfirmed(info.request_id));
        }
        m.delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed.push(info);
    }
    requeue_in_order(&kept).await?;
    let _ = channel.close(200, "replayed".into()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(replayed)
}

/// Puts taken messages back in their order: nacked one by one, last first, so each lands at
/// the head of the queue in front of the ones after it.
async fn requeue_in_order(taken: &[BasicGetMessage]) -> Result<(), OpsError> {
    for m in taken.iter().rev() {
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

/// The work queue's key for a dead letter: its original key when that is one of the work
/// keys, else the chat key.
fn replay_key(topo: &TopologyConfig, original: &str) -> String {
    if original == topo.embeddings_key || original == topo.processing_key {
        original.to_string()
    } else {
        topo.processing_key.clone()
    }
}

/// The properties without the failure headers (and, on request, the attempt count).
fn cleaned(props: &BasicProperties, reset_attempts: bool) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(old) = props.headers() {
        for (k, v) in old.inner() {
            let name = k.as_str();
            let drop = name.starts_with("x-error")
                || matches!(
                    name,
                    "x-attempts"
                        | "x-first-failure"
                        | "x-last-failure"
                        | "x-worker"
                        | "x-original-exchange"
                        | "x-original-routing-key"
                        | "x-death"
                        | retry::NOT_BEFORE_HEADER
                        | retry::TIER_HEADER
                        | retry::LAST_ERROR_HEADER
                )
                || (reset_attempts
                    && matches!(name, retry::ATTEMPTS_HEADER | retry::FIRST_FAILURE_HEADER));
            if !drop {
                headers.insert(k.clone(), v.clone());
            }
        }
    }
    if !reset_attempts {
        // The dead letter's count is the final one; the retry header may be older.
        let n = request::header_u32(props, "x-attempts")
            .max(request::header_u32(props, retry::ATTEMPTS_HEADER));
        if let Some(n) = n {
            headers.insert(
                retry::ATTEMPTS_HEADER.into(),
                AMQPValue::LongInt(n.min(i32::MAX as u32) as i32),
            );
        }
    }
    props.clone().with_headers(headers)
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
        if let Ok((messages, consumers)) = depth(&channel, &queue).await {
            out.push(QueueStatus {
                queue,
                messages,
                consumers,
            });
            let _ = channel.close(200, "ok".into()).await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// Declares the topology (as a worker does at start-up) without consuming.
pub async fn declare(config: &Config) -> Result<(), OpsError> {
    let (conn, channel) = open(config, "llmq topology").await?;
    topology::declare(&channel, &config.topology).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
