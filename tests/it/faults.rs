//! Fault tests against the real broker: killed workers, a cut connection, rate limits,
//! failing and hanging upstreams, bad input, duplicates, shutdown, secrets.

use std::{
    collections::HashMap,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use crate::helpers::{
    TestEnv, amqp_url_via, broker_addr, drain_results, header, signal, spawn_worker_process,
    wait_until,
};
use lapin::{BasicProperties, options::QueueDeleteOptions};
use llmq::{
    config::{QueueType, SecretUrl, StoreKind},
    tools::mock::MockOptions,
};
use serde_json::json;

/// Publishes `n` chat requests, `<prefix>-<i>` their prompt and request id.
pub(crate) async fn publish_many(env: &TestEnv, prefix: &str, n: usize) {
    for i in 0..n {
        env.publish_chat(
            &json!({"prompt": format!("{prefix}-{i}"), "request_id": format!("{prefix}-{i}")}),
            BasicProperties::default(),
        )
        .await;
    }
}

/// SIGKILL a worker holding 50+ requests in flight; another worker finishes everything:
/// one ok result per request_id, nothing lost, upstream duplicates bounded by what was in
/// flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_requests_in_flight_loses_nothing() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 1500,
            ..Default::default()
        },
        |c| {
            c.worker.consumers = 2;
            c.worker.prefetch = 40;
        },
    )
    .await;
    const N: usize = 100;
    publish_many(&env, "kill", N).await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = spawn_worker_process(&env.config, &dir.path().join("first.log"));
    wait_until(Duration::from_secs(20), "50 requests in flight", || async {
        env.chat_calls() >= 50
    })
    .await;
    signal(&first.child, "KILL");
    first.child.wait().await.unwrap();
    // At 1.5 s per call nothing has finished yet, so every call made so far was in flight.
    assert_eq!(
        env.queue_len(&env.config.topology.results_queue).await,
        0,
        "no call finished before the kill"
    );
    let in_flight_at_kill = env.chat_calls();
    env.mock.set_options(MockOptions {
        latency_ms: 20,
        ..Default::default()
    });
    let second = env.start_worker();
    let (_, ok) = drain_results(&env, N, Duration::from_secs(60)).await;
    assert_eq!(ok.len(), N, "every request got an ok result");
    second.stop().await.unwrap();
    let calls = env.chat_calls();
    assert!(
        (N as u64..=N as u64 + in_flight_at_kill).contains(&calls),
        "{calls} upstream calls for {N} requests with {in_flight_at_kill} in flight at the kill"
    );
    assert_eq!(
        env.queue_len(&env.config.topology.processing_queue).await,
        0
    );
    env.cleanup().await;
}

/// The broker connection is cut for 5 s mid-load; the worker reconnects by itself and every
/// request gets its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_connection_cut_for_5s_loses_nothing() {
    let proxy = crate::helpers::Proxy::start(broker_addr()).await;
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 30,
            ..Default::default()
        },
        |c| c.amqp.url = Some(SecretUrl::new(amqp_url_via(proxy.addr))),
    )
    .await;
    const N: usize = 200;
    let worker = env.start_worker();
    publish_many(&env, "cut", N).await;
    wait_until(Duration::from_secs(20), "some progress", || async {
        env.chat_calls() >= 20
    })
    .await;
    proxy.cut_for(Duration::from_secs(5)).await;
    let (_, ok) = drain_results(&env, N, Duration::from_secs(60)).await;
    assert_eq!(
        ok.len(),
        N,
        "every request got an ok result after the outage"
    );
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&env.config.topology.processing_queue).await,
        0
    );
    env.cleanup().await;
}

/// 30% of calls answer 429 with `Retry-After: 1`: every request succeeds, and no retry of a
/// request came sooner than one second after the 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_upstream_with_retry_after() {
    let env = TestEnv::with(
        MockOptions {
            error_rate: 0.3,
            status: 429,
            retry_after: Some(1),
            record_prompts: true,
            ..Default::default()
        },
        |c| c.retry.max_attempts = 10,
    )
    .await;
    const N: usize = 30;
    let worker = env.start_worker();
    publish_many(&env, "rl", N).await;
    let (_, ok) = drain_results(&env, N, Duration::from_secs(60)).await;
    assert_eq!(ok.len(), N);
    worker.stop().await.unwrap();
    assert!(
        env.mock.stats().failures.load(Ordering::Relaxed) >= 5,
        "429s were injected"
    );
    let mut calls: HashMap<String, Vec<Instant>> = HashMap::new();
    for (prompt, at) in env.mock.stats().prompts.lock().unwrap().iter() {
        calls.entry(prompt.clone()).or_default().push(*at);
    }
    let mut retried = 0;
    for (prompt, times) in calls {
        for pair in times.windows(2) {
            retried += 1;
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_secs(1),
                "{prompt} retried after {gap:?}"
            );
        }
    }
    assert!(retried >= 5, "some requests were retried");
    env.cleanup().await;
}

