//! Embedding micro-batching: concurrent embedding requests are gathered into one
//! `/embeddings` call of up to `batch.max_items` inputs or `batch.max_wait_ms`, whichever
//! comes first. Each request still gets its own answer (and so its own result, confirm and
//! ack); when the upstream refuses a batch as a whole, every request is tried alone, so one
//! bad input fails only its own message.

use std::{collections::HashMap, time::Duration};

use serde_json::{Map, Value, json};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use crate::{
    contract::{Usage, request::Kind},
    upstream::{
        client::{EmbeddingAnswer, LlmError},
        deployment::Deployment,
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
    priority: u8,
    tokens: u64,
    /// Latest time its call may start (the hand-off time of its delivery).
    until: Instant,
    model: String,
    params: Map<String, Value>,
    input: Vec<String>,
    /// `None`: deferred, no call was made.
    reply: oneshot::Sender<Option<Result<EmbeddingAnswer, LlmError>>>,
}

/// Requests with the same model and extra parameters, waiting to go.
struct Pending {
    items: Vec<Item>,
    inputs: usize,
    deadline: Instant,
}

impl Batcher {
    /// Starts the batching task (it ends when every `Batcher` clone is dropped). Each
    /// upstream call takes one slot of the deployment: the concurrency limit counts calls, not
    /// the messages they carry.
    pub fn spawn(upstream: Deployment, max_items: usize, max_wait: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(upstream, rx, max_items.max(1), max_wait));
        Self { tx }
    }

    /// Embeds `input`, batched with other requests for the same model and parameters.
    /// `None` when no call could start before `until` (for a batch, the earliest `until` of
    /// its requests): nothing was called.
    pub async fn embed(
        &self,
        model: &str,
        input: &[String],
        params: &Map<String, Value>,
        priority: u8,
        tokens: u64,
        until: Instant,
    ) -> Option<Result<EmbeddingAnswer, LlmError>> {
        let (reply, rx) = oneshot::channel();
        let item = Item {
            priority,
            tokens,
            until,
            model: model.to_string(),
            params: params.clone(),
            input: input.to_vec(),
            reply,
        };
        let gone = || LlmError::Transient {
            message: "the embedding batcher stopped".into(),
            retry_after: None,
            throttle: false,
        };
        if self.tx.send(item).await.is_err() {
            return Some(Err(gone()));
        }
        rx.await.unwrap_or_else(|_| Some(Err(gone())))
    }
}

/// One batched (or, after a refused batch, single) call: a slot and the accounting of the
/// deployment, per call rather than per message. `None` when no slot came before `until`.
async fn call(
    up: &Deployment,
    model: &str,
    input: &[String],
    params: &Map<String, Value>,
    priority: u8,
    tokens: u64,
    until: Instant,
) -> Option<Result<EmbeddingAnswer, LlmError>> {
    let slot = up.admit(priority, tokens, until).await?;
    let answer = up.client().embed(model, input, params);
    Some(up.call(Kind::Embedding, slot, answer).await)
}

async fn run(llm: Deployment, mut rx: mpsc::Receiver<Item>, max_items: usize, max_wait: Duration) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
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
                        if let Some(p) = pending.remove(&key) {
                            tokio::spawn(send(llm.clone(), p.items));
                        }
                    }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(item) = item else {
            for (_, p) in pending.drain() {
                tokio::spawn(send(llm.clone(), p.items));
            }
            return;
        };
        if item.input.len() >= max_items {
            tokio::spawn(send(llm.clone(), vec![item]));
            continue;
        }
        let key = format!("{}\u{0}{}", item.model, Value::Object(item.params.clone()));
        let batch = pending.entry(key.clone()).or_insert_with(|| Pending {
            items: Vec::new(),
            inputs: 0,
            deadline: Instant::now() + max_wait,
        });
        if batch.inputs + item.input.len() > max_items {
            let full = std::mem::take(&mut batch.items);
            batch.inputs = 0;
            batch.deadline = Instant::now() + max_wait;
            tokio::spawn(send(llm.clone(), full));
        }
        batch.inputs += item.input.len();
        batch.items.push(item);
        if batch.inputs >= max_items
            && let Some(p) = pending.remove(&key)
        {
            tokio::spawn(send(llm.clone(), p.items));
        }
    }
}

/// One upstream call for `items`, its answer split back; a batch refused as a whole is
/// retried one request at a time.
async fn send(up: Deployment, items: Vec<Item>) {
    let Some(first) = items.first() else {
        return;
    };
    let (model, params) = (first.model.clone(), first.params.clone());
    let inputs: Vec<String> = items.iter().flat_map(|i| i.input.iter().cloned()).collect();
    let priority = items.iter().map(|i| i.priority).max().unwrap_or(0);
    let tokens = items.iter().map(|i| i.tokens).sum();
    // The batch waits no longer than its most hurried request may.
    let until = items
        .iter()
        .map(|i| i.until)
        .min()
        .unwrap_or_else(Instant::now);
    let answer = call(&up, &model, &inputs, &params, priority, tokens, until).await;
    let Some(answer) = answer else {
        for item in items {
            let _ = item.reply.send(None);
        }
        return;
    };
    match answer {
        Ok(answer) => {
            let total_chars: usize = inputs.iter().map(String::len).sum::<usize>().max(1);
            let total_tokens = answer.usage.as_ref().and_then(Usage::total).unwrap_or(0);
            let batched = items.len();
            let mut vectors = answer.vectors.into_iter();
            for item in items {
                let chars: usize = item.input.iter().map(String::len).sum();
                let share = total_tokens * chars as u64 / total_chars as u64;
                let mine: Vec<Vec<f32>> = vectors.by_ref().take(item.input.len()).collect();
                let _ = item.reply.send(Some(Ok(EmbeddingAnswer {
                    vectors: mine,
                    model: answer.model.clone(),
                    usage: Some(Usage {
                        prompt_tokens: Some(share),
                        total_tokens: Some(share),
                        completion_tokens: None,
                        other: Map::from_iter([("batched_with".into(), json!(batched - 1))]),
                    }),
                })));
            }
        }
        Err(LlmError::Permanent { .. }) if items.len() > 1 => {
            // Someone's input spoiled the batch: each request on its own, so only that one
            // fails.
            let singles = items.into_iter().map(|item| {
                let up = up.clone();
                async move {
                    let answer = call(
                        &up,
                        &item.model,
                        &item.input,
                        &item.params,
                        item.priority,
                        item.tokens,
                        item.until,
                    )
                    .await;
                    let _ = item.reply.send(answer);
                }
            });
            futures_util::future::join_all(singles).await;
        }
        Err(e) => {
            for item in items {
                let _ = item.reply.send(Some(Err(e.clone())));
            }
        }
    }
}
