//! qmpmux: one upstream QMP session per VM, shared by any number of clients.
//!
//! # Layout
//! The QMP path, from QEMU to clients:
//! - [`qmp`]: the wire protocol, pure code with no I/O: framing, QEMU-style
//!   JSON, what clients send (`request`), what QEMU sends (`incoming`),
//!   and everything qmpmux itself writes (`outgoing`).
//! - `upstream`: the per-VM session task owning QEMU's socket (runstate,
//!   connect/accept, negotiation, reconnect backoff, socket watch, `getfd`
//!   names), its handle, and the clients' mailboxes.
//! - `state`: the vocabulary the session shares with the rest (runstate,
//!   status, why a command failed); a leaf.
//! - `router`: clients' turns at QEMU's queue and correlation of forwarded
//!   requests with replies; pure.
//! - `downstream`: the accept loops (unix, TCP/TLS admission, client
//!   slots) and the per-client task (negotiation, ordering, policy, fds).
//! - [`policy`], [`subject`]: who may do what: command policies, and TLS
//!   client identities printed and matched unambiguously (both with the
//!   wildcard matcher in `wildcard`).
//!
//! Around it:
//! - [`config`]: the TOML file, validated into [`config::Config`].
//! - [`listen`]: binding every socket before serving, and undoing it.
//! - `supervisor`: [`run`], the set of VMs, reload and stop.
//! - [`handover`]: what a restart of qmpmux itself hands to the next
//!   process (re-execution on SIGUSR2, systemd's file descriptor store).
//! - [`ops`]: control socket, metrics, systemd, memory trim, demo VM.
//! - `runtime`: the threads VMs run on, and quiet futures.
//! - [`error`]: formatting error chains; each module has its own errors.
// The exceptions: `recvmsg` and taking ownership of the fds it receives
// with SCM_RIGHTS, whatever the control data (downstream::fds),
// `malloc_trim` (trim), registering descriptors with tokio
// (upstream::socketwatch, runtime::sock), mapping the event journal's
// memfd (events::journal), taking ownership of the fds handed over by the
// previous process and ignoring signals before a re-execution (handover),
// lowering a thread's CPU priority (runtime::background), which have no
// safe API.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
mod downstream;
pub mod error;
pub mod events;
mod fleet;
pub mod handover;
pub mod listen;
pub mod ops;
pub mod policy;
pub mod qmp;
mod router;
mod runtime;
mod state;
pub mod subject;
mod supervisor;
mod upstream;
mod wildcard;

pub use downstream::{fds::MAX_FDS_PER_MESSAGE, MAX_HANDSHAKES};
/// A NATS command request's payload as one QMP message, or `None` (for the
/// fuzz targets, which feed it to `qmp::request::decide` as the commander does).
pub use fleet::request_frame as nats_request_frame;
pub use listen::{ListenError, Listeners};
/// Unix sockets registered for reading only; also the benchmark's clients
/// and fake upstream, which must not wake qmpmux's peers for nothing.
pub use runtime::sock;
pub use supervisor::{
    load_for_reload, run, run_from_file, run_with_reload, Reload, ReloadSummary, RunError, STOP_GRACE,
};
