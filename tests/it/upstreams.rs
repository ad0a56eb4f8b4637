//! Upstreams as a fleet, against the real broker with several mock upstreams at once: rate
//! limits as flow control, spent accounts, failover, weights, fallbacks, the fleet-wide
//! state through Redis, and what an operator sees of it.

use std::{collections::HashMap, sync::atomic::Ordering::Relaxed, time::Duration};

use crate::helpers::{TestEnv, header, wait_until};
use lapin::BasicProperties;
use llmq::{
    app::App,
    config::{Config, SecretUrl, UpstreamConfig},
    tools::mock::{MockOptions, MockServer},
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A mock upstream on a free port.
async fn mock(options: MockOptions) -> MockServer {
    MockServer::start("127.0.0.1:0".parse().unwrap(), options)
        .await
        .expect("mock starts")
}

/// `[upstreams.<name>]` at `server`, serving `models` (empty: any), with `weight`.
fn upstream(server: &MockServer, models: &[&str], weight: u32) -> UpstreamConfig {
    UpstreamConfig {
        base_url: SecretUrl::new(server.base_url()),
        models: models.iter().map(|m| m.to_string()).collect(),
        weight,
        timeout_secs: 10,
        ..UpstreamConfig::default()
    }
}

fn calls(server: &MockServer) -> u64 {
    server.stats().chat_calls.load(Relaxed)
}

/// Publishes `n` chat requests `<prefix>-<i>` for `model`.
async fn publish(env: &TestEnv, prefix: &str, n: usize, model: &str) {
    for i in 0..n {
        env.publish_chat(
            &json!({"request_id": format!("{prefix}-{i}"), "model": model, "prompt": format!("{prefix} {i}")}),
            BasicProperties::default(),
        )
        .await;
    }
}

/// Takes `n` results, by request id.
async fn results(env: &TestEnv, n: usize, timeout: Duration) -> HashMap<String, Value> {
    let q = env.config.topology.results_queue.clone();
    let mut by_id = HashMap::new();
    for d in env.take(&q, n, timeout).await {
        let v = crate::helpers::json(&d.data);
        by_id.insert(v["request_id"].as_str().unwrap().to_string(), v);
    }
    assert_eq!(by_id.len(), n, "one result per request");
    by_id
}

/// How many results came from each upstream, and that every one is `ok`.
fn by_upstream(results: &HashMap<String, Value>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in results.values() {
        assert_eq!(r["status"], "ok", "{r}");
        *counts
            .entry(r["upstream"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    counts
}

/// A worker with its admin server; returns its base URL.
async fn start_with_admin(
    config: &Config,
) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let app = App::start(config.clone(), stop.clone()).await.unwrap();
    let addr = app
        .admin_addr()
        .expect("admin.addr is set by the test config");
    (
        format!("http://{addr}"),
        stop,
        tokio::spawn(async move { app.run().await.expect("the worker runs") }),
    )
}

async fn get(url: &str) -> String {
    llmq::install_crypto_provider();
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// 1. A 30% 429 storm (with `Retry-After: 1`) on both deployments: every request is
/// answered, with `retry.max_attempts = 1`, so a single 429 counted as an attempt would
/// dead-letter its request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_ends_in_answers_and_uses_no_attempts() {
    let storm = || MockOptions {
        error_rate: 0.3,
        status: 429,
        retry_after: Some(1),
        ..MockOptions::default()
    };
    let (a, b) = (mock(storm()).await, mock(storm()).await);
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.upstreams = [
            ("a".into(), upstream(&a, &[], 1)),
            ("b".into(), upstream(&b, &[], 1)),
        ]
        .into();
        c.retry.max_attempts = 1;
    })
    .await;
    let worker = env.start_worker();
    publish(&env, "storm", 40, "gpt-4o-mini").await;
    let results = results(&env, 40, Duration::from_secs(90)).await;
    let counts = by_upstream(&results);
    let throttled = a.stats().failures.load(Relaxed) + b.stats().failures.load(Relaxed);
    assert!(throttled >= 10, "the storm happened: {throttled} 429s");
    assert_eq!(
        calls(&a) + calls(&b),
        40 + throttled,
        "one answered call each"
    );
    for r in results.values() {
        assert_eq!(r["attempts"], 1, "429s are not attempts: {r}");
    }
    assert_eq!(counts.values().sum::<usize>(), 40);
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 1. Rate limits are bounded in time: past `retry.max_rate_limited_secs` the request is
/// dead-lettered as `rate_limited`, and its caller gets an error result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_rate_limits_end_as_rate_limited_dead_letters() {
    let env = TestEnv::with(
        MockOptions {
            error_rate: 1.0,
            status: 429,
            retry_after: Some(1),
            ..MockOptions::default()
        },
        |c| c.retry.max_rate_limited_secs = 2,
    )
    .await;
    let worker = env.start_worker();
    publish(&env, "limited", 1, "gpt-4o-mini").await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("rate_limited")
    );
    let result = results(&env, 1, Duration::from_secs(10)).await;
    assert_eq!(result["limited-0"]["error"]["kind"], "rate_limited");
    let made = env.chat_calls();
    assert!(
        (2..=4).contains(&made),
        "one call per Retry-After for 2 s: {made}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 1. An outage reads as an outage: with the only deployment answering 500 to everything,
/// its breaker opens and the requests wait without using attempts, then end as
/// `upstream_unavailable` (not `rate_limited`, though `retry.max_rate_limited_secs` is as
/// short), each with the attempts it really made and no more. Once the upstream is back,
/// `llmq dlq replay --kind upstream_unavailable` gets them answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_ends_as_upstream_unavailable_without_spending_attempts() {
    let env = TestEnv::with(
        MockOptions {
            error_rate: 1.0,
            status: 500,
            ..MockOptions::default()
        },
        |c| {
            c.retry.max_attempts = 3;
            // Long enough to wait out one cooldown and see its probe fail, too short for a
            // second probe: no request can run out of attempts.
            c.retry.max_unavailable_secs = 3;
            c.retry.max_rate_limited_secs = 3;
            c.routing.breaker_failures = 2;
            c.routing.breaker_cooldown_secs = 2;
        },
    )
    .await;
    let worker = env.start_worker();
    const N: usize = 6;
    publish(&env, "outage", N, "gpt-4o-mini").await;
    let dlq = env.config.topology.dead_letter_queue.clone();
    wait_until(
        Duration::from_secs(30),
        "every request dead-lettered",
        || async { env.queue_len(&dlq).await == N as u32 },
    )
    .await;
    // Read in place (`llmq dlq list`), to be replayed below.
    let dead = llmq::ops::dlq::list(&env.config, N).await.unwrap();
    let mut attempts = 0;
    for d in &dead {
        assert_eq!(d.error_kind, "upstream_unavailable", "{d:?}");
        assert!(d.reason.starts_with("upstream unavailable for "), "{d:?}");
        assert!(d.attempts < 3, "waiting used no attempts: {d:?}");
        attempts += u64::from(d.attempts);
    }
    worker.stop().await.unwrap();
    assert_eq!(
        attempts,
        env.chat_calls(),
        "every attempt counted is a call made, and only those"
    );
    for r in results(&env, N, Duration::from_secs(10)).await.values() {
        assert_eq!(r["error"]["kind"], "upstream_unavailable", "{r}");
    }
    // The upstream is back: replayed by kind, every one is answered.
    env.mock.set_options(MockOptions::default());
    let worker = env.start_worker();
    let replayed = llmq::ops::dlq::replay(
        &env.config,
        &llmq::ops::dlq::Selection::Kind(llmq::contract::ErrorKind::UpstreamUnavailable),
        false,
    )
    .await
    .unwrap();
    assert_eq!(replayed.len(), N);
    let counts = by_upstream(&results(&env, N, Duration::from_secs(30)).await);
    assert_eq!(counts.values().sum::<usize>(), N);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 1. One refusal is a glitch, not a verdict: a deployment that answers 401 once, then
/// 200, answers the whole backlog, the refused request included (its attempt failed as a
/// transient failure and was retried); nothing is dead-lettered without a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refusal_does_not_dead_letter_the_backlog() {
    let env = TestEnv::with(
        MockOptions {
            fail_first: 1,
            status: 401,
            ..MockOptions::default()
        },
        |c| {
            // One call at a time: every request after the refused one comes after it.
            c.worker.min_inflight = 1;
            c.worker.max_inflight = 1;
        },
    )
    .await;
    const N: usize = 10;
    publish(&env, "glitch", N, "gpt-4o-mini").await;
    let worker = env.start_worker();
    let results = results(&env, N, Duration::from_secs(30)).await;
    let counts = by_upstream(&results);
    assert_eq!(counts.values().sum::<usize>(), N);
    let retried: Vec<&Value> = results.values().filter(|r| r["attempts"] == 2).collect();
    assert_eq!(
        retried.len(),
        1,
        "the refused one was tried again: {results:?}"
    );
    assert_eq!(env.chat_calls(), N as u64 + 1);
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 1. A provider that caps concurrent calls at a number the worker is not told, and
/// answers 429 with `Retry-After: 1` beyond it: the deployment's limit comes down to the
/// cap and only the refused calls wait their second, so the work goes at about the cap's
/// pace (4 calls of 200 ms at once: 20 jobs/s), with no error. Stopping the whole
/// deployment for a second at each refusal, as a rate limit, serves a fraction of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_cap_that_says_retry_after_cuts_the_limit_not_the_deployment() {
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 200,
            max_concurrency: Some(4),
            cap_retry_after: Some(1),
            ..MockOptions::default()
        },
        |c| c.worker.max_inflight = 16,
    )
    .await;
    const N: usize = 60;
    publish(&env, "capped", N, "gpt-4o-mini").await;
    let started = std::time::Instant::now();
    let worker = env.start_worker();
    let counts = by_upstream(&results(&env, N, Duration::from_secs(60)).await);
    let took = started.elapsed();
    assert_eq!(counts.values().sum::<usize>(), N);
    // 60 / 4 x 0.2 s = 3 s at the cap's pace (about 3.7 s measured, the worker's start
    // included); a second's stop of the deployment per wave of refusals takes about 15 s.
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(env.mock.stats().peak_in_flight.load(Relaxed) <= 4);
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 2. A spent account (`insufficient_quota`) takes its deployment out: one call to it,
/// every request answered elsewhere, and the operator sees it in `/upstreams` and the
/// metrics. With no deployment left, the request is dead-lettered as `quota_exhausted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_account_is_left_for_the_others_and_shown_to_operators() {
    let spent = mock(MockOptions {
        insufficient_quota: true,
        ..MockOptions::default()
    })
    .await;
    let fine = mock(MockOptions {
        model_suffix: Some("-2024-07-18".into()),
        ..MockOptions::default()
    })
    .await;
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.upstreams = [
            ("spent".into(), upstream(&spent, &[], 1000)),
            ("fine".into(), upstream(&fine, &[], 1)),
        ]
        .into();
    })
    .await;
    let (base, stop, task) = start_with_admin(&env.config).await;
    // One first, so that no other call is on its way to the spent deployment before its
    // answer comes back.
    publish(&env, "first", 1, "gpt-4o-mini").await;
    results(&env, 1, Duration::from_secs(30)).await;
    publish(&env, "quota", 20, "gpt-4o-mini").await;
    let results = results(&env, 20, Duration::from_secs(30)).await;
    assert_eq!(
        by_upstream(&results),
        HashMap::from([("fine".to_string(), 20)])
    );
    let r = &results["quota-0"];
    assert_eq!(r["model"], "gpt-4o-mini", "the routing name");
    assert_eq!(
        r["upstream_model"], "gpt-4o-mini-2024-07-18",
        "as the upstream said"
    );
    assert!(r.get("fallback_from").is_none(), "{r}");
    assert_eq!(r["attempts"], 1, "the move is not an attempt");
    assert_eq!(calls(&spent), 1, "out of rotation after its first answer");

    let upstreams: Value = serde_json::from_str(&get(&format!("{base}/upstreams")).await).unwrap();
    let spent_state = upstreams
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "spent")
        .expect("listed");
    assert_eq!(spent_state["unavailable"][0]["why"], "quota", "{upstreams}");
    assert_eq!(spent_state["unavailable"][0]["model"], "*");
    assert_eq!(spent_state["breaker"], "closed");
    let metrics = get(&format!("{base}/metrics")).await;
    for line in [
        "llmq_upstream_calls_total{upstream=\"spent\",outcome=\"quota\"} 1",
        "llmq_upstream_calls_total{upstream=\"fine\",outcome=\"ok\"} 21",
        "llmq_upstream_cooling{upstream=\"spent\"} 1",
        "llmq_upstream_breaker{upstream=\"fine\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    assert!(metrics.contains("llmq_upstream_limit{upstream=\"fine\"}"));
    stop.cancel();
    task.await.unwrap();

    // Alone, a spent deployment leaves nowhere to go.
    let lonely = TestEnv::new(MockOptions {
        insufficient_quota: true,
        ..MockOptions::default()
    })
    .await;
    let worker = lonely.start_worker();
    publish(&lonely, "alone", 1, "gpt-4o-mini").await;
    let dead = lonely.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("quota_exhausted")
    );
    worker.stop().await.unwrap();
    lonely.cleanup().await;
    env.cleanup().await;
}

