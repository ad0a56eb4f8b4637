//! `llmq bench`: one run, eleven figures, as ratios against the raw broker and the ideal.
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
//!   `ulimit -n` must allow it (the Makefile raises the soft limit);
//! - (h2) the same over HTTP/2 without TLS (`llm.http2_prior_knowledge`, h2c): every call a
//!   stream of one connection to the mock, which allows that many streams at once;
//! - (u) an unknown provider cap: 200 ms upstream that answers at most 32 calls at once and
//!   refuses any beyond them at once with 429 and no `Retry-After`, the worker with default
//!   settings (`worker.max_inflight` 256): ok jobs/s and the ratio to 32 / 0.2 s = 160,
//!   the 429s the mock answered over its cap and the error results (requests whose retries
//!   ran out);
//! - (s) streaming: 300 streams at once (`--streams`, `worker.max_inflight`), the mock
//!   sending a word every 50 ms, `stream.flush_ms` = 50, every delta to one reply queue:
//!   delta messages/s, the worker's CPU and peak RSS, the median and p99 time from the
//!   mock's first content chunk to the first delta on `reply_to`; then the same requests
//!   without `stream` (the mock taking as long as a stream), for the peak RSS of the same
//!   concurrency without streaming;
//! - (t) fair share between tenants (named by an `x-tenant` header), each run with lanes
//!   (`topology.lanes` 16) and without, on, off, off, on: even (`--tenant-jobs` from 200
//!   tenants in turn, 50 ms upstream, a fixed limit of 100 calls): jobs/s with lanes over
//!   without, goal >= 0.9; noisy (one tenant's `--tenant-jobs`, then another's 50): the
//!   latter's time from publish to result, p50 and p99; flood (one sender that names none,
//!   0 ms upstream, (b)'s setup): jobs/s with lanes over without, goal >= 0.9; and each
//!   lanes run's moves to a lane.
//!
//! One file per family of runs: [`broker`] (the ceiling, and the publishing and collecting
//! every run shares), [`jobs`] (b, c, e, g), [`latency`] (d), [`embeddings`] (f), [`held`]
//! (h, h2), [`capped`] (u), [`streaming`] (s), [`tenants`] (t); [`worker`] starts and stops
//! the worker process and reads its figures from `/proc`.

mod broker;
mod capped;
mod embeddings;
mod held;
mod jobs;
mod latency;
mod streaming;
mod tenants;
mod worker;

use std::path::PathBuf;

use held::Protocol;
use lapin::Connection;
use serde::Serialize;

