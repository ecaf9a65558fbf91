//! File descriptors passed by clients with SCM_RIGHTS (unix sockets only).
//!
//! [`FdReader`] reads a client's bytes with `recvmsg`, keeping the file
//! descriptors that arrive with them the way QEMU's monitor does
//! (`tcp_chr_recv` and `tcp_get_msgfds`, chardev/char-socket.c, checked on
//! 7.2): only the fds of the latest message that carried any wait; a newer
//! one replaces (closes) them; `getfd` and `add-fd` take the first and the
//! rest are closed. So at most one fd waits per client, and qmpmux keeps
//! only that one: the others of a message are closed as they arrive.
//! Commands that do not take an fd (refused by policy, `exec-oob`, any
//! other) leave it waiting, as QEMU does; so does a command that took it
//! but was refused before QEMU saw it (the lease): it comes back. The fds of one message go with
//! the bytes of that message: the framer hands out every complete request
//! before reading further, so a request sees the fds that arrived with or
//! before its closing brace, as in QEMU.

use crate::runtime::sock::ReadHalf;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// At most this many fds are accepted in one message. The kernel installs
/// no more than fit in the control buffer and closes the rest (MSG_CTRUNC);
/// qmpmux then closes those it did get and disconnects the client.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// Control buffer, in `u64`s so that it is aligned for `cmsghdr`: room for
/// one SCM_RIGHTS message of [`MAX_FDS_PER_MESSAGE`] fds (CMSG_SPACE(64) =
/// 80 bytes on Linux), and no more, so that more is truncated.
const CMSG_WORDS: usize = 10;

/// A client's read half that also collects passed file descriptors.
pub struct FdReader {
    half: ReadHalf,
    /// The first fd of the latest message that carried fds, until a
    /// command takes it.
    waiting: Option<OwnedFd>,
}

impl FdReader {
    pub fn new(half: ReadHalf) -> FdReader {
        FdReader { half, waiting: None }
    }
}

/// Why a client's input was refused.
#[derive(Debug, thiserror::Error)]
#[error("more than {MAX_FDS_PER_MESSAGE} file descriptors passed in one message (all closed)")]
pub struct TooManyFds;

/// What one `recvmsg` got.
struct Received {
    bytes: usize,
    /// Every fd the kernel installed, already owned: dropping closes them.
    fds: Vec<OwnedFd>,
    /// The control data did not fit (MSG_CTRUNC): fds were lost.
    truncated: bool,
}

