//! `qmpmux exec`, `qmpmux events` and VM-name completion as people use
//! them: the real binary against an in-process qmpmux serving real QEMU,
//! its output and exit status compared with what QEMU says through an
//! ordinary client.

mod common;

use common::{Client, Daemon, Qemu};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// The binary's exit status, standard output and standard error.
struct Ran {
    code: i32,
    out: String,
    err: String,
}

async fn qmpmux(control: &Path, args: &[&str]) -> Ran {
    qmpmux_as(control, args, None).await
}

async fn qmpmux_as(control: &Path, args: &[&str], uid: Option<u32>) -> Ran {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_qmpmux"));
    cmd.env_remove("QMPMUX_CONTROL")
        .env("QMPMUX_CONTROL", control)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("qmpmux finished")
        .unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8(out.stdout).unwrap(),
        err: String::from_utf8(out.stderr).unwrap(),
    }
}

struct Setup {
    dir: tempfile::TempDir,
    qemu: Qemu,
    daemon: Daemon,
    ctl: PathBuf,
}

impl Setup {
    async fn start() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let qemu = Qemu::start(&p("qemu.sock")).await;
        let _idle = Qemu::start(&p("idle-qemu.sock")).await;
        let ctl = p("qmpmux.ctl");
        let daemon = Daemon::start_with(
            &[
                ("web01", &p("qemu.sock"), &p("web01.sock")),
                ("db01", &p("nowhere.sock"), &p("db01.sock")),
            ],
            |c| {
                c.control_socket = Some(ctl.clone());
                c.client.greeting_wait = std::time::Duration::from_millis(300);
            },
        )
        .await;
        Setup { dir, qemu, daemon, ctl }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("web01.sock")
    }

    async fn run(&self, args: &[&str]) -> Ran {
        qmpmux(&self.ctl, args).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_prints_qemu_s_reply_and_tells_errors_apart() {
    let s = Setup::start().await;
    let mut direct = Client::ready(&s.socket()).await;

    // The return, pretty, in QEMU's order.
    let ran = s.run(&["exec", "web01", "query-status"]).await;
    assert_eq!(ran.code, 0, "{}", ran.err);
    let expected = direct.cmd(r#"{"execute": "query-status"}"#).await;
    let shown: Value = serde_json::from_str(&ran.out).unwrap();
    assert_eq!(shown, expected["return"]);
    assert!(ran.out.contains("\n  \"status\": "), "{}", ran.out);
    let first_key = ran
        .out
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    direct.send(r#"{"execute": "query-status"}"#).await;
    let raw = direct.line().await;
    assert!(
        raw.starts_with(&format!("{{\"return\": {{{first_key}")),
        "{raw} vs {}",
        ran.out
    );

    // key=value and JSON arguments; values are JSON where they parse.
    let kv = s.run(&["exec", "web01", "qom-list", "path=/machine"]).await;
    let js = s.run(&["exec", "web01", "qom-list", r#"{"path": "/machine"}"#]).await;
    assert_eq!((kv.code, js.code), (0, 0), "{} {}", kv.err, js.err);
    let expected = direct
        .cmd(r#"{"execute": "qom-list", "arguments": {"path": "/machine"}}"#)
        .await;
    assert_eq!(serde_json::from_str::<Value>(&kv.out).unwrap(), expected["return"]);
    assert_eq!(kv.out, js.out);

    // --json: the reply line as sent, for scripts.
    let ran = s.run(&["exec", "web01", "query-status", "--json"]).await;
    assert_eq!(ran.code, 0);
    assert_eq!(ran.out.lines().count(), 1);
    let line: Value = serde_json::from_str(&ran.out).unwrap();
    assert_eq!(
        line["return"],
        direct.cmd(r#"{"execute": "query-status"}"#).await["return"]
    );

    // --hmp: the human monitor's text.
    let ran = s.run(&["exec", "web01", "--hmp", "info status"]).await;
    assert_eq!(ran.code, 0, "{}", ran.err);
    let hmp = direct
        .cmd(r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}"#)
        .await;
    assert_eq!(ran.out, hmp["return"].as_str().unwrap().replace("\r\n", "\n"));

    // QEMU's error: its class and description on stderr, status 1.
    let ran = s.run(&["exec", "web01", "qom-list", "path=/no/such/thing"]).await;
    let expected = direct
        .cmd(r#"{"execute": "qom-list", "arguments": {"path": "/no/such/thing"}}"#)
        .await;
    assert_eq!(ran.code, 1);
    assert_eq!(ran.out, "");
    assert_eq!(
        ran.err,
        format!(
            "qmpmux: {}: {}\n",
            expected["error"]["class"].as_str().unwrap(),
            expected["error"]["desc"].as_str().unwrap()
        )
    );
    let ran = s.run(&["exec", "web01", "no-such-command", "--json"]).await;
    assert_eq!(ran.code, 1);
    let line: Value = serde_json::from_str(&ran.out).unwrap();
    assert_eq!(line["error"]["class"], "CommandNotFound");

    // Bad arguments and unknown VMs: 2.
    let ran = s.run(&["exec", "web01", "qom-list", "path"]).await;
    assert_eq!(ran.code, 2);
    assert!(ran.err.contains("'path' is not key=value"), "{}", ran.err);
    let ran = s.run(&["exec", "web02", "query-status"]).await;
    assert_eq!(ran.code, 2);
    assert_eq!(ran.err, "qmpmux: no VM 'web02' in qmpmux (VMs: db01, web01)\n");
    let ran = s.run(&["exec", "web01"]).await;
    assert_eq!(ran.code, 2, "{}", ran.err);

    // Unreachable: 3, saying what.
    let ran = qmpmux(&s.dir.path().join("no.ctl"), &["exec", "web01", "query-status"]).await;
    assert_eq!(ran.code, 3);
    assert!(ran.err.contains("cannot reach qmpmux's control socket"), "{}", ran.err);
    let ran = s.run(&["exec", "db01", "query-status"]).await;
    assert_eq!(ran.code, 3);
    assert!(ran.err.contains("without a greeting"), "{}", ran.err);
    drop(direct);
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_says_when_qemu_is_down_or_the_socket_refuses_the_user() {
    let mut s = Setup::start().await;
    let ran = s.run(&["exec", "web01", "query-status"]).await;
    assert_eq!(ran.code, 0, "{}", ran.err);

    // A socket whose permissions do not let the user in.
    use std::os::unix::fs::PermissionsExt;
    let socket = s.socket();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o000)).unwrap();
    let uid = if nix::unistd::geteuid().is_root() {
        // root passes any permission: ask as nobody.
        std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&s.ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
        Some(65534)
    } else {
        None
    };
    let ran = qmpmux_as(&s.ctl, &["exec", "web01", "query-status"], uid).await;
    assert_eq!(ran.code, 3, "{}", ran.err);
    assert!(
        ran.err.starts_with(&format!(
            "qmpmux: cannot connect to VM 'web01' at {} (permission denied",
            socket.display()
        )),
        "{}",
        ran.err
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660)).unwrap();

    // QEMU gone: qmpmux keeps the client, the command is not run.
    s.qemu.kill9();
    let ran = s.run(&["exec", "web01", "query-status"]).await;
    assert_eq!(ran.code, 3, "{}", ran.err);
    assert!(
        ran.err.starts_with("qmpmux: VM 'web01': qmpmux: ") && ran.err.contains("web01"),
        "{}",
        ran.err
    );
    s.daemon.stop().await;
}

/// web01's clients, as the daemon counts them.
async fn clients(ctl: &Path) -> i64 {
    let report = qmpmux::ops::control::query_status(ctl).await.unwrap();
    report.vms.iter().find(|v| v.name == "web01").unwrap().clients
}

/// The event lines of `out` (`--json`), parsed.
fn events(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// `stop` and `cont`, `n` times: the events the client got meanwhile.
async fn stop_cont_events(client: &mut Client, n: usize) -> Vec<Value> {
    for _ in 0..n {
        client.send(r#"{"execute":"stop"}"#).await;
        client.send(r#"{"execute":"cont"}"#).await;
    }
    let (mut replies, mut events) = (0, Vec::new());
    while replies < 2 * n || events.len() < 2 * n {
        let v = client.recv().await;
        if v.get("event").is_some() {
            events.push(v);
        } else {
            assert!(v.get("return").is_some(), "{v}");
            replies += 1;
        }
    }
    events
}

fn strip_seq(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("__org.qmpmux_seq");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_resume_filter_and_stop() {
    let s = Setup::start().await;
    let mut direct = Client::ready(&s.socket()).await;

    // Live, until --count: exactly what an ordinary client gets.
    let ctl = s.ctl.clone();
    let live = tokio::spawn(async move { qmpmux(&ctl, &["events", "web01", "--count", "4", "--json"]).await });
    common::eventually("the events client to connect", async || clients(&s.ctl).await == 2).await;
    let seen = stop_cont_events(&mut direct, 2).await;
    let names: Vec<&str> = seen.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(names, ["STOP", "RESUME", "STOP", "RESUME"]);
    let ran = live.await.unwrap();
    assert_eq!(ran.code, 0, "{}", ran.err);
    let got = events(&ran.out);
    assert_eq!(got.iter().cloned().map(strip_seq).collect::<Vec<_>>(), seen);
    let numbers: Vec<u64> = got.iter().map(|e| e["__org.qmpmux_seq"].as_u64().unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");

    // --last: the kept events, without waiting for new ones.
    let ran = s
        .run(&["events", "web01", "--last", "3", "--count", "3", "--json"])
        .await;
    assert_eq!(ran.code, 0, "{}", ran.err);
    assert_eq!(events(&ran.out), got[1..].to_vec());
    // --since: those after a number.
    let since = numbers[1].to_string();
    let ran = s
        .run(&["events", "web01", "--since", &since, "--count", "2", "--json"])
        .await;
    assert_eq!(events(&ran.out), got[2..].to_vec());
    // --events narrows, the replay too.
    let ran = s
        .run(&[
            "events", "web01", "--last", "2", "--events", "RESUME", "--count", "2", "--json",
        ])
        .await;
    assert_eq!(events(&ran.out), vec![got[1].clone(), got[3].clone()]);

    // For people: time, name, data on one line.
    let ran = s.run(&["events", "web01", "--last", "1", "--count", "1"]).await;
    let secs = seen[3]["timestamp"]["seconds"].as_i64().unwrap();
    let micros = seen[3]["timestamp"]["microseconds"].as_i64().unwrap();
    assert_eq!(ran.out, format!("{}  RESUME\n", qmpmux::cli::events::utc(secs, micros)));

    // --timeout before --count: 4; --timeout alone: 0.
    let ran = s.run(&["events", "web01", "--count", "1", "--timeout", "0.3"]).await;
    assert_eq!((ran.code, ran.out.as_str()), (4, ""), "{}", ran.err);
    assert_eq!(ran.err, "qmpmux: VM 'web01': 0 of 1 events within 0.3 s\n");
    let ran = s.run(&["events", "web01", "--timeout", "0.3"]).await;
    assert_eq!(ran.code, 0, "{}", ran.err);

    // qmpmux stops: the events client says so, status 3.
    let ctl = s.ctl.clone();
    let follower = tokio::spawn(async move { qmpmux(&ctl, &["events", "web01"]).await });
    common::eventually("the events client to connect", async || clients(&s.ctl).await == 2).await;
    drop(direct);
    s.daemon.stop().await;
    let ran = follower.await.unwrap();
    assert_eq!(ran.code, 3, "{}", ran.err);
    assert!(ran.err.contains("the connection ended"), "{}", ran.err);
}

/// Runs a shell's command line with qmpmux on the PATH; `None` when that
/// shell is not installed (a failure under CI).
async fn shell(argv: &[&str], bin_dir: &Path, ctl: &Path) -> Option<std::process::Output> {
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    match tokio::process::Command::new(argv[0])
        .args(&argv[1..])
        .env("PATH", path)
        .env("QMPMUX_CONTROL", ctl)
        .output()
        .await
    {
        Ok(out) => Some(out),
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("{} is not installed", argv[0]),
        Err(_) => {
            eprintln!("{} is not installed: its completion is not checked", argv[0]);
            None
        }
    }
}

/// bash completes VM names from the running daemon where a subcommand
/// takes a VM; the zsh and fish scripts are valid where those shells are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shells_complete_vm_names_from_the_daemon() {
    let s = Setup::start().await;
    let script = s.dir.path().join("qmpmux.bash");
    let ran = s.run(&["generate", "completions", "bash"]).await;
    std::fs::write(&script, &ran.out).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_qmpmux")).parent().unwrap().to_owned();
    let complete = |line: &str| {
        let script = script.clone();
        let bin_dir = bin_dir.clone();
        let ctl = s.ctl.clone();
        let line = line.to_owned();
        async move {
            let program = r#"source "$1"; read -ra COMP_WORDS <<< "$2"; [[ "$2" == *" " ]] && COMP_WORDS+=("");
                COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMP_LINE="$2"; COMP_POINT=${#2};
                _qmpmux_vm qmpmux "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"; printf '%s\n' "${COMPREPLY[@]}""#;
            let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
            let out = tokio::process::Command::new("bash")
                .args(["-c", program, "complete", script.to_str().unwrap(), &line])
                .env("PATH", path)
                .env("QMPMUX_CONTROL", &ctl)
                .output()
                .await
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let mut words: Vec<String> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            words.sort();
            words
        }
    };
    assert_eq!(complete("qmpmux exec ").await, ["db01", "web01"]);
    assert_eq!(complete("qmpmux events --count 3 w").await, ["web01"]);
    assert_eq!(complete("qmpmux --config /nonexistent exec --json d").await, ["db01"]);
    // Past the VM: clap's own completion (options).
    assert!(complete("qmpmux exec web01 --j").await.contains(&"--json".to_owned()));
    assert_eq!(complete("qmpmux ex").await, ["exec"]);
    // Another daemon's names with --control on the line.
    let other = s.dir.path().join("other.ctl");
    assert_eq!(
        complete(&format!("qmpmux exec --control {} ", other.display())).await,
        Vec::<String>::new()
    );

    // zsh: the script is valid (completing needs a terminal).
    let ran = s.run(&["generate", "completions", "zsh"]).await;
    assert!(ran.out.contains("qmpmux status --names") && ran.out.contains(":_qmpmux_vms'"));
    let file = s.dir.path().join("_qmpmux");
    std::fs::write(&file, &ran.out).unwrap();
    if let Some(out) = shell(&["zsh", "-n", file.to_str().unwrap()], &bin_dir, &s.ctl).await {
        assert!(out.status.success(), "zsh: {}", String::from_utf8_lossy(&out.stderr));
    }
    // fish completes for real.
    let ran = s.run(&["generate", "completions", "fish"]).await;
    let file = s.dir.path().join("qmpmux.fish");
    std::fs::write(&file, &ran.out).unwrap();
    let program = format!(
        "source {}; complete -C 'qmpmux exec '; echo ===; complete -C 'qmpmux events --json w'; echo ===; complete -C 'qmpmux exec web01 --j'",
        file.display()
    );
    if let Some(out) = shell(&["fish", "-c", &program], &bin_dir, &s.ctl).await {
        let text = String::from_utf8(out.stdout).unwrap();
        let parts: Vec<&str> = text.split("===\n").collect();
        assert_eq!(parts[0], "db01\tVM\nweb01\tVM\n", "{text}");
        assert_eq!(parts[1], "web01\tVM\n", "{text}");
        assert!(parts[2].starts_with("--json\t"), "{text}");
    }
    s.daemon.stop().await;
}

/// The README's quickstart: `qmpmux --demo` says how to reach its VM, and
/// `qmpmux exec` does, by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_says_how_to_reach_it_and_exec_does() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_qmpmux"));
    cmd.args(["--demo", "--demo-listen"])
        .arg(dir.path().join("demo.sock"))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut demo = cmd.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(common::STEP, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("demo VM ready") {
                return line;
            }
        }
        panic!("the demo stopped without getting ready");
    })
    .await
    .expect("the demo got ready");
    let ctl = ready
        .split("`export QMPMUX_CONTROL=")
        .nth(1)
        .and_then(|rest| rest.split('`').next())
        .unwrap_or_else(|| panic!("no QMPMUX_CONTROL in {ready}"));
    assert!(ready.contains(" exec demo query-status`"), "{ready}");
    let ran = qmpmux(Path::new(ctl), &["exec", "demo", "query-status"]).await;
    assert_eq!(ran.code, 0, "{}", ran.err);
    let status: Value = serde_json::from_str(&ran.out).unwrap();
    assert_eq!(status["status"], "running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(demo.wait().await.unwrap().success());
}
