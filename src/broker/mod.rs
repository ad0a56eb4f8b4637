//! The broker: connections, the topology, confirmed publishing and the delayed-retry tiers.

pub mod confirm;
pub mod connection;
pub mod impersonation;
pub mod publish;
pub mod retry;
pub mod returns;
pub mod topology;
