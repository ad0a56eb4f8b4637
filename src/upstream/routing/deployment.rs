//! One deployment (`[upstreams.<name>]`) and the one owner of a call to it: a slot of its
//! flow control, the HTTP call, its latency, the AIMD signal, the token settlement and the
//! call metrics. Single calls and batched embedding calls both go through
//! [`Deployment::call`] (by way of [`crate::upstream::routing::router`]), so how a call is counted is
//! decided here and nowhere else; which deployment to call is decided by the router.
//!
//! Tokens taken for a call are settled exactly once: by the reported usage after an answer;
//! given back in full after a call that produced none (an error, a timeout, a 4xx or 5xx)
//! and when the slot is dropped without its call settling (cancelled mid-flight, or never
//! called).

use std::{future::Future, sync::Arc, time::Instant};

use crate::{
    config::{RequestPolicy, UpstreamConfig},
    contract::{Usage, request::Kind},
    runtime::metrics::Metrics,
    upstream::{
        failure::{Class, Failure, Pushback},
        flow::limit::{Flow, Permit},
        flow::turn::Turn,
        http::{
            client::{ChatAnswer, EmbeddingAnswer, LlmClient},
            stream::StreamLimits,
        },
    },
};

/// An answer whose token usage settles the budget.
pub trait Answer {
    /// The usage the upstream reported.
    fn usage(&self) -> Option<&Usage>;
    /// How long the deployment's rate-limit budget stays spent, if this answer spent it.
    fn spent_for(&self) -> Option<std::time::Duration>;
}

impl Answer for ChatAnswer {
    fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }
    fn spent_for(&self) -> Option<std::time::Duration> {
        self.spent_for
    }
}

impl Answer for EmbeddingAnswer {
    fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }
    fn spent_for(&self) -> Option<std::time::Duration> {
        self.spent_for
    }
}

/// A slot for one upstream call, with the tokens it was admitted for (given back if it is
/// dropped before its call settles them).
pub struct Slot {
    permit: Permit,
    /// Other calls to the deployment running when this one was admitted: with those running
    /// at its answer, what a 429 cuts the limit to.
    others: usize,
    /// The deployment's limit when this one was admitted: a 429 for a call let in above a
    /// limit cut since is the tail of the burst that found a cap.
    limit: usize,
}

/// One OpenAI-compatible deployment: its name, what it serves, its client, its flow control
/// and the accounting of every call made to it.
#[derive(Clone)]
pub struct Deployment {
    name: Arc<str>,
    spec: Arc<UpstreamConfig>,
    client: LlmClient,
    flow: Arc<Flow>,
    metrics: Arc<Metrics>,
}

