//! The broker topology, declared idempotently at start-up.
//!
//! - `llm_requests` (direct) -> `llm_processing` (key `process`) and `llm_embeddings` (key
//!   `embed`), both durable with exactly `{x-max-priority: 10}`, so a client that declares
//!   the queue the way tutorials do gets no PRECONDITION_FAILED. Broker-side dead-lettering
//!   of expired messages is a policy (`rabbitmq/definitions.json`), not a queue argument.
//! - `llm_processing.lane.<nn>` and `llm_embeddings.lane.<nn>`, `topology.lanes` of each
//!   (16 by default, none with 0): the fair-share lanes, durable with exactly the work queues'
//!   arguments and bound to no exchange. The worker moves a tenant's requests into the lane
//!   its name hashes to ([`lane_of`]) through the default exchange.
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
use sha2::{Digest, Sha256};

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

/// The name of lane `lane` of work queue `queue`: `<queue>.lane.<nn>`, `nn` two lowercase hex
/// digits (`llm_processing.lane.0a`). Lanes are numbered from 0 to `topology.lanes - 1`, at
/// most 255.
pub fn lane_queue(queue: &str, lane: u16) -> String {
    format!("{queue}.lane.{lane:02x}")
}

/// The lane number of `name` when it is a lane of work queue `queue`: the inverse of
/// [`lane_queue`].
pub fn lane_number(name: &str, queue: &str) -> Option<u16> {
    let nn = name.strip_prefix(queue)?.strip_prefix(".lane.")?;
    let hex = nn.len() == 2 && nn.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    hex.then(|| u16::from_str_radix(nn, 16).ok()).flatten()
}

/// The lane a tenant's requests go to among `lanes`, or `None` when there are none (`0`).
///
/// The first 8 bytes of the SHA-256 of the tenant's name (its UTF-8 bytes), read as a
/// big-endian `u64`, modulo `lanes`. Every replica must send a tenant to the same lane, and
/// so must every version of llmq (replicas of two versions run side by side during a rolling
/// upgrade): this is a fixed function of the name and the lane count, never of a process's
/// random hasher state. Changing it is a breaking change.
pub fn lane_of(tenant: &str, lanes: u16) -> Option<u16> {
    if lanes == 0 {
        return None;
    }
    let digest = Sha256::digest(tenant.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let lane = u64::from_be_bytes(first) % u64::from(lanes);
    // Below `lanes`, itself a u16.
    u16::try_from(lane).ok()
}

/// Every lane of work queue `queue` in order, `<queue>.lane.00` to `<queue>.lane.<lanes - 1>`.
pub fn lanes_of(queue: &str, lanes: u16) -> impl Iterator<Item = String> + '_ {
    (0..lanes).map(move |lane| lane_queue(queue, lane))
}

/// Every lane of both work queues: the processing queue's, then the embeddings queue's
/// (`2 × topology.lanes` names).
pub fn lanes(topo: &TopologyConfig) -> impl Iterator<Item = String> + '_ {
    lanes_of(&topo.processing_queue, topo.lanes).chain(lanes_of(&topo.embeddings_queue, topo.lanes))
}

/// Missing lanes in a row after which [`lanes_in_use`] stops looking.
pub const LANE_GAP: u16 = 16;

