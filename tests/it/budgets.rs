//! Budgets are reservations (issue 20): before a call, what it may cost at most is held
//! against its tenant's budgets, atomically across replicas through Redis, and settled to
//! its real cost after; a tenant under a budget is never called for a model without a
//! price, and a request without an output bound is given one; every answer is paid for.

use std::collections::BTreeMap;

use lapin::BasicProperties;
use llmq::{
    config::{Config, PriceConfig, SecretUrl, TenantConfig, Usd},
    store::keys,
    tenant::spend::Period,
    tools::mock::MockOptions,
};
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::helpers::{TestEnv, unique};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

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

/// `tenant` with a day's budget of `dollars`, through Redis under `prefix`, with `prices`.
fn budgeted(
    c: &mut Config,
    prefix: &str,
    tenant: &str,
    dollars: f64,
    prices: BTreeMap<String, PriceConfig>,
) {
    c.limits.redis_url = SecretUrl::new(redis_url());
    c.limits.key_prefix = prefix.to_string();
    c.prices = prices;
    c.tenants = BTreeMap::from([(
        tenant.to_string(),
        TenantConfig {
            max_usd_per_day: Some(Usd::from_dollars(dollars).expect("a budget")),
            ..Default::default()
        },
    )]);
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
    let env = TestEnv::with(MockOptions::default(), |c| {
        // "mock reply to: q-NN" is 19 bytes: 4 tokens at the mock's 4 bytes a token, the
        // bound each request sets; $2.50 a completion token makes each answer $10, and
        // what is held for it $10.
        let prices = BTreeMap::from([(c.llm.model.clone(), per_output_token(2.5, None))]);
        budgeted(c, &prefix, &tenant, 100.0, prices);
    })
    .await;
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
    let publishes = bodies.iter().map(|body| {
        env.publish_chat(
            body,
            BasicProperties::default().with_user_id(tenant.as_str().into()),
        )
    });
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
    crate::helpers::delete_redis_keys(&prefix).await;
    env.cleanup().await;
}

/// Under a budget, a model without a price (and no `[prices.default]`) is refused by name
/// without a call; with `[prices.default]` it is called and priced by it. A tenant without
/// a budget is called either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpriced_model_is_refused_under_a_budget_unless_a_default_price_exists() {
    let prefix = unique("unpriced");
    let (tenant, free) = (unique("payer"), unique("free"));
    let env = TestEnv::with(MockOptions::default(), |c| {
        let prices = BTreeMap::from([(c.llm.model.clone(), per_output_token(0.001, Some(16)))]);
        budgeted(c, &prefix, &tenant, 100.0, prices);
    })
    .await;
    let worker = env.start_worker();
    let at = &env;
    let ask = |id: &str, user: &str| {
        let body = json!({"request_id": id, "prompt": "hi", "model": "no-price-model"});
        let props = BasicProperties::default().with_user_id(user.into());
        async move { at.publish_chat(&body, props).await }
    };
    ask("unpriced", &tenant).await;
    let (_, refused) = env.results(1).await.remove(0);
    assert_eq!(refused["error"]["kind"], "invalid_request", "{refused}");
    let why = refused["error"]["message"].as_str().expect("a reason");
    assert!(
        why.contains("model \"no-price-model\" has no price"),
        "{why}"
    );
    assert_eq!(env.chat_calls(), 0);
    ask("free", &free).await;
    let (_, answered) = env.results(1).await.remove(0);
    assert_eq!(answered["status"], "ok", "{answered}");
    assert_eq!(env.chat_calls(), 1);
    worker.stop().await.expect("worker stops");

    // With a default row, the same request is called and priced by it.
    let mut config = env.config.clone();
    config
        .prices
        .insert("default".into(), per_output_token(0.5, Some(16)));
    let worker = env.start_worker_with(config);
    ask("default-priced", &tenant).await;
    let (_, priced) = env.results(1).await.remove(0);
    assert_eq!(priced["status"], "ok", "{priced}");
    let tokens = priced["usage"]["completion_tokens"]
        .as_u64()
        .expect("tokens");
    assert_eq!(priced["cost_usd"], json!(tokens as f64 * 0.5), "{priced}");
    worker.stop().await.expect("worker stops");
    crate::helpers::delete_redis_keys(&prefix).await;
    env.cleanup().await;
}

