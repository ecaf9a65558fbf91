//! One client connection: QMP as QEMU would speak it, backed by the shared
//! upstream session.
//!
//! The task owns the socket and a FIFO of reply slots, one per request in
//! the order the client sent them. Local answers fill their slot at once,
//! forwarded ones when the session routes the reply back; slots leave the
//! FIFO only from the front, so every client sees its replies in request
//! order whatever answered them. Events go out as they come.
//!
//! While the task waits with nothing of its own to write, the session may
//! write to its socket itself (see `upstream::mailbox`): events, and the
//! reply to the request at the front of the FIFO, which the task then takes
//! off the FIFO when it next wakes (a `ToClient::Written`).

use super::fds::ClientReader;
use crate::config::{ClientOptions, ListenerConfig};
use crate::ops::metrics::Disconnect;
use crate::qmp::extensions::{self, Extension};
use crate::qmp::framing::{Frame, JsonFramer, Limits};
use crate::qmp::incoming::Greeting;
use crate::qmp::json::qemu_style;
use crate::qmp::outgoing::{error_line, return_line, NO_FD_PASSED};
use crate::qmp::request::{decide, Caps, Decision, Session};
use crate::runtime::quiet::Quiet;
use crate::runtime::sock::Direct;
use crate::upstream::fdnames::FdNameOp;
use crate::upstream::mailbox::{mailbox, Expect, MailboxReceiver};
use crate::upstream::{failure_line, Answer, FailKind, Request, SessionHandle, ToClient};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use serde_json::value::RawValue;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Stop taking replies and events from the mailbox while this much is
/// waiting to be written (or half the client's queue budget, if smaller);
/// the mailbox then fills and the session drops a client that does not
/// read. A client that stops reading thus costs at most about 1.5 times
/// `max_queue_bytes`, plus the kernel's socket buffer. Requests are not
/// read while this much output waits, answered ones behind an unanswered
/// one included: whatever answers them, QEMU, the session or this task.
const OUTBUF_HIGH: usize = 1 << 20;

/// How long a client handing over waits for QEMU's replies to its
/// commands in flight; those still unanswered then go to the next process
/// with it, which routes their replies to it (in order, with their ids).
const DRAIN_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stopping qmpmux tries to write a client's last replies.
const FINAL_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

/// How long after EOF to look again whether the client closed its whole
/// connection rather than only its sending side.
const PEER_GONE_RECHECK: std::time::Duration = std::time::Duration::from_millis(50);

/// What every client of one VM shares.
#[derive(Debug, Clone)]
pub struct ClientContext {
    pub vm: Arc<str>,
    pub session: SessionHandle,
    pub opts: ClientOptions,
    /// Graceful stop: read no more requests, answer those in flight, close.
    pub stop: CancellationToken,
    /// Immediate stop (the grace period is over).
    pub hard: CancellationToken,
    pub metrics: crate::ops::metrics::VmMetrics,
    /// The socket this client came in on, and its policy.
    pub listener: Arc<ListenerConfig>,
    /// Its place in the VM's listeners (0: the main socket).
    pub listener_index: usize,
    /// qmpmux hands over to its next process: read no more requests,
    /// answer those in flight, then hand the connection over.
    pub handover: CancellationToken,
    /// Keeps handed-over connections for the next process.
    pub keeper: Arc<crate::handover::Keeper>,
}

enum Slot {
    /// Forwarded; waiting for the session.
    Waiting {
        seq: u64,
        id: Option<Box<RawValue>>,
        /// Command name and start, for the audit log.
        audit: Option<(String, Instant)>,
        /// `exec-oob`: its reply goes out as soon as it comes, ahead of
        /// earlier in-band replies (as QEMU's would).
        oob: bool,
        /// Bytes of the request, counted in `pending_bytes` until answered.
        bytes: usize,
    },
    Ready(Bytes),
}

/// Who is on the other end.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A unix socket's peer, by SO_PEERCRED.
    Unix { pid: i32, uid: u32, gid: u32 },
    /// A TCP peer: `tcp:ADDR`, or with TLS `tls:SUBJECT@ADDR` (the
    /// certificate's subject, escaped per RFC 4514).
    Tcp { remote: Arc<str> },
}

impl Peer {
    /// pid, uid and gid, for logs: none for a TCP peer.
    fn ids(&self) -> (Option<i32>, Option<u32>, Option<u32>) {
        match self {
            Peer::Unix { pid, uid, gid } => (Some(*pid), Some(*uid), Some(*gid)),
            Peer::Tcp { .. } => (None, None, None),
        }
    }

    /// Client `id` as people know it: with its pid and uid, or its TLS
    /// subject and address.
    fn describe(&self, id: u64) -> String {
        match self {
            Peer::Unix { pid, uid, .. } => format!("client {id} (pid {pid}, uid {uid})"),
            Peer::Tcp { remote } => format!("client {id} ({remote})"),
        }
    }

