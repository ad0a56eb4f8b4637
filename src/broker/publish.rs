//! Confirmed publishing: results (to the caller's `reply_to`, the results exchange, or both,
//! as `topology.keep_results` says), dead letters and retries. A request is acked only after what it produced is confirmed
//! here.
//!
//! The channel is in confirm mode; a broker nack, or an unroutable mandatory message that
//! must be routed, is a [`PublishError`], and the request is not acked.

use std::time::Duration;

use lapin::{
    BasicProperties, Channel, Connection, message::Delivery, options::ConfirmSelectOptions,
    types::FieldTable,
};

use crate::{
    broker::retry,
    config::{KeepResults, TopologyConfig},
    contract::{
        headers::{self, Failure, RetryState},
        reply_to::is_direct_reply_to,
    },
    runtime::clock::{unix_now, unix_now_ms},
};

use super::confirm::publish_with;
pub use super::confirm::{
    CONFIRM_TIMEOUT, Patience, PublishError, publish_confirmed, with_retries,
};
pub use super::impersonation::{ImpersonationError, check_impersonation};

/// Where a result goes besides (or instead of) the results exchange.
#[derive(Debug, Clone, Default)]
pub struct ReplyRoute {
    /// The request id, the result's `message_id`.
    pub request_id: String,
    /// The caller's `correlation_id` (else the request id is used).
    pub correlation_id: Option<String>,
    /// The caller's reply queue (or a Direct Reply-to pseudo-queue).
    pub reply_to: Option<String>,
}

impl ReplyRoute {
    /// The properties of a message to the caller (a result, a delta, a restart marker):
    /// JSON, its AMQP `type` `kind`, `message_id`, the caller's `correlation_id` (else the
    /// request id) and the time.
    fn properties(&self, kind: &str, message_id: &str) -> BasicProperties {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(message_id.into())
            .with_correlation_id(
                self.correlation_id
                    .as_deref()
                    .unwrap_or(&self.request_id)
                    .into(),
            )
            .with_timestamp(unix_now().try_into().unwrap_or(0))
            .with_type(kind.into())
    }
}

/// What became of a result's copy to the caller's `reply_to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The request has no `reply_to`.
    None,
    /// Confirmed. When the worker keeps every result, also a reply the broker dropped
    /// because the queue is gone (the caller left); and always one to a Direct Reply-to
    /// caller that left.
    Sent,
    /// The reply queue refused it (e.g. `x-max-length` with `reject-publish`), or (unless
    /// the worker keeps every result) the queue is gone: the caller's problem; the result is
    /// on the results exchange all the same.
    Refused(String),
}

/// A confirm-mode channel for one consumer's results and dead letters.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topo: TopologyConfig,
    /// Cancelled at the shutdown deadline: the only point at which a publish gives up.
    give_up: tokio_util::sync::CancellationToken,
}

