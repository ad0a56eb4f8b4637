//! Streamed chat answers: server-sent events in OpenAI's chunks, paced, and cut off midway
//! when asked, as an upstream failing mid-stream does.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{MockOptions, MockState, MockStats};

/// Streams a chat answer of `choices` (and `usage`, when asked for) to a call whose last
/// message is `last`: counts it, cuts it off when `--fail-mid-stream-after` says so (at
/// `--fail-mid-stream-rate`), and notes its first content when recording.
pub(super) fn answer(
    state: &MockState,
    options: &MockOptions,
    model: &str,
    choices: &[Value],
    usage: Option<&Value>,
    last: &str,
) -> Response {
    let events = sse_events(model, choices, usage);
    let n = state.stats.streams.fetch_add(1, Ordering::Relaxed);
    let rate = options.fail_mid_stream_rate.clamp(0.0, 1.0);
    let cut = ((n + 1) as f64 * rate).ceil() > (n as f64 * rate).ceil();
    let cut = options.fail_mid_stream_after.filter(|_| cut);
    if cut.is_some() {
        state.stats.streams_cut.fetch_add(1, Ordering::Relaxed);
    }
    let first_chunk = options.record_first_chunks.then(|| FirstChunk {
        stats: Arc::clone(&state.stats),
        key: last.to_string(),
    });
    sse_reply(events, cut, options, first_chunk)
}

/// Where the first content comes in [`sse_events`]' list: after the comment and the first
/// choice's role chunk.
const FIRST_CONTENT_EVENT: usize = 2;

/// Notes when a streamed answer's first content goes out
/// ([`MockOptions::record_first_chunks`]).
struct FirstChunk {
    stats: Arc<MockStats>,
    /// The answer's last message.
    key: String,
}

impl FirstChunk {
    fn note(self) {
        if let Ok(mut seen) = self.stats.first_chunks.lock() {
            seen.entry(self.key).or_insert_with(std::time::Instant::now);
        }
    }
}