    /// Client `id` as `qmpmux tap` shows it.
    fn tap_who(&self, id: u64, listener: &Arc<ListenerConfig>) -> crate::upstream::tap::Who {
        use crate::upstream::tap::PeerId;
        let peer = match self {
            Peer::Unix { pid, uid, .. } => PeerId::Unix { pid: *pid, uid: *uid },
            Peer::Tcp { remote } => PeerId::Remote(remote.clone()),
        };
        crate::upstream::tap::Who {
            client: id,
            peer,
            listener: Some(listener.clone()),
        }
    }

    /// The remote address and identity, for logs: `-` for a unix peer.
    fn remote(&self) -> &str {
        match self {
            Peer::Unix { .. } => "-",
            Peer::Tcp { remote } => remote,
        }
    }
}

struct Client {
    id: u64,
    peer: Peer,
    ctx: Arc<ClientContext>,
    qmp: Session,
    offered: Caps,
    slots: VecDeque<Slot>,
    next_seq: u64,
    outbuf: BytesMut,
    /// Answer what was asked, then disconnect, for this reason.
    closing: Option<End>,
    /// Bytes of forwarded requests not answered yet.
    pending_bytes: usize,
    /// The client shut down its sending side.
    eof: bool,
    /// After EOF with commands outstanding: one more look, a moment later,
    /// at whether the client closed its whole connection.
    recheck: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// The request whose reply the mailbox knows this client waits for
    /// first (see `Expect`).
    expecting: Option<u64>,
    /// Bytes of the `Slot::Ready` lines, counted with `outbuf` against
    /// reading more requests.
    ready_bytes: usize,
    /// No request is read until request `seq` is answered: one of
    /// qmpmux's commands the session answers (at once, and up to the
    /// whole event history: one at a time keeps a client that pipelines
    /// them within its budget), a command the lease will likely refuse
    /// (likewise), or a command that took a passed fd (which may come
    /// back, refused, for the next `getfd`).
    hold: Option<u64>,
    /// A passed fd that came back with a refusal, for the next request.
    returned_fd: Option<std::os::fd::OwnedFd>,
    /// An `__org.qmpmux_subscribe` sent before `qmp_capabilities`: events
    /// reach the client from its answer on (see `takes_events`).
    early_subscribe: Option<u64>,
    subscribed_early: bool,
    /// Handing over: no request is read; once every one is answered, the
    /// connection goes to the next process. Until then, this bounds the
    /// wait for QEMU (see [`DRAIN_BOUND`]).
    draining: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    handing_over: bool,
    /// The wait is over: the commands still unanswered go to the next
    /// process with the connection (their replies too).
    drained: bool,
}

/// Why the client's connection ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    Io(std::io::Error),
    Shutdown,
    /// The session dropped our mailbox: we did not keep up, or the VM went.
    Dropped,
    NoGreeting,
    /// Sent input beyond a size or nesting limit.
    Limit,
    /// A bug in qmpmux; only this client is affected.
    Panic,
    /// Handed to the next qmpmux process, connection open.
    HandedOver,
}

/// Serves one client until it leaves; `direct`: its socket, for events the
/// session writes itself (unix clients).
pub async fn run<R, W>(read: R, write: W, direct: Option<Direct>, id: u64, peer: Peer, ctx: Arc<ClientContext>)
where
    R: AsyncRead + Unpin + Send + ClientReader + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (pid, uid, gid) = peer.ids();
    info!(client = id, listener = %ctx.listener.name, pid, uid, gid, remote = peer.remote(), "client connected");
    ctx.session.tap().joined(peer.tap_who(id, &ctx.listener));
    let end = AssertUnwindSafe(serve(read, write, direct, id, peer, ctx.clone()))
        .catch_unwind()
        .await
        .unwrap_or(End::Panic);
    after(end, id, &ctx).await;
}

/// The client's task ends with `end`: the session is told, and the log.
async fn after(end: End, id: u64, ctx: &ClientContext) {
    if matches!(end, End::HandedOver) {
        info!(client = id, "client handed over to the next qmpmux process");
        return;
    }
    ctx.session.detach(id).await;
    let by_qmpmux = match end {
        End::Dropped => Some(Disconnect::SlowReader),
        End::Limit => Some(Disconnect::InputLimit),
        End::NoGreeting => Some(Disconnect::NoUpstream),
        End::Shutdown => Some(Disconnect::Shutdown),
        End::Panic => Some(Disconnect::InternalError),
        End::ClientClosed | End::Io(_) | End::HandedOver => None,
    };
    if let Some(why) = by_qmpmux {
        ctx.metrics.disconnected(why);
    }
    match end {
        End::Io(e) => info!(client = id, error = %e, "client disconnected"),
        End::Dropped => info!(client = id, "client disconnected by qmpmux: it was not reading"),
        End::NoGreeting => info!(
            client = id,
            "client disconnected: QEMU has not been reachable since qmpmux started"
        ),
        End::Limit => warn!(
            client = id,
            "client disconnected: its input exceeded a size or nesting limit"
        ),
        End::Panic => error!(client = id, "client task failed (a bug in qmpmux); client disconnected"),
        other => info!(client = id, reason = ?other, "client disconnected"),
    }
}

