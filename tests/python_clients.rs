//! Interoperability with stock Python QMP clients (PyPI `qemu.qmp`) through
//! qmpmux, against a real QEMU: the asyncio `QMPClient`, the legacy
//! synchronous `QEMUMonitorProtocol`, and `qmp-shell`.
//!
//! The scripts live in `tests/py/`. The interpreter is `$QMPMUX_PYTHON`
//! (set by `.ci/run` to a venv with qemu.qmp), else `python3`. A missing
//! interpreter or package fails the tests; it never skips them.

mod common;

use common::{Client, Daemon, Qemu};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// Upper bound for one Python client run (they take well under a second).
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// The interpreter to use, checked to have qemu.qmp.
fn python() -> String {
    let py = std::env::var("QMPMUX_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&py)
        .args([
            "-c",
            "import qemu.qmp, qemu.qmp.legacy, qemu.qmp.qmp_shell; print(qemu.qmp.QMPClient.__name__)",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run Python interpreter {py:?}: {e}. These tests need Python 3 with the PyPI package \
                 qemu.qmp: run `bash .ci/run`, or set QMPMUX_PYTHON to an interpreter that has it \
                 (python3 -m venv target/py && target/py/bin/pip install qemu.qmp)"
            )
        });
    assert!(
        out.status.success(),
        "{py:?} cannot import qemu.qmp ({}): {}\nThese tests need the PyPI package qemu.qmp: run `bash .ci/run`, \
         or set QMPMUX_PYTHON to an interpreter that has it \
         (python3 -m venv target/py && target/py/bin/pip install qemu.qmp)",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    py
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py").join(name)
}

struct Setup {
    dir: TempDir,
    _qemu: Qemu,
    daemon: Daemon,
    sock: PathBuf,
    /// QEMU's own greeting, read directly before qmpmux connected.
    direct_greeting: Value,
    python: String,
}

async fn setup() -> Setup {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("qemu.sock");
    let sock = dir.path().join("vm.sock");
    let qemu = Qemu::start(&up).await;
    let direct_greeting = {
        let (_c, g) = Client::open(&up).await;
        g
    };
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    Setup {
        dir,
        _qemu: qemu,
        daemon,
        sock,
        direct_greeting,
        python,
    }
}

impl Setup {
    /// A Python command with a private HOME (qmp-shell writes its history
    /// there) and unbuffered output.
    fn command(&self, args: &[&std::ffi::OsStr]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.args(args)
            .env("HOME", self.dir.path())
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .kill_on_drop(true);
        cmd
    }

    /// Runs a script from tests/py with the socket path as its argument.
    async fn run_script(&self, name: &str) -> Output {
        let path = script(name);
        let mut cmd = self.command(&[path.as_os_str(), self.sock.as_os_str()]);
        cmd.stdin(Stdio::null());
        finish(name, cmd.output()).await
    }
}

async fn finish(what: &str, run: impl std::future::Future<Output = std::io::Result<Output>>) -> Output {
    let out = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {RUN_LIMIT:?}"))
        .unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The JSON object a script printed as its last line.
fn result_of(what: &str, out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "{what}: last line of output is not JSON ({e}):\n{stdout}\n--- stderr\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// What qmpmux's greeting must look like to a client: QEMU's own (with
/// `oob`, which stock clients then enable).
fn expected_greeting(direct: &Value) -> Value {
    direct.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_async_qmp_clients_share_one_vm() {
    let s = setup().await;
    let out = s.run_script("async_clients.py").await;
    let r = result_of("async_clients.py", &out);
    assert_eq!(r["greeting_a"], expected_greeting(&s.direct_greeting), "{r}");
    assert_eq!(r["same_greeting"], true, "{r}");
    // 200 concurrent query-status per client, both clients at once, all
    // answered to the right caller.
    assert_eq!(r["queries"], json!([200, 200]), "{r}");
    assert_eq!(r["statuses_before"], json!(["running"]), "{r}");
    assert_eq!(r["stop_return"], json!({}), "{r}");
    assert_eq!(r["cont_return"], json!({}), "{r}");
    // Both clients saw both events, whichever of them caused them.
    assert_eq!(r["events_a"], json!(["STOP", "RESUME"]), "{r}");
    assert_eq!(r["events_b"], json!(["STOP", "RESUME"]), "{r}");
    assert_eq!(r["status_paused"], "paused", "{r}");
    assert_eq!(r["status_after"], "running", "{r}");
    assert_eq!(r["error_class"], "CommandNotFound", "{r}");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_sync_client_matching_by_order() {
    let s = setup().await;
    let out = s.run_script("legacy_client.py").await;
    let r = result_of("legacy_client.py", &out);
    assert_eq!(
        r["greeting_version"], s.direct_greeting["QMP"]["version"]["qemu"],
        "{r}"
    );
    assert_eq!(r["greeting_capabilities"], json!(["oob"]), "{r}");
    assert_eq!(r["status"]["status"], "running", "{r}");
    assert_eq!(r["status"]["running"], true, "{r}");
    // id-less requests get id-less replies, exactly QEMU's.
    assert_eq!(r["name"], json!({"return": {}}), "{r}");
    assert_eq!(
        r["version"],
        json!({"return": s.direct_greeting["QMP"]["version"]}),
        "{r}"
    );
    assert_eq!(
        r["unknown"],
        json!({"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}}),
        "{r}"
    );
    assert_eq!(
        r["bad_args"],
        json!({"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}),
        "{r}"
    );
    assert_eq!(r["unknown_raises"], "CommandNotFound", "{r}");
    assert_eq!(r["stop_events"], json!(["STOP"]), "{r}");
    assert_eq!(r["paused"], "paused", "{r}");
    assert_eq!(r["resume_event"], "RESUME", "{r}");
    assert_eq!(r["running_again"], "running", "{r}");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qmp_shell_alongside_an_async_client() {
    let s = setup().await;

    // A QMPClient connected for the whole shell session.
    let hold_script = script("hold_client.py");
    let mut holder = s
        .command(&[hold_script.as_os_str(), s.sock.as_os_str()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hold_client.py");
    let mut holder_out = BufReader::new(holder.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(RUN_LIMIT, holder_out.read_line(&mut first))
        .await
        .expect("hold_client.py did not connect in time")
        .expect("read hold_client.py");
    assert_eq!(first.trim(), "connected", "hold_client.py said {first:?}");

    // The stock qmp-shell, commands on stdin. An empty line prints the
    // events received so far.
    let commands = [
        "query-status",
        "query-name",
        "stop",
        "",
        "query-status",
        "cont",
        "no-such-command",
        "query-status bogus=1",
        "query-status",
    ];
    let mut shell = s
        .command(&["-m".as_ref(), "qemu.qmp.qmp_shell".as_ref(), s.sock.as_os_str()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qmp-shell");
    let mut stdin = shell.stdin.take().unwrap();
    stdin.write_all(commands.join("\n").as_bytes()).await.unwrap();
    stdin.write_all(b"\n").await.unwrap();
    drop(stdin);
    let out = finish("qmp-shell", shell.wait_with_output()).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("Traceback"), "qmp-shell raised:\n{stderr}");

    let v = &s.direct_greeting["QMP"]["version"]["qemu"];
    let banner = format!("Connected to QEMU {}.{}.{}", v["major"], v["minor"], v["micro"]);
    // The output after each prompt is the answer to the command before it.
    let mut parts = stdout.split("(QEMU) ");
    let head = parts.next().unwrap_or_default();
    assert!(head.contains("Welcome to the QMP low-level shell!"), "{stdout}");
    assert!(head.contains(&banner), "expected {banner:?} in:\n{stdout}");
    let answers: Vec<&str> = parts.map(str::trim).collect();
    assert_eq!(
        answers.len(),
        commands.len() + 1,
        "one prompt per line plus EOF:\n{stdout}"
    );
    let answer = |i: usize| -> Value {
        serde_json::from_str(answers[i])
            .unwrap_or_else(|e| panic!("answer to {:?} is not JSON ({e}): {:?}", commands[i], answers[i]))
    };
    assert_eq!(answer(0)["return"]["status"], "running", "{stdout}");
    assert_eq!(answer(0)["return"]["running"], true, "{stdout}");
    assert_eq!(answer(1), json!({"return": {}}), "{stdout}");
    assert_eq!(answer(2), json!({"return": {}}), "{stdout}");
    // Events are printed as Python dicts.
    assert!(
        answers[3].contains("'event': 'STOP'"),
        "expected the STOP event: {stdout}"
    );
    assert_eq!(answer(4)["return"]["status"], "paused", "{stdout}");
    assert_eq!(answer(5), json!({"return": {}}), "{stdout}");
    assert_eq!(
        answer(6),
        json!({"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}}),
        "{stdout}"
    );
    assert_eq!(
        answer(7),
        json!({"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}),
        "{stdout}"
    );
    assert_eq!(answer(8)["return"]["status"], "running", "{stdout}");
    assert_eq!(answers[9], "", "{stdout}");

    // The other client saw the shell's stop/cont as events and still works.
    drop(holder.stdin.take());
    let mut rest = String::new();
    tokio::time::timeout(RUN_LIMIT, holder_out.read_to_string(&mut rest))
        .await
        .expect("hold_client.py did not finish in time")
        .expect("read hold_client.py");
    let status = tokio::time::timeout(RUN_LIMIT, holder.wait())
        .await
        .expect("hold_client.py did not exit")
        .unwrap();
    let mut err = String::new();
    if let Some(mut e) = holder.stderr.take() {
        let _ = e.read_to_string(&mut err).await;
    }
    assert!(status.success(), "hold_client.py failed ({status}):\n{rest}\n{err}");
    let r: Value = serde_json::from_str(rest.trim()).unwrap_or_else(|e| panic!("hold_client.py output {rest:?}: {e}"));
    assert_eq!(r, json!({"events": ["STOP", "RESUME"], "status": "running"}));
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fds_passed_by_stock_clients_reach_qemu_and_names_are_cleaned_up() {
    let s = setup().await;
    let out = s.run_script("fd_passing.py").await;
    let r = result_of("fd_passing.py", &out);
    assert_eq!(r["getfd"], json!({}), "{r}");
    assert!(r["add_fd"]["fdset-id"].is_u64() && r["add_fd"]["fd"].is_u64(), "{r}");
    let sets = r["fdsets_seen_by_b"].as_array().unwrap();
    assert!(
        sets.iter()
            .any(|s| s["fds"].as_array().unwrap().iter().any(|f| f["opaque"] == "from-a")),
        "{r}"
    );
    assert!(
        r["getfd_without_fd"]
            .as_str()
            .unwrap()
            .contains("No file descriptor supplied"),
        "{r}"
    );
    assert!(r["closefd_after_a_left"].as_str().unwrap().contains("not found"), "{r}");
    s.daemon.stop().await;
}
