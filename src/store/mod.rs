//! State kept beside the broker: idempotency (stored results and leases by request id), the
//! Redis connection it and the shared budgets make on first use, and every Redis key's
//! layout ([`keys`]).

pub mod idempotency;
pub mod keys;
pub mod redis_conn;
