//! qmpmux: one upstream QMP session per VM, shared by any number of clients.
//!
//! # Layout
//! - [`config`]: the TOML file, validated into [`config::Config`].
//! - [`qmp`]: the wire protocol (framing, QEMU-style JSON, request checks,
//!   upstream messages); pure code, no I/O.
//! - [`router`]: clients' turns at QEMU's queue and correlation of forwarded
//!   requests with replies; pure.
//! - [`upstream`]: the per-VM session task owning QEMU's socket.
//! - [`downstream`]: listeners and per-client tasks.
//! - [`subject`]: TLS client identities, printed and matched unambiguously.
//! - [`shards`]: the threads VMs run on, one VM wholly on one thread.
//! - [`supervisor`]: [`run`], tying it together until shutdown.
//! - [`systemd`]: readiness notifications, and the watchdog, fed while the
//!   VM threads answer.
//! - [`trim`]: freed memory handed back after many clients leave.
//! - [`error`]: qmpmux's own failures and their QMP wire form.
// The exceptions: `recvmsg` and taking ownership of the fds it receives
// with SCM_RIGHTS, whatever the control data (downstream::fds),
// `malloc_trim` (trim) and registering an inotify descriptor with tokio
// (upstream::socketwatch), which have no safe API.
#![deny(unsafe_code)]

pub mod config;
pub mod control;
pub mod demo;
pub mod downstream;
pub mod error;
pub mod metrics;
pub mod policy;
pub mod qmp;
pub mod quiet;
pub mod router;
pub mod shards;
pub mod subject;
pub mod supervisor;
pub mod systemd;
pub mod trim;
pub mod upstream;

pub use supervisor::{run, run_with_reload, Listeners, Reload, ReloadSummary, RunError};
