//! A client's mailbox: the session's messages to one client, bounded in
//! bytes rather than in messages (one QEMU reply can be megabytes, and a
//! client that stops reading must not make qmpmux grow without bound).
//!
//! One sender (the session), one receiver (the client task), both on the
//! VM's thread. It is a queue behind an uncontended lock rather than a
//! tokio channel because an idle client must stay small: tokio's unbounded
//! channel allocates a 32-message block up front (1.8 KiB per client with
//! its header), while this queue allocates nothing until a message comes.
//!
//! While the client waits with nothing to write and nothing queued, the
//! session may skip the queue and write to the client's socket itself: an
//! event, or the reply the client waits for first (see [`Expect`]), without
//! waking the client's task. What a full socket does not take is queued
//! first, and direct writes stop until the client has written it.

use super::{Answer, ToClient, Written};
use crate::qmp::incoming::ReplyBytes;
use crate::runtime::sock::Direct;
use bytes::Bytes;
use futures_util::task::AtomicWaker;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

/// Fixed cost counted per message besides its bytes (queue slot, Bytes
/// header), so that a flood of tiny messages is bounded too.
const PER_MESSAGE: usize = 64;

/// An emptied queue keeps at most this many slots: a burst's memory goes
/// back once the client has read it.
const KEEP_SLOTS: usize = 16;

/// Why a message could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The client has more than its budget waiting: it is not reading.
    Full,
    /// The client task is gone.
    Closed,
}

/// The reply a client waits for first: the one to its oldest request still
/// unanswered, with nothing answered after it waiting to be written. While
/// the client is idle (see [`MailboxReceiver::allow_direct`]) the session
/// may write that reply to the client's socket itself.
#[derive(Debug)]
pub struct Expect {
    /// The client's number for the request.
    pub seq: u64,
    /// Its id, as QEMU would echo it.
    pub id: Option<String>,
    /// Larger replies take the client's own path (an error instead).
    pub max_reply: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The client's socket, for events and replies written by the session
    /// itself: held here so that `Shared::direct_fd` stays open.
    direct: Option<Direct>,
    expect: Option<Expect>,
    queue: VecDeque<ToClient>,
    /// Bytes waiting, by `cost`.
    queued: usize,
    sender_gone: bool,
    receiver_gone: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The client waits with nothing to write and nothing queued, and takes
    /// events: the next one may go straight to its socket. Set by the
    /// client before every wait (only with the queue empty), cleared by
    /// anything queued. Outside the lock, beside the socket's descriptor:
    /// an event for an idle client then reads one cache line of its
    /// mailbox, which with a thousand clients is what the time goes on.
    direct_on: AtomicBool,
    /// The socket of `State::direct` (-1 before it is set).
    direct_fd: AtomicI32,
    /// The client task, when it waits for a message.
    waker: AtomicWaker,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            state: Mutex::default(),
            direct_on: AtomicBool::new(false),
            direct_fd: AtomicI32::new(-1),
            waker: AtomicWaker::new(),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing can panic while the lock is held; a poisoned lock would
        // only mean a panic elsewhere on this thread, and the state is
        // still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The session's end. Dropping it ends the client's stream of messages
/// (after those already queued).
#[derive(Debug)]
pub struct MailboxSender {
    shared: Arc<Shared>,
    limit: usize,
}

/// The client task's end. Dropping it discards what is queued and makes
/// every later send fail with `Closed`.
#[derive(Debug)]
pub struct MailboxReceiver {
    shared: Arc<Shared>,
}

pub fn mailbox(limit: usize) -> (MailboxSender, MailboxReceiver) {
    let shared = Arc::new(Shared::default());
    (
        MailboxSender {
            shared: shared.clone(),
            limit,
        },
        MailboxReceiver { shared },
    )
}

fn cost(msg: &ToClient) -> usize {
    PER_MESSAGE
        + match msg {
            ToClient::Reply { reply, .. } => reply.len(),
            ToClient::Event(line) => line.len(),
            ToClient::Failed { .. } | ToClient::FdBack(_) => 0,
            ToClient::Answer { answer, .. } => match &**answer {
                Answer::Return(text) | Answer::Leased(text) => text.len(),
                Answer::Error { desc, .. } => desc.len(),
            },
            ToClient::Replay(lines) => lines.iter().map(|l| l.len() + PER_MESSAGE).sum(),
            ToClient::Written(w) => w.rest.len(),
        }
}

impl MailboxSender {
    pub fn send(&self, msg: ToClient) -> Result<(), SendError> {
        let state = self.shared.lock();
        if state.receiver_gone {
            return Err(SendError::Closed);
        }
        self.enqueue(state, msg)
    }

