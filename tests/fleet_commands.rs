//! QMP commands over NATS as each requester sees them, against a real
//! nats-server and real QEMU: `query-events` returns the VM's events, a
//! lease taken over NATS is held by its token (not by every NATS
//! requester), and one requester flooding does not make another wait
//! behind all of its commands.

mod common;

use async_nats::HeaderMap;
use common::config::nats_commands;
use common::nats::NatsServer;
use common::{Client, Daemon, Qemu, STEP};
use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const EXECUTE: &str = "qmpmux.hv1.web01.execute";

/// QEMU, qmpmux with `[nats] commands = true`, and a local client that has
/// negotiated (so qmpmux has QEMU's greeting).
struct Rig {
    nats: NatsServer,
    _dir: tempfile::TempDir,
    _qemu: Qemu,
    daemon: Daemon,
    sock: PathBuf,
}

impl Rig {
    async fn start() -> (Rig, Client) {
        let nats = NatsServer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
        let qemu = Qemu::start(&up).await;
        let url = nats.url();
        let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| c.nats = Some(nats_commands(&url))).await;
        let local = Client::ready(&sock).await;
        let rig = Rig {
            nats,
            _dir: dir,
            _qemu: qemu,
            daemon,
            sock,
        };
        // The commander subscribes once qmpmux is connected to NATS, and
        // serves the VM a moment later ("no VM" until then).
        let probe = rig.requester().await;
        let status = r#"{"execute":"query-status"}"#;
        common::eventually("qmpmux answering on NATS", async || {
            let r = tokio::time::timeout(Duration::from_millis(500), probe.request(EXECUTE, status.into())).await;
            matches!(r, Ok(Ok(m)) if m.payload.starts_with(b"{\"return\""))
        })
        .await;
        (rig, local)
    }

    /// A requester: a NATS connection of its own.
    async fn requester(&self) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .request_timeout(Some(STEP * 6))
            .connect(self.nats.url())
            .await
            .expect("connect to nats-server")
    }

    fn sock(&self) -> &Path {
        &self.sock
    }
}

/// `body` as a request on the VM's subject, with `Qmpmux-Lease: token` if
/// given; the reply as JSON.
async fn request(c: &async_nats::Client, body: &str, token: Option<&str>) -> Value {
    let reply = match token {
        Some(t) => {
            let mut headers = HeaderMap::new();
            headers.insert("Qmpmux-Lease", t);
            c.request_with_headers(EXECUTE, headers, body.to_string().into()).await
        }
        None => c.request(EXECUTE, body.to_string().into()).await,
    };
    let reply = reply.expect("an answer over NATS");
    serde_json::from_slice(&reply.payload).expect("JSON reply")
}

fn desc(r: &Value) -> &str {
    r["error"]["desc"].as_str().unwrap_or_else(|| panic!("an error: {r}"))
}

/// Item 5: over NATS, `query-events` returns the VM's kept events, as a
/// socket client with no event filter gets them (NATS itself is sent every
/// event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_events_over_nats_returns_the_vms_events() {
    let (rig, mut local) = Rig::start().await;
    local.stop_cont(2).await;
    let nats = rig.requester().await;
    let query = r#"{"execute":"__org.qmpmux_query-events","arguments":{"limit":1000},"id":"q"}"#;
    let over_nats = request(&nats, query, None).await;
    let over_socket = local.cmd(query).await;
    assert_eq!(over_nats["id"], "q");
    let names = |r: &Value| -> Vec<String> {
        r["return"]["events"]
            .as_array()
            .unwrap_or_else(|| panic!("events: {r}"))
            .iter()
            .map(|e| format!("{}#{}", e["event"], e["__org.qmpmux_seq"]))
            .collect()
    };
    let got = names(&over_nats);
    assert_eq!(
        got.iter().filter(|e| e.starts_with("\"STOP\"")).count(),
        2,
        "{over_nats}"
    );
    assert_eq!(got, names(&over_socket), "NATS and a socket see the same events");
    assert_eq!(over_nats["return"]["lost"], false);
    rig.daemon.stop().await;
}

