//! Budgets are reservations (issue 20): before a call, what it may cost at most is held
//! against its tenant's budgets, atomically across replicas through Redis, and settled to
//! its real cost after; a tenant under a budget is never called for a model without a
//! price, and a request without an output bound is given one; every answer is paid for.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use llmq::{
    config::{PriceConfig, SecretUrl, TenantConfig, Usd},
    store::keys,
    tenant::spend::Period,
    tools::mock::MockOptions,
};
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::helpers::{TestEnv, delete_redis_keys, redis, redis_url, unique};

/// A price of `output` dollars per completion token and nothing for the prompt, and
/// `max_output_tokens`.
fn per_output_token(output: f64, max_output_tokens: Option<u64>) -> PriceConfig {
    PriceConfig {
        input_per_mtok: Usd::ZERO,
        output_per_mtok: Usd::from_dollars(output * 1e6).expect("a price"),
        cached_input_per_mtok: None,
        max_output_tokens,
    }
}

/// An env whose model costs `price` and whose `tenant` has a day's budget of `dollars`,
/// kept in Redis under `prefix`.
async fn env_with_budget(
    mock: MockOptions,
    prefix: &str,
    tenant: &str,
    dollars: f64,
    price: PriceConfig,
) -> TestEnv {
    TestEnv::with(mock, |c| {
        c.limits.redis_url = SecretUrl::new(redis_url());
        c.limits.key_prefix = prefix.to_string();
        c.prices = BTreeMap::from([(c.llm.model.clone(), price)]);
        c.tenants = BTreeMap::from([(
            tenant.to_string(),
            TenantConfig {
                max_usd_per_day: Some(Usd::from_dollars(dollars).expect("a budget")),
                ..Default::default()
            },
        )]);
    })
    .await
}

/// The properties of a request published as `tenant`.
fn as_tenant(tenant: &str) -> BasicProperties {
    BasicProperties::default().with_user_id(tenant.into())
}

/// Publishes `body` as `tenant`'s chat request and takes the one result.
async fn answer(env: &TestEnv, tenant: &str, body: Value) -> Value {
    env.publish_chat(&body, as_tenant(tenant)).await;
    env.results(1).await.remove(0).1
}

/// Removes what the test left in Redis under `prefix`, and its queues.
async fn clean_up(env: TestEnv, prefix: &str) {
    delete_redis_keys(prefix).await;
    env.cleanup().await;
}

/// What the fleet's ledger holds as `tenant`'s spend today, micro-dollars.
async fn spent_today(prefix: &str, tenant: &str) -> i64 {
    let day = Period::at(llmq::runtime::clock::unix_now()).day;
    let spent: Option<i64> = redis()
        .await
        .hget(keys::usage(prefix, &day), keys::usage_field("usd", tenant))
        .await
        .expect("hget");
    spent.unwrap_or(0)
}

