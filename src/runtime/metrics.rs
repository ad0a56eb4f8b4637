//! Prometheus metrics of a worker, served by [`crate::ops::admin`] at `/metrics`.

use std::{hash::Hash, sync::atomic::AtomicU64, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{
        MetricType,
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::contract::{ErrorKind, request::Kind};

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

/// Why something was dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: String,
}

/// A model a request moved from, and the one it moved to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// The model asked for.
    pub from: String,
    /// The model that served instead.
    pub to: String,
}

/// A metric as registered: listed in `/metrics` (its HELP and TYPE) even while it has no
/// series, where prometheus-client leaves an empty family out. With [`Metrics::seed`],
/// every family is there from start-up.
#[derive(Debug)]
struct Listed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }
}

/// The label values known at start-up. [`Metrics::seed`] gives each labelled family a zeroed
/// series for each (and for both kinds and every [`ErrorKind`]), so that every family has a
/// series, and every dashboard query an answer, before its first event; a counter that is
/// there at 0 also lets `rate()` and `increase()` see its first event.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// The deployments (`[upstreams.<name>]`, or `default`).
    pub upstreams: Vec<String>,
    /// Every `outcome` of `upstream_calls` but `ok`: each way a call can fail.
    pub call_failures: Vec<&'static str>,
    /// Every `error_kind` of `requests_failed` that is not an [`ErrorKind`]: the failures a
    /// retry may fix.
    pub retryable_failures: Vec<&'static str>,
    /// The tenants named in `[tenants]`, and `other`.
    pub tenants: Vec<String>,
    /// The configured fallbacks, `(from, to)`. With none, `upstream_fallbacks` has no
    /// series: no fallback can happen.
    pub fallbacks: Vec<(String, String)>,
    /// The queues whose depth is read (the work queues and the DLQ): 0 until the first
    /// read, a moment after connecting.
    pub queues: Vec<String>,
    /// Every reason a cancel is dropped for.
    pub cancel_drops: Vec<&'static str>,
}

/// Creates the series of `labels` in `family` at zero, unless it is there already.
fn zeroed<S, M, C>(family: &Family<S, M, C>, labels: &S)
where
    S: Clone + Hash + Eq,
    C: MetricConstructor<M>,
{
    drop(family.get_or_create(labels));
}

