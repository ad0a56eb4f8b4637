//! `llmq bench`: one run, twelve figures, as ratios against the raw broker and the ideal.
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
//! - (v) the same cap, its refusals saying `Retry-After: 1`: the same figures;
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
//!   lanes run's moves to a lane;
//! - (q) the (b) run on a RabbitMQ cluster (`--cluster-urls`; `make bench` starts the local
//!   one of `scripts/cluster.sh`), the worker given every node's address: with classic
//!   queues, then with quorum queues, and quorum over classic (goal >= 0.8).
//!
//! One file per family of runs: `broker` (the ceiling, and the publishing and collecting
//! every run shares), `jobs` (b, c, e, g), `latency` (d), `embeddings` (f), `held` (h, h2),
//! `capped` (u, v), `streaming` (s), `tenants` (t), `cluster` (q); `worker` starts and stops the worker
//! process and reads its figures from `/proc`. Around them: `options` (the command's
//! [`BenchArgs`]), `report` (the figures and the [`Report`] they make) and `table` (the
//! report as a table with the targets, [`table()`]).

mod broker;
mod capped;
mod cluster;
mod embeddings;
mod held;
mod jobs;
mod latency;
mod options;
mod report;
mod streaming;
mod table;
mod tenants;
mod worker;

use held::Protocol;
use lapin::Connection;
pub use options::BenchArgs;
use report::Figures;
pub use report::Report;
pub use table::table;

use crate::{
    broker::connection,
    config::Config,
    tools::mock::{MockOptions, MockServer},
};

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    /// A broker operation failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The run's topology could not be declared.
    #[error(transparent)]
    Topology(#[from] crate::broker::topology::DeclareError),
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
        capped_told: capped::measure_told(&bench).await?,
        latency: latency::measure(&bench).await?,
        embeddings: embeddings::measure(&bench).await?,
        held: held::measure(&bench, Protocol::Http1).await?,
        held_h2: held::measure(&bench, Protocol::Http2).await?,
        streaming: streaming::measure(&bench).await?,
        tenants: tenants::measure(&bench).await?,
        cluster: cluster::measure(&bench).await?,
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
