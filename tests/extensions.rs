//! qmpmux's own QMP extensions, named by the spec's downstream-extension
//! rule (`__org.qmpmux_`): a query of the proxy's view, and opt-in events
//! for upstream loss and restoration.

mod common;

use common::{Client, Daemon, Qemu};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_proxy_reports_the_proxys_view() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("web01", &up, &sock)]).await;
    let mut a = Client::ready(&sock).await;
    let _b = Client::ready(&sock).await;
    let r = a.cmd(r#"{"execute":"__org.qmpmux_query-proxy","id":"p"}"#).await;
    assert_eq!(r["id"], "p");
    let v = &r["return"];
    assert_eq!(v["vm"], "web01");
    assert_eq!(v["runstate"], "running");
    assert_eq!(v["clients"], 2);
    assert_eq!(v["upstream-connections"], 1);
    assert_eq!(v["listener"], "main");
    assert_eq!(v["policy"], "full control");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_lost_and_restored_events_when_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let mut qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| c.upstream.proxy_events = true).await;
    let mut c = Client::ready(&sock).await;
    qemu.kill9();
    let lost = c.event("__org.qmpmux_UPSTREAM_LOST").await;
    assert_eq!(lost["data"]["vm"], "web01");
    assert!(
        lost["data"]["reason"].is_string() && lost["timestamp"]["seconds"].is_u64(),
        "{lost}"
    );
    let _qemu2 = Qemu::start_watched(&up);
    let restored = c.event("__org.qmpmux_UPSTREAM_RESTORED").await;
    assert_eq!(restored["data"], json!({"vm": "web01", "reconnect": true}));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_events_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let mut qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("web01", &up, &sock)]).await;
    let mut c = Client::ready(&sock).await;
    qemu.kill9();
    // QEMU's death shows only as errors to commands, as with QEMU itself.
    c.expect_silence(Duration::from_millis(300)).await;
    daemon.stop().await;
}
