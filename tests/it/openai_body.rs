//! The OpenAI body as it is: a body posted as to `/v1/chat/completions` or `/v1/embeddings`
//! reaches the upstream with every field it has (those on the allowlist), a top-level
//! field that is neither llmq's nor allowed is refused by name, never dropped, and base64
//! embeddings come back as the upstream sent them. These assert on the bodies the mock
//! received, field by field.

use lapin::BasicProperties;
use llmq::tools::mock::{MockOptions, mock_embedding, mock_embedding_base64};
use serde_json::{Value, json};

use crate::helpers::TestEnv;

/// A mock that keeps every body it receives.
fn recording() -> MockOptions {
    MockOptions {
        record_bodies: true,
        ..Default::default()
    }
}

/// The bodies the mock received so far.
fn bodies(env: &TestEnv) -> Vec<Value> {
    env.mock
        .stats()
        .bodies
        .lock()
        .expect("not poisoned")
        .clone()
}

/// Publishes `body` as a chat request, checks that it was answered, and gives the bodies
/// the mock has received so far.
async fn answered(env: &TestEnv, body: Value) -> Vec<Value> {
    env.publish_chat(&body, BasicProperties::default()).await;
    let result = &env.results_by_id(1).await[0];
    assert_eq!(result["status"], "ok", "{result}");
    bodies(env)
}

/// The case: `seed`, `stop`, `top_p`, `max_completion_tokens`, `logit_bias` and
/// `user` at the top level reach the upstream, exactly, with nothing else added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_completions_body_reaches_the_upstream_whole() {
    let env = TestEnv::new(recording()).await;
    let worker = env.start_worker();
    let messages =
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]);
    let body = json!({
        "request_id": "openai-1",
        "model": "gpt-4o-mini",
        "messages": messages,
        "seed": 42,
        "stop": ["\n\n"],
        "top_p": 0.25,
        "max_completion_tokens": 64,
        "logit_bias": {"1234": -100},
        "user": "end-user-7",
        "stream_options": {"include_usage": true}
    });
    assert_eq!(
        answered(&env, body).await,
        [json!({
            "model": "gpt-4o-mini",
            "messages": messages,
            "seed": 42,
            "stop": ["\n\n"],
            "top_p": 0.25,
            "max_completion_tokens": 64,
            "logit_bias": {"1234": -100},
            "user": "end-user-7"
        })],
        "every field, as sent; stream_options only with a stream"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A top-level field off the allowlist (`store`, a typo) is refused by name before any
/// call; `llm.extra_allowed_params` allows one without restating the defaults, and it then
/// reaches the upstream with the default ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_top_level_field_is_refused_by_name_unless_allowed() {
    let env = TestEnv::with(recording(), |c| {
        c.llm.extra_allowed_params = vec!["prompt_cache_retention".into()];
    })
    .await;
    let worker = env.start_worker();
    let refused = [
        (
            json!({"request_id": "r-1", "prompt": "x", "store": true}),
            "field `store`: not a field of llmq's requests, nor a parameter in \
             llm.allowed_params or llm.extra_allowed_params",
        ),
        (
            json!({"request_id": "r-2", "promt": "typo", "prompt": "x"}),
            "field `promt`: not a field of llmq's requests, nor a parameter in \
             llm.allowed_params or llm.extra_allowed_params",
        ),
        (
            json!({"request_id": "r-3", "prompt": "x", "seed": 1, "params": {"seed": 2}}),
            "field `seed`: given at the top level and in `params` with different values \
             (1 and 2); give it once",
        ),
    ];
    env.refused_each(&refused).await;
    assert_eq!(env.chat_calls(), 0, "no call for any of them");

    let allowed =
        json!({"request_id": "a-1", "prompt": "x", "prompt_cache_retention": "24h", "seed": 3});
    assert_eq!(
        answered(&env, allowed).await,
        [json!({
            "model": env.config.llm.model,
            "messages": [{"role": "user", "content": "x"}],
            "prompt_cache_retention": "24h",
            "seed": 3
        })]
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// `encoding_format: "base64"` embeddings come back as the upstream sent them, a string
/// per vector, for a list and for a single input; a request without it, published beside
/// them, still gets numbers (it is not batched with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base64_embeddings_come_back_as_the_upstream_sent_them() {
    let env = TestEnv::new(recording()).await;
    let worker = env.start_worker();
    let key = env.config.topology.embeddings_key.clone();
    for body in [
        json!({"request_id": "b64-list", "kind": "embedding", "input": ["alpha", "beta"],
            "encoding_format": "base64", "dimensions": 8}),
        json!({"request_id": "b64-one", "kind": "embedding", "input": "gamma",
            "encoding_format": "base64", "dimensions": 8}),
        json!({"request_id": "floats", "kind": "embedding", "input": "delta"}),
    ] {
        env.publish(
            &key,
            body.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let results = env.results_by_id(3).await;
    let [list, one, floats] = &results[..] else {
        panic!("three results: {results:?}");
    };
    assert_eq!(list["status"], "ok", "{list}");
    assert_eq!(
        list["embeddings"],
        json!([
            mock_embedding_base64("alpha"),
            mock_embedding_base64("beta")
        ])
    );
    assert_eq!(
        one["embedding"],
        json!(mock_embedding_base64("gamma")),
        "{one}"
    );
    let numbers: Vec<f32> = serde_json::from_value(floats["embedding"].clone()).expect("numbers");
    assert_eq!(numbers, mock_embedding("delta"));

    let mut received = bodies(&env);
    received.sort_by_key(|b| b["input"].to_string());
    let model = &env.config.llm.embedding_model;
    let mut base64_inputs: Vec<Value> = received
        .iter()
        .filter(|b| b["encoding_format"] == "base64")
        .flat_map(|b| b["input"].as_array().cloned().unwrap_or_default())
        .collect();
    // Two requests batched together reach the upstream in the order they reached the
    // batcher, which concurrent deliveries do not fix.
    base64_inputs.sort_by_key(Value::to_string);
    assert_eq!(
        base64_inputs,
        [json!("alpha"), json!("beta"), json!("gamma")],
        "{received:?}"
    );
    for body in &received {
        let format = &body["encoding_format"];
        let expected_keys: &[&str] = if format == "base64" {
            &["dimensions", "encoding_format", "input", "model"]
        } else {
            &["input", "model"]
        };
        let mut keys: Vec<&str> = body
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, expected_keys, "{body}");
        assert_eq!(&body["model"], model);
    }
    assert_eq!(
        env.mock
            .stats()
            .embedding_items
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}
