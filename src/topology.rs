//! The broker topology, declared idempotently at start-up.
//!
//! - `llm_requests` (direct) -> `llm_processing` (key `process`) and `llm_embeddings` (key
//!   `embed`), both durable with exactly `{x-max-priority: 10}`, so a client that declares
//!   the queue the way tutorials do gets no PRECONDITION_FAILED. Broker-side dead-lettering
//!   of expired messages is a policy (`rabbitmq/definitions.json`), not a queue argument.
//! - `llm_results` (direct) -> durable queue `llm_results` (key `result`), optional.
//! - `llm_requests.dlx` (direct) -> `llm_processing.dlq` (key `dead`). The worker publishes
//!   its dead letters there itself, so it does not depend on the policy.

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};

use crate::config::TopologyConfig;

/// The arguments of both work queues: `x-max-priority` and nothing else.
pub fn work_queue_arguments(topo: &TopologyConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::LongInt(topo.max_priority.into()),
    );
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
