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
pub mod tap;

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
        /// A NATS requester's lane, not a connection (see
        /// [`SessionHandle::attach_requester`]).
        requester: bool,
        attached: tokio::sync::oneshot::Sender<()>,
    },
    /// A client hands its connection to the next process (see
    /// `handover`): it stays a member, its events wait in `mailbox`
    /// (which the session now holds) until the session's own handover.
    HandOver {
        client: u64,
        state: Box<crate::handover::state::ClientState>,
        mailbox: mailbox::MailboxReceiver,
    },
    /// The process hands over: answer with the VM's state and stop.
    Freeze {
        done: tokio::sync::oneshot::Sender<crate::handover::state::VmState>,
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
    /// Kept events numbered after `since`, at most `limit` (for publishers).
    Fetch {
        since: u64,
        limit: usize,
        reply: tokio::sync::oneshot::Sender<Fetched>,
    },
}

/// A client handed over by the previous process, a member of the session
/// from its start (so that it misses no event QEMU sent meanwhile).
#[derive(Debug)]
pub struct ResumedMember {
    pub client: u64,
    pub mailbox: mailbox::MailboxSender,
    /// Its socket's event patterns.
    pub events: Option<std::sync::Arc<[crate::policy::Glob]>>,
    pub resumed: Resumed,
}

/// A resumed client's event settings.
#[derive(Debug, Clone, Default)]
pub struct Resumed {
    pub numbered: bool,
    pub narrowed: Option<Vec<String>>,
}

/// Kept events, as [`SessionHandle::fetch_events`] returns them.
#[derive(Debug)]
pub struct Fetched {
    /// Oldest first.
    pub events: Vec<crate::events::history::Entry>,
    /// Events after `since` are no longer kept (see `History::since`).
    pub lost: bool,
    /// The oldest number kept.
    pub oldest: u64,
    /// The number the next event will get.
    pub next: u64,
}

/// A command of qmpmux's own, for the session, and who asks.
#[derive(Debug)]
pub struct Extension {
    pub ext: crate::qmp::extensions::Extension,
    /// The client as people know it (for the lease holder).
    pub who: String,
    /// The lease token the command carries (`Qmpmux-Lease` over NATS).
    pub token: Option<crate::state::LeaseToken>,
}

/// The session's answer to a command it answers itself.
#[derive(Debug, Clone)]
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
    /// A reply the session wrote to the client's socket itself.
    Written(Box<Written>),
    /// The fd passed with a command the session refused (the lease, QEMU
    /// not connected) before QEMU saw it: it waits for the client's next
    /// `getfd`/`add-fd` again, as QEMU keeps an fd no command took. Sent
    /// just before the refusal.
    FdBack(std::os::fd::OwnedFd),
}

/// QEMU's reply to request `seq`, which the session wrote to the client's
/// socket itself (see `mailbox::Expect`): the client takes the request off
/// its list, and writes `rest`, what the socket had no room for, before
/// anything else.
#[derive(Debug)]
pub struct Written {
    pub seq: u64,
    pub rest: Bytes,
}

impl Answer {
    /// The reply line for a request whose id was `id`.
    pub fn line(self, id: Option<&serde_json::value::RawValue>) -> Bytes {
        use crate::qmp::outgoing::{error_line, return_raw_line};
        let id = id.map(crate::qmp::json::qemu_style);
        let id = id.as_deref();
        match self {
            Answer::Return(raw) => return_raw_line(id, &raw),
            Answer::Error { class, desc } => error_line(id, class, &desc),
            Answer::Leased(desc) => error_line(id, "GenericError", &desc),
        }
    }
}

/// The error reply qmpmux gives for VM `vm` when a forwarded request
/// whose id was `id` failed without a reply from QEMU.
pub fn failure_line(vm: &str, id: Option<&serde_json::value::RawValue>, kind: FailKind) -> Bytes {
    let (class, desc) = kind.to_qmp(vm);
    let id = id.map(crate::qmp::json::qemu_style);
    crate::qmp::outgoing::error_line(id.as_deref(), class, &desc)
}

impl ToClient {
    /// The reply line a reply-like message becomes for a request whose id
    /// was `id`, with its request's number; `None` for events.
    pub fn into_reply_line(self, vm: &str, id: Option<&serde_json::value::RawValue>) -> Option<(u64, Bytes)> {
        match self {
            ToClient::Reply { seq, reply, .. } => {
                let id = id.map(crate::qmp::json::qemu_style);
                Some((seq, reply.line(id.as_deref())))
            }
            ToClient::Failed { seq, kind } => Some((seq, failure_line(vm, id, kind))),
            ToClient::Answer { seq, answer } => Some((seq, answer.line(id))),
            ToClient::Event(_) | ToClient::Replay(_) | ToClient::Written(_) | ToClient::FdBack(_) => None,
        }
    }
}

