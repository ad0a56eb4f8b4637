//! State kept beside the broker: idempotency (stored results and leases by request id), and
//! the Redis connection it and the shared budgets make on first use.

pub mod idempotency;
pub mod redis_conn;
