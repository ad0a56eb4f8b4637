//! `llmq topology`: declare the topology as a worker does at start-up, without consuming,
//! and describe it.

use super::{OpsError, open};
use crate::{
    broker::{retry, topology},
    config::{Config, KeepResults, TopologyConfig},
    contract::request::Kind,
};

/// Declares the topology (as a worker does at start-up) without consuming.
pub async fn declare(config: &Config) -> Result<(), OpsError> {
    let (conn, channel) = open(config, "llmq topology").await?;
    topology::declare(&channel, &config.topology).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// The exchanges and queues, one per line, as `llmq topology` prints them.
pub fn describe(t: &TopologyConfig) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!("exchange {} (direct)", t.request_exchange));
    for (queue, key) in Kind::ALL.map(|k| (t.work_queue(k), t.work_key(k))) {
        line(format!(
            "  -> queue {queue} (key {key}, x-max-priority {})",
            t.max_priority
        ));
    }
    for queue in Kind::ALL.map(|k| t.work_queue(k)) {
        if let Some(lanes) = lane_range(queue, t.lanes) {
            line(format!(
                "queues {lanes} (fair-share lanes, x-max-priority {}, bound to no exchange: \
                 filled through the default exchange)",
                t.max_priority
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
            "  -> queue {} (key {}; keeps {kept})",
            t.results_queue, t.results_key
        ));
    }
    line(format!("exchange {} (direct)", t.dead_letter_exchange));
    line(format!(
        "  -> queue {} (key {})",
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
    line(format!("  -> queue {}", t.unroutable_queue));
    line(format!(
        "exchange {} (fanout; control messages such as {{\"cancel\": \"<request_id>\"}})",
        t.control_exchange
    ));
    line(format!(
        "  -> queue {}.<uuid> per worker (exclusive)",
        t.control_exchange
    ));
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
        let text = describe(&t);
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
            describe(&TopologyConfig {
                keep_results,
                ..t.clone()
            })
        };
        let default = describe(&t);
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
    fn describes_the_lanes_unless_there_are_none() {
        let t = TopologyConfig::default();
        let text = describe(&t);
        for queue in [&t.processing_queue, &t.embeddings_queue] {
            let range = format!("queues {queue}.lane.00 .. {queue}.lane.0f (fair-share lanes");
            assert!(text.contains(&range), "{range} missing in\n{text}");
        }
        let off = describe(&TopologyConfig { lanes: 0, ..t });
        assert!(!off.contains(".lane."), "{off}");
    }
}
