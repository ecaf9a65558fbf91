//! What `qmpmux tap` sees of one VM: every client's requests and the
//! answers to them, every event, clients coming and going, offered by the
//! client tasks and the session as they happen, to the taps attached.
//!
//! The VM's thread never waits for a tap: each record is pushed onto each
//! tap's bounded queue under a lock held for a few instructions, and only
//! tried (the tap takes its whole queue at once under the same lock); what
//! does not fit is counted, and the tap finds a [`What::Lost`] where the
//! records went missing. A record holds shared bytes and integers only: parsing,
//! masking and formatting are the tap's work, on the control socket's
//! thread. With no tap attached an offer costs one atomic load; the
//! directory of who is connected (for taps attached later) costs a lock
//! per connection and per disconnection.

use super::Answer;
use crate::config::ListenerConfig;
use crate::qmp::incoming::ReplyBytes;
use crate::state::FailKind;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime};

/// Records one tap's queue holds at most: about 100 ms of the benchmark's
/// busiest VM (two records per command at 160k commands/s).
pub const MAX_RECORDS: usize = 32 * 1024;
/// Bytes of messages one tap's queue holds at most (shared with the
/// clients' copies while they are in flight, then the tap's alone). A tap
/// that does not read holds twice this: its queue, and the batch it took
/// last and cannot write.
pub const MAX_BYTES: usize = 8 << 20;

/// One thing that happened, and when.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: SystemTime,
    pub what: What,
}

#[derive(Debug, Clone)]
pub enum What {
    /// A client connected (or, for a NATS requester, its lane opened).
    Joined(Who),
    Left {
        client: u64,
    },
    /// A request for QEMU or for the session: `{"id": N` + `tail` is what
    /// QEMU gets (for qmpmux's own commands, what the client sent).
    /// Client 0 is qmpmux itself (`closefd` for a client that left).
    Request {
        client: u64,
        seq: u64,
        tail: Bytes,
    },
    /// QEMU's reply to request `seq`: `queued` waiting for its turn in
    /// qmpmux, `qemu` from its sending to its reply.
    Reply {
        client: u64,
        seq: u64,
        reply: ReplyBytes,
        error: bool,
        queued: Duration,
        qemu: Duration,
    },
    /// qmpmux answered request `seq` instead of QEMU (see [`FailKind`]).
    Failed {
        client: u64,
        seq: u64,
        kind: FailKind,
    },
    /// The session answered request `seq`: one of qmpmux's own commands,
    /// or a refusal (the lease).
    Answer {
        client: u64,
        seq: u64,
        answer: Answer,
    },
    /// The client task answered a message itself (negotiation, a policy
    /// refusal, a malformed request): what the client sent (`None`: it
    /// was not JSON), and the line it got.
    Local {
        client: u64,
        request: Option<Bytes>,
        reply: Bytes,
    },
    /// An event line, as QEMU (or qmpmux, `__org.qmpmux_*`) sent it.
    Event(Bytes),
    /// The tap lost this many records here: its queue was full.
    Lost(u64),
}

impl What {
    /// The message bytes it holds, counted against [`MAX_BYTES`].
    fn bytes(&self) -> usize {
        match self {
            What::Request { tail, .. } => tail.len(),
            What::Reply { reply, .. } => reply.len(),
            What::Local { request, reply, .. } => request.as_ref().map_or(0, Bytes::len) + reply.len(),
            What::Event(line) => line.len(),
            What::Answer { answer, .. } => match answer {
                Answer::Return(s) | Answer::Error { desc: s, .. } | Answer::Leased(s) => s.len(),
            },
            What::Joined(_) | What::Left { .. } | What::Failed { .. } | What::Lost(_) => 0,
        }
    }
}

/// A client as people know it.
#[derive(Debug, Clone)]
pub struct Who {
    pub client: u64,
    pub peer: PeerId,
    /// The socket it came in on (`None`: a NATS requester).
    pub listener: Option<Arc<ListenerConfig>>,
}

/// Who is on the other end of a client.
#[derive(Debug, Clone)]
pub enum PeerId {
    /// A unix socket's peer (SO_PEERCRED).
    Unix { pid: i32, uid: u32 },
    /// `tcp:ADDR`, or `tls:SUBJECT@ADDR`.
    Remote(Arc<str>),
    /// A NATS requester's lane.
    Nats,
}

/// One VM's tap point, shared by its session, its clients and its taps.
#[derive(Debug, Default)]
pub struct TapPoint {
    /// Taps attached: read on every offer, so that with none an offer is
    /// this one load.
    taps: AtomicUsize,
    /// The taps' queues. A std mutex, held for a few instructions at a
    /// time (a push, a swap), never across an await. The VM's thread only
    /// ever tries it: the taps run at the lowest priority, and one that
    /// the kernel stopped while holding it must not stop the VM's thread
    /// (a record offered meanwhile is counted in `missed`).
    sinks: Mutex<Sinks>,
    /// Records no tap got because `sinks` was held.
    missed: AtomicU64,
    /// Who is connected, for taps attached later; held by the VMs'
    /// threads and the supervisor's, never by a tap's. Taken before
    /// `sinks` when both are.
    clients: Mutex<HashMap<u64, Who>>,
}

