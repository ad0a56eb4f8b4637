//! Cancellation: a message `{"cancel": "<request_id>"}` on the control exchange
//! (`topology.control_exchange`, fanout) reaches every worker, each through an exclusive
//! queue of its own. It is scoped by the sender's [`Identity`], as idempotency is, so one
//! user cannot cancel another's request.
//!
//! - A request in flight here is aborted: its [`Watch`] fires, and the delivery's settling
//!   stops whatever it waits for (its HTTP call, its slot, its retry sleep), which gives
//!   back its permit and its token estimate; the request is answered `cancelled`.
//! - A request not reached yet finds a tombstone when it is: kept for [`ttl`] in Redis when
//!   `idempotency.store = "redis"` (the whole fleet sees it,
//!   [`crate::store::cancels`]), else in each replica, which heard the fanout (a replica
//!   started after the cancel does not know it).
//!
//! Anyone who may publish to the control exchange may send cancels, for ids that may never
//! arrive, and every replica hears each: so a tombstone is kept only within its identity's
//! [`allowance`] (a rate and a cap), and not at all for a cancel without an identity where
//! requests must carry one. The others are dropped and counted in
//! `llmq_cancels_dropped_total`; one for a request running here still stops it.

mod allowance;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Connection,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use allowance::Dropped;
use allowance::{Allowances, Limits};

use crate::{
    config::{Config, StoreKind, WorkerConfig},
    contract::{Identity, control::Cancel},
    runtime::{clock::unix_now_ms, metrics::Metrics},
    store::{cancels::SharedCancels, redis_conn::LazyConnection},
};

/// Bytes of tombstones a replica keeps at most (keys plus a fixed overhead each); past it
/// the least used go first.
const MAX_TOMBSTONE_BYTES: u64 = 16 * 1024 * 1024;

/// How long a tombstone lookup in Redis may take before the request goes on uncancelled.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a cancel is remembered: `worker.cancel_ttl_secs`, and no longer than
/// `worker.max_age_secs` when that is set, since a request older than that is expired, not
/// called, anyway.
pub fn ttl(worker: &WorkerConfig) -> Duration {
    let secs = match worker.max_age_secs {
        0 => worker.cancel_ttl_secs,
        age => worker.cancel_ttl_secs.min(age),
    };
    Duration::from_secs(secs.max(1))
}

/// The cancels this worker knows of, and the requests it is settling.
pub struct Cancels {
    running: Mutex<HashMap<String, (CancellationToken, usize)>>,
    tombstones: moka::sync::Cache<String, ()>,
    shared: Option<SharedCancels>,
    /// What each identity may still have remembered.
    allowances: Allowances,
    limits: Limits,
    /// `tenancy.header`: a cancel's identity is read as a request's is.
    identity_header: String,
    /// `tenancy.require_user_id`: a cancel without an identity could cancel nothing.
    identity_required: bool,
    metrics: Arc<Metrics>,
}

/// A request being settled here: [`Watch::cancelled`] resolves when it is cancelled.
pub struct Watch {
    cancels: Arc<Cancels>,
    key: String,
    token: CancellationToken,
}

impl Watch {
    /// Resolves when a cancel for this request arrives.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// Whether a cancel for this request arrived.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut running = self.cancels.running();
        if let Some((_, watchers)) = running.get_mut(&self.key) {
            *watchers -= 1;
            if *watchers == 0 {
                running.remove(&self.key);
            }
        }
    }
}

