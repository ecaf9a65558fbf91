//! The exclusive lease for multi-step work, against real QEMU: while one
//! client holds it, other clients' commands that could change the VM are
//! refused (queries and events keep flowing); it ends on release, on the
//! holder's disconnect and at expiry, and everyone is told.

mod common;

use common::http::{metrics, sample};
use common::{Client, Daemon, Qemu};
use qmpmux::config::{Endpoint, ListenerConfig};
use qmpmux::policy::Glob;
use serde_json::Value;
use std::time::{Duration, Instant};

async fn lease(c: &mut Client, seconds: u64, reason: &str) -> Value {
    c.cmd(&format!(
        r#"{{"execute":"__org.qmpmux_lease","arguments":{{"seconds":{seconds},"reason":"{reason}"}},"id":"lease"}}"#
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_blocks_others_changes_not_their_queries_and_ends_with_its_holder() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = daemon.metrics_addr.unwrap();
    let mut holder = Client::ready(&sock).await;
    let mut other = Client::ready(&sock).await;

    let r = lease(&mut holder, 60, "migration").await;
    assert_eq!(r["return"]["seconds"], 60, "{r}");
    let acquired = other.event("__org.qmpmux_LEASE_ACQUIRED").await;
    assert_eq!(acquired["data"]["vm"], "web01");
    assert_eq!(acquired["data"]["reason"], "migration");
    let holder_no = acquired["data"]["client"].as_u64().unwrap();
    assert!(
        acquired["data"]["holder"].as_str().unwrap().contains("pid"),
        "{acquired}"
    );

    // Another client's `stop` is refused with its id, naming who and why.
    let r = other.cmd(r#"{"execute":"stop","id":"s"}"#).await;
    assert_eq!(r["id"], "s");
    assert_eq!(r["error"]["class"], "GenericError");
    let desc = r["error"]["desc"].as_str().unwrap();
    assert!(
        desc.contains("web01") && desc.contains(&format!("client {holder_no}")) && desc.contains("migration"),
        "{desc}"
    );
    assert!(desc.contains("more seconds"), "{desc}");
    // Its queries still run, and QEMU really did not stop.
    let r = other.cmd(r#"{"execute":"query-status","id":"q"}"#).await;
    assert_eq!(r["return"]["status"], "running", "{r}");
    // A second lease is refused at once.
    let r = lease(&mut other, 5, "backup").await;
    assert!(r["error"]["desc"].as_str().unwrap().contains("already leased"), "{r}");
    // qmpmux's view names the holder, and the metrics count.
    let r = other.cmd(r#"{"execute":"__org.qmpmux_query-proxy"}"#).await;
    assert_eq!(r["return"]["lease"]["client"], holder_no, "{r}");
    let body = metrics(addr).await;
    assert_eq!(sample(&body, "qmpmux_lease_held{vm=\"web01\"}"), Some(1.0), "{body}");
    assert_eq!(sample(&body, "qmpmux_lease_refusals_total{vm=\"web01\"}"), Some(1.0));

    // The holder itself works as ever, events flow to everyone.
    let r = holder.cmd(r#"{"execute":"stop","id":1}"#).await;
    assert!(r.get("return").is_some(), "{r}");
    other.event("STOP").await;

    drop(holder);
    let released = other.event("__org.qmpmux_LEASE_RELEASED").await;
    assert_eq!(released["data"]["how"], "holder disconnected");
    assert_eq!(released["data"]["client"], holder_no);
    let r = other.cmd(r#"{"execute":"cont","id":2}"#).await;
    assert!(r.get("return").is_some(), "{r}");
    let body = metrics(addr).await;
    assert_eq!(sample(&body, "qmpmux_lease_held{vm=\"web01\"}"), Some(0.0), "{body}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_released_by_its_holder_renewed_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| {
        c.client.lease_exempt = vec![Glob::new("human-monitor-command")];
    })
    .await;
    let mut a = Client::ready(&sock).await;
    let mut b = Client::ready(&sock).await;
    // Only the holder can release.
    let r = b.cmd(r#"{"execute":"__org.qmpmux_release","id":0}"#).await;
    assert!(r["error"]["desc"].as_str().unwrap().contains("does not hold"), "{r}");
    lease(&mut a, 30, "").await;
    // `lease_exempt` commands run for others too.
    let r = b
        .cmd(r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status"},"id":1}"#)
        .await;
    assert!(r.get("return").is_some(), "{r}");
    let r = a.cmd(r#"{"execute":"__org.qmpmux_release","id":2}"#).await;
    assert_eq!(r["return"], serde_json::json!({}));
    let released = b.event("__org.qmpmux_LEASE_RELEASED").await;
    assert_eq!(released["data"]["how"], "released");

    // Renewal by the holder; then it runs out by itself.
    lease(&mut a, 30, "").await;
    let r = lease(&mut a, 1, "").await;
    assert_eq!(r["return"]["seconds"], 1, "{r}");
    let t0 = Instant::now();
    let r = b.cmd(r#"{"execute":"stop","id":3}"#).await;
    assert!(r.get("error").is_some(), "{r}");
    let expired = b.event("__org.qmpmux_LEASE_RELEASED").await;
    assert_eq!(expired["data"]["how"], "expired");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let r = b.cmd(r#"{"execute":"stop","id":4}"#).await;
    assert!(r.get("return").is_some(), "{r}");
    daemon.stop().await;
}

/// Policy applies to the lease commands like to any command: a read-only
/// socket cannot take the VM away from everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decides_who_may_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock, ro) = (
        dir.path().join("q.sock"),
        dir.path().join("vm.sock"),
        dir.path().join("ro.sock"),
    );
    let _qemu = Qemu::start(&up).await;
    let ro2 = ro.clone();
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], move |c| {
        let mut l = ListenerConfig::new("ro", Endpoint::unix(ro2));
        l.policy.allow = vec![Glob::new("query-*"), Glob::new("__org.qmpmux_subscribe")];
        c.vms[0].listeners.push(l);
    })
    .await;
    let mut reader = Client::ready(&ro).await;
    let r = lease(&mut reader, 30, "").await;
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(!r["error"]["desc"].as_str().unwrap().contains("leased"), "{r}");
    let mut full = Client::ready(&sock).await;
    let r = lease(&mut full, 30, "").await;
    assert!(r.get("return").is_some(), "{r}");
    daemon.stop().await;
}

/// A socket holder gets the lease's token (and sees it in `query-proxy`);
/// nobody else sees it, nor the lease events. A reason longer than 1 KiB
/// is refused with a clear error, and no lease is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_the_holders_alone_and_the_reason_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut a = Client::ready(&sock).await;
    let mut b = Client::ready(&sock).await;

    let r = lease(&mut a, 30, &"x".repeat(1025)).await;
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(desc_of(&r).contains("'reason' must be at most 1024 bytes"), "{r}");
    let r = b.cmd(r#"{"execute":"stop","id":"s"}"#).await;
    assert!(r.get("return").is_some(), "no lease was taken: {r}");

    let r = lease(&mut a, 30, &"x".repeat(1024)).await;
    let token = r["return"]["token"]
        .as_str()
        .unwrap_or_else(|| panic!("a token: {r}"))
        .to_string();
    let acquired = b.event("__org.qmpmux_LEASE_ACQUIRED").await;
    assert!(!acquired.to_string().contains(&token), "{acquired}");
    let mine = a.cmd(r#"{"execute":"__org.qmpmux_query-proxy"}"#).await;
    assert_eq!(mine["return"]["lease"]["token"], token.as_str(), "{mine}");
    let theirs = b.cmd(r#"{"execute":"__org.qmpmux_query-proxy"}"#).await;
    assert!(!theirs.to_string().contains(&token), "{theirs}");
    // Renewing keeps the token.
    let r = lease(&mut a, 60, "").await;
    assert_eq!(r["return"]["token"], token.as_str(), "{r}");
    daemon.stop().await;
}

fn desc_of(r: &Value) -> &str {
    r["error"]["desc"].as_str().unwrap_or_default()
}
