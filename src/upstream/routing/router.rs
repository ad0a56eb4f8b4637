//! Which deployment serves a call, and what happens when it cannot: LiteLLM's Router
//! inside the queue worker.
//!
//! - A request's model (or `llm.model` / `llm.embedding_model`) selects the deployments that
//!   serve it (`[upstreams.<name>].models`); a model none serves is `invalid_request`.
//! - Among those the [`Standing`] lets serve the model now, a deployment with room for a
//!   call is chosen at random by weight; when none has room, the least loaded relative to
//!   its weight, whose queue the call then waits in. The deployment the request last failed
//!   on is avoided while another can serve.
//! - A 429 cools the deployment down for that model ([`Standing::cool`]) and the request
//!   comes back to the worker as a rate limit (no attempt used); an `insufficient_quota`
//!   takes the deployment out and the call moves on at once; a refusal (401, 403, 404) does
//!   the same once `routing.auth_failures` in a row confirm it, and before that moves the
//!   call to another deployment that can serve now, else fails the attempt as a transient
//!   failure (so one glitch does not dead-letter a model's backlog without a call); a
//!   context-length error goes straight to `routing.context_window_fallbacks`; connection
//!   errors, timeouts and 5xx count toward the deployment's breaker and come back as a
//!   transient failure, saying whether another deployment could take the next attempt now.
//! - When every deployment that could serve is unavailable for now, the request waits
//!   (no attempt): as a rate limit when one of them is cooling down after a 429, else as an
//!   outage (every one down, its breaker open), which the worker bounds apart and
//!   dead-letters as `upstream_unavailable`.
//! - When no deployment of the model can serve (past `routing.fallback_after_secs` for
//!   cooldowns and breakers, at once for spent or refusing ones), `routing.fallbacks` are
//!   tried in order.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::RoutingConfig,
    contract::{ErrorKind, request::Kind},
    runtime::{clock::unix_now_ms, metrics::Metrics},
    upstream::{
        failure::{Class, Failure, Pushback},
        flow::admission::Admission,
        routing::deployment::{Answer, Deployment},
        routing::out::Why,
        routing::probe::ProbeGuard,
        routing::standing::{Availability, Standing, secs_ms},
    },
};

pub use super::route::{Route, Routed, Served};

/// Most routing steps in one call (moves after quota, refusals and context errors): a
/// bound against a cycle no configuration should make.
const MAX_STEPS: usize = 64;

/// The deployments and the rules that choose between them.
pub struct Router {
    deployments: Vec<Deployment>,
    standing: Arc<Standing>,
    rules: RoutingConfig,
    metrics: Arc<Metrics>,
    /// The sum of the deployments' limits, at most `worker.max_inflight`: what the
    /// consumers' prefetch follows.
    limit: watch::Receiver<usize>,
    cap: usize,
}

/// The next call: the deployment, the model, and the probe when it is its breaker's one.
type NextCall<'a> = (usize, String, Option<ProbeGuard<'a>>);

/// The choice for one step.
enum Pick {
    Call {
        d: usize,
        model: String,
    },
    /// Nothing can serve before `after`; an `outage` when every deployment it waits for is
    /// down (none cooling down after a 429).
    Wait {
        after: Duration,
        reason: String,
        outage: bool,
    },
    Unroutable {
        class: Class,
        reason: String,
    },
}

impl Router {
    /// Routes between `deployments`, whose state `standing` keeps.
    /// Routes between `deployments`, whose state `standing` keeps; `cap`
    /// (`worker.max_inflight`) bounds the calls of all of them together that the prefetch
    /// lets in. Starts the task that sums their limits, so it must run inside the runtime.
    pub fn new(
        deployments: Vec<Deployment>,
        standing: Arc<Standing>,
        rules: RoutingConfig,
        metrics: Arc<Metrics>,
        cap: usize,
    ) -> Self {
        let cap = cap.max(1);
        let mut limits: Vec<watch::Receiver<usize>> =
            deployments.iter().map(|d| d.flow().watch_limit()).collect();
        let sum = move |limits: &mut [watch::Receiver<usize>]| {
            limits
                .iter_mut()
                .map(|l| *l.borrow_and_update())
                .sum::<usize>()
                .min(cap)
        };
        let (tx, limit) = watch::channel(sum(&mut limits));
        tokio::spawn(async move {
            // Ends when the deployments are gone (their senders dropped).
            loop {
                let changes = limits.iter_mut().map(|l| Box::pin(l.changed()));
                let (changed, _, _) = futures_util::future::select_all(changes).await;
                if changed.is_err() {
                    return;
                }
                tx.send_replace(sum(&mut limits));
            }
        });
        Self {
            deployments,
            standing,
            rules,
            metrics,
            limit,
            cap,
        }
    }

