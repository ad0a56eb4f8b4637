//! The guarantees under hostile input and crash loops (issue 9), against the real broker:
//! redeliveries bounded whatever the store, a refusing reply or results queue never loops,
//! oversize results, identity-scoped idempotency and conflicts, the results TTL.

use std::{sync::atomic::Ordering, time::Duration};

use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use llmq::{
    config::{QueueType, StoreKind},
    tools::mock::MockOptions,
};
use serde_json::{Value, json};

use crate::helpers::{
    BrokerUser, Policy, TestEnv, amqp_url, exactly, header, json, signal, spawn_worker_process,
    unique, wait_until,
};

/// Publishes a chat request as the user of `conn`, with its `user_id` set, confirmed.
async fn publish_as(env: &TestEnv, conn: &Connection, user: &str, body: &Value) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let topo = &env.config.topology;
    let confirm = ch
        .basic_publish(
            topo.request_exchange.as_str().into(),
            topo.processing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.to_string().as_bytes(),
            BasicProperties::default()
                .with_user_id(user.into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::Ack(None), "request routed");
    let _ = ch.close(200, "ok".into()).await;
}

/// A request that kills its worker, again and again: each crash redelivers it, the
/// redelivery is counted in a header, and past `retry.max_redeliveries` it is dead-lettered
/// as `redelivery_limit` with an error result and no further upstream call, whatever the
/// idempotency store (nothing of it survives a restart with `off` or `memory`).
async fn crash_loop_is_bounded(store: StoreKind) {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 60_000,
            ..Default::default()
        },
        |c| {
            c.idempotency.store = store;
            c.retry.max_redeliveries = 2;
            c.retry.max_attempts = 10;
            c.worker.consumers = 1;
            c.worker.prefetch = 1;
        },
    )
    .await;
    env.publish_chat(
        &json!({"prompt": "kills its worker", "request_id": "crash-loop"}),
        BasicProperties::default().with_priority(7),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // Each worker takes the request, calls the upstream (which never answers in time) and
    // is killed mid-call: 3 calls for 1 delivery and 2 counted redeliveries.
    for crash in 1..=3u64 {
        let mut worker =
            spawn_worker_process(&env.config, &dir.path().join(format!("w{crash}.log")));
        wait_until(Duration::from_secs(20), "the call in flight", || async {
            env.chat_calls() >= crash
        })
        .await;
        signal(&worker.child, "KILL");
        worker.child.wait().await.unwrap();
    }
    let last = env.start_worker();
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("redelivery_limit")
    );
    assert_eq!(
        dead[0].properties.priority(),
        &Some(7),
        "the counted redeliveries kept the priority"
    );
    let results = env.results(1).await;
    assert_eq!(results[0].1["status"], "error");
    assert_eq!(results[0].1["error"]["kind"], "redelivery_limit");
    last.stop().await.unwrap();
    assert_eq!(env.chat_calls(), 3, "no upstream call past the limit");
    assert_eq!(
        env.queue_len(&env.config.topology.processing_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_bounded_with_the_store_off() {
    crash_loop_is_bounded(StoreKind::Off).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_bounded_with_the_memory_store() {
    crash_loop_is_bounded(StoreKind::Memory).await;
}

/// Declares a reply queue that refuses every publish (`x-max-length: 0`, `reject-publish`).
async fn refusing_queue(env: &TestEnv) -> String {
    let name = unique("full-reply");
    let ch = env.conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(name.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    name
}

async fn delete_queue(env: &TestEnv, name: &str) {
    let ch = env.conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(name.into(), QueueDeleteOptions::default())
        .await;
}

/// A reply queue that refuses is the caller's problem: the result goes once to the results
/// queue, with the results TTL as its expiration, and the request is acked, not republished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_reply_queue_gets_one_result_on_the_results_queue() {
    let env = TestEnv::new(MockOptions::default()).await;
    let reply_to = refusing_queue(&env).await;
    env.publish_chat(
        &json!({"prompt": "hi", "request_id": "refused-reply"}),
        BasicProperties::default().with_reply_to(reply_to.as_str().into()),
    )
    .await;
    let worker = env.start_worker();
    let topo = env.config.topology.clone();
    wait_until(Duration::from_secs(20), "the result", || async {
        env.queue_len(&topo.results_queue).await >= 1
    })
    .await;
    // A graceful stop drains what is in flight: a republish loop would show as more results.
    worker.stop().await.unwrap();
    let results = env
        .take(&topo.results_queue, 1, Duration::from_secs(5))
        .await;
    assert_eq!(json(&results[0].data)["status"], "ok");
    assert_eq!(
        results[0]
            .properties
            .expiration()
            .as_ref()
            .map(|e| e.to_string()),
        Some("86400000".to_string()),
        "the results copy expires after topology.results_ttl_secs"
    );
    assert_eq!(
        env.queue_len(&topo.results_queue).await,
        0,
        "published once"
    );
    assert_eq!(env.queue_len(&topo.processing_queue).await, 0, "acked");
    assert_eq!(env.chat_calls(), 1);
    delete_queue(&env, &reply_to).await;
    env.cleanup().await;
}

/// When the results queue itself refuses, the request is not lost and does not spin: it
/// waits in a retry tier, and once the queue takes results again its stored result is
/// published, without a second upstream call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_results_queue_backs_off_through_the_retry_queue() {
    let env = TestEnv::new(MockOptions::default()).await;
    let topo = env.config.topology.clone();
    let full = Policy::set(
        "queues",
        &exactly(&[&topo.results_queue]),
        &json!({"max-length": 0, "overflow": "reject-publish"}),
    );
    // A quorum queue refuses only once over its limit: one message first puts it there.
    let quorum = env.config.topology.queue_type == QueueType::Quorum;
    if quorum {
        let filler = env
            .channel
            .basic_publish(
                "".into(),
                topo.results_queue.as_str().into(),
                BasicPublishOptions::default(),
                b"filler",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(filler, lapin::Confirmation::Ack(None), "the filler taken");
    }
    env.publish_chat(
        &json!({"prompt": "hi", "request_id": "refused-results"}),
        BasicProperties::default(),
    )
    .await;
    let worker = env.start_worker();
    let tier = llmq::broker::topology::retry_queue(&topo, "5s");
    wait_until(
        Duration::from_secs(20),
        "the request in a retry tier",
        || async { env.queue_len(&tier).await == 1 },
    )
    .await;
    if quorum {
        env.channel
            .queue_purge(topo.results_queue.as_str().into(), Default::default())
            .await
            .unwrap();
    }
    drop(full);
    let results = env.results(1).await;
    assert_eq!(results[0].1["status"], "ok");
    worker.stop().await.unwrap();
    assert_eq!(env.chat_calls(), 1, "the stored result was published");
    assert_eq!(
        env.queue_len(&topo.results_queue).await,
        0,
        "published once"
    );
    env.cleanup().await;
}

/// A result larger than `worker.max_result_bytes` is not published: the caller gets a small
/// `result_too_large` error and the request a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_max_result_bytes_is_dead_lettered() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.worker.max_result_bytes = 2048;
    })
    .await;
    // The mock echoes the prompt, so the answer is larger than 2 KiB.
    env.publish_chat(
        &json!({"prompt": "x".repeat(4000), "request_id": "too-big"}),
        BasicProperties::default(),
    )
    .await;
    let worker = env.start_worker();
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("result_too_large")
    );
    let results = env.results(1).await;
    assert_eq!(results[0].1["error"]["kind"], "result_too_large");
    worker.stop().await.unwrap();
    assert_eq!(env.chat_calls(), 1);
    env.cleanup().await;
}