impl Deployment {
    /// The deployment `name` configured by `spec`, reached through `client`, its calls
    /// limited by `flow`.
    fn new(
        name: &str,
        spec: UpstreamConfig,
        client: LlmClient,
        flow: Arc<Flow>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            name: name.into(),
            spec: Arc::new(spec),
            client,
            flow,
            metrics,
        }
    }

    /// The deployment `name` configured by `spec`, its HTTP client built for `policy`'s
    /// response and streaming limits, its calls limited by `flow`.
    pub fn build(
        name: &str,
        spec: UpstreamConfig,
        policy: &RequestPolicy,
        flow: Arc<Flow>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let limits = StreamLimits {
            idle: policy.stream_idle,
            total: policy.stream_max.unwrap_or_else(|| spec.timeout()),
        };
        let client = LlmClient::new(&spec, policy.max_response_bytes)?.with_stream_limits(limits);
        Ok(Self::new(name, spec, client, flow, metrics))
    }

    /// Its name in results, metrics and logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its configuration: the models it serves, their names there, its weight.
    pub fn spec(&self) -> &UpstreamConfig {
        &self.spec
    }

    /// Its flow control.
    pub fn flow(&self) -> &Arc<Flow> {
        &self.flow
    }

    /// The HTTP client.
    pub fn client(&self) -> &LlmClient {
        &self.client
    }

    /// Waits for a slot (by `turn`: its tenant's share, then its priority), any `Retry-After` pause and the budgets
    /// for `tokens`, until `until` at most. `None` when the wait reached `until` (or it had
    /// passed already): the waiter has left the queue and nothing was taken, so the delivery
    /// can be handed to the retry queue before the broker's consumer timeout.
    pub async fn admit(
        &self,
        turn: Turn,
        tokens: u64,
        until: tokio::time::Instant,
    ) -> Option<Slot> {
        if tokio::time::Instant::now() >= until {
            return None;
        }
        let acquire = self.flow.acquire(turn, tokens);
        let permit = tokio::time::timeout_at(until, acquire).await.ok()?;
        let others = self.flow.in_flight().saturating_sub(1);
        let limit = self.flow.limit();
        Some(Slot {
            permit,
            others,
            limit,
        })
    }

    /// Makes one call in `slot`, `make()`, and accounts for it: the latency metric, the AIMD
    /// signal (per call, not per message it carries), what a 429's time holds back
    /// ([`Pushback`]) and the token budget (settled by the usage of an answer, given back in
    /// full without one).
    ///
    /// The call is made here rather than passed in made: a future taken as an argument
    /// is kept twice in this one's state, as the argument and as what it awaits, and
    /// every delivery in flight would carry both.
    pub async fn call<T: Answer, F: Future<Output = Result<T, Failure>>>(
        &self,
        kind: Kind,
        mut slot: Slot,
        make: impl FnOnce() -> F,
    ) -> Result<T, Failure> {
        let started = Instant::now();
        let mut answer = make().await;
        // Settled below from here on; the slot gives back only what a dropped call left.
        let taken = slot.permit.take_tokens();
        // Other calls running when this one started, or when its answer came, whichever is
        // more: calls admitted together reach the provider in any order (each may open a
        // connection first), so the count at admission alone can fall below the cap the
        // provider enforced; a 429 comes back at once, so the count at its answer is still
        // what the provider saw, or more. Either way the cut lands at or above the cap,
        // and later 429s bring it down to it.
        let at_answer = self.flow.in_flight().saturating_sub(1);
        let others = slot.others.max(at_answer);
        let admitted_at = slot.limit;
        drop(slot);
        self.metrics.upstream_call(kind.as_str(), started.elapsed());
        // A 429 found to be a concurrency cap, whose time then holds only this call.
        let mut capped = false;
        match &answer {
            Ok(a) => {
                self.metrics.upstream_outcome(&self.name, "ok");
                self.flow.on_success();
                let used = a.usage().and_then(Usage::total).unwrap_or(taken);
                self.flow.settle_tokens(taken, used).await;
            }
            Err(e) => {
                self.metrics.upstream_outcome(&self.name, e.call_label());
                match (e.class, e.retry_after, e.pushback) {
                    // A 429 that says nothing is taken for a concurrency cap.
                    (Class::RateLimited, None, _) => {
                        self.flow.on_rate_limited(others);
                    }
                    // One that says when to come back is a concurrency cap too while other
                    // calls run and answers come: only this call waits its time, so the
                    // limit comes down in one step, to the calls running at its answer
                    // (still at least the cap). Else it is a rate: the deployment cools
                    // down for the model.
                    (Class::RateLimited, Some(_), Pushback::Rate) => {
                        capped = self.flow.on_capped(at_answer, admitted_at);
                    }
                    // A spent budget: no lower concurrency cures it.
                    (Class::RateLimited, Some(_), _) => {}
                    _ if e.is_throttle() => self.flow.on_timeout(),
                    _ => {}
                }
                // No answer, no usage: whatever the estimate was, nothing is counted.
                self.flow.settle_tokens(taken, 0).await;
            }
        }
        if capped {
            answer = answer.map_err(|e| e.with_pushback(Pushback::Cap));
        }
        answer
    }
}

