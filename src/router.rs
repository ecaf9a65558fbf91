//! Correlation of forwarded requests with upstream replies, and the turns
//! clients take at QEMU's monitor: a plain synchronous structure owned by
//! the upstream session task.
//!
//! Each client's requests wait in a FIFO of their own. When the in-flight
//! window has room, clients with waiting requests take turns, one request
//! each, as QEMU's dispatcher takes one request from each of its monitors in
//! turn. QEMU runs what it has queued in order, so what one client has in
//! QEMU's queue is what a newcomer waits for: a client adds a request to
//! QEMU's queue only while those it already has there are expected to take
//! QEMU less than `ahead` (judged by how long its recent requests took), and
//! always has at least one. A client pipelining slow commands thus has one
//! in QEMU at a time, and a newcomer waits behind at most that one, as on a
//! monitor of its own; one pipelining cheap commands keeps several there,
//! and QEMU busy. Each request then gets an upstream number `N`, the
//! smallest not in flight (QEMU reads its input a byte at a time, a few µs
//! a byte, and with at most 8 in-band requests in QEMU `N` stays one digit);
//! the reply carrying `N` is routed back to the client and request that
//! sent it, and frees `N`.

use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
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
    /// Submission order across all clients (for reports in that order).
    order: u64,
    /// A passed fd to send with the request.
    fd: Option<OwnedFd>,
}

/// One client's requests not yet sent, and how many it has in QEMU.
#[derive(Debug, Default)]
struct Lane {
    queue: VecDeque<Queued>,
    /// In-band requests sent and not answered (timed-out ones included:
    /// they still occupy QEMU's queue).
    in_flight: usize,
    /// Listed in `turns`.
    has_turn: bool,
    /// How long QEMU took for this client's recent in-band requests (a
    /// moving average); `None` until the first reply.
    cost: Option<Duration>,
    /// The client left: the lane goes once its last reply is in.
    gone: bool,
}

impl Lane {
    /// Whether another of its requests may join those it has in QEMU.
    /// `Duration::MAX`: no limit but the window.
    fn may_add(&self, ahead: Duration) -> bool {
        self.in_flight == 0
            || ahead == Duration::MAX
            || self
                .cost
                .and_then(|c| c.checked_mul(self.in_flight as u32))
                .is_some_and(|queued| queued < ahead)
    }

    /// A reply came after QEMU spent `took` on the request.
    fn observe(&mut self, took: Duration) {
        self.cost = Some(match self.cost {
            None => took,
            Some(c) => (c * 3 + took) / 4,
        });
    }
}

/// When an answered request was submitted, and when it was handed out to
/// be written to QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Times {
    pub since: Instant,
    pub sent_at: Instant,
}

/// Requests given up on (connection ended, or timed out).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Abandoned {
    /// Sent to QEMU: the outcome is unknown.
    pub in_flight: Vec<Route>,
    /// Never sent: not executed.
    pub queued: Vec<Route>,
}

/// A request sent upstream and not answered yet.
#[derive(Debug)]
struct Sent {
    route: Route,
    since: Instant,
    /// When it was handed out to be written upstream.
    sent_at: Instant,
    oob: bool,
    /// Given up on (timed out): its late reply is discarded.
    expired: bool,
}

#[derive(Debug)]
pub struct Router {
    /// Upstream numbers are `0..next_n`; those in `free` are not in use.
    next_n: u64,
    free: BinaryHeap<Reverse<u64>>,
    next_order: u64,
    window: usize,
    ahead: Duration,
    lanes: HashMap<u64, Lane>,
    /// Clients with a request waiting and room in their share, in the order
    /// they get their turns. An entry whose lane has `has_turn` unset is
    /// stale and skipped.
    turns: VecDeque<u64>,
    /// Requests waiting in all lanes.
    queued: usize,
    sent: HashMap<u64, Sent>,
    /// In-band requests in `sent` (expired ones included).
    in_band: usize,
    /// Out-of-band requests waiting to be written (a few at most).
    oob_queue: VecDeque<Queued>,
    /// The one fd-carrying request QEMU has not answered yet.
    fd_in_flight: Option<u64>,
    /// When the last in-band reply came: QEMU, which runs in-band requests
    /// one after another, started on the next one then at the earliest.
    last_done: Option<Instant>,
}

