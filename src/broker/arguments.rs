//! What each queue llmq declares is declared with, for `topology.queue_type` and the broker's
//! version, and what that makes of message priorities: the one place that knows which
//! argument each queue type takes.
//!
//! Classic queues are declared exactly as earlier versions declared them, so existing
//! deployments (and clients that declare `llm_processing` the way tutorials do) redeclare
//! without `PRECONDITION_FAILED`: the work queues and their lanes `{x-max-priority: 10}`, the
//! others nothing.
//!
//! Quorum queues get the same arguments on every broker version. A queue's arguments are
//! compared at each redeclaration (`x-delivery-limit` and `x-queue-type` among them), so
//! arguments that followed the version would make every start fail with
//! `PRECONDITION_FAILED` once the broker is upgraded. Only what the priorities mean follows
//! the version:
//!
//! - `x-max-priority` is never declared on a quorum queue. RabbitMQ refuses a new quorum
//!   queue that has it (`invalid arg 'x-max-priority' ... of queue type rabbit_quorum_queue`,
//!   3.10 to 4.3: the argument belongs to classic queues only). Quorum queues of 4.0 to 4.2
//!   have two levels built in, and from 4.3 strict priorities 0 to 31, always on, with no
//!   argument to ask for them.
//! - `x-delivery-limit` is [`QUORUM_DELIVERY_LIMIT`], a million. llmq counts redeliveries
//!   itself (the `x-llmq-redeliveries` header, up to `retry.max_redeliveries`) and republishes
//!   a request it counted as a new message, so the broker's own count of one message stays
//!   small. RabbitMQ 4.0 gives every quorum queue a delivery limit of 20 unless one is set,
//!   past which it dead-letters or drops a message on its own; `-1` (no limit) is not an
//!   option: it disables the limit on 4.0 and later, but 3.x compares a message's count with
//!   it as it is, so every message handed back would be dropped at once. A million is safe on
//!   every version and never reached before llmq's own count.
//! - `x-dead-letter-strategy: at-least-once` with `x-overflow: reject-publish` (which it
//!   needs) on the work queues and their lanes: the queues where the broker itself
//!   dead-letters (an expired request, by the `llmq-dead-letter` policy's exchange). The
//!   broker then keeps a dead letter until the dead-letter queue has confirmed it. The
//!   dead-letter, results and unroutable queues dead-letter nothing (an expired result is
//!   dropped by design), so they need neither.

use std::fmt;

use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::{broker::version::BrokerVersion, config::QueueType};

/// The `x-delivery-limit` of every quorum queue but the retry tiers (see the module's
/// documentation).
pub const QUORUM_DELIVERY_LIMIT: i32 = 1_000_000;

/// What a message's `priority` does in the work queues and their lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priorities {
    /// A classic queue with `x-max-priority`: strict, `0` to `max` (a higher priority counts
    /// as `max`, a message without one as `0`).
    Strict {
        /// `x-max-priority`.
        max: u8,
    },
    /// A quorum queue from RabbitMQ 4.3: strict, `0` to `31` (a message without a priority
    /// counts as `4`).
    QuorumStrict,
    /// A quorum queue of RabbitMQ 4.0 to 4.2: two levels, a priority above 4 is high; high
    /// messages are delivered two for one normal.
    TwoLevels,
    /// A quorum queue before RabbitMQ 4.0: none, first in first out.
    None,
    /// A quorum queue on a broker that did not say its version.
    Unknown,
}

impl Priorities {
    /// The quorum queues' priorities on a broker of `version`.
    pub fn of_quorum(version: Option<BrokerVersion>) -> Self {
        match version {
            None => Priorities::Unknown,
            Some(v) if v < BrokerVersion::new(4, 0, 0) => Priorities::None,
            Some(v) if v < BrokerVersion::new(4, 3, 0) => Priorities::TwoLevels,
            Some(_) => Priorities::QuorumStrict,
        }
    }
}

impl fmt::Display for Priorities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Priorities::Strict { max } => {
                write!(f, "strict, 0 to {max} (classic, x-max-priority {max})")
            }
            Priorities::QuorumStrict => f.write_str(
                "strict, 0 to 31, a message without a priority counts as 4 (quorum, RabbitMQ \
                 4.3 and later)",
            ),
            Priorities::TwoLevels => f.write_str(
                "two levels, a priority above 4 is high, two high delivered for one normal \
                 (quorum, RabbitMQ 4.0 to 4.2)",
            ),
            Priorities::None => {
                f.write_str("none, first in first out (quorum, before RabbitMQ 4.0)")
            }
            Priorities::Unknown => f.write_str(
                "unknown: the broker did not say its version (quorum: none before 4.0, two \
                 levels in 4.0 to 4.2, strict from 4.3)",
            ),
        }
    }
}

impl Serialize for Priorities {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How the work queues and their lanes are declared, and what their priorities are.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkQueues {
    /// The queue arguments.
    pub arguments: FieldTable,
    /// What a message's priority does in them.
    pub priorities: Priorities,
}

/// The work queues' declaration for `queue_type` on a broker of `version` (`None` when it
/// did not say): classic `{x-max-priority: max_priority}` whatever the version; quorum the
/// same arguments on every version (see the module's documentation), its priorities as the
/// version has them.
pub fn work_queues(
    queue_type: QueueType,
    max_priority: u8,
    version: Option<BrokerVersion>,
) -> WorkQueues {
    match queue_type {
        QueueType::Classic => {
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-max-priority".into(),
                AMQPValue::LongInt(max_priority.into()),
            );
            WorkQueues {
                arguments,
                priorities: Priorities::Strict { max: max_priority },
            }
        }
        QueueType::Quorum => {
            let mut arguments = quorum();
            for (key, value) in [
                ("x-dead-letter-strategy", "at-least-once"),
                // at-least-once falls back to at-most-once without it.
                ("x-overflow", "reject-publish"),
            ] {
                arguments.insert(key.into(), AMQPValue::LongString(value.into()));
            }
            WorkQueues {
                arguments,
                priorities: Priorities::of_quorum(version),
            }
        }
    }
}

