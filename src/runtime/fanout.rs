//! One buffer to many sockets in as few system calls as the kernel allows.
//!
//! An event for a thousand idle clients is a thousand sends. Made one by
//! one, each is a system call, and each may wake a sleeping reader that a
//! moment later would have found several messages waiting. Through
//! io_uring, all of an event's sends go to the kernel in one
//! `io_uring_enter`: the benchmark's send loop costs 0.63-0.86x the CPU of
//! the same loop made of `send` calls (section 4 of `cargo bench`). The
//! replies from one read of QEMU's socket to clients waiting idle go out
//! the same way.
//!
//! Every send is non-blocking (`MSG_DONTWAIT`): io_uring then completes it
//! at once, sent, cut short or refused for want of room, and never parks it
//! to retry later, so the call returns with every outcome known and no
//! buffer still in the kernel's hands. Where io_uring is not to be had
//! (an old kernel, `kernel.io_uring_disabled`, a seccomp filter that says
//! EPERM), or for a single socket, the sends are plain `send` calls with
//! the same outcomes.

use bytes::Bytes;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;
use tracing::{info, warn};

/// What became of one send.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// All of it went.
    All,
    /// Only this many bytes went: the socket is full.
    Part(usize),
    /// Nothing went: the socket is full, or broken (the client's own task
    /// finds out which when it writes).
    Nothing,
    /// The kernel has not said, and may still send it later: the socket's
    /// stream can no longer be trusted. Never seen; handled all the same.
    Unknown,
}

/// Batches of at most this many sends go to the kernel at once: the ring
/// grows to the largest batch seen, up to this (its memory is some 100
/// bytes a place; a ring of 1024 measured 5% less CPU per delivery at 1000
/// clients than one of 256).
const MAX_RING: u32 = 1024;

/// The smallest ring.
const MIN_RING: u32 = 8;

/// How long to wait for the kernel to complete sends that complete at once.
const COMPLETION_WAIT: Duration = Duration::from_secs(1);

/// A VM thread's means of sending one buffer to many sockets.
#[derive(Default)]
pub struct Fanout {
    ring: Ring,
    /// Buffers of sends the kernel never completed: kept for as long as
    /// the process lives, as the kernel may still read them.
    stranded: Vec<Bytes>,
}

#[derive(Default)]
enum Ring {
    /// Set up on the first batch worth one.
    #[default]
    Untried,
    Ready(Box<io_uring::IoUring>),
    /// Plain sends only.
    Unavailable,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = match self.ring {
            Ring::Untried => "untried",
            Ring::Ready(_) => "io_uring",
            Ring::Unavailable => "plain sends",
        };
        f.debug_struct("Fanout").field("ring", &ring).finish()
    }
}

impl Fanout {
    /// A fan-out that never uses io_uring (for comparison in tests).
    #[cfg(test)]
    pub fn plain() -> Fanout {
        Fanout {
            ring: Ring::Unavailable,
            stranded: Vec::new(),
        }
    }

    /// Whether sends go through io_uring (once a batch has tried).
    #[cfg(test)]
    pub fn uses_io_uring(&self) -> bool {
        matches!(self.ring, Ring::Ready(_))
    }

    /// Sends each `(socket, buffer)` once, non-blocking; `out` gets the
    /// outcomes in the same order.
    pub fn send_all(&mut self, sends: &[(RawFd, Bytes)], out: &mut Vec<Sent>) {
        out.clear();
        if sends.len() >= 2 && sends.iter().all(|(_, b)| b.len() <= u32::MAX as usize) {
            self.try_ring(sends.len());
            if let Ring::Ready(ring) = &mut self.ring {
                let per_batch = ring.params().sq_entries() as usize;
                for batch in sends.chunks(per_batch) {
                    if let Err(e) = submit(ring, batch, out, &mut self.stranded) {
                        // The ring misbehaved: plain sends from now on, the
                        // rest of this batch included.
                        warn!(error = %e, "io_uring failed; sending events and replies with plain sends from now on");
                        self.ring = Ring::Unavailable;
                        break;
                    }
                }
            }
        }
        for (fd, buf) in &sends[out.len()..] {
            out.push(outcome(crate::runtime::sock::try_send(*fd, buf), buf.len()));
        }
    }