async fn serve<R, W>(read: R, write: W, direct: Option<Direct>, id: u64, peer: Peer, ctx: Arc<ClientContext>) -> End
where
    R: AsyncRead + Unpin + ClientReader,
    W: AsyncWrite + Unpin,
{
    let Some(greeting) = wait_for_greeting(&ctx).await else {
        return if ctx.stop.is_cancelled() {
            End::Shutdown
        } else {
            End::NoGreeting
        };
    };
    // Small to start with: most clients are idle most of the time; the
    // buffer grows for the rare large request.
    let reader: Reader<R> = Quiet::new(FramedRead::with_capacity(read, JsonFramer::new(limits(&ctx)), 256));
    let (mailbox_tx, mut mailbox) = mailbox(ctx.opts.max_queue_bytes);
    if let Some(direct) = direct {
        mailbox.set_direct(direct);
    }
    // The session must know this client before the client can negotiate:
    // every event after that reaches it.
    if ctx
        .session
        .attach(id, mailbox_tx, ctx.listener.events.clone())
        .await
        .is_err()
    {
        return End::Shutdown;
    }
    let mut client = Client::new(id, peer, ctx, greeting.oob);
    client.outbuf.extend_from_slice(&greeting.line(true));
    client.serve(reader, write, mailbox).await
}

/// Serves a client the previous qmpmux process handed over, from where it
/// stood: no greeting (it had it), its negotiation, the bytes it had sent
/// that were not yet a whole request, the bytes owed to it.
pub async fn resume<R, W>(
    read: R,
    write: W,
    direct: Direct,
    mut mailbox: MailboxReceiver,
    state: crate::handover::state::ClientState,
    peer: Peer,
    ctx: Arc<ClientContext>,
) where
    R: AsyncRead + Unpin + Send + ClientReader + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = state.id;
    let (pid, uid, gid) = peer.ids();
    info!(client = id, listener = %ctx.listener.name, pid, uid, gid, "client resumed from the previous qmpmux process");
    ctx.session.tap().joined(peer.tap_who(id, &ctx.listener));
    let serve = async {
        let oob = ctx.session.status().greeting.as_ref().is_some_and(|g| g.oob);
        let mut reader: Reader<R> = Quiet::new(FramedRead::with_capacity(read, JsonFramer::new(limits(&ctx)), 256));
        reader.get_mut().read_buffer_mut().extend_from_slice(&state.unread);
        // The session made it a member when it started.
        mailbox.set_direct(direct);
        let mut client = Client::new(id, peer, ctx.clone(), oob);
        client.qmp.negotiated = state.negotiated;
        client.qmp.enabled = Caps { oob: state.oob };
        client.subscribed_early = state.subscribed_early;
        client.outbuf.extend_from_slice(&state.unwritten);
        client.next_seq = state.next_seq;
        for slot in state.slots {
            if slot.answered {
                client.ready_bytes += slot.line.len();
                client.slots.push_back(Slot::Ready(slot.line.into()));
            } else {
                client.pending_bytes += slot.bytes;
                client.slots.push_back(Slot::Waiting {
                    seq: slot.seq,
                    id: slot.id.and_then(|j| RawValue::from_string(j).ok()),
                    audit: None,
                    oob: slot.oob,
                    bytes: slot.bytes,
                });
            }
        }
        client.flush_ready();
        client.serve(reader, write, mailbox).await
    };
    let end = AssertUnwindSafe(serve).catch_unwind().await.unwrap_or(End::Panic);
    after(end, id, &ctx).await;
}

fn limits(ctx: &ClientContext) -> Limits {
    Limits {
        max_message: ctx.opts.max_message_bytes,
        max_depth: ctx.opts.max_depth,
    }
}

/// What the loop of [`Client::run`] reads from.
type Reader<R> = Quiet<FramedRead<R, JsonFramer>>;

impl Client {
    /// A client that has sent nothing yet; QEMU offers OOB if `oob`.
    fn new(id: u64, peer: Peer, ctx: Arc<ClientContext>, oob: bool) -> Client {
        Client {
            id,
            peer,
            // OOB is offered when QEMU offers it: qmpmux forwards exec-oob at
            // once and lets its reply overtake.
            offered: Caps { oob },
            ctx,
            qmp: Session::default(),
            slots: VecDeque::new(),
            next_seq: 0,
            outbuf: BytesMut::new(),
            closing: None,
            pending_bytes: 0,
            eof: false,
            recheck: None,
            expecting: None,
            ready_bytes: 0,
            hold: None,
            returned_fd: None,
            early_subscribe: None,
            subscribed_early: false,
            draining: None,
            handing_over: false,
            drained: false,
        }
    }

    /// Serves the connection until it ends or is handed over.
    async fn serve<R, W>(mut self, mut reader: Reader<R>, mut write: W, mut mailbox: MailboxReceiver) -> End
    where
        R: AsyncRead + Unpin + ClientReader,
        W: AsyncWrite + Unpin,
    {
        let end = self.run(&mut reader, &mut write, &mut mailbox).await;
        if matches!(end, End::HandedOver) {
            return self.hand_over(reader, mailbox).await;
        }
        self.finish(end, &mut write, &mut mailbox).await
    }

