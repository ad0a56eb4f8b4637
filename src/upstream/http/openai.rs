//! The OpenAI-compatible wire format (OpenAI, Azure OpenAI, vLLM, Ollama, LiteLLM, the
//! mock): `POST /chat/completions` and `/embeddings` with a bearer key, answers read from
//! `choices` and `data`, errors from `error.type`, `error.code` and `error.message`.

use std::time::Duration;

use reqwest::StatusCode;
use serde::{Deserialize, Serialize, ser::SerializeMap};
use serde_json::{Map, Value};

use super::{
    answer::{ChatAnswer, EmbeddingAnswer},
    provider::{Event, Provider},
};
use crate::{
    contract::{Usage, request::Kind, response::Vector},
    upstream::failure::{Failure, MAX_ERROR_TEXT},
};

/// The OpenAI-compatible provider.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenAi;

impl Provider for OpenAi {
    fn path(&self, kind: Kind) -> &'static str {
        match kind {
            Kind::Chat => "/chat/completions",
            Kind::Embedding => "/embeddings",
        }
    }

    fn auth(&self, api_key: &str) -> Vec<(&'static str, String)> {
        vec![("authorization", format!("Bearer {api_key}"))]
    }

    fn chat_body(
        &self,
        model: &str,
        messages: &[Value],
        params: &Map<String, Value>,
        stream: bool,
    ) -> Result<Vec<u8>, Failure> {
        to_vec(&Body {
            model,
            key: "messages",
            value: messages,
            params,
            stream,
        })
    }

    fn embedding_body(
        &self,
        model: &str,
        input: &[String],
        params: &Map<String, Value>,
    ) -> Result<Vec<u8>, Failure> {
        to_vec(&Body {
            model,
            key: "input",
            value: input,
            params,
            stream: false,
        })
    }

    fn chat_answer(&self, body: &[u8], model: &str) -> Result<ChatAnswer, Failure> {
        chat_answer(parse(body)?, model)
    }

    fn embedding_answer(
        &self,
        body: &[u8],
        model: &str,
        inputs: usize,
    ) -> Result<EmbeddingAnswer, Failure> {
        let answer: EmbeddingResponse = parse(body)?;
        let mut data = answer.data;
        if data.len() != inputs {
            return Err(Failure::permanent(format!(
                "upstream returned {} embeddings for {inputs} inputs",
                data.len()
            )));
        }
        data.sort_by_key(|d| d.index);
        Ok(EmbeddingAnswer {
            vectors: data.into_iter().map(|d| d.embedding).collect(),
            model: answer.model.unwrap_or_else(|| model.to_string()),
            usage: answer.usage,
            spent_for: None,
        })
    }

    fn failure(&self, status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> Failure {
        classify_failure(status, body, retry_after)
    }

    fn stream_event(&self, data: &str) -> Result<Event, Failure> {
        if data == "[DONE]" {
            return Ok(Event::Done);
        }
        let chunk = serde_json::from_str(data)
            .map_err(|e| unparseable_stream(&format!("a chunk is not JSON: {e}")))?;
        let Value::Object(mut chunk) = chunk else {
            return Err(unparseable_stream("a chunk is not a JSON object"));
        };
        if let Some(error) = chunk.remove("error").filter(|e| !e.is_null()) {
            return Err(stream_error(&error));
        }
        Ok(Event::Chunk(chunk))
    }
}

fn unparseable_stream(what: &str) -> Failure {
    Failure::permanent(format!("unparseable upstream stream: {what}"))
}

/// A body serialized, or the reason it could not be.
fn to_vec(body: &impl Serialize) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(body)
        .map_err(|e| Failure::permanent(format!("cannot serialize the request: {e}")))
}

/// A successful answer's body parsed.
fn parse<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(bytes)
        .map_err(|e| Failure::permanent(format!("unparseable upstream answer: {e}")))
}

