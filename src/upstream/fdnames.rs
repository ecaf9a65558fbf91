//! Who owns each `getfd` name: monitor-wide state, so the session task
//! (the single owner of the upstream monitor) keeps it. Pure; no I/O.
//!
//! QEMU keeps `getfd` names per monitor, shared by all of qmpmux's clients
//! and surviving them; QEMU would close a departed connection's fds, so
//! qmpmux closes the names a departed client still owns. The owner is the
//! client whose `getfd` of the name succeeded last (a `getfd` of an
//! existing name replaces its fd); a successful `closefd` ends ownership.
//! The outcome is taken from QEMU's replies, in QEMU's order; a request
//! whose outcome is unknown (connection lost, timed out) counts as done.

use crate::router::Route;
use std::collections::{HashMap, HashSet};

/// A `getfd` or `closefd` of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdNameOp {
    Get(String),
    Close(String),
}

#[derive(Debug, Default)]
pub struct FdNames {
    /// Name -> owning client; `None`: its owner left while another
    /// client's `getfd` of the name was pending (that one decides).
    owners: HashMap<String, Option<u64>>,
    /// Requests sent or queued, until their outcome is known.
    pending: HashMap<Route, FdNameOp>,
    /// Clients gone with requests still in flight.
    departed: HashSet<u64>,
}

impl FdNames {
    pub fn submitted(&mut self, route: Route, op: FdNameOp) {
        self.pending.insert(route, op);
    }

    /// The outcome of `route` (`done`: QEMU did it, or may have). Returns
    /// a name that nobody owns any more, to close in QEMU.
    pub fn finished(&mut self, route: Route, done: bool) -> Option<String> {
        // Every reply passes here; almost none is a getfd or closefd.
        if self.pending.is_empty() {
            return None;
        }
        let op = self.pending.remove(&route)?;
        let departed = self.departed.contains(&route.client);
        if departed && !self.pending.keys().any(|r| r.client == route.client) {
            self.departed.remove(&route.client);
        }
        match op {
            FdNameOp::Get(name) if done && departed => self.orphan(name),
            FdNameOp::Get(name) if done => {
                self.owners.insert(name, Some(route.client));
                None
            }
            FdNameOp::Get(name) => match self.owners.get(&name) {
                Some(None) => self.orphan(name),
                _ => None,
            },
            FdNameOp::Close(name) => {
                if done {
                    self.owners.remove(&name);
                }
                None
            }
        }
    }

