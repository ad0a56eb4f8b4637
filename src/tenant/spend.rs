//! What each tenant spent, used and asked for, per UTC day and month: the ledger its
//! budgets are checked against and `llmq usage` reads.
//!
//! With `limits.redis_url` the ledger is the fleet's, in Redis: a hash per day
//! (`<limits.key_prefix>:usage:YYYY-MM-DD`) and per month (`...:usage:YYYY-MM`), with the
//! fields `usd:<tenant>` (micro-dollars), `tokens:<tenant>` and `requests:<tenant>`. Each
//! replica also keeps its own (bounded by `tenancy.max_tenants`), which decides when Redis
//! cannot be reached, and is the only one without Redis.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::AsyncCommands;
use serde::Serialize;
use tracing::warn;

use crate::{
    config::{Config, TenantLimits, Usd},
    store::{keys, redis_conn::LazyConnection},
};

/// Longest wait for Redis, connecting or answering: a delivery waits on it.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a day's usage is kept in Redis.
const DAY_TTL_SECS: i64 = 40 * 86_400;
/// How long a month's usage is kept in Redis.
const MONTH_TTL_SECS: i64 = 400 * 86_400;

/// The UTC day and month of a moment, as the ledger names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Period {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// `YYYY-MM`.
    pub month: String,
}

impl Period {
    /// The day and month of `unix_secs` (UTC).
    pub fn at(unix_secs: i64) -> Self {
        let date = time::OffsetDateTime::from_unix_timestamp(unix_secs)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
            .date();
        let (year, month) = (date.year(), u8::from(date.month()));
        Self {
            day: format!("{year:04}-{month:02}-{:02}", date.day()),
            month: format!("{year:04}-{month:02}"),
        }
    }
}

/// What a tenant used in one period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Spend in micro-dollars (answers whose model has a price).
    pub usd_micros: u64,
    /// Tokens, as the upstream reported them.
    pub tokens: u64,
    /// Answered requests.
    pub requests: u64,
}

/// One tenant's tallies on this replica.
#[derive(Debug, Default)]
struct Own {
    period: Option<Period>,
    day: Tally,
    month: Tally,
}

impl Own {
    /// The tallies of `period`, the day's or month's started afresh when it changed.
    fn at(&mut self, period: &Period) -> (&mut Tally, &mut Tally) {
        if let Some(old) = &self.period {
            if old.day != period.day {
                self.day = Tally::default();
            }
            if old.month != period.month {
                self.month = Tally::default();
            }
        }
        self.period = Some(period.clone());
        (&mut self.day, &mut self.month)
    }
}

/// Holds a call's most against both budgets in one step, so that no two replicas can
/// both fit in what is left. KEYS: the day's and the month's usage hash. ARGV: the `usd`
/// field, the amount, the day's and the month's budget (0: none), their TTLs. Returns
/// `{0, 0}` when held, else which budget it does not fit (1 day, 2 month) and what is
/// spent and held there.
const RESERVE_SCRIPT: &str = r"
local amount = tonumber(ARGV[2])
for i = 1, 2 do
  local max = tonumber(ARGV[2 + i])
  if max > 0 then
    local spent = tonumber(redis.call('HGET', KEYS[i], ARGV[1]) or '0')
    if spent + amount > max then return {i, spent} end
  end
end
for i = 1, 2 do
  redis.call('HINCRBY', KEYS[i], ARGV[1], amount)
  redis.call('EXPIRE', KEYS[i], ARGV[4 + i])
end
return {0, 0}
";

/// Money a call holds against its tenant's budgets, counted as spent until the call is
/// settled. A replica that dies mid-call leaves it counted: the budget errs on the safe
/// side.
#[derive(Debug)]
pub struct Hold {
    amount: Usd,
    period: Period,
    /// Held in the fleet's ledger too, not only this replica's.
    shared: bool,
}

impl Hold {
    /// What is held.
    pub fn amount(&self) -> Usd {
        self.amount
    }
}

/// What a reservation came to.
#[derive(Debug)]
pub enum Reserve {
    /// The tenant has no budget: nothing to hold.
    NoBudget,
    /// It fits, and is held.
    Held(Hold),
    /// It does not fit: why.
    Over(String),
}

