//! `/v1/embeddings`: a vector per input, derived from its hash, so a test can tell which
//! input a vector belongs to.

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
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"object": "embedding", "index": i, "embedding": mock_embedding(s)}))
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

        let refused = send(json!(["a", REJECTED_INPUT])).await;
        assert_eq!(refused.status(), 400);
        assert_eq!(send(json!(42)).await.status(), 400, "neither text nor list");
        let stats = mock.stats();
        assert_eq!(stats.embedding_calls.load(Ordering::Relaxed), 2);
        assert_eq!(stats.embedding_items.load(Ordering::Relaxed), 2);
    }
}
