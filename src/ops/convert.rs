//! `llmq topology convert --to <classic|quorum> [--dry-run]`: moves an existing topology's
//! queues to the other queue type, every message kept exactly once.
//!
//! A queue's type cannot change in place, so each queue of `topology.queue_type` (the work
//! queues, every lane found, the dead-letter, unroutable and results queues; the retry tiers
//! are quorum queues either way) of the other type goes through a temporary queue,
//! `<queue>.convert`, of the new type:
//!
//! 1. every message is moved there: taken with `basic.get`, published again to the temporary
//!    queue by name with the same body and every property (its `user_id`, the sender's
//!    identity, its priority and its headers included), mandatory, one at a time; once the
//!    broker confirmed it, the original is acked. Nothing is ever acked before its copy is
//!    confirmed, and one copy is made of each.
//! 2. the queue is unbound (what is published to its exchange from then on is not routed to
//!    it), what arrived in the meantime is moved too, and the empty queue is deleted;
//! 3. it is declared as the new type and bound again, as a worker declares it;
//! 4. the messages are moved back the same way, and the empty temporary queue is deleted.
//!
//! Republishing keeps a `user_id` that is not the tool's own only for a RabbitMQ user with
//! the `impersonator` tag, as `llmq dlq replay` and the worker need: checked before anything
//! moves. The fleet must be stopped: a queue with consumers is refused, and so is a queue
//! whose arguments are those of neither type. An interrupted run (a lost connection, a
//! refused publish) leaves each message in exactly one place, the queue or its temporary
//! queue (except the one in hand if the tool itself dies between a copy's confirm and the
//! original's ack: it is then in both); running the command again takes up where it stopped.
//!
//! What a move does not keep: the `redelivered` flag (a copy is a new message), the
//! `x-delivery-count` and `x-acquired-count` headers quorum queues add to a delivery (they
//! describe the old queue's deliveries, not the message), and the time already spent
//! against a per-message `expiration` (the copy's clock starts again: a result kept a day
//! is kept a little longer, never shorter).

use std::fmt::{self, Write};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    options::{
        BasicAckOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};

use super::OpsError;
use crate::{
    broker::{
        arguments,
        confirm::{CONFIRM_TIMEOUT, PublishError},
        connection, impersonation, publish,
        topology::{self, DepthReader, Found, Role, TypedQueue, declare_typed, type_of},
        version::{self, BrokerVersion},
    },
    config::{Config, QueueType, TopologyConfig},
};

/// The suffix of a queue's temporary queue.
pub const TEMPORARY_SUFFIX: &str = ".convert";

/// Messages that may arrive in a queue while it is emptied, beyond those it held: more means
/// something still publishes to it, and emptying it would never end.
const MAX_ARRIVALS: u64 = 10_000;

/// Headers a quorum queue adds to a delivery: about the old queue's deliveries, not about
/// the message, so a moved copy goes without them.
const DELIVERY_HEADERS: [&str; 2] = ["x-delivery-count", "x-acquired-count"];

/// A queue as the conversion finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    /// The queue, its role and binding.
    pub queue: TypedQueue,
    /// What it is on the broker.
    pub found: Found,
    /// Ready messages in it.
    pub messages: u32,
    /// Its consumers: a running worker, which must be stopped first.
    pub consumers: u32,
    /// Its temporary queue, `<queue>.convert`.
    pub temporary: String,
    /// The messages in the temporary queue, when one is left by an interrupted run.
    pub in_temporary: Option<u32>,
    /// Consumers of the temporary queue (someone else's queue of that name, or a reader).
    pub temporary_consumers: u32,
}

/// What the conversion does with a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing: it is already of the new type, or absent (a worker declares it).
    Nothing,
    /// Through its temporary queue and back, as the new type.
    Convert {
        /// Its type now.
        from: QueueType,
    },
    /// An interrupted run left messages in its temporary queue: declared as the new type if
    /// it is missing, then the messages moved back.
    Finish,
    /// It cannot be converted now, for this reason; nothing is done to any queue.
    Refuse(String),
}