/// `recvmsg` with a control buffer parsed by hand: nix's `cmsgs()` refuses
/// to look at a truncated one, and the fds the kernel did install in it
/// would then leak (200 over-full messages: 1,600 leaked fds). Every
/// SCM_RIGHTS fd of every control message is taken into an `OwnedFd`
/// before anything else can fail.
///
/// `buf` need not be initialised (the kernel only writes into it): zeroing
/// a read buffer before each read was a third of qmpmux's instructions.
#[allow(unsafe_code)]
fn recvmsg_fds(sock: RawFd, buf: &mut [MaybeUninit<u8>]) -> io::Result<Received> {
    let mut space = [0u64; CMSG_WORDS];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: an all-zero msghdr is a valid empty one; the pointers set
    // below point at `iov` and `space`, which outlive the call, and `iov`
    // at `buf`, which the kernel may write `buf.len()` bytes into.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = iov.as_mut_ptr();
    hdr.msg_iovlen = 1;
    hdr.msg_control = space.as_mut_ptr().cast();
    hdr.msg_controllen = std::mem::size_of_val(&space) as _;
    // SAFETY: `hdr` is fully initialised as above.
    let n = unsafe { libc::recvmsg(sock, &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control data the kernel
    // wrote into `space`, bounded by the `msg_controllen` it set; each
    // header's `cmsg_len` counts only the fds it actually installed, even
    // when truncated (scm_detach_fds), and the data is read unaligned.
    unsafe {
        let end = space.as_ptr().cast::<u8>().add(hdr.msg_controllen as usize);
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = ((*c).cmsg_len as usize).saturating_sub(data as usize - c as usize);
                let len = len.min(end as usize - (data as usize).min(end as usize));
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    // The kernel has just installed `raw` in this process's
                    // fd table for us; nothing else owns or closes it.
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds,
        truncated: hdr.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// One `recvmsg`: bytes into `buf`, the first passed fd into `waiting`
/// (replacing what was there). Also says whether the socket is known to be
/// drained: a unix stream `recvmsg` fills the whole buffer unless the queue
/// ran dry or it stopped at a message that carried fds, so a short read
/// without fds means empty.
fn recv_into(sock: RawFd, waiting: &mut Option<OwnedFd>, buf: &mut [MaybeUninit<u8>]) -> io::Result<(usize, bool)> {
    loop {
        let got = recvmsg_fds(sock, buf)?;
        if got.truncated || got.fds.len() > MAX_FDS_PER_MESSAGE {
            // `got.fds` is dropped, closing every one.
            return Err(io::Error::new(io::ErrorKind::InvalidData, TooManyFds));
        }
        let had_fds = !got.fds.is_empty();
        if let Some(first) = got.fds.into_iter().next() {
            // The previous one, and the others of this message, close here.
            *waiting = Some(first);
        }
        // Fds with no bytes are not an end of file.
        if got.bytes == 0 && had_fds && !buf.is_empty() {
            continue;
        }
        let drained = got.bytes > 0 && got.bytes < buf.len() && !had_fds;
        return Ok((got.bytes, drained));
    }
}

impl AsyncRead for FdReader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let FdReader { half, waiting } = self.get_mut();
        // SAFETY: `recvmsg` only writes into the unfilled part, which is
        // read only as far as `assume_init` says it wrote.
        #[allow(unsafe_code)]
        let unfilled = unsafe { buf.unfilled_mut() };
        // A drained socket clears the readiness, saving the `recvmsg` that
        // would only say EAGAIN.
        let n = ready!(half.poll_read_with(cx, |fd| recv_into(fd, waiting, unfilled)))?;
        // SAFETY: the kernel wrote `n` bytes at the start of the unfilled part.
        #[allow(unsafe_code)]
        unsafe {
            buf.assume_init(n)
        };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// What the client task needs of a read half besides its bytes.
pub trait ClientReader {
    /// The passed fd waiting for a command, if any.
    fn take_fd(&mut self) -> Option<OwnedFd> {
        None
    }

    /// Whether a passed fd is waiting.
    fn has_fd(&self) -> bool {
        false
    }

    /// An fd taken for a command that never reached QEMU waits again,
    /// unless a newer one has come meanwhile (which replaces it, as in
    /// QEMU); dropped (closed) then.
    fn restore_fd(&mut self, fd: OwnedFd) {
        drop(fd);
    }

    /// After EOF: whether the peer closed its whole connection (not just
    /// its sending side), so that nothing can reach it any more.
    fn peer_gone(&self) -> bool {
        false
    }

    /// The connection, if it can be handed to the next qmpmux process (a
    /// unix socket; a TLS session cannot move to another process).
    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }
}

impl ClientReader for FdReader {
    fn take_fd(&mut self) -> Option<OwnedFd> {
        self.waiting.take()
    }

    fn has_fd(&self) -> bool {
        self.waiting.is_some()
    }

    fn restore_fd(&mut self, fd: OwnedFd) {
        self.waiting.get_or_insert(fd);
    }

    /// A unix socket whose peer closed entirely reports a hang-up; one
    /// whose peer only shut down its sending side does not.
    fn peer_gone(&self) -> bool {
        self.half.peer_gone()
    }

    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.half.as_fd())
    }
}

impl FdReader {
    /// A reader for a connection handed over with `waiting`, the fd its
    /// client had passed.
    pub fn resumed(half: ReadHalf, waiting: Option<OwnedFd>) -> FdReader {
        FdReader { half, waiting }
    }
}

impl ClientReader for tokio::net::tcp::OwnedReadHalf {}

impl<T> ClientReader for tokio::io::ReadHalf<T> {}
