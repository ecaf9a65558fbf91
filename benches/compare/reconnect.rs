//! Section 6, reconnect: QEMU killed and restarted, timed from its socket
//! file appearing to the first successful command, through qmpmux (QEMU B)
//! and directly (QEMU A). Measured before section 5, printed after it.

use crate::clients::{SyncClient, CAPS, CAPS_OOB};
use crate::common::qemu::{Monitor, Qemu};
use crate::common::STEP;
use crate::stats::{median_f, ratio};
use crate::{progress, Plan, Rig};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Reconnect {
    /// Kill until a command through qmpmux fails.
    detect_ms: f64,
    /// Spawn until the socket file exists.
    socket_ms: f64,
    /// Socket file until the first successful command.
    recover_ms: f64,
    attempts: u64,
}

/// Both kinds of run, alternating.
pub struct Runs {
    mux: Vec<Reconnect>,
    direct: Vec<Reconnect>,
}

/// Restarts `rig`'s QEMUs `plan.reconnects` times each (from this thread:
/// see the death signal in `tests/common/process.rs`).
pub fn measure(plan: &Plan, rig: &mut Rig) -> Runs {
    progress("reconnect after QEMU restart");
    let mut client = SyncClient::open(&rig.mux_qemu, CAPS).expect("reconnect client");
    let (log_a, log_b) = (rig.path("qemu-a.log"), rig.path("qemu-b.log"));
    let mut runs = Runs {
        mux: Vec::new(),
        direct: Vec::new(),
    };
    for _ in 0..plan.reconnects {
        runs.mux.push(reconnect_mux(&mut rig.qemu_b, &log_b, &mut client));
        runs.direct.push(reconnect_direct(&mut rig.qemu_a, &log_a));
        std::thread::sleep(Duration::from_millis(100));
    }
    runs
}

fn wait_socket_file(socket: &Path, since: Instant) -> Instant {
    while std::fs::symlink_metadata(socket).is_err() {
        assert!(since.elapsed() < STEP, "QEMU did not create its socket");
        std::thread::sleep(Duration::from_micros(100));
    }
    Instant::now()
}

/// Kills QEMU, waits for qmpmux to report it, starts QEMU again and times
/// from its socket file appearing (stat only: QEMU serves one client at a
/// time, and that must be qmpmux) to the first successful command through
/// an already-connected qmpmux client.
fn reconnect_mux(qemu: &mut Qemu, log: &Path, client: &mut SyncClient) -> Reconnect {
    let socket = qemu.socket.clone();
    let tk = Instant::now();
    qemu.kill9();
    while client.cmd().expect("client through qmpmux") {
        assert!(tk.elapsed() < STEP, "commands kept succeeding with QEMU dead");
        std::thread::sleep(Duration::from_millis(1));
    }
    let detect_ms = tk.elapsed().as_secs_f64() * 1e3;
    let ts = Instant::now();
    *qemu = Qemu::spawn(&[Monitor::Serve(&socket)], Some(log));
    let t0 = wait_socket_file(&socket, ts);
    let mut attempts = 0;
    loop {
        attempts += 1;
        if client.cmd().expect("client through qmpmux") {
            break;
        }
        assert!(t0.elapsed() < 3 * STEP, "qmpmux did not reconnect");
        std::thread::sleep(Duration::from_micros(500));
    }
    Reconnect {
        detect_ms,
        socket_ms: (t0 - ts).as_secs_f64() * 1e3,
        recover_ms: t0.elapsed().as_secs_f64() * 1e3,
        attempts,
    }
}

/// The baseline: a direct client that, from the socket file appearing,
/// tries to connect every 0.5 ms, then negotiates and sends query-status.
fn reconnect_direct(qemu: &mut Qemu, log: &Path) -> Reconnect {
    let socket = qemu.socket.clone();
    qemu.kill9();
    let ts = Instant::now();
    *qemu = Qemu::spawn(&[Monitor::Serve(&socket)], Some(log));
    let t0 = wait_socket_file(&socket, ts);
    let mut attempts = 0;
    loop {
        attempts += 1;
        if let Ok(mut c) = SyncClient::open(&socket, CAPS_OOB) {
            if c.cmd().unwrap_or(false) {
                break;
            }
        }
        assert!(t0.elapsed() < 3 * STEP, "QEMU did not come up");
        std::thread::sleep(Duration::from_micros(500));
    }
    Reconnect {
        detect_ms: 0.0,
        socket_ms: (t0 - ts).as_secs_f64() * 1e3,
        recover_ms: t0.elapsed().as_secs_f64() * 1e3,
        attempts,
    }
}

/// Prints section 6; returns its JSON.
pub fn report(runs: &Runs) -> Value {
    let (mux_runs, direct_runs) = (&runs.mux, &runs.direct);
    out!("\n6. Reconnect: QEMU killed (SIGKILL) and restarted; t0 = its socket file appears (stat), t1 = first successful query-status");
    out!("   via qmpmux: an already-connected client retries every 0.5 ms (qmpmux: backoff 50 ms initial, x2, max 1 s, +-10%, cut short by a watch for the socket file)");
    out!("   direct: a new client tries to connect every 0.5 ms from t0 (the best a client of QEMU itself can do)");
    out!(
        "   {:>4}{:>17}{:>17}{:>22}{:>17}{:>12}",
        "run",
        "kill->error ms",
        "spawn->socket ms",
        "t1-t0 via qmpmux ms",
        "t1-t0 direct ms",
        "ratio"
    );
    for (i, (m, d)) in mux_runs.iter().zip(direct_runs).enumerate() {
        out!(
            "   {:>4}{:>17.1}{:>17.1}{:>22.1}{:>17.1}{:>11.1}x",
            i + 1,
            m.detect_ms,
            m.socket_ms,
            m.recover_ms,
            d.recover_ms,
            ratio(m.recover_ms, d.recover_ms)
        );
    }
    let med = |runs: &[Reconnect], f: fn(&Reconnect) -> f64| median_f(&runs.iter().map(f).collect::<Vec<_>>());
    let (md, ms, mr, dr) = (
        med(mux_runs, |r| r.detect_ms),
        med(mux_runs, |r| r.socket_ms),
        med(mux_runs, |r| r.recover_ms),
        med(direct_runs, |r| r.recover_ms),
    );
    out!(
        "   {:>4}{:>17.1}{:>17.1}{:>22.1}{:>17.1}{:>11.1}x   (qmpmux adds {:+.1} ms at the median)",
        "med",
        md,
        ms,
        mr,
        dr,
        ratio(mr, dr),
        mr - dr
    );
    let runs_json = |runs: &[Reconnect]| {
        runs.iter()
            .map(|r| {
                json!({
                    "kill_to_error_ms": r.detect_ms, "spawn_to_socket_ms": r.socket_ms,
                    "socket_to_success_ms": r.recover_ms, "attempts": r.attempts,
                })
            })
            .collect::<Vec<_>>()
    };
    json!({
        "via_qmpmux": runs_json(mux_runs), "direct": runs_json(direct_runs),
        "median_socket_to_success_ms": mr, "median_direct_socket_to_success_ms": dr,
        "ratio": ratio(mr, dr), "median_kill_to_error_ms": md, "median_spawn_to_socket_ms": ms,
    })
}
