//! Fault/soak test: 64 clients pipelining against real QEMU through the
//! real `qmpmux` binary, while QEMU is killed and restarted again and again
//! and a few clients never read. Asserts no lost or misrouted reply, no hung
//! client and bounded daemon memory, and prints its figures.
//!
//! Short in the normal test run; longer on demand:
//! `QMPMUX_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`

mod common;

use common::process::rss_kib;
use common::{die_with_parent, Client, Qemu};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 64;
const FROZEN: usize = 4;
const DEPTH: usize = 8;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    down: AtomicU64,
    unknown: AtomicU64,
    other_errors: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_many_clients_through_qemu_restarts() {
    let secs: u64 = std::env::var("QMPMUX_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let config = dir.path().join("qmpmux.toml");
    std::fs::write(
        &config,
        format!(
            "log_level = \"warn\"\n[client]\nmax_queue_bytes = 262144\n[[vm]]\nname = \"soak\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
            up.display(),
            sock.display()
        ),
    )
    .unwrap();
    let mut qemu = Some(Qemu::start(&up).await);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmpmux"));
    cmd.arg("--config").arg(&config).stdout(Stdio::null());
    die_with_parent(&mut cmd);
    let mut daemon = cmd.spawn().expect("start qmpmux");
    let pid = daemon.id();
    common::eventually("qmpmux to listen", async || {
        tokio::net::UnixStream::connect(&sock).await.is_ok()
    })
    .await;

    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut frozen = Vec::new();
    for _ in 0..FROZEN {
        frozen.push(Client::ready(&sock).await);
    }
    let mut workers = Vec::new();
    for c in 0..CLIENTS {
        let (sock, counts) = (sock.clone(), counts.clone());
        workers.push(tokio::spawn(async move {
            let mut client = Client::ready(&sock).await;
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let mut batch = String::new();
                for k in 0..DEPTH as u64 {
                    // Now and then a command that makes QEMU emit events.
                    let cmd = match (seq + k) % 50 {
                        0 => "stop",
                        1 => "cont",
                        _ => "query-status",
                    };
                    batch.push_str(&format!("{{\"execute\":\"{cmd}\",\"id\":[{c},{}]}}", seq + k));
                }
                client.send(&batch).await;
                for k in 0..DEPTH as u64 {
                    // Every request gets exactly one reply, with its own id,
                    // in order; Client::reply panics if none comes in time.
                    let r = client.reply().await;
                    assert_eq!(r["id"], serde_json::json!([c, seq + k]), "misrouted or lost reply: {r}");
                    let desc = r["error"]["desc"].as_str().unwrap_or("");
                    let counter = if r.get("return").is_some() {
                        &counts.ok
                    } else if desc.contains("not connected") || desc.contains("not executed") {
                        &counts.down
                    } else if desc.contains("outcome is unknown") {
                        &counts.unknown
                    } else {
                        &counts.other_errors
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                seq += DEPTH as u64;
            }
        }));
    }

    let mut restarts = 0;
    let mut peak = 0;
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200 + fastrand::u64(0..400))).await;
        let rss = rss_kib(pid);
        peak = peak.max(rss);
        samples.push(rss);
        if let Some(mut q) = qemu.take() {
            q.kill9();
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..100))).await;
        qemu = Some(Qemu::start_watched(&up));
        restarts += 1;
    }
    for w in workers {
        w.await.expect("a client task failed");
    }
    let final_rss = rss_kib(pid);
    let (ok, down, unknown, other) = (
        counts.ok.load(Ordering::Relaxed),
        counts.down.load(Ordering::Relaxed),
        counts.unknown.load(Ordering::Relaxed),
        counts.other_errors.load(Ordering::Relaxed),
    );
    println!(
        "soak: {secs}s, {CLIENTS} clients x {DEPTH} deep, {FROZEN} never reading, {restarts} QEMU kills/restarts; \
         replies: {ok} ok, {down} upstream-down, {unknown} outcome-unknown, {other} other errors; \
         qmpmux RSS peak {peak} KiB, final {final_rss} KiB"
    );
    assert_eq!(other, 0, "unexpected error replies");
    assert!(ok > 0, "no command ever succeeded");
    // Bounded memory: never-reading clients are capped (max_queue_bytes),
    // nothing grows with the number of commands served.
    assert!(peak < 128 * 1024, "qmpmux RSS peaked at {peak} KiB");
    drop(frozen);
    let _ = daemon.kill();
    let _ = daemon.wait();
}
