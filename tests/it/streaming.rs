//! Streaming to `reply_to`: deltas in order before the result, joined deltas equal to the
//! result's content, and a restart marker before an attempt that follows one which
//! streamed (a stream that broke off, a stream cut by a shutdown).

use std::{collections::BTreeMap, time::Duration};

use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};
use llmq::tools::mock::MockOptions;
use serde_json::{Value, json};

use crate::helpers::{TestEnv, json, unique};

/// Everything that reaches `queue` until `results` results (AMQP type `llmq.result`) have
/// come, in arrival order, grouped by correlation id.
async fn collect(
    env: &TestEnv,
    queue: &str,
    results: usize,
    timeout: Duration,
) -> BTreeMap<String, Vec<Delivery>> {
    let ch = env.conn.create_channel().await.expect("a channel");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut by_request: BTreeMap<String, Vec<Delivery>> = BTreeMap::new();
    let mut seen = 0;
    let gather = async {
        while seen < results {
            let d = consumer
                .next()
                .await
                .expect("consumer open")
                .expect("delivery");
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
            if kind(&d) == "llmq.result" {
                seen += 1;
            }
            let corr = d
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default();
            by_request.entry(corr).or_default().push(d);
        }
    };
    if tokio::time::timeout(timeout, gather).await.is_err() {
        panic!("only {seen} of {results} results within {timeout:?}");
    }
    let _ = ch.close(200, "ok".into()).await;
    by_request
}

fn kind(d: &Delivery) -> String {
    d.properties
        .kind()
        .as_ref()
        .map(|k| k.to_string())
        .unwrap_or_default()
}

/// Checks one request's messages: deltas numbered from 0 in each attempt, each attempt
/// after the first announced by a restart marker, the result last; returns the text of the
/// last attempt's deltas, the attempts that streamed, and the result.
fn check_stream(request_id: &str, messages: &[&Delivery]) -> (String, Vec<u64>, Value) {
    let (last, before) = messages.split_last().expect("messages");
    assert_eq!(kind(last), "llmq.result", "the result comes last");
    let result = json(&last.data);
    let mut text = String::new();
    let mut attempts = Vec::new();
    let mut next_seq = 0;
    for d in before {
        let body = json(&d.data);
        assert_eq!(body["request_id"], request_id, "{body}");
        assert_eq!(
            d.properties.delivery_mode(),
            &Some(1),
            "stream messages are transient"
        );
        let attempt = body["attempt"].as_u64().expect("attempt");
        let id = d.properties.message_id().as_ref().expect("message_id");
        match kind(d).as_str() {
            "restart" => {
                assert_eq!(body["status"], "restart", "{body}");
                assert!(
                    attempts.last().is_none_or(|a| *a < attempt),
                    "a restart names a later attempt: {body}"
                );
                assert_eq!(id.as_str(), format!("{request_id}:{attempt}:restart"));
                attempts.push(attempt);
                text.clear();
                next_seq = 0;
            }
            "delta" => {
                assert_eq!(body["status"], "delta", "{body}");
                if attempts.is_empty() {
                    attempts.push(attempt);
                }
                assert_eq!(Some(&attempt), attempts.last(), "{body}");
                assert_eq!(body["seq"], next_seq, "in order, none lost: {body}");
                assert_eq!(id.as_str(), format!("{request_id}:{attempt}:{next_seq}"));
                assert!(body.get("index").is_none(), "one choice, no index: {body}");
                text.push_str(body["delta"]["content"].as_str().unwrap_or_default());
                next_seq += 1;
            }
            other => panic!("unexpected message type {other:?}: {body}"),
        }
    }
    (text, attempts, result)
}

