//! The worker: the path of one delivery, and the connection and consumers that bring it.
//!
//! - `lifecycle`: a broker connection kept alive (reconnect with backoff, redeclare the
//!   topology), then draining in-flight work at shutdown.
//! - `subscribe`: `worker.consumers` slots, each a consuming channel subscribed to both
//!   work queues and their lanes with a prefetch that follows the concurrency limit, and its
//!   own confirm-mode publishing channel. Every delivery is handled in its own task.
//! - [`lanes`]: fair share: a request of a tenant over its share while requests wait moves
//!   from the work queue to its tenant's lane instead of being settled here.
//! - `settle`: one delivery: parse ([`crate::contract::request`]), then ask [`decide`]
//!   what to do and carry it out: the idempotency store ([`crate::store`]), an upstream
//!   attempt ([`crate::upstream::call`]), a wait, and finally a confirmed publish
//!   ([`crate::broker::publish`]) and only then the ack. A delivery whose outcome cannot be
//!   confirmed is handed back to its queue, never acked.
//! - [`decide`] and [`policy`]: the decision, pure, tested branch by branch.
//! - [`health`]: readiness and the queue depths for the admin endpoints.

mod ack;
mod attempt;
pub mod cancel;
pub mod decide;
pub mod health;
pub mod lanes;
mod lifecycle;
pub mod policy;
mod prefetch;
mod settle;
mod stream;
mod subscribe;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

pub use health::Health;