/// A wait longer than `retry.inline_max_ms` goes through the durable retry queue: the
/// request leaves the worker, comes back after its delay with its attempt count, and ends in
/// the DLQ after `max_attempts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_waits_go_through_the_retry_queue() {
    let env = TestEnv::with(
        MockOptions {
            error_rate: 1.0,
            status: 503,
            retry_after: Some(2),
            record_prompts: true,
            ..Default::default()
        },
        |c| {
            c.retry.max_attempts = 3;
            c.retry.inline_max_ms = 500;
        },
    )
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "slow", "request_id": "rq-1"}),
        BasicProperties::default(),
    )
    .await;
    let tier = llmq::broker::topology::retry_queue(&env.config.topology, "5s");
    wait_until(
        Duration::from_secs(10),
        "the request in the retry queue",
        || async { env.queue_len(&tier).await == 1 },
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("retries_exhausted")
    );
    let attempts = llmq::contract::headers::get_u32(&dead[0].properties, "x-attempts");
    assert_eq!(attempts, Some(3));
    assert_eq!(env.chat_calls(), 3, "exactly max_attempts upstream calls");
    let times: Vec<Instant> = env
        .mock
        .stats()
        .prompts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| *t)
        .collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_secs(2),
            "Retry-After honoured: {:?}",
            pair[1] - pair[0]
        );
    }
    let (_, error) = &env.results(1).await[0];
    assert_eq!(error["status"], "error");
    assert_eq!(error["error"]["kind"], "retries_exhausted");
    assert_eq!(error["attempts"], 3);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// An upstream that never answers: the timeout fires, the request is retried, attempts stay
/// bounded, and it ends in the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_upstream_times_out_and_attempts_stay_bounded() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 60_000,
            ..Default::default()
        },
        |c| {
            c.llm.timeout_secs = 1;
            c.retry.max_attempts = 2;
        },
    )
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "hang", "request_id": "hang-1"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("retries_exhausted")
    );
    assert!(header(&dead[0], "x-error").unwrap().contains("timed out"));
    assert_eq!(env.chat_calls(), 2);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// Every kind of bad input goes to the DLQ with a precise reason; the worker keeps going and
