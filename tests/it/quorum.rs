//! Quorum queues (`topology.queue_type = "quorum"`) on the broker at `AMQP_URL`, the broker's
//! version, a worker that finds queues of the other type, and `llmq topology convert`.

use std::{collections::HashMap, path::Path, time::Duration};

use lapin::{
    BasicProperties, Connection,
    options::{BasicGetOptions, BasicNackOptions, BasicPublishOptions},
    types::{AMQPValue, FieldTable},
};
use llmq::{
    app::AppError,
    broker::{
        arguments::Priorities,
        retry,
        topology::{self, DeclareError},
        version::{self, BrokerVersion},
    },
    config::{Config, QueueType, SecretUrl, child_command},
    ops::{OpsError, convert, status},
    tools::mock::MockOptions,
    worker::WorkerError,
};
use serde_json::{Value, json};

use crate::helpers::{
    BrokerUser, TestEnv, amqp_url, header, rabbitmqctl, spawn_worker_process, unique, wait_until,
};

/// The version the broker announces in its handshake is read, and parses.
#[tokio::test]
async fn the_broker_version_is_read_from_its_handshake() {
    let raw = version::read(&amqp_url(), &Default::default())
        .await
        .expect("the broker answers");
    let parsed = BrokerVersion::parse(&raw).expect("a version");
    assert!(parsed >= BrokerVersion::new(3, 10, 0), "{raw}");
}

/// The broker's version, parsed.
async fn broker_version() -> Option<BrokerVersion> {
    version::announced(&SecretUrl::new(amqp_url()), &Default::default()).await
}

/// Every queue whose name starts with `prefix`: its type and its arguments, as
/// `rabbitmqctl list_queues` reports them (`[[name, type, value], ...]`).
fn queues_named(prefix: &str) -> HashMap<String, (String, Value)> {
    let out = rabbitmqctl(&[
        "list_queues",
        "-q",
        "name",
        "type",
        "arguments",
        "--formatter",
        "json",
    ]);
    let queues: Vec<Value> = serde_json::from_str(&out).unwrap();
    queues
        .into_iter()
        .filter_map(|q| {
            let name = q["name"].as_str()?.to_string();
            name.starts_with(prefix).then(|| {
                let kind = q["type"].as_str().unwrap_or_default().to_string();
                (name, (kind, q["arguments"].clone()))
            })
        })
        .collect()
}

/// The prefix every queue of `config`'s topology starts with.
fn prefix(config: &Config) -> String {
    config
        .topology
        .request_exchange
        .trim_end_matches(".requests")
        .to_string()
}

fn quorum(c: &mut Config) {
    c.topology.queue_type = QueueType::Quorum;
    c.topology.lanes = 2;
}

/// With `queue_type = "quorum"` every queue is a quorum queue with what it needs: the work
/// queues and lanes dead-letter at least once and have the delivery limit, the others the
/// delivery limit only, none `x-max-priority`; the retry tiers are as before. A second
/// declaration matches the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_topology_is_declared_with_what_each_queue_needs() {
    let env = TestEnv::with(MockOptions::default(), quorum).await;
    let t = env.config.topology.clone();
    topology::declare_on(&env.conn, &t)
        .await
        .expect("declared again");
    let queues = queues_named(&prefix(&env.config));
    let work = json!([
        ["x-dead-letter-strategy", "longstr", "at-least-once"],
        ["x-delivery-limit", "signedint", 1_000_000],
        ["x-overflow", "longstr", "reject-publish"],
        ["x-queue-type", "longstr", "quorum"],
    ]);
    let holding = json!([
        ["x-delivery-limit", "signedint", 1_000_000],
        ["x-queue-type", "longstr", "quorum"],
    ]);
    let sorted = |v: &Value| {
        let mut items = v.as_array().cloned().unwrap_or_default();
        items.sort_by_key(|i| i[0].as_str().unwrap_or_default().to_string());
        Value::Array(items)
    };
    let mut expected: Vec<(String, &Value)> = topology::lanes(&t).map(|l| (l, &work)).collect();
    expected.extend([
        (t.processing_queue.clone(), &work),
        (t.embeddings_queue.clone(), &work),
        (t.dead_letter_queue.clone(), &holding),
        (t.results_queue.clone(), &holding),
        (t.unroutable_queue.clone(), &holding),
    ]);
    for (name, args) in expected {
        let (kind, declared) = queues
            .get(&name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(kind, "quorum", "{name}");
        assert_eq!(&sorted(declared), args, "{name}");
    }
    for tier in retry::TIERS {
        let name = topology::retry_queue(&t, tier.name);
        assert_eq!(queues[&name].0, "quorum", "{name}");
    }
    env.cleanup().await;
}