impl Cancels {
    /// From `[worker]`'s cancel keys, `[tenancy]` and, with the Redis idempotency store,
    /// its Redis; drops are counted in `metrics`.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Self {
        let limits = Limits {
            per_minute: config.worker.cancels_per_minute,
            cap: config.worker.max_cancels_per_identity,
            ttl: ttl(&config.worker),
        };
        let idem = &config.idempotency;
        let shared = (idem.store == StoreKind::Redis)
            .then(|| redis::Client::open(idem.redis_url.expose()).ok())
            .flatten()
            .map(|client| {
                let conn = Arc::new(LazyConnection::new(client, REDIS_TIMEOUT));
                SharedCancels::new(conn, &idem.key_prefix)
            });
        Self {
            running: Mutex::new(HashMap::new()),
            // Bounded in bytes: cancels come from anyone, for ids that may never arrive.
            tombstones: moka::sync::Cache::builder()
                .time_to_live(limits.ttl)
                .weigher(|key: &String, _: &()| u32::try_from(key.len() + 64).unwrap_or(u32::MAX))
                .max_capacity(MAX_TOMBSTONE_BYTES)
                // Least recently used out first: a flood of junk must not keep real
                // cancels out (the default admission policy would).
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            shared,
            allowances: Allowances::new(limits, config.tenancy.max_tenants),
            limits,
            identity_header: config.tenancy.header.clone(),
            identity_required: config.requires_user_id(),
            metrics,
        }
    }

    fn running(&self) -> MutexGuard<'_, HashMap<String, (CancellationToken, usize)>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `key` (a request id scoped by identity) while its delivery is settled.
    pub fn watch(self: &Arc<Self>, key: &str) -> Watch {
        let mut running = self.running();
        let (token, watchers) = running
            .entry(key.to_string())
            .or_insert_with(|| (CancellationToken::new(), 0));
        *watchers += 1;
        let token = token.clone();
        drop(running);
        if self.tombstones.contains_key(key) {
            token.cancel();
        }
        Watch {
            cancels: self.clone(),
            key: key.to_string(),
            token,
        }
    }

    /// A cancel of `request_id` arrived with `props`: abort the request if it runs here, and
    /// remember the cancel for when it is reached, within its identity's allowance (in
    /// Redis too, by a task of its own, so that a slow Redis never delays the next cancel).
    pub fn heard(&self, props: &BasicProperties, request_id: &str) {
        let identity = Identity::of(props, &self.identity_header);
        let key = identity.scope(request_id);
        if let Some((token, _)) = self.running().get(&key) {
            token.cancel();
        }
        if self.tombstones.contains_key(&key) {
            return;
        }
        let admitted = if self.identity_required && !Identity::carried(props, &self.identity_header)
        {
            Err(Dropped::NoIdentity)
        } else {
            self.allowances
                .admit(identity.as_str(), tokio::time::Instant::now())
        };
        if let Err(why) = admitted {
            debug!(request_id, %identity, reason = why.as_str(), "cancel not remembered");
            self.metrics.cancel_dropped(why.as_str());
            return;
        }
        info!(request_id, %identity, "cancel received");
        self.tombstones.insert(key, ());
        self.share(identity, request_id);
    }

    /// Remembers the cancel in Redis, in a task of its own.
    fn share(&self, identity: Identity, request_id: &str) {
        let (Some(shared), Ok(runtime)) = (&self.shared, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (shared, metrics, limits) = (shared.clone(), self.metrics.clone(), self.limits);
        let request_id = request_id.to_string();
        runtime.spawn(async move {
            let stored = shared.remember(&identity, &request_id, limits.ttl, limits.cap, unix_now_ms());
            match tokio::time::timeout(REDIS_TIMEOUT, stored).await {
                Ok(Ok(true)) => {}
                // Other replicas remembered its cap already (this one started later).
                Ok(Ok(false)) => {
                    debug!(request_id, %identity, "cancel not remembered in Redis: its identity's are at their cap");
                    metrics.cancel_dropped(Dropped::Full.as_str());
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "could not keep the cancel in Redis; only this replica knows it")
                }
                Err(_) => warn!("Redis did not answer in time; only this replica knows the cancel"),
            }
        });
    }

    /// Whether `identity`'s `request_id` was cancelled before its delivery got here: this
    /// replica heard it, or (with the Redis store) any replica did.
    pub async fn tombstoned(&self, identity: &Identity, request_id: &str) -> bool {
        if self.tombstones.contains_key(&identity.scope(request_id)) {
            return true;
        }
        let Some(shared) = &self.shared else {
            return false;
        };
        let found = shared.contains(identity, request_id, unix_now_ms());
        match tokio::time::timeout(REDIS_TIMEOUT, found).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                debug!(error = %e, "could not look for a cancel in Redis");
                false
            }
            Err(_) => false,
        }
    }
}

/// Listens to the control exchange on `conn` until `stop`, handing each cancel to
/// `cancels`; a control channel that fails alone (its queue deleted, a permission) is
/// opened again after a pause, while the connection lives.
pub(super) async fn listen(
    conn: Arc<Connection>,
    exchange: String,
    cancels: Arc<Cancels>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() && conn.status().connected() {
        listen_once(&conn, &exchange, &cancels, &stop).await;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => {}
        }
    }
}