/// The lanes of work queue `queue` a worker must consume so that none is left with requests
/// in it: the `configured` ones, and those an earlier, larger `topology.lanes` left. Lanes
/// are declared as a prefix (`00` up to a count); an operator may have deleted some old ones
/// already, so the search goes on past a missing lane, and stops after [`LANE_GAP`] missing
/// in a row (a passive declare each: a few milliseconds when none is left).
pub async fn lanes_in_use(
    conn: &Connection,
    queue: &str,
    configured: u16,
) -> Result<Vec<u16>, lapin::Error> {
    let mut lanes: Vec<u16> = (0..configured).collect();
    let mut reader = DepthReader::new(conn);
    let mut missing = 0;
    let mut lane = configured;
    while lane < crate::config::MAX_LANES && missing < LANE_GAP {
        if reader.read(&lane_queue(queue, lane)).await?.is_some() {
            lanes.push(lane);
            missing = 0;
        } else {
            missing += 1;
        }
        lane += 1;
    }
    reader.close().await;
    Ok(lanes)
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
    declare_lanes(channel, topo).await?;
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
    if topo.keep_results.declares_queue() {
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

/// Every lane of both work queues ([`lanes`]): durable, with exactly the work queues'
/// arguments ([`work_queue_arguments`]), so a request moved into a lane keeps its priority;
/// bound to no exchange, since the worker fills them through the default exchange.
async fn declare_lanes(channel: &Channel, topo: &TopologyConfig) -> Result<(), lapin::Error> {
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for lane in lanes(topo) {
        channel
            .queue_declare(
                lane.as_str().into(),
                durable_queue,
                work_queue_arguments(topo),
            )
            .await?;
    }
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
    queues.extend(lanes(topo));
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

/// Reads the depths of many queues, one passive declare each, on one channel for as long as
/// it lasts: a passive declare of a missing queue makes the broker close its channel, and the
/// next read opens another. Cheap enough for every lane every few seconds.
pub struct DepthReader<'a> {
    conn: &'a Connection,
    /// The channel of the last successful read, reused by the next.
    channel: Option<Channel>,
}

impl<'a> DepthReader<'a> {
    /// A reader on `conn`; it opens its first channel at its first read.
    pub fn new(conn: &'a Connection) -> Self {
        Self {
            conn,
            channel: None,
        }
    }

    /// The depth of `queue`, or `None` if it cannot be read (it does not exist). An error only
    /// when no channel can be opened: the connection is gone.
    pub async fn read(&mut self, queue: &str) -> Result<Option<QueueDepth>, lapin::Error> {
        let channel = match self.channel.take().filter(|c| c.status().connected()) {
            Some(channel) => channel,
            None => self.conn.create_channel().await?,
        };
        match queue_depth(&channel, queue).await {
            Ok(depth) => {
                self.channel = Some(channel);
                Ok(Some(depth))
            }
            // The broker closed the channel with the failure.
            Err(_) => Ok(None),
        }
    }

    /// Closes the channel kept for the next read, if any.
    pub async fn close(self) {
        if let Some(channel) = self.channel {
            let _ = channel.close(200, "depths read".into()).await;
        }
    }
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
    /// with `keep_results = "never"` nobody needs its results kept).
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
    fn lanes_are_named_with_two_lowercase_hex_digits() {
        assert_eq!(lane_queue("llm_processing", 0), "llm_processing.lane.00");
        assert_eq!(lane_queue("llm_processing", 10), "llm_processing.lane.0a");
        assert_eq!(lane_queue("llm_embeddings", 255), "llm_embeddings.lane.ff");
    }

    /// Fixed values: a change here moves every tenant to another lane, and replicas of two
    /// versions would disagree during a rolling upgrade.
    #[test]
    fn a_tenant_s_lane_is_sha256_of_its_name_modulo_the_lanes() {
        // SHA-256("acme") starts 82 2b 33 ad 87 c1 48 a0 = 9379647469329139872.
        assert_eq!(lane_of("acme", 16), Some(0));
        assert_eq!(lane_of("acme", 256), Some(160));
        // SHA-256("tenant-a") starts 80 a7 07 af 7d c7 7e e1.
        assert_eq!(lane_of("tenant-a", 16), Some(1));
        assert_eq!(lane_of("tenant-a", 256), Some(225));
        // SHA-256("") starts e3 b0 c4 42 98 fc 1c 14.
        assert_eq!(lane_of("", 16), Some(4));
        assert_eq!(lane_of("acme", 1), Some(0));
        assert_eq!(lane_of("acme", 0), None);
    }

    #[test]
    fn every_tenant_lands_in_a_lane_that_exists() {
        for lanes in [1, 3, 16, 256] {
            for tenant in ["a", "b", "acme", "other", "\u{e9}t\u{e9}"] {
                let lane = lane_of(tenant, lanes).expect("lanes > 0");
                assert!(lane < lanes, "{tenant}: {lane} of {lanes}");
            }
        }
    }

    #[test]
    fn both_work_queues_have_every_lane() {
        let t = TopologyConfig::default();
        let all: Vec<String> = lanes(&t).collect();
        assert_eq!(all.len(), 32);
        assert_eq!(all[0], "llm_processing.lane.00");
        assert_eq!(all[15], "llm_processing.lane.0f");
        assert_eq!(all[16], "llm_embeddings.lane.00");
        assert_eq!(all[31], "llm_embeddings.lane.0f");
        let off = TopologyConfig { lanes: 0, ..t };
        assert_eq!(lanes(&off).count(), 0);
    }

    /// The dead-letter policy of `rabbitmq/definitions.json` covers every queue a request
    /// waits in, the lanes too (a request expiring there is dead-lettered, not dropped), and
    /// nothing else.
    #[test]
    fn definitions_dead_letter_the_work_queues_and_their_lanes() {
        let defs: Value =
            serde_json::from_str(include_str!("../../rabbitmq/definitions.json")).unwrap();
        let t = TopologyConfig {
            lanes: 256,
            ..TopologyConfig::default()
        };
        let policy = defs["policies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["definition"].get("dead-letter-exchange").is_some())
            .unwrap();
        assert_eq!(policy["apply-to"], "queues");
        assert_eq!(
            policy["definition"]["dead-letter-exchange"],
            t.dead_letter_exchange.as_str()
        );
        let pattern = regex::Regex::new(policy["pattern"].as_str().unwrap()).unwrap();
        let waiting = [t.processing_queue.clone(), t.embeddings_queue.clone()];
        for queue in waiting.into_iter().chain(lanes(&t)) {
            assert!(pattern.is_match(&queue), "{queue}");
        }
        for other in [
            &t.dead_letter_queue,
            &t.results_queue,
            &t.unroutable_queue,
            &retry_queue(&t, "5s"),
        ] {
            assert!(!pattern.is_match(other), "{other}");
        }
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