#[derive(Debug, Default)]
struct Sinks {
    sinks: Vec<Sink>,
    next_sink: u64,
    /// The session has ended: no more records.
    closed: bool,
}

#[derive(Debug, Default)]
struct Sink {
    id: u64,
    queue: VecDeque<Record>,
    bytes: usize,
    /// Records dropped since the last one queued.
    lost: u64,
    /// The tap waits for a record: woken by the next one.
    waker: Option<Waker>,
}

impl Sink {
    /// Queues `rec`, or counts it lost when the queue is full; a tap
    /// waiting is handed back to be woken (outside the lock).
    fn push(&mut self, rec: Record, size: usize) -> Option<Waker> {
        let room = if self.lost > 0 { 2 } else { 1 };
        if self.queue.len() + room > MAX_RECORDS || self.bytes + size > MAX_BYTES {
            self.lost += 1;
            return None;
        }
        if self.lost > 0 {
            let lost = std::mem::take(&mut self.lost);
            self.queue.push_back(Record {
                at: rec.at,
                what: What::Lost(lost),
            });
        }
        self.bytes += size;
        self.queue.push_back(rec);
        self.waker.take()
    }
}

/// A poisoned lock (a panic while it was held) leaves nothing half done
/// that matters here: go on with what is there.
fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl TapPoint {
    pub fn new() -> Arc<TapPoint> {
        Arc::new(TapPoint::default())
    }

    /// Whether any tap is attached (records are worth making).
    #[inline]
    pub fn on(&self) -> bool {
        self.taps.load(Ordering::Relaxed) != 0
    }

    /// Offers `what`, timed now, to every tap (check [`TapPoint::on`]
    /// before making it). Never waits.
    pub fn offer(&self, what: What) {
        let rec = Record {
            at: SystemTime::now(),
            what,
        };
        let size = rec.what.bytes();
        let mut wake = Vec::new();
        {
            let mut inner = match self.sinks.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    self.missed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            if inner.closed {
                return;
            }
            let missed = self.missed.swap(0, Ordering::Relaxed);
            let n = inner.sinks.len();
            let mut rec = Some(rec);
            for (i, sink) in inner.sinks.iter_mut().enumerate() {
                sink.lost += missed;
                let r = if i + 1 == n { rec.take() } else { rec.clone() };
                if let Some(w) = r.and_then(|r| sink.push(r, size)) {
                    wake.push(w);
                }
            }
        }
        wake.into_iter().for_each(Waker::wake);
    }

    /// Client `who` connected: in the directory, and told to the taps.
    pub fn joined(&self, who: Who) {
        let mut clients = locked(&self.clients);
        clients.insert(who.client, who.clone());
        if self.on() {
            self.offer(What::Joined(who));
        }
    }

    /// Client `client` left.
    pub fn left(&self, client: u64) {
        let mut clients = locked(&self.clients);
        if clients.remove(&client).is_some() && self.on() {
            self.offer(What::Left { client });
        }
    }

    /// Attaches a tap: it gets every record from now on, and knows who is
    /// connected now (a client joins either before, and is in
    /// [`Tap::clients`], or after, and its record comes).
    pub fn attach(self: &Arc<Self>) -> Tap {
        let clients = locked(&self.clients);
        let mut inner = locked(&self.sinks);
        let id = inner.next_sink;
        inner.next_sink += 1;
        inner.sinks.push(Sink { id, ..Sink::default() });
        self.taps.fetch_add(1, Ordering::Relaxed);
        let mut clients: Vec<Who> = clients.values().cloned().collect();
        clients.sort_by_key(|w| w.client);
        Tap {
            point: self.clone(),
            id,
            clients,
        }
    }

    /// The session ended: every tap ends once it has taken what it has.
    pub fn close(&self) {
        let wake: Vec<Waker> = {
            let mut inner = locked(&self.sinks);
            inner.closed = true;
            inner.sinks.iter_mut().filter_map(|s| s.waker.take()).collect()
        };
        wake.into_iter().for_each(Waker::wake);
    }
}

