//! Idempotency by `request_id`: a store of finished results and short leases.
//!
//! Before calling the upstream a worker looks up the request's stored result (a duplicate
//! gets it re-published, no upstream call) and takes a lease on the id (`SET NX` with an
//! expiry), so two replicas never call the LLM at once for one request. The result is saved
//! before it is published, so a crash between the two costs no second upstream call.
//!
//! Keys are scoped by the sender's identity ([`crate::contract::Identity::scope`]): two users
//! who pick the same `request_id` never see each other's answer. A result is stored with the
//! fingerprint of the request it answers ([`crate::contract::fingerprint`]); a duplicate
//! whose request differs gets [`Claim::Conflict`], never the stored answer.
//!
//! `memory` is per replica and bounded in bytes; `redis` is fleet-wide.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use moka::{future::Cache, policy::EvictionPolicy};
use redis::{AsyncCommands, Script, aio::ConnectionManager};

use crate::{
    config::{IdempotencyConfig, StoreKind},
    store::redis_conn::LazyConnection,
};

/// Longest a Redis connect or command may take before the store counts as unavailable.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Deletes a lease only if `worker` holds it.
const DELETE_IF_OWNER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Extends a lease only if `worker` holds it (or takes it again if it lapsed).
const RENEW_IF_OWNER: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then
  return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) and 1 or 0
end
return 0
";

/// The store could not answer; the caller decides (`idempotency.on_store_error`).
#[derive(Debug, thiserror::Error)]
#[error("idempotency store unavailable: {0}")]
pub struct StoreError(String);

/// What the store says about a request about to be processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// No result yet and the lease is ours: call the upstream.
    Acquired,
    /// Already finished: re-publish this stored result body.
    Done(Vec<u8>),
    /// A result is stored under this key for a different request (another fingerprint).
    Conflict,
    /// Another worker holds the lease right now: try again later.
    Busy,
}

/// Length of a fingerprint: 64 hex digits. Redis keeps it in front of the result body.
const FINGERPRINT_LEN: usize = 64;

/// A stored result: the fingerprint of the request it answers, and its body.
#[derive(Debug)]
struct Stored {
    fingerprint: String,
    body: Vec<u8>,
}

impl Stored {
    /// The answer to a claim of a request with `fingerprint`.
    fn claim(&self, fingerprint: &str) -> Claim {
        if self.fingerprint == fingerprint {
            Claim::Done(self.body.clone())
        } else {
            Claim::Conflict
        }
    }

    /// Redis's form: the fingerprint, then the body.
    fn encode(fingerprint: &str, body: &[u8]) -> Vec<u8> {
        let mut value = Vec::with_capacity(fingerprint.len() + body.len());
        value.extend_from_slice(fingerprint.as_bytes());
        value.extend_from_slice(body);
        value
    }

    fn decode(mut value: Vec<u8>) -> Self {
        let at = FINGERPRINT_LEN.min(value.len());
        let body = value.split_off(at);
        Self {
            fingerprint: String::from_utf8_lossy(&value).into_owned(),
            body,
        }
    }
}

/// The configured store.
#[derive(Clone)]
pub enum Store {
    /// No deduplication.
    Off,
    /// Per replica, bounded, with TTL.
    Memory(Arc<MemoryStore>),
    /// Fleet-wide.
    Redis(Arc<RedisStore>),
}

impl Store {
    /// Builds the store; Redis is connected lazily, so a worker starts while Redis is down.
    pub fn new(cfg: &IdempotencyConfig, lease: Duration) -> Result<Self, StoreError> {
        let ttl = Duration::from_secs(cfg.ttl_secs);
        Ok(match cfg.store {
            StoreKind::Off => Store::Off,
            StoreKind::Memory => {
                Store::Memory(Arc::new(MemoryStore::new(cfg.memory_max_bytes, ttl, lease)))
            }
            StoreKind::Redis => {
                let client = redis::Client::open(cfg.redis_url.expose())
                    .map_err(|e| StoreError(format!("bad idempotency.redis_url: {e}")))?;
                Store::Redis(Arc::new(RedisStore {
                    conn: LazyConnection::new(client, REDIS_TIMEOUT),
                    prefix: cfg.key_prefix.clone(),
                    ttl,
                    lease,
                    outage: Outage::default(),
                }))
            }
        })
    }

