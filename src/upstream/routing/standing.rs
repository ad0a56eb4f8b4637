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

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use redis::AsyncCommands;
use tracing::{debug, warn};

use super::refusals::Refusals;
use crate::{config::RoutingConfig, store::redis_conn::LazyConnection};

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

    fn parse(s: &str) -> Option<Self> {
        [Why::RateLimited, Why::Quota, Why::Refused, Why::Down]
            .into_iter()
            .find(|w| w.as_str() == s)
    }

    /// Whether the deployment comes back for this request within the wait of a rate limit:
    /// a cooldown or a breaker; a spent account or a refusal is not waited for.
    pub fn is_temporary(self) -> bool {
        matches!(self, Why::RateLimited | Why::Down)
    }
}

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

/// What an entry holds a deployment out of: every model, or one. Typed, so that no model
/// name (a request may name `*`) can stand for every model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    /// Every model (a spent account).
    All,
    /// One routing model.
    Model(String),
}

impl Scope {
    /// How `/upstreams` shows it.
    fn label(&self) -> &str {
        match self {
            Scope::All => "*",
            Scope::Model(m) => m,
        }
    }
}

/// How long other calls wait before looking again while a probe is out: the probe usually
/// answers within a call's time, so they look often rather than wait out the timeout.
const PROBE_WAIT_MS: i64 = 1_000;

/// The state of every deployment, by index.
pub struct Standing {
    inner: Mutex<Inner>,
    names: Vec<String>,
    rules: RoutingConfig,
    shared: Option<Shared>,
}

