//! Cancellation: `{"cancel": "<request_id>"}` on the control exchange aborts a request in
//! flight and answers `cancelled`; a request still queued is answered `cancelled` when it
//! is reached, with no call; a cancel from another identity cancels nothing.

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use crate::helpers::{TestEnv, delete_redis_keys, wait_until};
use lapin::{BasicProperties, options::BasicPublishOptions};
use llmq::{
    app::App,
    tools::{client, mock::MockOptions},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

async fn one_result(env: &TestEnv) -> Value {
    let q = env.config.topology.results_queue.clone();
    let d = env.take(&q, 1, Duration::from_secs(30)).await;
    crate::helpers::json(&d[0].data)
}

/// Sends a cancel as AMQP user `user_id` (the test connection's own user may be named).
async fn cancel_as(env: &TestEnv, request_id: &str, user_id: &str) {
    let confirm = env
        .channel
        .basic_publish(
            env.config.topology.control_exchange.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            json!({ "cancel": request_id }).to_string().as_bytes(),
            BasicProperties::default().with_user_id(user_id.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_in_flight_and_waiting_requests() {
    // One call at a time: a second request waits in the worker (for the slot) or in its
    // queue while the first one runs.
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.worker.max_inflight = 1;
        c.worker.min_inflight = 1;
    })
    .await;
    let worker = env.start_worker();
    // Once a request is answered, the worker consumes, and its control queue is bound.
    env.publish_chat(
        &json!({"request_id": "warm", "prompt": "x"}),
        BasicProperties::default(),
    )
    .await;
    assert_eq!(one_result(&env).await["status"], "ok");

    env.mock.set_options(MockOptions {
        latency_ms: 30_000,
        ..MockOptions::default()
    });
    env.publish_chat(
        &json!({"request_id": "running", "prompt": "x"}),
        BasicProperties::default(),
    )
    .await;
    let in_flight = || env.mock.stats().in_flight.load(Relaxed);
    wait_until(Duration::from_secs(10), "the call is running", || async {
        in_flight() == 1
    })
    .await;
    env.publish_chat(
        &json!({"request_id": "waiting", "prompt": "x"}),
        BasicProperties::default(),
    )
    .await;
    let calls = env.chat_calls();
    // A cancel from another identity (the connection's own user; the request has none),
    // then one for the waiting request: the control queue is read in order, so once the
    // second has worked, the first has been heard.
    cancel_as(&env, "running", "llmq").await;
    client::cancel(&env.config, "waiting").await.unwrap();
    let r = one_result(&env).await;
    assert_eq!(
        (&r["request_id"], &r["status"]),
        (&json!("waiting"), &json!("cancelled")),
        "{r}"
    );
    assert_eq!(
        in_flight(),
        1,
        "another identity's cancel left the running call alone"
    );
    assert_eq!(
        env.chat_calls(),
        calls,
        "the waiting request was never called"
    );

    client::cancel(&env.config, "running").await.unwrap();
    let r = one_result(&env).await;
    assert_eq!(
        (&r["request_id"], &r["status"]),
        (&json!("running"), &json!("cancelled")),
        "{r}"
    );
    wait_until(
        Duration::from_secs(10),
        "the HTTP call is aborted",
        || async { in_flight() == 0 },
    )
    .await;
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0,
        "not dead-lettered"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// With the Redis store, a cancel one replica heard waits in Redis: a replica started
/// after it answers the request `cancelled` without a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_redis_store_a_cancel_reaches_replicas_started_later() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.idempotency.store = llmq::config::StoreKind::Redis;
    })
    .await;
    let first = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "warm", "prompt": "x"}),
        BasicProperties::default(),
    )
    .await;
    assert_eq!(one_result(&env).await["status"], "ok");
    client::cancel(&env.config, "later").await.unwrap();
    let redis_url = env.config.idempotency.redis_url.expose().to_string();
    let key = format!("{}:cancels:anonymous", env.config.idempotency.key_prefix);
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    wait_until(Duration::from_secs(10), "the tombstone in Redis", || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move {
            redis::cmd("ZSCORE")
                .arg(&key)
                .arg("later")
                .query_async::<Option<f64>>(&mut conn)
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;
    first.stop().await.unwrap();

    let second = env.start_worker();
    let calls = env.chat_calls();
    env.publish_chat(
        &json!({"request_id": "later", "prompt": "x"}),
        BasicProperties::default(),
    )
    .await;
    assert_eq!(one_result(&env).await["status"], "cancelled");
    assert_eq!(env.chat_calls(), calls, "no call");
    second.stop().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    env.cleanup().await;
}

/// The worker's `/metrics` text.
async fn metrics(base: &str) -> String {
    llmq::install_crypto_provider();
    let r = reqwest::get(format!("{base}/metrics")).await.unwrap();
    r.text().await.unwrap()
}

/// With the Redis store, one publisher floods the control exchange with 500 cancels of ids
/// that never come: its first `worker.max_cancels_per_identity` (50) are kept, in one
/// sorted set in Redis that expires within `worker.cancel_ttl_secs`; the other 450 are
/// dropped and counted in `llmq_cancels_dropped_total{reason="full"}`. A kept cancel still
/// works, and another identity's cancels are not crowded out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_cancels_leaves_at_most_the_cap_in_redis_and_counts_the_rest() {
    const FLOOD: usize = 500;
    const CAP: u64 = 50;
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.idempotency.store = llmq::config::StoreKind::Redis;
        c.worker.cancels_per_minute = 0;
        c.worker.max_cancels_per_identity = CAP;
        c.worker.cancel_ttl_secs = 120;
    })
    .await;
    let stop = CancellationToken::new();
    let app = App::start(env.config.clone(), stop.clone()).await.unwrap();
    let base = format!("http://{}", app.admin_addr().expect("an admin address"));
    let task = tokio::spawn(async move { app.run().await.expect("the worker runs") });
    // Once a request is answered, the worker consumes, and its control queue is bound.
    env.publish_chat(
        &json!({"request_id": "warm", "prompt": "x"}),
        BasicProperties::default(),
    )
    .await;
    assert_eq!(one_result(&env).await["status"], "ok");

    for i in 0..FLOOD {
        cancel_as(&env, &format!("flood-{i}"), "llmq").await;
    }
    client::cancel(&env.config, "anon-1").await.unwrap();
    let dropped = format!(
        "llmq_cancels_dropped_total{{reason=\"full\"}} {}",
        FLOOD as u64 - CAP
    );
    wait_until(Duration::from_secs(20), "the drops counted", || async {
        metrics(&base).await.lines().any(|l| l == dropped)
    })
    .await;

    let prefix = env.config.idempotency.key_prefix.clone();
    let redis_url = env.config.idempotency.redis_url.expose().to_string();
    let redis = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let flooder = format!("{prefix}:cancels:llmq");
    let anonymous = format!("{prefix}:cancels:anonymous");
    wait_until(Duration::from_secs(10), "the cancels kept in Redis", || {
        let (mut conn, anonymous) = (conn.clone(), anonymous.clone());
        async move {
            redis::cmd("ZCARD")
                .arg(&anonymous)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
                == 1
        }
    })
    .await;
    let kept: u64 = redis::cmd("ZCARD")
        .arg(&flooder)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(kept, CAP, "the cap, and no more");
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.retain(|k| k.contains(":cancel"));
    keys.sort();
    assert_eq!(
        keys,
        [anonymous.clone(), flooder.clone()],
        "one key per identity"
    );
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&flooder)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        (1..=120_000).contains(&ttl_ms),
        "expires within the TTL: {ttl_ms} ms"
    );

    // A kept cancel works; one past the cap does not; the other identity's works.
    let calls = env.chat_calls();
    for (id, user) in [
        ("flood-0", Some("llmq")),
        ("flood-499", Some("llmq")),
        ("anon-1", None),
    ] {
        let props = match user {
            Some(user) => BasicProperties::default().with_user_id(user.into()),
            None => BasicProperties::default(),
        };
        env.publish_chat(&json!({"request_id": id, "prompt": "x"}), props)
            .await;
        let r = one_result(&env).await;
        let expected = if id == "flood-499" { "ok" } else { "cancelled" };
        assert_eq!(
            (&r["request_id"], &r["status"]),
            (&json!(id), &json!(expected)),
            "{r}"
        );
    }
    assert_eq!(
        env.chat_calls(),
        calls + 1,
        "only the one past the cap was called"
    );
    stop.cancel();
    task.await.unwrap();
    delete_redis_keys(&prefix).await;
    env.cleanup().await;
}