    /// Hands the connection to the next process: what it is in the
    /// session's terms, the bytes read but not yet a request, those owed
    /// but not yet written; the socket (and a passed fd) kept under names
    /// of its own. Its events from now on wait in the mailbox, which the
    /// session takes.
    async fn hand_over<R: AsyncRead + Unpin + ClientReader>(
        mut self,
        mut reader: Reader<R>,
        mut mailbox: MailboxReceiver,
    ) -> End {
        // From now on the session writes nothing to the socket itself.
        mailbox.expect(None);
        mailbox.allow_direct(false);
        while let Some(msg) = mailbox.try_recv() {
            self.on_session(msg);
        }
        self.flush_ready();
        let slots = std::mem::take(&mut self.slots)
            .into_iter()
            .map(|slot| match slot {
                Slot::Waiting {
                    seq, id, oob, bytes, ..
                } => crate::handover::state::SlotState {
                    seq,
                    id: id.map(|i| i.get().to_string()),
                    oob,
                    bytes,
                    answered: false,
                    line: Vec::new(),
                },
                Slot::Ready(line) => crate::handover::state::SlotState {
                    answered: true,
                    line: line.to_vec(),
                    ..Default::default()
                },
            })
            .collect();
        let vm = self.ctx.vm.clone();
        let keeper = self.ctx.keeper.clone();
        let unread = reader.get_ref().read_buffer().to_vec();
        let passed = self.returned_fd.take().or_else(|| reader.get_mut().get_mut().take_fd());
        let Some(socket) = reader.get_ref().get_ref().socket() else {
            return End::Shutdown;
        };
        keeper.keep(&crate::handover::names::client(&vm, self.id), socket);
        if let Some(fd) = &passed {
            keeper.keep(
                &crate::handover::names::passed(&vm, self.id),
                std::os::fd::AsFd::as_fd(fd),
            );
        }
        let state = crate::handover::state::ClientState {
            id: self.id,
            listener: self.ctx.listener_index,
            negotiated: self.qmp.negotiated,
            oob: self.qmp.enabled.oob,
            subscribed_early: self.subscribed_early,
            numbered: false,
            narrowed: None,
            unread,
            unwritten: std::mem::take(&mut self.outbuf).to_vec(),
            passed_fd: passed.is_some(),
            slots,
            next_seq: self.next_seq,
        };
        if self.ctx.session.hand_over(self.id, state, mailbox).await.is_err() {
            return End::Shutdown;
        }
        End::HandedOver
    }

    /// Serves the connection until it ends: requests in, replies and events
    /// out, in one `select!` whose arms are the methods below.
    async fn run<R, W>(&mut self, reader: &mut Reader<R>, write: &mut W, mailbox: &mut MailboxReceiver) -> End
    where
        R: AsyncRead + Unpin + ClientReader,
        W: AsyncWrite + Unpin,
    {
        let (stop, hard) = (self.ctx.stop.clone(), self.ctx.hard.clone());
        // Created once, not on every pass of the loop, and polled only once
        // they have something to say (see `quiet`).
        let handover = self.ctx.handover.clone();
        let (stopped, killed, handing) = (stop.cancelled(), hard.cancelled(), handover.cancelled());
        tokio::pin!(stopped, killed, handing);
        let (mut stopped, mut killed, mut handing) = (Quiet::new(stopped), Quiet::new(killed), Quiet::new(handing));
        let outbuf_high = OUTBUF_HIGH.min(self.ctx.opts.max_queue_bytes / 2);
        loop {
            if self.handing_over && self.closing.is_none() && (self.slots.is_empty() || self.drained) {
                return End::HandedOver;
            }
            if (self.eof || self.closing.is_some()) && self.slots.is_empty() && self.outbuf.is_empty() {
                return self.closing.take().unwrap_or(End::ClientClosed);
            }
            let can_read = !self.eof
                && !self.handing_over
                && self.closing.is_none()
                && self.hold.is_none()
                && self.slots.len() < self.ctx.opts.max_in_flight
                && self.pending_bytes < self.ctx.opts.max_pending_bytes
                && self.outbuf.len() + self.ready_bytes < outbuf_high;
            // With nothing of its own to write, the session may write
            // events to the socket itself (it runs only while this waits),
            // and the reply this client waits for first.
            self.expect(mailbox, can_read);
            mailbox.allow_direct(self.takes_events() && self.outbuf.is_empty());
            // Cancel-safe branches only: FramedRead::next, Mailbox::recv, one
            // write, a sleep. Polled in this order, stopping at the first
            // ready one: a wake-up for a reply or event polls only the
            // mailbox, then the write. The stop signals, rarely ready, come
            // last, and (`Quiet`) reach their tokens only once those have
            // fired; a busy task still gets to them, as tokio's budget makes
            // it wait now and then.
            let ended = tokio::select! {
                biased;
                msg = mailbox.recv(), if self.outbuf.len() < outbuf_high => self.on_mailbox(msg, mailbox, outbuf_high),
                r = write.write_buf(&mut self.outbuf), if !self.outbuf.is_empty() => on_written(r),
                frame = reader.next(), if can_read => self.on_read(frame, reader).await,
                () = async { if let Some(r) = self.recheck.as_mut() { r.await } }, if self.recheck.is_some() => {
                    self.recheck = None;
                    reader.get_ref().get_ref().peer_gone().then_some(End::ClientClosed)
                }
                () = &mut stopped, if self.closing.is_none() => {
                    self.closing = Some(End::Shutdown);
                    None
                }
                () = &mut handing, if !self.handing_over && self.closing.is_none() => {
                    self.start_handover(reader.get_ref().get_ref().socket().is_some());
                    None
                }
                () = async { if let Some(d) = self.draining.as_mut() { d.await } }, if self.draining.is_some() => {
                    self.draining = None;
                    self.drained = true;
                    info!(client = self.id, waiting = self.slots.len(), "QEMU still has commands of this client; they go to the next process with it");
                    None
                }
                () = &mut killed => Some(End::Shutdown),
            };
            if let Some(end) = ended {
                return end;
            }
        }
    }

