//! Broker connections: heartbeats, a connection name the management UI shows, no secrets
//! in errors.

use lapin::{Connection, ConnectionProperties};

use crate::config::AmqpConfig;

/// A failed connection attempt, with the URL printed redacted.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {url}: {source}")]
pub struct ConnectError {
    /// The URL with its password as `***`.
    pub url: String,
    /// lapin's error.
    #[source]
    pub source: lapin::Error,
}

/// Opens a connection named `name`, adding the configured heartbeat to the URL unless the URL
/// sets one itself.
pub async fn connect(cfg: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    let uri = with_heartbeat(cfg.url.expose(), cfg.heartbeat_secs);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(&uri, props)
        .await
        .map_err(|source| ConnectError {
            url: cfg.url.redacted(),
            source,
        })
}

fn with_heartbeat(raw: &str, heartbeat: u16) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if !url.query_pairs().any(|(k, _)| k == "heartbeat") => {
            url.query_pairs_mut()
                .append_pair("heartbeat", &heartbeat.to_string());
            url.to_string()
        }
        _ => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_is_added_once() {
        assert_eq!(
            with_heartbeat("amqp://u:p@h:5672/%2f", 10),
            "amqp://u:p@h:5672/%2f?heartbeat=10"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?heartbeat=5", 10),
            "amqp://h/%2f?heartbeat=5"
        );
    }
}
