//! (f): embeddings, batched against one call per message, with a provider-like cap on
//! concurrent calls.

use lapin::Connection;
use serde_json::json;

use super::{Bench, BenchError, jobs::run_jobs, worker::RunConfig};
use crate::tools::mock::MockOptions;

/// Items/s of the two embeddings runs; NaN when they did not run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Embeddings {
    /// With batching.
    pub(super) batched: f64,
    /// With `batch.max_items` = 1.
    pub(super) single: f64,
}

/// (f): mock at 20 ms per call + 0.2 ms per item, `worker.max_inflight` = 16.
pub(super) async fn measure(bench: &Bench<'_>) -> Result<Embeddings, BenchError> {
    if !bench.on('f') {
        return Ok(Embeddings {
            batched: f64::NAN,
            single: f64::NAN,
        });
    }
    let n = bench.args.embeddings;
    eprintln!("(f) embeddings, 20 ms + 0.2 ms/item, max_inflight 16: {n} requests x2");
    bench.mock.set_options(MockOptions {
        latency_ms: 20,
        per_item_us: 200,
        ..Default::default()
    });
    let batched_cfg = bench.config(|c| c.worker.max_inflight = 16);
    let batched = embeddings_per_s(&bench.conn, &batched_cfg, n).await?;
    let single_cfg = bench.config(|c| {
        c.worker.max_inflight = 16;
        c.batch.max_items = 1;
    });
    let single = embeddings_per_s(&bench.conn, &single_cfg, n).await?;
    eprintln!("    batched {batched:.0} items/s, one call per message {single:.0} items/s");
    Ok(Embeddings { batched, single })
}

/// `n` single-input embedding requests, items/s until the last result.
async fn embeddings_per_s(conn: &Connection, cfg: &RunConfig, n: usize) -> Result<f64, BenchError> {
    let key = cfg.topology.embeddings_key.clone();
    let body = |i: usize| json!({"kind": "embedding", "input": format!("text number {i}"), "request_id": format!("e-{i}")});
    Ok(run_jobs(conn, cfg, n, &key, body).await?.jobs_per_s)
}
