//! Which publish a `basic.return` belongs to.
//!
//! lapin keeps the returned messages of a confirm channel in one FIFO and hands the oldest to
//! whichever publisher confirm completes next. When two publishes are in flight, the return
//! of an unroutable one can ride on the confirm of a routable one (an ack for an earlier
//! publish arriving between the return and its own ack, or a `multiple` ack whose confirms
//! lapin completes in hash-map order): the unroutable publish then looks confirmed and the
//! routable one looks returned. A dead letter or a retry sent to a missing queue would be
//! acked as if it had arrived.
//!
//! The fix: every mandatory publish carries its own id in the [`PUBLISH_ID`] header, and
//! every publish of a channel is registered here while in flight. A confirm that carries a
//! return hands it to the publish whose id it bears. A mandatory publish whose confirm came
//! without its own return then waits until every publish that was in flight when its confirm
//! arrived has handed on what it carried: the broker sends a return before the ack of the
//! same message, so whatever carried it completed no later than that ack. Only then is "no
//! return" a fact. A publish whose confirm was abandoned (a timeout) while another waited on
//! it makes that other's outcome [`Attribution::Unknown`], a failure: the request is not
//! acked, so nothing is lost.
//!
//! Publishes are registered by channel number, one book per number: channels of different
//! connections that share a number share a book, which costs only some waiting.

use std::{
    collections::HashMap,
    future::{Future, poll_fn},
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
};

use futures_util::FutureExt;
use lapin::{
    BasicProperties, Confirmation, PublisherConfirm,
    message::BasicReturnMessage,
    types::{AMQPValue, ChannelId},
};
use tokio::sync::Notify;

use crate::contract::headers::{self, PUBLISH_ID};

/// What became of a mandatory publish's message.
#[derive(Debug)]
pub enum Attribution {
    /// Routed: no return carries its id.
    Routed,
    /// The broker returned it.
    Returned(Box<BasicReturnMessage>),
    /// A confirm that might carry its return was abandoned unresolved: treat it as failed.
    Unknown,
}

/// A publish registered in its channel's book while in flight. Dropping it (a timeout, a
/// failed send, a cancelled task) takes it out of the book; a confirm that had not arrived
/// stays there as an orphan, watched for the return it may still carry.
pub struct Ticket {
    channel: ChannelId,
    ticket: u64,
    mandatory: bool,
    /// The confirm while it is awaited, so that an abandoned one can be kept.
    confirm: Option<PublisherConfirm>,
    /// Publishes in flight when this one's confirm arrived; any of them may carry its return.
    snapshot: Vec<u64>,
    /// This publish's own return, when it came on its own confirm.
    own: Option<Box<BasicReturnMessage>>,
}

#[derive(Default)]
struct Book {
    entries: HashMap<u64, Entry>,
}

struct Entry {
    state: State,
    /// A return with this entry's id, handed over by the confirm that carried it.
    returned: Option<Box<BasicReturnMessage>>,
    /// Notified when the entry stops being [`State::InFlight`].
    settled: Arc<Notify>,
}

enum State {
    /// Its confirm has not been seen yet.
    InFlight,
    /// Its confirm was seen and what it carried handed on; kept while its owner waits.
    Resolved,
    /// Its owner gave up waiting; the confirm may still carry somebody's return.
    Orphan(PublisherConfirm),
}

/// This process's part of every publish id: a return with another prefix is not ours.
static NONCE: LazyLock<String> = LazyLock::new(|| {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..12].to_string()
});

static BOOKS: LazyLock<Mutex<HashMap<ChannelId, Book>>> = LazyLock::new(Mutex::default);

/// Tickets are unique in the process, never reused when a book empties and starts again.
static NEXT_TICKET: AtomicU64 = AtomicU64::new(1);