/// Under a budget, a chat request without `max_tokens` is sent with the model's
/// `max_output_tokens` (the mock stops there: `finish_reason` `length`), and one asking for
/// more is lowered to it; without a budget and without a known bound nothing is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_under_a_budget_is_sent_with_an_output_bound() {
    let prefix = unique("bound");
    let tenant = unique("bounded");
    let env = TestEnv::with(MockOptions::default(), |c| {
        let prices = BTreeMap::from([(c.llm.model.clone(), per_output_token(0.000_001, Some(3)))]);
        budgeted(c, &prefix, &tenant, 100.0, prices);
    })
    .await;
    let worker = env.start_worker();
    let prompt = "a question long enough that the reply is cut";
    for (id, extra) in [("unset", json!({})), ("larger", json!({"max_tokens": 500}))] {
        let mut body = json!({"request_id": id, "prompt": prompt});
        body.as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
        env.publish_chat(
            &body,
            BasicProperties::default().with_user_id(tenant.as_str().into()),
        )
        .await;
        let (_, r) = env.results(1).await.remove(0);
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["usage"]["completion_tokens"], 3, "{id}: {r}");
        assert_eq!(r["finish_reason"], "length", "{id}: {r}");
    }
    // Another tenant has no budget: no bound is added, but one larger than the model's
    // is still lowered to it.
    let other = unique("nobudget");
    for (id, extra, finish) in [
        ("other-unset", json!({}), "stop"),
        ("other-larger", json!({"max_tokens": 500}), "length"),
    ] {
        let mut body = json!({"request_id": id, "prompt": prompt});
        body.as_object_mut()
            .expect("an object")
            .extend(extra.as_object().expect("an object").clone());
        env.publish_chat(
            &body,
            BasicProperties::default().with_user_id(other.as_str().into()),
        )
        .await;
        let (_, r) = env.results(1).await.remove(0);
        assert_eq!(r["finish_reason"], finish, "{id}: {r}");
    }
    worker.stop().await.expect("worker stops");
    crate::helpers::delete_redis_keys(&prefix).await;
    env.cleanup().await;
}

/// An answer that comes without `usage` is charged what was held for it, never refunded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_without_usage_is_charged_what_it_held() {
    let prefix = unique("nousage");
    let tenant = unique("unmetered");
    let env = TestEnv::with(
        MockOptions {
            no_usage: true,
            ..MockOptions::default()
        },
        |c| {
            let prices = BTreeMap::from([(c.llm.model.clone(), per_output_token(0.25, Some(100)))]);
            budgeted(c, &prefix, &tenant, 1000.0, prices);
        },
    )
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "u1", "prompt": "hi", "max_tokens": 8}),
        BasicProperties::default().with_user_id(tenant.as_str().into()),
    )
    .await;
    let (_, r) = env.results(1).await.remove(0);
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r.get("usage").is_none_or(Value::is_null), "{r}");
    // 8 tokens at $0.25: what was held, and what is spent.
    assert_eq!(r["cost_usd"], json!(2.0), "{r}");
    assert_eq!(spent_today(&prefix, &tenant).await, 2_000_000);
    worker.stop().await.expect("worker stops");
    crate::helpers::delete_redis_keys(&prefix).await;
    env.cleanup().await;
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
    let env = TestEnv::with(
        MockOptions {
            chunk_ms: 300,
            ..MockOptions::default()
        },
        |c| {
            let prices = BTreeMap::from([(c.llm.model.clone(), per_output_token(1.0, None))]);
            budgeted(c, &prefix, &tenant, 100_000.0, prices);
        },
    )
    .await;
    let reply = env
        .channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("a reply queue")
        .name()
        .to_string();
    let worker = env.start_worker();
    let now = llmq::runtime::clock::unix_now_ms() as f64 / 1000.0;
    env.publish_chat(
        &json!({"request_id": "cut", "prompt": "a long story that goes on and on, word after word, for many seconds yet", "stream": true, "max_tokens": 1000, "deadline": now + 2.5}),
        BasicProperties::default()
            .with_user_id(tenant.as_str().into())
            .with_reply_to(reply.as_str().into()),
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
    crate::helpers::delete_redis_keys(&prefix).await;
    env.cleanup().await;
}
