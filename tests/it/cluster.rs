//! The local three-node RabbitMQ cluster of `scripts/cluster.sh`, for the tests of broker
//! node loss. `make test` starts it (when it is not up) and gives its AMQP URLs in
//! `LLMQ_TEST_CLUSTER_URLS`; a test that needs it fails when that is unset rather than pass
//! without it. Nodes are numbered 1 to 3, as in the script.
//!
//! nextest runs each test in a process of its own, in parallel, and a test that kills a node
//! would pull it from under any other test on the cluster. So a test takes the cluster
//! through a file lock: [`Cluster::shared`] when it only uses it, [`Cluster::exclusive`] when
//! it kills nodes; the latter restarts every node it killed when dropped, on panic too.

use std::{
    collections::BTreeSet,
    fs::File,
    process::Stdio,
    sync::Mutex,
    time::{Duration, Instant},
};

use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};
use rustix::fs::{FlockOperation, flock};

use crate::helpers::unique;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");

/// How long a node may take to answer again, or a queue to elect a leader, on a busy machine.
const NODE_TIMEOUT: Duration = Duration::from_secs(120);

/// The three nodes' AMQP URLs, node 1 first, from `LLMQ_TEST_CLUSTER_URLS`.
pub fn urls() -> Vec<String> {
    let Ok(list) = std::env::var("LLMQ_TEST_CLUSTER_URLS") else {
        panic!(
            "this test needs the local RabbitMQ cluster and LLMQ_TEST_CLUSTER_URLS is unset: \
             run it with `make test`, or start the cluster with `scripts/cluster.sh start` and \
             set LLMQ_TEST_CLUSTER_URLS=\"$(scripts/cluster.sh urls)\", or run \
             `scripts/cluster.sh with cargo nextest run ...`"
        )
    };
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect();
    assert_eq!(
        urls.len(),
        3,
        "LLMQ_TEST_CLUSTER_URLS names {} URLs, not the three nodes of scripts/cluster.sh: {list}",
        urls.len()
    );
    urls
}

