//! The per-VM session task: IDLE -> CONNECTING -> RUNNING -> DISCONNECTING,
//! reconnecting with backoff for as long as qmpmux runs.

use super::backoff::Backoff;
use super::connect::{accept, connect, reader_for, Connection, HandedOver, UpstreamReader};
use super::hub::Hub;
use super::socketwatch::{self, SocketWatch};
use super::{FailKind, Request, Runstate, SessionHandle, Status, ToClient, ToSession};
use crate::config::{UpstreamOptions, VmConfig};
use crate::events::actions::Actions;
use crate::events::journal::{Journal, Recovered};
use crate::events::History;
use crate::handover::{names, Keeper};
use crate::ops::metrics::VmMetrics;
use crate::qmp::framing::Frame;
use crate::qmp::incoming::{classify, Incoming};
use crate::qmp::outgoing::{json_str, lossy, on_connect_request};
use crate::router::{Route, Router};
use crate::runtime::sock::WriteHalf;
use bytes::{BufMut, BytesMut};
use futures_util::FutureExt;
use futures_util::StreamExt;
use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

/// QEMU queues at most 8 in-band commands per monitor (with OOB on; without
/// it, the rest wait in the socket, which is just as fine).
const UPSTREAM_WINDOW: usize = crate::config::MAX_IN_QEMU;
/// Capacity of the channel all of one VM's clients send into.
const INBOX: usize = 1024;
/// Messages taken from the inbox in one go before writing upstream, so
/// that a burst of commands from many clients leaves in one write.
const INBOX_BATCH: usize = 64;

/// At most this many messages from QEMU are handled before the direct
/// writes to clients they made go out (QEMU has at most 8 in-band
/// requests, and so replies, at a time; events come between).
const UPSTREAM_BATCH: usize = 32;
/// After QEMU's socket appears, QEMU may take a moment to listen on it:
/// this many attempts, this far apart, before the backoff resumes.
const QUICK_RETRIES: u32 = 10;
const QUICK_RETRY: Duration = Duration::from_millis(5);
/// How long an `on_connect` command may take without a `command_timeout`.
const ON_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Why a running connection ended.
#[derive(Debug)]
enum Exit {
    Shutdown,
    Eof,
    Io(std::io::Error),
    /// QEMU sent something that breaks correlation.
    Desync(String),
}

struct Session {
    vm: VmConfig,
    opts: UpstreamOptions,
    rx: mpsc::Receiver<ToSession>,
    /// Clients, turns, fd names, events and the lease: all that outlives
    /// one connection to QEMU.
    hub: Hub,
    backoff: Backoff,
    shutdown: CancellationToken,
    /// Consecutive failed connection attempts (quietens logs while QEMU is down).
    failures: u32,
    /// Attempts left at the short [`QUICK_RETRY`] delay, after QEMU's
    /// socket appeared.
    quick_retries: u32,
    /// Setting up the socket watch failed, and that was logged.
    watch_failed: bool,
    /// Dropping what cannot be parsed until the first whole message (see
    /// `on_upstream`).
    resync: bool,
    /// Accept mode: QEMU dials in here instead of qmpmux connecting.
    listener: Option<Arc<UnixListener>>,
    metrics: VmMetrics,
    /// Keeps the connection to QEMU for the next qmpmux process.
    keeper: Arc<Keeper>,
    /// The connection the previous process handed over, served first.
    adopted: Option<Adopted>,
    /// Ends the VM's taps when the session ends, however it ends.
    _taps: super::tap::CloseGuard,
}

/// A connection to QEMU handed over by the previous qmpmux process.
struct Adopted {
    fd: OwnedFd,
    greeting: crate::qmp::incoming::Greeting,
    /// Bytes that process read from QEMU that were not yet a whole
    /// message; `None` after a crash, when nobody knows: what comes first
    /// may be the end of a message it had begun to read.
    leftover: Option<Vec<u8>>,
}