/// On quorum queues: a request is answered; its result waits in the quorum results queue with
/// its per-message TTL, and expires there; a request the upstream refuses lands in the quorum
/// dead-letter queue; `llmq status` says what priorities the work queues have on this broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_and_dead_lettered_on_quorum_queues() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        quorum(c);
        c.topology.results_ttl_secs = 2;
    })
    .await;
    let worker = env.start_worker();
    env.publish_chat(
        &json!({"request_id": "q-ok", "prompt": "hello"}),
        BasicProperties::default().with_priority(7),
    )
    .await;
    let results_queue = env.config.topology.results_queue.clone();
    wait_until(Duration::from_secs(20), "the result kept", || async {
        env.queue_len(&results_queue).await == 1
    })
    .await;
    // Read without taking it: its TTL is there, then it expires.
    let ch = env.conn.create_channel().await.unwrap();
    let kept = ch
        .basic_get(
            results_queue.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("the result");
    let result: Value = serde_json::from_slice(&kept.delivery.data).unwrap();
    assert_eq!(result["request_id"], "q-ok");
    assert_eq!(result["status"], "ok");
    assert_eq!(
        kept.delivery
            .properties
            .expiration()
            .as_ref()
            .map(|e| e.as_str()),
        Some("2000")
    );
    kept.delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    let _ = ch.close(200, "read".into()).await;
    wait_until(Duration::from_secs(30), "the result to expire", || async {
        env.queue_len(&results_queue).await == 0
    })
    .await;

    env.mock.set_options(MockOptions {
        error_rate: 1.0,
        status: 400,
        ..Default::default()
    });
    env.publish_chat(
        &json!({"request_id": "q-dead", "prompt": "refused"}),
        BasicProperties::default(),
    )
    .await;
    let dead = env.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], "x-error-kind").as_deref(),
        Some("upstream_permanent")
    );

    let rows = status::status(&env.config).await.unwrap();
    let work = rows
        .iter()
        .find(|r| r.queue == env.config.topology.processing_queue)
        .unwrap();
    let expected = Priorities::of_quorum(broker_version().await);
    assert_eq!(work.priorities, Some(expected));
    let dlq = rows
        .iter()
        .find(|r| r.queue == env.config.topology.dead_letter_queue)
        .unwrap();
    assert_eq!(dlq.priorities, None);
    worker.stop().await.unwrap();
    env.cleanup().await;
}

/// A classic topology exists and the worker is configured for quorum queues: the `llmq`
/// binary does not start; it exits 1 (as for any start-up failure), saying which queue is of
/// which type and the procedure. Nothing was changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_configured_for_quorum_refuses_a_classic_topology_and_exits() {
    let env = TestEnv::with(MockOptions::default(), |c| c.topology.lanes = 2).await;
    let mut config = env.config.clone();
    config.topology.queue_type = QueueType::Quorum;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut worker = spawn_worker_process(&config, &log);
    let status = tokio::time::timeout(Duration::from_secs(30), worker.child.wait())
        .await
        .expect("the worker exits on its own")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    for expected in [
        "exists as a classic queue, and topology.queue_type is \\\"quorum\\\"",
        "stop every worker of the fleet",
        "llmq topology convert --to quorum",
        "start the fleet with topology.queue_type = \\\"quorum\\\"",
    ] {
        let found = text.contains(expected) || text.contains(&expected.replace("\\\"", "\""));
        assert!(found, "{expected} missing in\n{text}");
    }
    let queues = queues_named(&prefix(&env.config));
    assert_eq!(queues[&env.config.topology.processing_queue].0, "classic");
    env.cleanup().await;
}

