//! The nats-server harness (`tests/common/nats.rs`) checked against a real
//! nats-server with a minimal client speaking NATS's text protocol over
//! TCP: it serves on its URL with JetStream, delivers a message, comes back
//! on the same URL after a restart with its JetStream streams intact, keeps
//! parallel servers apart, and takes authentication from arguments or a
//! config file.
//!
//! Without nats-server these tests say so and pass, except under CI.

mod common;

use common::nats::{nats_or_skip, read_info, NatsServer};
use common::STEP;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A message as delivered: subject, reply subject, payload.
struct Msg {
    subject: String,
    reply: Option<String>,
    payload: Vec<u8>,
}

/// A NATS client just big enough for these tests.
struct Raw {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
    inbox_sid: Option<u32>,
}

impl Raw {
    /// Connects to `nats`, reads INFO, sends CONNECT with `connect` and a
    /// PING; the first line after that (`PONG`, or `-ERR ...`).
    async fn try_connect(nats: &NatsServer, connect: Value) -> (Raw, String) {
        let conn = TcpStream::connect(nats.addr()).await.expect("connect to nats-server");
        let (r, w) = conn.into_split();
        let mut raw = Raw {
            r: BufReader::new(r),
            w,
            inbox_sid: None,
        };
        let info = raw.line().await;
        assert!(info.starts_with("INFO {"), "first line {info:?}");
        raw.send(&format!("CONNECT {connect}\r\nPING\r\n")).await;
        let answer = raw.line().await;
        (raw, answer)
    }

    /// Connected, without verbose `+OK`s; panics unless PING gets PONG.
    async fn connect(nats: &NatsServer, creds: Value) -> Raw {
        let mut connect = json!({"verbose": false, "pedantic": false});
        connect
            .as_object_mut()
            .unwrap()
            .extend(creds.as_object().unwrap().clone());
        let (raw, answer) = Raw::try_connect(nats, connect).await;
        assert_eq!(answer, "PONG", "{}", nats.log());
        raw
    }

    async fn send(&mut self, s: &str) {
        self.w.write_all(s.as_bytes()).await.expect("write to nats-server");
    }

    /// The next protocol line, without `\r\n`.
    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, self.r.read_line(&mut line))
            .await
            .expect("a line from nats-server in time")
            .expect("read from nats-server");
        assert!(n > 0, "nats-server closed the connection");
        line.trim_end_matches("\r\n").to_owned()
    }

    async fn sub(&mut self, subject: &str, sid: u32) {
        self.send(&format!("SUB {subject} {sid}\r\n")).await;
    }

    async fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) {
        let reply = reply.map(|r| format!(" {r}")).unwrap_or_default();
        let mut frame = format!("PUB {subject}{reply} {}\r\n", payload.len()).into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.w.write_all(&frame).await.expect("write to nats-server");
    }

    /// The next MSG, answering the server's PINGs on the way.
    async fn next_msg(&mut self) -> Msg {
        loop {
            let line = self.line().await;
            if line == "PING" {
                self.send("PONG\r\n").await;
                continue;
            }
            if line == "PONG" || line == "+OK" {
                continue;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            let (subject, reply, len) = match parts.as_slice() {
                ["MSG", subject, _sid, len] => (subject, None, len),
                ["MSG", subject, _sid, reply, len] => (subject, Some(reply.to_string()), len),
                _ => panic!("expected MSG, got {line:?}"),
            };
            let len: usize = len.parse().expect("MSG length");
            let mut payload = vec![0; len + 2];
            self.r.read_exact(&mut payload).await.expect("MSG payload");
            assert!(payload.ends_with(b"\r\n"));
            payload.truncate(len);
            return Msg {
                subject: subject.to_string(),
                reply,
                payload,
            };
        }
    }

    /// Request/reply: publishes `payload` to `subject` with a reply subject
    /// of this connection's inbox, and returns the reply as JSON.
    async fn request(&mut self, subject: &str, payload: &[u8]) -> Value {
        if self.inbox_sid.is_none() {
            self.sub("_INBOX.harness.*", 999).await;
            self.inbox_sid = Some(999);
        }
        self.publish(subject, Some("_INBOX.harness.1"), payload).await;
        let msg = self.next_msg().await;
        assert_eq!(msg.subject, "_INBOX.harness.1");
        serde_json::from_slice(&msg.payload).expect("JSON reply")
    }
}

#[tokio::test]
async fn serves_with_jetstream_and_delivers_a_message() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{}", nats.port()));
    assert_ne!(nats.port(), 0);
    assert_eq!(nats.info()["jetstream"], true, "INFO: {}", nats.info());
    assert_eq!(nats.info()["port"], nats.port());
    let info = read_info(nats.addr()).await.expect("INFO");
    assert_eq!(info["jetstream"], true);

    let mut c = Raw::connect(&nats, json!({})).await;
    c.sub("qmpmux.test", 1).await;
    // The PONG orders the SUB before the PUB on the server.
    c.send("PING\r\n").await;
    assert_eq!(c.line().await, "PONG");
    c.publish("qmpmux.test", None, b"hello").await;
    let msg = c.next_msg().await;
    assert_eq!(msg.subject, "qmpmux.test");
    assert_eq!(msg.reply, None);
    assert_eq!(msg.payload, b"hello");
}