impl Router {
    /// `window`: in-band requests in QEMU at once (QEMU queues at most 8);
    /// `ahead`: how much of QEMU's time one client's requests may queue
    /// there (see the module's documentation; `Duration::MAX`: no limit).
    pub fn new(window: usize, ahead: Duration) -> Self {
        Router {
            next_n: 0,
            free: BinaryHeap::new(),
            next_order: 0,
            window: window.max(1),
            ahead,
            lanes: HashMap::new(),
            turns: VecDeque::new(),
            queued: 0,
            sent: HashMap::new(),
            in_band: 0,
            oob_queue: VecDeque::new(),
            fd_in_flight: None,
            last_done: None,
        }
    }

    pub fn submit(&mut self, route: Route, tail: Bytes, now: Instant) {
        self.submit_fd(route, tail, None, now)
    }

    /// A request carrying a passed fd. QEMU mixes fds up when two such
    /// requests are queued at once, so only one is in flight at a time; the
    /// client's requests behind it wait their turn, other clients' do not.
    pub fn submit_fd(&mut self, route: Route, tail: Bytes, fd: Option<OwnedFd>, now: Instant) {
        let order = self.next_order;
        self.next_order += 1;
        let lane = self.lanes.entry(route.client).or_default();
        lane.queue.push_back(Queued {
            route,
            tail,
            since: now,
            order,
            fd,
        });
        lane.gone = false;
        self.queued += 1;
        Self::offer_turn(&mut self.turns, self.ahead, route.client, lane);
    }

    /// Lists the client for a turn if it has a request waiting and may add
    /// one to QEMU's queue.
    fn offer_turn(turns: &mut VecDeque<u64>, ahead: Duration, client: u64, lane: &mut Lane) {
        if !lane.has_turn && !lane.queue.is_empty() && lane.may_add(ahead) {
            lane.has_turn = true;
            turns.push_back(client);
        }
    }

    /// An out-of-band request (`exec-oob`): QEMU runs it at once, even with
    /// its in-band queue full, so it skips the turns and the window.
    pub fn submit_oob(&mut self, route: Route, tail: Bytes, now: Instant) {
        let order = self.next_order;
        self.next_order += 1;
        self.oob_queue.push_back(Queued {
            route,
            tail,
            since: now,
            order,
            fd: None,
        });
    }

    /// The next request to write upstream, if the window has room (OOB ones
    /// always have): its upstream number and the bytes after `{"id": N`.
    #[cfg(test)]
    pub fn next_to_send(&mut self) -> Option<(u64, Bytes)> {
        self.next_with_fd(Instant::now()).map(|(n, tail, _)| (n, tail))
    }

    /// [`Router::next_to_send`], with the fd to send along, if any; `now`
    /// is when it leaves for QEMU.
    pub fn next_with_fd(&mut self, now: Instant) -> Option<(u64, Bytes, Option<OwnedFd>)> {
        if let Some(q) = self.oob_queue.pop_front() {
            return Some(self.send(q, true, now));
        }
        if self.in_band >= self.window {
            return None;
        }
        // At most one pass over the clients waiting for a turn: a client
        // whose next request carries an fd while another fd request is in
        // flight keeps its place and lets the next one go.
        for _ in 0..self.turns.len() {
            let client = self.turns.pop_front()?;
            let Some(lane) = self.lanes.get_mut(&client).filter(|l| l.has_turn) else {
                continue;
            };
            if self.fd_in_flight.is_some() && lane.queue.front().is_some_and(|q| q.fd.is_some()) {
                self.turns.push_back(client);
                continue;
            }
            let Some(q) = lane.queue.pop_front() else {
                lane.has_turn = false;
                continue;
            };
            self.queued -= 1;
            lane.in_flight += 1;
            lane.has_turn = false;
            Self::offer_turn(&mut self.turns, self.ahead, client, lane);
            return Some(self.send(q, false, now));
        }
        None
    }