/// What one VM's session starts with.
pub struct Spec {
    pub vm: VmConfig,
    pub opts: UpstreamOptions,
    /// `[client] max_ahead`, for the router's turns.
    pub ahead: Duration,
    /// Accept mode: where QEMU dials in.
    pub listener: Option<UnixListener>,
    pub metrics: VmMetrics,
    pub actions: Actions,
    /// Keeps the connection to QEMU and the event journal for the next
    /// qmpmux process.
    pub keeper: Arc<Keeper>,
    /// What the previous process handed over: the connection to QEMU and
    /// the event journal.
    pub inherited_qemu: Option<OwnedFd>,
    pub inherited_journal: Option<OwnedFd>,
    /// The VM's clients, lease and `getfd` names, handed over.
    pub restored: (crate::handover::state::VmState, Vec<super::ResumedMember>),
}

/// Starts the session task of one VM.
pub fn spawn(spec: Spec, shutdown: CancellationToken, tracker: &TaskTracker) -> SessionHandle {
    let Spec {
        vm,
        opts,
        ahead,
        listener,
        metrics,
        actions,
        keeper,
        inherited_qemu,
        inherited_journal,
        restored,
    } = spec;
    let (tx, rx) = mpsc::channel(INBOX);
    let (status, status_rx) = watch::channel(Status {
        runstate: Runstate::Idle,
        greeting: None,
        last_error: None,
        lease: None,
    });
    let span = tracing::info_span!("vm", vm = %vm.name);
    let _in_span = span.enter();
    let (mut history, recovered) = open_history(&vm.name, &opts, inherited_journal, &keeper);
    let adopted = adopt(&vm.name, inherited_qemu, recovered, &keeper, &mut history);
    drop(_in_span);
    let (events_tx, events_rx) = watch::channel(history.next());
    let mut router = Router::new(UPSTREAM_WINDOW, ahead);
    if adopted.is_some() {
        router.number_from(History::first_number());
    }
    let mut hub = Hub::new(&vm.name, router, history, status, metrics.clone(), actions, events_tx);
    let tap = hub.tap.clone();
    hub.restore(&restored.0, restored.1);
    let session = Session {
        backoff: Backoff::new(opts.backoff),
        hub,
        vm,
        opts,
        rx,
        shutdown,
        failures: 0,
        quick_retries: 0,
        watch_failed: false,
        resync: false,
        listener: listener.map(Arc::new),
        metrics,
        keeper,
        adopted,
        _taps: super::tap::CloseGuard(tap.clone()),
    };
    tracker.spawn(session.run().instrument(span));
    SessionHandle {
        tx,
        status: status_rx,
        events: events_rx,
        tap,
    }
}

