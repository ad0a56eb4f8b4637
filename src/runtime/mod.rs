//! What every part of the service uses while it runs: metrics, logs and shutdown.

pub mod clock;
pub mod logs;
pub mod metrics;
pub mod shutdown;