/// The arguments of the queues that keep messages for someone to read (the dead-letter
/// queue, `results_queue`, `unroutable_queue`): none for classic; for quorum its type and
/// its delivery limit.
pub fn holding_queue(queue_type: QueueType) -> FieldTable {
    match queue_type {
        QueueType::Classic => FieldTable::default(),
        QueueType::Quorum => quorum(),
    }
}

/// `x-queue-type: quorum` and `x-delivery-limit` [`QUORUM_DELIVERY_LIMIT`].
fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(QUORUM_DELIVERY_LIMIT),
    );
    arguments
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: u32, minor: u32, patch: u32) -> Option<BrokerVersion> {
        Some(BrokerVersion::new(major, minor, patch))
    }

    /// The arguments as `key=value` strings, sorted.
    fn listed(args: &FieldTable) -> Vec<String> {
        let mut out: Vec<String> = args
            .inner()
            .iter()
            .map(|(k, v)| match v {
                AMQPValue::LongString(s) => format!("{k}={s}"),
                AMQPValue::LongInt(n) => format!("{k}={n}"),
                other => format!("{k}={other:?}"),
            })
            .collect();
        out.sort();
        out
    }

    const QUORUM_WORK: [&str; 4] = [
        "x-dead-letter-strategy=at-least-once",
        "x-delivery-limit=1000000",
        "x-overflow=reject-publish",
        "x-queue-type=quorum",
    ];

    /// Byte for byte what earlier versions declared, on every broker version.
    #[test]
    fn classic_work_queues_have_exactly_x_max_priority() {
        for version in [None, v(3, 10, 8), v(3, 13, 7), v(4, 1, 0), v(4, 3, 0)] {
            let w = work_queues(QueueType::Classic, 10, version);
            assert_eq!(w.arguments.inner().len(), 1);
            assert_eq!(
                w.arguments.inner().get("x-max-priority"),
                Some(&AMQPValue::LongInt(10))
            );
            assert_eq!(w.priorities, Priorities::Strict { max: 10 });
        }
        let w = work_queues(QueueType::Classic, 5, None);
        assert_eq!(listed(&w.arguments), ["x-max-priority=5"]);
        assert_eq!(holding_queue(QueueType::Classic), FieldTable::default());
    }

    #[test]
    fn quorum_work_queues_on_3_x_have_no_priorities() {
        for version in [v(3, 10, 0), v(3, 10, 8), v(3, 13, 7)] {
            let w = work_queues(QueueType::Quorum, 10, version);
            assert_eq!(listed(&w.arguments), QUORUM_WORK);
            assert_eq!(w.priorities, Priorities::None);
        }
    }

    #[test]
    fn quorum_work_queues_on_4_0_to_4_2_have_two_levels_and_no_x_max_priority() {
        for version in [v(4, 0, 0), v(4, 1, 7), v(4, 2, 9)] {
            let w = work_queues(QueueType::Quorum, 10, version);
            assert_eq!(listed(&w.arguments), QUORUM_WORK);
            assert_eq!(w.priorities, Priorities::TwoLevels);
        }
    }

    /// Strict from 4.3, with no argument: RabbitMQ refuses `x-max-priority` on a new quorum
    /// queue there too.
    #[test]
    fn quorum_work_queues_from_4_3_are_strict_without_x_max_priority() {
        for version in [v(4, 3, 0), v(4, 3, 5), v(5, 0, 0)] {
            let w = work_queues(QueueType::Quorum, 10, version);
            assert_eq!(listed(&w.arguments), QUORUM_WORK);
            assert_eq!(w.priorities, Priorities::QuorumStrict);
        }
    }

    #[test]
    fn quorum_work_queues_on_an_unknown_version_are_declared_all_the_same() {
        let w = work_queues(QueueType::Quorum, 10, None);
        assert_eq!(listed(&w.arguments), QUORUM_WORK);
        assert_eq!(w.priorities, Priorities::Unknown);
    }

    /// An upgrade of the broker must not change what is declared: the arguments are compared
    /// at every redeclaration.
    #[test]
    fn quorum_arguments_do_not_follow_the_version() {
        let versions = [
            None,
            v(3, 10, 8),
            v(3, 13, 7),
            v(4, 0, 0),
            v(4, 2, 1),
            v(4, 3, 0),
        ];
        for queue_type in [QueueType::Classic, QueueType::Quorum] {
            let first = work_queues(queue_type, 10, versions[0]).arguments;
            for version in versions {
                assert_eq!(work_queues(queue_type, 10, version).arguments, first);
            }
        }
    }

    #[test]
    fn quorum_holding_queues_have_their_type_and_a_delivery_limit_only() {
        assert_eq!(
            listed(&holding_queue(QueueType::Quorum)),
            ["x-delivery-limit=1000000", "x-queue-type=quorum"]
        );
    }

    #[test]
    fn priorities_read_as_what_they_do() {
        assert_eq!(
            Priorities::Strict { max: 10 }.to_string(),
            "strict, 0 to 10 (classic, x-max-priority 10)"
        );
        assert!(
            Priorities::TwoLevels
                .to_string()
                .contains("above 4 is high")
        );
        assert!(Priorities::QuorumStrict.to_string().contains("0 to 31"));
        assert_eq!(
            serde_json::to_value(Priorities::TwoLevels).unwrap(),
            serde_json::json!(Priorities::TwoLevels.to_string())
        );
    }
}
