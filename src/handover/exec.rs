//! Re-execution in place (`SIGUSR2`): the binary at the path qmpmux was
//! started from runs again in the same process (same pid: systemd's
//! `MAINPID`, pid files and watchers stay right), given the kept fds the
//! way systemd gives them (`LISTEN_FDS` from fd 3, `LISTEN_FDNAMES`).

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the new binary may take to say its version and check the
/// configuration.
const CHECK_WITHIN: Duration = Duration::from_secs(10);

/// The program to run again: argv\[0\] as it was given, made absolute
/// against the directory qmpmux started in, or found on `PATH`; read at
/// start, before anything changes the directory.
pub fn program_path() -> Option<PathBuf> {
    let arg0 = PathBuf::from(std::env::args_os().next()?);
    if arg0.is_absolute() {
        return Some(arg0);
    }
    if arg0.components().count() > 1 {
        return std::env::current_dir().ok().map(|d| d.join(arg0));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(&arg0))
        .find(|p| p.is_file())
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot run {path}")]
    Run {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} {what} failed ({status}): {output}")]
    Failed {
        path: PathBuf,
        what: &'static str,
        status: String,
        output: String,
    },
    #[error("{path} {what} did not finish within {CHECK_WITHIN:?}")]
    Timeout { path: PathBuf, what: &'static str },
}

/// Runs the new binary with `--version` and, with a configuration file,
/// `--check-config`: what it would do must work before this process
/// becomes it. Returns the version line it printed.
pub async fn check(program: &Path, config: Option<&Path>) -> Result<String, CheckError> {
    let version = run(program, &[OsStr::new("--version")], "--version").await?;
    if let Some(config) = config {
        let args = [OsStr::new("--check-config"), OsStr::new("--config"), config.as_os_str()];
        run(program, &args, "--check-config").await?;
    }
    Ok(version.lines().next().unwrap_or_default().trim().to_string())
}

async fn run(program: &Path, args: &[&OsStr], what: &'static str) -> Result<String, CheckError> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(CHECK_WITHIN, child).await {
        Err(_) => {
            return Err(CheckError::Timeout {
                path: program.into(),
                what,
            })
        }
        Ok(Err(source)) => {
            return Err(CheckError::Run {
                path: program.into(),
                source,
            })
        }
        Ok(Ok(out)) => out,
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        let mut output = String::from_utf8_lossy(&out.stderr).trim().to_string();
        output.truncate(1000);
        Err(CheckError::Failed {
            path: program.into(),
            what,
            status: out.status.to_string(),
            output,
        })
    }
}

/// Becomes `program` with `args`, passing `fds` from fd 3 in order with
/// their names. Returns only if that failed, and then the fds are gone
/// and the process is in no state to serve: the caller exits (under
/// systemd the store still holds everything, and the restart that follows
/// takes over).
///
/// Call with no other thread of qmpmux's left doing I/O: the fds from 3
/// on are replaced.
pub fn reexec(program: &Path, args: &[OsString], fds: Vec<(String, OwnedFd)>) -> std::io::Error {
    let errno = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    let cstr = |s: &OsStr| CString::new(s.as_bytes()).map_err(std::io::Error::other);
    let prog = match cstr(program.as_os_str()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let argv: Result<Vec<CString>, _> = args.iter().map(|a| cstr(a)).collect();
    let argv = match argv {
        Ok(a) => a,
        Err(e) => return e,
    };
    let n = fds.len();
    let names: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !matches!(k.as_bytes(), b"LISTEN_FDS" | b"LISTEN_PID" | b"LISTEN_FDNAMES"))
        .filter_map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    if n > 0 {
        let vars = [
            format!("LISTEN_PID={}", std::process::id()),
            format!("LISTEN_FDS={n}"),
            format!("LISTEN_FDNAMES={}", names.join(":")),
        ];
        env.extend(vars.into_iter().filter_map(|v| CString::new(v).ok()));
    }
    ignore_signals();
    // First out of the way of 3..3+n (above it, close-on-exec), then each
    // into its place (dup2 clears close-on-exec on the copy).
    let mut high: Vec<RawFd> = Vec::with_capacity(n);
    for (_, fd) in &fds {
        let min = RawFd::try_from(3 + n).unwrap_or(RawFd::MAX);
        match nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min)) {
            Ok(h) => high.push(h),
            Err(e) => return errno(e),
        }
    }
    drop(fds);
    for (i, h) in high.iter().enumerate() {
        let target = RawFd::try_from(3 + i).unwrap_or(RawFd::MAX);
        if let Err(e) = nix::unistd::dup2(*h, target) {
            return errno(e);
        }
    }
    match nix::unistd::execve(&prog, &argv, &env) {
        Err(e) => errno(e),
        Ok(never) => match never {},
    }
}

/// The signals qmpmux handles, ignored from here to the new program's own
/// handlers (an ignored signal stays ignored across exec): a signal
/// between would otherwise run the old handler, which writes to a pipe
/// whose number may now be one of the handed-over fds.
fn ignore_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
    for sig in [SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2] {
        // SAFETY: installs SIG_IGN, no handler code; the process execs next.
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
}
