//! The command line for people: `qmpmux exec`, `events` (and `shell`,
//! `tap`, `fleet`). Each finds a VM by name through the daemon's control
//! socket, then talks to the VM's main socket as any client does, so the
//! socket's permissions, policy and audit apply to the person as to any
//! tool.
//!
//! Exit status, the same for every subcommand ([`CliError::exit_code`]):
//! 0 success; 1 QEMU (or qmpmux's policy) answered with an error; 2 bad
//! arguments or an unknown VM; 3 qmpmux or the VM cannot be reached (the
//! control socket, the VM's socket, QEMU not connected, the connection
//! ended); 4 `--timeout` passed first (no reply; not enough events).

pub mod args;
pub mod client;
pub mod complete;
pub mod events;
pub mod exec;
pub mod fleet;
pub mod shell;
pub mod show;
pub mod tap;

use crate::ops::control::{query_status, QueryError, VmStatus};
use crate::ops::escape::escaped;
use std::path::{Path, PathBuf};

/// Why a subcommand failed; [`CliError::exit_code`] is the one place that
/// maps these to exit statuses.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Control(#[from] QueryError),
    #[error("no VM '{vm}' in qmpmux (VMs: {known})")]
    UnknownVm { vm: String, known: String },
    #[error("cannot connect to VM '{vm}' at {path}{hint}")]
    Connect {
        vm: String,
        path: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("VM '{vm}': qmpmux closed the connection without a greeting (QEMU has not been reachable since qmpmux started; see `qmpmux status`)")]
    NoGreeting { vm: String },
    #[error("VM '{vm}': {desc}")]
    QemuDown { vm: String, desc: String },
    #[error("{class}: {desc}")]
    Qmp { class: String, desc: String },
    #[error(transparent)]
    Arguments(#[from] args::ArgsError),
    #[error("{0}")]
    Usage(String),
    #[error("VM '{vm}': the connection ended{during}")]
    Closed { vm: String, during: &'static str },
    #[error("VM '{vm}': no answer within {seconds} s")]
    Timeout { vm: String, seconds: f64 },
    #[error("VM '{vm}': {got} of {wanted} events within {seconds} s")]
    TooFew {
        vm: String,
        got: u64,
        wanted: u64,
        seconds: f64,
    },
    #[error("VM '{vm}': {what}")]
    Protocol { vm: String, what: String },
    #[error("talking to VM '{vm}'")]
    Io {
        vm: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
}

/// Exit statuses (see the module's documentation).
pub mod exit {
    pub const OK: u8 = 0;
    pub const QMP_ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const TIMED_OUT: u8 = 4;
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Qmp { .. } => exit::QMP_ERROR,
            CliError::Timeout { .. } | CliError::TooFew { .. } => exit::TIMED_OUT,
            CliError::UnknownVm { .. } | CliError::Arguments(_) | CliError::Usage(_) => exit::USAGE,
            CliError::Control(_)
            | CliError::Connect { .. }
            | CliError::NoGreeting { .. }
            | CliError::QemuDown { .. }
            | CliError::Closed { .. }
            | CliError::Protocol { .. }
            | CliError::Io { .. } => exit::UNREACHABLE,
            CliError::Fleet(e) => e.exit_code(),
        }
    }
}

/// The daemon's control socket: `control` (`--control`, `QMPMUX_CONTROL`),
/// else the configuration file's `control_socket` (read even when the file
/// is otherwise invalid), else `/run/qmpmux/qmpmux.ctl`.
pub fn control_path(config: &Path, control: Option<PathBuf>) -> PathBuf {
    control
        .or_else(|| match crate::config::Config::load(config) {
            Ok(c) => c.control_socket,
            Err(_) => crate::config::control_socket_of(config),
        })
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_DIR).join("qmpmux.ctl"))
}

/// A VM as the daemon reports it.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// Its main socket.
    pub socket: PathBuf,
    pub status: VmStatus,
}

/// VM `vm`, asked of the daemon at `control`.
pub async fn find(control: &Path, vm: &str) -> Result<Target, CliError> {
    let report = query_status(control).await?;
    match report.vms.iter().find(|v| v.name == vm) {
        Some(status) => Ok(Target {
            name: status.name.clone(),
            socket: PathBuf::from(&status.listen),
            status: status.clone(),
        }),
        None => Err(CliError::UnknownVm {
            vm: escaped(vm),
            known: if report.vms.is_empty() {
                "none".into()
            } else {
                report
                    .vms
                    .iter()
                    .map(|v| escaped(&v.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
    }
}

/// The running daemon's VM names, one per line (for shell completion).
pub async fn names(control: &Path) -> Result<Vec<String>, CliError> {
    Ok(query_status(control).await?.vms.into_iter().map(|v| v.name).collect())
}

/// Prints `text` to standard output; a closed pipe (`| head`) is the
/// reader's choice, not an error.
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

/// Prints `error` to standard error, with its sources.
pub fn report(error: &CliError) {
    eprintln!("qmpmux: {}", crate::error::chain(error));
}

/// A `--timeout` value: a number of seconds, not negative, finite (clap
/// value parser: bad values are usage errors, status 2).
pub fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.0..1e9).contains(&s) => Ok(s),
        _ => Err(format!("'{text}' is not a number of seconds")),
    }
}

/// How a subcommand reaches the daemon.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Reach {
    /// The daemon's control socket (default: `control_socket` from
    /// --config, else /run/qmpmux/qmpmux.ctl).
    #[arg(long, env = "QMPMUX_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
}
