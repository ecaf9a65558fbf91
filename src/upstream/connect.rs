//! Establishing one upstream session: connect, greeting, negotiation.

use crate::config::UpstreamOptions;
use crate::qmp::framing::{Frame, JsonFramer, Limits};
use crate::qmp::incoming::{classify, Greeting, Incoming};
use crate::qmp::json::compact_pretty;
use crate::qmp::outgoing::{capabilities_request, lossy};
use crate::runtime::sock::{ReadHalf, WriteHalf};
use bytes::BytesMut;
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{Decoder, FramedRead};

/// The id qmpmux uses for its own `qmp_capabilities`.
const NEGOTIATE_ID: &str = "qmpmux-negotiate";

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {path}{hint}")]
    Connect {
        path: PathBuf,
        /// The likely cause, when qmpmux can tell (see [`hidden_by_unit`]).
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot accept QEMU's connection")]
    Accept(#[source] std::io::Error),
    #[error("timed out after {0:?} connecting")]
    ConnectTimeout(Duration),
    #[error("no greeting and negotiation within {0:?}")]
    GreetingTimeout(Duration),
    #[error("connection closed during greeting or negotiation")]
    Closed,
    #[error("unexpected message during negotiation: {0}")]
    Unexpected(String),
    #[error("QEMU refused capabilities negotiation: {0}")]
    Refused(String),
    #[error("I/O error during negotiation")]
    Io(#[from] std::io::Error),
}

/// QEMU's framing, plus compaction of pretty-printed (`pretty=on`) output
/// so that clients always get one message per line.
pub struct UpstreamCodec(JsonFramer);

impl Decoder for UpstreamCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Ok(self.0.decode(src)?.map(compact))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Ok(self.0.decode_eof(src)?.map(compact))
    }
}

fn compact(frame: Frame) -> Frame {
    match frame {
        Frame::Message(b) if b.contains(&b'\n') => Frame::Message(compact_pretty(&b).into()),
        other => other,
    }
}

pub type UpstreamReader = FramedRead<ReadHalf, UpstreamCodec>;

/// A negotiated upstream connection.
pub struct Connection {
    pub reader: UpstreamReader,
    pub writer: WriteHalf,
    pub greeting: Greeting,
    /// Negotiated by the previous qmpmux process, which handed it over.
    pub handed_over: Option<HandedOver>,
}

/// How a connection handed over by the previous process starts.
#[derive(Debug, Clone, Copy)]
pub struct HandedOver {
    /// It crashed: the first bytes may be the end of a message it had
    /// begun to read.
    pub resync: bool,
}

/// Reads QEMU's messages from `read`.
pub fn reader_for(read: ReadHalf) -> UpstreamReader {
    FramedRead::new(read, UpstreamCodec(JsonFramer::new(upstream_limits())))
}

/// Upstream messages are QEMU's replies; they can be large (QEMU itself
/// caps nothing), so framing allows up to 256 MiB.
fn upstream_limits() -> Limits {
    Limits {
        max_message: 256 << 20,
        max_depth: 4096,
    }
}

/// Accept mode: waits for QEMU to dial in (`-chardev socket,...,reconnect=N`),
/// then greeting and negotiation as usual.
pub async fn accept(listener: &UnixListener, opts: &UpstreamOptions) -> Result<Connection, ConnectError> {
    let (stream, _) = listener.accept().await.map_err(ConnectError::Accept)?;
    let (read, writer) = crate::runtime::sock::split(stream)?;
    let reader = FramedRead::new(read, UpstreamCodec(JsonFramer::new(upstream_limits())));
    tokio::time::timeout(opts.greeting_timeout, negotiate(reader, writer))
        .await
        .map_err(|_| ConnectError::GreetingTimeout(opts.greeting_timeout))?
}

/// Whether this process is a systemd service (systemd sets
/// `INVOCATION_ID` for every unit it starts).
fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some()
}

