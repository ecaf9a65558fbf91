//! The client side: listening sockets and one task per connected client.

pub mod client;
pub mod fds;
pub mod slots;
pub mod tls;

use crate::ops::metrics::Refusal;
use client::{ClientContext, Peer};
use futures_util::FutureExt;
use prometheus_client::metrics::gauge::Gauge;
use slots::{Slot, Slots};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::{error, warn, Instrument};

/// Client ids are unique across the whole daemon, for logs.
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// New clients get numbers above `id` (one handed over keeps its own).
pub fn numbers_above(id: u64) {
    NEXT_CLIENT.fetch_max(id + 1, Ordering::Relaxed);
}

/// Serves client `state.id`, whose connection `fd` the previous process
/// handed over (with `passed`, the fd it had passed), on the listener
/// `ctx` is for; it holds `slot` while connected.
pub fn resume_client(
    tracker: &TaskTracker,
    ctx: &Arc<ClientContext>,
    slot: Slot,
    fd: std::os::fd::OwnedFd,
    passed: Option<std::os::fd::OwnedFd>,
    state: crate::handover::state::ClientState,
    mailbox: crate::upstream::mailbox::MailboxReceiver,
) -> io::Result<()> {
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    let stream = tokio::net::UnixStream::from_std(std)?;
    let peer = unix_peer(&stream)?;
    let (read, write) = crate::runtime::sock::split(stream)?;
    let direct = write.direct();
    let id = state.id;
    let counted = Counted::new(ctx.metrics.clients.clone(), slot);
    let client = client::resume(
        fds::FdReader::resumed(read, passed),
        write,
        direct,
        mailbox,
        state,
        peer,
        ctx.clone(),
    )
    .map(move |()| drop(counted));
    tracker.spawn(client.instrument(tracing::info_span!("client", id)));
    Ok(())
}

/// A number for a new client (also for qmpmux's own, such as the NATS
/// commander of a VM).
pub fn next_client_id() -> u64 {
    NEXT_CLIENT.fetch_add(1, Ordering::Relaxed)
}

/// Accepts clients until `ctx.stop`; each gets its own task on `tracker`
/// and holds a slot (see [`slots`]) while connected.
pub async fn accept_loop(listener: UnixListener, ctx: ClientContext, tracker: TaskTracker, slots: Slots) {
    // One context for all the listener's clients, not a copy in each.
    let ctx = Arc::new(ctx);
    while let Some((stream, _)) = next_connection(&ctx, || listener.accept()).await {
        let Some(slot) = take_slot(&slots, &ctx, None) else {
            continue;
        };
        let peer = match unix_peer(&stream) {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot identify a client (SO_PEERCRED); refusing it");
                continue;
            }
        };
        let Peer::Unix { pid, uid, gid } = peer else { continue };
        if !ctx.listener.admits(uid, gid) {
            ctx.metrics.refused(Refusal::NotAllowed);
            warn!(target: "qmpmux::audit", vm = %ctx.vm, listener = %ctx.listener.name, pid,
                uid, gid, "client refused: its uid/gid is not allowed on this listener");
            continue;
        }
        // Registered for reading only (see `runtime::sock`).
        let (read, write) = match crate::runtime::sock::split(stream) {
            Ok(halves) => halves,
            Err(e) => {
                warn!(error = %e, "cannot set up a client's socket; refusing it");
                continue;
            }
        };
        let direct = write.direct();
        spawn_client(&tracker, &ctx, slot, |id, ctx| {
            client::run(fds::FdReader::new(read), write, Some(direct), id, peer, ctx)
        });
    }
}

/// Who is on the other end of a unix connection (SO_PEERCRED).
fn unix_peer(stream: &tokio::net::UnixStream) -> io::Result<Peer> {
    let c = stream.peer_cred()?;
    Ok(Peer::Unix {
        pid: c.pid().unwrap_or(0),
        uid: c.uid(),
        gid: c.gid(),
    })
}

/// The next accepted connection; `None` once `ctx.stop` is cancelled.
/// Failed accepts are logged and skipped.
async fn next_connection<T, F>(ctx: &ClientContext, mut accept: impl FnMut() -> F) -> Option<T>
where
    F: std::future::Future<Output = io::Result<T>>,
{
    loop {
        // Cancel-safe: a cancelled `accept` loses no connection.
        let accepted = tokio::select! {
            a = accept() => a,
            () = ctx.stop.cancelled() => return None,
            // Handing over: what connects now waits in the backlog for the
            // next process.
            () = ctx.handover.cancelled() => return None,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => after_accept_error(e).await,
        }
    }
}