/// A cloneable handle on one VM's session: the session's protocol with its
/// clients, each rule of it in one place.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    tx: mpsc::Sender<ToSession>,
    status: watch::Receiver<Status>,
    /// The number the next event will get: changes with every event.
    events: watch::Receiver<u64>,
    /// What `qmpmux tap` sees of the VM.
    tap: std::sync::Arc<tap::TapPoint>,
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
    /// The lease token the command carries (`Qmpmux-Lease` over NATS):
    /// the holder's with the right one, refused with an ended one.
    pub lease: Option<crate::state::LeaseToken>,
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
            requester: false,
            attached,
        };
        self.tx.send(msg).await.map_err(|_| SessionGone)?;
        ack.await.map_err(|_| SessionGone)
    }

    /// Client `client` hands its connection over (see [`ToSession::HandOver`]).
    pub async fn hand_over(
        &self,
        client: u64,
        state: crate::handover::state::ClientState,
        mailbox: mailbox::MailboxReceiver,
    ) -> Result<(), SessionGone> {
        let msg = ToSession::HandOver {
            client,
            state: Box::new(state),
            mailbox,
        };
        self.tx.send(msg).await.map_err(|_| SessionGone)
    }

    /// The process hands over: the VM's state (its clients handed over
    /// so far, the lease, `getfd` names); the session then stops without
    /// closing QEMU's connection (which is kept for the next process).
    pub async fn freeze(&self) -> Result<crate::handover::state::VmState, SessionGone> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(ToSession::Freeze { done })
            .await
            .map_err(|_| SessionGone)?;
        answer.await.map_err(|_| SessionGone)
    }

    /// Registers a NATS requester's lane as client `client`: no events
    /// reach its mailbox (the fleet publishes them), `query-events` sees
    /// every event (what NATS gets), and its number is no lease identity
    /// (over NATS the lease's token is).
    pub async fn attach_requester(&self, client: u64, mailbox: mailbox::MailboxSender) -> Result<(), SessionGone> {
        let (attached, ack) = tokio::sync::oneshot::channel();
        let msg = ToSession::Attach {
            client,
            mailbox,
            events: Some(std::sync::Arc::from(Vec::new())),
            requester: true,
            attached,
        };
        self.tx.send(msg).await.map_err(|_| SessionGone)?;
        ack.await.map_err(|_| SessionGone)?;
        self.tap.joined(tap::Who {
            client,
            peer: tap::PeerId::Nats,
            listener: None,
        });
        Ok(())
    }

    /// Forwards a request of `client`; the reply comes to its mailbox.
    pub async fn execute(&self, client: u64, request: Request) -> Result<(), SessionGone> {
        if self.tap.on() {
            self.tap.offer(tap::What::Request {
                client,
                seq: request.seq,
                tail: request.tail.clone(),
            });
        }
        self.tx
            .send(ToSession::Execute { client, request })
            .await
            .map_err(|_| SessionGone)
    }

    /// One of qmpmux's commands the session answers (as
    /// [`ToClient::Answer`] with `seq`); taps see its name.
    pub async fn extension(&self, client: u64, seq: u64, ext: Extension) -> Result<(), SessionGone> {
        self.extension_as(client, seq, ext, None).await
    }

    /// [`SessionHandle::extension`], which taps see as `tail` (what
    /// follows `{"id": N` in the request as the client sent it).
    pub async fn extension_as(
        &self,
        client: u64,
        seq: u64,
        ext: Extension,
        tail: Option<Bytes>,
    ) -> Result<(), SessionGone> {
        if self.tap.on() {
            let tail = tail.unwrap_or_else(|| {
                Bytes::from(format!(
                    ",\"execute\":{}}}",
                    crate::qmp::outgoing::json_str(ext.ext.name())
                ))
            });
            self.tap.offer(tap::What::Request { client, seq, tail });
        }
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
        self.tap.left(client);
        let _ = self.tx.send(ToSession::Detach { client }).await;
    }

    /// What `qmpmux tap` sees of the VM: clients join and make records
    /// there.
    pub fn tap(&self) -> &std::sync::Arc<tap::TapPoint> {
        &self.tap
    }

    /// Whether both handles reach the same session (a VM restarted by a
    /// reload has a new one).
    pub fn same_session(&self, other: &SessionHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// What the session publishes now.
    pub fn status(&self) -> watch::Ref<'_, Status> {
        self.status.borrow()
    }

    /// A receiver of the number the next event will get, to wait for
    /// events.
    pub fn watch_events(&self) -> watch::Receiver<u64> {
        self.events.clone()
    }

    /// Kept events numbered after `since`, at most `limit`.
    pub async fn fetch_events(&self, since: u64, limit: usize) -> Result<Fetched, SessionGone> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.tx
            .send(ToSession::Fetch { since, limit, reply })
            .await
            .map_err(|_| SessionGone)?;
        answer.await.map_err(|_| SessionGone)
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
