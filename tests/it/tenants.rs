//! Tenants: results name their tenant and cost; a tenant that has spent its budget is not
//! called (dead-lettered `budget_exceeded`, replayable by kind) while others go on; usage
//! is counted fleet-wide in Redis for `llmq usage`; a trusted header names the tenant.
//!
//! Fair share and per-tenant limits (issue 12), with real broker users as the tenants, each
//! publishing over its own connection: a big backlog does not hold back a tenant who comes
//! after it, weights divide the upstream under contention, a tenant at its `max_inflight` or
//! its requests per minute waits without holding up the others, and a tenant alone uses the
//! whole fleet. These assert on the order in which the mock saw calls start and end, and on
//! counts, never on how long anything took: the machines are shared.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Range,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions,
    },
    types::{AMQPValue, FieldTable},
};
use llmq::{
    config::{Config, DEFAULT_TENANT, PriceConfig, SecretUrl, TenantConfig, Usd},
    contract::ErrorKind,
    ops::{dlq, usage},
    tools::mock::MockOptions,
};
use serde_json::{Value, json};

use crate::helpers::{BrokerUser, TestEnv, header, rabbitmqctl, unique};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One request as `user`, and its result.
async fn ask(env: &TestEnv, user: &str, id: &str) -> Value {
    env.publish_chat(
        &json!({"request_id": id, "prompt": format!("question {id}")}),
        BasicProperties::default().with_user_id(user.into()),
    )
    .await;
    let q = env.config.topology.results_queue.clone();
    let d = env.take(&q, 1, Duration::from_secs(30)).await;
    crate::helpers::json(&d[0].data)
}

/// The cost of a result's usage at 1 USD per million prompt tokens and 2 per million
/// completion tokens, in micro-dollars: exact.
fn micros(result: &Value) -> u64 {
    let usage = &result["usage"];
    usage["prompt_tokens"].as_u64().expect("prompt tokens")
        + 2 * usage["completion_tokens"]
            .as_u64()
            .expect("completion tokens")
}

/// Alice's day budget runs out after a few answers: the first request whose most (its
/// prompt's bytes at the input price, plus the model's `max_output_tokens` of 10 at the
/// output price) does not fit in what is left is dead-lettered `budget_exceeded` without a
/// call, Bob goes on, and `llmq usage` shows what each spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_stops_its_tenant_only_with_exact_cost_arithmetic() {
    let prefix = unique("usage");
    let (alice, bob) = (unique("alice"), unique("bob"));
    let budget = 100u64;
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.limits.redis_url = SecretUrl::new(redis_url());
        c.limits.key_prefix = prefix.clone();
        c.prices = BTreeMap::from([(
            c.llm.model.clone(),
            PriceConfig {
                input_per_mtok: Usd::from_dollars(1.0).expect("a price"),
                output_per_mtok: Usd::from_dollars(2.0).expect("a price"),
                cached_input_per_mtok: None,
                max_output_tokens: Some(10),
            },
        )]);
        c.tenants = BTreeMap::from([(
            alice.clone(),
            TenantConfig {
                max_usd_per_day: Some(Usd(budget)),
                ..Default::default()
            },
        )]);
    })
    .await;
    let worker = env.start_worker();
    let mut spent = 0u64;
    let mut answered = 0u64;
    // "question a-N": 12 bytes and a message's 8 at $1 a million, 10 tokens at $2.
    let most = 20 + 2 * 10;
    while spent + most <= budget {
        let r = ask(&env, &alice, &format!("a-{answered}")).await;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["tenant"], alice.as_str());
        let cost = micros(&r);
        assert_eq!(r["cost_usd"], json!(cost as f64 / 1e6), "{r}");
        spent += cost;
        answered += 1;
        assert!(answered < 50, "the budget is never reached");
    }
    let calls = env.chat_calls();
    // "question over" is a byte longer.
    let refused = ask(&env, &alice, "over").await;
    assert_eq!(refused["status"], "error", "{refused}");
    assert_eq!(refused["error"]["kind"], "budget_exceeded");
    assert_eq!(refused["tenant"], alice.as_str());
    let why = refused["error"]["message"].as_str().expect("a reason");
    assert!(
        why.contains(&format!(
            "has spent or holds {} of its max_usd_per_day {} (UTC day",
            Usd(spent),
            Usd(budget)
        )) && why.contains(&format!("may cost up to {}", Usd(most + 1))),
        "{why}"
    );
    assert_eq!(env.chat_calls(), calls, "no call for a tenant over budget");
    let dead = dlq::list(&env.config, 10).await.expect("dlq list");
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].request_id.as_str(), dead[0].error_kind.as_str()),
        ("over", "budget_exceeded")
    );
    // Another tenant is not stopped by Alice's budget.
    let b = ask(&env, &bob, "b-0").await;
    assert_eq!(b["status"], "ok", "{b}");
    assert_eq!(b["tenant"], bob.as_str());

    // The fleet's ledger, as `llmq usage` reads it.
    let (_, rows) = usage::usage(&env.config, None).await.expect("usage");
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.tenant == name)
            .unwrap_or_else(|| panic!("{name} in {rows:?}"))
            .clone()
    };
    let a = row(&alice);
    assert_eq!(
        (a.today.usd, a.today.requests, a.month.requests),
        (spent as f64 / 1e6, answered, answered)
    );
    assert_eq!(row(&bob).today.requests, 1);
    let (_, only) = usage::usage(&env.config, Some(&bob)).await.expect("usage");
    assert_eq!(only.len(), 1);

    // Replayed by kind, it is refused again: the budget has not reset.
    let replayed = dlq::replay(
        &env.config,
        &dlq::Selection::Kind(ErrorKind::BudgetExceeded),
        false,
    )
    .await
    .expect("replay");
    assert_eq!(replayed.len(), 1);
    let again = env.dead_letters(1).await;
    assert_eq!(
        header(&again[0], "x-error-kind").as_deref(),
        Some("budget_exceeded")
    );
    assert_eq!(env.chat_calls(), calls + 1, "only Bob's call");

    worker.stop().await.expect("worker stops");
    crate::helpers::delete_redis_keys(&prefix).await;
    env.cleanup().await;
}