    /// A client left; requests of its that are not in flight (`in_flight`)
    /// will never be sent. Returns the names to close now.
    pub fn detached(&mut self, client: u64, in_flight: impl Fn(Route) -> bool) -> Vec<String> {
        self.pending.retain(|r, _| r.client != client || in_flight(*r));
        if self.pending.keys().any(|r| r.client == client) {
            self.departed.insert(client);
        }
        // Its names, and orphans whose deciding getfd was this client's
        // and will now never be sent.
        let owned: Vec<String> = self
            .owners
            .iter()
            .filter(|(_, o)| **o == Some(client) || o.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        owned.into_iter().filter_map(|name| self.orphan(name)).collect()
    }

    /// A name whose owner is gone: closed now (removed, and returned),
    /// unless a pending `getfd` of it will decide its owner.
    fn orphan(&mut self, name: String) -> Option<String> {
        if self
            .pending
            .values()
            .any(|op| matches!(op, FdNameOp::Get(n) if *n == name))
        {
            self.owners.insert(name, None);
            None
        } else {
            self.owners.remove(&name);
            Some(name)
        }
    }

    /// Each name and the client that owns it (for a handover: between
    /// two requests nothing is pending).
    pub fn owned(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .owners
            .iter()
            .filter_map(|(n, c)| c.map(|c| (n.clone(), c)))
            .collect();
        out.sort();
        out
    }

    /// Names and owners handed over by the previous process.
    pub fn restore(&mut self, owned: impl IntoIterator<Item = (String, u64)>) {
        self.owners.extend(owned.into_iter().map(|(n, c)| (n, Some(c))));
    }

    /// Names tracked, and requests pending (for tests and leak checks).
    #[cfg(test)]
    pub fn len(&self) -> (usize, usize) {
        (self.owners.len(), self.pending.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(client: u64, seq: u64) -> Route {
        Route { client, seq }
    }
    fn get(n: &str) -> FdNameOp {
        FdNameOp::Get(n.into())
    }
    fn close(n: &str) -> FdNameOp {
        FdNameOp::Close(n.into())
    }

    #[test]
    fn a_leaving_client_closes_only_the_names_it_still_owns() {
        let mut f = FdNames::default();
        f.submitted(r(1, 0), get("shared"));
        f.submitted(r(1, 1), get("mine"));
        assert_eq!(f.finished(r(1, 0), true), None);
        assert_eq!(f.finished(r(1, 1), true), None);
        f.submitted(r(2, 0), get("shared"));
        assert_eq!(f.finished(r(2, 0), true), None);
        assert_eq!(f.detached(1, |_| false), vec!["mine".to_string()]);
        assert_eq!(f.detached(2, |_| false), vec!["shared".to_string()]);
        assert_eq!(f.len(), (0, 0));
    }

    #[test]
    fn failed_getfd_changes_nothing_and_closefd_ends_ownership() {
        let mut f = FdNames::default();
        f.submitted(r(1, 0), get("a"));
        f.finished(r(1, 0), true);
        f.submitted(r(2, 0), get("a"));
        f.finished(r(2, 0), false);
        f.submitted(r(2, 1), close("a"));
        f.finished(r(2, 1), true);
        assert!(f.detached(1, |_| false).is_empty());
        assert_eq!(f.len(), (0, 0));
    }

    #[test]
    fn an_owner_leaving_while_another_getfd_is_pending_lets_that_one_decide() {
        let mut f = FdNames::default();
        f.submitted(r(1, 0), get("a"));
        f.finished(r(1, 0), true);
        f.submitted(r(2, 0), get("a"));
        assert!(f.detached(1, |_| false).is_empty(), "B's getfd may take it over");
        assert_eq!(f.finished(r(2, 0), true), None);
        assert_eq!(f.detached(2, |_| false), vec!["a".to_string()]);
        // The same, but B's getfd fails: A's fd is nobody's, closed then.
        f.submitted(r(1, 1), get("b"));
        f.finished(r(1, 1), true);
        f.submitted(r(2, 1), get("b"));
        assert!(f.detached(1, |_| false).is_empty());
        assert_eq!(f.finished(r(2, 1), false), Some("b".to_string()));
        assert_eq!(f.len(), (0, 0));
    }

    #[test]
    fn an_orphan_is_closed_when_the_getfd_it_waited_for_will_never_be_sent() {
        let mut f = FdNames::default();
        f.submitted(r(1, 0), get("a"));
        f.finished(r(1, 0), true);
        f.submitted(r(2, 0), get("a"));
        assert!(f.detached(1, |_| false).is_empty());
        // B leaves with its getfd still queued: dropped, never sent.
        assert_eq!(f.detached(2, |_| false), vec!["a".to_string()]);
        assert_eq!(f.len(), (0, 0));
    }

    #[test]
    fn a_getfd_in_flight_when_its_client_leaves_is_closed_when_it_succeeds() {
        let mut f = FdNames::default();
        f.submitted(r(1, 0), get("late"));
        f.submitted(r(1, 1), get("never-sent"));
        assert!(f.detached(1, |r| r.seq == 0).is_empty());
        assert_eq!(f.len(), (0, 1), "the queued one will never be sent");
        assert_eq!(f.finished(r(1, 0), true), Some("late".to_string()));
        assert_eq!(f.len(), (0, 0));
        assert!(f.departed.is_empty());
    }
}
