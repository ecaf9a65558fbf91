//! Side-by-side benchmark: QEMU's QMP monitor used directly versus through
//! qmpmux, plus qmpmux's own limits (instant-reply fake upstream, event
//! fan-out, memory per client, reconnect time).
//!
//! `cargo bench --bench compare` (about 1 to 1.5 minutes on 2 cores), or
//! `cargo bench --bench compare -- --quick` (about 15 s); `--only 1,3` runs
//! just those sections. Prints a table and writes the same figures to
//! `target/bench-results.json`. Nothing here asserts on timings.
//!
//! qmpmux is always the release binary (`CARGO_BIN_EXE_qmpmux`) run as a
//! subprocess, as in production: its CPU time and memory are then its own,
//! and the load generator (this process, 2 tokio workers) does not share a
//! runtime with it. QEMU, qmpmux and the floors come from the test harness
//! (`tests/common`): every child gets SIGKILL if this process dies
//! (PR_SET_PDEATHSIG) and is killed on drop (also when unwinding a panic).
//! Children are spawned from the main thread only: the death signal follows
//! the spawning *thread*, and tokio's blocking-pool threads come and go.
//!
//! # Layout
//! - `main.rs`: the plan, the shared set-up (`Rig`), section order, JSON
//! - `clients.rs`: the measuring QMP clients (blocking and async)
//! - `stats.rs`: percentiles, formatting, /proc readings
//! - `floors.rs`: the least any proxy must do, as child processes
//! - one file per section: `sequential.rs` (1), `throughput.rs` (2, 3),
//!   `fanout.rs` (4), `memory.rs` (5), `reconnect.rs` (6), `fairness.rs` (7),
//!   `filters.rs` (8), `nats.rs` (9), `restarts.rs` (10), `oneshot.rs` (11),
//!   `tap.rs` (12)

/// Prints a line to stdout and flushes: the table is the output. Progress
/// goes to stderr ([`progress`]).
macro_rules! out {
    ($($t:tt)*) => {{
        println!($($t)*);
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }};
}

#[path = "../../tests/common/mod.rs"]
mod common;

mod clients;
mod fairness;
mod fanout;
mod filters;
mod floors;
mod memory;
mod nats;
mod oneshot;
mod reconnect;
mod restarts;
mod sequential;
mod stats;
mod tap;
mod throughput;

use common::binary::Binary;
use common::config::config_toml;
use common::fake::{instant, FakeServer};
use common::qemu::{qemu_version, Monitor, Qemu};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Commands in flight per client in the throughput sections.
const DEPTH: usize = 8;

struct Plan {
    quick: bool,
    /// `--only 1,3`: run just these sections (for profiling one path).
    only: Option<Vec<u32>>,
    lat_rounds: usize,
    lat_per_round: usize,
    lat_warmup: usize,
    tput_warmup: Duration,
    tput_window: Duration,
    tput_reps: usize,
    /// (clients, events)
    fanout: [(usize, usize); 3],
    event_gap: Duration,
    mem_clients: usize,
    reconnects: usize,
    /// Rounds of the fairness measurement (section 7).
    fair_rounds: usize,
    /// Extra runs of the largest fan-out, floor and qmpmux alternated, for
    /// a median CPU ratio (section 4).
    fan_pairs: usize,
}

impl Plan {
    fn from_args(args: &[String]) -> Plan {
        let quick = args.iter().any(|a| a == "--quick");
        let only = args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1))
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
        if quick {
            Plan {
                quick,
                only,
                lat_rounds: 4,
                lat_per_round: 150,
                lat_warmup: 100,
                tput_warmup: Duration::from_millis(200),
                tput_window: Duration::from_millis(600),
                tput_reps: 1,
                fanout: [(1, 200), (100, 100), (1000, 30)],
                event_gap: Duration::from_millis(2),
                mem_clients: 10_000,
                reconnects: 3,
                fair_rounds: 3,
                fan_pairs: 0,
            }
        } else {
            Plan {
                quick,
                only,
                lat_rounds: 10,
                lat_per_round: 300,
                lat_warmup: 200,
                tput_warmup: Duration::from_millis(300),
                tput_window: Duration::from_secs(2),
                tput_reps: 3,
                fanout: [(1, 500), (100, 300), (1000, 100)],
                event_gap: Duration::from_millis(2),
                mem_clients: 10_000,
                reconnects: 5,
                fair_rounds: 5,
                fan_pairs: 4,
            }
        }
    }

    fn wants(&self, section: u32) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&section))
    }
}

fn progress(what: &str) {
    eprintln!("  .. {what}");
}

/// What sections 1 to 4, 6 and 7 share: two QEMUs (A used directly, B
/// behind qmpmux), the instant fake upstream, and one qmpmux serving both.
/// Dropping it stops them, qmpmux first.
struct Rig {
    dir: PathBuf,
    daemon: Binary,
    qemu_a: Qemu,
    qemu_b: Qemu,
    /// Fires events from the fake upstream behind `mux_fake`.
    fire: instant::Events,
    /// QEMU A's socket.
    qa: PathBuf,
    /// qmpmux's sockets for QEMU B and for the fake.
    mux_qemu: PathBuf,
    mux_fake: PathBuf,
    /// qmpmux's control socket (for section 11's taps).
    control: PathBuf,
}