impl Session {
    async fn run(mut self) {
        if let Some(adopted) = self.adopted.take() {
            match adopted.connection() {
                Ok(conn) => {
                    info!("serving the connection to QEMU handed over by the previous qmpmux");
                    if matches!(self.serve(conn).await, Some(Exit::Shutdown)) {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot serve the connection to QEMU handed over; connecting afresh");
                    self.forget_connection();
                }
            }
        }
        loop {
            self.set_state(Runstate::Connecting);
            let (path, opts, listener) = (self.vm.upstream.clone(), self.opts.clone(), self.listener.clone());
            // The socket this attempt meets, to tell a new one from it later.
            let seen = socketwatch::identity(&path);
            let attempt = async move {
                match &listener {
                    Some(l) => accept(l, &opts).await,
                    None => connect(&path, &opts).await,
                }
            };
            let result = tokio::select! {
                r = attempt => r,
                () = serve_down(&mut self.rx, &mut self.hub, Runstate::Connecting) => return,
                () = self.shutdown.cancelled() => return,
            };
            match result {
                Ok(conn) => {
                    self.failures = 0;
                    self.quick_retries = 0;
                    self.backoff.reset();
                    match self.serve(conn).await {
                        Some(Exit::Shutdown) => return,
                        // QEMU dials back in by itself: wait for it at once.
                        Some(_) if self.listener.is_some() => continue,
                        _ => {}
                    }
                }
                Err(e) => {
                    self.failures += 1;
                    let text = crate::error::chain(&e);
                    if self.failures == 1 {
                        warn!(error = %text, path = %self.vm.upstream.display(), "cannot reach QEMU monitor; retrying");
                    } else {
                        debug!(error = %text, attempt = self.failures, "still cannot reach QEMU monitor");
                    }
                    self.hub.status.send_modify(|s| s.last_error = Some(text));
                }
            }
            self.set_state(Runstate::Idle);
            let mut delay = self.backoff.next_delay(fastrand::f64());
            if self.quick_retries > 0 {
                // QEMU's socket just appeared, but QEMU may not be listening
                // on it yet: try again soon rather than after the backoff.
                self.quick_retries -= 1;
                delay = delay.min(QUICK_RETRY);
            }
            let mut watch = self.socket_watch(seen);
            let appeared = async {
                match watch.as_mut() {
                    Some(w) => w.created().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = appeared => {
                    debug!("QEMU's socket appeared; connecting now");
                    self.quick_retries = QUICK_RETRIES;
                }
                () = serve_down(&mut self.rx, &mut self.hub, Runstate::Idle) => return,
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Serves one connection until it ends; `None` if a bug in qmpmux
    /// ended it (a panic): that must not take the VM's monitor away for
    /// good, so it is logged, what was outstanding fails, and the session
    /// reconnects.
    async fn serve(&mut self, conn: Connection) -> Option<Exit> {
        match AssertUnwindSafe(self.running(conn)).catch_unwind().await {
            Ok(exit) => Some(exit),
            Err(_) => {
                error!("upstream session failed (a bug in qmpmux); reconnecting");
                self.hub.fail_outstanding(FailKind::Lost, FailKind::NotSent);
                self.forget_connection();
                None
            }
        }
    }

    /// Connect mode: a watch for a new socket at the path, which cuts the
    /// wait short. Why none could be set up is logged once per run of
    /// failures (the timer still works).
    fn socket_watch(&mut self, seen: socketwatch::Identity) -> Option<SocketWatch> {
        if self.listener.is_some() {
            return None;
        }
        match SocketWatch::new(&self.vm.upstream, seen) {
            Ok(w) => {
                self.watch_failed = false;
                Some(w)
            }
            Err(e) => {
                if !std::mem::replace(&mut self.watch_failed, true) {
                    if e.is_missing_directory() {
                        debug!(error = %e, "not watching for QEMU's socket; retrying on the backoff timer");
                    } else {
                        warn!(error = %e, "not watching for QEMU's socket; reconnecting on the backoff timer only");
                    }
                }
                None
            }
        }
    }

    fn set_state(&self, to: Runstate) {
        let from = self.hub.status.borrow().runstate;
        if from == to {
            return;
        }
        // While QEMU stays unreachable, the IDLE <-> CONNECTING cycle repeats
        // every backoff period: keep that out of the info log.
        if self.failures > 0 && matches!(to, Runstate::Idle | Runstate::Connecting) {
            debug!(%from, %to, "runstate");
        } else {
            info!(%from, %to, "runstate");
        }
        self.hub.status.send_modify(|s| s.runstate = to);
        self.metrics.set_runstate(to);
    }

    /// Serves one upstream connection until it ends: connected, the loop,
    /// disconnected.
    async fn running(&mut self, conn: Connection) -> Exit {
        let Connection {
            mut reader,
            mut writer,
            greeting,
            handed_over,
        } = conn;
        if handed_over.is_none() {
            self.keeper.keep(&names::qemu(&self.vm.name), reader.get_ref().as_fd());
            if let Err(exit) = self.on_connect(&mut reader, &mut writer).await {
                drop(writer);
                drop(reader);
                self.disconnected(&exit);
                return exit;
            }
        } else {
            self.keeper
                .adopted(&names::qemu(&self.vm.name), reader.get_ref().as_fd());
        }
        self.resync = handed_over.is_some_and(|h| h.resync);
        self.connected(greeting, handed_over.is_some());
        let mut wbuf = BytesMut::with_capacity(4096);
        // A passed fd, and where in `wbuf` the request it goes with starts.
        let mut pending_fd: Option<(OwnedFd, usize)> = None;
        let timeout = self.opts.command_timeout;
        // Checks for timed-out commands a few times per timeout period.
        let mut tick = tokio::time::interval(
            (timeout.unwrap_or(Duration::from_secs(1)) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.shutdown.clone();
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let exit = loop {
            self.pump(&mut wbuf, &mut pending_fd);
            // Requests to QEMU first, so that it works on them meanwhile;
            // then the replies and events gathered for idle clients.
            if !wbuf.is_empty() {
                if let Some(Err(e)) = write_some(&mut writer, &mut wbuf, &mut pending_fd).now_or_never() {
                    break Exit::Io(e);
                }
            }
            self.hub.flush();
            // All branches are cancel-safe: FramedRead::next, mpsc::recv and a
            // single write_buf either complete or leave their state untouched.
            // Polled in order, stopping at the first ready one; shutdown,
            // rarely ready, last (it is still polled whenever the task
            // waits, and tokio's budget makes every task wait now and then).
            let ended = tokio::select! {
                biased;
                frame = reader.next() => self.on_read(frame, &mut reader),
                r = write_some(&mut writer, &mut wbuf, &mut pending_fd), if !wbuf.is_empty() => r.err().map(Exit::Io),
                msg = self.rx.recv() => self.on_inbox(msg),
                () = self.hub.lease_timeout(), if self.hub.lease_held() => {
                    self.hub.expire_lease();
                    None
                }
                _ = tick.tick(), if timeout.is_some() => {
                    self.expire(timeout.unwrap_or_default());
                    None
                }
                () = &mut cancelled => Some(Exit::Shutdown),
            };
            if let Some(exit) = ended {
                break exit;
            }
        };
        // Replies QEMU gave before the end.
        self.hub.flush();
        if matches!(exit, Exit::Shutdown) && self.keeper.is_frozen() && !wbuf.is_empty() {
            // Handing over: requests already numbered for QEMU reach it
            // (their replies go to the next process).
            let flush = async {
                while !wbuf.is_empty() {
                    if write_some(&mut writer, &mut wbuf, &mut pending_fd).await.is_err() {
                        break;
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(2), flush).await.is_err() {
                warn!("QEMU did not take the last requests in time for the handover");
            }
        }
        if matches!(exit, Exit::Shutdown) && self.keeper.is_frozen() {
            // The next process reads on from where this one stopped.
            self.hub.hand_over_leftover(reader.read_buffer());
        }
        drop(writer);
        drop(reader);
        self.disconnected(&exit);
        exit
    }

    /// The connection to QEMU is closed for good: nothing to hand over.
    fn forget_connection(&mut self) {
        self.keeper.forget(&names::qemu(&self.vm.name));
        if !self.keeper.is_frozen() {
            self.hub.journal_greeting(None);
        }
    }

    /// `[[vm.on_connect]]`: qmpmux's own commands, sent one by one on a
    /// new connection before any client's; replies are logged, a failure
    /// does not stop the rest. Events meanwhile go to clients as ever.
    async fn on_connect(&mut self, reader: &mut UpstreamReader, writer: &mut WriteHalf) -> Result<(), Exit> {
        use tokio::io::AsyncWriteExt;
        let wait = self.opts.command_timeout.unwrap_or(ON_CONNECT_WAIT);
        for (i, cmd) in self.vm.on_connect.clone().iter().enumerate() {
            let id = format!("qmpmux-on-connect-{i}");
            let line = on_connect_request(&cmd.execute, cmd.arguments.as_deref(), &id);
            let exchange = async {
                writer.write_all(line.as_bytes()).await.map_err(Exit::Io)?;
                self.await_reply(reader, &id).await
            };
            match tokio::time::timeout(wait, exchange).await {
                Ok(Ok(reply)) if reply.contains("\"error\"") => {
                    warn!(command = %cmd.execute, %reply, "on_connect command failed")
                }
                Ok(Ok(reply)) => info!(command = %cmd.execute, %reply, "on_connect command done"),
                Ok(Err(exit)) => return Err(exit),
                Err(_) => warn!(command = %cmd.execute, ?wait, "on_connect command not answered in time; going on"),
            }
        }
        Ok(())
    }

    /// Reads until the reply with id `id` (a string), handling events.
    async fn await_reply(&mut self, reader: &mut UpstreamReader, id: &str) -> Result<String, Exit> {
        let want = json_str(id);
        loop {
            let bytes = match reader.next().await {
                None => return Err(Exit::Eof),
                Some(Err(e)) => return Err(Exit::Io(e)),
                Some(Ok(Frame::Message(b))) => b,
                Some(Ok(Frame::Error(e) | Frame::Limit(e))) => return Err(Exit::Desync(e)),
            };
            match classify(&bytes) {
                Ok(Incoming::Event(name)) => self.on_event(&name, &bytes),
                Ok(Incoming::Stray(Some(got))) if got.get() == want => return Ok(lossy(&bytes)),
                _ => warn!(message = %lossy(&bytes), "unexpected message while sending on_connect commands; dropped"),
            }
        }
    }

    /// A message from a client, and any others already waiting (up to
    /// [`INBOX_BATCH`]), so that a burst leaves in one write; `None`:
    /// every handle is gone.
    fn on_inbox(&mut self, msg: Option<ToSession>) -> Option<Exit> {
        let Some(msg) = msg else {
            return Some(Exit::Shutdown);
        };
        self.on_client(msg);
        for _ in 1..INBOX_BATCH {
            if self.hub.frozen {
                break;
            }
            let Ok(msg) = self.rx.try_recv() else { break };
            self.on_client(msg);
        }
        self.hub.frozen.then_some(Exit::Shutdown)
    }

    /// A connection is up: publish it, and tell clients if they asked
    /// (not for one handed over: for clients nothing happened).
    fn connected(&mut self, greeting: crate::qmp::incoming::Greeting, handed_over: bool) {
        self.metrics.connections.inc();
        self.hub.journal_greeting(Some(&greeting.line(true)));
        if handed_over {
            self.hub.status.send_modify(|s| {
                s.greeting = Some(Arc::new(greeting));
                s.last_error = None;
            });
            self.set_state(Runstate::Running);
            return;
        }
        info!(version = %greeting.version, oob = greeting.oob, "connected to QEMU monitor");
        self.hub.status.send_modify(|s| {
            s.greeting = Some(Arc::new(greeting));
            s.last_error = None;
        });
        self.set_state(Runstate::Running);
        let reconnect = self.metrics.connections.get() > 1;
        let data = format!("{{\"vm\": {}, \"reconnect\": {reconnect}}}", json_str(&self.vm.name));
        self.hub.proxy_event("UPSTREAM_RESTORED", &data, self.opts.proxy_events);
    }

    /// The connection ended (it is closed): say why, tell clients if they
    /// asked, and answer every command it still owed.
    fn disconnected(&mut self, exit: &Exit) {
        self.set_state(Runstate::Disconnecting);
        match exit {
            Exit::Shutdown => info!("closing upstream connection"),
            Exit::Eof => warn!("QEMU closed the monitor connection"),
            Exit::Io(e) => warn!(error = %e, "upstream connection failed"),
            Exit::Desync(what) => warn!(message = %what, "unexpected message from QEMU; reconnecting"),
        }
        let error = match exit {
            Exit::Shutdown => None,
            Exit::Eof => Some("QEMU closed the connection".to_string()),
            Exit::Io(e) => Some(e.to_string()),
            Exit::Desync(m) => Some(format!("unexpected message from QEMU: {m}")),
        };
        if !matches!(exit, Exit::Shutdown) {
            let reason = error.as_deref().unwrap_or("");
            let data = format!(
                "{{\"vm\": {}, \"reason\": {}}}",
                json_str(&self.vm.name),
                json_str(reason)
            );
            self.hub.proxy_event("UPSTREAM_LOST", &data, self.opts.proxy_events);
        }
        self.hub.status.send_modify(|s| s.last_error = error);
        self.forget_connection();
        if matches!(exit, Exit::Shutdown) {
            self.hub
                .fail_outstanding(FailKind::Stopping { sent: true }, FailKind::Stopping { sent: false });
        } else {
            self.hub.fail_outstanding(FailKind::Lost, FailKind::NotSent);
        }
    }

    /// Moves requests the window has room for into the write buffer, each
    /// as `{"id":N` + its tail + `\n`: one line per message (QEMU does not
    /// need the newline; line-based QMP servers and proxies do). A passed
    /// fd is recorded at its request's first byte, after the previous
    /// request's newline.
    fn pump(&mut self, wbuf: &mut BytesMut, pending_fd: &mut Option<(OwnedFd, usize)>) {
        let now = std::time::Instant::now();
        while let Some((n, tail, fd)) = self.hub.router.next_with_fd(now) {
            if let Some(fd) = fd {
                *pending_fd = Some((fd, wbuf.len()));
            }
            wbuf.put_slice(b"{\"id\":");
            let _ = write!(wbuf, "{n}");
            wbuf.put_slice(&tail);
            wbuf.put_slice(b"\n");
        }
        self.metrics.in_flight.set(self.hub.router.in_flight() as i64);
        self.metrics.queued.set(self.hub.router.queued() as i64);
    }

    fn on_client(&mut self, msg: ToSession) {
        let Some(msg) = self.hub.membership(msg) else {
            return;
        };
        let ToSession::Execute { client, request } = msg else {
            return;
        };
        let now = std::time::Instant::now();
        if let Err(answer) = self.hub.admit(client, &request, now) {
            let (seq, answer) = (request.seq, Box::new(answer));
            self.hub.refuse(client, request, ToClient::Answer { seq, answer });
            return;
        }
        let Request {
            seq,
            tail,
            oob,
            fd,
            fdname,
            exempt: _,
            lease: _,
        } = request;
        self.metrics.commands.inc();
        let route = Route { client, seq };
        if let Some(op) = fdname {
            self.hub.fd_names.submitted(route, op);
        }
        if oob {
            self.hub.router.submit_oob(route, tail, now)
        } else {
            self.hub.router.submit_fd(route, tail, fd, now)
        }
    }

    /// What QEMU sent: this frame and those already read with it (up to
    /// [`UPSTREAM_BATCH`]); the direct writes to clients they made go out
    /// together, at the top of the loop.
    fn on_read(&mut self, first: Option<std::io::Result<Frame>>, reader: &mut UpstreamReader) -> Option<Exit> {
        let mut frame = first;
        let mut taken = 0;
        loop {
            match frame {
                None => return Some(Exit::Eof),
                Some(Err(e)) => return Some(Exit::Io(e)),
                Some(Ok(f)) => {
                    if let Err(exit) = self.on_upstream(f) {
                        return Some(exit);
                    }
                }
            }
            taken += 1;
            // Only what needs no waiting: a frame already in the buffer,
            // or one more read if the socket has something.
            match (taken < UPSTREAM_BATCH).then(|| reader.next().now_or_never()).flatten() {
                Some(next) => frame = next,
                None => return None,
            }
        }
    }

    /// One message from QEMU. On a connection handed over after a crash,
    /// what comes before the first whole event or reply may be the end of
    /// a message the crashed process had begun to read: dropped, not taken
    /// for QEMU breaking the protocol.
    fn on_upstream(&mut self, frame: Frame) -> Result<(), Exit> {
        let result = self.on_message(frame);
        if self.resync {
            match result {
                Err(Exit::Desync(what)) => {
                    warn!(message = %what, "dropped the end of a message the previous qmpmux had begun to read");
                    return Ok(());
                }
                Ok(()) => self.resync = false,
                Err(e) => return Err(e),
            }
        }
        result
    }

    fn on_message(&mut self, frame: Frame) -> Result<(), Exit> {
        let bytes = match frame {
            Frame::Message(b) => b,
            Frame::Error(e) | Frame::Limit(e) => return Err(Exit::Desync(e)),
        };
        match classify(&bytes) {
            Ok(Incoming::Event(name)) => self.on_event(&name, &bytes),
            Ok(Incoming::Reply(reply)) => {
                // One clock reading for the latency and the router's estimate
                // of what the request cost QEMU.
                let now = std::time::Instant::now();
                match self.hub.router.complete_at(reply.n, now) {
                    Some((route, times)) => {
                        self.metrics
                            .observe_latency(now.saturating_duration_since(times.since).as_secs_f64());
                        if reply.error {
                            self.metrics.errors.inc();
                        }
                        if self.hub.tap.on() {
                            self.hub.tap.offer(super::tap::What::Reply {
                                client: route.client,
                                seq: route.seq,
                                reply: reply.bytes.clone(),
                                error: reply.error,
                                queued: times.sent_at.saturating_duration_since(times.since),
                                qemu: now.saturating_duration_since(times.sent_at),
                            });
                        }
                        self.hub.reply(route.client, route.seq, reply.bytes, reply.error);
                    }
                    None => warn!(n = reply.n, "reply to no pending request; dropped"),
                }
            }
            Ok(Incoming::Stray(None)) => return Err(Exit::Desync(lossy(&bytes))),
            Ok(Incoming::Stray(Some(_))) => {
                warn!(message = %lossy(&bytes), "reply with an id qmpmux did not send; dropped")
            }
            Ok(Incoming::Greeting(_)) => return Err(Exit::Desync("greeting on a running connection".into())),
            Err(e) => return Err(Exit::Desync(format!("{}: {}", e.desc(), lossy(&bytes)))),
        }
        Ok(())
    }

    /// An event from QEMU: as a line (its bytes, then `\r\n`) to the hub,
    /// which numbers, keeps and fans it out.
    fn on_event(&mut self, name: &str, bytes: &[u8]) {
        let mut line = BytesMut::with_capacity(bytes.len() + 2);
        line.put_slice(bytes);
        line.put_slice(b"\r\n");
        self.metrics.events.inc();
        self.hub.event(name, line.freeze());
    }

    /// Answers commands QEMU has not answered within `timeout`.
    fn expire(&mut self, timeout: Duration) {
        let late = self.hub.router.expire(std::time::Instant::now(), timeout);
        if !late.in_flight.is_empty() {
            warn!(
                count = late.in_flight.len(),
                ?timeout,
                "QEMU did not answer in time; failing the commands"
            );
        }
        for r in late.in_flight {
            let kind = FailKind::TimedOut {
                sent: true,
                after: timeout,
            };
            self.hub.deliver(r.client, ToClient::Failed { seq: r.seq, kind });
        }
        for r in late.queued {
            let kind = FailKind::TimedOut {
                sent: false,
                after: timeout,
            };
            self.hub.deliver(r.client, ToClient::Failed { seq: r.seq, kind });
        }
    }
}

/// Serves clients while there is no upstream connection: every command is
/// answered with an error at once; qmpmux's own commands work as ever.
/// Returns when every handle is gone.
async fn serve_down(rx: &mut mpsc::Receiver<ToSession>, hub: &mut Hub, state: Runstate) {
    loop {
        // Cancel-safe: mpsc::recv and the lease timer.
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            () = hub.lease_timeout(), if hub.lease_held() => {
                hub.expire_lease();
                continue;
            }
        };
        let Some(msg) = msg else { return };
        if let Some(ToSession::Execute { client, request }) = hub.membership(msg) {
            hub.refuse_down(client, request, state);
        }
        if hub.frozen {
            return;
        }
    }
}

/// Writes some of `wbuf` to QEMU. The request a passed fd goes with starts
/// a `sendmsg` of its own, carrying the fd (QEMU takes fds that arrive no
/// later than the request's closing brace). Cancel-safe: waiting for room
/// is, and the write itself is synchronous.
async fn write_some(
    writer: &mut WriteHalf,
    wbuf: &mut BytesMut,
    pending_fd: &mut Option<(OwnedFd, usize)>,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let n = writer
        .write_with(|sock| {
            let (upto, fd) = match pending_fd.as_ref() {
                Some((fd, 0)) => (wbuf.len(), Some(fd.as_raw_fd())),
                Some((_, at)) => (*at, None),
                None => (wbuf.len(), None),
            };
            let iov = [std::io::IoSlice::new(&wbuf[..upto])];
            let fds = fd.map(|f| [f]);
            let cmsg: Vec<ControlMessage<'_>> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
            sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
        })
        .await?;
    let _ = wbuf.split_to(n);
    *pending_fd = match pending_fd.take() {
        Some((_, 0)) => None,
        Some((fd, at)) => Some((fd, at - n.min(at))),
        None => None,
    };
    Ok(())
}

/// What the previous process's journal says about its connection to QEMU.
struct Journaled {
    greeting: Option<Vec<u8>>,
    leftover: Vec<u8>,
}

/// The VM's event history: the one the previous process journaled, if it
/// handed one over that can be read (numbering goes on without a gap),
/// else a new one; journaled from now on, and the journal kept for the
/// next process.
fn open_history(
    vm: &str,
    opts: &UpstreamOptions,
    inherited: Option<OwnedFd>,
    keeper: &Keeper,
) -> (History, Option<Journaled>) {
    let (max_events, max_bytes) = (opts.event_history, opts.event_history_bytes);
    let name = names::journal(vm);
    if let Some(fd) = inherited {
        match Journal::adopt(fd) {
            Ok((journal, recovered)) => {
                let Recovered {
                    events,
                    next,
                    greeting,
                    leftover,
                    truncated,
                } = recovered;
                let history = History::restored(events, next, max_events, max_bytes);
                info!(
                    kept = history.len(),
                    next = history.next(),
                    truncated,
                    "event history handed over by the previous qmpmux"
                );
                keeper.adopted(&name, journal.fd());
                return (history.with_journal(journal), Some(Journaled { greeting, leftover }));
            }
            Err(e) => {
                warn!(error = %crate::error::chain(&e), "the event journal handed over cannot be read; numbering events afresh");
                keeper.release(&name);
            }
        }
    }
    let history = History::new(History::first_number(), max_events, max_bytes);
    match Journal::create(
        vm,
        crate::events::journal::capacity_for(max_events, max_bytes),
        history.next(),
    ) {
        Ok(journal) => {
            keeper.keep(&name, journal.fd());
            (history.with_journal(journal), None)
        }
        Err(e) => {
            if keeper.enabled() {
                warn!(error = %crate::error::chain(&e), "no event journal: a crash of qmpmux will lose the event history");
            }
            (history, None)
        }
    }
}

/// The connection to QEMU the previous process handed over, with the
/// greeting its journal recorded; `None` (and the fd released) when there
/// is none or no greeting to go with it.
fn adopt(
    vm: &str,
    fd: Option<OwnedFd>,
    recovered: Option<Journaled>,
    keeper: &Keeper,
    history: &mut History,
) -> Option<Adopted> {
    let fd = fd?;
    let greeting = recovered.as_ref().and_then(|r| r.greeting.as_deref()).and_then(|g| {
        match classify(&bytes::Bytes::copy_from_slice(g)) {
            Ok(Incoming::Greeting(g)) => Some(g),
            _ => None,
        }
    });
    let Some(greeting) = greeting else {
        warn!("a connection to QEMU was handed over without its greeting; connecting afresh");
        drop(fd);
        keeper.release(&names::qemu(vm));
        return None;
    };
    // "G" marks bytes a graceful handover left; nothing: a crash.
    let leftover = recovered
        .as_ref()
        .and_then(|r| r.leftover.strip_prefix(b"G"))
        .map(<[u8]>::to_vec);
    if let Some(j) = history.journal_mut() {
        j.set_leftover(&[]);
    }
    Some(Adopted { fd, greeting, leftover })
}

impl Adopted {
    fn connection(self) -> std::io::Result<Connection> {
        let std = std::os::unix::net::UnixStream::from(self.fd);
        std.set_nonblocking(true)?;
        let (read, writer) = crate::runtime::sock::split(tokio::net::UnixStream::from_std(std)?)?;
        let mut reader = reader_for(read);
        let resync = self.leftover.is_none();
        if let Some(bytes) = self.leftover {
            reader.read_buffer_mut().extend_from_slice(&bytes);
        }
        Ok(Connection {
            reader,
            writer,
            greeting: self.greeting,
            handed_over: Some(HandedOver { resync }),
        })
    }
}
