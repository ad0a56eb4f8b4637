//! Routing that must not lose messages: a returned message fails exactly the publish it
//! belongs to; a dead letter, a retry or a result whose queue is missing is not acked and
//! arrives once the queue is back; the quorum retry tiers hold a request until its work queue
//! exists again; the alternate exchange set by policy keeps what nothing routes.

use std::time::Duration;

use crate::helpers::{Policy, TestEnv, amqp_url, exactly, header, unique, wait_until};
use lapin::{
    BasicProperties, Connection, ConnectionProperties, ExchangeKind,
    options::{
        ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
        QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use llmq::{
    app::App,
    broker::{
        publish::{PublishError, publish_confirmed},
        topology,
    },
    config::StoreKind,
    tools::mock::MockOptions,
};
use serde_json::json;

/// The worker with its admin server; returns the `/metrics` URL.
async fn worker_with_metrics(
    env: &TestEnv,
) -> (
    String,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<()>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let app = App::start(env.config.clone(), stop.clone()).await.unwrap();
    let addr = app
        .admin_addr()
        .expect("admin.addr is set by the test config");
    (
        format!("http://{addr}/metrics"),
        stop,
        tokio::spawn(async move { app.run().await.expect("the worker runs") }),
    )
}

/// A counter's value in the Prometheus text at `url` (0 when absent).
async fn counter(url: &str, series: &str) -> u64 {
    llmq::install_crypto_provider();
    let Ok(r) = reqwest::get(url).await else {
        return 0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn stop_worker(stop: tokio_util::sync::CancellationToken, task: tokio::task::JoinHandle<()>) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("worker stops within 30 s")
        .expect("worker task does not panic");
}

/// Waits until the worker consumes (it has declared the topology by then).
async fn consuming(env: &TestEnv) {
    let queue = env.config.topology.processing_queue.clone();
    wait_until(Duration::from_secs(15), "the worker consuming", || async {
        let ch = env.conn.create_channel().await.unwrap();
        let depth = topology::queue_depth(&ch, &queue).await;
        let _ = ch.close(200, "ok".into()).await;
        depth.is_ok_and(|d| d.consumers > 0)
    })
    .await;
}

async fn delete_queue(env: &TestEnv, queue: &str) {
    env.channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// Many rounds of concurrent publishes on one confirm channel, mandatory ones to a missing
/// route and to a bound queue, and non-mandatory ones to the missing route: exactly the
/// mandatory unroutable ones fail, as `Returned`, and every other one succeeds. lapin alone
/// hands a return to whichever confirm completes next, so without the publish ids some
/// routable publishes fail and some returned ones look confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn returns_fail_exactly_the_publish_they_belong_to() {
    const ROUNDS: usize = 40;
    const PER_ROUND: usize = 60;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (exchange, queue) = (unique("x"), unique("q"));
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "routed".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut routed = 0;
    let mut wrong = Vec::new();
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..PER_ROUND)
            .map(|i| {
                let (channel, exchange) = (channel.clone(), exchange.clone());
                // Persistent messages to a durable queue are confirmed after the disk write,
                // unroutable ones at once: their returns and acks interleave.
                let (key, mandatory) = match i % 3 {
                    0 => ("routed", true),
                    1 => ("nowhere", true),
                    _ => ("nowhere", false),
                };
                tokio::spawn(async move {
                    let props = BasicProperties::default().with_delivery_mode(2);
                    let body = format!("{round}-{i}");
                    let r = publish_confirmed(
                        &channel,
                        &exchange,
                        key,
                        mandatory,
                        body.as_bytes(),
                        props,
                    )
                    .await;
                    (i, key, mandatory, r)
                })
            })
            .collect();
        for task in tasks {
            let (i, key, mandatory, r) = task.await.unwrap();
            let right = matches!(
                (key, mandatory, &r),
                (
                    "nowhere",
                    true,
                    Err(PublishError::Returned { code: 312, .. })
                ) | ("routed", true, Ok(()))
                    | ("nowhere", false, Ok(()))
            );
            if key == "routed" {
                routed += 1;
            }
            if !right {
                wrong.push(format!(
                    "round {round} #{i} {key} mandatory={mandatory}: {r:?}"
                ));
            }
        }
    }
    let depth = topology::queue_depth(&channel, &queue).await.unwrap();
    delete_queue_and_exchange(&conn, &queue, &exchange).await;
    assert!(
        wrong.is_empty(),
        "{} wrong outcomes: {wrong:#?}",
        wrong.len()
    );
    assert_eq!(depth.messages, routed, "every routed publish arrived");
}

async fn delete_queue_and_exchange(conn: &Connection, queue: &str, exchange: &str) {
    let ch = conn.create_channel().await.unwrap();
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.into(), Default::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
}

/// The broker's resend interval of at-least-once dead letters (3 minutes by default), set
/// for one test; the old value is restored when dropped.
struct DeadLetterResend(String);

impl DeadLetterResend {
    const KEY: &str = "dead_letter_worker_publisher_confirm_timeout";

    fn set(ms: u64) -> Self {
        let old = eval(&format!("application:get_env(rabbit, {}).", Self::KEY));
        eval(&format!(
            "application:set_env(rabbit, {}, {ms}).",
            Self::KEY
        ));
        Self(old)
    }
}

impl Drop for DeadLetterResend {
    fn drop(&mut self) {
        let restore = match self.0.trim().strip_prefix("{ok,") {
            Some(v) => format!(
                "application:set_env(rabbit, {}, {}).",
                Self::KEY,
                v.trim_end_matches('}')
            ),
            None => format!("application:unset_env(rabbit, {}).", Self::KEY),
        };
        eval(&restore);
    }
}

/// `rabbitmqctl eval`; its output.
fn eval(expr: &str) -> String {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["eval", expr])
        .output()
        .expect("rabbitmqctl evaluates");
    assert!(out.status.success(), "eval {expr}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `messages` and `messages_ready` of `queue` as the broker's statistics show them (a quorum
/// queue counts a message waiting to be dead-lettered in the first, not the second).
fn broker_counts(queue: &str) -> Option<(u32, u32)> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name", "messages", "messages_ready"])
        .output()
        .expect("rabbitmqctl lists queues");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut parts = l.split('\t');
        (parts.next()? == queue).then_some(())?;
        Some((
            parts.next()?.trim().parse().ok()?,
            parts.next()?.trim().parse().ok()?,
        ))
    })
}

