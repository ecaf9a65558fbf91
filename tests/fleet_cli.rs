//! `qmpmux fleet ls | exec | events`, the binary as people run it, against
//! a real nats-server (with a user and password), two qmpmux instances
//! (hosts `hv1` and `hv2`) and real QEMU: every host's VMs listed, a
//! command run on matching VMs of both hosts (results compared with what
//! QEMU says to a local client), events followed across hosts, and the
//! exit statuses of docs/cli.md.

mod common;

use common::nats::{free_port, NatsServer};
use common::{Client, Daemon, Qemu, STEP};
use qmpmux::config::{NatsAuth, NatsConfig};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

const USER: &str = "fleet";
const PASSWORD: &str = "fleet-secret";

/// `[nats]` for host `host`, authenticating as [`USER`].
fn host_nats(url: &str, host: &str, commands: bool) -> NatsConfig {
    NatsConfig {
        host: host.into(),
        prefix: format!("qmpmux.{host}"),
        commands,
        auth: NatsAuth::UserPassword {
            user: USER.into(),
            password: PASSWORD.into(),
        },
        ..common::nats::qmpmux_config(&[url.to_string()], None)
    }
}

/// What a run of the binary left.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// `--json` output, a value per line.
    fn json(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

/// The binary with `args` (and `QMPMUX_NATS_PASSWORD` = `password` if
/// given), its output.
async fn qmpmux<S: AsRef<str> + std::fmt::Debug>(args: &[S], password: Option<&str>) -> Run {
    let mut cmd = command(args, password);
    let out = tokio::time::timeout(3 * STEP, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("qmpmux {args:?} did not end"))
        .expect("run qmpmux");
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn command<S: AsRef<str>>(args: &[S], password: Option<&str>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_qmpmux"));
    cmd.args(args.iter().map(AsRef::as_ref));
    if !args.iter().any(|a| a.as_ref() == "--config") {
        // Not the machine's own configuration.
        cmd.args(["--config", "/nonexistent/qmpmux.toml"]);
    }
    cmd.env_remove("QMPMUX_NATS_PASSWORD")
        .env_remove("QMPMUX_NATS_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(p) = password {
        cmd.env("QMPMUX_NATS_PASSWORD", p);
    }
    cmd
}

/// One nats-server; `hv1` serving web01 and db01, `hv2` serving web02,
/// each VM a real QEMU; commands over NATS on.
struct Fleet {
    nats: NatsServer,
    dir: tempfile::TempDir,
    qemus: HashMap<&'static str, Qemu>,
    _hv1: Daemon,
    hv2: Daemon,
    socks: HashMap<&'static str, PathBuf>,
}

impl Fleet {
    async fn start() -> Option<Fleet> {
        common::nats::nats_or_skip()?;
        let nats = NatsServer::start_with_args(&["--user", USER, "--pass", PASSWORD]).await;
        let dir = tempfile::tempdir().unwrap();
        let mut qemus = HashMap::new();
        let mut socks = HashMap::new();
        let mut vms = |names: &[&'static str]| {
            names
                .iter()
                .map(|name| {
                    let up = dir.path().join(format!("{name}.qmp"));
                    let sock = dir.path().join(format!("{name}.sock"));
                    socks.insert(*name, sock.clone());
                    (*name, up, sock)
                })
                .collect::<Vec<_>>()
        };
        let (on1, on2) = (vms(&["web01", "db01"]), vms(&["web02"]));
        for (name, up, _) in on1.iter().chain(&on2) {
            qemus.insert(*name, Qemu::start(up).await);
        }
        let hv1 = start_host(&on1, &nats.url(), "hv1").await;
        let hv2 = start_host(&on2, &nats.url(), "hv2").await;
        let fleet = Fleet {
            nats,
            dir,
            qemus,
            _hv1: hv1,
            hv2,
            socks,
        };
        // qmpmux has each QEMU's greeting (commands can run)...
        for sock in fleet.socks.values() {
            Client::ready(sock).await;
        }
        // ...and both hosts answer on NATS.
        fleet.wait_for_hosts().await;
        Some(fleet)
    }

    async fn wait_for_hosts(&self) {
        common::eventually("both hosts answering `fleet ls`", async || {
            let r = self.run(&["ls", "--json", "--host", "hv1,hv2"]).await;
            r.code == 0 && r.lines().len() == 2
        })
        .await;
    }

    /// `qmpmux fleet ARGS --nats URL --user USER`, the password from the
    /// environment.
    async fn run(&self, args: &[&str]) -> Run {
        qmpmux(&self.args(args), Some(PASSWORD)).await
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<String> {
        let mut all = vec!["fleet".to_owned()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend(["--nats".into(), self.nats.url(), "--user".into(), USER.into()]);
        all
    }

    async fn local(&self, vm: &str) -> Client {
        Client::ready(&self.socks[vm]).await
    }
}

/// qmpmux in-process as host `host` with `vms` (name, QEMU's socket,
/// listen socket).
async fn start_host(vms: &[(&str, PathBuf, PathBuf)], url: &str, host: &str) -> Daemon {
    let vms: Vec<(&str, &Path, &Path)> = vms.iter().map(|(n, u, s)| (*n, u.as_path(), s.as_path())).collect();
    Daemon::start_with(&vms, |c| c.nats = Some(host_nats(url, host, true))).await
}

/// The table's cells: columns are two or more blanks apart (a compact JSON
/// result has single blanks only).
fn cells(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_lists_every_host_s_vms() {
    let Some(fleet) = Fleet::start().await else { return };
    let r = fleet.run(&["ls"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.lines().iter().map(|l| cells(l)).collect::<Vec<_>>(),
        [["HOST", "VM"], ["hv1", "db01"], ["hv1", "web01"], ["hv2", "web02"]],
        "{r:?}"
    );
    let r = fleet.run(&["ls", "--json"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.json(),
        [
            serde_json::json!({"host": "hv1", "prefix": "qmpmux.hv1", "vms": ["db01", "web01"]}),
            serde_json::json!({"host": "hv2", "prefix": "qmpmux.hv2", "vms": ["web02"]}),
        ]
    );
    // Patterns for VMs and hosts.
    let r = fleet.run(&["ls", "web*", "--host", "hv2"]).await;
    assert_eq!(r.lines()[1..], ["hv2   web02"], "{r:?}");
    let r = fleet.run(&["ls", "web0?"]).await;
    assert_eq!(r.lines().len(), 3, "{r:?}");
    // Nothing matches: 2, saying what there is.
    let r = fleet.run(&["ls", "mail*"]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.is_empty());
    assert!(
        r.stderr
            .contains("no VM matches 'mail*' (hv1: db01, web01; hv2: web02)"),
        "{}",
        r.stderr
    );
    // No qmpmux under another prefix: 3, at once (no responders).
    let r = fleet.run(&["ls", "--prefix", "elsewhere.*"]).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("no qmpmux answered on elsewhere.vms"), "{}", r.stderr);
    // A wrong password: 3, saying the server refused.
    let r = qmpmux(&fleet.args(&["ls"]), Some("wrong")).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("refused these credentials"), "{}", r.stderr);
}

/// On a host, [nats] of --config is enough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_takes_nats_from_the_configuration_file() {
    let Some(fleet) = Fleet::start().await else { return };
    let path = fleet.dir.path().join("qmpmux.toml");
    std::fs::write(
        &path,
        format!(
            "[nats]\nservers = [\"{}\"]\nhost = \"hv9\"\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n",
            fleet.nats.url()
        ),
    )
    .unwrap();
    let path = path.to_str().unwrap();
    let r = qmpmux(&["fleet", "ls", "--config", path, "--json"], None).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json().len(), 2, "{r:?}");
    // The options given replace the file's.
    let r = qmpmux(&["fleet", "ls", "--config", path, "--user", USER], Some("wrong")).await;
    assert_eq!(r.code, 3, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_a_command_on_matching_vms_of_every_host() {
    let Some(fleet) = Fleet::start().await else { return };
    let mut local = HashMap::new();
    for vm in ["web01", "web02"] {
        local.insert(vm, fleet.local(vm).await);
    }
    let mut direct = HashMap::new();
    for (vm, c) in local.iter_mut() {
        direct.insert(*vm, c.cmd(r#"{"execute":"query-status"}"#).await["return"].clone());
    }
    // The table: one row per matching VM, on both hosts; db01 not.
    let r = fleet.run(&["exec", "web*", "query-status"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let rows: Vec<Vec<String>> = r.lines().iter().map(|l| cells(l)).collect();
    assert_eq!(rows[0], ["HOST", "VM", "TIME", "RESULT"], "{r:?}");
    assert_eq!(rows.len(), 3, "{r:?}");
    for (row, (host, vm)) in rows[1..].iter().zip([("hv1", "web01"), ("hv2", "web02")]) {
        assert_eq!((row[0].as_str(), row[1].as_str()), (host, vm), "{r:?}");
        assert!(row[2].ends_with(" ms"), "{r:?}");
        let shown: Value = serde_json::from_str(&row[3]).unwrap_or_else(|e| panic!("{e}: {r:?}"));
        assert_eq!(shown, direct[vm], "what QEMU says directly: {r:?}");
    }
    // --json: one object per VM, QEMU's reply in it.
    let r = fleet.run(&["exec", "web*", "query-status", "--json"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    let mut got = r.json();
    got.sort_by_key(|v| v["vm"].as_str().unwrap().to_owned());
    assert_eq!(got.len(), 2, "{r:?}");
    for (v, (host, vm)) in got.iter().zip([("hv1", "web01"), ("hv2", "web02")]) {
        assert_eq!(
            (v["host"].as_str(), v["vm"].as_str(), v["status"].as_u64()),
            (Some(host), Some(vm), Some(0))
        );
        assert_eq!(v["reply"]["return"], direct[vm], "{v}");
        assert!(v["ms"].as_f64().is_some() && v.get("error").is_none(), "{v}");
    }
    // Arguments as for `qmpmux exec`; an error reply: 1, QEMU's error shown.
    let refused = local
        .get_mut("web01")
        .unwrap()
        .cmd(r#"{"execute":"device_del","arguments":{"id":"nope"}}"#)
        .await;
    let r = fleet.run(&["exec", "web*", "device_del", "id=nope"]).await;
    assert_eq!(r.code, 1, "{r:?}");
    let error = format!(
        "{}: {}",
        refused["error"]["class"].as_str().unwrap(),
        refused["error"]["desc"].as_str().unwrap()
    );
    assert!(r.lines()[1..].iter().all(|l| cells(l)[3] == error), "{r:?} vs {error}");
    assert!(r.stderr.contains("2 of 2 VMs failed: 2 with an error"), "{}", r.stderr);
    // A VM whose QEMU does not answer in time: 4, the others answered.
    let signal = |sig| {
        // SAFETY: kill(2) on our own child process.
        assert_eq!(unsafe { libc::kill(fleet.qemus["web01"].pid() as i32, sig) }, 0);
    };
    signal(libc::SIGSTOP);
    let r = fleet
        .run(&["exec", "web*", "query-status", "--timeout", "0.5", "--json"])
        .await;
    signal(libc::SIGCONT);
    assert_eq!(r.code, 4, "{r:?}");
    let by_vm: HashMap<String, Value> = r
        .json()
        .into_iter()
        .map(|v| (v["vm"].as_str().unwrap().to_owned(), v))
        .collect();
    assert_eq!(by_vm["web02"]["status"], 0, "{r:?}");
    assert_eq!(by_vm["web01"]["status"], 4, "{r:?}");
    assert_eq!(by_vm["web01"]["error"], "VM 'web01': no answer within 0.5 s");
    assert!(
        r.stderr.contains("1 of 2 VMs failed: 1 without a reply in time"),
        "{}",
        r.stderr
    );
    // HMP.
    let hmp = local
        .get_mut("web02")
        .unwrap()
        .cmd(r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status"}}"#)
        .await;
    let r = fleet.run(&["exec", "web02", "--hmp", "info status"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        cells(r.lines()[1])[3],
        hmp["return"].as_str().unwrap().trim_end(),
        "{r:?}"
    );
    // No VM matches: 2.
    let r = fleet.run(&["exec", "mail*", "query-status"]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("no VM matches 'mail*'"), "{}", r.stderr);
    // hv2 stops taking commands over NATS: its VM cannot be reached (3),
    // hv1's still answers.
    let mut config = fleet.hv2.config.clone();
    config.nats = Some(host_nats(&fleet.nats.url(), "hv2", false));
    fleet.hv2.reload(config).await.expect("reload");
    let mut last = None;
    common::eventually("hv2 listed but not taking commands", async || {
        let r = fleet.run(&["exec", "web*", "query-status", "--json"]).await;
        let done = r.code == 3 && r.json().len() == 2;
        last = Some(r);
        done
    })
    .await;
    let r = last.unwrap();
    let by_vm: HashMap<String, Value> = r
        .json()
        .into_iter()
        .map(|v| (v["vm"].as_str().unwrap().to_owned(), v))
        .collect();
    assert_eq!(by_vm["web01"]["status"], 0, "{r:?}");
    assert_eq!(by_vm["web02"]["status"], 3, "{r:?}");
    assert_eq!(
        by_vm["web02"]["error"],
        "no qmpmux takes commands for VM 'web02' on qmpmux.hv2 (`commands = false` there, or it is not connected to NATS)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_matching_vms_are_followed_across_hosts() {
    let Some(fleet) = Fleet::start().await else { return };
    let (mut web01, mut web02) = (fleet.local("web01").await, fleet.local("web02").await);
    // Only hv2's web* VMs, two events.
    let child = command(
        &fleet.args(&["events", "web*", "--host", "hv2", "--count", "2"]),
        Some(PASSWORD),
    )
    .spawn()
    .unwrap();
    subscribed(&fleet, "qmpmux.hv2.web02.event.PROBE").await;
    stop_cont(&mut web01).await;
    let (stop, resume) = stop_cont(&mut web02).await;
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{text}");
    let time = |e: &Value| {
        qmpmux::cli::events::utc(
            e["timestamp"]["seconds"].as_i64().unwrap(),
            e["timestamp"]["microseconds"].as_i64().unwrap(),
        )
    };
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            format!("{}  hv2  web02  STOP", time(&stop)),
            format!("{}  hv2  web02  RESUME", time(&resume))
        ],
        "web01 (hv1) is not followed"
    );
    // --json, one VM, one event name.
    let child = command(
        &fleet.args(&["events", "web01", "--events", "STOP", "--count", "1", "--json"]),
        Some(PASSWORD),
    )
    .spawn()
    .unwrap();
    subscribed(&fleet, "qmpmux.hv1.web01.event.STOP").await;
    stop_cont(&mut web02).await;
    let (stop, _) = stop_cont(&mut web01).await;
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["host"].as_str(), v["vm"].as_str()),
        (Some("hv1"), Some("web01")),
        "{v}"
    );
    assert_eq!(v["event"], stop, "QEMU's event as a local client got it");
    assert!(v["seq"].as_u64().is_some(), "{v}");
    // --timeout before --count: 4; without --count: 0.
    let r = fleet
        .run(&["events", "--events", "SHUTDOWN", "--count", "1", "--timeout", "0.3"])
        .await;
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr
            .contains("every VM, events 'SHUTDOWN': 0 of 1 events within 0.3 s"),
        "{}",
        r.stderr
    );
    let r = fleet.run(&["events", "--timeout", "0.1"]).await;
    assert_eq!(r.code, 0, "{r:?}");
}

/// `stop` and `cont`; the STOP and RESUME events QEMU sent.
async fn stop_cont(c: &mut Client) -> (Value, Value) {
    c.send(r#"{"execute":"stop"}{"execute":"cont"}"#).await;
    let (mut replies, mut events) = (0, HashMap::new());
    while replies < 2 || events.len() < 2 {
        let v = c.recv().await;
        match v["event"].as_str() {
            Some(name) => {
                events.insert(name.to_owned(), v);
            }
            None => {
                assert!(v.get("return").is_some(), "{v}");
                replies += 1;
            }
        }
    }
    (events.remove("STOP").unwrap(), events.remove("RESUME").unwrap())
}

/// Waits until someone subscribes to `subject`: a request there no longer
/// finds no responders (the subscriber ignores it: it is no event).
async fn subscribed(fleet: &Fleet, subject: &'static str) {
    let probe = async_nats::ConnectOptions::with_user_and_password(USER.into(), PASSWORD.into())
        .connect(fleet.nats.url())
        .await
        .unwrap();
    common::eventually("`fleet events` subscribed", async || {
        let r = probe
            .send_request(
                subject,
                async_nats::Request::new().timeout(Some(std::time::Duration::from_millis(100))),
            )
            .await;
        matches!(r, Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut)
    })
    .await;
}

/// Without NATS, every subcommand says so: 3.
#[tokio::test]
async fn unreachable_nats_is_status_3() {
    let url = format!("nats://127.0.0.1:{}", free_port());
    for sub in [&["ls"][..], &["exec", "*", "query-status"], &["events"]] {
        let mut words = vec!["fleet".to_owned()];
        words.extend(sub.iter().map(|s| s.to_string()));
        words.extend(["--nats".into(), url.clone()]);
        let r = qmpmux(&words, None).await;
        assert_eq!(r.code, 3, "{sub:?}: {r:?}");
        assert!(
            r.stderr
                .starts_with(&format!("qmpmux: cannot connect to NATS ({url}): "))
                && r.stderr.contains("is a NATS server listening there?"),
            "{}",
            r.stderr
        );
    }
    // No NATS named, no configuration: 2.
    let r = qmpmux(&["fleet", "ls"], None).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("give --nats URL"), "{}", r.stderr);
}

/// A server with no qmpmux at all: 3, at once.
#[tokio::test]
async fn no_qmpmux_on_nats_is_status_3() {
    let Some(nats) = NatsServer::start_or_skip().await else {
        return;
    };
    let r = qmpmux(&["fleet", "exec", "*", "query-status", "--nats", &nats.url()], None).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains("no qmpmux answered on qmpmux.vms (no one subscribes there"),
        "{}",
        r.stderr
    );
}

/// What NATS's permissions refuse is said, and is 3.
#[tokio::test]
async fn refused_by_nats_permissions_is_status_3() {
    if common::nats::nats_or_skip().is_none() {
        return;
    }
    let nats = NatsServer::start_with_config(
        r#"authorization { users = [ { user: watcher, password: watcher-secret, permissions: {
            publish: { deny: [">"] }, subscribe: { allow: ["_INBOX.>"] } } } ] }"#,
    )
    .await;
    let url = nats.url();
    let fleet = |sub: &[&str]| {
        let mut words: Vec<String> = ["fleet"].iter().chain(sub).map(|s| s.to_string()).collect();
        words.extend(["--nats".into(), url.clone(), "--user".into(), "watcher".into()]);
        words
    };
    let r = qmpmux(&fleet(&["ls"]), Some("watcher-secret")).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr
            .contains("no qmpmux answered on qmpmux.vms (the NATS server said: ")
            && r.stderr
                .contains("Permissions Violation for Publish to \\\"qmpmux.vms\\\""),
        "{}",
        r.stderr
    );
    let r = qmpmux(&fleet(&["events", "web*"]), Some("watcher-secret")).await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stderr.contains("the NATS server refused: ")
            && r.stderr
                .contains("Permissions Violation for Subscription to \\\"qmpmux.*.*.event.>\\\""),
        "{}",
        r.stderr
    );
}