/// Two replicas share Redis; a tenant at $90 of its $100 publishes 40 requests of $10 each
/// at once: exactly one more is answered, the rest are `budget_exceeded` without a call,
/// and its spend ends at $100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_spend_past_a_budget_under_concurrency() {
    let prefix = unique("reserve");
    let tenant = unique("spender");
    // "mock reply to: q-NN" is 19 bytes: 4 tokens at the mock's 4 bytes a token, the bound
    // each request sets; $2.50 a completion token makes each answer $10, and what is held
    // for it $10.
    let price = per_output_token(2.5, None);
    let env = env_with_budget(MockOptions::default(), &prefix, &tenant, 100.0, price).await;
    let day = Period::at(llmq::runtime::clock::unix_now());
    let mut conn = redis().await;
    for period in [&day.day, &day.month] {
        let _: () = conn
            .hset(
                keys::usage(&prefix, period),
                keys::usage_field("usd", &tenant),
                90_000_000i64,
            )
            .await
            .expect("hset");
    }
    let replicas = crate::tenants::two_replicas(&env).await;
    let bodies: Vec<Value> = (0..40)
        .map(|i| json!({"request_id": format!("q-{i:02}"), "prompt": format!("q-{i:02}"), "max_tokens": 4}))
        .collect();
    let publishes = bodies
        .iter()
        .map(|body| env.publish_chat(body, as_tenant(&tenant)));
    futures_util::future::join_all(publishes).await;
    let results = env.results(40).await;
    let ok: Vec<&Value> = results
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r["status"] == "ok")
        .collect();
    assert_eq!(ok.len(), 1, "exactly one more fits: {results:?}");
    assert_eq!(ok[0]["cost_usd"], json!(10.0), "{}", ok[0]);
    for (_, r) in results.iter().filter(|(_, r)| r["status"] != "ok") {
        assert_eq!(r["error"]["kind"], "budget_exceeded", "{r}");
    }
    assert_eq!(
        env.chat_calls(),
        1,
        "no call for a request that did not fit"
    );
    assert_eq!(spent_today(&prefix, &tenant).await, 100_000_000);
    for (_, worker) in replicas {
        worker.stop().await.expect("worker stops");
    }
    clean_up(env, &prefix).await;
}

/// Under a budget, a model without a price (and no `[prices.default]`) is refused by name
/// without a call; with `[prices.default]` it is called and priced by it. A tenant without
/// a budget is called either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpriced_model_is_refused_under_a_budget_unless_a_default_price_exists() {
    let prefix = unique("unpriced");
    let (tenant, free) = (unique("payer"), unique("free"));
    let price = per_output_token(0.001, Some(16));
    let env = env_with_budget(MockOptions::default(), &prefix, &tenant, 100.0, price).await;
    let worker = env.start_worker();
    let unpriced = |id: &str| json!({"request_id": id, "prompt": "hi", "model": "no-price-model"});
    let refused = answer(&env, &tenant, unpriced("unpriced")).await;
    assert_eq!(refused["error"]["kind"], "invalid_request", "{refused}");
    let why = refused["error"]["message"].as_str().expect("a reason");
    assert!(
        why.contains("model \"no-price-model\" has no price"),
        "{why}"
    );
    assert_eq!(env.chat_calls(), 0);
    let answered = answer(&env, &free, unpriced("free")).await;
    assert_eq!(answered["status"], "ok", "{answered}");
    assert_eq!(env.chat_calls(), 1);
    worker.stop().await.expect("worker stops");

    // With a default row, the same request is called and priced by it.
    let mut config = env.config.clone();
    config
        .prices
        .insert("default".into(), per_output_token(0.5, Some(16)));
    let worker = env.start_worker_with(config);
    let priced = answer(&env, &tenant, unpriced("default-priced")).await;
    assert_eq!(priced["status"], "ok", "{priced}");
    let tokens = priced["usage"]["completion_tokens"]
        .as_u64()
        .expect("tokens");
    assert_eq!(priced["cost_usd"], json!(tokens as f64 * 0.5), "{priced}");
    worker.stop().await.expect("worker stops");
    clean_up(env, &prefix).await;
}

