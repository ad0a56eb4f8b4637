//! Operating llmq: the admin HTTP endpoints, and the commands `llmq dlq`, `llmq status`,
//! `llmq topology` and `llmq usage`.

pub mod admin;
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
}

/// A connection named `name` (as the management UI shows it) and a channel on it.
async fn open(config: &Config, name: &str) -> Result<(Connection, Channel), OpsError> {
    let conn = connection::connect(&config.amqp, name).await?;
    let channel = conn.create_channel().await?;
    Ok((conn, channel))
}