/// 100 streams at once, all to one reply queue: each request's deltas arrive in order,
/// none lost, before its result, and joined they are the result's content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_streams_arrive_whole_and_in_order() {
    let env = TestEnv::with(
        MockOptions {
            chunk_ms: 20,
            ..Default::default()
        },
        |c| {
            c.worker.prefetch = 100;
            c.worker.max_inflight = 200;
        },
    )
    .await;
    let reply = env.reply_queue().await;
    let worker = env.start_worker();
    for i in 0..100 {
        env.publish_chat(
            &json!({"request_id": format!("s-{i}"), "prompt": format!("stream {i} tells a story of several words"), "stream": true}),
            BasicProperties::default()
                .with_reply_to(reply.as_str().into())
                .with_correlation_id(format!("corr-{i}").into()),
        )
        .await;
    }
    let by_request = collect(&env, &reply, 100, Duration::from_secs(60)).await;
    assert_eq!(by_request.len(), 100);
    let mut deltas = 0;
    for i in 0..100 {
        let messages = &by_request[&format!("corr-{i}")];
        let all: Vec<&Delivery> = messages.iter().collect();
        let (text, attempts, result) = check_stream(&format!("s-{i}"), &all);
        assert_eq!(result["status"], "ok", "{result}");
        let expected = format!("mock reply to: stream {i} tells a story of several words");
        assert_eq!(result["content"], expected.as_str());
        assert_eq!(text, expected, "joined deltas are the content");
        assert_eq!(attempts, [1]);
        // Coalescing merges chunks and never splits one: at most one delta per word.
        let n = messages.len() - 1;
        assert!((1..=expected.split(' ').count()).contains(&n), "{n} deltas");
        deltas += n;
    }
    assert!(deltas >= 100);
    // Once the worker has stopped, nothing can still be on its way: no delta came after
    // its result, and no result that reached the reply queue was copied to the results
    // queue (`keep_results = "without_reply_to"`).
    worker.stop().await.expect("worker stops");
    assert_eq!(env.queue_len(&reply).await, 0);
    assert_eq!(env.queue_len(&env.config.topology.results_queue).await, 0);
    assert_eq!(
        env.mock
            .stats()
            .streams
            .load(std::sync::atomic::Ordering::Relaxed),
        100
    );
    env.cleanup().await;
}

