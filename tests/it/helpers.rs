//! Shared test helpers: a worker with unique names against the real broker at `AMQP_URL`,
//! the mock upstream in-process, and small publish/receive helpers.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    },
    types::FieldTable,
};
use llmq::{
    app::{App, AppError},
    broker::topology,
    config::{ChildConfigFile, Config, QueueType, SecretUrl, child_command},
    tools::mock::{MockOptions, MockServer},
};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Worker logs in test output (shown for failed tests), filtered by `TEST_LOG`.
pub fn init_logs() {
    let filter = std::env::var("TEST_LOG").unwrap_or_else(|_| "llmq=info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// The broker the tests use: `AMQP_URL`, the single local broker unless a run points the
/// suites at a node of the test cluster (see [`queue_type`]).
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://llmq:llmq@127.0.0.1:5672/%2f".into())
}

/// The queue type the tests declare: `classic`, unless `LLMQ_TEST_QUEUE_TYPE=quorum`, which
/// `make test` sets for its second run of the end-to-end, faults and guarantees suites, on
/// the test cluster (with `AMQP_URL` and `LLMQ_TEST_RABBITMQ_NODE` naming one of its nodes).
pub fn queue_type() -> QueueType {
    match std::env::var("LLMQ_TEST_QUEUE_TYPE").as_deref() {
        Ok("quorum") => QueueType::Quorum,
        Ok("classic") | Err(_) => QueueType::Classic,
        Ok(other) => panic!("LLMQ_TEST_QUEUE_TYPE is classic or quorum, not {other:?}"),
    }
}

/// A name no other test uses.
pub fn unique(what: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("llmq-test-{what}-{}", &id[..10])
}

/// A configuration whose every exchange and queue name is unique to this test.
pub fn test_config(base_url: &str) -> Config {
    let p = unique("t");
    let mut c = Config::default();
    c.amqp.url = Some(SecretUrl::new(amqp_url()));
    c.llm.base_url = SecretUrl::new(base_url);
    c.llm.timeout_secs = 10;
    c.worker.id = format!("{p}-worker");
    c.worker.consumers = 2;
    c.worker.prefetch = 16;
    c.worker.shutdown_grace_secs = 10;
    c.admin.addr = "127.0.0.1:0".into();
    c.retry.initial_delay_ms = 50;
    c.retry.max_delay_secs = 1;
    c.topology = c.topology.with_prefix(&p);
    c.topology.queue_type = queue_type();
    c.idempotency.key_prefix = p;
    // Results the tests store in the shared Redis expire soon after.
    c.idempotency.ttl_secs = 300;
    if let Ok(redis) = std::env::var("REDIS_URL") {
        c.idempotency.redis_url = llmq::config::SecretUrl::new(redis);
    }
    c
}

/// A test's world: the mock upstream, a broker connection of its own, the config.
pub struct TestEnv {
    pub config: Config,
    pub mock: MockServer,
    pub conn: Connection,
    /// A confirm-mode channel for publishing requests and inspecting queues.
    pub channel: Channel,
    /// The broker this env declared its topology on, where a failed test's drop deletes it.
    url: String,
    cleaned: bool,
}

/// A worker running in-process.
pub struct Worker {
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), AppError>>,
}

impl Worker {
    /// Graceful shutdown; returns the worker's own result.
    pub async fn stop(self) -> Result<(), AppError> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("worker stops within 30 s")
            .expect("worker task does not panic")
    }
}

impl TestEnv {
    /// Starts the mock and connects; declares the topology so requests can be published
    /// before the worker runs.
    pub async fn new(mock: MockOptions) -> Self {
        Self::with(mock, |_| {}).await
    }

    /// Like [`Self::new`], with the config adjusted first.
    pub async fn with(mock: MockOptions, adjust: impl FnOnce(&mut Config)) -> Self {
        Self::on_broker(&amqp_url(), mock, adjust).await
    }

