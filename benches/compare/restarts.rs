//! Section 10, restarts of qmpmux itself: the longest wait of a client that
//! pipelines commands (8 in flight) across a handover, per handover, p50
//! and max over the runs; with 1 and with 1,000 connected clients (idle,
//! negotiated, all handed over each time).
//!
//! Two kinds: re-execution in place (`SIGUSR2`), and a restart the way
//! systemd does one: `SIGTERM`, the process hands everything to the file
//! descriptor store and exits, a new one starts from what the store holds
//! (a scripted store, `tests/common/fdstore.rs`: systemd's own time to fork
//! and exec is not in it; `.ci/systemd-test` prints what the real one
//! gives). The floor is the same client on QEMU directly, whose longest
//! wait over as many replies is what QEMU alone costs.

use crate::clients::{SyncClient, CAPS, CAPS_OOB};
use crate::common::fdstore::Supervised;
use crate::common::qemu::{Monitor, Qemu};
use crate::common::STEP;
use crate::stats::median_f;
use crate::{progress, Plan};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Reexec,
    Restart,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Reexec => "re-execution (SIGUSR2)",
            Kind::Restart => "restart through the fd store",
        }
    }
}

/// One handover of `kind`; returns when the new process serves.
fn hand_over(daemon: &mut Supervised, kind: Kind, listen: &Path) {
    match kind {
        Kind::Reexec => {
            let done = "serving the connection to QEMU handed over";
            let before = daemon.count(done);
            daemon.signal(nix::sys::signal::Signal::SIGUSR2);
            let deadline = Instant::now() + STEP;
            while daemon.count(done) == before {
                assert!(Instant::now() < deadline, "no re-execution");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Kind::Restart => {
            daemon.stop();
            daemon.start(listen);
        }
    }
}

/// A client pipelining `query-status` (8 in flight) until `stop`, recording
/// when each reply came; fails (panics) on a disconnect or a reply out of
/// order.
fn pipeline(
    path: &Path,
    caps: &[u8],
    stop: Arc<AtomicBool>,
    times: Arc<Mutex<Vec<Instant>>>,
) -> std::thread::JoinHandle<u64> {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(STEP)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    w.write_all(caps).unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("return"), "{line}");
    std::thread::spawn(move || {
        let (mut sent, mut answered) = (0u64, 0u64);
        loop {
            while sent < answered + 8 && !stop.load(Ordering::SeqCst) {
                w.write_all(format!("{{\"execute\": \"query-status\", \"id\": {sent}}}").as_bytes())
                    .unwrap();
                sent += 1;
            }
            if sent == answered {
                return answered;
            }
            line.clear();
            let n = r.read_line(&mut line).expect("read a reply");
            assert!(n > 0, "the pipelining client was disconnected after {answered} replies");
            if line.contains("\"event\"") {
                continue;
            }
            assert!(
                line.contains(&format!("\"id\": {answered}}}")),
                "reply {answered} expected: {line}"
            );
            times.lock().unwrap().push(Instant::now());
            answered += 1;
        }
    })
}

/// The longest gap between consecutive replies from `from` on (the reply
/// before `from` included), in ms.
fn longest_wait(times: &[Instant], from: Instant) -> f64 {
    let start = times.partition_point(|t| *t < from).saturating_sub(1);
    times[start..]
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .fold(0.0, f64::max)
}

/// `runs` handovers of `kind` with `idle` other clients connected; the
/// longest wait of the pipelining client in each.
fn measure(dir: &Path, qemu_sock: &Path, kind: Kind, idle: usize, runs: usize) -> Vec<f64> {
    let tag = format!("{}-{idle}", if kind == Kind::Reexec { "reexec" } else { "restart" });
    let sub = dir.join(&tag);
    std::fs::create_dir_all(&sub).unwrap();
    let listen = sub.join("vm.sock");
    let config = format!(
        "control_socket = \"\"\n[client]\nmax_clients = 4096\n[[vm]]\nname = \"vm\"\nupstream = {qemu_sock:?}\nlisten = {listen:?}\n"
    );
    let mut daemon = Supervised::new(&sub, &config);
    // Quiet, but for the line that says a handover is done.
    daemon.rust_log = "warn,qmpmux::upstream::session=info";
    daemon.start(&listen);
    let idle_clients: Vec<SyncClient> = (0..idle)
        .map(|_| SyncClient::open(&listen, CAPS).expect("idle client"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let times = Arc::new(Mutex::new(Vec::new()));
    let worker = pipeline(&listen, CAPS, stop.clone(), times.clone());
    let mut waits = Vec::new();
    for _ in 0..runs {
        std::thread::sleep(Duration::from_millis(100));
        let at = Instant::now();
        hand_over(&mut daemon, kind, &listen);
        std::thread::sleep(Duration::from_millis(200));
        waits.push(longest_wait(&times.lock().unwrap(), at));
    }
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("the pipelining client failed");
    drop(idle_clients);
    waits
}

/// The same client on QEMU directly for as long: the longest wait QEMU
/// alone gives.
fn floor(qemu_sock: &Path, runs: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let times = Arc::new(Mutex::new(Vec::new()));
    let worker = pipeline(qemu_sock, CAPS_OOB, stop.clone(), times.clone());
    std::thread::sleep(Duration::from_millis(300) * runs as u32);
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("the direct client failed");
    let t = times.lock().unwrap();
    longest_wait(&t, t.first().copied().unwrap_or_else(Instant::now))
}

pub fn run(plan: &Plan, dir: &Path) -> Value {
    let runs = if plan.quick { 5 } else { 20 };
    let q = |n: &str| dir.join(n);
    let qemu = Qemu::start_blocking(&[Monitor::Serve(&q("restarts-qemu.sock"))], &q("restarts-qemu.log"));
    let direct = Qemu::start_blocking(&[Monitor::Serve(&q("restarts-direct.sock"))], &q("restarts-direct.log"));
    out!("\n10. Restarts of qmpmux: the longest wait of a client pipelining 8 commands across each handover ({runs} handovers each)");
    out!(
        "  {:<34} {:>8} {:>12} {:>12}",
        "handover",
        "clients",
        "p50 ms",
        "max ms"
    );
    let mut json = json!({});
    for kind in [Kind::Reexec, Kind::Restart] {
        for idle in [0, 1000] {
            progress(&format!("{} with {} clients", kind.name(), idle + 1));
            let waits = measure(dir, &qemu.socket, kind, idle, runs);
            let max = waits.iter().copied().fold(0.0, f64::max);
            let p50 = median_f(&waits);
            out!("  {:<34} {:>8} {:>12.1} {:>12.1}", kind.name(), idle + 1, p50, max);
            let key = format!(
                "{}_{}",
                if kind == Kind::Reexec { "reexec" } else { "restart" },
                idle + 1
            );
            json[key] = json!({"p50_ms": p50, "max_ms": max, "waits_ms": waits});
        }
    }
    let floor_ms = floor(&direct.socket, runs);
    out!(
        "  {:<34} {:>8} {:>12} {:>12.1}",
        "floor: QEMU directly, no handover",
        1,
        "-",
        floor_ms
    );
    out!("  goals: re-execution p50 <= 50 ms, restart p50 <= 250 ms; at 1,000 clients within 2x of those");
    json["floor_max_ms"] = json!(floor_ms);
    json
}
