//! What holds a deployment out of a model: why ([`Why`]), of what (`Scope`), and at most
//! how many models for one reason ([`MAX_MODELS_OUT`]). Both [`super::standing`] (each
//! replica's memory of it) and `fleet` (that memory shared through Redis) speak in these.

/// Why a deployment is not serving a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Why {
    /// Cooling down after a 429 that said when to come back.
    RateLimited,
    /// Its account is spent.
    Quota,
    /// It refused the key or the model (401, 403, 404).
    Refused,
    /// Its circuit breaker is open.
    Down,
}

impl Why {
    /// The field prefix in Redis and the word in `/upstreams`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Why::RateLimited => "cooling",
            Why::Quota => "quota",
            Why::Refused => "refused",
            Why::Down => "down",
        }
    }

    /// Every reason.
    pub(super) const ALL: [Why; 4] = [Why::RateLimited, Why::Quota, Why::Refused, Why::Down];

    pub(super) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// Whether the deployment comes back for this request within the wait of a rate limit:
    /// a cooldown or a breaker; a spent account or a refusal is not waited for.
    pub fn is_temporary(self) -> bool {
        matches!(self, Why::RateLimited | Why::Down)
    }
}

/// What an entry holds a deployment out of: every model, or one. Typed, so that no model
/// name (a request may name `*`) can stand for every model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Scope {
    /// Every model (a spent account).
    All,
    /// One routing model.
    Model(String),
}

/// Most models one deployment is held out of for one reason at a time, in each replica and
/// in its hash in Redis: model names come from requests, so without a bound every name a
/// tenant makes up would be kept for the cooldown, read by every replica each second.
pub const MAX_MODELS_OUT: usize = 64;