    /// Sets up the ring if not tried yet, or a larger one for `n` sends.
    fn try_ring(&mut self, n: usize) {
        let want = (n.min(MAX_RING as usize) as u32).next_power_of_two().max(MIN_RING);
        match &self.ring {
            Ring::Untried => self.ring = new_ring(want),
            // Idle between calls (every send completed): replaced at once.
            Ring::Ready(ring) if ring.params().sq_entries() < want => {
                if let Ok(bigger) = io_uring::IoUring::new(want) {
                    self.ring = Ring::Ready(Box::new(bigger));
                }
            }
            _ => {}
        }
    }
}

/// The first ring, or why there is none.
fn new_ring(entries: u32) -> Ring {
    match io_uring::IoUring::new(entries) {
        Ok(ring) if ring.params().is_feature_ext_arg() => {
            info!("events and replies for idle clients go out through io_uring");
            Ring::Ready(Box::new(ring))
        }
        Ok(_) => {
            info!("io_uring lacks timed waits (kernel before 5.11); sending events and replies with plain sends");
            Ring::Unavailable
        }
        Err(e) => {
            info!(error = %e, "io_uring unavailable; sending events and replies with plain sends");
            Ring::Unavailable
        }
    }
}

fn outcome(r: io::Result<usize>, len: usize) -> Sent {
    match r {
        Ok(n) if n >= len => Sent::All,
        Ok(0) | Err(_) => Sent::Nothing,
        Ok(n) => Sent::Part(n),
    }
}

