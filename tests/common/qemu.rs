//! The QEMU launcher: a real QEMU (`-M none`) with one or more QMP monitors,
//! killed on drop and by the death signal if the harness dies first.

use super::process::{guard_child, log_file};
use super::ready;
use super::STEP;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `QMPMUX_QEMU`, or `qemu-system-x86_64`; panics if it does not run.
pub fn qemu_binary() -> String {
    let bin = std::env::var("QMPMUX_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{bin} not found: this needs real QEMU (apt-get install qemu-system-x86, or run `bash .ci/run`)"
    );
    bin
}

/// The first line of `qemu --version`.
pub fn qemu_version() -> String {
    Command::new(qemu_binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default()
}

/// One QMP monitor of a QEMU.
#[derive(Clone, Copy)]
pub enum Monitor<'a> {
    /// `-qmp unix:PATH,server=on,wait=off` (a stale socket file is removed).
    Serve(&'a Path),
    /// The same with `pretty=on` (via `-chardev` and `-mon`).
    ServePretty(&'a Path),
    /// QEMU as the client: it dials PATH, and dials again a second after
    /// losing it (qmpmux in accept mode).
    Dial(&'a Path),
}

impl Monitor<'_> {
    fn args(&self, id: usize) -> Vec<String> {
        let chardev = |opts: String| vec!["-chardev".into(), format!("socket,id=mon{id},{opts}")];
        let mon = |extra: &str| vec!["-mon".into(), format!("chardev=mon{id},mode=control{extra}")];
        match self {
            Monitor::Serve(p) => vec!["-qmp".into(), format!("unix:{},server=on,wait=off", p.display())],
            Monitor::ServePretty(p) => [
                chardev(format!("path={},server=on,wait=off", p.display())),
                mon(",pretty=on"),
            ]
            .concat(),
            Monitor::Dial(p) => [chardev(format!("path={},reconnect=1", p.display())), mon("")].concat(),
        }
    }

    fn path(&self) -> &Path {
        match self {
            Monitor::Serve(p) | Monitor::ServePretty(p) | Monitor::Dial(p) => p,
        }
    }

    fn serves(&self) -> bool {
        !matches!(self, Monitor::Dial(_))
    }
}

/// A running QEMU; `socket` is its first monitor's.
pub struct Qemu {
    child: Child,
    pub socket: PathBuf,
    /// The monitors QEMU listens on (to wait for).
    serving: Vec<PathBuf>,
}

impl Qemu {
    /// Starts QEMU without waiting. `log`: where its stderr goes (inherited
    /// if `None`).
    pub fn spawn(monitors: &[Monitor], log: Option<&Path>) -> Qemu {
        let mut cmd = Command::new(qemu_binary());
        cmd.args(["-M", "none", "-nodefaults", "-display", "none"]);
        for (id, m) in monitors.iter().enumerate() {
            if m.serves() {
                let _ = std::fs::remove_file(m.path());
            }
            cmd.args(m.args(id));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        if let Some(log) = log {
            cmd.stderr(log_file(log));
        }
        guard_child(&mut cmd, None);
        Qemu {
            child: cmd.spawn().expect("spawn qemu"),
            socket: monitors[0].path().to_owned(),
            serving: monitors
                .iter()
                .filter(|m| m.serves())
                .map(|m| m.path().to_owned())
                .collect(),
        }
    }

    /// Starts QEMU and waits until its monitor answers with a greeting.
    pub async fn start(socket: &Path) -> Qemu {
        Qemu::spawn(&[Monitor::Serve(socket)], None).listening().await
    }

    /// QEMU on a socket a running qmpmux already watches, not waited for:
    /// the readiness probe of [`Qemu::start`] would race qmpmux for QEMU's
    /// one client at a time and, losing, wait [`STEP`] for a greeting that
    /// comes only once qmpmux lets go. Tests wait on qmpmux's connection.
    pub fn start_watched(socket: &Path) -> Qemu {
        Qemu::spawn(&[Monitor::Serve(socket)], None)
    }

    /// QEMU with a pretty-printing monitor (`-mon ...,pretty=on`).
    pub async fn start_pretty(socket: &Path) -> Qemu {
        Qemu::spawn(&[Monitor::ServePretty(socket)], None).listening().await
    }

    /// QEMU as the client: it dials `socket` (qmpmux in accept mode) and
    /// dials again a second after losing it.
    pub async fn start_dialing(socket: &Path) -> Qemu {
        Qemu::spawn(&[Monitor::Dial(socket)], None)
    }

    /// Waits until every serving monitor answers with a greeting.
    pub async fn listening(self) -> Qemu {
        for s in &self.serving {
            ready::wait_listening(s).await;
        }
        self
    }

    /// Starts QEMU with stderr to `log` and blocks until every monitor
    /// answers with a greeting (for the benchmark's main thread).
    pub fn start_blocking(monitors: &[Monitor], log: &Path) -> Qemu {
        let q = Qemu::spawn(monitors, Some(log));
        let deadline = Instant::now() + STEP;
        for s in &q.serving {
            assert!(
                ready::wait_greeted_blocking(s, deadline, Duration::from_millis(5)),
                "QEMU did not start listening on {}; see {}",
                s.display(),
                log.display()
            );
        }
        q
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill9();
    }
}
