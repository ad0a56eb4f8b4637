//! `llmq topology`: declare the topology as a worker does at start-up, without consuming,
//! and describe it. `llmq topology convert` is [`super::convert`].

use super::OpsError;
use crate::{
    broker::{
        arguments, connection, retry, topology,
        version::{self, BrokerVersion},
    },
    config::{Config, KeepResults, QueueType, TopologyConfig},
    contract::request::Kind,
};

/// Declares the topology (as a worker does at start-up) without consuming; the broker's
/// version, when it says it and the queues are quorum ones (see [`version::when_quorum`]). A queue of the other type than `topology.queue_type` is an
/// error that gives the procedure, as at a worker's start.
pub async fn declare(config: &Config) -> Result<Option<BrokerVersion>, OpsError> {
    let conn = connection::connect(&config.amqp, "llmq topology").await?;
    let declared = topology::declare_on(&conn, &config.topology).await;
    let _ = conn.close(200, "done".into()).await;
    declared?;
    Ok(version::when_quorum(&config.amqp, config.topology.queue_type).await)
}

/// The broker's version for [`describe`], declaring nothing: read only for quorum queues
/// (see [`version::when_quorum`]).
pub async fn version(config: &Config) -> Option<BrokerVersion> {
    version::when_quorum(&config.amqp, config.topology.queue_type).await
}

/// The exchanges and queues, one per line, as `llmq topology` prints them, then what a
/// message's priority does in the work queues on a broker of `version`.
pub fn describe(t: &TopologyConfig, version: Option<BrokerVersion>) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    // How the work queues and their lanes are declared, after their key.
    let work = match t.queue_type {
        QueueType::Classic => format!("x-max-priority {}", t.max_priority),
        QueueType::Quorum => "quorum".to_string(),
    };
    // The same for the dead-letter, results and unroutable queues.
    let holding = match t.queue_type {
        QueueType::Classic => "",
        QueueType::Quorum => ", quorum",
    };
    line(format!("exchange {} (direct)", t.request_exchange));
    for (queue, key) in Kind::ALL.map(|k| (t.work_queue(k), t.work_key(k))) {
        line(format!("  -> queue {queue} (key {key}, {work})"));
    }
    for queue in Kind::ALL.map(|k| t.work_queue(k)) {
        if let Some(lanes) = lane_range(queue, t.lanes) {
            line(format!(
                "queues {lanes} (fair-share lanes, {work}, bound to no exchange: filled \
                 through the default exchange)"
            ));
        }
    }
    line(format!("exchange {} (direct)", t.results_exchange));
    let kept = match t.keep_results {
        KeepResults::Always => Some("every result"),
        KeepResults::WithoutReplyTo => Some("results that reached no reply_to"),
        KeepResults::Never => None,
    };
    if let Some(kept) = kept {
        line(format!(
            "  -> queue {} (key {}{holding}; keeps {kept})",
            t.results_queue, t.results_key
        ));
    }
    line(format!("exchange {} (direct)", t.dead_letter_exchange));
    line(format!(
        "  -> queue {} (key {}{holding})",
        t.dead_letter_queue, t.dead_letter_key
    ));
    line(format!("exchange {} (headers)", t.retry_exchange));
    for tier in retry::TIERS {
        line(format!(
            "  -> queue {} (quorum, dead-letters to {} at least once)",
            topology::retry_queue(t, tier.name),
            t.request_exchange
        ));
    }
    line(format!(
        "exchange {} (fanout; the alternate exchange of {}, {} and {} by policy)",
        t.unroutable_exchange, t.request_exchange, t.dead_letter_exchange, t.retry_exchange
    ));
    match t.queue_type {
        QueueType::Classic => line(format!("  -> queue {}", t.unroutable_queue)),
        QueueType::Quorum => line(format!("  -> queue {} (quorum)", t.unroutable_queue)),
    }
    line(format!(
        "exchange {} (fanout; control messages such as {{\"cancel\": \"<request_id>\"}})",
        t.control_exchange
    ));
    line(format!(
        "  -> queue {}.<uuid> per worker (exclusive)",
        t.control_exchange
    ));
    let priorities = arguments::work_queues(t.queue_type, t.max_priority, version).priorities;
    match t.queue_type {
        // The same on every version: the version is not read.
        QueueType::Classic => line(format!(
            "priorities in the work queues and their lanes: {priorities}"
        )),
        QueueType::Quorum => {
            let broker = version.map_or_else(|| "unknown".to_string(), |v| v.to_string());
            line(format!(
                "priorities in the work queues and their lanes (RabbitMQ {broker}): {priorities}"
            ));
        }
    }
    out
}

