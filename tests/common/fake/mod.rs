//! A scripted fake QMP server, for upstream behaviour QEMU cannot produce on
//! demand (dying mid-command, never greeting, sending garbage); and, in
//! `instant`, one that answers every request at once.

pub mod instant;

use super::STEP;
use serde_json::{json, Value};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 99}, "package": "fake"}, "capabilities": ["oob"]}}"#;

pub struct FakeServer {
    listener: UnixListener,
    pub path: PathBuf,
}

impl FakeServer {
    pub fn bind(path: &Path) -> FakeServer {
        let _ = std::fs::remove_file(path);
        FakeServer {
            listener: UnixListener::bind(path).expect("bind fake QMP server"),
            path: path.to_owned(),
        }
    }

    pub async fn accept(&self) -> FakeConn {
        let (stream, _) = tokio::time::timeout(STEP, self.listener.accept())
            .await
            .expect("qmpmux did not connect to the fake server")
            .expect("accept");
        FakeConn {
            stream,
            buf: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// Accepts and completes greeting and negotiation.
    pub async fn accept_ready(&self) -> FakeConn {
        let mut c = self.accept().await;
        c.handshake().await;
        c
    }
}

pub struct FakeConn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Fds received by `read_line`, with the offset in `buf` they came at.
    fds: Vec<(usize, OwnedFd)>,
}

impl FakeConn {
    pub async fn write(&mut self, raw: &str) {
        self.stream.write_all(raw.as_bytes()).await.expect("fake write");
    }

    /// Greets, reads qmpmux's `qmp_capabilities` and accepts it.
    pub async fn handshake(&mut self) {
        self.write(&format!("{GREETING}\r\n")).await;
        let req = self.read().await.expect("negotiation request");
        assert_eq!(req["execute"], "qmp_capabilities", "{req}");
        self.reply(&req, json!({})).await;
    }

    /// The next JSON value qmpmux sent (no framing assumed); `None` at EOF.
    pub async fn read(&mut self) -> Option<Value> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    self.buf.drain(..used);
                    return Some(v);
                }
                Some(Err(e)) if !e.is_eof() => panic!("fake server got bad JSON: {e}"),
                _ => {}
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(STEP, self.stream.read(&mut chunk))
                .await
                .expect("fake server timed out reading")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next line qmpmux sent, read as a line-based QMP server reads:
    /// it must end in `\n` and hold exactly one JSON value; with the fds
    /// passed with it, each of which must have arrived with the line's
    /// first byte. `None` at EOF.
    pub async fn read_line(&mut self) -> Option<(Value, Vec<OwnedFd>)> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                let v: Value = serde_json::from_slice(&line)
                    .unwrap_or_else(|e| panic!("not one JSON value per line: {text:?}: {e}"));
                let (fds, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fds)
                    .into_iter()
                    .partition(|(at, _)| *at <= end);
                for (at, _) in &fds {
                    assert_eq!(*at, 0, "fd arrived at byte {at} of {text:?}, not with its first byte");
                }
                self.fds = rest.into_iter().map(|(at, fd)| (at - end - 1, fd)).collect();
                return Some((v, fds.into_iter().map(|(_, fd)| fd).collect()));
            }
            if self.recv_with_fds().await == 0 {
                assert!(
                    self.buf.is_empty(),
                    "EOF after an unterminated line: {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
                return None;
            }
        }
    }

    /// One byte into `buf` by `recvmsg`, keeping passed fds with the offset
    /// in `buf` they arrived at; returns the bytes read (0 at EOF). One byte
    /// at a time, as QEMU reads: a bigger read would take the bytes sent
    /// before an fd together with it, hiding where the fd came.
    async fn recv_with_fds(&mut self) -> usize {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd, FromRawFd};
        let mut chunk = [0u8; 1];
        let at = self.buf.len();
        let received = tokio::time::timeout(STEP, async {
            loop {
                self.stream.readable().await.expect("fake readable");
                let r = self.stream.try_io(Interest::READABLE, || {
                    let mut iov = [std::io::IoSliceMut::new(&mut chunk)];
                    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
                    let msg = recvmsg::<()>(
                        self.stream.as_raw_fd(),
                        &mut iov,
                        Some(&mut space),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .map_err(std::io::Error::from)?;
                    let mut fds = Vec::new();
                    for c in msg.cmsgs().map_err(std::io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: SCM_RIGHTS fds are new and ours alone.
                            fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                        }
                    }
                    Ok((msg.bytes, fds))
                });
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    other => break other,
                }
            }
        })
        .await
        .expect("fake server timed out reading");
        let (n, fds) = received.unwrap_or((0, Vec::new()));
        self.buf.extend_from_slice(&chunk[..n]);
        self.fds.extend(fds.into_iter().map(|fd| (at, fd)));
        n
    }

    /// Replies `{"return": ret, "id": <the request's id>}`.
    pub async fn reply(&mut self, req: &Value, ret: Value) {
        let mut msg = json!({ "return": ret });
        if let Some(id) = req.get("id") {
            msg["id"] = id.clone();
        }
        self.write(&format!("{msg}\r\n")).await;
    }

    pub async fn event(&mut self, name: &str) {
        self.write(&format!(
            "{{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}, \"event\": \"{name}\"}}\r\n"
        ))
        .await;
    }
}

/// A fake QEMU behind a running qmpmux VM named `vm`: the temporary
/// directory (keep it alive), the fake server, the daemon, and the VM's
/// socket.
pub async fn vm() -> (tempfile::TempDir, FakeServer, super::Daemon, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("fake.sock"), dir.path().join("vm.sock"));
    let fake = FakeServer::bind(&up);
    let daemon = super::Daemon::start(&[("vm", &up, &sock)]).await;
    (dir, fake, daemon, sock)
}
