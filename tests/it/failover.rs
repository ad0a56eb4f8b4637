//! Several broker addresses (`amqp.urls`): the worker passes over addresses that refuse or
//! never answer, fails over when the node it is on goes (cut, or silent), and is not ready
//! while no address answers; one-shot commands try each address in turn. Every address is
//! the local broker, directly or through a [`Proxy`] that plays the node that goes.

use std::{net::SocketAddr, time::Duration};

use llmq::{
    broker::connection::CONNECT_TIMEOUT,
    config::{Config, SecretUrl},
    tools::mock::MockOptions,
};
use serde_json::Value;

use crate::{
    faults::publish_many,
    helpers::{
        Proxy, TestEnv, amqp_url, amqp_url_via, broker_addr, drain_results, llmq_with, wait_until,
    },
    ops::{get, worker_with_admin},
};

/// An address nothing listens on: a port the system handed out and took back.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Sets `amqp.urls` to `urls` (and unsets the test configuration's `amqp.url`).
fn set_urls(c: &mut Config, urls: &[String]) {
    c.amqp.url = None;
    c.amqp.urls = Some(urls.iter().map(SecretUrl::new).collect());
}

/// Connections a worker with classic queues (the tests' default) opens to a broker address
/// when it connects: the consuming and the publishing one. (Quorum queues add a short one
/// that reads the broker's version.)
const PER_CONNECT: usize = 2;

/// Publishes `n` requests and checks each is answered ok.
async fn answers(env: &TestEnv, prefix: &str, n: usize) {
    publish_many(env, prefix, n).await;
    let (_, ok) = drain_results(env, n, Duration::from_secs(30)).await;
    assert_eq!(ok.len(), n, "every request answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_first_address_is_passed_over_at_start() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        set_urls(c, &[amqp_url_via(closed_port()), amqp_url()])
    })
    .await;
    let worker = env.start_worker();
    answers(&env, "refusing-first", 5).await;
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A node that accepts connections and never answers (its host hung, or a black hole on the
/// way): the attempt ends at the connect timeout, and the next address is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_first_address_is_given_up_at_the_connect_timeout() {
    let silent = Proxy::start(broker_addr()).await;
    silent.fall_silent();
    let env = TestEnv::with(MockOptions::default(), |c| {
        set_urls(c, &[amqp_url_via(silent.addr), amqp_url()])
    })
    .await;
    let started = tokio::time::Instant::now();
    let worker = env.start_worker();
    answers(&env, "silent-first", 3).await;
    assert_eq!(
        silent.accepted(),
        1,
        "the silent address was tried first, once"
    );
    assert!(
        started.elapsed() >= CONNECT_TIMEOUT,
        "answered through the second address only after the first timed out"
    );
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// The worker's node goes for good mid-load (its connections dropped, new ones refused):
/// the worker moves to the next address by itself, and every request is answered, with one
/// upstream call each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_for_good_mid_load_is_failed_over_and_nothing_is_lost() {
    let node = Proxy::start(broker_addr()).await;
    node_lost_mid_load(&node, |node| node.cut(), 0).await;
}

/// The worker's node falls silent mid-load (no close, no reset: a host that froze or dropped
/// off the network). Only the heartbeat tells, within two of its intervals; then the
/// deliveries held and the confirms awaited on the dead connections are given up, the worker
/// moves to the next address, and every request is answered, with one upstream call each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_falling_silent_mid_load_is_left_within_its_heartbeats() {
    let node = Proxy::start(broker_addr()).await;
    node_lost_mid_load(&node, |node| node.fall_silent(), 2).await;
}

