//! The broker's side of every run: (a) the ceiling of the broker alone, publishing with a
//! window of confirms, and collecting a run's results.

use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream::FuturesUnordered};
use lapin::{
    BasicProperties, Channel, Connection,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
};

use super::{Bench, BenchError, worker::RunConfig};
use crate::{
    broker::connection,
    config::{AmqpConfig, QueueType},
};

/// (a), which always runs: the broker's ceiling, messages/s.
pub(super) async fn measure_ceiling(bench: &Bench<'_>) -> Result<f64, BenchError> {
    let n = bench.args.raw_messages;
    eprintln!("(a) broker ceiling: {n} x 1 KiB");
    let a = broker_ceiling(&bench.conn, &bench.base.config.amqp, n, QueueType::Classic).await?;
    eprintln!("    {a:.0} msg/s");
    Ok(a)
}

/// (a): publish with confirms (a window of them outstanding) to a durable queue of
/// `queue_type` while a consumer on a connection of its own to `amqp` acks each.
pub(super) async fn broker_ceiling(
    conn: &Connection,
    amqp: &AmqpConfig,
    n: usize,
    queue_type: QueueType,
) -> Result<f64, BenchError> {
    let mut arguments = FieldTable::default();
    if queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    let queue = format!(
        "llmq-bench-raw-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
    let consumer_conn = connection::connect(amqp, "llmq bench consumer").await?;
    let consumer_ch = consumer_conn.create_channel().await?;
    consumer_ch
        .basic_qos(1000, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_ch
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let counter = tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            match consumer.next().await {
                Some(Ok(d)) => {
                    let _ = d.acker.ack(BasicAckOptions::default()).await;
                    got += 1;
                }
                _ => break,
            }
        }
        (got, Instant::now())
    });
    let body = vec![b'x'; 1024];
    let start = Instant::now();
    let props = BasicProperties::default().with_delivery_mode(2);
    publish_window(
        &publisher,
        "",
        &queue,
        n,
        |_| body.clone(),
        |_| props.clone(),
    )
    .await?;
    let (got, end) = tokio::time::timeout(Duration::from_secs(300), counter)
        .await
        .map_err(|_| BenchError::Stalled("the raw consumer stalled".into()))?
        .map_err(|e| BenchError::Stalled(e.to_string()))?;
    if got < n {
        return Err(BenchError::Stalled(format!(
            "raw consumer got {got} of {n}"
        )));
    }
    let _ = publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = consumer_conn.close(200, "done".into()).await;
    Ok(n as f64 / (end - start).as_secs_f64())
}

/// Publishes `n` persistent JSON requests made by `body` to the run's request exchange on
/// `key`, keeping a window of confirms outstanding; returns when publishing began.
pub(super) async fn publish_requests(
    conn: &Connection,
    cfg: &RunConfig,
    key: &str,
    n: usize,
    body: impl Fn(usize) -> serde_json::Value,
) -> Result<Instant, BenchError> {
    publish_requests_with(conn, cfg, key, n, body, |_| BasicProperties::default()).await
}

/// As [`publish_requests`], request `i` with `props(i)` besides (a `reply_to`, headers);
/// its body is made just before it is published, so a time it holds is its publish time.
pub(super) async fn publish_requests_with(
    conn: &Connection,
    cfg: &RunConfig,
    key: &str,
    n: usize,
    body: impl Fn(usize) -> serde_json::Value,
    props: impl Fn(usize) -> BasicProperties,
) -> Result<Instant, BenchError> {
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let start = Instant::now();
    publish_window(
        &publisher,
        &cfg.topology.request_exchange,
        key,
        n,
        |i| body(i).to_string().into_bytes(),
        |i| {
            props(i)
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
        },
    )
    .await?;
    Ok(start)
}

/// Publishes `n` messages keeping up to 1000 confirms outstanding; fails on any nack.
async fn publish_window(
    channel: &Channel,
    exchange: &str,
    key: &str,
    n: usize,
    body: impl Fn(usize) -> Vec<u8>,
    props: impl Fn(usize) -> BasicProperties,
) -> Result<(), BenchError> {
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &body(i),
                props(i),
            )
            .await?;
        pending.push(confirm);
        if pending.len() >= 1000 {
            check_confirm(pending.next().await)?;
        }
    }
    while let Some(c) = pending.next().await {
        check_confirm(Some(c))?;
    }
    Ok(())
}

/// Fails on a nack or an error; `None` (no confirm left to wait for) is fine.
pub(super) fn check_confirm(
    c: Option<Result<lapin::Confirmation, lapin::Error>>,
) -> Result<(), BenchError> {
    match c {
        Some(Ok(c)) if c.is_ack() => Ok(()),
        Some(Ok(_)) => Err(BenchError::Stalled("the broker nacked a publish".into())),
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    }
}

/// Consumes `n` results (no-ack), returning when the last arrived.
pub(super) fn collect(
    channel: Channel,
    queue: String,
    n: usize,
    mut each: impl FnMut(&[u8]) + Send + 'static,
) -> tokio::task::JoinHandle<Result<Instant, BenchError>> {
    tokio::spawn(async move {
        let mut results = channel
            .basic_consume(
                queue.as_str().into(),
                "bench-results".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let mut got = 0;
        while got < n {
            match tokio::time::timeout(Duration::from_secs(60), results.next()).await {
                Ok(Some(Ok(d))) => {
                    each(&d.data);
                    got += 1;
                }
                _ => return Err(BenchError::Stalled(format!("{got} of {n} results arrived"))),
            }
        }
        Ok(Instant::now())
    })
}
