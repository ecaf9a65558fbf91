//! A unix stream socket registered with tokio for reading only, the way
//! asyncio clients (qemu.qmp, qmp-shell) and QEMU itself watch theirs: for
//! writability only while a write waits for room.
//!
//! tokio's own `UnixStream` is registered for reading and writing,
//! edge-triggered, so each time the peer reads what this side wrote the
//! kernel wakes this side's epoll for a writable edge nobody asked for, and
//! the peer pays for that wake-up inside its `recv`. Through a proxy that
//! is one wake-up per message in each direction, charged to the proxy: 15%
//! of qmpmux's CPU in the benchmark's ceiling section. The benchmark's
//! clients and fake upstream use this socket so that what it measures is
//! what QEMU's usual clients would cost.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

pub struct ReadHalf(Arc<AsyncFd<UnixStream>>);

pub struct WriteHalf {
    stream: Arc<AsyncFd<UnixStream>>,
    /// A duplicate registered for writability while a write waits.
    waiting: Option<AsyncFd<UnixStream>>,
}

/// Splits a connected socket (on the current runtime).
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    let std = stream.into_std()?;
    std.set_nonblocking(true)?;
    let fd = Arc::new(register(std, Interest::READABLE)?);
    Ok((
        ReadHalf(fd.clone()),
        WriteHalf {
            stream: fd,
            waiting: None,
        },
    ))
}

fn register(s: UnixStream, interest: Interest) -> io::Result<AsyncFd<UnixStream>> {
    // SAFETY: a `UnixStream` owns its descriptor, closes it only when
    // dropped (with the `AsyncFd` that owns it), and its `as_raw_fd` is
    // always that same descriptor.
    unsafe { AsyncFd::register_with_interest(s, interest) }.map_err(io::Error::from)
}

/// Connects to `path` and splits the socket.
pub async fn connect(path: &std::path::Path) -> io::Result<(ReadHalf, WriteHalf)> {
    split(tokio::net::UnixStream::connect(path).await?)
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            match guard.try_io(|s| s.get_ref().read(buf.initialize_unfilled())) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            match this.stream.get_ref().write(buf) {
                Ok(n) => {
                    this.waiting = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if this.waiting.is_none() {
                        let dup = this.stream.get_ref().try_clone()?;
                        this.waiting = Some(register(dup, Interest::WRITABLE)?);
                    }
                    let waiting = this.waiting.as_ref().expect("registered above");
                    ready!(waiting.poll_write_ready(cx))?.clear_ready();
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream.get_ref().shutdown(std::net::Shutdown::Write))
    }
}
