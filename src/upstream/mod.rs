//! The LLM side, by job, in the order a call goes through it:
//! - `call`: one attempt for a job, turned into an outcome for the worker's decision;
//! - `failure`: a failed call, classified once where it happens;
//! - `flow`: admission: its tenant's turn and caps (`share`), a deployment's concurrency
//!   limit (`limit`, AIMD) and its per-minute budgets (`ratelimit`);
//! - `batch`: embedding requests gathered into one call;
//! - `routing`: which deployment (and which model, after fallbacks) serves the call
//!   (`router`), which deployments may serve which model now (`standing`: cooldowns, spent
//!   accounts, refusals, circuit breakers), and one deployment, the one place a call to it
//!   is made and accounted for (`deployment`);
//! - `http`: the OpenAI-compatible HTTP client, classifying every failure once (`client`),
//!   a streamed chat answer read from server-sent events (`stream`), and the secrets kept
//!   out of error texts (`scrub`).

pub mod batch;
pub mod call;
pub mod failure;
pub mod flow;
pub mod http;
pub mod routing;
