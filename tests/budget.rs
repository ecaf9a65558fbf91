//! What qmpmux writes to a client itself (lease refusals, errors, the
//! answers to its own commands, replays) counts against that client's
//! budget and gets the same backpressure as QEMU's replies: a client that
//! does not read is cut off, one that reads is never cut off for pipelining
//! them, and `max_reply_bytes` applies to them too. Against real QEMU and
//! qmpmux's binary (its memory is measured).
//!
//! The figures are printed (`-- --nocapture`); the abuse can be made larger
//! with `QMPMUX_BUDGET_REASON` (lease reason bytes) and
//! `QMPMUX_BUDGET_STOPS` (requests per abusing client) and
//! `QMPMUX_BUDGET_CLIENTS` (abusing clients).

mod common;

use common::binary::Binary;
use common::config::config_toml;
use common::process::rss_kib;
use common::{Client, Daemon, Qemu};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// qmpmux's binary for one VM with `client` added to its `[client]` table,
/// keeping up to 10,000 events (1 MiB of them, as by default).
fn start(dir: &Path, up: &Path, sock: &Path, client: &str) -> Binary {
    let config = config_toml(&[("vm", up, sock)], 4096).replacen(
        "[client]\n",
        &format!("[upstream]\nevent_history = 10000\n[client]\n{client}"),
        1,
    );
    Binary::start(
        &dir.join("qmpmux.toml"),
        &config,
        &dir.join("qmpmux.log"),
        &[sock],
        None,
    )
}

async fn lease(c: &mut Client, reason: &str) -> Value {
    let reason = serde_json::to_string(reason).unwrap();
    c.cmd(&format!(
        r#"{{"execute":"__org.qmpmux_lease","arguments":{{"seconds":600,"reason":{reason}}},"id":"lease"}}"#
    ))
    .await
}

