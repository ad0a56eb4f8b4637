//! Requests as an attack surface: a `reply_to` naming llmq's own queues, caps, allowlists,
//! and upstream error text carrying a key. Each is refused (or scrubbed) before it can cost
//! money, plant a message or leak a secret.

use std::time::Duration;

use lapin::{BasicProperties, options::QueueDeclareOptions, types::FieldTable};
use llmq::{broker::topology::retry_queue, tools::mock::MockOptions};
use serde_json::json;

use crate::helpers::{TestEnv, header, json, unique};

/// An exclusive, auto-deleted queue `name` (empty: one the server names) on the test's
/// connection: gone with it, even when the test fails.
async fn exclusive_queue(env: &TestEnv, name: &str) -> String {
    env.channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .name()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_naming_an_llmq_queue_is_dead_lettered_and_nothing_lands_there() {
    let env = TestEnv::new(MockOptions::default()).await;
    let topo = env.config.topology.clone();
    let tier = retry_queue(&topo, "5s");
    let targets = [
        ("to-work", topo.processing_queue.clone()),
        ("to-tier", tier.clone()),
        ("to-dlq", topo.dead_letter_queue.clone()),
    ];
    let worker = env.start_worker();
    for (id, queue) in &targets {
        env.publish_chat(
            &json!({"prompt": "x", "request_id": id}),
            BasicProperties::default().with_reply_to(queue.as_str().into()),
        )
        .await;
    }
    let dead = env.dead_letters_by_id(3).await;
    let results = env.results_by_id(3).await;
    // Stopping drains in flight, so anything published anywhere has been by now.
    worker.stop().await.unwrap();
    let mut expected = targets.clone();
    expected.sort();
    for (((id, queue), d), result) in expected.iter().zip(&dead).zip(&results) {
        assert_eq!(json(&d.data)["request_id"], *id, "the request itself");
        assert_eq!(
            header(d, "x-error-kind").as_deref(),
            Some("invalid_request")
        );
        let reason = header(d, "x-error").unwrap();
        assert!(
            reason.starts_with(&format!(
                "reply_to {queue:?} names one of llmq's own queues"
            )),
            "{reason}"
        );
        assert_eq!(result["request_id"], *id);
        assert_eq!(result["status"], "error");
        assert_eq!(result["error"]["kind"], "invalid_request");
    }
    for queue in [
        &topo.processing_queue,
        &tier,
        &topo.dead_letter_queue,
        &topo.results_queue,
    ] {
        assert_eq!(env.queue_len(queue).await, 0, "{queue} holds nothing more");
    }
    assert_eq!(env.chat_calls(), 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_pattern_restricts_where_results_go() {
    let replies = unique("replies");
    let pattern = format!("{}\\..+", regex::escape(&replies));
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.worker.reply_to_pattern = pattern.clone();
    })
    .await;
    let allowed = exclusive_queue(&env, &format!("{replies}.mine")).await;
    let server_named = exclusive_queue(&env, "").await;
    assert!(server_named.starts_with("amq.gen-"), "{server_named}");
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "ok", "request_id": "allowed"}),
        BasicProperties::default().with_reply_to(allowed.as_str().into()),
    )
    .await;
    env.publish_chat(
        &json!({"prompt": "no", "request_id": "refused"}),
        BasicProperties::default().with_reply_to(server_named.as_str().into()),
    )
    .await;
    let reply = env.take(&allowed, 1, Duration::from_secs(30)).await;
    assert_eq!(json(&reply[0].data)["request_id"], "allowed");
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error").unwrap(),
        format!("reply_to {server_named:?} does not match worker.reply_to_pattern {pattern:?}")
    );
    // The refused one's error result goes to the results queue only; the allowed one's
    // result reached its reply_to, so it is not copied there.
    let (_, refused) = &env.results(1).await[0];
    assert_eq!(refused["request_id"], "refused");
    assert_eq!(refused["error"]["kind"], "invalid_request");
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&env.config.topology.results_queue).await,
        0,
        "no copy of the allowed one"
    );
    assert_eq!(env.queue_len(&server_named).await, 0, "nothing went there");
    assert_eq!(env.chat_calls(), 1);
    env.cleanup().await;
}