    /// Looks up a stored result for `key` (a request id scoped by its identity) and
    /// compares it with the request's `fingerprint`; else takes the lease for `worker`.
    pub async fn claim(
        &self,
        key: &str,
        worker: &str,
        fingerprint: &str,
    ) -> Result<Claim, StoreError> {
        match self {
            Store::Off => Ok(Claim::Acquired),
            Store::Memory(m) => Ok(m.claim(key, fingerprint).await),
            Store::Redis(r) => {
                let claimed = r.claim(key, worker, fingerprint).await;
                r.outage.note(claimed.is_ok());
                claimed
            }
        }
    }

    /// How long every claim has failed (the store's outage so far); zero while claims
    /// succeed, and for the stores that cannot fail.
    pub fn down_for(&self) -> Duration {
        match self {
            Store::Off | Store::Memory(_) => Duration::ZERO,
            Store::Redis(r) => r.outage.length(),
        }
    }

    /// Saves an ok result, with the fingerprint of the request it answers, for
    /// `idempotency.ttl_secs` and gives the lease up. A result already stored is kept: the
    /// first answer is the answer.
    pub async fn save(
        &self,
        key: &str,
        worker: &str,
        fingerprint: &str,
        body: &[u8],
    ) -> Result<(), StoreError> {
        match self {
            Store::Off => Ok(()),
            Store::Memory(m) => {
                m.save(key, fingerprint, body).await;
                Ok(())
            }
            Store::Redis(r) => r.save(key, worker, fingerprint, body).await,
        }
    }

    /// Extends `worker`'s lease before another attempt, so that it outlives retries.
    pub async fn renew(&self, request_id: &str, worker: &str) {
        match self {
            Store::Off => {}
            Store::Memory(m) => m.renew(request_id),
            Store::Redis(r) => r.renew(request_id, worker).await,
        }
    }

    /// Gives `worker`'s lease up (the request was handed back unfinished); a lease that has
    /// passed to another worker is left alone.
    pub async fn release(&self, request_id: &str, worker: &str) {
        match self {
            Store::Off => {}
            Store::Memory(m) => m.release(request_id),
            Store::Redis(r) => r.release(request_id, worker).await,
        }
    }
}

/// The per-replica store: finished results in a cache bounded in bytes with a TTL, least
/// recently used out first, and the leases of the requests in flight in a plain map. (Not
/// moka's default TinyLFU, whose admission refuses a new result once the cache is full of
/// results read before: the newest answers, the likeliest to be asked for again by a
/// redelivery or a retrying client, would be the ones forgotten.) A lease is never evicted to make room
/// (the map holds what is in flight, which the prefetch bounds), so one request id can not
/// be leased twice; an expired one is swept as the map grows.
pub struct MemoryStore {
    results: Cache<String, Arc<Stored>>,
    leases: Mutex<Leases>,
    lease: Duration,
}

/// Request ids in flight and when their leases expire.
struct Leases {
    until: HashMap<String, Instant>,
    /// Sweep expired leases once the map is this large.
    sweep_at: usize,
}

/// Bytes an entry of the memory store costs besides its key, fingerprint and body: the
/// cache's own bookkeeping, roughly.
const ENTRY_OVERHEAD: usize = 128;

/// The smallest map size at which expired leases are swept.
const LEASE_SWEEP_MIN: usize = 1024;

