//! What a consumer slot subscribes to and how much each of its consumers takes at once: its
//! [`Plan`]. RabbitMQ applies `basic.qos` to the consumers created after it, so a new plan
//! means new consumers ([`super::subscribe`] does that).
//!
//! Chat: every lane in use, each consumer with an equal share of the concurrency limit plus
//! a quarter, the work queue's and each lane's alike: a tenant whose requests are in its
//! lane has as many in hand as one in the work queue.
//!
//! Embeddings: a batched call carries up to `batch.max_items` requests, so their consumers
//! take that many times more, up to `batch.max_buffered_bytes` in bodies as large as
//! `worker.max_body_bytes` (RabbitMQ ignores a prefetch in bytes). That budget is shared
//! between the work queue and the lanes that hold messages ([`Plan::new`]'s `busy`): a
//! replica consumes an embeddings lane only while it holds messages or did a moment ago, so
//! that a tenant moved to its lane still fills whole batches while the bodies in hand stay
//! within the budget, however many lanes exist.

use crate::{config::Config, contract::request::Kind};

/// The lanes to consume of each work queue (chat, embeddings), by number.
pub(super) type LaneSet = [Vec<u16>; 2];

/// What one consumer slot consumes, and with which prefetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// The prefetch of each consumer, chat then embeddings: the work queue's and each
    /// lane's alike.
    prefetch: [u16; 2],
    /// The lanes consumed, of each work queue.
    pub lanes: LaneSet,
}

impl Plan {
    /// The plan under the concurrency limit `limit`, with the lanes `in_use` (those that
    /// exist); an embeddings lane is consumed when `busy` says it holds messages.
    pub fn new(
        config: &Config,
        limit: usize,
        in_use: &LaneSet,
        busy: impl Fn(u16) -> bool,
    ) -> Self {
        let [chat, embeddings] = in_use;
        let embeddings: Vec<u16> = embeddings.iter().copied().filter(|l| busy(*l)).collect();
        // The work queue and each busy lane take an equal part of the byte budget.
        let parts = 1 + embeddings.len();
        Self {
            prefetch: [
                by_limit(config, limit, Kind::Chat),
                by_limit(config, limit, Kind::Embedding).min(embeddings_by_bytes(config, parts)),
            ],
            lanes: [chat.clone(), embeddings],
        }
    }

    /// The prefetch of each `kind` consumer.
    pub fn prefetch(&self, kind: Kind) -> u16 {
        self.prefetch[kind.index()]
    }
}

/// The embeddings consumers' prefetch that keeps their buffered bodies within
/// `batch.max_buffered_bytes` when `parts` queues (the work queue and its busy lanes) share
/// it; at least 1.
fn embeddings_by_bytes(config: &Config, parts: usize) -> u16 {
    let body = u64::try_from(config.worker.max_body_bytes.max(1)).unwrap_or(u64::MAX);
    let consumers = u64::from(config.worker.consumers.max(1));
    let parts = u64::try_from(parts.max(1)).unwrap_or(u64::MAX);
    let each = config.batch.max_buffered_bytes / body / consumers / parts;
    u16::try_from(each.max(1)).unwrap_or(u16::MAX)
}

/// Fixed by `worker.prefetch`, else an equal share of the limit (in requests) plus a
/// quarter.
fn by_limit(config: &Config, limit: usize, kind: Kind) -> u16 {
    if config.worker.prefetch > 0 {
        return config.worker.prefetch;
    }
    let per_call = match kind {
        Kind::Chat => 1,
        Kind::Embedding => config.batch.max_items.max(1),
    };
    let consumers = usize::from(config.worker.consumers.max(1));
    // A quarter more than the calls allowed: deliveries whose result is being confirmed still
    // count against the prefetch, and a few waiting ones let the highest priority go first.
    let wanted = limit.saturating_mul(per_call).saturating_mul(5) / 4;
    let share = wanted.div_ceil(consumers).max(1);
    u16::try_from(share).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_lanes() -> LaneSet {
        [(0..16).collect(), (0..16).collect()]
    }

    fn idle(_: u16) -> bool {
        false
    }

    #[test]
    fn prefetch_follows_the_limit_with_headroom() {
        let mut c = Config::default();
        c.worker.consumers = 4;
        c.batch.max_items = 64;
        c.worker.max_body_bytes = 1024;
        let plan = |c: &Config, limit| Plan::new(c, limit, &all_lanes(), idle);
        assert_eq!(plan(&c, 256).prefetch(Kind::Chat), 80);
        assert_eq!(plan(&c, 4).prefetch(Kind::Chat), 2);
        assert_eq!(
            plan(&c, 16).prefetch(Kind::Embedding),
            320,
            "a batched call carries 64"
        );
        assert_eq!(plan(&c, 100_000).prefetch(Kind::Embedding), u16::MAX);
        c.worker.max_body_bytes = 1024 * 1024;
        assert_eq!(
            plan(&c, 256).prefetch(Kind::Embedding),
            64,
            "256 MiB of 1 MiB bodies, shared by 4 consumers"
        );
        assert_eq!(
            plan(&c, 256).prefetch(Kind::Chat),
            80,
            "chat is not bounded by bytes"
        );
        c.batch.max_buffered_bytes = 1024 * 1024;
        assert_eq!(plan(&c, 256).prefetch(Kind::Embedding), 1, "at least one");
        c.worker.prefetch = 7;
        assert_eq!(
            plan(&c, 256).prefetch(Kind::Chat),
            7,
            "a fixed prefetch wins"
        );
    }

    #[test]
    fn busy_embeddings_lanes_share_the_byte_budget_with_the_work_queue() {
        let mut c = Config::default();
        c.worker.consumers = 4;
        c.batch.max_items = 64;
        c.worker.max_body_bytes = 1024 * 1024;
        let lanes = all_lanes();
        let none = Plan::new(&c, 256, &lanes, idle);
        assert_eq!(
            none.lanes,
            [lanes[0].clone(), vec![]],
            "every chat lane, no idle embeddings lane"
        );
        assert_eq!(none.prefetch(Kind::Embedding), 64);
        let one = Plan::new(&c, 256, &lanes, |l| l == 3);
        assert_eq!(one.lanes[1], [3]);
        assert_eq!(
            one.prefetch(Kind::Embedding),
            32,
            "half the budget to the work queue, half to the lane: a tenant moved there still fills a batch"
        );
        let all = Plan::new(&c, 256, &lanes, |_| true);
        assert_eq!(all.prefetch(Kind::Embedding), 3, "256 / 4 / 17");
        assert_eq!(all.prefetch(Kind::Chat), 80, "chat is not bounded by bytes");
        // The bound holds however many are busy: (1 + busy) x prefetch x consumers bodies.
        for busy in 0..16u16 {
            let plan = Plan::new(&c, 256, &lanes, |l| l < busy);
            let bodies = (1 + u64::from(busy)) * u64::from(plan.prefetch(Kind::Embedding)) * 4;
            assert!(
                bodies * 1024 * 1024 <= c.batch.max_buffered_bytes,
                "{busy} busy lanes"
            );
        }
    }
}