/// Item 6: a lease taken over NATS belongs to whoever sends its token in
/// `Qmpmux-Lease`; other requesters (and the taker without the token)
/// are refused, only the token releases it, and an ended lease's token
/// fences its holder out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_over_nats_is_held_by_its_token() {
    let (rig, mut local) = Rig::start().await;
    let holder = rig.requester().await;
    let other = rig.requester().await;

    let r = request(
        &holder,
        r#"{"execute":"__org.qmpmux_lease","arguments":{"seconds":60,"reason":"migration"},"id":1}"#,
        None,
    )
    .await;
    assert_eq!(r["return"]["seconds"], 60, "{r}");
    let token = r["return"]["token"].as_str().expect("a token").to_string();
    let acquired = local.event("__org.qmpmux_LEASE_ACQUIRED").await;
    assert!(
        !acquired.to_string().contains(&token),
        "the token is not for everyone: {acquired}"
    );
    // A socket client is not the holder, nor sees the token.
    let r = local.cmd(r#"{"execute":"__org.qmpmux_query-proxy"}"#).await;
    assert!(
        r["return"]["lease"].is_object() && r["return"]["lease"].get("token").is_none(),
        "{r}"
    );

    // Another requester's `stop` is refused, and so is its release.
    let r = request(&other, r#"{"execute":"stop","id":2}"#, None).await;
    assert!(desc(&r).contains("is leased by"), "{r}");
    let r = request(&other, r#"{"execute":"__org.qmpmux_release","id":3}"#, None).await;
    assert!(desc(&r).contains("does not hold the lease"), "{r}");
    // So is the taker without its token: over NATS the token is the holder.
    let r = request(&holder, r#"{"execute":"stop","id":4}"#, None).await;
    assert!(desc(&r).contains("is leased by"), "{r}");
    // A wrong token is no better.
    let r = request(&other, r#"{"execute":"stop","id":5}"#, Some("1-00")).await;
    assert!(desc(&r).contains("no longer held"), "{r}");
    // Queries run for everyone; QEMU is still running.
    let r = request(&other, r#"{"execute":"query-status","id":6}"#, None).await;
    assert_eq!(r["return"]["status"], "running", "{r}");

    // With the token, from any connection, the command is the holder's.
    let r = request(&other, r#"{"execute":"stop","id":7}"#, Some(&token)).await;
    assert!(r.get("return").is_some(), "{r}");
    local.event("STOP").await;
    let r = request(&holder, r#"{"execute":"__org.qmpmux_release","id":8}"#, Some(&token)).await;
    assert_eq!(r["return"], serde_json::json!({}), "{r}");
    let released = local.event("__org.qmpmux_LEASE_RELEASED").await;
    assert_eq!(released["data"]["how"], "released");
    // Fencing: the ended lease's token no longer runs anything.
    let r = request(&holder, r#"{"execute":"cont","id":9}"#, Some(&token)).await;
    assert!(desc(&r).contains("no longer held"), "{r}");
    let r = request(&other, r#"{"execute":"cont","id":10}"#, None).await;
    assert!(r.get("return").is_some(), "{r}");
    local.event("RESUME").await;
    let _ = rig.sock();
    rig.daemon.stop().await;
}

/// Item 17: requester A pipelines 64 `query-qmp-schema`; requester B, on
/// another connection, sends one `query-status` once A's first reply is
/// in. B waits behind a few of A's commands (fair turns), not behind all
/// of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_requester_does_not_make_another_wait_behind_all_of_its_commands() {
    const BURST: usize = 64;
    let (rig, _local) = Rig::start().await;
    let a = rig.requester().await;
    let b = rig.requester().await;
    let a_done = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (a, a_done) = (a.clone(), a_done.clone());
        tokio::spawn(async move {
            let mut pending: FuturesUnordered<_> = (0..BURST)
                .map(|i| {
                    let a = a.clone();
                    async move { request(&a, &format!(r#"{{"execute":"query-qmp-schema","id":{i}}}"#), None).await }
                })
                .collect();
            while let Some(r) = pending.next().await {
                assert!(
                    r.get("return").is_some(),
                    "A: {}",
                    &r.to_string()[..200.min(r.to_string().len())]
                );
                a_done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    common::eventually("A's first reply", async || a_done.load(Ordering::SeqCst) > 0).await;
    let r = request(&b, r#"{"execute":"query-status","id":"b"}"#, None).await;
    let behind = a_done.load(Ordering::SeqCst);
    assert_eq!(r["return"]["status"], "running", "{r}");
    flood.await.unwrap();
    eprintln!("B's reply came after {behind} of A's {BURST} replies");
    // All NATS requests as one client, B waited for (nearly) all of A's.
    assert!(
        behind < BURST / 4,
        "B's reply came after {behind} of A's {BURST} replies: it waited behind A's commands"
    );
    rig.daemon.stop().await;
}
