//! A VM whose thread is blocked is reported as not responding, by `qmpmux
//! status` (text and JSON) and by the metrics, while a VM on another
//! thread is reported as it is; both recover when the thread is free.
//!
//! The thread is blocked from outside, as a bug would block it, with no
//! hook in qmpmux: this test binary's log writer (qmpmux in-process logs
//! through it) holds any VM thread (`qmpmux-vm-N`) that writes a line
//! while the test says so, and a client connecting makes its VM's thread
//! log "client connected".

mod common;

use common::http::{metrics, sample};
use common::{Client, Daemon, Qemu};
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::{Condvar, Mutex};

/// Whether VM threads that log are held, and the wake-up when not.
static FROZEN: Mutex<bool> = Mutex::new(false);
static THAWED: Condvar = Condvar::new();

fn freeze(frozen: bool) {
    *FROZEN.lock().unwrap() = frozen;
    THAWED.notify_all();
}

/// Writes to stderr; holds a VM thread while [`FROZEN`].
struct HoldingWriter;

impl Write for HoldingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("qmpmux-vm-"))
        {
            let mut frozen = FROZEN.lock().unwrap();
            while *frozen {
                frozen = THAWED.wait(frozen).unwrap();
            }
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn status_cli(ctl: &Path, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmpmux"));
    cmd.args(["status", "--control"]).arg(ctl);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_thread_is_blocked_is_reported_not_responding() {
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(|| HoldingWriter)
        .init();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qa = Qemu::start(&p("qa.sock")).await;
    let _qb = Qemu::start(&p("qb.sock")).await;
    let ctl = p("ctl");
    // Two threads: each VM has one to itself.
    let daemon = Daemon::start_with(
        &[("a", &p("qa.sock"), &p("a.sock")), ("b", &p("qb.sock"), &p("b.sock"))],
        |c| {
            c.threads = 2;
            c.control_socket = Some(ctl.clone());
            c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        },
    )
    .await;
    let addr = daemon.metrics_addr.unwrap();
    let mut a = Client::ready(&p("a.sock")).await;
    assert!(a.cmd(r#"{"execute":"query-status"}"#).await["return"].is_object());
    let mut b = Client::ready(&p("b.sock")).await;
    let report = qmpmux::ops::control::query_status(&ctl).await.unwrap();
    for vm in &report.vms {
        assert!(vm.responding && vm.runstate == "running", "{vm:?}");
    }

    // Block a's thread: a new client makes it log.
    freeze(true);
    let _held = tokio::net::UnixStream::connect(p("a.sock")).await.unwrap();
    common::eventually("a's thread to be reported unresponsive", async || {
        let report = qmpmux::ops::control::query_status(&ctl).await.unwrap();
        !report.vms[0].responding
    })
    .await;
    let report = qmpmux::ops::control::query_status(&ctl).await.unwrap();
    let (va, vb) = (&report.vms[0], &report.vms[1]);
    assert_eq!(
        (va.name.as_str(), va.runstate.as_str()),
        ("a", "unresponsive"),
        "{va:?}"
    );
    assert_eq!(
        (vb.name.as_str(), vb.runstate.as_str(), vb.responding),
        ("b", "running", true)
    );
    // b is served meanwhile.
    assert!(b.cmd(r#"{"execute":"query-status"}"#).await["return"].is_object());

    let table = status_cli(&ctl, false);
    let rows: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[1][..2], ["a", "unresponsive"], "{table}");
    assert_eq!(rows[2][..2], ["b", "running"], "{table}");
    assert!(table.contains("NOT RESPONDING: a "), "{table}");
    let json: serde_json::Value = serde_json::from_str(&status_cli(&ctl, true)).unwrap();
    assert_eq!(json["vms"][0]["responding"], false, "{json}");
    assert_eq!(json["vms"][0]["runstate"], "unresponsive", "{json}");
    assert_eq!(json["vms"][1]["responding"], true, "{json}");

    common::eventually("qmpmux_responding to say a is blocked", async || {
        let body = metrics(addr).await;
        sample(&body, "qmpmux_responding{vm=\"a\"}") == Some(0.0)
            && sample(&body, "qmpmux_responding{vm=\"b\"}") == Some(1.0)
    })
    .await;

    // Free again: reported as responding, and serving.
    freeze(false);
    common::eventually("a to be reported responding again", async || {
        let report = qmpmux::ops::control::query_status(&ctl).await.unwrap();
        report.vms[0].responding && report.vms[0].runstate == "running"
    })
    .await;
    assert!(a.cmd(r#"{"execute":"query-status"}"#).await["return"].is_object());
    common::eventually("qmpmux_responding to say a answers again", async || {
        sample(&metrics(addr).await, "qmpmux_responding{vm=\"a\"}") == Some(1.0)
    })
    .await;
    assert!(!status_cli(&ctl, false).contains("NOT RESPONDING"));
    drop((a, b));
    daemon.stop().await;
}