/// Two users who pick the same `request_id` each get their own answer; a user who reuses
/// one for a different request gets `idempotency_conflict`, never the stored answer; the
/// same request sent again (other metadata) gets the stored answer without a call. Dead
/// letters keep the sender's `user_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_scoped_by_identity_and_conflicts_refused() {
    let env = TestEnv::new(MockOptions::default()).await;
    let (alice, bob) = (BrokerUser::create("alice"), BrokerUser::create("bob"));
    let (alice_conn, bob_conn) = (alice.connect().await, bob.connect().await);
    let worker = env.start_worker();
    publish_as(
        &env,
        &alice_conn,
        &alice.name,
        &json!({"prompt": "alice's question", "request_id": "shared-id-7"}),
    )
    .await;
    let first = env.results(1).await;
    assert_eq!(first[0].1["content"], "mock reply to: alice's question");
    publish_as(
        &env,
        &bob_conn,
        &bob.name,
        &json!({"prompt": "bob's question", "request_id": "shared-id-7"}),
    )
    .await;
    let second = env.results(1).await;
    assert_eq!(
        second[0].1["content"], "mock reply to: bob's question",
        "bob never gets alice's answer"
    );
    publish_as(
        &env,
        &alice_conn,
        &alice.name,
        &json!({"prompt": "alice's question", "request_id": "shared-id-7",
                "metadata": {"resent": true}}),
    )
    .await;
    let again = env.results(1).await;
    assert_eq!(again[0].1["content"], "mock reply to: alice's question");
    assert_eq!(
        env.chat_calls(),
        2,
        "the resend was answered from the store"
    );
    publish_as(
        &env,
        &alice_conn,
        &alice.name,
        &json!({"prompt": "another question", "request_id": "shared-id-7"}),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("idempotency_conflict")
    );
    assert_eq!(
        dead[0].properties.user_id().as_ref().map(|u| u.to_string()),
        Some(alice.name.clone()),
        "the dead letter keeps its sender's identity"
    );
    let conflict = env.results(1).await;
    assert_eq!(conflict[0].1["error"]["kind"], "idempotency_conflict");
    worker.stop().await.unwrap();
    assert_eq!(env.chat_calls(), 2, "no call for the conflict");
    let _ = alice_conn.close(200, "done".into()).await;
    let _ = bob_conn.close(200, "done".into()).await;
    env.cleanup().await;
}