    /// The client's socket, if an event may go straight to it now: the
    /// client has nothing else to write and nothing is queued. The caller
    /// then writes the event there itself (no wake-up of the client's
    /// task, no copy into its buffer), and hands what did not go to
    /// [`MailboxSender::queue_event`] before anything else is sent.
    pub fn direct_fd(&self) -> Option<RawFd> {
        self.shared
            .direct_on
            .load(Ordering::Relaxed)
            // Open: `State::direct` holds it for as long as `shared` lives.
            .then(|| self.shared.direct_fd.load(Ordering::Relaxed))
    }

    /// Queues an event line (or what a direct write left of it) for the
    /// client's task to write; direct writes stop until it has.
    pub fn queue_event(&self, line: Bytes) -> Result<(), SendError> {
        let state = self.shared.lock();
        if state.receiver_gone {
            return Err(SendError::Closed);
        }
        self.enqueue(state, ToClient::Event(line))
    }

    /// The socket and line for QEMU's reply to request `seq`, if the client
    /// is idle and waits for that reply first (see [`Expect`]): the caller
    /// then writes the line there itself, and hands what did not go to
    /// [`MailboxSender::written_rest`] before anything else is sent. The
    /// client learns of it (a [`ToClient::Written`]) when it next wakes,
    /// without being woken for it; direct writes stop until then.
    pub fn direct_reply(&self, seq: u64, reply: &ReplyBytes) -> Option<(RawFd, Bytes)> {
        let fd = self.direct_fd()?;
        let mut state = self.shared.lock();
        if state.receiver_gone {
            return None;
        }
        let expect = state.expect.take_if(|e| e.seq == seq && reply.len() <= e.max_reply)?;
        let line = reply.line(expect.id.as_deref());
        // Nothing is queued (`direct_on`): this is the client's next message.
        let written = ToClient::Written(Box::new(Written {
            seq,
            rest: Bytes::new(),
        }));
        state.queued += cost(&written);
        state.queue.push_back(written);
        self.shared.direct_on.store(false, Ordering::Relaxed);
        Some((fd, line))
    }

    /// What a direct write of reply `seq` left unwritten, for the client's
    /// task to write first.
    pub fn written_rest(&self, seq: u64, rest: Bytes) {
        let mut state = self.shared.lock();
        let len = rest.len();
        match state
            .queue
            .iter_mut()
            .find(|m| matches!(m, ToClient::Written(w) if w.seq == seq))
        {
            Some(ToClient::Written(w)) => w.rest = rest,
            // The client is gone (its queue with it).
            _ => return,
        }
        state.queued += len;
        drop(state);
        self.shared.waker.wake();
    }

    fn enqueue(&self, mut state: MutexGuard<'_, State>, msg: ToClient) -> Result<(), SendError> {
        let c = cost(&msg);
        // Failure notices must always get through: they are replies, of a
        // fixed size (`cost` counts none of their text), and there are at
        // most as many as the client has requests in flight. Everything
        // else, qmpmux's own answers included (a lease refusal carries the
        // holder's reason, `query-events` up to the whole history), counts
        // against the budget like QEMU's replies: a client that lets them
        // pile up is not reading. (The client task reads no request while
        // its output is over budget, and has at most one of qmpmux's own
        // commands answered by the session at a time, so one that reads is
        // never refused here for pipelining them.)
        let must = matches!(msg, ToClient::Failed { .. } | ToClient::FdBack(_));
        {
            // The budget is for a backlog: one message larger than all of
            // it still goes to a client with (next to) nothing waiting.
            if !must && state.queued + c > self.limit && (c <= self.limit || state.queued > self.limit / 4) {
                return Err(SendError::Full);
            }
            state.queued += c;
            state.queue.push_back(msg);
            self.shared.direct_on.store(false, Ordering::Relaxed);
        }
        drop(state);
        self.shared.waker.wake();
        Ok(())
    }
}

impl Drop for MailboxSender {
    fn drop(&mut self) {
        self.shared.lock().sender_gone = true;
        self.shared.waker.wake();
    }
}

impl MailboxReceiver {
    /// Lets the session write events to the client's socket itself.
    pub fn set_direct(&mut self, direct: Direct) {
        let fd = direct.raw_fd();
        self.shared.lock().direct = Some(direct);
        self.shared.direct_fd.store(fd, Ordering::Relaxed);
    }

