//! A broker memory alarm: RabbitMQ blocks every connection that publishes. The worker
//! reports it (`/readyz` 503), starts no new upstream call until it clears, and still shuts
//! down within its grace, handing its work back on its consuming connection, which the broker
//! never blocks.
//!
//! These tests change the shared broker: `.config/nextest.toml` runs them alone, and
//! [`MemoryAlarm`] restores the watermark even when a test panics. Their own connection
//! publishes only before the alarm, so it stays usable for inspecting the queues meanwhile.

use std::{
    collections::HashSet,
    process::Command,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use lapin::BasicProperties;
use llmq::{app::App, tools::mock::MockOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestEnv, drain_results, rabbitmqctl, wait_until};

/// Whether the broker reports a memory alarm.
fn memory_alarm_on() -> bool {
    rabbitmqctl(&["eval", "rabbit_alarm:get_alarms()."]).contains("memory")
}

/// A memory alarm raised on the broker; the watermark it found is restored when this is
/// dropped, on panic too.
struct MemoryAlarm {
    /// The `set_vm_memory_high_watermark` arguments that restore the watermark.
    restore: Vec<String>,
}

impl MemoryAlarm {
    /// Records the current watermark (relative `0.4` or `{absolute,N}`); raises nothing yet.
    fn prepare() -> Self {
        let current = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        let restore = match current.strip_prefix("{absolute,") {
            Some(rest) => vec![
                "absolute".to_string(),
                rest.trim_end_matches('}').to_string(),
            ],
            None => {
                assert!(
                    current.parse::<f64>().is_ok(),
                    "unexpected watermark {current:?}"
                );
                vec![current]
            }
        };
        Self { restore }
    }

    /// Sets the watermark to 0: the broker raises the alarm as it sets it.
    fn raise(&self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
    }

    /// Restores the watermark and waits until the alarm is gone.
    async fn clear(self) {
        drop(self);
        wait_until(Duration::from_secs(10), "the alarm to clear", || async {
            !memory_alarm_on()
        })
        .await;
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        let mut args = vec!["set_vm_memory_high_watermark"];
        args.extend(self.restore.iter().map(String::as_str));
        match Command::new("rabbitmqctl").args(&args).output() {
            Ok(out) if out.status.success() => {}
            other => eprintln!("RESTORE BY HAND: rabbitmqctl {args:?} failed: {other:?}"),
        }
    }
}

/// A worker with its admin server; returns its `/readyz` URL.
async fn worker(env: &TestEnv) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let app = App::start(env.config.clone(), stop.clone()).await.unwrap();
    let addr = app.admin_addr().expect("the test config sets admin.addr");
    (
        format!("http://{addr}/readyz"),
        stop,
        tokio::spawn(async move { app.run().await.expect("the worker runs") }),
    )
}

async fn readyz(url: &str) -> (u16, String) {
    llmq::install_crypto_provider();
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// `/readyz` answers 503 for the broker's block (not for a connection still being made).
async fn blocked(url: &str) -> bool {
    let (status, body) = readyz(url).await;
    status == 503 && body.contains("memory or disk alarm")
}

/// `n` chat requests `<prefix>-<i>`, published before the alarm.
async fn publish(env: &TestEnv, prefix: &str, n: usize) -> HashSet<String> {
    let mut ids = HashSet::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        env.publish_chat(
            &json!({"prompt": id, "request_id": id}),
            BasicProperties::default(),
        )
        .await;
        ids.insert(id);
    }
    ids
}

/// One upstream call at a time, and a few deliveries prefetched behind it.
fn one_at_a_time(c: &mut llmq::config::Config) {
    c.worker.consumers = 1;
    c.worker.prefetch = 4;
    c.worker.max_inflight = 1;
    c.worker.min_inflight = 1;
}

/// How long the mock takes to answer: time to raise the alarm during the first call.
const LATENCY_MS: u64 = 3000;

/// Starts a worker, publishes three requests and raises the alarm during the first call
/// (one at a time). Its result blocks the publishing connection; the second call took the
/// freed slot before the block was known.
async fn three_requests_and_an_alarm(
    env: &TestEnv,
    prefix: &str,
) -> (
    MemoryAlarm,
    HashSet<String>,
    String,
    CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let alarm = MemoryAlarm::prepare();
    let (url, stop, task) = worker(env).await;
    wait_until(Duration::from_secs(10), "ready", || async {
        readyz(&url).await.0 == 200
    })
    .await;
    let ids = publish(env, prefix, 3).await;
    let stats = env.mock.stats();
    wait_until(Duration::from_secs(10), "the first call", || async {
        stats.in_flight.load(Relaxed) == 1
    })
    .await;
    alarm.raise();
    assert_eq!(
        stats.chat_calls.load(Relaxed),
        1,
        "raised during the first call"
    );
    wait_until(
        Duration::from_secs(10),
        "/readyz 503 while blocked",
        || async { blocked(&url).await },
    )
    .await;
    (alarm, ids, url, stop, task)
}