impl MemoryStore {
    fn new(max_bytes: u64, ttl: Duration, lease: Duration) -> Self {
        Self {
            results: Cache::builder()
                .eviction_policy(EvictionPolicy::lru())
                .max_capacity(max_bytes)
                .weigher(|key: &String, stored: &Arc<Stored>| {
                    let bytes = key.len() + stored.fingerprint.len() + stored.body.len();
                    u32::try_from(bytes + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .build(),
            leases: Mutex::new(Leases {
                until: HashMap::new(),
                sweep_at: LEASE_SWEEP_MIN,
            }),
            lease,
        }
    }

    fn leases(&self) -> MutexGuard<'_, Leases> {
        // The map holds plain values; a panic while it was locked leaves nothing half-done.
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn claim(&self, request_id: &str, fingerprint: &str) -> Claim {
        if let Some(stored) = self.results.get(request_id).await {
            return stored.claim(fingerprint);
        }
        let now = Instant::now();
        let mut leases = self.leases();
        if leases
            .until
            .get(request_id)
            .is_some_and(|until| *until > now)
        {
            return Claim::Busy;
        }
        leases
            .until
            .insert(request_id.to_string(), now + self.lease);
        if leases.until.len() >= leases.sweep_at {
            leases.until.retain(|_, until| *until > now);
            leases.sweep_at = (leases.until.len() * 2).max(LEASE_SWEEP_MIN);
        }
        Claim::Acquired
    }

    /// Stores the result unless one is stored already (the first answer is the answer); the
    /// lease goes with it.
    async fn save(&self, request_id: &str, fingerprint: &str, body: &[u8]) {
        if !self.results.contains_key(request_id) {
            let stored = Stored {
                fingerprint: fingerprint.to_string(),
                body: body.to_vec(),
            };
            self.results
                .insert(request_id.to_string(), Arc::new(stored))
                .await;
        }
        self.leases().until.remove(request_id);
    }

    /// Extends the lease for another attempt.
    fn renew(&self, request_id: &str) {
        let until = Instant::now() + self.lease;
        self.leases().until.insert(request_id.to_string(), until);
    }

    /// Gives the lease up.
    fn release(&self, request_id: &str) {
        self.leases().until.remove(request_id);
    }
}

/// The fleet-wide store.
pub struct RedisStore {
    conn: LazyConnection,
    prefix: String,
    ttl: Duration,
    lease: Duration,
    outage: Outage,
}

/// Since when every claim has failed: the outage the requests held up back off by.
#[derive(Default)]
struct Outage(Mutex<Option<Instant>>);

impl Outage {
    /// A claim succeeded (the outage, if any, is over) or failed (one begins, or goes on).
    fn note(&self, ok: bool) {
        let mut since = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            *since = None;
        } else {
            since.get_or_insert_with(Instant::now);
        }
    }

    /// How long it has lasted so far.
    fn length(&self) -> Duration {
        let since = *self.0.lock().unwrap_or_else(|e| e.into_inner());
        since.map_or(Duration::ZERO, |since| since.elapsed())
    }
}

impl RedisStore {
    /// The connection; concurrent callers share one connect attempt, each waiting at most
    /// [`REDIS_TIMEOUT`], so a blackholed Redis does not queue deliveries behind each other.
    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        self.conn.get().await.map_err(|e| StoreError(e.to_string()))
    }

    fn result_key(&self, id: &str) -> String {
        super::keys::result(&self.prefix, id)
    }

    fn lease_key(&self, id: &str) -> String {
        super::keys::lease(&self.prefix, id)
    }

    async fn claim(
        &self,
        request_id: &str,
        worker: &str,
        fingerprint: &str,
    ) -> Result<Claim, StoreError> {
        let mut conn = self.conn().await?;
        let stored: Option<Vec<u8>> = conn
            .get(self.result_key(request_id))
            .await
            .map_err(redis_error)?;
        if let Some(value) = stored {
            return Ok(Stored::decode(value).claim(fingerprint));
        }
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(millis(self.lease)));
        let acquired: Option<String> = conn
            .set_options(self.lease_key(request_id), worker, opts)
            .await
            .map_err(redis_error)?;
        if acquired.is_none() {
            return Ok(Claim::Busy);
        }
        // A result saved between the lookup and the lease: no second call.
        let stored: Option<Vec<u8>> = conn
            .get(self.result_key(request_id))
            .await
            .map_err(redis_error)?;
        if let Some(value) = stored {
            self.release(request_id, worker).await;
            return Ok(Stored::decode(value).claim(fingerprint));
        }
        Ok(Claim::Acquired)
    }