/// Fills the VM's event history with `n` lease events of about `reason`
/// bytes each, pipelined.
async fn lease_events(c: &mut Client, n: usize, reason: &str) {
    let reason = serde_json::to_string(reason).unwrap();
    let mut raw = String::new();
    for _ in 0..n / 2 {
        raw += &format!(r#"{{"execute":"__org.qmpmux_lease","arguments":{{"seconds":60,"reason":{reason}}}}}"#);
        raw += r#"{"execute":"__org.qmpmux_release"}"#;
    }
    c.send(&raw).await;
    for _ in 0..n / 2 * 2 {
        let r = c.reply().await;
        assert!(r.get("return").is_some(), "{r}");
    }
}

/// One `stop` + `cont` round trip of `c`.
async fn round_trip(c: &mut Client) -> Duration {
    let t = Instant::now();
    c.stop_cont(1).await;
    t.elapsed()
}

/// Clients that each pipeline many `stop`s during another's lease and never
/// read: before, the refusals (each carrying the holder's reason) were
/// queued past `max_queue_bytes` and the clients kept; now they count, and
/// each such client is disconnected once its budget is full, while the
/// holder's commands go on as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_count_against_the_budget_of_a_client_that_does_not_read() {
    const BUDGET: usize = 64 << 10;
    let abusers_n = env_or("QMPMUX_BUDGET_CLIENTS", 4);
    let stops = env_or("QMPMUX_BUDGET_STOPS", 64);
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let qmpmux = start(
        dir.path(),
        &up,
        &sock,
        &format!("max_queue_bytes = {BUDGET}\nmax_in_flight = {}\n", stops.max(64)),
    );
    let pid = qmpmux.pid();
    let mut holder = Client::ready(&sock).await;
    // Refusals as large as a lease reason may make them (2 MiB, unless
    // qmpmux bounds the reason: then its bound).
    let mut reason = "r".repeat(env_or("QMPMUX_BUDGET_REASON", 2 << 20));
    while lease(&mut holder, &reason).await.get("return").is_none() {
        assert!(reason.len() > 64, "no lease with any reason");
        reason.truncate(reason.len() / 2);
    }
    let mut quiet_rt = Vec::new();
    for _ in 0..20 {
        quiet_rt.push(round_trip(&mut holder).await);
    }
    let before = rss_kib(pid);

    let mut abusers = Vec::new();
    let one = r#"{"execute":"stop"}"#.repeat(stops);
    for _ in 0..abusers_n {
        let mut c = Client::ready(&sock).await;
        // Fits in the socket's buffers: never blocks.
        c.send(&one).await;
        abusers.push(c);
    }
    // Meanwhile the holder works; every abuser is cut off once its queue
    // is full (the log says so for each): at once with refusals larger
    // than its budget, else once the holder's events have filled it.
    let (mut peak, mut busy_rt) = (before, Vec::new());
    let deadline = Instant::now() + 3 * common::STEP;
    loop {
        busy_rt.push(round_trip(&mut holder).await);
        peak = peak.max(rss_kib(pid));
        let log = std::fs::read_to_string(&qmpmux.log).unwrap_or_default();
        let cut = log.matches("client is not reading").count();
        if cut == abusers_n && busy_rt.len() >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{cut} of {abusers_n} non-reading clients cut off; qmpmux RSS {before} -> {peak} KiB"
        );
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!(
        "{abusers_n} clients x {stops} refused stops (reason {} B), not reading: qmpmux RSS {before} -> peak {peak} KiB \
         (+{} KiB); holder's stop+cont {:?} quiet, {:?} meanwhile (median of {})",
        reason.len(),
        peak - before,
        median(&mut quiet_rt),
        median(&mut busy_rt),
        busy_rt.len()
    );
    // Each costs at most about 1.5 x its budget, the socket buffers and one
    // refusal: far below what they asked for.
    let bound = (abusers_n * (2 * BUDGET + 2 * reason.len() + (1 << 20)) / 1024) as u64;
    assert!(
        peak - before < bound,
        "qmpmux grew by {} KiB (bound {bound} KiB)",
        peak - before
    );
    // What reaches a cut-off client is bounded too; then EOF (or a reset:
    // qmpmux closed it with its requests unread).
    for c in abusers {
        let (mut reader, _w) = c.into_inner();
        let mut bytes = 0;
        let mut buf = vec![0; 1 << 16];
        while let Ok(Ok(n @ 1..)) = tokio::time::timeout(common::STEP, reader.read(&mut buf)).await {
            bytes += n;
        }
        assert!(bytes < 4 * BUDGET + 2 * reason.len() + (1 << 20), "{bytes} bytes");
    }
    // A client that reads may pipeline as many refused commands: they are
    // refused as it reads, and it gets every refusal.
    let mut reader = Client::ready(&sock).await;
    reader.send(&one).await;
    for _ in 0..stops {
        let r = reader.reply().await;
        assert_eq!(
            r["error"]["class"],
            "GenericError",
            "{}",
            r.to_string().chars().take(300).collect::<String>()
        );
    }
    assert!(holder.cmd(r#"{"execute":"query-status","id":1}"#).await["return"].is_object());
}

/// A client that reads as fast as it can may pipeline qmpmux's own large
/// replies (`query-events` and `subscribe` replays of a full history,
/// ~1 MiB each, 24 of each: more than its 16 MiB budget together): they
/// are made as it reads, not all at once, and it gets every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_client_may_pipeline_qmpmux_s_large_replies() {
    const N: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let qmpmux = start(dir.path(), &up, &sock, "");
    let pid = qmpmux.pid();
    let mut c = Client::ready(&sock).await;
    // A full history: 1 MiB of events of ~400 bytes.
    lease_events(&mut c, 3000, &"h".repeat(200)).await;
    let before = rss_kib(pid);
    let mut peak = before;

    let query = r#"{"execute":"__org.qmpmux_query-events","arguments":{"limit":10000}}"#;
    c.send(&query.repeat(N)).await;
    let t = Instant::now();
    let mut bytes = 0;
    for i in 0..N {
        let r = c.reply().await;
        let events = r["return"]["events"].as_array().map_or(0, Vec::len);
        assert!(events > 2000, "reply {i}: {events} events");
        bytes += r.to_string().len();
        peak = peak.max(rss_kib(pid));
    }
    println!(
        "{N} pipelined query-events, {} MiB in all: {:?}; qmpmux RSS {before} -> peak {peak} KiB",
        bytes >> 20,
        t.elapsed()
    );

    let subscribe = r#"{"execute":"__org.qmpmux_subscribe","arguments":{"since":0}}"#;
    c.send(&(subscribe.repeat(N) + r#"{"execute":"query-status","id":"marker"}"#))
        .await;
    let (mut replies, mut events) = (0, 0);
    loop {
        let v = c.recv().await;
        peak = peak.max(rss_kib(pid));
        if v.get("event").is_some() {
            events += 1;
        } else if v["id"] == "marker" {
            break;
        } else {
            assert!(
                v.get("return").is_some(),
                "{}",
                v.to_string().chars().take(300).collect::<String>()
            );
            replies += 1;
        }
    }
    assert_eq!(replies, N);
    assert!(events > N * 2000, "{events} events replayed");
    println!("{N} pipelined subscribe since 0: {events} events replayed; qmpmux RSS peak {peak} KiB");
}

/// `max_reply_bytes` bounds qmpmux's own replies as it does QEMU's: a
/// larger one is an error with the client's id, and the client stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_reply_bytes_applies_to_qmpmux_s_own_replies() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| c.client.max_reply_bytes = 64 << 10).await;
    let mut c = Client::ready(&sock).await;
    lease_events(&mut c, 400, &"h".repeat(200)).await;
    let r = c
        .cmd(r#"{"execute":"__org.qmpmux_query-events","arguments":{"limit":400},"id":"big"}"#)
        .await;
    let short = |v: &Value| v.to_string().chars().take(300).collect::<String>();
    assert_eq!(r["id"], "big", "{}", short(&r));
    assert_eq!(r["error"]["class"], "GenericError", "{}", short(&r));
    let desc = r["error"]["desc"].as_str().unwrap();
    assert!(
        desc.contains("max_reply_bytes = 65536") && desc.contains("qmpmux's reply"),
        "{desc}"
    );
    // A smaller page comes, on the same connection.
    let r = c
        .cmd(r#"{"execute":"__org.qmpmux_query-events","arguments":{"limit":10},"id":"small"}"#)
        .await;
    assert_eq!(
        r["return"]["events"].as_array().map(Vec::len),
        Some(10),
        "{}",
        short(&r)
    );
    daemon.stop().await;
}