/// While the broker blocks publishing: `/readyz` says 503, and once the second call is over
/// no third one starts; after the alarm, 200 again and every request is answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_new_upstream_call_and_not_ready_while_the_broker_blocks_publishing() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: LATENCY_MS,
            ..Default::default()
        },
        one_at_a_time,
    )
    .await;
    let (alarm, ids, url, stop, task) = three_requests_and_an_alarm(&env, "held").await;
    let stats = env.mock.stats();
    wait_until(
        Duration::from_secs(10),
        "the second call to end",
        || async { stats.chat_calls.load(Relaxed) == 2 && stats.in_flight.load(Relaxed) == 0 },
    )
    .await;
    let third = tokio::time::timeout(Duration::from_millis(1500), async {
        while stats.chat_calls.load(Relaxed) == 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        third.is_err(),
        "a call started while the broker blocked publishing"
    );
    assert!(blocked(&url).await, "still not ready");
    assert_eq!(
        env.queue_len(&env.config.topology.results_queue).await,
        0,
        "no result gets through the alarm"
    );
    alarm.clear().await;
    wait_until(
        Duration::from_secs(10),
        "/readyz 200 after the alarm",
        || async { readyz(&url).await.0 == 200 },
    )
    .await;
    let (all, ok) = drain_results(&env, 3, Duration::from_secs(30)).await;
    assert_eq!(ok, ids, "every request answered");
    assert_eq!(all.len(), 3, "once each: {all:?}");
    assert_eq!(stats.chat_calls.load(Relaxed), 3, "one call per request");
    stop.cancel();
    task.await.unwrap();
    env.cleanup().await;
}

/// Shutdown on a blocked broker, a result waiting for its confirm, a call running and a
/// request held: the worker ends within its grace plus the hand-back and close bounds, every
/// request is back in its queue, and answered after the alarm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_a_blocked_broker_ends_in_time_and_hands_everything_back() {
    const GRACE: u64 = 2;
    let env = TestEnv::with(
        MockOptions {
            latency_ms: LATENCY_MS,
            ..Default::default()
        },
        |c| {
            one_at_a_time(c);
            c.worker.shutdown_grace_secs = GRACE;
        },
    )
    .await;
    let (alarm, ids, _url, stop, task) = three_requests_and_an_alarm(&env, "stop").await;
    let stats = env.mock.stats();
    // The first call is over. The second starts when its slot frees, unless the broker's
    // block (reported once the first result is published) came first: a race either way
    // is fine, as long as the shutdown hands everything back.
    wait_until(
        Duration::from_secs(10),
        "the second call, or none",
        || async {
            let (calls, running) = (
                stats.chat_calls.load(Relaxed),
                stats.in_flight.load(Relaxed),
            );
            (calls == 2 && running == 1) || (calls == 1 && running == 0)
        },
    )
    .await;
    let started = Instant::now();
    stop.cancel();
    // The grace, the hand-back after it (3 s) and closing the connections (5 s at most).
    let bound = Duration::from_secs(GRACE + 3 + 5);
    tokio::time::timeout(bound, task)
        .await
        .expect("the worker ends within its grace and bounds on a blocked broker")
        .unwrap();
    let took = started.elapsed();
    assert!(took < bound, "{took:?}");
    // Back in the work queue, or in a lane: with one call at once, the third request was
    // over its tenant's share and moved there.
    let topo = &env.config.topology;
    let queues: Vec<String> = std::iter::once(topo.processing_queue.clone())
        .chain(llmq::broker::topology::lanes_of(
            &topo.processing_queue,
            topo.lanes,
        ))
        .collect();
    wait_until(
        Duration::from_secs(5),
        "every request back in its queue",
        || async {
            let mut waiting = 0;
            for q in &queues {
                waiting += env.queue_len(q).await;
            }
            waiting == 3
        },
    )
    .await;
    alarm.clear().await;
    let (url, stop, task) = worker(&env).await;
    wait_until(Duration::from_secs(10), "the next worker ready", || async {
        readyz(&url).await.0 == 200
    })
    .await;
    let (_, ok) = drain_results(&env, 3, Duration::from_secs(40)).await;
    assert_eq!(ok, ids, "every request answered after the alarm");
    stop.cancel();
    task.await.unwrap();
    env.cleanup().await;
}
