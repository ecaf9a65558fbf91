//! One VM's numbered events: every event gets the next sequence number,
//! and the last ones are kept (bounded in count and bytes) so that a
//! consumer that was away can resume where it left off.
//!
//! Numbers start at the time the VM's session started, in microseconds
//! since 1970, and grow by one per event. So they keep growing across QEMU
//! restarts (the session lives on) and across restarts of qmpmux itself
//! (as long as fewer than a million events a second were numbered, which
//! QEMU is nowhere near): a number from an earlier run is always older than
//! anything kept now, and resuming from it reports the gap instead of
//! replaying the wrong events. They stay below 2^53, exact in JavaScript.

use super::journal::Journal;
use bytes::Bytes;
use std::collections::VecDeque;

/// Bytes counted per kept event besides its line (the entry, its name).
const PER_EVENT: usize = 64;

/// One kept event.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub name: Box<str>,
    /// QEMU's event line, as clients without numbers receive it.
    pub line: Bytes,
}

#[derive(Debug)]
pub struct History {
    next: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Events that fell out (for metrics).
    evicted: u64,
    /// A copy of every event that outlives the process (see `journal`).
    journal: Option<Journal>,
}

/// What a consumer resuming after `since` gets.
#[derive(Debug)]
pub struct Resume<'a> {
    /// Events after `since` are missing: they were numbered but are no
    /// longer kept (or `since` is not a number this run gave out).
    pub lost: bool,
    /// The oldest number kept (the next number when nothing is).
    pub oldest: u64,
    /// The number the next event will get.
    pub next: u64,
    /// The kept events after `since`, oldest first.
    pub events: std::collections::vec_deque::Iter<'a, Entry>,
}

impl History {
    /// A history whose first event is numbered `first`, keeping at most
    /// `max_events` events and `max_bytes` bytes of them (always the newest
    /// one, unless `max_events` is 0).
    pub fn new(first: u64, max_events: usize, max_bytes: usize) -> History {
        History {
            next: first,
            entries: VecDeque::new(),
            bytes: 0,
            max_events,
            max_bytes,
            evicted: 0,
            journal: None,
        }
    }

    /// A history that goes on from what an earlier process numbered and
    /// kept: `events` (oldest first, numbered without a gap) and the
    /// number the next event gets.
    pub fn restored(events: Vec<Entry>, next: u64, max_events: usize, max_bytes: usize) -> History {
        let first = events.first().map_or(next, |e| e.seq);
        let mut h = History::new(first, max_events, max_bytes);
        for e in events {
            if e.seq == h.next {
                h.push(&e.name, e.line);
            }
        }
        h.next = h.next.max(next);
        h
    }

    /// Writes every event from now on to `journal` as well.
    pub fn with_journal(mut self, journal: Journal) -> History {
        self.journal = Some(journal);
        self
    }

    /// The journal events are written to, if any.
    pub fn journal_mut(&mut self) -> Option<&mut Journal> {
        self.journal.as_mut()
    }

    /// The first number for a session starting now.
    pub fn first_number() -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(now.as_micros()).unwrap_or(1).max(1)
    }

    /// Numbers and keeps one event; returns its number.
    pub fn push(&mut self, name: &str, line: Bytes) -> u64 {
        let seq = self.next;
        self.next += 1;
        if let Some(j) = self.journal.as_mut() {
            j.append(seq, name, &line);
        }
        if self.max_events == 0 {
            self.evicted += 1;
            return seq;
        }
        self.bytes += cost(line.len());
        self.entries.push_back(Entry {
            seq,
            name: name.into(),
            line,
        });
        while self.entries.len() > self.max_events || (self.bytes > self.max_bytes && self.entries.len() > 1) {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= cost(old.line.len());
                self.evicted += 1;
            }
        }
        seq
    }

    /// The number the next event will get.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The oldest number kept; the next number when nothing is.
    pub fn oldest(&self) -> u64 {
        self.entries.front().map_or(self.next, |e| e.seq)
    }

    /// Events that fell out of the history so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes kept, as counted against `max_bytes`.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The kept events numbered after `since`, and whether any event after
    /// `since` is missing from them.
    pub fn since(&self, since: u64) -> Resume<'_> {
        let oldest = self.oldest();
        // A number not given out yet cannot be where a consumer left off.
        let lost = since >= self.next || since.saturating_add(1) < oldest;
        let skip = if since < oldest {
            0
        } else {
            usize::try_from(since + 1 - oldest)
                .unwrap_or(usize::MAX)
                .min(self.entries.len())
        };
        Resume {
            lost,
            oldest,
            next: self.next,
            events: self.entries.range(skip..),
        }
    }
}

fn cost(line: usize) -> usize {
    line + PER_EVENT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str) -> Bytes {
        Bytes::from(format!("{{\"event\": \"{name}\"}}\r\n"))
    }

    fn seqs(r: &Resume<'_>) -> Vec<u64> {
        r.events.clone().map(|e| e.seq).collect()
    }

    #[test]
    fn numbers_grow_by_one_and_resume_returns_what_follows() {
        let mut h = History::new(100, 10, 1 << 20);
        for i in 0..5 {
            assert_eq!(h.push("STOP", ev("STOP")), 100 + i);
        }
        assert_eq!(h.next(), 105);
        let r = h.since(101);
        assert!(!r.lost);
        assert_eq!(seqs(&r), vec![102, 103, 104]);
        // Caught up: nothing to send, nothing lost.
        let r = h.since(104);
        assert!(!r.lost && seqs(&r).is_empty());
        assert_eq!(r.next, 105);
        // Just before the first: everything, nothing lost.
        let r = h.since(99);
        assert!(!r.lost);
        assert_eq!(seqs(&r).len(), 5);
    }

    #[test]
    fn overflow_is_reported_with_the_oldest_kept() {
        let mut h = History::new(1, 3, 1 << 20);
        for _ in 0..10 {
            h.push("X", ev("X"));
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.evicted(), 7);
        let r = h.since(2);
        assert!(r.lost);
        assert_eq!(r.oldest, 8);
        assert_eq!(seqs(&r), vec![8, 9, 10]);
        // The one just before the oldest kept: nothing missing.
        assert!(!h.since(7).lost);
        assert!(h.since(6).lost);
    }

    #[test]
    fn numbers_not_given_out_are_lost_not_replayed() {
        let mut h = History::new(1_000, 10, 1 << 20);
        h.push("X", ev("X"));
        let r = h.since(5_000);
        assert!(r.lost);
        assert!(seqs(&r).is_empty());
        assert!(h.since(1_001).lost);
        assert!(!h.since(1_000).lost);
    }

    #[test]
    fn bytes_bound_the_history_but_the_newest_event_stays() {
        let line = ev("BIG");
        let one = cost(line.len());
        let mut h = History::new(1, 100, one * 2);
        for _ in 0..5 {
            h.push("BIG", line.clone());
        }
        assert_eq!(h.len(), 2);
        assert!(h.bytes() <= one * 2);
        let mut tiny = History::new(1, 100, 1);
        tiny.push("BIG", line.clone());
        tiny.push("BIG", line);
        assert_eq!(tiny.len(), 1);
        assert_eq!(tiny.oldest(), 2);
    }

    #[test]
    fn no_history_still_numbers() {
        let mut h = History::new(7, 0, 1 << 20);
        assert_eq!(h.push("X", ev("X")), 7);
        assert_eq!(h.push("X", ev("X")), 8);
        assert!(h.is_empty());
        assert!(h.since(6).lost);
        assert!(!h.since(8).lost);
    }
}
