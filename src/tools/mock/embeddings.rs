//! `/v1/embeddings`: a vector per input, derived from its hash, so a test can tell which
//! input a vector belongs to; with `encoding_format: "base64"`, the base64 of its
//! little-endian `f32`s, as OpenAI sends it.

use std::sync::{Arc, atomic::Ordering};

use axum::{
    Json,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{
    MockState, answered_model, api_error,
    gate::{Call, gate},
};

/// An embedding input the mock refuses with 400 (the whole call, as real APIs do), to test
/// that one bad input in a batch fails only its own request.
pub const REJECTED_INPUT: &str = "__reject__";

/// Dimensions of the mock's embedding vectors.
pub const EMBEDDING_DIMS: usize = 8;

/// Answers an embeddings call: every input in order, or 400 for the whole call when one is
/// [`REJECTED_INPUT`].
pub(super) async fn embeddings(
    State(state): State<Arc<MockState>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        _ => {
            return api_error(
                StatusCode::BAD_REQUEST,
                "input must be a string or a list",
                "invalid_request_error",
                None,
            );
        }
    };
    state.stats.embedding_calls.fetch_add(1, Ordering::Relaxed);
    state.record_body(&body);
    if inputs.iter().any(|i| i == REJECTED_INPUT) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "input rejected",
            "invalid_request_error",
            None,
        );
    }
    state
        .stats
        .embedding_items
        .fetch_add(inputs.len() as u64, Ordering::Relaxed);
    let options = state.options();
    let call = Call {
        headers: &headers,
        query: query.as_deref(),
        model: body["model"].as_str().unwrap_or_default(),
        items: inputs.len() as u64,
    };
    let _admitted = match gate(&state, &options, &call).await {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal,
    };
    let tokens: usize = inputs.iter().map(|s| s.len() / 4 + 1).sum();
    let base64 = body["encoding_format"] == "base64";
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let embedding = if base64 {
                json!(mock_embedding_base64(s))
            } else {
                json!(mock_embedding(s))
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Json(json!({
        "object": "list",
        "model": answered_model(&options, body["model"].as_str(), "mock-embedding"),
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}
    }))
    .into_response()
}

/// The deterministic vector the mock returns for `input`: [`EMBEDDING_DIMS`] values in
/// [-1, 1] from its SHA-256.
pub fn mock_embedding(input: &str) -> Vec<f32> {
    let digest = Sha256::digest(input.as_bytes());
    digest
        .iter()
        .take(EMBEDDING_DIMS)
        .map(|b| (f32::from(*b) / 127.5) - 1.0)
        .collect()
}

/// [`mock_embedding`] as OpenAI encodes a vector for `encoding_format: "base64"`: standard
/// base64, with padding, of its values as little-endian `f32`s.
pub fn mock_embedding_base64(input: &str) -> String {
    let bytes: Vec<u8> = mock_embedding(input)
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    base64(&bytes)
}

/// Standard base64 with padding (RFC 4648): a few lines rather than a crate, for the mock.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use serde_json::{Value, json};

    use super::*;
    use crate::tools::mock::{
        MockOptions,
        testing::{client, start},
    };

    #[tokio::test]
    async fn each_input_gets_its_hash_s_vector_and_one_rejected_input_fails_the_call() {
        let mock = start(MockOptions::default()).await;
        let url = format!("{}/embeddings", mock.base_url());
        let send = |input: Value| {
            let request = client(false).post(&url).json(&json!({"input": input}));
            async move { request.send().await.unwrap() }
        };
        let answer: Value = send(json!(["a", "bb"])).await.json().await.unwrap();
        assert_eq!(answer["model"], "mock-embedding");
        let data = answer["data"].as_array().unwrap();
        let vectors: Vec<(u64, Vec<f32>)> = data
            .iter()
            .map(|d| {
                let vector = serde_json::from_value(d["embedding"].clone()).unwrap();
                (d["index"].as_u64().unwrap(), vector)
            })
            .collect();
        assert_eq!(
            vectors,
            [(0, mock_embedding("a")), (1, mock_embedding("bb"))]
        );
        assert_eq!(mock_embedding("a").len(), EMBEDDING_DIMS);
        assert!(mock_embedding("a").iter().all(|v| (-1.0..=1.0).contains(v)));
        assert_ne!(mock_embedding("a"), mock_embedding("bb"));

        let answer: Value = client(false)
            .post(&url)
            .json(&json!({"input": ["a"], "encoding_format": "base64"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["data"][0]["embedding"], mock_embedding_base64("a"));

        let refused = send(json!(["a", REJECTED_INPUT])).await;
        assert_eq!(refused.status(), 400);
        assert_eq!(send(json!(42)).await.status(), 400, "neither text nor list");
        let stats = mock.stats();
        assert_eq!(stats.embedding_calls.load(Ordering::Relaxed), 3);
        assert_eq!(stats.embedding_items.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn base64_is_rfc_4648_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&1.0f32.to_le_bytes()), "AACAPw==");
        // 8 floats, 32 bytes: 44 characters, one `=`.
        assert_eq!(mock_embedding_base64("a").len(), 44);
    }
}
