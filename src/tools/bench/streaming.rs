//! (s): streaming to `reply_to`. `--streams` requests at once with `"stream": true`, the
//! mock sending a chunk (a word) every 50 ms, the worker at `stream.flush_ms` = 50, every
//! delta and result to one reply queue that the bench reads: delta messages/s, the worker's
//! CPU and peak RSS, and each request's time from the mock's first content chunk to its
//! first delta on `reply_to`. Both instants are taken in this process (the mock is
//! in-process), so that time covers the HTTP hop from the mock to the worker over loopback,
//! the worker, the broker and this process's consumer. Then the same requests without
//! `stream`, the mock answering each after as long as a stream lasts on average, for the
//! peak RSS of the same concurrency without streaming.
//!
//! Replies run from 60 to 100 words, evenly spread: after the first wave (every stream
//! starting at once) the streams fall out of step, as those of independent callers are.

use std::{
    collections::HashMap,
    ops::RangeInclusive,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel,
    options::{BasicConsumeOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::json;

use super::{
    Bench, BenchError,
    broker::{collect, publish_requests_with},
    jobs::is_error,
    latency::percentile,
    worker::{RunConfig, clock_ticks_per_s, cpu_ticks, finish, start_worker, status_kib},
};
use crate::{
    broker::connection,
    config::{Config, KeepResults},
    contract::stream::{DELTA, RESTART},
    tools::mock::{MockOptions, MockServer},
};

/// Milliseconds between the mock's chunks.
pub(super) const CHUNK_MS: u64 = 50;
/// `stream.flush_ms` (its default), whatever the configuration says.
const FLUSH_MS: u64 = 50;
/// Words of a reply: `mock reply to:` (three words) and the prompt.
const WORDS: RangeInclusive<usize> = 60..=100;

/// What the streaming run (s) and its run without streaming saw.
#[derive(Debug, Clone, Copy)]
pub(super) struct Streaming {
    /// Streams asked for at once (`--streams`); 0 when it did not run.
    pub(super) streams: u64,
    /// The most requests whose first delta had come and whose result had not, at once.
    pub(super) most_streams: u64,
    /// Delta messages per second on the reply queue while every stream was running: from
    /// the first delta to the first delta of the last request to start.
    pub(super) deltas_per_s: f64,
    /// Words per delta message: 1 when every chunk is a message of its own.
    pub(super) words_per_delta: f64,
    /// The worker's user + system CPU time from the first publish to the last result, % of
    /// one core.
    pub(super) cpu_pct: f64,
    /// The same per delta message (results and requests included), µs.
    pub(super) cpu_us_per_delta: f64,
    /// The worker's CPU in the run without streaming, % of one core.
    pub(super) plain_cpu_pct: f64,
    /// The worker's VmHWM after the streaming run, KiB.
    pub(super) peak_rss_kib: u64,
    /// The worker's VmHWM after the run without streaming, KiB.
    pub(super) plain_peak_rss_kib: u64,
    /// From the mock's first content chunk to the first delta on `reply_to`, median, ms.
    pub(super) first_delta_p50_ms: f64,
    /// The same, p99.
    pub(super) first_delta_p99_ms: f64,
    /// Requests with both instants.
    pub(super) first_delta_samples: usize,
    /// Results with `status: error`, both runs.
    pub(super) errors: Option<u64>,
}

impl Streaming {
    /// The figures of a run left out by `--only`.
    const SKIPPED: Self = Self {
        streams: 0,
        most_streams: 0,
        deltas_per_s: f64::NAN,
        words_per_delta: f64::NAN,
        cpu_pct: f64::NAN,
        cpu_us_per_delta: f64::NAN,
        plain_cpu_pct: f64::NAN,
        peak_rss_kib: 0,
        plain_peak_rss_kib: 0,
        first_delta_p50_ms: f64::NAN,
        first_delta_p99_ms: f64::NAN,
        first_delta_samples: 0,
        errors: None,
    };

    /// Delta messages/s if every chunk of every stream were a message of its own.
    pub(super) fn ideal_deltas_per_s(&self) -> f64 {
        self.streams as f64 * 1000.0 / CHUNK_MS as f64
    }
}

/// (s), when `--only` asks for it.
pub(super) async fn measure(bench: &Bench<'_>) -> Result<Streaming, BenchError> {
    let (streams, n) = (bench.args.streams, bench.args.stream_jobs);
    if !bench.on('s') || streams == 0 || n == 0 {
        return Ok(Streaming::SKIPPED);
    }
    eprintln!(
        "(s) {streams} streams at once, a chunk every {CHUNK_MS} ms, flush_ms {FLUSH_MS}: {n} requests of {}-{} words; then the same without streaming",
        WORDS.start(),
        WORDS.end()
    );
    let adjust = |c: &mut Config| {
        c.worker.max_inflight = streams;
        c.stream.flush_ms = FLUSH_MS;
    };
    let mock = &bench.mock;
    forget_first_chunks(mock);
    mock.set_options(MockOptions {
        chunk_ms: CHUNK_MS,
        record_first_chunks: true,
        ..Default::default()
    });
    let streamed = run(bench, &bench.config(adjust), n, true).await?;
    let first_delta = first_delta_ms(&streamed.replies, mock, n);
    forget_first_chunks(mock);
    let words: usize = (0..n).map(reply_words).sum();
    let deltas = streamed.replies.deltas.len();
    let figures = Streaming {
        streams: u64::from(streams),
        most_streams: streamed.replies.most_streams as u64,
        deltas_per_s: streamed.replies.steady_deltas_per_s(),
        words_per_delta: words as f64 / deltas.max(1) as f64,
        cpu_pct: streamed.cpu_pct(),
        cpu_us_per_delta: streamed.cpu_s * 1e6 / deltas.max(1) as f64,
        first_delta_p50_ms: percentile(&first_delta, 0.50),
        first_delta_p99_ms: percentile(&first_delta, 0.99),
        first_delta_samples: first_delta.len(),
        peak_rss_kib: streamed.peak_rss_kib,
        ..Streaming::SKIPPED
    };
    eprintln!(
        "    {:.0} deltas/s ({:.2} words each), {} streams at most, {} restarts; worker CPU {:.0}% of a core, {:.1} µs/delta, peak RSS {:.1} MiB; first chunk to first delta p50 {:.2} ms, p99 {:.2} ms over {} requests",
        figures.deltas_per_s,
        figures.words_per_delta,
        figures.most_streams,
        streamed.replies.restarts,
        figures.cpu_pct,
        figures.cpu_us_per_delta,
        figures.peak_rss_kib as f64 / 1024.0,
        figures.first_delta_p50_ms,
        figures.first_delta_p99_ms,
        figures.first_delta_samples
    );
    mock.set_options(MockOptions {
        latency_ms: mean_stream_ms(),
        ..Default::default()
    });
    let plain = run(bench, &bench.config(adjust), n, false).await?;
    eprintln!(
        "    without streaming ({} ms upstream): worker CPU {:.0}% of a core, peak RSS {:.1} MiB",
        mean_stream_ms(),
        plain.cpu_pct(),
        plain.peak_rss_kib as f64 / 1024.0
    );
    Ok(Streaming {
        plain_cpu_pct: plain.cpu_pct(),
        plain_peak_rss_kib: plain.peak_rss_kib,
        errors: Some(streamed.replies.errors + plain.replies.errors),
        ..figures
    })
}

/// Words of request `i`'s reply.
fn reply_words(i: usize) -> usize {
    WORDS.start() + i % WORDS.clone().count()
}

/// The mean time a stream lasts: a reply of `w` words is `w` + 5 events (a comment, the
/// role chunk, the words, the finish chunk, the usage chunk, `[DONE]`), the first sent at
/// once and each later one `CHUNK_MS` after the one before.
fn mean_stream_ms() -> u64 {
    let mean_words = (WORDS.start() + WORDS.end()) as u64 / 2;
    (mean_words + 4) * CHUNK_MS
}

fn request_id(i: usize) -> String {
    format!("s-{i}")
}

/// Request `i`'s prompt: its id, then filler to make its reply [`reply_words`] long. The
/// mock notes each stream's first chunk by it.
fn prompt(i: usize) -> String {
    let filler = reply_words(i) - 4;
    format!("{}{}", request_id(i), " lorem".repeat(filler))
}

/// What one run (streaming or not) saw.
struct Run {
    /// From the first publish to the last result, on the reply queue and the results queue.
    elapsed: Duration,
    /// The worker's user + system CPU time over `elapsed`, s; NaN when unreadable.
    cpu_s: f64,
    /// The worker's VmHWM at the end, KiB.
    peak_rss_kib: u64,
    replies: Replies,
}

impl Run {
    fn cpu_pct(&self) -> f64 {
        self.cpu_s * 100.0 / self.elapsed.as_secs_f64()
    }
}

/// `n` requests (with `stream` or without) through a fresh worker, all replying to one
/// exclusive queue the bench reads.
async fn run(
    bench: &Bench<'_>,
    cfg: &RunConfig,
    n: usize,
    stream: bool,
) -> Result<Run, BenchError> {
    let conn = &bench.conn;
    let child = start_worker(conn, cfg).await?;
    let pid = child.id().unwrap_or(0);
    // The reply queue on a connection of its own: exclusive to it, and gone with it.
    let replies_conn = connection::connect(&bench.base.config.amqp, "llmq bench replies").await?;
    let channel = replies_conn.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .name()
        .to_string();
    let replies = read_replies(channel, queue.clone(), n);
    // With `keep_results = "always"` every result also goes to the results queue: drained,
    // not looked at. Otherwise a result that reached the reply queue is not copied.
    let results = match cfg.topology.keep_results {
        KeepResults::Always => Some(collect(
            conn.create_channel().await?,
            cfg.topology.results_queue.clone(),
            n,
            |_| {},
        )),
        KeepResults::WithoutReplyTo | KeepResults::Never => None,
    };
    let ticks = clock_ticks_per_s();
    let cpu_before = cpu_ticks(pid);
    let body = |i: usize| {
        let mut body = json!({"prompt": prompt(i), "request_id": request_id(i)});
        if stream {
            body["stream"] = json!(true);
        }
        body
    };
    let props = BasicProperties::default().with_reply_to(queue.as_str().into());
    let key = &cfg.topology.processing_key;
    let start = publish_requests_with(conn, cfg, key, n, body, |_| props.clone()).await?;
    let replies = replies
        .await
        .map_err(|e| BenchError::Stalled(e.to_string()))??;
    if let Some(results) = results {
        results
            .await
            .map_err(|e| BenchError::Stalled(e.to_string()))??;
    }
    let elapsed = start.elapsed();
    let cpu_s = match (cpu_before, cpu_ticks(pid)) {
        (Some(before), Some(after)) => after.saturating_sub(before) as f64 / ticks as f64,
        _ => f64::NAN,
    };
    let peak_rss_kib = status_kib(pid, "VmHWM:");
    finish(conn, cfg, child).await;
    let _ = replies_conn.close(200, "done".into()).await;
    Ok(Run {
        elapsed,
        cpu_s,
        peak_rss_kib,
        replies,
    })
}

/// What came on the reply queue.
#[derive(Debug, Default)]
struct Replies {
    /// When each delta message came, in order.
    deltas: Vec<Instant>,
    /// When each request's first delta came, by correlation id (the worker's is the
    /// request id when the request has none).
    first: HashMap<String, Instant>,
    /// Results (AMQP `type` `llmq.result`).
    results: usize,
    /// Results with `status: error`.
    errors: u64,
    /// Restart markers: an attempt after one that streamed.
    restarts: u64,
    /// The most requests whose first delta had come and whose result had not, at once.
    most_streams: usize,
}

impl Replies {
    /// Delta messages per second from the first delta to the first delta of the last
    /// request to start (after it, fewer streams run each moment); over every delta when
    /// there is no such span (a single wave).
    fn steady_deltas_per_s(&self) -> f64 {
        let (Some(&first), Some(&last)) = (self.deltas.first(), self.deltas.last()) else {
            return f64::NAN;
        };
        let end = self.first.values().max().copied().unwrap_or(last);
        let (end, count) = if end > first {
            (end, self.deltas.partition_point(|&t| t <= end))
        } else {
            (last, self.deltas.len())
        };
        count as f64 / (end - first).as_secs_f64()
    }
}

/// Reads the reply queue (no-ack) until `n` results came.
fn read_replies(
    channel: Channel,
    queue: String,
    n: usize,
) -> tokio::task::JoinHandle<Result<Replies, BenchError>> {
    tokio::spawn(async move {
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "bench-replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut r = Replies::default();
        while r.results < n {
            let d = match tokio::time::timeout(Duration::from_secs(60), consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                _ => {
                    return Err(BenchError::Stalled(format!(
                        "{} of {n} results arrived on reply_to",
                        r.results
                    )));
                }
            };
            let now = Instant::now();
            let props = &d.properties;
            match props.kind().as_ref().map(|k| k.as_str()) {
                Some(DELTA) => {
                    r.deltas.push(now);
                    // Sequence 0 of an attempt: `<request_id>:<attempt>:0`.
                    let first = props
                        .message_id()
                        .as_ref()
                        .is_some_and(|id| id.as_str().ends_with(":0"));
                    if first && let Some(id) = props.correlation_id() {
                        r.first.entry(id.to_string()).or_insert(now);
                        r.most_streams = r.most_streams.max(r.first.len() - r.results);
                    }
                }
                Some(RESTART) => r.restarts += 1,
                _ => {
                    r.results += 1;
                    if is_error(&d.data) {
                        r.errors += 1;
                    }
                }
            }
        }
        Ok(r)
    })
}

/// Each request's time from the mock's first content chunk to its first delta on
/// `reply_to`, ms, sorted.
fn first_delta_ms(replies: &Replies, mock: &MockServer, n: usize) -> Vec<f64> {
    let Ok(sent) = mock.stats().first_chunks.lock() else {
        return Vec::new();
    };
    let mut ms: Vec<f64> = (0..n)
        .filter_map(|i| {
            let sent = sent.get(&prompt(i))?;
            let came = replies.first.get(&request_id(i))?;
            Some(came.saturating_duration_since(*sent).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// Empties the mock's notes of first chunks.
fn forget_first_chunks(mock: &MockServer) {
    if let Ok(mut sent) = mock.stats().first_chunks.lock() {
        sent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_run_from_60_to_100_words_and_a_stream_lasts_84_chunks_on_average() {
        let words: Vec<usize> = (0..82).map(reply_words).collect();
        assert_eq!(
            (words[0], words[40], words[41], words[81]),
            (60, 100, 60, 100)
        );
        // `mock reply to: s-0 lorem ...`
        let reply = format!("mock reply to: {}", prompt(0));
        assert_eq!(reply.split(' ').count(), 60);
        assert_eq!(prompt(1).split(' ').count() + 3, 61);
        assert_eq!(mean_stream_ms(), 84 * CHUNK_MS);
    }

    #[test]
    fn deltas_per_s_counts_until_the_last_stream_started() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Replies {
            deltas: (0..=20).map(|i| at(i * 100)).collect(),
            ..Default::default()
        };
        r.first.insert("a".into(), at(0));
        r.first.insert("b".into(), at(1000));
        // 11 deltas from 0 to 1000 ms.
        assert!((r.steady_deltas_per_s() - 11.0).abs() < 1e-9);
        // One wave: every delta over the whole span.
        r.first.remove("b");
        assert!((r.steady_deltas_per_s() - 21.0 / 2.0).abs() < 1e-9);
    }
}
