//! What one request's routing remembers between its attempts, and what became of a routed
//! call.

use crate::{config::RoutingConfig, upstream::failure::Failure};

/// What one request's routing remembers from one attempt to the next.
#[derive(Debug, Clone)]
pub struct Route {
    /// The model the request asked for (or the default).
    pub requested: String,
    /// The models to try, in order: the requested one and its fallbacks, or after a
    /// context-length error, that model's context-window fallbacks.
    pub(super) models: Vec<String>,
    /// The deployments this request's attempts failed on (a transient failure or a 429),
    /// avoided while another can serve; when none is left, the backoff applies.
    pub(super) failed: Vec<usize>,
    /// Models that answered this request with a context-length error: never tried again.
    pub(super) too_small: Vec<String>,
    /// Whether a context-length error moves to `routing.context_window_fallbacks` (not for
    /// a batch of several inputs, which is split instead, so one long input moves alone).
    pub(super) context_fallbacks: bool,
    /// Unix ms since when none of the requested model's deployments could serve, for
    /// `routing.fallback_after_secs` (carried across deliveries by the rate-limit and
    /// unavailable headers).
    pub unavailable_since: Option<i64>,
}

impl Route {
    /// The models it may try: the requested one and its fallbacks (after a context-length
    /// error, that model's context-window fallbacks).
    pub fn models(&self) -> &[String] {
        &self.models
    }

    /// A fresh route for `model`, with its fallbacks from `rules`.
    pub fn new(model: &str, rules: &RoutingConfig) -> Self {
        let mut models = vec![model.to_string()];
        if let Some(fallbacks) = rules.fallbacks.get(model) {
            models.extend(fallbacks.iter().filter(|m| *m != model).cloned());
        }
        Self {
            requested: model.to_string(),
            models,
            failed: Vec::new(),
            too_small: Vec::new(),
            context_fallbacks: true,
            unavailable_since: None,
        }
    }

    /// The same route without context-window fallbacks.
    pub fn without_context_fallbacks(self) -> Self {
        Self {
            context_fallbacks: false,
            ..self
        }
    }

    pub(super) fn failed_on(&mut self, d: usize) {
        if !self.failed.contains(&d) {
            self.failed.push(d);
        }
    }
}

/// An answer, and who gave it.
#[derive(Debug, Clone)]
pub struct Served<T> {
    /// The answer.
    pub answer: T,
    /// The deployment's name.
    pub upstream: String,
    /// The routing model that answered.
    pub model: String,
    /// The requested model, when a fallback answered.
    pub fallback_from: Option<String>,
}

/// What became of a routed call.
#[derive(Debug, Clone)]
pub enum Routed<T> {
    /// Answered.
    Served(Served<T>),
    /// A 429, or every deployment that could serve is unavailable and one of them is
    /// cooling down after a 429: flow control, not an attempt. Its `retry_after`: how long
    /// until one can serve (`None`: now, elsewhere).
    RateLimited(Failure),
    /// Every deployment that could serve is down (circuit breakers open), none cooling
    /// down after a 429: an outage, waited out without using an attempt. Its
    /// `retry_after`: how long until one may be tried again.
    Unavailable(Failure),
    /// The call failed.
    Failed {
        /// How, classified where it happened.
        failure: Failure,
        /// Another deployment can take the next attempt now.
        elsewhere: bool,
    },
    /// No deployment will serve this request: an unknown model (`invalid_request`), or
    /// every one spent (`quota_exhausted`) or refusing (`upstream_permanent`).
    Unroutable(Failure),
    /// No slot came before the hand-off time.
    Deferred,
    /// Shutdown came first; nothing was called.
    Stopped,
}

impl<T> Routed<T> {
    /// The same outcome with the answer mapped.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Routed<U> {
        match self {
            Routed::Served(s) => Routed::Served(Served {
                answer: f(s.answer),
                upstream: s.upstream,
                model: s.model,
                fallback_from: s.fallback_from,
            }),
            Routed::RateLimited(failure) => Routed::RateLimited(failure),
            Routed::Unavailable(failure) => Routed::Unavailable(failure),
            Routed::Failed { failure, elsewhere } => Routed::Failed { failure, elsewhere },
            Routed::Unroutable(failure) => Routed::Unroutable(failure),
            Routed::Deferred => Routed::Deferred,
            Routed::Stopped => Routed::Stopped,
        }
    }
}