    /// qmpmux hands over: a unix client stops reading and goes to the next
    /// process once its commands are answered; any other (TLS: its session
    /// cannot move) is closed after its replies, as when qmpmux stops.
    fn start_handover(&mut self, movable: bool) {
        if movable {
            self.handing_over = true;
            self.draining = Some(Box::pin(tokio::time::sleep(DRAIN_BOUND)));
        } else {
            self.closing = Some(End::Shutdown);
        }
    }

    /// Tells the mailbox which reply this client waits for first: the one
    /// to the request at the front of its list. A direct reply does not
    /// wake the client, so only while it reads (`reading`: one that waits
    /// for room or is leaving must be woken by its replies), and not for a
    /// command the audit log records (its line is due when it ends).
    fn expect(&mut self, mailbox: &mut MailboxReceiver, reading: bool) {
        let first = match self.slots.front() {
            Some(Slot::Waiting {
                seq, id, audit: None, ..
            }) if reading => Some((*seq, id)),
            _ => None,
        };
        if first.map(|(seq, _)| seq) == self.expecting {
            return;
        }
        self.expecting = first.map(|(seq, _)| seq);
        mailbox.expect(first.map(|(seq, id)| Expect {
            seq,
            id: id.as_deref().map(qemu_style),
            max_reply: self.ctx.opts.max_reply_bytes,
        }));
    }

    /// A message from the session, and any others already waiting, to be
    /// written in one go; `None` from the mailbox: the session let go.
    fn on_mailbox(&mut self, msg: Option<ToClient>, mailbox: &mut MailboxReceiver, outbuf_high: usize) -> Option<End> {
        let Some(msg) = msg else {
            // It is stopping (VM removed, or qmpmux stopping), or dropped a
            // client that did not read.
            let stopping = self.ctx.stop.is_cancelled() || self.ctx.hard.is_cancelled();
            return Some(if stopping { End::Shutdown } else { End::Dropped });
        };
        self.on_session(msg);
        while self.outbuf.len() < outbuf_high {
            let Some(msg) = mailbox.try_recv() else { break };
            self.on_session(msg);
        }
        None
    }

    /// A frame from the client, or the end of its input.
    async fn on_read<R>(&mut self, frame: Option<std::io::Result<Frame>>, reader: &mut Reader<R>) -> Option<End>
    where
        R: AsyncRead + Unpin + ClientReader,
    {
        match frame {
            Some(Ok(frame)) => {
                self.on_frame(frame, reader.get_mut().get_mut()).await;
                None
            }
            Some(Err(e)) => Some(End::Io(e)),
            // The client closed its whole connection: nothing can reach it,
            // and, as QEMU does, what it left queued is dropped (on Detach)
            // rather than run.
            None if reader.get_ref().get_ref().peer_gone() => Some(End::ClientClosed),
            // Only its sending side, so far: answer what it asked, and look
            // again a moment later (a close right after a shutdown of the
            // sending side reaches qmpmux as two events).
            None => {
                self.eof = true;
                self.recheck = Some(Box::pin(tokio::time::sleep(PEER_GONE_RECHECK)));
                None
            }
        }
    }

    /// The connection ended with `end`. When qmpmux stops (the grace period
    /// is over, or the session is gone), what QEMU has not answered gets an
    /// error with its id, not a bare EOF, and whatever can still be written
    /// in a moment goes out. Commands still unanswered were sent all the
    /// same: they are audited too. (The `getfd` names this client still owns
    /// are closed by the session when it sees the Detach.)
    async fn finish<W: AsyncWrite + Unpin>(&mut self, end: End, write: &mut W, mailbox: &mut MailboxReceiver) -> End {
        // What is written from now on is this task's alone.
        mailbox.allow_direct(false);
        // What waits is written when qmpmux stops; replies the session
        // wrote itself were delivered in any case.
        let shutdown = matches!(end, End::Shutdown);
        while let Some(msg) = mailbox.try_recv() {
            if shutdown || matches!(msg, ToClient::Written(_)) {
                self.on_session(msg);
            }
        }
        if shutdown {
            self.stop_waiting();
            if !self.outbuf.is_empty() {
                let _ = tokio::time::timeout(FINAL_FLUSH, write.write_all_buf(&mut self.outbuf)).await;
            }
            let _ = tokio::time::timeout(FINAL_FLUSH, write.shutdown()).await;
        }
        for slot in std::mem::take(&mut self.slots) {
            if let Slot::Waiting {
                audit: Some((command, start)),
                ..
            } = slot
            {
                self.audit(&command, Outcome::NoReply, start);
            }
        }
        end
    }
}

