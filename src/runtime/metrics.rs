//! Prometheus metrics of a worker, served by [`crate::ops::admin`] at `/metrics`.

use std::{sync::atomic::AtomicU64, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// `kind` = chat | embedding.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// chat | embedding
    pub kind: String,
}

/// A kind and why it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// chat | embedding
    pub kind: String,
    /// invalid_request, too_large, upstream_permanent, retries_exhausted, transient,
    /// throttled, internal_error
    pub error_kind: String,
}

/// A queue's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// The queue.
    pub queue: String,
}

/// A tenant named in `[tenants]`, or `other` for every tenant that is not: the label's
/// values stay few whoever sends.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabel {
    /// The tenant's name, or `other`.
    pub tenant: String,
}

/// A deployment (`[upstreams.<name>]`, or `default`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    /// The deployment's name.
    pub upstream: String,
}

/// A deployment and how a call to it ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamOutcome {
    /// The deployment's name.
    pub upstream: String,
    /// ok, rate_limited, quota, auth, context_length, transient, permanent
    pub outcome: String,
}

/// A model a request moved from, and the one it moved to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// The model asked for.
    pub from: String,
    /// The model that served instead.
    pub to: String,
}

/// Every metric of a worker.
pub struct Metrics {
    registry: Registry,
    received: Family<KindLabel, Counter>,
    succeeded: Family<KindLabel, Counter>,
    retried: Family<KindLabel, Counter>,
    failed: Family<ErrorLabels, Counter>,
    dead_lettered: Family<ErrorLabels, Counter>,
    tokens: Family<KindLabel, Counter>,
    upstream_latency: Family<KindLabel, Histogram>,
    publish_latency: Histogram,
    /// Broker connections lost and reopened.
    pub reconnects: Counter,
    /// Requests moved from a work queue to their tenant's lane (fair share).
    pub lane_moves: Counter,
    /// Results a caller's `reply_to` refused (or that could not be sent there); each is on
    /// the results exchange all the same.
    pub replies_refused: Counter,
    /// Deliveries that arrived redelivered (never settled before) and were counted.
    pub redelivered: Counter,
    /// Requests answered `cancelled` at their caller's request.
    pub cancelled: Counter,
    /// Delta messages of streamed answers published to `reply_to`.
    pub stream_deltas: Counter,
    /// Restart markers published: attempts of a streamed request after one that streamed.
    pub stream_restarts: Counter,
    /// Calls to the upstream running now.
    pub in_flight: Gauge,
    /// The current AIMD concurrency limit.
    pub concurrency_limit: Gauge,
    /// 1 when connected and consuming.
    pub ready: Gauge,
    queue_depth: Family<QueueLabel, Gauge>,
    upstream_calls: Family<UpstreamOutcome, Counter>,
    tenant_requests: Family<TenantLabel, Counter>,
    tenant_tokens: Family<TenantLabel, Counter>,
    tenant_cost: Family<TenantLabel, Counter<f64, AtomicU64>>,
    fallbacks: Family<FallbackLabels, Counter>,
    /// Calls to a deployment running now (set when scraped).
    pub upstream_in_flight: Family<UpstreamLabel, Gauge>,
    /// A deployment's AIMD limit (set when scraped).
    pub upstream_limit: Family<UpstreamLabel, Gauge>,
    /// Models a deployment does not serve now: cooling down, spent or refused (set when
    /// scraped).
    pub upstream_cooling: Family<UpstreamLabel, Gauge>,
    /// A deployment's circuit breaker: 0 closed, 1 open, 2 half-open (set when scraped).
    pub upstream_breaker: Family<UpstreamLabel, Gauge>,
}

