//! The broker's version, as the `version` server property of the AMQP handshake says it:
//! what a quorum queue's message priorities are depends on it
//! ([`crate::broker::arguments`]).
//!
//! lapin (4.12) reads the server properties of `connection.start` and keeps none of them, so
//! the version is read on a short connection of llmq's own to the same URL, with the same
//! TLS settings: the protocol header, then `connection.start`, whose properties carry the
//! version. The rest of the handshake follows with the URL's credentials and ends with a
//! `connection.close`, so that the broker logs an ordinary connection and not one that
//! vanished mid-handshake (a warning in its log at every worker start otherwise). Reading the
//! version never stops anything: a broker that does not say it is reported as unknown.

use std::{fmt, time::Duration};

use amq_protocol::{
    auth::Credentials,
    frame::{AMQPFrame, ProtocolVersion, WriteContext, gen_frame, parse_frame},
    protocol::{AMQPClass, connection},
    types::{AMQPValue, FieldTable, ShortString},
};
use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use lapin::{
    tcp::{AMQPUriTcpExt, OwnedTLSConfig},
    uri::{AMQPUri, SASLMechanism},
};

use crate::{
    broker::connection::tls_config,
    config::{AmqpConfig, QueueType, SecretUrl, TlsConfig},
};

/// A RabbitMQ version, `major.minor.patch`, ordered as versions are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BrokerVersion {
    /// `4` of `4.1.2`.
    pub major: u32,
    /// `1` of `4.1.2`.
    pub minor: u32,
    /// `2` of `4.1.2`.
    pub patch: u32,
}

impl BrokerVersion {
    /// `major.minor.patch`.
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// The version a broker announces, read leniently: `3.13.7`, `4.0.0-rc.2` (the suffix
    /// is ignored), `4.1` (patch 0), `v4.2.1`. `None` for anything else (no number first, a
    /// part too large for a `u32`): the string comes from the network and may be anything.
    pub fn parse(raw: &str) -> Option<Self> {
        let s = raw.trim();
        let s = s.strip_prefix(['v', 'V']).unwrap_or(s);
        // The leading run of digits and dots: "4.0.0" of "4.0.0-rc.2+1.gabc".
        let numeric = s
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .unwrap_or("");
        let mut parts = [0u32; 3];
        for (i, part) in numeric.split('.').take(3).enumerate() {
            if part.is_empty() {
                // "4." or "4..1": what came before is all there is.
                if i == 0 {
                    return None;
                }
                break;
            }
            parts[i] = part.parse().ok()?;
        }
        let [major, minor, patch] = parts;
        Some(Self::new(major, minor, patch))
    }
}

