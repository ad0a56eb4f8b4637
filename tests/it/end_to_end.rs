//! End to end against the real broker: requests in, confirmed results out.

use std::{sync::atomic::Ordering, time::Duration};

use crate::helpers::{TestEnv, header, json, unique, wait_until};
use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::{AMQPValue, FieldTable},
};
use llmq::{
    broker::{arguments::Priorities, version},
    config::KeepResults,
    tools::mock::{MockOptions, mock_embedding},
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_form_chat_gets_a_result_on_the_results_queue() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "Hello seed", "timestamp": 1732000000.0}),
        BasicProperties::default(),
    )
    .await;
    let results = env.results(1).await;
    let (props, body) = &results[0];
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["kind"], "chat");
    assert_eq!(body["content"], "mock reply to: Hello seed");
    assert_eq!(body["attempts"], 1);
    assert_eq!(body["worker"], env.config.worker.id.as_str());
    assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
    let request_id = body["request_id"].as_str().unwrap();
    assert!(request_id.starts_with("sha256-"), "{request_id}");
    assert_eq!(props.message_id().as_ref().unwrap().as_str(), request_id);
    assert_eq!(
        props.correlation_id().as_ref().unwrap().as_str(),
        request_id
    );
    assert_eq!(*props.delivery_mode(), Some(2), "results are persistent");
    // The request itself was acked: nothing is left in the work queue.
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&env.config.topology.processing_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_form_chat_replies_to_reply_to_with_correlation_id() {
    let env = TestEnv::with(
        MockOptions {
            require_key: Some("sk-test".into()),
            ..Default::default()
        },
        // So that the kept copy can be checked too.
        |c| c.topology.keep_results = KeepResults::Always,
    )
    .await;
    let mut env = env;
    env.config.llm.api_key = llmq::config::Secret::new("sk-test");
    let worker = env.start_worker();
    let reply = env
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let reply_queue = reply.name().to_string();
    env.publish_chat(
        &json!({
            "request_id": "full-1",
            "model": "my-model",
            "system": "be brief",
            "messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": "Hello full"}],
            "max_tokens": 16,
            "temperature": 0.2,
            "params": {"top_p": 0.5},
            "metadata": {"tenant": "t1", "n": [1, 2]}
        }),
        BasicProperties::default()
            .with_reply_to(reply_queue.as_str().into())
            .with_correlation_id("corr-42".into()),
    )
    .await;
    let replies = env.take(&reply_queue, 1, Duration::from_secs(30)).await;
    let body = json(&replies[0].data);
    assert_eq!(
        replies[0]
            .properties
            .correlation_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "corr-42"
    );
    assert_eq!(body["request_id"], "full-1");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["model"], "my-model");
    assert_eq!(body["content"], "mock reply to: Hello full");
    assert_eq!(body["metadata"], json!({"tenant": "t1", "n": [1, 2]}));
    // The same result is also kept on the results queue (`keep_results = "always"`).
    let (props, kept) = &env.results(1).await[0];
    assert_eq!(kept["request_id"], "full-1");
    assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "corr-42");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_single_and_list() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    let key = env.config.topology.embeddings_key.clone();
    let one = json!({"request_id": "e-1", "kind": "embedding", "input": "alpha"});
    let many = json!({"request_id": "e-2", "kind": "embedding", "input": ["beta", "gamma"]});
    env.publish(&key, one.to_string().as_bytes(), BasicProperties::default())
        .await;
    env.publish(
        &key,
        many.to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let mut results: Vec<_> = env.results(2).await.into_iter().map(|(_, b)| b).collect();
    results.sort_by_key(|b| b["request_id"].as_str().unwrap().to_string());
    assert_eq!(results[0]["status"], "ok", "{}", results[0]);
    assert_eq!(results[0]["kind"], "embedding");
    let vector = |v: &serde_json::Value| -> Vec<f32> { serde_json::from_value(v.clone()).unwrap() };
    assert_eq!(vector(&results[0]["embedding"]), mock_embedding("alpha"));
    let list: Vec<Vec<f32>> = serde_json::from_value(results[1]["embeddings"].clone()).unwrap();
    assert_eq!(list, vec![mock_embedding("beta"), mock_embedding("gamma")]);
    assert_eq!(env.mock.stats().embedding_items.load(Ordering::Relaxed), 3);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_works() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    let ch = env.conn.create_channel().await.unwrap();
    let mut replies = ch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            unique("drt").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let key = env.config.topology.processing_key.clone();
    let confirm = ch
        .basic_publish(
            env.config.topology.request_exchange.as_str().into(),
            key.as_str().into(),
            Default::default(),
            br#"{"prompt": "Hello direct", "request_id": "drt-1"}"#,
            BasicProperties::default()
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id("c-drt".into()),
        )
        .await
        .unwrap();
    drop(confirm);
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
        .await
        .expect("a reply within 30 s")
        .unwrap()
        .unwrap();
    let body = json(&reply.data);
    assert_eq!(body["request_id"], "drt-1");
    assert_eq!(body["content"], "mock reply to: Hello direct");
    assert_eq!(
        reply.properties.correlation_id().as_ref().unwrap().as_str(),
        "c-drt"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_message_is_dead_lettered_and_the_next_one_succeeds() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    let key = env.config.topology.processing_key.clone();
    env.publish(
        &key,
        b"{\"prompt\": oops",
        BasicProperties::default()
            .with_message_id("bad-1".into())
            .with_priority(3),
    )
    .await;
    env.publish_chat(
        &json!({"prompt": "after", "request_id": "good-1"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(dead[0].data, b"{\"prompt\": oops", "body unchanged");
    assert_eq!(
        *dead[0].properties.priority(),
        Some(3),
        "properties unchanged"
    );
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("invalid_request")
    );
    let reason = header(&dead[0], "x-error").unwrap();
    assert!(
        reason.contains("invalid JSON") && reason.contains("line 1 column"),
        "{reason}"
    );
    assert_eq!(
        header(&dead[0], "x-worker").as_deref(),
        Some(env.config.worker.id.as_str())
    );
    let mut results: Vec<_> = env.results(2).await.into_iter().map(|(_, b)| b).collect();
    results.sort_by_key(|b| b["request_id"].as_str().unwrap().to_string());
    assert_eq!(results[0]["request_id"], "bad-1");
    assert_eq!(results[0]["status"], "error");
    assert_eq!(results[0]["error"]["kind"], "invalid_request");
    assert_eq!(results[1]["request_id"], "good-1");
    assert_eq!(results[1]["status"], "ok");
    assert_eq!(
        env.mock.stats().chat_calls.load(Ordering::Relaxed),
        1,
        "the bad one never reached the upstream"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_upstream_error_is_dead_lettered_without_retries() {
    let env = TestEnv::new(MockOptions {
        error_rate: 1.0,
        status: 400,
        ..Default::default()
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "x", "request_id": "perm-1"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("upstream_permanent")
    );
    assert_eq!(env.mock.stats().chat_calls.load(Ordering::Relaxed), 1);
    let (_, result) = &env.results(1).await[0];
    assert_eq!(result["status"], "error");
    assert_eq!(result["error"]["kind"], "upstream_permanent");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_then_dead_lettered() {
    let env = TestEnv::with(
        MockOptions {
            error_rate: 1.0,
            status: 503,
            ..Default::default()
        },
        |c| c.retry.max_attempts = 3,
    )
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "x", "request_id": "tr-1"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(
        env.mock.stats().chat_calls.load(Ordering::Relaxed),
        3,
        "exactly max_attempts calls"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// If the result cannot be confirmed, the request is not acked as done: it waits in a retry
/// tier (never in a hot loop) and succeeds once publishing works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_is_not_acked_until_its_result_is_confirmed() {
    let env = TestEnv::new(MockOptions::default()).await;
    // A queue that refuses every message makes the broker nack every result.
    let blocker = unique("blocker");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let t = &env.config.topology;
    env.channel
        .queue_declare(
            blocker.as_str().into(),
            QueueDeclareOptions::default(),
            args,
        )
        .await
        .unwrap();
    env.channel
        .queue_bind(
            blocker.as_str().into(),
            t.results_exchange.as_str().into(),
            t.results_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "blocked", "request_id": "blk-1"}),
        BasicProperties::default(),
    )
    .await;
    // Let the worker call the upstream and fail to get its result confirmed (the broker
    // nacks every publish), then stop it: graceful shutdown must not ack the request.
    // The other queues bound to the results exchange still get copies: a nack is not atomic
    // across queues. Duplicates are allowed; an ack without a confirm is not. A copy on the
    // results queue shows the worker has published and been refused.
    wait_until(Duration::from_secs(20), "a refused publish", || async {
        env.queue_len(&t.results_queue).await >= 1
    })
    .await;
    worker.stop().await.unwrap();
    let tier = llmq::broker::topology::retry_queue(t, "5s");
    assert_eq!(
        env.queue_len(&t.processing_queue).await + env.queue_len(&tier).await,
        1,
        "the unconfirmed request waits in a retry tier or is back in its queue"
    );
    env.channel
        .queue_delete(blocker.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    // Copies that reached the results queue while blocked are not what we wait for.
    env.channel
        .queue_purge(t.results_queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let worker = env.start_worker();
    let (_, result) = &env.results(1).await[0];
    assert_eq!(result["request_id"], "blk-1", "processed once unblocked");
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&t.processing_queue).await,
        0,
        "acked for good"
    );
    env.cleanup().await;
}

/// With a backlog of low-priority requests and a small prefetch, high-priority requests
/// published later finish before most of the backlog; in quorum queues before RabbitMQ 4.0,
/// which have no priorities, after it, in order (what the README says of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_overtakes_the_backlog() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 20,
            record_prompts: true,
            ..Default::default()
        },
        |c| {
            c.worker.consumers = 1;
            c.worker.prefetch = 1;
        },
    )
    .await;
    const LOW: usize = 40;
    const HIGH: usize = 5;
    for i in 0..LOW {
        env.publish_chat(
            &json!({"prompt": format!("low-{i}")}),
            BasicProperties::default().with_priority(1),
        )
        .await;
    }
    let worker = env.start_worker();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while env.mock.stats().chat_calls.load(Ordering::Relaxed) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..HIGH {
        env.publish_chat(
            &json!({"prompt": format!("high-{i}")}),
            BasicProperties::default().with_priority(9),
        )
        .await;
    }
    let results = env.results(LOW + HIGH).await;
    let order: Vec<String> = results
        .iter()
        .map(|(_, b)| {
            b["content"]
                .as_str()
                .unwrap()
                .replace("mock reply to: ", "")
        })
        .collect();
    let priorities = llmq::broker::arguments::work_queues(
        env.config.topology.queue_type,
        env.config.topology.max_priority,
        version::when_quorum(&env.config.amqp, env.config.topology.queue_type).await,
    )
    .priorities;
    if priorities == Priorities::None {
        let fifo: Vec<String> = (0..LOW)
            .map(|i| format!("low-{i}"))
            .chain((0..HIGH).map(|i| format!("high-{i}")))
            .collect();
        assert_eq!(order, fifo, "first in, first out");
    } else {
        for i in 0..HIGH {
            let pos = order
                .iter()
                .position(|p| *p == format!("high-{i}"))
                .unwrap();
            assert!(
                pos < (LOW + HIGH) / 3,
                "high-{i} finished at position {pos} ({priorities}): {order:?}"
            );
        }
    }
    worker.stop().await.unwrap();
    env.cleanup().await;
}