    /// The sum of the deployments' concurrency limits, at most `worker.max_inflight`.
    pub fn limit(&self) -> usize {
        self.deployments
            .iter()
            .map(|d| d.flow().limit())
            .sum::<usize>()
            .min(self.cap)
    }

    /// Follows [`Self::limit`].
    pub fn watch_limit(&self) -> watch::Receiver<usize> {
        self.limit.clone()
    }

    /// Calls running now, to every deployment.
    pub fn in_flight(&self) -> usize {
        self.deployments.iter().map(|d| d.flow().in_flight()).sum()
    }

    /// Calls waiting for a budget or a slot, at every deployment.
    pub fn waiting(&self) -> usize {
        self.deployments.iter().map(|d| d.flow().waiting()).sum()
    }

    /// Holds (`true`) or releases every call not yet started, at every deployment (the
    /// broker blocks publishing).
    pub fn hold(&self, held: bool) {
        for d in &self.deployments {
            d.flow().hold(held);
        }
    }

    /// Whether new calls are held.
    pub fn is_held(&self) -> bool {
        self.deployments.iter().any(|d| d.flow().is_held())
    }

    /// The deployments, in configuration order.
    pub fn deployments(&self) -> &[Deployment] {
        &self.deployments
    }

    /// Their state.
    pub fn standing(&self) -> &Arc<Standing> {
        &self.standing
    }

    /// A fresh route for `model`.
    pub fn route(&self, model: &str) -> Route {
        Route::new(model, &self.rules)
    }

