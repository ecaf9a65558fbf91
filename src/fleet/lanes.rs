//! Lanes: which NATS requester a request comes from, so that each gets its
//! own client at the VM's session and the session's fair turns apply
//! between requesters as between socket clients. Pure: the commander owns
//! it, attaches and detaches the lanes it names.
//!
//! A requester is known by its reply subject without the last token: a
//! muxed inbox, `_INBOX.<nuid>.<request>` (async-nats, nats.go, nats.py,
//! nats.js, the `nats` CLI), is one per connection; a custom reply subject
//! `<app>.<instance>.<request>` gives `<app>.<instance>`. What has one
//! token or none before it (`_INBOX.<nuid>`, a fresh inbox per request as
//! old clients make, or a fixed `replies`) names no connection: such
//! requests share the lane of that first token (or `""`), as all NATS
//! requests of a VM shared one client before lanes. Reply subjects are
//! the requester's to choose: lanes give fair turns between honest
//! requesters, not protection from one that pretends to be many (NATS's
//! permissions decide who may send requests at all).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Lanes per VM, besides the shared one ([`SHARED`]).
pub const MAX_LANES: usize = 64;
/// A lane with nothing waiting for this long is detached.
pub const IDLE: Duration = Duration::from_secs(30);
/// The lane requests go to while every lane has requests waiting.
pub const SHARED: &str = "";

/// The lane key of a request replying to `reply` (see the module's doc).
pub fn key(reply: Option<&str>) -> &str {
    match reply.and_then(|r| r.rsplit_once('.')) {
        Some((prefix, _)) => prefix,
        None => SHARED,
    }
}

/// One requester's lane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lane {
    /// Its client number at the session.
    pub id: u64,
    /// Requests with the session, and their bytes.
    pub waiting: usize,
    pub bytes: usize,
    last: Instant,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Choice {
    /// To this attached lane.
    Lane(u64),
    /// To a new lane under `key` (attach it, then [`Lanes::open`]), after
    /// detaching `evicted` (an idle lane making room), if any.
    Open { key: String, evicted: Option<u64> },
}

#[derive(Debug)]
pub struct Lanes {
    lanes: HashMap<String, Lane>,
    max: usize,
}

impl Lanes {
    pub fn new(max: usize) -> Lanes {
        Lanes {
            lanes: HashMap::new(),
            max,
        }
    }

    /// The lane for a request under `key`: its own; a new one while there
    /// are fewer than `max` (or an idle one can make room); else the
    /// shared lane.
    pub fn choose(&mut self, key: &str) -> Choice {
        if let Some(lane) = self.lanes.get(key) {
            return Choice::Lane(lane.id);
        }
        let own = self.lanes.keys().filter(|k| k.as_str() != SHARED).count();
        if key == SHARED || own < self.max {
            return Choice::Open {
                key: key.into(),
                evicted: None,
            };
        }
        let idle = self
            .lanes
            .iter()
            .filter(|(k, l)| k.as_str() != SHARED && l.waiting == 0)
            .min_by_key(|(_, l)| l.last)
            .map(|(k, _)| k.clone());
        match idle {
            Some(k) => Choice::Open {
                key: key.into(),
                evicted: self.lanes.remove(&k).map(|l| l.id),
            },
            None => self.choose(SHARED),
        }
    }

    /// Lane `id`, attached, serves `key` from now on.
    pub fn open(&mut self, key: String, id: u64, now: Instant) {
        let lane = Lane {
            id,
            waiting: 0,
            bytes: 0,
            last: now,
        };
        self.lanes.insert(key, lane);
    }

    /// The lane serving `key`, if any.
    pub fn find(&self, key: &str) -> Option<u64> {
        self.lanes.get(key).map(|l| l.id)
    }

