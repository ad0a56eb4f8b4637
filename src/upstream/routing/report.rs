//! What `/upstreams` shows and `/metrics` exports of the deployments: each one's limit,
//! load and standing, read at the moment of asking.

use super::router::Router;
use crate::runtime::metrics::Metrics;

/// One deployment's state, as `/upstreams` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamReport {
    /// Its name.
    pub name: String,
    /// The routing models it serves (`*`: any).
    pub models: Vec<String>,
    /// Its weight.
    pub weight: u32,
    /// Calls to it running now in this replica.
    pub in_flight: usize,
    /// Calls waiting for a slot.
    pub waiting: usize,
    /// Its AIMD limit now.
    pub limit: usize,
    /// Its `max_inflight`.
    pub max_inflight: usize,
    /// The standing: breaker, failures, models it does not serve now.
    #[serde(flatten)]
    pub standing: super::standing::Report,
}

impl Router {
    /// Every deployment's state at `now`.
    pub fn report(&self, now: i64) -> Vec<UpstreamReport> {
        self.deployments()
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let flow = d.flow();
                let models = if d.spec().models.is_empty() {
                    vec!["*".to_string()]
                } else {
                    d.spec().models.clone()
                };
                UpstreamReport {
                    name: d.name().to_string(),
                    models,
                    weight: d.spec().weight,
                    in_flight: flow.in_flight(),
                    waiting: flow.waiting(),
                    limit: flow.limit(),
                    max_inflight: flow.max(),
                    standing: self.standing().report(i, now),
                }
            })
            .collect()
    }

    /// Sets the per-deployment gauges of `metrics` (at scrape time).
    pub fn export(&self, metrics: &Metrics, now: i64) {
        for r in self.report(now) {
            let label = Metrics::upstream(&r.name);
            let set = |family: &prometheus_client::metrics::family::Family<
                _,
                prometheus_client::metrics::gauge::Gauge,
            >,
                       v: i64| {
                family.get_or_create(&label).set(v);
            };
            set(&metrics.upstream_in_flight, r.in_flight as i64);
            set(&metrics.upstream_limit, r.limit as i64);
            set(
                &metrics.upstream_cooling,
                r.standing.unavailable.len() as i64,
            );
            let breaker = match r.standing.breaker {
                "open" => 1,
                "half_open" => 2,
                _ => 0,
            };
            set(&metrics.upstream_breaker, breaker);
        }
    }
}
