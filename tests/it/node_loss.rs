//! Losing a broker node (issue 21), on the local three-node cluster of
//! `scripts/cluster.sh` ([`crate::cluster`]): quorum queues, the worker given every node's
//! address. The main broker is not touched.

use std::{collections::HashSet, sync::atomic::Ordering::Relaxed, time::Duration};

use lapin::{
    BasicProperties, Connection,
    options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions},
};
use llmq::{
    config::{QueueType, SecretUrl},
    tools::mock::MockOptions,
};
use serde_json::json;

use crate::{
    cluster::{self, Cluster},
    helpers::{TestEnv, delete_topology, json, wait_until},
};

/// A test env on the cluster: its topology quorum, declared through `first`, and the worker
/// given every node's address, `first`'s first.
async fn env_on(cluster: &Cluster, first: usize, mock: MockOptions) -> TestEnv {
    let mut urls: Vec<String> = cluster.urls().to_vec();
    urls.rotate_left(first - 1);
    TestEnv::on_broker(&urls[0].clone(), mock, |c| {
        c.amqp.url = None;
        c.amqp.urls = Some(urls.iter().map(|u| SecretUrl::new(u.as_str())).collect());
        c.topology.queue_type = QueueType::Quorum;
    })
    .await
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
    let mut config = env.config.clone();
    config.worker.max_inflight = 100;
    config.worker.min_inflight = 100;
    config.worker.prefetch = 0;
    let mut urls: Vec<String> = cluster.urls().to_vec();
    urls.rotate_left(leader - 1);
    config.amqp.urls = Some(urls.iter().map(|u| SecretUrl::new(u.as_str())).collect());
    let worker = env.start_worker_with(config);
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
    delete_topology(&side, &env.config.topology).await;
    let _ = side.close(200, "ok".into()).await;
    env.cleanup().await;
    cluster.restart_node(leader).await;
}
