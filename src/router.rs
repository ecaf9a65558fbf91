//! Correlation of forwarded requests with upstream replies: a plain
//! synchronous structure owned by the upstream session task.
//!
//! Requests wait in a FIFO until the in-flight window has room, then get a
//! unique upstream number `N`; the reply carrying `N` is routed back to the
//! client and request that sent it.

use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// Which client, and which of its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Route {
    pub client: u64,
    pub seq: u64,
}

#[derive(Debug)]
struct Queued {
    route: Route,
    tail: Bytes,
    since: Instant,
    /// A passed fd to send with the request.
    fd: Option<OwnedFd>,
}

/// Requests given up on (connection ended, or timed out).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Abandoned {
    /// Sent to QEMU: the outcome is unknown.
    pub in_flight: Vec<Route>,
    /// Never sent: not executed.
    pub queued: Vec<Route>,
}

#[derive(Debug)]
pub struct Router {
    next_n: u64,
    window: usize,
    queue: VecDeque<Queued>,
    in_flight: HashMap<u64, (Route, Instant)>,
    /// Timed out while QEMU still owes the reply: the late reply is
    /// discarded, and the request still counts against the window (it
    /// still occupies QEMU's queue).
    expired: HashSet<u64>,
    /// Out-of-band requests waiting to be written (a few at most).
    oob_queue: VecDeque<Queued>,
    /// Upstream numbers of OOB requests in flight or expired: outside the
    /// in-band window.
    oob: HashSet<u64>,
    /// The one fd-carrying request QEMU has not answered yet.
    fd_in_flight: Option<u64>,
}

impl Router {
    pub fn new(window: usize) -> Self {
        Router {
            next_n: 1,
            window: window.max(1),
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            expired: HashSet::new(),
            oob_queue: VecDeque::new(),
            oob: HashSet::new(),
            fd_in_flight: None,
        }
    }

    /// The in-flight limit; QEMU queues at most 8 in-band commands.
    pub fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    pub fn submit(&mut self, route: Route, tail: Bytes, now: Instant) {
        self.submit_fd(route, tail, None, now)
    }

    /// A request carrying a passed fd. QEMU mixes fds up when two such
    /// requests are queued at once, so only one is in flight at a time, and
    /// requests behind it wait their turn.
    pub fn submit_fd(&mut self, route: Route, tail: Bytes, fd: Option<OwnedFd>, now: Instant) {
        self.queue.push_back(Queued {
            route,
            tail,
            since: now,
            fd,
        });
    }

    /// An out-of-band request (`exec-oob`): QEMU runs it at once, even with
    /// its in-band queue full, so it skips the queue and the window.
    pub fn submit_oob(&mut self, route: Route, tail: Bytes, now: Instant) {
        self.oob_queue.push_back(Queued {
            route,
            tail,
            since: now,
            fd: None,
        });
    }

    /// The next request to write upstream, if the window has room (OOB ones
    /// always have): its upstream number and the bytes after `{"id": N`.
    pub fn next_to_send(&mut self) -> Option<(u64, Bytes)> {
        self.next_with_fd().map(|(n, tail, _)| (n, tail))
    }

    /// [`Router::next_to_send`], with the fd to send along, if any.
    pub fn next_with_fd(&mut self) -> Option<(u64, Bytes, Option<OwnedFd>)> {
        let oob = !self.oob_queue.is_empty();
        if !oob && self.in_flight.len() + self.expired.len() - self.oob.len() >= self.window {
            return None;
        }
        if !oob && self.fd_in_flight.is_some() && self.queue.front().is_some_and(|q| q.fd.is_some()) {
            return None;
        }
        let q = if oob {
            self.oob_queue.pop_front()
        } else {
            self.queue.pop_front()
        }?;
        let n = self.next_n;
        self.next_n += 1;
        self.in_flight.insert(n, (q.route, q.since));
        if oob {
            self.oob.insert(n);
        }
        if q.fd.is_some() {
            self.fd_in_flight = Some(n);
        }
        Some((n, q.tail, q.fd))
    }

