//! Actions against real QEMU: `[[vm.on_event]]` runs a program when an
//! event happens, `[[vm.on_connect]]` sends commands each time qmpmux
//! (re)connects, before clients' commands.

mod common;

use common::logs::{logged, logs};
use common::{Client, Daemon, Qemu};
use qmpmux::config::{OnConnect, OnEvent};
use qmpmux::policy::Glob;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A script that writes its arguments and environment to `out`.
fn recorder(dir: &Path, out: &Path) -> PathBuf {
    let script = dir.join("record.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" \"$QMPMUX_VM\" \"$QMPMUX_EVENT\" \"$QMPMUX_SEQ\" \"$QMPMUX_EVENT_JSON\" > {0}.tmp\necho recorded\nmv {0}.tmp {0}\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

async fn wait_for_file(path: &Path) -> String {
    for _ in 0..500 {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} never appeared", path.display());
}

async fn wait_logged(what: &str) {
    for _ in 0..500 {
        if logged(what) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never logged: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_runs_on_stop_with_the_event_in_its_environment() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (up, sock, out) = (
        dir.path().join("q.sock"),
        dir.path().join("vm.sock"),
        dir.path().join("out"),
    );
    let script = recorder(dir.path(), &out);
    let sleeper = dir.path().join("sleep.sh");
    std::fs::write(&sleeper, "#!/bin/sh\nsleep 30\n").unwrap();
    std::fs::set_permissions(&sleeper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.vms[0].on_event = vec![
            OnEvent {
                event: Glob::new("STOP"),
                run: vec![
                    script.display().to_string(),
                    "--vm".into(),
                    "{vm}".into(),
                    "{event}".into(),
                ],
                timeout: Duration::from_secs(10),
            },
            OnEvent {
                event: Glob::new("RESUME"),
                run: vec![sleeper.display().to_string()],
                timeout: Duration::from_millis(200),
            },
        ];
    })
    .await;
    let mut c = Client::ready(&sock).await;
    let sub = c
        .cmd(r#"{"execute":"__org.qmpmux_subscribe","arguments":{"sequence":true}}"#)
        .await;
    let next = sub["return"]["next"].as_u64().unwrap();
    // QEMU sends STOP before its reply to `stop`.
    c.send(r#"{"execute":"stop"}"#).await;
    let stop = c.event("STOP").await;
    let r = c.reply().await;
    assert!(r.get("return").is_some(), "{r}");
    let text = wait_for_file(&out).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "--vm web01 STOP");
    assert_eq!(lines[1], "web01");
    assert_eq!(lines[2], "STOP");
    assert_eq!(lines[3], next.to_string());
    let json: serde_json::Value = serde_json::from_str(lines[4]).unwrap();
    assert_eq!(json["event"], "STOP");
    assert_eq!(json["timestamp"], stop["timestamp"]);
    wait_logged("on_event: program finished").await;
    assert!(logged("recorded"), "the program's output is logged");
    // A program past its time is killed, and the session never waited.
    let r = c.cmd(r#"{"execute":"cont"}"#).await;
    assert!(r.get("return").is_some(), "{r}");
    wait_logged("on_event: program timed out; killed").await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_connect_commands_run_before_clients_after_every_qemu_restart() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let mut qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| {
        c.vms[0].on_connect = vec![
            // A failure is logged, and the rest still run.
            OnConnect {
                execute: "no-such-command".into(),
                arguments: None,
            },
            OnConnect {
                execute: "stop".into(),
                arguments: Some("{}".into()),
            },
        ];
    })
    .await;
    let mut c = Client::ready(&sock).await;
    // QEMU starts running; it is paused because qmpmux's `stop` ran first.
    let r = c.cmd(r#"{"execute":"query-status"}"#).await;
    assert_eq!(r["return"]["status"], "paused", "{r}");
    assert!(logged("on_connect command failed"));
    c.cmd(r#"{"execute":"cont"}"#).await;

    qemu.kill9();
    let _qemu2 = Qemu::start_watched(&up);
    // The first command that reaches the new QEMU comes after qmpmux's.
    loop {
        let r = c.cmd(r#"{"execute":"query-status"}"#).await;
        if let Some(status) = r["return"]["status"].as_str() {
            assert_eq!(status, "paused", "{r}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.stop().await;
}

/// Processes still running (zombies aside) whose command line or
/// environment holds one of `marks`, read from /proc: a minimal Debian has
/// no procps, so no `ps` or `pgrep`.
fn running_with(marks: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = entry.path();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        if matches!(state, None | Some(Some('Z'))) {
            continue;
        }
        let read =
            |f: &str| String::from_utf8_lossy(&std::fs::read(dir.join(f)).unwrap_or_default()).replace('\0', " ");
        let (cmdline, environ) = (read("cmdline"), read("environ"));
        if marks.iter().any(|m| cmdline.contains(m) || environ.contains(m)) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Waits until no process is `program` or was started by it (killed
/// processes take a moment to go).
async fn none_left(program: &Path) {
    let marks = [program.display().to_string(), mark(program.parent().unwrap())];
    let deadline = std::time::Instant::now() + common::STEP;
    loop {
        let left = running_with(&marks);
        if left.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "processes left behind: {left:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Log lines that hold every one of `parts`.
fn log_lines_with(parts: &[&str]) -> usize {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines().filter(|l| parts.iter().all(|p| l.contains(p))).count()
}

/// What marks the processes a script of [`marked_script`] starts.
fn mark(dir: &Path) -> String {
    format!("QMPMUX_TEST_MARK={}", dir.display())
}

/// A shell script `name` in `dir` that marks what it starts (through the
/// environment, which children inherit), then runs `body`.
fn marked_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let script = dir.join(name);
    std::fs::write(&script, format!("#!/bin/sh\nexport '{}'\n{body}", mark(dir))).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// qmpmux serving real QEMU as `vm`, running `program` on every STOP and
/// RESUME with time limit `timeout`; a negotiated client.
async fn with_program(dir: &Path, program: &Path, timeout: Duration) -> (common::Qemu, Daemon, Client) {
    let (up, sock) = (dir.join("q.sock"), dir.join("vm.sock"));
    let qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| {
        c.vms[0].on_event = ["STOP", "RESUME"]
            .into_iter()
            .map(|e| OnEvent {
                event: Glob::new(e),
                run: vec![program.display().to_string()],
                timeout,
            })
            .collect();
    })
    .await;
    let client = Client::ready(&sock).await;
    (qemu, daemon, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_past_its_time_is_killed_with_what_it_started() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    // A child in the background, then the program itself outlives its limit.
    let program = marked_script(dir.path(), "slow.sh", "sleep 300 &\nsleep 300\n");
    let (_qemu, daemon, mut c) = with_program(dir.path(), &program, Duration::from_millis(300)).await;
    // Six programs, more than run at once.
    c.stop_cont(3).await;
    let done = [program.to_str().unwrap(), "on_event: program timed out; killed"];
    common::eventually("six programs timed out", async || log_lines_with(&done) == 6).await;
    // Neither the programs nor their children are left.
    none_left(&program).await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_exits_frees_its_turn_though_a_child_holds_its_output() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    // Exits at once; its child keeps the program's stdout open. The limit
    // is far beyond the test's: the turn must come back on exit.
    let program = marked_script(dir.path(), "forks.sh", "sleep 300 &\necho started\n");
    let (_qemu, daemon, mut c) = with_program(dir.path(), &program, Duration::from_secs(120)).await;
    let start = std::time::Instant::now();
    // Six programs, more than run at once: the last two need freed turns.
    c.stop_cont(3).await;
    let done = [
        program.to_str().unwrap(),
        "on_event: program finished",
        "stdout=started",
    ];
    common::eventually("six programs finished", async || log_lines_with(&done) == 6).await;
    let took = start.elapsed();
    none_left(&program).await;
    eprintln!("six programs whose children held their output: all finished in {took:?}");
    daemon.stop().await;
}
