//! Tenants: every request belongs to one, its [`crate::contract::Identity`] (the AMQP
//! `user_id`, or `tenancy.header` behind a trusted gateway).
//!
//! - `cost`: what an answer cost, from `[prices]`, in whole micro-dollars;
//! - `spend`: what each tenant spent, used and asked for per UTC day and month (per
//!   replica, and fleet-wide in Redis), which its budgets are checked against.

pub mod cost;
pub mod spend;
