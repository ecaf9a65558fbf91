//! A unix stream socket that wakes its thread only when there is something
//! to read.
//!
//! tokio registers every socket for reading *and* writing, edge-triggered,
//! and the kernel reports a writable edge each time the peer reads what was
//! sent. On the QMP path that is once per command on QEMU's socket and once
//! per reply on the client's: wake-ups of the VM's thread with nothing to
//! do (strace of 500 round trips: 469 of 1,377 `epoll_wait` returns had
//! only EPOLLOUT). Here the socket is registered for reading only; writes
//! go straight to the socket, and only a write the kernel refuses (the
//! peer is not reading) registers for writability, through a duplicate of
//! the descriptor that is dropped again once a write gets through.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// The socket, shared by its two halves.
#[derive(Debug)]
struct Shared {
    fd: AsyncFd<OwnedFd>,
}

/// The reading half.
#[derive(Debug)]
pub struct ReadHalf {
    shared: Arc<Shared>,
}

/// The writing half.
#[derive(Debug)]
pub struct WriteHalf {
    shared: Arc<Shared>,
    /// Registered for writability while a write waits for room.
    waiting: Option<AsyncFd<OwnedFd>>,
}

/// Splits a connected tokio unix stream into halves registered for reading
/// only (on the current runtime).
pub fn split(stream: tokio::net::UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    let std = stream.into_std()?;
    std.set_nonblocking(true)?;
    let fd = register(OwnedFd::from(std), Interest::READABLE)?;
    let shared = Arc::new(Shared { fd });
    Ok((ReadHalf { shared: shared.clone() }, WriteHalf { shared, waiting: None }))
}

/// Registers `fd` with the current runtime for `interest`.
#[allow(unsafe_code)]
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is a valid open descriptor, closed only when it
    // is dropped (with the `AsyncFd` that owns it), and its `as_raw_fd` is
    // always that same descriptor.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(io::Error::from)
}

impl ReadHalf {
    pub fn as_raw_fd(&self) -> RawFd {
        self.shared.fd.as_raw_fd()
    }

    /// The socket (both halves').
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.shared.fd.get_ref().as_fd()
    }

    /// Polls until `read` (a non-blocking read of the socket) gets
    /// something other than `WouldBlock`. `read` also says whether it
    /// drained the socket (a short read): the readiness is then cleared
    /// (unless a newer event came in), as tokio's own sockets do, which
    /// saves the read that would only say EAGAIN.
    pub fn poll_read_with<T>(
        &self,
        cx: &mut Context<'_>,
        mut read: impl FnMut(RawFd) -> io::Result<(T, bool)>,
    ) -> Poll<io::Result<T>> {
        loop {
            let mut guard = ready!(self.shared.fd.poll_read_ready(cx))?;
            match read(self.as_raw_fd()) {
                Ok((got, drained)) => {
                    if drained {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(got));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Whether the peer closed its whole connection (a hang-up), not just
    /// its sending side.
    pub fn peer_gone(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.shared.fd.get_ref().as_fd(), PollFlags::POLLOUT)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(1))
            && fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP))
    }
}

impl AsyncRead for ReadHalf {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        // SAFETY: `recv` only writes into the unfilled part, which is read
        // only as far as `assume_init` says it wrote. (Zeroing it first, as
        // the safe `initialize_unfilled` does, was a third of qmpmux's
        // instructions: tokio-util hands over the buffer's whole spare
        // room, uninitialised, on every read.)
        #[allow(unsafe_code)]
        let unfilled = unsafe { buf.unfilled_mut() };
        let want = unfilled.len();
        let n = ready!(self.poll_read_with(cx, |fd| recv(fd, unfilled).map(|n| (n, n > 0 && n < want))))?;
        // SAFETY: the kernel wrote `n` bytes at the start of the unfilled part.
        #[allow(unsafe_code)]
        unsafe {
            buf.assume_init(n)
        };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// One non-blocking `recv` into `buf`, which need not be initialised.
#[allow(unsafe_code)]
fn recv(fd: RawFd, buf: &mut [std::mem::MaybeUninit<u8>]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl WriteHalf {
    pub fn as_raw_fd(&self) -> RawFd {
        self.shared.fd.as_raw_fd()
    }

    /// Runs `write` (a non-blocking write to the socket) until it gets
    /// something other than `WouldBlock`, waiting for room in between.
    pub fn poll_write_with<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(RawFd) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        loop {
            match write(self.as_raw_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => {
                    // Room again: stop listening for writability, which
                    // would wake the thread after every write.
                    self.waiting = None;
                    return Poll::Ready(done);
                }
            }
            if self.waiting.is_none() {
                let dup = self.shared.fd.get_ref().try_clone()?;
                self.waiting = Some(register(dup, Interest::WRITABLE)?);
            }
            let waiting = self.waiting.as_ref().expect("just set");
            let mut guard = ready!(waiting.poll_write_ready(cx))?;
            guard.clear_ready();
        }
    }

    /// Writes some of `buf` (a future for `poll_write_with`).
    pub async fn write_with<T>(&mut self, mut write: impl FnMut(RawFd) -> io::Result<T>) -> io::Result<T> {
        std::future::poll_fn(|cx| self.poll_write_with(cx, &mut write)).await
    }
}

/// A way for the VM's session to write to a client's socket itself,
/// without waking the client's task (see `upstream::mailbox`). It keeps
/// the socket open as long as it is held.
#[derive(Debug, Clone)]
pub struct Direct(Arc<Shared>);

impl Direct {
    /// The socket's descriptor, open for as long as this handle lives:
    /// for a caller that keeps the handle and the number side by side (see
    /// [`try_send`]).
    pub fn raw_fd(&self) -> RawFd {
        self.0.fd.as_raw_fd()
    }
}

/// One non-blocking write of `buf` to `fd`, a socket that a [`Direct`]
/// keeps open; how much went. A stale number would fail (EBADF) or reach
/// another socket of this process, which is why the caller must hold the
/// `Direct` for as long as it may call this.
pub fn try_send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send(fd, buf)
}

impl WriteHalf {
    /// A handle for writing to this socket from elsewhere.
    pub fn direct(&self) -> Direct {
        Direct(self.shared.clone())
    }
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::MsgFlags;
    nix::sys::socket::send(fd, buf, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}

impl AsyncWrite for WriteHalf {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_with(cx, |fd| send(fd, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = nix::sys::socket::shutdown(self.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        Poll::Ready(match r {
            Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
            Err(e) => Err(e.into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_both_ways_and_a_full_socket_waits_for_room() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (mut ar, mut aw) = split(a).unwrap();
        let (mut br, mut bw) = b.into_split();
        aw.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        br.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        bw.write_all(b"world").await.unwrap();
        ar.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"world");
        // More than the socket buffers hold: the writer waits for room
        // and completes once the peer reads.
        let big = vec![7u8; 8 << 20];
        let writer = tokio::spawn(async move {
            aw.write_all(&big).await.unwrap();
            aw.shutdown().await.unwrap();
            aw
        });
        let mut all = Vec::new();
        br.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 8 << 20);
        let aw = writer.await.unwrap();
        assert!(aw.waiting.is_none(), "no writability registration left behind");
    }

    #[tokio::test]
    async fn peer_gone_only_when_the_peer_closed_entirely() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (ar, _aw) = split(a).unwrap();
        let (_br, mut bw) = b.into_split();
        bw.shutdown().await.unwrap();
        assert!(!ar.peer_gone());
        drop(bw);
        drop(_br);
        assert!(ar.peer_gone());
    }
}