/// One write to the client done.
fn on_written(r: std::io::Result<usize>) -> Option<End> {
    match r {
        Ok(0) => Some(End::ClientClosed),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Some(End::ClientClosed),
        Err(e) => Some(End::Io(e)),
    }
}

/// QEMU's latest greeting, waiting (bounded) for QEMU to be seen once.
async fn wait_for_greeting(ctx: &ClientContext) -> Option<Arc<Greeting>> {
    let mut status = ctx.session.watch_status();
    let wait = status.wait_for(|s| s.greeting.is_some());
    let found = tokio::select! {
        r = tokio::time::timeout(ctx.opts.greeting_wait, wait) => r.ok()?.ok()?.greeting.clone(),
        () = ctx.stop.cancelled() => None,
    };
    found
}

impl Client {
    /// Whether events reach the client: once it has negotiated, or
    /// subscribed before that (from its subscription's point on).
    fn takes_events(&self) -> bool {
        self.qmp.negotiated || self.subscribed_early
    }

    /// Whether another client holds the VM's lease: this client's next
    /// command that is not exempt will most likely be refused, by the
    /// session, at once, with a text the holder chose. Such refusals are
    /// then made one at a time, as the client reads, like the answers to
    /// qmpmux's own commands (see `hold`). Read per such command only.
    fn leased_by_another(&self) -> bool {
        let status = self.ctx.session.status();
        status.lease.as_ref().is_some_and(|h| h.client != self.id)
    }

    /// A reply line made here to `request` (as the client sent it, when a
    /// tap is attached), which taps see: ready to go in this client's order.
    fn push_local(&mut self, request: Option<Bytes>, line: Bytes) {
        let tap = self.ctx.session.tap();
        if tap.on() {
            tap.offer(crate::upstream::tap::What::Local {
                client: self.id,
                request,
                reply: line.clone(),
            });
        }
        self.push_ready(line);
    }

    /// A reply line made by qmpmux, ready to go in this client's order.
    fn push_ready(&mut self, line: Bytes) {
        let line = bounded(&self.ctx.vm, self.ctx.opts.max_reply_bytes, line);
        self.ready_bytes += line.len();
        self.slots.push_back(Slot::Ready(line));
    }

    async fn on_frame(&mut self, frame: Frame, passed: &mut impl ClientReader) {
        if matches!(frame, Frame::Limit(_)) {
            self.closing = Some(End::Limit);
        }
        // Refused before QEMU saw it: it waits as if no command had come
        // (nothing was read meanwhile, see `hold`).
        if let Some(fd) = self.returned_fd.take() {
            passed.restore_fd(fd);
        }
        // What the client sent, for taps (only when one is attached).
        let raw = match &frame {
            Frame::Message(bytes) if self.ctx.session.tap().on() => Some(bytes.clone()),
            _ => None,
        };
        let policy = &self.ctx.listener.policy;
        match decide(frame, &mut self.qmp, self.offered, |c, a| policy.admit(c, a)) {
            Decision::Local(line) => self.push_local(raw, line),
            Decision::Denied { line, command } => {
                self.ctx.metrics.refusals.inc();
                self.audit(&command, Outcome::Denied, Instant::now());
                self.push_local(raw, line);
            }
            // QEMU's own answer, given here: forwarded, it could take
            // another client's fd, one that reaches QEMU's shared
            // connection before it runs (QEMU reads ahead with OOB on).
            Decision::Forward(fwd) if fwd.takes_fd && !passed.has_fd() => {
                let id = fwd.id.as_deref().map(qemu_style);
                let line = error_line(id.as_deref(), "GenericError", NO_FD_PASSED);
                self.audit(&fwd.command, Outcome::Error, Instant::now());
                self.push_local(raw, line);
            }
            Decision::Forward(fwd) if extensions::is_extension(&fwd.command) => self.extension(fwd, raw).await,
            Decision::Forward(fwd) => {
                let seq = self.next_seq;
                self.next_seq += 1;
                debug!(client = self.id, command = %fwd.command, "forward");
                // Otherwise (exec-oob, other commands, arguments QEMU
                // rejects) QEMU would keep the fd for the next one.
                let fd = if fwd.takes_fd { passed.take_fd() } else { None };
                // Queries change nothing: the audit log is for the rest, and
                // they run even while another client holds the lease.
                let exempt = crate::upstream::lease::exempt(&fwd.command, &self.ctx.opts.lease_exempt);
                if fd.is_some() || (!exempt && self.leased_by_another()) {
                    self.hold = Some(seq);
                }
                let fdname = fwd.fdname.map(|n| match fwd.command.as_str() {
                    "getfd" => FdNameOp::Get(n),
                    _ => FdNameOp::Close(n),
                });
                let audit = (!fwd.command.starts_with("query-")).then(|| (fwd.command, Instant::now()));
                let bytes = fwd.tail.len();
                self.pending_bytes += bytes;
                self.slots.push_back(Slot::Waiting {
                    seq,
                    id: fwd.id,
                    audit,
                    oob: fwd.oob,
                    bytes,
                });
                let request = Request {
                    seq,
                    tail: fwd.tail,
                    oob: fwd.oob,
                    fd,
                    fdname,
                    exempt,
                    lease: None,
                };
                if self.ctx.session.execute(self.id, request).await.is_err() {
                    let vm = self.ctx.vm.clone();
                    self.fill(seq, Outcome::QmpmuxError, |id| failure_line(&vm, id, FailKind::NotSent));
                }
            }
        }
        self.flush_ready();
    }

