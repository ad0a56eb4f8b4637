//! Broker connections: heartbeats, a connection name the management UI shows, TLS with an
//! optional CA and client certificate, no secrets in errors, and the choice among several
//! broker addresses (`amqp.urls`): a one-shot command tries each in turn once; the worker
//! goes round them with [`Rotation`].

use std::time::Duration;

use lapin::{
    Connection, ConnectionProperties,
    tcp::{OwnedIdentity, OwnedTLSConfig},
};

use crate::config::{AmqpConfig, SecretUrl, TlsConfig};

/// Why a connection to one broker address failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// lapin's error: refused, unreachable, wrong credentials, a TLS failure...
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// No open connection within [`CONNECT_TIMEOUT`]: the address does not answer.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// A failed connection attempt to one address, with the URL printed redacted.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {url}: {source}")]
pub struct AddressError {
    /// The URL with its password as `***`.
    pub url: String,
    /// What went wrong.
    #[source]
    pub source: AttemptError,
}

/// Every broker address was tried once and none could be connected to: each named (redacted)
/// with its error.
#[derive(Debug, thiserror::Error)]
pub struct ConnectError {
    /// One per address, in the order tried.
    pub tried: Vec<AddressError>,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tried.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "cannot connect to any of {} broker addresses", all.len())?;
                for e in all {
                    write!(f, "; {}: {}", e.url, e.source)?;
                }
                Ok(())
            }
        }
    }
}

/// The largest frame asked for, unless the URL sets `frame_max` itself. lapin keeps a send
/// and a receive buffer of 32 frames per connection, filled with zeros when the connection
/// opens: at RabbitMQ's default of 128 KiB that is 8 MiB resident per connection, 16 MiB for
/// a worker's two, whatever the traffic. Requests and results are a few KiB; a larger body
/// is sent as several frames.
const FRAME_MAX: u32 = 16 * 1024;

/// Longest wait for one connection to open (TCP, TLS and the AMQP handshake): RabbitMQ's own
/// `handshake_timeout`. lapin's connect has no bound of its own, and a node whose host is gone
/// (no refusal, just silence) or that accepts but does not speak would hold the worker there
/// for minutes instead of letting it try the next address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection named `name` to the first address of `amqp.url(s)` that answers,
/// trying each in turn once: for the one-shot commands (`llmq publish`, `status`, `dlq`,
/// ...). The error names every address tried, each with its error.
pub async fn connect(cfg: &AmqpConfig, name: &str) -> Result<Connection, ConnectError> {
    let mut tried = Vec::new();
    for url in cfg.addresses() {
        match connect_to(cfg, url, name).await {
            Ok(conn) => return Ok(conn),
            Err(e) => tried.push(e),
        }
    }
    Err(ConnectError { tried })
}

/// Opens a connection named `name` to `url`, adding the configured heartbeat and
/// [`FRAME_MAX`] to the URL unless the URL sets them itself; within [`CONNECT_TIMEOUT`].
pub async fn connect_to(
    cfg: &AmqpConfig,
    url: &SecretUrl,
    name: &str,
) -> Result<Connection, AddressError> {
    let err = |source| AddressError {
        url: url.redacted(),
        source,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, open(cfg, url, name)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(err(AttemptError::Broker(e))),
        Err(_) => Err(err(AttemptError::TimedOut(CONNECT_TIMEOUT))),
    }
}