    fn send(&mut self, q: Queued, oob: bool, now: Instant) -> (u64, Bytes, Option<OwnedFd>) {
        let n = match self.free.pop() {
            Some(Reverse(n)) => n,
            None => {
                self.next_n += 1;
                self.next_n - 1
            }
        };
        if !oob {
            self.in_band += 1;
        }
        if q.fd.is_some() {
            self.fd_in_flight = Some(n);
        }
        self.sent.insert(
            n,
            Sent {
                route: q.route,
                since: q.since,
                sent_at: now,
                oob,
                expired: false,
            },
        );
        (n, q.tail, q.fd)
    }

    /// The reply with upstream number `n` arrived: who gets it, and when
    /// the request was submitted and sent. `None` for a reply nobody waits
    /// for any more (timed out, or unknown).
    #[cfg(test)]
    pub fn complete(&mut self, n: u64) -> Option<(Route, Times)> {
        self.complete_at(n, Instant::now())
    }

    /// [`Router::complete`], the reply having come at `now`.
    pub fn complete_at(&mut self, n: u64, now: Instant) -> Option<(Route, Times)> {
        if self.fd_in_flight == Some(n) {
            self.fd_in_flight = None;
        }
        let sent = self.sent.remove(&n)?;
        self.free.push(Reverse(n));
        if !sent.oob {
            self.in_band -= 1;
            // QEMU worked on it from when it arrived or finished the one
            // before, whichever came later.
            let started = self.last_done.map_or(sent.sent_at, |d| d.max(sent.sent_at));
            self.last_done = Some(now);
            let client = sent.route.client;
            if let Some(lane) = self.lanes.get_mut(&client) {
                lane.in_flight -= 1;
                if !sent.expired {
                    lane.observe(now.saturating_duration_since(started));
                }
                Self::offer_turn(&mut self.turns, self.ahead, client, lane);
                if lane.gone && lane.in_flight == 0 {
                    self.lanes.remove(&client);
                }
            }
        }
        let times = Times {
            since: sent.since,
            sent_at: sent.sent_at,
        };
        (!sent.expired).then_some((sent.route, times))
    }

