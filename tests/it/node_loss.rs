//! Losing a broker node (issue 21), on the local three-node cluster of
//! `scripts/cluster.sh` ([`crate::cluster`]): quorum queues, the worker given every node's
//! address. The main broker is not touched.

use std::{collections::HashSet, sync::atomic::Ordering::Relaxed, time::Duration};

use lapin::{
    BasicProperties, Connection,
    options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions},
};
use llmq::{
    config::{Config, QueueType, SecretUrl, StoreKind},
    tools::mock::MockOptions,
};
use serde_json::json;

use crate::{
    cluster::{self, Cluster},
    helpers::{
        TestEnv, delete_redis_keys, delete_topology, json, llmq_with, redis_url, unique, wait_until,
    },
};

/// Every node's address, node `first`'s first.
fn addresses(cluster: &Cluster, first: usize) -> Vec<SecretUrl> {
    let mut urls: Vec<String> = cluster.urls().to_vec();
    urls.rotate_left(first - 1);
    urls.iter().map(SecretUrl::new).collect()
}

/// A test env on the cluster: its topology quorum, declared through `first`, and the worker
/// given every node's address, `first`'s first.
async fn env_on(cluster: &Cluster, first: usize, mock: MockOptions) -> TestEnv {
    let urls = addresses(cluster, first);
    TestEnv::on_broker(urls[0].expose(), mock, |c| {
        c.amqp.url = None;
        c.amqp.urls = Some(urls.clone());
        c.topology.queue_type = QueueType::Quorum;
    })
    .await
}

/// `env`'s worker configuration with `calls` upstream calls at once (a fixed limit, the
/// prefetch following it), connecting to node `first` first.
fn worker_config(env: &TestEnv, cluster: &Cluster, first: usize, calls: u16) -> Config {
    let mut config = env.config.clone();
    config.worker.max_inflight = calls;
    config.worker.min_inflight = calls;
    config.worker.prefetch = 0;
    config.amqp.urls = Some(addresses(cluster, first));
    config
}

/// Publishes `n` chat requests `<tag>-<i>` through `conn`, persistent, confirmed.
async fn publish_all(conn: &Connection, env: &TestEnv, tag: &str, n: usize) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let topo = &env.config.topology;
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        let body = json!({"request_id": format!("{tag}-{i}"), "prompt": "hi"}).to_string();
        confirms.push(
            ch.basic_publish(
                topo.request_exchange.as_str().into(),
                topo.processing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert_eq!(c.await.unwrap(), lapin::Confirmation::Ack(None), "routed");
    }
    let _ = ch.close(200, "ok".into()).await;
}

/// The request ids of the results taken off `llm_results` through node `node` until `n`
/// different ones came, each `ok`; panics after `within`.
async fn answered(
    cluster: &Cluster,
    node: usize,
    env: &TestEnv,
    n: usize,
    within: Duration,
) -> usize {
    let conn = cluster::connect(cluster, node).await;
    let ch = conn.create_channel().await.unwrap();
    let queue = env.config.topology.results_queue.clone();
    let mut ids = HashSet::new();
    let mut copies = 0;
    let deadline = tokio::time::Instant::now() + within;
    while ids.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} answered within {within:?}",
            ids.len()
        );
        // A get at a time: a leader changing under a consumer does not cancel anything here.
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .expect("node answers");
        let Some(d) = got else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        d.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        let result = json(&d.delivery.data);
        assert_eq!(result["status"], "ok", "{result}");
        copies += 1;
        ids.insert(result["request_id"].as_str().expect("an id").to_string());
    }
    let _ = conn.close(200, "ok".into()).await;
    copies - n
}

/// The issue's measure: the worker connected to the node holding the queues' leaders, 4,000
/// requests at 200 ms, 100 at a time; that node SIGKILLed a few seconds in and left down.
/// Every request is answered `ok`, and the worker never restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_node_of_the_queue_leaders_mid_load_loses_nothing() {
    const N: usize = 4000;
    let cluster = Cluster::exclusive().await;
    let env = env_on(
        &cluster,
        1,
        MockOptions {
            latency_ms: 200,
            ..Default::default()
        },
    )
    .await;
    let work = env.config.topology.processing_queue.clone();
    let leader = cluster.leader_of(&work).await;
    let other = if leader == 1 { 2 } else { 1 };
    let side = cluster::connect(&cluster, other).await;
    publish_all(&side, &env, "r", N).await;
    let worker = env.start_worker_with(worker_config(&env, &cluster, leader, 100));
    // A few seconds in: a tenth answered.
    wait_until(Duration::from_secs(60), "a tenth answered", || async {
        env.mock.stats().chat_calls.load(Relaxed) >= (N / 10) as u64
    })
    .await;
    cluster.kill_node(leader).await;
    let duplicates = answered(&cluster, other, &env, N, Duration::from_secs(240)).await;
    eprintln!(
        "node loss: {N} answered, {duplicates} duplicate results, {} upstream calls",
        env.mock.stats().chat_calls.load(Relaxed)
    );
    assert!(!worker.task.is_finished(), "the worker never stopped");
    worker.stop().await.expect("worker stops");
    // Back first: deleting a quorum queue with a member down waits for it, minutes in all.
    cluster.restart_node(leader).await;
    delete_topology(&side, &env.config.topology).await;
    let _ = side.close(200, "ok".into()).await;
    env.cleanup().await;
}

