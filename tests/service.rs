//! Running as a service: live reload, clean stop, socket permissions, and
//! the binary's own signal handling and CLI.

mod common;

use common::{die_with_parent, Client, Daemon, Qemu};
use qmpmux::config::VmConfig;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn vm(name: &str, up: &Path, listen: &Path) -> VmConfig {
    qmpmux::config::VmConfig::new(name, up, listen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_restarts_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (_qa, _qb, _qc) = (
        Qemu::start(&p("a.q")).await,
        Qemu::start(&p("b.q")).await,
        Qemu::start(&p("c.q")).await,
    );
    let daemon = Daemon::start(&[("a", &p("a.q"), &p("a.sock")), ("b", &p("b.q"), &p("b.sock"))]).await;
    let mut a = Client::ready(&p("a.sock")).await;
    let mut b = Client::ready(&p("b.sock")).await;

    // b removed, c added, a untouched.
    let mut config = daemon.config.clone();
    config.vms = vec![vm("a", &p("a.q"), &p("a.sock")), vm("c", &p("c.q"), &p("c.sock"))];
    let summary = daemon.reload(config.clone()).await.unwrap();
    assert_eq!(summary.added, vec!["c"]);
    assert_eq!(summary.removed, vec!["b"]);
    assert_eq!(summary.unchanged, vec!["a"]);
    b.expect_eof().await;
    assert!(!p("b.sock").exists(), "removed VM's socket left behind");
    // The same connection to a was not disturbed at all.
    assert_eq!(a.cmd(r#"{"execute":"query-status","id":1}"#).await["id"], 1);
    Client::ready(&p("c.sock")).await;

    // a re-pointed to another QEMU (b's): a restarts, its clients reconnect.
    config.vms[0] = vm("a", &p("b.q"), &p("a.sock"));
    let summary = daemon.reload(config.clone()).await.unwrap();
    assert_eq!(summary.restarted, vec!["a"]);
    a.expect_eof().await;
    let mut a2 = Client::ready(&p("a.sock")).await;
    assert_eq!(a2.cmd(r#"{"execute":"query-status","id":2}"#).await["id"], 2);

    // A listen path that cannot be used is refused and nothing changes.
    let blocker = p("blocker");
    std::fs::write(&blocker, "not a socket").unwrap();
    let mut bad = config.clone();
    bad.vms.push(vm("d", &p("c.q"), &blocker));
    assert!(daemon.reload(bad).await.is_err());
    assert_eq!(a2.cmd(r#"{"execute":"query-status","id":3}"#).await["id"], 3);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_stop_answers_commands_in_flight_then_closes() {
    let (_dir, fake, daemon, sock) = common::fake::vm().await;
    let mut conn = fake.accept_ready().await;
    let mut c = Client::ready(&sock).await;
    c.send(r#"{"execute":"slow","id":"in-flight"}"#).await;
    let req = conn.read().await.unwrap();
    daemon.shutdown.cancel();
    // No new clients once stopping.
    common::eventually("the listen socket to go away", async || {
        tokio::net::UnixStream::connect(&sock).await.is_err()
    })
    .await;
    // The command in flight still gets its reply, then the connection ends.
    conn.reply(&req, json!("done")).await;
    assert_eq!(c.reply().await, json!({"return": "done", "id": "in-flight"}));
    c.expect_eof().await;
    daemon.stop().await;
    assert!(!sock.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_get_the_configured_mode_and_owner() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("deep/er/vm.sock"));
    let gid = nix::unistd::getgid().as_raw();
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| {
        c.socket.mode = 0o600;
        c.socket.gid = Some(gid);
    })
    .await;
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), gid);
    daemon.stop().await;
    // Default: 0660.
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o660);
    daemon.stop().await;
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn qmpmux() -> Command {
    common::binary::command()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_on_sighup_keeps_running_on_bad_config_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let config = p("qmpmux.toml");
    let write = |vms: &[&str]| {
        let mut text = format!("control_socket = \"{}\"\n", p("ctl").display());
        for n in vms {
            text.push_str(&format!(
                "[[vm]]\nname = \"{n}\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
                p("q.sock").display(),
                p(&format!("{n}.sock")).display()
            ));
        }
        std::fs::write(&config, text).unwrap();
    };
    write(&["one"]);
    let mut child = qmpmux()
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    common::eventually("qmpmux to serve", async || {
        tokio::net::UnixStream::connect(p("one.sock")).await.is_ok()
    })
    .await;
    let mut one = Client::ready(&p("one.sock")).await;

    write(&["one", "two"]);
    signal(pid, libc::SIGHUP);
    common::eventually("the added VM to serve", async || {
        tokio::net::UnixStream::connect(p("two.sock")).await.is_ok()
    })
    .await;

    std::fs::write(&config, "this is = not [valid toml").unwrap();
    signal(pid, libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(child.try_wait().unwrap().is_none(), "a bad config must not stop qmpmux");
    assert_eq!(one.cmd(r#"{"execute":"query-status","id":1}"#).await["id"], 1);
    // The rejected file is the last reload, for `qmpmux status`.
    let report = qmpmux::ops::control::query_status(&p("ctl")).await.unwrap();
    let last = report.last_reload.unwrap();
    assert!(
        !last.ok && last.error.as_deref().unwrap().contains("qmpmux.toml"),
        "{last:?}"
    );

    signal(pid, libc::SIGTERM);
    one.expect_eof().await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        !p("one.sock").exists() && !p("two.sock").exists() && !p("ctl").exists(),
        "socket files left behind"
    );
}

/// `qmpmux reload` (the unit's `ExecReload=`): the daemon judges the file
/// and the command prints its verdict, with an exit status for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_command_prints_what_changed_or_the_daemon_s_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    // QEMU serves one monitor client at a time: a QEMU per VM.
    let _qemus = [Qemu::start(&p("one.qmp")).await, Qemu::start(&p("two.qmp")).await];
    let config = p("qmpmux.toml");
    let head = format!("control_socket = \"{}\"\n", p("ctl").display());
    let write = |vms: &[&str]| {
        let mut text = head.clone();
        for n in vms {
            text.push_str(&format!(
                "[[vm]]\nname = \"{n}\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
                p(&format!("{n}.qmp")).display(),
                p(&format!("{n}.sock")).display()
            ));
        }
        std::fs::write(&config, text).unwrap();
    };
    let reload = |extra: &[&str]| {
        let out = qmpmux()
            .arg("reload")
            .arg("--config")
            .arg(&config)
            .args(extra)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    write(&["one"]);
    let mut child = qmpmux()
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    common::eventually("qmpmux to serve", async || {
        tokio::net::UnixStream::connect(p("one.sock")).await.is_ok()
    })
    .await;

    write(&["one", "two"]);
    let (code, out, err) = reload(&[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(out, "reloaded; added: two; 1 VM(s) unchanged\n", "{err}");
    // Done when the command returns: no waiting.
    let mut two = Client::ready(&p("two.sock")).await;

    // Valid TOML, invalid configuration: rejected by the daemon (the
    // control socket is found in the file all the same), exit status 2.
    std::fs::write(&config, format!("{head}[[vm]]\nname = \"bad\"\n")).unwrap();
    let (code, out, err) = reload(&[]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.starts_with("qmpmux: configuration rejected; the running one is kept: ") && err.contains("qmpmux.toml"),
        "{err}"
    );
    let report = qmpmux::ops::control::query_status(&p("ctl")).await.unwrap();
    assert!(!report.last_reload.as_ref().unwrap().ok, "{report:?}");
    assert_eq!(two.cmd(r#"{"execute":"query-status","id":1}"#).await["id"], 1);

    // Not TOML at all: --control says where the daemon is.
    std::fs::write(&config, "this is = not [valid toml").unwrap();
    let ctl = p("ctl").display().to_string();
    let (code, _, err) = reload(&["--control", &ctl]);
    assert_eq!(code, Some(2), "{err}");

    // No control socket there: exit status 3, or with --pid, SIGHUP (sent
    // by qmpmux itself: no kill(1) needed).
    write(&["one"]);
    let nowhere = p("nowhere.ctl").display().to_string();
    let (code, _, err) = reload(&["--control", &nowhere]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("cannot reach qmpmux's control socket"), "{err}");
    let (code, out, err) = reload(&["--control", &nowhere, "--pid", &pid.to_string()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&format!("sent SIGHUP to pid {pid}")), "{out}");
    common::eventually("the SIGHUP reload to remove VM two", async || !p("two.sock").exists()).await;
    two.expect_eof().await;

    signal(pid, libc::SIGTERM);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// What systemd hears on `NOTIFY_SOCKET` with `Type=notify` and
/// `WatchdogSec=`: ready once serving, watchdog pings while the VM threads
/// answer, reloading/ready around SIGHUP, stopping on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tells_systemd_ready_watchdog_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let config = p("qmpmux.toml");
    std::fs::write(
        &config,
        format!(
            "control_socket = \"\"\n[[vm]]\nname = \"one\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
            p("q.sock").display(),
            p("one.sock").display()
        ),
    )
    .unwrap();
    let systemd = tokio::net::UnixDatagram::bind(p("notify.sock")).unwrap();
    // systemd names the pid the watchdog is for: the exec'd shell's own.
    let mut child = Command::new("sh");
    die_with_parent(&mut child);
    let mut child = child
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_qmpmux"))
        .arg(&config)
        .env("NOTIFY_SOCKET", p("notify.sock"))
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    // The file descriptor store: what qmpmux keeps there, by name (the fds
    // themselves are dropped here).
    let stored = std::sync::Mutex::new(std::collections::BTreeSet::<String>::new());
    let next = async || loop {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), systemd.recv(&mut buf))
            .await
            .expect("no notification from qmpmux within 10 s")
            .unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
        let name = msg
            .lines()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or_default()
            .to_string();
        if msg.starts_with("FDSTORE=1") {
            stored.lock().unwrap().insert(name);
        } else if msg.starts_with("FDSTOREREMOVE=1") {
            stored.lock().unwrap().remove(&name);
        } else {
            return msg;
        }
    };
    // Skips watchdog pings while waiting for `what`.
    let expect = async |what: &str| loop {
        let msg = next().await;
        if msg.lines().any(|l| l == what) {
            return msg;
        }
        assert_eq!(msg, "WATCHDOG=1", "waiting for {what}");
    };
    let ready = expect("READY=1").await;
    assert!(ready.contains("STATUS=serving"), "{ready}");
    assert!(tokio::net::UnixStream::connect(p("one.sock")).await.is_ok());
    // Pings come every half interval (200 ms) for as long as qmpmux runs.
    for _ in 0..3 {
        assert_eq!(next().await, "WATCHDOG=1");
    }
    signal(pid, libc::SIGHUP);
    expect("RELOADING=1").await;
    expect("READY=1").await;
    assert_eq!(next().await, "WATCHDOG=1");
    // Kept for a restart: the listening socket, the connection to QEMU,
    // the event journal (sent from a thread of qmpmux's own: not
    // necessarily before READY=1).
    let names = stored.lock().unwrap().clone();
    assert!(
        names.iter().any(|n| n.starts_with("listen.0.") && n.ends_with(".one")),
        "{names:?}"
    );
    assert!(names.contains("qemu.one") && names.contains("journal.one"), "{names:?}");
    signal(pid, libc::SIGTERM);
    expect("STOPPING=1").await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    // Under systemd a stop may be a restart: the state for the next
    // process went to the store too (systemd drops it all on a stop).
    let mut buf = [0u8; 512];
    let mut state = false;
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), systemd.recv(&mut buf)).await {
        state |= String::from_utf8_lossy(&buf[..n]).contains("FDSTORE=1\nFDNAME=state");
    }
    assert!(state, "no handover state stored at the stop");
}

#[test]
fn check_config_reports_ok_or_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[[vm]]\nname = \"web01\"\nupstream = \"/q.sock\"\nlisten = \"/l.sock\"\n",
    )
    .unwrap();
    let out = qmpmux()
        .arg("--check-config")
        .arg("--config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("web01: /q.sock -> /l.sock"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[vm]]\nname = \"web01\"\nupstream = \"/q.sock\"\nlisten = \"/l.sock\"\nlsten = 1\n",
    )
    .unwrap();
    let out = qmpmux()
        .arg("--check-config")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 5") && err.contains("lsten"),
        "{err}"
    );

    let out = qmpmux().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("qmpmux "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_mode_qemu_dials_in_and_comes_back_after_a_qmpmux_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("dial.sock"), dir.path().join("vm.sock"));
    let accept = |c: &mut qmpmux::config::Config| c.vms[0].upstream_mode = qmpmux::config::UpstreamMode::Accept;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], accept).await;
    let _qemu = Qemu::start_dialing(&up).await;
    let mut c = Client::ready(&sock).await;
    assert!(c.cmd(r#"{"execute":"query-status","id":1}"#).await["return"].is_object());

    // qmpmux restarts; QEMU dials the new one by itself.
    daemon.stop().await;
    c.expect_eof().await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], accept).await;
    let mut c = Client::ready(&sock).await;
    common::eventually("QEMU to dial in again", async || {
        c.cmd(r#"{"execute":"query-status","id":2}"#).await["return"].is_object()
    })
    .await;
    c.send(r#"{"execute":"stop"}"#).await;
    c.event("STOP").await;
    daemon.stop().await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_report_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock, ctl) = (
        dir.path().join("q.sock"),
        dir.path().join("vm.sock"),
        dir.path().join("ctl"),
    );
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.control_socket = Some(ctl.clone());
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.client.max_depth = 16;
        c.vms[0].main.policy.deny = vec![qmpmux::policy::Glob::new("system_powerdown")];
    })
    .await;
    let mut c = Client::ready(&sock).await;
    // Refused by the policy: neither forwarded nor counted as a command.
    let refused = c.cmd(r#"{"execute":"system_powerdown","id":"no"}"#).await;
    assert_eq!(refused["id"], "no", "{refused}");
    assert!(refused["error"].is_object(), "{refused}");
    // Disconnected by qmpmux: nested too deep.
    let mut deep = Client::ready(&sock).await;
    deep.send(&"[".repeat(100)).await;
    deep.recv().await;
    deep.expect_eof().await;
    for i in 0..5 {
        assert_eq!(
            c.cmd(&format!(r#"{{"execute":"query-status","id":{i}}}"#)).await["id"],
            i
        );
    }
    assert!(c.cmd(r#"{"execute":"no-such-command"}"#).await["error"].is_object());
    c.send(r#"{"execute":"stop"}"#).await;
    c.event("STOP").await;
    // QEMU sends the event before the reply: nothing is in flight once the
    // reply is in.
    assert_eq!(c.reply().await["return"], serde_json::json!({}));

    let report = qmpmux::ops::control::query_status(&ctl).await.unwrap();
    let vm = &report.vms[0];
    assert_eq!((vm.name.as_str(), vm.runstate.as_str()), ("web01", "running"));
    assert_eq!((vm.clients, vm.in_flight, vm.connections), (1, 0, 1));
    assert_eq!((vm.commands, vm.errors, vm.events), (7, 1, 1));
    assert!(vm.qemu_version.as_ref().unwrap()["qemu"]["major"].is_u64(), "{vm:?}");
    assert_eq!(report.version, env!("CARGO_PKG_VERSION"));
    assert!(
        report.uptime_seconds > 0.0 && report.uptime_seconds < 60.0,
        "{report:?}"
    );
    assert!(report.last_reload.is_none());

    // `--json`: the same, qemu_version an object.
    let out = qmpmux()
        .args(["status", "--json", "--control"])
        .arg(&ctl)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["vms"][0]["qemu_version"]["qemu"]["major"].is_u64(), "{json}");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert!(json["uptime_seconds"].as_f64().unwrap() > 0.0, "{json}");

    // The CLI prints the same, as a table.
    let out = qmpmux().args(["status", "--control"]).arg(&ctl).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.lines().nth(1).unwrap().split_whitespace().collect::<Vec<_>>()[..3] == ["web01", "running", "1"],
        "{table}"
    );

    let body = http_get(daemon.metrics_addr.unwrap(), "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for want in [
        "qmpmux_commands_total{vm=\"web01\"} 7",
        "qmpmux_errors_total{vm=\"web01\"} 1",
        "qmpmux_events_total{vm=\"web01\"} 1",
        "qmpmux_clients{vm=\"web01\"} 1",
        "qmpmux_upstream_connections_total{vm=\"web01\"} 1",
        "qmpmux_runstate{vm=\"web01\",state=\"running\"} 1",
        "qmpmux_runstate{vm=\"web01\",state=\"idle\"} 0",
        "qmpmux_command_latency_seconds_count{vm=\"web01\"} 7",
        "qmpmux_queue_depth{vm=\"web01\"} 0",
        "qmpmux_policy_refusals_total{vm=\"web01\"} 1",
        "qmpmux_clients_disconnected_total{vm=\"web01\",reason=\"input_limit\"} 1",
        "qmpmux_clients_disconnected_total{vm=\"web01\",reason=\"slow_reader\"} 0",
        &format!("qmpmux_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        "qmpmux_config_last_reload_successful 1",
        "process_open_fds ",
        "process_resident_memory_bytes ",
        "process_start_time_seconds ",
    ] {
        assert!(body.contains(want), "missing {want:?} in\n{body}");
    }

    // A failed reload (a socket path taken by a file), then a good one.
    std::fs::write(dir.path().join("file"), "").unwrap();
    let mut bad = daemon.config.clone();
    bad.vms.push(self::vm("bad", &up, &dir.path().join("file")));
    assert!(daemon.reload(bad).await.is_err());
    let report = qmpmux::ops::control::query_status(&ctl).await.unwrap();
    let last = report.last_reload.as_ref().unwrap();
    assert!(
        !last.ok && last.error.as_deref().unwrap().contains("not a socket"),
        "{last:?}"
    );
    let body = http_get(daemon.metrics_addr.unwrap(), "/metrics").await;
    for want in [
        "qmpmux_config_last_reload_successful 0",
        "qmpmux_config_reloads_total{result=\"failure\"} 1",
    ] {
        assert!(body.contains(want), "missing {want:?} in\n{body}");
    }
    let out = qmpmux().args(["status", "--control"]).arg(&ctl).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("last reload: FAILED") && table.contains("not a socket"),
        "{table}"
    );
    daemon.reload(daemon.config.clone()).await.unwrap();
    let report = qmpmux::ops::control::query_status(&ctl).await.unwrap();
    let last = report.last_reload.as_ref().unwrap();
    assert!(last.ok && last.error.is_none(), "{last:?}");
    assert!(last.at >= report.started_at, "{report:?}");
    let body = http_get(daemon.metrics_addr.unwrap(), "/metrics").await;
    assert!(body.contains("qmpmux_config_last_reload_successful 1"), "{body}");
    assert!(
        body.contains("qmpmux_config_reloads_total{result=\"success\"} 1"),
        "{body}"
    );
    drop(c);
    daemon.stop().await;
    assert!(!ctl.exists(), "control socket left behind");
}

/// When qmpmux cannot watch for QEMU's socket directory (in real life most
/// likely `fs.inotify.max_user_instances` used up by many VMs down at once;
/// here a path through a regular file, which inotify refuses the same way
/// and which, unlike that limit, a test can set up for one process), it
/// says so once, not on every retry, and keeps retrying on its timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_warns_once_when_it_cannot_watch_for_qemu_s_socket() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("file"), "").unwrap();
    let config = p("qmpmux.toml");
    std::fs::write(
        &config,
        format!(
            "log_level = \"info,qmpmux::upstream=debug\"\ncontrol_socket = \"\"\n[upstream]\nbackoff_initial_ms = 5\nbackoff_max_ms = 20\n[[vm]]\nname = \"one\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
            p("file").join("sub").join("q.sock").display(),
            p("one.sock").display()
        ),
    )
    .unwrap();
    let mut child = qmpmux()
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let stdout = child.stdout.take().unwrap();
    let log = tokio::task::spawn_blocking(move || {
        let mut lines = Vec::new();
        let mut signalled = false;
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            // Ten failed attempts in: enough retries to repeat a warning.
            if !signalled && line.contains("still cannot reach QEMU monitor") && line.contains("attempt=10") {
                signal(pid, libc::SIGTERM);
                signalled = true;
            }
            lines.push(line);
        }
        (lines, signalled)
    });
    tokio::pin!(log);
    let (lines, signalled) = match tokio::time::timeout(Duration::from_secs(30), &mut log).await {
        Ok(r) => r.unwrap(),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            log.await.unwrap()
        }
    };
    let status = child.wait().unwrap();
    let text = lines.join("\n");
    assert!(signalled && status.success(), "exit status {status}:\n{text}");
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("not watching for QEMU's socket"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(
        warnings[0].contains("cannot watch directory") && warnings[0].contains("file/sub"),
        "{text}"
    );
}
