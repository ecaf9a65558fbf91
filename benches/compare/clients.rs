//! The measuring QMP clients: a blocking one for sequential round trips (no
//! runtime between the syscall and the clock) and an async one for many
//! clients at once. Bare on purpose: what they cost is part of every figure.

use crate::common::STEP;
use qmpmux::sock;
use std::io::{self, BufRead, Write};
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

/// The command measured everywhere; the id rides through qmpmux as QEMU's
/// clients (libvirt) use one.
pub const CMD: &[u8] = b"{\"execute\": \"query-status\", \"id\": 7}";
/// A direct client enables OOB, as qmpmux's own upstream session does: QEMU
/// then queues up to 8 in-band commands instead of 1, the same for both.
pub const CAPS_OOB: &[u8] = b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}";
/// qmpmux offers clients no OOB.
pub const CAPS: &[u8] = b"{\"execute\": \"qmp_capabilities\"}";

pub fn is_event(line: &str) -> bool {
    line.contains("\"event\": ")
}

pub fn is_ok(line: &str) -> bool {
    line.contains("\"return\"") && !line.contains("\"error\"")
}

/// A blocking QMP client, negotiated.
pub struct SyncClient {
    reader: io::BufReader<StdStream>,
    writer: StdStream,
    line: String,
}

impl SyncClient {
    pub fn open(path: &Path, caps: &[u8]) -> io::Result<SyncClient> {
        let s = StdStream::connect(path)?;
        s.set_read_timeout(Some(STEP))?;
        let mut c = SyncClient {
            writer: s.try_clone()?,
            reader: io::BufReader::new(s),
            line: String::new(),
        };
        c.read_line()?;
        if !c.line.contains("\"QMP\"") {
            return Err(io::Error::other(format!("no greeting: {}", c.line)));
        }
        c.writer.write_all(caps)?;
        if !c.reply()? {
            return Err(io::Error::other(format!("negotiation failed: {}", c.line)));
        }
        Ok(c)
    }

    fn read_line(&mut self) -> io::Result<()> {
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// The next reply (events skipped): whether it is a success.
    fn reply(&mut self) -> io::Result<bool> {
        loop {
            self.read_line()?;
            if !is_event(&self.line) {
                return Ok(is_ok(&self.line));
            }
        }
    }

    /// Sends [`CMD`]; whether its reply is a success.
    pub fn cmd(&mut self) -> io::Result<bool> {
        self.writer.write_all(CMD)?;
        self.reply()
    }
}

/// An async QMP client, negotiated. Its socket is registered for reading
/// only, as asyncio clients (qemu.qmp, qmp-shell) and QEMU register theirs:
/// with tokio's own registration (reading and writing, edge-triggered)
/// every message the proxy read from it would wake this process for a
/// writable edge nobody asked for, inside the proxy's `recv` (15% of
/// qmpmux's CPU in section 3).
pub struct Conn {
    pub reader: BufReader<sock::ReadHalf>,
    pub writer: sock::WriteHalf,
}

pub async fn open(path: &Path, caps: &[u8]) -> io::Result<Conn> {
    let go = async {
        let (r, w) = sock::split(UnixStream::connect(path).await?)?;
        let mut c = Conn {
            reader: BufReader::with_capacity(4096, r),
            writer: w,
        };
        let mut line = String::new();
        c.reader.read_line(&mut line).await?;
        if !line.contains("\"QMP\"") {
            return Err(io::Error::other(format!("no greeting: {line:?}")));
        }
        c.writer.write_all(caps).await?;
        loop {
            line.clear();
            if c.reader.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if !is_event(&line) {
                break;
            }
        }
        if !is_ok(&line) {
            return Err(io::Error::other(format!("negotiation failed: {line:?}")));
        }
        Ok(c)
    };
    tokio::time::timeout(STEP, go)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Opens `n` negotiated clients, at most `parallel` handshakes at a time.
pub async fn open_many(path: &Path, caps: &'static [u8], n: usize, parallel: usize) -> Vec<Conn> {
    let sem = Arc::new(Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (sem, path) = (sem.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            open(&path, caps).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("open task") {
            Ok(c) => out.push(c),
            Err(e) => panic!("client {i} of {n} to {} failed: {e}", path.display()),
        }
    }
    out
}
