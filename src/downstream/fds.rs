//! File descriptors passed by clients with SCM_RIGHTS (unix sockets only).
//!
//! [`FdReader`] reads a client's bytes with `recvmsg`, keeping any file
//! descriptors that arrive with them. QEMU takes an fd for `getfd` and
//! `add-fd` from those received before the command's closing brace, so the
//! client task hands the oldest waiting fd to each such command; fds a
//! client sends and never uses are closed when it leaves.

use futures_util::FutureExt;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::unix::OwnedReadHalf;

/// Commands that take one passed fd (QEMU's `monitor_get_fd` callers that
/// read SCM_RIGHTS fds: `getfd` and `add-fd`).
pub fn takes_fd(command: &str) -> bool {
    matches!(command, "getfd" | "add-fd")
}

/// At most this many passed fds wait per client; more are closed at once.
const MAX_WAITING_FDS: usize = 16;

/// A client's read half that also collects passed file descriptors.
pub struct FdReader {
    half: OwnedReadHalf,
    fds: VecDeque<OwnedFd>,
}

impl FdReader {
    pub fn new(half: OwnedReadHalf) -> FdReader {
        FdReader {
            half,
            fds: VecDeque::new(),
        }
    }
}

/// One `recvmsg`: bytes into `buf`, passed fds onto `fds`. Also says
/// whether the socket is known to be drained: a unix stream `recvmsg`
/// fills the whole buffer unless the queue ran dry or it stopped after a
/// message that carried fds, so a short read without fds means empty.
fn recv_into(half: &OwnedReadHalf, fds: &mut VecDeque<OwnedFd>, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let stream: &tokio::net::UnixStream = half.as_ref();
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    let n = msg.bytes;
    let mut received = Vec::new();
    for c in msg.cmsgs().map_err(|e| io::Error::from_raw_os_error(e as i32))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            received.extend(raw);
        }
    }
    let drained = n > 0 && n < buf.len() && received.is_empty();
    for raw in received {
        // SAFETY: the kernel has just installed `raw` in this process's fd
        // table for us (SCM_RIGHTS); nothing else owns or closes it.
        #[allow(unsafe_code)]
        let owned = unsafe { OwnedFd::from_raw_fd(raw) };
        if fds.len() < MAX_WAITING_FDS {
            fds.push_back(owned);
        }
    }
    Ok((n, drained))
}

impl AsyncRead for FdReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let FdReader { half, fds } = self.get_mut();
        loop {
            let stream: &tokio::net::UnixStream = half.as_ref();
            ready!(stream.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            // A drained socket reports WouldBlock to `try_io`, which then
            // clears the readiness (unless an event came in meanwhile), as
            // tokio's own `poll_read` does after a short read: this saves
            // the `recvmsg` that would only say EAGAIN.
            let mut short = None;
            let result = stream.try_io(Interest::READABLE, || match recv_into(half, fds, unfilled)? {
                (n, true) => {
                    short = Some(n);
                    Err(io::ErrorKind::WouldBlock.into())
                }
                (n, false) => Ok(n),
            });
            match (result, short) {
                (_, Some(n)) | (Ok(n), None) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (Err(e), None) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// What the client task needs of a read half besides its bytes.
pub trait ClientReader {
    /// The oldest passed fd not yet taken by a command.
    fn take_fd(&mut self) -> Option<OwnedFd> {
        None
    }

    /// After EOF: whether the peer closed its whole connection (not just
    /// its sending side), so that nothing can reach it any more.
    fn peer_gone(&self) -> bool {
        false
    }
}

impl ClientReader for FdReader {
    fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fds.pop_front()
    }

    /// A unix socket whose peer closed entirely reports a hang-up (which
    /// tokio records as write-closed); one whose peer only shut down its
    /// sending side does not.
    fn peer_gone(&self) -> bool {
        let stream: &tokio::net::UnixStream = self.half.as_ref();
        matches!(
            stream.ready(Interest::WRITABLE).now_or_never(),
            Some(Ok(ready)) if ready.is_write_closed()
        )
    }
}

impl ClientReader for tokio::net::tcp::OwnedReadHalf {}

impl<T> ClientReader for tokio::io::ReadHalf<T> {}
