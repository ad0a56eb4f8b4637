//! The broker topology, declared idempotently at start-up.
//!
//! - `llm_requests` (direct) -> `llm_processing` (key `process`) and `llm_embeddings` (key
//!   `embed`), both durable. As classic queues (`topology.queue_type`, the default) their
//!   arguments are exactly `{x-max-priority: 10}`, so a client that declares the queue the
//!   way tutorials do gets no PRECONDITION_FAILED; as quorum queues they have what
//!   [`crate::broker::arguments`] gives them. Broker-side dead-lettering of expired messages
//!   is a policy (`rabbitmq/definitions.json`), not a queue argument.
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
//!   quorum queues with at-least-once dead-lettering, whatever `topology.queue_type`: the
//!   broker republishes an expired message with confirms, and keeps it until the work queue
//!   takes it.
//! - `llm_unroutable` (fanout) -> durable queue `llm_unroutable`: the alternate exchange that
//!   a policy (`rabbitmq/definitions.json`, never an exchange argument, which would make
//!   every existing declaration fail) gives the request, dead-letter and retry exchanges.
//!
//! The work queues, their lanes, the dead-letter, results and unroutable queues are of
//! `topology.queue_type` ([`typed_queues`]). A queue's type cannot change in place: when one
//! exists as the other type, [`declare_on`] says so ([`DeclareError::TypeMismatch`]) with the
//! procedure (`llmq topology convert`).

use lapin::{
    Channel, Connection, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use sha2::{Digest, Sha256};

use crate::{
    broker::{arguments, retry},
    config::{QueueType, TopologyConfig},
    contract::headers,
};

/// The arguments of both work queues and their lanes, for `topology.queue_type`: as classic
/// queues `x-max-priority` and nothing else. The same on every broker version
/// ([`arguments::work_queues`]).
pub fn work_queue_arguments(topo: &TopologyConfig) -> FieldTable {
    arguments::work_queues(topo.queue_type, topo.max_priority, None).arguments
}

/// What a queue of `topology.queue_type` is for, which decides its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A work queue or one of its lanes: requests wait there, by priority.
    Work,
    /// The dead-letter, results or unroutable queue: messages wait there for a reader.
    Holding,
}

/// A queue whose type follows `topology.queue_type`, and where it is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedQueue {
    /// Its name.
    pub name: String,
    /// What it is for.
    pub role: Role,
    /// The exchange and routing key it is bound with; `None` for a lane (filled through the
    /// default exchange).
    pub binding: Option<(String, String)>,
}

impl TypedQueue {
    /// A lane of a work queue.
    pub fn lane(name: String) -> Self {
        Self {
            name,
            role: Role::Work,
            binding: None,
        }
    }

    /// Its arguments as a queue of `queue_type` (the same on every broker version).
    pub fn arguments(&self, topo: &TopologyConfig, queue_type: QueueType) -> FieldTable {
        match self.role {
            Role::Work => arguments::work_queues(queue_type, topo.max_priority, None).arguments,
            Role::Holding => arguments::holding_queue(queue_type),
        }
    }
}

/// Every queue of `topology.queue_type` the worker declares, in the order it declares them:
/// the configured lanes of both work queues, the work queues, the dead-letter queue, the
/// unroutable queue and, when it keeps results, the results queue.
pub fn typed_queues(topo: &TopologyConfig) -> Vec<TypedQueue> {
    let bound = |name: &str, role, exchange: &str, key: &str| TypedQueue {
        name: name.to_string(),
        role,
        binding: Some((exchange.to_string(), key.to_string())),
    };
    let mut queues: Vec<TypedQueue> = lanes(topo).map(TypedQueue::lane).collect();
    queues.extend([
        bound(
            &topo.processing_queue,
            Role::Work,
            &topo.request_exchange,
            &topo.processing_key,
        ),
        bound(
            &topo.embeddings_queue,
            Role::Work,
            &topo.request_exchange,
            &topo.embeddings_key,
        ),
        bound(
            &topo.dead_letter_queue,
            Role::Holding,
            &topo.dead_letter_exchange,
            &topo.dead_letter_key,
        ),
        // A fanout exchange ignores the binding key.
        bound(
            &topo.unroutable_queue,
            Role::Holding,
            &topo.unroutable_exchange,
            "",
        ),
    ]);
    if topo.keep_results.declares_queue() {
        queues.push(bound(
            &topo.results_queue,
            Role::Holding,
            &topo.results_exchange,
            &topo.results_key,
        ));
    }
    queues
}

