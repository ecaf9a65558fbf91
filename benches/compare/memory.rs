//! Section 5, memory per idle client: a fresh qmpmux (started with
//! systemd's default fd limit) on a real QEMU, with up to 10,000 negotiated
//! idle clients.

use crate::clients::{is_ok, open, Conn, CAPS, CMD};
use crate::common::binary::Binary;
use crate::common::config::config_toml;
use crate::common::qemu::{Monitor, Qemu};
use crate::common::STEP;
use crate::stats::{fd_count, nofile_of, ratio, rss_kib, thousands};
use crate::{progress, Plan};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;

/// Measures and prints section 5, with its own QEMU and qmpmux in `dir`;
/// `nofile`: this process's fd limit (it caps the client count).
pub fn run(plan: &Plan, rt: &Runtime, dir: &Path, nofile: u64) -> Value {
    let p = |n: &str| dir.join(n);
    let mem_clients = plan.mem_clients.min(nofile.saturating_sub(200) as usize);
    progress(&format!("memory with {mem_clients} idle clients"));
    let (qc, mux_mem) = (p("qemu-c.sock"), p("mux-mem.sock"));
    let qemu_c = Qemu::start_blocking(&[Monitor::Serve(&qc)], &p("qemu-c.log"));
    // Started with a soft fd limit of 1024 (systemd's default): qmpmux must
    // raise its own limit to serve 10,000 clients.
    let mem_daemon = Binary::start(
        &p("qmpmux-mem.toml"),
        &config_toml(&[("mem", &qc, &mux_mem)], 20_000),
        &p("qmpmux-mem.log"),
        &[&mux_mem],
        Some(1024),
    );
    let daemon_nofile = nofile_of(mem_daemon.pid());
    let mem = rt.block_on(memory_clients(&mux_mem, mem_daemon.pid(), mem_clients));
    let qemu_rss = rss_kib(qemu_c.pid());
    let mem_log = std::fs::read_to_string(&mem_daemon.log).unwrap_or_default();
    drop(mem_daemon);
    drop(qemu_c);

    let grown = mem.rss_after.saturating_sub(mem.rss_before);
    let per_client = grown as f64 / mem.clients.max(1) as f64;
    let accept_errors = mem_log.lines().filter(|l| l.contains("cannot accept client")).count();
    print(&mem, daemon_nofile, per_client, qemu_rss, accept_errors);
    json!({
        "clients_wanted": mem.wanted, "clients": mem.clients, "failure": mem.failure,
        "connect_secs": mem.connect_secs,
        "rss_before_kib": mem.rss_before, "rss_after_kib": mem.rss_after, "rss_closed_kib": mem.rss_closed, "rss_second_wave_kib": mem.rss_second,
        "kib_per_client": per_client, "daemon_fds": mem.fds_after, "daemon_nofile_soft": daemon_nofile,
        "qemu_rss_kib": qemu_rss, "command_answered": mem.still_works, "accept_errors_logged": accept_errors,
    })
}

fn print(mem: &MemResult, daemon_nofile: Option<u64>, per_client: f64, qemu_rss: u64, accept_errors: usize) {
    let grown = mem.rss_after.saturating_sub(mem.rss_before);
    out!("\n5. Memory per idle negotiated client (fresh qmpmux on a real QEMU, [client] max_clients = 20000)");
    out!(
        "   qmpmux started with RLIMIT_NOFILE soft 1024, runs with {} (its own raise); daemon fds with clients: {}",
        daemon_nofile.map_or("?".into(), |v| v.to_string()),
        mem.fds_after
    );
    out!(
        "   {} of {} clients connected and negotiated in {:.2} s ({} clients/s); a command on one still answered: {}",
        mem.clients,
        mem.wanted,
        mem.connect_secs,
        thousands(mem.clients as f64 / mem.connect_secs.max(1e-9)),
        if mem.still_works { "yes" } else { "NO" }
    );
    if let Some(e) = &mem.failure {
        out!("   !! connecting stopped at the first failure: {e}");
    }
    out!(
        "   qmpmux VmRSS: {} KiB before, {} KiB with the clients, {} KiB after they all closed, {} KiB with a second wave",
        thousands(mem.rss_before as f64),
        thousands(mem.rss_after as f64),
        thousands(mem.rss_closed as f64),
        thousands(mem.rss_second as f64)
    );
    out!(
        "   => {:.2} KiB per idle client; all {} together: {:.2}x the RSS of the QEMU they share ({} KiB)",
        per_client,
        mem.clients,
        ratio(grown as f64, qemu_rss as f64),
        thousands(qemu_rss as f64)
    );
    if accept_errors > 0 {
        out!("   !! qmpmux logged {accept_errors} 'cannot accept client' errors (fd limit?)");
    }
}

struct MemResult {
    wanted: usize,
    clients: usize,
    failure: Option<String>,
    connect_secs: f64,
    rss_before: u64,
    rss_after: u64,
    rss_closed: u64,
    /// With a second wave of as many clients (allocator reuse vs growth).
    rss_second: u64,
    fds_after: usize,
    still_works: bool,
}

/// Opens up to `n` negotiated clients, `parallel` handshakes at a time; stops
/// at the first failure (a daemon out of fds would otherwise make every
/// remaining client wait for its timeout).
async fn open_until_failure(path: &Path, n: usize, parallel: usize) -> (Vec<Conn>, Option<String>) {
    let sem = Arc::new(Semaphore::new(parallel));
    let failed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (sem, failed, path) = (sem.clone(), failed.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            if failed.load(Ordering::Relaxed) {
                return None;
            }
            let r = open(&path, CAPS).await;
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            Some(r)
        }));
    }
    let (mut conns, mut first_error) = (Vec::with_capacity(n), None);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("open task") {
            Some(Ok(c)) => conns.push(c),
            Some(Err(e)) => {
                first_error.get_or_insert_with(|| format!("client #{i}: {e}"));
            }
            None => {}
        }
    }
    (conns, first_error)
}

async fn memory_clients(listen: &Path, pid: u32, n: usize) -> MemResult {
    // Baseline after one full client life (a command forwarded), so that the
    // session's buffers and the runtime's first allocations are counted.
    {
        let mut c = open(listen, CAPS).await.expect("memory probe client");
        c.writer.write_all(CMD).await.expect("probe send");
        let mut line = String::new();
        c.reader.read_line(&mut line).await.expect("probe reply");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);
    let t = Instant::now();
    let (mut conns, failure) = open_until_failure(listen, n, 256).await;
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid);
    let fds_after = fd_count(pid);
    // One of them still gets answers.
    let mut still_works = false;
    let mid = conns.len() / 2;
    if let Some(c) = conns.get_mut(mid) {
        let mut line = String::new();
        still_works = c.writer.write_all(CMD).await.is_ok()
            && matches!(
                tokio::time::timeout(STEP, c.reader.read_line(&mut line)).await,
                Ok(Ok(_))
            )
            && is_ok(&line);
    }
    let clients = conns.len();
    drop(conns);
    // qmpmux looks at its client count every second and hands freed memory
    // back after a large fall: give it time for that.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rss_closed = rss_kib(pid);
    let (second, _) = open_until_failure(listen, clients, 256).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_second = rss_kib(pid);
    drop(second);
    MemResult {
        wanted: n,
        clients,
        failure,
        connect_secs,
        rss_before,
        rss_after,
        rss_closed,
        rss_second,
        fds_after,
        still_works,
    }
}
