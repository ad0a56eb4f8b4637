//! Which deployment may serve which model now: the memory of what each deployment
//! answered lately.
//!
//! - **Cooling down** (one model): a 429 said when to come back (`Retry-After`, or an
//!   exhausted `x-ratelimit-*` budget). The deployment keeps serving its other models.
//! - **Out** of rotation: a spent account (`insufficient_quota`, every model, for
//!   `routing.quota_cooldown_secs`), or a confirmed refusal (that model, for
//!   `routing.auth_cooldown_secs`): `routing.auth_failures` 401, 403 or 404 answers in a row
//!   for the model, with no other answer between, as this replica saw them. One refusal
//!   alone may be a glitch (a key being rotated, a provider's bad second), and taking the
//!   model out dead-letters its whole backlog without a call.
//! - **Circuit breaker** (the whole deployment): `routing.breaker_failures` consecutive
//!   connection errors, timeouts or 5xx open it for `routing.breaker_cooldown_secs`; then
//!   one call probes it (half-open), which closes it on success or opens it again.
//!
//! Times are Unix milliseconds, passed in, so every rule is a plain function of its inputs.
//! With `limits.redis_url` every change is also written to Redis and every replica reads
//! the others' each second ([`Standing::sync`]), so a deployment one replica found spent
//! or down is left alone by the whole fleet; without it each replica keeps its own.
//!
//! Model names come from requests, and a deployment that serves any model answers a name it
//! does not know with a 404, which holds it out of that model: one entry per name a tenant
//! makes up. So a deployment is held out of at most [`MAX_MODELS_OUT`] models per reason,
//! here and in Redis; a new one takes the place of the one whose time ends soonest. A model
//! pushed out that way is called again, and answered as before.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tracing::{debug, warn};

use super::{
    fleet::{self, Field},
    out::{MAX_MODELS_OUT, Scope, Why},
    refusals::Refusals,
};
use crate::{config::RoutingConfig, store::redis_conn::LazyConnection};

/// Whether a deployment may take a call for a model now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Yes.
    Free,
    /// Yes, as the one probe of its half-open breaker (report its outcome).
    Probe,
    /// Not until `until_ms`, for `why`.
    Unavailable {
        /// Why.
        why: Why,
        /// Unix ms when it may be tried again.
        until_ms: i64,
    },
}

/// How long other calls wait before looking again while a probe is out: the probe usually
/// answers within a call's time, so they look often rather than wait out the timeout.
const PROBE_WAIT_MS: i64 = 1_000;

/// The state of every deployment, by index.
pub struct Standing {
    inner: Mutex<Inner>,
    names: Vec<String>,
    rules: RoutingConfig,
    shared: Option<fleet::Shared>,
}

#[derive(Default)]
struct Inner {
    /// (deployment, why) -> what it is held out of, until when.
    out: HashMap<(usize, Why), Out>,
    breakers: Vec<Breaker>,
    /// Refusals in a row not confirmed yet.
    refusals: Refusals,
}

/// What one deployment is held out of for one reason, and until when (Unix ms): every
/// model, or some, at most [`MAX_MODELS_OUT`]. Looked up by name, never scanned, on the
/// routing path.
#[derive(Debug, Default)]
struct Out {
    all: Option<i64>,
    models: HashMap<String, i64>,
}

impl Out {
    /// Until when it holds `model` out (for every model, or for this one), if it does at
    /// `now`.
    fn until(&self, model: &str, now: i64) -> Option<i64> {
        let until = self.all.max(self.models.get(model).copied())?;
        (until > now).then_some(until)
    }

    /// Holds `scope` out until `until`, unless it is held longer already. A model beyond
    /// [`MAX_MODELS_OUT`] takes the place of the one ending soonest (expired ones go
    /// first), or is left out when every one ends later. Answers whether it was recorded.
    fn record(&mut self, scope: Scope, until: i64, now: i64) -> bool {
        let model = match scope {
            Scope::All => {
                let newer = self.all.is_none_or(|u| u < until);
                if newer {
                    self.all = Some(until);
                }
                return newer;
            }
            Scope::Model(model) => model,
        };
        if let Some(known) = self.models.get_mut(&model) {
            let newer = *known < until;
            if newer {
                *known = until;
            }
            return newer;
        }
        if self.models.len() >= MAX_MODELS_OUT {
            self.models.retain(|_, u| *u > now);
        }
        if self.models.len() >= MAX_MODELS_OUT {
            let soonest = self.models.iter().min_by_key(|(_, u)| **u);
            match soonest.map(|(m, u)| (m.clone(), *u)) {
                Some((m, u)) if u < until => {
                    self.models.remove(&m);
                }
                _ => return false,
            }
        }
        self.models.insert(model, until);
        true
    }

