//! Operating it: metrics that move with real jobs, readiness that follows the broker
//! connection, DLQ tooling round trips, the fair-share lanes from declaration to cleanup.

use std::{collections::HashSet, path::Path, time::Duration};

use crate::helpers::{TestEnv, amqp_url, amqp_url_via, broker_addr, rabbitmqctl, wait_until};
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, QueueDeleteOptions},
};
use llmq::{
    app::App,
    broker::topology,
    config::{SecretUrl, child_command},
    ops::dlq::{self, Selection},
    ops::status,
    tools::mock::MockOptions,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A worker with its admin server on a free port; returns the base URL.
pub(crate) async fn worker_with_admin(
    env: &TestEnv,
) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    let app = App::start(env.config.clone(), stop.clone()).await.unwrap();
    let addr = app
        .admin_addr()
        .expect("admin.addr is set by the test config");
    let task = tokio::spawn(async move { app.run().await.expect("the worker runs") });
    (format!("http://{addr}"), stop, task)
}

/// GETs `url`: its status and body.
pub(crate) async fn get(url: &str) -> (u16, String) {
    llmq::install_crypto_provider();
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_real_jobs() {
    let env = TestEnv::new(MockOptions::default()).await;
    let (base, stop, task) = worker_with_admin(&env).await;
    wait_until(Duration::from_secs(10), "ready", || async {
        get(&format!("{base}/readyz")).await.0 == 200
    })
    .await;
    for i in 0..3 {
        env.publish_chat(
            &json!({"prompt": format!("m-{i}"), "request_id": format!("m-{i}")}),
            BasicProperties::default(),
        )
        .await;
    }
    let key = env.config.topology.processing_key.clone();
    env.publish(&key, b"not json", BasicProperties::default())
        .await;
    env.results(4).await;
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for line in [
        "llmq_requests_received_total{kind=\"chat\"} 4",
        "llmq_requests_succeeded_total{kind=\"chat\"} 3",
        "llmq_requests_dead_lettered_total{kind=\"chat\",error_kind=\"invalid_request\"} 1",
        "llmq_upstream_latency_seconds_count{kind=\"chat\"} 3",
        "llmq_publish_latency_seconds_count 3",
        "llmq_ready 1",
        "llmq_concurrency_limit 256",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    assert!(text.contains("llmq_tokens_used_total{kind=\"chat\"}"));
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    stop.cancel();
    task.await.unwrap();
    env.cleanup().await;
}

/// Every `llmq_` series name a query of the shipped Grafana dashboard reads.
fn dashboard_series() -> std::collections::BTreeSet<String> {
    fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, v) in o {
                    match (k.as_str(), v.as_str()) {
                        ("expr", Some(expr)) => out.push(expr.to_string()),
                        _ => exprs(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../deploy/grafana/llmq-dashboard.json")).unwrap();
    let mut found = Vec::new();
    exprs(&dashboard, &mut found);
    let name = regex::Regex::new(r"llmq_[a-z_]+").unwrap();
    found
        .iter()
        .flat_map(|expr| name.find_iter(expr).map(|m| m.as_str().to_string()))
        .collect()
}

/// Before any message, `/metrics` has every family with a series, and every query of the
/// shipped dashboard reads at least one: the labels the configuration names (deployments
/// with every outcome, tenants, fallbacks, queues) and both kinds with every error kind are
/// there at 0, `llmq_upstream_fallbacks_total` before any fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_and_dashboard_query_has_a_series_before_any_message() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.routing.fallbacks = [("big".to_string(), vec!["small".to_string()])].into();
    })
    .await;
    let (base, stop, task) = worker_with_admin(&env).await;
    let (status, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let has_series = |name: &str| {
        samples
            .iter()
            .any(|l| l.split(['{', ' ']).next() == Some(name))
    };
    let queried = dashboard_series();
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|n| !has_series(n)).collect();
    assert!(missing.is_empty(), "no series for {missing:?} in:\n{text}");
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let suffixed = |family: &str| {
        ["", "_total", "_bucket"]
            .iter()
            .any(|suffix| has_series(&format!("{family}{suffix}")))
    };
    let empty: Vec<&&str> = families.iter().filter(|f| !suffixed(f)).collect();
    assert!(empty.is_empty(), "families without a series: {empty:?}");
    let topo = &env.config.topology;
    for series in [
        "llmq_upstream_fallbacks_total{from=\"big\",to=\"small\"} 0".to_string(),
        "llmq_upstream_calls_total{upstream=\"default\",outcome=\"quota\"} 0".to_string(),
        "llmq_requests_dead_lettered_total{kind=\"embedding\",error_kind=\"redelivery_limit\"} 0"
            .to_string(),
        "llmq_requests_failed_total{kind=\"chat\",error_kind=\"transient\"} 0".to_string(),
        "llmq_tenant_requests_total{tenant=\"other\"} 0".to_string(),
        format!("llmq_queue_depth{{queue=\"{}\"}} 0", topo.dead_letter_queue),
    ] {
        assert!(
            text.lines().any(|l| l == series),
            "no `{series}` in:\n{text}"
        );
    }
    stop.cancel();
    task.await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_connection() {
    let proxy = crate::helpers::Proxy::start(broker_addr()).await;
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.amqp.url = Some(SecretUrl::new(amqp_url_via(proxy.addr)))
    })
    .await;
    let (base, stop, task) = worker_with_admin(&env).await;
    let readyz = format!("{base}/readyz");
    wait_until(Duration::from_secs(10), "ready", || async {
        get(&readyz).await.0 == 200
    })
    .await;
    let outage = tokio::spawn(async move {
        proxy.cut_for(Duration::from_secs(4)).await;
        proxy
    });
    wait_until(Duration::from_secs(4), "503 during the outage", || async {
        get(&readyz).await.0 == 503
    })
    .await;
    let _proxy = outage.await.unwrap();
    wait_until(Duration::from_secs(20), "ready again", || async {
        get(&readyz).await.0 == 200
    })
    .await;
    let (_, text) = get(&format!("{base}/metrics")).await;
    assert!(text.contains("llmq_broker_reconnects_total 1"), "{text}");
    stop.cancel();
    task.await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_replay_round_trip() {
    let env = TestEnv::new(MockOptions {
        error_rate: 1.0,
        status: 400,
        ..Default::default()
    })
    .await;
    let worker = env.start_worker();
    // One at a time, so the DLQ order is known.
    let dlq_name = env.config.topology.dead_letter_queue.clone();
    for i in 0..5u32 {
        env.publish_chat(
            &json!({"prompt": format!("d-{i}"), "request_id": format!("d-{i}")}),
            BasicProperties::default(),
        )
        .await;
        wait_until(Duration::from_secs(15), "the dead letter", || async {
            env.queue_len(&dlq_name).await == i + 1
        })
        .await;
    }
    let first = dlq::list(&env.config, 10).await.unwrap();
    let again = dlq::list(&env.config, 10).await.unwrap();
    assert_eq!(first.len(), 5);
    assert_eq!(
        first.iter().map(|d| &d.request_id).collect::<Vec<_>>(),
        again.iter().map(|d| &d.request_id).collect::<Vec<_>>(),
        "listing neither removes nor reorders"
    );
    assert!(
        first
            .iter()
            .all(|d| d.error_kind == "upstream_permanent" && d.attempts == 1)
    );
    assert_eq!(env.queue_len(&dlq_name).await, 5);

    // The CLI shows the same.
    let (cmd, _config_file) = child_command(Path::new(crate::helpers::bin()), &env.config).unwrap();
    let out = tokio::process::Command::from(cmd)
        .args(["dlq", "list", "--json"])
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);

    // The upstream recovers; replay two of them.
    env.mock.set_options(MockOptions::default());
    env.results(5).await; // the five error results
    let ids: HashSet<String> = ["d-1".to_string(), "d-3".to_string()].into();
    let replayed = dlq::replay(&env.config, &Selection::Ids(ids), true)
        .await
        .unwrap();
    assert_eq!(replayed.len(), 2);
    let mut results = env.results(2).await;
    results.sort_by_key(|(_, r)| r["request_id"].as_str().unwrap().to_string());
    assert_eq!(results[0].1["request_id"], "d-1");
    assert_eq!(results[1].1["request_id"], "d-3");
    assert!(
        results.iter().all(|(_, r)| r["status"] == "ok"),
        "{results:?}"
    );
    let left: Vec<String> = dlq::list(&env.config, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.request_id)
        .collect();
    assert_eq!(
        left,
        ["d-0", "d-2", "d-4"].map(String::from),
        "the others stay, in order"
    );

    let status = status::status(&env.config).await.unwrap();
    let dlq_row = status.iter().find(|q| q.queue == dlq_name).unwrap();
    assert_eq!(dlq_row.messages, 3);
    assert_eq!(dlq::purge(&env.config).await.unwrap(), 3);
    assert_eq!(env.queue_len(&dlq_name).await, 0);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// The fair-share lanes: a worker declares every lane of both work queues as it declares the
/// work queues (durable, exactly `x-max-priority`, bound to nothing), reads their depths for
/// `llmq_queue_depth`; `llmq status` folds them into one line per work queue plus the lanes
/// that hold messages; the tests' cleanup deletes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_are_declared_measured_reported_and_cleaned_up() {
    let env = TestEnv::new(MockOptions::default()).await;
    let topo = env.config.topology.clone();
    let lanes: Vec<String> = topology::lanes(&topo).collect();
    assert_eq!(lanes.len(), 2 * usize::from(topo.lanes));
    // The env declared them; the worker must declare them itself.
    for lane in &lanes {
        env.channel
            .queue_delete(lane.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    let (base, stop, task) = worker_with_admin(&env).await;
    wait_until(Duration::from_secs(10), "ready", || async {
        get(&format!("{base}/readyz")).await.0 == 200
    })
    .await;
    wait_until(Duration::from_secs(15), "every lane's depth", || async {
        let metrics = get(&format!("{base}/metrics")).await.1;
        lanes
            .iter()
            .all(|lane| metrics.contains(&format!("llmq_queue_depth{{queue=\"{lane}\"}}")))
    })
    .await;
    stop.cancel();
    task.await.unwrap();

    let declared = declared_queues();
    let work_args = &declared[topo.processing_queue.as_str()]["arguments"];
    assert_eq!(
        work_args,
        &json!([["x-max-priority", "signedint", topo.max_priority]])
    );
    for lane in &lanes {
        let q = declared
            .get(lane.as_str())
            .unwrap_or_else(|| panic!("{lane} missing"));
        assert_eq!(q["durable"], true, "{lane}");
        assert_eq!(
            &q["arguments"], work_args,
            "{lane}: the work queues' arguments"
        );
    }
    // Bound to no exchange: only the default exchange's implicit binding.
    let bound = rabbitmqctl(&[
        "list_bindings",
        "-q",
        "destination_name",
        "--formatter",
        "json",
    ]);
    let bound: Vec<serde_json::Value> = serde_json::from_str(&bound).unwrap();
    for lane in &lanes {
        let bindings = bound
            .iter()
            .filter(|b| b["destination_name"] == lane.as_str())
            .count();
        assert_eq!(bindings, 1, "{lane}: the default exchange's binding only");
    }

    // Three requests waiting in one lane of the processing queue.
    let lane = topology::lane_queue(&topo.processing_queue, 10);
    for i in 0..3 {
        env.channel
            .basic_publish(
                "".into(),
                lane.as_str().into(),
                BasicPublishOptions::default(),
                format!("{{\"prompt\": \"lane-{i}\"}}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let queues = status::status(&env.config).await.unwrap();
    let in_lanes: Vec<_> = queues.iter().filter(|q| q.lane_of.is_some()).collect();
    assert_eq!(in_lanes.len(), lanes.len(), "every lane listed");
    let row = queues.iter().find(|q| q.queue == lane).unwrap();
    assert_eq!(row.messages, 3);
    assert_eq!(row.lane_of.as_deref(), Some(topo.processing_queue.as_str()));
    let table = status::table(&queues);
    let line = |start: &str| {
        table
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|words| words.first() == Some(&start))
            .unwrap_or_else(|| panic!("no line for {start} in\n{table}"))
    };
    let n = topo.lanes.to_string();
    let folded = format!("{}.lane.*", topo.processing_queue);
    assert_eq!(line(&folded)[1..], [&format!("({n}"), "lanes)", "3", "0"]);
    assert_eq!(line(&lane)[1..], ["3", "0"]);
    let folded = format!("{}.lane.*", topo.embeddings_queue);
    assert_eq!(line(&folded)[1..], [&format!("({n}"), "lanes)", "0", "0"]);
    assert_eq!(
        table.lines().filter(|l| l.contains(".lane.")).count(),
        3,
        "two folded lines and the one lane that holds messages:\n{table}"
    );

    env.cleanup().await;
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let mut reader = topology::DepthReader::new(&conn);
    for lane in &lanes {
        assert_eq!(reader.read(lane).await.unwrap(), None, "{lane} deleted");
    }
    reader.close().await;
    let _ = conn.close(200, "checked".into()).await;
}

/// Every queue on the broker by name, as `rabbitmqctl list_queues` reports it (name,
/// durable, arguments).
fn declared_queues() -> std::collections::HashMap<String, serde_json::Value> {
    let out = rabbitmqctl(&[
        "list_queues",
        "-q",
        "name",
        "durable",
        "arguments",
        "--formatter",
        "json",
    ]);
    let queues: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    queues
        .into_iter()
        .filter_map(|q| Some((q["name"].as_str()?.to_string(), q)))
        .collect()
}

/// An embedding request (no `kind` field: its queue says what it is) that was republished
/// to its queue by name before it was dead-lettered (counted as redelivered here; given
/// back at a shutdown or published into a lane, the same) is replayed to the embeddings
/// queue, and one dead-lettered from an embeddings lane too: not to the chat queue, where it
/// would read as a chat request without messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_sends_embeddings_back_to_the_embeddings_queue() {
    let env = TestEnv::new(MockOptions {
        error_rate: 1.0,
        status: 400,
        ..Default::default()
    })
    .await;
    let topo = env.config.topology.clone();
    let body = |id: &str| json!({"request_id": id, "input": "x"}).to_string();
    let json_props = || BasicProperties::default().with_content_type("application/json".into());
    env.publish(
        &topo.embeddings_key,
        body("redelivered").as_bytes(),
        json_props(),
    )
    .await;
    // Taken and never settled: the broker requeues it flagged redelivered.
    let taker = env.conn.create_channel().await.unwrap();
    let taken = taker
        .basic_get(
            topo.embeddings_queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap();
    assert!(taken.is_some(), "the request was in its queue");
    taker.close(200, "unsettled".into()).await.unwrap();
    wait_until(Duration::from_secs(5), "the request requeued", || async {
        env.queue_len(&topo.embeddings_queue).await == 1
    })
    .await;
    let lane = topology::lane_queue(&topo.embeddings_queue, 3);
    env.channel
        .basic_publish(
            "".into(),
            lane.as_str().into(),
            BasicPublishOptions::default(),
            body("in-a-lane").as_bytes(),
            json_props().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let worker = env.start_worker();
    wait_until(Duration::from_secs(20), "both dead-lettered", || async {
        env.queue_len(&topo.dead_letter_queue).await == 2
    })
    .await;
    worker.stop().await.unwrap();
    let mut listed = dlq::list(&env.config, 10).await.unwrap();
    listed.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    let seen: Vec<(&str, &str, &str)> = listed
        .iter()
        .map(|d| {
            (
                d.request_id.as_str(),
                d.routing_key.as_str(),
                d.error_kind.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("in-a-lane", lane.as_str(), "upstream_permanent"),
            (
                "redelivered",
                topo.embeddings_queue.as_str(),
                "upstream_permanent"
            ),
        ],
        "each came by its queue's name, not by the embeddings key"
    );

    let replayed = dlq::replay(&env.config, &Selection::All, true)
        .await
        .unwrap();
    assert_eq!(replayed.len(), 2);
    assert_eq!(env.queue_len(&topo.embeddings_queue).await, 2);
    assert_eq!(env.queue_len(&topo.processing_queue).await, 0);

    // Answered as the embeddings they are.
    env.results(2).await; // the two error results of the dead letters
    env.mock.set_options(MockOptions::default());
    let worker = env.start_worker();
    let results = env.results(2).await;
    for (_, r) in &results {
        assert_eq!(
            (&r["status"], &r["kind"]),
            (&json!("ok"), &json!("embedding")),
            "{r}"
        );
    }
    worker.stop().await.unwrap();
    env.cleanup().await;
}
