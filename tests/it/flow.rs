//! Throughput and flow control against the real broker: AIMD with the prefetch following,
//! the fleet-wide Redis budget, embedding micro-batching.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use crate::helpers::{TestEnv, drain_results, wait_until};
use lapin::BasicProperties;
use llmq::{
    config::SecretUrl,
    tools::mock::{MockOptions, REJECTED_INPUT, mock_embedding},
    worker::Worker,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// The prefetch of every consumer on `queue`, as the broker sees it.
fn broker_prefetch(queue: &str) -> Vec<u32> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_consumers", "-q", "queue_name", "prefetch_count"])
        .output()
        .expect("rabbitmqctl (installed with rabbitmq-server) lists consumers");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut parts = l.split('\t');
            (parts.next()? == queue).then(|| parts.next()?.trim().parse().ok())?
        })
        .collect()
}

/// 429s halve the concurrency limit (down to the floor), the consumers' prefetch follows it,
/// and successes make it climb back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aimd_halves_on_429s_prefetch_follows_and_it_climbs_back() {
    let env = TestEnv::with(
        MockOptions {
            error_rate: 1.0,
            status: 429,
            ..Default::default()
        },
        |c| {
            c.worker.consumers = 2;
            c.worker.prefetch = 0;
            c.worker.max_inflight = 64;
            c.worker.min_inflight = 4;
            c.retry.max_attempts = 1000;
            c.retry.initial_delay_ms = 20;
            c.retry.max_delay_secs = 1;
            c.retry.inline_max_ms = 5000;
        },
    )
    .await;
    let stop = CancellationToken::new();
    let worker = Worker::new(env.config.clone(), stop.clone()).unwrap();
    let flow = worker.router();
    let task = tokio::spawn(worker.run());
    let queue = env.config.topology.processing_queue.clone();
    wait_until(
        Duration::from_secs(10),
        "consumers at the full prefetch",
        || async { broker_prefetch(&queue) == vec![40, 40] },
    )
    .await;
    for i in 0..40 {
        env.publish_chat(
            &json!({"prompt": format!("a-{i}"), "request_id": format!("a-{i}")}),
            BasicProperties::default(),
        )
        .await;
    }
    wait_until(
        Duration::from_secs(15),
        "the limit at its floor",
        || async { flow.limit() == 4 },
    )
    .await;
    wait_until(
        Duration::from_secs(10),
        "the prefetch following the limit",
        || async { broker_prefetch(&queue) == vec![3, 3] },
    )
    .await;
    env.mock.set_options(MockOptions::default());
    let (_, ok) = drain_results(&env, 40, Duration::from_secs(30)).await;
    assert_eq!(
        ok.len(),
        40,
        "everything succeeds once the upstream recovers"
    );
    for i in 0..200 {
        env.publish_chat(
            &json!({"prompt": format!("b-{i}"), "request_id": format!("b-{i}")}),
            BasicProperties::default(),
        )
        .await;
    }
    let (_, ok) = drain_results(&env, 200, Duration::from_secs(30)).await;
    assert_eq!(ok.len(), 200);
    assert!(
        flow.limit() > 4,
        "successes raise the limit again: {}",
        flow.limit()
    );
    stop.cancel();
    task.await.unwrap().unwrap();
    env.cleanup().await;
}

/// Two workers sharing `limits.redis_url` share one budget: with 20 requests per minute, the
/// fleet sends about 20 in the first seconds, not 20 per worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_redis_budget_holds_across_two_workers() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.llm.max_requests_per_minute = 20;
        c.limits.redis_url = SecretUrl::new(
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        );
        c.limits.key_prefix = format!("{}:limits", c.idempotency.key_prefix);
    })
    .await;
    let stop = CancellationToken::new();
    let (a, b) = (
        Worker::new(env.config.clone(), stop.clone()).unwrap(),
        Worker::new(env.config.clone(), stop.clone()).unwrap(),
    );
    let flows = [a.router(), b.router()];
    let tasks = [tokio::spawn(a.run()), tokio::spawn(b.run())];
    for i in 0..40 {
        env.publish_chat(
            &json!({"prompt": format!("r-{i}"), "request_id": format!("r-{i}")}),
            BasicProperties::default(),
        )
        .await;
    }
    let start = Instant::now();
    // The burst spends the budget; then every other request is held by it: waiting for the
    // budget, holding no slot, no call made (the mock answers at once), whichever worker
    // took the request.
    wait_until(
        Duration::from_secs(10),
        "the rest held by the budget",
        || async {
            let calls = env.mock.stats().chat_calls.load(Ordering::Relaxed) as usize;
            let held: usize = flows.iter().map(|f| f.waiting()).sum();
            let slots: usize = flows.iter().map(|f| f.in_flight()).sum();
            calls >= 20 && calls + held >= 40 && slots == 0
        },
    )
    .await;
    let calls = env.mock.stats().chat_calls.load(Ordering::Relaxed);
    let allowed = 20 + (start.elapsed().as_secs_f64() / 3.0).ceil() as u64;
    assert!(
        calls <= allowed,
        "{calls} calls with a fleet budget allowing {allowed}"
    );
    stop.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    crate::helpers::delete_redis_keys(&env.config.limits.key_prefix).await;
    env.cleanup().await;
}

/// N queued embedding requests go upstream in ceil(N / max_items) calls, and every message
/// gets its own result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_batched() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.worker.consumers = 1;
        c.worker.prefetch = 100;
        c.batch.max_items = 16;
        c.batch.max_wait_ms = 300;
    })
    .await;
    const N: usize = 50;
    let key = env.config.topology.embeddings_key.clone();
    for i in 0..N {
        let body = json!({"kind": "embedding", "input": format!("text-{i}"), "request_id": format!("e-{i}")});
        env.publish(
            &key,
            body.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let worker = env.start_worker();
    let results = env.results(N).await;
    for (_, r) in &results {
        assert_eq!(r["status"], "ok", "{r}");
        let i: usize = r["request_id"].as_str().unwrap()[2..].parse().unwrap();
        let v: Vec<f32> = serde_json::from_value(r["embedding"].clone()).unwrap();
        assert_eq!(
            v,
            mock_embedding(&format!("text-{i}")),
            "each gets its own vector"
        );
    }
    assert_eq!(
        env.mock.stats().embedding_calls.load(Ordering::Relaxed),
        N.div_ceil(16) as u64
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// One bad input in a batch fails only its own message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_input_fails_alone_in_its_batch() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.worker.consumers = 1;
        c.worker.prefetch = 20;
        c.batch.max_items = 8;
        c.batch.max_wait_ms = 300;
    })
    .await;
    let key = env.config.topology.embeddings_key.clone();
    for i in 0..8 {
        let input = if i == 3 {
            REJECTED_INPUT.to_string()
        } else {
            format!("t-{i}")
        };
        let body = json!({"kind": "embedding", "input": input, "request_id": format!("b-{i}")});
        env.publish(
            &key,
            body.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let worker = env.start_worker();
    let results = env.results(8).await;
    for (_, r) in &results {
        let expected = if r["request_id"] == "b-3" {
            "error"
        } else {
            "ok"
        };
        assert_eq!(r["status"], expected, "{r}");
    }
    let dead = env.dead_letters(1).await;
    assert_eq!(dead[0].properties.message_id(), &None);
    assert!(String::from_utf8_lossy(&dead[0].data).contains(REJECTED_INPUT));
    worker.stop().await.unwrap();
    env.cleanup().await;
}
