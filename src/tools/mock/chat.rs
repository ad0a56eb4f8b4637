//! `/v1/chat/completions`: `mock reply to: <last message>`, a call of the first tool
//! offered, or a reply of a given size; streamed as server-sent events when asked.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{
    MockState, MockStats, answered_model, api_error,
    gate::{Call, gate},
    stream,
};

/// Answers a chat call, after the checks and the latency of [`gate`] and, with
/// `max_prompt_bytes`, the context window's.
pub(super) async fn chat(
    State(state): State<Arc<MockState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    state.stats.chat_calls.fetch_add(1, Ordering::Relaxed);
    state.record_body(&body);
    let options = state.options();
    let last = last_message(&body);
    if options.record_prompts
        && let Ok(mut prompts) = state.stats.prompts.lock()
    {
        prompts.push((last.clone(), std::time::Instant::now()));
    }
    // Dropped last, whichever way the handler returns.
    let _end = options.record_prompts.then(|| CallEnd {
        stats: Arc::clone(&state.stats),
        prompt: last.clone(),
    });
    let prompt_bytes = body["messages"].to_string().len();
    if options
        .max_prompt_bytes
        .is_some_and(|max| prompt_bytes > max)
    {
        return api_error(
            StatusCode::BAD_REQUEST,
            &format!("prompt of {prompt_bytes} bytes exceeds the context window"),
            "invalid_request_error",
            Some("context_length_exceeded"),
        );
    }
    let call = Call {
        headers: &headers,
        query: query.as_deref(),
        model: body["model"].as_str().unwrap_or_default(),
        items: 1,
    };
    let _admitted = match gate(&state, &options, &call).await {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal,
    };
    let model = answered_model(&options, body["model"].as_str(), "mock-model");
    if options.response_bytes > 0 {
        return huge_reply(&model, options.response_bytes);
    }
    let prompt_tokens = prompt_bytes / 4;
    let (choices, completion_tokens) = choices(&body, &last);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens
    });
    if body["stream"] == json!(true) {
        let with_usage =
            body["stream_options"]["include_usage"] == json!(true) && !options.no_usage;
        let usage = with_usage.then_some(&usage);
        return stream::answer(&state, &options, &model, &choices, usage, &last);
    }
    let mut answer = json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": choices,
        "usage": usage
    });
    if options.no_usage
        && let Some(fields) = answer.as_object_mut()
    {
        fields.remove("usage");
    }
    Json(answer).into_response()
}

/// The text of the call's last message (a non-text content as JSON), `""` when none.
fn last_message(body: &Value) -> String {
    body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default()
}

/// The `n` choices (1 to 8) of the answer to `body`, whose last message is `last`, and the
/// completion tokens they make: each a text reply, or, when the request offers tools and
/// the last message is not a tool's answer, a call of the first tool. Choice `i` > 0 says
/// which it is, so the choices differ. A text reply longer than the call's
/// `max_completion_tokens` (else `max_tokens`) at 4 bytes a token is cut there, with
/// `finish_reason` `length`, as a model stops at its bound.
fn choices(body: &Value, last: &str) -> (Vec<Value>, usize) {
    let n = body["n"].as_u64().unwrap_or(1).clamp(1, 8);
    let most = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body[*k].as_u64())
        .map(|tokens| usize::try_from(tokens.saturating_mul(4)).unwrap_or(usize::MAX));
    let last_role = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["role"].as_str())
        .unwrap_or("user");
    let tool = body["tools"]
        .as_array()
        .and_then(|t| t.first())
        .and_then(|t| t["function"]["name"].as_str())
        .filter(|_| last_role != "tool");
    let mut completion_tokens = 0;
    let choices = (0..n)
        .map(|i| {
            let suffix = if i == 0 { String::new() } else { format!(" (choice {i})") };
            let logprobs = (body["logprobs"] == json!(true))
                .then(|| json!({"content": [{"token": "mock", "logprob": -0.1, "bytes": [109, 111, 99, 107], "top_logprobs": []}]}));
            match tool {
                Some(name) => {
                    completion_tokens += 10;
                    json!({
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": null,
                            "tool_calls": [{
                                "id": format!("call_mock_{i}"),
                                "type": "function",
                                "function": {"name": name, "arguments": format!("{{\"question\":{}}}", json!(format!("{last}{suffix}")))}
                            }]
                        },
                        "logprobs": logprobs,
                        "finish_reason": "tool_calls"
                    })
                }
                None => {
                    let mut content = format!("mock reply to: {last}{suffix}");
                    let mut finish = "stop";
                    if let Some(most) = most.filter(|most| content.len() > *most) {
                        let mut at = most;
                        while !content.is_char_boundary(at) {
                            at -= 1;
                        }
                        content.truncate(at);
                        finish = "length";
                    }
                    completion_tokens += content.len() / 4;
                    json!({
                        "index": i,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": logprobs,
                        "finish_reason": finish
                    })
                }
            }
        })
        .collect();
    (choices, completion_tokens)
}

