//! A fake QMP server that greets, then answers every request at once with
//! `{"return": {}}` and sends events on demand: the fastest upstream there
//! can be, for measuring qmpmux's own ceiling and event fan-out.

use super::{FakeServer, GREETING};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Fires one event per message: its name. Each event carries
/// `"data": {"t": <now_ns() right before the write>}`.
pub type Events = mpsc::UnboundedSender<&'static str>;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Monotonic nanoseconds since this process first asked, shared by the fake
/// (which stamps events) and clients (which receive them).
pub fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl FakeServer {
    /// Serves one connection at a time, answering at once, on the current
    /// runtime; the sender fires events on the current connection.
    pub fn answer_all(self) -> Events {
        epoch();
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = self.listener.accept().await {
                serve(stream, &mut rx).await;
            }
        });
        tx
    }
}

impl FakeServer {
    /// Serves every connection at once, each answered at once; no events
    /// (the benchmark's relay floor opens one connection per client).
    #[allow(dead_code)]
    pub fn answer_each(self) {
        epoch();
        tokio::spawn(async move {
            while let Ok((stream, _)) = self.listener.accept().await {
                tokio::spawn(async move {
                    // Held open: no events, and no end of them either.
                    let (_keep, mut none) = mpsc::unbounded_channel();
                    serve(stream, &mut none).await;
                });
            }
        });
    }
}

#[derive(serde::Deserialize)]
struct Request<'a> {
    #[serde(borrow)]
    id: Option<&'a serde_json::value::RawValue>,
}

/// Answers every complete request in `buf` (a stream of JSON objects with
/// no separators); returns how many bytes were consumed.
fn answer(buf: &[u8], out: &mut Vec<u8>) -> usize {
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<Request>();
    loop {
        match it.next() {
            Some(Ok(req)) => {
                out.extend_from_slice(b"{\"return\": {}");
                if let Some(id) = req.id {
                    out.extend_from_slice(b", \"id\": ");
                    out.extend_from_slice(id.get().as_bytes());
                }
                out.extend_from_slice(b"}\r\n");
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(e)) => {
                eprintln!("fake upstream: bad request ({e}); dropping input");
                return buf.len();
            }
            None => break,
        }
    }
    it.byte_offset()
}

fn event_line(name: &str) -> String {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": \"{name}\", \"data\": {{\"t\": {}}}}}\r\n",
        wall.as_secs(),
        wall.subsec_micros(),
        now_ns()
    )
}

/// One connection: requests and events until either side ends. Both
/// `select!` branches are cancel-safe (`read`, `recv`): the one that loses
/// the race loses nothing.
async fn serve(stream: UnixStream, events: &mut mpsc::UnboundedReceiver<&'static str>) {
    // Registered for reading only, as QEMU watches its monitor socket
    // (see `clients::Conn` in the benchmark).
    let Ok((mut rd, mut wr)) = qmpmux::sock::split(stream) else {
        return;
    };
    if wr.write_all(format!("{GREETING}\r\n").as_bytes()).await.is_err() {
        return;
    }
    let mut buf = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    let mut out = Vec::with_capacity(1 << 16);
    loop {
        tokio::select! {
            r = rd.read(&mut chunk) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                let used = answer(&buf, &mut out);
                buf.drain(..used);
                if !out.is_empty() {
                    if wr.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            }
            ev = events.recv() => {
                let Some(name) = ev else { return };
                // Stamped right before the write.
                if wr.write_all(event_line(name).as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}
