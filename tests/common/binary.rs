//! qmpmux's binary (`CARGO_BIN_EXE_qmpmux`) as a subprocess with a config
//! file, as in production: its CPU time, memory and signals are its own.

use super::process::{guard_child, log_file};
use super::ready;
use super::STEP;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A command running qmpmux's binary, guarded by the death signal.
pub fn command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmpmux"));
    guard_child(&mut cmd, None);
    cmd
}

/// A qmpmux subprocess, killed on drop.
pub struct Binary {
    child: Child,
    pub log: PathBuf,
}

impl Binary {
    /// Writes `config` to `config_path`, starts qmpmux on it with stdout and
    /// stderr appended to `log`, and waits until every listen socket gives a
    /// greeting (i.e. the upstream session is up). `nofile_soft`: start it
    /// with this RLIMIT_NOFILE soft limit instead of this process's.
    pub fn start(config_path: &Path, config: &str, log: &Path, listens: &[&Path], nofile_soft: Option<u64>) -> Binary {
        std::fs::write(config_path, config).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmpmux"));
        cmd.arg("--config")
            .arg(config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log_file(log))
            .stderr(log_file(log));
        guard_child(&mut cmd, nofile_soft);
        let b = Binary {
            child: cmd.spawn().expect("spawn qmpmux"),
            log: log.to_owned(),
        };
        for l in listens {
            let deadline = Instant::now() + 3 * STEP;
            assert!(
                ready::wait_greeted_blocking(l, deadline, Duration::from_millis(10)),
                "qmpmux did not serve {}; log:\n{}",
                l.display(),
                std::fs::read_to_string(&b.log).unwrap_or_default()
            );
        }
        b
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}
