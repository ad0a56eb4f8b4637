//! Cancellation: a message `{"cancel": "<request_id>"}` on the control exchange
//! (`topology.control_exchange`, fanout) reaches every worker, each through an exclusive
//! queue of its own. It is scoped by the sender's [`Identity`], as idempotency is, so one
//! user cannot cancel another's request.
//!
//! - A request in flight here is aborted: its [`Watch`] fires, and the delivery's settling
//!   stops whatever it waits for (its HTTP call, its slot, its retry sleep), which gives
//!   back its permit and its token estimate; the request is answered `cancelled`.
//! - A request not reached yet finds a tombstone when it is: kept `worker.cancel_ttl_secs`
//!   in Redis when `idempotency.store = "redis"` (the whole fleet sees it), else in each
//!   replica, which heard the fanout (a replica started after the cancel does not know it).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    Connection,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::{Config, StoreKind},
    contract::{Identity, control::Cancel},
    store::redis_conn::LazyConnection,
};

/// Bytes of tombstones a replica keeps at most (keys plus a fixed overhead each); past it
/// the least used go first.
const MAX_TOMBSTONE_BYTES: u64 = 16 * 1024 * 1024;

/// How long a tombstone lookup in Redis may take before the request goes on uncancelled.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// The cancels this worker knows of, and the requests it is settling.
pub struct Cancels {
    running: Mutex<HashMap<String, (CancellationToken, usize)>>,
    tombstones: moka::sync::Cache<String, ()>,
    shared: Option<(Arc<LazyConnection>, String)>,
    ttl: Duration,
    /// `tenancy.header`: a cancel's identity is read as a request's is.
    identity_header: String,
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
    /// From `worker.cancel_ttl_secs` and, with the Redis idempotency store, its Redis.
    pub fn new(config: &Config) -> Self {
        let ttl = Duration::from_secs(config.worker.cancel_ttl_secs.max(1));
        let idem = &config.idempotency;
        let shared = (idem.store == StoreKind::Redis)
            .then(|| redis::Client::open(idem.redis_url.expose()).ok())
            .flatten()
            .map(|client| {
                (
                    Arc::new(LazyConnection::new(client, REDIS_TIMEOUT)),
                    crate::store::keys::cancel_prefix(&idem.key_prefix),
                )
            });
        Self {
            running: Mutex::new(HashMap::new()),
            // Bounded in bytes: cancels come from anyone, for ids that may never arrive.
            tombstones: moka::sync::Cache::builder()
                .time_to_live(ttl)
                .weigher(|key: &String, _: &()| u32::try_from(key.len() + 64).unwrap_or(u32::MAX))
                .max_capacity(MAX_TOMBSTONE_BYTES)
                // Least recently used out first: a flood of junk must not keep real
                // cancels out (the default admission policy would).
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
            shared,
            ttl,
            identity_header: config.tenancy.header.clone(),
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

    /// A cancel for `key` arrived: abort it if it runs here, and remember it for when it is
    /// reached (in Redis too, by a task of its own, so that a slow Redis never delays the
    /// next cancel).
    pub fn cancel(&self, key: &str) {
        self.tombstones.insert(key.to_string(), ());
        if let Some((token, _)) = self.running().get(key) {
            token.cancel();
        }
        let (Some((conn, prefix)), Ok(runtime)) =
            (&self.shared, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let (conn, key) = (conn.clone(), format!("{prefix}{key}"));
        runtime.spawn(async move {
            let stored = async {
                let mut conn = conn.get().await.map_err(|e| e.to_string())?;
                // Every replica hears the cancel; the first one's write is enough.
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(REDIS_TIMEOUT, stored).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "could not keep the cancel in Redis; only this replica knows it")
                }
                Err(_) => warn!("Redis did not answer in time; only this replica knows the cancel"),
            }
        });
    }

    /// Whether `key` was cancelled before its delivery got here: this replica heard it, or
    /// (with the Redis store) any replica did.
    pub async fn tombstoned(&self, key: &str) -> bool {
        if self.tombstones.contains_key(key) {
            return true;
        }
        let Some((conn, prefix)) = &self.shared else {
            return false;
        };
        let found = async {
            let mut conn = conn.get().await.map_err(|e| e.to_string())?;
            conn.exists::<_, bool>(format!("{prefix}{key}"))
                .await
                .map_err(|e| e.to_string())
        };
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
                Some(control) => {
                    let identity = Identity::of(&delivery.properties, &cancels.identity_header);
                    info!(request_id = %control.cancel, %identity, "cancel received");
                    cancels.cancel(&identity.scope(&control.cancel));
                }
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

    #[tokio::test]
    async fn a_cancel_fires_the_watches_of_its_key_only_and_is_remembered() {
        let cancels = Arc::new(Cancels::new(&Config::default()));
        let a = cancels.watch("alice:r1");
        let a_again = cancels.watch("alice:r1");
        let b = cancels.watch("bob:r1");
        cancels.cancel("alice:r1");
        assert!(a.is_cancelled() && a_again.is_cancelled());
        assert!(!b.is_cancelled(), "another identity's request");
        assert!(cancels.tombstoned("alice:r1").await);
        assert!(!cancels.tombstoned("bob:r1").await);
        drop((a, a_again, b));
        assert!(
            cancels.running().is_empty(),
            "watches go with their deliveries"
        );
        let later = cancels.watch("alice:r1");
        assert!(later.is_cancelled(), "reached after its cancel");
    }
}