/// Why the topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    /// A queue's declaration failed (its arguments differ from the existing queue's, say);
    /// the broker closed the channel with it.
    #[error("declaring the queue {queue}: {source}")]
    Queue {
        /// The queue.
        queue: String,
        /// What the broker said.
        #[source]
        source: lapin::Error,
    },
    /// Any other broker error (an exchange, a binding, the channel).
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// A queue exists as the other type than `topology.queue_type`: the fleet must move it
    /// before it can start.
    #[error(
        "the queue {queue} exists as a {existing} queue, and topology.queue_type is \
         \"{configured}\" (LLMQ_TOPOLOGY__QUEUE_TYPE): a queue's type cannot change in place. \
         To move the topology to {configured} queues: 1. stop every worker of the fleet; \
         2. run `llmq topology convert --to {configured}` with this configuration \
         (`--dry-run` first lists what it will do): it moves every message of every queue, \
         none lost or duplicated; 3. start the fleet with topology.queue_type = \
         \"{configured}\". To keep the queues as they are, set topology.queue_type = \
         \"{existing}\" instead."
    )]
    TypeMismatch {
        /// The first queue found of the other type.
        queue: String,
        /// Its type.
        existing: QueueType,
        /// `topology.queue_type`.
        configured: QueueType,
    },
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
pub async fn declare(channel: &Channel, topo: &TopologyConfig) -> Result<(), DeclareError> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let exchanges = [
        (&topo.request_exchange, ExchangeKind::Direct),
        (&topo.results_exchange, ExchangeKind::Direct),
        (&topo.dead_letter_exchange, ExchangeKind::Direct),
        (&topo.control_exchange, ExchangeKind::Fanout),
        (&topo.unroutable_exchange, ExchangeKind::Fanout),
    ];
    for (exchange, kind) in exchanges {
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
    }
    declare_retry_tiers(channel, topo).await?;
    for queue in typed_queues(topo) {
        declare_typed(channel, topo, &queue, topo.queue_type).await?;
    }
    Ok(())
}