fn books() -> MutexGuard<'static, HashMap<ChannelId, Book>> {
    // The data stays consistent across a panic in another holder: every change is one step.
    BOOKS.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ticket {
    /// Registers a publish on `channel` before it is sent.
    pub fn open(channel: ChannelId, mandatory: bool) -> Self {
        let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
        let mut books = books();
        let book = books.entry(channel).or_default();
        book.entries.insert(
            ticket,
            Entry {
                state: State::InFlight,
                returned: None,
                settled: Arc::new(Notify::new()),
            },
        );
        Self {
            channel,
            ticket,
            mandatory,
            confirm: None,
            snapshot: Vec::new(),
            own: None,
        }
    }

    /// `props` with this publish's id in the [`PUBLISH_ID`] header (replacing any earlier one
    /// the message carried).
    pub fn stamp(&self, props: BasicProperties) -> BasicProperties {
        let mut table = props.headers().clone().unwrap_or_default();
        table.insert(
            PUBLISH_ID.into(),
            AMQPValue::LongString(format!("{}.{}.{}", *NONCE, self.channel, self.ticket).into()),
        );
        props.with_headers(table)
    }

    /// Waits for the broker's confirm; a return it carries is handed to its owner (or kept,
    /// when it is this publish's own). The confirmation comes back without the return.
    pub async fn confirm(
        &mut self,
        confirm: PublisherConfirm,
    ) -> Result<Confirmation, lapin::Error> {
        self.confirm = Some(confirm);
        let result = poll_fn(|cx| match self.confirm.as_mut() {
            Some(confirm) => Pin::new(confirm).poll(cx),
            None => Poll::Ready(Ok(Confirmation::NotRequested)),
        })
        .await;
        self.confirm = None;
        let (confirmation, carried) = match result {
            Ok(Confirmation::Ack(r)) => (Ok(Confirmation::Ack(None)), r),
            Ok(Confirmation::Nack(r)) => (Ok(Confirmation::Nack(None)), r),
            other => (other, None),
        };
        let mut books = books();
        let Some(book) = books.get_mut(&self.channel) else {
            return confirmation;
        };
        if let Some(returned) = carried {
            match owner(&returned) {
                Some((channel, ticket)) if channel == self.channel && ticket == self.ticket => {
                    self.own = Some(Box::new(returned));
                }
                Some((channel, ticket)) if channel == self.channel => {
                    hand_over(book, ticket, returned);
                }
                _ => tracing::warn!(
                    exchange = %returned.delivery.exchange,
                    routing_key = %returned.delivery.routing_key,
                    "a returned message without a publish id of this process was dropped"
                ),
            }
        }
        sweep_orphans(book);
        if self.mandatory && self.own.is_none() {
            self.snapshot = book
                .entries
                .iter()
                .filter(|(t, e)| **t != self.ticket && !matches!(e.state, State::Resolved))
                .map(|(t, _)| *t)
                .collect();
        }
        if let Some(entry) = book.entries.get_mut(&self.ticket) {
            entry.state = State::Resolved;
            entry.settled.notify_waiters();
        }
        confirmation
    }

    /// After [`Self::confirm`]: whether this publish's message was returned. A mandatory
    /// publish waits here until every publish that was in flight when its confirm came has
    /// handed on what it carried; for any other the answer is [`Attribution::Routed`] at once.
    pub async fn attribution(mut self) -> Attribution {
        if let Some(own) = self.own.take() {
            return Attribution::Returned(own);
        }
        if !self.mandatory {
            return Attribution::Routed;
        }
        loop {
            let wait = {
                let mut books = self::books();
                let Some(book) = books.get_mut(&self.channel) else {
                    return Attribution::Routed;
                };
                sweep_orphans(book);
                if let Some(returned) = book
                    .entries
                    .get_mut(&self.ticket)
                    .and_then(|e| e.returned.take())
                {
                    return Attribution::Returned(returned);
                }
                let mut wait = None;
                for ticket in &self.snapshot {
                    match book.entries.get(ticket).map(|e| &e.state) {
                        None | Some(State::Resolved) => {}
                        Some(State::Orphan(_)) => return Attribution::Unknown,
                        Some(State::InFlight) => {
                            if let Some(entry) = book.entries.get(ticket) {
                                // Registered for `notify_waiters` now, under the lock.
                                wait = Some(entry.settled.clone().notified_owned());
                            }
                            break;
                        }
                    }
                }
                match wait {
                    Some(wait) => wait,
                    None => return Attribution::Routed,
                }
            };
            wait.await;
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut books = books();
        let Some(book) = books.get_mut(&self.channel) else {
            return;
        };
        if let Some(mut entry) = book.entries.remove(&self.ticket) {
            if let Some(confirm) = self.confirm.take() {
                // Abandoned before its confirm came: keep watching it for a return it may
                // carry for somebody else.
                entry.state = State::Orphan(confirm);
                entry.settled.notify_waiters();
                book.entries.insert(self.ticket, entry);
            } else if matches!(entry.state, State::InFlight) {
                entry.settled.notify_waiters();
            }
        }
        if book.entries.is_empty() {
            books.remove(&self.channel);
        }
    }
}

/// The channel and ticket of a returned message's publish id, when this process made it.
fn owner(returned: &BasicReturnMessage) -> Option<(ChannelId, u64)> {
    let id = headers::get_str(&returned.delivery.properties, PUBLISH_ID)?;
    let mut parts = id.split('.');
    let (nonce, channel, ticket) = (parts.next()?, parts.next()?, parts.next()?);
    if nonce != NONCE.as_str() || parts.next().is_some() {
        return None;
    }
    Some((channel.parse().ok()?, ticket.parse().ok()?))
}

/// Gives `returned` to the entry `ticket`; one already settled gets an error log.
fn hand_over(book: &mut Book, ticket: u64, returned: BasicReturnMessage) {
    match book.entries.get_mut(&ticket) {
        Some(entry) => entry.returned = Some(Box::new(returned)),
        None => tracing::error!(
            exchange = %returned.delivery.exchange,
            routing_key = %returned.delivery.routing_key,
            "a message was returned after its publish was settled"
        ),
    }
}

/// Polls the abandoned confirms once: those that arrived hand on what they carry and leave.
fn sweep_orphans(book: &mut Book) {
    let mut done = Vec::new();
    let mut carried = Vec::new();
    for (ticket, entry) in &mut book.entries {
        if let State::Orphan(confirm) = &mut entry.state
            && let Some(result) = confirm.now_or_never()
        {
            done.push(*ticket);
            if let Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r))) = result {
                carried.push(r);
            }
        }
    }
    for ticket in &done {
        book.entries.remove(ticket);
    }
    for returned in carried {
        match owner(&returned) {
            // An abandoned publish's own return: that publish already failed.
            Some((_, ticket)) if done.contains(&ticket) => {}
            Some((_, ticket)) => hand_over(book, ticket, returned),
            None => tracing::warn!("a returned message without a publish id was dropped"),
        }
    }
}