    /// Gives up on requests submitted longer than `timeout` ago.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Abandoned {
        let late = |since: Instant| now.saturating_duration_since(since) >= timeout;
        let mut sent: Vec<(u64, Route)> = self
            .sent
            .iter_mut()
            .filter(|(_, s)| !s.expired && late(s.since))
            .map(|(n, s)| {
                s.expired = true;
                (*n, s.route)
            })
            .collect();
        sent.sort_unstable_by_key(|(n, _)| *n);
        let mut queued = Vec::new();
        // Each lane is in submission order: the late ones are at its front.
        for lane in self.lanes.values_mut() {
            while lane.queue.front().is_some_and(|q| late(q.since)) {
                if let Some(q) = lane.queue.pop_front() {
                    queued.push((q.order, q.route));
                }
            }
        }
        self.queued -= queued.len();
        queued.sort_unstable_by_key(|(order, _)| *order);
        Abandoned {
            in_flight: sent.into_iter().map(|(_, r)| r).collect(),
            queued: queued.into_iter().map(|(_, r)| r).collect(),
        }
    }

    /// A client left: its queued requests are dropped; its in-flight ones
    /// stay until their replies come (they still occupy QEMU's queue), and
    /// those replies are then discarded.
    pub fn forget_client(&mut self, client: u64) {
        if let Some(lane) = self.lanes.get_mut(&client) {
            self.queued -= lane.queue.len();
            lane.queue.clear();
            lane.has_turn = false;
            lane.gone = true;
            if lane.in_flight == 0 {
                self.lanes.remove(&client);
            }
        }
        self.oob_queue.retain(|q| q.route.client != client);
    }

    /// Numbers requests from `base` on, on a connection the previous qmpmux
    /// handed over: replies it still gets to that process's requests (small
    /// numbers, or an earlier base) match none of this one's and are
    /// dropped. A new connection starts from 0 again.
    pub fn number_from(&mut self, base: u64) {
        if self.sent.is_empty() {
            self.next_n = base;
            self.free.clear();
        }
    }

    /// Takes `client`'s requests out for a handover: those in QEMU (their
    /// numbers stay taken until their replies come, which the next process
    /// routes), as `(n, seq, oob)`; and those not sent yet, in submission
    /// order, as `(seq, tail, oob, fd)`.
    #[allow(clippy::type_complexity)]
    pub fn hand_over_client(
        &mut self,
        client: u64,
    ) -> (Vec<(u64, u64, bool)>, Vec<(u64, Bytes, bool, Option<OwnedFd>)>) {
        let mut sent: Vec<(u64, u64, bool)> = self
            .sent
            .iter()
            .filter(|(_, s)| s.route.client == client && !s.expired)
            .map(|(n, s)| (*n, s.route.seq, s.oob))
            .collect();
        sent.sort_unstable();
        let mut queued: Vec<(u64, u64, Bytes, bool, Option<OwnedFd>)> = Vec::new();
        if let Some(lane) = self.lanes.get_mut(&client) {
            self.queued -= lane.queue.len();
            queued.extend(
                lane.queue
                    .drain(..)
                    .map(|q| (q.order, q.route.seq, q.tail, false, q.fd)),
            );
            lane.has_turn = false;
        }
        let (mine, others): (VecDeque<Queued>, VecDeque<Queued>) = std::mem::take(&mut self.oob_queue)
            .into_iter()
            .partition(|q| q.route.client == client);
        self.oob_queue = others;
        queued.extend(mine.into_iter().map(|q| (q.order, q.route.seq, q.tail, true, q.fd)));
        queued.sort_unstable_by_key(|q| q.0);
        let queued = queued
            .into_iter()
            .map(|(_, seq, tail, oob, fd)| (seq, tail, oob, fd))
            .collect();
        (sent, queued)
    }

    /// A request the previous process sent as number `n` and QEMU has not
    /// answered: its reply goes to `route`.
    pub fn restore_sent(&mut self, n: u64, route: Route, oob: bool, now: Instant) {
        if !oob {
            self.in_band += 1;
            self.lanes.entry(route.client).or_default().in_flight += 1;
        }
        self.sent.insert(
            n,
            Sent {
                route,
                since: now,
                sent_at: now,
                oob,
                expired: false,
            },
        );
    }

    /// The connection ended: everything outstanding, in sending order
    /// (in flight), then in submission order (queued).
    pub fn abandon(&mut self) -> Abandoned {
        self.fd_in_flight = None;
        self.in_band = 0;
        self.last_done = None;
        // A new connection: QEMU knows none of the old numbers.
        self.next_n = 0;
        self.free.clear();
        self.turns.clear();
        let mut sent: Vec<(u64, Route)> = self
            .sent
            .drain()
            .filter(|(_, s)| !s.expired)
            .map(|(n, s)| (n, s.route))
            .collect();
        sent.sort_unstable_by_key(|(n, _)| *n);
        let mut queued: Vec<(u64, Route)> = self.oob_queue.drain(..).map(|q| (q.order, q.route)).collect();
        // Lanes keep what was learnt of their clients' requests.
        for lane in self.lanes.values_mut() {
            queued.extend(lane.queue.drain(..).map(|q| (q.order, q.route)));
            lane.in_flight = 0;
            lane.has_turn = false;
        }
        self.lanes.retain(|_, l| !l.gone);
        queued.sort_unstable_by_key(|(order, _)| *order);
        self.queued = 0;
        Abandoned {
            in_flight: sent.into_iter().map(|(_, r)| r).collect(),
            queued: queued.into_iter().map(|(_, r)| r).collect(),
        }
    }

    /// Whether `route` was sent and QEMU has not answered it yet.
    pub fn is_in_flight(&self, route: Route) -> bool {
        self.sent.values().any(|s| s.route == route)
    }

    /// Requests sent to QEMU and not answered yet (timed-out ones included).
    pub fn in_flight(&self) -> usize {
        self.sent.len()
    }

    pub fn queued(&self) -> usize {
        self.queued
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
        let mut rt = Router::new(1, Duration::MAX);
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
    fn a_client_s_requests_move_to_another_router_and_are_routed_there() {
        let mut old = Router::new(2, Duration::MAX);
        for s in 0..3 {
            old.submit(r(1, s), Bytes::from(format!("t{s}")), now());
        }
        old.submit(r(2, 0), Bytes::from("other"), now());
        old.submit_oob(r(1, 3), Bytes::from("oob"), now());
        let (oob_n, _) = old.next_to_send().unwrap();
        let (n0, _) = old.next_to_send().unwrap();
        let (n_other, _) = old.next_to_send().unwrap();
        let (sent, queued) = old.hand_over_client(1);
        let mut sent_seqs: Vec<(u64, u64, bool)> = sent.clone();
        sent_seqs.sort_by_key(|s| s.1);
        assert_eq!(sent_seqs, vec![(n0, 0, false), (oob_n, 3, true)]);
        let queued: Vec<(u64, Bytes)> = queued.into_iter().map(|(seq, t, _, _)| (seq, t)).collect();
        assert_eq!(queued, vec![(1, Bytes::from("t1")), (2, Bytes::from("t2"))]);
        // The other client's request stays where it is.
        assert_eq!(old.complete(n_other).map(|(r, _)| r), Some(r(2, 0)));

        let mut new = Router::new(2, Duration::MAX);
        new.number_from(1_000_000);
        for (n, seq, oob) in sent {
            new.restore_sent(n, r(1, seq), oob, now());
        }
        for (seq, tail) in queued {
            new.submit(r(1, seq), tail, now());
        }
        // The window counts the in-band one QEMU still has.
        let (n1, t1) = new.next_to_send().unwrap();
        assert_eq!(&t1[..], b"t1");
        assert!(n1 >= 1_000_000, "a number QEMU may still hold was given out: {n1}");
        assert!(new.next_to_send().is_none(), "window of 2: one restored, one sent");
        assert_eq!(new.complete(n0).map(|(r, _)| r), Some(r(1, 0)));
        assert_eq!(new.complete(oob_n).map(|(r, _)| r), Some(r(1, 3)));
        assert_eq!(new.complete(n1).map(|(r, _)| r), Some(r(1, 1)));
        assert_eq!(&new.next_to_send().unwrap().1[..], b"t2");
    }

    #[test]
    fn window_limits_what_is_sent() {
        let mut rt = Router::new(2, Duration::MAX);
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
        let mut rt = Router::new(1, Duration::MAX);
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
        let mut rt = Router::new(8, Duration::MAX);
        rt.submit_fd(r(1, 0), Bytes::from("a"), fd(), now());
        rt.submit_fd(r(2, 0), Bytes::from("b"), fd(), now());
        rt.submit(r(3, 0), Bytes::from("c"), now());
        let (n, _, f) = rt.next_with_fd(now()).unwrap();
        assert!(f.is_some());
        // The second fd request waits for the first's reply; another
        // client's request without an fd does not.
        let (_, t, f) = rt.next_with_fd(now()).unwrap();
        assert_eq!((&t[..], f.is_none()), (&b"c"[..], true));
        assert!(rt.next_with_fd(now()).is_none());
        rt.complete(n);
        let (_, t, f) = rt.next_with_fd(now()).unwrap();
        assert_eq!((&t[..], f.is_some()), (&b"b"[..], true));
    }

    #[test]
    fn numbers_in_flight_are_unique_and_the_smallest_free() {
        let mut rt = Router::new(8, Duration::MAX);
        for s in 0..20 {
            rt.submit(r(s % 3, s), Bytes::new(), now());
        }
        // Eight in flight: 0 to 7, each once.
        let sent = drain(&mut rt);
        assert_eq!(
            sent.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
        // Replies free their numbers; the next requests take the smallest.
        for n in [5, 2, 6] {
            assert!(rt.complete(n).is_some());
        }
        assert_eq!(drain(&mut rt).iter().map(|(n, _)| *n).collect::<Vec<_>>(), [2, 5, 6]);
        // An expired request keeps its number until QEMU answers it.
        let gone = rt.expire(now() + Duration::from_secs(10), Duration::from_secs(1));
        assert_eq!(gone.in_flight.len(), 8);
        assert!(rt.complete(3).is_none());
        rt.submit(r(9, 0), Bytes::new(), now());
        assert_eq!(drain(&mut rt).iter().map(|(n, _)| *n).collect::<Vec<_>>(), [3]);
        // Routing stays right over many reuses.
        let mut rt = Router::new(8, Duration::MAX);
        for s in 0..1000 {
            rt.submit(r(s % 3, s), Bytes::new(), now());
            let (n, _) = rt.next_to_send().unwrap();
            assert_eq!(n, 0);
            assert_eq!(rt.complete(n).map(|(r, _)| r), Some(r(s % 3, s)));
        }
        // A new connection starts again from 0.
        rt.submit(r(1, 0), Bytes::new(), now());
        rt.submit(r(2, 0), Bytes::new(), now());
        assert_eq!(drain(&mut rt).len(), 2);
        rt.abandon();
        rt.submit(r(1, 1), Bytes::new(), now());
        assert_eq!(rt.next_to_send().map(|(n, _)| n), Some(0));
    }

    #[test]
    fn abandon_reports_sent_and_unsent_in_order() {
        let mut rt = Router::new(2, Duration::MAX);
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
        let mut rt = Router::new(1, Duration::MAX);
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

    /// The tails sent, in order, until nothing more can go.
    fn drain(rt: &mut Router) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        while let Some((n, t)) = rt.next_to_send() {
            out.push((n, String::from_utf8_lossy(&t).into_owned()));
        }
        out
    }

    fn tails(sent: &[(u64, String)]) -> Vec<&str> {
        sent.iter().map(|(_, t)| t.as_str()).collect()
    }

    #[test]
    fn clients_take_turns_one_request_each() {
        let mut rt = Router::new(8, Duration::MAX);
        for s in 0..3 {
            rt.submit(r(1, s), Bytes::from(format!("a{s}")), now());
        }
        rt.submit(r(2, 0), Bytes::from("b0"), now());
        rt.submit(r(3, 0), Bytes::from("c0"), now());
        rt.submit(r(3, 1), Bytes::from("c1"), now());
        assert_eq!(tails(&drain(&mut rt)), ["a0", "b0", "c0", "a1", "c1", "a2"]);
    }

    /// Sends what may go and answers it as if QEMU took `took` for each.
    fn run_for(rt: &mut Router, took: Duration) -> Vec<String> {
        let mut at = Instant::now();
        let mut out = Vec::new();
        for (n, t) in drain(rt) {
            at += took;
            rt.complete_at(n, at);
            out.push(t);
        }
        out
    }

    #[test]
    fn a_client_of_slow_commands_has_one_in_qemu_and_a_newcomer_waits_behind_only_that() {
        let ms = Duration::from_millis;
        let mut rt = Router::new(8, ms(1));
        for s in 0..64 {
            rt.submit(r(1, s), Bytes::from(format!("a{s}")), now());
        }
        // Nothing known of the client yet: one at a time.
        assert_eq!(tails(&drain(&mut rt)), ["a0"]);
        assert!(rt.next_to_send().is_none());
        // Its requests take QEMU 25 ms each: still one at a time.
        let first = rt.sent.keys().copied().next().unwrap();
        rt.complete_at(first, Instant::now() + ms(25));
        assert_eq!(run_for(&mut rt, ms(25)), ["a1"]);
        let sent = drain(&mut rt);
        assert_eq!(tails(&sent), ["a2"]);
        // A newcomer goes at once, behind only the one in QEMU.
        rt.submit(r(2, 0), Bytes::from("b0"), now());
        assert_eq!(tails(&drain(&mut rt)), ["b0"]);
        assert_eq!((rt.in_flight(), rt.queued()), (2, 61));
    }

    /// [`drain`], every request leaving at `at`.
    fn drain_at(rt: &mut Router, at: Instant) -> Vec<u64> {
        std::iter::from_fn(|| rt.next_with_fd(at).map(|(n, _, _)| n)).collect()
    }

    #[test]
    fn a_client_of_cheap_commands_keeps_several_in_qemu() {
        let us = Duration::from_micros;
        let t0 = Instant::now();
        let mut rt = Router::new(8, us(1000));
        for s in 0..64 {
            rt.submit(r(1, s), Bytes::from(format!("a{s}")), t0);
        }
        let first = drain_at(&mut rt, t0);
        assert_eq!(first.len(), 1);
        // 200 us each: five fit in 1 ms of QEMU's time.
        rt.complete_at(first[0], t0 + us(200));
        assert_eq!(drain_at(&mut rt, t0 + us(200)).len(), 5);
        // 10 us each: the window is the limit.
        let mut rt = Router::new(8, us(1000));
        for s in 0..64 {
            rt.submit(r(1, s), Bytes::new(), t0);
        }
        let n = drain_at(&mut rt, t0)[0];
        rt.complete_at(n, t0 + us(10));
        assert_eq!(drain_at(&mut rt, t0 + us(10)).len(), 8);
    }

    #[test]
    fn a_newcomer_goes_before_the_busy_clients_next_when_the_window_is_full() {
        // Busy clients, one request each in QEMU, fill the window; a
        // newcomer's request is the next to go once a slot frees, whoever
        // freed it.
        let mut rt = Router::new(4, Duration::ZERO);
        for c in 1..=4 {
            for s in 0..10 {
                rt.submit(r(c, s), Bytes::from(format!("{c}:{s}")), now());
            }
        }
        let sent = drain(&mut rt);
        assert_eq!(tails(&sent), ["1:0", "2:0", "3:0", "4:0"]);
        rt.submit(r(9, 0), Bytes::from("new"), now());
        assert!(rt.next_to_send().is_none(), "window full");
        rt.complete(sent[0].0);
        assert_eq!(tails(&drain(&mut rt)), ["new"]);
        rt.complete(sent[1].0);
        assert_eq!(tails(&drain(&mut rt)), ["1:1"]);
    }

    #[test]
    fn forgotten_and_answered_clients_leave_nothing_behind() {
        let mut rt = Router::new(2, Duration::ZERO);
        rt.submit(r(1, 0), Bytes::new(), now());
        rt.submit(r(1, 1), Bytes::new(), now());
        rt.submit(r(2, 0), Bytes::new(), now());
        let sent = drain(&mut rt);
        assert_eq!(sent.len(), 2);
        rt.forget_client(1);
        for (n, _) in sent {
            rt.complete(n);
        }
        assert!(rt.next_to_send().is_none());
        assert_eq!((rt.in_flight(), rt.queued()), (0, 0));
        // Client 2 is still connected: its lane remembers what its
        // requests cost. Once it leaves, nothing is left.
        assert_eq!(rt.lanes.keys().collect::<Vec<_>>(), [&2]);
        rt.forget_client(2);
        assert!(
            rt.lanes.is_empty() && rt.turns.is_empty(),
            "{:?} {:?}",
            rt.lanes,
            rt.turns
        );
        // A client id used again (the session's own, 0) starts afresh.
        rt.submit(r(0, 0), Bytes::from("x"), now());
        assert_eq!(tails(&drain(&mut rt)), ["x"]);
    }
}
