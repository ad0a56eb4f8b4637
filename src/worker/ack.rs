//! Settling a delivery with the broker: ack once its outcome is confirmed, hand it back
//! otherwise. Every path of a delivery ends here.

use std::time::Duration;

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{Context, lanes::Origin};
use crate::{
    broker::publish::{PublishError, Publisher},
    contract::headers::RetryState,
};

/// How long a delivery whose outcome the broker would not confirm is held before it is
/// handed back: the broker redelivers it at once, and a queue that stays missing or
/// refusing must not turn that into a loop of one try a second.
const HAND_BACK_PAUSE: Duration = Duration::from_secs(5);

/// Acks a delivery whose outcome the broker confirmed; hands it back otherwise (after a
/// pause).
pub(super) async fn ack_if_confirmed(
    delivery: &Delivery,
    published: Result<(), PublishError>,
    stop: &CancellationToken,
) {
    match published {
        Ok(()) => ack(delivery).await,
        Err(e) => {
            if e.channel_lost() {
                warn!(error = %e, "the outcome could not be confirmed: the broker connection is lost; the request goes back to the queue");
            } else {
                error!(error = %e, "the outcome could not be confirmed by the broker; handing the request back");
            }
            nack_after_a_pause(delivery, stop).await;
        }
    }
}

/// Hands a delivery back after [`HAND_BACK_PAUSE`], or at once when the worker stops.
pub(super) async fn nack_after_a_pause(delivery: &Delivery, stop: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(HAND_BACK_PAUSE) => {}
        _ = stop.cancelled() => {}
    }
    nack(delivery).await;
}

/// Acks a delivery; a channel that is gone means the broker redelivers it.
pub(super) async fn ack(delivery: &Delivery) {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => {
            warn!("ack not sent: the delivery's channel is gone; the broker redelivers the request")
        }
        Err(e) => warn!(error = %e, "ack failed; the broker redelivers the request"),
    }
}

/// Hands a delivery back to its queue (nack with requeue).
pub(super) async fn nack(delivery: &Delivery) {
    let requeue = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    match delivery.acker.nack(requeue).await {
        Ok(true) => {}
        Ok(false) => {
            debug!("nack not sent: the delivery's channel is gone; the broker requeues it")
        }
        Err(e) => {
            warn!(error = %e, "nack failed; the broker requeues the request when the channel closes")
        }
    }
}

/// Gives a delivery back at a graceful shutdown: republished to the tail of the queue it came
/// from (its lane, for a request from a lane, so its tenant's order holds) with
/// `state` (confirmed), then acked. A nack would bring it back flagged `redelivered`, which
/// cannot be told from a crash, so every shutdown would count as a redelivery, and the
/// attempts made in this delivery would be forgotten. A delivery that arrived redelivered
/// and was never started keeps that redelivery in its count. Nacked when the republish
/// cannot be confirmed (past the shutdown deadline, on a blocked broker).
pub(super) async fn give_back(
    ctx: &Context,
    publisher: &Publisher,
    origin: Origin,
    delivery: &Delivery,
    state: RetryState,
) {
    let state = RetryState {
        redeliveries: state
            .redeliveries
            .saturating_add(u32::from(delivery.redelivered)),
        ..state
    };
    let queue = origin.queue(&ctx.config.topology);
    match publisher.requeue(delivery, &queue, state).await {
        Ok(()) => ack(delivery).await,
        Err(e) => {
            debug!(error = %e, "could not requeue at shutdown; handing the request back");
            nack(delivery).await;
        }
    }
}
