//! Child processes that cannot outlive the harness: every QEMU, qmpmux
//! binary and helper process a test or the benchmark starts.
//!
//! The death signal follows the *thread* that spawned the child: spawn from a
//! thread that lives as long as the child should (a test's own thread, a
//! runtime worker, the benchmark's main thread), never from a blocking-pool
//! thread, which tokio ends after a while idle.

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};

/// Makes the child get SIGKILL when the spawning thread dies, even by abort
/// (a failed test must not leave QEMUs behind holding CI's output pipe), and
/// optionally lowers its RLIMIT_NOFILE soft limit (as systemd's default 1024
/// would give).
pub fn guard_child(cmd: &mut Command, nofile_soft: Option<u64>) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe syscalls (prctl, getppid, get/setrlimit)
    // on stack memory; nothing of the parent's heap is touched.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The parent may have died before prctl: then no signal comes.
            if libc::getppid() != parent {
                return Err(io::Error::other("parent already gone"));
            }
            if let Some(soft) = nofile_soft {
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
                    rl.rlim_cur = soft.min(rl.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
                }
            }
            Ok(())
        });
    }
}

/// [`guard_child`] with the fd limit left as it is.
pub fn die_with_parent(cmd: &mut Command) {
    guard_child(cmd, None);
}

/// `path` opened for appending, as a child's output; null if it cannot be.
pub fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// Resident memory of process `pid`, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