/// Notes in [`MockStats::ends`] when a recorded chat call's handler is done, however it
/// returns (or is dropped, when the client hangs up).
struct CallEnd {
    stats: Arc<MockStats>,
    /// The call's last message.
    prompt: String,
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        if let Ok(mut ends) = self.stats.ends.lock() {
            ends.push((std::mem::take(&mut self.prompt), std::time::Instant::now()));
        }
    }
}

/// A chat answer whose reply is `bytes` of `x`, streamed in 64 KiB chunks made as they are
/// sent, without a `Content-Length`.
fn huge_reply(model: &str, bytes: u64) -> Response {
    const CHUNK: usize = 64 * 1024;
    static PADDING: [u8; CHUNK] = [b'x'; CHUNK];
    let head =
        json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model})
            .to_string();
    // `{...,"model":"m"` + `,"choices":[...content":"xxx..."},"finish_reason":"stop"}]}`
    let head = format!(
        "{},\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"",
        head.trim_end_matches('}')
    );
    let tail = "\"},\"finish_reason\":\"stop\"}]}";
    let padding = futures_util::stream::unfold(bytes, |left| async move {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(CHUNK);
        (n > 0).then(|| (Bytes::from_static(&PADDING[..n]), left - n as u64))
    });
    let stream = futures_util::stream::once(async move { Bytes::from(head) })
        .chain(padding)
        .chain(futures_util::stream::once(async move {
            Bytes::from_static(tail.as_bytes())
        }))
        .map(Ok::<_, std::convert::Infallible>);
    let mut response = Body::from_stream(stream).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::tools::mock::{
        MockOptions,
        testing::{chat, client, embed, start},
    };

    #[tokio::test]
    async fn a_huge_reply_streams_valid_json_of_that_size() {
        let mock = start(MockOptions {
            response_bytes: 200_000,
            ..Default::default()
        })
        .await;
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let response = client(false)
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.content_length(), None, "streamed");
        let answer: Value = response.json().await.unwrap();
        let content = answer["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content.len(), 200_000);
        assert!(content.bytes().all(|b| b == b'x'));
        assert_eq!(answer["model"], "m");
    }

    #[tokio::test]
    async fn a_prompt_beyond_the_context_window_is_refused() {
        let mock = start(MockOptions {
            max_prompt_bytes: Some(100),
            ..Default::default()
        })
        .await;
        let url = format!("{}/chat/completions", mock.base_url());
        let http = client(false);
        let long =
            json!({"model": "m", "messages": [{"role": "user", "content": "x".repeat(100)}]});
        let response = http.post(&url).json(&long).send().await.unwrap();
        assert_eq!(response.status(), 400);
        let short = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        let response = http.post(&url).json(&short).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }

    #[tokio::test]
    async fn answers_name_the_dated_snapshot() {
        let mock = start(MockOptions {
            model_suffix: Some("-2024-07-18".into()),
            ..Default::default()
        })
        .await;
        let answer: Value = chat(&mock, "/chat/completions", "gpt-4o-mini")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(answer["model"], "gpt-4o-mini-2024-07-18");
        let answer: Value = embed(&mock, "e").await.json().await.unwrap();
        assert_eq!(answer["model"], "e-2024-07-18");
    }
}