    /// Its entries in force at `now`, as `(model, until)`, `*` for every model.
    fn entries(&self, now: i64) -> impl Iterator<Item = (&str, i64)> {
        let all = self.all.map(|u| ("*", u));
        let models = self.models.iter().map(|(m, u)| (m.as_str(), *u));
        all.into_iter().chain(models).filter(move |(_, u)| *u > now)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Breaker {
    /// Consecutive failures seen by this replica.
    failures: u32,
    /// Open until then; half-open after.
    open_until: Option<i64>,
    /// A probe is out since then (half-open): others wait for it.
    probing_since: Option<i64>,
}

/// One deployment's state, for `/upstreams` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// `closed`, `open` or `half_open`.
    pub breaker: &'static str,
    /// Consecutive failures seen by this replica.
    pub failures: u32,
    /// Models not served now: model (`*` for all) -> why and for how many more ms.
    pub unavailable: Vec<Unavailable>,
}

/// One model a deployment does not serve now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unavailable {
    /// The routing model, or `*`.
    pub model: String,
    /// `cooling`, `quota` or `refused`.
    pub why: &'static str,
    /// Milliseconds left.
    pub for_ms: i64,
}

impl Standing {
    /// The state of the deployments named `names` (by index), with the routing rules;
    /// shared through `shared` (a Redis connection and a key prefix) when given.
    pub fn new(
        names: Vec<String>,
        rules: RoutingConfig,
        shared: Option<(Arc<LazyConnection>, String)>,
    ) -> Self {
        let inner = Inner {
            out: HashMap::new(),
            breakers: vec![Breaker::default(); names.len()],
            refusals: Refusals::default(),
        };
        Self {
            inner: Mutex::new(inner),
            names,
            rules,
            shared: shared.map(|(conn, prefix)| fleet::Shared::new(conn, prefix)),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Plain maps and counters: keep going after a panic elsewhere.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether deployment `d` may take a call for `model` at `now`. Taking a [`Probe`]
    /// marks the probe out: report its outcome with [`Self::succeeded`] or
    /// [`Self::failed`] (or [`Self::probe_abandoned`]).
    ///
    /// [`Probe`]: Availability::Probe
    pub fn check(&self, d: usize, model: &str, now: i64) -> Availability {
        let probe_timeout = self.probe_timeout_ms();
        let mut inner = self.inner();
        if let Some((until_ms, why)) = unavailable(&inner, d, model, now, probe_timeout) {
            return Availability::Unavailable { why, until_ms };
        }
        match inner.breakers.get_mut(d) {
            Some(b) if b.open_until.is_some() => {
                b.probing_since = Some(now);
                Availability::Probe
            }
            _ => Availability::Free,
        }
    }

    /// Until when and why `d` may not take a call for `model` at `now`; `None` when it may
    /// (a half-open breaker whose probe is not out yet included). Takes nothing.
    pub fn availability(&self, d: usize, model: &str, now: i64) -> Option<(i64, Why)> {
        unavailable(&self.inner(), d, model, now, self.probe_timeout_ms())
    }

    /// How long a half-open breaker waits for its probe to report before another call
    /// probes: `routing.breaker_cooldown_secs`, as long as a failed probe would keep it out.
    fn probe_timeout_ms(&self) -> i64 {
        secs_ms(self.rules.breaker_cooldown_secs)
    }

    /// Whether `d` may take a call for `model` at `now`.
    pub fn peek(&self, d: usize, model: &str, now: i64) -> bool {
        self.availability(d, model, now).is_none()
    }

    /// The probe taken from `d` was not made after all (shutdown, or no slot in time):
    /// another call may probe.
    pub fn probe_abandoned(&self, d: usize) {
        if let Some(b) = self.inner().breakers.get_mut(d) {
            b.probing_since = None;
        }
    }

    /// A call to `d` got an answer that says the deployment is up (anything but a
    /// connection error, a timeout or a 5xx): its breaker closes and its failures are
    /// forgotten.
    pub fn succeeded(&self, d: usize, now: i64) {
        self.up(d, None, now);
    }

    /// A call to `d` for `model` got an answer that is neither a refusal nor a failure that
    /// may mean it is down: as [`Self::succeeded`], and the refusals of `model` in a row
    /// are over.
    pub fn answered(&self, d: usize, model: &str, now: i64) {
        self.up(d, Some(model), now);
    }

    fn up(&self, d: usize, answered: Option<&str>, now: i64) {
        let reopened = {
            let mut inner = self.inner();
            if let Some(model) = answered {
                inner.refusals.clear(d, model);
            }
            let Some(b) = inner.breakers.get_mut(d) else {
                return;
            };
            let was_open = b.open_until.is_some();
            *b = Breaker::default();
            was_open
        };
        if reopened {
            debug!(upstream = %self.name(d), "circuit breaker closed: the probe call got an answer");
            // Removed in Redis only if no replica opened it again since.
            self.write(d, Field::Breaker, -now, now);
        }
    }

    /// A call to `d` failed in a way that may mean it is down (a connection error, a
    /// timeout, a 5xx): counts toward its breaker, and opens it at the threshold or when a
    /// probe fails. Answers whether it opened now.
    pub fn failed(&self, d: usize, now: i64) -> bool {
        let cooldown = secs_ms(self.rules.breaker_cooldown_secs);
        let until = {
            let mut inner = self.inner();
            let Some(b) = inner.breakers.get_mut(d) else {
                return false;
            };
            b.failures = b.failures.saturating_add(1);
            let probe_failed = b.open_until.is_some_and(|u| u <= now);
            if !(probe_failed || b.failures >= self.rules.breaker_failures) {
                return false;
            }
            b.open_until = Some(now + cooldown);
            b.probing_since = None;
            now + cooldown
        };
        warn!(
            upstream = %self.name(d),
            cooldown_secs = self.rules.breaker_cooldown_secs,
            "circuit breaker open: the deployment keeps failing; others serve meanwhile"
        );
        self.write(d, Field::Breaker, until, now);
        true
    }

    /// Takes `d` out of `scope` for `why` until `until_ms` (within [`MAX_MODELS_OUT`]).
    fn take_out(&self, d: usize, scope: Scope, why: Why, until_ms: i64, now: i64) {
        let newer = {
            let mut inner = self.inner();
            let out = inner.out.entry((d, why)).or_default();
            out.record(scope.clone(), until_ms, now)
        };
        if newer {
            self.write(d, Field::Out(why, scope), until_ms, now);
        }
    }

    /// A deployment answered a 429 for `model` that said when to come back.
    pub fn cool(&self, d: usize, model: &str, until_ms: i64, now: i64) {
        let scope = Scope::Model(model.to_string());
        self.take_out(d, scope, Why::RateLimited, until_ms, now);
    }

    /// A deployment's account is spent.
    pub fn spent(&self, d: usize, now: i64) {
        let until = now + secs_ms(self.rules.quota_cooldown_secs);
        warn!(upstream = %self.name(d), cooldown_secs = self.rules.quota_cooldown_secs, "insufficient quota: the deployment is out of rotation");
        self.take_out(d, Scope::All, Why::Quota, until, now);
    }

    /// A deployment refused `model` (401, 403, 404). Answers whether that confirms it
    /// (`routing.auth_failures` in a row): then the deployment is out for the model for
    /// `routing.auth_cooldown_secs`; until then it is not.
    pub fn refused(&self, d: usize, model: &str, now: i64) -> bool {
        let (cooldown, needed) = (
            secs_ms(self.rules.auth_cooldown_secs),
            self.rules.auth_failures,
        );
        if !self
            .inner()
            .refusals
            .confirms(d, model, now, cooldown, needed)
        {
            debug!(upstream = %self.name(d), %model, "the deployment refused the key or the model; not confirmed yet");
            return false;
        }
        warn!(upstream = %self.name(d), %model, refusals = needed, cooldown_secs = self.rules.auth_cooldown_secs, "the deployment refused the key or the model again and again: out of rotation for it");
        let scope = Scope::Model(model.to_string());
        self.take_out(d, scope, Why::Refused, now + cooldown, now);
        true
    }

    /// Deployment `d`'s state at `now`.
    pub fn report(&self, d: usize, now: i64) -> Report {
        let inner = self.inner();
        let b = inner.breakers.get(d).copied().unwrap_or_default();
        let breaker = match b.open_until {
            None => "closed",
            Some(u) if u > now => "open",
            Some(_) => "half_open",
        };
        let mut unavailable: Vec<Unavailable> = inner
            .out
            .iter()
            .filter(|((dep, _), _)| *dep == d)
            .flat_map(|((_, why), out)| {
                out.entries(now).map(|(model, until)| Unavailable {
                    model: model.to_string(),
                    why: why.as_str(),
                    for_ms: until - now,
                })
            })
            .collect();
        unavailable.sort_by(|a, b| a.model.cmp(&b.model));
        Report {
            breaker,
            failures: b.failures,
            unavailable,
        }
    }

    fn name(&self, d: usize) -> &str {
        self.names.get(d).map_or("?", String::as_str)
    }

    /// Writes a change made at `now` to Redis ([`fleet::Shared::write`]).
    fn write(&self, d: usize, field: Field, until_ms: i64, now: i64) {
        if let (Some(shared), Some(name)) = (&self.shared, self.names.get(d)) {
            shared.write(name, field, until_ms, now);
        }
    }

    /// Reads the fleet's state from Redis into this replica's, once. Entries only ever
    /// extend what is known here: a breaker another replica opened is open here too, until
    /// it half-opens here.
    pub async fn sync(&self, now: i64) {
        let Some(shared) = &self.shared else {
            return;
        };
        let Some(fleet) = shared.read(&self.names, now).await else {
            return;
        };
        let mut inner = self.inner();
        for (d, fields) in fleet.into_iter().enumerate() {
            for (field, until) in fields {
                match field {
                    Field::Breaker => {
                        if let Some(b) = inner.breakers.get_mut(d)
                            && b.open_until.is_none_or(|u| u < until)
                        {
                            b.open_until = Some(until);
                            b.probing_since = None;
                        }
                    }
                    Field::Out(why, scope) => {
                        inner
                            .out
                            .entry((d, why))
                            .or_default()
                            .record(scope, until, now);
                    }
                }
            }
        }
    }

    /// Runs [`Self::sync`] every second until `stop`; returns at once when not shared.
    pub async fn keep_in_sync(
        self: Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
        now: impl Fn() -> i64,
    ) {
        if self.shared.is_none() {
            return;
        }
        loop {
            self.sync(now()).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Until when and why `d` may not serve `model` at `now`: the longest-lasting reason for
/// the model or for every model, then its breaker (open, or half-open with its probe out
/// for less than `probe_timeout`).
fn unavailable(
    inner: &Inner,
    d: usize,
    model: &str,
    now: i64,
    probe_timeout: i64,
) -> Option<(i64, Why)> {
    let worst = Why::ALL
        .into_iter()
        .filter_map(|why| Some((inner.out.get(&(d, why))?.until(model, now)?, why)))
        .max_by_key(|(_, why)| rank(*why));
    if worst.is_some() {
        return worst;
    }
    let b = inner.breakers.get(d)?;
    match (b.open_until, b.probing_since) {
        (Some(until), _) if until > now => Some((until, Why::Down)),
        (Some(_), Some(since)) if now - since < probe_timeout => {
            Some(((now + PROBE_WAIT_MS).min(since + probe_timeout), Why::Down))
        }
        _ => None,
    }
}

/// The order in which reasons win when several hold: the longest-lasting kind first.
fn rank(why: Why) -> u8 {
    match why {
        Why::Refused => 3,
        Why::Quota => 2,
        Why::Down => 1,
        Why::RateLimited => 0,
    }
}

/// `secs` seconds in milliseconds, saturating.
pub(crate) fn secs_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX / 2)
}

#[cfg(test)]
mod tests {
    use redis::AsyncCommands;

    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn standing() -> Standing {
        Standing::new(
            vec!["a".into(), "b".into()],
            RoutingConfig {
                breaker_failures: 3,
                breaker_cooldown_secs: 30,
                quota_cooldown_secs: 300,
                auth_cooldown_secs: 60,
                auth_failures: 2,
                ..RoutingConfig::default()
            },
            None,
        )
    }

    #[test]
    fn a_cooldown_holds_one_model_of_one_deployment() {
        let s = standing();
        s.cool(0, "m", NOW + 1000, NOW);
        assert_eq!(
            s.check(0, "m", NOW),
            Availability::Unavailable {
                why: Why::RateLimited,
                until_ms: NOW + 1000
            }
        );
        assert_eq!(s.check(0, "other", NOW), Availability::Free, "other models");
        assert_eq!(
            s.check(1, "m", NOW),
            Availability::Free,
            "other deployments"
        );
        assert_eq!(s.check(0, "m", NOW + 1000), Availability::Free, "over");
        s.cool(0, "m", NOW + 500, NOW);
        assert_eq!(
            s.check(0, "m", NOW),
            Availability::Unavailable {
                why: Why::RateLimited,
                until_ms: NOW + 1000
            },
            "a shorter cooldown does not cut a longer one"
        );
    }

    #[test]
    fn a_spent_account_takes_every_model_out_and_a_refusal_one() {
        let s = standing();
        s.spent(0, NOW);
        for model in ["m", "n"] {
            assert_eq!(
                s.check(0, model, NOW + 299_999),
                Availability::Unavailable {
                    why: Why::Quota,
                    until_ms: NOW + 300_000
                }
            );
        }
        assert_eq!(s.check(0, "m", NOW + 300_000), Availability::Free);
        assert!(!s.refused(1, "m", NOW));
        assert!(s.refused(1, "m", NOW), "the second in a row confirms it");
        assert!(matches!(
            s.check(1, "m", NOW),
            Availability::Unavailable {
                why: Why::Refused,
                ..
            }
        ));
        assert_eq!(s.check(1, "n", NOW), Availability::Free);
        // A request may name "*": that is one model, never every model.
        s.refused(1, "*", NOW);
        s.refused(1, "*", NOW);
        assert_eq!(s.check(1, "other", NOW), Availability::Free);
        assert!(!s.peek(1, "*", NOW));
    }

    #[test]
    fn the_breaker_opens_probes_once_and_closes_or_reopens() {
        let s = standing();
        assert!(!s.failed(0, NOW));
        assert!(!s.failed(0, NOW));
        s.succeeded(0, NOW);
        assert!(!s.failed(0, NOW), "a success resets the count");
        assert!(!s.failed(0, NOW));
        assert!(s.failed(0, NOW), "the third in a row opens it");
        assert_eq!(
            s.check(0, "m", NOW + 29_999),
            Availability::Unavailable {
                why: Why::Down,
                until_ms: NOW + 30_000
            }
        );
        assert_eq!(s.check(1, "m", NOW), Availability::Free);
        assert_eq!(s.report(0, NOW).breaker, "open");
        let later = NOW + 30_000;
        assert_eq!(s.report(0, later).breaker, "half_open");
        assert_eq!(s.check(0, "m", later), Availability::Probe, "one probe");
        assert!(
            matches!(
                s.check(0, "m", later),
                Availability::Unavailable { why: Why::Down, .. }
            ),
            "the others wait for it"
        );
        assert!(s.failed(0, later + 10), "a failed probe reopens it");
        assert_eq!(
            s.check(0, "m", later + 20),
            Availability::Unavailable {
                why: Why::Down,
                until_ms: later + 10 + 30_000
            }
        );
        let again = later + 10 + 30_000;
        assert_eq!(s.check(0, "m", again), Availability::Probe);
        s.succeeded(0, NOW);
        assert_eq!(s.check(0, "m", again), Availability::Free, "closed");
        assert_eq!(s.report(0, again).breaker, "closed");
    }

    #[test]
    fn a_lost_probe_is_replaced_after_the_breaker_cooldown() {
        let s = standing();
        for _ in 0..3 {
            s.failed(0, NOW);
        }
        let half_open = NOW + 30_000;
        assert_eq!(s.check(0, "m", half_open), Availability::Probe);
        assert!(matches!(
            s.check(0, "m", half_open + 29_999),
            Availability::Unavailable { why: Why::Down, .. }
        ));
        assert_eq!(
            s.check(0, "m", half_open + 30_000),
            Availability::Probe,
            "a probe that never reported blocks the deployment for breaker_cooldown_secs (30 s), \
             not 120 s"
        );
        s.probe_abandoned(0);
        assert_eq!(
            s.check(0, "m", half_open + 30_001),
            Availability::Probe,
            "one given up lets the next call probe at once"
        );
    }

    /// A flood of made-up model names, each refused by a deployment that serves any model:
    /// it is held out of the latest [`MAX_MODELS_OUT`] only, a cooldown of a real model and
    /// a spent account stand, and `/upstreams` stays as short.
    #[test]
    fn a_flood_of_model_names_holds_at_most_max_models_out_per_reason() {
        let s = standing();
        s.cool(0, "real", NOW + 3_600_000, NOW);
        for i in 0..10_000 {
            // Confirmed: `routing.auth_failures` (2 here) in a row.
            for _ in 0..2 {
                s.refused(0, &format!("made-up-{i}"), NOW + i);
            }
        }
        let now = NOW + 10_000;
        {
            let inner = s.inner();
            let refused = &inner.out[&(0, Why::Refused)].models;
            assert_eq!(refused.len(), MAX_MODELS_OUT);
            let oldest = 10_000 - MAX_MODELS_OUT as i64;
            assert!(
                (oldest..10_000).all(|i| refused.contains_key(&format!("made-up-{i}"))),
                "the latest are held"
            );
        }
        assert!(!s.peek(0, "made-up-9999", now), "the latest is held out");
        assert!(s.peek(0, "made-up-0", now), "the first was pushed out");
        assert!(!s.peek(0, "real", now), "another reason's entries stand");
        assert!(s.peek(1, "made-up-9999", now), "other deployments");
        assert_eq!(s.report(0, now).unavailable.len(), MAX_MODELS_OUT + 1);
        // A refusal that ends sooner than every one held is left out.
        s.refused(0, "early", NOW - 1_000_000);
        s.refused(0, "early", NOW - 1_000_000);
        assert!(s.peek(0, "early", NOW - 1_000_000 + 1));
        s.spent(0, now);
        assert!(
            !s.peek(0, "anything", now),
            "every model, whatever the bound"
        );
    }

    /// A test's own key prefix in the Redis at `REDIS_URL`, and a client to look at it.
    fn shared() -> (Arc<LazyConnection>, String, redis::Client) {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = redis::Client::open(url).expect("URL");
        let prefix = format!(
            "llmq-test-standing-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let conn = Arc::new(LazyConnection::new(client.clone(), Duration::from_secs(2)));
        (conn, prefix, client)
    }

    /// The same flood in Redis: each replica writes what it refused, and the deployment's
    /// hash, which every replica reads each second, ends with the latest
    /// [`MAX_MODELS_OUT`] refusals and nothing more, whatever order the writes land in.
    #[tokio::test]
    async fn a_flood_of_model_names_holds_the_shared_hash_at_max_models_out() {
        let (conn, prefix, client) = shared();
        // Each refusal confirmed at once.
        let rules = RoutingConfig {
            auth_failures: 1,
            ..RoutingConfig::default()
        };
        let names = vec!["a".to_string()];
        let s = Standing::new(
            names.clone(),
            rules.clone(),
            Some((conn.clone(), prefix.clone())),
        );
        const FLOOD: i64 = 200;
        for i in 0..FLOOD {
            s.refused(0, &format!("made-up-{i}"), NOW + i);
        }
        let key = crate::store::keys::upstream(&prefix, "a");
        let mut redis = client
            .get_multiplexed_async_connection()
            .await
            .expect("the Redis at REDIS_URL answers");
        let latest: std::collections::BTreeSet<String> = (FLOOD - MAX_MODELS_OUT as i64..FLOOD)
            .map(|i| format!("refused:made-up-{i}"))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let fields = loop {
            let fields: std::collections::BTreeSet<String> =
                redis.hkeys(&key).await.expect("HKEYS");
            if fields == latest || tokio::time::Instant::now() > deadline {
                break fields;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // A replica reading the hash holds as many; so it does of a hash that an older
        // version filled beyond the bound.
        let other = Standing::new(names, rules, Some((conn, prefix)));
        other.sync(NOW + FLOOD).await;
        let read = other.inner().out[&(0, Why::Refused)].models.len();
        for i in 0..100 {
            let _: () = redis
                .hset(&key, format!("refused:older-{i}"), NOW + 600_000 + i)
                .await
                .expect("HSET");
        }
        other.sync(NOW + FLOOD).await;
        let read_older = other.inner().out[&(0, Why::Refused)].models.len();
        let _: () = redis.del(&key).await.expect("DEL");
        assert_eq!(fields.len(), MAX_MODELS_OUT, "the hash is bounded");
        assert_eq!(fields, latest, "the latest refusals");
        assert_eq!(read, MAX_MODELS_OUT);
        assert_eq!(read_older, MAX_MODELS_OUT);
    }
}