/// The quorum retry tiers dead-letter at least once: a request that expires in its tier while
/// its work queue is missing stays in the tier, and arrives once the queue is declared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_tier_hop_survives_a_deleted_work_queue() {
    // Before the tiers are declared: each tier's dead-letter process reads it when it starts.
    let _resend = DeadLetterResend::set(1000);
    let env = TestEnv::new(MockOptions::default()).await;
    let topo = env.config.topology.clone();
    delete_queue(&env, &topo.processing_queue).await;
    let tier = topology::retry_queue(&topo, "5s");
    let mut headers = FieldTable::default();
    headers.insert(
        llmq::contract::headers::RETRY_TIER.into(),
        AMQPValue::LongString("5s".into()),
    );
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers)
        .with_message_id("hop-1".into())
        .with_expiration("100".into());
    publish_confirmed(
        &env.channel,
        &topo.retry_exchange,
        &topo.processing_key,
        true,
        b"{\"prompt\": \"hop\"}",
        props,
    )
    .await
    .expect("the tier takes the retry");
    // Expired (not ready) but still held by the tier: the hop found no queue.
    // The broker's statistics lag by up to its `collect_statistics_interval` (5 s).
    wait_until(
        Duration::from_secs(60),
        "the expired request held in its tier",
        || async { broker_counts(&tier) == Some((1, 0)) },
    )
    .await;
    topology::declare(&env.channel, &topo).await.unwrap();
    let got = env
        .take(&topo.processing_queue, 1, Duration::from_secs(30))
        .await;
    assert_eq!(
        got[0].properties.message_id().as_ref().map(|s| s.as_str()),
        Some("hop-1")
    );
    assert_eq!(got[0].routing_key.as_str(), topo.processing_key);
    wait_until(Duration::from_secs(60), "the tier empty", || async {
        broker_counts(&tier) == Some((0, 0))
    })
    .await;
    assert_eq!(
        env.queue_len(&topo.processing_queue).await,
        0,
        "arrived once"
    );
    env.cleanup().await;
}

