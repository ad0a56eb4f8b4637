//! (t): fair share between tenants, what its lanes cost and what they buy. Tenants are named
//! by the `x-tenant` header (`tenancy.header`), so the bench's one connection publishes for
//! any of them. Each run has a fresh worker; a scenario's runs alternate lanes on
//! (`topology.lanes` 16) and off (0) in the order on, off, off, on, which cancels a drift of
//! the machine's speed that is linear in time:
//! - even, no tenant noisy: `--tenant-jobs` requests from 200 tenants in turn, the mock at
//!   50 ms per call, `worker.max_inflight` = `worker.min_inflight` = 100 (a fixed limit):
//!   jobs/s with lanes over jobs/s without (the goal: at least 0.9), and the moves;
//! - noisy: one tenant's `--tenant-jobs` requests, then another's 50 right after, the worker
//!   running, same mock and limit: the quiet tenant's time from publish to result (without
//!   lanes it waits behind the whole backlog), jobs/s, the moves;
//! - flood: one sender alone, twice `--tenant-jobs` requests, 0 ms upstream and the default
//!   `worker.max_inflight`, (b)'s setup, bound by the broker: jobs/s with lanes over jobs/s
//!   without. The requests name no sender (no `user_id`, no header, no `[tenants]`): a fleet
//!   of one tenant, which should pay nothing for lanes (a backlog moved would cost one
//!   publish and one delivery more per request).
//!
//! The moves are `llmq_lane_moves_total` of the worker's admin `/metrics`, read after the
//! last result and before the worker stops. A worker of the other runs listens on
//! `127.0.0.1:0`, a port the bench cannot see; these listen on a port that was free a moment
//! before the worker started ([`free_admin_addr`]).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use serde_json::json;

use super::{
    Bench, BenchError,
    broker::{collect, publish_requests_with},
    jobs::is_error,
    latency::{now_us, percentile},
    worker::{finish, start_worker},
};
use crate::tools::mock::MockOptions;

/// The header that names a request's tenant.
const HEADER: &str = "x-tenant";
/// Lanes per work queue when they are on (the default of `topology.lanes`).
const LANES: u16 = 16;
/// Tenants of the even scenario, in turn.
const EVEN_TENANTS: usize = 200;
/// The mock's time per call in the even and noisy scenarios.
const UPSTREAM_MS: u64 = 50;
/// `worker.max_inflight` and `worker.min_inflight` of the even and noisy scenarios.
pub(super) const LIMIT: u16 = 100;
/// Requests of the quiet tenant in the noisy scenario.
pub(super) const QUIET_JOBS: usize = 50;
/// Whether each run of a scenario has lanes: on, off, off, on.
const ORDER: [bool; 4] = [true, false, false, true];
/// The goal for the even scenario: jobs/s with lanes over without.
pub(super) const EVEN_GOAL: f64 = 0.9;
/// The worker's counter of moves to a lane.
const MOVES: &str = "llmq_lane_moves_total";

/// The three scenarios of (t).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Even,
    Noisy,
    Flood,
}

impl Scenario {
    /// Requests of a run, for `--tenant-jobs` `n`.
    fn jobs(self, n: usize) -> usize {
        match self {
            Self::Even => n,
            Self::Noisy => n + QUIET_JOBS,
            Self::Flood => 2 * n,
        }
    }

    /// The tenant of request `i`, for `--tenant-jobs` `n`.
    fn tenant(self, i: usize, n: usize) -> String {
        match self {
            Self::Even => format!("tenant-{:03}", i % EVEN_TENANTS),
            Self::Noisy if i >= n => "bob".into(),
            Self::Noisy | Self::Flood => "alice".into(),
        }
    }

    /// Whether request `i` is the quiet tenant's, timed from publish to result.
    fn quiet(self, i: usize, n: usize) -> bool {
        self == Self::Noisy && i >= n
    }

    fn upstream_ms(self) -> u64 {
        match self {
            Self::Even | Self::Noisy => UPSTREAM_MS,
            Self::Flood => 0,
        }
    }

    fn describe(self, n: usize) -> String {
        match self {
            Self::Even => format!(
                "(t) even: {n} jobs from {EVEN_TENANTS} tenants in turn, {UPSTREAM_MS} ms upstream, max_inflight {LIMIT}"
            ),
            Self::Noisy => format!(
                "(t) noisy: {n} jobs of one tenant, then {QUIET_JOBS} of another, {UPSTREAM_MS} ms upstream, max_inflight {LIMIT}"
            ),
            Self::Flood => format!(
                "(t) flood: {} jobs of one sender naming none, 0 ms upstream, default max_inflight",
                self.jobs(n)
            ),
        }
    }
}

/// The runs of one scenario on one side (lanes or none).
#[derive(Debug, Clone, Default)]
pub(super) struct Runs {
    /// Each run's jobs/s, from the first publish to the last result.
    jobs_per_s: Vec<f64>,
    /// The quiet tenant's times from publish to result over every run, ms, sorted.
    quiet_ms: Vec<f64>,
    /// Each run's moves to a lane; `None` when `/metrics` could not be read.
    pub(super) moves: Vec<Option<u64>>,
    /// Results with `status: error`.
    errors: u64,
}

