//! Identity cannot be shed (`tenancy.require_user_id`): where tenants are configured, a
//! request without a `user_id` (or, behind a gateway, without the tenancy header) is
//! refused as `invalid_request` and dead-lettered without an upstream call, instead of
//! running as `anonymous` outside its tenant's limits and budget. Set to `false`, or
//! without any tenant, such a request is served as before.
//!
//! The identity sent is `llmq`, the user the tests connect as (the broker checks `user_id`
//! against the connection's user), so no broker user is made for these.

use std::{collections::BTreeMap, time::Duration};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use llmq::{
    config::{PriceConfig, Switch, TenantConfig, Usd},
    tools::mock::MockOptions,
};
use serde_json::{Value, json};

use crate::helpers::{TestEnv, header, json as parse_json};

/// The user the tests connect as: a `user_id` the broker accepts from them.
const CONNECTED_AS: &str = "llmq";

/// A tenant with a budget, as the hostile tenant has.
fn a_tenant_with_a_budget() -> BTreeMap<String, TenantConfig> {
    BTreeMap::from([(
        CONNECTED_AS.to_string(),
        TenantConfig {
            max_usd_per_day: Some(Usd::from_dollars(100.0).expect("an amount")),
            ..Default::default()
        },
    )])
}

/// A price for `model`, as a budget needs (and a small output bound, so that the budget
/// holds what a call may cost).
fn a_price_for(model: &str) -> BTreeMap<String, PriceConfig> {
    BTreeMap::from([(
        model.to_string(),
        PriceConfig {
            input_per_mtok: Usd::from_dollars(1.0).expect("a price"),
            output_per_mtok: Usd::from_dollars(1.0).expect("a price"),
            cached_input_per_mtok: None,
            max_output_tokens: Some(64),
        },
    )])
}

/// The one result on the results queue.
async fn one_result(env: &TestEnv) -> Value {
    let q = env.config.topology.results_queue.clone();
    let d = env.take(&q, 1, Duration::from_secs(30)).await;
    parse_json(&d[0].data)
}

/// A tenant is configured and `require_user_id` is left to its default: a request
/// without a `user_id` ends in the DLQ as `invalid_request` naming `user_id`, the mock is
/// never called for it; the same request with the tenant's `user_id` is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_user_id_is_refused_where_tenants_are_configured() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.tenants = a_tenant_with_a_budget();
        c.prices = a_price_for(&c.llm.model);
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "shed", "prompt": "who am I?"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(parse_json(&dead[0].data)["request_id"], "shed");
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("invalid_request")
    );
    let reason = header(&dead[0], "x-error").expect("a reason");
    assert_eq!(
        reason,
        "no identity: the message has no AMQP `user_id` property, and \
         tenancy.require_user_id refuses requests without one"
    );
    let refused = one_result(&env).await;
    assert_eq!(
        (
            refused["status"].as_str(),
            refused["error"]["kind"].as_str()
        ),
        (Some("error"), Some("invalid_request")),
        "{refused}"
    );
    assert_eq!(env.chat_calls(), 0, "no upstream call for it");

    env.publish_chat(
        &json!({"request_id": "kept", "prompt": "who am I?"}),
        BasicProperties::default().with_user_id(CONNECTED_AS.into()),
    )
    .await;
    let answered = one_result(&env).await;
    assert_eq!(answered["status"], "ok", "{answered}");
    assert_eq!(answered["tenant"], CONNECTED_AS);
    assert_eq!(env.chat_calls(), 1);
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}

/// Behind a gateway (`tenancy.header`), the header is the identity: a request that carries
/// the gateway's `user_id` but no header is refused naming both; with it, it is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_gateway_a_request_without_the_header_is_refused() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.tenancy.header = "x-tenant".into();
        c.tenants = a_tenant_with_a_budget();
        c.prices = a_price_for(&c.llm.model);
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "no-header", "prompt": "x"}),
        BasicProperties::default().with_user_id(CONNECTED_AS.into()),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("invalid_request")
    );
    let reason = header(&dead[0], "x-error").expect("a reason");
    assert!(
        reason.starts_with("no identity: the message has no `x-tenant` header")
            && reason.contains("`user_id`"),
        "{reason}"
    );
    let refused = one_result(&env).await;
    assert_eq!(refused["error"]["kind"], "invalid_request", "{refused}");
    assert_eq!(env.chat_calls(), 0, "no upstream call for it");

    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
    env.publish_chat(
        &json!({"request_id": "with-header", "prompt": "x"}),
        BasicProperties::default()
            .with_user_id(CONNECTED_AS.into())
            .with_headers(headers),
    )
    .await;
    let answered = one_result(&env).await;
    assert_eq!(answered["status"], "ok", "{answered}");
    assert_eq!(answered["tenant"], "acme");
    assert_eq!(env.chat_calls(), 1);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// `require_user_id = false` wins over configured tenants, and without tenants the
/// default is off: either way a request without a `user_id` is answered as `anonymous`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_requests_are_served_when_require_user_id_is_off() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.tenants = a_tenant_with_a_budget();
        c.prices = a_price_for(&c.llm.model);
        c.tenancy.require_user_id = Switch::Off;
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "anon-1", "prompt": "x"}),
        BasicProperties::default(),
    )
    .await;
    let answered = one_result(&env).await;
    assert_eq!(answered["status"], "ok", "{answered}");
    assert_eq!(answered["tenant"], "anonymous");
    worker.stop().await.unwrap();

    // The same topology, served by a worker configured without tenants and with the key
    // left to its default.
    let mut plain = env.config.clone();
    plain.tenants.clear();
    plain.tenancy.require_user_id = Switch::Auto;
    let worker = env.start_worker_with(plain);
    env.publish_chat(
        &json!({"request_id": "anon-2", "prompt": "x"}),
        BasicProperties::default(),
    )
    .await;
    let answered = one_result(&env).await;
    assert_eq!(answered["status"], "ok", "{answered}");
    assert_eq!(answered["request_id"], "anon-2");
    assert_eq!(env.chat_calls(), 2);
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0
    );
    env.cleanup().await;
}
