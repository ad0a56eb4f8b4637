//! The one owner of an upstream call: a slot of the flow control, the HTTP call, its
//! latency, the AIMD signal, the token settlement and the call metrics. Single calls and
//! batched embedding calls both go through [`Deployment::call`], so how a call is counted
//! is decided here and nowhere else.

use std::{future::Future, sync::Arc, time::Instant};

use crate::{
    contract::{Usage, request::Kind},
    runtime::metrics::Metrics,
    upstream::{
        client::{ChatAnswer, EmbeddingAnswer, LlmClient, LlmError},
        flow::{Flow, Permit},
    },
};

/// An answer whose token usage settles the budget.
pub trait Answer {
    /// The usage the upstream reported.
    fn usage(&self) -> Option<&Usage>;
}

impl Answer for ChatAnswer {
    fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }
}

impl Answer for EmbeddingAnswer {
    fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }
}

/// A slot for one upstream call, with the tokens it was admitted for.
pub struct Slot {
    permit: Permit,
    estimate: u64,
}

/// One OpenAI-compatible deployment: its client, its flow control and the accounting of
/// every call made to it.
#[derive(Clone)]
pub struct Deployment {
    client: LlmClient,
    flow: Arc<Flow>,
    metrics: Arc<Metrics>,
}

impl Deployment {
    /// A deployment reached through `client`, its calls limited by `flow`.
    pub fn new(client: LlmClient, flow: Arc<Flow>, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            flow,
            metrics,
        }
    }

    /// The HTTP client.
    pub fn client(&self) -> &LlmClient {
        &self.client
    }

    /// Waits for a slot (highest priority first), any `Retry-After` pause and the budgets
    /// for `tokens`.
    pub async fn admit(&self, priority: u8, tokens: u64) -> Slot {
        Slot {
            permit: self.flow.acquire(priority, tokens).await,
            estimate: tokens,
        }
    }

    /// Makes one call in `slot` and accounts for it: the latency metric, the AIMD signal
    /// (per call, not per message it carries), a `Retry-After` pause and the token budget.
    pub async fn call<T: Answer>(
        &self,
        kind: Kind,
        slot: Slot,
        call: impl Future<Output = Result<T, LlmError>>,
    ) -> Result<T, LlmError> {
        let started = Instant::now();
        let answer = call.await;
        drop(slot.permit);
        self.metrics.upstream_call(kind.as_str(), started.elapsed());
        match &answer {
            Ok(a) => {
                self.flow.on_success();
                let used = a.usage().and_then(Usage::total).unwrap_or(slot.estimate);
                self.flow.settle_tokens(slot.estimate, used).await;
            }
            Err(e) => {
                if e.is_throttle() {
                    self.flow.on_throttle();
                }
                if let Some(after) = e.retry_after() {
                    self.flow.pause_for(after);
                }
            }
        }
        answer
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use super::*;
    use crate::{
        config::LlmConfig,
        tools::mock::{MockOptions, MockServer},
        upstream::ratelimit::Budget,
    };

    async fn deployment(mock: MockOptions) -> (MockServer, Deployment, Arc<Flow>, Arc<Metrics>) {
        let server = MockServer::start(([127, 0, 0, 1], 0).into(), mock)
            .await
            .expect("the mock listens");
        let cfg = LlmConfig {
            base_url: crate::config::SecretUrl::new(server.base_url()),
            ..LlmConfig::default()
        };
        let flow = Flow::new(1, 8, Budget::unlimited());
        let metrics = Arc::new(Metrics::default());
        let client = LlmClient::new(&cfg).expect("client");
        let deployment = Deployment::new(client, flow.clone(), metrics.clone());
        (server, deployment, flow, metrics)
    }

    fn hello() -> Vec<Value> {
        vec![json!({"role": "user", "content": "hello"})]
    }

    #[tokio::test]
    async fn a_call_is_counted_once_and_its_slot_released() {
        let (_server, d, flow, metrics) = deployment(MockOptions::default()).await;
        let slot = d.admit(0, 10).await;
        assert_eq!(flow.in_flight(), 1, "the slot is held during the call");
        let params = Map::new();
        let answer = d
            .call(Kind::Chat, slot, d.client().chat("m", &hello(), &params))
            .await;
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(flow.in_flight(), 0, "released after the call");
        assert_eq!(flow.limit(), 8, "a success never lowers the limit");
        assert!(
            metrics
                .encode()
                .contains("llmq_upstream_latency_seconds_count{kind=\"chat\"} 1"),
            "one latency sample"
        );
    }

    #[tokio::test]
    async fn a_429_lowers_the_limit_and_pauses_the_deployment() {
        let (_server, d, flow, _metrics) = deployment(MockOptions {
            error_rate: 1.0,
            status: 429,
            retry_after: Some(30),
            ..MockOptions::default()
        })
        .await;
        let slot = d.admit(0, 10).await;
        let params = Map::new();
        let answer = d
            .call(Kind::Chat, slot, d.client().chat("m", &hello(), &params))
            .await;
        let Err(e) = answer else {
            panic!("the mock answers 429");
        };
        assert!(e.is_throttle());
        assert_eq!(flow.limit(), 4, "halved once");
        assert_eq!(flow.in_flight(), 0);
        let next = tokio::time::timeout(std::time::Duration::from_millis(200), d.admit(0, 1));
        assert!(next.await.is_err(), "Retry-After pauses new calls");
    }
}
