//! Publishing with the broker's confirm: every publish of llmq that settles a request (a
//! result, a dead letter, a retry, a move) or that a tool makes waits here for the broker
//! to take it, and a nack, a return or no answer in time is a [`PublishError`].

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Confirmation, options::BasicPublishOptions, types::ShortString,
};

use crate::broker::returns::{self, Attribution};

/// Longest wait of the tools (`llmq publish`, `llmq dlq replay`, the impersonation check)
/// for the broker to take a publish and confirm it. A broker under a memory or disk alarm
/// blocks the publishing connection, and lapin then writes nothing on it.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a publish waits for the broker to take and confirm it.
#[derive(Debug, Clone, Copy)]
pub enum Patience<'a> {
    /// At most this long: the tools, which must not hang on a blocked broker.
    Timeout(Duration),
    /// Until this token is cancelled: the worker's shutdown deadline. A publish is never
    /// abandoned while the broker merely blocks it (an alarm): lapin keeps its frames and
    /// sends them once unblocked, so giving up would hand the request back while its result
    /// or move still goes out, a duplicate for every try. It waits the alarm out instead,
    /// and the delivery stays unacked on the consuming connection, which is never blocked.
    Until(&'a tokio_util::sync::CancellationToken),
}

/// A publish the broker did not confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No confirm within the publish's [`Patience`] (a blocked connection at a tool's
    /// timeout, or the worker's shutdown deadline): the message may still be published
    /// later, so the request is handed back, not retried here.
    #[error("no confirm from the broker in time for the message to {destination}")]
    Unconfirmed {
        /// Where it was going.
        destination: String,
    },
    /// The channel or connection failed.
    #[error("broker error while publishing to {destination}: {source}")]
    Broker {
        /// Where it was going.
        destination: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// The broker refused the message (e.g. a queue at its length limit with
    /// `reject-publish`).
    #[error("broker nacked the message to {destination}")]
    Nacked {
        /// Where it was going.
        destination: String,
    },
    /// Nothing was bound to take the message.
    #[error("message to {destination} was returned unroutable: {code} {text}")]
    Returned {
        /// Where it was going.
        destination: String,
        /// AMQP reply code (312 NO_ROUTE).
        code: u16,
        /// AMQP reply text.
        text: String,
    },
    /// Confirmed, but a confirm abandoned on the same channel (a timeout) may have carried
    /// this message's return: whether it was routed is unknown, so it counts as not.
    #[error("message to {destination} was confirmed, but whether it was routed is unknown")]
    Unattributed {
        /// Where it was going.
        destination: String,
    },
}

impl PublishError {
    /// The broker took the publish and refused it (a nack: a queue at its length limit with
    /// `reject-publish`; or returned: no queue to take it). Waiting may fix it; retrying at
    /// once will not.
    pub fn refused(&self) -> bool {
        matches!(
            self,
            PublishError::Nacked { .. } | PublishError::Returned { .. }
        )
    }

    /// The channel or its connection failed: a broker node lost or restarted, which the
    /// worker reconnects from. The delivery goes back to the broker with the connection,
    /// so this is a warning, not an error, at every job then in flight.
    pub fn channel_lost(&self) -> bool {
        matches!(self, PublishError::Broker { .. })
    }
}

/// Publishes on a confirm-mode `channel` and waits for the broker's confirm: a nack, a
/// returned mandatory message or a broker error is a [`PublishError`]. Every confirmed
/// publish of llmq (results, dead letters, retries, replays, `llmq publish`) checks its
/// confirm here.
///
/// A returned message fails exactly the publish it belongs to, never another one on the same
/// channel: a mandatory publish carries its own id, and returns are matched by it
/// ([`crate::broker::returns`]). Every publish on a channel that carries mandatory publishes
/// must come through here, since lapin may hand a return to any confirm of the channel.
///
/// Waits at most [`CONFIRM_TIMEOUT`]: for the tools. The worker's publishes wait until its
/// shutdown deadline instead ([`Publisher`], [`Patience::Until`]).
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let patience = Patience::Timeout(CONFIRM_TIMEOUT);
    publish_with(
        channel,
        exchange,
        routing_key,
        mandatory,
        body,
        props,
        patience,
    )
    .await
}

/// [`publish_confirmed`] with its [`Patience`].
pub(super) async fn publish_with(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    body: &[u8],
    props: BasicProperties,
    patience: Patience<'_>,
) -> Result<(), PublishError> {
    let destination = || {
        if exchange.is_empty() {
            routing_key.to_string()
        } else {
            format!("{exchange}/{routing_key}")
        }
    };
    let broker = |source| PublishError::Broker {
        destination: destination(),
        source,
    };
    // Registered before the send: from then on a confirm that carries this message's return
    // hands it here, whichever publish lapin gave it to.
    let mut ticket = returns::Ticket::open(channel.id(), mandatory);
    let props = if mandatory {
        ticket.stamp(props)
    } else {
        props
    };
    // Bounded by the patience: a blocked connection (a broker alarm) confirms nothing until
    // it is unblocked. A ticket dropped by giving up leaves its confirm in the book as an
    // orphan, watched for the return it may still carry.
    let publish = async {
        let confirm = channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .map_err(broker)?;
        let confirm = ticket.confirm(confirm).await.map_err(broker)?;
        Ok::<_, PublishError>((confirm, ticket.attribution().await))
    };
    let unconfirmed = || PublishError::Unconfirmed {
        destination: destination(),
    };
    let (confirm, attribution) = match patience {
        Patience::Timeout(limit) => tokio::time::timeout(limit, publish)
            .await
            .map_err(|_| unconfirmed())??,
        // Checked first: past the deadline nothing is sent at all, since a message sent and
        // then given up on would still arrive, beside the delivery handed back.
        Patience::Until(give_up) => tokio::select! {
            biased;
            _ = give_up.cancelled() => return Err(unconfirmed()),
            done = publish => done?,
        },
    };
    match (confirm, attribution) {
        (_, Attribution::Returned(returned)) => Err(PublishError::Returned {
            destination: destination(),
            code: returned.reply_code,
            text: returned.reply_text.to_string(),
        }),
        (Confirmation::Ack(_), Attribution::Routed) => Ok(()),
        (Confirmation::Ack(_), Attribution::Unknown) => Err(PublishError::Unattributed {
            destination: destination(),
        }),
        // NotRequested: the channel is not in confirm mode; treat it as unconfirmed.
        (Confirmation::Nack(_) | Confirmation::NotRequested, _) => Err(PublishError::Nacked {
            destination: destination(),
        }),
    }
}

/// Publishes with a few quick tries: a nack or a missing queue may clear up within a
/// second or two; a dead channel or a missing confirm (a blocked broker) will not, so they
/// are not retried.
pub async fn with_retries<F, Fut>(mut publish: F) -> Result<(), PublishError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), PublishError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        tries += 1;
        match publish().await {
            Ok(()) => return Ok(()),
            Err(e @ (PublishError::Broker { .. } | PublishError::Unconfirmed { .. })) => {
                return Err(e);
            }
            Err(e) if tries >= PUBLISH_TRIES => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, tries, "publish not confirmed; trying again");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// Tries of one publish in [`with_retries`].
const PUBLISH_TRIES: u32 = 4;
