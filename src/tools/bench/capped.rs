//! (u) and (v): a provider's concurrency cap that it does not announce. The mock refuses at
//! once, with 429, any call beyond 32 being answered, at 200 ms per call: without
//! `Retry-After` in (u), with `Retry-After: 1` in (v), as providers that cap concurrent
//! calls and still say when to come back do. The worker, with its default settings
//! (`worker.max_inflight` 256), has to find the cap either way.

use std::sync::atomic::Ordering;

use super::{Bench, BenchError, jobs::jobs_per_s};
use crate::tools::mock::MockOptions;

/// Calls the mock answers at once.
const CAP: u64 = 32;
/// The mock's time per call.
const LATENCY_MS: u64 = 200;

/// Jobs/s with every place under the cap always busy: 32 / 0.2 s.
pub(super) const IDEAL_JOBS_PER_S: f64 = CAP as f64 * 1000.0 / LATENCY_MS as f64;

/// What a (u) or (v) run saw.
#[derive(Debug, Clone, Copy)]
pub(super) struct Capped {
    /// Ok results per second, from the first publish to the last result; NaN when it did
    /// not run.
    pub(super) jobs_per_s: f64,
    /// Calls the mock refused over its cap during the run.
    pub(super) over_cap: Option<u64>,
    /// Results with `status: error`.
    pub(super) errors: Option<u64>,
}

/// (u), when `--only` asks for it: refusals without a time.
pub(super) async fn measure(bench: &Bench<'_>) -> Result<Capped, BenchError> {
    run(bench, 'u', None).await
}

/// (v), when `--only` asks for it: refusals with `Retry-After: 1`.
pub(super) async fn measure_told(bench: &Bench<'_>) -> Result<Capped, BenchError> {
    run(bench, 'v', Some(1)).await
}

/// The run of `letter`, the mock's refusals carrying `Retry-After: <retry_after>` if given.
async fn run(
    bench: &Bench<'_>,
    letter: char,
    retry_after: Option<u64>,
) -> Result<Capped, BenchError> {
    if !bench.on(letter) {
        return Ok(Capped {
            jobs_per_s: f64::NAN,
            over_cap: None,
            errors: None,
        });
    }
    let n = bench.args.capped_jobs;
    let told = retry_after.map_or(String::new(), |s| format!(" with Retry-After: {s}"));
    eprintln!(
        "({letter}) one replica, {LATENCY_MS} ms upstream that refuses calls beyond {CAP} at once{told}: {n} jobs"
    );
    bench.mock.set_options(MockOptions {
        latency_ms: LATENCY_MS,
        max_concurrency: Some(CAP),
        cap_retry_after: retry_after,
        ..Default::default()
    });
    // Every 429 retried is a warning of the worker's: thousands in this run. Dead letters
    // are errors, and still show.
    let cfg = bench.config(|_| {}).log_level("error");
    let over_cap = &bench.mock.stats().over_cap;
    let before = over_cap.load(Ordering::Relaxed);
    let run = jobs_per_s(&bench.conn, &cfg, n).await?;
    let refused = over_cap.load(Ordering::Relaxed) - before;
    // A job dead-lettered for its 429s is not one done.
    let ok_per_s = run.jobs_per_s * n.saturating_sub(run.errors as usize) as f64 / n as f64;
    eprintln!(
        "    {ok_per_s:.0} ok jobs/s ({:.2} of {IDEAL_JOBS_PER_S:.0}; {:.0} results/s with the errors), {refused} calls refused over the cap, {} error results",
        ok_per_s / IDEAL_JOBS_PER_S,
        run.jobs_per_s,
        run.errors
    );
    Ok(Capped {
        jobs_per_s: ok_per_s,
        over_cap: Some(refused),
        errors: Some(run.errors),
    })
}
