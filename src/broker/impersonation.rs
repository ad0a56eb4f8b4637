//! The impersonation check: the worker republishes requests (retry tiers, redelivery
//! counts, dead letters, lanes, give-backs) keeping their sender's `user_id`, which the
//! broker allows only to a user with the `impersonator` tag.

use lapin::{BasicProperties, Connection, options::ConfirmSelectOptions};

use super::confirm::{PublishError, publish_confirmed};

/// The worker's RabbitMQ user cannot republish a request with its sender's `user_id`.
#[derive(Debug, thiserror::Error)]
#[error(
    "the broker refused a publish keeping another user's user_id ({0}). Every republish of a \
     request (retry tiers, redelivery counts, dead letters) keeps its sender's user_id, its \
     identity; give the worker's RabbitMQ user the `impersonator` tag: \
     rabbitmqctl set_user_tags <user> impersonator (plus any tags it has, e.g. administrator)"
)]
pub struct ImpersonationError(String);

/// A `user_id` no real user has: what [`check_impersonation`] publishes as.
const IMPERSONATION_PROBE_USER: &str = "llmq-impersonation-check";

/// Checks that this connection's user may publish with another user's `user_id` (the
/// `impersonator` tag): publishes an empty message to nowhere as someone else, on a channel
/// of its own that the broker closes when the tag is missing.
pub async fn check_impersonation(conn: &Connection) -> Result<(), ImpersonationError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| ImpersonationError(e.to_string()))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| ImpersonationError(e.to_string()))?;
    let props = BasicProperties::default().with_user_id(IMPERSONATION_PROBE_USER.into());
    // The default exchange with an empty routing key routes to no queue: the message is
    // dropped once the broker has checked its user_id.
    let outcome = publish_confirmed(&channel, "", "", false, b"", props).await;
    // A blocked connection writes nothing, not even this close.
    if channel.status().connected() && !conn.status().blocked() {
        let _ = channel.close(200, "impersonation checked".into()).await;
    }
    match outcome {
        // The broker blocks publishing (a memory or disk alarm) and confirms nothing: the
        // check cannot be made now, which is no reason to stop consuming; a later connection
        // checks again.
        Err(e @ PublishError::Unconfirmed { .. }) => {
            tracing::warn!(error = %e, "the impersonator tag could not be checked");
            Ok(())
        }
        outcome => outcome.map_err(|e| ImpersonationError(e.to_string())),
    }
}