    /// Like [`Self::with`], connected to the broker at `url` (a node of the test cluster,
    /// say) rather than `AMQP_URL`; `adjust` points the worker's configuration at it.
    pub async fn on_broker(url: &str, mock: MockOptions, adjust: impl FnOnce(&mut Config)) -> Self {
        init_logs();
        let mock = MockServer::start("127.0.0.1:0".parse().unwrap(), mock)
            .await
            .expect("mock starts");
        let mut config = test_config(&mock.base_url());
        adjust(&mut config);
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("the broker at {url} answers: {e}"));
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        topology::declare(&channel, &config.topology).await.unwrap();
        Self {
            config,
            mock,
            conn,
            channel,
            url: url.to_string(),
            cleaned: false,
        }
    }

    /// Starts the service (worker and admin server) with this env's config, as `llmq run`
    /// does.
    pub fn start_worker(&self) -> Worker {
        self.start_worker_with(self.config.clone())
    }

    /// Starts the service with `config`: another replica of this env's topology, say, under
    /// a worker id of its own.
    pub fn start_worker_with(&self, config: Config) -> Worker {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move { App::start(config, token).await?.run().await });
        Worker { stop, task }
    }

    /// Publishes a request (persistent, JSON) with extra properties; waits for the confirm.
    pub async fn publish(&self, key: &str, body: &[u8], props: BasicProperties) {
        let props = props.with_delivery_mode(2);
        let confirm = self
            .channel
            .basic_publish(
                self.config.topology.request_exchange.as_str().into(),
                key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(confirm, lapin::Confirmation::Ack(None), "request routed");
    }

    /// Publishes a chat request on the processing key.
    pub async fn publish_chat(&self, body: &Value, props: BasicProperties) {
        let key = self.config.topology.processing_key.clone();
        self.publish(
            &key,
            body.to_string().as_bytes(),
            props.with_content_type("application/json".into()),
        )
        .await;
    }

    /// Takes `n` messages from `queue`, acking them, or panics after `timeout`.
    pub async fn take(&self, queue: &str, n: usize, timeout: Duration) -> Vec<Delivery> {
        take(&self.conn, queue, n, timeout).await
    }

    /// Chat calls the mock has answered, failed ones included.
    pub fn chat_calls(&self) -> u64 {
        self.mock
            .stats()
            .chat_calls
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes `n` dead letters from the DLQ.
    pub async fn dead_letters(&self, n: usize) -> Vec<Delivery> {
        let q = self.config.topology.dead_letter_queue.clone();
        self.take(&q, n, Duration::from_secs(30)).await
    }

    /// Takes `n` results from the results queue, parsed.
    pub async fn results(&self, n: usize) -> Vec<(BasicProperties, Value)> {
        let q = self.config.topology.results_queue.clone();
        self.take(&q, n, Duration::from_secs(30))
            .await
            .into_iter()
            .map(|d| (d.properties.clone(), json(&d.data)))
            .collect()
    }

    /// Takes `n` dead letters, in the order of their bodies' request ids (to pair them with
    /// what was sent, and with [`Self::results_by_id`]).
    pub async fn dead_letters_by_id(&self, n: usize) -> Vec<Delivery> {
        let mut dead = self.dead_letters(n).await;
        dead.sort_by_key(|d| request_id(&json(&d.data)));
        dead
    }

    /// Takes `n` results, parsed, in the order of their request ids.
    pub async fn results_by_id(&self, n: usize) -> Vec<Value> {
        let mut results: Vec<Value> = self.results(n).await.into_iter().map(|(_, b)| b).collect();
        results.sort_by_key(request_id);
        results
    }

    /// Publishes each `(body, reason)` of `cases` (in the order of their request ids) as a
    /// chat request and checks that each was refused as invalid for `reason`: its dead
    /// letter is the request itself, with `x-error-kind` `invalid_request` and `x-error` the
    /// reason, and its error result says the reason. Gives the results back, in the same
    /// order, for more checks.
    pub async fn refused_each(&self, cases: &[(Value, &str)]) -> Vec<Value> {
        for (body, _) in cases {
            self.publish_chat(body, BasicProperties::default()).await;
        }
        let dead = self.dead_letters_by_id(cases.len()).await;
        let results = self.results_by_id(cases.len()).await;
        for (((body, reason), d), result) in cases.iter().zip(&dead).zip(&results) {
            assert_eq!(json(&d.data)["request_id"], body["request_id"]);
            assert_eq!(
                header(d, "x-error-kind").as_deref(),
                Some("invalid_request")
            );
            assert_eq!(header(d, "x-error").as_deref(), Some(*reason));
            assert_eq!(result["error"]["message"], *reason);
        }
        results
    }

    /// An exclusive, server-named queue on the env's connection (a `reply_to`, or a queue of
    /// the test's own): gone with the connection, and not auto-deleted, since a test may
    /// consume it more than once.
    pub async fn reply_queue(&self) -> String {
        self.channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("a reply queue")
            .name()
            .to_string()
    }

    /// Ready messages in `queue`.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let ch = self.conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = ch.close(200, "ok".into()).await;
        q.message_count()
    }

    /// Deletes everything this test declared.
    pub async fn cleanup(mut self) {
        delete_topology(&self.conn, &self.config.topology).await;
        self.cleaned = true;
        let _ = self.conn.close(200, "test done".into()).await;
    }
}

