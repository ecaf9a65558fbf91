//! The client side: listening sockets and one task per connected client.

pub mod client;
pub mod fds;
pub mod sockfile;
pub mod tls;

use client::{ClientContext, Peer};
use futures_util::FutureExt;
use prometheus_client::metrics::gauge::Gauge;
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

pub use sockfile::{bind, BindError, Created, SocketFile};

/// Client ids are unique across the whole daemon, for logs.
static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// Accepts clients until `ctx.stop`; each gets its own task on `tracker`
/// and holds one of the `slots` permits while connected.
pub async fn accept_loop(listener: UnixListener, ctx: ClientContext, tracker: TaskTracker, slots: Arc<Semaphore>) {
    // One context for all the listener's clients, not a copy in each.
    let ctx = Arc::new(ctx);
    while let Some(((stream, _), permit)) = next_client(&ctx, &slots, || listener.accept()).await {
        let peer = match stream.peer_cred() {
            Ok(c) => Peer {
                pid: c.pid().unwrap_or(0),
                uid: c.uid(),
                gid: c.gid(),
                remote: None,
            },
            Err(e) => {
                warn!(error = %e, "cannot identify a client (SO_PEERCRED); refusing it");
                continue;
            }
        };
        if !ctx.listener.admits(peer.uid, peer.gid) {
            warn!(target: "qmpmux::audit", vm = %ctx.vm, listener = %ctx.listener.name, pid = peer.pid,
                uid = peer.uid, gid = peer.gid, "client refused: its uid/gid is not allowed on this listener");
            continue;
        }
        let (read, write) = stream.into_split();
        spawn_client(&tracker, &ctx, permit, |id, ctx| {
            client::run(fds::FdReader::new(read), write, id, peer, ctx)
        });
    }
}

/// The next accepted connection and a client slot for it; `None` once
/// `ctx.stop` is cancelled. Failed accepts and connections beyond the
/// VM's client limit are logged and skipped.
async fn next_client<T, F>(
    ctx: &ClientContext,
    slots: &Arc<Semaphore>,
    mut accept: impl FnMut() -> F,
) -> Option<(T, OwnedSemaphorePermit)>
where
    F: std::future::Future<Output = io::Result<T>>,
{
    loop {
        let accepted = tokio::select! {
            a = accept() => a,
            () = ctx.stop.cancelled() => return None,
        };
        match accepted {
            Ok(a) => {
                if let Some(permit) = take_slot(slots, ctx) {
                    return Some((a, permit));
                }
            }
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

/// One of the VM's client slots, or `None` (logged) when all are taken.
fn take_slot(slots: &Arc<Semaphore>, ctx: &ClientContext) -> Option<OwnedSemaphorePermit> {
    let permit = slots.clone().try_acquire_owned().ok();
    if permit.is_none() {
        warn!(target: "qmpmux::audit", vm = %ctx.vm, listener = %ctx.listener.name, max = ctx.opts.max_clients,
            "client refused: the VM has its maximum number of clients");
    }
    permit
}

/// Runs a client's task, counted in the clients gauge and holding its slot
/// until it ends.
fn spawn_client<F, Fut>(tracker: &TaskTracker, ctx: &Arc<ClientContext>, permit: OwnedSemaphorePermit, serve: F)
where
    F: FnOnce(u64, Arc<ClientContext>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    let counted = Counted::new(ctx.metrics.clients.clone(), permit);
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
    _slot: OwnedSemaphorePermit,
}

impl Counted {
    fn new(gauge: Gauge, slot: OwnedSemaphorePermit) -> Self {
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

/// Accepts TCP clients (mutual TLS unless `tls` is `None`, which config
/// validation allows only on loopback) until `ctx.stop`.
pub async fn accept_tcp_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: ClientContext,
    tracker: TaskTracker,
    slots: Arc<Semaphore>,
) {
    let ctx = Arc::new(ctx);
    while let Some(((stream, addr), permit)) = next_client(&ctx, &slots, || listener.accept()).await {
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        spawn_client(&tracker, &ctx, permit, |id, ctx| serve_tcp(stream, addr, tls, id, ctx));
    }
}

async fn serve_tcp(stream: TcpStream, addr: SocketAddr, tls: Option<TlsAcceptor>, id: u64, ctx: Arc<ClientContext>) {
    let mut peer = Peer {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
        remote: Some(format!("tcp:{addr}").into()),
    };
    let Some(tls) = tls else {
        let (read, write) = stream.into_split();
        return client::run(read, write, id, peer, ctx).await;
    };
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return warn!(%addr, error = %e, "TLS handshake failed"),
        Err(_) => return warn!(%addr, "TLS handshake timed out"),
    };
    let subject = tls::peer_subject(stream.get_ref().1).unwrap_or_default();
    if !ctx.listener.subjects.is_empty() && !ctx.listener.subjects.iter().any(|g| g.matches(&subject)) {
        return warn!(target: "qmpmux::audit", vm = %ctx.vm, %addr, %subject, listener = %ctx.listener.name,
            "client refused: certificate subject not allowed");
    }
    peer.remote = Some(format!("tls:{subject}@{addr}").into());
    let (read, write) = tokio::io::split(stream);
    client::run(read, write, id, peer, ctx).await
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12))
}
