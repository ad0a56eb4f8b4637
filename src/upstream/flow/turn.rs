//! A call's turn among the calls waiting toward a deployment: its tenant, the tenant's
//! weight and its priority. Both queues of a deployment rank their waiters by it: the slots'
//! waiters ([`super::limit`]) and the line for the per-minute budgets ([`super::line`]).

use std::hash::{DefaultHasher, Hash, Hasher};

/// Whose call waits for a slot or a budget, and how it ranks: its tenant and the tenant's
/// weight decide between tenants, its priority within the tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// The request's priority (0 to the work queue's `x-max-priority`).
    pub priority: u8,
    /// Its tenant, hashed ([`Turn::tenant_key`]).
    pub tenant: u64,
    /// The tenant's share under contention, at least 1.
    pub weight: u32,
}

impl Turn {
    /// A call of `tenant`, whose weight is `weight`, at `priority`.
    pub fn new(tenant: &str, weight: u32, priority: u8) -> Self {
        Self {
            priority,
            tenant: Self::tenant_key(tenant),
            weight: weight.max(1),
        }
    }

    /// A call of no tenant in particular (tools, tests): all such calls share one turn.
    pub fn anyone(priority: u8) -> Self {
        Self {
            priority,
            tenant: 0,
            weight: 1,
        }
    }

    /// The key a tenant's name is waited under. Only compared within this process.
    pub fn tenant_key(tenant: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        tenant.hash(&mut hasher);
        hasher.finish()
    }
}
