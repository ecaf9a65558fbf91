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