/// A rolling upgrade: under load, each node in turn shut down gracefully and started again,
/// waiting for it to rejoin before the next. The worker, given every address, follows its
/// connections and its queues' leaders from node to node; every request is answered `ok`
/// and the worker never stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_node_in_turn_under_load_loses_nothing() {
    // 20 calls of a second at a time: a minute of work, longer than the three restarts
    // (about 12 s each here), so each happens with deliveries in flight.
    const N: usize = 1200;
    let cluster = Cluster::exclusive().await;
    let env = env_on(
        &cluster,
        1,
        MockOptions {
            latency_ms: 1000,
            ..Default::default()
        },
    )
    .await;
    let side = cluster::connect(&cluster, 1).await;
    publish_all(&side, &env, "roll", N).await;
    let _ = side.close(200, "published".into()).await;
    let worker = env.start_worker_with(worker_config(&env, &cluster, 1, 20));
    for node in 1..=3 {
        let before = env.mock.stats().chat_calls.load(Relaxed);
        wait_until(Duration::from_secs(60), "calls under way", || async {
            env.mock.stats().chat_calls.load(Relaxed) >= before + 20
        })
        .await;
        cluster.shutdown_node(node).await;
        cluster.restart_node(node).await;
    }
    let calls_by_then = env.mock.stats().chat_calls.load(Relaxed);
    assert!(
        calls_by_then < N as u64,
        "the load ended before the last restart ({calls_by_then} calls of {N})"
    );
    let duplicates = answered(&cluster, 2, &env, N, Duration::from_secs(240)).await;
    eprintln!(
        "rolling restart: {N} answered, {duplicates} duplicate results, {} upstream calls",
        env.mock.stats().chat_calls.load(Relaxed)
    );
    assert!(!worker.task.is_finished(), "the worker never stopped");
    worker.stop().await.expect("worker stops");
    let conn = cluster::connect(&cluster, 2).await;
    delete_topology(&conn, &env.config.topology).await;
    let _ = conn.close(200, "ok".into()).await;
    env.cleanup().await;
}

/// The node the worker is connected to (both its connections) SIGKILLed while it holds
/// deliveries whose calls are under way; the queues' leaders live on another node. The
/// deliveries come back, on the connection the worker opens to a survivor, and the Redis
/// idempotency store settles them: the calls that were under way finish, their results are
/// saved and republished, and no request is sent upstream twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_workers_own_node_makes_no_second_upstream_call_with_redis() {
    const N: usize = 300;
    let cluster = Cluster::exclusive().await;
    // Declared through node 2: the queues' leaders are there.
    let env = env_on(
        &cluster,
        2,
        MockOptions {
            latency_ms: 1500,
            ..Default::default()
        },
    )
    .await;
    let prefix = unique("own-node");
    let work = env.config.topology.processing_queue.clone();
    let leader = cluster.leader_of(&work).await;
    // The worker's node: one that does not hold the leaders.
    let own = if leader == 1 { 3 } else { 1 };
    let side = cluster::connect(&cluster, leader).await;
    publish_all(&side, &env, "own", N).await;
    let mut config = worker_config(&env, &cluster, own, 100);
    config.idempotency.store = StoreKind::Redis;
    config.idempotency.redis_url = SecretUrl::new(redis_url());
    config.idempotency.key_prefix = prefix.clone();
    let worker = env.start_worker_with(config);
    // A hundred calls under way, none finished yet (each takes 1.5 s).
    wait_until(Duration::from_secs(60), "calls under way", || async {
        env.mock.stats().chat_calls.load(Relaxed) >= 100
    })
    .await;
    cluster.kill_node(own).await;
    let duplicates = answered(&cluster, leader, &env, N, Duration::from_secs(240)).await;
    let calls = env.mock.stats().chat_calls.load(Relaxed);
    eprintln!("own node lost: {N} answered, {duplicates} duplicate results, {calls} calls");
    assert_eq!(calls, N as u64, "one upstream call per request");
    assert!(!worker.task.is_finished(), "the worker never stopped");
    worker.stop().await.expect("worker stops");
    // Back first: deleting a quorum queue with a member down waits for it, minutes in all.
    cluster.restart_node(own).await;
    delete_topology(&side, &env.config.topology).await;
    let _ = side.close(200, "ok".into()).await;
    env.cleanup().await;
    delete_redis_keys(&prefix).await;
}

/// `llmq dlq replay` and `llmq publish`, given every node's address with a dead node's
/// first, pass over it to a surviving node: the dead letter is replayed and the request
/// published, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_commands_fail_over_to_a_surviving_node() {
    let cluster = Cluster::exclusive().await;
    // Declared through node 2: the queues' leaders are there, and node 1 goes.
    let env = env_on(&cluster, 2, MockOptions::default()).await;
    let topo = env.config.topology.clone();
    // Refused by the worker (no prompt): a dead letter.
    env.publish_chat(
        &json!({"request_id": "dead-1"}),
        BasicProperties::default().with_content_type("application/json".into()),
    )
    .await;
    let worker = env.start_worker();
    wait_until(Duration::from_secs(30), "the dead letter", || async {
        env.queue_len(&topo.dead_letter_queue).await == 1
    })
    .await;
    worker.stop().await.expect("worker stops");
    cluster.kill_node(1).await;
    let mut config = env.config.clone();
    config.amqp.urls = Some(addresses(&cluster, 1));
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let out = llmq_with(&config, &["dlq", "replay", "--all"]).await;
    ok(&out);
    assert_eq!(env.queue_len(&topo.dead_letter_queue).await, 0, "replayed");
    assert_eq!(env.queue_len(&topo.processing_queue).await, 1, "once");
    let out = llmq_with(&config, &["publish", "hi", "--request-id", "published-1"]).await;
    ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "published-1");
    assert_eq!(
        env.queue_len(&topo.processing_queue).await,
        2,
        "published once"
    );
    cluster.restart_node(1).await;
    env.cleanup().await;
}
