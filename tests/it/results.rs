//! Where results go (`topology.keep_results`): a result that reached its caller's `reply_to`
//! is not copied to the results queue by default; one without a `reply_to`, or whose reply
//! queue refused it or is gone, is kept there; `always` copies every result, `never` keeps
//! none.
//!
//! "Nothing was copied" is checked after a condition that proves the worker is done: a
//! later request without a `reply_to` whose result arrives, then a graceful stop, which
//! drains whatever is in flight.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use llmq::{config::KeepResults, tools::mock::MockOptions};
use serde_json::{Value, json};

use crate::helpers::{TestEnv, json, unique};

/// Takes the one message now expected on `queue`, parsed.
async fn take_one(env: &TestEnv, queue: &str) -> Value {
    json(&env.take(queue, 1, Duration::from_secs(30)).await[0].data)
}

/// A request with its `reply_to` (and the caller's correlation id).
fn replying_to(queue: &str) -> BasicProperties {
    BasicProperties::default()
        .with_reply_to(queue.into())
        .with_correlation_id("corr-r".into())
}

/// Publishes a request without a `reply_to` and waits for its result on the results queue:
/// it is published after everything before it was answered, so once it is there (and the
/// worker has stopped, draining what was in flight) the results queue holds all it will.
async fn a_marker_result_arrives_alone(env: &TestEnv, request_id: &str) {
    env.publish_chat(
        &json!({"prompt": "no reply_to", "request_id": request_id}),
        BasicProperties::default(),
    )
    .await;
    let (_, marker) = &env.results(1).await[0];
    assert_eq!(
        marker["request_id"], request_id,
        "the only result kept is the one without a reply_to"
    );
}

/// The default: a result, an error result after a dead letter and a stored result for a
/// duplicate all reach the reply queue and none is copied; a request without a `reply_to`
/// finds its result on the results queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_result_that_reached_its_reply_to_is_not_copied() {
    let env = TestEnv::new(MockOptions::default()).await;
    assert_eq!(
        env.config.topology.keep_results,
        KeepResults::WithoutReplyTo
    );
    let topo = env.config.topology.clone();
    let reply = env.reply_queue().await;
    let worker = env.start_worker();
    let ask = json!({"prompt": "reply to me", "request_id": "r-1"});
    env.publish_chat(&ask, replying_to(&reply)).await;
    let first = take_one(&env, &reply).await;
    assert_eq!(first["request_id"], "r-1");
    assert_eq!(first["status"], "ok", "{first}");
    // The same request again is answered from the store, to its reply_to only.
    env.publish_chat(&ask, replying_to(&reply)).await;
    let again = take_one(&env, &reply).await;
    assert_eq!(again["request_id"], "r-1");
    assert_eq!(again["content"], first["content"]);
    assert_eq!(
        env.chat_calls(),
        1,
        "the duplicate was answered from the store"
    );
    // A request that is dead-lettered tells its caller on the reply queue only.
    env.publish(
        &topo.processing_key,
        b"{\"prompt\": oops",
        replying_to(&reply).with_message_id("r-bad".into()),
    )
    .await;
    let error = take_one(&env, &reply).await;
    assert_eq!(error["request_id"], "r-bad");
    assert_eq!(error["error"]["kind"], "invalid_request", "{error}");
    assert_eq!(env.dead_letters(1).await.len(), 1);
    a_marker_result_arrives_alone(&env, "r-marker").await;
    worker.stop().await.unwrap();
    assert_eq!(env.queue_len(&topo.results_queue).await, 0, "no copy");
    assert_eq!(env.queue_len(&reply).await, 0, "one reply each");
    assert_eq!(env.queue_len(&topo.processing_queue).await, 0, "all acked");
    env.cleanup().await;
}