/// 200 requests through `amqp.urls = [node, the broker directly]`; `lose` ends the node
/// after 20 calls. `heartbeat_secs` 0 keeps the default.
async fn node_lost_mid_load(node: &Proxy, lose: impl FnOnce(&Proxy), heartbeat_secs: u16) {
    const N: usize = 200;
    let env = TestEnv::with(
        MockOptions {
            latency_ms: 30,
            ..Default::default()
        },
        |c| {
            set_urls(c, &[amqp_url_via(node.addr), amqp_url()]);
            if heartbeat_secs > 0 {
                c.amqp.heartbeat_secs = heartbeat_secs;
            }
        },
    )
    .await;
    let worker = env.start_worker();
    publish_many(&env, "node-lost", N).await;
    wait_until(Duration::from_secs(20), "some progress", || async {
        env.chat_calls() >= 20
    })
    .await;
    assert_eq!(
        node.accepted(),
        PER_CONNECT,
        "both connections (and the version's) went to the first address"
    );
    lose(node);
    let (all, ok) = drain_results(&env, N, Duration::from_secs(60)).await;
    assert_eq!(ok.len(), N, "every request answered after the node went");
    worker.stop().await.unwrap();
    assert_eq!(
        node.accepted(),
        PER_CONNECT,
        "nothing went back to the lost node"
    );
    assert_eq!(
        env.chat_calls(),
        N as u64,
        "one upstream call per request: a result made before the loss is kept and republished"
    );
    // A result whose confirm was lost with the node is published again: at least once.
    let duplicates = all.len() - N;
    let prefetched = env.config.worker.consumers as usize * env.config.worker.prefetch as usize;
    assert!(
        duplicates <= prefetched,
        "{duplicates} duplicate results, more than the {prefetched} deliveries held"
    );
    assert_eq!(
        env.queue_len(&env.config.topology.processing_queue).await,
        0
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_no_address_answers() {
    let (first, second) = (
        Proxy::start(broker_addr()).await,
        Proxy::start(broker_addr()).await,
    );
    let env = TestEnv::with(MockOptions::default(), |c| {
        set_urls(c, &[amqp_url_via(first.addr), amqp_url_via(second.addr)])
    })
    .await;
    let (base, stop, task) = worker_with_admin(&env).await;
    let readyz = format!("{base}/readyz");
    wait_until(Duration::from_secs(10), "ready", || async {
        get(&readyz).await.0 == 200
    })
    .await;
    assert_eq!((first.accepted(), second.accepted()), (PER_CONNECT, 0));
    first.cut();
    second.cut();
    wait_until(
        Duration::from_secs(10),
        "503 once both are gone",
        || async { get(&readyz).await.0 == 503 },
    )
    .await;
    wait_until(
        Duration::from_secs(20),
        "two rounds of both addresses refused",
        || async { first.refused() >= 2 && second.refused() >= 2 },
    )
    .await;
    assert_eq!(get(&readyz).await.0, 503, "still not ready");
    second.restore();
    wait_until(
        Duration::from_secs(30),
        "ready again through the second",
        || async { get(&readyz).await.0 == 200 },
    )
    .await;
    assert_eq!(second.accepted(), PER_CONNECT);
    answers(&env, "readyz-second", 3).await;
    stop.cancel();
    task.await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_commands_reach_the_broker_through_the_second_address() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        set_urls(c, &[amqp_url_via(closed_port()), amqp_url()])
    })
    .await;
    let t = &env.config.topology;
    let out = llmq_with(&env.config, &["status", "--json"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queues: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = |name: &str| {
        let all = queues.as_array().expect("a list of queues");
        all.iter().any(|q| q["queue"] == name)
    };
    assert!(listed(&t.processing_queue), "{queues}");
    let out = llmq_with(
        &env.config,
        &["publish", "through the second", "--request-id", "second-1"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "second-1");
    assert_eq!(env.queue_len(&t.processing_queue).await, 1, "published");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_shot_command_that_reaches_no_address_names_each_with_its_error() {
    let (a, b) = (closed_port(), closed_port());
    let mut with_canary = url::Url::parse(&amqp_url_via(b)).unwrap();
    with_canary.set_password(Some("canary-pw")).unwrap();
    let mut config = Config::default();
    set_urls(&mut config, &[amqp_url_via(a), with_canary.to_string()]);
    let out = llmq_with(&config, &["status"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to any of 2 broker addresses"),
        "{err}"
    );
    for addr in [a, b] {
        assert!(
            err.contains(&format!(":***@{addr}/")),
            "{addr} named: {err}"
        );
    }
    assert!(!err.contains("canary"), "{err}");
}

/// `llmq publish --wait` through the second address, answered by a worker that passed over
/// the first too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_is_answered_through_the_second_address() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        set_urls(c, &[amqp_url_via(closed_port()), amqp_url()])
    })
    .await;
    let worker = env.start_worker();
    let out = llmq_with(
        &env.config,
        &["publish", "Hello again", "--wait", "--timeout-secs", "30"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["content"], "mock reply to: Hello again", "{result}");
    worker.stop().await.unwrap();
    env.cleanup().await;
}