    async fn save(
        &self,
        request_id: &str,
        worker: &str,
        fingerprint: &str,
        body: &[u8],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::EX(self.ttl.as_secs().max(1)));
        let _: Option<String> = conn
            .set_options(
                self.result_key(request_id),
                Stored::encode(fingerprint, body),
                opts,
            )
            .await
            .map_err(redis_error)?;
        self.release(request_id, worker).await;
        Ok(())
    }

    async fn renew(&self, request_id: &str, worker: &str) {
        if let Ok(mut conn) = self.conn().await {
            let _: Result<i64, _> = Script::new(RENEW_IF_OWNER)
                .key(self.lease_key(request_id))
                .arg(worker)
                .arg(millis(self.lease))
                .invoke_async(&mut conn)
                .await;
        }
    }

    async fn release(&self, request_id: &str, worker: &str) {
        if let Ok(mut conn) = self.conn().await {
            let _: Result<i64, _> = Script::new(DELETE_IF_OWNER)
                .key(self.lease_key(request_id))
                .arg(worker)
                .invoke_async(&mut conn)
                .await;
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Redis errors can quote the URL; keep only the kind and the server's words.
fn redis_error(e: redis::RedisError) -> StoreError {
    StoreError(format!(
        "{:?}: {}",
        e.kind(),
        e.detail().unwrap_or("no detail")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fingerprint (any 64 characters).
    const FP: &str = "0000000000000000000000000000000000000000000000000000000000000001";
    const OTHER: &str = "0000000000000000000000000000000000000000000000000000000000000002";

    fn memory() -> Store {
        Store::Memory(Arc::new(MemoryStore::new(
            1 << 20,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )))
    }

    #[tokio::test]
    async fn lease_then_result() {
        let s = memory();
        assert_eq!(s.claim("a", "w1", FP).await.unwrap(), Claim::Acquired);
        assert_eq!(s.claim("a", "w2", FP).await.unwrap(), Claim::Busy);
        s.save("a", "w1", FP, b"{\"ok\":1}").await.unwrap();
        s.save("a", "w2", FP, b"{\"ok\":2}").await.unwrap();
        assert_eq!(
            s.claim("a", "w2", FP).await.unwrap(),
            Claim::Done(b"{\"ok\":1}".to_vec())
        );
    }

    #[tokio::test]
    async fn released_lease_can_be_taken_again() {
        let s = memory();
        assert_eq!(s.claim("b", "w1", FP).await.unwrap(), Claim::Acquired);
        s.release("b", "w1").await;
        assert_eq!(s.claim("b", "w2", FP).await.unwrap(), Claim::Acquired);
    }

    #[tokio::test]
    async fn a_stored_result_survives_renew_and_release() {
        let s = memory();
        assert_eq!(s.claim("d", "w1", FP).await.unwrap(), Claim::Acquired);
        s.renew("d", "w1").await;
        assert_eq!(
            s.claim("d", "w1", FP).await.unwrap(),
            Claim::Busy,
            "renewed lease"
        );
        s.save("d", "w1", FP, b"r").await.unwrap();
        s.renew("d", "w1").await;
        s.release("d", "w1").await;
        assert_eq!(
            s.claim("d", "w1", FP).await.unwrap(),
            Claim::Done(b"r".to_vec())
        );
    }

    #[tokio::test]
    async fn leases_and_results_expire_on_their_own_clocks() {
        let s = Store::Memory(Arc::new(MemoryStore::new(
            1 << 20,
            Duration::from_secs(3600),
            Duration::from_millis(20),
        )));
        assert_eq!(s.claim("e", "w1", FP).await.unwrap(), Claim::Acquired);
        s.save("f", "w1", FP, b"kept").await.unwrap();
        // moka keeps its own clock, so wait on the condition: the lease lapses, another
        // worker gets it.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while s.claim("e", "w2", FP).await.unwrap() == Claim::Busy {
            assert!(
                std::time::Instant::now() < deadline,
                "the lease never lapsed"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(
            s.claim("f", "w2", FP).await.unwrap(),
            Claim::Done(b"kept".to_vec())
        );
    }

    #[tokio::test]
    async fn leases_in_flight_are_never_evicted_for_room() {
        let s = Store::Memory(Arc::new(MemoryStore::new(
            2,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )));
        let ids: Vec<String> = (0..(LEASE_SWEEP_MIN + 10))
            .map(|i| format!("id-{i}"))
            .collect();
        for id in &ids {
            assert_eq!(s.claim(id, "w1", FP).await.unwrap(), Claim::Acquired);
        }
        for id in &ids {
            assert_eq!(
                s.claim(id, "w2", FP).await.unwrap(),
                Claim::Busy,
                "{id} leased once"
            );
        }
    }

    #[tokio::test]
    async fn a_different_request_under_a_stored_key_is_a_conflict() {
        let s = memory();
        assert_eq!(s.claim("g", "w1", FP).await.unwrap(), Claim::Acquired);
        s.save("g", "w1", FP, b"answer").await.unwrap();
        assert_eq!(s.claim("g", "w2", OTHER).await.unwrap(), Claim::Conflict);
        assert_eq!(
            s.claim("g", "w2", FP).await.unwrap(),
            Claim::Done(b"answer".to_vec())
        );
    }

    #[tokio::test]
    async fn the_memory_store_is_bounded_in_bytes() {
        let m = MemoryStore::new(256 * 1024, Duration::from_secs(60), Duration::from_secs(60));
        // 100 results of 20 KB (a 1536-dimension embedding) weigh 2 MB: most must go.
        let body = vec![b'x'; 20_000];
        for i in 0..100 {
            m.save(&format!("big-{i}"), FP, &body).await;
        }
        m.results.run_pending_tasks().await;
        assert!(
            m.results.weighted_size() <= 256 * 1024,
            "{} bytes kept",
            m.results.weighted_size()
        );
        assert!(
            m.results.entry_count() <= 12,
            "{} kept",
            m.results.entry_count()
        );
    }

    /// Past its bytes, the store keeps the newest results and lets the least recently used
    /// go, however often the old ones were read: a duplicate of a recent request is
    /// answered from the store.
    #[tokio::test]
    async fn a_full_memory_store_keeps_the_most_recent_results() {
        let m = MemoryStore::new(256 * 1024, Duration::from_secs(60), Duration::from_secs(60));
        let body = vec![b'x'; 20_000];
        let weight = "old-00".len() + FP.len() + body.len() + ENTRY_OVERHEAD;
        // How many results of this size the store holds: 12.
        let room = 256 * 1024 / weight;
        assert_eq!(room, 12);
        // Old results, each read several times (duplicates answered from the store).
        for i in 0..room {
            let id = format!("old-{i:02}");
            m.save(&id, FP, &body).await;
            for _ in 0..5 {
                assert_eq!(m.claim(&id, FP).await, Claim::Done(body.clone()));
            }
        }
        m.results.run_pending_tasks().await;
        // Then twice as many new ones, never read.
        for i in 0..2 * room {
            m.save(&format!("new-{i:02}"), FP, &body).await;
        }
        m.results.run_pending_tasks().await;
        let mut missing = Vec::new();
        for id in (room..2 * room).map(|i| format!("new-{i:02}")) {
            if m.claim(&id, FP).await != Claim::Done(body.clone()) {
                missing.push(id);
            }
        }
        assert!(
            missing.is_empty(),
            "the newest results were not kept: {missing:?}"
        );
        assert_eq!(m.results.entry_count(), room as u64);
    }

    #[test]
    fn redis_values_carry_their_fingerprint() {
        let value = Stored::encode(FP, b"{\"ok\":1}");
        let stored = Stored::decode(value);
        assert_eq!(stored.claim(FP), Claim::Done(b"{\"ok\":1}".to_vec()));
        assert_eq!(stored.claim(OTHER), Claim::Conflict);
        assert_eq!(Stored::decode(b"short".to_vec()).claim(FP), Claim::Conflict);
    }

    #[tokio::test]
    async fn off_always_acquires() {
        let s = Store::Off;
        s.save("c", "w", FP, b"x").await.unwrap();
        assert_eq!(s.claim("c", "w", FP).await.unwrap(), Claim::Acquired);
    }
}
