//! `llmq usage`: what each tenant spent, used and asked for today and this month (UTC),
//! from the fleet's ledger in Redis (`limits.redis_url`).

use serde::Serialize;

use crate::{
    config::{Config, Usd},
    runtime::clock::unix_now,
    tenant::spend::{self, Period, Tally},
};

/// Why `llmq usage` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// Without Redis each replica counts only its own; nothing is kept to read.
    #[error(
        "usage is kept fleet-wide only in Redis: set limits.redis_url (without it each replica \
         counts its own, for its budgets)"
    )]
    NoRedis,
    /// Redis failed (the URL is never quoted: it may carry a password).
    #[error("redis: {0}")]
    Redis(String),
}

/// One tenant's usage.
#[derive(Debug, Clone, Serialize)]
pub struct TenantUsage {
    /// The tenant (its identity).
    pub tenant: String,
    /// Today (UTC).
    pub today: Figures,
    /// This month (UTC).
    pub month: Figures,
}

/// Spend, tokens and requests of one period.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Figures {
    /// USD, counted in micro-dollars.
    pub usd: f64,
    /// Tokens as the upstreams reported them.
    pub tokens: u64,
    /// Answered requests.
    pub requests: u64,
}

impl From<Tally> for Figures {
    fn from(t: Tally) -> Self {
        Self {
            usd: Usd(t.usd_micros).dollars(),
            tokens: t.tokens,
            requests: t.requests,
        }
    }
}

/// Every tenant's usage (or only `tenant`'s), today and this month.
pub async fn usage(
    config: &Config,
    tenant: Option<&str>,
) -> Result<(Period, Vec<TenantUsage>), UsageError> {
    let url = config.limits.redis_url.expose();
    if url.is_empty() {
        return Err(UsageError::NoRedis);
    }
    let redis = |e: redis::RedisError| {
        UsageError::Redis(format!(
            "{:?}: {}",
            e.kind(),
            e.detail().unwrap_or_default()
        ))
    };
    let client = redis::Client::open(url).map_err(redis)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(redis)?;
    let period = Period::at(unix_now());
    let all = spend::read(&mut conn, &config.limits.key_prefix, &period)
        .await
        .map_err(redis)?;
    let rows = all
        .into_iter()
        .filter(|(name, _)| tenant.is_none_or(|t| t == name))
        .map(|(name, (today, month))| TenantUsage {
            tenant: name,
            today: today.into(),
            month: month.into(),
        })
        .collect();
    Ok((period, rows))
}

/// A table for people.
pub fn table(period: &Period, rows: &[TenantUsage]) -> String {
    let mut out = format!(
        "{:<24} {:>14} {:>12} {:>10} {:>14} {:>12} {:>10}\n",
        "tenant",
        format!("usd {}", period.day),
        "tokens",
        "requests",
        format!("usd {}", period.month),
        "tokens",
        "requests"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<24} {:>14.6} {:>12} {:>10} {:>14.6} {:>12} {:>10}\n",
            r.tenant,
            r.today.usd,
            r.today.tokens,
            r.today.requests,
            r.month.usd,
            r.month.tokens,
            r.month.requests
        ));
    }
    if rows.is_empty() {
        out.push_str("(no usage recorded)\n");
    }
    out.trim_end().to_string()
}

/// JSON for scripts: the period and every tenant's figures.
pub fn json(period: &Period, rows: &[TenantUsage]) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "day": period.day,
        "month": period.month,
        "tenants": rows,
    }))
    .unwrap_or_default()
}