/// Direct Reply-to: the broker delivers a reply there without routing it to a queue, so the
/// reply is sent as it is (not mandatory) and, delivered, it is not copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_direct_reply_to_result_is_not_copied() {
    let env = TestEnv::new(MockOptions::default()).await;
    let topo = env.config.topology.clone();
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
    // Published on the consuming channel, as Direct Reply-to requires.
    ch.basic_publish(
        topo.request_exchange.as_str().into(),
        topo.processing_key.as_str().into(),
        Default::default(),
        br#"{"prompt": "Hello direct", "request_id": "drt-1"}"#,
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(30), replies.next())
        .await
        .expect("a reply within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!(json(&reply.data)["request_id"], "drt-1");
    a_marker_result_arrives_alone(&env, "drt-marker").await;
    worker.stop().await.unwrap();
    assert_eq!(env.queue_len(&topo.results_queue).await, 0, "no copy");
    env.cleanup().await;
}

/// A reply queue that is gone (the caller left, or never declared it): the mandatory reply
/// comes back, and the result is kept on the results queue instead, once, with the results
/// TTL, before the request is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_reply_queue_that_is_gone_falls_back_to_the_results_queue() {
    let env = TestEnv::new(MockOptions::default()).await;
    let topo = env.config.topology.clone();
    let gone = unique("gone-reply");
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "anyone there?", "request_id": "r-gone"}),
        replying_to(&gone),
    )
    .await;
    let results = env
        .take(&topo.results_queue, 1, Duration::from_secs(30))
        .await;
    let kept = json(&results[0].data);
    assert_eq!(kept["request_id"], "r-gone");
    assert_eq!(kept["status"], "ok", "{kept}");
    let props = &results[0].properties;
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-r")
    );
    assert_eq!(
        props.expiration().as_ref().map(|e| e.as_str()),
        Some("86400000"),
        "the results copy expires after topology.results_ttl_secs"
    );
    worker.stop().await.unwrap();
    assert_eq!(env.queue_len(&topo.results_queue).await, 0, "kept once");
    assert_eq!(env.queue_len(&topo.processing_queue).await, 0, "acked");
    assert_eq!(env.chat_calls(), 1);
    env.cleanup().await;
}

/// `always`: every result is on the results queue too, as in earlier versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_copies_a_replied_result_to_the_results_queue() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.topology.keep_results = KeepResults::Always;
    })
    .await;
    let topo = env.config.topology.clone();
    let reply = env.reply_queue().await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "both, please", "request_id": "r-always"}),
        replying_to(&reply),
    )
    .await;
    let replied = take_one(&env, &reply).await;
    let (props, kept) = &env.results(1).await[0];
    assert_eq!(replied["request_id"], "r-always");
    assert_eq!(kept, &replied, "the same result in both places");
    assert_eq!(
        props.correlation_id().as_ref().map(|c| c.as_str()),
        Some("corr-r")
    );
    worker.stop().await.unwrap();
    assert_eq!(env.queue_len(&topo.results_queue).await, 0, "copied once");
    env.cleanup().await;
}

/// `never` (`false` of earlier versions): the results queue is not declared; a result with
/// a `reply_to` goes there only, and one without still goes to the results exchange (not
/// mandatory), for whatever the users bind to it themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_declares_no_results_queue_and_replies_only_to_reply_to() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.topology.keep_results = KeepResults::Never;
    })
    .await;
    let topo = env.config.topology.clone();
    let declared = env
        .conn
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            topo.results_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(declared.is_err(), "{} is not declared", topo.results_queue);
    // A user's own queue on the results exchange.
    let own = env.reply_queue().await;
    env.channel
        .queue_bind(
            own.as_str().into(),
            topo.results_exchange.as_str().into(),
            topo.results_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let reply = env.reply_queue().await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "reply only", "request_id": "r-never"}),
        replying_to(&reply),
    )
    .await;
    assert_eq!(take_one(&env, &reply).await["request_id"], "r-never");
    env.publish_chat(
        &json!({"prompt": "no reply_to", "request_id": "r-never-marker"}),
        BasicProperties::default(),
    )
    .await;
    assert_eq!(take_one(&env, &own).await["request_id"], "r-never-marker");
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&own).await,
        0,
        "the replied result is not there"
    );
    assert_eq!(env.queue_len(&topo.processing_queue).await, 0, "all acked");
    env.cleanup().await;
}
