//! The options of `llmq bench`: the size of each run, which runs, where the report goes,
//! and how the worker is wrapped.

use std::path::PathBuf;

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
    /// Jobs for each run against an unannounced cap of 32 calls (u, v).
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
    /// The AMQP URLs of a RabbitMQ cluster's nodes, comma-separated, for (q); `make bench`
    /// gives the local cluster's (`scripts/cluster.sh`). Without them (q) is skipped.
    #[arg(long)]
    pub cluster_urls: Option<String>,
    /// Jobs of each run of (q), classic and quorum.
    #[arg(long, default_value_t = 10_000)]
    pub cluster_jobs: usize,
    /// Run only these measures (letters from "bcdfhHsuvtq", H for (h2); the broker ceiling
    /// always runs, (g) is measured during (b)).
    #[arg(long, default_value = "bcdfhHsuvtq")]
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