/// Under a budget, a chat request without `max_tokens` is sent with the model's
/// `max_output_tokens` (the mock stops there: `finish_reason` `length`), and one asking for
/// more is lowered to it; without a budget and without a known bound nothing is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_under_a_budget_is_sent_with_an_output_bound() {
    let prefix = unique("bound");
    let tenant = unique("bounded");
    let price = per_output_token(0.000_001, Some(3));
    let env = env_with_budget(MockOptions::default(), &prefix, &tenant, 100.0, price).await;
    let worker = env.start_worker();
    // The request `id`, with `max_tokens` only when given.
    let body = |id: &str, max_tokens: Option<u64>| {
        let mut body = json!({
            "request_id": id,
            "prompt": "a question long enough that the reply is cut"
        });
        if let Some(max_tokens) = max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }
        body
    };
    for (id, max_tokens) in [("unset", None), ("larger", Some(500))] {
        let r = answer(&env, &tenant, body(id, max_tokens)).await;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["usage"]["completion_tokens"], 3, "{id}: {r}");
        assert_eq!(r["finish_reason"], "length", "{id}: {r}");
    }
    // Another tenant has no budget: no bound is added, but one larger than the model's
    // is still lowered to it.
    let other = unique("nobudget");
    for (id, max_tokens, finish) in [
        ("other-unset", None, "stop"),
        ("other-larger", Some(500), "length"),
    ] {
        let r = answer(&env, &other, body(id, max_tokens)).await;
        assert_eq!(r["finish_reason"], finish, "{id}: {r}");
    }
    worker.stop().await.expect("worker stops");
    clean_up(env, &prefix).await;
}

/// An answer that comes without `usage` is charged what was held for it, never refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_usage_is_charged_what_it_held() {
    let prefix = unique("nousage");
    let tenant = unique("unmetered");
    let mock = MockOptions {
        no_usage: true,
        ..MockOptions::default()
    };
    let price = per_output_token(0.25, Some(100));
    let env = env_with_budget(mock, &prefix, &tenant, 1000.0, price).await;
    let worker = env.start_worker();
    let body = json!({"request_id": "u1", "prompt": "hi", "max_tokens": 8});
    let r = answer(&env, &tenant, body).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r.get("usage").is_none_or(Value::is_null), "{r}");
    // 8 tokens at $0.25: what was held, and what is spent.
    assert_eq!(r["cost_usd"], json!(2.0), "{r}");
    assert_eq!(spent_today(&prefix, &tenant).await, 2_000_000);
    worker.stop().await.expect("worker stops");
    clean_up(env, &prefix).await;
}

/// Bytes of the text a delta carried: every string in its `delta` but the role.
fn text_bytes(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.len() as u64,
        Value::Array(items) => items.iter().map(text_bytes).sum(),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| *k != "role")
            .map(|(_, v)| text_bytes(v))
            .sum(),
        _ => 0,
    }
}

/// A stream cut by its deadline after sending deltas is charged for what it streamed (4
/// bytes a token), not refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_is_charged_for_what_it_streamed() {
    let prefix = unique("cutstream");
    let tenant = unique("streamer");
    let mock = MockOptions {
        chunk_ms: 300,
        ..MockOptions::default()
    };
    let price = per_output_token(1.0, None);
    let env = env_with_budget(mock, &prefix, &tenant, 100_000.0, price).await;
    let reply = env.reply_queue().await;
    let worker = env.start_worker();
    let now = llmq::runtime::clock::unix_now_ms() as f64 / 1000.0;
    env.publish_chat(
        &json!({"request_id": "cut", "prompt": "a long story that goes on and on, word after word, for many seconds yet", "stream": true, "max_tokens": 1000, "deadline": now + 2.5}),
        as_tenant(&tenant).with_reply_to(reply.as_str().into()),
    )
    .await;
    // Deltas until the result (the deadline's error) comes.
    let mut streamed = 0;
    let mut deltas = 0;
    loop {
        let d = env
            .take(&reply, 1, std::time::Duration::from_secs(30))
            .await
            .remove(0);
        let body = crate::helpers::json(&d.data);
        if body["status"] == "delta" {
            deltas += 1;
            streamed += text_bytes(&body["delta"]);
            continue;
        }
        assert_eq!(body["status"], "error", "{body}");
        break;
    }
    assert!(
        deltas > 0 && streamed > 0,
        "the stream ran before its deadline"
    );
    worker.stop().await.expect("worker stops");
    // $1 a completion token, nothing for the prompt.
    assert_eq!(
        spent_today(&prefix, &tenant).await,
        i64::try_from(streamed.div_ceil(4) * 1_000_000).expect("micros")
    );
    clean_up(env, &prefix).await;
}
