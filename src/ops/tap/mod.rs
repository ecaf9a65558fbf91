//! `qmpmux tap` on the control socket: a VM's whole monitor traffic as it
//! happens, as JSON lines ([`wire`]), filtered ([`filter`]) and with its
//! secrets masked ([`mask`]).
//!
//! Protocol: the request line `tap VM` or `tap VM FILTERS` (FILTERS: a
//! JSON object, see [`Filters`]); then lines until the peer closes, the
//! VM's session ends or qmpmux stops (an `end` line says which of the
//! last two). The work happens here, on the control socket's thread; the
//! VM's thread only queues records (see `upstream::tap`), and a tap that
//! does not keep up loses lines and is told how many.

pub mod filter;
pub mod mask;
mod wire;

pub use filter::{Filter, Filters};
pub use wire::{end, error};

use crate::upstream::tap::Tap;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;

/// Taps served at once, over all VMs: each holds a connection and up to
/// `upstream::tap::MAX_BYTES` of queued messages. Beyond it a tap is
/// refused; `status` and `reload` have slots of their own.
pub const MAX_TAPS: usize = 8;

/// Lines are written in pieces of about this size.
const WRITE_CHUNK: usize = 256 << 10;

/// After each batch, how long a tap lets records gather before it takes
/// them: a wake-up of this thread from the VM's (and a write, and the
/// reader's wake-up) per batch rather than per record. A person does not
/// see 5 ms; a busy VM's thread would feel a wake-up per command.
const GATHER: Duration = Duration::from_millis(5);

/// How long the `end` line may take to be written.
const END_WITHIN: Duration = Duration::from_millis(500);

/// What a session's end means to a tap.
pub const SESSION_ENDED: &str =
    "the VM's session ended (the VM was removed, or restarted by a reload, or qmpmux is stopping)";
pub const STOPPING: &str = "qmpmux is stopping (or restarting: a tap is not handed over)";

/// Serves one tap of VM `vm` until the peer closes, the session ends or
/// `stop`.
pub async fn serve(
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    vm: &str,
    mut tap: Tap,
    filter: Filter,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let mut view = wire::View::new(vm, filter, &tap.clients);
    write.write_all(view.hello().as_bytes()).await?;
    let mut batch = VecDeque::new();
    let mut out = String::new();
    loop {
        // Cancel-safe: `Tap::next` moves records only when it completes,
        // a read loses nothing this side wants, and the token.
        let more = tokio::select! {
            more = tap.next(&mut batch) => more,
            () = closed(&mut read) => return Ok(()),
            () = stop.cancelled() => return finish(&mut write, STOPPING).await,
        };
        if !more {
            return finish(&mut write, SESSION_ENDED).await;
        }
        for rec in batch.drain(..) {
            view.line(&rec, &mut out);
            if out.len() >= WRITE_CHUNK {
                send(&mut write, &mut out, stop).await?;
            }
        }
        send(&mut write, &mut out, stop).await?;
        if out.capacity() > 4 * WRITE_CHUNK {
            out = String::new();
        }
        // Cancel-safe: a sleep, and the token.
        tokio::select! {
            () = tokio::time::sleep(GATHER) => {}
            () = stop.cancelled() => return finish(&mut write, STOPPING).await,
        }
    }
}

/// Writes `out` (then empty), unless qmpmux stops first; a peer that
/// does not read holds this up, and its tap's queue fills meanwhile.
async fn send(write: &mut OwnedWriteHalf, out: &mut String, stop: &CancellationToken) -> std::io::Result<()> {
    tokio::select! {
        r = write.write_all(out.as_bytes()) => r?,
        () = stop.cancelled() => return Err(std::io::ErrorKind::Interrupted.into()),
    }
    out.clear();
    Ok(())
}

/// The last line, if it can go soon.
async fn finish(write: &mut OwnedWriteHalf, reason: &str) -> std::io::Result<()> {
    let _ = tokio::time::timeout(END_WITHIN, write.write_all(end(reason).as_bytes())).await;
    Ok(())
}

/// Returns when the peer has closed its side (what it sends is ignored).
async fn closed(read: &mut OwnedReadHalf) {
    let mut buf = [0u8; 256];
    while let Ok(n) = read.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}
