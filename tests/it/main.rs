//! The integration tests, one binary: every suite runs against the real RabbitMQ at
//! `AMQP_URL` (and Redis at `REDIS_URL`) with the mock upstream in-process, through the
//! shared [`helpers`]; the node-loss tests also use the local three-node cluster of
//! `scripts/cluster.sh`, through [`cluster`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod alarm;
mod answers;
mod bounds;
mod budgets;
mod cancel;
mod cli;
mod cluster;
mod end_to_end;
mod failover;
mod faults;
mod flow;
mod guarantees;
mod helpers;
mod identity;
mod interop;
mod node_loss;
mod openai_body;
mod ops;
mod quorum;
mod results;
mod routing;
mod streaming;
mod tenants;
mod tls;
mod upstreams;
mod validation;
