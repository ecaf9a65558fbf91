//! The upstream side: one task per VM owns the QEMU monitor socket, the
//! correlation state and the set of attached clients.
//!
//! Clients talk to it only through [`SessionHandle`] (an mpsc sender); it
//! answers each client through that client's own bounded mailbox.

pub mod backoff;
mod connect;
pub mod fdnames;
pub mod mailbox;
mod session;
pub mod socketwatch;
pub mod state;

pub use state::{FailKind, Runstate, Status};

use crate::qmp::incoming::ReplyBytes;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

pub use session::spawn;

/// From a client task to the session.
#[derive(Debug)]
pub enum ToSession {
    /// A new client; `attached` is answered once it is registered.
    Attach {
        client: u64,
        mailbox: mailbox::MailboxSender,
        attached: tokio::sync::oneshot::Sender<()>,
    },
    Detach {
        client: u64,
    },
    /// Forward `{"id": N` + `tail` and route the reply to (client, seq).
    Execute {
        client: u64,
        seq: u64,
        tail: Bytes,
        /// `exec-oob`: sent at once, outside the in-band window.
        oob: bool,
        /// A passed file descriptor, sent with the command (SCM_RIGHTS).
        fd: Option<std::os::fd::OwnedFd>,
        /// `getfd`/`closefd`: the session tracks who owns each name.
        fdname: Option<fdnames::FdNameOp>,
    },
}

/// From the session to one client, in upstream order.
#[derive(Debug)]
pub enum ToClient {
    /// QEMU's reply (`error`: it is an error reply).
    Reply {
        seq: u64,
        /// Boxed: keeps `ToClient`, and so every queued message, small.
        reply: Box<ReplyBytes>,
        error: bool,
    },
    Failed {
        seq: u64,
        kind: FailKind,
    },
    /// One event line, shared by all clients.
    Event(Bytes),
}

/// A cloneable handle on one VM's session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    pub tx: mpsc::Sender<ToSession>,
    pub status: watch::Receiver<Status>,
}

#[cfg(test)]
mod tests {
    /// A client that falls behind queues many of these.
    #[test]
    fn messages_to_clients_stay_small() {
        assert!(
            std::mem::size_of::<super::ToClient>() <= 40,
            "{}",
            std::mem::size_of::<super::ToClient>()
        );
    }
}
