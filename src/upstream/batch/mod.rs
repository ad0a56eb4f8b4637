//! Embedding micro-batching: concurrent embedding requests are gathered into one
//! `/embeddings` call of up to `batch.max_items` inputs or `batch.max_wait_ms`, whichever
//! comes first. Each request still gets its own answer (and so its own result, confirm and
//! ack); when the upstream refuses a batch as a whole, every request is tried alone, so one
//! bad input fails only its own message.
//!
//! A batch not yet full at `batch.max_wait_ms` goes only if no batch of its model waits for
//! a slot: otherwise it would wait in line too, and it keeps filling meanwhile. Without
//! that, under a saturated upstream every request that arrives alone becomes a call of its
//! own, each call frees as few deliveries as it carried, and the batches never grow back. Once shutdown begins no batch call starts: the
//! requests waiting in a batch go back to their queue.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Map, Value, json};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use crate::{
    contract::{Usage, request::Kind, response::Vector},
    upstream::{
        failure::{Class, Failure},
        flow::admission::Admission,
        http::client::EmbeddingAnswer,
        routing::router::{Routed, Router, Served},
    },
};

/// Requests waiting to be batched at most (back-pressure on the callers beyond that).
const QUEUE: usize = 4096;

/// Hands embedding requests to the batching task.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Item>,
}

struct Item {
    /// Its turn, tokens and latest start; once its `stop` is off, no call starts for this
    /// item, and dropping `reply` unanswered tells the caller so.
    admission: Admission,
    model: String,
    params: Map<String, Value>,
    input: Vec<String>,
    /// Dropped unanswered when shutdown came first.
    reply: oneshot::Sender<Routed<EmbeddingAnswer>>,
}

/// Requests with the same model and extra parameters, waiting to go.
struct Pending {
    items: Vec<Item>,
    inputs: usize,
    deadline: Instant,
    /// Calls of these model and parameters waiting for a slot.
    in_line: Arc<AtomicUsize>,
}

/// A call counted among those waiting for a slot until it starts, or ends without starting.
struct InLine {
    count: Arc<AtomicUsize>,
    left: AtomicBool,
}

impl InLine {
    fn join(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self {
            count: count.clone(),
            left: AtomicBool::new(false),
        }
    }

