//! A streamed chat answer (`stream: true`): [`LlmClient::chat_stream`] makes the call, and
//! the upstream's server-sent events are read as they arrive, each chunk's delta handed on as a [`Piece`] (for the worker to publish to
//! `reply_to`), and merged into the whole answer, which ends as the same [`ChatAnswer`] a
//! call without streaming returns.
//!
//! The events are parsed by `eventsource-stream` over reqwest's byte stream: one HTTP call,
//! one stream, never a reconnect (each would be a new, billed call). What any
//! OpenAI-compatible server sends is understood: `data:` lines, comments and keep-alives,
//! `[DONE]`, a usage-only last chunk with empty `choices`, tool-call deltas split across
//! chunks, and an `error` event in place of a chunk.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

pub use super::client::StreamLimits;
use super::{
    client::{ChatAnswer, LlmClient, read_bounded},
    provider::{Event, Provider},
    sse::{Cut, Lines, broken, unparseable},
};
use crate::{
    contract::Usage,
    upstream::failure::{Class, Failure},
};

/// Most choices a stream may carry (`llm.max_n` is far below), and most items of a list in
/// one choice (its tool calls): a hostile upstream sending more is refused rather than
/// merged item by item.
const MAX_CHOICES: u64 = 128;
const MAX_LIST_ITEMS: usize = 256;

/// Where the deltas of a streamed answer go, in the order they came.
pub type Deltas = mpsc::UnboundedSender<Piece>;

/// What one chunk added to one choice: its `delta` without the role (`content`,
/// `refusal` or `tool_calls` fragments), in the OpenAI chunk shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The choice's `index`.
    pub index: u64,
    /// The fragment.
    pub delta: Map<String, Value>,
}

impl Piece {
    /// Appends a later piece of the same choice: texts joined, tool-call fragments merged by
    /// their `index`, so that a coalesced delta reads as one chunk would.
    pub fn absorb(&mut self, later: Piece) {
        merge(&mut self.delta, later.delta);
    }
}

/// Merges `delta` into `acc` as streamed chat deltas accumulate (as OpenAI's own SDKs do):
/// strings are appended, except `index`, `type`, `id` and `role`, which are set; objects
/// merge; list items with an `index` merge into the item of the same index, others are
/// appended; nulls change nothing.
pub fn merge(acc: &mut Map<String, Value>, delta: Map<String, Value>) {
    for (key, value) in delta {
        if value.is_null() {
            continue;
        }
        let Some(slot) = acc.get_mut(&key) else {
            acc.insert(key, value);
            continue;
        };
        match (slot, value) {
            (slot, value) if matches!(key.as_str(), "index" | "type" | "id" | "role") => {
                *slot = value;
            }
            (Value::String(s), Value::String(more)) => s.push_str(&more),
            (Value::Object(inner), Value::Object(more)) => merge(inner, more),
            (Value::Array(items), Value::Array(more)) => {
                for item in more {
                    // Bounded: the assembly refuses longer lists before they get here.
                    let at = item.get("index").and_then(|i| {
                        items
                            .iter()
                            .take(MAX_LIST_ITEMS)
                            .position(|have| have.get("index") == Some(i))
                    });
                    match (at, item) {
                        (Some(at), Value::Object(item)) => {
                            if let Value::Object(have) = &mut items[at] {
                                merge(have, item);
                            }
                        }
                        (_, item) => items.push(item),
                    }
                }
            }
            (slot, value) => *slot = value,
        }
    }
}

/// One choice as its chunks built it.
#[derive(Debug, Default)]
struct Choice {
    /// The message's fields merged from every delta (role included).
    message: Map<String, Value>,
    finish_reason: Option<Value>,
    /// `logprobs.content` items, in order.
    logprobs: Option<Vec<Value>>,
}

/// The answer being assembled from the chunks.
#[derive(Debug, Default)]
struct Assembly {
    choices: BTreeMap<u64, Choice>,
    model: Option<String>,
    usage: Option<Usage>,
    /// Pieces handed on so far: after the first, any failure is transient, since the
    /// caller has seen part of an answer and only a new attempt (with its restart marker)
    /// can replace it.
    pieces: u64,
    /// Bytes of the answer assembled so far (its texts and fields, not the events'
    /// framing), and the most it may hold (`llm.max_response_bytes`).
    size: usize,
    max_size: usize,
    /// The failure would only happen again (the answer is too large): not retried, even
    /// after deltas.
    lasting: bool,
}

