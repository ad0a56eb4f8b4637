//! Flow control: when a call may start.
//! - `admission`: what a call carries to be let in (turn, tokens, latest start, stop);
//! - `share`: its tenant's turn (weight) and caps (calls at once, per-minute budgets);
//! - `limit`: a deployment's concurrency limit (AIMD), its waiters by priority;
//! - `line`: the calls waiting for a deployment's budgets, served by what they are charged;
//! - `ratelimit`: a deployment's per-minute request and token budgets;
//! - `turn`: how a waiting call ranks (its tenant, the tenant's weight, its priority), by
//!   which both `limit` and `line` serve their waiters.

pub mod admission;
pub mod limit;
pub mod line;
pub mod ratelimit;
pub mod share;
pub mod turn;
