//! `llmq bench`: one run, eight figures, as ratios against the raw broker and the ideal.
//!
//! Against the configured broker and an in-process mock upstream, with the worker as a real
//! child process (`llmq run`) so its memory can be read:
//! - (a) the broker's ceiling: confirmed persistent publish -> consume -> ack of 1 KiB
//!   messages with lapin, messages/s;
//! - (b) one replica, 0 ms upstream: jobs/s (request in, result out) and b / (a/2);
//! - (c) one replica, 200 ms upstream, `worker.max_inflight` = 1000: jobs/s and the ratio to
//!   min(1000 / 0.2 s, a/2);
//! - (d) enqueue-to-result latency p50/p99 at a steady 200 jobs/s, 0 ms upstream;
//! - (e) the worker's peak RSS (VmHWM) during (c), with 1000 requests in flight;
//! - (f) embeddings, mock at 20 ms per call + 0.2 ms per item: items/s batched vs one call
//!   per message, both at `worker.max_inflight` = 16 (a provider-like cap on concurrent
//!   calls; without one, concurrent calls to the mock cost the same as one);
//! - (g) the worker's CPU time (user + system, from `/proc/<pid>/stat`) per job during (b):
//!   what a job costs the worker itself, far less noisy than jobs/s on a shared machine;
//! - (h) the worker's peak RSS (VmHWM) with 10 000 calls in flight: mock at 10 s per call,
//!   `worker.max_inflight` = `worker.min_inflight` = 10 000, read once the mock serves them
//!   all, and again after every result arrived. Both processes hold one socket per call, so
//!   `ulimit -n` must allow it (the Makefile raises the soft limit).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde::Serialize;
use serde_json::json;
use tokio::process::{Child, Command};

use crate::{
    broker::connection,
    broker::topology,
    config::{Config, SecretUrl, child_command, clean_command},
    tools::mock::{MockOptions, MockServer},
};

/// Sizes of the runs.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Messages for the broker ceiling (a).
    #[arg(long, default_value_t = 30_000)]
    pub raw_messages: usize,
    /// Jobs for the 0 ms run (b).
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Jobs for the 200 ms run (c, e); long enough that the 200 ms ramp at each end weighs
    /// little.
    #[arg(long, default_value_t = 30_000)]
    pub slow_jobs: usize,
    /// Seconds of steady load for the latency run (d).
    #[arg(long, default_value_t = 10)]
    pub latency_secs: u64,
    /// Embedding requests per embeddings run (f).
    #[arg(long, default_value_t = 5_000)]
    pub embeddings: usize,
    /// Calls held in flight at once for the memory run (h).
    #[arg(long, default_value_t = 10_000)]
    pub inflight: u16,
    /// Seconds the mock takes per call in the memory run (h): long enough for every request
    /// to be published and started before the first call ends.
    #[arg(long, default_value_t = 10)]
    pub inflight_latency_secs: u64,
    /// Run only these measures (letters from "bcdfh"; the broker ceiling always runs, (g) is
    /// measured during (b)).
    #[arg(long, default_value = "bcdfh")]
    pub only: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run each worker under this command (split on spaces), to profile it under the
    /// bench's load: e.g. `valgrind --tool=callgrind --callgrind-out-file=cg.%p`. The CPU
    /// and memory figures are then the wrapper's. The bench stops a worker with SIGTERM to
    /// the wrapper's pid: valgrind runs the worker in that process; a wrapper script that
    /// does not `exec` it (heaptrack's) leaves the worker to be stopped by hand.
    #[arg(long)]
    pub wrap_worker: Option<String>,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// (a) messages/s.
    pub broker_ceiling_msgs_per_s: f64,
    /// (b) jobs/s.
    pub fleet_0ms_jobs_per_s: f64,
    /// (b) / (a/2); target >= 0.8.
    pub fleet_0ms_ratio: f64,
    /// (c) jobs/s.
    pub fleet_200ms_jobs_per_s: f64,
    /// (c) / min(5000, a/2); target >= 0.9.
    pub fleet_200ms_ratio: f64,
    /// (d) p50 in ms; target <= 3.
    pub latency_p50_ms: f64,
    /// (d) p99 in ms; target <= 15.
    pub latency_p99_ms: f64,
    /// (d) jobs measured.
    pub latency_samples: usize,
    /// (e) MiB; target <= 64.
    pub peak_rss_mib: f64,
    /// (f) items/s with batching.
    pub embeddings_batched_items_per_s: f64,
    /// (f) items/s with one call per message.
    pub embeddings_unbatched_items_per_s: f64,
    /// (f) batched / unbatched; target >= 5.
    pub embeddings_ratio: f64,
    /// (g) the worker's user + system CPU time per job during (b), µs; target <= 80.
    pub worker_cpu_us_per_job: f64,
    /// (h) calls the run asked to hold in flight.
    pub inflight_calls: u64,
    /// (h) the most calls the mock served at once (should equal `inflight_calls`).
    pub inflight_reached: u64,
    /// (h) MiB, VmHWM once every call is in flight; target <= 256.
    pub inflight_peak_rss_mib: f64,
    /// (h) MiB, VmHWM after every result arrived (the answers come back all at once).
    pub inflight_peak_rss_end_mib: f64,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    /// A broker operation failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The mock or the worker process could not start.
    #[error("{0}")]
    Setup(String),
    /// A run did not finish.
    #[error("{0}")]
    Stalled(String),
}