/// The DLQ is missing when a request must be dead-lettered: the dead letter comes back
/// unroutable, the request is not acked but handed back and tried again, and once the DLQ is
/// declared again it lands there, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_to_a_missing_dlq_is_not_acked_and_lands_once_it_exists() {
    let failing = MockOptions {
        error_rate: 1.0,
        status: 400,
        ..Default::default()
    };
    // No idempotency lease: a request whose dead letter failed is handed back with its lease
    // still held, and its redelivery would wait the lease out.
    let env = TestEnv::with(failing, |c| c.idempotency.store = StoreKind::Off).await;
    let topo = env.config.topology.clone();
    let worker = env.start_worker();
    consuming(&env).await;
    delete_queue(&env, &topo.dead_letter_queue).await;
    env.publish_chat(
        &json!({"prompt": "doomed", "request_id": "dl-1"}),
        BasicProperties::default(),
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the request handed back and tried again",
        || async { env.chat_calls() >= 2 },
    )
    .await;
    topology::declare(&env.channel, &topo).await.unwrap();
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("upstream_permanent")
    );
    assert_eq!(
        dead[0].properties.message_id().as_ref().map(|s| s.as_str()),
        None,
        "the request's own properties, unchanged"
    );
    assert_eq!(crate::helpers::json(&dead[0].data)["request_id"], "dl-1");
    worker.stop().await.unwrap();
    assert_eq!(
        env.queue_len(&topo.dead_letter_queue).await,
        0,
        "one dead letter"
    );
    assert_eq!(
        env.queue_len(&topo.processing_queue).await,
        0,
        "acked once dead-lettered"
    );
    env.cleanup().await;
}

/// The retry tier a request needs is missing: the retry comes back unroutable, the request is
/// handed back; once the tier is declared again the request waits there, hops back to its
/// work queue and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_to_a_missing_tier_is_not_acked_and_waits_there_once_it_exists() {
    let failing = MockOptions {
        error_rate: 1.0,
        status: 503,
        retry_after: Some(3),
        ..Default::default()
    };
    let env = TestEnv::with(failing, |c| {
        c.retry.max_attempts = 100;
        c.retry.inline_max_ms = 500;
    })
    .await;
    let topo = env.config.topology.clone();
    let tier = topology::retry_queue(&topo, "5s");
    let worker = env.start_worker();
    consuming(&env).await;
    delete_queue(&env, &tier).await;
    env.publish_chat(
        &json!({"prompt": "later", "request_id": "rt-1"}),
        BasicProperties::default(),
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the request handed back and tried again",
        || async { env.chat_calls() >= 2 },
    )
    .await;
    topology::declare(&env.channel, &topo).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the request waiting in its tier",
        || async { env.queue_len(&tier).await == 1 },
    )
    .await;
    env.mock.set_options(MockOptions::default());
    let results = env.results(1).await;
    assert_eq!(results[0].1["request_id"], "rt-1");
    assert_eq!(results[0].1["status"], "ok");
    worker.stop().await.unwrap();
    assert_eq!(env.queue_len(&topo.results_queue).await, 0, "one result");
    assert_eq!(env.queue_len(&tier).await, 0);
    assert_eq!(env.queue_len(&topo.processing_queue).await, 0);
    env.cleanup().await;
}

