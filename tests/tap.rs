//! `qmpmux tap` against real QEMU: two clients' traffic and the events in
//! the order qmpmux saw them, with who, the reply and QEMU's time; filters;
//! secrets masked; a tap that does not read holds nobody up and is told
//! what it lost; taps end cleanly; exit statuses.

mod common;

use common::{eventually, Client, Daemon, Qemu, STEP};
use qmpmux::config::{Endpoint, ListenerConfig};
use qmpmux::policy::{Glob, Policy};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// What no tap line may ever show.
const SECRET: &str = "hunter2";

/// QEMU, and qmpmux serving it as VM `vm` on `rw.sock` (full control) and
/// `ro.sock` (queries only), with its control socket.
struct Setup {
    dir: tempfile::TempDir,
    _qemu: Qemu,
    daemon: Daemon,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let qemu = Qemu::start(&p("q.sock")).await;
        let ctl = p("ctl");
        let ro = p("ro.sock");
        let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
            c.control_socket = Some(ctl);
            c.vms[0].listeners = vec![ListenerConfig {
                policy: Policy {
                    allow: vec![Glob::new("query-*"), Glob::new("__org.qmpmux_query-proxy")],
                    deny: Vec::new(),
                },
                ..ListenerConfig::new("ro", Endpoint::unix(&ro))
            }];
        })
        .await;
        Setup {
            dir,
            _qemu: qemu,
            daemon,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `qmpmux tap` as a child process, its standard output read line by line.
struct Tap {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Tap {
    fn spawn(control: &Path, args: &[&str]) -> Tap {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qmpmux"))
            .arg("tap")
            .arg("--control")
            .arg(control)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn qmpmux tap");
        let out = BufReader::new(child.stdout.take().unwrap());
        Tap { child, out }
    }

    /// Attached: its first line read (`--json`: the `tap` line).
    async fn attached(control: &Path, args: &[&str]) -> Tap {
        let mut tap = Tap::spawn(control, args);
        let first = tap.line().await.expect("the tap's first line");
        assert!(
            first.starts_with("tapping") || first.contains("\"type\": \"tap\""),
            "{first}"
        );
        tap
    }

    async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, self.out.read_line(&mut line))
            .await
            .expect("timed out waiting for a tap line")
            .expect("read the tap");
        (n > 0).then_some(line)
    }

    /// `--json` lines up to and including the first that `done` accepts.
    async fn until(&mut self, mut done: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let line = self.line().await.expect("the tap ended");
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            let stop = done(&v);
            seen.push(v);
            if stop {
                return seen;
            }
        }
    }

    /// Human lines up to and including the first that contains `text`.
    async fn until_text(&mut self, text: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = self.line().await.expect("the tap ended");
            let stop = line.contains(text);
            seen.push(line);
            if stop {
                return seen;
            }
        }
    }

    /// Waits for it to end: its exit status and standard error.
    async fn ended(mut self) -> (i32, String) {
        let status = tokio::time::timeout(STEP, self.child.wait())
            .await
            .expect("the tap did not end")
            .unwrap();
        let mut err = String::new();
        let mut stderr = self.child.stderr.take().unwrap();
        tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err)
            .await
            .unwrap();
        (status.code().unwrap_or(-1), err)
    }
}

fn is(v: &Value, kind: &str, command: &str) -> bool {
    v["type"] == kind && v["command"] == command
}

fn position(lines: &[Value], what: impl Fn(&Value) -> bool) -> usize {
    lines
        .iter()
        .position(what)
        .unwrap_or_else(|| panic!("not in {lines:#?}"))
}