impl Assembly {
    /// Takes one chunk (in the OpenAI chunk shape, whatever the provider sent): merges
    /// its deltas and hands each non-empty one on.
    fn chunk(&mut self, mut chunk: Map<String, Value>, deltas: &Deltas) -> Result<(), Failure> {
        if self.model.is_none()
            && let Some(Value::String(model)) = chunk.remove("model")
        {
            self.model = Some(model);
        }
        if let Some(usage) = chunk.remove("usage").filter(|u| !u.is_null()) {
            self.usage = Some(
                serde_json::from_value(usage)
                    .map_err(|e| unparseable(&format!("a chunk's usage: {e}")))?,
            );
        }
        let choices = match chunk.remove("choices") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(choices)) => choices,
            Some(_) => return Err(unparseable("a chunk's choices is not a list")),
        };
        for choice in choices {
            let Value::Object(mut choice) = choice else {
                return Err(unparseable("a chunk's choice is not an object"));
            };
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
            if index >= MAX_CHOICES {
                return Err(unparseable(&format!("a choice index of {index}")));
            }
            let have = self.choices.entry(index).or_default();
            if let Some(reason) = choice.remove("finish_reason").filter(|r| !r.is_null()) {
                have.finish_reason = Some(reason);
            }
            if let Some(Value::Array(items)) = choice
                .remove("logprobs")
                .and_then(|mut l| l.get_mut("content").map(Value::take))
            {
                have.logprobs.get_or_insert_with(Vec::new).extend(items);
            }
            let delta = match choice.remove("delta") {
                Some(Value::Object(delta)) => delta,
                None | Some(Value::Null) => continue,
                Some(_) => return Err(unparseable("a chunk's delta is not an object")),
            };
            let piece: Map<String, Value> = delta
                .iter()
                .filter(|(key, value)| key.as_str() != "role" && carries(value))
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect();
            self.size = self.size.saturating_add(size_of(&delta));
            if self.size > self.max_size {
                self.lasting = true;
                return Err(super::client::too_large(self.max_size));
            }
            let long = |m: &Map<String, Value>| {
                m.values()
                    .any(|v| v.as_array().is_some_and(|a| a.len() > MAX_LIST_ITEMS))
            };
            if long(&delta) || long(&have.message) {
                return Err(unparseable(&format!(
                    "a list of over {MAX_LIST_ITEMS} items in a choice"
                )));
            }
            merge(&mut have.message, delta);
            if !piece.is_empty() {
                self.pieces += 1;
                // A caller that stopped listening leaves the answer to be assembled.
                let _ = deltas.send(Piece {
                    index,
                    delta: piece,
                });
            }
        }
        Ok(())
    }

    /// The whole answer, as a call without streaming returns it: every choice as
    /// `{index, message, logprobs, finish_reason}`.
    fn finish(self, requested: &str) -> Result<ChatAnswer, Failure> {
        let mut choices = Vec::with_capacity(self.choices.len());
        for (index, choice) in self.choices {
            let mut message = choice.message;
            message
                .entry("role")
                .or_insert_with(|| Value::String("assistant".into()));
            let tool_calls = message.get_mut("tool_calls").and_then(Value::as_array_mut);
            let has_tools = tool_calls.as_ref().is_some_and(|t| !t.is_empty());
            // A non-streamed message's tool calls carry no `index`.
            for call in tool_calls.into_iter().flatten() {
                if let Value::Object(call) = call {
                    call.remove("index");
                }
            }
            // As a non-streamed answer says it: no text beside tool calls or a refusal is
            // `null`.
            let refused = message.get("refusal").is_some_and(carries);
            let empty = message
                .get("content")
                .is_none_or(|c| c.as_str().is_some_and(str::is_empty) || c.is_null());
            if empty {
                let content = if has_tools || refused {
                    Value::Null
                } else {
                    Value::String(String::new())
                };
                message.insert("content".into(), content);
            }
            choices.push(serde_json::json!({
                "index": index,
                "message": message,
                "logprobs": choice.logprobs.map(|content| serde_json::json!({"content": content})),
                "finish_reason": choice.finish_reason,
            }));
        }
        let first = choices
            .first()
            .ok_or_else(|| unparseable("the stream carried no choice"))?;
        let message = &first["message"];
        let field = |name: &str| Some(message[name].clone()).filter(|v| !v.is_null());
        let content = match field("content") {
            None => None,
            Some(Value::String(text)) => Some(text),
            Some(_) => return Err(unparseable("choices[0]'s content is not text")),
        };
        Ok(ChatAnswer {
            content,
            tool_calls: field("tool_calls"),
            refusal: field("refusal"),
            finish_reason: first["finish_reason"].as_str().map(str::to_string),
            model: self.model.unwrap_or_else(|| requested.to_string()),
            usage: self.usage,
            spent_for: None,
            choices,
        })
    }

    /// Whether every choice has said why it ended: a stream that stops there without
    /// `[DONE]` (as a few servers do) is complete.
    fn finished(&self) -> bool {
        !self.choices.is_empty() && self.choices.values().all(|c| c.finish_reason.is_some())
    }
}