/// Where tenants are configured (so identities are required) and `worker.reply_to_pattern`
/// is left empty, a tenant's results go only to its own queues (`<identity>.<anything>`) or
/// to a queue the server named: a `reply_to` naming another tenant's queue is refused as
/// any refused `reply_to` is (dead letter, error result kept on the results queue), and
/// nothing reaches that queue. The tenant is `llmq`, the user the tests connect as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_s_results_stay_out_of_other_tenants_queues() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.tenants = [("llmq".to_string(), Default::default())].into();
    })
    .await;
    let others = exclusive_queue(&env, &format!("{}.results", unique("tenant-b"))).await;
    let own = exclusive_queue(&env, &format!("llmq.{}", unique("results"))).await;
    let server_named = exclusive_queue(&env, "").await;
    assert!(server_named.starts_with("amq.gen-"), "{server_named}");
    let worker = env.start_worker();
    for (id, queue) in [
        ("to-other", &others),
        ("to-own", &own),
        ("to-server-named", &server_named),
    ] {
        env.publish_chat(
            &json!({"prompt": id, "request_id": id}),
            BasicProperties::default()
                .with_user_id("llmq".into())
                .with_reply_to(queue.as_str().into()),
        )
        .await;
    }
    let dead = env.dead_letters(1).await;
    assert_eq!(json(&dead[0].data)["request_id"], "to-other");
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(
        header(&dead[0], "x-error").unwrap(),
        format!(
            "reply_to {others:?} does not match worker.reply_to_pattern \
             \"amq\\\\.gen-.+|{{identity}}\\\\..+\" for identity \"llmq\""
        )
    );
    let (_, refused) = &env.results(1).await[0];
    assert_eq!(refused["request_id"], "to-other");
    assert_eq!(refused["error"]["kind"], "invalid_request");
    for (queue, id) in [(&own, "to-own"), (&server_named, "to-server-named")] {
        let reply = env.take(queue, 1, Duration::from_secs(30)).await;
        let reply = json(&reply[0].data);
        assert_eq!(
            (&reply["request_id"], &reply["status"]),
            (&json!(id), &json!("ok"))
        );
    }
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&others).await,
        0,
        "nothing reached the other's queue"
    );
    assert_eq!(env.chat_calls(), 2, "no call for the refused one");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_and_allowlists_refuse_before_any_upstream_call() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.llm.allowed_models = vec!["mock-model".into()];
    })
    .await;
    let worker = env.start_worker();
    let cases = [
        (
            json!({"request_id": "c1", "prompt": "x", "max_tokens": 4_294_967_295u64}),
            "parameter `max_tokens`: 4294967295 is over llm.max_tokens_cap = 32768",
        ),
        (
            json!({"request_id": "c2", "prompt": "x", "params": {"n": 99}}),
            "parameter `n`: 99 is over llm.max_n = 4",
        ),
        (
            json!({"request_id": "c3", "prompt": "x", "params": {"store": true}}),
            "parameter `store` is not allowed (llm.allowed_params)",
        ),
        (
            json!({"request_id": "c4", "prompt": "x", "params": {"stream": true}}),
            "field `params.stream`: set by llmq, not allowed in params",
        ),
        (
            json!({"request_id": "c5", "prompt": "x", "model": "gpt-4-32k"}),
            "field `model`: \"gpt-4-32k\" is not one of llm.allowed_models",
        ),
    ];
    for result in env.refused_each(&cases).await {
        assert_eq!(result["error"]["kind"], "invalid_request");
    }
    worker.stop().await.unwrap();
    assert_eq!(env.chat_calls(), 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_upstream_errors_reach_neither_dead_letters_nor_results() {
    let env = TestEnv::new(MockOptions {
        error_rate: 1.0,
        status: 401,
        error_message: Some(
            "Incorrect API key provided: sk-proj-LEAKEDabc123. Authorization: Bearer LEAKEDtok"
                .into(),
        ),
        ..Default::default()
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"prompt": "x", "request_id": "leak-1"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("upstream_permanent")
    );
    let reason = header(&dead[0], "x-error").unwrap();
    assert!(
        !reason.contains("LEAKED") && reason.contains("sk-***") && reason.contains("Bearer ***"),
        "{reason}"
    );
    let (_, result) = &env.results(1).await[0];
    let text = result.to_string();
    assert!(!text.contains("LEAKED"), "{text}");
    assert!(
        result["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sk-***"),
        "{result}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}