impl Drop for TestEnv {
    /// A test that failed before `cleanup` still leaves nothing behind.
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let topo = self.config.topology.clone();
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await {
                    delete_topology(&conn, &topo).await;
                    let _ = conn.close(200, "test cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

/// Deletes the queues and exchanges of `t`.
pub async fn delete_topology(conn: &Connection, t: &llmq::config::TopologyConfig) {
    if let Ok(ch) = conn.create_channel().await {
        topology::delete(&ch, t).await;
        let _ = ch.close(200, "cleaned".into()).await;
    }
}

/// Takes `n` messages from `queue` on a fresh channel, acking each.
pub async fn take(conn: &Connection, queue: &str, n: usize, timeout: Duration) -> Vec<Delivery> {
    let ch = conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            unique("c").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut out = Vec::with_capacity(n);
    let collect = async {
        while out.len() < n {
            let d = consumer
                .next()
                .await
                .expect("consumer open")
                .expect("delivery");
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
            out.push(d);
        }
    };
    if tokio::time::timeout(timeout, collect).await.is_err() {
        panic!(
            "only {} of {n} messages arrived on {queue} within {timeout:?}",
            out.len()
        );
    }
    let _ = ch.close(200, "ok".into()).await;
    out
}

/// Parses a JSON body.
pub fn json(data: &[u8]) -> Value {
    serde_json::from_slice(data).expect("JSON body")
}

/// Reads a string header.
pub fn header(d: &Delivery, name: &str) -> Option<String> {
    llmq::contract::headers::get_str(&d.properties, name)
}

/// The path of the built binary: the one nextest names at run time when it has one (an
/// archived run, or a target directory other builds may have overwritten since), else the
/// one cargo built with these tests.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("NEXTEST_BIN_EXE_llmq").unwrap_or_else(|_| env!("CARGO_BIN_EXE_llmq").into())
    })
}