/// Whether a delta field adds anything: a non-empty text, list or object.
fn carries(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    }
}

/// Bytes a delta adds to the answer: its texts and keys, and a few for anything else.
fn size_of(delta: &Map<String, Value>) -> usize {
    fn value(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(value).sum::<usize>() + 2,
            Value::Object(o) => size_of(o),
            _ => 8,
        }
    }
    delta.iter().map(|(k, v)| k.len() + value(v)).sum()
}

/// Reads a stream of server-sent events to its end (`[DONE]`), handing each delta to
/// `deltas` as it comes, and returns the whole answer. An answer over `max_bytes`
/// (assembled, not counting the events' framing) is refused; a silence longer than
/// `limits.idle`, or a stream still running at `until`, is cut off.
///
/// A failure after the first delta was handed on is transient (the caller
/// holds part of an answer, which a new attempt replaces), unless it would only happen
/// again: an answer too large, or a stream longer than `llm.stream_max_secs`.
pub async fn read<S>(
    bytes: S,
    provider: &dyn Provider,
    requested: &str,
    max_bytes: usize,
    limits: StreamLimits,
    until: tokio::time::Instant,
    deltas: &Deltas,
) -> Result<ChatAnswer, Failure>
where
    S: Stream<Item = Result<Bytes, Failure>>,
{
    // When the last bytes came, in ms from `start`: comments and keep-alives make no event,
    // yet they show the stream is alive.
    let start = tokio::time::Instant::now();
    let heard = std::sync::atomic::AtomicU64::new(0);
    let lines = std::sync::Mutex::new(Lines::default());
    let checked = bytes.map(|chunk| {
        let chunk = chunk.map_err(Cut::Failed)?;
        let now = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        heard.store(now, std::sync::atomic::Ordering::Relaxed);
        lines.lock().unwrap_or_else(|e| e.into_inner()).pass(chunk)
    });
    let events = checked.eventsource();
    let mut events = std::pin::pin!(events);
    let mut answer = Assembly {
        max_size: max_bytes,
        ..Assembly::default()
    };
    let mut any_event = false;
    let outcome = loop {
        let last = start + Duration::from_millis(heard.load(std::sync::atomic::Ordering::Relaxed));
        let next = tokio::time::timeout_at(until.min(last + limits.idle), events.next());
        let event = match next.await {
            Ok(Some(Ok(event))) => event,
            Ok(Some(Err(e))) => break Err(broken(e)),
            Ok(None) if answer.finished() => break Ok(()),
            // Not a stream at all, though it said so: an error body, read as one.
            Ok(None) if !any_event => {
                let head =
                    std::mem::take(&mut lines.lock().unwrap_or_else(|e| e.into_inner()).head);
                let head = String::from_utf8_lossy(&head);
                break Err(match provider.stream_event(head.trim()) {
                    Err(e) if serde_json::from_str::<Map<String, Value>>(head.trim()).is_ok() => e,
                    _ => transient("the stream ended before [DONE]".into(), false),
                });
            }
            Ok(None) => break Err(transient("the stream ended before [DONE]".into(), false)),
            // Not pushback: a generation this long would be cut off again.
            Err(_) if tokio::time::Instant::now() >= until => {
                answer.lasting = true;
                break Err(Failure::permanent(format!(
                    "the stream ran longer than llm.stream_max_secs ({} s); raise it for \
                         longer generations",
                    limits.total.as_secs()
                )));
            }
            // Bytes came meanwhile (a comment): not idle. Waiting for the next event again
            // loses nothing: the parser keeps what it has read.
            Err(_)
                if heard.load(std::sync::atomic::Ordering::Relaxed)
                    > u64::try_from((last - start).as_millis()).unwrap_or(u64::MAX) =>
            {
                continue;
            }
            Err(_) => {
                break Err(transient(
                    format!(
                        "no chunk for {} s (llm.stream_idle_timeout_secs)",
                        limits.idle.as_secs()
                    ),
                    true,
                ));
            }
        };
        any_event = true;
        let data = event.data.trim();
        // An event without data (a named ping, a bare `event:` line) carries nothing.
        if data.is_empty() {
            continue;
        }
        let chunk = match provider.stream_event(data) {
            Ok(Event::Chunk(chunk)) => chunk,
            Ok(Event::Done) => break Ok(()),
            Ok(Event::Nothing) => continue,
            Err(e) => break Err(e),
        };
        if let Err(e) = answer.chunk(chunk, deltas) {
            break Err(e);
        }
    };
    answer.end(outcome, requested)
}