/// Submits one batch (at most the ring's size) and collects its outcomes
/// into `out`. Sends the kernel does not complete in time are `Unknown`,
/// their buffers kept in `stranded`, and the ring is reported broken.
fn submit(
    ring: &mut io_uring::IoUring,
    batch: &[(RawFd, Bytes)],
    out: &mut Vec<Sent>,
    stranded: &mut Vec<Bytes>,
) -> io::Result<()> {
    use io_uring::{opcode, types};
    let base = out.len();
    {
        let mut sq = ring.submission();
        for (i, (fd, buf)) in batch.iter().enumerate() {
            let send = opcode::Send::new(types::Fd(*fd), buf.as_ptr(), buf.len() as u32)
                .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                .build()
                .user_data(i as u64);
            // SAFETY: each buffer stays alive until its send is complete:
            // this function waits for every completion, and keeps the
            // buffer of any send not completed (`stranded`) for good.
            // The queue is empty (every earlier batch was completed) and
            // the batch no larger than the ring.
            #[allow(unsafe_code)]
            unsafe { sq.push(&send) }.map_err(|_| io::Error::other("submission queue full"))?;
        }
    }
    let mut got: Vec<Option<i32>> = vec![None; batch.len()];
    let mut missing = batch.len();
    let ts = types::Timespec::from(COMPLETION_WAIT);
    let args = types::SubmitArgs::new().timespec(&ts);
    let mut result = Ok(());
    while missing > 0 {
        // Submits the batch (the first time) and waits for what is missing.
        match ring.submitter().submit_with_args(missing, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                result = Err(io::Error::other("sends not completed in time"));
            }
            Err(e) => result = Err(e),
        }
        for cqe in ring.completion() {
            if let Some(slot) = got.get_mut(cqe.user_data() as usize) {
                if slot.replace(cqe.result()).is_none() {
                    missing -= 1;
                }
            }
        }
        if result.is_err() {
            break;
        }
    }
    for ((_, buf), res) in batch.iter().zip(&got) {
        out.push(match res {
            Some(n) if *n >= 0 => outcome(Ok(*n as usize), buf.len()),
            Some(_) => Sent::Nothing,
            None => {
                stranded.push(buf.clone());
                Sent::Unknown
            }
        });
    }
    debug_assert_eq!(out.len(), base + batch.len());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    /// `line` to the first socket of each pair.
    fn to_each(socks: &[(UnixStream, UnixStream)], line: &'static [u8]) -> Vec<(RawFd, Bytes)> {
        socks
            .iter()
            .map(|(a, _)| (a.as_raw_fd(), Bytes::from_static(line)))
            .collect()
    }

    fn pairs(n: usize) -> Vec<(UnixStream, UnixStream)> {
        (0..n)
            .map(|_| {
                let (a, b) = UnixStream::pair().unwrap();
                a.set_nonblocking(true).unwrap();
                (a, b)
            })
            .collect()
    }

    /// Each fan-out, through io_uring and through plain sends, gives the
    /// same outcomes: all sent, cut short by a full socket, refused by a
    /// full one, refused by a closed one; and the bytes arrive.
    #[test]
    fn io_uring_and_plain_sends_agree() {
        for mut fanout in [Fanout::default(), Fanout::plain()] {
            let mut socks = pairs(300);
            let line = Bytes::from_static(b"{\"event\": \"STOP\"}\r\n");
            // Socket 1: nearly full, so only part of a big buffer fits.
            // Socket 2: full. Socket 3: its reader is gone.
            let filler = vec![b'x'; 4096];
            while socks[1].0.write_nonblocking(&filler) {}
            let big = Bytes::from(vec![b'y'; 1 << 20]);
            while socks[2].0.write_nonblocking(&filler) {}
            while socks[2].0.write_nonblocking(b"z") {}
            drop(std::mem::replace(&mut socks[3].1, UnixStream::pair().unwrap().0));
            // Room for part of `big` on socket 1.
            let mut drain = vec![0u8; 64 << 10];
            socks[1].1.read_exact(&mut drain).unwrap();
            let sends: Vec<(RawFd, Bytes)> = socks
                .iter()
                .enumerate()
                .map(|(i, (a, _))| (a.as_raw_fd(), if i == 1 { big.clone() } else { line.clone() }))
                .collect();
            let mut out = Vec::new();
            fanout.send_all(&sends, &mut out);
            assert_eq!(out.len(), 300);
            assert_eq!(out[0], Sent::All);
            assert!(
                matches!(out[1], Sent::Part(n) if n > 0 && n < big.len()),
                "{:?}",
                out[1]
            );
            assert_eq!(out[2], Sent::Nothing);
            assert_eq!(out[3], Sent::Nothing);
            assert!(out[4..].iter().all(|s| *s == Sent::All));
            let mut got = vec![0u8; line.len()];
            for i in [0, 4, 150, 299] {
                socks[i].1.read_exact(&mut got).unwrap();
                assert_eq!(got, line);
            }
        }
    }

    /// The ring starts small and grows to the largest batch; every send of
    /// a batch larger than the ring still goes.
    #[test]
    fn the_ring_grows_with_the_batches() {
        let socks = pairs(400);
        let mut fanout = Fanout::default();
        let sends = to_each(&socks, b"x\n");
        let size = |f: &Fanout| match &f.ring {
            Ring::Ready(r) => r.params().sq_entries(),
            _ => 0,
        };
        let mut out = Vec::new();
        for (n, ring) in [(2, 8), (100, 128), (3, 128), (400, 512)] {
            fanout.send_all(&sends[..n], &mut out);
            assert!(out.len() == n && out.iter().all(|s| *s == Sent::All), "{out:?}");
            if fanout.uses_io_uring() {
                assert_eq!(size(&fanout), ring);
            }
        }
        let mut got = [0u8; 8];
        for (i, (_, b)) in socks.iter().enumerate() {
            let want = 1 + usize::from(i < 100) + usize::from(i < 3) + usize::from(i < 2);
            let mut b = b;
            b.read_exact(&mut got[..2 * want])
                .unwrap_or_else(|e| panic!("socket {i}: {e}"));
        }
    }

    #[test]
    fn this_machine_has_io_uring() {
        // CI runs where io_uring works; the fallback is tested above.
        let socks = pairs(2);
        let mut fanout = Fanout::default();
        let sends = to_each(&socks, b"x");
        fanout.send_all(&sends, &mut Vec::new());
        if std::env::var_os("CI").is_some() {
            assert!(fanout.uses_io_uring(), "{fanout:?}");
        }
    }

    trait WriteNonblocking {
        fn write_nonblocking(&mut self, buf: &[u8]) -> bool;
    }

    impl WriteNonblocking for UnixStream {
        /// Whether all of `buf` went.
        fn write_nonblocking(&mut self, buf: &[u8]) -> bool {
            use std::io::Write;
            matches!(self.write(buf), Ok(n) if n == buf.len())
        }
    }
}
