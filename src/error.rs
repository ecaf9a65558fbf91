//! Errors qmpmux itself reports to clients, and the one place they become
//! QMP wire errors.

use crate::upstream::Runstate;
use std::time::Duration;

/// Why qmpmux, not QEMU, answers a forwarded command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("QEMU monitor of VM '{vm}' is not connected (upstream {state}); the command was not executed")]
    Down { vm: String, state: Runstate },
    #[error(
        "connection to QEMU monitor of VM '{vm}' was lost while the command was in flight; its outcome is unknown"
    )]
    Lost { vm: String },
    #[error("connection to QEMU monitor of VM '{vm}' was lost before the command was sent; it was not executed")]
    NotSent { vm: String },
    #[error("QEMU monitor of VM '{vm}' did not answer within {after:?}; the command may still complete")]
    TimedOut { vm: String, after: Duration },
    #[error("the command waited {after:?} behind others for QEMU monitor of VM '{vm}'; it was not executed")]
    QueuedTooLong { vm: String, after: Duration },
    #[error("qmpmux is stopping (or no longer serves VM '{vm}') before its QEMU monitor answered; the command's outcome is unknown")]
    StoppingSent { vm: String },
    #[error("qmpmux is stopping (or no longer serves VM '{vm}'); the command was not sent to its QEMU monitor and was not executed")]
    StoppingNotSent { vm: String },
    #[error("QEMU's reply ({bytes} bytes) is larger than this client may receive (max_reply_bytes = {max}); the command was executed")]
    ReplyTooLarge { bytes: usize, max: usize },
}

/// Why a forwarded command failed, without the VM name (which the client
/// task adds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    Down(Runstate),
    Lost,
    NotSent,
    /// No reply within the configured command timeout.
    TimedOut {
        sent: bool,
        after: Duration,
    },
    /// qmpmux stops before the reply came.
    Stopping {
        sent: bool,
    },
    /// The reply exceeds `max_reply_bytes`.
    ReplyTooLarge {
        bytes: usize,
        max: usize,
    },
}

impl FailKind {
    pub fn for_vm(self, vm: &str) -> Failure {
        let vm = vm.to_string();
        match self {
            FailKind::Down(state) => Failure::Down { vm, state },
            FailKind::Lost => Failure::Lost { vm },
            FailKind::NotSent => Failure::NotSent { vm },
            FailKind::TimedOut { sent: true, after } => Failure::TimedOut { vm, after },
            FailKind::TimedOut { sent: false, after } => Failure::QueuedTooLong { vm, after },
            FailKind::Stopping { sent: true } => Failure::StoppingSent { vm },
            FailKind::Stopping { sent: false } => Failure::StoppingNotSent { vm },
            FailKind::ReplyTooLarge { bytes, max } => Failure::ReplyTooLarge { bytes, max },
        }
    }
}

impl Failure {
    /// QMP error class and desc. Always GenericError: CommandNotFound would
    /// read as "this QEMU lacks the command".
    pub fn to_qmp(&self) -> (&'static str, String) {
        ("GenericError", format!("qmpmux: {self}"))
    }
}

/// Formats an error with its sources: `outer: inner: root`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