/// A failed `accept`. EMFILE/ENFILE/ENOBUFS leave the connection queued,
/// so retrying at once would spin: wait for fds to free up.
async fn after_accept_error(e: io::Error) {
    if is_resource_exhaustion(&e) {
        error!(error = %e, "cannot accept client; pausing accepts for 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        warn!(error = %e, "accept failed");
    }
}

/// A client slot, or `None` (logged and counted) when a limit is reached.
pub fn take_slot(slots: &Slots, ctx: &ClientContext, remote: Option<&str>) -> Option<Slot> {
    slots
        .try_take()
        .map_err(|full| {
            ctx.metrics.refused(full.refusal());
            warn!(target: "qmpmux::audit", vm = %ctx.vm, listener = %ctx.listener.name, max = full.max(),
                remote = remote.unwrap_or("-"), "{}", full.reason());
        })
        .ok()
}

/// Runs a client's task, counted in the clients gauge and holding its slot
/// until it ends.
fn spawn_client<F, Fut>(tracker: &TaskTracker, ctx: &Arc<ClientContext>, slot: Slot, serve: F)
where
    F: FnOnce(u64, Arc<ClientContext>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let id = next_client_id();
    let counted = Counted::new(ctx.metrics.clients.clone(), slot);
    // A combinator, not `async move { client.await; .. }`: an async block
    // keeps room for the captured future beside the one it awaits, which
    // doubled every client's task (5.6 KiB instead of 2.8).
    let client = serve(id, ctx.clone()).map(move |()| drop(counted));
    tracker.spawn(client.instrument(tracing::info_span!("client", id)));
}

/// A connected client as the gauge and the slot count it: both are given
/// back when this is dropped, however the task ends (even cancelled).
struct Counted {
    gauge: Gauge,
    _slot: Slot,
}

impl Counted {
    fn new(gauge: Gauge, slot: Slot) -> Self {
        gauge.inc();
        Counted { gauge, _slot: slot }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// How long a TLS client gets to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS handshakes one listener runs at once. A connection beyond them is
/// closed at once (and logged): until its handshake is done and its subject
/// allowed, a peer holds one of these, never a client slot, so strangers
/// cannot use up the VM's `max_clients`.
pub const MAX_HANDSHAKES: usize = 64;

/// Accepts TCP clients (mutual TLS unless `tls` is `None`, which config
/// validation allows only on loopback) until `ctx.stop`.
pub async fn accept_tcp_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: ClientContext,
    tracker: TaskTracker,
    slots: Slots,
) {
    let ctx = Arc::new(ctx);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    while let Some((stream, addr)) = next_connection(&ctx, || listener.accept()).await {
        let _ = stream.set_nodelay(true);
        let remote = format!("tcp:{addr}");
        let Some(tls) = &tls else {
            let Some(slot) = take_slot(&slots, &ctx, Some(&remote)) else {
                continue;
            };
            let peer = tcp_peer(remote);
            let (read, write) = stream.into_split();
            spawn_client(&tracker, &ctx, slot, |id, ctx| {
                client::run(read, write, None, id, peer, ctx)
            });
            continue;
        };
        let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
            ctx.metrics.refused(Refusal::TlsHandshakes);
            warn!(target: "qmpmux::audit", vm = %ctx.vm, listener = %ctx.listener.name, %remote,
                max = MAX_HANDSHAKES, "client refused: too many TLS handshakes in progress on this listener");
            continue;
        };
        let admit = Admission {
            ctx: ctx.clone(),
            tracker: tracker.clone(),
            slots: slots.clone(),
            handshake,
        };
        let span = tracing::info_span!("tls_handshake", %addr);
        tracker.spawn(admit.run(stream, addr, tls.clone()).instrument(span));
    }
}

/// A TLS connection on its way to becoming a client: it holds a handshake
/// permit, and takes a client slot only once its certificate is accepted.
struct Admission {
    ctx: Arc<ClientContext>,
    tracker: TaskTracker,
    slots: Slots,
    handshake: OwnedSemaphorePermit,
}

impl Admission {
    async fn run(self, stream: TcpStream, addr: SocketAddr, tls: TlsAcceptor) {
        // Cancel-safe: either way the connection is dropped.
        let handshake = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)) => r,
            () = self.ctx.stop.cancelled() => return,
        };
        let stream = match handshake {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return warn!(%addr, error = %e, "TLS handshake failed"),
            Err(_) => return warn!(%addr, "TLS handshake timed out"),
        };
        let Admission {
            ctx,
            tracker,
            slots,
            handshake,
        } = self;
        // The peer is authenticated: its handshake place goes to the next.
        drop(handshake);
        let subject = tls::peer_subject(stream.get_ref().1).unwrap_or_default();
        let allowed = ctx.listener.subjects();
        if !allowed.is_empty() && !allowed.iter().any(|p| p.matches(&subject)) {
            ctx.metrics.refused(Refusal::NotAllowed);
            return warn!(target: "qmpmux::audit", vm = %ctx.vm, %addr, %subject, listener = %ctx.listener.name,
                "client refused: certificate subject not allowed");
        }
        let remote = format!("tls:{subject}@{addr}");
        let Some(slot) = take_slot(&slots, &ctx, Some(&remote)) else {
            return;
        };
        let peer = tcp_peer(remote);
        let (read, write) = tokio::io::split(stream);
        spawn_client(&tracker, &ctx, slot, |id, ctx| {
            client::run(read, write, None, id, peer, ctx)
        });
    }
}

fn tcp_peer(remote: String) -> Peer {
    Peer::Tcp { remote: remote.into() }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENFILE | libc::EMFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