/// The lanes of `queue` as `<first> .. <last>`, `None` without lanes.
fn lane_range(queue: &str, lanes: u16) -> Option<String> {
    let last = lanes.checked_sub(1)?;
    Some(format!(
        "{} .. {}",
        topology::lane_queue(queue, 0),
        topology::lane_queue(queue, last)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_every_exchange_and_queue() {
        let t = TopologyConfig::default();
        let text = describe(&t, None);
        assert!(text.starts_with(&format!("exchange {} (direct)\n", t.request_exchange)));
        for name in [
            &t.processing_queue,
            &t.embeddings_queue,
            &t.results_exchange,
            &t.dead_letter_queue,
            &t.retry_exchange,
            &t.unroutable_queue,
            &t.control_exchange,
        ] {
            assert!(text.contains(name.as_str()), "{name} missing in\n{text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.contains("dead-letters to"))
                .count(),
            retry::TIERS.len()
        );
    }

    #[test]
    fn describes_which_results_the_results_queue_keeps() {
        let t = TopologyConfig::default();
        let queue = format!(
            "  -> queue {} (key {}; keeps",
            t.results_queue, t.results_key
        );
        let with = |keep_results| {
            describe(
                &TopologyConfig {
                    keep_results,
                    ..t.clone()
                },
                None,
            )
        };
        let default = describe(&t, None);
        assert!(
            default.contains(&format!("{queue} results that reached no reply_to)\n")),
            "{default}"
        );
        let always = with(KeepResults::Always);
        assert!(
            always.contains(&format!("{queue} every result)\n")),
            "{always}"
        );
        let never = with(KeepResults::Never);
        assert!(!never.contains(&queue), "{never}");
        assert!(
            never.contains(&format!("exchange {} (direct)\n", t.results_exchange)),
            "{never}"
        );
    }

    #[test]
    fn describes_the_queue_type_and_the_priorities_on_this_broker() {
        let classic = describe(&TopologyConfig::default(), None);
        assert!(
            classic.contains("  -> queue llm_processing (key process, x-max-priority 10)\n"),
            "{classic}"
        );
        assert!(
            classic.ends_with(
                "priorities in the work queues and their lanes: strict, 0 to 10 (classic, \
                 x-max-priority 10)\n"
            ),
            "{classic}"
        );
        let t = TopologyConfig {
            queue_type: QueueType::Quorum,
            ..TopologyConfig::default()
        };
        let quorum = describe(&t, Some(BrokerVersion::new(4, 1, 2)));
        for expected in [
            "  -> queue llm_processing (key process, quorum)\n",
            "(fair-share lanes, quorum, bound to no exchange",
            "  -> queue llm_processing.dlq (key dead, quorum)\n",
            "  -> queue llm_results (key result, quorum; keeps",
            "  -> queue llm_unroutable (quorum)\n",
            "(RabbitMQ 4.1.2): two levels, a priority above 4 is high",
        ] {
            assert!(quorum.contains(expected), "{expected} missing in\n{quorum}");
        }
        assert!(!quorum.contains("x-max-priority"), "{quorum}");
    }

    #[test]
    fn describes_the_lanes_unless_there_are_none() {
        let t = TopologyConfig::default();
        let text = describe(&t, None);
        for queue in [&t.processing_queue, &t.embeddings_queue] {
            let range = format!("queues {queue}.lane.00 .. {queue}.lane.0f (fair-share lanes");
            assert!(text.contains(&range), "{range} missing in\n{text}");
        }
        let off = describe(&TopologyConfig { lanes: 0, ..t }, None);
        assert!(!off.contains(".lane."), "{off}");
    }
}