/// Behind a trusted gateway, `tenancy.header` names the tenant (and scopes the request id);
/// without it, the `user_id` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_header_names_the_tenant() {
    let env = TestEnv::with(MockOptions::default(), |c| {
        c.tenancy.header = "x-tenant".into();
    })
    .await;
    let worker = env.start_worker();
    let mut headers = FieldTable::default();
    headers.insert("x-tenant".into(), AMQPValue::LongString("carol".into()));
    env.publish_chat(
        &json!({"request_id": "same", "prompt": "from carol"}),
        BasicProperties::default().with_headers(headers),
    )
    .await;
    env.publish_chat(
        &json!({"request_id": "same", "prompt": "from the gateway itself"}),
        BasicProperties::default(),
    )
    .await;
    let mut tenants: Vec<String> = env
        .results(2)
        .await
        .into_iter()
        .map(|(_, r)| {
            assert_eq!(r["status"], "ok", "{r}");
            r["tenant"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    tenants.sort();
    // Two tenants: the same request id is each one's own, both called.
    assert_eq!(tenants, ["anonymous", "carol"]);
    assert_eq!(env.chat_calls(), 2);
    worker.stop().await.expect("worker stops");
    env.cleanup().await;
}

/// One tenant of a fair-share test: a broker user of its own and its own connection. Its
/// requests are `<tag>-<n>`, id and prompt alike, so that the mock's record of prompts says
/// whose call started (and ended) when, and which of them.
struct Tenant {
    user: BrokerUser,
    tag: &'static str,
    conn: Connection,
}

impl Tenant {
    async fn new(user: BrokerUser, tag: &'static str) -> Self {
        let conn = user.connect().await;
        Self { user, tag, conn }
    }

    /// The id (and prompt) of its request `n`.
    fn id(&self, n: usize) -> String {
        format!("{}-{n}", self.tag)
    }

    /// Publishes its requests `ns` in order, as itself (`user_id` its own name, which the
    /// broker checks), persistent, on a confirm channel; returns once the broker has
    /// confirmed them all, with the instant each was sent.
    async fn publish(&self, env: &TestEnv, ns: Range<usize>) -> Vec<Instant> {
        let key = &env.config.topology.processing_key;
        self.publish_as(env, key, ns, |id| json!({"request_id": id, "prompt": id}))
            .await
    }

    /// The same for embedding requests, the id as the input.
    async fn publish_embeddings(&self, env: &TestEnv, ns: Range<usize>) -> Vec<Instant> {
        let key = &env.config.topology.embeddings_key;
        self.publish_as(
            env,
            key,
            ns,
            |id| json!({"request_id": id, "kind": "embedding", "input": id}),
        )
        .await
    }

    /// Publishes the requests `ns`, each body made from its id, with routing key `key`.
    async fn publish_as(
        &self,
        env: &TestEnv,
        key: &str,
        ns: Range<usize>,
        body: impl Fn(&str) -> Value,
    ) -> Vec<Instant> {
        let ch = self.conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let topo = &env.config.topology;
        let mut sent = Vec::with_capacity(ns.len());
        let mut confirms = Vec::with_capacity(ns.len());
        for n in ns {
            let id = self.id(n);
            let body = body(&id).to_string();
            sent.push(Instant::now());
            let confirm = ch
                .basic_publish(
                    topo.request_exchange.as_str().into(),
                    key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body.as_bytes(),
                    BasicProperties::default()
                        .with_user_id(self.user.name.as_str().into())
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert_eq!(
                confirm.await.unwrap(),
                lapin::Confirmation::Ack(None),
                "request routed"
            );
        }
        let _ = ch.close(200, "ok".into()).await;
        sent
    }

    /// Closes its connection; its broker user is left to delete.
    async fn close(self) -> BrokerUser {
        let _ = self.conn.close(200, "test done".into()).await;
        self.user
    }
}

/// A result and when it arrived.
struct Answer {
    result: Value,
    at: Instant,
}

/// Results by request id.
type Answers = HashMap<String, Answer>;

/// Takes results off the results queue until `done` holds (or panics after 60 s). Each
/// must be `ok`, name the tenant its id says, and come once.
async fn collect(env: &TestEnv, tenants: &[&Tenant], done: impl Fn(&Answers) -> bool) -> Answers {
    let ch = env.conn.create_channel().await.unwrap();
    ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            env.config.topology.results_queue.as_str().into(),
            unique("results").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Answers::new();
    let collecting = async {
        while !done(&got) {
            let d = consumer
                .next()
                .await
                .expect("consumer open")
                .expect("delivery");
            let at = Instant::now();
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
            let result = crate::helpers::json(&d.data);
            assert_eq!(result["status"], "ok", "{result}");
            let id = result["request_id"].as_str().expect("an id").to_string();
            let tenant = tenants
                .iter()
                .find(|t| id.starts_with(&format!("{}-", t.tag)))
                .unwrap_or_else(|| panic!("whose is {id}?"));
            assert_eq!(result["tenant"], tenant.user.name.as_str(), "{result}");
            let before = got.insert(id.clone(), Answer { result, at });
            assert!(before.is_none(), "{id} answered twice");
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), collecting)
        .await
        .is_err()
    {
        panic!("only {} results within 60 s", got.len());
    }
    // Unacked deliveries past `done` go back to the queue.
    let _ = ch.close(200, "ok".into()).await;
    got
}

/// A recorded prompt `<tag>-<n>` as `(tag, n)`.
fn parse(prompt: &str) -> (String, usize) {
    let (tag, n) = prompt
        .rsplit_once('-')
        .unwrap_or_else(|| panic!("a prompt of these tests: {prompt}"));
    (tag.to_string(), n.parse().expect("a request number"))
}

/// The calls the mock saw start, in order, as `(tag, n)`, with when.
fn starts(env: &TestEnv) -> Vec<(String, usize, Instant)> {
    let prompts = env.mock.stats().prompts.lock().unwrap();
    prompts
        .iter()
        .map(|(p, at)| {
            let (tag, n) = parse(p);
            (tag, n, *at)
        })
        .collect()
}

/// The most calls of `tag` the mock was answering at once, from its record of starts and
/// ends. A call's span at the mock lies inside the worker's (the worker starts it before
/// the mock sees it, and frees its slot after the answer is made), so this is never above
/// what the worker had in flight.
fn peak(env: &TestEnv, tag: &str) -> usize {
    let stats = env.mock.stats();
    let mut events: Vec<(Instant, i64)> = Vec::new();
    for (list, step) in [(&stats.prompts, 1), (&stats.ends, -1)] {
        let list = list.lock().unwrap();
        let mine = list.iter().filter(|(p, _)| parse(p).0 == tag);
        events.extend(mine.map(|(_, at)| (*at, step)));
    }
    // An end before a start at the same instant: the slot was freed first.
    events.sort();
    let (mut now, mut most) = (0i64, 0i64);
    for (_, step) in events {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap()
}

/// How late `tag`'s calls started against its publish order: the largest (place among
/// `tag`'s starts) - n over its requests n, with that n.
fn worst_lateness(starts: &[(String, usize, Instant)], tag: &str) -> (usize, usize) {
    starts
        .iter()
        .filter(|(t, _, _)| t == tag)
        .enumerate()
        .map(|(place, (_, n, _))| (place.saturating_sub(*n), *n))
        .max()
        .unwrap_or_default()
}

/// Upstream calls at once fixed at `k` (the AIMD floor at its ceiling), the prefetch
/// following it as in production.
fn fixed_concurrency(c: &mut Config, k: u16) {
    c.worker.max_inflight = k;
    c.worker.min_inflight = k;
    c.worker.prefetch = 0;
}

/// The mock taking `latency_ms` per call, recording each call's start and end.
fn recording(latency_ms: u64) -> MockOptions {
    MockOptions {
        latency_ms,
        record_prompts: true,
        ..Default::default()
    }
}

/// Requests not answered yet, wherever they wait: the messages (ready or not) in the work
/// queue, in every queue named under it (its lanes) and in the retry queues, as the broker
/// counts them.
fn waiting(env: &TestEnv) -> u64 {
    let topo = &env.config.topology;
    let main = &topo.processing_queue;
    let under = [format!("{main}."), format!("{}.", topo.retry_queue_prefix)];
    rabbitmqctl(&["list_queues", "-q", "name", "messages"])
        .lines()
        .filter_map(|l| {
            let (name, n) = l.split_once('\t')?;
            let ours = name == main || under.iter().any(|u| name.starts_with(u.as_str()));
            ours.then(|| n.trim().parse::<u64>().ok())?
        })
        .sum()
}

/// The scenario, scaled down: Alice has a big backlog queued, then Bob sends a few.
/// First in, first out would start every one of Alice's calls before any of Bob's; with
/// fair share Bob's are reached as soon as Alice's backlog has been moved out of the main
/// queue (at broker speed) and then start about one for one with Alice's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fairness() {
    fairness_with(false).await;
}

/// The same when Bob's name hashes to Alice's lane: Bob is not bound to it behind her
/// backlog, he stays in the work queue she has left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fairness_when_both_hash_to_one_lane() {
    fairness_with(true).await;
}

/// The two users of a fair-share test: Bob's name on Alice's lane or on another. Tests of
/// something else than a collision keep them apart, so that a random pair of names does not
/// collide in one run of sixteen.
fn alice_and_bob(same_lane: bool) -> [BrokerUser; 2] {
    let lanes = Config::default().topology.lanes;
    let lane = |name: &str| llmq::broker::topology::lane_of(name, lanes);
    let alice = BrokerUser::create("alice");
    let bob_name = std::iter::repeat_with(|| unique("bob"))
        .find(|bob| (lane(bob) == lane(&alice.name)) == same_lane)
        .expect("a name");
    [alice, BrokerUser::create_named(bob_name)]
}

async fn fairness_with(same_lane: bool) {
    const ALICE: usize = 300;
    const BOB: usize = 20;
    const K: usize = 10;
    let [alice, bob] = alice_and_bob(same_lane);
    let env = TestEnv::with(recording(100), |c| fixed_concurrency(c, K as u16)).await;
    let (alice, bob) = (
        Tenant::new(alice, "alice").await,
        Tenant::new(bob, "bob").await,
    );
    alice.publish(&env, 0..ALICE).await;
    let bob_sent = bob.publish(&env, 0..BOB).await;
    let worker = env.start_worker();
    let got = collect(&env, &[&alice, &bob], |got| got.len() == ALICE + BOB).await;
    assert_eq!(
        env.chat_calls(),
        (ALICE + BOB) as u64,
        "one call per request"
    );

    let starts = starts(&env);
    let bob_last = starts
        .iter()
        .rposition(|(t, _, _)| t == "bob")
        .expect("Bob's calls");
    let alice_before = starts[..bob_last]
        .iter()
        .filter(|(t, _, _)| t == "alice")
        .count();
    // Before Bob's last call start: Alice's first hand (the prefetch, about 1.25 K = 13),
    // hers started while the rest of her backlog is moved out of the main queue (K per
    // 100 ms), and about one of hers per one of Bob's (20). Below 40% of her backlog (120)
    // leaves the move 87 starts, 0.87 s, for 287 messages: a broker republishing only 330 a
    // second passes. First in, first out starts all of hers first, and fair admission
    // without the move all but a hand.
    assert!(
        alice_before < ALICE * 2 / 5,
        "{alice_before} of Alice's {ALICE} calls started before Bob's last one"
    );
    // Within Alice's, publish order, but for what concurrency reorders: up to K calls
    // started together reach the mock in any order, and two consumers' deliveries
    // interleave up to a prefetch (under K) apart.
    let (late, n) = worst_lateness(&starts, "alice");
    assert!(
        late <= 2 * K,
        "Alice's request {n} started {late} places after its place in her order"
    );

    let mut waits: Vec<Duration> = (0..BOB).map(|n| got[&bob.id(n)].at - bob_sent[n]).collect();
    waits.sort();
    eprintln!(
        "fairness: Bob's median latency from publish to result {:?} (behind {ALICE} of \
         Alice's, {K} calls of 100 ms at once)",
        waits[BOB / 2]
    );
    worker.stop().await.expect("worker stops");
    BrokerUser::delete_all([alice.close().await, bob.close().await]);
    env.cleanup().await;
}

/// The embeddings scenario: 3,000 of Alice's embedding requests queued, then 20 of
/// Bob's. First in, first out answers every one of hers before any of his. Her backlog is
/// moved to her lane as a chat backlog is, and his are reached: half of his are answered
/// before a third of hers (the issue: his median wait under a third of first in, first out),
/// while batching goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_fairness() {
    const ALICE: usize = 3000;
    const BOB: usize = 20;
    const ITEMS: usize = 16;
    let [alice, bob] = alice_and_bob(false);
    let env = TestEnv::with(recording(200), |c| {
        fixed_concurrency(c, 2);
        c.batch.max_items = ITEMS;
    })
    .await;
    let (alice, bob) = (
        Tenant::new(alice, "alice").await,
        Tenant::new(bob, "bob").await,
    );
    alice.publish_embeddings(&env, 0..ALICE).await;
    bob.publish_embeddings(&env, 0..BOB).await;
    let started = Instant::now();
    let worker = env.start_worker();
    let got = collect(&env, &[&alice, &bob], |got| got.len() == ALICE + BOB).await;

    let stats = env.mock.stats();
    let items = stats
        .embedding_items
        .load(std::sync::atomic::Ordering::Relaxed);
    let calls = stats
        .embedding_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(items, (ALICE + BOB) as u64, "each request embedded once");
    assert!(
        calls <= items / (ITEMS as u64 / 2),
        "batching kept: {calls} calls for {items} inputs, batches of up to {ITEMS}"
    );
    let mut bobs: Vec<Instant> = (0..BOB).map(|n| got[&bob.id(n)].at).collect();
    bobs.sort();
    let bob_median = bobs[BOB / 2];
    let alice_before = (0..ALICE)
        .filter(|n| got[&alice.id(*n)].at < bob_median)
        .count();
    let alice_last = (0..ALICE)
        .map(|n| got[&alice.id(n)].at)
        .max()
        .expect("Alice's answers");
    eprintln!(
        "embeddings fairness: Bob's median answered {:?} after the worker started, Alice's \
         last {:?} ({calls} calls for {items} inputs; {alice_before} of Alice's before Bob's \
         median)",
        bob_median - started,
        alice_last - started
    );
    assert!(
        alice_before < ALICE / 3,
        "{alice_before} of Alice's {ALICE} were answered before Bob's median"
    );
    worker.stop().await.expect("worker stops");
    BrokerUser::delete_all([alice.close().await, bob.close().await]);
    env.cleanup().await;
}

/// Alice of weight 3 and Bob of weight 1, both with backlogs: while both wait, calls start
/// about three of Alice's for one of Bob's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_3_to_1() {
    const ALICE: usize = 300;
    const BOB: usize = 150;
    let [alice, bob] = alice_and_bob(false);
    let weights = BTreeMap::from([
        (
            alice.name.clone(),
            TenantConfig {
                weight: Some(3),
                ..Default::default()
            },
        ),
        (
            bob.name.clone(),
            TenantConfig {
                weight: Some(1),
                ..Default::default()
            },
        ),
    ]);
    // Calls of 40 to 80 ms, as a provider's vary: calls started together do not all end
    // together, and neither do their tenants' next requests arrive together.
    let mock = MockOptions {
        latency_jitter_ms: 40,
        ..recording(40)
    };
    let env = TestEnv::with(mock, |c| {
        fixed_concurrency(c, 8);
        c.tenants = weights;
    })
    .await;
    let (alice, bob) = (
        Tenant::new(alice, "alice").await,
        Tenant::new(bob, "bob").await,
    );
    // Queued ten by ten, one tenant's then the other's until Bob's are all in, then the
    // rest of Alice's: first in, first out would start them one for one.
    for chunk in (0..ALICE).step_by(10) {
        alice.publish(&env, chunk..chunk + 10).await;
        if chunk < BOB {
            bob.publish(&env, chunk..chunk + 10).await;
        }
    }
    let worker = env.start_worker();
    collect(&env, &[&alice, &bob], |got| got.len() == ALICE + BOB).await;
    assert_eq!(env.chat_calls(), (ALICE + BOB) as u64);

    // The starts from the first on which both had begun to the first tenant's last: both
    // had calls waiting all along.
    let starts = starts(&env);
    let first = |tag: &str| starts.iter().position(|(t, _, _)| t == tag).unwrap();
    let last = |tag: &str| starts.iter().rposition(|(t, _, _)| t == tag).unwrap();
    let (from, to) = (
        first("alice").max(first("bob")),
        last("alice").min(last("bob")),
    );
    assert!(
        from < to,
        "the tenants' calls never overlapped: {from}..{to}"
    );
    let window = &starts[from..=to];
    let alices = window.iter().filter(|(t, _, _)| t == "alice").count();
    let share = alices as f64 / window.len() as f64;
    eprintln!(
        "weights 3:1: Alice's share of starts while both waited {alices} of {} = {share:.3}",
        window.len()
    );
    // 3:1 is 0.75: Alice's 300 end a window of about 400 starts, Bob having had 100 of his
    // 150. Its edges start what was in hand rather than what the weights pick (the first
    // hand, about 1.25 K = 10, one for one as queued; the last few of Alice's), which moves
    // the share by a few hundredths. 0.65 to 0.85 takes that and a scheduler's rounding, and
    // fails one for one (0.5: first in, first out of these backlogs) and Bob starved (1.0).
    assert!(
        (0.65..=0.85).contains(&share),
        "Alice's share of starts while both waited: {alices} of {} = {share:.3}",
        window.len()
    );
    worker.stop().await.expect("worker stops");
    BrokerUser::delete_all([alice.close().await, bob.close().await]);
    env.cleanup().await;
}

