//! State kept beside the broker: idempotency (stored results and leases by request id), the
//! fleet's cancels, the Redis connection they and the shared budgets make on first use, and
//! every Redis key's layout ([`keys`]).

pub mod cancels;
pub mod idempotency;
pub mod keys;
pub mod redis_conn;
