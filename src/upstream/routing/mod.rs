//! Choosing a deployment:
//! - `router`: which deployment (and which model, after fallbacks) serves a call, and
//!   `route`: what a request's routing remembers between attempts, and what became of a call;
//! - `standing`: which deployments may serve which model now (cooldowns, spent accounts,
//!   refusals, circuit breakers), per replica or fleet-wide, and `fleet`: that standing in
//!   Redis, read and written by every replica; `out`: what both say of a deployment held
//!   out (why, of which models); `refusals`: the refusals in a row not confirmed yet;
//!   `probe`: the one call a half-open breaker lets through;
//! - `deployment`: one deployment and the one place a call to it is made and accounted for;
//! - `report`: each deployment's state, for `/upstreams` and `/metrics`.

pub mod deployment;
mod fleet;
pub mod out;
mod probe;
mod refusals;
pub mod report;
pub mod route;
pub mod router;
pub mod standing;
