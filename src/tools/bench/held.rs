//! (h) and (h2): the worker's peak RSS with 10 000 calls in flight at once, over HTTP/1.1
//! (a connection per call) and over HTTP/2 without TLS (every call on one connection).

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use lapin::Connection;

use super::{
    Bench, BenchError,
    broker::{collect, publish_requests},
    jobs::chat_body,
    worker::{RunConfig, finish, open_files_limit, start_worker, status_kib},
};
use crate::tools::mock::{MockOptions, MockServer};

/// How the worker talks to the mock in a memory run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// (h): HTTP/1.1, a connection, and so a socket at each end, per call in flight.
    Http1,
    /// (h2): h2c (`llm.http2_prior_knowledge`), every call a stream of one connection.
    Http2,
}

impl Protocol {
    /// Its letter in `--only`.
    fn letter(self) -> char {
        match self {
            Protocol::Http1 => 'h',
            Protocol::Http2 => 'H',
        }
    }

    /// How the output names its run.
    fn tag(self) -> &'static str {
        match self {
            Protocol::Http1 => "(h)",
            Protocol::Http2 => "(h2)",
        }
    }
}

/// What a memory run (h, h2) saw.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Held {
    /// Calls asked for.
    pub(super) calls: u64,
    /// The most calls the mock served at once.
    pub(super) reached: u64,
    /// The worker's VmHWM once `reached` calls were in flight, KiB.
    pub(super) peak_kib: u64,
    /// The worker's VmHWM after the last result, KiB.
    pub(super) peak_end_kib: u64,
}

/// (h) or (h2): mock at `--inflight-latency-secs` per call, `worker.max_inflight` =
/// `worker.min_inflight` = `--inflight`, the worker speaking `protocol` to it.
pub(super) async fn measure(bench: &Bench<'_>, protocol: Protocol) -> Result<Held, BenchError> {
    let (n, secs) = (bench.args.inflight, bench.args.inflight_latency_secs);
    if !bench.on(protocol.letter()) || n == 0 {
        return Ok(Held::default());
    }
    let over = match protocol {
        Protocol::Http1 => "",
        Protocol::Http2 => " over HTTP/2 (h2c)",
    };
    eprintln!(
        "{} one replica, {secs} s upstream, {n} calls in flight{over}",
        protocol.tag()
    );
    bench.mock.set_options(MockOptions {
        latency_ms: secs.saturating_mul(1000),
        ..Default::default()
    });
    let cfg = bench.config(|c| {
        c.worker.max_inflight = n;
        c.worker.min_inflight = n;
        // Whatever the configuration says, so that the two runs differ in this alone.
        c.llm.http2_prior_knowledge = protocol == Protocol::Http2;
    });
    if protocol == Protocol::Http1 {
        check_open_files(usize::from(n))?;
    }
    let held = held_in_flight(&bench.conn, &cfg, &bench.mock, n, secs).await?;
    eprintln!(
        "    {} in flight: peak RSS {:.1} MiB, {:.1} MiB after the answers",
        held.reached,
        held.peak_kib as f64 / 1024.0,
        held.peak_end_kib as f64 / 1024.0
    );
    Ok(held)
}

/// `n` chat requests against a mock that takes `latency_secs` per call, with the worker
/// allowed `n` calls at once; the worker's VmHWM once the mock serves them all (or when the
/// first answers are due, if it never does), and after every result arrived.
async fn held_in_flight(
    conn: &Connection,
    cfg: &RunConfig,
    mock: &MockServer,
    n: u16,
    latency_secs: u64,
) -> Result<Held, BenchError> {
    let calls = usize::from(n);
    let child = start_worker(conn, cfg).await?;
    let pid = child.id().unwrap_or(0);
    let results = collect(
        conn.create_channel().await?,
        cfg.topology.results_queue.clone(),
        calls,
        |_| {},
    );
    let key = &cfg.topology.processing_key;
    let started = publish_requests(conn, cfg, key, calls, chat_body).await?;
    let due = started + Duration::from_secs(latency_secs);
    let reached = wait_in_flight(mock, u64::from(n), due).await;
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

/// Fails early when `ulimit -n` cannot hold a socket per call (over HTTP/1.1; over HTTP/2
/// both ends hold one).
fn check_open_files(calls: usize) -> Result<(), BenchError> {
    // The mock (here) and the worker each hold a socket per call, plus a few hundred for
    // the runtime, the broker connections and the files a process opens.
    let needed = calls as u64 + 512;
    match open_files_limit() {
        Some(limit) if limit < needed => Err(BenchError::Setup(format!(
            "(h) needs {needed} open files per process and `ulimit -n` is {limit}: \
             raise it (ulimit -n 65536, as `make bench` does) or pass --inflight {}",
            limit.saturating_sub(512)
        ))),
        _ => Ok(()),
    }
}

/// Waits until the mock serves `n` calls at once, or until `due`; the most it saw.
async fn wait_in_flight(mock: &MockServer, n: u64, due: Instant) -> u64 {
    // Once every call is in flight, or the first ones are about to be answered, the mock's
    // count only falls.
    let mut reached = 0;
    loop {
        let now = mock.stats().in_flight.load(Ordering::Relaxed);
        reached = reached.max(now);
        if now >= n || Instant::now() >= due {
            return reached;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