impl fmt::Display for BrokerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Why the version could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The URL does not parse (the configuration's validation reports it first).
    #[error("the URL does not parse: {0}")]
    Url(String),
    /// No connection, or it broke.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// lapin's runtime could not be had.
    #[error("{0}")]
    Runtime(#[from] lapin::Error),
    /// The broker said something that is not the start of an AMQP 0-9-1 handshake.
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
    /// The broker's handshake has no `version` property.
    #[error("the broker does not say its version")]
    NoVersion,
    /// No answer within [`READ_TIMEOUT`].
    #[error("no answer within {}s", READ_TIMEOUT.as_secs())]
    Timeout,
}

/// The longest wait for the whole exchange.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest frame accepted: a `connection.start` is well under 1 KiB, and a broker (or
/// whatever answers on its port) must not make llmq allocate what it likes.
const MAX_FRAME: usize = 64 * 1024;

/// The version of the broker at `url`, for the declarations and the logs: `None`, with a
/// warning that says why, when it cannot be read or parsed. Never an error: what depends on
/// it (how quorum queues treat priorities) is reported as unknown, nothing stops.
pub async fn announced(url: &SecretUrl, tls: &TlsConfig) -> Option<BrokerVersion> {
    match read(url.expose(), tls).await {
        Ok(raw) => {
            let parsed = BrokerVersion::parse(&raw);
            if parsed.is_none() {
                tracing::warn!(url = %url.redacted(), version = %raw.escape_debug(), "the broker's version is not one llmq can read");
            }
            parsed
        }
        Err(e) => {
            tracing::warn!(url = %url.redacted(), error = %e, "cannot read the broker's version");
            None
        }
    }
}

/// The broker's version when the declarations depend on it, that is for quorum queues
/// (classic queues' priorities are the same on every version): a classic topology opens no
/// extra connection to read it. `None` for classic, else as [`announced_by_any`].
pub async fn when_quorum(amqp: &AmqpConfig, queue_type: QueueType) -> Option<BrokerVersion> {
    match queue_type {
        QueueType::Classic => None,
        QueueType::Quorum => announced_by_any(amqp).await,
    }
}

/// The version of the broker a one-shot command (`llmq status`, `llmq topology`) talks to:
/// the first of `amqp.url(s)` that answers, in the order the command's connection tries them
/// ([`crate::broker::connection::connect`]). `None`, with a warning, as [`announced`].
pub async fn announced_by_any(amqp: &AmqpConfig) -> Option<BrokerVersion> {
    let mut last = None;
    for url in amqp.addresses() {
        match read(url.expose(), &amqp.tls).await {
            Ok(raw) => {
                let parsed = BrokerVersion::parse(&raw);
                if parsed.is_none() {
                    tracing::warn!(url = %url.redacted(), version = %raw.escape_debug(), "the broker's version is not one llmq can read");
                }
                return parsed;
            }
            Err(e) => last = Some((url.redacted(), e)),
        }
    }
    if let Some((url, error)) = last {
        tracing::warn!(%url, %error, "cannot read the broker's version");
    }
    None
}

/// The `version` property the broker at `url` announces (e.g. `3.13.7`), as it says it.
/// `tls` as for the worker's own connections.
pub async fn read(url: &str, tls: &TlsConfig) -> Result<String, ReadError> {
    let uri: AMQPUri = url.parse().map_err(ReadError::Url)?;
    let tls = tls_config(tls)?.unwrap_or_default();
    tokio::time::timeout(READ_TIMEOUT, handshake(&uri, &tls))
        .await
        .map_err(|_| ReadError::Timeout)?
}

/// Connects, reads the version from `connection.start`, then finishes the handshake and
/// closes (best effort: the version is had by then).
async fn handshake(uri: &AMQPUri, tls: &OwnedTLSConfig) -> Result<String, ReadError> {
    let runtime = lapin::runtime::default_runtime()?;
    let mut stream = uri
        .connect_with_config_async(tls.as_ref(), &runtime)
        .await?;
    let header = AMQPFrame::ProtocolHeader(ProtocolVersion::amqp_0_9_1());
    stream.write_all(&encode(&header)?).await?;
    let start = match read_frame(&mut stream).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(start))) => start,
        other => return Err(ReadError::Protocol(format!("{other:?}"))),
    };
    let version = version_of(&start.server_properties);
    if let Err(e) = finish(&mut stream, uri).await {
        tracing::debug!(error = %e, "the version check's connection did not close cleanly");
    }
    let _ = stream.close().await;
    version.ok_or(ReadError::NoVersion)
}

/// The `version` server property, when it is a string.
fn version_of(properties: &FieldTable) -> Option<String> {
    match properties.inner().get("version")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The rest of the handshake with the URL's credentials (`PLAIN`, or `EXTERNAL` for a client
/// certificate, as the URL's `auth_mechanism` says), then `connection.close`.
async fn finish<S>(stream: &mut S, uri: &AMQPUri) -> Result<(), ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mechanism = match uri.query.auth_mechanism {
        Some(SASLMechanism::External) => SASLMechanism::External,
        _ => SASLMechanism::Plain,
    };
    let mut client_properties = FieldTable::default();
    for (key, value) in [
        ("product", "llmq"),
        ("version", env!("CARGO_PKG_VERSION")),
        ("connection_name", "llmq version check"),
    ] {
        client_properties.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    let credentials = Credentials::from(uri.authority.userinfo.clone());
    send(
        stream,
        connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties,
            mechanism: ShortString::from(mechanism.to_string()),
            response: credentials.sasl_auth_string(mechanism),
            locale: "en_US".into(),
        }),
    )
    .await?;
    let tune = match read_frame(stream).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(tune))) => tune,
        other => return Err(ReadError::Protocol(format!("{other:?}"))),
    };
    send(
        stream,
        connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            // No heartbeats: the connection lives a few milliseconds.
            heartbeat: 0,
        }),
    )
    .await?;
    send(
        stream,
        connection::AMQPMethod::Open(connection::Open {
            virtual_host: uri.vhost.as_str().into(),
        }),
    )
    .await?;
    match read_frame(stream).await? {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
        other => return Err(ReadError::Protocol(format!("{other:?}"))),
    }
    send(
        stream,
        connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "version read".into(),
            class_id: 0,
            method_id: 0,
        }),
    )
    .await?;
    // The close-ok; what it says does not matter.
    read_frame(stream).await.map(drop)
}