#[derive(Default)]
struct Inner {
    /// (deployment, scope, why) -> until when. Expired entries are dropped as new ones come.
    out: HashMap<(usize, Scope, Why), i64>,
    breakers: Vec<Breaker>,
    /// Refusals in a row not confirmed yet.
    refusals: Refusals,
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
            shared: shared.map(|(conn, prefix)| Shared { conn, prefix }),
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
            self.write(d, Field::Breaker, -now);
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
        self.write(d, Field::Breaker, until);
        true
    }

    /// Takes `d` out of `scope` for `why` until `until_ms`.
    fn take_out(&self, d: usize, scope: Scope, why: Why, until_ms: i64, now: i64) {
        let newer = {
            let mut inner = self.inner();
            // Model names come from requests: without this the map would only grow.
            inner.out.retain(|_, until| *until > now);
            let until = inner.out.entry((d, scope.clone(), why)).or_insert(0);
            let newer = *until < until_ms;
            if newer {
                *until = until_ms;
            }
            newer
        };
        if newer {
            self.write(d, Field::Out(why, scope), until_ms);
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
            .filter(|((dep, _, _), until)| *dep == d && **until > now)
            .map(|((_, scope, why), until)| Unavailable {
                model: scope.label().to_string(),
                why: why.as_str(),
                for_ms: until - now,
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

    /// Writes a change to Redis, in a task of its own: the call path never waits on it. A
    /// time of `-now` removes the field if it holds no time later than `now`.
    fn write(&self, d: usize, field: Field, until_ms: i64) {
        let Some(shared) = &self.shared else {
            return;
        };
        let (Ok(runtime), Some(name)) = (tokio::runtime::Handle::try_current(), self.names.get(d))
        else {
            return;
        };
        let key = shared.key(name);
        let conn = shared.conn.clone();
        runtime.spawn(async move {
            let Ok(mut conn) = conn.get().await else {
                return;
            };
            let field = field.to_string();
            let written: redis::RedisResult<()> = if until_ms <= 0 {
                redis::Script::new(DELETE_IF_PAST)
                    .key(&key)
                    .arg(&field)
                    .arg(-until_ms)
                    .invoke_async(&mut conn)
                    .await
            } else {
                redis::pipe()
                    .hset(&key, &field, until_ms)
                    .ignore()
                    .pexpire(&key, SHARED_TTL_MS)
                    .ignore()
                    .query_async(&mut conn)
                    .await
            };
            if let Err(e) = written {
                debug!(error = %e, "could not share an upstream's state through Redis");
            }
        });
    }

    /// Reads the fleet's state from Redis into this replica's, once. Entries only ever
    /// extend what is known here: a breaker another replica opened is open here too, until
    /// it half-opens here.
    pub async fn sync(&self, now: i64) {
        let Some(shared) = &self.shared else {
            return;
        };
        let Ok(mut conn) = shared.conn.get().await else {
            return;
        };
        for (d, name) in self.names.iter().enumerate() {
            let fields: redis::RedisResult<HashMap<String, i64>> =
                conn.hgetall(shared.key(name)).await;
            let fields = match fields {
                Ok(fields) => fields,
                Err(e) => {
                    debug!(error = %e, "could not read the fleet's upstream state from Redis");
                    return;
                }
            };
            let expired: Vec<&String> = fields
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(field, _)| field)
                .collect();
            if !expired.is_empty() {
                // Left by replicas long gone; removing a field another replica has just
                // renewed costs nothing worse than a second look at that deployment.
                let removed: redis::RedisResult<()> = conn.hdel(shared.key(name), &expired).await;
                if let Err(e) = removed {
                    debug!(error = %e, "could not prune the fleet's upstream state in Redis");
                }
            }
            let mut inner = self.inner();
            for (field, until) in fields {
                if until <= now {
                    continue;
                }
                match Field::parse(&field) {
                    Some(Field::Breaker) => {
                        if let Some(b) = inner.breakers.get_mut(d)
                            && b.open_until.is_none_or(|u| u < until)
                        {
                            b.open_until = Some(until);
                            b.probing_since = None;
                        }
                    }
                    Some(Field::Out(why, scope)) => {
                        let entry = inner.out.entry((d, scope, why)).or_insert(0);
                        if *entry < until {
                            *entry = until;
                        }
                    }
                    None => {}
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
    let mut worst: Option<(i64, Why)> = None;
    let model = Scope::Model(model.to_string());
    for ((dep, scope, why), &until) in &inner.out {
        if *dep == d
            && (*scope == Scope::All || *scope == model)
            && until > now
            && worst.is_none_or(|(u, w)| rank(*why) > rank(w) || (*why == w && until > u))
        {
            worst = Some((until, *why));
        }
    }
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

/// Removes `ARGV[1]` from the hash `KEYS[1]` unless it holds a time later than `ARGV[2]`:
/// closing a breaker must not erase an opening another replica wrote since.
const DELETE_IF_PAST: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
if v <= tonumber(ARGV[2]) then redis.call('HDEL', KEYS[1], ARGV[1]) end
return 0
";

/// Longest a shared entry lives in Redis without being written again (a day: the longest
/// cooldown validation allows).
const SHARED_TTL_MS: i64 = 86_400_000;

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

/// Redis, shared by the fleet.
struct Shared {
    conn: Arc<LazyConnection>,
    prefix: String,
}

impl Shared {
    /// The hash of one deployment: `<limits.key_prefix>:upstream:<name>`.
    fn key(&self, name: &str) -> String {
        crate::store::keys::upstream(&self.prefix, name)
    }
}

/// A field of a deployment's hash in Redis; its value is a Unix ms time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    /// `breaker`: open until then.
    Breaker,
    /// `<why>` (every model) or `<why>:<model>`: out until then.
    Out(Why, Scope),
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Breaker => f.write_str("breaker"),
            Field::Out(why, Scope::All) => f.write_str(why.as_str()),
            Field::Out(why, Scope::Model(model)) => write!(f, "{}:{model}", why.as_str()),
        }
    }
}

impl Field {
    fn parse(s: &str) -> Option<Self> {
        if s == "breaker" {
            return Some(Field::Breaker);
        }
        match s.split_once(':') {
            Some((why, model)) => Some(Field::Out(Why::parse(why)?, Scope::Model(model.into()))),
            None => Some(Field::Out(Why::parse(s)?, Scope::All)),
        }
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn fields_round_trip() {
        for f in [
            Field::Breaker,
            Field::Out(Why::RateLimited, Scope::Model("gpt-4o".into())),
            Field::Out(Why::Quota, Scope::All),
            Field::Out(Why::Refused, Scope::Model("*".into())),
            Field::Out(Why::Refused, Scope::Model("a:b".into())),
        ] {
            assert_eq!(Field::parse(&f.to_string()), Some(f));
        }
        assert_eq!(Field::parse("nonsense"), None);
    }
}