/// What a call cost its tenant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spent {
    /// Its price (zero when its model has none, or it produced nothing).
    pub cost: Usd,
    /// Tokens it used.
    pub tokens: u64,
    /// It made an answer: one more request in the tenant's count.
    pub answered: bool,
}

/// Why a call of `amount` does not fit: the day's (`over` 0) or month's budget, of which
/// `spent` is spent or held.
fn over_why(
    tenant: &str,
    limits: &TenantLimits,
    period: &Period,
    over: usize,
    spent: u64,
    amount: Usd,
) -> String {
    let (max, key, what, when) = match over {
        0 => (
            limits.max_usd_per_day,
            "max_usd_per_day",
            "day",
            &period.day,
        ),
        _ => (
            limits.max_usd_per_month,
            "max_usd_per_month",
            "month",
            &period.month,
        ),
    };
    format!(
        "tenant {tenant:?} has spent or holds {} of its {key} {max} (UTC {what} {when}) and \
         this call may cost up to {amount}; replay once it resets: llmq dlq replay --kind \
         budget_exceeded",
        Usd(spent)
    )
}

/// The ledger.
pub struct Ledger {
    own: moka::sync::Cache<String, Arc<Mutex<Own>>>,
    shared: Option<(Arc<LazyConnection>, String)>,
    /// Some tenant has a budget: this replica's count is needed.
    budgets: bool,
}

impl Ledger {
    /// This replica's ledger, and the fleet's with `limits.redis_url`.
    pub fn new(config: &Config) -> Self {
        let limits = &config.limits;
        let shared = (!limits.redis_url.expose().is_empty())
            .then(|| redis::Client::open(limits.redis_url.expose()).ok())
            .flatten()
            .map(|client| {
                (
                    Arc::new(LazyConnection::new(client, REDIS_TIMEOUT)),
                    limits.key_prefix.clone(),
                )
            });
        Self {
            own: moka::sync::Cache::new(config.tenancy.max_tenants),
            shared,
            budgets: config.tenants.values().any(|t| {
                t.max_usd_per_day.is_some_and(|u| !u.is_zero())
                    || t.max_usd_per_month.is_some_and(|u| !u.is_zero())
            }),
        }
    }

    /// Whether some tenant has a budget to check.
    pub fn has_budgets(&self) -> bool {
        self.budgets
    }

    /// Holds `amount`, the most the next call may cost, against `tenant`'s day's and
    /// month's budgets: atomically and fleet-wide with `limits.redis_url` (this replica's
    /// count decides when Redis cannot be reached). It fits when what is spent and held
    /// plus `amount` stays within each budget; then it counts as spent until
    /// [`Self::settle`] puts the real cost in its place.
    pub async fn reserve(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        amount: Usd,
        now_secs: i64,
    ) -> Reserve {
        let (day_max, month_max) = (limits.max_usd_per_day, limits.max_usd_per_month);
        if day_max.is_zero() && month_max.is_zero() {
            return Reserve::NoBudget;
        }
        let period = Period::at(now_secs);
        let maxes = [day_max.0, month_max.0];
        let shared = match self.shared_reserve(tenant, &period, amount, maxes).await {
            Some(Err((over, spent))) => {
                return Reserve::Over(over_why(tenant, limits, &period, over, spent, amount));
            }
            Some(Ok(())) => true,
            None => false,
        };
        let own = self.own.get_with_by_ref(tenant, Default::default);
        let mut own = own.lock().unwrap_or_else(|e| e.into_inner());
        let (day, month) = own.at(&period);
        if !shared {
            let spent = [day.usd_micros, month.usd_micros];
            if let Some(over) =
                (0..2).find(|&i| maxes[i] != 0 && spent[i].saturating_add(amount.0) > maxes[i])
            {
                return Reserve::Over(over_why(tenant, limits, &period, over, spent[over], amount));
            }
        }
        day.usd_micros = day.usd_micros.saturating_add(amount.0);
        month.usd_micros = month.usd_micros.saturating_add(amount.0);
        Reserve::Held(Hold {
            amount,
            period,
            shared,
        })
    }