/// Runs `llmq <args>` with `config` as its whole configuration, to its end.
pub async fn llmq_with(config: &Config, args: &[&str]) -> std::process::Output {
    let (cmd, _file) = child_command(std::path::Path::new(bin()), config).unwrap();
    tokio::process::Command::from(cmd)
        .args(args)
        .current_dir(std::env::temp_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap()
}

/// A worker started from the `llmq` binary.
pub struct WorkerProcess {
    /// The process.
    pub child: tokio::process::Child,
    /// The file it read its configuration from, kept as long as the process handle.
    _config: ChildConfigFile,
}

/// Starts the `llmq` binary as a worker with `config`; its output goes to `log`.
pub fn spawn_worker_process(config: &Config, log: &std::path::Path) -> WorkerProcess {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let (cmd, file) = child_command(std::path::Path::new(bin()), config).unwrap();
    let mut cmd = tokio::process::Command::from(cmd);
    if std::env::var("TEST_LOG").is_ok() {
        cmd.env("LLMQ_LOG__LEVEL", "llmq=debug");
    }
    let child = cmd
        .arg("run")
        .current_dir(std::env::temp_dir())
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    WorkerProcess {
        child,
        _config: file,
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy between the worker and the broker that can cut every connection (for a
/// while or for good), or fall silent like a node whose host is gone.
pub struct Proxy {
    /// Where the worker connects.
    pub addr: std::net::SocketAddr,
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Cancelled when the proxy falls silent.
    silent: CancellationToken,
    /// Connections it has accepted while not refusing, ever.
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Connections it has refused, ever.
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Proxies 127.0.0.1:<random> to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refusing = Arc::new(AtomicBool::new(false));
        let (accepted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let silent = CancellationToken::new();
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (r, a, no, quiet, c) = (
            refusing.clone(),
            accepted.clone(),
            refused.clone(),
            silent.clone(),
            conns.clone(),
        );
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if r.load(SeqCst) {
                    drop(inbound);
                    no.fetch_add(1, SeqCst);
                    continue;
                }
                let quiet = quiet.clone();
                let task = tokio::spawn(async move {
                    if quiet.is_cancelled() {
                        // Accepted, never answered: held open until the proxy goes.
                        let _held = inbound;
                        return std::future::pending().await;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Nothing more goes either way, and both sockets stay open: neither
                        // end hears of it but by its heartbeats.
                        () = quiet.cancelled() => std::future::pending().await,
                    }
                });
                a.fetch_add(1, SeqCst);
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Self {
            addr,
            refusing,
            silent,
            accepted,
            refused,
            conns,
            accept,
        }
    }

    /// Drops every proxied connection and refuses new ones for `outage`.
    pub async fn cut_for(&self, outage: Duration) {
        self.cut();
        tokio::time::sleep(outage).await;
        self.restore();
    }

    /// Takes new connections again after [`Self::cut`].
    pub fn restore(&self) {
        self.refusing
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Drops every proxied connection and refuses new ones from now on: a node gone for good.
    pub fn cut(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    /// Forwards nothing more on any connection, keeping each open, and accepts new ones
    /// without ever answering: a node whose host froze or dropped off the network.
    pub fn fall_silent(&self) {
        self.silent.cancel();
    }

    /// How many connections it has accepted (forwarded, or held when silent).
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many connections it has refused while cut.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for conn in self.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }
}

/// The broker's address from `AMQP_URL`.
pub fn broker_addr() -> std::net::SocketAddr {
    let url = url::Url::parse(&amqp_url()).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1");
    let port = url.port().unwrap_or(5672);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .unwrap()
        .next()
        .unwrap()
}

/// `AMQP_URL` with its host and port replaced by `addr`.
pub fn amqp_url_via(addr: std::net::SocketAddr) -> String {
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_ip_host(addr.ip()).unwrap();
    url.set_port(Some(addr.port())).unwrap();
    url.to_string()
}

/// Drains every result now in the results queue (waiting `idle` for more), keyed by
/// request_id; returns (all results, unique ok ids).
pub async fn drain_results(
    env: &TestEnv,
    expected_unique: usize,
    timeout: Duration,
) -> (Vec<Value>, std::collections::HashSet<String>) {
    let ch = env.conn.create_channel().await.unwrap();
    let mut consumer = ch
        .basic_consume(
            env.config.topology.results_queue.as_str().into(),
            unique("drain").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    let mut ok = std::collections::HashSet::new();
    let _ = tokio::time::timeout(timeout, async {
        while ok.len() < expected_unique {
            let Some(Ok(d)) = consumer.next().await else {
                break;
            };
            let v = json(&d.data);
            if v["status"] == "ok" {
                ok.insert(v["request_id"].as_str().unwrap().to_string());
            }
            all.push(v);
        }
    })
    .await;
    let _ = ch.close(200, "ok".into()).await;
    (all, ok)
}

/// Runs `rabbitmqctl` on this machine's broker (installed with rabbitmq-server), or on the
/// node `LLMQ_TEST_RABBITMQ_NODE` names (a node of the test cluster, whose users and
/// policies are the cluster's); its trimmed output. Panics when it fails.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let node = std::env::var("LLMQ_TEST_RABBITMQ_NODE").ok();
    let out = std::process::Command::new("rabbitmqctl")
        .args(node.iter().flat_map(|n| ["-n", n.as_str()]))
        .args(args)
        .output()
        .expect("rabbitmqctl runs (these tests need the broker on this machine)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A RabbitMQ user for one test, with every permission on `/`: a sender whose `user_id` the
/// broker checks, so a tenant of its own. Deleted when dropped, on panic too.
pub struct BrokerUser {
    /// Its unique name.
    pub name: String,
}

/// The password of every [`BrokerUser`].
const BROKER_USER_PASSWORD: &str = "pw";

impl BrokerUser {
    /// A user named [`unique`]`(what)`.
    pub fn create(what: &str) -> Self {
        Self::create_named(unique(what))
    }

    /// A user named `name` (a name no other test uses).
    pub fn create_named(name: String) -> Self {
        rabbitmqctl(&["-q", "add_user", &name, BROKER_USER_PASSWORD]);
        // Made before it is given permissions, so that a failure below still deletes it.
        let user = Self { name };
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            "/",
            &user.name,
            ".*",
            ".*",
            ".*",
        ]);
        user
    }

    /// Several users, made side by side (each `rabbitmqctl` call takes most of a second).
    pub fn create_all<const N: usize>(what: [&str; N]) -> [Self; N] {
        std::thread::scope(|s| {
            what.map(|w| s.spawn(move || Self::create(w)))
                .map(|made| made.join().expect("rabbitmqctl makes the user"))
        })
    }

    /// Deletes these users side by side (dropped one by one, each waits for the last).
    pub fn delete_all(users: impl IntoIterator<Item = Self>) {
        std::thread::scope(|s| {
            for user in users {
                s.spawn(move || drop(user));
            }
        });
    }

    /// A connection authenticated as this user.
    pub async fn connect(&self) -> Connection {
        let mut url = url::Url::parse(&amqp_url()).unwrap();
        url.set_username(&self.name).unwrap();
        url.set_password(Some(BROKER_USER_PASSWORD)).unwrap();
        Connection::connect(url.as_str(), ConnectionProperties::default())
            .await
            .unwrap()
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .status();
    }
}

/// A policy set with `rabbitmqctl` for one test; cleared when dropped, on panic too.
pub struct Policy(String);

impl Policy {
    /// `rabbitmqctl set_policy --apply-to <apply_to> <unique name> <pattern> <definition>`,
    /// at a priority above the shipped policies.
    pub fn set(apply_to: &str, pattern: &str, definition: &Value) -> Self {
        let name = unique("policy");
        let definition = definition.to_string();
        rabbitmqctl(&[
            "set_policy",
            "--apply-to",
            apply_to,
            "--priority",
            "100",
            &name,
            pattern,
            &definition,
        ]);
        Self(name)
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

/// A policy pattern that matches exactly these names.
pub fn exactly(names: &[&str]) -> String {
    let escaped: Vec<String> = names.iter().map(|n| regex_escape(n)).collect();
    format!("^({})$", escaped.join("|"))
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = ".^$|()[]{}*+?\\-".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// The `request_id` of a request or result body.
fn request_id(body: &Value) -> String {
    body["request_id"]
        .as_str()
        .expect("a request id")
        .to_string()
}

/// The Redis the tests use: `REDIS_URL`, else the local one.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection to the tests' Redis.
pub async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// Deletes every Redis key under `prefix:` (a test's budgets, usage ledger, shared state).
pub async fn delete_redis_keys(prefix: &str) {
    let mut conn = redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .expect("keys");
    for key in keys {
        let _: () = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("del");
    }
}