/// Declares `queue` as a queue of `queue_type` and binds it.
pub async fn declare_typed(
    channel: &Channel,
    topo: &TopologyConfig,
    queue: &TypedQueue,
    queue_type: QueueType,
) -> Result<(), DeclareError> {
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            queue.name.as_str().into(),
            durable_queue,
            queue.arguments(topo, queue_type),
        )
        .await
        .map_err(|source| DeclareError::Queue {
            queue: queue.name.clone(),
            source,
        })?;
    if let Some((exchange, key)) = &queue.binding {
        channel
            .queue_bind(
                queue.name.as_str().into(),
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
/// channel, and must not take a consumer's with it. A queue that exists as the other type
/// than `topology.queue_type` is a [`DeclareError::TypeMismatch`].
pub async fn declare_on(conn: &Connection, topo: &TopologyConfig) -> Result<(), DeclareError> {
    let setup = conn.create_channel().await?;
    match declare(&setup, topo).await {
        Ok(()) => {
            let _ = setup.close(200, "topology declared".into()).await;
            Ok(())
        }
        Err(DeclareError::Queue { queue, source }) => {
            // Its arguments may differ only because it is of the other type: a queue that
            // takes the other type's declaration as it is, is of that type.
            let other = topo.queue_type.other();
            match typed_queues(topo).into_iter().find(|q| q.name == queue) {
                Some(typed) if type_of(conn, topo, &typed).await? == Found::Is(other) => {
                    Err(DeclareError::TypeMismatch {
                        queue,
                        existing: other,
                        configured: topo.queue_type,
                    })
                }
                _ => Err(DeclareError::Queue { queue, source }),
            }
        }
        Err(e) => Err(e),
    }
}

/// What a queue of `topology.queue_type` is on the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// It does not exist.
    Missing,
    /// It exists as a queue of this type, with the arguments llmq gives that type.
    Is(QueueType),
    /// It exists with arguments llmq gives neither type (declared by someone else, or by
    /// another version of llmq).
    Neither,
}

/// What `queue` is on the broker: each type's declaration is tried on a channel of its own
/// (the broker closes the channel of a declaration that does not match). A declaration that
/// matches changes nothing, and one is only tried once the queue is known to exist, so this
/// creates nothing.
pub async fn type_of(
    conn: &Connection,
    topo: &TopologyConfig,
    queue: &TypedQueue,
) -> Result<Found, lapin::Error> {
    let mut reader = DepthReader::new(conn);
    let exists = reader.read(&queue.name).await?.is_some();
    reader.close().await;
    if !exists {
        return Ok(Found::Missing);
    }
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for queue_type in [topo.queue_type, topo.queue_type.other()] {
        let channel = conn.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.name.as_str().into(),
                durable_queue,
                queue.arguments(topo, queue_type),
            )
            .await;
        if declared.is_ok() {
            let _ = channel.close(200, "queue type read".into()).await;
            return Ok(Found::Is(queue_type));
        }
    }
    Ok(Found::Neither)
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

    /// Byte for byte what earlier versions declared, so existing deployments redeclare
    /// without PRECONDITION_FAILED.
    #[test]
    fn classic_queues_are_declared_as_before() {
        let t = TopologyConfig::default();
        let queues = typed_queues(&t);
        let names: Vec<&str> = queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names.len(), 32 + 5);
        assert_eq!(names[0], "llm_processing.lane.00");
        assert_eq!(
            names[32..],
            [
                "llm_processing",
                "llm_embeddings",
                "llm_processing.dlq",
                "llm_unroutable",
                "llm_results"
            ]
        );
        for q in &queues {
            let args = q.arguments(&t, QueueType::Classic);
            match q.role {
                Role::Work => {
                    assert_eq!(args.inner().len(), 1, "{}", q.name);
                    assert_eq!(
                        args.inner().get("x-max-priority"),
                        Some(&AMQPValue::LongInt(10))
                    );
                }
                Role::Holding => assert_eq!(args, FieldTable::default(), "{}", q.name),
            }
        }
        assert_eq!(
            work_queue_arguments(&t),
            queues[0].arguments(&t, t.queue_type)
        );
        let bound = |name: &str| {
            queues
                .iter()
                .find(|q| q.name == name)
                .and_then(|q| q.binding.clone())
        };
        assert_eq!(bound("llm_processing.lane.0f"), None);
        assert_eq!(
            bound("llm_processing"),
            Some(("llm_requests".into(), "process".into()))
        );
        assert_eq!(
            bound("llm_processing.dlq"),
            Some(("llm_requests.dlx".into(), "dead".into()))
        );
        assert_eq!(
            bound("llm_unroutable"),
            Some(("llm_unroutable".into(), String::new()))
        );
        assert_eq!(
            bound("llm_results"),
            Some(("llm_results".into(), "result".into()))
        );
    }

    #[test]
    fn the_results_queue_is_typed_only_when_it_is_declared() {
        let t = TopologyConfig {
            keep_results: crate::config::KeepResults::Never,
            lanes: 0,
            ..TopologyConfig::default()
        };
        let names: Vec<String> = typed_queues(&t).into_iter().map(|q| q.name).collect();
        assert_eq!(
            names,
            [
                "llm_processing",
                "llm_embeddings",
                "llm_processing.dlq",
                "llm_unroutable"
            ]
        );
    }

    #[test]
    fn quorum_queues_say_their_type_and_only_work_queues_dead_letter_at_least_once() {
        let t = TopologyConfig {
            queue_type: QueueType::Quorum,
            ..TopologyConfig::default()
        };
        for q in typed_queues(&t) {
            let args = q.arguments(&t, t.queue_type);
            let get = |k: &str| args.inner().get(k).cloned();
            assert_eq!(
                get("x-queue-type"),
                Some(AMQPValue::LongString("quorum".into()))
            );
            assert!(get("x-max-priority").is_none(), "{}", q.name);
            assert!(get("x-delivery-limit").is_some(), "{}", q.name);
            let at_least_once = get("x-dead-letter-strategy").is_some();
            assert_eq!(at_least_once, q.role == Role::Work, "{}", q.name);
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