/// The server-sent events of a streamed answer with these `choices`, as OpenAI sends them:
/// per choice a first chunk with the role, the text word by word (or each tool call in two
/// fragments: its id and name, then its arguments), a last chunk with the finish reason;
/// then, when asked for, a usage-only chunk with empty `choices`; then `[DONE]`. A comment
/// line comes first, as proxies' keep-alives do.
fn sse_events(model: &str, choices: &[Value], usage: Option<&Value>) -> Vec<String> {
    let chunk = |choices: Value| {
        let body = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": choices
        });
        format!("data: {body}\n\n")
    };
    let mut events = vec![": keep-alive\n\n".to_string()];
    for choice in choices {
        let index = &choice["index"];
        let message = &choice["message"];
        events.push(chunk(json!([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])));
        if let Some(text) = message["content"].as_str() {
            for (i, word) in text.split(' ').enumerate() {
                let piece = if i == 0 {
                    word.to_string()
                } else {
                    format!(" {word}")
                };
                events.push(chunk(
                    json!([{"index": index, "delta": {"content": piece}, "finish_reason": null}]),
                ));
            }
        }
        for (i, call) in message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let head = json!({"index": i, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}});
            let tail =
                json!({"index": i, "function": {"arguments": call["function"]["arguments"]}});
            for part in [head, tail] {
                events.push(chunk(json!([{"index": index, "delta": {"tool_calls": [part]}, "finish_reason": null}])));
            }
        }
        events.push(chunk(
            json!([{"index": index, "delta": {}, "finish_reason": choice["finish_reason"]}]),
        ));
    }
    if let Some(usage) = usage {
        let body = json!({
            "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [], "usage": usage
        });
        events.push(format!("data: {body}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_string());
    events
}

/// Sends `events` as `text/event-stream`, `chunk_ms` apart; with `cut`, the body breaks
/// off after that many: the connection drops (no `[DONE]`), or with `--mid-stream-error`
/// an error event ends it. `first_chunk` notes when the first content goes out.
fn sse_reply(
    events: Vec<String>,
    cut: Option<u64>,
    options: &MockOptions,
    first_chunk: Option<FirstChunk>,
) -> Response {
    let pace = Duration::from_millis(options.chunk_ms);
    let cut = cut.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    let error_event = options.mid_stream_error;
    let stream = futures_util::stream::unfold(
        (events.into_iter().enumerate(), pace, first_chunk),
        move |(mut events, pace, mut first_chunk)| async move {
            let (i, event) = events.next()?;
            if cut.is_some_and(|cut| i > cut) {
                return None;
            }
            if cut.is_some_and(|cut| i == cut) {
                if error_event {
                    let error = json!({"error": {"message": "the model failed mid-stream", "type": "server_error", "code": null}});
                    return Some((
                        Ok(Bytes::from(format!("data: {error}\n\n"))),
                        (events, pace, first_chunk),
                    ));
                }
                let broken = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "cut");
                return Some((Err(broken), (events, pace, first_chunk)));
            }
            if i > 0 && !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            if i == FIRST_CONTENT_EVENT
                && let Some(first) = first_chunk.take()
            {
                first.note();
            }
            Some((Ok(Bytes::from(event)), (events, pace, first_chunk)))
        },
    );
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::http::header;
    use serde_json::{Value, json};

    use crate::tools::mock::{
        MockOptions,
        testing::{client, data_lines, start},
    };

    #[tokio::test]
    async fn a_streamed_answer_is_sent_as_openai_chunks() {
        let mock = start(MockOptions {
            chunk_ms: 1,
            ..MockOptions::default()
        })
        .await;
        let body = json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true}, "n": 2,
            "messages": [{"role": "user", "content": "hi there"}]
        });
        let resp = client(false)
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        let text = resp.text().await.unwrap();
        assert!(text.starts_with(": keep-alive"), "{text}");
        let data = data_lines(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let text_of = |index: u64| -> String {
            chunks
                .iter()
                .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
                .filter(|c| c["index"] == index)
                .filter_map(|c| c["delta"]["content"].as_str().map(str::to_string))
                .collect()
        };
        assert_eq!(text_of(0), "mock reply to: hi there");
        assert_eq!(text_of(1), "mock reply to: hi there (choice 1)");
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"], json!([]), "a usage-only last chunk");
        assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }

    #[tokio::test]
    async fn a_streamed_answer_s_first_content_is_noted_when_recording() {
        let mock = start(MockOptions::default()).await;
        let url = format!("{}/chat/completions", mock.base_url());
        let stream = |text: &str| {
            let body = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": text}]});
            let request = client(false).post(&url).json(&body);
            async move { request.send().await.unwrap().text().await.unwrap() }
        };
        stream("not recorded").await;
        mock.set_options(MockOptions {
            record_first_chunks: true,
            ..MockOptions::default()
        });
        let before = Instant::now();
        let text = stream("recorded").await;
        let after = Instant::now();
        assert!(text.contains("mock"), "{text}");
        let seen = mock.stats().first_chunks.lock().unwrap();
        assert_eq!(seen.keys().collect::<Vec<_>>(), ["recorded"]);
        assert!((before..=after).contains(&seen["recorded"]));
    }

    #[tokio::test]
    async fn streamed_tool_calls_come_in_fragments_and_a_stream_can_break_off() {
        let mock = start(MockOptions::default()).await;
        let body = json!({
            "model": "m", "stream": true,
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
            "messages": [{"role": "user", "content": "weather?"}]
        });
        let url = format!("{}/chat/completions", mock.base_url());
        let text = client(false)
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let fragments: Vec<Value> = data_lines(&text)
            .iter()
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]
                    .as_object()
                    .cloned()
            })
            .map(Value::Object)
            .collect();
        assert_eq!(fragments.len(), 2, "{text}");
        assert_eq!(fragments[0]["function"]["name"], "get_weather");
        assert_eq!(fragments[0]["id"], "call_mock_0");
        assert!(
            fragments[1]["function"]["arguments"]
                .as_str()
                .unwrap()
                .contains("weather?")
        );

        // Paced, so that the head and the first chunks are out before the cut.
        mock.set_options(MockOptions {
            fail_mid_stream_after: Some(3),
            chunk_ms: 20,
            ..MockOptions::default()
        });
        let resp = client(false).post(&url).json(&body).send().await.unwrap();
        assert!(resp.status().is_success(), "the stream starts well");
        assert!(resp.text().await.is_err(), "and breaks off");

        // Every other stream cut, the first of each two, with an error event.
        mock.set_options(MockOptions {
            fail_mid_stream_after: Some(2),
            fail_mid_stream_rate: 0.5,
            mid_stream_error: true,
            ..MockOptions::default()
        });
        let mut bodies = Vec::new();
        for _ in 0..4 {
            let resp = client(false).post(&url).json(&body).send().await.unwrap();
            bodies.push(
                resp.text()
                    .await
                    .expect("an error event ends the body cleanly"),
            );
        }
        for (i, text) in bodies.iter().enumerate() {
            let data = data_lines(text);
            if i % 2 == 0 {
                assert_eq!(data.len(), 2, "{text}");
                assert!(data[1].contains("\"error\""), "{text}");
            } else {
                assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
            }
        }
    }
}