/// 3. One of two deployments dies mid-load: nothing is lost and no request gets an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_of_two_deployments_mid_load_loses_nothing() {
    let slow = || MockOptions {
        latency_ms: 100,
        ..MockOptions::default()
    };
    let (a, b) = (mock(slow()).await, mock(slow()).await);
    // Eight calls at once per deployment, 100 ms each: the 200 requests take over a second,
    // so the kill lands mid-load.
    let capped = |server: &MockServer| UpstreamConfig {
        max_inflight: 8,
        ..upstream(server, &[], 1)
    };
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.upstreams = [("a".into(), capped(&a)), ("b".into(), capped(&b))].into();
        c.worker.min_inflight = 8;
    })
    .await;
    let worker = env.start_worker();
    publish(&env, "failover", 200, "gpt-4o-mini").await;
    wait_until(Duration::from_secs(30), "a served some", || async {
        calls(&a) >= 8
    })
    .await;
    let served_before = calls(&a);
    drop(a);
    let results = results(&env, 200, Duration::from_secs(60)).await;
    let counts = by_upstream(&results);
    assert!(
        counts["b"] >= 200 - served_before as usize - 20,
        "{counts:?}"
    );
    let moved = results.values().filter(|r| r["attempts"] == 2).count();
    assert!(
        moved >= 1,
        "some requests failed on the dead deployment and moved on: {counts:?}"
    );
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 4. Weights 3:1 with equal speed: about 75/25.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_the_traffic_three_to_one() {
    let (a, b) = (
        mock(MockOptions::default()).await,
        mock(MockOptions::default()).await,
    );
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.upstreams = [
            ("a".into(), upstream(&a, &[], 3)),
            ("b".into(), upstream(&b, &[], 1)),
        ]
        .into();
    })
    .await;
    let worker = env.start_worker();
    publish(&env, "weights", 200, "gpt-4o-mini").await;
    let counts = by_upstream(&results(&env, 200, Duration::from_secs(30)).await);
    // 150 of 200 expected; a binomial's standard deviation is about 6 here.
    assert!((125..=175).contains(&counts["a"]), "{counts:?}");
    assert_eq!(calls(&a) + calls(&b), 200);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 5. Fallbacks: a context-length error goes straight to the context-window fallback, not