/// A stream that breaks off (a dropped connection, then an error event) is retried: the
/// next attempt starts with a restart marker, its deltas start again at seq 0, and the
/// result is the second attempt's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_off_is_retried_after_a_restart_marker() {
    let env = TestEnv::new(MockOptions {
        chunk_ms: 10,
        fail_mid_stream_after: Some(4),
        fail_mid_stream_rate: 0.5,
        ..Default::default()
    })
    .await;
    let reply = env.reply_queue().await;
    let worker = env.start_worker();
    for (i, error_event) in [false, true].into_iter().enumerate() {
        env.mock.set_options(MockOptions {
            chunk_ms: 10,
            fail_mid_stream_after: Some(4),
            fail_mid_stream_rate: 0.5,
            mid_stream_error: error_event,
            ..Default::default()
        });
        let id = format!("broken-{i}");
        env.publish_chat(
            &json!({"request_id": id, "prompt": "a story that breaks off midway", "stream": true}),
            BasicProperties::default()
                .with_reply_to(reply.as_str().into())
                .with_correlation_id(id.as_str().into()),
        )
        .await;
        let by_request = collect(&env, &reply, 1, Duration::from_secs(30)).await;
        let messages = &by_request[&id];
        let all: Vec<&Delivery> = messages.iter().collect();
        let (text, attempts, result) = check_stream(&id, &all);
        assert_eq!(attempts, [1, 2], "error event: {error_event}");
        assert_eq!(kind(&messages[0]), "delta", "the first attempt streamed");
        assert!(
            messages.iter().any(|d| kind(d) == "restart"),
            "a restart marker"
        );
        assert_eq!(result["status"], "ok", "{result}");
        assert_eq!(result["attempts"], 2);
        assert_eq!(
            result["content"],
            "mock reply to: a story that breaks off midway"
        );
        assert_eq!(text, "mock reply to: a story that breaks off midway");
    }
    let stats = env.mock.stats();
    assert_eq!(
        stats.streams_cut.load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    assert_eq!(stats.streams.load(std::sync::atomic::Ordering::Relaxed), 4);
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

/// Without a `reply_to` there is nowhere to stream: the upstream is called without
/// streaming and only the result goes out. With `n: 2`, each delta names its choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_to_no_stream_and_several_choices_are_indexed() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "quiet", "prompt": "hi", "stream": true}),
        BasicProperties::default(),
    )
    .await;
    let (_, result) = &env.results(1).await[0];
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["content"], "mock reply to: hi");
    let streams = || {
        env.mock
            .stats()
            .streams
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(streams(), 0, "the upstream was not asked to stream");

    let reply = env.reply_queue().await;
    env.publish_chat(
        &json!({"request_id": "two", "prompt": "hi there", "stream": true, "params": {"n": 2}}),
        BasicProperties::default()
            .with_reply_to(reply.as_str().into())
            .with_correlation_id("two".into()),
    )
    .await;
    let by_request = collect(&env, &reply, 1, Duration::from_secs(30)).await;
    let messages = &by_request["two"];
    let (result, deltas) = messages.split_last().expect("messages");
    let result = json(&result.data);
    let mut texts: BTreeMap<u64, String> = BTreeMap::new();
    for d in deltas {
        let body = json(&d.data);
        let index = body["index"].as_u64().expect("each delta names its choice");
        texts
            .entry(index)
            .or_default()
            .push_str(body["delta"]["content"].as_str().unwrap_or_default());
    }
    assert_eq!(texts[&0], "mock reply to: hi there");
    assert_eq!(texts[&1], "mock reply to: hi there (choice 1)");
    assert_eq!(result["content"], texts[&0].as_str());
    let choices = result["choices"].as_array().expect("choices");
    assert_eq!(choices[1]["message"]["content"], texts[&1].as_str());
    assert_eq!(streams(), 1);
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

/// A stream still running at the shutdown deadline goes back to its queue; the next worker
/// starts it again with a restart marker, as a later attempt (the cut one was paid for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_shutdown_restarts_with_its_marker() {
    let env = TestEnv::with(
        MockOptions {
            chunk_ms: 300,
            ..Default::default()
        },
        |c| {
            // A short grace, and streams allowed to outlast it (the grace covers calls).
            c.llm.timeout_secs = 1;
            c.llm.stream_max_secs = 30;
            c.worker.shutdown_grace_secs = 1;
        },
    )
    .await;
    let reply = env.reply_queue().await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "cut", "prompt": "a long story told slowly, word by word, until the end", "stream": true}),
        BasicProperties::default()
            .with_reply_to(reply.as_str().into())
            .with_correlation_id("cut".into()),
    )
    .await;
    // The first delta is out: the stream is running.
    let first = env.take(&reply, 1, Duration::from_secs(30)).await;
    assert_eq!(kind(&first[0]), "delta");
    assert_eq!(json(&first[0].data)["attempt"], 1);
    worker.stop().await.expect("worker stops");
    env.mock.set_options(MockOptions::default());
    let worker = env.start_worker();
    let by_request = collect(&env, &reply, 1, Duration::from_secs(30)).await;
    // What the first worker sent after the delta taken above may be here too.
    let messages: Vec<&Delivery> = by_request["cut"]
        .iter()
        .filter(|d| !(kind(d) == "delta" && json(&d.data)["attempt"] == 1))
        .collect();
    let (text, attempts, result) = check_stream("cut", &messages);
    assert_eq!(attempts.last(), Some(&2), "restarted as attempt 2");
    assert!(messages.iter().any(|d| kind(d) == "restart"));
    assert_eq!(result["status"], "ok", "{result}");
    assert_eq!(result["attempts"], 2);
    assert_eq!(result["content"], text.as_str());
    assert!(text.ends_with("until the end"), "{text}");
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

