//! The upstream side: one task per VM owns the QEMU monitor socket, the
//! correlation state and the set of attached clients.
//!
//! Clients talk to it only through [`SessionHandle`] (an mpsc sender); it
//! answers each client through that client's own bounded mailbox.

pub mod backoff;
mod connect;
pub mod fdnames;
mod hub;
pub mod lease;
pub mod mailbox;
mod session;
pub mod socketwatch;

pub use crate::state::{FailKind, Runstate, Status};

use crate::qmp::incoming::ReplyBytes;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};

pub use session::{spawn, Spec};

/// From a client task to the session (through [`SessionHandle`]'s methods).
#[derive(Debug)]
enum ToSession {
    /// A new client; `attached` is answered once it is registered.
    Attach {
        client: u64,
        mailbox: mailbox::MailboxSender,
        /// The events the client's socket lets through (`None`: all).
        events: Option<std::sync::Arc<[crate::policy::Glob]>>,
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
    /// One of qmpmux's own commands that the session answers (events,
    /// lease); the answer comes back as [`ToClient::Answer`] with `seq`.
    Extension {
        client: u64,
        seq: u64,
        ext: Box<Extension>,
    },
}

/// A command of qmpmux's own, for the session, and who asks.
#[derive(Debug)]
pub struct Extension {
    pub ext: crate::qmp::extensions::Extension,
    /// The client as people know it (for the lease holder).
    pub who: String,
}

/// The session's answer to a command it answers itself.
#[derive(Debug)]
pub enum Answer {
    /// `{"return": RAW}`: RAW is JSON text in QEMU's layout.
    Return(String),
    Error {
        class: &'static str,
        desc: String,
    },
    /// Refused: another client holds the VM's lease.
    Leased(String),
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
    /// The session's own answer to request `seq`.
    Answer {
        seq: u64,
        answer: Box<Answer>,
    },
    /// Kept events a resuming client asked for, numbered, oldest first:
    /// written as they are, before anything later in the mailbox.
    Replay(Box<[Bytes]>),
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
    /// Runs even while another client holds the VM's lease (`query-*`
    /// and `lease_exempt` commands).
    pub exempt: bool,
}

impl SessionHandle {
    /// Registers client `client`, whose messages go to `mailbox`; returns
    /// once the session knows it, so that every event after this reaches it.
    pub async fn attach(
        &self,
        client: u64,
        mailbox: mailbox::MailboxSender,
        events: Option<std::sync::Arc<[crate::policy::Glob]>>,
    ) -> Result<(), SessionGone> {
        let (attached, ack) = tokio::sync::oneshot::channel();
        let msg = ToSession::Attach {
            client,
            mailbox,
            events,
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

    /// One of qmpmux's commands the session answers (as
    /// [`ToClient::Answer`] with `seq`).
    pub async fn extension(&self, client: u64, seq: u64, ext: Extension) -> Result<(), SessionGone> {
        let ext = Box::new(ext);
        self.tx
            .send(ToSession::Extension { client, seq, ext })
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
