//! The broker: connections and the broker's version, the topology and what each queue is
//! declared with, confirmed publishing and the delayed-retry tiers.

pub mod arguments;
pub mod confirm;
pub mod connection;
pub mod impersonation;
pub mod publish;
pub mod retry;
pub mod returns;
pub mod topology;
pub mod version;
