//! (b), (c), (e), (g), and (u) through [`jobs_per_s`]: runs of jobs published as fast as
//! confirms allow, timed from the first publish to the last result, with the worker's CPU
//! time and peak RSS over the run and the error results.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use lapin::Connection;
use serde::Deserialize;
use serde_json::json;

use super::{
    Bench, BenchError,
    broker::{collect, publish_requests},
    worker::{RunConfig, clock_ticks_per_s, cpu_ticks, finish, start_worker, status_kib},
};
use crate::tools::mock::MockOptions;

/// What a worker did with a run of jobs.
#[derive(Debug, Clone, Copy)]
pub(super) struct JobsRun {
    /// From the first publish to the last result.
    pub(super) jobs_per_s: f64,
    /// The worker's VmHWM at the end, KiB.
    pub(super) peak_rss_kib: u64,
    /// The worker's user + system CPU time from the first publish to the last result, per
    /// job (its start-up is left out).
    pub(super) cpu_us_per_job: f64,
    /// Results with `status: error`.
    pub(super) errors: u64,
}

impl JobsRun {
    /// The figures of a run left out by `--only`.
    pub(super) const SKIPPED: Self = Self {
        jobs_per_s: f64::NAN,
        peak_rss_kib: 0,
        cpu_us_per_job: f64::NAN,
        errors: 0,
    };
}

/// (b) and (g): one replica, 0 ms upstream.
pub(super) async fn measure_fast(bench: &Bench<'_>) -> Result<JobsRun, BenchError> {
    if !bench.on('b') {
        return Ok(JobsRun::SKIPPED);
    }
    let n = bench.args.jobs;
    eprintln!("(b, g) one replica, 0 ms upstream: {n} jobs");
    bench.mock.set_options(MockOptions::default());
    let cfg = bench.config(|_| {});
    let run = jobs_per_s(&bench.conn, &cfg, n).await?;
    eprintln!(
        "    {:.0} jobs/s, worker CPU {:.1} µs/job",
        run.jobs_per_s, run.cpu_us_per_job
    );
    Ok(run)
}

/// (c) and (e): one replica, 200 ms upstream, 1000 calls in flight.
pub(super) async fn measure_slow(bench: &Bench<'_>) -> Result<JobsRun, BenchError> {
    if !bench.on('c') {
        return Ok(JobsRun::SKIPPED);
    }
    let n = bench.args.slow_jobs;
    eprintln!("(c, e) one replica, 200 ms upstream, max_inflight 1000: {n} jobs");
    bench.mock.set_options(MockOptions {
        latency_ms: 200,
        ..Default::default()
    });
    let cfg = bench.config(|c| c.worker.max_inflight = 1000);
    let run = jobs_per_s(&bench.conn, &cfg, n).await?;
    eprintln!(
        "    {:.0} jobs/s, peak RSS {:.1} MiB",
        run.jobs_per_s,
        run.peak_rss_kib as f64 / 1024.0
    );
    Ok(run)
}

/// `n` chat jobs published as fast as confirms allow, until the last result.
pub(super) async fn jobs_per_s(
    conn: &Connection,
    cfg: &RunConfig,
    n: usize,
) -> Result<JobsRun, BenchError> {
    let key = cfg.topology.processing_key.clone();
    run_jobs(conn, cfg, n, &key, chat_body).await
}

/// A chat request as the (b), (c) and (h) runs send it.
pub(super) fn chat_body(i: usize) -> serde_json::Value {
    json!({"prompt": format!("bench {i}"), "request_id": format!("b-{i}")})
}

/// The part of a result that says whether it failed.
#[derive(Deserialize)]
struct ResultStatus {
    status: String,
}

/// Whether a result's body says `status: error`.
pub(super) fn is_error(result: &[u8]) -> bool {
    serde_json::from_slice::<ResultStatus>(result).is_ok_and(|r| r.status == "error")
}

/// Publishes `n` requests made by `body` on `key` through a fresh worker, as fast as confirms
/// allow; returns jobs/s until the last result, the worker's peak RSS, its CPU per job and
/// the error results.
pub(super) async fn run_jobs(
    conn: &Connection,
    cfg: &RunConfig,
    n: usize,
    key: &str,
    body: impl Fn(usize) -> serde_json::Value,
) -> Result<JobsRun, BenchError> {
    let child = start_worker(conn, cfg).await?;
    let pid = child.id().unwrap_or(0);
    let ticks = clock_ticks_per_s();
    let cpu_before = cpu_ticks(pid);
    let errors = Arc::new(AtomicU64::new(0));
    let results = collect(
        conn.create_channel().await?,
        cfg.topology.results_queue.clone(),
        n,
        {
            let errors = errors.clone();
            move |data| {
                if is_error(data) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        },
    );
    let start = publish_requests(conn, cfg, key, n, body).await?;
    let end = results
        .await
        .map_err(|e| BenchError::Stalled(e.to_string()))??;
    let cpu = match (cpu_before, cpu_ticks(pid)) {
        (Some(before), Some(after)) => {
            after.saturating_sub(before) as f64 * 1e6 / ticks as f64 / n.max(1) as f64
        }
        _ => f64::NAN,
    };
    let peak_rss_kib = status_kib(pid, "VmHWM:");
    finish(conn, cfg, child).await;
    Ok(JobsRun {
        jobs_per_s: n as f64 / (end - start).as_secs_f64(),
        peak_rss_kib,
        cpu_us_per_job: cpu,
        errors: errors.load(Ordering::Relaxed),
    })
}