impl Runs {
    /// The mean of the runs' jobs/s; NaN without a run.
    pub(super) fn jobs_per_s(&self) -> f64 {
        self.jobs_per_s.iter().sum::<f64>() / self.jobs_per_s.len() as f64
    }

    /// The `p` quantile of the quiet tenant's times, ms.
    pub(super) fn quiet_ms(&self, p: f64) -> f64 {
        percentile(&self.quiet_ms, p)
    }

    fn add(&mut self, run: Run) {
        self.jobs_per_s.push(run.jobs_per_s);
        self.quiet_ms.extend(run.quiet_ms);
        self.quiet_ms.sort_by(f64::total_cmp);
        self.moves.push(run.moves);
        self.errors += run.errors;
    }
}

/// One scenario's runs with lanes and without.
#[derive(Debug, Clone, Default)]
pub(super) struct Compared {
    pub(super) lanes: Runs,
    pub(super) plain: Runs,
}

impl Compared {
    /// Jobs/s with lanes over jobs/s without.
    pub(super) fn ratio(&self) -> f64 {
        self.lanes.jobs_per_s() / self.plain.jobs_per_s()
    }
}

/// What (t) saw; empty when it did not run.
#[derive(Debug, Clone, Default)]
pub(super) struct Tenants {
    pub(super) even: Compared,
    pub(super) noisy: Compared,
    pub(super) flood: Compared,
}

impl Tenants {
    fn of(&mut self, scenario: Scenario) -> &mut Compared {
        match scenario {
            Scenario::Even => &mut self.even,
            Scenario::Noisy => &mut self.noisy,
            Scenario::Flood => &mut self.flood,
        }
    }

    /// Results with `status: error` over every run; `None` when (t) did not run.
    pub(super) fn errors(&self) -> Option<u64> {
        let all = [&self.even, &self.noisy, &self.flood];
        if all.iter().all(|c| c.lanes.jobs_per_s.is_empty()) {
            return None;
        }
        Some(all.iter().map(|c| c.lanes.errors + c.plain.errors).sum())
    }
}

/// (t), when `--only` asks for it.
pub(super) async fn measure(bench: &Bench<'_>) -> Result<Tenants, BenchError> {
    let n = bench.args.tenant_jobs;
    let mut tenants = Tenants::default();
    if !bench.on('t') || n == 0 {
        return Ok(tenants);
    }
    for scenario in [Scenario::Even, Scenario::Noisy, Scenario::Flood] {
        eprintln!("{}; lanes on, off, off, on", scenario.describe(n));
        for lanes in ORDER {
            let run = run(bench, scenario, lanes).await?;
            eprintln!(
                "    {}: {:.0} jobs/s{}{}",
                if lanes { "lanes" } else { "none " },
                run.jobs_per_s,
                match (lanes, run.moves) {
                    (false, _) => String::new(),
                    (true, Some(moves)) => format!(", {moves} moved"),
                    (true, None) => format!(", moves unknown ({MOVES} unreadable)"),
                },
                if scenario == Scenario::Noisy {
                    format!(
                        ", the quiet tenant's p50 {:.0} ms, p99 {:.0} ms",
                        percentile(&run.quiet_ms, 0.50),
                        percentile(&run.quiet_ms, 0.99)
                    )
                } else {
                    String::new()
                },
            );
            let side = tenants.of(scenario);
            if lanes {
                side.lanes.add(run);
            } else {
                side.plain.add(run);
            }
        }
        eprintln!(
            "    lanes / none: {:.2} of the jobs/s",
            tenants.of(scenario).ratio()
        );
    }
    Ok(tenants)
}

/// What one run saw.
struct Run {
    jobs_per_s: f64,
    /// The quiet tenant's times from publish to result, ms, sorted.
    quiet_ms: Vec<f64>,
    moves: Option<u64>,
    errors: u64,
}

