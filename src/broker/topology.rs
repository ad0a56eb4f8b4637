//! The broker topology, declared idempotently at start-up.
//!
//! - `llm_requests` (direct) -> `llm_processing` (key `process`) and `llm_embeddings` (key
//!   `embed`), both durable with exactly `{x-max-priority: 10}`, so a client that declares
//!   the queue the way tutorials do gets no PRECONDITION_FAILED. Broker-side dead-lettering
//!   of expired messages is a policy (`rabbitmq/definitions.json`), not a queue argument.
//! - `llm_results` (direct) -> durable queue `llm_results` (key `result`), optional.
//! - `llm_requests.dlx` (direct) -> `llm_processing.dlq` (key `dead`). The worker publishes
//!   its dead letters there itself, so it does not depend on the policy.
//! - `llm_requests.retry.q` (headers) -> `llm_requests.retry.q.{5s,30s,2m,10m,1h}`, each
//!   matched on the `llmq-retry-tier` header and dead-lettering expired messages back to
//!   `llm_requests` with their routing key (see [`crate::broker::retry`]). The tiers are
//!   quorum queues with at-least-once dead-lettering: the broker republishes an expired
//!   message with confirms, and keeps it until the work queue takes it.
//! - `llm_unroutable` (fanout) -> durable queue `llm_unroutable`: the alternate exchange that
//!   a policy (`rabbitmq/definitions.json`, never an exchange argument, which would make
//!   every existing declaration fail) gives the request, dead-letter and retry exchanges.

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use crate::{broker::retry, config::TopologyConfig, contract::headers};

/// The arguments of both work queues: `x-max-priority` and nothing else.
pub fn work_queue_arguments(topo: &TopologyConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::LongInt(topo.max_priority.into()),
    );
    args
}

/// The arguments of a delayed-retry tier: a quorum queue that dead-letters expired messages
/// back to the request exchange at least once (the broker holds a message until the queue it
/// routes to confirms it; it needs `x-overflow: reject-publish`). No dead-letter routing key:
/// an expired message keeps the work queue's key it was republished with, so it lands back in
/// the queue it came from.
pub fn retry_queue_arguments(topo: &TopologyConfig) -> FieldTable {
    let mut args = FieldTable::default();
    for (key, value) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", topo.request_exchange.as_str()),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        args.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    args
}

