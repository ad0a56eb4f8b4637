//! Tenants: results name their tenant and cost; a tenant that has spent its budget is not
//! called (dead-lettered `budget_exceeded`, replayable by kind) while others go on; usage
//! is counted fleet-wide in Redis for `llmq usage`; a trusted header names the tenant.

use std::{collections::BTreeMap, time::Duration};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use llmq::{
    config::{PriceConfig, SecretUrl, TenantConfig, Usd},
    contract::ErrorKind,
    ops::{dlq, usage},
    tools::mock::MockOptions,
};
use serde_json::{Value, json};

use crate::helpers::{TestEnv, header, unique};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One request as `user`, and its result.
async fn ask(env: &TestEnv, user: &str, id: &str) -> Value {
    env.publish_chat(
        &json!({"request_id": id, "prompt": format!("question {id}")}),
        BasicProperties::default().with_user_id(user.into()),
    )
    .await;
    let q = env.config.topology.results_queue.clone();
    let d = env.take(&q, 1, Duration::from_secs(30)).await;
    crate::helpers::json(&d[0].data)
}

/// The cost of a result's usage at 1 USD per million prompt tokens and 2 per million
/// completion tokens, in micro-dollars: exact.
fn micros(result: &Value) -> u64 {
    let usage = &result["usage"];
    usage["prompt_tokens"].as_u64().expect("prompt tokens")
        + 2 * usage["completion_tokens"]
            .as_u64()
            .expect("completion tokens")
}

/// Alice's day budget runs out after a few answers: the next request is dead-lettered
/// `budget_exceeded` without a call, Bob goes on, and `llmq usage` shows what each spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_stops_its_tenant_only_with_exact_cost_arithmetic() {
    let prefix = unique("usage");
    let (alice, bob) = (unique("alice"), unique("bob"));
    let budget = 100u64;
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.limits.redis_url = SecretUrl::new(redis_url());
        c.limits.key_prefix = prefix.clone();
        c.prices = BTreeMap::from([(
            c.llm.model.clone(),
            PriceConfig {
                input_per_mtok: Usd::from_dollars(1.0).expect("a price"),
                output_per_mtok: Usd::from_dollars(2.0).expect("a price"),
                cached_input_per_mtok: None,
            },
        )]);
        c.tenants = BTreeMap::from([(
            alice.clone(),
            TenantConfig {
                max_usd_per_day: Some(Usd(budget)),
                ..Default::default()
            },
        )]);
    })
    .await;
    let worker = env.start_worker();
    let mut spent = 0u64;
    let mut answered = 0u64;
    while spent < budget {
        let r = ask(&env, &alice, &format!("a-{answered}")).await;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["tenant"], alice.as_str());
        let cost = micros(&r);
        assert_eq!(r["cost_usd"], json!(cost as f64 / 1e6), "{r}");
        spent += cost;
        answered += 1;
        assert!(answered < 50, "the budget is never reached");
    }
    let calls = env.chat_calls();
    let refused = ask(&env, &alice, "over").await;
    assert_eq!(refused["status"], "error", "{refused}");
    assert_eq!(refused["error"]["kind"], "budget_exceeded");
    assert_eq!(refused["tenant"], alice.as_str());
    let why = refused["error"]["message"].as_str().expect("a reason");
    assert!(
        why.contains(&format!(
            "{} of its max_usd_per_day {}",
            Usd(spent),
            Usd(budget)
        )),
        "{why}"
    );
    assert_eq!(env.chat_calls(), calls, "no call for a tenant over budget");
    let dead = dlq::list(&env.config, 10).await.expect("dlq list");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].request_id.as_str(), dead[0].error_kind.as_str()),
        ("over", "budget_exceeded")
    );
    // Another tenant is not stopped by Alice's budget.
    let b = ask(&env, &bob, "b-0").await;
    assert_eq!(b["status"], "ok", "{b}");
    assert_eq!(b["tenant"], bob.as_str());

    // The fleet's ledger, as `llmq usage` reads it.
    let (_, rows) = usage::usage(&env.config, None).await.expect("usage");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.tenant == name)
            .unwrap_or_else(|| panic!("{name} in {rows:?}"))
            .clone()
    };
    let a = row(&alice);
    assert_eq!(
        (a.today.usd, a.today.requests, a.month.requests),
        (spent as f64 / 1e6, answered, answered)
    );
    assert_eq!(row(&bob).today.requests, 1);
    let (_, only) = usage::usage(&env.config, Some(&bob)).await.expect("usage");
    assert_eq!(only.len(), 1);

    // Replayed by kind, it is refused again: the budget has not reset.
    let replayed = dlq::replay(
        &env.config,
        &dlq::Selection::Kind(ErrorKind::BudgetExceeded),
        false,
    )
    .await
    .expect("replay");
    assert_eq!(replayed.len(), 1);
    let again = env.dead_letters(1).await;
    assert_eq!(
        header(&again[0], "x-error-kind").as_deref(),
        Some("budget_exceeded")
    );
    assert_eq!(env.chat_calls(), calls + 1, "only Bob's call");

    worker.stop().await.expect("worker stops");
    crate::helpers::delete_redis_keys(&prefix).await;
    env.cleanup().await;
}

/// Behind a trusted gateway, `tenancy.header` names the tenant (and scopes the request id);
/// without it, the `user_id` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_header_names_the_tenant() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.tenancy.header = "x-tenant".into();
    })
    .await;
    let worker = env.start_worker();
    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), AMQPValue::LongString("carol".into()));
    env.publish_chat(
        &json!({"request_id": "same", "prompt": "from carol"}),
        BasicProperties::default().with_headers(headers),
    )
    .await;
    env.publish_chat(
        &json!({"request_id": "same", "prompt": "from the gateway itself"}),
        BasicProperties::default(),
    )
    .await;
    let mut tenants: Vec<String> = env
        .results(2)
        .await
        .into_iter()
        .map(|(_, r)| {
            assert_eq!(r["status"], "ok", "{r}");
            r["tenant"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    tenants.sort();
    // Two tenants: the same request id is each one's own, both called.
    assert_eq!(tenants, ["anonymous", "carol"]);
    assert_eq!(env.chat_calls(), 2);
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}
