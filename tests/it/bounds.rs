//! Bounds on what the upstream side may cost, against the real broker: a refused request
//! gives its token estimate back, an oversize answer is refused, a delivery never waits in
//! the worker past half of the broker's consumer timeout, and a blackholed Redis costs every
//! waiting delivery one connect timeout at once.

use std::time::{Duration, Instant};

use crate::helpers::{TestEnv, drain_results, header, wait_until};
use lapin::BasicProperties;
use llmq::{
    config::{Config, SecretUrl, StoreKind},
    tools::mock::MockOptions,
    upstream::routing::out::MAX_MODELS_OUT,
    worker::Worker,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The scenario: with a 100k TPM budget, one request estimated at twice the budget
/// is refused by the upstream; the 50 ordinary requests after it are all answered at once,
/// because the refused call gave its estimate back.
async fn a_refused_huge_estimate_leaves_the_budget_whole(adjust: impl FnOnce(&mut Config)) {
    let env = TestEnv::with(
        MockOptions {
            max_prompt_bytes: Some(100_000),
            ..Default::default()
        },
        |c| {
            c.llm.max_tokens_per_minute = 100_000;
            adjust(c);
        },
    )
    .await;
    let worker = env.start_worker();
    // 800 000 characters: an estimate of 200 256 tokens, within worker.max_body_bytes.
    env.publish_chat(
        &json!({"prompt": "x".repeat(800_000), "request_id": "huge"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("upstream_permanent")
    );
    assert_eq!(env.chat_calls(), 1, "refused at once, not retried");
    let started = Instant::now();
    for i in 0..50 {
        env.publish_chat(
            &json!({"prompt": format!("small-{i}"), "request_id": format!("small-{i}")}),
            BasicProperties::default(),
        )
        .await;
    }
    let (all, ok) = drain_results(&env, 50, Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert_eq!(
        ok.len(),
        50,
        "answered within 20 s: {} in {took:?}",
        ok.len()
    );
    assert_eq!(all.len(), 51, "50 answers and the refused request's error");
    assert_eq!(
        all.iter()
            .filter(|r| r["status"] == "error" && r["request_id"] == "huge")
            .count(),
        1
    );
    assert_eq!(env.chat_calls(), 51);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_huge_estimate_leaves_the_local_token_budget_whole() {
    a_refused_huge_estimate_leaves_the_budget_whole(|_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_huge_estimate_leaves_the_shared_token_budget_whole() {
    let prefix = crate::helpers::unique("limits");
    let budget_prefix = prefix.clone();
    a_refused_huge_estimate_leaves_the_budget_whole(move |c| {
        c.limits.redis_url = SecretUrl::new(redis_url());
        c.limits.key_prefix = budget_prefix;
    })
    .await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: u32 = redis::cmd("DEL")
        .arg(format!("{prefix}:tokens"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the budget lived in Redis");
    crate::helpers::delete_redis_keys(&prefix).await;
}

/// An answer larger than `llm.max_response_bytes` is cut off as it streams in (the mock's
/// is a terabyte) and the request dead-lettered without retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_max_response_bytes_is_dead_lettered() {
    let env = TestEnv::with(
        MockOptions {
            response_bytes: 1 << 40,
            ..Default::default()
        },
        |c| c.llm.max_response_bytes = 1 << 20,
    )
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "say a lot", "request_id": "big-answer"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("upstream_permanent")
    );
    assert_eq!(
        header(&dead[0], "x-error").as_deref(),
        Some(
            "permanent upstream failure: upstream answer larger than llm.max_response_bytes \
             (1048576 bytes); not read further"
        )
    );
    let (_, error) = &env.results(1).await[0];
    assert_eq!(error["status"], "error");
    assert_eq!(error["error"]["kind"], "upstream_permanent");
    assert_eq!(error["attempts"], 1);
    assert_eq!(env.chat_calls(), 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// Publishes the `i`-th priority-9 request.
async fn publish_high(env: &TestEnv, i: usize) {
    env.publish_chat(
        &json!({"prompt": format!("high-{i}"), "request_id": format!("high-{i}")}),
        BasicProperties::default().with_priority(9),
    )
    .await;
}

/// One slot, steady high-priority traffic (one call running, the next always queued): the
/// low-priority delivery behind it is handed to the retry queue once it has waited half of
/// `amqp.consumer_timeout_secs`, and that hand-off is not an attempt: it is answered later at
/// its first attempt. No high-priority delivery, each waiting one call at most, is handed off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_stuck_behind_higher_priorities_goes_to_the_retry_queue_uncounted() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 1000,
            record_prompts: true,
            ..Default::default()
        },
        |c| {
            c.amqp.consumer_timeout_secs = 6;
            c.llm.timeout_secs = 2;
            c.retry.inline_max_ms = 400;
            c.worker.max_inflight = 1;
            c.worker.min_inflight = 1;
        },
    )
    .await;
    assert_eq!(env.config.validate(), Vec::<String>::new());
    let stop = CancellationToken::new();
    let worker = Worker::new(env.config.clone(), stop.clone()).unwrap();
    let flow = worker.router();
    let task = tokio::spawn(worker.run());
    publish_high(&env, 0).await;
    wait_until(Duration::from_secs(10), "high-0 in its call", || async {
        flow.in_flight() == 1
    })
    .await;
    env.publish_chat(
        &json!({"prompt": "low", "request_id": "low"}),
        BasicProperties::default().with_priority(0),
    )
    .await;
    publish_high(&env, 1).await;
    let mut highs = 2;
    // Each time the last high-priority request starts its call, the next one is queued
    // behind it, until the low-priority one is handed off.
    let tier = llmq::broker::topology::retry_queue(&env.config.topology, "5s");
    loop {
        wait_until(
            Duration::from_secs(5),
            "the last high in its call",
            || async { env.chat_calls() >= highs as u64 },
        )
        .await;
        if env.queue_len(&tier).await == 1 {
            break;
        }
        let low_called = env
            .mock
            .stats()
            .prompts
            .lock()
            .unwrap()
            .iter()
            .any(|(p, _)| p == "low");
        assert!(
            !low_called,
            "the low-priority request got a slot after {highs} high ones"
        );
        assert!(highs < 20, "the low-priority request was never handed off");
        publish_high(&env, highs).await;
        highs += 1;
    }
    let (all, ok) = drain_results(&env, highs + 1, Duration::from_secs(30)).await;
    assert_eq!(ok.len(), highs + 1);
    assert_eq!(all.len(), highs + 1);
    for r in &all {
        assert_eq!(r["attempts"], 1, "the hand-off was no attempt: {r}");
    }
    let calls: Vec<String> = env
        .mock
        .stats()
        .prompts
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    let mut expected: Vec<String> = (0..highs).map(|i| format!("high-{i}")).collect();
    expected.push("low".into());
    assert_eq!(calls, expected, "one call each, the low one last");
    stop.cancel();
    task.await.unwrap().unwrap();
    env.cleanup().await;
}

/// A Redis that accepts connections and never answers: every request waiting on the
/// idempotency store fails within one connect timeout, all together, and waits in the retry
/// queue (`on_store_error = requeue`); nothing is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_redis_parks_every_request_within_one_connect_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let blackhole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.idempotency.store = StoreKind::Redis;
        c.idempotency.redis_url = SecretUrl::new(format!("redis://{addr}"));
    })
    .await;
    let worker = env.start_worker();
    const N: usize = 20;
    let started = Instant::now();
    for i in 0..N {
        env.publish_chat(
            &json!({"prompt": format!("bh-{i}"), "request_id": format!("bh-{i}")}),
            BasicProperties::default(),
        )
        .await;
    }
    // One 2 s connect timeout shared by all; one at a time, the last would park after 40 s,
    // long after the first left the 5 s tier.
    let tier = llmq::broker::topology::retry_queue(&env.config.topology, "5s");
    wait_until(
        Duration::from_secs(4),
        "all requests parked in the retry queue at once",
        || async { env.queue_len(&tier).await == N as u32 },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(env.chat_calls(), 0);
    worker.stop().await.unwrap();
    env.cleanup().await;
    blackhole.abort();
}

/// Read-through item 4: a tenant naming one made-up model after another, each answered 404
/// by a deployment that serves any model, holds that deployment out of each name for
/// `routing.auth_cooldown_secs`. The deployment's hash in Redis, which every replica reads
/// each second, keeps the latest [`MAX_MODELS_OUT`] of them, not one field per name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_model_names_leave_the_fleet_s_standing_bounded() {
    const NAMES: usize = MAX_MODELS_OUT + 36;
    let prefix = crate::helpers::unique("limits");
    let env = TestEnv::with(
        MockOptions {
            models: vec!["real".into()],
            ..Default::default()
        },
        |c| {
            c.limits.redis_url = SecretUrl::new(redis_url());
            c.limits.key_prefix = prefix.clone();
        },
    )
    .await;
    let worker = env.start_worker();
    // One at a time: each refusal is written before the next request is published.
    for i in 0..NAMES {
        env.publish_chat(
            &json!({"request_id": format!("r-{i}"), "prompt": "hi", "model": format!("made-up-{i}")}),
            BasicProperties::default(),
        )
        .await;
        let dead = env.dead_letters(1).await;
        assert!(
            header(&dead[0], "x-error")
                .is_some_and(|e| e.contains(&format!("made-up-{i}")) || e.contains("404")),
            "{:?}",
            header(&dead[0], "x-error")
        );
    }
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = llmq::store::keys::upstream(&prefix, "default");
    let last = format!("refused:made-up-{}", NAMES - 1);
    let hkeys = |conn: redis::aio::MultiplexedConnection, key: String| async move {
        let mut conn = conn;
        redis::cmd("HKEYS")
            .arg(&key)
            .query_async::<Vec<String>>(&mut conn)
            .await
            .unwrap()
    };
    wait_until(Duration::from_secs(10), "the last refusal in Redis", || {
        let fields = hkeys(conn.clone(), key.clone());
        let last = last.clone();
        async move { fields.await.contains(&last) }
    })
    .await;
    let fields = hkeys(conn.clone(), key.clone()).await;
    worker.stop().await.unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    crate::helpers::delete_redis_keys(&prefix).await;
    assert_eq!(
        fields.len(),
        MAX_MODELS_OUT,
        "{NAMES} made-up names, one field each? {fields:?}"
    );
    env.cleanup().await;
}

/// Read-through item 12: Alice's requests each ask for 4000 tokens four times (`n`), an
/// estimate beyond the deployment's whole per-minute token budget (6000); Bob's ask for ten.
/// Twenty of hers are queued before his ten. Her first is charged the minute's budget and
/// runs; the rest of hers wait for their minute without a slot, while Bob's are paid from
/// what refills (a hundred tokens a second) and start at once. Before, her first drove the
/// budget a minute into debt, every call waited it out holding its slot, and whoever polled
/// the budget first when it came back took it: Bob's calls came one every few seconds, each
/// after one of hers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_s_huge_estimates_do_not_stall_another_s_small_calls() {
    const ALICE: usize = 20;
    const BOB: usize = 10;
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 1000,
            record_prompts: true,
            ..Default::default()
        },
        |c| {
            c.llm.max_tokens_per_minute = 6000;
            c.tenancy.header = "x-tenant".into();
            c.worker.max_inflight = 16;
            c.worker.min_inflight = 16;
        },
    )
    .await;
    let ask = |tenant: &'static str, n: usize, max_tokens: u64, choices: u64| {
        let body = json!({
            "request_id": format!("{tenant}-{n}"),
            "prompt": format!("{tenant}-{n}"),
            "params": {"max_tokens": max_tokens, "n": choices},
        });
        let headers = lapin::types::FieldTable::from(std::collections::BTreeMap::from([(
            "x-tenant".into(),
            lapin::types::AMQPValue::LongString(tenant.into()),
        )]));
        (body, BasicProperties::default().with_headers(headers))
    };
    for n in 0..ALICE {
        let (body, props) = ask("alice", n, 4000, 4);
        env.publish_chat(&body, props).await;
    }
    for n in 0..BOB {
        let (body, props) = ask("bob", n, 10, 1);
        env.publish_chat(&body, props).await;
    }
    let worker = env.start_worker();
    let started = || -> Vec<String> {
        let prompts = env.mock.stats().prompts.lock().unwrap();
        prompts.iter().map(|(p, _)| p.clone()).collect()
    };
    wait_until(
        Duration::from_secs(45),
        "every one of Bob's calls started",
        || {
            let bob = started().iter().filter(|p| p.starts_with("bob-")).count();
            async move { bob == BOB }
        },
    )
    .await;
    let started = started();
    let bob_last = started
        .iter()
        .rposition(|p| p.starts_with("bob-"))
        .expect("Bob's calls");
    let alice_before = started[..bob_last]
        .iter()
        .filter(|p| p.starts_with("alice-"))
        .count();
    // Her first; her second only if her first's answer gave its unused estimate back while
    // one of Bob's was still on its way to the line.
    assert!(
        alice_before <= 2,
        "{alice_before} of Alice's calls started before Bob's last: {started:?}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}