/// Runs `scripts/cluster.sh ARGS`; its trimmed output. Panics when it fails.
async fn script(args: &[&str]) -> String {
    let out = tokio::process::Command::new(SCRIPT)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("scripts/cluster.sh runs");
    assert!(
        out.status.success(),
        "scripts/cluster.sh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The cluster, held by one test among others that only use it too.
pub struct Cluster {
    urls: Vec<String>,
    /// The lock, held as long as this file stays open.
    _lock: File,
}

impl Cluster {
    /// Waits until no test holds the cluster exclusively, then holds it shared.
    pub async fn shared() -> Self {
        Self::lock(FlockOperation::LockShared).await
    }

    /// Waits until no other test holds the cluster, then holds it alone: for a test that
    /// kills nodes.
    pub async fn exclusive() -> ExclusiveCluster {
        ExclusiveCluster {
            cluster: Self::lock(FlockOperation::LockExclusive).await,
            killed: Mutex::new(BTreeSet::new()),
        }
    }

    async fn lock(how: FlockOperation) -> Self {
        let urls = urls();
        // In the temporary directory rather than the cluster's folder, which `stop` removes.
        let path = std::env::temp_dir().join("llmq-test-cluster.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("lock file {}: {e}", path.display()));
        let file = tokio::task::spawn_blocking(move || {
            flock(&file, how).expect("flock on the cluster's lock file");
            file
        })
        .await
        .unwrap();
        Self { urls, _lock: file }
    }

    /// Node `node`'s AMQP URL (1 to 3).
    pub fn url(&self, node: usize) -> &str {
        assert!((1..=3).contains(&node), "no node {node}: they are 1, 2, 3");
        &self.urls[node - 1]
    }

    /// The three URLs, node 1 first: what a worker given every address gets.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Whether node `node` accepts TCP connections on its AMQP port.
    pub async fn answers(&self, node: usize) -> bool {
        let url = url::Url::parse(self.url(node)).expect("a URL");
        let host = url.host_str().unwrap_or("127.0.0.1").to_string();
        let port = url.port().unwrap_or(5672);
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        .is_ok_and(|c| c.is_ok())
    }

    /// The node holding the leader of quorum queue `queue`, once it has one on a node that
    /// answers: just after its leader's node is lost, the others still name the dead one until
    /// they have elected another. Panics after [`NODE_TIMEOUT`].
    pub async fn leader_of(&self, queue: &str) -> usize {
        let deadline = Instant::now() + NODE_TIMEOUT;
        loop {
            let leader = script(&["leader", queue]).await;
            if let Ok(node) = leader.parse::<usize>()
                && self.answers(node).await
            {
                return node;
            }
            assert!(
                Instant::now() < deadline,
                "queue {queue} has no leader on a running node after {NODE_TIMEOUT:?} \
                 (last seen: {leader:?})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The cluster, held by this test alone, which may kill and restart its nodes. Dropping it
/// restarts every node it killed and did not restart, and waits until they are back in the
/// cluster, so the next test finds three nodes even after a failure.
pub struct ExclusiveCluster {
    cluster: Cluster,
    /// Nodes this test killed or shut down and has not restarted yet.
    killed: Mutex<BTreeSet<usize>>,
}

impl std::ops::Deref for ExclusiveCluster {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl ExclusiveCluster {
    /// SIGKILLs node `node`'s Erlang VM, a broker crash: no connection is closed cleanly.
    /// Returns once the process is gone.
    pub async fn kill_node(&self, node: usize) {
        self.url(node);
        // Recorded first: should the script fail half-way, the drop still restarts the node.
        self.killed.lock().unwrap().insert(node);
        script(&["kill", &node.to_string()]).await;
    }

    /// Stops node `node` gracefully, as a rolling upgrade does: its queue leaders handed
    /// over, its connections closed by the broker. Returns once it is stopped.
    pub async fn shutdown_node(&self, node: usize) {
        self.url(node);
        self.killed.lock().unwrap().insert(node);
        script(&["shutdown", &node.to_string()]).await;
    }

    /// Starts node `node` again and waits until it accepts connections and sees all three
    /// nodes running.
    pub async fn restart_node(&self, node: usize) {
        self.url(node);
        script(&["restart", &node.to_string()]).await;
        self.killed.lock().unwrap().remove(&node);
    }
}

impl Drop for ExclusiveCluster {
    fn drop(&mut self) {
        let killed = std::mem::take(&mut *self.killed.lock().unwrap_or_else(|e| e.into_inner()));
        for node in killed {
            // Blocking, and not a panic on failure: this may run while a test panics.
            let status = std::process::Command::new(SCRIPT)
                .args(["restart", &node.to_string()])
                .stdin(Stdio::null())
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!(
                    "node {node} of the test cluster did not come back ({status:?}): \
                     run `scripts/cluster.sh start`"
                );
            }
        }
    }
}

/// A connection to node `node`.
pub async fn connect(cluster: &Cluster, node: usize) -> Connection {
    Connection::connect(cluster.url(node), ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("node {node} of the cluster answers: {e}"))
}

/// Declares a durable quorum queue named `name` through `conn`, with its leader on the node
/// `conn` is connected to (`client-local`, said explicitly: later brokers may balance).
pub async fn declare_quorum_queue(conn: &Connection, name: &str) {
    let mut args = FieldTable::default();
    for (key, value) in [
        ("x-queue-type", "quorum"),
        ("x-queue-leader-locator", "client-local"),
    ] {
        args.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let _ = ch.close(200, "declared".into()).await;
}

/// A quorum queue of one test, deleted when dropped (on panic too) through the first node
/// that still answers.
struct QuorumQueue {
    name: String,
    urls: Vec<String>,
}

impl Drop for QuorumQueue {
    fn drop(&mut self) {
        let (name, urls) = (self.name.clone(), self.urls.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                for url in urls {
                    let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await
                    else {
                        continue;
                    };
                    if let Ok(ch) = conn.create_channel().await
                        && ch
                            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                            .await
                            .is_ok()
                    {
                        let _ = conn.close(200, "cleaned".into()).await;
                        return;
                    }
                }
            });
        })
        .join();
    }
}

/// The harness end to end: a confirmed persistent message in a quorum queue survives the
/// SIGKILL of the node holding the queue's leader, is read from another node, and the killed
/// node comes back into the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_message_in_a_quorum_queue_survives_the_kill_of_its_leader_node() {
    let cluster = Cluster::exclusive().await;
    let queue = QuorumQueue {
        name: unique("quorum"),
        urls: cluster.urls().to_vec(),
    };
    let conn = connect(&cluster, 1).await;
    declare_quorum_queue(&conn, &queue.name).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.name.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"kept",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(
        confirm,
        lapin::Confirmation::Ack(None),
        "published and routed"
    );

    let leader = cluster.leader_of(&queue.name).await;
    cluster.kill_node(leader).await;
    assert!(!cluster.answers(leader).await, "node {leader} is down");

    // Read through a survivor once the others have elected a new leader; a basic.get before
    // that may fail (and close its channel), so each attempt takes a fresh channel.
    let survivor = if leader == 1 { 2 } else { 1 };
    let new_leader = cluster.leader_of(&queue.name).await;
    assert_ne!(new_leader, leader, "a new leader on a surviving node");
    let conn = connect(&cluster, survivor).await;
    let deadline = Instant::now() + NODE_TIMEOUT;
    let message = loop {
        if let Ok(ch) = conn.create_channel().await
            && let Ok(Some(m)) = ch
                .basic_get(
                    queue.name.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
        {
            m.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            let _ = ch.close(200, "read".into()).await;
            break m.delivery;
        }
        assert!(
            Instant::now() < deadline,
            "the message was not readable from node {survivor} within {NODE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(message.data, b"kept");

    cluster.restart_node(leader).await;
    assert!(cluster.answers(leader).await, "node {leader} is back");
    let _ = conn.close(200, "done".into()).await;
}

/// The three nodes are one cluster: a queue declared through one node is there through the
/// others, with its leader where it was declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_nodes_form_one_cluster() {
    let cluster = Cluster::shared().await;
    let queue = QuorumQueue {
        name: unique("quorum"),
        urls: cluster.urls().to_vec(),
    };
    declare_quorum_queue(&connect(&cluster, 2).await, &queue.name).await;
    for node in [1, 3] {
        let conn = connect(&cluster, node).await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            queue.name.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("node {node} knows the queue declared on node 2: {e}"));
        let _ = conn.close(200, "done".into()).await;
    }
    assert_eq!(cluster.leader_of(&queue.name).await, 2);
}
