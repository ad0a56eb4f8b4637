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

impl Tally {
    fn add(&mut self, cost: Usd, tokens: u64) {
        self.usd_micros = self.usd_micros.saturating_add(cost.0);
        self.tokens = self.tokens.saturating_add(tokens);
        self.requests = self.requests.saturating_add(1);
    }
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

    /// Why `tenant` may not be called now, if it has spent its day's or its month's
    /// budget; `None` when it may (or has no budget).
    pub async fn over_budget(
        &self,
        tenant: &str,
        limits: &TenantLimits,
        now_secs: i64,
    ) -> Option<String> {
        let (day_max, month_max) = (limits.max_usd_per_day, limits.max_usd_per_month);
        if day_max.is_zero() && month_max.is_zero() {
            return None;
        }
        let period = Period::at(now_secs);
        let spent = match self.shared_spend(tenant, &period).await {
            Some(spent) => spent,
            None => self.own_spend(tenant, &period),
        };
        let (day, month) = spent;
        [
            (day, day_max, "max_usd_per_day", "day", &period.day),
            (
                month,
                month_max,
                "max_usd_per_month",
                "month",
                &period.month,
            ),
        ]
        .into_iter()
        .find(|(spent, max, ..)| !max.is_zero() && *spent >= max.0)
        .map(|(spent, max, key, what, when)| {
            format!(
                "tenant {tenant:?} has spent {} of its {key} {max} (UTC {what} {when}); replay \
                 once it resets: llmq dlq replay --kind budget_exceeded",
                Usd(spent)
            )
        })
    }

    /// Counts an answer of `tenant` that cost `cost` (zero when its model has no price) and
    /// used `tokens`. Nothing to do, and nothing done, without budgets or Redis.
    pub async fn record(&self, tenant: &str, cost: Usd, tokens: u64, now_secs: i64) {
        if !self.budgets && self.shared.is_none() {
            return;
        }
        let period = Period::at(now_secs);
        {
            let own = self.own.get_with_by_ref(tenant, Default::default);
            let mut own = own.lock().unwrap_or_else(|e| e.into_inner());
            let (day, month) = own.at(&period);
            day.add(cost, tokens);
            month.add(cost, tokens);
        }
        let Some((conn, prefix)) = &self.shared else {
            return;
        };
        let recorded = async {
            let mut conn = conn.get().await.map_err(|e| e.to_string())?;
            let mut pipe = redis::pipe();
            for (key, ttl) in [
                (keys::usage(prefix, &period.day), DAY_TTL_SECS),
                (keys::usage(prefix, &period.month), MONTH_TTL_SECS),
            ] {
                pipe.hincr(&key, keys::usage_field("usd", tenant), cost.0)
                    .ignore()
                    .hincr(&key, keys::usage_field("tokens", tenant), tokens)
                    .ignore()
                    .hincr(&key, format!("requests:{tenant}"), 1)
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

    /// What `tenant` spent this day and month as this replica counted it.
    fn own_spend(&self, tenant: &str, period: &Period) -> (u64, u64) {
        let Some(own) = self.own.get(tenant) else {
            return (0, 0);
        };
        let mut own = own.lock().unwrap_or_else(|e| e.into_inner());
        let (day, month) = own.at(period);
        (day.usd_micros, month.usd_micros)
    }

    /// What `tenant` spent this day and month as the fleet counted it; `None` without
    /// Redis or when it cannot be read.
    async fn shared_spend(&self, tenant: &str, period: &Period) -> Option<(u64, u64)> {
        let (conn, prefix) = self.shared.as_ref()?;
        let read = async {
            let mut conn = conn.get().await.map_err(|e| e.to_string())?;
            let field = keys::usage_field("usd", tenant);
            let (day, month): (Option<u64>, Option<u64>) = redis::pipe()
                .hget(keys::usage(prefix, &period.day), &field)
                .hget(keys::usage(prefix, &period.month), &field)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((day.unwrap_or(0), month.unwrap_or(0)))
        };
        match read.await {
            Ok(spent) => Some(spent),
            Err(e) => {
                warn!(error = %e, %tenant, "could not read the tenant's spend from Redis; this replica's count decides");
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

    #[tokio::test]
    async fn a_budget_is_spent_at_its_amount_and_resets_with_its_period() {
        let mut config = Config::default();
        config.tenants.insert(
            crate::config::DEFAULT_TENANT.into(),
            crate::config::TenantConfig {
                max_usd_per_day: Some(Usd(1000)),
                ..Default::default()
            },
        );
        let ledger = Ledger::new(&config);
        let limits = TenantLimits {
            max_usd_per_day: Usd(1000),
            ..Default::default()
        };
        let now = 1_796_083_000;
        assert_eq!(ledger.over_budget("alice", &limits, now).await, None);
        ledger.record("alice", Usd(999), 10, now).await;
        assert_eq!(ledger.over_budget("alice", &limits, now).await, None);
        ledger.record("alice", Usd(1), 10, now).await;
        let why = ledger.over_budget("alice", &limits, now).await;
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("$0.001000 of its max_usd_per_day $0.001000")),
            "{why:?}"
        );
        assert_eq!(ledger.over_budget("bob", &limits, now).await, None);
        // The next UTC day starts afresh.
        assert_eq!(
            ledger.over_budget("alice", &limits, now + 86_400).await,
            None
        );
        let monthly = TenantLimits {
            max_usd_per_month: Usd(1000),
            ..Default::default()
        };
        ledger.record("carol", Usd(1000), 1, now).await;
        assert!(ledger.over_budget("carol", &monthly, now).await.is_some());
    }
}