impl Publisher {
    /// Opens its own channel on `conn` and turns on publisher confirms. Its publishes wait
    /// for their confirms until `give_up` is cancelled ([`Patience::Until`]).
    pub async fn open(
        conn: &Connection,
        topo: TopologyConfig,
        give_up: tokio_util::sync::CancellationToken,
    ) -> Result<Self, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            channel,
            topo,
            give_up,
        })
    }

    /// Whether the channel is still open.
    pub fn is_usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes a serialized result where `topology.keep_results` wants it: to the caller's
    /// `reply_to`, to the results exchange, or both; returns once the broker confirmed the
    /// copy that matters, and what became of the reply.
    ///
    /// A request without a `reply_to` has its result on the results exchange only. With
    /// [`KeepResults::Always`] a request with one has it on both ([`Self::reply_and_keep`]);
    /// otherwise on its `reply_to` alone, unless that refuses it or is gone, in which case it
    /// goes to the results exchange instead ([`Self::reply_or_keep`]).
    ///
    /// An unroutable result on the results exchange is a failure when the worker declares
    /// `results_queue`, since the queue must exist. The results copy expires after
    /// `topology.results_ttl_secs`, so an unread results queue does not grow for ever.
    pub async fn result_body(
        &self,
        route: &ReplyRoute,
        body: &[u8],
    ) -> Result<Reply, PublishError> {
        let props = route
            .properties("llmq.result", route.request_id.as_str())
            .with_delivery_mode(2);
        let Some(reply_to) = &route.reply_to else {
            return self.send_result(body, &props).await.map(|()| Reply::None);
        };
        // Boxed: most requests have no reply_to, and every in-flight delivery's task would
        // otherwise be sized for two publishes.
        match self.topo.keep_results {
            KeepResults::Always => Box::pin(self.reply_and_keep(reply_to, body, props)).await,
            KeepResults::WithoutReplyTo | KeepResults::Never => {
                Box::pin(self.reply_or_keep(reply_to, body, props)).await
            }
        }
    }

    /// Both copies at once: the results copy must be confirmed; the reply is sent once and
    /// only reported. A `reply_to` that is gone or refuses is not a failure, since the result
    /// is on the results exchange, and trying the reply again would publish the result again
    /// too.
    async fn reply_and_keep(
        &self,
        reply_to: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<Reply, PublishError> {
        // Not mandatory: a caller that left is common, and its result is on the results
        // exchange anyway; a return would only be logged.
        let reply = self.send("", reply_to, false, body, props.clone());
        let (results, reply) = tokio::join!(self.send_result(body, &props), reply);
        results?;
        // A reply that failed in any way is not tried again: the results copy is
        // confirmed, and trying again would publish the result twice.
        Ok(match reply {
            Ok(()) => Reply::Sent,
            Err(e) => Reply::Refused(e.to_string()),
        })
    }

    /// The reply alone when the caller's queue takes it; otherwise the results copy. The
    /// reply is mandatory, so that a queue that is gone comes back as a return instead of
    /// being dropped; refused or returned (or confirmed without knowing whether it was
    /// routed), the result goes to the results exchange, confirmed, before the request may
    /// be acked. A reply that failed for the channel or the shutdown deadline is a failure:
    /// nothing is known to hold the result, so the request is not acked.
    ///
    /// A Direct Reply-to name is the exception: the broker counts a reply there as routed to
    /// no queue, so a mandatory one would always come back. It is sent as the caller chose it,
    /// delivered while the caller's channel is open and dropped once it is closed.
    async fn reply_or_keep(
        &self,
        reply_to: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<Reply, PublishError> {
        let mandatory = !is_direct_reply_to(reply_to);
        match self
            .send("", reply_to, mandatory, body, props.clone())
            .await
        {
            Ok(()) => Ok(Reply::Sent),
            Err(e @ (PublishError::Broker { .. } | PublishError::Unconfirmed { .. })) => Err(e),
            Err(refused) => {
                // Not tried again: the results copy is what stands in for it.
                self.send_result(body, &props).await?;
                Ok(Reply::Refused(refused.to_string()))
            }
        }
    }

    /// One message of a streamed answer (a delta or a restart marker, `kind` its AMQP
    /// `type`) to the caller's `reply_to`, on this channel, so that it arrives before the
    /// result that follows it; returns once the broker confirmed it. Transient and not
    /// mandatory: the result is the durable record, and a caller that left is common.
    pub async fn stream_message(
        &self,
        route: &ReplyRoute,
        kind: &'static str,
        message_id: String,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let Some(reply_to) = &route.reply_to else {
            return Ok(());
        };
        let props = route.properties(kind, &message_id).with_delivery_mode(1);
        self.send("", reply_to, false, body, props).await
    }

    /// A result to the results exchange: mandatory when the worker declares `results_queue`,
    /// with the results TTL as its expiration, tried a few times.
    async fn send_result(&self, body: &[u8], props: &BasicProperties) -> Result<(), PublishError> {
        let topo = &self.topo;
        let props = if topo.results_ttl_secs > 0 {
            let ttl_ms = topo.results_ttl_secs.saturating_mul(1000);
            props.clone().with_expiration(ttl_ms.to_string().into())
        } else {
            props.clone()
        };
        with_retries(|| {
            self.send(
                &topo.results_exchange,
                &topo.results_key,
                topo.keep_results.declares_queue(),
                body,
                props.clone(),
            )
        })
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

    /// Republishes the delivery to the tail of `queue` (through the default exchange), with
    /// its counts in headers: how an unsettled redelivery is counted. Returns once the broker
    /// confirmed it.
    pub async fn requeue(
        &self,
        delivery: &Delivery,
        queue: &str,
        state: RetryState,
    ) -> Result<(), PublishError> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers::stamp_redelivery(&mut headers, &state);
        self.republish(delivery, "", queue, headers, None).await
    }

    /// Publishes the delivery's body again, mandatory and persistent, with its properties
    /// (its priority and its `user_id`, the sender's identity, included) and `headers` in
    /// place of its own; returns once the broker confirmed it. Every move of a request (a
    /// retry tier, a redelivery count, the dead-letter queue) goes through here.
    ///
    /// Keeping a `user_id` that is not the worker's own needs the `impersonator` tag on the
    /// worker's RabbitMQ user ([`check_impersonation`]).
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
        let patience = Patience::Until(&self.give_up);
        publish_with(
            &self.channel,
            exchange,
            routing_key,
            mandatory,
            body,
            props,
            patience,
        )
        .await
    }
}

/// Copies every property but headers, delivery mode, expiration and cluster id from `from`
/// onto `to`: what every republish keeps (a retry, a lane move, a give-back; the others are
/// set afresh by each). The `user_id` is kept: it is the request's identity.
/// `llmq topology convert` copies the rest too ([`crate::ops::convert::copy_properties`]).
pub fn copy_properties(from: &BasicProperties, mut to: BasicProperties) -> BasicProperties {
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
    if let Some(v) = from.user_id() {
        to = to.with_user_id(v.clone());
    }
    to
}
