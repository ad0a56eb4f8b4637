//! Broker connections: heartbeats, a connection name the management UI shows, TLS with an
//! optional CA and client certificate, no secrets in errors.

use lapin::{
    Connection, ConnectionProperties,
    tcp::{OwnedIdentity, OwnedTLSConfig},
};

use crate::config::{AmqpConfig, TlsConfig};

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

/// The largest frame asked for, unless the URL sets `frame_max` itself. lapin keeps a send
/// and a receive buffer of 32 frames per connection, filled with zeros when the connection
/// opens: at RabbitMQ's default of 128 KiB that is 8 MiB resident per connection, 16 MiB for
/// a worker's two, whatever the traffic. Requests and results are a few KiB; a larger body
/// is sent as several frames.
const FRAME_MAX: u32 = 16 * 1024;

/// Opens a connection named `name`, adding the configured heartbeat and [`FRAME_MAX`] to the
/// URL unless the URL sets them itself.
pub async fn connect(cfg: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    let uri = with_defaults(cfg.url.expose(), cfg.heartbeat_secs);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let err = |source| ConnectError {
        url: cfg.url.redacted(),
        source,
    };
    let tls = tls_config(&cfg.tls).map_err(|e| err(lapin::ErrorKind::IOError(e.into()).into()))?;
    match tls {
        None => Connection::connect(&uri, props).await.map_err(err),
        Some(tls) => {
            let runtime = lapin::runtime::default_runtime().map_err(err)?;
            Connection::connect_with_config(&uri, props, tls, runtime)
                .await
                .map_err(err)
        }
    }
}

/// A worker's two connections to the broker. During a memory or disk alarm RabbitMQ blocks
/// every connection that publishes, and lapin then writes no frame at all on it: no ack, no
/// nack, no cancel. Deliveries are consumed, acked and handed back on `consume`, which never
/// publishes and so is never blocked; results, retries and dead letters go out on `publish`.
pub struct Connections {
    /// Consumes and settles deliveries; declares the topology.
    pub consume: Connection,
    /// Publishes in confirm mode; the one the broker may block.
    pub publish: Connection,
}

/// Opens the consuming and the publishing connection, named `name` and `name (publish)`.
pub async fn connect_pair(cfg: &AmqpConfig, name: &str) -> Result<Connections, ConnectError> {
    let consume = connect(cfg, name).await?;
    match connect(cfg, &format!("{name} (publish)")).await {
        Ok(publish) => Ok(Connections { consume, publish }),
        Err(e) => {
            let _ = consume
                .close(200, "the publishing connection failed".into())
                .await;
            Err(e)
        }
    }
}

/// The TLS settings, read from their files; `None` when none is set (system roots).
pub fn tls_config(tls: &TlsConfig) -> std::io::Result<Option<OwnedTLSConfig>> {
    if tls.ca_file.is_empty() && tls.client_cert.is_empty() {
        return Ok(None);
    }
    let read = |path: &str| {
        std::fs::read(path).map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}")))
    };
    let cert_chain = if tls.ca_file.is_empty() {
        None
    } else {
        Some(String::from_utf8_lossy(&read(&tls.ca_file)?).into_owned())
    };
    let identity = if tls.client_cert.is_empty() {
        None
    } else {
        Some(OwnedIdentity::PKCS8 {
            pem: read(&tls.client_cert)?,
            key: read(&tls.client_key)?,
        })
    };
    Ok(Some(OwnedTLSConfig {
        identity,
        cert_chain,
    }))
}

/// `raw` with `heartbeat` and `frame_max` ([`FRAME_MAX`]) added, each unless it is set there.
fn with_defaults(raw: &str, heartbeat: u16) -> String {
    let Ok(mut url) = url::Url::parse(raw) else {
        return raw.to_string();
    };
    let set = |name: &str| url.query_pairs().any(|(k, _)| k == name);
    let missing: Vec<(&str, String)> = [
        ("heartbeat", heartbeat.to_string()),
        ("frame_max", FRAME_MAX.to_string()),
    ]
    .into_iter()
    .filter(|(name, _)| !set(name))
    .collect();
    if missing.is_empty() {
        return raw.to_string();
    }
    url.query_pairs_mut().extend_pairs(missing);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_and_frame_max_are_added_once() {
        assert_eq!(
            with_defaults("amqp://u:p@h:5672/%2f", 10),
            "amqp://u:p@h:5672/%2f?heartbeat=10&frame_max=16384"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?heartbeat=5", 10),
            "amqp://h/%2f?heartbeat=5&frame_max=16384"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?frame_max=131072", 10),
            "amqp://h/%2f?frame_max=131072&heartbeat=10"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?frame_max=8192&heartbeat=5", 10),
            "amqp://h/%2f?frame_max=8192&heartbeat=5"
        );
    }
}
