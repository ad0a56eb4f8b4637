//! (q) the (b) run on a RabbitMQ cluster (`--cluster-urls`, the three nodes of
//! `scripts/cluster.sh` under `make bench`): one replica given every node's address, 0 ms
//! upstream, `--cluster-jobs` jobs, once with classic queues and once with quorum queues.
//! What replicating every request, result and acknowledgement to a majority of nodes costs,
//! as quorum jobs/s over classic jobs/s (issue 21's goal: at least 0.8), beside what it costs
//! the broker alone: (a)'s ceiling on the cluster, a classic queue and a quorum one.

use super::{Bench, BenchError, broker, jobs};
use crate::{
    broker::connection,
    config::{AmqpConfig, QueueType, SecretUrl},
    tools::mock::MockOptions,
};

/// The two runs of (q).
#[derive(Debug, Clone, Copy)]
pub(super) struct OnCluster {
    /// With `topology.queue_type = "classic"`.
    pub(super) classic: jobs::JobsRun,
    /// With `topology.queue_type = "quorum"`.
    pub(super) quorum: jobs::JobsRun,
    /// (a) on the cluster, messages/s: a classic queue, a quorum queue.
    pub(super) ceilings: [f64; 2],
}

impl OnCluster {
    /// The figures of a run left out by `--only`, or without a cluster to run on.
    const SKIPPED: Self = Self {
        classic: jobs::JobsRun::SKIPPED,
        quorum: jobs::JobsRun::SKIPPED,
        ceilings: [f64::NAN; 2],
    };

    /// Quorum jobs/s over classic jobs/s.
    pub(super) fn ratio(&self) -> f64 {
        self.quorum.jobs_per_s / self.classic.jobs_per_s
    }
}

/// (q): both runs, classic first; skipped without `--cluster-urls`.
pub(super) async fn measure(bench: &Bench<'_>) -> Result<OnCluster, BenchError> {
    if !bench.on('q') {
        return Ok(OnCluster::SKIPPED);
    }
    let urls: Vec<SecretUrl> = bench
        .args
        .cluster_urls
        .iter()
        .flat_map(|list| list.split(','))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(SecretUrl::new)
        .collect();
    if urls.is_empty() {
        eprintln!("(q) skipped: no --cluster-urls (make bench gives the local cluster's)");
        return Ok(OnCluster::SKIPPED);
    }
    let amqp = AmqpConfig {
        url: None,
        urls: Some(urls),
        ..bench.base.config.amqp.clone()
    };
    let conn = connection::connect(&amqp, "llmq bench (q)").await?;
    let n = bench.args.cluster_jobs;
    bench.mock.set_options(MockOptions::default());
    let mut runs = [jobs::JobsRun::SKIPPED; 2];
    let mut ceilings = [f64::NAN; 2];
    let types = [QueueType::Classic, QueueType::Quorum];
    for (ceiling, queue_type) in ceilings.iter_mut().zip(types) {
        let raw = 2 * n;
        eprintln!("(q) broker ceiling on the cluster, a {queue_type} queue: {raw} x 1 KiB");
        *ceiling = broker::broker_ceiling(&conn, &amqp, raw, queue_type).await?;
        eprintln!("    {ceiling:.0} msg/s");
    }
    for (run, queue_type) in runs.iter_mut().zip(types) {
        eprintln!(
            "(q) cluster of {} nodes, {queue_type} queues, 0 ms upstream: {n} jobs",
            amqp.addresses().len()
        );
        let cfg = bench.config(|c| {
            c.amqp = amqp.clone();
            c.topology.queue_type = queue_type;
        });
        *run = jobs::jobs_per_s(&conn, &cfg, n).await?;
        eprintln!(
            "    {:.0} jobs/s, worker CPU {:.1} µs/job",
            run.jobs_per_s, run.cpu_us_per_job
        );
    }
    let _ = conn.close(200, "bench done".into()).await;
    let [classic, quorum] = runs;
    Ok(OnCluster {
        classic,
        quorum,
        ceilings,
    })
}
