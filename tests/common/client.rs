//! A raw QMP client speaking bytes on a unix socket, with test assertions.

use super::STEP;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// A raw QMP client speaking bytes on a unix socket.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).await.expect("connect to qmpmux");
        let (r, w) = stream.into_split();
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Connects and reads the greeting.
    pub async fn open(path: &Path) -> (Client, Value) {
        let mut c = Client::connect(path).await;
        let g = c.recv().await;
        assert!(g.get("QMP").is_some(), "expected a greeting, got {g}");
        (c, g)
    }

    /// Connects, reads the greeting and negotiates.
    pub async fn ready(path: &Path) -> Client {
        let (mut c, _) = Client::open(path).await;
        c.send(r#"{"execute":"qmp_capabilities"}"#).await;
        assert_eq!(c.recv().await, serde_json::json!({"return": {}}));
        c
    }

    /// A client from the halves [`Client::into_inner`] gave.
    pub fn from_parts(reader: BufReader<OwnedReadHalf>, writer: OwnedWriteHalf) -> Client {
        Client { reader, writer }
    }

    /// The two halves, for raw byte-level use.
    pub fn into_inner(self) -> (BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        (self.reader, self.writer)
    }

    pub async fn send(&mut self, raw: &str) {
        self.writer.write_all(raw.as_bytes()).await.expect("send");
    }

    /// Sends `raw` in one `sendmsg` carrying `fd` (SCM_RIGHTS).
    pub fn send_with_fd(&mut self, raw: &str, fd: std::os::fd::RawFd) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let sock: &UnixStream = self.writer.as_ref();
        let iov = [std::io::IoSlice::new(raw.as_bytes())];
        let fds = [fd];
        let n = sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(n, raw.len());
    }

    pub async fn send_bytes(&mut self, raw: &[u8]) {
        self.writer.write_all(raw).await.expect("send");
    }

    /// The next line, raw (with its `\r\n`); `None` at EOF.
    pub async fn try_line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, self.reader.read_line(&mut line))
            .await
            .expect("timed out waiting for a message")
            .expect("read");
        (n > 0).then_some(line)
    }

    pub async fn line(&mut self) -> String {
        self.try_line().await.expect("connection closed")
    }

    pub async fn recv(&mut self) -> Value {
        let line = self.line().await;
        assert!(line.ends_with("\r\n"), "line not ending in CRLF: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// The next message that is not an event.
    pub async fn reply(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// The next event named `name`, skipping other events; panics on a reply.
    pub async fn event(&mut self, name: &str) -> Value {
        loop {
            let v = self.recv().await;
            assert!(v.get("event").is_some(), "expected event {name}, got {v}");
            if v["event"] == name {
                return v;
            }
        }
    }

    /// Makes QEMU emit STOP then RESUME, `n` times (`stop`, `cont`,
    /// pipelined), and checks every reply; events are skipped.
    pub async fn stop_cont(&mut self, n: usize) {
        for _ in 0..n {
            self.send(r#"{"execute":"stop"}"#).await;
            self.send(r#"{"execute":"cont"}"#).await;
        }
        for _ in 0..2 * n {
            let r = self.reply().await;
            assert!(r.get("return").is_some(), "{r}");
        }
    }

    /// Sends one command and returns its reply (events skipped).
    pub async fn cmd(&mut self, raw: &str) -> Value {
        self.send(raw).await;
        self.reply().await
    }

    /// Asserts nothing arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        let mut line = String::new();
        if let Ok(r) = tokio::time::timeout(d, self.reader.read_line(&mut line)).await {
            panic!("expected silence, got {r:?}: {line:?}");
        }
    }

    /// Waits for the server to close the connection.
    pub async fn expect_eof(&mut self) {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, self.reader.read_line(&mut line))
            .await
            .expect("timed out waiting for EOF")
            .unwrap_or(0);
        assert_eq!(n, 0, "expected EOF, got {line:?}");
    }
}