/// A stream created before a restart holds its messages after it, and the
/// sequence goes on: JetStream's store outlives the process.
#[tokio::test]
async fn restart_keeps_the_url_and_jetstream_streams() {
    let Some(mut nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let url = nats.url();
    let first_pid = nats.pid();
    let mut c = Raw::connect(&nats, json!({})).await;
    let created = c
        .request(
            "$JS.API.STREAM.CREATE.EVENTS",
            json!({"name": "EVENTS", "subjects": ["events.>"], "storage": "file"})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(created["config"]["name"], "EVENTS", "{created}");
    let ack = c.request("events.vm1", b"{\"event\":\"STOP\"}").await;
    assert_eq!(ack, json!({"stream": "EVENTS", "seq": 1}));

    nats.stop().await;
    assert_eq!(nats.pid(), None);
    assert!(
        TcpStream::connect(nats.addr()).await.is_err(),
        "still accepting after stop"
    );
    nats.restart().await;
    assert_eq!(nats.url(), url);
    assert_ne!(nats.pid(), first_pid);
    assert_eq!(nats.info()["jetstream"], true);

    let mut c = Raw::connect(&nats, json!({})).await;
    let info = c.request("$JS.API.STREAM.INFO.EVENTS", b"").await;
    assert_eq!(info["state"]["messages"], 1, "{info}");
    let ack = c.request("events.vm1", b"{\"event\":\"RESUME\"}").await;
    assert_eq!(ack, json!({"stream": "EVENTS", "seq": 2}));

    // restart() also stops a running server first.
    nats.restart().await;
    assert_eq!(nats.url(), url);
    let mut c = Raw::connect(&nats, json!({})).await;
    let info = c.request("$JS.API.STREAM.INFO.EVENTS", b"").await;
    assert_eq!(info["state"]["messages"], 2, "{info}");
}

/// After SIGKILL, restart() still finds the port (the ports file of the
/// killed process is left behind and must not be read) and the store.
#[tokio::test]
async fn restart_after_kill() {
    let Some(mut nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let url = nats.url();
    let mut c = Raw::connect(&nats, json!({})).await;
    let created = c
        .request(
            "$JS.API.STREAM.CREATE.EVENTS",
            json!({"name": "EVENTS", "subjects": ["events.>"]})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(created["config"]["name"], "EVENTS", "{created}");
    nats.kill();
    nats.restart().await;
    assert_eq!(nats.url(), url);
    let mut c = Raw::connect(&nats, json!({})).await;
    let info = c.request("$JS.API.STREAM.INFO.EVENTS", b"").await;
    assert_eq!(info["config"]["name"], "EVENTS", "{info}");
}

#[tokio::test]
async fn parallel_servers_get_their_own_ports_and_stores() {
    let Some(a) = NatsServer::start_or_skip().await else {
        return;
    };
    let b = NatsServer::start().await;
    assert_ne!(a.url(), b.url());
    assert_ne!(a.store_dir(), b.store_dir());
    assert!(a.store_dir().join("jetstream").is_dir());
}

#[tokio::test]
async fn authentication_from_arguments() {
    if nats_or_skip().is_none() {
        return;
    }
    let nats = NatsServer::start_with_args(&["--auth", "s3cret-token"]).await;
    let (_, answer) = Raw::try_connect(&nats, json!({"verbose": false})).await;
    assert_eq!(answer, "-ERR 'Authorization Violation'");
    Raw::connect(&nats, json!({"auth_token": "s3cret-token"})).await;

    let nats = NatsServer::start_with_args(&["--user", "alice", "--pass", "pw"]).await;
    let (_, answer) = Raw::try_connect(&nats, json!({"verbose": false, "user": "alice", "pass": "no"})).await;
    assert_eq!(answer, "-ERR 'Authorization Violation'");
    Raw::connect(&nats, json!({"user": "alice", "pass": "pw"})).await;
}

/// A config file with accounts and permissions: a user may publish only
/// where its permissions say, and JetStream works in its account.
#[tokio::test]
async fn config_file_with_accounts_and_permissions() {
    if nats_or_skip().is_none() {
        return;
    }
    let mut nats = NatsServer::start_with_config(
        r#"
        # {dir}
        accounts {
          QMPMUX {
            jetstream: enabled
            users: [
              { user: qmpmux, password: pw1 }
              { user: reader, password: pw2, permissions: { publish: { deny: ["events.>"] } } }
            ]
          }
        }
        "#,
    )
    .await;
    assert!(nats.dir().join("nats-server.conf").is_file());
    let conf = std::fs::read_to_string(nats.dir().join("nats-server.conf")).unwrap();
    assert!(
        conf.contains(&nats.dir().display().to_string()),
        "{{dir}} not replaced: {conf}"
    );

    let mut q = Raw::connect(&nats, json!({"user": "qmpmux", "pass": "pw1"})).await;
    let created = q
        .request(
            "$JS.API.STREAM.CREATE.EVENTS",
            json!({"name": "EVENTS", "subjects": ["events.>"]})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(created["config"]["name"], "EVENTS", "{created}");

    let mut r = Raw::connect(&nats, json!({"user": "reader", "pass": "pw2"})).await;
    r.publish("events.vm1", None, b"x").await;
    assert_eq!(
        r.line().await,
        "-ERR 'Permissions Violation for Publish to \"events.vm1\"'"
    );

    // The config and the store persist across a restart too.
    nats.restart().await;
    let mut q = Raw::connect(&nats, json!({"user": "qmpmux", "pass": "pw1"})).await;
    let info = q.request("$JS.API.STREAM.INFO.EVENTS", b"").await;
    assert_eq!(info["config"]["name"], "EVENTS", "{info}");
}