/// Runs every measurement and prints the table.
pub async fn run(base: &Config, args: &BenchArgs) -> Result<Report, BenchError> {
    let mock = MockServer::start(
        "127.0.0.1:0"
            .parse()
            .map_err(|e| BenchError::Setup(format!("{e}")))?,
        MockOptions::default(),
    )
    .await
    .map_err(|e| BenchError::Setup(format!("mock upstream: {e}")))?;
    let conn = Arc::new(connection::connect(&base.amqp, "llmq bench").await?);
    let base = &Base {
        config: base,
        wrap: args
            .wrap_worker
            .as_deref()
            .map(|w| w.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
    };

    eprintln!("(a) broker ceiling: {} x 1 KiB", args.raw_messages);
    let a = broker_ceiling(&conn, base.config, args.raw_messages).await?;
    eprintln!("    {a:.0} msg/s");

    let on = |m: char| args.only.contains(m);
    let (mut b, mut cpu_us) = (f64::NAN, f64::NAN);
    if on('b') {
        eprintln!("(b, g) one replica, 0 ms upstream: {} jobs", args.jobs);
        let cfg = bench_config(base, &mock, |_| {});
        let run = jobs_per_s(&conn, &cfg, args.jobs).await?;
        (b, cpu_us) = (run.jobs_per_s, run.cpu_us_per_job);
        eprintln!("    {b:.0} jobs/s, worker CPU {cpu_us:.1} µs/job");
    }

    let (mut c, mut rss_kib) = (f64::NAN, 0);
    if on('c') {
        eprintln!(
            "(c, e) one replica, 200 ms upstream, max_inflight 1000: {} jobs",
            args.slow_jobs
        );
        mock.set_options(MockOptions {
            latency_ms: 200,
            ..Default::default()
        });
        let cfg = bench_config(base, &mock, |c| c.worker.max_inflight = 1000);
        let run = jobs_per_s(&conn, &cfg, args.slow_jobs).await?;
        (c, rss_kib) = (run.jobs_per_s, run.peak_rss_kib);
        eprintln!(
            "    {c:.0} jobs/s, peak RSS {:.1} MiB",
            rss_kib as f64 / 1024.0
        );
    }

    let mut lat = Vec::new();
    if on('d') {
        eprintln!("(d) latency at 200 jobs/s for {} s", args.latency_secs);
        mock.set_options(MockOptions::default());
        let cfg = bench_config(base, &mock, |_| {});
        lat = latency(&conn, &cfg, args.latency_secs).await?;
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let (p50, p99) = (pct(0.50), pct(0.99));
    eprintln!(
        "    p50 {p50:.2} ms, p99 {p99:.2} ms over {} jobs",
        lat.len()
    );

    let (mut batched, mut single) = (f64::NAN, f64::NAN);
    if on('f') {
        eprintln!(
            "(f) embeddings, 20 ms + 0.2 ms/item, max_inflight 16: {} requests x2",
            args.embeddings
        );
        mock.set_options(MockOptions {
            latency_ms: 20,
            per_item_us: 200,
            ..Default::default()
        });
        let batched_cfg = bench_config(base, &mock, |c| c.worker.max_inflight = 16);
        batched = embeddings_per_s(&conn, &batched_cfg, args.embeddings).await?;
        let single_cfg = bench_config(base, &mock, |c| {
            c.worker.max_inflight = 16;
            c.batch.max_items = 1;
        });
        single = embeddings_per_s(&conn, &single_cfg, args.embeddings).await?;
        eprintln!("    batched {batched:.0} items/s, one call per message {single:.0} items/s");
    }

    let mut held = Held::default();
    if on('h') && args.inflight > 0 {
        let n = args.inflight;
        eprintln!(
            "(h) one replica, {} s upstream, {n} calls in flight",
            args.inflight_latency_secs
        );
        mock.set_options(MockOptions {
            latency_ms: args.inflight_latency_secs.saturating_mul(1000),
            ..Default::default()
        });
        let cfg = bench_config(base, &mock, |c| {
            c.worker.max_inflight = n;
            c.worker.min_inflight = n;
        });
        held = held_in_flight(&conn, &cfg, &mock, n, args.inflight_latency_secs).await?;
        eprintln!(
            "    {} in flight: peak RSS {:.1} MiB, {:.1} MiB after the answers",
            held.reached,
            held.peak_kib as f64 / 1024.0,
            held.peak_end_kib as f64 / 1024.0
        );
    }

    let half = a / 2.0;
    let report = Report {
        broker_ceiling_msgs_per_s: a,
        fleet_0ms_jobs_per_s: b,
        fleet_0ms_ratio: b / half,
        fleet_200ms_jobs_per_s: c,
        fleet_200ms_ratio: c / half.min(1000.0 / 0.2),
        latency_p50_ms: p50,
        latency_p99_ms: p99,
        latency_samples: lat.len(),
        peak_rss_mib: rss_kib as f64 / 1024.0,
        embeddings_batched_items_per_s: batched,
        embeddings_unbatched_items_per_s: single,
        embeddings_ratio: batched / single,
        worker_cpu_us_per_job: cpu_us,
        inflight_calls: held.calls,
        inflight_reached: held.reached,
        inflight_peak_rss_mib: held.peak_kib as f64 / 1024.0,
        inflight_peak_rss_end_mib: held.peak_end_kib as f64 / 1024.0,
    };
    let _ = conn.close(200, "bench done".into()).await;
    Ok(report)
}

/// The report as a table with the targets.
pub fn table(r: &Report) -> String {
    let row = |name: &str, value: String, ratio: String, target: &str, ok: bool| {
        format!(
            "| {name:<42} | {value:>16} | {ratio:>14} | {target:<9} | {} |\n",
            if ok { "met" } else { "NOT met" }
        )
    };
    let mut t =
        String::from("| measure | value | ratio | target | |\n| --- | ---: | ---: | --- | --- |\n");
    t += &format!(
        "| {:<42} | {:>16} | {:>14} | {:<9} | |\n",
        "(a) broker ceiling, 1 KiB persistent, confirmed",
        format!("{:.0} msg/s", r.broker_ceiling_msgs_per_s),
        "",
        ""
    );
    t += &row(
        "(b) one replica, 0 ms upstream",
        format!("{:.0} jobs/s", r.fleet_0ms_jobs_per_s),
        format!("{:.2} of a/2", r.fleet_0ms_ratio),
        ">= 0.8",
        r.fleet_0ms_ratio >= 0.8,
    );
    t += &row(
        "(c) one replica, 200 ms upstream, 1000 in flight",
        format!("{:.0} jobs/s", r.fleet_200ms_jobs_per_s),
        format!("{:.2} of ideal", r.fleet_200ms_ratio),
        ">= 0.9",
        r.fleet_200ms_ratio >= 0.9,
    );
    t += &row(
        "(d) latency p50 at 200 jobs/s, 0 ms upstream",
        format!("{:.2} ms", r.latency_p50_ms),
        String::new(),
        "<= 3 ms",
        r.latency_p50_ms <= 3.0,
    );
    t += &row(
        "(d) latency p99",
        format!("{:.2} ms", r.latency_p99_ms),
        String::new(),
        "<= 15 ms",
        r.latency_p99_ms <= 15.0,
    );
    t += &row(
        "(e) worker peak RSS, 1000 in flight",
        format!("{:.1} MiB", r.peak_rss_mib),
        String::new(),
        "<= 64 MiB",
        r.peak_rss_mib <= 64.0,
    );
    t += &row(
        "(f) embeddings batched vs one call each",
        format!(
            "{:.0} / {:.0} items/s",
            r.embeddings_batched_items_per_s, r.embeddings_unbatched_items_per_s
        ),
        format!("{:.1}x", r.embeddings_ratio),
        ">= 5x",
        r.embeddings_ratio >= 5.0,
    );
    t += &row(
        "(g) worker CPU per job during (b)",
        format!("{:.1} µs", r.worker_cpu_us_per_job),
        String::new(),
        "<= 80 µs",
        r.worker_cpu_us_per_job <= 80.0,
    );
    t += &row(
        &format!("(h) worker peak RSS, {} in flight", r.inflight_reached),
        format!("{:.1} MiB", r.inflight_peak_rss_mib),
        format!("{:.1} MiB at end", r.inflight_peak_rss_end_mib),
        "<= 256 MiB",
        r.inflight_reached > 0
            && r.inflight_reached >= r.inflight_calls
            && r.inflight_peak_rss_mib <= 256.0,
    );
    t
}

/// What every run's worker starts from.
struct Base<'a> {
    /// The configuration each run adjusts.
    config: &'a Config,
    /// A command (and its arguments) the worker runs under, for profiling; empty for none.
    wrap: Vec<String>,
}

/// A worker's configuration and how to start it.
struct RunConfig {
    config: Config,
    wrap: Vec<String>,
}

impl std::ops::Deref for RunConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

/// A configuration with names of its own, pointed at the mock.
fn bench_config(base: &Base, mock: &MockServer, adjust: impl FnOnce(&mut Config)) -> RunConfig {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let p = format!("llmq-bench-{}", &id[..8]);
    let mut c = base.config.clone();
    c.llm.base_url = SecretUrl::new(mock.base_url());
    c.worker.id = format!("{p}-worker");
    c.idempotency.key_prefix = p.clone();
    c.admin.addr = "127.0.0.1:0".into();
    c.topology = c.topology.with_prefix(&p);
    adjust(&mut c);
    RunConfig {
        config: c,
        wrap: base.wrap.clone(),
    }
}

/// (a): publish with confirms (a window of them outstanding) while a consumer acks each.
async fn broker_ceiling(conn: &Connection, base: &Config, n: usize) -> Result<f64, BenchError> {
    let queue = format!(
        "llmq-bench-raw-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let consumer_conn = connection::connect(&base.amqp, "llmq bench consumer").await?;
    let consumer_ch = consumer_conn.create_channel().await?;
    consumer_ch
        .basic_qos(1000, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let counter = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            match consumer.next().await {
                Some(Ok(d)) => {
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                    got += 1;
                }
                _ => break,
            }
        }
        (got, Instant::now())
    });
    let body = vec![b'x'; 1024];
    let start = Instant::now();
    let props = BasicProperties::default().with_delivery_mode(2);
    publish_window(
        &publisher,
        "",
        &queue,
        n,
        |_| body.clone(),
        |_| props.clone(),
    )
    .await?;
    let (got, end) = tokio::time::timeout(Duration::from_secs(300), counter)
        .await
        .map_err(|_| BenchError::Stalled("the raw consumer stalled".into()))?
        .map_err(|e| BenchError::Stalled(e.to_string()))?;
    if got < n {
        return Err(BenchError::Stalled(format!(
            "raw consumer got {got} of {n}"
        )));
    }
    let _ = publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = consumer_conn.close(200, "done".into()).await;
    Ok(n as f64 / (end - start).as_secs_f64())
}