/// One run of `scenario` through a fresh worker, with lanes or without.
async fn run(bench: &Bench<'_>, scenario: Scenario, lanes: bool) -> Result<Run, BenchError> {
    let n = bench.args.tenant_jobs;
    let total = scenario.jobs(n);
    let admin = free_admin_addr()?;
    bench.mock.set_options(MockOptions {
        latency_ms: scenario.upstream_ms(),
        ..Default::default()
    });
    let cfg = bench.config(|c| {
        if scenario != Scenario::Flood {
            c.tenancy.header = HEADER.into();
        }
        c.topology.lanes = if lanes { LANES } else { 0 };
        c.admin.addr = admin.to_string();
        if scenario != Scenario::Flood {
            c.worker.max_inflight = LIMIT;
            c.worker.min_inflight = LIMIT;
        }
    });
    let conn = &bench.conn;
    let child = start_worker(conn, &cfg).await?;
    let quiet = Arc::new(Mutex::new(Vec::with_capacity(QUIET_JOBS)));
    let errors = Arc::new(AtomicU64::new(0));
    let results = collect(
        conn.create_channel().await?,
        cfg.topology.results_queue.clone(),
        total,
        {
            let (quiet, errors) = (quiet.clone(), errors.clone());
            move |data| {
                let now = now_us();
                if is_error(data) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
                    && let Some(sent) = v["metadata"]["sent_us"].as_u64()
                    && let Ok(mut q) = quiet.lock()
                {
                    q.push(now.saturating_sub(sent) as f64 / 1000.0);
                }
            }
        },
    );
    let body = |i: usize| {
        let mut body = json!({"prompt": format!("tenants {i}"), "request_id": format!("t-{i}")});
        if scenario.quiet(i, n) {
            body["metadata"] = json!({"sent_us": now_us()});
        }
        body
    };
    let props = |i: usize| {
        if scenario == Scenario::Flood {
            return BasicProperties::default();
        }
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER.into(),
            AMQPValue::LongString(LongString::from(scenario.tenant(i, n).as_str())),
        );
        BasicProperties::default().with_headers(headers)
    };
    let key = &cfg.topology.processing_key;
    let start = publish_requests_with(conn, &cfg, key, total, body, props).await?;
    let end = results
        .await
        .map_err(|e| BenchError::Stalled(e.to_string()))??;
    let moves = read_counter(admin, MOVES).await;
    finish(conn, &cfg, child).await;
    let mut quiet_ms = quiet.lock().map(|q| q.clone()).unwrap_or_default();
    quiet_ms.sort_by(f64::total_cmp);
    Ok(Run {
        jobs_per_s: total as f64 / (end - start).as_secs_f64(),
        quiet_ms,
        moves,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// An address for a worker's admin server on a port free a moment ago. Another process may
/// take it before the worker binds it: the worker then exits saying so, and the run fails
/// as a worker that never subscribes does.
fn free_admin_addr() -> Result<SocketAddr, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| BenchError::Setup(format!("no free port for the worker's admin server: {e}")))
}

/// Counter `name` of the worker's `/metrics` at `admin`; `None` when it cannot be read.
async fn read_counter(admin: SocketAddr, name: &str) -> Option<u64> {
    crate::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let text = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    counter(&text, name)
}

/// The value of counter `name` (a sample without labels) in Prometheus text.
fn counter(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        let value = value.split_whitespace().next()?;
        value
            .parse()
            .ok()
            .or_else(|| value.parse::<f64>().ok().map(|v| v as u64))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_name_their_tenants_and_time_the_quiet_one() {
        let n = 6000;
        assert_eq!(Scenario::Even.jobs(n), n);
        assert_eq!(
            (Scenario::Even.tenant(0, n), Scenario::Even.tenant(201, n)),
            ("tenant-000".to_string(), "tenant-001".to_string())
        );
        assert_eq!(Scenario::Noisy.jobs(n), n + QUIET_JOBS);
        assert_eq!(Scenario::Noisy.tenant(n - 1, n), "alice");
        assert_eq!(Scenario::Noisy.tenant(n, n), "bob");
        assert!(!Scenario::Noisy.quiet(n - 1, n) && Scenario::Noisy.quiet(n, n));
        assert_eq!(Scenario::Flood.jobs(n), 2 * n);
        assert_eq!(Scenario::Flood.tenant(9000, n), "alice");
        assert!(!Scenario::Flood.quiet(9000, n));
        assert_eq!(ORDER.iter().filter(|&&lanes| lanes).count(), 2);
    }

    #[test]
    fn counter_reads_the_sample_not_its_help_or_a_longer_name() {
        let text = "# HELP llmq_lane_moves Requests moved\n\
                    # TYPE llmq_lane_moves counter\n\
                    llmq_lane_moves_total_x 7\n\
                    llmq_lane_moves_total 1234\n\
                    llmq_other_total 5\n";
        assert_eq!(counter(text, MOVES), Some(1234));
        assert_eq!(counter("llmq_lane_moves_total 3.0\n", MOVES), Some(3));
        assert_eq!(counter("llmq_other_total 5\n", MOVES), None);
    }

    #[test]
    fn runs_average_jobs_and_pool_the_quiet_times() {
        let mut runs = Runs::default();
        assert!(runs.jobs_per_s().is_nan());
        for (jobs_per_s, quiet) in [(1000.0, vec![30.0, 10.0]), (2000.0, vec![20.0])] {
            runs.add(Run {
                jobs_per_s,
                quiet_ms: quiet,
                moves: Some(4),
                errors: 1,
            });
        }
        assert_eq!(runs.jobs_per_s(), 1500.0);
        assert_eq!(runs.quiet_ms, vec![10.0, 20.0, 30.0]);
        assert_eq!((runs.moves.len(), runs.errors), (2, 2));
    }
}
