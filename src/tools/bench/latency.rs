//! (d): enqueue-to-result latency at a steady 200 jobs/s, 0 ms upstream.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Connection,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};
use serde_json::json;

use super::{
    Bench, BenchError,
    broker::{check_confirm, collect},
    worker::{RunConfig, finish, start_worker},
};
use crate::tools::mock::MockOptions;

/// The latency run's figures; NaN and 0 when it did not run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Latency {
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    /// Jobs measured.
    pub(super) samples: usize,
}

/// (d), when `--only` asks for it.
pub(super) async fn measure(bench: &Bench<'_>) -> Result<Latency, BenchError> {
    let mut lat = Vec::new();
    if bench.on('d') {
        let secs = bench.args.latency_secs;
        eprintln!("(d) latency at 200 jobs/s for {secs} s");
        bench.mock.set_options(MockOptions::default());
        let cfg = bench.config(|_| {});
        lat = latency(&bench.conn, &cfg, secs).await?;
    }
    lat.sort_by(f64::total_cmp);
    let (p50_ms, p99_ms) = (percentile(&lat, 0.50), percentile(&lat, 0.99));
    if !lat.is_empty() {
        eprintln!(
            "    p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms over {} jobs",
            lat.len()
        );
    }
    Ok(Latency {
        p50_ms,
        p99_ms,
        samples: lat.len(),
    })
}

/// The `p` quantile (0..=1) of `sorted`, NaN when empty.
pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN)
}

/// Microseconds since the Unix epoch: the clock both ends of a latency sample share.
pub(super) fn now_us() -> u64 {
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