/// Closes the tap point when dropped (held by the session task, so that
/// taps end when it does, however it ends).
#[derive(Debug)]
pub struct CloseGuard(pub Arc<TapPoint>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One attached tap: its records, in order, until the session ends.
/// Detached when dropped.
#[derive(Debug)]
pub struct Tap {
    point: Arc<TapPoint>,
    id: u64,
    /// Who was connected when it attached.
    pub clients: Vec<Who>,
}

impl Tap {
    /// Waits for records and moves all there are into `into` (which
    /// should be empty: its room is reused); `false` once the session has
    /// ended and everything was taken. Cancel-safe.
    pub async fn next(&mut self, into: &mut VecDeque<Record>) -> bool {
        std::future::poll_fn(|cx| {
            let mut inner = locked(&self.point.sinks);
            let missed = self.point.missed.swap(0, Ordering::Relaxed);
            inner.sinks.iter_mut().for_each(|s| s.lost += missed);
            let closed = inner.closed;
            let Some(sink) = inner.sinks.iter_mut().find(|s| s.id == self.id) else {
                return Poll::Ready(false);
            };
            if !sink.queue.is_empty() || sink.lost > 0 {
                std::mem::swap(&mut sink.queue, into);
                sink.bytes = 0;
                if sink.lost > 0 {
                    let lost = std::mem::take(&mut sink.lost);
                    into.push_back(Record {
                        at: SystemTime::now(),
                        what: What::Lost(lost),
                    });
                }
                return Poll::Ready(true);
            }
            if closed {
                return Poll::Ready(false);
            }
            sink.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let mut inner = locked(&self.point.sinks);
        inner.sinks.retain(|s| s.id != self.id);
        self.point.taps.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u8) -> What {
        What::Event(Bytes::from(vec![n]))
    }

    fn events(batch: &VecDeque<Record>) -> Vec<String> {
        batch
            .iter()
            .map(|r| match &r.what {
                What::Event(b) => format!("e{}", b[0]),
                What::Lost(n) => format!("lost {n}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn who(client: u64) -> Who {
        Who {
            client,
            peer: PeerId::Unix { pid: 1, uid: 0 },
            listener: None,
        }
    }

    #[tokio::test]
    async fn with_no_tap_nothing_is_kept() {
        let point = TapPoint::new();
        assert!(!point.on());
        point.offer(event(1));
        point.joined(who(3));
        let mut tap = point.attach();
        assert!(point.on());
        assert_eq!(tap.clients.len(), 1);
        point.offer(event(2));
        let mut batch = VecDeque::new();
        assert!(tap.next(&mut batch).await);
        assert_eq!(events(&batch), ["e2"]);
        drop(tap);
        assert!(!point.on());
    }

    #[tokio::test]
    async fn a_full_queue_loses_records_and_says_where() {
        let point = TapPoint::new();
        let mut tap = point.attach();
        let mut other = point.attach();
        for i in 0..MAX_RECORDS + 5 {
            point.offer(event((i % 200) as u8));
        }
        let mut batch = VecDeque::new();
        // Taken at once: the 5 lost come after everything kept.
        assert!(tap.next(&mut batch).await);
        assert_eq!(batch.len(), MAX_RECORDS + 1);
        assert_eq!(events(&batch).last().unwrap(), "lost 5");
        batch.clear();
        assert!(other.next(&mut batch).await);
        assert_eq!(batch.len(), MAX_RECORDS + 1);
        // Taken: room again, and nothing more to say.
        batch.clear();
        point.offer(event(8));
        assert!(tap.next(&mut batch).await);
        assert_eq!(events(&batch), ["e8"]);
    }

    /// A record too large for the room left is lost, and a smaller one
    /// after it kept: the count comes where the gap is.
    #[tokio::test]
    async fn bytes_are_bounded_too() {
        let point = TapPoint::new();
        let mut tap = point.attach();
        let big = Bytes::from(vec![b'x'; MAX_BYTES / 2 + 1]);
        point.offer(What::Event(big.clone()));
        point.offer(What::Event(big));
        point.offer(event(1));
        let mut batch = VecDeque::new();
        assert!(tap.next(&mut batch).await);
        assert_eq!(events(&batch)[1..], ["lost 1", "e1"]);
    }

    /// The VM's thread does not wait for a tap holding the lock (the
    /// kernel may have stopped it there): the record is counted lost.
    #[tokio::test]
    async fn a_held_lock_loses_the_record_and_says_so() {
        let point = TapPoint::new();
        let mut tap = point.attach();
        let held = point.sinks.lock().unwrap();
        point.offer(event(1));
        point.offer(event(2));
        drop(held);
        let mut batch = VecDeque::new();
        assert!(tap.next(&mut batch).await);
        assert_eq!(events(&batch), ["lost 2"]);
        let held = point.sinks.lock().unwrap();
        point.offer(event(3));
        drop(held);
        point.offer(event(4));
        batch.clear();
        assert!(tap.next(&mut batch).await);
        assert_eq!(events(&batch), ["lost 1", "e4"]);
    }

    #[tokio::test]
    async fn a_waiting_tap_is_woken_and_ends_with_the_session() {
        let point = TapPoint::new();
        let mut tap = point.attach();
        let offering = point.clone();
        let waiter = tokio::spawn(async move {
            let mut batch = VecDeque::new();
            let mut seen = Vec::new();
            while tap.next(&mut batch).await {
                seen.extend(events(&batch));
                batch.clear();
            }
            seen
        });
        tokio::task::yield_now().await;
        offering.joined(who(4));
        offering.offer(event(9));
        offering.left(4);
        // Unknown clients leave without a record.
        offering.left(5);
        drop(CloseGuard(offering.clone()));
        offering.offer(event(10));
        let seen = waiter.await.unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen[0].starts_with("Joined"), "{seen:?}");
        assert_eq!(seen[1], "e9");
        assert!(seen[2].starts_with("Left"), "{seen:?}");
        assert!(!point.on());
    }
}
