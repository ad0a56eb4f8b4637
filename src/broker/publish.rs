//! Confirmed publishing: results (to the results exchange and the caller's `reply_to`),
//! dead letters and retries. A request is acked only after what it produced is confirmed
//! here.
//!
//! The channel is in confirm mode; a broker nack, or an unroutable mandatory message that
//! must be routed, is a [`PublishError`], and the request is not acked.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::Delivery,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{FieldTable, ShortString},
};

use crate::{
    broker::{
        retry,
        returns::{self, Attribution},
    },
    config::TopologyConfig,
    contract::headers::{self, Failure, RetryState},
    runtime::clock::{unix_now, unix_now_ms},
};

/// A publish the broker did not confirm.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
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

/// Where a result goes besides the results exchange.
#[derive(Debug, Clone, Default)]
pub struct ReplyRoute {
    /// The request id, the result's `message_id`.
    pub request_id: String,
    /// The caller's `correlation_id` (else the request id is used).
    pub correlation_id: Option<String>,
    /// The caller's reply queue (or a Direct Reply-to pseudo-queue).
    pub reply_to: Option<String>,
}

/// A confirm-mode channel for one consumer's results and dead letters.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topo: TopologyConfig,
}

impl Publisher {
    /// Opens its own channel on `conn` and turns on publisher confirms.
    pub async fn open(conn: &Connection, topo: TopologyConfig) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel, topo })
    }

    /// Whether the channel is still open.
    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes a serialized result to the results exchange and, when the request has one,
    /// to its `reply_to`; returns once the broker confirmed both.
    ///
    /// A `reply_to` queue that no longer exists (the caller left) is not a failure: the result
    /// is still on the results exchange. An unroutable result on the results exchange is one
    /// when the worker keeps results (`topology.keep_results`), since the queue must exist.
    pub async fn result_body(&self, route: &ReplyRoute, body: &[u8]) -> Result<(), PublishError> {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(route.request_id.as_str().into())
            .with_correlation_id(
                route
                    .correlation_id
                    .as_deref()
                    .unwrap_or(&route.request_id)
                    .into(),
            )
            .with_timestamp(unix_now().try_into().unwrap_or(0))
            .with_type("llmq.result".into());
        let Some(reply_to) = &route.reply_to else {
            return self.send_result(body, props).await;
        };
        // Boxed: most requests have no reply_to, and every in-flight delivery's task would
        // otherwise be sized for two publishes.
        Box::pin(async {
            // Not mandatory: a caller that left is common, and lapin cannot tell which
            // publish on a shared confirm channel a returned message belongs to, so returns
            // are kept for publishes whose route must exist.
            let reply = self.send("", reply_to, false, body, props.clone());
            let (results, reply) = tokio::join!(self.send_result(body, props), reply);
            match reply {
                Err(PublishError::Returned { destination, .. }) => {
                    tracing::warn!(
                        request_id = %route.request_id,
                        reply_to = %destination,
                        "reply_to queue is gone; the result is only on the results exchange"
                    );
                }
                other => other?,
            }
            results
        })
        .await
    }

    /// A result to the results exchange: mandatory when the worker keeps results.
    async fn send_result(&self, body: &[u8], props: BasicProperties) -> Result<(), PublishError> {
        let topo = &self.topo;
        self.send(
            &topo.results_exchange,
            &topo.results_key,
            topo.keep_results,
            body,
            props,
        )
        .await
    }

    /// Publishes the delivery, body and properties unchanged, to the dead-letter exchange
    /// with `x-error-*` headers; returns once the broker confirmed it.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        failure: &Failure<'_>,
    ) -> Result<(), PublishError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers::stamp_dead_letter(
            &mut headers,
            failure,
            unix_now(),
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
        );
        // No expiration: a per-message TTL would make the dead letter expire in the DLQ too.
        self.republish(
            delivery,
            &self.topo.dead_letter_exchange,
            &self.topo.dead_letter_key,
            headers,
            None,
        )
        .await
    }

    /// Republishes the delivery to the delayed-retry tier for `delay`, with the work queue's
    /// `routing_key` so it returns where it came from, and its retry state (`attempts`, first
    /// failure; the not-before time is set here from `delay`) in headers; returns once the
    /// broker confirmed it.
    pub async fn retry(
        &self,
        delivery: &Delivery,
        routing_key: &str,
        delay: Duration,
        state: RetryState,
        last_error: &str,
    ) -> Result<(), PublishError> {
        let (tier, wait) = retry::tier_for(delay);
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        let state = RetryState {
            not_before_ms: Some(unix_now_ms().saturating_add(delay_ms)),
            ..state
        };
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers::stamp_retry(&mut headers, tier.name, &state, last_error);
        let expiration = wait.as_millis().max(1).to_string();
        let exchange = &self.topo.retry_exchange;
        self.republish(delivery, exchange, routing_key, headers, Some(expiration))
            .await
    }

    /// Publishes the delivery's body again, mandatory and persistent, with its properties
    /// and `headers` in place of its own; returns once the broker confirmed it. Every move
    /// of a request (a retry tier, the dead-letter queue) goes through here.
    pub async fn republish(
        &self,
        delivery: &Delivery,
        exchange: &str,
        routing_key: &str,
        headers: FieldTable,
        expiration: Option<String>,
    ) -> Result<(), PublishError> {
        let mut props = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2);
        if let Some(expiration) = expiration {
            props = props.with_expiration(expiration.into());
        }
        let props = copy_properties(&delivery.properties, props);
        self.send(exchange, routing_key, true, &delivery.data, props)
            .await
    }

    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<(), PublishError> {
        publish_confirmed(&self.channel, exchange, routing_key, mandatory, body, props).await
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
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    body: &[u8],
    props: BasicProperties,
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
    match (confirm, ticket.attribution().await) {
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

/// Copies every property but headers, delivery mode, expiration and user id (the broker
/// checks it against the publishing user) from `from` onto `to`.
fn copy_properties(from: &BasicProperties, mut to: BasicProperties) -> BasicProperties {
    if let Some(v) = from.content_type() {
        to = to.with_content_type(v.clone());
    }
    if let Some(v) = from.content_encoding() {
        to = to.with_content_encoding(v.clone());
    }
    if let Some(v) = from.priority() {
        to = to.with_priority(*v);
    }
    if let Some(v) = from.correlation_id() {
        to = to.with_correlation_id(v.clone());
    }
    if let Some(v) = from.reply_to() {
        to = to.with_reply_to(v.clone());
    }
    if let Some(v) = from.message_id() {
        to = to.with_message_id(v.clone());
    }
    if let Some(v) = from.timestamp() {
        to = to.with_timestamp(*v);
    }
    if let Some(v) = from.kind() {
        to = to.with_type(v.clone());
    }
    if let Some(v) = from.app_id() {
        to = to.with_app_id(v.clone());
    }
    to
}