use crate::{
    config::{Config, OTHER_TENANTS, Tenants},
    contract::Rules,
    runtime::metrics::{Known, Metrics},
    store::idempotency::Store,
    tenant::{cost::Prices, spend::Ledger},
    upstream::{
        call::Upstream,
        failure::{CALL_LABELS, RETRY_LABELS},
        routing::router::Router,
    },
    worker::policy::RetryPolicy,
};

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The HTTP client could not be built.
    #[error("cannot build the upstream HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The idempotency store is misconfigured.
    #[error(transparent)]
    Store(#[from] crate::store::idempotency::StoreError),
    /// `worker.reply_to_pattern` does not compile (validation reports it first).
    #[error("worker.reply_to_pattern: {0}")]
    ReplyToPattern(#[from] regex::Error),
    /// `amqp.urls` is an empty list (validation reports it first).
    #[error("amqp.urls: no broker address to connect to")]
    NoBroker,
    /// The broker holds a topology the worker must not consume as it is (a queue of the
    /// other type than `topology.queue_type`): waiting would not change it.
    #[error(transparent)]
    Topology(#[from] crate::broker::topology::DeclareError),
}

/// What every delivery task shares.
struct Context {
    config: Config,
    /// What a request may ask for, built from `config` once.
    rules: Rules,
    upstream: Upstream,
    policy: RetryPolicy,
    store: Store,
    /// How often a lease is renewed while its attempt runs (half the lease): a call that
    /// waits long for a slot or a budget keeps its lease, so a duplicate is not called
    /// beside it.
    lease_renewal: Duration,
    /// Readiness for the admin endpoints.
    health: Arc<Health>,
    /// Cancels heard on the control exchange, and the requests being settled here.
    cancels: Arc<cancel::Cancels>,
    /// Every tenant's limits and budgets.
    tenants: Tenants,
    /// Who holds what here, and which tenants' requests go to their lane.
    lanes: lanes::Lanes,
    /// What models cost.
    prices: Prices,
    /// What each tenant spent.
    ledger: Ledger,
    /// Prometheus metrics.
    metrics: Arc<Metrics>,
    /// Cancelled on shutdown: stop taking deliveries, cut retry waits short.
    stop: CancellationToken,
    /// Cancelled when the shutdown grace period is over: abandon upstream calls.
    abort: CancellationToken,
    /// Why the worker stopped on its own at start-up, for [`Worker::run`] to return.
    refused: std::sync::Mutex<Option<WorkerError>>,
}

impl Context {
    /// This replica's name.
    fn worker(&self) -> &str {
        self.upstream.worker()
    }

    /// Stops the worker for good because of `why`, which [`Worker::run`] returns once the
    /// worker is stopped.
    fn refuse(&self, why: impl Into<WorkerError>) {
        if let Ok(mut refused) = self.refused.lock() {
            refused.get_or_insert(why.into());
        }
        self.stop.cancel();
    }
}

/// The label values of the metrics that the configuration names: each gets a zeroed series
/// at start-up.
fn known_labels(config: &Config, tenants: &Tenants) -> Known {
    let routing = &config.routing;
    let fallbacks = routing
        .fallbacks
        .iter()
        .chain(&routing.context_window_fallbacks);
    let topo = &config.topology;
    Known {
        upstreams: config
            .deployments()
            .into_iter()
            .map(|(name, _)| name)
            .collect(),
        call_failures: CALL_LABELS.to_vec(),
        retryable_failures: RETRY_LABELS.to_vec(),
        tenants: tenants
            .named()
            .chain([OTHER_TENANTS])
            .map(String::from)
            .collect(),
        fallbacks: fallbacks
            .flat_map(|(from, tos)| tos.iter().map(|to| (from.clone(), to.clone())))
            .collect(),
        queues: vec![
            topo.processing_queue.clone(),
            topo.embeddings_queue.clone(),
            topo.dead_letter_queue.clone(),
        ],
        cancel_drops: cancel::Dropped::ALL.map(cancel::Dropped::as_str).to_vec(),
    }
}

/// A worker, built and not yet running.
pub struct Worker {
    ctx: Arc<Context>,
}

impl Worker {
    /// Builds the deployments and their router, and the idempotency store.
    pub fn new(config: Config, shutdown: CancellationToken) -> Result<Self, WorkerError> {
        if config.amqp.addresses().is_empty() {
            return Err(WorkerError::NoBroker);
        }
        let worker = config.worker.worker_id();
        let metrics = Arc::new(Metrics::default());
        let tenants = Tenants::new(&config.tenants);
        metrics.seed(&known_labels(&config, &tenants));
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let upstream = Upstream::new(&config, metrics.clone(), worker)?;
        // With limits.redis_url, the fleet's cooldowns and breakers are read each second.
        tokio::spawn(
            upstream
                .router()
                .standing()
                .clone()
                .keep_in_sync(shutdown.clone(), crate::runtime::clock::unix_now_ms),
        );
        let lease = Duration::from_secs(config.longest_attempt_secs())
            + Duration::from_millis(config.retry.inline_max_ms)
            + Duration::from_secs(10);
        let store = Store::new(&config.idempotency, lease)?;
        let rules = config.request_rules()?;
        Ok(Self {
            ctx: Arc::new(Context {
                rules,
                policy: RetryPolicy::new(&config.retry),
                upstream,
                store,
                lease_renewal: lease / 2,
                health: Arc::default(),
                cancels: Arc::new(cancel::Cancels::new(&config, metrics.clone())),
                tenants,
                lanes: lanes::Lanes::new(
                    config.topology.lanes,
                    config.tenancy.max_tenants,
                    config.names_tenants(),
                ),
                prices: Prices::new(&config.prices),
                ledger: Ledger::new(&config),
                metrics,
                stop: shutdown,
                abort: CancellationToken::new(),
                refused: std::sync::Mutex::default(),
                config,
            }),
        })
    }

    /// The deployments, their flow control (concurrency limits, in flight, waiting) and
    /// their state.
    pub fn router(&self) -> Arc<Router> {
        self.ctx.upstream.router().clone()
    }

    /// Connection and consumer state.
    pub fn health(&self) -> Arc<Health> {
        self.ctx.health.clone()
    }

    /// The worker's Prometheus metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.ctx.metrics.clone()
    }

    /// Runs until the shutdown token is cancelled, then drains in-flight work within
    /// `worker.shutdown_grace_secs` and returns. Broker outages are waited out, not
    /// returned; a topology the worker must not consume as it is (a queue of the other type
    /// than `topology.queue_type`) stops it, and is returned.
    pub async fn run(self) -> Result<(), WorkerError> {
        // What the fleet learned about the deployments (spent accounts, open breakers) is
        // read before the first delivery, not a second after it.
        let standing = self.ctx.upstream.router().standing().clone();
        standing.sync(crate::runtime::clock::unix_now_ms()).await;
        lifecycle::run(self.ctx.clone()).await;
        let refused = match self.ctx.refused.lock() {
            Ok(mut refused) => refused.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        refused.map_or(Ok(()), Err)
    }
}
