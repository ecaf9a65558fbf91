//! Section 11, one command from a shell: `qmpmux exec VM query-status`
//! (a process: it asks the control socket where the VM is, connects,
//! negotiates, runs the command) side by side with what people use
//! without it, a one-shot `socat` (`echo ... | socat - UNIX-CONNECT:...`:
//! QEMU and qmpmux both close when the client's input ends, so socat exits
//! at once, without its half-close timeout), and with the floors: the same connect-negotiate-command-close
//! from this process, on QEMU directly (QEMU's own time) and through
//! qmpmux, and qmpmux's binary starting and exiting (`--version`). The
//! goal: `exec` within 20 ms of QEMU's own time.

use crate::clients::{SyncClient, CAPS};
use crate::common::binary::{command, Binary};
use crate::common::config::config_toml;
use crate::common::qemu::{Monitor, Qemu};
use crate::stats::{ms, pct};
use crate::{progress, Plan, Rig};
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Wall time of `f`, `n` times, sorted (ns).
fn times(n: usize, mut f: impl FnMut()) -> Vec<u64> {
    let mut t: Vec<u64> = (0..n)
        .map(|_| {
            let at = Instant::now();
            f();
            at.elapsed().as_nanos() as u64
        })
        .collect();
    t.sort_unstable();
    t
}

fn one_client(path: &Path) {
    let mut c = SyncClient::open(path, CAPS).expect("connect");
    assert!(c.cmd().expect("command"), "query-status failed");
}

fn run_ok(cmd: &mut Command, input: Option<&[u8]>) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().expect("spawn");
    if let Some(bytes) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(bytes).unwrap();
    }
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("running"),
        "{cmd:?}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn run(plan: &Plan, rig: &Rig) -> Value {
    progress("11: one command from a shell");
    let n = if plan.quick { 20 } else { 100 };
    let socat_n = if plan.quick { 3 } else { 10 };
    let qc = rig.path("qemu-c.sock");
    let listen = rig.path("oneshot.sock");
    let ctl = rig.path("oneshot.ctl");
    let _qemu = Qemu::start_blocking(&[Monitor::Serve(&qc)], &rig.path("qemu-c.log"));
    let toml = format!(
        "control_socket = \"{}\"\n{}",
        ctl.display(),
        config_toml(&[("vm", &qc, &listen)], 64)
    );
    let _daemon = Binary::start(
        &rig.path("oneshot.toml"),
        &toml,
        &rig.path("oneshot.log"),
        &[&listen],
        None,
    );
    let input = b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-status\"}\n";
    let socat = |path: &Path| {
        let mut cmd = Command::new("socat");
        cmd.arg("-").arg(format!("UNIX-CONNECT:{}", path.display()));
        cmd
    };
    // Warm up each path once.
    one_client(&rig.qa);
    one_client(&listen);
    let exec = || {
        let mut cmd = command();
        cmd.args(["exec", "--control"]).arg(&ctl).args(["vm", "query-status"]);
        cmd
    };
    run_ok(&mut exec(), None);

    let rows: Vec<(&str, Vec<u64>)> = vec![
        (
            "client in this process, QEMU directly (QEMU's own time)",
            times(n, || one_client(&rig.qa)),
        ),
        (
            "client in this process, through qmpmux",
            times(n, || one_client(&listen)),
        ),
        (
            "qmpmux --version (the binary starting and exiting)",
            times(n, || {
                let out = command().arg("--version").output().expect("spawn");
                assert!(out.status.success());
            }),
        ),
        ("qmpmux exec vm query-status", times(n, || run_ok(&mut exec(), None))),
        (
            "echo ... | socat - UNIX-CONNECT: (QEMU directly)",
            times(socat_n, || run_ok(&mut socat(&rig.qa), Some(input))),
        ),
        (
            "echo ... | socat - UNIX-CONNECT: (through qmpmux)",
            times(socat_n, || run_ok(&mut socat(&listen), Some(input))),
        ),
    ];
    out!("\n11. One command from a shell: wall time per command, connect to exit ({n} runs; socat {socat_n})");
    out!("  {:<58} {:>9} {:>9}", "", "p50 ms", "p95 ms");
    let mut json_rows = serde_json::Map::new();
    for (name, t) in &rows {
        let (p50, p95) = (ms(pct(t, 50.0)), ms(pct(t, 95.0)));
        out!("  {name:<58} {p50:>9.2} {p95:>9.2}");
        json_rows.insert(
            (*name).to_owned(),
            json!({"p50_ms": p50, "p95_ms": p95, "runs": t.len()}),
        );
    }
    let own = ms(pct(&rows[0].1, 50.0));
    let exec50 = ms(pct(&rows[3].1, 50.0));
    let socat50 = ms(pct(&rows[5].1, 50.0));
    let start50 = ms(pct(&rows[2].1, 50.0));
    out!(
        "  qmpmux exec: {:.2} ms beyond QEMU's own time (p50; goal: within 20 ms; the binary alone starts and exits in {start50:.2} ms); {:.2}x the one-shot socat's time through qmpmux",
        exec50 - own,
        exec50 / socat50
    );
    json!({
        "rows": json_rows,
        "exec_beyond_qemu_ms_p50": exec50 - own,
        "exec_over_socat": exec50 / socat50,
    })
}