    /// Makes one call for `route`: picks a deployment, waits for its slot as `admission`
    /// says (until its `until`, or until its `stop`) and calls it with `make(deployment, model
    /// as it knows it)`, moving on at once after a spent account, a refusal or a
    /// context-length error.
    pub async fn call<'r, T, F, Fut>(
        &'r self,
        route: &mut Route,
        kind: Kind,
        admission: &Admission,
        make: F,
    ) -> Routed<T>
    where
        T: Answer,
        F: Fn(&'r Deployment, String) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let stopped = admission.stop.stopped();
        let mut stopped = std::pin::pin!(stopped);
        // What the deployments left behind said, for the reason of an unroutable request.
        let mut last: Option<String> = None;
        for _ in 0..MAX_STEPS {
            let (d, model, probe) = match self.next(route, &mut last) {
                Ok(Some(next)) => next,
                // Another call took its probe a moment ago.
                Ok(None) => continue,
                Err(ended) => return ended,
            };
            let deployment = &self.deployments[d];
            // A probe given up (shutdown, no slot in time, or its future dropped mid-call by
            // a cancel or a deadline) is released by the guard's drop: another call probes.
            let slot = tokio::select! {
                biased;
                slot = deployment.admit(admission.turn, admission.tokens, admission.until) => slot,
                () = &mut stopped => return Routed::Stopped,
            };
            let Some(slot) = slot else {
                return Routed::Deferred;
            };
            // The wait for a slot may have been long: a deployment that meanwhile cooled
            // down or went out is not called.
            if probe.is_none() && !self.standing.peek(d, &model, unix_now_ms()) {
                drop(slot);
                continue;
            }
            let answer = deployment
                .call(kind, slot, || {
                    make(
                        deployment,
                        deployment.spec().upstream_name(&model).to_string(),
                    )
                })
                .await;
            // The answer settles the probe (below), with no await between.
            if let Some(probe) = probe {
                probe.settled();
            }
            let now = unix_now_ms();
            // Any answer but a transient failure says the deployment is up: that closes its
            // breaker (and settles a probe) whatever the answer was; any but a refusal also
            // ends the model's refusals in a row.
            match &answer {
                Err(f) if matches!(f.class, Class::Transient | Class::Throttle) => {}
                Err(f) if f.class == Class::Refused => self.standing.succeeded(d, now),
                _ => self.standing.answered(d, &model, now),
            }
            let outcome = match answer {
                Ok(answer) => Some(self.served(route, d, model, answer, now)),
                Err(failure) => self.failed(route, d, model, failure, now, &mut last),
            };
            if let Some(outcome) = outcome {
                return outcome;
            }
        }
        warn!(model = %route.requested, "routing went round in circles; check routing.fallbacks");
        Routed::Unroutable(Failure::llmq(
            Class::Permanent,
            format!(
                "no deployment could serve {} after {MAX_STEPS} moves",
                route.requested
            ),
        ))
    }

    /// The deployment and model of the next call for `route` (with its probe, when it is
    /// the one call a half-open breaker lets through), `None` when the one picked was taken
    /// as a probe a moment ago; or, when nothing can be called now, how the call ends.
    fn next<T>(
        &self,
        route: &mut Route,
        last: &mut Option<String>,
    ) -> Result<Option<NextCall<'_>>, Routed<T>> {
        match self.pick(route, unix_now_ms()) {
            Pick::Call { d, model } => match self.standing.check(d, &model, unix_now_ms()) {
                Availability::Free => Ok(Some((d, model, None))),
                Availability::Probe => {
                    let probe = ProbeGuard::new(&self.standing, d);
                    Ok(Some((d, model, Some(probe))))
                }
                Availability::Unavailable { .. } => Ok(None),
            },
            Pick::Wait {
                after,
                reason,
                outage: true,
            } => {
                let wait = Failure::llmq(Class::Unavailable, reason);
                Err(Routed::Unavailable(wait.after(Some(after))))
            }
            Pick::Wait { after, reason, .. } => {
                let wait = Failure::llmq(Class::RateLimited, reason);
                Err(Routed::RateLimited(wait.after(Some(after))))
            }
            Pick::Unroutable { class, reason } => {
                let reason = match last.take() {
                    Some(last) => format!("{reason}; last: {last}"),
                    None => reason,
                };
                Err(Routed::Unroutable(Failure::llmq(class, reason)))
            }
        }
    }

    /// An answer from deployment `d` for `model`: its spent budget cools the deployment
    /// down; a fallback that answered is counted.
    fn served<T: Answer>(
        &self,
        route: &Route,
        d: usize,
        model: String,
        answer: T,
        now: i64,
    ) -> Routed<T> {
        if let Some(spent) = answer.spent_for() {
            self.standing.cool(d, &model, now + millis(spent), now);
        }
        let fallback_from = (model != route.requested).then(|| route.requested.clone());
        if let Some(from) = &fallback_from {
            self.metrics.fallback(from, &model);
        }
        Routed::Served(Served {
            answer,
            upstream: self.deployments[d].name().to_string(),
            model,
            fallback_from,
        })
    }

    /// A failed call to deployment `d` for `model`: what it says of the deployment, and
    /// either what becomes of the call or `None` to move on at once (a spent account and a
    /// refusal leave their words in `last`; a context-length error moves `route` to the
    /// context-window fallbacks).
    fn failed<T>(
        &self,
        route: &mut Route,
        d: usize,
        model: String,
        failure: Failure,
        now: i64,
        last: &mut Option<String>,
    ) -> Option<Routed<T>> {
        let name = self.deployments[d].name();
        match failure.class {
            Class::RateLimited => {
                let retry_after = failure.retry_after;
                // A concurrency cap's time holds only this call (its deployment's limit
                // came down instead); a rate's or a spent budget's, the deployment.
                if let Some(after) = retry_after
                    && failure.pushback != Pushback::Cap
                {
                    self.standing.cool(d, &model, now + millis(after), now);
                }
                route.failed_on(d);
                let elsewhere = self.can_serve_now(route, now);
                let after = if elsewhere { None } else { retry_after };
                Some(Routed::RateLimited(failure.at(name).after(after)))
            }
            Class::Quota => {
                self.standing.spent(d, now);
                *last = Some(format!("{name}: {failure}"));
                None
            }
            Class::Refused => {
                route.failed_on(d);
                if self.standing.refused(d, &model, now) {
                    // Confirmed: out for the model; the call moves on at once.
                    *last = Some(format!("{name}: {failure}"));
                    return None;
                }
                // Not confirmed yet: another deployment takes the call now if one can,
                // else this attempt failed as a transient failure does (retried with
                // backoff), so that one glitch does not end the request.
                if self.can_serve_now(route, now) {
                    return None;
                }
                Some(Routed::Failed {
                    failure: failure.at(name).as_transient(),
                    elsewhere: false,
                })
            }
            Class::ContextLength => {
                route.too_small.push(model.clone());
                let next = self.rules.context_window_fallbacks.get(&model);
                let next: Vec<String> = next
                    .into_iter()
                    .flatten()
                    .filter(|m| !route.too_small.contains(m))
                    .cloned()
                    .collect();
                if next.is_empty() || !route.context_fallbacks {
                    return Some(Routed::Failed {
                        failure,
                        elsewhere: false,
                    });
                }
                info!(%model, to = ?next, "context length exceeded; trying the context-window fallbacks");
                route.models = next;
                route.failed.clear();
                None
            }
            Class::Transient | Class::Throttle => {
                // A timeout, a connection error or a 5xx: the deployment may be down.
                self.standing.failed(d, now);
                route.failed_on(d);
                let elsewhere = self.can_serve_now(route, now);
                Some(Routed::Failed { failure, elsewhere })
            }
            // No answer is classified `Unavailable`: only the router says so.
            Class::Permanent | Class::Ended(_) | Class::Unavailable => Some(Routed::Failed {
                failure,
                elsewhere: false,
            }),
        }
    }

    /// Whether some deployment could take `route`'s next call right away (one this request
    /// has not failed on, with room).
    fn can_serve_now(&self, route: &Route, now: i64) -> bool {
        route.models.iter().any(|model| {
            self.serving(model).any(|d| {
                !route.failed.contains(&d)
                    && self.deployments[d].flow().has_room()
                    && self.standing.peek(d, model, now)
            })
        })
    }

    /// The deployments that serve `model` at all.
    fn serving<'a>(&'a self, model: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.deployments
            .iter()
            .enumerate()
            .filter(move |(_, d)| d.spec().serves(model))
            .map(|(i, _)| i)
    }

    /// The next deployment and model for `route` at `now`.
    fn pick(&self, route: &mut Route, now: i64) -> Pick {
        if self.serving(&route.requested).next().is_none() && route.models.len() <= 1 {
            return Pick::Unroutable {
                class: Class::Ended(ErrorKind::InvalidRequest),
                reason: format!("no upstream serves the model {:?}", route.requested),
            };
        }
        // The soonest a temporarily unavailable deployment comes back, whether one of them
        // is cooling down after a 429 (else it is an outage), and whether every one is out
        // for good (a spent account).
        let mut soonest: Option<(i64, Why, &str)> = None;
        let mut cooling = false;
        let mut spent = false;
        let models = route.models.clone();
        for (i, model) in models.iter().enumerate() {
            // Fallbacks of the requested model wait for `routing.fallback_after_secs` while
            // it is only cooling down or down (at once when it is spent or refused);
            // context-window fallbacks replace the list and wait for nothing.
            if i > 0 && model_is_fallback(route) {
                let waited = now - *route.unavailable_since.get_or_insert(now);
                if soonest.is_some() && waited < secs_ms(self.rules.fallback_after_secs) {
                    break;
                }
            }
            let mut free: Vec<usize> = Vec::new();
            for d in self.serving(model) {
                match self.standing.availability(d, model, now) {
                    Some((until, why)) => {
                        cooling |= why == Why::RateLimited;
                        if why.is_temporary() {
                            if soonest.is_none_or(|(u, _, _)| until < u) {
                                soonest = Some((until, why, self.deployments[d].name()));
                            }
                        } else if why == Why::Quota {
                            spent = true;
                        }
                    }
                    None => free.push(d),
                }
            }
            if let Some(d) = self.choose(&free, &route.failed) {
                if i == 0 {
                    route.unavailable_since = None;
                }
                return Pick::Call {
                    d,
                    model: model.clone(),
                };
            }
        }
        match soonest {
            Some((until, why, name)) => {
                let since = *route.unavailable_since.get_or_insert(now);
                // With fallbacks to wait for, come back when they may serve, not later.
                let fallback_at = since + secs_ms(self.rules.fallback_after_secs);
                let until =
                    if model_is_fallback(route) && route.models.len() > 1 && fallback_at > now {
                        until.min(fallback_at)
                    } else {
                        until
                    };
                let what = match why {
                    Why::Down => "is down (circuit breaker open)",
                    _ => "is cooling down after a rate limit",
                };
                Pick::Wait {
                    after: Duration::from_millis(u64::try_from(until - now).unwrap_or(0).max(1)),
                    reason: format!(
                        "every deployment that can serve {} is unavailable; {name} {what}",
                        route.requested
                    ),
                    outage: !cooling,
                }
            }
            None if spent => Pick::Unroutable {
                class: Class::Quota,
                reason: format!(
                    "every deployment that can serve {} (and its fallbacks) has spent its quota",
                    route.requested
                ),
            },
            None => Pick::Unroutable {
                class: Class::Refused,
                reason: format!(
                    "every deployment that can serve {} (and its fallbacks) refused it (401, 403 or 404)",
                    route.requested
                ),
            },
        }
    }

    /// Among the deployments `free` to serve, the one to call: at random by weight among
    /// those with room (leaving out those in `avoid` while another can serve), else the
    /// least loaded relative to its weight.
    fn choose(&self, free: &[usize], avoid: &[usize]) -> Option<usize> {
        let others: Vec<usize> = free
            .iter()
            .copied()
            .filter(|d| !avoid.contains(d))
            .collect();
        let candidates = if others.is_empty() { free } else { &others[..] };
        let roomy: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&d| self.deployments[d].flow().has_room())
            .collect();
        if !roomy.is_empty() {
            let total: u64 = roomy.iter().map(|&d| self.weight(d)).sum();
            let mut draw = fastrand::u64(0..total.max(1));
            for &d in &roomy {
                let w = self.weight(d);
                if draw < w {
                    return Some(d);
                }
                draw -= w;
            }
            return roomy.last().copied();
        }
        candidates.iter().copied().min_by(|&a, &b| {
            let load = |d: usize| {
                let flow = self.deployments[d].flow();
                (flow.in_flight() + flow.waiting() + 1) as f64 / self.weight(d) as f64
            };
            load(a).total_cmp(&load(b))
        })
    }

    fn weight(&self, d: usize) -> u64 {
        u64::from(self.deployments[d].spec().weight.max(1))
    }
}