use crate::{
    broker::connection,
    config::Config,
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
    /// Jobs for the run against an unannounced cap of 32 calls (u).
    #[arg(long, default_value_t = 3_000)]
    pub capped_jobs: usize,
    /// Streams at once in the streaming run (s): its `worker.max_inflight`.
    #[arg(long, default_value_t = 300)]
    pub streams: u16,
    /// Requests of the streaming run (s), and again of its run without streaming: with 300
    /// streams of about 4.2 s, six waves, about 25 s each.
    #[arg(long, default_value_t = 1_800)]
    pub stream_jobs: usize,
    /// Jobs of each fair-share run (t): of the 200 tenants of the even runs, of the noisy
    /// tenant (the quiet one adds 50); the flood runs take twice as many.
    #[arg(long, default_value_t = 6_000)]
    pub tenant_jobs: usize,
    /// Run only these measures (letters from "bcdfhHsut", H for (h2); the broker ceiling
    /// always runs, (g) is measured during (b)).
    #[arg(long, default_value = "bcdfhHsut")]
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
    /// (h, h2) calls the runs asked to hold in flight.
    pub inflight_calls: u64,
    /// (h) the most calls the mock served at once over HTTP/1.1 (should equal
    /// `inflight_calls`).
    pub inflight_reached: u64,
    /// (h) MiB, VmHWM once every call is in flight; target <= 256.
    pub inflight_peak_rss_mib: f64,
    /// (h) MiB, VmHWM after every result arrived (the answers come back all at once).
    pub inflight_peak_rss_end_mib: f64,
    /// (h2) the most calls the mock served at once over HTTP/2 (should equal
    /// `inflight_calls`).
    pub inflight_h2_reached: u64,
    /// (h2) MiB, VmHWM once every call is in flight over HTTP/2; target <= 256.
    pub inflight_h2_peak_rss_mib: f64,
    /// (h2) MiB, VmHWM after every result arrived.
    pub inflight_h2_peak_rss_end_mib: f64,
    /// (u) ok results/s against an unannounced cap of 32 calls at 200 ms (error results
    /// are not jobs done).
    pub capped_jobs_per_s: f64,
    /// (u) / (32 / 0.2 s = 160 jobs/s); target >= 0.85 (the goal; halving alone averages about 0.75).
    pub capped_ratio: f64,
    /// (u) calls the mock refused with 429 over its cap.
    pub capped_over_cap: Option<u64>,
    /// (u) results with `status: error`; target 0.
    pub capped_errors: Option<u64>,
    /// (s) streams asked for at once.
    pub stream_concurrency: u64,
    /// (s) the most streams under way at once, as the reply queue showed them (first delta
    /// come, result not yet).
    pub stream_concurrency_reached: u64,
    /// (s) delta messages/s on the reply queue while every stream ran.
    pub stream_deltas_per_s: f64,
    /// (s) over streams x 20 chunks/s (every chunk a message of its own).
    pub stream_deltas_ratio: f64,
    /// (s) words per delta message (coalescing by `stream.flush_ms`).
    pub stream_words_per_delta: f64,
    /// (s) the worker's user + system CPU over the streaming run, % of one core.
    pub stream_worker_cpu_pct: f64,
    /// (s) the same per delta message, µs.
    pub stream_worker_cpu_us_per_delta: f64,
    /// (s) the worker's CPU over the run without streaming, % of one core.
    pub stream_plain_worker_cpu_pct: f64,
    /// (s) MiB, the worker's VmHWM streaming.
    pub stream_peak_rss_mib: f64,
    /// (s) MiB, the worker's VmHWM at the same concurrency without streaming.
    pub stream_plain_peak_rss_mib: f64,
    /// (s) streaming / not; target <= 1.5.
    pub stream_rss_ratio: f64,
    /// (s) from the mock's first content chunk to the first delta on `reply_to`, median,
    /// ms (loopback HTTP, worker, broker, the bench's consumer); target < 5.
    pub stream_first_delta_p50_ms: f64,
    /// (s) the same, p99, ms.
    pub stream_first_delta_p99_ms: f64,
    /// (s) requests timed.
    pub stream_first_delta_samples: usize,
    /// (s) results with `status: error`, both runs; target 0.
    pub stream_errors: Option<u64>,
    /// (t) even, 200 tenants in turn: jobs/s with lanes, the mean of its runs.
    pub tenants_even_lanes_jobs_per_s: f64,
    /// (t) even: jobs/s without lanes.
    pub tenants_even_plain_jobs_per_s: f64,
    /// (t) even: with lanes / without; target >= 0.9 (the goal).
    pub tenants_even_ratio: f64,
    /// (t) even: requests moved to a lane in each lanes run (none expected: no tenant holds
    /// two deliveries at once); `null` when the worker's `/metrics` could not be read.
    pub tenants_even_lane_moves: Vec<Option<u64>>,
    /// (t) noisy, one tenant's backlog then another's 50: jobs/s with lanes.
    pub tenants_noisy_lanes_jobs_per_s: f64,
    /// (t) noisy: jobs/s without lanes.
    pub tenants_noisy_plain_jobs_per_s: f64,
    /// (t) noisy: the quiet tenant's time from publish to result with lanes, median of
    /// every lanes run's requests, ms.
    pub tenants_quiet_lanes_p50_ms: f64,
    /// (t) noisy: the same, p99, ms.
    pub tenants_quiet_lanes_p99_ms: f64,
    /// (t) noisy: the quiet tenant's median without lanes (behind the whole backlog), ms.
    pub tenants_quiet_plain_p50_ms: f64,
    /// (t) noisy: the same, p99, ms.
    pub tenants_quiet_plain_p99_ms: f64,
    /// (t) noisy: requests moved to a lane in each lanes run.
    pub tenants_noisy_lane_moves: Vec<Option<u64>>,
    /// (t) flood, one sender that names none, 0 ms upstream: jobs/s with lanes.
    pub tenants_flood_lanes_jobs_per_s: f64,
    /// (t) flood: jobs/s without lanes.
    pub tenants_flood_plain_jobs_per_s: f64,
    /// (t) flood: with lanes / without, what a fleet of one tenant pays for lanes; goal
    /// >= 0.9.
    pub tenants_flood_ratio: f64,
    /// (t) flood: requests moved to a lane in each lanes run.
    pub tenants_flood_lane_moves: Vec<Option<u64>>,
    /// (t) results with `status: error`, every run; target 0.
    pub tenants_errors: Option<u64>,
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
    let bench = Bench::start(base, args).await?;
    let figures = Figures {
        ceiling: broker::measure_ceiling(&bench).await?,
        fast: jobs::measure_fast(&bench).await?,
        slow: jobs::measure_slow(&bench).await?,
        capped: capped::measure(&bench).await?,
        latency: latency::measure(&bench).await?,
        embeddings: embeddings::measure(&bench).await?,
        held: held::measure(&bench, Protocol::Http1).await?,
        held_h2: held::measure(&bench, Protocol::Http2).await?,
        streaming: streaming::measure(&bench).await?,
        tenants: tenants::measure(&bench).await?,
    };
    let _ = bench.conn.close(200, "bench done".into()).await;
    Ok(figures.report())
}

