//! A streamed answer on its way to the caller's `reply_to`: the deltas an attempt hands on
//! ([`crate::upstream::http::stream`]) published as they come, on the delivery's publishing
//! channel, so that none arrives after the result that follows them.
//!
//! - A restart marker `{"request_id", "status": "restart", "attempt"}` (AMQP `type`
//!   `restart`) goes first when an earlier attempt may have sent deltas: the caller drops
//!   the partial text it holds.
//! - The first delta goes at once; later ones are coalesced to at most one message per
//!   `stream.flush_ms` for each choice, each `{"request_id", "status": "delta", "attempt",
//!   "seq", "delta"}` (plus the choice's `index` when the request asked for several), with
//!   AMQP `type` `delta` and `message_id` `<request_id>:<attempt>:<seq>`.
//!
//! Each message waits for its confirm before the next goes out, so a slow broker makes the
//! messages fewer and larger, never the stream slower. Deltas are best effort: one that
//! cannot be published ends the deltas of this attempt, and the result still goes out.

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use tokio::{sync::mpsc::UnboundedReceiver, time::Instant};
use tracing::warn;

use crate::{
    broker::publish::{Publisher, ReplyRoute},
    contract::stream::{DELTA, Delta, RESTART, Restart},
    runtime::metrics::Metrics,
    upstream::http::stream::Piece,
};

/// Where and how one attempt's deltas go.
pub(super) struct Out<'a> {
    pub publisher: &'a Publisher,
    pub route: &'a ReplyRoute,
    /// The attempt's number (`attempts` once it is made).
    pub attempt: u32,
    /// `stream.flush_ms`.
    pub flush: Duration,
    /// The request asked for several choices: each message names its choice.
    pub indexed: bool,
    pub metrics: &'a Metrics,
}

/// What went out, as it went: read after the attempt, even one dropped midway.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// A restart marker was published.
    pub marked: AtomicBool,
    /// At least one delta was published.
    pub delta: AtomicBool,
    /// Bytes of text (content, reasoning, tool-call arguments) the published deltas
    /// carried: what the caller was given, charged to its tenant if no answer follows.
    pub bytes: AtomicU64,
}

/// Publishes a restart marker first when `restart`, then the pieces from `pieces` until the
/// attempt drops its end of the channel (its answer is complete, or it failed), then
/// returns: every delta of the attempt is confirmed by then.
pub(super) async fn forward(
    out: Out<'_>,
    mut pieces: UnboundedReceiver<Piece>,
    restart: bool,
    progress: &Progress,
) {
    let request_id = out.route.request_id.as_str();
    if restart {
        let marker = Restart::new(request_id, out.attempt);
        match out
            .publisher
            .stream_message(out.route, RESTART, marker.message_id(), &marker.to_bytes())
            .await
        {
            Ok(()) => {
                out.metrics.stream_restarts.inc();
                progress.marked.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                warn!(error = %e, "the restart marker could not be published; no deltas for this attempt");
                return;
            }
        }
    }
    let mut seq = 0u64;
    let mut last: Option<Instant> = None;
    let mut batch: Vec<Piece> = Vec::new();
    loop {
        let Some(first) = pieces.recv().await else {
            return;
        };
        add(&mut batch, first);
        let mut open = true;
        // After the first message, at most one per flush interval: what comes meanwhile is
        // merged; the end of the stream flushes at once.
        if let Some(last) = last {
            let due = last + out.flush;
            loop {
                tokio::select! {
                    biased;
                    () = tokio::time::sleep_until(due) => break,
                    piece = pieces.recv() => match piece {
                        Some(piece) => add(&mut batch, piece),
                        None => {
                            open = false;
                            break;
                        }
                    },
                }
            }
        }
        while let Ok(piece) = pieces.try_recv() {
            add(&mut batch, piece);
        }
        // The interval runs from this publish, not from its confirm: a confirm's wait does
        // not space the messages out further.
        let sent = Instant::now();
        for piece in batch.drain(..) {
            let index = (out.indexed || piece.index != 0).then_some(piece.index);
            let delta = Delta::new(request_id, out.attempt, seq, index, piece.delta);
            if let Err(e) = out
                .publisher
                .stream_message(out.route, DELTA, delta.message_id(), &delta.to_bytes())
                .await
            {
                warn!(error = %e, seq, "a delta could not be published; no more deltas for this attempt, the result follows");
                return;
            }
            out.metrics.stream_deltas.inc();
            progress.delta.store(true, Ordering::Relaxed);
            progress
                .bytes
                .fetch_add(text_bytes(&delta.delta), Ordering::Relaxed);
            seq += 1;
        }
        last = Some(sent);
        if !open {
            return;
        }
    }
}

/// Bytes of the text in a delta: every string in it at any depth, but its role.
fn text_bytes(delta: &serde_json::Map<String, serde_json::Value>) -> u64 {
    fn of(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::String(s) => s.len(),
            serde_json::Value::Array(items) => items.iter().map(of).sum(),
            serde_json::Value::Object(map) => map.values().map(of).sum(),
            _ => 0,
        }
    }
    let bytes: usize = delta
        .iter()
        .filter(|(key, _)| *key != "role")
        .map(|(_, v)| of(v))
        .sum();
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// Adds a piece to the batch: merged into the one of its choice, if there is one.
fn add(batch: &mut Vec<Piece>, piece: Piece) {
    match batch.iter_mut().find(|p| p.index == piece.index) {
        Some(have) => have.absorb(piece),
        None => batch.push(piece),
    }
}