/// A deployment named `d` at `base_url` serving any model, limited by `flow`, for tests.
#[cfg(test)]
pub(crate) fn test_deployment(
    base_url: &str,
    flow: Arc<Flow>,
    metrics: Arc<Metrics>,
) -> Deployment {
    let spec = UpstreamConfig {
        base_url: crate::config::SecretUrl::new(base_url),
        ..UpstreamConfig::default()
    };
    let policy = crate::config::LlmConfig::default().policy();
    Deployment::build("d", spec, &policy, flow, metrics).expect("a client")
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value, json};

    use std::time::Duration;

    use super::*;
    use crate::{
        config::LimitsConfig,
        tools::mock::{MockOptions, MockServer},
        upstream::flow::ratelimit::Budget,
    };

    /// A deadline no test reaches.
    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(3600)
    }

    async fn deployment(mock: MockOptions) -> (MockServer, Deployment, Arc<Flow>, Arc<Metrics>) {
        deployment_with(mock, Budget::unlimited()).await
    }

    async fn deployment_with(
        mock: MockOptions,
        budget: Budget,
    ) -> (MockServer, Deployment, Arc<Flow>, Arc<Metrics>) {
        let server = MockServer::start(([127, 0, 0, 1], 0).into(), mock)
            .await
            .expect("the mock listens");
        let flow = Flow::new(1, 8, budget);
        let metrics = Arc::new(Metrics::default());
        let deployment = test_deployment(&server.base_url(), flow.clone(), metrics.clone());
        (server, deployment, flow, metrics)
    }

    fn hello() -> Vec<Value> {
        vec![json!({"role": "user", "content": "hello"})]
    }

    #[tokio::test]
    async fn a_call_is_counted_once_and_its_slot_released() {
        let (_server, d, flow, metrics) = deployment(MockOptions::default()).await;
        let slot = d
            .admit(Turn::anyone(0), 10, far())
            .await
            .expect("a free slot");
        assert_eq!(flow.in_flight(), 1, "the slot is held during the call");
        let params = Map::new();
        let messages = hello();
        let answer = d
            .call(Kind::Chat, slot, || {
                d.client().chat("m", &messages, &params)
            })
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
    async fn a_429_cuts_the_limit_to_the_calls_running_and_is_counted() {
        let (server, d, flow, metrics) = deployment(MockOptions {
            error_rate: 1.0,
            status: 429,
            ..MockOptions::default()
        })
        .await;
        let others: Vec<Slot> =
            futures_util::future::join_all((0..3).map(|_| d.admit(Turn::anyone(0), 0, far())))
                .await
                .into_iter()
                .map(|s| s.expect("a free slot"))
                .collect();
        let slot = d
            .admit(Turn::anyone(0), 10, far())
            .await
            .expect("a free slot");
        let params = Map::new();
        let messages = hello();
        let answer = d
            .call(Kind::Chat, slot, || {
                d.client().chat("m", &messages, &params)
            })
            .await;
        let Err(e) = answer else {
            panic!("the mock answers 429");
        };
        assert_eq!(
            (e.class, e.retry_after),
            (Class::RateLimited, None),
            "{e:?}"
        );
        assert_eq!(flow.limit(), 3, "cut to the three other calls running");
        drop(others);
        // A 429 that says when to come back is a rate limit, not a concurrency cap.
        server.set_options(MockOptions {
            error_rate: 1.0,
            status: 429,
            retry_after: Some(30),
            ..MockOptions::default()
        });
        let slot = d
            .admit(Turn::anyone(0), 10, far())
            .await
            .expect("a free slot");
        let messages = hello();
        let answer = d
            .call(Kind::Chat, slot, || {
                d.client().chat("m", &messages, &params)
            })
            .await;
        assert!(
            matches!(&answer, Err(f) if f.class == Class::RateLimited && f.retry_after.is_some()),
            "{answer:?}"
        );
        assert_eq!(
            flow.limit(),
            3,
            "left alone: the deployment cools down instead"
        );
        assert_eq!(flow.in_flight(), 0);
        assert!(
            metrics
                .encode()
                .contains("llmq_upstream_calls_total{upstream=\"d\",outcome=\"rate_limited\"} 2"),
            "{}",
            metrics.encode()
        );
    }

    #[tokio::test]
    async fn a_429_with_a_time_while_others_run_is_a_cap_unless_the_budget_is_spent() {
        let capped = |rate_limit_headers| MockOptions {
            error_rate: 1.0,
            status: 429,
            retry_after: Some(1),
            rate_limit_headers,
            ..MockOptions::default()
        };
        let (server, d, flow, _metrics) = deployment(capped(false)).await;
        let params = Map::new();
        let messages = hello();
        let refused = |others: usize| {
            let (d, params, messages) = (&d, &params, &messages);
            async move {
                let running: Vec<Slot> = futures_util::future::join_all(
                    (0..others).map(|_| d.admit(Turn::anyone(0), 0, far())),
                )
                .await
                .into_iter()
                .map(|s| s.expect("a free slot"))
                .collect();
                let slot = d.admit(Turn::anyone(0), 0, far()).await.expect("a slot");
                let answer = d
                    .call(Kind::Chat, slot, || d.client().chat("m", messages, params))
                    .await;
                drop(running);
                answer.expect_err("the mock answers 429")
            }
        };
        let f = refused(3).await;
        assert_eq!((f.class, f.pushback), (Class::RateLimited, Pushback::Cap));
        assert_eq!(
            f.retry_after,
            Some(Duration::from_secs(1)),
            "held for its time"
        );
        assert_eq!(flow.limit(), 3, "cut to the three other calls running");
        let alone = refused(0).await;
        assert_eq!(alone.pushback, Pushback::Rate, "nothing else ran");
        // x-ratelimit-remaining-requests: 0 says the budget is spent: the deployment
        // cools down, its limit is left alone.
        server.set_options(capped(true));
        let spent = refused(2).await;
        assert_eq!(spent.pushback, Pushback::Spent);
        assert_eq!(flow.limit(), 3);
    }

    /// A budget of exactly `tokens` a minute, local.
    fn tokens_per_minute(tokens: u64) -> Budget {
        Budget::new(0, tokens, &LimitsConfig::default(), None, None)
    }

    /// The token bucket's level as last stored.
    fn level(flow: &Flow) -> f64 {
        flow.budget().stored_tokens().expect("a local token budget")
    }

    #[tokio::test]
    async fn a_refused_call_gives_its_tokens_back() {
        let (_server, d, flow, _metrics) = deployment_with(
            MockOptions {
                error_rate: 1.0,
                status: 400,
                ..MockOptions::default()
            },
            tokens_per_minute(1000),
        )
        .await;
        let slot = d
            .admit(Turn::anyone(0), 1000, far())
            .await
            .expect("a full budget");
        assert_eq!(level(&flow), 0.0, "all taken");
        let params = Map::new();
        let messages = hello();
        let answer = d
            .call(Kind::Chat, slot, || {
                d.client().chat("m", &messages, &params)
            })
            .await;
        assert!(
            matches!(answer, Err(ref f) if f.class == Class::Permanent),
            "{answer:?}"
        );
        assert_eq!(level(&flow), 1000.0, "all given back");
    }

    #[tokio::test]
    async fn an_answer_settles_by_its_usage() {
        let (_server, d, flow, _metrics) =
            deployment_with(MockOptions::default(), tokens_per_minute(1000)).await;
        let slot = d
            .admit(Turn::anyone(0), 1000, far())
            .await
            .expect("a full budget");
        let params = Map::new();
        let messages = hello();
        let answer = d
            .call(Kind::Chat, slot, || {
                d.client().chat("m", &messages, &params)
            })
            .await;
        let used = answer
            .expect("answered")
            .usage
            .and_then(|u| u.total())
            .expect("usage");
        assert!(used > 0 && used < 1000, "{used}");
        assert_eq!(
            level(&flow),
            (1000 - used) as f64,
            "what was not used is back"
        );
    }

    #[tokio::test]
    async fn a_call_dropped_midway_gives_its_tokens_back() {
        let (_server, d, flow, _metrics) = deployment_with(
            MockOptions {
                latency_ms: 60_000,
                ..MockOptions::default()
            },
            tokens_per_minute(1000),
        )
        .await;
        let slot = d
            .admit(Turn::anyone(0), 1000, far())
            .await
            .expect("a full budget");
        let (messages, params) = (hello(), Map::new());
        let call = d.call(Kind::Chat, slot, || {
            d.client().chat("m", &messages, &params)
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(100), call)
                .await
                .is_err(),
            "the mock holds the call"
        );
        assert_eq!(flow.in_flight(), 0, "the slot went with the call");
        // Given back by a task of its own.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while level(&flow) != 1000.0 {
            assert!(
                std::time::Instant::now() < deadline,
                "never given back: {}",
                level(&flow)
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_reaches_its_deadline_leaves_nothing_taken() {
        let flow = Flow::new(1, 1, tokens_per_minute(1000));
        let d = test_deployment(
            "http://127.0.0.1:9/v1",
            flow.clone(),
            Arc::new(Metrics::default()),
        );
        let held = d
            .admit(Turn::anyone(9), 500, far())
            .await
            .expect("a free slot");
        let until = tokio::time::Instant::now() + Duration::from_secs(900);
        let started = tokio::time::Instant::now();
        assert!(
            d.admit(Turn::anyone(0), 500, until).await.is_none(),
            "no slot before the deadline"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(900));
        assert!(
            d.admit(Turn::anyone(0), 1, until).await.is_none(),
            "a deadline past already"
        );
        drop(held);
        assert_eq!(
            flow.in_flight(),
            0,
            "the slot is not granted to the waiter gone"
        );
        assert_eq!(flow.waiting(), 0);
        let slot = d
            .admit(Turn::anyone(0), 1000, far())
            .await
            .expect("a free slot");
        assert_eq!(slot.permit.tokens(), 1000);
    }
}
