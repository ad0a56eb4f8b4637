//! The LLM side, in the order a call goes through it:
//! - `call`: one attempt for a job, turned into an outcome for the worker's decision;
//! - `share`: its tenant's turn (weight) and caps (calls at once, per-minute budgets);
//! - `batch`: embedding requests gathered into one call;
//! - `router`: which deployment (and which model, after fallbacks) serves the call;
//! - `standing`: which deployments may serve which model now (cooldowns, spent accounts,
//!   refusals, circuit breakers), per replica or fleet-wide;
//! - `deployment`: one deployment and the one place a call to it is made and accounted for;
//! - `flow` and `ratelimit`: its concurrency limit (AIMD) and its per-minute budgets;
//! - `client` and `scrub`: the OpenAI-compatible HTTP client, classifying every failure
//!   once, and the secrets kept out of error texts.
//! - `stream`: a streamed chat answer (server-sent events), its deltas handed on as they
//!   arrive and merged into the whole answer.

pub mod batch;
pub mod call;
pub mod client;
pub mod deployment;
pub mod flow;
pub mod ratelimit;
pub mod router;
pub mod scrub;
pub mod share;
pub mod standing;
pub mod stream;