/// Alice at her `max_inflight` of 2 waits for her own calls to end; Bob, who came after her
/// backlog, runs meanwhile in the replica's other slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_cap_does_not_block_others() {
    const ALICE: usize = 40;
    const BOB: usize = 20;
    let [alice, bob] = alice_and_bob(false);
    let caps = BTreeMap::from([(
        alice.name.clone(),
        TenantConfig {
            max_inflight: Some(2),
            ..Default::default()
        },
    )]);
    let env = TestEnv::with(recording(150), |c| {
        fixed_concurrency(c, 10);
        c.tenants = caps;
    })
    .await;
    let (alice, bob) = (
        Tenant::new(alice, "alice").await,
        Tenant::new(bob, "bob").await,
    );
    alice.publish(&env, 0..ALICE).await;
    bob.publish(&env, 0..BOB).await;
    let worker = env.start_worker();
    collect(&env, &[&alice, &bob], |got| got.len() == ALICE + BOB).await;
    assert_eq!(env.chat_calls(), (ALICE + BOB) as u64);

    assert_eq!(
        peak(&env, "alice"),
        2,
        "Alice's calls at once: at most her max_inflight, and she uses it"
    );
    let bob_done = {
        let ends = env.mock.stats().ends.lock().unwrap();
        ends.iter()
            .filter(|(p, _)| parse(p).0 == "bob")
            .map(|(_, at)| *at)
            .max()
            .expect("Bob's calls ended")
    };
    let alice_started = starts(&env)
        .iter()
        .filter(|(t, _, at)| t == "alice" && *at < bob_done)
        .count();
    // Alice runs 2 calls per round of latency; Bob's 20 take 3 rounds in the other 8 slots,
    // and one more to be reached behind her backlog: about 10 of hers start meanwhile. Were
    // Bob stuck behind her waiting requests, he would start only once her backlog had left
    // the queue for the hand: 26 of hers and more. Half of hers lies between.
    assert!(
        alice_started <= ALICE / 2,
        "{alice_started} of Alice's {ALICE} calls started before Bob's last ended"
    );
    worker.stop().await.expect("worker stops");
    BrokerUser::delete_all([alice.close().await, bob.close().await]);
    env.cleanup().await;
}