/// What every run shares: the broker connection, the mock upstream, what each worker's
/// configuration starts from, and the sizes asked for.
struct Bench<'a> {
    conn: Connection,
    mock: MockServer,
    base: worker::Base<'a>,
    args: &'a BenchArgs,
}

impl<'a> Bench<'a> {
    /// Starts the mock on a free port and connects to the broker.
    async fn start(config: &'a Config, args: &'a BenchArgs) -> Result<Self, BenchError> {
        let mock = MockServer::start(
            "127.0.0.1:0"
                .parse()
                .map_err(|e| BenchError::Setup(format!("{e}")))?,
            MockOptions::default(),
        )
        .await
        .map_err(|e| BenchError::Setup(format!("mock upstream: {e}")))?;
        let conn = connection::connect(&config.amqp, "llmq bench").await?;
        let base = worker::Base {
            config,
            wrap: args
                .wrap_worker
                .as_deref()
                .map(|w| w.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default(),
        };
        Ok(Self {
            conn,
            mock,
            base,
            args,
        })
    }

    /// Whether `--only` asks for the measure of this letter.
    fn on(&self, letter: char) -> bool {
        self.args.only.contains(letter)
    }

    /// A run's worker configuration: names of its own, pointed at the mock, then `adjust`ed.
    fn config(&self, adjust: impl FnOnce(&mut Config)) -> worker::RunConfig {
        worker::bench_config(&self.base, &self.mock, adjust)
    }
}

/// What each measurement saw, before the ratios.
struct Figures {
    /// (a) messages/s.
    ceiling: f64,
    /// (b, g).
    fast: jobs::JobsRun,
    /// (c, e).
    slow: jobs::JobsRun,
    /// (u).
    capped: capped::Capped,
    /// (d).
    latency: latency::Latency,
    /// (f).
    embeddings: embeddings::Embeddings,
    /// (h).
    held: held::Held,
    /// (h2).
    held_h2: held::Held,
    /// (s).
    streaming: streaming::Streaming,
    /// (t).
    tenants: tenants::Tenants,
}

impl Figures {
    fn report(&self) -> Report {
        let (a, b, c) = (self.ceiling, self.fast.jobs_per_s, self.slow.jobs_per_s);
        let half = a / 2.0;
        // A run that did not happen has no memory figure: NaN, shown as skipped.
        let mib = |kib: u64| {
            if kib == 0 {
                f64::NAN
            } else {
                kib as f64 / 1024.0
            }
        };
        let emb = &self.embeddings;
        let s = &self.streaming;
        let (even, noisy, flood) = (&self.tenants.even, &self.tenants.noisy, &self.tenants.flood);
        Report {
            broker_ceiling_msgs_per_s: a,
            fleet_0ms_jobs_per_s: b,
            fleet_0ms_ratio: b / half,
            fleet_200ms_jobs_per_s: c,
            fleet_200ms_ratio: c / half.min(1000.0 / 0.2),
            latency_p50_ms: self.latency.p50_ms,
            latency_p99_ms: self.latency.p99_ms,
            latency_samples: self.latency.samples,
            peak_rss_mib: mib(self.slow.peak_rss_kib),
            embeddings_batched_items_per_s: emb.batched,
            embeddings_unbatched_items_per_s: emb.single,
            embeddings_ratio: emb.batched / emb.single,
            worker_cpu_us_per_job: self.fast.cpu_us_per_job,
            inflight_calls: self.held.calls.max(self.held_h2.calls),
            inflight_reached: self.held.reached,
            inflight_peak_rss_mib: mib(self.held.peak_kib),
            inflight_peak_rss_end_mib: mib(self.held.peak_end_kib),
            inflight_h2_reached: self.held_h2.reached,
            inflight_h2_peak_rss_mib: mib(self.held_h2.peak_kib),
            inflight_h2_peak_rss_end_mib: mib(self.held_h2.peak_end_kib),
            capped_jobs_per_s: self.capped.jobs_per_s,
            capped_ratio: self.capped.jobs_per_s / capped::IDEAL_JOBS_PER_S,
            capped_over_cap: self.capped.over_cap,
            capped_errors: self.capped.errors,
            stream_concurrency: s.streams,
            stream_concurrency_reached: s.most_streams,
            stream_deltas_per_s: s.deltas_per_s,
            stream_deltas_ratio: s.deltas_per_s / s.ideal_deltas_per_s(),
            stream_words_per_delta: s.words_per_delta,
            stream_worker_cpu_pct: s.cpu_pct,
            stream_worker_cpu_us_per_delta: s.cpu_us_per_delta,
            stream_plain_worker_cpu_pct: s.plain_cpu_pct,
            stream_peak_rss_mib: mib(s.peak_rss_kib),
            stream_plain_peak_rss_mib: mib(s.plain_peak_rss_kib),
            stream_rss_ratio: mib(s.peak_rss_kib) / mib(s.plain_peak_rss_kib),
            stream_first_delta_p50_ms: s.first_delta_p50_ms,
            stream_first_delta_p99_ms: s.first_delta_p99_ms,
            stream_first_delta_samples: s.first_delta_samples,
            stream_errors: s.errors,
            tenants_even_lanes_jobs_per_s: even.lanes.jobs_per_s(),
            tenants_even_plain_jobs_per_s: even.plain.jobs_per_s(),
            tenants_even_ratio: even.ratio(),
            tenants_even_lane_moves: even.lanes.moves.clone(),
            tenants_noisy_lanes_jobs_per_s: noisy.lanes.jobs_per_s(),
            tenants_noisy_plain_jobs_per_s: noisy.plain.jobs_per_s(),
            tenants_quiet_lanes_p50_ms: noisy.lanes.quiet_ms(0.50),
            tenants_quiet_lanes_p99_ms: noisy.lanes.quiet_ms(0.99),
            tenants_quiet_plain_p50_ms: noisy.plain.quiet_ms(0.50),
            tenants_quiet_plain_p99_ms: noisy.plain.quiet_ms(0.99),
            tenants_noisy_lane_moves: noisy.lanes.moves.clone(),
            tenants_flood_lanes_jobs_per_s: flood.lanes.jobs_per_s(),
            tenants_flood_plain_jobs_per_s: flood.plain.jobs_per_s(),
            tenants_flood_ratio: flood.ratio(),
            tenants_flood_lane_moves: flood.lanes.moves.clone(),
            tenants_errors: self.tenants.errors(),
        }
    }
}

/// The report as a table with the targets.
pub fn table(r: &Report) -> String {
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
    t += &held_rows(r);
    t += &capped_rows(r);
    t += &streaming_rows(r);
    t += &tenants_rows(r);
    t
}

/// The rows of (h) and (h2): memory with every call in flight, over HTTP/1.1 and HTTP/2.
fn held_rows(r: &Report) -> String {
    let mut t = String::new();
    t += &row(
        &format!("(h) worker peak RSS, {} in flight", r.inflight_reached),
        format!("{:.1} MiB", r.inflight_peak_rss_mib),
        format!("{:.1} MiB at end", r.inflight_peak_rss_end_mib),
        "<= 256 MiB",
        held_ok(
            r.inflight_reached,
            r.inflight_calls,
            r.inflight_peak_rss_mib,
        ),
    );
    t += &row(
        &format!(
            "(h2) worker peak RSS, {} in flight, HTTP/2",
            r.inflight_h2_reached
        ),
        format!("{:.1} MiB", r.inflight_h2_peak_rss_mib),
        format!("{:.1} MiB at end", r.inflight_h2_peak_rss_end_mib),
        "<= 256 MiB",
        held_ok(
            r.inflight_h2_reached,
            r.inflight_calls,
            r.inflight_h2_peak_rss_mib,
        ),
    );
    t
}

/// The rows of (u): throughput against an unannounced cap, and what it cost.
fn capped_rows(r: &Report) -> String {
    let mut t = row(
        "(u) unknown provider cap of 32, 200 ms upstream",
        format!("{:.0} ok jobs/s", r.capped_jobs_per_s),
        format!("{:.2} of ideal", r.capped_ratio),
        ">= 0.85",
        r.capped_ratio >= 0.85,
    );
    let (value, ok) = match (r.capped_over_cap, r.capped_errors) {
        (Some(over_cap), Some(errors)) => (format!("{over_cap} / {errors}"), errors == 0),
        // As `row` knows a run left out.
        _ => ("NaN".to_string(), false),
    };
    t += &row(
        "(u) 429s over the cap / error results",
        value,
        String::new(),
        "0 errors",
        ok,
    );
    t
}

/// The rows of (s): deltas/s and the worker's CPU (figures without a target), the time to
/// the first delta, the memory streaming costs, the error results.
fn streaming_rows(r: &Report) -> String {
    let mut t = figure_row(
        &format!(
            "(s) {} streams, a chunk every 50 ms",
            r.stream_concurrency_reached
        ),
        format!("{:.0} deltas/s", r.stream_deltas_per_s),
        format!(
            "{:.2} of {}",
            r.stream_deltas_ratio,
            r.stream_concurrency * 1000 / streaming::CHUNK_MS
        ),
    );
    t += &figure_row(
        "(s) worker CPU while streaming",
        format!("{:.0}% of a core", r.stream_worker_cpu_pct),
        format!("{:.1} µs/delta", r.stream_worker_cpu_us_per_delta),
    );
    t += &row(
        "(s) first chunk to first delta, p50",
        format!("{:.2} ms", r.stream_first_delta_p50_ms),
        format!("p99 {:.2} ms", r.stream_first_delta_p99_ms),
        "< 5 ms",
        r.stream_first_delta_p50_ms < 5.0,
    );
    t += &row(
        "(s) worker peak RSS, streaming / not",
        format!(
            "{:.1} / {:.1} MiB",
            r.stream_peak_rss_mib, r.stream_plain_peak_rss_mib
        ),
        format!("{:.2}x", r.stream_rss_ratio),
        "<= 1.5x",
        r.stream_rss_ratio <= 1.5,
    );
    let (value, ok) = match r.stream_errors {
        Some(errors) => (errors.to_string(), errors == 0),
        None => ("NaN".to_string(), false),
    };
    t += &row("(s) error results", value, String::new(), "0", ok);
    t
}

/// The rows of (t): each scenario with lanes and without, the moves, the error results.
fn tenants_rows(r: &Report) -> String {
    let limit = tenants::LIMIT;
    let mut t = row(
        &format!("(t) even, 200 tenants, 50 ms, {limit} in flight"),
        format!(
            "{:.0} / {:.0} jobs/s",
            r.tenants_even_lanes_jobs_per_s, r.tenants_even_plain_jobs_per_s
        ),
        format!("{:.2} of no lanes", r.tenants_even_ratio),
        &format!(">= {}", tenants::EVEN_GOAL),
        r.tenants_even_ratio >= tenants::EVEN_GOAL,
    );
    t += &figure_row(
        "(t) even: moved to a lane, each lanes run",
        moves(&r.tenants_even_lane_moves),
        String::new(),
    );
    t += &figure_row(
        &format!(
            "(t) noisy: the quiet tenant's {} jobs, p50",
            tenants::QUIET_JOBS
        ),
        format!(
            "{:.0} / {:.0} ms",
            r.tenants_quiet_lanes_p50_ms, r.tenants_quiet_plain_p50_ms
        ),
        format!(
            "p99 {:.0} / {:.0}",
            r.tenants_quiet_lanes_p99_ms, r.tenants_quiet_plain_p99_ms
        ),
    );
    t += &figure_row(
        "(t) noisy: all jobs",
        format!(
            "{:.0} / {:.0} jobs/s",
            r.tenants_noisy_lanes_jobs_per_s, r.tenants_noisy_plain_jobs_per_s
        ),
        format!(
            "{:.2} of no lanes",
            r.tenants_noisy_lanes_jobs_per_s / r.tenants_noisy_plain_jobs_per_s
        ),
    );
    t += &figure_row(
        "(t) noisy: moved to a lane, each lanes run",
        moves(&r.tenants_noisy_lane_moves),
        String::new(),
    );
    t += &row(
        "(t) flood, one sender, 0 ms upstream",
        format!(
            "{:.0} / {:.0} jobs/s",
            r.tenants_flood_lanes_jobs_per_s, r.tenants_flood_plain_jobs_per_s
        ),
        format!("{:.2} of no lanes", r.tenants_flood_ratio),
        &format!(">= {}", tenants::EVEN_GOAL),
        r.tenants_flood_ratio >= tenants::EVEN_GOAL,
    );
    t += &figure_row(
        "(t) flood: moved to a lane, each lanes run",
        moves(&r.tenants_flood_lane_moves),
        String::new(),
    );
    let (value, ok) = match r.tenants_errors {
        Some(errors) => (errors.to_string(), errors == 0),
        None => ("NaN".to_string(), false),
    };
    t += &row("(t) error results", value, String::new(), "0", ok);
    t
}

/// Each run's moves, `?` for one unread; NaN (skipped) without a run.
fn moves(runs: &[Option<u64>]) -> String {
    if runs.is_empty() {
        return "NaN".into();
    }
    let each: Vec<String> = runs
        .iter()
        .map(|m| m.map_or_else(|| "?".to_string(), |m| m.to_string()))
        .collect();
    each.join(" / ")
}

/// A row with a figure and no target (skipped as [`row`] does).
fn figure_row(name: &str, value: String, ratio: String) -> String {
    if value.contains("NaN") {
        return row(name, value, ratio, "", false);
    }
    format!("| {name:<42} | {value:>16} | {ratio:>14} | {:<9} | |\n", "")
}

/// A measured row of the table: what, its figure, a ratio or a second figure, the target
/// and whether it is met.
fn row(name: &str, value: String, ratio: String, target: &str, ok: bool) -> String {
    // A figure of a run that `--only` left out is NaN.
    if value.contains("NaN") {
        return format!(
            "| {name:<42} | {:>16} | {:>14} | {target:<9} | skipped |\n",
            "-", ""
        );
    }
    format!(
        "| {name:<42} | {value:>16} | {ratio:>14} | {target:<9} | {} |\n",
        if ok { "met" } else { "NOT met" }
    )
}

/// (h) and (h2) are met when every call was in flight at once, within 256 MiB.
fn held_ok(reached: u64, calls: u64, peak_rss_mib: f64) -> bool {
    reached > 0 && reached >= calls && peak_rss_mib <= 256.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(calls: u64, h2_reached: u64, h2_rss_mib: f64) -> Report {
        Report {
            broker_ceiling_msgs_per_s: 10_000.0,
            fleet_0ms_jobs_per_s: 4_000.0,
            fleet_0ms_ratio: 0.8,
            fleet_200ms_jobs_per_s: 4_500.0,
            fleet_200ms_ratio: 0.9,
            latency_p50_ms: 2.0,
            latency_p99_ms: 10.0,
            latency_samples: 2_000,
            peak_rss_mib: 50.0,
            embeddings_batched_items_per_s: 5_000.0,
            embeddings_unbatched_items_per_s: 700.0,
            embeddings_ratio: 7.1,
            worker_cpu_us_per_job: 60.0,
            inflight_calls: calls,
            inflight_reached: calls,
            inflight_peak_rss_mib: 200.0,
            inflight_peak_rss_end_mib: 210.0,
            inflight_h2_reached: h2_reached,
            inflight_h2_peak_rss_mib: h2_rss_mib,
            inflight_h2_peak_rss_end_mib: h2_rss_mib + 5.0,
            capped_jobs_per_s: 80.0,
            capped_ratio: 0.5,
            capped_over_cap: Some(1_234),
            capped_errors: Some(0),
            stream_concurrency: 300,
            stream_concurrency_reached: 300,
            stream_deltas_per_s: 5_700.0,
            stream_deltas_ratio: 0.95,
            stream_words_per_delta: 1.05,
            stream_worker_cpu_pct: 40.0,
            stream_worker_cpu_us_per_delta: 70.0,
            stream_plain_worker_cpu_pct: 5.0,
            stream_peak_rss_mib: 45.0,
            stream_plain_peak_rss_mib: 36.0,
            stream_rss_ratio: 1.25,
            stream_first_delta_p50_ms: 2.5,
            stream_first_delta_p99_ms: 12.0,
            stream_first_delta_samples: 1_800,
            stream_errors: Some(0),
            tenants_even_lanes_jobs_per_s: 1_900.0,
            tenants_even_plain_jobs_per_s: 1_950.0,
            tenants_even_ratio: 1_900.0 / 1_950.0,
            tenants_even_lane_moves: vec![Some(0), Some(0)],
            tenants_noisy_lanes_jobs_per_s: 1_800.0,
            tenants_noisy_plain_jobs_per_s: 1_900.0,
            tenants_quiet_lanes_p50_ms: 120.0,
            tenants_quiet_lanes_p99_ms: 300.0,
            tenants_quiet_plain_p50_ms: 2_500.0,
            tenants_quiet_plain_p99_ms: 2_600.0,
            tenants_noisy_lane_moves: vec![Some(5_000), None],
            tenants_flood_lanes_jobs_per_s: 2_000.0,
            tenants_flood_plain_jobs_per_s: 4_000.0,
            tenants_flood_ratio: 0.5,
            tenants_flood_lane_moves: vec![Some(11_000), Some(11_500)],
            tenants_errors: Some(0),
        }
    }

    fn h2_row(t: &str) -> &str {
        t.lines()
            .find(|l| l.starts_with("| (h2)"))
            .expect("an (h2) row")
    }

    #[test]
    fn h2_row_is_met_with_every_call_in_flight_within_256_mib() {
        let t = table(&report(10_000, 10_000, 120.0));
        let row = h2_row(&t);
        assert!(
            row.contains("(h2) worker peak RSS, 10000 in flight, HTTP/2"),
            "{row}"
        );
        assert!(
            row.contains("120.0 MiB") && row.contains("125.0 MiB at end"),
            "{row}"
        );
        assert!(row.ends_with("| met |"), "{row}");
    }

    #[test]
    fn a_run_left_out_is_skipped_not_met() {
        let mut r = report(10_000, 10_000, 200.0);
        r.peak_rss_mib = f64::NAN;
        r.worker_cpu_us_per_job = f64::NAN;
        let t = table(&r);
        for name in ["(e) worker peak RSS", "(g) worker CPU"] {
            let line = t.lines().find(|l| l.contains(name)).unwrap_or_default();
            assert!(line.ends_with("| skipped |"), "{line}");
        }
        let h2 = h2_row(&t);
        assert!(h2.ends_with("| met |"), "{h2}");
    }

    fn line<'t>(t: &'t str, start: &str) -> &'t str {
        t.lines().find(|l| l.starts_with(start)).unwrap_or_default()
    }

    #[test]
    fn capped_rows_show_the_ratio_the_429s_and_the_errors() {
        let mut r = report(10_000, 10_000, 200.0);
        let t = table(&r);
        let ratio = line(&t, "| (u) unknown provider cap");
        assert!(
            ratio.contains("80 ok jobs/s") && ratio.contains("0.50 of ideal"),
            "{ratio}"
        );
        assert!(ratio.ends_with("| NOT met |"), "{ratio}");
        let cost = line(&t, "| (u) 429s");
        assert!(
            cost.contains("1234 / 0") && cost.ends_with("| met |"),
            "{cost}"
        );
        r.capped_ratio = 0.85;
        r.capped_errors = Some(3);
        let t = table(&r);
        assert!(line(&t, "| (u) unknown").ends_with("| met |"));
        assert!(line(&t, "| (u) 429s").ends_with("| NOT met |"));
        r.capped_jobs_per_s = f64::NAN;
        r.capped_ratio = f64::NAN;
        r.capped_over_cap = None;
        r.capped_errors = None;
        let t = table(&r);
        for start in ["| (u) unknown", "| (u) 429s"] {
            assert!(line(&t, start).ends_with("| skipped |"), "{t}");
        }
    }

    #[test]
    fn streaming_rows_show_the_figures_and_judge_the_two_goals() {
        let mut r = report(10_000, 10_000, 200.0);
        let t = table(&r);
        let rate = line(&t, "| (s) 300 streams");
        assert!(
            rate.contains("5700 deltas/s") && rate.contains("0.95 of 6000"),
            "{rate}"
        );
        assert!(rate.ends_with("| |"), "no target: {rate}");
        let cpu = line(&t, "| (s) worker CPU");
        assert!(cpu.contains("40% of a core") && cpu.contains("70.0 µs/delta"));
        let first = line(&t, "| (s) first chunk");
        assert!(first.contains("2.50 ms") && first.contains("p99 12.00 ms"));
        assert!(first.ends_with("| met |"), "{first}");
        let rss = line(&t, "| (s) worker peak RSS");
        assert!(rss.contains("45.0 / 36.0 MiB") && rss.contains("1.25x"));
        assert!(rss.ends_with("| met |"), "{rss}");
        assert!(line(&t, "| (s) error results").ends_with("| met |"));
        r.stream_first_delta_p50_ms = 5.0;
        r.stream_rss_ratio = 1.6;
        r.stream_errors = Some(2);
        let t = table(&r);
        for start in ["| (s) first chunk", "| (s) worker peak RSS", "| (s) error"] {
            assert!(line(&t, start).ends_with("| NOT met |"), "{t}");
        }
        r.stream_deltas_per_s = f64::NAN;
        r.stream_worker_cpu_pct = f64::NAN;
        r.stream_first_delta_p50_ms = f64::NAN;
        r.stream_peak_rss_mib = f64::NAN;
        r.stream_errors = None;
        let t = table(&r);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| (s)")).collect();
        assert_eq!(rows.len(), 5, "{t}");
        for row in rows {
            assert!(row.ends_with("| skipped |"), "{row}");
        }
    }

    #[test]
    fn tenants_rows_judge_the_even_ratio_and_show_the_rest() {
        let mut r = report(10_000, 10_000, 200.0);
        let t = table(&r);
        let even = line(&t, "| (t) even, 200 tenants");
        assert!(
            even.contains("1900 / 1950 jobs/s") && even.contains("0.97 of no lanes"),
            "{even}"
        );
        assert!(even.ends_with("| met |"), "{even}");
        assert!(line(&t, "| (t) even: moved").contains("0 / 0"));
        let quiet = line(&t, "| (t) noisy: the quiet tenant's 50 jobs");
        assert!(
            quiet.contains("120 / 2500 ms") && quiet.contains("p99 300 / 2600"),
            "{quiet}"
        );
        assert!(quiet.ends_with("| |"), "no target: {quiet}");
        assert!(line(&t, "| (t) noisy: moved").contains("5000 / ?"));
        let flood = line(&t, "| (t) flood, one sender");
        assert!(
            flood.contains("2000 / 4000 jobs/s") && flood.contains("0.50 of no lanes"),
            "{flood}"
        );
        assert!(flood.ends_with("| NOT met |"), "{flood}");
        assert!(line(&t, "| (t) error results").ends_with("| met |"));
        r.tenants_even_ratio = 0.85;
        assert!(line(&table(&r), "| (t) even, 200").ends_with("| NOT met |"));
        for moves in [
            &mut r.tenants_even_lane_moves,
            &mut r.tenants_noisy_lane_moves,
            &mut r.tenants_flood_lane_moves,
        ] {
            moves.clear();
        }
        for figure in [
            &mut r.tenants_even_lanes_jobs_per_s,
            &mut r.tenants_even_ratio,
            &mut r.tenants_noisy_lanes_jobs_per_s,
            &mut r.tenants_quiet_lanes_p50_ms,
            &mut r.tenants_flood_lanes_jobs_per_s,
        ] {
            *figure = f64::NAN;
        }
        r.tenants_errors = None;
        let t = table(&r);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| (t)")).collect();
        assert_eq!(rows.len(), 8, "{t}");
        for row in rows {
            assert!(row.ends_with("| skipped |"), "{row}");
        }
    }

    #[test]
    fn h2_row_is_not_met_short_of_every_call_or_when_not_run() {
        for (reached, rss) in [(200, 120.0), (10_000, 300.0), (0, 0.0)] {
            let t = table(&report(10_000, reached, rss));
            assert!(h2_row(&t).ends_with("| NOT met |"), "{reached}, {rss}");
        }
    }
}