/// One control queue (exclusive to this worker, gone with its channel) and its consumer.
async fn listen_once(
    conn: &Connection,
    exchange: &str,
    cancels: &Cancels,
    stop: &CancellationToken,
) {
    let listening = async {
        let channel = conn.create_channel().await?;
        // Named under the exchange, so that no request's reply_to may name it.
        let name = format!("{exchange}.{}", uuid::Uuid::new_v4().simple());
        let queue = channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().as_str().into(),
                exchange.into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.name().as_str().into(),
                "llmq-control".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    exclusive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery?;
            match Cancel::parse(&delivery.data) {
                Some(control) => cancels.heard(&delivery.properties, &control.cancel),
                None => debug!(
                    "a control message that is not {{\"cancel\": \"<request_id>\"}} of at most 4 KiB; ignored"
                ),
            }
        }
        Ok::<(), lapin::Error>(())
    };
    tokio::select! {
        ended = listening => {
            if let Err(e) = ended {
                warn!(error = %e, "the control queue closed; cancels are heard again after a pause");
            }
        }
        () = stop.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(user: &str) -> BasicProperties {
        BasicProperties::default().with_user_id(user.into())
    }

    fn cancels(adjust: impl FnOnce(&mut Config)) -> (Arc<Cancels>, Arc<Metrics>) {
        let mut config = Config::default();
        adjust(&mut config);
        let metrics = Arc::new(Metrics::default());
        (Arc::new(Cancels::new(&config, metrics.clone())), metrics)
    }

    fn alice() -> Identity {
        Identity::of(&from("alice"), "")
    }

    #[tokio::test]
    async fn a_cancel_fires_the_watches_of_its_key_only_and_is_remembered() {
        let (cancels, _) = cancels(|_| {});
        let a = cancels.watch("alice:r1");
        let a_again = cancels.watch("alice:r1");
        let b = cancels.watch("bob:r1");
        cancels.heard(&from("alice"), "r1");
        assert!(a.is_cancelled() && a_again.is_cancelled());
        assert!(!b.is_cancelled(), "another identity's request");
        assert!(cancels.tombstoned(&alice(), "r1").await);
        let bob = Identity::of(&from("bob"), "");
        assert!(!cancels.tombstoned(&bob, "r1").await);
        drop((a, a_again, b));
        assert!(
            cancels.running().is_empty(),
            "watches go with their deliveries"
        );
        let later = cancels.watch("alice:r1");
        assert!(later.is_cancelled(), "reached after its cancel");
    }

    #[tokio::test]
    async fn past_its_allowance_a_cancel_is_dropped_and_counted_but_still_stops_a_running_request()
    {
        let (cancels, metrics) = cancels(|c| {
            c.worker.cancels_per_minute = 0;
            c.worker.max_cancels_per_identity = 3;
        });
        for id in ["r1", "r2", "r3", "r1"] {
            cancels.heard(&from("alice"), id);
        }
        let running = cancels.watch("alice:r4");
        cancels.heard(&from("alice"), "r4");
        cancels.heard(&from("alice"), "r5");
        assert!(running.is_cancelled(), "running here: stopped all the same");
        assert!(cancels.tombstoned(&alice(), "r3").await);
        assert!(!cancels.tombstoned(&alice(), "r5").await, "over the cap");
        assert!(
            metrics
                .encode()
                .contains("llmq_cancels_dropped_total{reason=\"full\"} 2"),
            "{}",
            metrics.encode()
        );
    }

    #[tokio::test]
    async fn where_identities_are_required_a_cancel_without_one_is_dropped() {
        let (cancels, metrics) = cancels(|c| c.tenancy.require_user_id = crate::config::Switch::On);
        cancels.heard(&BasicProperties::default(), "r1");
        let anonymous = Identity::of(&BasicProperties::default(), "");
        assert!(!cancels.tombstoned(&anonymous, "r1").await);
        assert!(
            metrics
                .encode()
                .contains("llmq_cancels_dropped_total{reason=\"no_identity\"} 1")
        );
    }

    #[test]
    fn a_cancel_is_kept_no_longer_than_a_request_may_wait() {
        let mut worker = WorkerConfig::default();
        assert_eq!(ttl(&worker), Duration::from_secs(3600));
        worker.max_age_secs = 600;
        assert_eq!(ttl(&worker), Duration::from_secs(600));
        worker.max_age_secs = 7200;
        assert_eq!(ttl(&worker), Duration::from_secs(3600));
    }
}