/// Alice alone, other tenants configured with weights but idle: she gets every slot of
/// both replicas, as no capacity may sit idle while work waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_tenant_uses_the_whole_fleet() {
    const ALICE: usize = 200;
    const K: u16 = 8;
    let [alice] = BrokerUser::create_all(["alice"]);
    let idle = |weight| TenantConfig {
        weight: Some(weight),
        ..Default::default()
    };
    let env = TestEnv::with(recording(100), |c| {
        fixed_concurrency(c, K);
        c.tenants = BTreeMap::from([
            (DEFAULT_TENANT.to_string(), idle(1)),
            (unique("bob"), idle(3)),
            (unique("carol"), idle(2)),
        ]);
    })
    .await;
    let alice = Tenant::new(alice, "alice").await;
    let replicas = two_replicas(&env).await;
    alice.publish(&env, 0..ALICE).await;
    let got = collect(&env, &[&alice], |got| got.len() == ALICE).await;
    assert_eq!(env.chat_calls(), ALICE as u64);
    let peak = env
        .mock
        .stats()
        .peak_in_flight
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(peak, 2 * u64::from(K), "both replicas' slots full at once");
    for (id, _) in &replicas {
        let answered = got
            .values()
            .filter(|a| a.result["worker"] == id.as_str())
            .count();
        assert!(answered > 0, "{id} answered none of Alice's {ALICE}");
    }
    for (_, worker) in replicas {
        worker.stop().await.expect("worker stops");
    }
    BrokerUser::delete_all([alice.close().await]);
    env.cleanup().await;
}

