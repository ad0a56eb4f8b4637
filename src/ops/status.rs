//! `llmq status`: depths and consumers of every queue of the topology.
//!
//! The fair-share lanes are many (`topology.lanes` per work queue, 16 by default) and mostly
//! empty, so the table folds them: under each work queue one line `<queue>.lane.* (<n>
//! lanes)` with their messages summed and the fewest consumers any of them has (a lane
//! nobody consumes shows as 0), then only the lanes that hold messages. `--json` lists every
//! queue, each lane included, flat. What a message's priority does in the work queues and
//! their lanes (their type and the broker's version decide it) closes the table, and is each
//! of their rows' `priorities` in JSON.

use std::{collections::HashSet, fmt::Write};

use serde::Serialize;

use super::OpsError;
use crate::{
    broker::{
        arguments::{self, Priorities},
        connection, retry,
        topology::{self, DepthReader},
        version,
    },
    config::{Config, TopologyConfig},
};

/// One queue in `llmq status`.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    /// Its name.
    pub queue: String,
    /// Ready messages.
    pub messages: u32,
    /// Consumers subscribed.
    pub consumers: u32,
    /// For a fair-share lane, the work queue it is a lane of; absent for every other queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane_of: Option<String>,
    /// For a work queue or a lane, what a message's priority does there; absent for every
    /// other queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priorities: Option<Priorities>,
}