impl QueueState {
    /// What converting to `to` does with this queue.
    pub fn step(&self, to: QueueType) -> Step {
        if self.consumers > 0 || self.temporary_consumers > 0 {
            let consumers = self.consumers + self.temporary_consumers;
            return Step::Refuse(format!(
                "{} has {consumers} consumer(s): stop every worker of the fleet first",
                self.queue.name
            ));
        }
        if self.temporary.len() > 255 {
            return Step::Refuse(format!(
                "{}: its temporary queue's name would be longer than 255 bytes",
                self.queue.name
            ));
        }
        match (self.found, self.in_temporary.is_some()) {
            (Found::Neither, _) => Step::Refuse(format!(
                "{} has arguments llmq gives neither queue type: move it by hand",
                self.queue.name
            )),
            (Found::Is(from), _) if from != to => Step::Convert { from },
            (Found::Is(_) | Found::Missing, true) => Step::Finish,
            (Found::Is(_) | Found::Missing, false) => Step::Nothing,
        }
    }
}

/// What the conversion to `to` finds, and so will do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The new type.
    pub to: QueueType,
    /// The broker's version, when it says it.
    pub version: Option<BrokerVersion>,
    /// `topology.max_priority`, for what priorities classic work queues have.
    pub max_priority: u8,
    /// Every queue of `topology.queue_type`, in the order they are converted.
    pub queues: Vec<QueueState>,
}