/// Publishes `n` messages keeping up to 1000 confirms outstanding; fails on any nack.
async fn publish_window(
    channel: &Channel,
    exchange: &str,
    key: &str,
    n: usize,
    body: impl Fn(usize) -> Vec<u8>,
    props: impl Fn(usize) -> BasicProperties,
) -> Result<(), BenchError> {
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &body(i),
                props(i),
            )
            .await?;
        pending.push(confirm);
        if pending.len() >= 1000 {
            check_confirm(pending.next().await)?;
        }
    }
    while let Some(c) = pending.next().await {
        check_confirm(Some(c))?;
    }
    Ok(())
}

fn check_confirm(c: Option<Result<lapin::Confirmation, lapin::Error>>) -> Result<(), BenchError> {
    match c {
        Some(Ok(c)) if c.is_ack() => Ok(()),
        Some(Ok(_)) => Err(BenchError::Stalled("the broker nacked a publish".into())),
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    }
}

/// A worker child process for `cfg`, once its consumers are subscribed.
async fn start_worker(conn: &Connection, cfg: &RunConfig) -> Result<Child, BenchError> {
    let setup = conn.create_channel().await?;
    topology::declare(&setup, &cfg.topology).await?;
    let exe = std::env::current_exe().map_err(|e| BenchError::Setup(e.to_string()))?;
    let (cmd, config_file) =
        child_command(&exe, cfg).map_err(|e| BenchError::Setup(e.to_string()))?;
    let cmd = match cfg.wrap.split_first() {
        None => cmd,
        // The same command under the wrapper: the wrapper's environment cleaned the same way.
        Some((wrapper, args)) => {
            let mut wrapped = clean_command(Path::new(wrapper));
            wrapped
                .args(args)
                .arg(&exe)
                .arg("--config")
                .arg(config_file.path());
            wrapped
        }
    };
    let child = Command::from(cmd)
        .arg("run")
        .env("LLMQ_LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BenchError::Setup(format!("cannot start the worker: {e}")))?;
    // A worker under valgrind takes far longer to start.
    let patience = if cfg.wrap.is_empty() { 30 } else { 300 };
    let deadline = Instant::now() + Duration::from_secs(patience);
    loop {
        let q = topology::queue_depth(&setup, &cfg.topology.processing_queue).await?;
        if q.consumers >= u32::from(cfg.worker.consumers) {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "the worker did not subscribe within {patience} s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A subscribed worker has read its configuration.
    drop(config_file);
    let _ = setup.close(200, "ready".into()).await;
    Ok(child)
}

/// Stops the worker (SIGTERM, then kill) and deletes the run's topology.
async fn finish(conn: &Connection, cfg: &RunConfig, mut child: Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    if tokio::time::timeout(Duration::from_secs(40), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    if let Ok(ch) = conn.create_channel().await {
        topology::delete(&ch, &cfg.topology).await;
        let _ = ch.close(200, "cleaned".into()).await;
    }
}

/// Consumes `n` results (no-ack), returning when the last arrived.
fn collect(
    channel: Channel,
    queue: String,
    n: usize,
    mut each: impl FnMut(&[u8]) + Send + 'static,
) -> tokio::task::JoinHandle<Result<Instant, BenchError>> {
    tokio::spawn(async move {
        let mut results = channel
            .basic_consume(
                queue.as_str().into(),
                "bench-results".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut got = 0;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(60), results.next()).await {
                Ok(Some(Ok(d))) => {
                    each(&d.data);
                    got += 1;
                }
                _ => return Err(BenchError::Stalled(format!("{got} of {n} results arrived"))),
            }
        }
        Ok(Instant::now())
    })
}

/// What a worker did with a run of jobs.
#[derive(Debug, Clone, Copy)]
struct JobsRun {
    /// From the first publish to the last result.
    jobs_per_s: f64,
    /// The worker's VmHWM at the end, KiB.
    peak_rss_kib: u64,
    /// The worker's user + system CPU time from the first publish to the last result, per
    /// job (its start-up is left out).
    cpu_us_per_job: f64,
}

/// (b), (c), (g): `n` chat jobs published as fast as confirms allow, until the last result.
async fn jobs_per_s(conn: &Connection, cfg: &RunConfig, n: usize) -> Result<JobsRun, BenchError> {
    let key = cfg.topology.processing_key.clone();
    run_jobs(conn, cfg, n, &key, chat_body).await
}

/// A chat request as the (b), (c) and (h) runs send it.
fn chat_body(i: usize) -> serde_json::Value {
    json!({"prompt": format!("bench {i}"), "request_id": format!("b-{i}")})
}

/// Publishes `n` requests made by `body` on `key` through a fresh worker, as fast as confirms
/// allow; returns jobs/s until the last result, the worker's peak RSS and its CPU per job.
async fn run_jobs(
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
    let results = collect(
        conn.create_channel().await?,
        cfg.topology.results_queue.clone(),
        n,
        |_| {},
    );
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let start = Instant::now();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    publish_window(
        &publisher,
        &cfg.topology.request_exchange,
        key,
        n,
        |i| body(i).to_string().into_bytes(),
        |_| props.clone(),
    )
    .await?;
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
    })
}

/// What the memory run (h) saw.
#[derive(Debug, Clone, Copy, Default)]
struct Held {
    /// Calls asked for.
    calls: u64,
    /// The most calls the mock served at once.
    reached: u64,
    /// The worker's VmHWM once `reached` calls were in flight, KiB.
    peak_kib: u64,
    /// The worker's VmHWM after the last result, KiB.
    peak_end_kib: u64,
}

/// (h): `n` chat requests against a mock that takes `latency_secs` per call, with the
/// worker allowed `n` calls at once; the worker's VmHWM once the mock serves them all (or
/// when the first answers are due, if it never does), and after every result arrived.
async fn held_in_flight(
    conn: &Connection,
    cfg: &RunConfig,
    mock: &MockServer,
    n: u16,
    latency_secs: u64,
) -> Result<Held, BenchError> {
    let calls = usize::from(n);
    // The mock (here) and the worker each hold a socket per call, plus a few hundred for
    // the runtime, the broker connections and the files a process opens.
    let needed = calls as u64 + 512;
    match open_files_limit() {
        Some(limit) if limit < needed => {
            return Err(BenchError::Setup(format!(
                "(h) needs {needed} open files per process and `ulimit -n` is {limit}: \
                 raise it (ulimit -n 65536, as `make bench` does) or pass --inflight {}",
                limit.saturating_sub(512)
            )));
        }
        _ => {}
    }
    let child = start_worker(conn, cfg).await?;
    let pid = child.id().unwrap_or(0);
    let results = collect(
        conn.create_channel().await?,
        cfg.topology.results_queue.clone(),
        calls,
        |_| {},
    );
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    publish_window(
        &publisher,
        &cfg.topology.request_exchange,
        &cfg.topology.processing_key,
        calls,
        |i| chat_body(i).to_string().into_bytes(),
        |_| props.clone(),
    )
    .await?;
    // Every call is in flight, or the first ones are about to be answered: the mock's
    // count only falls from then on.
    let due = started + Duration::from_secs(latency_secs);
    let mut reached = 0;
    loop {
        let now = mock
            .stats()
            .in_flight
            .load(std::sync::atomic::Ordering::Relaxed);
        reached = reached.max(now);
        if now >= u64::from(n) || Instant::now() >= due {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak_kib = status_kib(pid, "VmHWM:");
    results
        .await
        .map_err(|e| BenchError::Stalled(e.to_string()))??;
    let peak_end_kib = status_kib(pid, "VmHWM:");
    finish(conn, cfg, child).await;
    Ok(Held {
        calls: u64::from(n),
        reached,
        peak_kib,
        peak_end_kib,
    })
}

/// A `kB` figure of the process's `/proc/<pid>/status` (`VmHWM:` is the peak resident
/// set), KiB; 0 when it cannot be read.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The process's user + system CPU time so far, in clock ticks (fields 14 and 15 of
/// `/proc/<pid>/stat`, all threads together).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`getconf CLK_TCK`; reading `sysconf` directly would need unsafe
/// code), 100 when it cannot be asked, as on every common Linux build.
fn clock_ticks_per_s() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// This process's soft limit on open files (`Max open files` in `/proc/self/limits`; the
/// worker inherits it); `None` when unknown or unlimited.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// (d): a steady 200 jobs/s for `secs`, each job's enqueue-to-result time in ms.
async fn latency(conn: &Connection, cfg: &RunConfig, secs: u64) -> Result<Vec<f64>, BenchError> {
    let child = start_worker(conn, cfg).await?;
    let n = (secs * 200) as usize;
    let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let sink = samples.clone();
    let results = collect(
        conn.create_channel().await?,
        cfg.topology.results_queue.clone(),
        n,
        move |data| {
            let now = now_us();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
                && let Some(sent) = v["metadata"]["sent_us"].as_u64()
                && let Ok(mut s) = sink.lock()
            {
                s.push(now.saturating_sub(sent) as f64 / 1000.0);
            }
        },
    );
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let mut confirms = FuturesUnordered::new();
    for i in 0..n {
        tick.tick().await;
        let body = json!({"prompt": "latency", "request_id": format!("l-{i}"), "metadata": {"sent_us": now_us()}});
        let confirm = publisher
            .basic_publish(
                cfg.topology.request_exchange.as_str().into(),
                cfg.topology.processing_key.as_str().into(),
                BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                props.clone(),
            )
            .await?;
        confirms.push(confirm);
        while let Some(Some(c)) = futures_util::FutureExt::now_or_never(confirms.next()) {
            check_confirm(Some(c))?;
        }
    }
    while let Some(c) = confirms.next().await {
        check_confirm(Some(c))?;
    }
    results
        .await
        .map_err(|e| BenchError::Stalled(e.to_string()))??;
    finish(conn, cfg, child).await;
    let out = samples.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(out)
}

/// (f): `n` single-input embedding requests, items/s until the last result.
async fn embeddings_per_s(conn: &Connection, cfg: &RunConfig, n: usize) -> Result<f64, BenchError> {
    let key = cfg.topology.embeddings_key.clone();
    let body = |i: usize| json!({"kind": "embedding", "input": format!("text number {i}"), "request_id": format!("e-{i}")});
    Ok(run_jobs(conn, cfg, n, &key, body).await?.jobs_per_s)
}
