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

pub use crate::state::{FailKind, Runstate, Status};

use crate::qmp::incoming::ReplyBytes;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

pub use session::spawn;

/// From a client task to the session (through [`SessionHandle`]'s methods).
#[derive(Debug)]
enum ToSession {
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
        request: Request,
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

/// A cloneable handle on one VM's session: the session's protocol with its
/// clients, each rule of it in one place.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    tx: mpsc::Sender<ToSession>,
    status: watch::Receiver<Status>,
}

/// The session is gone (the VM is stopping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the VM's session has stopped")]
pub struct SessionGone;

/// A forwarded request, as the client task hands it to the session.
#[derive(Debug)]
pub struct Request {
    /// The client's own number for it; its reply comes back with it.
    pub seq: u64,
    /// What follows `{"id": N` upstream.
    pub tail: Bytes,
    /// `exec-oob`: sent at once, outside the in-band window.
    pub oob: bool,
    /// A passed file descriptor, sent with the command (SCM_RIGHTS).
    pub fd: Option<std::os::fd::OwnedFd>,
    /// `getfd`/`closefd`: the session tracks who owns each name.
    pub fdname: Option<fdnames::FdNameOp>,
}

impl SessionHandle {
    /// Registers client `client`, whose messages go to `mailbox`; returns
    /// once the session knows it, so that every event after this reaches it.
    pub async fn attach(&self, client: u64, mailbox: mailbox::MailboxSender) -> Result<(), SessionGone> {
        let (attached, ack) = tokio::sync::oneshot::channel();
        let msg = ToSession::Attach {
            client,
            mailbox,
            attached,
        };
        self.tx.send(msg).await.map_err(|_| SessionGone)?;
        ack.await.map_err(|_| SessionGone)
    }

    /// Forwards a request of `client`; the reply comes to its mailbox.
    pub async fn execute(&self, client: u64, request: Request) -> Result<(), SessionGone> {
        self.tx
            .send(ToSession::Execute { client, request })
            .await
            .map_err(|_| SessionGone)
    }

    /// Client `client` left. Waits for room rather than `try_send`: when
    /// thousands of clients leave at once the inbox fills, and a lost
    /// Detach would leave the client's queued commands to be sent to QEMU,
    /// and its mailbox (and so its task's memory) with the session until
    /// the next event.
    pub async fn detach(&self, client: u64) {
        let _ = self.tx.send(ToSession::Detach { client }).await;
    }

    /// What the session publishes now.
    pub fn status(&self) -> watch::Ref<'_, Status> {
        self.status.borrow()
    }

    /// A receiver of the session's status, to wait for changes.
    pub fn watch_status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }
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