impl Plan {
    /// Why the conversion cannot run now, one reason per queue; empty when it can.
    pub fn refusals(&self) -> Vec<String> {
        self.queues
            .iter()
            .filter_map(|q| match q.step(self.to) {
                Step::Refuse(why) => Some(why),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for Plan {
    /// One line per queue (what it is, what is done with it), then what priorities the work
    /// queues will have.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let to = self.to;
        for q in &self.queues {
            let name = &q.queue.name;
            let now = match q.found {
                Found::Missing => "absent".to_string(),
                Found::Is(t) => format!("{t}, {} messages", q.messages),
                Found::Neither => format!("of unknown arguments, {} messages", q.messages),
            };
            let left = q.in_temporary.map_or_else(String::new, |n| {
                format!(" ({n} messages in {} from an interrupted run)", q.temporary)
            });
            match q.step(to) {
                Step::Nothing if q.found == Found::Missing => {
                    writeln!(f, "{name}: absent; a worker declares it")?
                }
                Step::Nothing => writeln!(f, "{name}: {to} already, nothing to do")?,
                Step::Convert { .. } => writeln!(
                    f,
                    "{name}: {now}{left}: to {to}, through {} and back",
                    q.temporary
                )?,
                Step::Finish => writeln!(
                    f,
                    "{name}: {now}{left}: declared {to} if absent, then the messages moved back"
                )?,
                Step::Refuse(why) => writeln!(f, "{name}: {now}: refused: {why}")?,
            }
        }
        let broker = self
            .version
            .map_or_else(|| "unknown".to_string(), |v| v.to_string());
        let priorities = arguments::work_queues(to, self.max_priority, self.version).priorities;
        writeln!(
            f,
            "the retry tiers are quorum queues either way: left as they are\n\
             priorities in {to} work queues on this broker (RabbitMQ {broker}): {priorities}"
        )
    }
}

/// A queue converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// The queue.
    pub queue: String,
    /// Messages moved to its temporary queue.
    pub moved_out: u64,
    /// Messages moved back.
    pub moved_back: u64,
}

/// What converting the topology to `to` would do, changing nothing.
pub async fn plan(config: &Config, to: QueueType) -> Result<Plan, OpsError> {
    let conn = connection::connect(&config.amqp, "llmq topology convert").await?;
    let plan = read_plan(&conn, &config.topology, to).await;
    let _ = conn.close(200, "planned".into()).await;
    Ok(Plan {
        version: version::announced_by_any(&config.amqp).await,
        ..plan?
    })
}

/// Converts every queue of the topology that is not of type `to` yet (see the module's
/// documentation); returns what was moved. Refuses, changing nothing, when any queue cannot
/// be converted now (a consumer, unknown arguments) or when the broker refuses to let this
/// user keep another's `user_id`.
pub async fn convert(config: &Config, to: QueueType) -> Result<Vec<Converted>, OpsError> {
    let conn = connection::connect(&config.amqp, "llmq topology convert").await?;
    let converted = convert_on(&conn, &config.topology, to).await;
    let _ = conn.close(200, "converted".into()).await;
    converted
}

async fn convert_on(
    conn: &Connection,
    topo: &TopologyConfig,
    to: QueueType,
) -> Result<Vec<Converted>, OpsError> {
    let plan = read_plan(conn, topo, to).await?;
    let refusals = plan.refusals();
    if !refusals.is_empty() {
        return Err(OpsError::Refused(format!(
            "nothing converted: {}",
            refusals.join("; ")
        )));
    }
    let moving = plan
        .queues
        .iter()
        .any(|q| q.step(to) != Step::Nothing && (q.messages > 0 || q.in_temporary.is_some()));
    if moving {
        impersonation::check_impersonation(conn)
            .await
            .map_err(|e| OpsError::Refused(format!("nothing converted: {e}")))?;
    }
    let mut done = Vec::new();
    for q in &plan.queues {
        let converted = match q.step(to) {
            Step::Nothing | Step::Refuse(_) => continue,
            Step::Convert { from } => convert_queue(conn, topo, q, from, to).await?,
            Step::Finish => finish_queue(conn, topo, q, to, 0).await?,
        };
        done.push(converted);
    }
    Ok(done)
}

/// Reads every queue's state (the broker's version left out).
async fn read_plan(
    conn: &Connection,
    topo: &TopologyConfig,
    to: QueueType,
) -> Result<Plan, OpsError> {
    // The lanes of an earlier, larger topology.lanes too, while they are there.
    let mut queues: Vec<TypedQueue> = Vec::new();
    for work in [&topo.processing_queue, &topo.embeddings_queue] {
        let lanes = topology::lanes_in_use(conn, work, topo.lanes).await?;
        queues.extend(
            lanes
                .into_iter()
                .map(|lane| TypedQueue::lane(topology::lane_queue(work, lane))),
        );
    }
    queues.extend(
        topology::typed_queues(topo)
            .into_iter()
            .filter(|q| q.binding.is_some()),
    );
    let mut states = Vec::new();
    for queue in queues {
        let found = type_of(conn, topo, &queue).await?;
        let temporary = format!("{}{TEMPORARY_SUFFIX}", queue.name);
        let mut reader = DepthReader::new(conn);
        let depth = reader.read(&queue.name).await?;
        let temp = reader.read(&temporary).await?;
        reader.close().await;
        states.push(QueueState {
            messages: depth.map_or(0, |d| d.messages),
            consumers: depth.map_or(0, |d| d.consumers),
            in_temporary: temp.map(|d| d.messages),
            temporary_consumers: temp.map_or(0, |d| d.consumers),
            queue,
            found,
            temporary,
        });
    }
    Ok(Plan {
        to,
        version: None,
        max_priority: topo.max_priority,
        queues: states,
    })
}

/// Moves `q`, of type `from`, to its temporary queue of type `to`, replaces it with a queue
/// of type `to` and moves its messages back.
async fn convert_queue(
    conn: &Connection,
    topo: &TopologyConfig,
    q: &QueueState,
    from: QueueType,
    to: QueueType,
) -> Result<Converted, OpsError> {
    let name = q.queue.name.as_str();
    declare_temporary(conn, topo, q, to).await?;
    let mut moved_out = move_all(conn, name, &q.temporary, q.messages).await?;
    // From here on what is published to its exchange is not routed to it, and the last
    // arrivals follow the others.
    if let Some((exchange, key)) = &q.queue.binding {
        let channel = conn.create_channel().await?;
        channel
            .queue_unbind(
                name.into(),
                exchange.as_str().into(),
                key.as_str().into(),
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "unbound".into()).await;
    }
    moved_out += move_all(conn, name, &q.temporary, 0).await?;
    delete_empty(conn, name, from).await?;
    finish_queue(conn, topo, q, to, moved_out).await
}

/// Declares `q` as a queue of type `to` (and binds it) unless it is one already, moves the
/// messages of its temporary queue back, and deletes the temporary queue.
async fn finish_queue(
    conn: &Connection,
    topo: &TopologyConfig,
    q: &QueueState,
    to: QueueType,
    moved_out: u64,
) -> Result<Converted, OpsError> {
    let channel = conn.create_channel().await?;
    declare_typed(&channel, topo, &q.queue, to).await?;
    let _ = channel.close(200, "declared".into()).await;
    let moved_back = move_all(conn, &q.temporary, &q.queue.name, 0).await?;
    delete_empty(conn, &q.temporary, to).await?;
    tracing::info!(queue = %q.queue.name, moved_out, moved_back, to = %to, "queue converted");
    Ok(Converted {
        queue: q.queue.name.clone(),
        moved_out,
        moved_back,
    })
}

/// Declares `q`'s temporary queue as a queue of type `to`, with `q`'s arguments for that
/// type. A work queue's also dead-letters to the dead-letter exchange, as the
/// `llmq-dead-letter` policy makes the work queues do (it does not match the temporary
/// queue's name): a request that expires while it waits there is dead-lettered, not dropped.
async fn declare_temporary(
    conn: &Connection,
    topo: &TopologyConfig,
    q: &QueueState,
    to: QueueType,
) -> Result<(), OpsError> {
    let mut args = q.queue.arguments(topo, to);
    if q.queue.role == Role::Work {
        for (key, value) in [
            ("x-dead-letter-exchange", &topo.dead_letter_exchange),
            ("x-dead-letter-routing-key", &topo.dead_letter_key),
        ] {
            args.insert(key.into(), AMQPValue::LongString(value.as_str().into()));
        }
    }
    let channel = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(q.temporary.as_str().into(), durable, args)
        .await?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Moves every message of `from` to the queue `to`, one at a time (see the module's
/// documentation); how many. `expected` is how many `from` held when the plan was read: more
/// than [`MAX_ARRIVALS`] beyond it means something still publishes to `from`.
async fn move_all(conn: &Connection, from: &str, to: &str, expected: u32) -> Result<u64, OpsError> {
    let getter = conn.create_channel().await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let limit = u64::from(expected) + MAX_ARRIVALS;
    let mut moved = 0u64;
    let requeue = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    while let Some(m) = getter
        .basic_get(from.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        if moved >= limit {
            let _ = m.delivery.acker.nack(requeue).await;
            return Err(OpsError::Refused(format!(
                "messages keep arriving in {from} ({moved} moved to {to}): stop every worker \
                 and every publisher, then run the command again"
            )));
        }
        let props = copy_properties(&m.delivery.properties);
        let published = publish_one(&publisher, to, &m.delivery.data, props).await;
        if let Err(PublishError::Unconfirmed { .. }) = published {
            // Sent, maybe, and not confirmed (a broker alarm blocks publishing): the copy may
            // still arrive, so the original cannot be said to be in one place only.
            let _ = m.delivery.acker.nack(requeue).await;
            return Err(OpsError::Refused(format!(
                "the broker did not confirm the copy of a message from {from} to {to} within \
                 {}s (does a memory or disk alarm block publishing?); {moved} moved before \
                 it. The copy may still arrive while the original stays in {from}: compare \
                 them before running the command again",
                CONFIRM_TIMEOUT.as_secs()
            )));
        }
        if let Err(source) = published {
            let _ = m.delivery.acker.nack(requeue).await;
            return Err(OpsError::NotMoved {
                from: from.to_string(),
                to: to.to_string(),
                moved,
                source,
            });
        }
        match m.delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => moved += 1,
            // The copy is in `to` and the original goes back to `from`.
            _ => {
                return Err(OpsError::Refused(format!(
                    "a message moved from {from} to {to} could not be acked in {from}: it is \
                     now in both ({moved} moved before it); running the command again moves \
                     it a second time"
                )));
            }
        }
    }
    let _ = publisher.close(200, "moved".into()).await;
    let _ = getter.close(200, "moved".into()).await;
    Ok(moved)
}

/// Publishes a copy to `queue` by name, mandatory, and waits for the broker's confirm. One
/// publish at a time on `channel`: a return can only be this one's, so no id is added to
/// the headers (the copy's headers are the original's).
async fn publish_one(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let broker = |source| PublishError::Broker {
        destination: queue.to_string(),
        source,
    };
    let publish = async {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(broker)?
            .await
            .map_err(broker)
    };
    let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
        .await
        .map_err(|_| PublishError::Unconfirmed {
            destination: queue.to_string(),
        })??;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Returned {
                destination: queue.to_string(),
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
            })
        }
        Confirmation::Nack(None) | Confirmation::NotRequested => Err(PublishError::Nacked {
            destination: queue.to_string(),
        }),
    }
}