    /// Puts what a call cost in place of what it held: `cost` (nothing for a call that
    /// produced nothing) and `tokens`; `answered` counts a request. Without a hold (its
    /// tenant has no budget) the cost is added to this UTC day's and month's spend.
    /// Nothing to do, and nothing done, without budgets or Redis.
    pub async fn settle(&self, tenant: &str, hold: Option<Hold>, spent: Spent, now_secs: i64) {
        if !self.budgets && self.shared.is_none() {
            return;
        }
        let (period, held, shared) = match hold {
            Some(h) => (h.period, h.amount.0, h.shared),
            None => (Period::at(now_secs), 0, false),
        };
        let answered = u64::from(spent.answered);
        {
            let own = self.own.get_with_by_ref(tenant, Default::default);
            let mut own = own.lock().unwrap_or_else(|e| e.into_inner());
            let (day, month) = own.at(&period);
            for t in [day, month] {
                t.usd_micros = t
                    .usd_micros
                    .saturating_sub(held)
                    .saturating_add(spent.cost.0);
                t.tokens = t.tokens.saturating_add(spent.tokens);
                t.requests = t.requests.saturating_add(answered);
            }
        }
        let Some((conn, prefix)) = &self.shared else {
            return;
        };
        // Held in Redis: the difference; held here only (Redis was out): the whole cost.
        let usd = i128::from(spent.cost.0) - if shared { i128::from(held) } else { 0 };
        let usd = i64::try_from(usd).unwrap_or(if usd < 0 { i64::MIN } else { i64::MAX });
        let recorded = async {
            let mut conn = conn.get().await.map_err(|e| e.to_string())?;
            let mut pipe = redis::pipe();
            for (key, ttl) in [
                (keys::usage(prefix, &period.day), DAY_TTL_SECS),
                (keys::usage(prefix, &period.month), MONTH_TTL_SECS),
            ] {
                pipe.hincr(&key, keys::usage_field("usd", tenant), usd)
                    .ignore()
                    .hincr(&key, keys::usage_field("tokens", tenant), spent.tokens)
                    .ignore()
                    .hincr(&key, keys::usage_field("requests", tenant), answered)
                    .ignore()
                    .expire(&key, ttl)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(e) = recorded.await {
            warn!(error = %e, %tenant, "could not record the tenant's usage in Redis; counted on this replica only");
        }
    }

    /// Holds `amount` in the fleet's ledger if it fits: `Err` names the budget it does not
    /// fit in (0 the day's, 1 the month's) and what is spent there; `None` without Redis or
    /// when it cannot be reached.
    async fn shared_reserve(
        &self,
        tenant: &str,
        period: &Period,
        amount: Usd,
        maxes: [u64; 2],
    ) -> Option<Result<(), (usize, u64)>> {
        let (conn, prefix) = self.shared.as_ref()?;
        let held = async {
            let mut conn = conn.get().await.map_err(|e| e.to_string())?;
            let (over, spent): (usize, u64) = redis::Script::new(RESERVE_SCRIPT)
                .key(keys::usage(prefix, &period.day))
                .key(keys::usage(prefix, &period.month))
                .arg(keys::usage_field("usd", tenant))
                .arg(amount.0)
                .arg(maxes[0])
                .arg(maxes[1])
                .arg(DAY_TTL_SECS)
                .arg(MONTH_TTL_SECS)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(match over {
                0 => Ok(()),
                n => Err((n - 1, spent)),
            })
        };
        match held.await {
            Ok(held) => Some(held),
            Err(e) => {
                warn!(error = %e, %tenant, "could not reserve in the fleet's ledger in Redis; this replica's count decides");
                None
            }
        }
    }
}

/// Every tenant's usage today and this month, from the fleet's ledger in Redis: tenant ->
/// (day, month).
pub async fn read(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    period: &Period,
) -> redis::RedisResult<BTreeMap<String, (Tally, Tally)>> {
    let day: BTreeMap<String, u64> = conn.hgetall(keys::usage(prefix, &period.day)).await?;
    let month: BTreeMap<String, u64> = conn.hgetall(keys::usage(prefix, &period.month)).await?;
    let mut out: BTreeMap<String, (Tally, Tally)> = BTreeMap::new();
    for (fields, month) in [(day, false), (month, true)] {
        for (field, value) in fields {
            let Some((what, tenant)) = field.split_once(':') else {
                continue;
            };
            let entry = out.entry(tenant.to_string()).or_default();
            let tally = if month { &mut entry.1 } else { &mut entry.0 };
            match what {
                "usd" => tally.usd_micros = value,
                "tokens" => tally.tokens = value,
                "requests" => tally.requests = value,
                _ => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_utc_days_and_months() {
        // 2026-11-30T23:59:59Z, then a second later.
        assert_eq!(
            Period::at(1_796_083_199),
            Period {
                day: "2026-11-30".into(),
                month: "2026-11".into()
            }
        );
        assert_eq!(Period::at(1_796_083_200).day, "2026-12-01");
        assert_eq!(Period::at(1_796_083_200).month, "2026-12");
    }

    fn budgeted() -> Config {
        let mut config = Config::default();
        config.tenants.insert(
            crate::config::DEFAULT_TENANT.into(),
            crate::config::TenantConfig {
                max_usd_per_day: Some(Usd(1000)),
                ..Default::default()
            },
        );
        config
    }

    fn held(r: Reserve) -> Hold {
        match r {
            Reserve::Held(h) => h,
            other => panic!("not held: {other:?}"),
        }
    }

    fn answer(micros: u64) -> Spent {
        Spent {
            cost: Usd(micros),
            tokens: 10,
            answered: true,
        }
    }

    #[tokio::test]
    async fn a_budget_holds_what_calls_may_cost_and_counts_what_they_did() {
        let ledger = Ledger::new(&budgeted());
        let limits = TenantLimits {
            max_usd_per_day: Usd(1000),
            ..Default::default()
        };
        let now = 1_796_083_000;
        // Up to the budget exactly, held at once: a third does not fit.
        let a = held(ledger.reserve("alice", &limits, Usd(600), now).await);
        let b = held(ledger.reserve("alice", &limits, Usd(400), now).await);
        let why = match ledger.reserve("alice", &limits, Usd(1), now).await {
            Reserve::Over(why) => why,
            other => panic!("{other:?}"),
        };
        assert!(
            why.contains("has spent or holds $0.001000 of its max_usd_per_day $0.001000")
                && why.contains("may cost up to $0.000001"),
            "{why}"
        );
        // What a call cost takes the place of what it held; a call that made nothing gives
        // its hold back.
        ledger.settle("alice", Some(a), answer(250), now).await;
        ledger.settle("alice", Some(b), Spent::default(), now).await;
        let c = held(ledger.reserve("alice", &limits, Usd(750), now).await);
        assert!(matches!(
            ledger.reserve("alice", &limits, Usd(1), now).await,
            Reserve::Over(_)
        ));
        assert_eq!(c.amount(), Usd(750));
        // Another tenant, and the next UTC day, start afresh; no budget, nothing held.
        held(ledger.reserve("bob", &limits, Usd(1000), now).await);
        held(
            ledger
                .reserve("alice", &limits, Usd(1000), now + 86_400)
                .await,
        );
        assert!(matches!(
            ledger
                .reserve("alice", &TenantLimits::default(), Usd(1), now)
                .await,
            Reserve::NoBudget
        ));
        let monthly = TenantLimits {
            max_usd_per_month: Usd(1000),
            ..Default::default()
        };
        // The day before, in the same month.
        held(ledger.reserve("carol", &monthly, Usd(1000), now).await);
        assert!(matches!(
            ledger
                .reserve("carol", &monthly, Usd(1), now - 86_400)
                .await,
            Reserve::Over(_)
        ));
    }

    /// Many calls at once never hold more than the budget.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reservations_never_exceed_the_budget() {
        let ledger = std::sync::Arc::new(Ledger::new(&budgeted()));
        let limits = TenantLimits {
            max_usd_per_day: Usd(1000),
            ..Default::default()
        };
        let tries = (0..40).map(|_| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                matches!(
                    ledger
                        .reserve("dave", &limits, Usd(100), 1_796_083_000)
                        .await,
                    Reserve::Held(_)
                )
            })
        });
        let mut fitted = 0;
        for t in tries {
            fitted += usize::from(t.await.expect("reserve"));
        }
        assert_eq!(fitted, 10);
    }
}