    fn on_session(&mut self, msg: ToClient) {
        match msg {
            ToClient::Reply { seq, reply, .. } if reply.len() > self.ctx.opts.max_reply_bytes => {
                let kind = FailKind::ReplyTooLarge {
                    bytes: reply.len(),
                    max: self.ctx.opts.max_reply_bytes,
                };
                warn!(
                    client = self.id,
                    bytes = reply.len(),
                    "reply larger than max_reply_bytes; sending an error instead"
                );
                let vm = self.ctx.vm.clone();
                self.fill(seq, Outcome::ReplyTooLarge, |id| failure_line(&vm, id, kind))
            }
            ToClient::Reply { seq, reply, error } => {
                let outcome = if error { Outcome::Error } else { Outcome::Ok };
                self.fill(seq, outcome, |id| reply.line(id.map(qemu_style).as_deref()))
            }
            ToClient::Failed { seq, kind } => {
                let outcome = match kind {
                    FailKind::Stopping { .. } => Outcome::NoReply,
                    _ => Outcome::QmpmuxError,
                };
                let vm = self.ctx.vm.clone();
                self.fill(seq, outcome, |id| failure_line(&vm, id, kind))
            }
            ToClient::Event(line) => {
                if self.takes_events() {
                    self.outbuf.extend_from_slice(&line);
                }
            }
            // Never an audited command's (see `expect`).
            ToClient::Written(w) => self.fill(w.seq, Outcome::Ok, |_| w.rest),
            ToClient::Answer { seq, answer } => {
                let outcome = match *answer {
                    Answer::Return(_) => Outcome::Ok,
                    Answer::Error { .. } => Outcome::Error,
                    Answer::Leased(_) => Outcome::Leased,
                };
                // Events from here on in the mailbox come after the
                // subscription's point, numbered.
                if self.early_subscribe == Some(seq) {
                    self.early_subscribe = None;
                    self.subscribed_early = true;
                }
                let (vm, max) = (self.ctx.vm.clone(), self.ctx.opts.max_reply_bytes);
                self.fill(seq, outcome, |id| bounded(&vm, max, answer.line(id)))
            }
            // Answered next (a refusal); nothing is read before that.
            ToClient::FdBack(fd) => self.returned_fd = Some(fd),
            // A resume: these come before any later event (the session
            // sent them at one point of the event stream). Written whole:
            // their size is bounded by the VM's `event_history_bytes`.
            ToClient::Replay(lines) => {
                for line in lines.iter() {
                    self.outbuf.extend_from_slice(line);
                }
            }
        }
        self.flush_ready();
    }

    /// Fills the waiting slot `seq` with the line `make` builds from the
    /// request's id.
    fn fill(&mut self, seq: u64, outcome: Outcome, make: impl FnOnce(Option<&RawValue>) -> Bytes) {
        let Some(at) = self
            .slots
            .iter()
            .position(|s| matches!(s, Slot::Waiting { seq: s2, .. } if *s2 == seq))
        else {
            return;
        };
        let Slot::Waiting {
            id, audit, oob, bytes, ..
        } = std::mem::replace(&mut self.slots[at], Slot::Ready(Bytes::new()))
        else {
            return;
        };
        self.pending_bytes -= bytes;
        if self.hold == Some(seq) {
            self.hold = None;
        }
        let line = make(id.as_deref());
        if oob {
            self.slots.remove(at);
            self.outbuf.extend_from_slice(&line);
        } else {
            self.ready_bytes += line.len();
            self.slots[at] = Slot::Ready(line);
        }
        if let Some((command, start)) = audit {
            self.audit(&command, outcome, start);
        }
    }