/// Declares every exchange, queue and binding. Safe to run any number of times, from any
/// number of replicas.
pub async fn declare(channel: &Channel, topo: &TopologyConfig) -> Result<(), lapin::Error> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for exchange in [
        &topo.request_exchange,
        &topo.results_exchange,
        &topo.dead_letter_exchange,
    ] {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Direct,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .exchange_declare(
            topo.control_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    let mut queues = vec![
        (
            &topo.processing_queue,
            &topo.request_exchange,
            &topo.processing_key,
            work_queue_arguments(topo),
        ),
        (
            &topo.embeddings_queue,
            &topo.request_exchange,
            &topo.embeddings_key,
            work_queue_arguments(topo),
        ),
        (
            &topo.dead_letter_queue,
            &topo.dead_letter_exchange,
            &topo.dead_letter_key,
            FieldTable::default(),
        ),
    ];
    declare_retry_tiers(channel, topo).await?;
    channel
        .exchange_declare(
            topo.unroutable_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    // A fanout exchange ignores the binding key.
    let any_key = String::new();
    queues.push((
        &topo.unroutable_queue,
        &topo.unroutable_exchange,
        &any_key,
        FieldTable::default(),
    ));
    if topo.keep_results {
        queues.push((
            &topo.results_queue,
            &topo.results_exchange,
            &topo.results_key,
            FieldTable::default(),
        ));
    }
    for (queue, exchange, key, args) in queues {
        channel
            .queue_declare(queue.as_str().into(), durable_queue, args)
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// [`declare`] on a channel of its own, closed afterwards: a failed declaration closes its
/// channel, and must not take a consumer's with it.
pub async fn declare_on(conn: &Connection, topo: &TopologyConfig) -> Result<(), lapin::Error> {
    let setup = conn.create_channel().await?;
    declare(&setup, topo).await?;
    let _ = setup.close(200, "topology declared".into()).await;
    Ok(())
}

/// The headers exchange of the delayed-retry tiers and one queue per tier, each
/// dead-lettering back to the request exchange ([`retry_queue_arguments`]).
async fn declare_retry_tiers(channel: &Channel, topo: &TopologyConfig) -> Result<(), lapin::Error> {
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            topo.retry_exchange.as_str().into(),
            ExchangeKind::Headers,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    for tier in retry::TIERS {
        let queue = retry_queue(topo, tier.name);
        channel
            .queue_declare(
                queue.as_str().into(),
                durable_queue,
                retry_queue_arguments(topo),
            )
            .await?;
        let mut bind = FieldTable::default();
        bind.insert("x-match".into(), AMQPValue::LongString("all".into()));
        bind.insert(
            headers::RETRY_TIER.into(),
            AMQPValue::LongString(tier.name.into()),
        );
        channel
            .queue_bind(
                queue.as_str().into(),
                topo.retry_exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                bind,
            )
            .await?;
    }
    Ok(())
}

/// Deletes every queue and exchange of `topo` (the benchmark and the tests clean up with it;
/// a worker never does). Missing ones are skipped.
pub async fn delete(channel: &Channel, topo: &TopologyConfig) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let mut queues = vec![
        topo.processing_queue.clone(),
        topo.embeddings_queue.clone(),
        topo.results_queue.clone(),
        topo.dead_letter_queue.clone(),
        topo.unroutable_queue.clone(),
    ];
    queues.extend(retry::TIERS.iter().map(|tier| retry_queue(topo, tier.name)));
    for q in queues {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [
        &topo.request_exchange,
        &topo.results_exchange,
        &topo.dead_letter_exchange,
        &topo.retry_exchange,
        &topo.unroutable_exchange,
        &topo.control_exchange,
    ] {
        let _ = channel
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// How many messages a queue holds ready and how many consumers it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    /// Ready messages (not the unacked ones).
    pub messages: u32,
    /// Consumers subscribed.
    pub consumers: u32,
}

/// Reads a queue's depth by a passive declare. A missing queue is an error, and the broker
/// closes `channel` with it: callers use a channel they can lose.
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<QueueDepth, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    Ok(QueueDepth {
        messages: q.message_count(),
        consumers: q.consumer_count(),
    })
}

/// The name of a delayed-retry queue.
pub fn retry_queue(topo: &TopologyConfig, tier: &str) -> String {
    format!("{}.{tier}", topo.retry_queue_prefix)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    /// The definitions that `docker compose` loads name the defaults' alternate exchange, by
    /// policy on the request, dead-letter and retry exchanges (not the results exchange:
    /// without `keep_results` nobody needs its results kept).
    #[test]
    fn definitions_give_the_default_exchanges_their_alternate_exchange() {
        let defs: Value =
            serde_json::from_str(include_str!("../../rabbitmq/definitions.json")).unwrap();
        let t = TopologyConfig::default();
        let policy = defs["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["definition"].get("alternate-exchange").is_some())
            .unwrap();
        assert_eq!(policy["apply-to"], "exchanges");
        assert_eq!(
            policy["definition"]["alternate-exchange"],
            t.unroutable_exchange.as_str()
        );
        let escaped = |name: &str| name.replace('.', "\\.");
        let expected = format!(
            "^{}({}|{})?$",
            escaped(&t.request_exchange),
            escaped(&t.dead_letter_exchange[t.request_exchange.len()..]),
            escaped(&t.retry_exchange[t.request_exchange.len()..])
        );
        assert_eq!(policy["pattern"], expected.as_str());
        let declared = |kind: &str, name: &str| {
            defs[kind]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["name"] == name)
        };
        assert!(declared("exchanges", &t.unroutable_exchange));
        assert!(declared("queues", &t.unroutable_queue));
    }

    #[test]
    fn retry_tiers_dead_letter_at_least_once() {
        let args = retry_queue_arguments(&TopologyConfig::default());
        let get = |k: &str| match args.inner().get(k) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("{k}: {other:?}"),
        };
        assert_eq!(get("x-queue-type"), "quorum");
        assert_eq!(get("x-dead-letter-strategy"), "at-least-once");
        // at-least-once is ignored without it.
        assert_eq!(get("x-overflow"), "reject-publish");
        assert_eq!(get("x-dead-letter-exchange"), "llm_requests");
    }
}
