//! `qmpmux shell` against real QEMU through qmpmux, driven in a real
//! terminal (tmux) as a person would: the prompt, Tab completion of
//! command and argument names, key=value arguments, replies as QEMU gave
//! them, error replies, events from another client shown while the shell
//! sits at its prompt (also in the middle of a line), history kept across
//! shells, the human monitor mode, the connection's end, the exit
//! statuses; and as a script reading a pipe.

mod common;

use common::tmux::{quote, tmux_or_skip, Tmux};
use common::{Client, Daemon, Qemu};
use qmpmux::cli::show::Ordered;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// QEMU, and qmpmux with a control socket serving it as VM `web01`.
struct Vm {
    dir: tempfile::TempDir,
    _qemu: Qemu,
    daemon: Daemon,
    control: PathBuf,
    sock: PathBuf,
}

async fn web01() -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let (up, sock, control) = (p("q.sock"), p("web01.sock"), p("qmpmux.ctl"));
    let qemu = Qemu::start(&up).await;
    let ctl = control.clone();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| c.control_socket = Some(ctl)).await;
    Vm {
        dir,
        _qemu: qemu,
        daemon,
        control,
        sock,
    }
}

impl Vm {
    /// The user's state directory for the shells.
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `qmpmux shell [ARGS] web01` as typed in a terminal, with HOME and
    /// XDG_STATE_HOME in the test's directory; `[exit N]` once it exits.
    fn shell_command(&self, args: &[&str]) -> String {
        let home = self.dir.path().join("home");
        let control = self.control.to_str().unwrap();
        let mut words = vec![env!("CARGO_BIN_EXE_qmpmux"), "shell", "--control", control];
        words.extend_from_slice(args);
        words.push("web01");
        format!(
            "env -u QMPMUX_CONTROL HOME={} XDG_STATE_HOME={} sh -c {} {}",
            quote(&[home.to_str().unwrap()]),
            quote(&[self.state().to_str().unwrap()]),
            quote(&[r#""$0" "$@"; echo "[exit $?]"; exec sleep 600"#]),
            quote(&words)
        )
    }

    /// A shell on web01 in a terminal of its own, at its prompt.
    async fn terminal(&self, name: &str, args: &[&str], prompt: &str) -> Tmux {
        let t = Tmux::start(self.dir.path(), name, &self.shell_command(args));
        t.wait_line(prompt).await;
        t
    }

    /// The reply to `request` exactly as qmpmux relays QEMU's (its
    /// members in QEMU's order), asked by a client of its own.
    async fn direct(&self, request: &str) -> String {
        let mut c = Client::ready(&self.sock).await;
        c.send(&format!("{request}\n")).await;
        loop {
            let line = c.line().await;
            if !line.contains("\"event\"") {
                return line.trim_end().to_owned();
            }
        }
    }
}

/// A reply's `return`, as the shell shows it: pretty, in QEMU's order.
fn shown(reply: &str) -> String {
    let ordered = Ordered::parse(reply).unwrap();
    ordered.get("return").unwrap_or_else(|| panic!("{reply}")).pretty()
}

/// What the screen shows after the last `marker`.
fn after<'s>(screen: &'s str, marker: &str) -> &'s str {
    screen.rfind(marker).map_or("", |i| &screen[i + marker.len()..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_in_a_terminal_completes_runs_shows_events_and_remembers() {
    if !tmux_or_skip() {
        return;
    }
    let vm = web01().await;
    let t = vm.terminal("qmp", &[], "web01>").await;

    // A command name completed by Tab, run, its reply as QEMU gave it.
    t.type_text("query-statu");
    t.press(&["Tab"]);
    t.wait_line("web01> query-status").await;
    t.press(&["Enter"]);
    let status = shown(&vm.direct(r#"{"execute":"query-status"}"#).await);
    assert!(status.contains("\"running\": true"), "{status}");
    t.wait(&status, |s| after(s, "web01> query-status").contains(&status))
        .await;

    // Argument names completed, key=value arguments.
    t.type_text("qom-get pa");
    t.press(&["Tab"]);
    t.wait_line("web01> qom-get path=").await;
    t.type_text("/machine pro");
    t.press(&["Tab"]);
    t.wait_line("web01> qom-get path=/machine property=").await;
    t.type_text("type");
    t.press(&["Enter"]);
    let machine = shown(
        &vm.direct(r#"{"execute":"qom-get","arguments":{"path":"/machine","property":"type"}}"#)
            .await,
    );
    let screen = t.wait_line("web01>").await;
    assert!(
        after(&screen, "property=type\n").starts_with(&format!("{machine}\nweb01>")),
        "{screen}"
    );

    // An error reply, class and description as QEMU gave them.
    t.type_text("no-such-command");
    t.press(&["Enter"]);
    let e: serde_json::Value = serde_json::from_str(&vm.direct(r#"{"execute":"no-such-command"}"#).await).unwrap();
    let (class, desc) = (
        e["error"]["class"].as_str().unwrap(),
        e["error"]["desc"].as_str().unwrap(),
    );
    t.wait_for(&format!("\nerror: {class}: {desc}\nweb01>")).await;

    // Another client stops the VM: the event shows while the shell waits
    // at its prompt, and the shell sees the new state.
    let mut other = Client::ready(&vm.sock).await;
    let r = other.cmd(r#"{"execute":"stop"}"#).await;
    assert!(r.get("return").is_some(), "{r}");
    let screen = t.wait_for("Z  STOP\nweb01>").await;
    assert!(t.last_line() == "web01>", "{screen}");
    t.type_text("query-status");
    t.press(&["Enter"]);
    let paused = shown(&vm.direct(r#"{"execute":"query-status"}"#).await);
    assert!(paused.contains("\"status\": \"paused\""), "{paused}");
    t.wait(&paused, |s| after(s, "STOP\n").contains(&paused)).await;

    // In the middle of a line: the event goes above it, the line stays.
    t.type_text("query-sta");
    t.wait_line("web01> query-sta").await;
    let r = other.cmd(r#"{"execute":"cont"}"#).await;
    assert!(r.get("return").is_some(), "{r}");
    t.wait_for("Z  RESUME\nweb01> query-sta").await;
    t.type_text("tus");
    t.press(&["Enter"]);
    t.wait(&status, |s| after(s, "RESUME\n").contains(&status)).await;

    // History: Up recalls the last line; Ctrl-C drops the line.
    t.wait_line("web01>").await;
    t.press(&["Up"]);
    t.wait_line("web01> query-status").await;
    t.press(&["C-c"]);
    t.wait("a fresh prompt", |s| s.ends_with("web01> query-status\nweb01>\n"))
        .await;

    // Lines pasted together run in turn.
    t.paste("query-status\nqom-get path=/machine property=type");
    t.wait_line("qom-get path=/machine property=type").await;
    t.press(&["Enter"]);
    let screen = t.wait_line("web01>").await;
    assert!(
        after(&screen, "property=type\n").starts_with(&format!("{status}\n{machine}\nweb01>")),
        "{screen}"
    );

    // Ctrl-D leaves, with status 0; the history stays for the next shell.
    t.press(&["C-d"]);
    t.wait_line("[exit 0]").await;
    let file = vm.state().join("qmpmux/history/web01");
    let kept = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(
        kept.ends_with("\nquery-status\nqom-get path=/machine property=type\n"),
        "{kept}"
    );
    let again = vm.terminal("again", &[], "web01>").await;
    again.press(&["Up"]);
    again.wait_line("web01> qom-get path=/machine property=type").await;
    again.press(&["Up"]);
    again.wait_line("web01> query-status").await;
    again.press(&["C-u", "C-d"]);
    again.wait_line("[exit 0]").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_monitor_mode_and_the_end_of_the_connection() {
    if !tmux_or_skip() {
        return;
    }
    let vm = web01().await;
    let t = vm.terminal("hmp", &["-H"], "web01 (hmp)>").await;
    t.type_text("info statu");
    t.press(&["Tab"]);
    t.wait_line("web01 (hmp)> info status").await;
    t.press(&["Enter"]);
    let text = vm
        .direct(r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status"}}"#)
        .await;
    let text: serde_json::Value = serde_json::from_str(&text).unwrap();
    let status = text["return"].as_str().unwrap().trim_end();
    assert_eq!(status, "VM status: running");
    t.wait_for(&format!("info status\n{status}\nweb01 (hmp)>")).await;

    // qmpmux stops: the shell says so, and exits 3.
    t.type_text("info");
    let hmp_history = vm.state().join("qmpmux/hmp-history/web01");
    vm.daemon.stop().await;
    let screen = t.wait_line("[exit 3]").await;
    assert!(
        screen.contains("qmpmux: VM 'web01': the connection ended (qmpmux stopped"),
        "{screen}"
    );
    assert!(hmp_history.exists(), "no HMP history");
}

/// `qmpmux shell --control CONTROL WORDS...` with `lines` on its standard
/// input: its exit status, standard output and standard error.
async fn script(control: &Path, words: &[&str], lines: &str) -> (i32, String, String) {
    let (control, lines) = (control.to_owned(), lines.to_owned());
    let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let home = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_qmpmux"))
            .arg("shell")
            .arg("--control")
            .arg(&control)
            .args(&words)
            .env("HOME", home.path())
            .env_remove("QMPMUX_CONTROL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_on_standard_input_runs_line_by_line() {
    let vm = web01().await;
    let status = shown(&vm.direct(r#"{"execute":"query-status"}"#).await);
    let machine = shown(
        &vm.direct(r#"{"execute":"qom-get","arguments":{"path":"/machine","property":"type"}}"#)
            .await,
    );
    let lines = "# a comment\nquery-status\nstop\nno-such-command\n\
                 {\"execute\": \"cont\", \"id\": \"mine\"}\nqom-get path=/machine property=type\n";
    let (code, out, err) = script(&vm.control, &["web01"], lines).await;
    assert_eq!(code, 1, "an error reply makes the status 1\n{out}\n{err}");
    assert_eq!(err, "");
    // Replies in order, events where they came; no prompt, no banner.
    let stop = out.find("Z  STOP\n").unwrap_or_else(|| panic!("{out}"));
    let resume = out.find("Z  RESUME\n").unwrap_or_else(|| panic!("{out}"));
    assert!(out.starts_with(&format!("{status}\n")), "{out}");
    assert!(stop < resume, "{out}");
    assert!(
        out.contains("\nerror: CommandNotFound: The command no-such-command has not been found\n"),
        "{out}"
    );
    assert!(out.ends_with(&format!("{{}}\n{machine}\n")), "{out}");
    assert!(!out.contains("web01>") && !out.contains('\x1b'), "{out}");

    // The human monitor; `exit` ends a script.
    let (code, out, _) = script(&vm.control, &["-H", "web01"], "info status\nexit\ninfo status\n").await;
    assert_eq!((code, out.as_str()), (0, "VM status: running\n"));
    // A line that is not a command: status 2, named by its number; the
    // lines after it run too.
    let (code, out, _) = script(&vm.control, &["web01"], "query-status\nqom-get path\nquery-status\n").await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("\nqmpmux: line 2: 'path' is not key=value (nor a JSON object)\n"),
        "{out}"
    );
    assert!(out.ends_with(&format!("object)\n{status}\n")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_vm_is_status_2_and_an_unreachable_one_3() {
    let vm = web01().await;
    let (code, out, err) = script(&vm.control, &["nope"], "query-status\n").await;
    assert_eq!((code, out.as_str()), (2, ""), "{err}");
    assert_eq!(err, "qmpmux: no VM 'nope' in qmpmux (VMs: web01)\n");

    // No daemon there.
    let missing = vm.dir.path().join("none.ctl");
    let (code, _, err) = script(&missing, &["web01"], "").await;
    assert_eq!(code, 3, "{err}");

    // A VM whose QEMU qmpmux has never reached.
    let p = |name: &str| vm.dir.path().join(name);
    let ctl = p("down.ctl");
    let _down = Daemon::start_with(&[("down", &p("nothing.sock"), &p("down.sock"))], |c| {
        c.control_socket = Some(ctl.clone());
        c.client.greeting_wait = std::time::Duration::from_millis(300);
    })
    .await;
    let (code, _, err) = script(&ctl, &["down"], "query-status\n").await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("VM 'down'"), "{err}");
}