/// Sends a method of the connection class on channel 0.
async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    method: connection::AMQPMethod,
) -> Result<(), ReadError> {
    let frame = AMQPFrame::Method(0, AMQPClass::Connection(method));
    stream.write_all(&encode(&frame)?).await?;
    Ok(())
}

/// A frame's bytes.
fn encode(frame: &AMQPFrame) -> Result<Vec<u8>, ReadError> {
    let written = gen_frame(frame)(WriteContext::from(Vec::new()))
        .map_err(|e| ReadError::Protocol(format!("cannot encode {frame:?}: {e}")))?;
    Ok(written.write)
}

/// Reads one frame: its 7-byte header (type, channel, size), its payload of at most
/// [`MAX_FRAME`] bytes and the end marker.
async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> Result<AMQPFrame, ReadError> {
    let mut head = [0u8; 7];
    stream.read_exact(&mut head).await?;
    let [_, _, _, a, b, c, d] = head;
    let size = usize::try_from(u32::from_be_bytes([a, b, c, d])).unwrap_or(usize::MAX);
    if size > MAX_FRAME {
        return Err(ReadError::Protocol(format!(
            "a frame of {size} bytes (is this an AMQP 0-9-1 broker?)"
        )));
    }
    let mut frame = head.to_vec();
    frame.resize(head.len() + size + 1, 0);
    stream.read_exact(&mut frame[head.len()..]).await?;
    parse_frame(frame.as_slice())
        .map(|(_, frame)| frame)
        .map_err(|e| ReadError::Protocol(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_what_brokers_announce() {
        for (raw, expected) in [
            ("3.10.8", (3, 10, 8)),
            ("3.13.7", (3, 13, 7)),
            ("4.0.0-rc.2", (4, 0, 0)),
            ("4.2.1+12.gabcdef", (4, 2, 1)),
            ("4.1", (4, 1, 0)),
            ("4", (4, 0, 0)),
            ("4.", (4, 0, 0)),
            (" v4.3.0 ", (4, 3, 0)),
            ("4.3.0.1", (4, 3, 0)),
            ("4..1", (4, 0, 0)),
        ] {
            let (major, minor, patch) = expected;
            assert_eq!(
                BrokerVersion::parse(raw),
                Some(BrokerVersion::new(major, minor, patch)),
                "{raw:?}"
            );
        }
    }

    /// Whatever answers on the broker's port may say anything: no panic, no guess.
    #[test]
    fn odd_or_hostile_versions_are_unknown() {
        for raw in [
            "",
            " ",
            "v",
            ".4.1",
            "RabbitMQ 4.1.0",
            "unknown",
            "99999999999999999999.1.0",
            "4.99999999999999999999",
            "-1.0.0",
            "\u{0}\u{ff}",
            "٣.١٠",
        ] {
            assert_eq!(BrokerVersion::parse(raw), None, "{raw:?}");
        }
        let long = "9".repeat(100_000);
        assert_eq!(BrokerVersion::parse(&long), None);
    }

    #[test]
    fn versions_order_as_numbers() {
        let v = |s| BrokerVersion::parse(s).unwrap();
        assert!(v("3.13.7") < v("4.0.0"));
        assert!(v("4.2.9") < v("4.3.0"));
        assert!(v("4.10.0") > v("4.9.9"));
        assert_eq!(v("4.3.0").to_string(), "4.3.0");
    }

    #[test]
    fn the_version_property_is_a_string_or_nothing() {
        let mut props = FieldTable::default();
        assert_eq!(version_of(&props), None);
        props.insert("version".into(), AMQPValue::LongInt(4));
        assert_eq!(version_of(&props), None);
        props.insert("version".into(), AMQPValue::LongString("4.1.2".into()));
        assert_eq!(version_of(&props).as_deref(), Some("4.1.2"));
    }

    /// A frame header announcing more than [`MAX_FRAME`] is refused before anything is
    /// allocated for it.
    #[tokio::test]
    async fn a_huge_frame_is_refused() {
        let mut bytes: &[u8] = &[1, 0, 0, 0x7f, 0xff, 0xff, 0xff];
        let err = read_frame(&mut bytes).await.unwrap_err();
        assert!(matches!(err, ReadError::Protocol(_)), "{err}");
    }
}
