//! The whole answer: tool calls, a multi-turn tool conversation and several choices reach
//! the caller as the upstream gave them.

use std::time::Duration;

use crate::helpers::{TestEnv, header};
use lapin::BasicProperties;
use llmq::tools::mock::MockOptions;
use serde_json::{Value, json};

fn weather_tool() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }
    }])
}

async fn one_result(env: &TestEnv) -> Value {
    let q = env.config.topology.results_queue.clone();
    let d = env.take(&q, 1, Duration::from_secs(30)).await;
    crate::helpers::json(&d[0].data)
}

/// A request with tools gets the model's tool calls verbatim, `content: null` and
/// `finish_reason: "tool_calls"`; the conversation goes on with the tool's answer, through
/// an assistant message with `tool_calls` and `content: null` and a `tool` message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_and_a_multi_turn_tool_conversation() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "tools-1", "prompt": "Weather in Paris?", "tools": weather_tool(), "tool_choice": "auto"}),
        BasicProperties::default(),
    )
    .await;
    let r = one_result(&env).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r["content"].is_null(), "content is null, and present: {r}");
    assert!(r.as_object().unwrap().contains_key("content"));
    assert_eq!(r["finish_reason"], "tool_calls");
    let calls = r["tool_calls"].as_array().expect("tool_calls");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["id"], "call_mock_0");
    assert!(r.get("choices").is_none(), "one choice, no logprobs: {r}");

    let conversation = json!({
        "request_id": "tools-2",
        "tools": weather_tool(),
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_mock_0", "content": "{\"temp_c\": 18}"}
        ]
    });
    env.publish_chat(&conversation, BasicProperties::default())
        .await;
    let r = one_result(&env).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["content"], "mock reply to: {\"temp_c\": 18}");
    assert_eq!(r["finish_reason"], "stop");
    assert!(r.get("tool_calls").is_none());

    // A tool message that names no call it answers is refused before any call.
    let calls_before = env.chat_calls();
    let orphan = json!({
        "request_id": "tools-3",
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "tool", "content": "18 degrees"}
        ]
    });
    env.publish_chat(&orphan, BasicProperties::default()).await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("invalid_request")
    );
    assert!(
        header(&dead[0], "x-error")
            .unwrap()
            .contains("messages[1].tool_call_id"),
        "{:?}",
        header(&dead[0], "x-error")
    );
    assert_eq!(env.chat_calls(), calls_before, "no call for it");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// `n: 2` keeps both choices verbatim; logprobs asked for keep the choices even for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_choices_are_all_kept() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "n2", "prompt": "two ways", "params": {"n": 2}}),
        BasicProperties::default(),
    )
    .await;
    let r = one_result(&env).await;
    let choices = r["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{r}");
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[1]["index"], 1);
    assert_eq!(
        choices[1]["message"]["content"],
        "mock reply to: two ways (choice 1)"
    );
    assert_eq!(
        r["content"], choices[0]["message"]["content"],
        "the first on top"
    );

    env.publish_chat(
        &json!({"request_id": "lp", "prompt": "sure?", "params": {"logprobs": true}}),
        BasicProperties::default(),
    )
    .await;
    let r = one_result(&env).await;
    let choices = r["choices"].as_array().expect("choices with logprobs");
    assert_eq!(choices.len(), 1);
    assert!(choices[0]["logprobs"]["content"].is_array(), "{r}");
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A request past its deadline (its own, or its age limit) is dead-lettered `expired` with
/// no upstream call; a call still running at the deadline is cut off there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_requests_are_never_called_and_late_calls_are_cut_off() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 30_000,
            ..MockOptions::default()
        },
        |c| c.worker.max_age_secs = 60,
    )
    .await;
    let worker = env.start_worker();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    env.publish_chat(
        &json!({"request_id": "late", "prompt": "x", "deadline": now - 1.0}),
        BasicProperties::default(),
    )
    .await;
    env.publish_chat(
        &json!({"request_id": "old", "prompt": "x", "timestamp": now - 120.0}),
        BasicProperties::default(),
    )
    .await;
    env.publish_chat(
        &json!({"request_id": "stale", "prompt": "x"}),
        BasicProperties::default().with_timestamp((now - 120.0) as u64),
    )
    .await;
    let dead = env.dead_letters(3).await;
    for d in &dead {
        assert_eq!(header(d, "x-error-kind").as_deref(), Some("expired"));
    }
    assert_eq!(env.chat_calls(), 0, "no call for an expired request");
    let q = env.config.topology.results_queue.clone();
    for d in env.take(&q, 3, Duration::from_secs(10)).await {
        let r = crate::helpers::json(&d.data);
        assert_eq!(r["error"]["kind"], "expired", "{r}");
    }

    // The mock takes 30 s, the deadline is 3 s away: only a cut-off call ends in a dead
    // letter (a finished one would be an ok result, 30 s later).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    env.publish_chat(
        &json!({"request_id": "slow", "prompt": "x", "deadline": now + 3.0}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(header(&dead[0], "x-error-kind").as_deref(), Some("expired"));
    assert!(
        header(&dead[0], "x-error").unwrap().contains("cut off"),
        "{:?}",
        header(&dead[0], "x-error")
    );
    assert_eq!(env.chat_calls(), 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}