/// Whether the route's later models are fallbacks of the requested one (not the
/// context-window fallbacks that replaced it).
fn model_is_fallback(route: &Route) -> bool {
    route.models.first() == Some(&route.requested)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
}

/// A router over `deployments` with default rules and no shared state, for tests.
#[cfg(test)]
pub(crate) fn test_router(deployments: Vec<Deployment>, rules: RoutingConfig) -> Router {
    let names = deployments.iter().map(|d| d.name().to_string()).collect();
    let standing = Arc::new(Standing::new(names, rules.clone(), None));
    Router::new(
        deployments,
        standing,
        rules,
        Arc::new(Metrics::default()),
        usize::MAX,
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use serde_json::{Map, Value, json};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{
        config::{SecretUrl, UpstreamConfig},
        tools::mock::{MockOptions, MockServer},
        upstream::{
            flow::{admission::Stop, limit::Flow, ratelimit::Budget, turn::Turn},
            http::client::ChatAnswer,
        },
    };

    async fn mock(options: MockOptions) -> MockServer {
        MockServer::start(([127, 0, 0, 1], 0).into(), options)
            .await
            .expect("the mock listens")
    }

    /// A deployment `name` at `server` serving `models` (empty: any) with `weight`.
    fn deployment(name: &str, server: &MockServer, models: &[&str], weight: u32) -> Deployment {
        let spec = UpstreamConfig {
            base_url: SecretUrl::new(server.base_url()),
            models: models.iter().map(|m| m.to_string()).collect(),
            weight,
            ..UpstreamConfig::default()
        };
        let flow = Flow::new(1, 64, Budget::unlimited());
        let policy = crate::config::LlmConfig::default().policy();
        Deployment::build(name, spec, &policy, flow, Arc::new(Metrics::default())).expect("client")
    }

    fn far() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(3600)
    }

    async fn chat(router: &Router, route: &mut Route, prompt: &str) -> Routed<ChatAnswer> {
        let messages = vec![json!({"role": "user", "content": prompt})];
        let params = Map::<String, Value>::new();
        router
            .call(
                route,
                Kind::Chat,
                &Admission {
                    turn: Turn::anyone(0),
                    tokens: 1,
                    until: far(),
                    stop: Stop::One(CancellationToken::new()),
                },
                |deployment, model| {
                    let messages = &messages;
                    let params = &params;
                    async move { deployment.client().chat(&model, messages, params).await }
                },
            )
            .await
    }

    fn served<T: std::fmt::Debug>(routed: Routed<T>) -> Served<T> {
        match routed {
            Routed::Served(s) => s,
            other => panic!("not served: {other:?}"),
        }
    }

    /// The wait a rate-limited call was told to take (`None`: none, try again now); panics
    /// with `what` when the call was not rate limited.
    fn rate_limited<T: std::fmt::Debug>(routed: Routed<T>, what: &str) -> Option<Duration> {
        match routed {
            Routed::RateLimited(Failure { retry_after, .. }) => retry_after,
            other => panic!("{what}: {other:?}"),
        }
    }

    /// Whether `after` is what is left of a 30 s wait begun moments ago.
    fn rest_of_30s(after: Duration) -> bool {
        after > Duration::from_secs(25) && after <= Duration::from_secs(30)
    }

    fn calls_of(server: &MockServer) -> u64 {
        server.stats().chat_calls.load(Relaxed)
    }

    /// A mock that answers every call with `status`.
    fn failing(status: u16) -> MockOptions {
        MockOptions {
            error_rate: 1.0,
            status,
            ..MockOptions::default()
        }
    }

    /// A mock that answers every call with a 429 saying to come back in 30 s.
    fn cooling_30s() -> MockOptions {
        MockOptions {
            retry_after: Some(30),
            ..failing(429)
        }
    }

    /// A router of one deployment, "a" at `server`, serving any model.
    fn alone(server: &MockServer, rules: RoutingConfig) -> Router {
        test_router(vec![deployment("a", server, &[], 1)], rules)
    }

    /// A router of "a" at `first`, weighted so that it is the first choice nearly always,
    /// and "b" at `spare`.
    fn first_and_spare(first: &MockServer, spare: &MockServer, rules: RoutingConfig) -> Router {
        test_router(
            vec![
                deployment("a", first, &[], 1000),
                deployment("b", spare, &[], 1),
            ],
            rules,
        )
    }

    #[tokio::test]
    async fn weights_split_the_traffic() {
        let (a, b) = (
            mock(MockOptions::default()).await,
            mock(MockOptions::default()).await,
        );
        let router = test_router(
            vec![deployment("a", &a, &[], 3), deployment("b", &b, &[], 1)],
            RoutingConfig::default(),
        );
        for i in 0..400 {
            let mut route = router.route("m");
            served(chat(&router, &mut route, &format!("{i}")).await);
        }
        let on_a = calls_of(&a);
        assert_eq!(on_a + calls_of(&b), 400);
        // 3:1 is 300 of 400; a binomial's standard deviation here is about 9.
        assert!(
            (255..=345).contains(&on_a),
            "{on_a} of 400 on the weight-3 deployment"
        );
    }

    #[tokio::test]
    async fn a_model_no_deployment_serves_is_unroutable() {
        let a = mock(MockOptions::default()).await;
        let router = test_router(
            vec![deployment("a", &a, &["m"], 1)],
            RoutingConfig::default(),
        );
        let mut route = router.route("other");
        let Routed::Unroutable(failure) = chat(&router, &mut route, "x").await else {
            panic!("unroutable");
        };
        assert_eq!(failure.kind(), ErrorKind::InvalidRequest);
        assert_eq!(calls_of(&a), 0);
    }

    #[tokio::test]
    async fn a_429_cools_one_deployment_and_the_next_call_goes_elsewhere() {
        let limited = mock(cooling_30s()).await;
        let fine = mock(MockOptions::default()).await;
        let router = first_and_spare(&limited, &fine, RoutingConfig::default());
        // The weights make "a" the first choice nearly always; try until it is taken.
        let mut route = router.route("m");
        let mut first = chat(&router, &mut route, "x").await;
        while matches!(first, Routed::Served(_)) {
            route = router.route("m");
            first = chat(&router, &mut route, "x").await;
        }
        let after = rate_limited(first, "rate limited");
        assert_eq!(after, None, "another deployment can serve now");
        let again = served(chat(&router, &mut route, "x").await);
        assert_eq!(again.upstream, "b");
        for _ in 0..20 {
            let mut route = router.route("m");
            assert_eq!(served(chat(&router, &mut route, "y").await).upstream, "b");
        }
        assert_eq!(calls_of(&limited), 1, "cooling for 30 s");
        let mut other_model = router.route("n");
        let mut calls = 0;
        while calls_of(&limited) == 1 {
            let _ = chat(&router, &mut other_model, "z").await;
            calls += 1;
            assert!(calls < 200, "the other model still goes to a");
        }
    }

    #[tokio::test]
    async fn every_deployment_cooling_is_a_wait_not_a_call() {
        let limited = mock(cooling_30s()).await;
        let router = alone(&limited, RoutingConfig::default());
        let mut route = router.route("m");
        let after = rate_limited(chat(&router, &mut route, "x").await, "rate limited");
        let after = after.expect("nowhere else: the Retry-After");
        assert_eq!(after, Duration::from_secs(30));
        let after = rate_limited(chat(&router, &mut route, "x").await, "still cooling");
        let after = after.expect("a wait");
        assert!(rest_of_30s(after), "{after:?}");
        assert_eq!(calls_of(&limited), 1, "no second call");
    }

    #[tokio::test]
    async fn a_refusing_deployment_is_left_for_the_others_at_once() {
        let refusing = mock(MockOptions {
            require_key: Some("another-key".into()),
            ..MockOptions::default()
        })
        .await;
        let fine = mock(MockOptions::default()).await;
        let router = first_and_spare(&refusing, &fine, RoutingConfig::default());
        for _ in 0..20 {
            let mut route = router.route("m");
            assert_eq!(served(chat(&router, &mut route, "x").await).upstream, "b");
        }
        let confirmed = RoutingConfig::default().auth_failures;
        assert!(
            calls_of(&refusing) <= u64::from(confirmed),
            "out once confirmed"
        );
        // Alone, it fails attempts as a transient failure until confirmed, then is
        // upstream_permanent without a call.
        let lonely = alone(&refusing, RoutingConfig::default());
        let before = calls_of(&refusing);
        let mut route = lonely.route("m");
        for _ in 1..confirmed {
            let Routed::Failed { failure, elsewhere } = chat(&lonely, &mut route, "x").await else {
                panic!("a transient failure while not confirmed");
            };
            assert_eq!((failure.class, elsewhere), (Class::Transient, false));
        }
        let Routed::Unroutable(failure) = chat(&lonely, &mut route, "x").await else {
            panic!("unroutable");
        };
        assert_eq!(failure.kind(), ErrorKind::UpstreamPermanent);
        let mut next = lonely.route("m");
        assert!(matches!(
            chat(&lonely, &mut next, "y").await,
            Routed::Unroutable(_)
        ));
        assert_eq!(calls_of(&refusing) - before, u64::from(confirmed));
    }

    #[tokio::test]
    async fn a_context_length_error_goes_straight_to_the_context_window_fallback() {
        let small = mock(MockOptions {
            max_prompt_bytes: Some(50),
            ..MockOptions::default()
        })
        .await;
        let big = mock(MockOptions::default()).await;
        let rules = RoutingConfig {
            context_window_fallbacks: [("small-model".to_string(), vec!["big-model".to_string()])]
                .into(),
            ..RoutingConfig::default()
        };
        let router = test_router(
            vec![
                deployment("a", &small, &["small-model"], 1),
                deployment("b", &big, &["big-model"], 1),
            ],
            rules,
        );
        let mut route = router.route("small-model");
        let answer = served(chat(&router, &mut route, &"long ".repeat(40)).await);
        assert_eq!(answer.upstream, "b");
        assert_eq!(answer.model, "big-model");
        assert_eq!(answer.fallback_from.as_deref(), Some("small-model"));
        assert_eq!(
            answer.answer.model, "big-model",
            "the upstream was asked for it"
        );
        let mut short = router.route("small-model");
        let answer = served(chat(&router, &mut short, "hi").await);
        assert_eq!(
            (answer.upstream.as_str(), answer.fallback_from),
            ("a", None)
        );
    }

    #[tokio::test]
    async fn fallbacks_serve_when_the_model_cannot_be_served() {
        let cooling = mock(cooling_30s()).await;
        let spare = mock(MockOptions::default()).await;
        let rules = RoutingConfig {
            fallbacks: [("gpt-4o".to_string(), vec!["gpt-4o-mini".to_string()])].into(),
            ..RoutingConfig::default()
        };
        // "a" serves gpt-4o (and cools down at its first call), "b" its fallback.
        let router_of = |rules: RoutingConfig| {
            test_router(
                vec![
                    deployment("a", &cooling, &["gpt-4o"], 1),
                    deployment("b", &spare, &["gpt-4o-mini"], 1),
                ],
                rules,
            )
        };
        let router = router_of(rules.clone());
        let mut route = router.route("gpt-4o");
        assert!(
            matches!(
                chat(&router, &mut route, "x").await,
                Routed::RateLimited(Failure {
                    retry_after: None,
                    ..
                })
            ),
            "the fallback can serve now"
        );
        let answer = served(chat(&router, &mut route, "x").await);
        assert_eq!(answer.model, "gpt-4o-mini");
        assert_eq!(answer.fallback_from.as_deref(), Some("gpt-4o"));
        // With fallback_after_secs, a cooldown is waited out first.
        let patient = router_of(RoutingConfig {
            fallback_after_secs: 60,
            ..rules
        });
        let mut route = patient.route("gpt-4o");
        let _ = chat(&patient, &mut route, "x").await;
        let after = rate_limited(
            chat(&patient, &mut route, "x").await,
            "waits for gpt-4o rather than falling back",
        );
        let after = after.expect("a wait");
        assert!(
            rest_of_30s(after),
            "until the cooldown ends, which is before the fallback's time: {after:?}"
        );
        // Once every deployment of gpt-4o has been unavailable for fallback_after_secs (as
        // the rate-limit header carries it across deliveries), the fallback serves.
        let mut later = patient.route("gpt-4o");
        later.unavailable_since = Some(unix_now_ms() - 61_000);
        let answer = served(chat(&patient, &mut later, "x").await);
        assert_eq!(answer.fallback_from.as_deref(), Some("gpt-4o"));
        assert_eq!(
            calls_of(&cooling),
            2,
            "once for each router, none after its 429"
        );
    }

    #[tokio::test]
    async fn a_request_does_not_bounce_between_failing_deployments() {
        let (a, b) = (mock(failing(503)).await, mock(failing(503)).await);
        let router = test_router(
            vec![deployment("a", &a, &[], 1), deployment("b", &b, &[], 1)],
            RoutingConfig::default(),
        );
        let mut route = router.route("m");
        let Routed::Failed { elsewhere, .. } = chat(&router, &mut route, "x").await else {
            panic!("failed");
        };
        assert!(elsewhere, "the other one is untried");
        let Routed::Failed { elsewhere, .. } = chat(&router, &mut route, "x").await else {
            panic!("failed");
        };
        assert!(!elsewhere, "both failed for this request: back off");
        assert_eq!((calls_of(&a), calls_of(&b)), (1, 1), "one each");
    }

    #[tokio::test]
    async fn a_failing_deployment_opens_its_breaker_and_the_others_serve() {
        let down = mock(failing(503)).await;
        let fine = mock(MockOptions::default()).await;
        let rules = RoutingConfig {
            breaker_failures: 2,
            ..RoutingConfig::default()
        };
        let router = first_and_spare(&down, &fine, rules);
        let mut failures = 0;
        for _ in 0..50 {
            let mut route = router.route("m");
            match chat(&router, &mut route, "x").await {
                Routed::Served(s) => assert_eq!(s.upstream, "b"),
                Routed::Failed { elsewhere, .. } => {
                    assert!(elsewhere, "b could take the next attempt");
                    failures += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(failures, 2, "the breaker opened at the second failure");
        assert_eq!(calls_of(&down), 2);
        assert_eq!(router.report(unix_now_ms())[0].standing.breaker, "open");
    }

    #[tokio::test]
    async fn every_deployment_down_is_an_outage_and_a_429_among_them_a_rate_limit() {
        let down = mock(failing(500)).await;
        let rules = RoutingConfig {
            breaker_failures: 1,
            breaker_cooldown_secs: 30,
            ..RoutingConfig::default()
        };
        let router = alone(&down, rules.clone());
        let mut route = router.route("m");
        assert!(matches!(
            chat(&router, &mut route, "x").await,
            Routed::Failed { .. }
        ));
        let Routed::Unavailable(failure) = chat(&router, &mut route, "x").await else {
            panic!("an outage, not a rate limit");
        };
        assert_eq!(failure.kind(), ErrorKind::UpstreamUnavailable);
        let after = failure.retry_after.expect("until the breaker half-opens");
        assert!(rest_of_30s(after), "{after:?}");
        assert_eq!(calls_of(&down), 1, "no call while it is open");
        // One deployment down and one cooling down after a 429: a rate limit.
        let limited = mock(cooling_30s()).await;
        let mixed = test_router(
            vec![
                deployment("a", &down, &[], 1),
                deployment("b", &limited, &[], 1),
            ],
            rules,
        );
        mixed.standing().failed(0, unix_now_ms());
        let mut route = mixed.route("m");
        let first = chat(&mixed, &mut route, "x").await;
        assert!(matches!(first, Routed::RateLimited(_)), "{first:?}");
        let Routed::RateLimited(failure) = chat(&mixed, &mut route, "x").await else {
            panic!("a rate limit while one is cooling down");
        };
        assert_eq!(failure.kind(), ErrorKind::RateLimited);
    }

    #[tokio::test]
    async fn one_refusal_is_a_glitch_not_a_take_out() {
        let glitchy = mock(MockOptions {
            fail_first: 1,
            status: 401,
            ..MockOptions::default()
        })
        .await;
        let router = alone(&glitchy, RoutingConfig::default());
        let mut route = router.route("m");
        let Routed::Failed { failure, elsewhere } = chat(&router, &mut route, "x").await else {
            panic!("a failed attempt, not the model taken out");
        };
        assert_eq!((failure.class, elsewhere), (Class::Transient, false));
        assert_eq!(failure.kind(), ErrorKind::RetriesExhausted);
        assert_eq!(served(chat(&router, &mut route, "x").await).upstream, "a");
        for i in 0..5 {
            let mut route = router.route("m");
            served(chat(&router, &mut route, &format!("{i}")).await);
        }
        assert_eq!(
            calls_of(&glitchy),
            7,
            "one refused, then every one answered"
        );
        assert_eq!(router.report(unix_now_ms())[0].standing.unavailable, vec![]);
    }

    #[tokio::test]
    async fn a_probe_dropped_mid_call_lets_the_next_call_probe_at_once() {
        let slow = mock(MockOptions {
            latency_ms: 10_000,
            ..MockOptions::default()
        })
        .await;
        let router = alone(
            &slow,
            RoutingConfig {
                breaker_failures: 1,
                breaker_cooldown_secs: 30,
                ..RoutingConfig::default()
            },
        );
        // Opened 31 s ago: half-open now, and the next call is its probe.
        router.standing().failed(0, unix_now_ms() - 31_000);
        assert_eq!(
            router.report(unix_now_ms())[0].standing.breaker,
            "half_open"
        );
        // The probe's caller gives up mid-call (a cancel, a deadline): its future is
        // dropped before any answer.
        let mut route = router.route("m");
        let mut probing = Box::pin(chat(&router, &mut route, "x"));
        tokio::select! {
            routed = &mut probing => panic!("answered within its latency: {routed:?}"),
            () = async {
                while calls_of(&slow) == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            } => {}
        }
        drop(probing);
        // The next call probes at once (and closes the breaker), rather than waiting for a
        // probe that will never report.
        slow.set_options(MockOptions::default());
        let mut route = router.route("m");
        let answer = served(chat(&router, &mut route, "y").await);
        assert_eq!(answer.upstream, "a");
        assert_eq!(router.report(unix_now_ms())[0].standing.breaker, "closed");
    }
}