/// A request body, serialized straight from the job's data: the extra params, then `model`
/// and the messages or inputs under `key` (which win over params of the same name).
struct Body<'a, T: Serialize + ?Sized> {
    model: &'a str,
    key: &'static str,
    value: &'a T,
    params: &'a Map<String, Value>,
    /// Ask for server-sent events, with usage in the last chunk.
    stream: bool,
}

impl<T: Serialize + ?Sized> Serialize for Body<'_, T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in self.params {
            if k != "model" && k != self.key {
                map.serialize_entry(k, v)?;
            }
        }
        map.serialize_entry("model", self.model)?;
        map.serialize_entry(self.key, self.value)?;
        // `stream` and `stream_options` are reserved: never among the params.
        if self.stream {
            map.serialize_entry("stream", &true)?;
            map.serialize_entry(
                "stream_options",
                &serde_json::json!({"include_usage": true}),
            )?;
        }
        map.end()
    }
}

#[derive(Deserialize)]
struct ChatResponse {
    model: Option<String>,
    /// Kept verbatim: tool calls, refusals, logprobs and whatever a provider adds.
    choices: Vec<Value>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EmbeddingResponse {
    model: Option<String>,
    data: Vec<EmbeddingData>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct EmbeddingData {
    #[serde(default)]
    index: usize,
    /// Numbers, or base64 text when the request asked for it: kept as sent.
    embedding: Vector,
}

/// A chat completion's answer read: the first choice for the top-level fields, every choice
/// kept as sent.
fn chat_answer(answer: ChatResponse, model: &str) -> Result<ChatAnswer, Failure> {
    let first = answer
        .choices
        .first()
        .ok_or_else(|| Failure::permanent("upstream answer has no choices"))?;
    let message = Some(
        first
            .get("message")
            .and_then(Value::as_object)
            .ok_or_else(|| {
                Failure::permanent("unparseable upstream answer: choices[0] has no message")
            })?,
    );
    let field = |name: &str| {
        message
            .and_then(|m| m.get(name))
            .filter(|v| !v.is_null())
            .cloned()
    };
    let content = match field("content") {
        None => None,
        Some(Value::String(text)) => Some(text),
        Some(other) => {
            return Err(Failure::permanent(format!(
                "unparseable upstream answer: choices[0].message.content is {}",
                crate::contract::request::json_type(&other)
            )));
        }
    };
    let (tool_calls, refusal) = (field("tool_calls"), field("refusal"));
    let finish_reason = first
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(ChatAnswer {
        content,
        tool_calls,
        refusal,
        model: answer.model.unwrap_or_else(|| model.to_string()),
        usage: answer.usage,
        finish_reason,
        spent_for: None,
        choices: answer.choices,
    })
}

/// A failed answer classified by [`Failure::of_answer`]'s rules, from its status and what
/// its error body says (`error.type`, `error.code`, `error.message`, as OpenAI, Azure, vLLM
/// and LiteLLM send them, or the same at the top level).
pub(crate) fn classify_failure(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Failure {
    // Scrubbed before the final cut, so that a key at the cut is still recognised whole;
    // the generous first cut keeps the scrub's work bounded.
    let text = String::from_utf8_lossy(&body[..body.len().min(4 * MAX_ERROR_TEXT)]);
    let text = super::scrub::scrub_secrets(&text);
    let text = crate::truncate(&text, MAX_ERROR_TEXT).to_string();
    let error: Value = serde_json::from_slice::<Value>(body)
        .ok()
        .map(|v| v.get("error").cloned().unwrap_or(v))
        .unwrap_or(Value::Null);
    let field = |name: &str| {
        error
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    Failure::of_answer(status, &field("type"), &field("code"), &text, retry_after)
}

/// An `error` sent in the stream, classified as if it had come as the answer's status:
/// its `code` when it is an HTTP status (a number, or a number in a string, as LiteLLM
/// sends it), else the status its `type` or `code` names (OpenAI sends strings such as
/// `insufficient_quota` or `rate_limit_exceeded` there), else a server error.
fn stream_error(error: &Value) -> Failure {
    let text = |name: &str| {
        error
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    let numeric = match error.get("code") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    let named = |what: &str| text("type").contains(what) || text("code").contains(what);
    let status = numeric
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(if named("insufficient_quota") || named("rate_limit") {
            StatusCode::TOO_MANY_REQUESTS
        } else if named("invalid_request") || named("context_length") || named("content_") {
            StatusCode::BAD_REQUEST
        } else if named("authentication") || named("permission") {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_GATEWAY
        });
    let body = serde_json::json!({ "error": error }).to_string();
    classify_failure(status, body.as_bytes(), None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::failure::Class;

    #[test]
    fn body_puts_model_and_messages_over_params() {
        let mut params = Map::new();
        params.insert("temperature".into(), Value::from(0.5));
        params.insert("model".into(), Value::from("ignored"));
        let messages = [serde_json::json!({"role": "user", "content": "hi"})];
        let body = Body {
            model: "m",
            key: "messages",
            value: &messages[..],
            params: &params,
            stream: false,
        };
        let text = serde_json::to_string(&body).expect("serializes");
        assert_eq!(
            serde_json::from_str::<Value>(&text).expect("JSON"),
            serde_json::json!({"model": "m", "temperature": 0.5, "messages": [{"role": "user", "content": "hi"}]})
        );
        assert_eq!(text.matches("\"model\"").count(), 1, "{text}");
        let streamed = Body {
            stream: true,
            ..body
        };
        assert_eq!(
            serde_json::to_value(&streamed).expect("serializes"),
            serde_json::json!({"model": "m", "temperature": 0.5, "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": true}})
        );
    }

    fn failure(status: u16, body: serde_json::Value) -> Failure {
        let status = StatusCode::from_u16(status).expect("status");
        classify_failure(status, body.to_string().as_bytes(), None)
    }

    #[test]
    fn failures_are_classified_by_status_and_error_body() {
        let quota = serde_json::json!({"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "code": "insufficient_quota"}});
        assert_eq!(failure(429, quota).class, Class::Quota);
        let code_only =
            serde_json::json!({"error": {"message": "x", "code": "insufficient_quota"}});
        assert_eq!(failure(429, code_only).class, Class::Quota);
        let limited =
            serde_json::json!({"error": {"message": "slow down", "type": "rate_limit_error"}});
        assert_eq!(failure(429, limited).class, Class::RateLimited);
        assert_eq!(
            failure(429, serde_json::json!("plain")).class,
            Class::RateLimited
        );
        let context = serde_json::json!({"error": {"message": "too long", "code": "context_length_exceeded"}});
        assert_eq!(failure(400, context).class, Class::ContextLength);
        // vLLM words it in the message only.
        let vllm = serde_json::json!({"object": "error", "message": "This model's maximum context length is 4096 tokens", "type": "BadRequestError", "code": 400});
        assert_eq!(failure(400, vllm).class, Class::ContextLength);
        let other = serde_json::json!({"error": {"message": "bad temperature"}});
        assert_eq!(failure(400, other).class, Class::Permanent);
        for status in [401, 403, 404] {
            assert_eq!(
                failure(status, serde_json::json!({})).class,
                Class::Refused,
                "{status}"
            );
        }
        for status in [500, 503, 408] {
            assert_eq!(
                failure(status, serde_json::json!({})).class,
                Class::Transient,
                "{status}"
            );
        }
    }

    #[test]
    fn stream_events_are_chunks_the_end_or_errors() {
        let provider = OpenAi;
        assert!(matches!(provider.stream_event("[DONE]"), Ok(Event::Done)));
        let Ok(Event::Chunk(chunk)) = provider.stream_event(r#"{"model": "m", "choices": []}"#)
        else {
            panic!("a chunk");
        };
        assert_eq!(chunk.get("model"), Some(&Value::from("m")));
        assert!(
            matches!(provider.stream_event(r#"{"error": {"code": 429, "message": "slow"}}"#), Err(ref f) if f.class == Class::RateLimited)
        );
        assert!(matches!(provider.stream_event("[1]"), Err(ref f) if f.class == Class::Permanent));
    }
}
