//! What a replica may hold in memory by its own bounds, for sizing its container: its memory
//! limit must be at least [`Config::memory_floor_bytes`], or the replica can be killed for
//! memory again and again on the same backlog, and the requests it held end as
//! `redelivery_limit`. The README's Operations section states the same sum.

use super::{Config, StoreKind};

const MIB: u64 = 1024 * 1024;

/// Memory a replica uses besides what its bounds count: the runtime, the two broker
/// connections' frame buffers, the HTTP clients and the answers being read. The benchmarks
/// measure 73 to 97 MiB at a thousand calls in flight; this is that, rounded up.
pub const BASE_BYTES: u64 = 128 * MIB;

impl Config {
    /// The most bytes of requests and results this configuration lets a replica hold: the
    /// embedding bodies it buffers (`batch.max_buffered_bytes`), the results the memory
    /// store keeps (`idempotency.memory_max_bytes`, with `store = "memory"`), and the chat
    /// requests its work queue's consumers prefetch, each as large as `worker.max_body_bytes`
    /// allows (a quarter more than `worker.max_inflight`, or `worker.prefetch` per consumer
    /// when it is set). Each chat lane holding requests adds as much again as the chat
    /// prefetch; that is not counted here.
    pub fn held_bytes(&self) -> u64 {
        let body = u64::try_from(self.worker.max_body_bytes).unwrap_or(u64::MAX);
        let chat_prefetch = match self.worker.prefetch {
            0 => u64::from(self.worker.max_inflight) * 5 / 4,
            each => u64::from(each).saturating_mul(u64::from(self.worker.consumers)),
        };
        let store = match self.idempotency.store {
            StoreKind::Memory => self.idempotency.memory_max_bytes,
            StoreKind::Off | StoreKind::Redis => 0,
        };
        self.batch
            .max_buffered_bytes
            .saturating_add(store)
            .saturating_add(chat_prefetch.saturating_mul(body))
    }

    /// The least memory limit for a replica's container: [`Self::held_bytes`] plus
    /// [`BASE_BYTES`].
    pub fn memory_floor_bytes(&self) -> u64 {
        self.held_bytes().saturating_add(BASE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_hold_the_embeddings_budget_the_store_and_the_chat_prefetch() {
        let c = Config::default();
        // 256 MiB of embedding bodies, 32 MiB of results, 320 chat bodies of 1 MiB.
        assert_eq!(c.held_bytes(), (256 + 32 + 320) * MIB);
        assert_eq!(c.memory_floor_bytes(), 736 * MIB);
        let mut c = Config::default();
        c.idempotency.store = StoreKind::Redis;
        c.worker.prefetch = 10;
        c.worker.consumers = 2;
        c.worker.max_body_bytes = 64 * 1024;
        assert_eq!(c.held_bytes(), 256 * MIB + MIB + MIB / 4);
    }

    /// The `resources.limits.memory` of the worker's container, in bytes.
    fn memory_limit(deployment: &str) -> u64 {
        let mut lines = deployment.lines().skip_while(|l| l.trim() != "limits:");
        let value = lines
            .find_map(|l| l.trim().strip_prefix("memory:"))
            .expect("resources.limits.memory")
            .trim();
        let (number, unit) = value.split_at(
            value
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(value.len()),
        );
        let number: u64 = number.parse().expect("a whole number");
        number
            * match unit {
                "Mi" => MIB,
                "Gi" => 1024 * MIB,
                other => panic!("unit {other:?}"),
            }
    }

    /// The `config.toml` of the ConfigMap, as the worker reads it.
    fn configmap_config(configmap: &str) -> Config {
        let toml: String = configmap
            .lines()
            .skip_while(|l| l.trim() != "config.toml: |")
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        toml::from_str(&toml).expect("the ConfigMap's config.toml parses")
    }

    /// The shipped Kubernetes manifests give a replica more memory than its configuration
    /// lets it hold, with room to spare: a full embeddings buffer, a full store and a chat
    /// prefetch of the largest bodies do not get it killed.
    #[test]
    fn the_shipped_memory_limit_covers_the_worker_s_bounds() {
        let limit = memory_limit(include_str!("../../deploy/kubernetes/deployment.yaml"));
        let config = configmap_config(include_str!("../../deploy/kubernetes/configmap.yaml"));
        assert_eq!(config.worker.max_inflight, 256, "the ConfigMap was read");
        let floor = config.memory_floor_bytes();
        assert!(
            limit >= floor + floor / 4,
            "limit {} MiB, floor {} MiB: at least a quarter above",
            limit / MIB,
            floor / MIB
        );
    }
}