/// Two replicas, each with an id of its own, both consuming before the backlog comes, so
/// neither starts late on a busy machine and finds the work gone.
pub(crate) async fn two_replicas(env: &TestEnv) -> [(String, crate::helpers::Worker); 2] {
    let replicas = ["a", "b"].map(|r| {
        let mut config = env.config.clone();
        config.worker.id = format!("{}-{r}", env.config.worker.id);
        (config.worker.id.clone(), env.start_worker_with(config))
    });
    both_consuming(env).await;
    replicas
}

/// Waits until two replicas consume the work queue.
async fn both_consuming(env: &TestEnv) {
    consuming(env, 2 * u32::from(env.config.worker.consumers)).await;
}

/// Alice at 6 requests per minute (a burst of 6, then one per 10 s), Bob unlimited: Bob's
/// requests all run while Alice is held at her rate, and hers not yet called are still
/// queued after the shutdown, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_tenant_requests_per_minute() {
    const ALICE: usize = 16;
    const BOB: usize = 20;
    const PER_MINUTE: u64 = 6;
    let [alice, bob] = alice_and_bob(false);
    let limits = BTreeMap::from([(
        alice.name.clone(),
        TenantConfig {
            max_requests_per_minute: Some(PER_MINUTE),
            ..Default::default()
        },
    )]);
    let env = TestEnv::with(recording(50), |c| {
        fixed_concurrency(c, 10);
        c.tenants = limits;
    })
    .await;
    let (alice, bob) = (
        Tenant::new(alice, "alice").await,
        Tenant::new(bob, "bob").await,
    );
    alice.publish(&env, 0..ALICE).await;
    bob.publish(&env, 0..BOB).await;
    let started = Instant::now();
    let worker = env.start_worker();
    let bobs = |got: &Answers| got.keys().filter(|id| id.starts_with("bob-")).count();
    let got = collect(&env, &[&alice, &bob], |got| bobs(got) == BOB).await;
    // What her budget may have let through since the worker began: it starts full, refills
    // PER_MINUTE / 60 a second and lends while above zero, so a sliver of refill lets one
    // more through (`ratelimit::LocalBucket`). A count, from the time since; were her rate
    // not enforced, all 16 of hers would have started with Bob's.
    let allowed = |since: Duration| {
        PER_MINUTE + (since.as_secs_f64() * PER_MINUTE as f64 / 60.0).ceil() as u64
    };
    let alice_started = starts(&env).iter().filter(|(t, _, _)| t == "alice").count() as u64;
    let budget = allowed(started.elapsed());
    assert!(
        (1..=budget).contains(&alice_started),
        "{alice_started} of Alice's calls started while Bob's {BOB} ran, her budget allowing \
         {budget}"
    );

    worker.stop().await.expect("worker stops");
    let alice_answered =
        got.len() - BOB + env.queue_len(&env.config.topology.results_queue).await as usize;
    assert!(
        alice_answered as u64 <= allowed(started.elapsed()),
        "{alice_answered} of Alice's answered"
    );
    assert_eq!(
        alice_answered as u64 + waiting(&env),
        ALICE as u64,
        "each of Alice's requests answered or waiting in a queue, once"
    );
    BrokerUser::delete_all([alice.close().await, bob.close().await]);
    env.cleanup().await;
}