fn upstream_buckets() -> Family<KindLabel, Histogram> {
    Family::new_with_constructor(|| {
        Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
    })
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llmq");
        let received = Family::<KindLabel, Counter>::default();
        let succeeded = Family::<KindLabel, Counter>::default();
        let retried = Family::<KindLabel, Counter>::default();
        let failed = Family::<ErrorLabels, Counter>::default();
        let dead_lettered = Family::<ErrorLabels, Counter>::default();
        let tokens = Family::<KindLabel, Counter>::default();
        let upstream_latency = upstream_buckets();
        let publish_latency = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        let reconnects = Counter::default();
        let lane_moves = Counter::default();
        let replies_refused = Counter::default();
        let redelivered = Counter::default();
        let cancelled = Counter::default();
        registry.register(
            "requests_cancelled",
            "Requests answered cancelled at their caller's request",
            cancelled.clone(),
        );
        let stream_deltas = Counter::default();
        registry.register(
            "stream_deltas",
            "Delta messages of streamed answers published to reply_to",
            stream_deltas.clone(),
        );
        let stream_restarts = Counter::default();
        registry.register(
            "stream_restarts",
            "Restart markers published before a streamed request's next attempt",
            stream_restarts.clone(),
        );
        let in_flight = Gauge::default();
        let concurrency_limit = Gauge::default();
        let ready = Gauge::default();
        let queue_depth = Family::<QueueLabel, Gauge>::default();
        let tenant_requests = Family::<TenantLabel, Counter>::default();
        registry.register(
            "tenant_requests",
            "Requests answered, by tenant (named in [tenants], else other)",
            tenant_requests.clone(),
        );
        let tenant_tokens = Family::<TenantLabel, Counter>::default();
        registry.register(
            "tenant_tokens",
            "Tokens the upstreams reported, by tenant (named in [tenants], else other)",
            tenant_tokens.clone(),
        );
        let tenant_cost = Family::<TenantLabel, Counter<f64, AtomicU64>>::default();
        registry.register(
            "tenant_cost_usd",
            "What answers cost in USD by [prices], by tenant (named in [tenants], else other)",
            tenant_cost.clone(),
        );
        let upstream_calls = Family::<UpstreamOutcome, Counter>::default();
        let fallbacks = Family::<FallbackLabels, Counter>::default();
        let upstream_in_flight = Family::<UpstreamLabel, Gauge>::default();
        let upstream_limit = Family::<UpstreamLabel, Gauge>::default();
        let upstream_cooling = Family::<UpstreamLabel, Gauge>::default();
        let upstream_breaker = Family::<UpstreamLabel, Gauge>::default();
        registry.register(
            "upstream_calls",
            "Calls to each deployment, by outcome",
            upstream_calls.clone(),
        );
        registry.register(
            "upstream_fallbacks",
            "Requests served by a fallback model",
            fallbacks.clone(),
        );
        registry.register(
            "upstream_in_flight",
            "Calls to each deployment running now",
            upstream_in_flight.clone(),
        );
        registry.register(
            "upstream_limit",
            "Each deployment's AIMD concurrency limit",
            upstream_limit.clone(),
        );
        registry.register(
            "upstream_cooling",
            "Models each deployment does not serve now (cooling down, spent or refused)",
            upstream_cooling.clone(),
        );
        registry.register(
            "upstream_breaker",
            "Each deployment's circuit breaker: 0 closed, 1 open, 2 half-open",
            upstream_breaker.clone(),
        );
        registry.register(
            "requests_received",
            "Deliveries taken from the work queues",
            received.clone(),
        );
        registry.register(
            "requests_succeeded",
            "Requests answered with an ok result",
            succeeded.clone(),
        );
        registry.register(
            "requests_retried",
            "Transient failures retried",
            retried.clone(),
        );
        registry.register(
            "requests_failed",
            "Failed attempts, by error kind",
            failed.clone(),
        );
        registry.register(
            "requests_dead_lettered",
            "Requests dead-lettered, by error kind",
            dead_lettered.clone(),
        );
        registry.register(
            "tokens_used",
            "Tokens reported by the upstream",
            tokens.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Duration of upstream calls",
            upstream_latency.clone(),
        );
        registry.register(
            "publish_latency_seconds",
            "From publishing a result to its broker confirm",
            publish_latency.clone(),
        );
        registry.register(
            "broker_reconnects",
            "Broker connections lost and reopened",
            reconnects.clone(),
        );
        registry.register(
            "lane_moves",
            "Requests moved from a work queue to their tenant's lane (fair share)",
            lane_moves.clone(),
        );
        registry.register(
            "replies_refused",
            "Results the caller's reply_to refused; they are on the results exchange",
            replies_refused.clone(),
        );
        registry.register(
            "redelivered",
            "Deliveries that arrived redelivered (never settled before) and were counted",
            redelivered.clone(),
        );
        registry.register("in_flight", "Upstream calls running now", in_flight.clone());
        registry.register(
            "concurrency_limit",
            "Current AIMD concurrency limit",
            concurrency_limit.clone(),
        );
        registry.register(
            "ready",
            "1 when connected to the broker and consuming",
            ready.clone(),
        );
        registry.register(
            "queue_depth",
            "Ready messages in a queue",
            queue_depth.clone(),
        );
        Self {
            registry,
            received,
            succeeded,
            retried,
            failed,
            dead_lettered,
            tokens,
            upstream_latency,
            publish_latency,
            reconnects,
            lane_moves,
            replies_refused,
            redelivered,
            cancelled,
            stream_deltas,
            stream_restarts,
            in_flight,
            concurrency_limit,
            ready,
            queue_depth,
            upstream_calls,
            tenant_requests,
            tenant_tokens,
            tenant_cost,
            fallbacks,
            upstream_in_flight,
            upstream_limit,
            upstream_cooling,
            upstream_breaker,
        }
    }

    /// The label of deployment `upstream`.
    pub fn upstream(upstream: &str) -> UpstreamLabel {
        UpstreamLabel {
            upstream: upstream.into(),
        }
    }

    /// An answer for a tenant (`label`: its name in `[tenants]`, or `other`) that used
    /// `tokens` and cost `usd`.
    pub fn tenant_answered(&self, label: &str, tokens: u64, usd: f64) {
        let labels = TenantLabel {
            tenant: label.into(),
        };
        self.tenant_requests.get_or_create(&labels).inc();
        self.tenant_tokens.get_or_create(&labels).inc_by(tokens);
        if usd > 0.0 {
            self.tenant_cost.get_or_create(&labels).inc_by(usd);
        }
    }

    /// A call to `upstream` ended with `outcome`.
    pub fn upstream_outcome(&self, upstream: &str, outcome: &str) {
        let labels = UpstreamOutcome {
            upstream: upstream.into(),
            outcome: outcome.into(),
        };
        self.upstream_calls.get_or_create(&labels).inc();
    }

    /// A request for `from` was served by `to`.
    pub fn fallback(&self, from: &str, to: &str) {
        let labels = FallbackLabels {
            from: from.into(),
            to: to.into(),
        };
        self.fallbacks.get_or_create(&labels).inc();
    }

    fn kind(kind: &str) -> KindLabel {
        KindLabel { kind: kind.into() }
    }

    /// A delivery arrived.
    pub fn received(&self, kind: &str) {
        self.received.get_or_create(&Self::kind(kind)).inc();
    }

    /// A request got its ok result.
    pub fn succeeded(&self, kind: &str, tokens: u64) {
        self.succeeded.get_or_create(&Self::kind(kind)).inc();
        self.tokens.get_or_create(&Self::kind(kind)).inc_by(tokens);
    }

    /// An attempt failed.
    pub fn failed(&self, kind: &str, error_kind: &str) {
        let labels = ErrorLabels {
            kind: kind.into(),
            error_kind: error_kind.into(),
        };
        self.failed.get_or_create(&labels).inc();
    }

    /// A transient failure will be tried again.
    pub fn retried(&self, kind: &str) {
        self.retried.get_or_create(&Self::kind(kind)).inc();
    }

    /// A request was dead-lettered.
    pub fn dead_lettered(&self, kind: &str, error_kind: &str) {
        let labels = ErrorLabels {
            kind: kind.into(),
            error_kind: error_kind.into(),
        };
        self.dead_lettered.get_or_create(&labels).inc();
    }

    /// An upstream call took `d`.
    pub fn upstream_call(&self, kind: &str, d: Duration) {
        self.upstream_latency
            .get_or_create(&Self::kind(kind))
            .observe(d.as_secs_f64());
    }

    /// A result publish took `d` to be confirmed.
    pub fn published(&self, d: Duration) {
        self.publish_latency.observe(d.as_secs_f64());
    }

    /// Ready messages in `queue`.
    pub fn queue_depth(&self, queue: &str, depth: u32) {
        self.queue_depth
            .get_or_create(&QueueLabel {
                queue: queue.into(),
            })
            .set(i64::from(depth));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_labels_are_exposed() {
        let m = Metrics::new();
        m.received("chat");
        m.succeeded("chat", 12);
        m.dead_lettered("embedding", "invalid_request");
        m.upstream_call("chat", Duration::from_millis(30));
        let text = m.encode();
        assert!(
            text.contains("llmq_requests_received_total{kind=\"chat\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("llmq_tokens_used_total{kind=\"chat\"} 12"),
            "{text}"
        );
        assert!(
            text.contains(
                "llmq_requests_dead_lettered_total{kind=\"embedding\",error_kind=\"invalid_request\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("llmq_upstream_latency_seconds_bucket"),
            "{text}"
        );
    }
}