impl Assembly {
    /// The stream's end: the whole answer, or its failure, which is transient once part of
    /// the answer was handed on (unless it would only happen again).
    fn end(self, outcome: Result<(), Failure>, requested: &str) -> Result<ChatAnswer, Failure> {
        let (pieces, lasting) = (self.pieces, self.lasting);
        match outcome.and_then(|()| self.finish(requested)) {
            // What would only happen again stays as it is.
            Err(f) if f.class == Class::Permanent && pieces > 0 && !lasting => Err(transient(
                format!("after part of the answer: {}", f.message()),
                false,
            )),
            Err(f)
                if matches!(
                    f.class,
                    Class::Transient | Class::Throttle | Class::Permanent
                ) =>
            {
                Err(f)
            }
            Err(e) if pieces > 0 => Err(transient(format!("after part of the answer: {e}"), false)),
            other => other,
        }
    }
}

fn transient(message: String, throttle: bool) -> Failure {
    let class = if throttle {
        Class::Throttle
    } else {
        Class::Transient
    };
    Failure::upstream(class, message)
}

/// Hands on the text and tool calls of an answer that came whole although a stream was
/// asked for (a server that does not stream): one piece per choice.
pub fn pieces_of(answer: &ChatAnswer, deltas: &Deltas) {
    for choice in &answer.choices {
        let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
        let Some(Value::Object(message)) = choice.get("message") else {
            continue;
        };
        let mut delta: Map<String, Value> = message
            .iter()
            .filter(|(key, value)| {
                matches!(key.as_str(), "content" | "refusal" | "tool_calls") && carries(value)
            })
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        // Streamed tool-call fragments carry their position.
        if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
            for (i, call) in calls.iter_mut().enumerate() {
                if let Value::Object(call) = call {
                    call.entry("index").or_insert_with(|| Value::from(i));
                }
            }
        }
        if !delta.is_empty() {
            let _ = deltas.send(Piece { index, delta });
        }
    }
}