/// Every property of a message, for its copy; its headers without [`DELIVERY_HEADERS`].
pub fn copy_properties(from: &BasicProperties) -> BasicProperties {
    let mut to = BasicProperties::default();
    if let Some(headers) = from.headers() {
        let kept: FieldTable = headers
            .inner()
            .iter()
            .filter(|(k, _)| !DELIVERY_HEADERS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into();
        // Headers the broker added to a message that had none are not the message's.
        let only_added = kept.inner().is_empty() && !headers.inner().is_empty();
        if !only_added {
            to = to.with_headers(kept);
        }
    }
    // What every republish keeps, then what a republish sets afresh and a move keeps.
    to = publish::copy_properties(from, to);
    if let Some(v) = from.delivery_mode() {
        to = to.with_delivery_mode(*v);
    }
    if let Some(v) = from.expiration() {
        to = to.with_expiration(v.clone());
    }
    if let Some(v) = from.cluster_id() {
        to = to.with_cluster_id(v.clone());
    }
    to
}

/// Deletes the queue `name`, of type `queue_type`, once it is empty and unused. Quorum
/// queues do not take `if-empty` and `if-unused` (the broker refuses them), so emptiness is
/// checked just before, and what the deletion removed is counted: nothing, unless something
/// still publishes to the queue by name.
async fn delete_empty(
    conn: &Connection,
    name: &str,
    queue_type: QueueType,
) -> Result<(), OpsError> {
    let channel = conn.create_channel().await?;
    let depth = topology::queue_depth(&channel, name).await?;
    if depth.messages > 0 || depth.consumers > 0 {
        return Err(OpsError::Refused(format!(
            "{name} is not empty ({} messages, {} consumers) after its messages were moved: \
             stop every worker and every publisher, then run the command again",
            depth.messages, depth.consumers
        )));
    }
    let options = match queue_type {
        QueueType::Classic => QueueDeleteOptions {
            if_unused: true,
            if_empty: true,
            ..Default::default()
        },
        QueueType::Quorum => QueueDeleteOptions::default(),
    };
    let removed = channel.queue_delete(name.into(), options).await?;
    let _ = channel.close(200, "deleted".into()).await;
    if removed > 0 {
        return Err(OpsError::Refused(format!(
            "{removed} message(s) arrived in {name} as it was deleted, and went with it: \
             something still publishes to it by name"
        )));
    }
    Ok(())
}

/// What `llmq topology convert` prints after a conversion.
pub fn report(converted: &[Converted], to: QueueType) -> String {
    let mut out = String::new();
    for c in converted {
        let _ = writeln!(
            out,
            "{}: {to} now; {} messages moved out and {} back",
            c.queue, c.moved_out, c.moved_back
        );
    }
    if converted.is_empty() {
        let _ = writeln!(out, "every queue is {to} already: nothing to do");
    }
    let _ = writeln!(
        out,
        "start the fleet with topology.queue_type = \"{to}\" (LLMQ_TOPOLOGY__QUEUE_TYPE={to})"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(found: Found, consumers: u32, in_temporary: Option<u32>) -> QueueState {
        QueueState {
            queue: TypedQueue::lane("llm_processing.lane.00".into()),
            found,
            messages: 3,
            consumers,
            temporary: "llm_processing.lane.00.convert".into(),
            in_temporary,
            temporary_consumers: 0,
        }
    }

    #[test]
    fn each_queue_gets_the_step_its_state_calls_for() {
        use QueueType::{Classic, Quorum};
        let to = Quorum;
        assert_eq!(
            state(Found::Is(Classic), 0, None).step(to),
            Step::Convert { from: Classic }
        );
        assert_eq!(
            state(Found::Is(Classic), 0, Some(2)).step(to),
            Step::Convert { from: Classic },
            "an interrupted first move goes on"
        );
        assert_eq!(state(Found::Is(Quorum), 0, None).step(to), Step::Nothing);
        assert_eq!(state(Found::Missing, 0, None).step(to), Step::Nothing);
        assert_eq!(state(Found::Is(Quorum), 0, Some(4)).step(to), Step::Finish);
        assert_eq!(state(Found::Missing, 0, Some(0)).step(to), Step::Finish);
        assert!(matches!(
            state(Found::Neither, 0, None).step(to),
            Step::Refuse(_)
        ));
        let busy = state(Found::Is(Classic), 2, None).step(to);
        assert!(
            matches!(&busy, Step::Refuse(why) if why.contains("stop every worker")),
            "{busy:?}"
        );
        let long = QueueState {
            temporary: "q".repeat(250) + TEMPORARY_SUFFIX,
            ..state(Found::Is(Classic), 0, None)
        };
        assert!(matches!(long.step(to), Step::Refuse(_)));
    }

    #[test]
    fn a_plan_refuses_when_any_queue_cannot_be_converted_and_says_what_it_does() {
        let plan = Plan {
            to: QueueType::Quorum,
            version: Some(BrokerVersion::new(3, 13, 7)),
            max_priority: 10,
            queues: vec![
                state(Found::Is(QueueType::Classic), 0, None),
                state(Found::Is(QueueType::Classic), 1, None),
            ],
        };
        assert_eq!(plan.refusals().len(), 1);
        let text = plan.to_string();
        assert!(
            text.starts_with(
                "llm_processing.lane.00: classic, 3 messages: to quorum, through \
                 llm_processing.lane.00.convert and back\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("refused: llm_processing.lane.00 has 1 consumer(s)"),
            "{text}"
        );
        assert!(
            text.contains("(RabbitMQ 3.13.7): none, first in first out"),
            "{text}"
        );
    }

    #[test]
    fn a_copy_has_every_property_and_header_but_those_of_its_delivery() {
        let mut headers = FieldTable::default();
        headers.insert("x-llmq-attempts".into(), AMQPValue::LongInt(2));
        headers.insert("x-delivery-count".into(), AMQPValue::LongInt(3));
        let original = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("60000".into())
            .with_message_id("m".into())
            .with_timestamp(1_700_000_000)
            .with_type("t".into())
            .with_user_id("alice".into())
            .with_app_id("a".into())
            .with_cluster_id("k".into());
        let copy = copy_properties(&original);
        let mut expected_headers = FieldTable::default();
        expected_headers.insert("x-llmq-attempts".into(), AMQPValue::LongInt(2));
        assert_eq!(
            copy,
            original.clone().with_headers(expected_headers),
            "all but x-delivery-count"
        );
        let plain = BasicProperties::default().with_priority(1);
        assert_eq!(copy_properties(&plain), plain);
        let mut added = FieldTable::default();
        added.insert("x-delivery-count".into(), AMQPValue::LongInt(1));
        let delivered = plain.clone().with_headers(added);
        assert_eq!(copy_properties(&delivered), plain, "no headers of its own");
    }
}