/// Lanes left by an earlier, larger `topology.lanes` (here 4, now 2) are still consumed, so
/// the requests in them are answered, not stranded; none is moved into them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_of_an_earlier_larger_setting_are_still_consumed() {
    let env = TestEnv::with(MockOptions::default(), |c| c.topology.lanes = 2).await;
    let topo = env.config.topology.clone();
    let leftovers: Vec<String> = (2..4)
        .map(|lane| llmq::broker::topology::lane_queue(&topo.processing_queue, lane))
        .collect();
    for (i, lane) in leftovers.iter().enumerate() {
        env.channel
            .queue_declare(
                lane.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                llmq::broker::topology::work_queue_arguments(&topo),
            )
            .await
            .unwrap();
        let body = json!({"request_id": format!("left-{i}"), "prompt": "stranded?"});
        env.channel
            .basic_publish(
                "".into(),
                lane.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let worker = env.start_worker();
    let mut ids: Vec<String> = env
        .results(2)
        .await
        .into_iter()
        .map(|(_, r)| {
            assert_eq!(r["status"], "ok", "{r}");
            r["request_id"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["left-0", "left-1"]);
    // The operator deletes the lower old lane: the broker cancels its consumers, the worker
    // looks for the lanes again, past the gap, and goes on consuming the higher one and the
    // work queue.
    env.channel
        .queue_delete(leftovers[0].as_str().into(), Default::default())
        .await
        .unwrap();
    let later = json!({"request_id": "later", "prompt": "still served?"});
    env.channel
        .basic_publish(
            "".into(),
            leftovers[1].as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            later.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    env.publish_chat(
        &json!({"request_id": "after", "prompt": "and this one?"}),
        BasicProperties::default(),
    )
    .await;
    let mut after: Vec<String> = env
        .results(2)
        .await
        .into_iter()
        .map(|(_, r)| r["request_id"].as_str().unwrap_or_default().to_string())
        .collect();
    after.sort();
    assert_eq!(after, ["after", "later"]);
    worker.stop().await.expect("worker stops");
    env.channel
        .queue_delete(leftovers[1].as_str().into(), Default::default())
        .await
        .unwrap();
    env.cleanup().await;
}

/// A replica started with `topology.lanes = 2` goes on consuming while another, started
/// after it with 4 (a rolling raise of the setting), declares lanes `02` and `03` and then
/// stops: a request in lane `03` (where the second would have moved it) is answered by the
/// first, without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_another_replica_created_later_are_consumed() {
    let mut env = TestEnv::with(MockOptions::default(), |c| c.topology.lanes = 2).await;
    let mut first = env.config.clone();
    first.worker.id = format!("{}-first", env.config.worker.id);
    let first_id = first.worker.id.clone();
    let first = env.start_worker_with(first);
    let consumers = u32::from(env.config.worker.consumers);
    consuming(&env, consumers).await;
    // Cleaned up with the larger setting, so that the later lanes go too.
    env.config.topology.lanes = 4;
    let mut second = env.config.clone();
    second.worker.id = format!("{}-second", env.config.worker.id);
    let second = env.start_worker_with(second);
    consuming(&env, 2 * consumers).await;
    second.stop().await.expect("the second replica stops");
    consuming(&env, consumers).await;

    let lane = llmq::broker::topology::lane_queue(&env.config.topology.processing_queue, 3);
    let body = json!({"request_id": "in-a-later-lane", "prompt": "anyone?"});
    env.channel
        .basic_publish(
            "".into(),
            lane.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body.to_string().as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (_, result) = env.results(1).await.remove(0);
    assert_eq!(
        (&result["request_id"], &result["status"], &result["worker"]),
        (&json!("in-a-later-lane"), &json!("ok"), &json!(first_id)),
        "{result}"
    );
    first.stop().await.expect("the first replica stops");
    env.cleanup().await;
}

/// Waits until `n` consumers take from the chat work queue.
async fn consuming(env: &TestEnv, n: u32) {
    let main = env.config.topology.processing_queue.clone();
    crate::helpers::wait_until(Duration::from_secs(20), "the consumers", || async {
        let ch = env.conn.create_channel().await.unwrap();
        let depth = llmq::broker::topology::queue_depth(&ch, &main)
            .await
            .unwrap();
        let _ = ch.close(200, "ok".into()).await;
        depth.consumers == n
    })
    .await;
}

/// With `limits.redis_url`, a tenant's `max_inflight` holds for the fleet: two replicas of
/// ten calls each run at most Alice's three at once between them, and all of hers are
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cap_holds_across_replicas_with_redis() {
    const ALICE: usize = 24;
    let prefix = unique("fleet-cap");
    let [alice] = BrokerUser::create_all(["alice"]);
    let caps = BTreeMap::from([(
        alice.name.clone(),
        TenantConfig {
            max_inflight: Some(3),
            ..Default::default()
        },
    )]);
    let env = TestEnv::with(recording(150), |c| {
        fixed_concurrency(c, 10);
        c.tenants = caps;
        c.limits.redis_url = SecretUrl::new(redis_url());
        c.limits.key_prefix = prefix.clone();
    })
    .await;
    let alice = Tenant::new(alice, "alice").await;
    let replicas = two_replicas(&env).await;
    alice.publish(&env, 0..ALICE).await;
    let got = collect(&env, &[&alice], |got| got.len() == ALICE).await;
    assert_eq!(env.chat_calls(), ALICE as u64);
    assert_eq!(
        peak(&env, "alice"),
        3,
        "three at once in the whole fleet, not three per replica"
    );
    let workers: std::collections::HashSet<&str> = got
        .values()
        .filter_map(|a| a.result["worker"].as_str())
        .collect();
    assert_eq!(workers.len(), 2, "both replicas served: {workers:?}");
    for (_, worker) in replicas {
        worker.stop().await.expect("worker stops");
    }
    crate::helpers::delete_redis_keys(&prefix).await;
    BrokerUser::delete_all([alice.close().await]);
    env.cleanup().await;
}
