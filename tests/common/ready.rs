//! Readiness of a QMP server (QEMU or qmpmux): a connection that gets the
//! whole greeting.
//!
//! The greeting is read to its end before closing: closing with it unread
//! resets the connection, and QEMU, which serves one client at a time, can
//! then fail the next one.

use super::STEP;
use std::io::Read;
use std::os::unix::net::UnixStream as StdStream;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Whether `seen` is a whole (possibly pretty-printed) greeting.
fn is_whole_greeting(seen: &[u8]) -> bool {
    let depth: i64 = seen.iter().map(|b| i64::from(*b == b'{') - i64::from(*b == b'}')).sum();
    !seen.is_empty() && depth == 0 && seen.ends_with(b"\r\n")
}

/// Waits until `socket` accepts, then reads the greeting (giving up on the
/// greeting, not the test, after [`STEP`]); panics if it never accepts.
pub async fn wait_listening(socket: &Path) {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        if let Ok(probe) = UnixStream::connect(socket).await {
            let _ = tokio::time::timeout(STEP, read_greeting(probe)).await;
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} did not start listening",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads a greeting to its end; whether it was whole.
async fn read_greeting(mut stream: UnixStream) -> bool {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if is_whole_greeting(&seen) {
            return true;
        }
    }
    false
}

/// Blocking: retries until a connection to `socket` gets a whole greeting;
/// false if none did by `deadline`. For the benchmark's main thread, which
/// has no runtime to wait on.
pub fn wait_greeted_blocking(socket: &Path, deadline: Instant, retry: Duration) -> bool {
    loop {
        if greeted_blocking(socket) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(retry);
    }
}

fn greeted_blocking(socket: &Path) -> bool {
    let Ok(mut s) = StdStream::connect(socket) else {
        return false;
    };
    if s.set_read_timeout(Some(STEP)).is_err() {
        return false;
    }
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if is_whole_greeting(&seen) {
            return true;
        }
    }
    false
}