/// Declares [`Metrics`] from one list: each metric once, as a field with the name it is
/// exposed under and its help text, which is also the field's doc. `Metrics::new` registers
/// them in the order listed, which is the order of `/metrics`. A field's type must be
/// `Default`, or be followed by `= <expression>` that makes it.
macro_rules! metrics {
    (@make) => { Default::default() };
    (@make $make:expr) => { $make };
    ($(
        $(#[$attr:meta])*
        $vis:vis $field:ident: $ty:ty $(= $make:expr)? => $name:literal, $help:literal;
    )*) => {
        /// Every metric of a worker.
        pub struct Metrics {
            registry: Registry,
            $(
                $(#[$attr])*
                #[doc = ""]
                #[doc = concat!("Exposed as `llmq_", $name, "`: `", $help, "`.")]
                $vis $field: $ty,
            )*
        }

        impl Metrics {
            /// Registers every metric under the `llmq` prefix.
            pub fn new() -> Self {
                let mut registry = Registry::with_prefix("llmq");
                $(
                    let $field: $ty = metrics!(@make $($make)?);
                    registry.register($name, $help, Listed($field.clone()));
                )*
                Self { registry, $($field,)* }
            }
        }
    };
}

/// Buckets of `upstream_latency_seconds`: from a cached answer to a slow reasoning model.
const UPSTREAM_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of `publish_latency_seconds`: a broker confirm is a millisecond or so.
const PUBLISH_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

metrics! {
    pub cancelled: Counter
        => "requests_cancelled", "Requests answered cancelled at their caller's request";
    cancels_dropped: Family<ReasonLabel, Counter>
        => "cancels_dropped",
        "Cancels not remembered for requests not reached yet, by reason (rate_limited, full, no_identity); one for a request running here still stopped it";
    pub stream_deltas: Counter
        => "stream_deltas", "Delta messages of streamed answers published to reply_to";
    pub stream_restarts: Counter
        => "stream_restarts",
        "Restart markers published before a streamed request's next attempt";
    tenant_requests: Family<TenantLabel, Counter>
        => "tenant_requests", "Requests answered, by tenant (named in [tenants], else other)";
    tenant_tokens: Family<TenantLabel, Counter>
        => "tenant_tokens",
        "Tokens the upstreams reported, by tenant (named in [tenants], else other)";
    tenant_cost: Family<TenantLabel, Counter<f64, AtomicU64>>
        => "tenant_cost_usd",
        "What answers cost in USD by [prices], by tenant (named in [tenants], else other)";
    upstream_calls: Family<UpstreamOutcome, Counter>
        => "upstream_calls", "Calls to each deployment, by outcome";
    fallbacks: Family<FallbackLabels, Counter>
        => "upstream_fallbacks", "Requests served by a fallback model";
    /// Set when scraped.
    pub upstream_in_flight: Family<UpstreamLabel, Gauge>
        => "upstream_in_flight", "Calls to each deployment running now";
    /// Set when scraped.
    pub upstream_limit: Family<UpstreamLabel, Gauge>
        => "upstream_limit", "Each deployment's AIMD concurrency limit";
    /// Set when scraped.
    pub upstream_cooling: Family<UpstreamLabel, Gauge>
        => "upstream_cooling",
        "Models each deployment does not serve now (cooling down, spent or refused)";
    /// Set when scraped.
    pub upstream_breaker: Family<UpstreamLabel, Gauge>
        => "upstream_breaker", "Each deployment's circuit breaker: 0 closed, 1 open, 2 half-open";
    received: Family<KindLabel, Counter>
        => "requests_received", "Deliveries taken from the work queues";
    succeeded: Family<KindLabel, Counter>
        => "requests_succeeded", "Requests answered with an ok result";
    retried: Family<KindLabel, Counter>
        => "requests_retried", "Transient failures retried";
    failed: Family<ErrorLabels, Counter>
        => "requests_failed", "Failed attempts, by error kind";
    dead_lettered: Family<ErrorLabels, Counter>
        => "requests_dead_lettered", "Requests dead-lettered, by error kind";
    tokens: Family<KindLabel, Counter>
        => "tokens_used", "Tokens reported by the upstream";
    upstream_latency: Family<KindLabel, Histogram>
        = Family::new_with_constructor(|| Histogram::new(UPSTREAM_BUCKETS))
        => "upstream_latency_seconds", "Duration of upstream calls";
    publish_latency: Histogram = Histogram::new(PUBLISH_BUCKETS)
        => "publish_latency_seconds", "From publishing a result to its broker confirm";
    pub reconnects: Counter
        => "broker_reconnects", "Broker connections lost and reopened";
    pub lane_moves: Counter
        => "lane_moves", "Requests moved from a work queue to their tenant's lane (fair share)";
    /// Counted once per result, whichever way the reply failed.
    pub replies_refused: Counter
        => "replies_refused",
        "Results not delivered to the caller's reply_to (it refused them or was gone); each went to the results exchange instead";
    pub redelivered: Counter
        => "redelivered",
        "Deliveries that arrived redelivered (never settled before) and were counted";
    pub in_flight: Gauge
        => "in_flight", "Upstream calls running now";
    pub concurrency_limit: Gauge
        => "concurrency_limit", "Current AIMD concurrency limit";
    pub ready: Gauge
        => "ready", "1 when connected to the broker and consuming";
    queue_depth: Family<QueueLabel, Gauge>
        => "queue_depth", "Ready messages in a queue";
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The label of deployment `upstream`.
    pub fn upstream(upstream: &str) -> UpstreamLabel {
        UpstreamLabel {
            upstream: upstream.into(),
        }
    }

    /// Gives every labelled family a zeroed series for each label value `known` at start-up.
    pub fn seed(&self, known: &Known) {
        let errors = ErrorKind::ALL.map(ErrorKind::as_str);
        for kind in Kind::ALL.map(Kind::as_str) {
            let label = Self::kind(kind);
            zeroed(&self.received, &label);
            zeroed(&self.succeeded, &label);
            zeroed(&self.retried, &label);
            zeroed(&self.tokens, &label);
            zeroed(&self.upstream_latency, &label);
            let errors_of = |error_kinds: &[&str]| -> Vec<ErrorLabels> {
                let labels = error_kinds.iter().map(|error_kind| ErrorLabels {
                    kind: kind.into(),
                    error_kind: (*error_kind).into(),
                });
                labels.collect()
            };
            for labels in errors_of(&errors) {
                zeroed(&self.dead_lettered, &labels);
                zeroed(&self.failed, &labels);
            }
            for labels in errors_of(&known.retryable_failures) {
                zeroed(&self.failed, &labels);
            }
        }
        for upstream in &known.upstreams {
            let label = Self::upstream(upstream);
            zeroed(&self.upstream_in_flight, &label);
            zeroed(&self.upstream_limit, &label);
            zeroed(&self.upstream_cooling, &label);
            zeroed(&self.upstream_breaker, &label);
            for outcome in ["ok"].iter().chain(&known.call_failures) {
                let labels = UpstreamOutcome {
                    upstream: upstream.clone(),
                    outcome: (*outcome).into(),
                };
                zeroed(&self.upstream_calls, &labels);
            }
        }
        for tenant in &known.tenants {
            let label = TenantLabel {
                tenant: tenant.clone(),
            };
            zeroed(&self.tenant_requests, &label);
            zeroed(&self.tenant_tokens, &label);
            zeroed(&self.tenant_cost, &label);
        }
        for (from, to) in &known.fallbacks {
            let (from, to) = (from.clone(), to.clone());
            zeroed(&self.fallbacks, &FallbackLabels { from, to });
        }
        for queue in &known.queues {
            let queue = queue.clone();
            zeroed(&self.queue_depth, &QueueLabel { queue });
        }
        for reason in &known.cancel_drops {
            let reason = (*reason).into();
            zeroed(&self.cancels_dropped, &ReasonLabel { reason });
        }
    }

    /// A cancel was not remembered, for `reason`.
    pub fn cancel_dropped(&self, reason: &str) {
        let reason = reason.into();
        self.cancels_dropped
            .get_or_create(&ReasonLabel { reason })
            .inc();
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

    /// The HELP and TYPE lines of every family, in the order `/metrics` shows them, as they
    /// were before the metrics were declared in one list: a family renamed, retyped,
    /// reworded, moved, dropped or added fails the test.
    const FAMILIES: &str = r#"# HELP llmq_requests_cancelled Requests answered cancelled at their caller's request.
# TYPE llmq_requests_cancelled counter
# HELP llmq_cancels_dropped Cancels not remembered for requests not reached yet, by reason (rate_limited, full, no_identity); one for a request running here still stopped it.
# TYPE llmq_cancels_dropped counter
# HELP llmq_stream_deltas Delta messages of streamed answers published to reply_to.
# TYPE llmq_stream_deltas counter
# HELP llmq_stream_restarts Restart markers published before a streamed request's next attempt.
# TYPE llmq_stream_restarts counter
# HELP llmq_tenant_requests Requests answered, by tenant (named in [tenants], else other).
# TYPE llmq_tenant_requests counter
# HELP llmq_tenant_tokens Tokens the upstreams reported, by tenant (named in [tenants], else other).
# TYPE llmq_tenant_tokens counter
# HELP llmq_tenant_cost_usd What answers cost in USD by [prices], by tenant (named in [tenants], else other).
# TYPE llmq_tenant_cost_usd counter
# HELP llmq_upstream_calls Calls to each deployment, by outcome.
# TYPE llmq_upstream_calls counter
# HELP llmq_upstream_fallbacks Requests served by a fallback model.
# TYPE llmq_upstream_fallbacks counter
# HELP llmq_upstream_in_flight Calls to each deployment running now.
# TYPE llmq_upstream_in_flight gauge
# HELP llmq_upstream_limit Each deployment's AIMD concurrency limit.
# TYPE llmq_upstream_limit gauge
# HELP llmq_upstream_cooling Models each deployment does not serve now (cooling down, spent or refused).
# TYPE llmq_upstream_cooling gauge
# HELP llmq_upstream_breaker Each deployment's circuit breaker: 0 closed, 1 open, 2 half-open.
# TYPE llmq_upstream_breaker gauge
# HELP llmq_requests_received Deliveries taken from the work queues.
# TYPE llmq_requests_received counter
# HELP llmq_requests_succeeded Requests answered with an ok result.
# TYPE llmq_requests_succeeded counter
# HELP llmq_requests_retried Transient failures retried.
# TYPE llmq_requests_retried counter
# HELP llmq_requests_failed Failed attempts, by error kind.
# TYPE llmq_requests_failed counter
# HELP llmq_requests_dead_lettered Requests dead-lettered, by error kind.
# TYPE llmq_requests_dead_lettered counter
# HELP llmq_tokens_used Tokens reported by the upstream.
# TYPE llmq_tokens_used counter
# HELP llmq_upstream_latency_seconds Duration of upstream calls.
# TYPE llmq_upstream_latency_seconds histogram
# HELP llmq_publish_latency_seconds From publishing a result to its broker confirm.
# TYPE llmq_publish_latency_seconds histogram
# HELP llmq_broker_reconnects Broker connections lost and reopened.
# TYPE llmq_broker_reconnects counter
# HELP llmq_lane_moves Requests moved from a work queue to their tenant's lane (fair share).
# TYPE llmq_lane_moves counter
# HELP llmq_replies_refused Results not delivered to the caller's reply_to (it refused them or was gone); each went to the results exchange instead.
# TYPE llmq_replies_refused counter
# HELP llmq_redelivered Deliveries that arrived redelivered (never settled before) and were counted.
# TYPE llmq_redelivered counter
# HELP llmq_in_flight Upstream calls running now.
# TYPE llmq_in_flight gauge
# HELP llmq_concurrency_limit Current AIMD concurrency limit.
# TYPE llmq_concurrency_limit gauge
# HELP llmq_ready 1 when connected to the broker and consuming.
# TYPE llmq_ready gauge
# HELP llmq_queue_depth Ready messages in a queue.
# TYPE llmq_queue_depth gauge"#;

    /// Touches every family once, so that each labelled one is exposed too.
    fn touched() -> Metrics {
        let m = Metrics::new();
        m.cancelled.inc();
        m.cancel_dropped("full");
        m.stream_deltas.inc();
        m.stream_restarts.inc();
        m.tenant_answered("acme", 10, 0.5);
        m.upstream_outcome("default", "ok");
        m.fallback("a", "b");
        let upstream = Metrics::upstream("default");
        m.upstream_in_flight.get_or_create(&upstream).set(1);
        m.upstream_limit.get_or_create(&upstream).set(2);
        m.upstream_cooling.get_or_create(&upstream).set(3);
        m.upstream_breaker.get_or_create(&upstream).set(1);
        m.received("chat");
        m.succeeded("chat", 12);
        m.retried("chat");
        m.failed("chat", "transient");
        m.dead_lettered("embedding", "invalid_request");
        m.upstream_call("chat", Duration::from_millis(30));
        m.published(Duration::from_millis(2));
        m.reconnects.inc();
        m.lane_moves.inc();
        m.replies_refused.inc();
        m.redelivered.inc();
        m.in_flight.set(3);
        m.concurrency_limit.set(4);
        m.ready.set(1);
        m.queue_depth("q", 7);
        m
    }

    #[test]
    fn every_family_keeps_its_name_type_and_help_in_order() {
        let text = touched().encode();
        let exposed: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("# HELP ") || l.starts_with("# TYPE "))
            .collect();
        let expected: Vec<&str> = FAMILIES.lines().collect();
        assert_eq!(exposed, expected, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// The families of `text` (from their TYPE lines), each with its number of samples: the
    /// lines named for it, or for it with a counter's or a histogram's suffix.
    fn families(text: &str) -> Vec<(String, usize)> {
        let sample_names: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let of = |family: &str, sample: &str| {
            let suffix = sample.strip_prefix(family);
            matches!(suffix, Some("" | "_total" | "_bucket" | "_count" | "_sum"))
        };
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .map(|family| {
                let samples = sample_names.iter().filter(|s| of(family, s)).count();
                (family.to_string(), samples)
            })
            .collect()
    }

    #[test]
    fn every_family_is_listed_before_its_first_event() {
        let text = Metrics::new().encode();
        let exposed: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("# HELP ") || l.starts_with("# TYPE "))
            .collect();
        assert_eq!(exposed, FAMILIES.lines().collect::<Vec<_>>(), "{text}");
    }

    #[test]
    fn a_seeded_worker_has_a_zeroed_series_in_every_family() {
        let m = Metrics::new();
        m.seed(&Known {
            upstreams: vec!["openai".into()],
            call_failures: vec!["rate_limited"],
            retryable_failures: vec!["throttled"],
            tenants: vec!["acme".into(), "other".into()],
            fallbacks: vec![("gpt-4o".into(), "gpt-4o-mini".into())],
            queues: vec!["llm_processing".into()],
            cancel_drops: vec!["rate_limited"],
        });
        let text = m.encode();
        for (family, samples) in families(&text) {
            assert!(samples > 0, "{family} has no series:\n{text}");
        }
        for series in [
            "llmq_requests_received_total{kind=\"embedding\"} 0",
            "llmq_requests_dead_lettered_total{kind=\"chat\",error_kind=\"budget_exceeded\"} 0",
            "llmq_requests_failed_total{kind=\"chat\",error_kind=\"throttled\"} 0",
            "llmq_requests_failed_total{kind=\"embedding\",error_kind=\"expired\"} 0",
            "llmq_upstream_calls_total{upstream=\"openai\",outcome=\"ok\"} 0",
            "llmq_upstream_calls_total{upstream=\"openai\",outcome=\"rate_limited\"} 0",
            "llmq_upstream_fallbacks_total{from=\"gpt-4o\",to=\"gpt-4o-mini\"} 0",
            "llmq_upstream_breaker{upstream=\"openai\"} 0",
            "llmq_tenant_cost_usd_total{tenant=\"acme\"} 0.0",
            "llmq_tenant_requests_total{tenant=\"other\"} 0",
            "llmq_upstream_latency_seconds_count{kind=\"chat\"} 0",
            "llmq_queue_depth{queue=\"llm_processing\"} 0",
            "llmq_cancels_dropped_total{reason=\"rate_limited\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "no `{series}` in\n{text}"
            );
        }
        // Seeding twice, or after an event, changes nothing.
        m.received("chat");
        m.seed(&Known::default());
        assert!(
            m.encode()
                .contains("llmq_requests_received_total{kind=\"chat\"} 1")
        );
    }

    #[test]
    fn values_keep_their_series_names_and_labels() {
        let text = touched().encode();
        for series in [
            "llmq_requests_cancelled_total 1",
            "llmq_tenant_cost_usd_total{tenant=\"acme\"} 0.5",
            "llmq_upstream_calls_total{upstream=\"default\",outcome=\"ok\"} 1",
            "llmq_upstream_fallbacks_total{from=\"a\",to=\"b\"} 1",
            "llmq_upstream_breaker{upstream=\"default\"} 1",
            "llmq_requests_failed_total{kind=\"chat\",error_kind=\"transient\"} 1",
            "llmq_upstream_latency_seconds_bucket{le=\"0.05\",kind=\"chat\"} 1",
            "llmq_upstream_latency_seconds_bucket{le=\"60.0\",kind=\"chat\"} 1",
            "llmq_publish_latency_seconds_bucket{le=\"0.0025\"} 1",
            "llmq_publish_latency_seconds_bucket{le=\"1.0\"} 1",
            "llmq_queue_depth{queue=\"q\"} 7",
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "no `{series}` in\n{text}"
            );
        }
    }
}