/// Every republish keeps the sender's identity: a dead letter keeps its `user_id`, and so
/// does the request `llmq dlq replay` puts back, so a replayed request is still its
/// sender's (for idempotency, and for cancellation and tenants later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_keeps_the_senders_identity() {
    let env = TestEnv::new(MockOptions::default()).await;
    let carol = BrokerUser::create("carol");
    let conn = carol.connect().await;
    publish_as(
        &env,
        &conn,
        &carol.name,
        &json!({"request_id": "no-prompt"}),
    )
    .await;
    let worker = env.start_worker();
    let topo = env.config.topology.clone();
    wait_until(Duration::from_secs(20), "the dead letter", || async {
        env.queue_len(&topo.dead_letter_queue).await == 1
    })
    .await;
    worker.stop().await.unwrap();
    let replayed = llmq::ops::dlq::replay(&env.config, &llmq::ops::dlq::Selection::All, false)
        .await
        .unwrap();
    assert_eq!(replayed.len(), 1);
    let back = env
        .take(&topo.processing_queue, 1, Duration::from_secs(5))
        .await;
    assert_eq!(
        back[0].properties.user_id().as_ref().map(|u| u.to_string()),
        Some(carol.name.clone())
    );
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

/// A worker whose RabbitMQ user lacks the `impersonator` tag is told so, clearly, at
/// connect (the worker then consumes nothing until it has it); the test broker's worker
/// user passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_impersonator_tag_is_detected_at_connect() {
    let plain = BrokerUser::create("plain");
    let conn = plain.connect().await;
    let err = llmq::broker::publish::check_impersonation(&conn)
        .await
        .expect_err("a user without the tag cannot keep another's user_id");
    let text = err.to_string();
    assert!(text.contains("impersonator"), "{text}");
    assert!(text.contains("PRECONDITION_FAILED"), "{text}");
    assert!(
        conn.status().connected(),
        "only the probe's channel is closed"
    );
    let _ = conn.close(200, "done".into()).await;
    let worker_conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    llmq::broker::publish::check_impersonation(&worker_conn)
        .await
        .expect("the worker's user has the tag");
    let _ = worker_conn.close(200, "done".into()).await;
}

/// The embeddings consumers buffer at most `batch.max_buffered_bytes` of worst-case bodies
/// (`worker.max_body_bytes` each), even with a fixed `worker.prefetch` that would take
/// more: what the broker has not handed out stays in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embeddings_prefetch_is_bounded_by_buffered_bytes() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 3000,
            ..Default::default()
        },
        |c| {
            c.worker.consumers = 2;
            c.worker.prefetch = 16;
            c.worker.max_body_bytes = 1024;
            // 8 KiB of 1 KiB bodies: 4 per consumer, 8 in all (16 each without the bound).
            c.batch.max_buffered_bytes = 8 * 1024;
        },
    )
    .await;
    let key = env.config.topology.embeddings_key.clone();
    for i in 0..40 {
        let body = json!({"request_id": format!("emb-{i}"), "kind": "embedding", "input": "x"});
        env.publish(
            &key,
            body.to_string().as_bytes(),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await;
    }
    let worker = env.start_worker();
    wait_until(
        Duration::from_secs(20),
        "a batched call in flight",
        || async { env.mock.stats().in_flight.load(Ordering::Relaxed) >= 1 },
    )
    .await;
    let queue = env.config.topology.embeddings_queue.clone();
    assert_eq!(
        env.queue_len(&queue).await,
        32,
        "8 of 40 handed out while the calls hold them"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A graceful shutdown is not a crash: the requests a stopping worker gives back (waiting
/// for a slot, or buffered) are requeued with their counts unchanged, so rolling restarts
/// never use up `retry.max_redeliveries`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdowns_do_not_count_as_redeliveries() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 800,
            ..Default::default()
        },
        |c| {
            c.retry.max_redeliveries = 1;
            c.worker.max_inflight = 1;
            c.worker.min_inflight = 1;
        },
    )
    .await;
    const N: u64 = 4;
    for i in 0..N {
        env.publish_chat(
            &json!({"prompt": format!("restart {i}"), "request_id": format!("restart-{i}")}),
            BasicProperties::default(),
        )
        .await;
    }
    // One call at a time: every restart answers one request and gives the others back.
    for round in 1..N {
        let worker = env.start_worker();
        wait_until(Duration::from_secs(20), "a call in flight", || async {
            env.chat_calls() >= round
        })
        .await;
        worker.stop().await.unwrap();
    }
    let worker = env.start_worker();
    let (all, ok) = crate::helpers::drain_results(&env, N as usize, Duration::from_secs(30)).await;
    worker.stop().await.unwrap();
    assert_eq!(ok.len(), N as usize, "every request answered: {all:?}");
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0,
        "no redelivery_limit for restarts"
    );
    assert_eq!(env.chat_calls(), N, "one call each");
    env.cleanup().await;
}