/// The streamed call lives here, beside its reader; the client's plain calls and the
/// classification of every failure it shares stay in [`super::client`].
impl LlmClient {
    /// `POST {base_url}/chat/completions` with `stream: true`: each delta goes to `deltas`
    /// as it arrives, and the whole answer is returned at the end
    /// ([`read`]). A server that answers whole instead is understood too: its
    /// answer is handed on as one delta per choice.
    pub async fn chat_stream(
        &self,
        model: &str,
        messages: &[Value],
        params: &Map<String, Value>,
        deltas: &Deltas,
    ) -> Result<ChatAnswer, Failure> {
        let params = self.output_bound_field(params);
        let body = self.provider.chat_body(model, messages, &params, true)?;
        let limits = self.stream;
        let until = tokio::time::Instant::now() + limits.total;
        let sent = self.send(&self.chat_url, body, Some(limits.total));
        let idle = until.min(tokio::time::Instant::now() + limits.idle);
        let (resp, spent_for) = tokio::time::timeout_at(idle, sent).await.map_err(|_| {
            Failure::upstream(
                Class::Throttle,
                format!(
                    "no answer within {} s (llm.stream_idle_timeout_secs)",
                    limits.idle.as_secs()
                ),
            )
        })??;
        let streamed = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if !streamed {
            let limit = self.max_response_bytes;
            let (body, cut) = read_bounded(resp, limit)
                .await
                .map_err(|e| Failure::of_transport(&e))?;
            // Events under another content type (a proxy that relabels them) are still
            // events.
            let text = body.trim_ascii_start();
            if !cut && (text.starts_with(b"data:") || text.starts_with(b":")) {
                let events = futures_util::stream::iter([Ok(bytes::Bytes::from(body))]);
                let provider = &*self.provider;
                let read = read(events, provider, model, limit, limits, until, deltas);
                let mut answer = read.await?;
                answer.spent_for = spent_for;
                return Ok(answer);
            }
            if cut {
                return Err(super::client::too_large(limit));
            }
            let mut answer = self.provider.chat_answer(&body, model)?;
            answer.spent_for = spent_for;
            pieces_of(&answer, deltas);
            return Ok(answer);
        }
        let bytes = futures_util::StreamExt::map(resp.bytes_stream(), |chunk| {
            chunk.map_err(|e| Failure::of_transport(&e))
        });
        let limit = self.max_response_bytes;
        let read = read(bytes, &*self.provider, model, limit, limits, until, deltas);
        let mut answer = read.await?;
        answer.spent_for = spent_for;
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::upstream::http::openai::OpenAi;

    /// Reads `body` as a stream split into `split`-byte chunks, with the pieces it handed on.
    async fn read_body(body: &str, split: usize) -> (Result<ChatAnswer, Failure>, Vec<Piece>) {
        let parts: Vec<Result<Bytes, Failure>> = body
            .as_bytes()
            .chunks(split)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        let answer = read(
            futures_util::stream::iter(parts),
            &OpenAi,
            "asked",
            1 << 20,
            StreamLimits::default(),
            until,
            &tx,
        )
        .await;
        drop(tx);
        let mut pieces = Vec::new();
        while let Some(p) = rx.recv().await {
            pieces.push(p);
        }
        (answer, pieces)
    }

    fn event(chunk: Value) -> String {
        format!("data: {chunk}\n\n")
    }

    fn delta(index: u64, delta: Value) -> Value {
        json!({"model": "m-1", "choices": [{"index": index, "delta": delta, "finish_reason": null}]})
    }

    #[tokio::test]
    async fn text_tool_calls_and_usage_whatever_the_byte_boundaries() {
        let body = [
            ": keep-alive\n\n".to_string(),
            event(delta(0, json!({"role": "assistant", "content": ""}))),
            event(delta(0, json!({"content": "Hel"}))),
            "event: ping\ndata: \n\n".to_string(),
            event(delta(0, json!({"content": "lo"}))),
            event(delta(
                0,
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
            )),
            event(delta(
                0,
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}),
            )),
            event(delta(
                0,
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
            )),
            event(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})),
            event(
                json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}),
            ),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        for split in [1, 3, 7, 64, body.len()] {
            let (answer, pieces) = read_body(&body, split).await;
            let answer = answer.expect("an answer");
            assert_eq!(answer.content.as_deref(), Some("Hello"), "split {split}");
            assert_eq!(
                answer.tool_calls,
                Some(
                    json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}])
                )
            );
            assert_eq!(answer.finish_reason.as_deref(), Some("tool_calls"));
            assert_eq!(answer.model, "m-1");
            assert_eq!(answer.usage.as_ref().and_then(Usage::total), Some(7));
            assert_eq!(answer.choices.len(), 1);
            // The role-only chunk hands nothing on; every other delta does, as it came.
            assert_eq!(pieces.len(), 5, "split {split}");
            assert_eq!(
                pieces[0].delta,
                json!({"content": "Hel"}).as_object().cloned().unwrap()
            );
            let mut joined = pieces[0].clone();
            for p in pieces[1..].iter().cloned() {
                joined.absorb(p);
            }
            assert_eq!(
                Value::Object(joined.delta),
                json!({"content": "Hello", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]})
            );
        }
    }

    #[tokio::test]
    async fn several_choices_are_kept_apart() {
        let body = [
            event(delta(0, json!({"content": "a"}))),
            event(delta(1, json!({"content": "b"}))),
            event(delta(0, json!({"content": "c"}))),
            event(
                json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}, {"index": 1, "delta": {}, "finish_reason": "length"}]}),
            ),
            "data: [DONE]\n\n".into(),
        ]
        .concat();
        let (answer, pieces) = read_body(&body, 5).await;
        let answer = answer.expect("an answer");
        assert_eq!(answer.content.as_deref(), Some("ac"));
        assert_eq!(
            answer.choices[1],
            json!({"index": 1, "message": {"role": "assistant", "content": "b"}, "logprobs": null, "finish_reason": "length"})
        );
        let indices: Vec<u64> = pieces.iter().map(|p| p.index).collect();
        assert_eq!(indices, [0, 1, 0]);
    }

    #[tokio::test]
    async fn an_error_event_is_classified_and_is_transient_after_a_delta() {
        let quota = event(
            json!({"error": {"message": "You exceeded your quota", "type": "insufficient_quota", "code": 429}}),
        );
        let (answer, _) = read_body(&quota, 8).await;
        assert!(
            matches!(answer, Err(ref f) if f.class == Class::Quota),
            "{answer:?}"
        );
        let bad =
            event(json!({"error": {"message": "bad", "type": "BadRequestError", "code": 400}}));
        let (answer, _) = read_body(&bad, 8).await;
        assert!(
            matches!(answer, Err(ref f) if f.class == Class::Permanent),
            "{answer:?}"
        );
        let after = [event(delta(0, json!({"content": "par"}))), bad].concat();
        let (answer, pieces) = read_body(&after, 8).await;
        assert!(
            matches!(answer, Err(ref f) if f.class == Class::Transient),
            "{answer:?}"
        );
        assert_eq!(pieces.len(), 1);
    }

    #[tokio::test]
    async fn a_stream_that_stops_before_done_is_transient_unless_every_choice_finished() {
        let cut = event(delta(0, json!({"content": "par"})));
        let (answer, _) = read_body(&cut, 4).await;
        let Err(
            failure @ Failure {
                class: Class::Transient,
                ..
            },
        ) = answer
        else {
            panic!("{answer:?}")
        };
        assert!(failure.message().contains("before [DONE]"), "{failure}");
        let finished = [
            cut,
            event(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
        ]
        .concat();
        let (answer, _) = read_body(&finished, 4).await;
        assert_eq!(answer.expect("complete").content.as_deref(), Some("par"));
    }

    #[tokio::test]
    async fn garbage_and_oversized_streams_are_refused() {
        let (answer, _) = read_body("data: {not json\n\n", 4).await;
        assert!(
            matches!(answer, Err(ref f) if f.class == Class::Permanent),
            "{answer:?}"
        );
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        let (tx, _rx) = mpsc::unbounded_channel();
        // A line that never ends is refused at 1 MiB, not buffered on.
        let endless =
            futures_util::stream::repeat_with(|| Ok(Bytes::from_static(b"data: xxxxxxxx")));
        let Err(
            failure @ Failure {
                class: Class::Permanent,
                ..
            },
        ) = read(
            endless,
            &OpenAi,
            "m",
            1 << 30,
            StreamLimits::default(),
            until,
            &tx,
        )
        .await
        else {
            panic!("an endless line is refused")
        };
        assert!(
            failure.message().contains("a line of over 1048576 bytes"),
            "{failure}"
        );
        // An answer larger than max_response_bytes, counted as assembled: refused for good,
        // even after deltas went out (it would be again).
        let big = futures_util::stream::repeat_with(|| {
            Ok(Bytes::from(event(delta(
                0,
                json!({"content": "0123456789"}),
            ))))
        });
        let Err(
            failure @ Failure {
                class: Class::Permanent,
                ..
            },
        ) = read(big, &OpenAi, "m", 4096, StreamLimits::default(), until, &tx).await
        else {
            panic!("an answer over the limit is refused")
        };
        assert!(
            failure
                .message()
                .contains("llm.max_response_bytes (4096 bytes)"),
            "{failure}"
        );
        // Not UTF-8: refused at once, not held back until the body ends.
        let bad = futures_util::stream::iter([Ok(Bytes::from_static(b"data: \xff\xfe\n\n"))])
            .chain(futures_util::stream::pending());
        let Err(
            failure @ Failure {
                class: Class::Permanent,
                ..
            },
        ) = read(
            bad,
            &OpenAi,
            "m",
            1 << 20,
            StreamLimits::default(),
            until,
            &tx,
        )
        .await
        else {
            panic!("bytes that are not UTF-8 are refused")
        };
        assert!(failure.message().contains("not UTF-8"), "{failure}");
        // A character split between two chunks is fine.
        let body = event(delta(0, json!({"content": "héllo"}))) + "data: [DONE]\n\n";
        let (answer, _) = read_body(&body, 9).await;
        assert_eq!(answer.expect("an answer").content.as_deref(), Some("héllo"));
    }

    #[tokio::test]
    async fn errors_in_the_stream_are_classified_by_their_words_too() {
        let cases = [
            (
                json!({"message": "out of credit", "type": "insufficient_quota", "code": "insufficient_quota"}),
                "quota",
            ),
            (
                json!({"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}),
                "rate_limited",
            ),
            (
                json!({"message": "slow down", "code": "429"}),
                "rate_limited",
            ),
            (
                json!({"message": "bad", "type": "invalid_request_error", "code": null}),
                "permanent",
            ),
            (
                json!({"message": "boom", "type": "server_error"}),
                "transient",
            ),
        ];
        for (error, label) in cases {
            let (answer, _) = read_body(&event(json!({ "error": error })), 16).await;
            let e = answer.expect_err("an error");
            assert_eq!(e.call_label(), label, "{error}: {e}");
        }
        // A null error is no error.
        let body = [
            event(json!({"error": null, "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]})),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        assert_eq!(
            read_body(&body, 7).await.0.expect("ok").content.as_deref(),
            Some("ok")
        );
        // An error body sent as if it were a stream is read as the error it is.
        let (answer, _) = read_body(
            r#"{"error": {"message": "no such model", "type": "invalid_request_error", "code": 404}}"#,
            10,
        )
        .await;
        assert_eq!(answer.expect_err("an error").call_label(), "auth");
    }

    #[tokio::test]
    async fn a_refusal_leaves_content_null_as_without_streaming() {
        let body = [
            event(delta(0, json!({"role": "assistant", "content": ""}))),
            event(delta(0, json!({"refusal": "I can't"}))),
            event(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let answer = read_body(&body, 11).await.0.expect("an answer");
        assert_eq!(answer.content, None);
        assert_eq!(answer.refusal, Some(json!("I can't")));
        assert_eq!(answer.choices[0]["message"]["content"], Value::Null);
    }

    #[tokio::test(start_paused = true)]
    async fn silence_and_length_are_cut_off() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let limits = StreamLimits {
            idle: Duration::from_secs(5),
            total: Duration::from_secs(60),
        };
        let silent = futures_util::stream::pending::<Result<Bytes, Failure>>();
        let until = tokio::time::Instant::now() + limits.total;
        let Err(
            failure @ Failure {
                class: Class::Throttle,
                ..
            },
        ) = read(silent, &OpenAi, "m", 1 << 20, limits, until, &tx).await
        else {
            panic!("an idle stream is cut off")
        };
        assert!(
            failure.message().contains("stream_idle_timeout_secs"),
            "{failure}"
        );
        // A keep-alive every second: never idle, cut at the total, for good.
        let alive = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Some((Ok(Bytes::from_static(b": ping\n\n")), ()))
        });
        let until = tokio::time::Instant::now() + limits.total;
        let Err(
            failure @ Failure {
                class: Class::Permanent,
                ..
            },
        ) = read(alive, &OpenAi, "m", 1 << 20, limits, until, &tx).await
        else {
            panic!("a long stream is cut off")
        };
        assert!(failure.message().contains("stream_max_secs"), "{failure}");
    }

    #[test]
    fn merging_follows_the_sdk_rules() {
        let mut acc = json!({"role": "assistant", "content": "a", "tool_calls": [{"index": 0, "id": "x", "function": {"name": "f", "arguments": "{"}}]});
        let Value::Object(acc_map) = &mut acc else {
            unreachable!()
        };
        let more = json!({"role": "assistant", "content": "b", "refusal": null, "tool_calls": [{"index": 0, "function": {"arguments": "}"}}, {"index": 1, "id": "y"}]});
        let Value::Object(more) = more else {
            unreachable!()
        };
        merge(acc_map, more);
        assert_eq!(
            acc,
            json!({"role": "assistant", "content": "ab", "tool_calls": [{"index": 0, "id": "x", "function": {"name": "f", "arguments": "{}"}}, {"index": 1, "id": "y"}]})
        );
    }
}