/// `llm_results` is missing while the worker keeps results: the result comes back
/// unroutable, the request is handed back (its stored result is published again, without
/// another upstream call), and the result arrives once the queue is declared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_to_a_missing_results_queue_is_not_acked_and_arrives_once_it_exists() {
    let env = TestEnv::new(MockOptions::default()).await;
    let topo = env.config.topology.clone();
    assert!(topo.keep_results.declares_queue());
    let (metrics, stop, task) = worker_with_metrics(&env).await;
    consuming(&env).await;
    delete_queue(&env, &topo.results_queue).await;
    env.publish_chat(
        &json!({"prompt": "answer me", "request_id": "rs-1"}),
        BasicProperties::default(),
    )
    .await;
    let received = "llmq_requests_received_total{kind=\"chat\"}";
    wait_until(
        Duration::from_secs(30),
        "the request handed back and received again",
        || async { counter(&metrics, received).await >= 2 },
    )
    .await;
    topology::declare(&env.channel, &topo).await.unwrap();
    let results = env.results(1).await;
    assert_eq!(results[0].1["request_id"], "rs-1");
    assert_eq!(results[0].1["status"], "ok");
    stop_worker(stop, task).await;
    assert_eq!(env.chat_calls(), 1, "the stored result was published again");
    assert_eq!(env.queue_len(&topo.results_queue).await, 0, "one result");
    assert_eq!(env.queue_len(&topo.processing_queue).await, 0);
    env.cleanup().await;
}

/// With the alternate-exchange policy (as `rabbitmq/definitions.json` sets it, here with a
/// pattern that matches only this test's exchanges), what the request and dead-letter
/// exchanges cannot route lands in the unroutable queue: a client's plain publish while the
/// work queue is missing, and a dead letter while the DLQ is missing (confirmed as routed).
/// The results exchange has no alternate exchange.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_messages_land_in_the_alternate_exchange_set_by_policy() {
    let env = TestEnv::new(MockOptions::default()).await;
    let topo = env.config.topology.clone();
    let _policy = Policy::set(
        "exchanges",
        &exactly(&[
            &topo.request_exchange,
            &topo.dead_letter_exchange,
            &topo.retry_exchange,
        ]),
        &json!({"alternate-exchange": topo.unroutable_exchange}),
    );
    delete_queue(&env, &topo.processing_queue).await;
    delete_queue(&env, &topo.dead_letter_queue).await;
    let client = env.conn.create_channel().await.unwrap();
    client
        .basic_publish(
            topo.request_exchange.as_str().into(),
            topo.processing_key.as_str().into(),
            Default::default(),
            b"{\"prompt\": \"no queue\"}",
            BasicProperties::default().with_message_id("ae-request".into()),
        )
        .await
        .unwrap();
    let dead = BasicProperties::default().with_message_id("ae-dead".into());
    let dlx = &topo.dead_letter_exchange;
    publish_confirmed(&env.channel, dlx, &topo.dead_letter_key, true, b"{}", dead)
        .await
        .expect("routed to the alternate exchange, so confirmed");
    let results = &topo.results_exchange;
    let returned = publish_confirmed(
        &env.channel,
        results,
        "nowhere",
        true,
        b"{}",
        Default::default(),
    )
    .await;
    assert!(
        matches!(returned, Err(PublishError::Returned { code: 312, .. })),
        "{returned:?}"
    );
    let got = env
        .take(&topo.unroutable_queue, 2, Duration::from_secs(10))
        .await;
    let mut seen: Vec<(String, String)> = got
        .iter()
        .map(|d| {
            let id = d.properties.message_id().as_ref().map(|s| s.to_string());
            (id.unwrap_or_default(), d.routing_key.to_string())
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("ae-dead".to_string(), topo.dead_letter_key.clone()),
            ("ae-request".to_string(), topo.processing_key.clone()),
        ]
    );
    assert_eq!(env.queue_len(&topo.unroutable_queue).await, 0);
    let _ = client.close(200, "ok".into()).await;
    env.cleanup().await;
}