/// The other way: quorum queues exist and the worker is configured classic. It stops with
/// the procedure rather than consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_worker_refuses_a_quorum_topology() {
    let env = TestEnv::with(MockOptions::default(), quorum).await;
    let mut config = env.config.clone();
    config.topology.queue_type = QueueType::Classic;
    let worker = env.start_worker_with(config);
    let ran = tokio::time::timeout(Duration::from_secs(30), worker.task)
        .await
        .expect("the worker stops on its own")
        .unwrap();
    match ran {
        Err(AppError::Worker(WorkerError::Topology(DeclareError::TypeMismatch {
            existing,
            configured,
            ..
        }))) => {
            assert_eq!(
                (existing, configured),
                (QueueType::Quorum, QueueType::Classic)
            );
        }
        other => panic!("{other:?}"),
    }
    env.cleanup().await;
}

/// One message as it is published and compared after a move: its body and every property.
type Sent = (Vec<u8>, BasicProperties);

/// Publishes `message` with a confirm.
async fn publish(env: &TestEnv, exchange: &str, key: &str, message: &Sent) {
    let confirm = env
        .channel
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &message.0,
            message.1.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, lapin::Confirmation::Ack(None), "{key} routed");
}

/// Every message of `queue`, taken with `basic.get`; put back (nacked in the order taken,
/// which keeps it on both queue types) unless `take`.
async fn messages_of(conn: &Connection, queue: &str, take: bool) -> Vec<Sent> {
    let ch = conn.create_channel().await.unwrap();
    let mut held = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: take })
        .await
        .unwrap()
    {
        held.push(m);
    }
    let out = held
        .iter()
        .map(|m| (m.delivery.data.clone(), m.delivery.properties.clone()))
        .collect();
    if !take {
        for m in &held {
            m.delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
                .unwrap();
        }
    }
    let _ = ch.close(200, "read".into()).await;
    out
}

/// `got` holds each message of `sent` exactly once, with the same body and properties.
fn assert_same(queue: &str, sent: &[Sent], got: &[Sent]) {
    let key = |m: &Sent| m.0.clone();
    let mut sent: Vec<&Sent> = sent.iter().collect();
    let mut got: Vec<&Sent> = got.iter().collect();
    sent.sort_by_key(|m| key(m));
    got.sort_by_key(|m| key(m));
    assert_eq!(sent.len(), got.len(), "{queue}: how many");
    for (s, g) in sent.iter().zip(&got) {
        assert_eq!(
            String::from_utf8_lossy(&s.0),
            String::from_utf8_lossy(&g.0),
            "{queue}"
        );
        assert_eq!(s.1, g.1, "{queue}: {}", String::from_utf8_lossy(&s.0));
    }
}

