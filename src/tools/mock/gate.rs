//! What a call meets before it is answered, in the order a provider checks: credentials,
//! model, quota, concurrency; then its latency and the failures injected into it.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use axum::{
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::Response,
};

use super::{MockOptions, MockState, api_error};

/// Counts a call in [`MockStats::in_flight`](super::MockStats::in_flight) while alive, so a client that hangs up
/// mid-wait is not counted forever.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A call's place among those being answered, from its arrival until its answer is made;
/// given back when dropped, so a client that hangs up mid-call frees its place.
pub(super) struct Admitted<'a>(&'a AtomicU64);

impl<'a> Admitted<'a> {
    /// Takes a place, or `None` when `cap` calls hold one already. The count moves from
    /// below the cap to one more in a single atomic step: calls arriving together cannot
    /// take more places than there are, and a refused call never shows in the count (as it
    /// would for a moment with an add undone on refusal, refusing a call that had room).
    fn new(state: &'a MockState, cap: Option<u64>) -> Option<Self> {
        let before = state
            .answering
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                cap.is_none_or(|cap| n < cap).then_some(n + 1)
            })
            .ok()?;
        state
            .stats
            .peak_in_flight
            .fetch_max(before + 1, Ordering::Relaxed);
        Some(Self(&state.answering))
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What [`gate`] looks at in a chat or embeddings call.
pub(super) struct Call<'r> {
    pub(super) headers: &'r HeaderMap,
    /// The raw query string, if any.
    pub(super) query: Option<&'r str>,
    /// The model asked for, `""` when none.
    pub(super) model: &'r str,
    /// Embedding inputs; 1 for a chat call.
    pub(super) items: u64,
}

/// OpenAI's headers that say a request budget is spent and when it refills.
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");

/// Makes a provider's checks in its order (credentials, model, quota, concurrency), waits
/// the latency and decides whether this call fails. `Ok` is the call's place among those
/// being answered, for the handler to hold until its answer is made.
pub(super) async fn gate<'s>(
    state: &'s MockState,
    options: &MockOptions,
    call: &Call<'_>,
) -> Result<Admitted<'s>, Response> {
    if !authorized(options, call) {
        return Err(api_error(
            StatusCode::UNAUTHORIZED,
            "invalid api key",
            "invalid_request_error",
            None,
        ));
    }
    if !options.models.is_empty() && !options.models.iter().any(|m| m == call.model) {
        return Err(api_error(
            StatusCode::NOT_FOUND,
            &format!("The model `{}` does not exist", call.model),
            "invalid_request_error",
            Some("model_not_found"),
        ));
    }
    if options.insufficient_quota {
        return Err(api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            Some("insufficient_quota"),
        ));
    }
    let Some(admitted) = Admitted::new(state, options.max_concurrency) else {
        state.stats.over_cap.fetch_add(1, Ordering::Relaxed);
        let mut refused = api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many concurrent requests",
            "rate_limit_error",
            Some("rate_limit_exceeded"),
        );
        if let Some(secs) = options.cap_retry_after {
            let headers = refused.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return Err(refused);
    };
    let jitter = match options.latency_jitter_ms {
        0 => 0,
        spread => {
            // A stride through 0..=spread coprime with most spreads: calls in a row differ.
            let n = state.stats.jittered.fetch_add(1, Ordering::Relaxed);
            n.wrapping_mul(7919) % (spread + 1)
        }
    };
    let delay = Duration::from_millis(options.latency_ms + jitter)
        + Duration::from_micros(options.per_item_us.saturating_mul(call.items));
    if !delay.is_zero() {
        let _serving = InFlight::new(&state.stats.in_flight);
        tokio::time::sleep(delay).await;
    }
    match injected_failure(state, options) {
        Some(failure) => Err(failure),
        None => Ok(admitted),
    }
}

/// Whether the call carries the bearer key, the header and the query parameter that the
/// options require.
fn authorized(options: &MockOptions, call: &Call<'_>) -> bool {
    let key = options.require_key.as_ref().is_none_or(|key| {
        call.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {key}").as_str())
    });
    let named_header = options.require_header.as_ref().is_none_or(|required| {
        required.split_once(':').is_some_and(|(name, value)| {
            call.headers.get(name.trim()).and_then(|v| v.to_str().ok()) == Some(value.trim())
        })
    });
    let query = options.require_query.as_ref().is_none_or(|required| {
        required.split_once('=').is_some_and(|(name, value)| {
            url::form_urlencoded::parse(call.query.unwrap_or_default().as_bytes())
                .any(|(k, v)| k == name && v == value)
        })
    });
    key && named_header && query
}

