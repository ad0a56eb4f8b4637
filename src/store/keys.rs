//! Every Redis key llmq reads or writes, in one place. Two prefixes divide them:
//! `idempotency.key_prefix` (results, leases, cancel tombstones: the request's own state)
//! and `limits.key_prefix` (what the fleet shares about deployments and tenants: rate
//! buckets, standing, tenants' calls in flight, usage).
//!
//! | key | type | written by |
//! | --- | --- | --- |
//! | `<idempotency>:result:<scoped id>` | string | the idempotency store |
//! | `<idempotency>:lease:<scoped id>` | string | the idempotency store |
//! | `<idempotency>:cancels:<identity>` | sorted set of request ids, scored with when each is let go (Unix ms) | cancels heard on the control exchange, at most `worker.max_cancels_per_identity` per identity |
//! | `<limits>:requests`, `<limits>:tokens` | bucket | the `default` deployment's per-minute limits |
//! | `<limits>:<deployment>:requests`, `...:tokens` | bucket | a deployment's per-minute limits |
//! | `<limits>:upstream:<deployment>` | hash | the fleet's standing of a deployment |
//! | `<limits>:tenant:<tenant>:requests`, `...:tokens` | bucket | a tenant's per-minute limits |
//! | `<limits>:tenant:<tenant>:inflight` | sorted set | a tenant's calls in flight, fleet-wide |
//! | `<limits>:usage:<YYYY-MM-DD>`, `<limits>:usage:<YYYY-MM>` | hash of `usd:<tenant>`, `tokens:<tenant>` | the ledger |
//!
//! A `<scoped id>` is the request id scoped by its sender's identity
//! ([`crate::contract::Identity::scope`]); a `<tenant>` or an `<identity>` in a key is
//! [`tenant_segment`]'s.

/// A stored result: `<prefix>:result:<id>`.
pub fn result(prefix: &str, id: &str) -> String {
    format!("{prefix}:result:{id}")
}

/// A lease on a request being settled: `<prefix>:lease:<id>`.
pub fn lease(prefix: &str, id: &str) -> String {
    format!("{prefix}:lease:{id}")
}

/// The cancels of one identity: `<prefix>:cancels:<identity>`.
pub fn cancels(prefix: &str, identity: &str) -> String {
    format!("{prefix}:cancels:{}", tenant_segment(identity))
}

/// What goes before a per-minute bucket's name: the limits prefix, with the scope (a
/// deployment's name, or [`tenant_scope`]) when there is one. The `default` deployment has
/// none (the keys of the versions before `[upstreams]`).
pub fn bucket_prefix(prefix: &str, scope: Option<&str>) -> String {
    match scope {
        Some(scope) => format!("{prefix}:{scope}"),
        None => prefix.to_string(),
    }
}

/// A per-minute bucket (`requests` or `tokens`) under a [`bucket_prefix`].
pub fn bucket(bucket_prefix: &str, name: &str) -> String {
    format!("{bucket_prefix}:{name}")
}

/// The fleet's standing of a deployment: `<prefix>:upstream:<name>`.
pub fn upstream(prefix: &str, name: &str) -> String {
    format!("{prefix}:upstream:{name}")
}

/// A tenant's scope under the limits prefix: `tenant:<tenant>`.
pub fn tenant_scope(tenant: &str) -> String {
    format!("tenant:{}", tenant_segment(tenant))
}

/// A tenant's calls in flight, fleet-wide: `<prefix>:tenant:<tenant>:inflight`.
pub fn tenant_inflight(prefix: &str, tenant: &str) -> String {
    format!("{prefix}:{}:inflight", tenant_scope(tenant))
}

/// A tenant's name as a key segment: `%` and `:` escaped, so no two names share keys.
pub fn tenant_segment(tenant: &str) -> String {
    tenant.replace('%', "%25").replace(':', "%3A")
}

/// The ledger's hash for one day (`YYYY-MM-DD`) or month (`YYYY-MM`):
/// `<prefix>:usage:<period>`.
pub fn usage(prefix: &str, period: &str) -> String {
    format!("{prefix}:usage:{period}")
}

/// A field of a [`usage`] hash: `usd:<tenant>` (micro-dollars) or `tokens:<tenant>`.
pub fn usage_field(what: &str, tenant: &str) -> String {
    format!("{what}:{tenant}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layouts are what running fleets and `llmq usage` already read: pinned.
    #[test]
    fn layouts_are_pinned() {
        assert_eq!(result("llmq", "alice/r1"), "llmq:result:alice/r1");
        assert_eq!(lease("llmq", "r1"), "llmq:lease:r1");
        assert_eq!(cancels("llmq", "a:b%c"), "llmq:cancels:a%3Ab%25c");
        assert_eq!(bucket(&bucket_prefix("l", None), "tokens"), "l:tokens");
        assert_eq!(
            bucket(&bucket_prefix("l", Some("east")), "requests"),
            "l:east:requests"
        );
        assert_eq!(upstream("l", "east"), "l:upstream:east");
        assert_eq!(tenant_inflight("l", "a:b%c"), "l:tenant:a%3Ab%25c:inflight");
        assert_eq!(
            bucket(&bucket_prefix("l", Some(&tenant_scope("bob"))), "tokens"),
            "l:tenant:bob:tokens"
        );
        assert_eq!(usage("l", "2026-12-07"), "l:usage:2026-12-07");
        assert_eq!(usage_field("usd", "bob"), "usd:bob");
    }

    #[test]
    fn distinct_tenants_never_share_a_segment() {
        assert_ne!(tenant_segment("a:b"), tenant_segment("a%3Ab"));
        assert_eq!(tenant_segment("plain"), "plain");
    }
}