/// The messages of a classic topology: requests in the chat queue with priorities, the
/// senders' `user_id` and headers; requests in a lane; dead letters; a kept result; an
/// unroutable message. `llmq topology convert --to quorum` (the binary) makes every queue a
/// quorum queue with each message exactly once, the same body, properties and headers; back
/// to classic (the library) the same again, and the classic declaration matches as before.
/// It refuses while a worker consumes, and for a user who may not keep another's `user_id`,
/// changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_moves_every_message_once_to_quorum_and_back() {
    let env = TestEnv::with(MockOptions::default(), |c| c.topology.lanes = 2).await;
    let t = env.config.topology.clone();
    let prefix = prefix(&env.config);

    // Refused while a worker consumes.
    let worker = env.start_worker();
    wait_until(Duration::from_secs(15), "the worker consuming", || async {
        topology::DepthReader::new(&env.conn)
            .read(&t.processing_queue)
            .await
            .unwrap()
            .is_some_and(|d| d.consumers > 0)
    })
    .await;
    let refused = convert::convert(&env.config, QueueType::Quorum).await;
    assert!(
        matches!(&refused, Err(OpsError::Refused(why)) if why.contains("stop every worker")),
        "{refused:?}"
    );
    worker.stop().await.unwrap();

    let alice = unique("alice");
    let request = |i: u8| -> Sent {
        let mut headers = FieldTable::default();
        headers.insert("x-test-n".into(), AMQPValue::LongInt(i.into()));
        headers.insert("x-tenant".into(), AMQPValue::LongString("acme".into()));
        let body = json!({"request_id": format!("r-{i}"), "prompt": "moved"});
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_priority(i % 10)
            .with_user_id(alice.as_str().into())
            .with_message_id(format!("m-{i}").into())
            .with_correlation_id(format!("c-{i}").into())
            .with_timestamp(1_700_000_000 + u64::from(i))
            .with_app_id("convert-test".into())
            .with_expiration("3600000".into())
            .with_headers(headers);
        (body.to_string().into_bytes(), props)
    };
    let plain = |what: &str, i: u8| -> Sent {
        let mut headers = FieldTable::default();
        headers.insert("x-error-kind".into(), AMQPValue::LongString(what.into()));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_user_id("llmq".into())
            .with_headers(headers);
        (format!("{what}-{i}").into_bytes(), props)
    };
    let work: Vec<Sent> = (0..12).map(request).collect();
    let lane_name = topology::lane_queue(&t.processing_queue, 1);
    let in_lane: Vec<Sent> = (20..23).map(request).collect();
    let dead: Vec<Sent> = (0..3).map(|i| plain("dead", i)).collect();
    let kept: Vec<Sent> = (0..2)
        .map(|i| {
            let (body, props) = plain("result", i);
            (body, props.with_expiration("86400000".into()))
        })
        .collect();
    let lost: Vec<Sent> = vec![plain("unroutable", 0)];
    for m in &work {
        publish(&env, &t.request_exchange, &t.processing_key, m).await;
    }
    for m in &in_lane {
        publish(&env, "", &lane_name, m).await;
    }
    for m in &dead {
        publish(&env, &t.dead_letter_exchange, &t.dead_letter_key, m).await;
    }
    for m in &kept {
        publish(&env, &t.results_exchange, &t.results_key, m).await;
    }
    for m in &lost {
        publish(&env, &t.unroutable_exchange, "", m).await;
    }
    let expected = [
        (t.processing_queue.clone(), &work),
        (lane_name.clone(), &in_lane),
        (t.dead_letter_queue.clone(), &dead),
        (t.results_queue.clone(), &kept),
        (t.unroutable_queue.clone(), &lost),
    ];

    // A user without the impersonator tag may not keep alice's user_id: refused, nothing
    // changed.
    let plain_user = BrokerUser::create("converter");
    let mut as_plain_user = env.config.clone();
    let mut url = url::Url::parse(&amqp_url()).unwrap();
    url.set_username(&plain_user.name).unwrap();
    url.set_password(Some("pw")).unwrap();
    as_plain_user.amqp.url = Some(SecretUrl::new(url.as_str()));
    as_plain_user.amqp.urls = None;
    let refused = convert::convert(&as_plain_user, QueueType::Quorum).await;
    assert!(
        matches!(&refused, Err(OpsError::Refused(why)) if why.contains("impersonator")),
        "{refused:?}"
    );
    drop(plain_user);
    assert_eq!(
        queues_named(&prefix)[&t.processing_queue].0,
        "classic",
        "nothing changed"
    );

    // The binary: --dry-run lists and changes nothing; then the conversion.
    let (cmd, _config_file) = child_command(Path::new(crate::helpers::bin()), &env.config).unwrap();
    let mut dry = tokio::process::Command::from(cmd);
    let out = dry
        .args(["topology", "convert", "--to", "quorum", "--dry-run"])
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{listed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        listed.contains(&format!(
            "{}: classic, 12 messages: to quorum, through {}.convert and back",
            t.processing_queue, t.processing_queue
        )),
        "{listed}"
    );
    assert!(listed.contains("--dry-run: nothing changed"), "{listed}");
    assert_eq!(queues_named(&prefix)[&t.processing_queue].0, "classic");

    let (cmd, _config_file) = child_command(Path::new(crate::helpers::bin()), &env.config).unwrap();
    let mut run = tokio::process::Command::from(cmd);
    let out = run
        .args(["topology", "convert", "--to", "quorum"])
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("start the fleet with topology.queue_type = \"quorum\""),
        "{said}"
    );

    let queues = queues_named(&prefix);
    for q in topology::typed_queues(&t) {
        assert_eq!(queues[&q.name].0, "quorum", "{}", q.name);
    }
    assert!(
        queues
            .keys()
            .all(|q| !q.ends_with(convert::TEMPORARY_SUFFIX)),
        "no temporary queue left: {queues:?}"
    );
    for (queue, sent) in &expected {
        // A quorum queue adds `x-delivery-count` to every delivery (0 the first time):
        // the broker's, not the message's, so it is left out here. Back in classic queues
        // below the messages are compared exactly.
        let got: Vec<Sent> = messages_of(&env.conn, queue, false)
            .await
            .into_iter()
            .map(|(body, props)| (body, convert::copy_properties(&props)))
            .collect();
        assert_same(queue, sent, &got);
    }
    // A quorum worker's declaration matches what the conversion made.
    let mut as_quorum = t.clone();
    as_quorum.queue_type = QueueType::Quorum;
    topology::declare_on(&env.conn, &as_quorum).await.unwrap();

    // And back to classic: each message once more, the same, and the classic declaration
    // of earlier versions matches.
    let done = convert::convert(&env.config, QueueType::Classic)
        .await
        .unwrap();
    let moved: u64 = done.iter().map(|c| c.moved_back).sum();
    assert_eq!(moved, 12 + 3 + 3 + 2 + 1);
    let queues = queues_named(&prefix);
    for q in topology::typed_queues(&t) {
        assert_eq!(queues[&q.name].0, "classic", "{}", q.name);
    }
    topology::declare_on(&env.conn, &t).await.unwrap();
    for (queue, sent) in &expected {
        assert_same(queue, sent, &messages_of(&env.conn, queue, true).await);
    }
    // Nothing left to do.
    let again = convert::convert(&env.config, QueueType::Classic)
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
    env.cleanup().await;
}

/// `llmq dlq list` on a quorum dead-letter queue neither removes nor reorders: the dead
/// letters it took come back in the order they were in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_quorum_dead_letter_queue_keeps_its_order() {
    let env = TestEnv::with(MockOptions::default(), quorum).await;
    let t = env.config.topology.clone();
    let ids: Vec<String> = (0..5).map(|i| format!("dead-{i}")).collect();
    for id in &ids {
        let body = json!({"request_id": id, "prompt": "x"}).to_string();
        publish(
            &env,
            &t.dead_letter_exchange,
            &t.dead_letter_key,
            &(body.into_bytes(), BasicProperties::default()),
        )
        .await;
    }
    for _ in 0..3 {
        let listed: Vec<String> = llmq::ops::dlq::list(&env.config, 3)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.request_id)
            .collect();
        assert_eq!(listed, ids[..3], "the head, in order, every time");
    }
    let all: Vec<String> = llmq::ops::dlq::list(&env.config, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.request_id)
        .collect();
    assert_eq!(all, ids);
    env.cleanup().await;
}