    /// Lane `id`, if attached.
    pub fn get(&self, id: u64) -> Option<&Lane> {
        self.lanes.values().find(|l| l.id == id)
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Lane> {
        self.lanes.values_mut().find(|l| l.id == id)
    }

    /// A request of `bytes` went to lane `id`.
    pub fn started(&mut self, id: u64, bytes: usize, now: Instant) {
        if let Some(l) = self.get_mut(id) {
            l.waiting += 1;
            l.bytes += bytes;
            l.last = now;
        }
    }

    /// A request of `bytes` of lane `id` was answered.
    pub fn finished(&mut self, id: u64, bytes: usize, now: Instant) {
        if let Some(l) = self.get_mut(id) {
            l.waiting = l.waiting.saturating_sub(1);
            l.bytes = l.bytes.saturating_sub(bytes);
            l.last = now;
        }
    }

    /// Lane `id` is gone (the session dropped it).
    pub fn remove(&mut self, id: u64) {
        self.lanes.retain(|_, l| l.id != id);
    }

    /// Takes out the lanes idle for [`IDLE`] by `now`: to detach.
    pub fn idle(&mut self, now: Instant) -> Vec<u64> {
        let mut gone = Vec::new();
        self.lanes.retain(|_, l| {
            let idle = l.waiting == 0 && now.saturating_duration_since(l.last) >= IDLE;
            if idle {
                gone.push(l.id);
            }
            !idle
        });
        gone
    }

    /// Every attached lane's id (to detach them all).
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.lanes.values().map(|l| l.id)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lanes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requester_is_its_reply_subject_without_the_last_token() {
        assert_eq!(key(Some("_INBOX.Vx3k9.7")), "_INBOX.Vx3k9");
        assert_eq!(key(Some("_INBOX.Vx3k9.Ab2.7")), "_INBOX.Vx3k9.Ab2");
        assert_eq!(key(Some("orchestrator.eu1.42")), "orchestrator.eu1");
        // A fresh inbox per request names no connection: all share.
        assert_eq!(key(Some("_INBOX.Vx3k9")), "_INBOX");
        assert_eq!(key(Some("replies")), SHARED);
        assert_eq!(key(None), SHARED);
    }

    #[test]
    fn lanes_are_bounded_idle_ones_make_room_then_all_share() {
        let t0 = Instant::now();
        let mut lanes = Lanes::new(2);
        let mut next = 1;
        let mut open = |lanes: &mut Lanes, k: &str| match lanes.choose(k) {
            Choice::Lane(id) => (id, None),
            Choice::Open { key, evicted } => {
                next += 1;
                lanes.open(key, next, t0);
                (next, evicted)
            }
        };
        let (a, _) = open(&mut lanes, "a");
        let (b, _) = open(&mut lanes, "b");
        assert_eq!(open(&mut lanes, "a"), (a, None));
        assert_eq!((lanes.find("a"), lanes.find("x")), (Some(a), None));
        lanes.started(a, 10, t0);
        // Full: the idle one (b) makes room for c.
        let (c, evicted) = open(&mut lanes, "c");
        assert_eq!(evicted, Some(b));
        lanes.started(c, 10, t0);
        // Full and busy: d goes to the shared lane, as does e after it.
        let (d, evicted) = open(&mut lanes, "d");
        assert_eq!(evicted, None);
        assert_eq!(open(&mut lanes, "e"), (d, None));
        assert_eq!(lanes.len(), 3);
        assert_eq!(lanes.get(a).map(|l| (l.waiting, l.bytes)), Some((1, 10)));
        lanes.finished(a, 10, t0);
        assert_eq!(lanes.get(a).map(|l| (l.waiting, l.bytes)), Some((0, 0)));
        // Idle for long enough: detached.
        assert!(lanes.idle(t0 + IDLE / 2).is_empty());
        let mut gone = lanes.idle(t0 + IDLE);
        gone.sort();
        assert_eq!(gone, vec![a, d]);
        assert_eq!(lanes.ids().collect::<Vec<_>>(), vec![c]);
    }
}
