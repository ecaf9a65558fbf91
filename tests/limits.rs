//! Limits that keep one kind of peer from locking others out: per-listener
//! client limits with slots kept for the main socket, and caps and timeouts
//! on the metrics endpoint and the control socket.

mod common;

use common::http::{metrics, sample};
use common::logs::{logged, logs};
use common::{Client, Daemon, Qemu, STEP};
use qmpmux::config::{Endpoint, ListenerConfig};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Whether qmpmux greets a client on `path` (rather than closing at once).
async fn greeted(path: &Path) -> bool {
    let stream = tokio::net::UnixStream::connect(path).await.expect("connect");
    let mut line = String::new();
    let n = tokio::time::timeout(STEP, BufReader::new(stream).read_line(&mut line))
        .await
        .expect("neither greeted nor closed")
        .unwrap_or(0);
    n > 0 && line.contains("\"QMP\"")
}

fn unix_listener(name: &str, path: &Path, max_clients: Option<usize>) -> ListenerConfig {
    ListenerConfig {
        max_clients,
        ..ListenerConfig::new(name, Endpoint::unix(path))
    }
}

/// Each listener stays within its own `max_clients`, and the extra
/// listeners together never take the slots kept for the main socket;
/// each client turned away is counted under the limit that refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_limits_keep_room_for_other_sockets() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
        // 8 in all; by default the listeners may have 6 of them (a quarter
        // is kept for the main socket); `a` at most 2.
        c.client.max_clients = 8;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.vms[0].listeners = vec![
            unix_listener("a", &p("a.sock"), Some(2)),
            unix_listener("b", &p("b.sock"), None),
        ];
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(Client::open(&p("a.sock")).await.0);
    }
    let mut refused = Client::connect(&p("a.sock")).await;
    refused.expect_eof().await;
    assert!(logged(
        "client refused: this listener has its maximum number of clients"
    ));
    // `b` gets the rest of the listeners' share, no more.
    for _ in 0..4 {
        held.push(Client::open(&p("b.sock")).await.0);
    }
    let mut refused = Client::connect(&p("b.sock")).await;
    refused.expect_eof().await;
    assert!(logged(
        "client refused: the VM's extra listeners have all the clients they may have"
    ));
    // The main socket still has its two.
    for _ in 0..2 {
        held.push(Client::open(&p("rw.sock")).await.0);
    }
    let mut refused = Client::connect(&p("rw.sock")).await;
    refused.expect_eof().await;
    let body = metrics(daemon.metrics_addr.unwrap()).await;
    for (reason, n) in [
        ("max_clients", 1.0),
        ("reserved_for_main", 1.0),
        ("listener_max_clients", 1.0),
        ("tls_handshakes", 0.0),
        ("not_allowed", 0.0),
    ] {
        let series = format!("qmpmux_clients_refused_total{{vm=\"vm\",reason=\"{reason}\"}}");
        assert_eq!(sample(&body, &series), Some(n), "{series} in\n{body}");
    }
    assert_eq!(sample(&body, "qmpmux_clients{vm=\"vm\"}"), Some(8.0), "{body}");
    // A client leaving gives its slots back.
    held.remove(0);
    common::eventually("a's slot to be given back", async || greeted(&p("a.sock")).await).await;
    daemon.stop().await;
}

/// How many of these connections, which have sent nothing and been sent
/// nothing, the other end has not closed.
fn still_open(conns: &[tokio::net::TcpStream]) -> usize {
    let mut buf = [0u8; 16];
    conns
        .iter()
        .filter(|c| matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count()
}

fn still_open_unix(conns: &[tokio::net::UnixStream]) -> usize {
    let mut buf = [0u8; 16];
    conns
        .iter()
        .filter(|c| matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count()
}

/// Waits up to a minute (header timeouts plus a loaded machine) for `f`.
async fn within_a_minute(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(STEP, s.read_to_string(&mut out))
        .await
        .expect("the answer and the close (one request per connection)")
        .unwrap();
    out
}

/// Idle connections to the metrics endpoint beyond its cap are closed at
/// once, the others when their header timeout ends, and QMP clients are
/// served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_metrics_connections_are_capped_and_time_out() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = daemon.metrics_addr.unwrap();
    let cap = qmpmux::ops::metrics::METRICS_MAX_CONNECTIONS;
    let mut idle = Vec::new();
    for _ in 0..cap + 200 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    within_a_minute("the connections beyond the cap to be closed", || {
        still_open(&idle) <= cap
    })
    .await;
    assert!(logged(
        "connection refused: the service has its maximum number of connections"
    ));
    let (mut c, _) = Client::open(&p("rw.sock")).await;
    c.send(r#"{"execute":"qmp_capabilities"}"#).await;
    assert_eq!(c.recv().await, serde_json::json!({"return": {}}));
    within_a_minute("idle connections to time out", || still_open(&idle) == 0).await;
    let body = http_get(addr, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(body.contains("qmpmux_clients{vm=\"vm\"} 1"), "{body}");
    assert!(http_get(addr, "/other").await.starts_with("HTTP/1.1 404"));
    daemon.stop().await;
}

/// The control socket serves a limited number of connections at once and
/// closes the others at once; idle ones still go after its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_control_connections_are_capped() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let ctl = p("ctl");
    let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
        c.control_socket = Some(ctl.clone());
    })
    .await;
    let cap = qmpmux::ops::control::CONTROL_MAX_CONNECTIONS;
    let mut idle = Vec::new();
    for _ in 0..cap + 50 {
        idle.push(tokio::net::UnixStream::connect(&ctl).await.unwrap());
    }
    within_a_minute("the connections beyond the cap to be closed", || {
        still_open_unix(&idle) <= cap
    })
    .await;
    assert!(logged(
        "connection refused: the service has its maximum number of connections"
    ));
    within_a_minute("idle connections to time out", || still_open_unix(&idle) == 0).await;
    let report = qmpmux::ops::control::query_status(&ctl).await.expect("status");
    assert_eq!(report.vms[0].name, "vm");
    daemon.stop().await;
}