/// counted as an attempt; a deployment without the model (404 `model_not_found`) or with a
/// bad key is left for the others; a model cooling down everywhere falls back at once; a
/// model nobody serves is `invalid_request`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_take_over_and_name_themselves() {
    let small = mock(MockOptions {
        max_prompt_bytes: Some(200),
        ..MockOptions::default()
    })
    .await;
    let big = mock(MockOptions::default()).await;
    let lacking = mock(MockOptions {
        models: vec!["another-model".into()],
        ..MockOptions::default()
    })
    .await;
    let locked = mock(MockOptions {
        require_key: Some("the-right-key".into()),
        ..MockOptions::default()
    })
    .await;
    let cooling = mock(MockOptions {
        error_rate: 1.0,
        status: 429,
        retry_after: Some(60),
        ..MockOptions::default()
    })
    .await;
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.upstreams = [
            ("small".into(), upstream(&small, &["small-model"], 1)),
            (
                "big".into(),
                upstream(&big, &["big-model", "m", "gpt-4o-mini"], 1),
            ),
            ("lacking".into(), upstream(&lacking, &["m"], 1000)),
            ("locked".into(), upstream(&locked, &["m"], 1000)),
            ("cooling".into(), upstream(&cooling, &["gpt-4o"], 1)),
        ]
        .into();
        c.routing.context_window_fallbacks =
            [("small-model".into(), vec!["big-model".into()])].into();
        c.routing.fallbacks = [("gpt-4o".into(), vec!["gpt-4o-mini".into()])].into();
        // Each refusal is confirmed at once (the default asks for three in a row).
        c.routing.auth_failures = 1;
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "long", "model": "small-model", "prompt": "word ".repeat(100)}),
        BasicProperties::default(),
    )
    .await;
    let r = &results(&env, 1, Duration::from_secs(30)).await["long"];
    assert_eq!(
        (
            &r["upstream"],
            &r["model"],
            &r["fallback_from"],
            &r["attempts"]
        ),
        (
            &json!("big"),
            &json!("big-model"),
            &json!("small-model"),
            &json!(1)
        ),
        "{r}"
    );
    assert_eq!(calls(&small), 1);

    // One at a time until both refusals are known, then a batch.
    for i in 0..2 {
        publish(&env, &format!("m{i}"), 1, "m").await;
        let counts = by_upstream(&results(&env, 1, Duration::from_secs(30)).await);
        assert_eq!(counts, HashMap::from([("big".to_string(), 1)]));
    }
    publish(&env, "m", 10, "m").await;
    let counts = by_upstream(&results(&env, 10, Duration::from_secs(30)).await);
    assert_eq!(counts, HashMap::from([("big".to_string(), 10)]));
    assert_eq!(
        (calls(&lacking), calls(&locked)),
        (1, 1),
        "each refused once, then left out"
    );

    publish(&env, "4o-first", 1, "gpt-4o").await;
    let first = results(&env, 1, Duration::from_secs(30)).await;
    publish(&env, "4o", 3, "gpt-4o").await;
    let mut results = results(&env, 3, Duration::from_secs(30)).await;
    results.extend(first);
    for r in results.values() {
        assert_eq!(
            (&r["model"], &r["fallback_from"]),
            (&json!("gpt-4o-mini"), &json!("gpt-4o")),
            "{r}"
        );
    }
    assert_eq!(
        calls(&cooling),
        1,
        "cooling down for a minute after its 429"
    );

    publish(&env, "nobody", 1, "no-such-model").await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("invalid_request")
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 6. With `limits.redis_url`, what one replica learned is the fleet's: a second replica
/// never calls the deployment the first found spent. Without it, each replica finds out
/// for itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_one_replica_found_spent_is_left_alone_by_the_fleet() {
    let Ok(redis_url) = std::env::var("REDIS_URL") else {
        panic!("REDIS_URL names the Redis the tests use");
    };
    let spent = mock(MockOptions {
        insufficient_quota: true,
        ..MockOptions::default()
    })
    .await;
    let fine = mock(MockOptions::default()).await;
    let prefix = crate::helpers::unique("limits");
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.upstreams = [
            ("spent".into(), upstream(&spent, &[], 1000)),
            ("fine".into(), upstream(&fine, &[], 1)),
        ]
        .into();
        c.limits.redis_url = SecretUrl::new(redis_url.clone());
        c.limits.key_prefix = prefix.clone();
    })
    .await;
    let first = env.start_worker();
    publish(&env, "first", 1, "gpt-4o-mini").await;
    results(&env, 1, Duration::from_secs(30)).await;
    assert_eq!(calls(&spent), 1);
    first.stop().await.unwrap();

    // A new replica, nothing in its memory: it learns from Redis before it consumes.
    let (base, stop, task) = start_with_admin(&env.config).await;
    wait_until(
        Duration::from_secs(10),
        "the fleet's state read",
        || async {
            get(&format!("{base}/upstreams"))
                .await
                .contains("\"quota\"")
        },
    )
    .await;
    publish(&env, "second", 20, "gpt-4o-mini").await;
    let counts = by_upstream(&results(&env, 20, Duration::from_secs(30)).await);
    assert_eq!(counts, HashMap::from([("fine".to_string(), 20)]));
    assert_eq!(calls(&spent), 1, "the second replica never called it");
    stop.cancel();
    task.await.unwrap();

    // The control: without the shared state, a new replica calls it once more.
    let mut alone = env.config.clone();
    alone.limits.redis_url = SecretUrl::new("");
    let (_, stop, task) = start_with_admin(&alone).await;
    publish(&env, "third", 1, "gpt-4o-mini").await;
    results(&env, 1, Duration::from_secs(30)).await;
    assert_eq!(calls(&spent), 2, "a replica on its own finds out by itself");
    stop.cancel();
    task.await.unwrap();

    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for name in ["spent", "fine"] {
        let _: () = redis::cmd("DEL")
            .arg(format!("{prefix}:upstream:{name}"))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // The usage ledger of the answers.
    crate::helpers::delete_redis_keys(&prefix).await;
    env.cleanup().await;
}