/// Fails call n of those past the concurrency check when it is one of the first
/// `fail_first`, or when the running count of failures due at `error_rate` steps up: evenly
/// spread, no RNG.
fn injected_failure(state: &MockState, options: &MockOptions) -> Option<Response> {
    let n = state.calls.fetch_add(1, Ordering::Relaxed);
    let rate = options.error_rate.clamp(0.0, 1.0);
    let fail =
        n < options.fail_first || ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor();
    if !fail {
        return None;
    }
    state.stats.failures.fetch_add(1, Ordering::Relaxed);
    let status = StatusCode::from_u16(options.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = options
        .error_message
        .clone()
        .unwrap_or_else(|| format!("injected failure {status}"));
    let mut response = api_error(status, &message, "mock_error", None);
    let headers = response.headers_mut();
    if options.rate_limit_headers && status == StatusCode::TOO_MANY_REQUESTS {
        let reset = format!("{}s", options.retry_after.unwrap_or(1));
        headers.insert(REMAINING_REQUESTS, HeaderValue::from_static("0"));
        if let Ok(v) = HeaderValue::from_str(&reset) {
            headers.insert(RESET_REQUESTS, v);
        }
    } else if let Some(secs) = options.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::Ordering,
        time::{Duration, Instant},
    };

    use serde_json::json;

    use crate::tools::mock::{
        MockOptions,
        testing::{chat, chat_body, client, embed, refusal, start, wait_until},
    };

    #[tokio::test]
    async fn a_model_off_the_list_is_not_found() {
        let mock = start(MockOptions {
            models: vec!["gpt-4o".into(), "text-embedding-3-small".into()],
            ..Default::default()
        })
        .await;
        let (status, error, _) = refusal(chat(&mock, "/chat/completions", "gpt-4").await).await;
        assert_eq!(status, 404);
        assert_eq!(
            error,
            json!({"message": "The model `gpt-4` does not exist", "type": "invalid_request_error", "code": "model_not_found"})
        );
        let (status, error, _) = refusal(embed(&mock, "gpt-4").await).await;
        assert_eq!((status, &error["code"]), (404, &json!("model_not_found")));
        assert_eq!(
            chat(&mock, "/chat/completions", "gpt-4o").await.status(),
            200
        );
        assert_eq!(embed(&mock, "text-embedding-3-small").await.status(), 200);
        // The list may change while it runs.
        mock.set_options(MockOptions::default());
        assert_eq!(
            chat(&mock, "/chat/completions", "gpt-4").await.status(),
            200
        );
    }

    #[tokio::test]
    async fn out_of_quota_every_call_is_refused_without_retry_after() {
        let mock = start(MockOptions {
            insufficient_quota: true,
            // Not sent with a quota refusal: waiting does not cure it.
            retry_after: Some(5),
            ..Default::default()
        })
        .await;
        let quota = json!({
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "code": "insufficient_quota"
        });
        for response in [
            chat(&mock, "/chat/completions", "m").await,
            embed(&mock, "e").await,
        ] {
            assert_eq!(refusal(response).await, (429, quota.clone(), false));
        }
        mock.set_options(MockOptions::default());
        assert_eq!(chat(&mock, "/chat/completions", "m").await.status(), 200);
    }

    /// 10 calls at once against a cap of 3: exactly 3 answered, 7 refused at once.
    #[tokio::test]
    async fn calls_beyond_the_concurrency_cap_are_refused_at_once() {
        let mock = start(MockOptions {
            max_concurrency: Some(3),
            latency_ms: 1_500,
            retry_after: Some(5),
            ..Default::default()
        })
        .await;
        let http = client(true);
        let url = format!("{}/chat/completions", mock.base_url());
        let started = Instant::now();
        let tasks: Vec<_> = (0..10)
            .map(|_| tokio::spawn(http.post(&url).json(&chat_body("m")).send()))
            .collect();
        let mut refused = Vec::new();
        let mut answered = 0;
        for task in tasks {
            let response = task.await.unwrap().unwrap();
            if response.status() == 200 {
                answered += 1;
            } else {
                refused.push(refusal(response).await);
            }
        }
        assert_eq!(answered, 3);
        let over_cap = json!({"message": "Too many concurrent requests", "type": "rate_limit_error", "code": "rate_limit_exceeded"});
        assert_eq!(refused, vec![(429, over_cap, false); 7]);
        let stats = mock.stats();
        assert_eq!(stats.over_cap.load(Ordering::Relaxed), 7);
        assert_eq!(stats.peak_in_flight.load(Ordering::Relaxed), 3);
        assert_eq!(stats.chat_calls.load(Ordering::Relaxed), 10);
        assert!(started.elapsed() < Duration::from_millis(3_000), "one wave");
        // Every place was given back.
        mock.set_options(MockOptions {
            max_concurrency: Some(3),
            ..Default::default()
        });
        let again: Vec<_> = (0..3)
            .map(|_| tokio::spawn(http.post(&url).json(&chat_body("m")).send()))
            .collect();
        for task in again {
            assert_eq!(task.await.unwrap().unwrap().status(), 200);
        }
    }

    #[tokio::test]
    async fn a_cap_may_say_when_to_come_back() {
        let mock = start(MockOptions {
            max_concurrency: Some(1),
            latency_ms: 5_000,
            cap_retry_after: Some(1),
            ..Default::default()
        })
        .await;
        let http = client(true);
        let url = format!("{}/chat/completions", mock.base_url());
        let held = tokio::spawn(http.post(&url).json(&chat_body("m")).send());
        let in_flight = &mock.stats().in_flight;
        assert!(wait_until(|| in_flight.load(Ordering::Relaxed) == 1).await);
        let (status, _, retry_after) = refusal(chat(&mock, "/chat/completions", "m").await).await;
        assert_eq!((status, retry_after), (429, true));
        held.abort();
    }

    #[tokio::test]
    async fn a_client_hanging_up_mid_call_gives_its_place_back() {
        let mock = start(MockOptions {
            max_concurrency: Some(1),
            latency_ms: 60_000,
            ..Default::default()
        })
        .await;
        let gave_up = client(false)
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&chat_body("m"))
            .timeout(Duration::from_millis(300))
            .send()
            .await;
        assert!(gave_up.is_err_and(|e| e.is_timeout()));
        let in_flight = &mock.stats().in_flight;
        assert!(wait_until(|| in_flight.load(Ordering::Relaxed) == 0).await);
        mock.set_options(MockOptions {
            max_concurrency: Some(1),
            ..Default::default()
        });
        assert_eq!(chat(&mock, "/chat/completions", "m").await.status(), 200);
        assert_eq!(mock.stats().over_cap.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn injected_429s_can_carry_openai_s_rate_limit_headers() {
        let limited = |retry_after| MockOptions {
            error_rate: 1.0,
            status: 429,
            retry_after,
            rate_limit_headers: true,
            ..Default::default()
        };
        let mock = start(limited(Some(7))).await;
        let header = |r: &reqwest::Response, name: &str| {
            r.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let response = chat(&mock, "/chat/completions", "m").await;
        assert_eq!(response.status(), 429);
        assert_eq!(
            header(&response, "x-ratelimit-remaining-requests").as_deref(),
            Some("0")
        );
        assert_eq!(
            header(&response, "x-ratelimit-reset-requests").as_deref(),
            Some("7s")
        );
        assert_eq!(header(&response, "retry-after"), None);
        mock.set_options(limited(None));
        let response = embed(&mock, "e").await;
        assert_eq!(
            header(&response, "x-ratelimit-reset-requests").as_deref(),
            Some("1s")
        );
        // Without the flag, Retry-After as before.
        mock.set_options(MockOptions {
            rate_limit_headers: false,
            ..limited(Some(7))
        });
        let response = chat(&mock, "/chat/completions", "m").await;
        assert_eq!(header(&response, "retry-after").as_deref(), Some("7"));
        assert_eq!(header(&response, "x-ratelimit-reset-requests"), None);
    }

    #[tokio::test]
    async fn azure_s_header_and_query_parameter_are_required_when_asked() {
        let mock = start(MockOptions {
            require_header: Some("api-key: secret".into()),
            require_query: Some("api-version=2024-10-21".into()),
            ..Default::default()
        })
        .await;
        let url = format!("{}/chat/completions", mock.base_url());
        let send = |key: Option<&'static str>, query: &'static str| {
            let mut request = client(false)
                .post(format!("{url}{query}"))
                .json(&chat_body("m"));
            if let Some(key) = key {
                request = request.header("api-key", key);
            }
            async move { request.send().await.unwrap().status() }
        };
        let good = "?api-version=2024-10-21";
        assert_eq!(send(Some("secret"), good).await, 200);
        assert_eq!(
            send(Some("secret"), "?x=1&api-version=2024-10-21").await,
            200
        );
        assert_eq!(send(None, good).await, 401);
        assert_eq!(send(Some("wrong"), good).await, 401);
        assert_eq!(send(Some("secret"), "").await, 401);
        assert_eq!(send(Some("secret"), "?api-version=2024-02-01").await, 401);
        let (status, error, _) = refusal(embed(&mock, "e").await).await;
        assert_eq!(
            (status, &error["message"]),
            (401, &json!("invalid api key"))
        );
    }
}