/// the next valid message succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_dead_lettered_with_its_reason() {
    let env = TestEnv::with(MockOptions::default(), |c| c.worker.max_body_bytes = 4096).await;
    let worker = env.start_worker();
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let json_ct = || BasicProperties::default().with_content_type("application/json".into());
    let cases: Vec<(&str, Vec<u8>, BasicProperties, &str, &str)> = vec![
        (
            "bad-json",
            b"{\"prompt\": \n oops}".to_vec(),
            json_ct(),
            "invalid_request",
            "line 2 column",
        ),
        (
            "empty",
            b"".to_vec(),
            json_ct(),
            "invalid_request",
            "empty body",
        ),
        (
            "not-utf8",
            b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
            json_ct(),
            "invalid_request",
            "not UTF-8",
        ),
        (
            "not-object",
            b"[1, 2, 3]".to_vec(),
            json_ct(),
            "invalid_request",
            "must be a JSON object",
        ),
        (
            "missing",
            b"{\"timestamp\": 1}".to_vec(),
            json_ct(),
            "invalid_request",
            "missing `prompt`",
        ),
        (
            "wrong-type",
            b"{\"prompt\": 42}".to_vec(),
            json_ct(),
            "invalid_request",
            "field `prompt`",
        ),
        (
            "unknown-kind",
            b"{\"kind\": \"image\", \"prompt\": \"x\"}".to_vec(),
            json_ct(),
            "invalid_request",
            "unknown kind",
        ),
        (
            "bad-role",
            b"{\"messages\": [{\"role\": \"wizard\", \"content\": \"x\"}]}".to_vec(),
            json_ct(),
            "invalid_request",
            "messages[0].role",
        ),
        (
            "deep",
            deep.into_bytes(),
            json_ct(),
            "invalid_request",
            "recursion limit",
        ),
        (
            "too-large",
            vec![b' '; 5000],
            json_ct(),
            "too_large",
            "max_body_bytes",
        ),
        (
            "text-plain",
            b"{\"prompt\": \"x\"}".to_vec(),
            BasicProperties::default().with_content_type("text/plain".into()),
            "invalid_request",
            "not JSON",
        ),
    ];
    let key = env.config.topology.processing_key.clone();
    for (id, body, props, _, _) in &cases {
        env.publish(&key, body, props.clone().with_message_id((*id).into()))
            .await;
    }
    env.publish_chat(
        &json!({"prompt": "fine", "request_id": "after-bad"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(cases.len()).await;
    let by_id: HashMap<String, &lapin::message::Delivery> = dead
        .iter()
        .map(|d| (d.properties.message_id().as_ref().unwrap().to_string(), d))
        .collect();
    for (id, body, _, kind, reason) in &cases {
        let d = by_id
            .get(*id)
            .unwrap_or_else(|| panic!("{id} dead-lettered"));
        assert_eq!(&d.data, body, "{id}: body unchanged");
        assert_eq!(header(d, "x-error-kind").as_deref(), Some(*kind), "{id}");
        let got = header(d, "x-error").unwrap();
        assert!(got.contains(reason), "{id}: {got}");
    }
    let (_, ok) = drain_results(&env, 1, Duration::from_secs(30)).await;
    assert!(ok.contains("after-bad"), "the next valid message succeeds");
    assert_eq!(env.chat_calls(), 1, "no bad input reached the upstream");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A duplicate of a finished request (same request_id) gets the stored result again with no
/// second upstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_absorbed_by_request_id() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    let body = json!({"prompt": "once", "request_id": "dup-1"});
    env.publish_chat(&body, BasicProperties::default()).await;
    let first = env.results(1).await;
    env.publish_chat(
        &body,
        BasicProperties::default().with_correlation_id("second".into()),
    )
    .await;
    let second = env.results(1).await;
    assert_eq!(first[0].1["content"], second[0].1["content"]);
    assert_eq!(
        second[0].0.correlation_id().as_ref().unwrap().as_str(),
        "second"
    );
    assert_eq!(env.chat_calls(), 1, "one upstream call for two copies");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// With the Redis store, two workers share the dedupe: a request published twice, with both
/// workers consuming, is sent upstream once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_deduplicates_across_workers() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 300,
            ..Default::default()
        },
        |c| c.idempotency.store = StoreKind::Redis,
    )
    .await;
    let a = env.start_worker();
    let b = env.start_worker();
    for _ in 0..2 {
        env.publish_chat(
            &json!({"prompt": "shared", "request_id": "redis-dup"}),
            BasicProperties::default(),
        )
        .await;
    }
    let results = env.results(2).await;
    assert!(
        results
            .iter()
            .all(|(_, r)| r["status"] == "ok" && r["request_id"] == "redis-dup")
    );
    assert_eq!(env.chat_calls(), 1, "one upstream call across the fleet");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    env.cleanup().await;
}

/// Redis unreachable: nothing is processed without dedupe, nothing is lost (the request
/// waits in the retry queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_keeps_requests() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.idempotency.store = StoreKind::Redis;
        c.idempotency.redis_url = SecretUrl::new("redis://:canary-pw@127.0.0.1:1");
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "wait", "request_id": "no-redis"}),
        BasicProperties::default(),
    )
    .await;
    let tier = llmq::broker::topology::retry_queue(&env.config.topology, "5s");
    wait_until(
        Duration::from_secs(15),
        "the request parked in the retry queue",
        || async { env.queue_len(&tier).await == 1 },
    )
    .await;
    assert_eq!(env.chat_calls(), 0);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// Redis stays unreachable: a request held up by the idempotency store backs off as the
/// outage goes on (5 s at first, then about as long again as it has lasted, at most 5 min)
/// instead of passing through the worker and the 5 s retry tier for as long as it lasts;
/// still nothing is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_redis_outage_backs_off_instead_of_looping_every_5_s() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.idempotency.store = StoreKind::Redis;
        c.idempotency.redis_url = SecretUrl::new("redis://127.0.0.1:1");
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "wait", "request_id": "long-outage"}),
        BasicProperties::default(),
    )
    .await;
    let first = llmq::broker::topology::retry_queue(&env.config.topology, "5s");
    wait_until(
        Duration::from_secs(15),
        "the request parked in the first tier",
        || async { env.queue_len(&first).await == 1 },
    )
    .await;
    // Once the outage has lasted a few seconds, its next wait is longer than the first
    // tier's.
    let longer = llmq::broker::topology::retry_queue(&env.config.topology, "30s");
    wait_until(
        Duration::from_secs(30),
        "the request parked in a longer tier",
        || async { env.queue_len(&longer).await == 1 },
    )
    .await;
    assert_eq!(env.chat_calls(), 0);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// The broker cancels the consumer (its queue is deleted): the worker redeclares and
