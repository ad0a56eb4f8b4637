//! Confirmed publishing: results (to the results exchange and the caller's `reply_to`) and
//! dead letters. A request is acked only after what it produced is confirmed here.
//!
//! The channel is in confirm mode; a broker nack, or an unroutable mandatory message that
//! must be routed, is a [`PublishError`], and the request is not acked.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::Delivery,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::{broker::retry, config::TopologyConfig, contract::response::JobResult};

/// Longest `x-error` header value.
const MAX_ERROR_HEADER: usize = 1024;

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

/// What the worker knows about a failure, written to the dead letter's headers.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    /// The `x-error-kind` header.
    pub kind: &'a str,
    /// The `x-error` header (truncated to 1 KiB).
    pub reason: &'a str,
    /// The `x-attempts` header.
    pub attempts: u32,
    /// Unix seconds of the first failure.
    pub first_failure: i64,
    /// This worker.
    pub worker: &'a str,
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

    /// Publishes a result to the results exchange and, when the request has one, to its
    /// `reply_to`; returns once the broker confirmed both.
    ///
    /// A `reply_to` queue that no longer exists (the caller left) is not a failure: the result
    /// is still on the results exchange. An unroutable result on the results exchange is one
    /// when the worker keeps results (`topology.keep_results`), since the queue must exist.
    pub async fn result(&self, route: &ReplyRoute, result: &JobResult) -> Result<(), PublishError> {
        self.result_body(route, &result.to_bytes()).await
    }

    /// [`Self::result`] for a result already serialized (a stored one, for a duplicate).
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
        let results = self.send(
            &self.topo.results_exchange,
            &self.topo.results_key,
            self.topo.keep_results,
            body,
            props.clone(),
        );
        match &route.reply_to {
            None => results.await,
            Some(reply_to) => {
                // Not mandatory: a caller that left is common, and lapin cannot tell which
                // publish on a shared confirm channel a returned message belongs to, so
                // returns are kept for publishes whose route must exist.
                let reply = self.send("", reply_to, false, body, props);
                let (results, reply) = tokio::join!(results, reply);
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
            }
        }
    }

    /// Publishes the delivery, body and properties unchanged, to the dead-letter exchange
    /// with `x-error-*` headers; returns once the broker confirmed it.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        failure: &Failure<'_>,
    ) -> Result<(), PublishError> {
        let now = unix_now();
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut put = |k: &str, v: AMQPValue| {
            headers.insert(k.into(), v);
        };
        put("x-error-kind", long_string(failure.kind));
        put(
            "x-error",
            long_string(crate::truncate(failure.reason, MAX_ERROR_HEADER)),
        );
        put(
            "x-attempts",
            AMQPValue::LongInt(failure.attempts.min(i32::MAX as u32) as i32),
        );
        put(
            "x-first-failure",
            AMQPValue::Timestamp(failure.first_failure.max(0) as u64),
        );
        put("x-last-failure", AMQPValue::Timestamp(now.max(0) as u64));
        put("x-worker", long_string(failure.worker));
        put(
            "x-original-exchange",
            long_string(delivery.exchange.as_str()),
        );
        put(
            "x-original-routing-key",
            long_string(delivery.routing_key.as_str()),
        );
        // A per-message TTL would make the dead letter expire in the DLQ too.
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2);
        let props = copy_properties(&delivery.properties, props);
        self.send(
            &self.topo.dead_letter_exchange,
            &self.topo.dead_letter_key,
            true,
            &delivery.data,
            props,
        )
        .await
    }

    /// Republishes the delivery to the delayed-retry tier for `delay`, with the work queue's
    /// `routing_key` so it returns where it came from, and the attempt count, first failure
    /// and not-before time in headers; returns once the broker confirmed it.
    pub async fn retry(
        &self,
        delivery: &Delivery,
        routing_key: &str,
        delay: std::time::Duration,
        attempts: u32,
        first_failure: Option<i64>,
        last_error: &str,
    ) -> Result<(), PublishError> {
        let (tier, wait) = retry::tier_for(delay);
        let not_before =
            unix_now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut put = |k: &str, v: AMQPValue| {
            headers.insert(k.into(), v);
        };
        put(retry::TIER_HEADER, long_string(tier.name));
        put(
            retry::ATTEMPTS_HEADER,
            AMQPValue::LongInt(attempts.min(i32::MAX as u32) as i32),
        );
        put(retry::NOT_BEFORE_HEADER, AMQPValue::LongLongInt(not_before));
        put(
            retry::LAST_ERROR_HEADER,
            long_string(crate::truncate(last_error, MAX_ERROR_HEADER)),
        );
        if let Some(first) = first_failure {
            put(retry::FIRST_FAILURE_HEADER, AMQPValue::LongLongInt(first));
        }
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_expiration(wait.as_millis().max(1).to_string().into());
        let props = copy_properties(&delivery.properties, props);
        self.send(
            &self.topo.retry_exchange,
            routing_key,
            true,
            &delivery.data,
            props,
        )
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
        let confirm = self
            .channel
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
            .map_err(broker)?
            .await
            .map_err(broker)?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Returned {
                    destination: destination(),
                    code: returned.reply_code,
                    text: returned.reply_text.to_string(),
                })
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked {
                destination: destination(),
            }),
            // The channel is always in confirm mode; treat the impossible as unconfirmed.
            Confirmation::NotRequested => Err(PublishError::Nacked {
                destination: destination(),
            }),
        }
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

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Reads a string header.
pub fn header_str(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}