    /// The reply the client now waits for first, if any. A stale one is
    /// harmless: its reply has come (the client's numbers are never reused).
    pub fn expect(&mut self, expect: Option<Expect>) {
        self.shared.lock().expect = expect;
    }

    /// Whether it may now: only while the client has nothing of its own
    /// to write (`on`: its buffer is empty and it takes events) and
    /// nothing is queued for it. Set before every wait; the session runs
    /// on the same thread, only while the client's task waits.
    pub fn allow_direct(&mut self, on: bool) {
        let on = on && {
            let state = self.shared.lock();
            state.direct.is_some() && state.queue.is_empty() && !state.receiver_gone
        };
        self.shared.direct_on.store(on, Ordering::Relaxed);
    }

    /// The next message; `None` once the sender is gone and the queue is
    /// empty. Cancel-safe: a message is taken only when it is returned.
    pub async fn recv(&mut self) -> Option<ToClient> {
        std::future::poll_fn(|cx| {
            if let Some(next) = self.take() {
                return Poll::Ready(next);
            }
            self.shared.waker.register(cx.waker());
            // A send between the first look and the registration would
            // have found no waker: look again.
            match self.take() {
                Some(next) => Poll::Ready(next),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<ToClient> {
        self.take().flatten()
    }

    /// `Some(Some(msg))`: a message; `Some(None)`: the sender is gone and
    /// nothing is left; `None`: nothing yet.
    fn take(&self) -> Option<Option<ToClient>> {
        let mut state = self.shared.lock();
        match state.queue.pop_front() {
            Some(msg) => {
                state.queued -= cost(&msg);
                if state.queue.is_empty() && state.queue.capacity() > KEEP_SLOTS {
                    state.queue.shrink_to(KEEP_SLOTS);
                }
                Some(Some(msg))
            }
            None if state.sender_gone => Some(None),
            None => None,
        }
    }
}

impl Drop for MailboxReceiver {
    fn drop(&mut self) {
        // The waker refers to the client's task: holding on to it would
        // keep the finished task's memory until the session lets go too.
        drop(self.shared.waker.take());
        self.shared.direct_on.store(false, Ordering::Relaxed);
        let mut state = self.shared.lock();
        state.receiver_gone = true;
        let queue = std::mem::take(&mut state.queue);
        state.queued = 0;
        drop(state);
        // Freed outside the lock: a queue can hold megabytes.
        drop(queue);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn failed(seq: u64) -> ToClient {
        ToClient::Failed {
            seq,
            kind: crate::upstream::FailKind::Lost,
        }
    }

    fn event(n: usize) -> ToClient {
        ToClient::Event(Bytes::from(vec![b'x'; n]))
    }

    #[tokio::test]
    async fn events_may_go_straight_to_an_idle_client_s_socket_only() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let (_ar, aw) = crate::runtime::sock::split(a).unwrap();
        let (tx, mut rx) = mailbox(1 << 20);
        // No socket yet (a TLS client has none).
        rx.allow_direct(true);
        assert_eq!(tx.direct_fd(), None);
        rx.set_direct(aw.direct());
        // Not allowed yet (the client has not negotiated, or has output).
        rx.allow_direct(false);
        assert_eq!(tx.direct_fd(), None);
        rx.allow_direct(true);
        assert_eq!(tx.direct_fd(), Some(aw.as_raw_fd()));
        // Something queued goes first: direct writes stop until the client
        // has taken it, and are allowed again only with the queue empty.
        tx.send(failed(1)).unwrap();
        assert_eq!(tx.direct_fd(), None);
        tx.queue_event(Bytes::from_static(b"three\r\n")).unwrap();
        rx.allow_direct(true);
        assert_eq!(tx.direct_fd(), None);
        assert!(matches!(rx.try_recv(), Some(ToClient::Failed { .. })));
        assert!(matches!(rx.try_recv(), Some(ToClient::Event(e)) if e == b"three\r\n"[..]));
        rx.allow_direct(true);
        assert_eq!(tx.direct_fd(), Some(aw.as_raw_fd()));
        // The rest of a short direct write is queued: direct writes stop.
        tx.queue_event(Bytes::from_static(b"rest")).unwrap();
        assert_eq!(tx.direct_fd(), None);
        // A client that is gone takes nothing.
        drop(rx);
        assert_eq!(tx.direct_fd(), None);
        assert_eq!(tx.queue_event(Bytes::from_static(b"x")), Err(SendError::Closed));
    }

    fn reply(n: u64) -> ReplyBytes {
        let msg = Bytes::from(format!("{{\"return\": {{}}, \"id\": {n}}}"));
        match crate::qmp::incoming::classify(&msg) {
            Ok(crate::qmp::incoming::Incoming::Reply(r)) => r.bytes,
            other => panic!("{other:?}"),
        }
    }

    fn expect(seq: u64, id: &str) -> Option<Expect> {
        Some(Expect {
            seq,
            id: Some(id.into()),
            max_reply: 100,
        })
    }

    #[tokio::test]
    async fn the_reply_an_idle_client_waits_for_first_may_go_straight_to_its_socket() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let (_ar, aw) = crate::runtime::sock::split(a).unwrap();
        let (tx, mut rx) = mailbox(1 << 20);
        rx.set_direct(aw.direct());
        let fd = aw.as_raw_fd();
        // Not idle, or not waiting for that reply: the mailbox's way.
        rx.expect(expect(3, "\"a\""));
        rx.allow_direct(false);
        assert!(tx.direct_reply(3, &reply(0)).is_none());
        rx.allow_direct(true);
        assert!(tx.direct_reply(4, &reply(0)).is_none());
        // Too large for the client: its own way, which says so.
        rx.expect(Some(Expect {
            seq: 3,
            id: None,
            max_reply: 5,
        }));
        assert!(tx.direct_reply(3, &reply(0)).is_none());
        // The one: the line carries the client's id; the client learns of
        // it when it next looks, and until then nothing else goes direct.
        rx.expect(expect(3, "\"a\""));
        let (to, line) = tx.direct_reply(3, &reply(0)).unwrap();
        assert_eq!((to, &line[..]), (fd, &b"{\"return\": {}, \"id\": \"a\"}\r\n"[..]));
        assert_eq!(tx.direct_fd(), None);
        assert!(tx.direct_reply(3, &reply(0)).is_none(), "taken once");
        // What the socket had no room for is written first, before what
        // came after it.
        tx.queue_event(Bytes::from_static(b"event")).unwrap();
        tx.written_rest(3, line.slice(10..));
        match rx.try_recv() {
            Some(ToClient::Written(w)) => assert_eq!((w.seq, &w.rest[..]), (3, &line[10..])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(rx.try_recv(), Some(ToClient::Event(_))));
        assert_eq!(rx.shared.lock().queued, 0, "its bytes were counted, and freed");
        // Allowed again once the client has taken it all; an expectation
        // it replaced (or cleared) is gone.
        rx.allow_direct(true);
        rx.expect(None);
        assert!(tx.direct_reply(3, &reply(0)).is_none());
        rx.expect(expect(5, "7"));
        let (_, line) = tx.direct_reply(5, &reply(1)).unwrap();
        assert_eq!(&line[..], b"{\"return\": {}, \"id\": 7}\r\n");
        // A client that is gone takes nothing.
        let _ = rx.try_recv();
        rx.allow_direct(true);
        rx.expect(expect(6, "8"));
        drop(rx);
        assert!(tx.direct_reply(6, &reply(0)).is_none());
    }

    #[tokio::test]
    async fn budget_is_in_bytes_and_freed_by_reading() {
        let (tx, mut rx) = mailbox(1000);
        assert_eq!(tx.send(event(400)), Ok(()));
        assert_eq!(tx.send(event(400)), Ok(()));
        assert_eq!(tx.send(event(400)), Err(SendError::Full));
        // A failure notice is a reply: never refused for space.
        assert_eq!(tx.send(failed(1)), Ok(()));
        // qmpmux's own answers count like anything else, refusals too.
        let refusal = |n| ToClient::Answer {
            seq: 2,
            answer: Box::new(Answer::Leased("x".repeat(n))),
        };
        assert_eq!(tx.send(refusal(400)), Err(SendError::Full));
        // A refused command's fd goes back to the client whatever waits.
        let fd = std::fs::File::open("/dev/null").unwrap().into();
        assert_eq!(tx.send(ToClient::FdBack(fd)), Ok(()));
        rx.recv().await.unwrap();
        assert_eq!(tx.send(refusal(300)), Ok(()), "room again");
        drop(rx);
        assert_eq!(tx.send(failed(2)), Err(SendError::Closed));
    }

    #[tokio::test]
    async fn one_message_larger_than_the_budget_goes_to_a_client_with_no_backlog() {
        let (tx, mut rx) = mailbox(1000);
        assert_eq!(tx.send(event(5000)), Ok(()), "nothing waiting: delivered");
        // Behind it, the budget holds as before: a backlog means not reading.
        assert_eq!(tx.send(event(10)), Err(SendError::Full));
        rx.recv().await.unwrap();
        assert_eq!(tx.send(event(100)), Ok(()));
        assert_eq!(tx.send(event(5000)), Ok(()), "a small backlog does not stop it");
        rx.recv().await.unwrap();
        rx.recv().await.unwrap();
        assert_eq!(tx.send(event(400)), Ok(()));
        assert_eq!(
            tx.send(event(5000)),
            Err(SendError::Full),
            "over a quarter of the budget waiting: not reading"
        );
    }

    #[tokio::test]
    async fn messages_come_in_order_then_none_once_the_sender_is_gone() {
        let (tx, mut rx) = mailbox(1 << 20);
        for seq in 0..100 {
            tx.send(failed(seq)).unwrap();
        }
        drop(tx);
        for want in 0..100 {
            match rx.recv().await {
                Some(ToClient::Failed { seq, .. }) => assert_eq!(seq, want),
                other => panic!("{other:?}"),
            }
        }
        assert!(rx.recv().await.is_none());
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_sender_leaving() {
        let (tx, mut rx) = mailbox(1 << 20);
        let reader = tokio::spawn(async move {
            let first = rx.recv().await.is_some();
            let second = rx.recv().await.is_none();
            (first, second)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.send(event(10)).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        let done = tokio::time::timeout(Duration::from_secs(5), reader).await;
        assert_eq!(done.expect("receiver never woke").unwrap(), (true, true));
    }

    #[tokio::test]
    async fn recv_is_cancel_safe() {
        let (tx, mut rx) = mailbox(1 << 20);
        // A recv abandoned while waiting takes nothing.
        assert!(tokio::time::timeout(Duration::from_millis(10), rx.recv())
            .await
            .is_err());
        tx.send(failed(7)).unwrap();
        assert!(matches!(rx.try_recv(), Some(ToClient::Failed { seq: 7, .. })));
    }

    #[test]
    fn an_idle_mailbox_holds_no_queue_and_a_burst_is_given_back() {
        let (tx, mut rx) = mailbox(1 << 30);
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
        for _ in 0..1000 {
            tx.send(event(1)).unwrap();
        }
        while rx.try_recv().is_some() {}
        let state = rx.shared.lock();
        assert!(state.queue.capacity() <= KEEP_SLOTS, "{}", state.queue.capacity());
        assert_eq!(state.queued, 0);
    }
}