/// Without `[upstreams]`, `[llm]` is one deployment named `default`, and results say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upstreams_llm_is_the_default_deployment() {
    let env = TestEnv::new(MockOptions::default()).await;
    let worker = env.start_worker();
    publish(&env, "plain", 1, "gpt-4o-mini").await;
    let r = &results(&env, 1, Duration::from_secs(30)).await["plain-0"];
    assert_eq!(
        (&r["upstream"], &r["model"]),
        (&json!("default"), &json!("gpt-4o-mini")),
        "{r}"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// 3. A deployment that keeps failing opens its circuit breaker: the others serve, it gets
/// no call while open, and after `routing.breaker_cooldown_secs` one call probes it; an
/// answer closes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_deployment_opens_its_breaker_then_a_probe_closes_it() {
    let down = mock(MockOptions {
        error_rate: 1.0,
        status: 503,
        ..MockOptions::default()
    })
    .await;
    let fine = mock(MockOptions::default()).await;
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.upstreams = [
            ("down".into(), upstream(&down, &[], 1000)),
            ("fine".into(), upstream(&fine, &[], 1)),
        ]
        .into();
        c.routing.breaker_failures = 2;
        c.routing.breaker_cooldown_secs = 5;
    })
    .await;
    let (base, stop, task) = start_with_admin(&env.config).await;
    let breaker = || async {
        let all: Value = serde_json::from_str(&get(&format!("{base}/upstreams")).await).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == "down")
            .unwrap()["breaker"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for i in 0..2 {
        publish(&env, &format!("fail{i}"), 1, "gpt-4o-mini").await;
        let r = &results(&env, 1, Duration::from_secs(30)).await[&format!("fail{i}-0")];
        assert_eq!(
            (&r["upstream"], &r["attempts"]),
            (&json!("fine"), &json!(2)),
            "{r}"
        );
    }
    assert_eq!(breaker().await, "open");
    publish(&env, "open", 5, "gpt-4o-mini").await;
    let counts = by_upstream(&results(&env, 5, Duration::from_secs(30)).await);
    assert_eq!(counts, HashMap::from([("fine".to_string(), 5)]));
    assert_eq!(calls(&down), 2, "no call while the breaker is open");

    down.set_options(MockOptions::default());
    let probed = std::sync::atomic::AtomicUsize::new(0);
    wait_until(
        Duration::from_secs(20),
        "a probe closes the breaker",
        || async {
            let i = probed.fetch_add(1, Relaxed);
            publish(&env, &format!("probe{i}"), 1, "gpt-4o-mini").await;
            results(&env, 1, Duration::from_secs(30)).await;
            calls(&down) > 2 && breaker().await == "closed"
        },
    )
    .await;
    assert_eq!(
        env.queue_len(&env.config.topology.dead_letter_queue).await,
        0
    );
    stop.cancel();
    task.await.unwrap();
    env.cleanup().await;
}
