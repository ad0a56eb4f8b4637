//! Operating llmq: the admin HTTP endpoints, and the commands `llmq dlq`, `llmq status`,
//! `llmq topology` (and `llmq topology convert`) and `llmq usage`.

pub mod admin;
pub mod convert;
pub mod dlq;
pub mod status;
pub mod topology;
pub mod usage;

use lapin::{Channel, Connection};

use crate::{
    broker::{connection, publish::PublishError},
    config::Config,
};

/// Why a queue command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    /// A broker operation failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The topology could not be declared.
    #[error(transparent)]
    Topology(#[from] crate::broker::topology::DeclareError),
    /// A republished dead letter was not confirmed; it stays in the DLQ.
    #[error(
        "the broker did not confirm the replay of {request_id}; it stays in the dead-letter queue: {source}"
    )]
    NotConfirmed {
        /// The dead letter's request id.
        request_id: String,
        /// What the broker said.
        #[source]
        source: PublishError,
    },
    /// The command cannot do what it was asked now, for this reason (nothing was changed
    /// unless it says so).
    #[error("{0}")]
    Refused(String),
    /// A message could not be moved between queues; it stays where it was, with the ones
    /// not moved yet, and running the command again goes on from there.
    #[error(
        "a message could not be moved from {from} to {to} ({moved} moved before it); it \
         stays in {from}, and running the command again goes on from there: {source}"
    )]
    NotMoved {
        /// Where it was.
        from: String,
        /// Where it was going.
        to: String,
        /// How many were moved before it.
        moved: u64,
        /// What the broker said.
        #[source]
        source: PublishError,
    },
}

/// A connection named `name` (as the management UI shows it) and a channel on it.
async fn open(config: &Config, name: &str) -> Result<(Connection, Channel), OpsError> {
    let conn = connection::connect(&config.amqp, name).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}