/// Depths and consumers of every queue of the topology (missing ones are skipped), each work
/// queue followed by its lanes.
pub async fn status(config: &Config) -> Result<Vec<QueueStatus>, OpsError> {
    let conn = connection::connect(&config.amqp, "llmq status").await?;
    let broker = version::when_quorum(&config.amqp, config.topology.queue_type).await;
    // The lanes of an earlier, larger topology.lanes too, while they are there.
    let t = &config.topology;
    let lanes = [
        topology::lanes_in_use(&conn, &t.processing_queue, t.lanes).await?,
        topology::lanes_in_use(&conn, &t.embeddings_queue, t.lanes).await?,
    ];
    let priorities = arguments::work_queues(t.queue_type, t.max_priority, broker).priorities;
    let work = [&t.processing_queue, &t.embeddings_queue];
    let mut reader = DepthReader::new(&conn);
    let mut out = Vec::new();
    for (queue, lane_of) in queues(t, &lanes) {
        if let Some(depth) = reader.read(&queue).await? {
            let waits_by_priority = lane_of.is_some() || work.contains(&&queue);
            out.push(QueueStatus {
                queue,
                messages: depth.messages,
                consumers: depth.consumers,
                lane_of,
                priorities: waits_by_priority.then_some(priorities),
            });
        }
    }
    reader.close().await;
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// Every queue `llmq status` reads, in its order, each work queue followed by its `lanes`.
fn queues(t: &TopologyConfig, lanes: &[Vec<u16>; 2]) -> Vec<(String, Option<String>)> {
    let mut queues = Vec::new();
    for (work, lanes) in [&t.processing_queue, &t.embeddings_queue]
        .into_iter()
        .zip(lanes)
    {
        queues.push((work.clone(), None));
        queues.extend(
            lanes
                .iter()
                .map(|lane| (topology::lane_queue(work, *lane), Some(work.clone()))),
        );
    }
    let others = [
        t.results_queue.clone(),
        t.dead_letter_queue.clone(),
        t.unroutable_queue.clone(),
    ];
    let tiers = retry::TIERS
        .iter()
        .map(|tier| topology::retry_queue(t, tier.name));
    queues.extend(others.into_iter().chain(tiers).map(|q| (q, None)));
    queues
}

/// The table `llmq status` prints: one line per queue, the lanes folded (see the module's
/// documentation).
pub fn table(queues: &[QueueStatus]) -> String {
    let mut out = String::new();
    row(&mut out, "queue", "messages", "consumers");
    let mut folded = HashSet::new();
    for q in queues {
        match &q.lane_of {
            None => row(&mut out, &q.queue, q.messages, q.consumers),
            Some(work) if folded.insert(work) => lane_rows(&mut out, work, queues),
            Some(_) => {}
        }
    }
    if let Some(priorities) = queues.iter().find_map(|q| q.priorities) {
        let _ = writeln!(
            out,
            "priorities in the work queues and their lanes: {priorities}"
        );
    }
    out
}

/// The lanes of work queue `work`: their summary line, then each lane that holds messages.
fn lane_rows(out: &mut String, work: &str, queues: &[QueueStatus]) {
    let lanes: Vec<&QueueStatus> = queues
        .iter()
        .filter(|q| q.lane_of.as_deref() == Some(work))
        .collect();
    let messages: u64 = lanes.iter().map(|q| u64::from(q.messages)).sum();
    let fewest_consumers = lanes.iter().map(|q| q.consumers).min().unwrap_or(0);
    let summary = format!("{work}.lane.* ({} lanes)", lanes.len());
    row(out, &summary, messages, fewest_consumers);
    for lane in lanes.iter().filter(|q| q.messages > 0) {
        row(
            out,
            &format!("  {}", lane.queue),
            lane.messages,
            lane.consumers,
        );
    }
}

/// One line of the table.
fn row(out: &mut String, queue: &str, messages: impl ToString, consumers: impl ToString) {
    let _ = writeln!(
        out,
        "{:<48} {:>10} {:>10}",
        queue,
        messages.to_string(),
        consumers.to_string()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str, messages: u32, consumers: u32, lane_of: Option<&str>) -> QueueStatus {
        QueueStatus {
            queue: name.into(),
            messages,
            consumers,
            lane_of: lane_of.map(String::from),
            priorities: None,
        }
    }

    #[test]
    fn every_lane_is_read_after_its_work_queue() {
        let t = TopologyConfig::default();
        let configured: Vec<u16> = (0..t.lanes).collect();
        let lanes = [configured.clone(), configured];
        let names: Vec<String> = queues(&t, &lanes).into_iter().map(|(q, _)| q).collect();
        assert_eq!(names[0], "llm_processing");
        assert_eq!(names[1], "llm_processing.lane.00");
        assert_eq!(names[16], "llm_processing.lane.0f");
        assert_eq!(names[17], "llm_embeddings");
        assert_eq!(names[18], "llm_embeddings.lane.00");
        assert_eq!(names.len(), 2 + 32 + 3 + retry::TIERS.len());
        let in_lanes = queues(&t, &lanes)
            .into_iter()
            .filter(|(_, w)| w.is_some())
            .count();
        assert_eq!(in_lanes, 32);
    }

    #[test]
    fn the_table_folds_the_lanes_and_shows_those_that_hold_messages() {
        let mut rows = vec![queue("llm_processing", 5, 2, None)];
        for lane in 0..16u16 {
            let name = topology::lane_queue("llm_processing", lane);
            let messages = match lane {
                3 => 100,
                10 => 20,
                _ => 0,
            };
            let consumers = if lane == 7 { 1 } else { 2 };
            rows.push(queue(&name, messages, consumers, Some("llm_processing")));
        }
        rows.push(queue("llm_processing.dlq", 1, 0, None));
        let text = table(&rows);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines,
            vec![
                vec!["queue", "messages", "consumers"],
                vec!["llm_processing", "5", "2"],
                vec!["llm_processing.lane.*", "(16", "lanes)", "120", "1"],
                vec!["llm_processing.lane.03", "100", "2"],
                vec!["llm_processing.lane.0a", "20", "2"],
                vec!["llm_processing.dlq", "1", "0"],
            ]
        );
    }

    #[test]
    fn the_table_ends_with_the_work_queues_priorities() {
        let two = Some(Priorities::TwoLevels);
        let rows = [
            QueueStatus {
                priorities: two,
                ..queue("llm_processing", 1, 1, None)
            },
            queue("llm_processing.dlq", 0, 0, None),
        ];
        let text = table(&rows);
        assert_eq!(
            text.lines().last(),
            Some(
                format!(
                    "priorities in the work queues and their lanes: {}",
                    Priorities::TwoLevels
                )
                .as_str()
            )
        );
        let json = serde_json::to_value(&rows).expect("serializes");
        assert_eq!(json[0]["priorities"], Priorities::TwoLevels.to_string());
        assert!(json[1].get("priorities").is_none());
    }

    #[test]
    fn json_marks_lanes_and_only_lanes() {
        let rows = [
            queue("llm_processing", 0, 1, None),
            queue("llm_processing.lane.00", 4, 1, Some("llm_processing")),
        ];
        let json = serde_json::to_value(rows).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!([
                {"queue": "llm_processing", "messages": 0, "consumers": 1},
                {"queue": "llm_processing.lane.00", "messages": 4, "consumers": 1,
                 "lane_of": "llm_processing"},
            ])
        );
    }
}