/// Why a socket that QEMU created may not exist for qmpmux: the shipped
/// unit gives it a /tmp of its own (`PrivateTmp=yes`) and hides home
/// directories (`ProtectHome=yes`). Empty when that is not the likely cause.
pub fn hidden_by_unit(path: &Path, error: &std::io::Error, service: bool) -> &'static str {
    if !service || error.kind() != std::io::ErrorKind::NotFound {
        return "";
    }
    if path.starts_with("/tmp") || path.starts_with("/var/tmp") {
        " (qmpmux runs as a systemd service, and the shipped unit's PrivateTmp=yes gives it a /tmp of its own: \
         move QEMU's socket, e.g. under /run or /var/lib/qemu, or set PrivateTmp=no in a drop-in)"
    } else if ["/home", "/root", "/run/user"].iter().any(|d| path.starts_with(d)) {
        " (qmpmux runs as a systemd service, and the shipped unit's ProtectHome=yes hides /home, /root and \
         /run/user: move QEMU's socket, e.g. under /run or /var/lib/qemu, or set ProtectHome=no in a drop-in)"
    } else {
        ""
    }
}

pub async fn connect(path: &Path, opts: &UpstreamOptions) -> Result<Connection, ConnectError> {
    let stream = tokio::time::timeout(opts.connect_timeout, UnixStream::connect(path))
        .await
        .map_err(|_| ConnectError::ConnectTimeout(opts.connect_timeout))?
        .map_err(|source| ConnectError::Connect {
            path: path.to_owned(),
            hint: hidden_by_unit(path, &source, under_systemd()),
            source,
        })?;
    let (read, writer) = crate::runtime::sock::split(stream)?;
    let reader = FramedRead::new(read, UpstreamCodec(JsonFramer::new(upstream_limits())));
    tokio::time::timeout(opts.greeting_timeout, negotiate(reader, writer))
        .await
        .map_err(|_| ConnectError::GreetingTimeout(opts.greeting_timeout))?
}

async fn next_message(reader: &mut UpstreamReader) -> Result<bytes::Bytes, ConnectError> {
    match reader.next().await {
        None => Err(ConnectError::Closed),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(Frame::Error(e) | Frame::Limit(e))) => Err(ConnectError::Unexpected(e)),
        Some(Ok(Frame::Message(m))) => Ok(m),
    }
}

async fn negotiate(mut reader: UpstreamReader, mut writer: WriteHalf) -> Result<Connection, ConnectError> {
    let first = next_message(&mut reader).await?;
    let greeting = match classify(&first) {
        Ok(Incoming::Greeting(g)) => g,
        _ => return Err(ConnectError::Unexpected(lossy(&first))),
    };
    let request = capabilities_request(greeting.oob, NEGOTIATE_ID);
    writer.write_all(request.as_bytes()).await?;
    loop {
        let msg = next_message(&mut reader).await?;
        let parsed = crate::qmp::json::members(&msg).map_err(|_| ConnectError::Unexpected(lossy(&msg)))?;
        if parsed.get("event").is_some() {
            continue;
        }
        if parsed.get("id").map(|v| v.get()) != Some(&format!("\"{NEGOTIATE_ID}\"")) {
            return Err(ConnectError::Unexpected(lossy(&msg)));
        }
        if let Some(err) = parsed.get("error") {
            return Err(ConnectError::Refused(err.get().to_string()));
        }
        return Ok(Connection {
            reader,
            writer,
            greeting,
            handed_over: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::hidden_by_unit;
    use std::io::{Error, ErrorKind};
    use std::path::Path;

    #[test]
    fn a_socket_the_unit_hides_is_named_as_the_likely_cause() {
        let missing = Error::from(ErrorKind::NotFound);
        let tmp = hidden_by_unit(Path::new("/tmp/vm/qmp.sock"), &missing, true);
        assert!(tmp.contains("PrivateTmp=yes"), "{tmp}");
        let home = hidden_by_unit(Path::new("/home/ann/vm.sock"), &missing, true);
        assert!(home.contains("ProtectHome=yes"), "{home}");
        // Not a service, another error, another place: no guess.
        assert_eq!(hidden_by_unit(Path::new("/tmp/q.sock"), &missing, false), "");
        let refused = Error::from(ErrorKind::ConnectionRefused);
        assert_eq!(hidden_by_unit(Path::new("/tmp/q.sock"), &refused, true), "");
        assert_eq!(hidden_by_unit(Path::new("/var/lib/qemu/q.sock"), &missing, true), "");
        assert_eq!(hidden_by_unit(Path::new("/tmpfoo/q.sock"), &missing, true), "");
    }
}