/// lapin's connect, with TLS when configured.
async fn open(cfg: &AmqpConfig, url: &SecretUrl, name: &str) -> Result<Connection, lapin::Error> {
    let uri = with_defaults(url.expose(), cfg.heartbeat_secs);
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let tls = tls_config(&cfg.tls).map_err(|e| lapin::ErrorKind::IOError(e.into()))?;
    match tls {
        None => Connection::connect(&uri, props).await,
        Some(tls) => {
            let runtime = lapin::runtime::default_runtime()?;
            Connection::connect_with_config(&uri, props, tls, runtime).await
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

/// Opens the consuming and the publishing connection to `url`, named `name` and
/// `name (publish)`. Both go to the same address: a delivery is settled on the node its
/// result was published to, and both fail over together.
pub async fn connect_pair(
    cfg: &AmqpConfig,
    url: &SecretUrl,
    name: &str,
) -> Result<Connections, AddressError> {
    let consume = connect_to(cfg, url, name).await?;
    match connect_to(cfg, url, &format!("{name} (publish)")).await {
        Ok(publish) => Ok(Connections { consume, publish }),
        Err(e) => {
            let _ = consume
                .close(200, "the publishing connection failed".into())
                .await;
            Err(e)
        }
    }
}

/// Which of the broker addresses the worker tries next: in turn, starting after the last one
/// that failed or was lost, with a wait (the caller's backoff) only once every address has
/// failed in a row. One address behaves as before there were several: a lost connection is
/// retried at once, each failure after it waits.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// How many addresses there are (at least one).
    len: usize,
    /// The index to try next.
    next: usize,
    /// Failures in a row since the last connection, loss or wait.
    failed: usize,
}

impl Rotation {
    /// Starts at the first of `len` addresses.
    pub fn new(len: usize) -> Self {
        Self {
            len: len.max(1),
            next: 0,
            failed: 0,
        }
    }

    /// The index of the address to try now.
    pub fn next(&self) -> usize {
        self.next
    }

    /// The address at [`Self::next`] failed: move on to the following one. Returns whether
    /// that completed a round, every address failing in a row, after which the caller waits
    /// before going round again.
    pub fn failed(&mut self) -> bool {
        self.next = (self.next + 1) % self.len;
        self.failed += 1;
        if self.failed < self.len {
            return false;
        }
        self.failed = 0;
        true
    }

    /// Connected at [`Self::next`]: the round is over.
    pub fn connected(&mut self) {
        self.failed = 0;
    }

    /// The connection at [`Self::next`] was lost: the following address is tried at once
    /// (its node may be the one that went down), and a round of failures starts afresh.
    pub fn lost(&mut self) {
        self.next = (self.next + 1) % self.len;
        self.failed = 0;
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
    fn one_address_is_retried_at_once_after_a_loss_then_after_each_wait() {
        let mut r = Rotation::new(1);
        assert_eq!(r.next(), 0);
        r.connected();
        r.lost();
        assert_eq!(r.next(), 0, "the same broker, at once");
        assert!(r.failed(), "every failure is a round: wait");
        assert!(r.failed());
        assert_eq!(r.next(), 0);
    }

    #[test]
    fn addresses_are_tried_in_turn_with_a_wait_after_each_full_round() {
        let mut r = Rotation::new(3);
        assert_eq!(r.next(), 0, "the first at start");
        assert!(!r.failed());
        assert_eq!(r.next(), 1);
        assert!(!r.failed());
        assert_eq!(r.next(), 2);
        assert!(r.failed(), "all three failed: wait");
        assert_eq!(r.next(), 0, "after the last that failed");
        assert!(!r.failed());
        r.connected();
        assert_eq!(r.next(), 1, "connected to the second");
        r.lost();
        assert_eq!(r.next(), 2, "after the lost one, at once");
        assert!(!r.failed());
        assert!(!r.failed());
        assert_eq!(r.next(), 1, "the lost one too, before any wait");
        assert!(r.failed(), "a whole round since the loss: wait");
        assert_eq!(r.next(), 2);
    }

    #[test]
    fn rotation_over_no_address_is_rotation_over_one() {
        let mut r = Rotation::new(0);
        assert!(r.failed());
        assert_eq!(r.next(), 0);
    }

    #[test]
    fn the_connect_error_names_every_address_tried_redacted() {
        let tried = |urls: &[&str]| ConnectError {
            tried: urls
                .iter()
                .map(|u| AddressError {
                    url: SecretUrl::new(*u).redacted(),
                    source: AttemptError::TimedOut(CONNECT_TIMEOUT),
                })
                .collect(),
        };
        assert_eq!(
            tried(&["amqp://u:pw@a:5672/%2f"]).to_string(),
            "cannot connect to amqp://u:***@a:5672/%2f: no answer within 10s"
        );
        assert_eq!(
            tried(&["amqp://u:pw@a:5672/%2f", "amqps://v:pw2@b/x"]).to_string(),
            "cannot connect to any of 2 broker addresses; amqp://u:***@a:5672/%2f: no answer \
             within 10s; amqps://v:***@b/x: no answer within 10s"
        );
    }

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