/// A stream cancelled by its caller stops: its deltas end, `cancelled` comes last, and
/// nothing follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_ends_with_cancelled_and_nothing_after() {
    let env = TestEnv::new(MockOptions {
        chunk_ms: 200,
        ..Default::default()
    })
    .await;
    let reply = env.reply_queue().await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "stop-me", "prompt": "a long story that nobody will hear the end of, for it goes on and on, word after word, for many seconds yet", "stream": true}),
        BasicProperties::default()
            .with_reply_to(reply.as_str().into())
            .with_correlation_id("stop-me".into()),
    )
    .await;
    let first = env.take(&reply, 1, Duration::from_secs(30)).await;
    assert_eq!(kind(&first[0]), "delta", "the stream is running");
    llmq::tools::client::cancel(&env.config, "stop-me")
        .await
        .expect("cancel sent");
    let by_request = collect(&env, &reply, 1, Duration::from_secs(30)).await;
    let messages = &by_request["stop-me"];
    let (last, deltas) = messages.split_last().expect("messages");
    let result = json(&last.data);
    assert_eq!(result["status"], "cancelled", "{result}");
    assert!(deltas.iter().all(|d| kind(d) == "delta"));
    // Once the worker has stopped, nothing of this request can still be on its way.
    worker.stop().await.expect("worker stops");
    assert_eq!(
        env.queue_len(&reply).await,
        0,
        "nothing after the cancelled notice"
    );
    env.cleanup().await;
}

/// With the Redis store, two replicas given the same streamed request at once (published
/// twice, each replica taking one copy) never stream it both: one calls and streams, the other finds its lease, waits in
/// the retry queue and then sends the stored result. On the reply queue, each `seq` of
/// attempt 1 arrives once, then two equal results. (With the memory store each replica keeps
/// its own leases, and both could stream it, with the same numbers: see Delivery
/// guarantees.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_two_replicas_never_stream_one_request_at_once() {
    let env = TestEnv::with(
        MockOptions {
            chunk_ms: 50,
            ..Default::default()
        },
        |c| {
            c.idempotency.store = llmq::config::StoreKind::Redis;
            // One delivery in hand per replica: the second copy goes to the other one.
            c.worker.consumers = 1;
            c.worker.prefetch = 1;
        },
    )
    .await;
    let reply = env.reply_queue().await;
    let replicas = ["a", "b"].map(|r| {
        let mut config = env.config.clone();
        config.worker.id = format!("{}-{r}", env.config.worker.id);
        env.start_worker_with(config)
    });
    let consumers = 2 * u32::from(env.config.worker.consumers);
    let work = env.config.topology.processing_queue.clone();
    crate::helpers::wait_until(
        Duration::from_secs(20),
        "both replicas consuming",
        || async {
            let ch = env.conn.create_channel().await.unwrap();
            let depth = llmq::broker::topology::queue_depth(&ch, &work)
                .await
                .unwrap();
            let _ = ch.close(200, "ok".into()).await;
            depth.consumers == consumers
        },
    )
    .await;
    let body = json!({"request_id": "twice", "prompt": "one story told once, in several words", "stream": true});
    for _ in 0..2 {
        env.publish_chat(
            &body,
            BasicProperties::default()
                .with_reply_to(reply.as_str().into())
                .with_correlation_id("corr".into()),
        )
        .await;
    }
    let by_request = collect(&env, &reply, 2, Duration::from_secs(60)).await;
    let messages = &by_request["corr"];
    let (results, stream): (Vec<&Delivery>, Vec<&Delivery>) =
        messages.iter().partition(|d| kind(d) == "llmq.result");
    let numbers: Vec<(u64, u64)> = stream
        .iter()
        .map(|d| {
            assert_eq!(kind(d), "delta", "no restart: one attempt");
            let b = json(&d.data);
            (b["attempt"].as_u64().unwrap(), b["seq"].as_u64().unwrap())
        })
        .collect();
    let expected: Vec<(u64, u64)> = (0..numbers.len() as u64).map(|seq| (1, seq)).collect();
    assert_eq!(numbers, expected, "one stream: each number once, in order");
    let contents: Vec<Value> = results
        .iter()
        .map(|d| json(&d.data)["content"].clone())
        .collect();
    let content = json!("mock reply to: one story told once, in several words");
    assert_eq!(contents, [content.clone(), content]);
    assert_eq!(
        env.mock
            .stats()
            .streams
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one upstream stream in the fleet"
    );
    for replica in replicas {
        replica.stop().await.expect("worker stops");
    }
    crate::helpers::delete_redis_keys(&env.config.idempotency.key_prefix).await;
    env.cleanup().await;
}
