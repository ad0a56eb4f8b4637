//! Choosing a deployment:
//! - `router`: which deployment (and which model, after fallbacks) serves a call;
//! - `standing`: which deployments may serve which model now (cooldowns, spent accounts,
//!   refusals, circuit breakers), per replica or fleet-wide;
//! - `deployment`: one deployment and the one place a call to it is made and accounted for.

pub mod deployment;
pub mod router;
pub mod standing;
