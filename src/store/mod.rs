//! State kept beside the broker: idempotency (stored results and leases by request id).

pub mod idempotency;
