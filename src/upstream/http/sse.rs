//! The framing of a server-sent event stream before its parser: whole lines only, each
//! bounded and valid UTF-8, and how a stream that broke off is classified.

use bytes::Bytes;
use eventsource_stream::EventStreamError;

use crate::upstream::failure::{Class, Failure};

/// Longest run of bytes without a newline: one event line (a chunk) is far shorter, and the
/// parser scans its buffer again for every piece of a line that has not ended.
pub(super) const MAX_LINE: usize = 1 << 20;
/// What is kept of the body's start, to read an error body sent as if it were a stream.
const HEAD_BYTES: usize = 4096;

/// Why the byte stream stopped.
#[derive(Debug)]
pub(super) enum Cut {
    /// The transport failed (classified already).
    Failed(Failure),
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// Bytes that are not UTF-8 (the parser would hold back everything after them).
    NotUtf8,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Failed(e) => e.fmt(f),
            Cut::LineTooLong => write!(f, "a line of over {MAX_LINE} bytes"),
            Cut::NotUtf8 => f.write_str("bytes that are not UTF-8"),
        }
    }
}

/// What the byte stream goes through before the parser: only whole lines are passed on
/// (the parser scans its whole buffer again for every piece of an unfinished line, so a
/// line cut into many pieces would cost its length squared), each line at most
/// [`MAX_LINE`] bytes and valid UTF-8 (the parser would hold back everything after a bad
/// byte); and the body's first bytes are kept.
#[derive(Default)]
pub(super) struct Lines {
    /// An unfinished line.
    pending: Vec<u8>,
    pub(super) head: Vec<u8>,
}

impl Lines {
    /// The whole lines that `chunk` completes (maybe none).
    pub(super) fn pass(&mut self, chunk: Bytes) -> Result<Bytes, Cut> {
        if self.head.len() < HEAD_BYTES {
            let room = HEAD_BYTES - self.head.len();
            self.head.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        let whole = match chunk.iter().rposition(|b| *b == b'\n') {
            None => {
                self.pending.extend_from_slice(&chunk);
                Bytes::new()
            }
            // The usual case: whole lines, nothing pending.
            Some(at) if at + 1 == chunk.len() && self.pending.is_empty() => chunk,
            Some(at) => {
                let mut whole = std::mem::take(&mut self.pending);
                whole.extend_from_slice(&chunk[..=at]);
                self.pending.extend_from_slice(&chunk[at + 1..]);
                Bytes::from(whole)
            }
        };
        if self.pending.len() > MAX_LINE {
            return Err(Cut::LineTooLong);
        }
        // Whole lines end in a newline, which no UTF-8 sequence straddles.
        if std::str::from_utf8(&whole).is_err() {
            return Err(Cut::NotUtf8);
        }
        Ok(whole)
    }
}

/// A stream that broke off: a transport failure keeps its class; an answer over the size
/// limit is permanent, as it is without streaming.
pub(super) fn broken(e: EventStreamError<Cut>) -> Failure {
    match e {
        EventStreamError::Transport(Cut::Failed(f))
            if matches!(f.class, Class::Transient | Class::Throttle) =>
        {
            Failure::upstream(f.class, format!("the stream broke off: {}", f.message()))
                .after(f.retry_after)
        }
        EventStreamError::Transport(Cut::Failed(f)) => f,
        EventStreamError::Transport(Cut::LineTooLong) => {
            unparseable(&format!("a line of over {MAX_LINE} bytes"))
        }
        EventStreamError::Transport(Cut::NotUtf8) => unparseable("bytes that are not UTF-8"),
        EventStreamError::Utf8(e) => unparseable(&format!("not UTF-8: {e}")),
        EventStreamError::Parser(e) => unparseable(&format!("not server-sent events: {e}")),
    }
}

/// A stream that is not one llmq can read.
pub(super) fn unparseable(what: &str) -> Failure {
    Failure::permanent(format!("unparseable upstream stream: {what}"))
}
