//! A scripted fake QMP server, for upstream behaviour QEMU cannot produce on
//! demand (dying mid-command, never greeting, sending garbage); and, in
//! `instant`, one that answers every request at once.

pub mod instant;

use super::STEP;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