/// The client number a socket client has, from qmpmux itself.
async fn number(c: &mut Client) -> u64 {
    let r = c.cmd(r#"{"execute":"__org.qmpmux_query-proxy"}"#).await;
    r["return"]["client"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_traffic_and_events_in_order_with_secrets_masked() {
    let s = Setup::start().await;
    let ctl = s.path("ctl");
    let mut json = Tap::attached(&ctl, &["vm", "--json"]).await;
    let mut human = Tap::attached(&ctl, &["vm"]).await;
    let mut a = Client::ready(&s.path("rw.sock")).await;
    let mut b = Client::ready(&s.path("ro.sock")).await;
    let (na, nb) = (number(&mut a).await, number(&mut b).await);

    assert!(a.cmd(r#"{"execute":"query-status","id":1}"#).await["return"].is_object());
    let add = r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"hunter2"}}"#;
    assert_eq!(a.cmd(add).await["return"], serde_json::json!({}));
    let get = r#"{"execute":"qom-get","arguments":{"path":"/objects/s0","property":"data"}}"#;
    assert_eq!(a.cmd(get).await["return"], SECRET);
    for secret in [
        r#"{"execute":"set_password","arguments":{"protocol":"vnc","password":"hunter2"}}"#,
        r#"{"execute":"change-vnc-password","arguments":{"password":"hunter2"}}"#,
        r#"{"execute":"human-monitor-command","arguments":{"command-line":"set_password vnc hunter2"}}"#,
    ] {
        a.cmd(secret).await;
    }
    assert_eq!(
        a.cmd(r#"{"execute":"nope"}"#).await["error"]["class"],
        "CommandNotFound"
    );
    assert!(b.cmd(r#"{"execute":"query-name"}"#).await["return"].is_object());
    let denied = b.cmd(r#"{"execute":"stop","id":"s"}"#).await;
    assert!(
        denied["error"]["desc"].as_str().unwrap().contains("not allowed"),
        "{denied}"
    );
    a.stop_cont(1).await;
    // Last: B's query, once A's RESUME has come.
    assert!(b.cmd(r#"{"execute":"query-name","id":"last"}"#).await["return"].is_object());

    let lines = json
        .until(|v| v["type"] == "reply" && v["client"] == nb && v["seq"] == 1)
        .await;
    let text = serde_json::to_string(&lines).unwrap();
    assert!(!text.contains(SECRET), "{text}");
    // Who: both clients with this process's pid, our uid and their socket.
    let (pid, uid) = (std::process::id(), nix::unistd::getuid().as_raw());
    for (n, listener) in [(na, "main"), (nb, "ro")] {
        let c = &lines[position(&lines, |v| v["type"] == "connect" && v["client"] == n)];
        assert_eq!(c["who"]["pid"], pid, "{c}");
        assert_eq!(c["who"]["uid"], uid, "{c}");
        assert_eq!(c["who"]["listener"], listener, "{c}");
    }
    // A command, then QEMU's reply with its time.
    let q = position(&lines, |v| is(v, "request", "query-status") && v["client"] == na);
    let r = position(&lines, |v| is(v, "reply", "query-status") && v["client"] == na);
    assert!(q < r);
    assert_eq!(lines[q]["who"]["listener"], "main");
    assert_eq!(lines[q]["request"]["id"], Value::Null, "{}", lines[q]);
    assert_eq!(lines[r]["seq"], lines[q]["seq"]);
    assert_eq!(lines[r]["by"], "qemu");
    assert!(lines[r]["ms"].as_f64().unwrap() > 0.0, "{}", lines[r]);
    assert_eq!(lines[r]["reply"]["return"]["status"], "running");
    // Secrets.
    let add = &lines[position(&lines, |v| is(v, "request", "object-add"))];
    assert_eq!(add["request"]["arguments"]["data"], "***", "{add}");
    assert_eq!(add["request"]["arguments"]["id"], "s0", "{add}");
    let got = &lines[position(&lines, |v| is(v, "reply", "qom-get"))];
    assert_eq!(got["reply"]["return"], "***", "{got}");
    for command in ["set_password", "change-vnc-password"] {
        let req = &lines[position(&lines, |v| is(v, "request", command))];
        assert_eq!(req["request"]["arguments"]["password"], "***", "{req}");
    }
    let hmp = &lines[position(&lines, |v| is(v, "request", "human-monitor-command"))];
    assert_eq!(hmp["request"]["arguments"]["command-line"], "set_password vnc ***");
    // An error from QEMU, and a refusal by qmpmux (the policy).
    let nope = &lines[position(&lines, |v| is(v, "reply", "nope"))];
    assert_eq!(
        (nope["error"].clone(), nope["by"].clone()),
        (Value::Bool(true), "qemu".into())
    );
    assert_eq!(nope["reply"]["error"]["class"], "CommandNotFound");
    let stop_b = position(&lines, |v| is(v, "request", "stop") && v["client"] == nb);
    assert_eq!(lines[stop_b]["by"], "qmpmux");
    let refused = &lines[stop_b + 1];
    assert!(is(refused, "reply", "stop") && refused["client"] == nb, "{refused}");
    assert_eq!(refused["by"], "qmpmux");
    assert!(refused["reply"]["error"]["desc"]
        .as_str()
        .unwrap()
        .contains("not allowed"));
    // Events where they happened: after the command that caused them.
    let stop_a = position(&lines, |v| is(v, "request", "stop") && v["client"] == na);
    let stop_ev = position(&lines, |v| v["type"] == "event" && v["event"] == "STOP");
    let cont_a = position(&lines, |v| is(v, "request", "cont"));
    let resume = position(&lines, |v| v["type"] == "event" && v["event"] == "RESUME");
    assert!(stop_b < stop_a && stop_a < stop_ev && stop_ev < resume && cont_a < resume);
    assert!(lines[stop_ev]["message"]["timestamp"].is_object());

    // The same for people.
    // B's second query-name is the last line.
    let mut shown = human.until_text(&format!("#{nb} <- query-name")).await;
    shown.extend(human.until_text(&format!("#{nb} <- query-name")).await);
    let all = shown.concat();
    assert!(!all.contains(SECRET), "{all}");
    assert!(
        all.contains(&format!("#{nb} (pid {pid}, uid {uid}, ro) -> stop\n")),
        "{all}"
    );
    assert!(
        all.contains(&format!(
            "#{nb} <- stop qmpmux: error GenericError: qmpmux: command 'stop' is not allowed"
        )),
        "{all}"
    );
    assert!(all.contains("event STOP\n") && all.contains("event RESUME\n"), "{all}");
    let reply = shown
        .iter()
        .find(|l| l.contains(&format!("#{na} <- query-status ")))
        .expect("query-status's reply");
    assert!(reply.contains(" ms {\"status\": \"running\""), "{reply}");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_by_client_command_and_event() {
    let s = Setup::start().await;
    let ctl = s.path("ctl");
    let mut a = Client::ready(&s.path("rw.sock")).await;
    let mut b = Client::ready(&s.path("rw.sock")).await;
    let n = number(&mut a).await;
    let na = n.to_string();
    let mut queries = Tap::attached(&ctl, &["vm", "--json", "--client", &na, "--command", "query-*"]).await;
    let mut stops = Tap::attached(&ctl, &["vm", "--json", "--event", "STOP"]).await;
    let mut of_a = Tap::attached(&ctl, &["vm", "--json", "--client", &na]).await;
    b.cmd(r#"{"execute":"query-status"}"#).await;
    a.stop_cont(2).await;
    a.cmd(r#"{"execute":"query-status"}"#).await;
    b.cmd(r#"{"execute":"query-name"}"#).await;
    a.cmd(r#"{"execute":"query-name"}"#).await;
    drop(a);

    let lines = queries
        .until(|v| v["type"] == "reply" && v["command"] == "query-name")
        .await;
    let kinds: Vec<(String, String)> = lines
        .iter()
        .map(|v| {
            (
                v["type"].as_str().unwrap().into(),
                v["command"].as_str().unwrap().into(),
            )
        })
        .collect();
    let want = [
        ("request", "query-status"),
        ("reply", "query-status"),
        ("request", "query-name"),
        ("reply", "query-name"),
    ];
    assert_eq!(kinds, want.map(|(t, c)| (t.to_string(), c.to_string())), "{lines:#?}");
    assert!(lines.iter().all(|v| v["client"] == n), "{lines:#?}");

    // The second STOP: nothing but STOP events until then.
    let mut n = 0;
    let lines = stops
        .until(|v| {
            n += usize::from(v["event"] == "STOP");
            n == 2
        })
        .await;
    assert!(
        lines.iter().all(|v| v["type"] == "event" && v["event"] == "STOP"),
        "{lines:#?}"
    );

    // A client alone: its commands and its leaving, no events.
    let lines = of_a.until(|v| v["type"] == "disconnect").await;
    assert!(lines.iter().all(|v| v["client"] == n), "{lines:#?}");
    assert_eq!(lines.iter().filter(|v| is(v, "request", "stop")).count(), 2);
    s.daemon.stop().await;
}

/// A tap that does not read holds no client up; when it reads again it
/// learns how many lines it lost, where, and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_that_does_not_read_loses_lines_not_the_vm_s_time() {
    let s = Setup::start().await;
    let mut stalled = tokio::net::UnixStream::connect(s.path("ctl")).await.unwrap();
    stalled.write_all(b"tap vm\n").await.unwrap();
    let mut stalled = BufReader::new(stalled);
    let mut hello = String::new();
    stalled.read_line(&mut hello).await.unwrap();
    assert!(hello.contains("\"type\":\"tap\""), "{hello}");
    // Far more than a tap holds (its queue, 8 MiB, and a batch taken
    // before it stopped reading, as much again), some 200 KB each.
    let mut a = Client::ready(&s.path("rw.sock")).await;
    a.send(r#"{"execute":"query-qmp-schema"}"#).await;
    let size = a.line().await.len();
    let schemas = (24 << 20) / size + 1;
    for _ in 0..schemas {
        a.send(r#"{"execute":"query-qmp-schema"}"#).await;
    }
    for i in 0..schemas {
        let r = a.reply().await;
        assert!(r["return"].is_array(), "reply {i}: {:.200}", r.to_string());
    }
    a.cmd(r#"{"execute":"query-status","id":"after"}"#).await;
    // Now reading: the loss, then the tap goes on.
    let mut lost = 0;
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, stalled.read_line(&mut line))
            .await
            .expect("a tap line")
            .unwrap();
        assert!(n > 0, "the tap ended");
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] == "lost" {
            lost += v["count"].as_u64().unwrap();
        }
        if v["type"] == "request" && v["command"] == "query-status" {
            break;
        }
    }
    assert!(lost > 0, "nothing was lost");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taps_have_slots_of_their_own_and_end_with_the_daemon() {
    let s = Setup::start().await;
    let ctl = s.path("ctl");
    let mut taps = Vec::new();
    for _ in 0..qmpmux::ops::tap::MAX_TAPS {
        taps.push(Tap::attached(&ctl, &["vm"]).await);
    }
    let (code, err) = Tap::spawn(&ctl, &["vm"]).ended().await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("taps at once"), "{err}");
    // status and reload are served as ever.
    let report = qmpmux::ops::control::query_status(&ctl).await.unwrap();
    assert_eq!(report.vms[0].name, "vm");
    // A tap that goes frees its slot.
    taps.pop().unwrap().child.kill().await.unwrap();
    let ctl2 = ctl.clone();
    eventually("a slot to be free again", async || {
        let mut probe = tokio::net::UnixStream::connect(&ctl2).await.unwrap();
        probe.write_all(b"tap vm\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(probe).read_line(&mut line).await.unwrap();
        line.contains("\"type\":\"tap\"")
    })
    .await;
    let mut human = taps.pop().unwrap();
    s.daemon.stop().await;
    assert_eq!(human.line().await, None);
    let (code, err) = human.ended().await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("the tap ended: qmpmux is stopping"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tap_ends_when_its_vm_goes_and_bad_requests_get_their_status() {
    let s = Setup::start().await;
    let ctl = s.path("ctl");
    let tap = Tap::attached(&ctl, &["vm", "--json"]).await;
    // No such VM: 2; bad filters: 2; no daemon: 3.
    let (code, err) = Tap::spawn(&ctl, &["vmx"]).ended().await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no VM 'vmx' in qmpmux (VMs: vm)"), "{err}");
    let long = "x".repeat(300);
    let (code, err) = Tap::spawn(&ctl, &["vm", "--event", &long]).ended().await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("longer than"), "{err}");
    let (code, err) = Tap::spawn(&s.path("nothing-here"), &["vm"]).ended().await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach qmpmux's control socket"), "{err}");
    // The VM restarted by a reload: its taps end, saying so.
    let mut config = s.daemon.config.clone();
    config.vms[0].listeners[0].max_clients = Some(5);
    s.daemon.reload(config).await.unwrap();
    let mut tap = tap;
    let end = tap.until(|v| v["type"] == "end").await;
    assert!(end.last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .contains("session ended"));
    let (code, err) = tap.ended().await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("the tap ended: the VM's session ended"), "{err}");
    s.daemon.stop().await;
}
