//! `llmq probe URL`: exit 0 when an HTTP GET answers 2xx, for container health checks in
//! images without curl.

use std::time::Duration;

/// Whether a GET of `url` answers 2xx within 5 s.
pub async fn probe(url: &str) -> bool {
    crate::install_crypto_provider();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build();
    match client {
        Ok(c) => c
            .get(url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success()),
        Err(_) => false,
    }
}