    /// One of qmpmux's own commands: `query-proxy` answered here, the
    /// rest by the session (which owns events and the lease), in this
    /// client's order of replies like any command.
    /// `raw`: the request as the client sent it, for taps.
    async fn extension(&mut self, fwd: crate::qmp::request::Forward, raw: Option<Bytes>) {
        let id = fwd.id.as_deref().map(qemu_style);
        let ext = match extensions::parse(&fwd.command, fwd.ext_arguments.as_deref()) {
            Ok(Extension::QueryProxy) => {
                let line = self.query_proxy(fwd.id.as_deref());
                self.push_local(raw, line);
                return;
            }
            Ok(ext) => ext,
            Err(refusal) => {
                let line = error_line(id.as_deref(), refusal.class, &refusal.desc);
                self.push_local(raw, line);
                return;
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.hold = Some(seq);
        // Only a subscription is taken before negotiation (see `decide`).
        if !self.qmp.negotiated {
            self.early_subscribe = Some(seq);
        }
        let audit = matches!(ext, Extension::Lease { .. } | Extension::Release).then(|| (fwd.command, Instant::now()));
        self.slots.push_back(Slot::Waiting {
            seq,
            id: fwd.id,
            audit,
            oob: false,
            bytes: 0,
        });
        let ext = crate::upstream::Extension {
            ext,
            who: self.peer.describe(self.id),
            token: None,
        };
        let tail = Some(fwd.tail);
        if self.ctx.session.extension_as(self.id, seq, ext, tail).await.is_err() {
            let vm = self.ctx.vm.clone();
            self.fill(seq, Outcome::QmpmuxError, |id| failure_line(&vm, id, FailKind::NotSent));
        }
    }

    /// `__org.qmpmux_query-proxy`: qmpmux's view of this VM and this
    /// client, answered without QEMU.
    fn query_proxy(&self, id: Option<&RawValue>) -> Bytes {
        let (runstate, lease) = {
            let status = self.ctx.session.status();
            (status.runstate, status.lease.clone())
        };
        let now = Instant::now();
        let lease = lease.map(|h| {
            let mut lease = serde_json::json!({
                "client": h.client,
                "holder": h.who,
                "reason": h.reason,
                "seconds-left": h.until.saturating_duration_since(now).as_secs_f64().ceil() as u64,
            });
            // The token only to its holder.
            if h.connection && h.client == self.id {
                lease["token"] = h.token.as_str().into();
            }
            lease
        });
        let m = &self.ctx.metrics;
        let ret = serde_json::json!({
            "vm": &*self.ctx.vm,
            "runstate": runstate.to_string(),
            "upstream-connections": m.connections.get(),
            "clients": m.clients.get(),
            "in-flight": m.in_flight.get(),
            "queued": m.queued.get(),
            "listener": self.ctx.listener.name,
            "policy": self.ctx.listener.policy.describe(),
            "client": self.id,
            "lease": lease,
        });
        return_line(id, &ret)
    }

    /// One line on the `qmpmux::audit` target: who did what, with what
    /// outcome, how long it took.
    fn audit(&self, command: &str, outcome: Outcome, start: Instant) {
        let (pid, uid, gid) = self.peer.ids();
        info!(
            target: "qmpmux::audit",
            vm = %self.ctx.vm,
            listener = %self.ctx.listener.name,
            client = self.id,
            pid,
            uid,
            gid,
            remote = self.peer.remote(),
            command,
            outcome = outcome.as_str(),
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "command"
        );
    }

    /// qmpmux stops: every command still waiting gets an error reply with
    /// its id (its outcome is unknown), audited as unanswered.
    fn stop_waiting(&mut self) {
        let waiting: Vec<u64> = self
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::Waiting { seq, .. } => Some(*seq),
                Slot::Ready(_) => None,
            })
            .collect();
        let vm = self.ctx.vm.clone();
        for seq in waiting {
            self.fill(seq, Outcome::NoReply, |id| {
                failure_line(&vm, id, FailKind::Stopping { sent: true })
            });
        }
        self.flush_ready();
    }

    /// Moves answered requests at the front of the FIFO to the output.
    fn flush_ready(&mut self) {
        while let Some(Slot::Ready(_)) = self.slots.front() {
            if let Some(Slot::Ready(line)) = self.slots.pop_front() {
                self.ready_bytes -= line.len();
                self.outbuf.extend_from_slice(&line);
            }
        }
    }
}

/// One rule for every reply a client gets, QEMU's or qmpmux's own: one
/// larger than `max` (`max_reply_bytes`), not counting the id the client
/// chose, is replaced by an error with that id saying so. QEMU's replies
/// are measured before their line is made (`on_session`); this measures
/// the lines qmpmux makes itself, and looks for the id only in one that is
/// too long.
fn bounded(vm: &str, max: usize, line: Bytes) -> Bytes {
    if line.len() <= max {
        return line;
    }
    let text = line.trim_ascii_end();
    let id = crate::qmp::json::members(text).ok().and_then(|m| m.get("id"));
    let bytes = text.len() - id.map_or(0, |v| v.get().len());
    if bytes <= max {
        return line;
    }
    failure_line(vm, id, FailKind::OwnReplyTooLarge { bytes, max })
}

/// A command's outcome, as the audit log says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// QEMU answered with an error (or qmpmux did, as QEMU would).
    Error,
    Denied,
    /// qmpmux answered instead of QEMU (see `FailKind`).
    QmpmuxError,
    ReplyTooLarge,
    /// Refused: another client holds the VM's lease.
    Leased,
    /// The reply never reached the client (the connection ended, or
    /// qmpmux stopped, first).
    NoReply,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Denied => "denied by policy",
            Outcome::QmpmuxError => "qmpmux error",
            Outcome::ReplyTooLarge => "reply too large",
            Outcome::Leased => "refused: VM leased by another client",
            Outcome::NoReply => "no reply: connection ended first",
        }
    }
}
