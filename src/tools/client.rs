//! `llmq publish`: send one request the way any AMQP client would, optionally waiting for
//! its result through Direct Reply-to.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::{
    BasicProperties, Channel, Consumer,
    options::{BasicConsumeOptions, ConfirmSelectOptions},
    types::FieldTable,
};
use serde_json::json;

use crate::{
    broker::{
        connection,
        publish::{PublishError, publish_confirmed},
    },
    config::{Config, TopologyConfig},
    contract::control::Cancel,
};

/// The pseudo-queue of RabbitMQ's Direct Reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// What to send.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// The prompt (a chat request), or the text to embed with `--embed`.
    pub prompt: String,
    /// AMQP priority, 0 to 10; higher goes first.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=10))]
    pub priority: u8,
    /// Wait for the result and print it (JSON) on stdout.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
    /// Model to ask for (the worker's default otherwise).
    #[arg(long)]
    pub model: Option<String>,
    /// Send an embedding request instead of a chat request.
    #[arg(long)]
    pub embed: bool,
    /// The request id (a random one otherwise).
    #[arg(long)]
    pub request_id: Option<String>,
    /// Ask for the answer as it is generated and print its text as it arrives, then the
    /// result (JSON) on a line of its own. Implies `--wait`. A restart (an attempt that
    /// broke off and was retried) is said on stderr, and the text starts again.
    #[arg(long, conflicts_with = "embed")]
    pub stream: bool,
}

/// Why `llmq publish` failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker could not be reached.
    #[error(transparent)]
    Connect(#[from] connection::ConnectError),
    /// A broker operation failed.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker did not take the request.
    #[error(
        "the broker did not confirm the request (is the topology declared? start a worker once): {0}"
    )]
    NotConfirmed(#[source] PublishError),
    /// No result within the timeout.
    #[error("no result within {0:?}")]
    Timeout(Duration),
}

/// Publishes one request; with `wait`, returns the result body.
pub async fn publish(
    config: &Config,
    args: &PublishArgs,
) -> Result<(String, Option<String>), ClientError> {
    let conn = connection::connect(&config.amqp, "llmq publish").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let topo = &config.topology;
    let request_id = args
        .request_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (key, body) = request(args, topo, &request_id);
    let mut props = properties(args, &request_id);
    // Direct Reply-to: consume the pseudo-queue (no-ack) before publishing.
    let mut replies = if args.wait || args.stream {
        props = props.with_reply_to(DIRECT_REPLY_TO.into());
        Some(consume_direct_replies(&channel).await?)
    } else {
        None
    };
    let body = body.to_string();
    let exchange = &topo.request_exchange;
    publish_confirmed(&channel, exchange, key, true, body.as_bytes(), props)
        .await
        .map_err(ClientError::NotConfirmed)?;
    let Some(replies) = replies.as_mut() else {
        let _ = conn.close(200, "done".into()).await;
        return Ok((request_id, None));
    };
    let timeout = Duration::from_secs(args.timeout_secs);
    let result = tokio::time::timeout(timeout, await_result(replies, &request_id, args.stream))
        .await
        .map_err(|_| ClientError::Timeout(timeout))??;
    let _ = conn.close(200, "done".into()).await;
    Ok((request_id, result))
}

/// The request's routing key (chat or embeddings) and its body as the worker reads it.
fn request<'t>(
    args: &PublishArgs,
    topo: &'t TopologyConfig,
    request_id: &str,
) -> (&'t str, serde_json::Value) {
    let (key, mut body) = if args.embed {
        (
            &topo.embeddings_key,
            json!({"kind": "embedding", "input": args.prompt}),
        )
    } else {
        (&topo.processing_key, json!({"prompt": args.prompt}))
    };
    body["request_id"] = json!(request_id);
    if args.stream {
        body["stream"] = json!(true);
    }
    if let Some(model) = &args.model {
        body["model"] = json!(model);
    }
    (key, body)
}

/// The request's AMQP properties: persistent, its priority, and the request id as both
/// message id and correlation id (the reply carries the latter back).
fn properties(args: &PublishArgs, request_id: &str) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_priority(args.priority)
        .with_message_id(request_id.into())
        .with_correlation_id(request_id.into())
}

/// Consumes Direct Reply-to's pseudo-queue, which must happen before the request names it
/// as `reply_to`.
async fn consume_direct_replies(channel: &Channel) -> Result<Consumer, ClientError> {
    Ok(channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "llmq-publish".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}

/// Reads the replies to `request_id` until its result: prints each delta's text as it
/// comes and says a restart on stderr; `None` when the replies end without a result.
async fn await_result(
    replies: &mut Consumer,
    request_id: &str,
    stream: bool,
) -> Result<Option<String>, ClientError> {
    while let Some(delivery) = replies.next().await {
        let delivery = delivery?;
        let matches = delivery
            .properties
            .correlation_id()
            .as_ref()
            .is_some_and(|c| c.as_str() == request_id);
        if !matches {
            continue;
        }
        match delivery.properties.kind().as_ref().map(|k| k.as_str()) {
            Some("delta") => print_delta(&delivery.data),
            Some("restart") => {
                let attempt = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                    .ok()
                    .and_then(|m| m["attempt"].as_u64())
                    .unwrap_or(0);
                println!();
                eprintln!("[the answer broke off; attempt {attempt} starts again]");
            }
            _ => {
                if stream {
                    println!();
                }
                return Ok(Some(String::from_utf8_lossy(&delivery.data).into_owned()));
            }
        }
    }
    Ok(None)
}

/// Prints the text of a delta as it comes (the first choice's; tool calls come whole in
/// the result).
fn print_delta(data: &[u8]) {
    use std::io::Write;
    let Ok(message) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if message["index"].as_u64().unwrap_or(0) != 0 {
        return;
    }
    if let Some(text) = message["delta"]["content"].as_str() {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}

/// `llmq cancel`: publishes `{"cancel": "<request_id>"}` to the control exchange, where every
/// worker hears it. It cancels the request of the same identity: send it as the user (AMQP
/// `user_id`) that sent the request; `llmq publish` sets none, nor does this.
pub async fn cancel(config: &Config, request_id: &str) -> Result<(), ClientError> {
    let conn = connection::connect(&config.amqp, "llmq cancel").await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = Cancel::new(request_id).to_bytes();
    let props = BasicProperties::default().with_content_type("application/json".into());
    let exchange = &config.topology.control_exchange;
    // Not mandatory: with no worker running there is no queue to route to, and nobody to
    // cancel anything.
    publish_confirmed(&channel, exchange, "", false, &body, props)
        .await
        .map_err(ClientError::NotConfirmed)?;
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}