    /// The reply with upstream number `n` arrived: who gets it, and when
    /// the request was submitted. `None` for a reply nobody waits for any
    /// more (timed out, or unknown).
    pub fn complete(&mut self, n: u64) -> Option<(Route, Instant)> {
        self.oob.remove(&n);
        if self.fd_in_flight == Some(n) {
            self.fd_in_flight = None;
        }
        if self.expired.remove(&n) {
            return None;
        }
        self.in_flight.remove(&n)
    }

    /// Gives up on requests submitted longer than `timeout` ago.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Abandoned {
        let late = |since: Instant| now.saturating_duration_since(since) >= timeout;
        let mut sent: Vec<(u64, Route)> = self
            .in_flight
            .iter()
            .filter(|(_, (_, since))| late(*since))
            .map(|(n, (r, _))| (*n, *r))
            .collect();
        sent.sort_unstable_by_key(|(n, _)| *n);
        for (n, _) in &sent {
            self.in_flight.remove(n);
            self.expired.insert(*n);
        }
        let mut queued = Vec::new();
        self.queue.retain(|q| {
            let keep = !late(q.since);
            if !keep {
                queued.push(q.route);
            }
            keep
        });
        Abandoned {
            in_flight: sent.into_iter().map(|(_, r)| r).collect(),
            queued,
        }
    }

    /// A client left: its queued requests are dropped; its in-flight ones
    /// stay until their replies come (they still occupy QEMU's queue), and
    /// those replies are then discarded.
    pub fn forget_client(&mut self, client: u64) {
        self.queue.retain(|q| q.route.client != client);
        self.oob_queue.retain(|q| q.route.client != client);
    }

    /// The connection ended: everything outstanding, in sending order.
    pub fn abandon(&mut self) -> Abandoned {
        self.expired.clear();
        self.oob.clear();
        self.fd_in_flight = None;
        let mut sent: Vec<(u64, Route)> = self.in_flight.drain().map(|(n, (r, _))| (n, r)).collect();
        sent.sort_unstable_by_key(|(n, _)| *n);
        Abandoned {
            in_flight: sent.into_iter().map(|(_, r)| r).collect(),
            queued: self
                .oob_queue
                .drain(..)
                .chain(self.queue.drain(..))
                .map(|q| q.route)
                .collect(),
        }
    }

    /// Whether `route` was sent and QEMU has not answered it yet.
    pub fn is_in_flight(&self, route: Route) -> bool {
        self.in_flight.values().any(|(r, _)| *r == route)
    }

    /// Requests sent to QEMU and not answered yet (timed-out ones included).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.expired.len()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(client: u64, seq: u64) -> Route {
        Route { client, seq }
    }

    fn now() -> Instant {
        Instant::now()
    }

    #[test]
    fn expired_requests_keep_their_window_slot_and_lose_their_reply() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut rt = Router::new(1);
        rt.submit(r(1, 0), Bytes::new(), t0);
        rt.submit(r(1, 1), Bytes::new(), t0);
        rt.submit(r(2, 0), Bytes::new(), t0 + sec);
        let (n, _) = rt.next_to_send().unwrap();
        let gone = rt.expire(t0 + sec, sec);
        assert_eq!(gone.in_flight, vec![r(1, 0)]);
        assert_eq!(gone.queued, vec![r(1, 1)]);
        // QEMU still holds the expired one: nothing more is sent yet.
        assert!(rt.next_to_send().is_none());
        assert_eq!(rt.in_flight(), 1);
        // Its late reply is swallowed, and frees the slot.
        assert_eq!(rt.complete(n).map(|(r, _)| r), None);
        let (n2, _) = rt.next_to_send().unwrap();
        assert_eq!(rt.complete(n2).map(|(r, _)| r), Some(r(2, 0)));
    }

    #[test]
    fn window_limits_what_is_sent() {
        let mut rt = Router::new(2);
        for s in 0..4 {
            rt.submit(r(1, s), Bytes::from(format!("t{s}")), now());
        }
        let (n1, t1) = rt.next_to_send().unwrap();
        let (n2, _) = rt.next_to_send().unwrap();
        assert_eq!(&t1[..], b"t0");
        assert!(rt.next_to_send().is_none());
        assert_ne!(n1, n2);
        assert_eq!(rt.complete(n1).map(|(r, _)| r), Some(r(1, 0)));
        assert_eq!(rt.complete(n1).map(|(r, _)| r), None, "a reply is routed once");
        let (_, t3) = rt.next_to_send().unwrap();
        assert_eq!(&t3[..], b"t2");
        assert_eq!((rt.in_flight(), rt.queued()), (2, 1));
    }

    #[test]
    fn oob_requests_skip_the_queue_and_the_window() {
        let mut rt = Router::new(1);
        rt.submit(r(1, 0), Bytes::from("in0"), now());
        rt.submit(r(1, 1), Bytes::from("in1"), now());
        let (n0, _) = rt.next_to_send().unwrap();
        assert!(rt.next_to_send().is_none(), "window full");
        rt.submit_oob(r(2, 0), Bytes::from("oob"), now());
        let (n_oob, t) = rt.next_to_send().unwrap();
        assert_eq!(&t[..], b"oob");
        // Its reply may overtake; it never counted against the window.
        assert_eq!(rt.complete(n_oob).map(|(r, _)| r), Some(r(2, 0)));
        assert!(rt.next_to_send().is_none());
        assert_eq!(rt.complete(n0).map(|(r, _)| r), Some(r(1, 0)));
        assert_eq!(&rt.next_to_send().unwrap().1[..], b"in1");
    }

    #[test]
    fn one_fd_carrying_request_in_flight_at_a_time() {
        let fd = || Some(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let mut rt = Router::new(8);
        rt.submit_fd(r(1, 0), Bytes::from("a"), fd(), now());
        rt.submit_fd(r(2, 0), Bytes::from("b"), fd(), now());
        rt.submit(r(3, 0), Bytes::from("c"), now());
        let (n, _, f) = rt.next_with_fd().unwrap();
        assert!(f.is_some());
        // The second fd request waits for the first's reply, and (FIFO)
        // so does what is queued behind it.
        assert!(rt.next_with_fd().is_none());
        rt.complete(n);
        let (_, t, f) = rt.next_with_fd().unwrap();
        assert_eq!((&t[..], f.is_some()), (&b"b"[..], true));
    }

    #[test]
    fn numbers_are_unique_across_many_requests() {
        let mut rt = Router::new(8);
        let mut seen = std::collections::HashSet::new();
        for s in 0..1000 {
            rt.submit(r(s % 3, s), Bytes::new(), now());
            let (n, _) = rt.next_to_send().unwrap();
            assert!(seen.insert(n));
            assert_eq!(rt.complete(n).map(|(r, _)| r), Some(r(s % 3, s)));
        }
    }

    #[test]
    fn abandon_reports_sent_and_unsent_in_order() {
        let mut rt = Router::new(2);
        for s in 0..5 {
            rt.submit(r(s % 2, s), Bytes::new(), now());
        }
        rt.next_to_send();
        rt.next_to_send();
        let a = rt.abandon();
        assert_eq!(a.in_flight, vec![r(0, 0), r(1, 1)]);
        assert_eq!(a.queued, vec![r(0, 2), r(1, 3), r(0, 4)]);
        assert_eq!((rt.in_flight(), rt.queued()), (0, 0));
    }

    #[test]
    fn forgotten_client_loses_only_its_queued_requests() {
        let mut rt = Router::new(1);
        rt.submit(r(1, 0), Bytes::new(), now());
        rt.submit(r(1, 1), Bytes::new(), now());
        rt.submit(r(2, 0), Bytes::new(), now());
        let (n, _) = rt.next_to_send().unwrap();
        rt.forget_client(1);
        assert_eq!(rt.complete(n).map(|(r, _)| r), Some(r(1, 0)));
        let (n2, _) = rt.next_to_send().unwrap();
        assert_eq!(rt.complete(n2).map(|(r, _)| r), Some(r(2, 0)));
        assert!(rt.next_to_send().is_none());
    }
}