impl Rig {
    /// Starts everything; needs a runtime entered (for the fake upstream).
    fn start(dir: &Path) -> Rig {
        let p = |n: &str| dir.join(n);
        let (qa, qb, fake_sock) = (p("qemu-a.sock"), p("qemu-b.sock"), p("fake.sock"));
        let (mux_qemu, mux_fake) = (p("mux-qemu.sock"), p("mux-fake.sock"));
        eprintln!("starting QEMUs, fake upstream and qmpmux in {}", dir.display());
        let qemu_a = Qemu::start_blocking(&[Monitor::Serve(&qa)], &p("qemu-a.log"));
        let qemu_b = Qemu::start_blocking(&[Monitor::Serve(&qb)], &p("qemu-b.log"));
        let fire = FakeServer::bind(&fake_sock).answer_all();
        let control = p("qmpmux.ctl");
        let config = config_toml(&[("qemu", &qb, &mux_qemu), ("fake", &fake_sock, &mux_fake)], 4096);
        let daemon = Binary::start(
            &p("qmpmux.toml"),
            &format!("control_socket = {:?}\n{config}", control.display().to_string()),
            &p("qmpmux.log"),
            &[&mux_qemu, &mux_fake],
            None,
        );
        Rig {
            dir: dir.to_owned(),
            daemon,
            qemu_a,
            qemu_b,
            fire,
            qa,
            mux_qemu,
            mux_fake,
            control,
        }
    }

    /// A file in the run's temporary directory.
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if floors::child_mode(&args) {
        return;
    }
    let plan = Plan::from_args(&args);
    let started = Instant::now();
    let nofile = stats::raise_nofile();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let qemu_ver = qemu_version();
    let commit = git_commit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();

    out!(
        "qmpmux vs direct QEMU QMP ({} run)",
        if plan.quick { "--quick" } else { "full" }
    );
    out!(
        "  qmpmux: the release binary ({}) as a subprocess, log_level=warn, for every section",
        env!("CARGO_BIN_EXE_qmpmux")
    );
    out!("  QEMU: {qemu_ver}, -M none, QMP on a unix socket; direct clients enable OOB, as qmpmux does upstream");
    out!("  load generator: this process, 2 tokio workers; {cpus} CPUs; RLIMIT_NOFILE {nofile}; commit {commit}");
    out!("  CPU columns: % of one core over the measuring window; ratios are qmpmux / baseline");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut rig = Rig::start(dir.path());
    let mut results = json!({
        "meta": {
            "mode": if plan.quick { "quick" } else { "full" },
            "qmpmux": "release binary as a subprocess",
            "qemu": qemu_ver, "cpus": cpus, "commit": commit,
            "depth": DEPTH,
            "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        }
    });

    if plan.wants(1) {
        results["sequential"] = sequential::run(&plan, &rig);
    }
    let mut base = 0.0;
    if plan.wants(2) {
        let (json, direct) = throughput::run_qemu(&plan, &rt, &rig);
        results["throughput_qemu"] = json;
        base = direct;
    }
    if plan.wants(3) {
        results["throughput_fake"] = throughput::run_fake(&plan, &rt, &rig, base);
    }
    if plan.wants(4) {
        results["fanout"] = fanout::run(&plan, &rt, &rig);
    }
    if plan.wants(8) {
        results["filters"] = filters::run(&plan, &rt, &rig);
    }
    if plan.wants(9) {
        results["nats"] = nats::run(&plan, &rt, &rig);
    }
    if plan.wants(11) {
        results["oneshot"] = oneshot::run(&plan, &rig);
    }
    if plan.wants(12) {
        results["tap"] = tap::run(&plan, &rt, &rig);
    }
    // 7 is measured here, on the daemon of 1-4, before 6 restarts its QEMU.
    if plan.wants(7) {
        results["fairness"] = fairness::run(&plan, &rt, &rig);
    }
    // 6 is measured before 5, on the daemon of 1-4, and printed last.
    let reconnects = plan.wants(6).then(|| reconnect::measure(&plan, &mut rig));
    drop(rig);
    if plan.wants(5) {
        results["memory"] = memory::run(&plan, &rt, dir.path(), nofile);
    }
    if let Some(runs) = reconnects {
        results["reconnect"] = reconnect::report(&runs);
    }
    if plan.wants(10) {
        results["restarts"] = restarts::run(&plan, dir.path());
    }

    let total = started.elapsed().as_secs_f64();
    results["meta"]["wall_secs"] = json!(total);
    let path = target_dir().join("bench-results.json");
    let _ = std::fs::create_dir_all(target_dir());
    match std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap_or_default()) {
        Ok(()) => out!("\nwhole run {total:.1} s; results also in {}", path.display()),
        Err(e) => out!("\nwhole run {total:.1} s; cannot write {}: {e}", path.display()),
    }
}
