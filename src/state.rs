//! The vocabulary the session shares with the rest of qmpmux: its runstate,
//! what it publishes about itself, and why a command failed without a reply
//! from QEMU. A leaf: it imports nothing of qmpmux but QEMU's greeting.

use crate::qmp::incoming::Greeting;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// The upstream connection's state, as in QEMU's `AsyncProtocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Runstate {
    Idle,
    Connecting,
    Running,
    Disconnecting,
}

impl fmt::Display for Runstate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Runstate::Idle => "idle",
            Runstate::Connecting => "connecting",
            Runstate::Running => "running",
            Runstate::Disconnecting => "disconnecting",
        })
    }
}

/// What the session publishes about itself.
#[derive(Debug, Clone)]
pub struct Status {
    pub runstate: Runstate,
    /// The latest greeting QEMU sent; kept while disconnected so clients can
    /// still connect and negotiate while QEMU restarts.
    pub greeting: Option<Arc<Greeting>>,
    pub last_error: Option<String>,
    /// Who holds the VM's lease (`__org.qmpmux_lease`), if anyone.
    pub lease: Option<LeaseHolder>,
}

/// The holder of a VM's lease, why, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The client that took it (a socket connection, or a NATS
    /// requester's lane).
    pub client: u64,
    /// Whether `client`'s connection is the holder (a socket client), as
    /// well as whoever presents `token`; a NATS requester is the holder
    /// only with the token (its lane is no identity: others may share it).
    pub connection: bool,
    /// The holder as people know it: client number, pid or TLS subject.
    pub who: String,
    pub reason: String,
    pub until: std::time::Instant,
    /// Shown only to the holder: never in events, logs or `qmpmux status`.
    pub token: LeaseToken,
}

/// A lease's fencing token, `<n>-<32 hex digits>`: `n` grows with every new
/// lease of the VM (renewals keep it), the rest is 128 random bits. Over
/// NATS it is what makes a command the holder's. Its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct LeaseToken(Box<str>);

impl LeaseToken {
    pub fn new(token: impl Into<Box<str>>) -> LeaseToken {
        LeaseToken(token.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `other` is this token, in time independent of where they
    /// differ (a requester cannot learn it byte by byte).
    pub fn matches(&self, other: &LeaseToken) -> bool {
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseToken(..)")
    }
}

impl LeaseHolder {
    /// `<who> (<reason>) for N more seconds`, as errors name a held lease.
    pub fn describe(&self, now: std::time::Instant) -> String {
        let left = self.until.saturating_duration_since(now).as_secs_f64().ceil();
        let reason = if self.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.reason)
        };
        format!("{}{reason} for {left:.0} more seconds", self.who)
    }

    /// The refusal another client's command gets, naming the VM, the
    /// holder, the reason and the time left.
    pub fn refusal(&self, vm: &str, now: std::time::Instant) -> String {
        format!(
            "qmpmux: VM '{vm}' is leased by {}; only queries may run until it is released",
            self.describe(now)
        )
    }
}

/// Why qmpmux, not QEMU, answers a forwarded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    /// Not connected to QEMU: not executed.
    Down(Runstate),
    /// The connection was lost with the command in flight.
    Lost,
    /// The connection was lost before the command was sent.
    NotSent,
    /// No reply within the configured command timeout.
    TimedOut { sent: bool, after: Duration },
    /// qmpmux stops (or stops serving the VM) before the reply came.
    Stopping { sent: bool },
    /// The reply exceeds `max_reply_bytes`.
    ReplyTooLarge { bytes: usize, max: usize },
    /// qmpmux's own reply (to one of its commands, or an error it gives
    /// itself) exceeds `max_reply_bytes`: the same rule as for QEMU's.
    OwnReplyTooLarge { bytes: usize, max: usize },
}

impl FailKind {
    /// Whether QEMU may have run the command all the same.
    pub fn may_have_run(self) -> bool {
        match self {
            FailKind::Lost | FailKind::ReplyTooLarge { .. } => true,
            FailKind::TimedOut { sent, .. } | FailKind::Stopping { sent } => sent,
            FailKind::NotSent | FailKind::Down(_) | FailKind::OwnReplyTooLarge { .. } => false,
        }
    }

    /// The QMP error class and description a client gets, for VM `vm`.
    /// Always GenericError: CommandNotFound would read as "this QEMU lacks
    /// the command".
    pub fn to_qmp(self, vm: &str) -> (&'static str, String) {
        let desc = match self {
            FailKind::Down(state) => {
                format!("QEMU monitor of VM '{vm}' is not connected (upstream {state}); the command was not executed")
            }
            FailKind::Lost => format!(
                "connection to QEMU monitor of VM '{vm}' was lost while the command was in flight; its outcome is unknown"
            ),
            FailKind::NotSent => format!(
                "connection to QEMU monitor of VM '{vm}' was lost before the command was sent; it was not executed"
            ),
            FailKind::TimedOut { sent: true, after } => {
                format!("QEMU monitor of VM '{vm}' did not answer within {after:?}; the command may still complete")
            }
            FailKind::TimedOut { sent: false, after } => format!(
                "the command waited {after:?} behind others for QEMU monitor of VM '{vm}'; it was not executed"
            ),
            FailKind::Stopping { sent: true } => format!(
                "qmpmux is stopping (or no longer serves VM '{vm}') before its QEMU monitor answered; the command's outcome is unknown"
            ),
            FailKind::Stopping { sent: false } => format!(
                "qmpmux is stopping (or no longer serves VM '{vm}'); the command was not sent to its QEMU monitor and was not executed"
            ),
            FailKind::ReplyTooLarge { bytes, max } => format!(
                "QEMU's reply ({bytes} bytes) is larger than this client may receive (max_reply_bytes = {max}); the command was executed"
            ),
            FailKind::OwnReplyTooLarge { bytes, max } => format!(
                "qmpmux's reply ({bytes} bytes) is larger than this client may receive (max_reply_bytes = {max}); with __org.qmpmux_query-events, ask for fewer events ('limit')"
            ),
        };
        ("GenericError", format!("qmpmux: {desc}"))
    }
}