    /// Its call started: it no longer waits.
    fn leave(&self) {
        if !self.left.swap(true, Ordering::Relaxed) {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Batcher {
    /// Starts the batching task (it ends when every `Batcher` clone is dropped). Each
    /// upstream call is routed as one and takes one slot of its deployment: the concurrency
    /// limit counts calls, not the messages they carry.
    pub fn spawn(upstream: Arc<Router>, max_items: usize, max_wait: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(upstream, rx, max_items.max(1), max_wait));
        Self { tx }
    }

    /// Embeds `input`, batched with other requests for the same model and parameters.
    /// [`Routed::Deferred`] when no call could start before `admission.until` (for a batch,
    /// the earliest of its requests), `None` when its `stop` came before its batch started:
    /// nothing was called either way.
    pub async fn embed(
        &self,
        model: &str,
        input: &[String],
        params: &Map<String, Value>,
        admission: Admission,
    ) -> Option<Routed<EmbeddingAnswer>> {
        if admission.stop.is_stopped() {
            return None;
        }
        let stop = admission.stop.clone();
        let (reply, rx) = oneshot::channel();
        let item = Item {
            admission,
            model: model.to_string(),
            params: params.clone(),
            input: input.to_vec(),
            reply,
        };
        let gone = || Routed::Failed {
            failure: Failure::transient("the embedding batcher stopped"),
            elsewhere: false,
        };
        if self.tx.send(item).await.is_err() {
            return Some(gone());
        }
        match rx.await {
            Ok(Routed::Stopped) => None,
            Ok(answer) => Some(answer),
            // Dropped unanswered: shutdown began before its batch started.
            Err(_) if stop.is_stopped() => None,
            Err(_) => Some(gone()),
        }
    }
}

/// One batched (or, after a refused batch, single) call for `items`, routed as one call:
/// a slot and the accounting of its deployment, per call rather than per message.
/// [`Routed::Stopped`] when every item's shutdown came first. A slot free right away wins
/// over shutdown, as for a single call.
async fn call(
    router: &Router,
    items: &[Item],
    model: &str,
    input: &[String],
    params: &Map<String, Value>,
    in_line: &InLine,
) -> Routed<EmbeddingAnswer> {
    // The batch waits in the turn of its most urgent request, no longer than its most
    // hurried request may, and stops once every request has.
    let Some(admission) = Admission::batch(items.iter().map(|i| &i.admission)) else {
        return Routed::Stopped;
    };
    // A batch of several is split on a context-length error, so that one long input moves
    // to a context-window fallback alone.
    let mut route = router.route(model);
    if items.len() > 1 {
        route = route.without_context_fallbacks();
    }
    router
        .call(
            &mut route,
            Kind::Embedding,
            &admission,
            |deployment, model| async move {
                in_line.leave();
                deployment.client().embed(&model, input, params).await
            },
        )
        .await
}

/// The items still wanted: those whose shutdown began are dropped unanswered, so their
/// requests go back to their queue rather than into a call that starts now; those whose
/// caller stopped waiting (a cancel) are left out of the call, and out of its cost.
fn still_wanted(items: Vec<Item>) -> Vec<Item> {
    items
        .into_iter()
        .filter(|i| !i.admission.stop.is_stopped() && !i.reply.is_closed())
        .collect()
}

async fn run(llm: Arc<Router>, mut rx: mpsc::Receiver<Item>, max_items: usize, max_wait: Duration) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
    // Per model and parameters: the calls waiting for a slot, kept while batches come and go.
    let mut lines: HashMap<String, Arc<AtomicUsize>> = HashMap::new();
    let go = |p: Pending| {
        tokio::spawn(send(llm.clone(), p.items, InLine::join(&p.in_line)));
    };
    loop {
        let next_deadline = pending.values().map(|p| p.deadline).min();
        let item = match next_deadline {
            Some(deadline) => tokio::select! {
                item = rx.recv() => item,
                _ = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    let due: Vec<String> = pending
                        .iter()
                        .filter(|(_, p)| p.deadline <= now)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for key in due {
                        let Some(p) = pending.get_mut(&key) else { continue };
                        if p.in_line.load(Ordering::Relaxed) > 0 && !p.any_stopped() {
                            // A call of these waits for a slot: this one would wait behind
                            // it, and fills meanwhile.
                            p.deadline = now + max_wait;
                            continue;
                        }
                        if let Some(p) = pending.remove(&key) {
                            go(p);
                        }
                    }
                    lines.retain(|key, line| {
                        pending.contains_key(key) || Arc::strong_count(line) > 1
                    });
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(item) = item else {
            for (_, p) in pending.drain() {
                go(p);
            }
            return;
        };
        let key = format!("{}\u{0}{}", item.model, Value::Object(item.params.clone()));
        let in_line = lines.entry(key.clone()).or_default().clone();
        if item.input.len() >= max_items {
            tokio::spawn(send(llm.clone(), vec![item], InLine::join(&in_line)));
            continue;
        }
        let batch = pending.entry(key.clone()).or_insert_with(|| Pending {
            items: Vec::new(),
            inputs: 0,
            deadline: Instant::now() + max_wait,
            in_line,
        });
        if batch.inputs + item.input.len() > max_items {
            let full = std::mem::take(&mut batch.items);
            batch.inputs = 0;
            batch.deadline = Instant::now() + max_wait;
            tokio::spawn(send(llm.clone(), full, InLine::join(&batch.in_line)));
        }
        batch.inputs += item.input.len();
        batch.items.push(item);
        if batch.inputs >= max_items
            && let Some(p) = pending.remove(&key)
        {
            go(p);
        }
    }
}

impl Pending {
    /// Whether shutdown began for one of its requests: it goes now, to be handed back.
    fn any_stopped(&self) -> bool {
        self.items.iter().any(|i| i.admission.stop.is_stopped())
    }
}

/// One upstream call for `items`, its answer split back; a batch refused as a whole is
/// retried one request at a time.
async fn send(up: Arc<Router>, items: Vec<Item>, in_line: InLine) {
    let items = still_wanted(items);
    let Some(first) = items.first() else {
        return;
    };
    let (model, params) = (first.model.clone(), first.params.clone());
    let inputs: Vec<String> = items.iter().flat_map(|i| i.input.iter().cloned()).collect();
    let answer = call(&up, &items, &model, &inputs, &params, &in_line).await;
    in_line.leave();
    match answer {
        // Shutdown: the items are dropped unanswered.
        Routed::Stopped => {}
        Routed::Served(Served {
            answer,
            upstream,
            model,
            fallback_from,
        }) => {
            let total_chars: usize = inputs.iter().map(String::len).sum::<usize>().max(1);
            let total_tokens = answer.usage.as_ref().and_then(Usage::total).unwrap_or(0);
            let batched = items.len();
            let mut vectors = answer.vectors.into_iter();
            for item in items {
                let chars: usize = item.input.iter().map(String::len).sum();
                let share = total_tokens * chars as u64 / total_chars as u64;
                let mine: Vec<Vector> = vectors.by_ref().take(item.input.len()).collect();
                let mine = EmbeddingAnswer {
                    vectors: mine,
                    model: answer.model.clone(),
                    usage: Some(Usage {
                        prompt_tokens: Some(share),
                        total_tokens: Some(share),
                        completion_tokens: None,
                        other: Map::from_iter([("batched_with".into(), json!(batched - 1))]),
                    }),
                    spent_for: answer.spent_for,
                };
                let _ = item.reply.send(Routed::Served(Served {
                    answer: mine,
                    upstream: upstream.clone(),
                    model: model.clone(),
                    fallback_from: fallback_from.clone(),
                }));
            }
        }
        Routed::Failed { failure, .. }
            if matches!(failure.class, Class::Permanent | Class::ContextLength)
                && items.len() > 1 =>
        {
            // Someone's input spoiled the batch: each request on its own, so only that one
            // fails.
            let singles = still_wanted(items).into_iter().map(|item| {
                let up = up.clone();
                let in_line = InLine::join(&in_line.count);
                async move {
                    let answer = call(
                        &up,
                        std::slice::from_ref(&item),
                        &item.model,
                        &item.input,
                        &item.params,
                        &in_line,
                    )
                    .await;
                    if !matches!(answer, Routed::Stopped) {
                        let _ = item.reply.send(answer);
                    }
                }
            });
            futures_util::future::join_all(singles).await;
        }
        other => {
            for item in items {
                let _ = item.reply.send(other.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::Ordering::Relaxed};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{
        config::RoutingConfig,
        runtime::metrics::Metrics,
        tools::mock::{MockOptions, MockServer},
        upstream::{
            flow::admission::Stop,
            flow::limit::Flow,
            flow::ratelimit::Budget,
            flow::turn::Turn,
            routing::deployment::{Deployment, test_deployment},
            routing::router::test_router,
        },
    };

    /// A batcher of up to 4 inputs or 20 ms over a deployment limited to one call at once.
    async fn batcher() -> (MockServer, Batcher, Deployment, Arc<Flow>) {
        let server = MockServer::start(([127, 0, 0, 1], 0).into(), MockOptions::default())
            .await
            .expect("the mock listens");
        let flow = Flow::new(1, 1, Budget::unlimited());
        let deployment = test_deployment(
            &server.base_url(),
            flow.clone(),
            Arc::new(Metrics::default()),
        );
        let router = test_router(vec![deployment.clone()], RoutingConfig::default());
        let batcher = Batcher::spawn(Arc::new(router), 4, Duration::from_millis(20));
        (server, batcher, deployment, flow)
    }

    /// A deadline no test reaches.
    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn ticket(stop: &CancellationToken) -> Admission {
        Admission {
            turn: Turn::anyone(0),
            tokens: 1,
            until: later(),
            stop: Stop::One(stop.clone()),
        }
    }

    fn embed<'a>(
        b: &'a Batcher,
        text: &str,
        stop: &'a CancellationToken,
    ) -> impl Future<Output = Option<Routed<EmbeddingAnswer>>> + 'a {
        let input = vec![text.to_string()];
        async move { b.embed("m", &input, &Map::new(), ticket(stop)).await }
    }

    #[tokio::test]
    async fn a_batch_is_called_while_running() {
        let (server, b, _d, _flow) = batcher().await;
        let stop = CancellationToken::new();
        let (x, y) = tokio::join!(embed(&b, "x", &stop), embed(&b, "y", &stop));
        assert!(matches!(x, Some(Routed::Served(_))) && matches!(y, Some(Routed::Served(_))));
        assert_eq!(server.stats().embedding_calls.load(Relaxed), 1, "one batch");
    }

    #[tokio::test]
    async fn a_partial_batch_fills_while_another_waits_for_a_slot() {
        let (server, b, d, flow) = batcher().await;
        let stop = CancellationToken::new();
        let busy = d
            .admit(Turn::anyone(0), 0, later())
            .await
            .expect("a free slot");
        let spawn_embed = |text: &str| {
            let (b, stop, input) = (b.clone(), stop.clone(), vec![text.to_string()]);
            tokio::spawn(async move { b.embed("m", &input, &Map::new(), ticket(&stop)).await })
        };
        // x goes alone after 20 ms and waits for the slot.
        let x = spawn_embed("x");
        while flow.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        // y and z come 20 ms apart while x waits: neither goes on its own.
        tokio::time::pause();
        let y = spawn_embed("y");
        tokio::time::advance(Duration::from_millis(30)).await;
        let z = spawn_embed("z");
        tokio::time::advance(Duration::from_millis(30)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(flow.waiting(), 1, "only x waits for the slot");
        tokio::time::resume();
        drop(busy);
        for call in [x, y, z] {
            let answer = call.await.expect("no panic");
            assert!(matches!(answer, Some(Routed::Served(_))), "{answer:?}");
        }
        let stats = server.stats();
        assert_eq!(
            stats.embedding_calls.load(Relaxed),
            2,
            "x, then y and z together"
        );
        assert_eq!(stats.embedding_items.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn no_batch_call_starts_after_shutdown_began() {
        let (server, b, d, flow) = batcher().await;
        let stop = CancellationToken::new();
        // The only slot is taken: the batch waits for it.
        let busy = d
            .admit(Turn::anyone(0), 0, later())
            .await
            .expect("a free slot");
        let waiting = tokio::spawn({
            let (b, stop) = (b.clone(), stop.clone());
            async move {
                let input = vec!["x".to_string()];
                b.embed("m", &input, &Map::new(), ticket(&stop)).await
            }
        });
        while flow.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        let answer = waiting.await.expect("no panic");
        assert!(answer.is_none(), "handed back, not answered: {answer:?}");
        drop(busy);
        assert!(
            embed(&b, "late", &stop).await.is_none(),
            "nothing starts once stopped"
        );
        assert_eq!(flow.in_flight(), 0, "the slot went back");
        assert_eq!(server.stats().embedding_calls.load(Relaxed), 0);
    }
}