/// resubscribes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_queue_is_redeclared_and_consumed_again() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "before", "request_id": "before"}),
        BasicProperties::default(),
    )
    .await;
    env.results(1).await;
    let q = env.config.topology.processing_queue.clone();
    env.channel
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // Consumers subscribe after the whole topology (queue and binding) is declared again.
    // Deleting a quorum queue under its consumers took the 3.10 test cluster up to 20 s once
    // (it then closed the worker's connection with INTERNAL_ERROR, and the worker
    // reconnected): a longer bound there.
    let within = match env.config.topology.queue_type {
        QueueType::Classic => Duration::from_secs(15),
        QueueType::Quorum => Duration::from_secs(60),
    };
    wait_until(within, "the queue redeclared and consumed", || async {
        let ch = env.conn.create_channel().await.unwrap();
        let depth = llmq::broker::topology::queue_depth(&ch, &q).await;
        let _ = ch.close(200, "ok".into()).await;
        depth.is_ok_and(|d| d.consumers > 0)
    })
    .await;
    env.publish_chat(
        &json!({"prompt": "after", "request_id": "after"}),
        BasicProperties::default(),
    )
    .await;
    let (_, result) = &env.results(1).await[0];
    assert_eq!(result["request_id"], "after");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// SIGTERM mid-load: the process exits 0 within the grace period, and every published request
/// is either answered or still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_exits_cleanly_and_loses_nothing() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 200,
            ..Default::default()
        },
        |c| {
            c.worker.consumers = 2;
            c.worker.prefetch = 10;
            c.worker.shutdown_grace_secs = 10;
        },
    )
    .await;
    const N: usize = 120;
    publish_many(&env, "term", N).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut child = spawn_worker_process(&env.config, &log);
    wait_until(Duration::from_secs(20), "work under way", || async {
        env.chat_calls() >= 30
    })
    .await;
    signal(&child.child, "TERM");
    let status = tokio::time::timeout(Duration::from_secs(15), child.child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("worker stopped"), "{log}");
    assert!(
        !log.contains("grace period over"),
        "drained within the grace period, nothing cut off: {log}"
    );
    let queued = env.queue_len(&env.config.topology.processing_queue).await as usize;
    let results = env.queue_len(&env.config.topology.results_queue).await as usize;
    assert_eq!(
        results + queued,
        N,
        "{results} results + {queued} queued: {log}"
    );
    assert!(results >= 30);
    env.cleanup().await;
}

/// In-flight work still running at the end of the grace period is handed back to the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_work_at_the_deadline_goes_back_to_the_queue() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 30_000,
            ..Default::default()
        },
        |c| c.worker.shutdown_grace_secs = 1,
    )
    .await;
    let worker = env.start_worker();
    publish_many(&env, "slow", 3).await;
    wait_until(Duration::from_secs(10), "3 calls in flight", || async {
        env.chat_calls() == 3
    })
    .await;
    let started = Instant::now();
    worker.stop().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    // A quorum queue counts a delivery handed back by a closed channel once its leader has
    // applied the close, a moment after: waited for, not assumed.
    let queue = &env.config.topology.processing_queue;
    wait_until(
        Duration::from_secs(10),
        "3 requests back in the queue",
        || async { env.queue_len(queue).await == 3 },
    )
    .await;
    env.cleanup().await;
}

/// With a canary AMQP password and API key and forced failures, neither appears in any log
/// line or error output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let env = TestEnv::with(
        MockOptions {
            require_key: Some("the-right-key".into()),
            ..Default::default()
        },
        |c| c.llm.api_key = llmq::config::Secret::new("sk-canary-key"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut config = env.config.clone();
    // A second, failing worker: wrong AMQP password (canary), so its connection attempts fail.
    let mut bad = config.clone();
    let mut url = url::Url::parse(&crate::helpers::amqp_url()).unwrap();
    url.set_password(Some("canary-amqp-pw")).unwrap();
    bad.amqp.url = Some(SecretUrl::new(url.to_string()));
    let bad_log = dir.path().join("bad.log");
    let mut bad_child = spawn_worker_process(&bad, &bad_log);
    config.worker.id = "secrets-test-worker".into();
    let mut child = spawn_worker_process(&config, &log);
    env.publish_chat(
        &json!({"prompt": "x", "request_id": "secret-1"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("upstream_permanent")
    );
    assert!(!header(&dead[0], "x-error").unwrap().contains("canary"));
    wait_until(
        Duration::from_secs(10),
        "the bad worker to fail to connect",
        || async {
            std::fs::read_to_string(&bad_log)
                .unwrap_or_default()
                .contains("broker unreachable")
        },
    )
    .await;
    signal(&child.child, "TERM");
    signal(&bad_child.child, "TERM");
    child.child.wait().await.unwrap();
    bad_child.child.wait().await.unwrap();
    for path in [&log, &bad_log] {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(!text.is_empty());
        assert!(
            !text.contains("canary"),
            "a secret leaked into {}:\n{text}",
            path.display()
        );
    }
    assert!(std::fs::read_to_string(&bad_log).unwrap().contains(":***@"));
    env.cleanup().await;
}
