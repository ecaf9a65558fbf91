//! Which events one client receives: those its socket's `events` patterns
//! allow, narrowed by the client's own `__org.qmpmux_subscribe`.

use crate::policy::Glob;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// Distinct event names whose outcome a narrowed filter remembers. QEMU
/// has about a hundred kinds of events and a VM emits a few of them; past
/// this, names are matched each time (the memory stays bounded whatever
/// names come).
const REMEMBERED_NAMES: usize = 128;

/// Up to this many patterns, matching them is as quick as a lookup: a
/// filter this small is matched each time, as it always was.
const MATCHED_EACH_TIME: usize = 8;

/// A client's event filter. Applied by the session before an event goes
/// into the client's mailbox, so an event filtered out costs the client
/// only this match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// The socket's set (`events = [...]`); `None`: every event. Shared by
    /// all the socket's clients.
    socket: Option<Arc<[Glob]>>,
    /// The client's own narrowing; `None`: the socket's whole set.
    client: Option<Narrowing>,
}

/// A client's own patterns, and the outcome of each event name already
/// matched: past [`MATCHED_EACH_TIME`] patterns, each name is matched
/// against them once, so an event costs every client at most one lookup,
/// however many patterns it (or another client) gave. The session task
/// owns the filter and uses it from one thread, hence a `RefCell` behind
/// `&self`.
#[derive(Debug, Clone)]
struct Narrowing {
    patterns: Box<[Glob]>,
    /// Event name: whether it passes (the socket's set included).
    seen: RefCell<HashMap<Box<str>, bool>>,
}

impl PartialEq for Narrowing {
    fn eq(&self, other: &Narrowing) -> bool {
        self.patterns == other.patterns
    }
}

impl Eq for Narrowing {}

impl EventFilter {
    /// The filter of a client on a socket whose set is `socket`.
    pub fn new(socket: Option<Arc<[Glob]>>) -> EventFilter {
        EventFilter { socket, client: None }
    }

    /// Narrows the socket's set to events that also match one of
    /// `patterns`; `["*"]` (any pattern `*`) restores the socket's set, an
    /// empty list lets no event through.
    pub fn narrow(&mut self, patterns: Vec<Glob>) {
        self.client = if patterns.iter().any(|g| g.as_str() == "*") {
            None
        } else {
            Some(Narrowing {
                patterns: patterns.into_boxed_slice(),
                seen: RefCell::default(),
            })
        };
    }

    /// The client's own patterns, if it narrowed the socket's set.
    pub fn narrowing(&self) -> Option<Vec<String>> {
        self.client
            .as_ref()
            .map(|n| n.patterns.iter().map(|g| g.as_str().to_string()).collect())
    }

    pub fn matches(&self, event: &str) -> bool {
        let Some(narrowing) = &self.client else {
            // Not narrowed (most clients): the socket's few patterns.
            return self.socket.as_deref().is_none_or(|set| any(set, event));
        };
        let passes = || self.socket.as_deref().is_none_or(|set| any(set, event)) && any(&narrowing.patterns, event);
        if narrowing.patterns.len() <= MATCHED_EACH_TIME {
            return passes();
        }
        if let Some(&known) = narrowing.seen.borrow().get(event) {
            return known;
        }
        let passes = passes();
        let mut seen = narrowing.seen.borrow_mut();
        if seen.len() < REMEMBERED_NAMES {
            seen.insert(event.into(), passes);
        }
        passes
    }

    /// The client's own patterns, `["*"]` when it has not narrowed.
    pub fn client_patterns(&self) -> Vec<String> {
        match &self.client {
            None => vec!["*".to_string()],
            Some(n) => n.patterns.iter().map(|g| g.as_str().to_string()).collect(),
        }
    }
}

fn any(set: &[Glob], event: &str) -> bool {
    set.iter().any(|g| g.matches(event))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(p: &[&str]) -> Vec<Glob> {
        p.iter().map(|s| Glob::new(*s)).collect()
    }

    #[test]
    fn no_sets_means_every_event() {
        let f = EventFilter::new(None);
        assert!(f.matches("STOP") && f.matches("BLOCK_JOB_COMPLETED"));
    }

    #[test]
    fn the_socket_set_limits_and_the_client_narrows_within_it() {
        let socket: Arc<[Glob]> = globs(&["STOP", "RESUME", "JOB_*", "BLOCK_JOB_*"]).into();
        let mut f = EventFilter::new(Some(socket));
        assert!(f.matches("STOP") && f.matches("JOB_STATUS_CHANGE"));
        assert!(!f.matches("SHUTDOWN"));
        f.narrow(globs(&["BLOCK_JOB_*", "SHUTDOWN"]));
        assert!(f.matches("BLOCK_JOB_READY"));
        // Narrowing never widens past the socket's set.
        assert!(!f.matches("SHUTDOWN"));
        assert!(!f.matches("STOP"));
        assert_eq!(f.client_patterns(), vec!["BLOCK_JOB_*", "SHUTDOWN"]);
        f.narrow(globs(&["*"]));
        assert!(f.matches("STOP") && !f.matches("SHUTDOWN"));
        assert_eq!(f.client_patterns(), vec!["*"]);
        f.narrow(Vec::new());
        assert!(!f.matches("STOP"));
    }

    #[test]
    fn remembered_outcomes_are_those_of_the_patterns_and_bounded() {
        let socket: Arc<[Glob]> = globs(&["*_JOB_*", "STOP"]).into();
        let mut f = EventFilter::new(Some(socket));
        let mut patterns = globs(&["BLOCK_*", "STOP", "RESUME"]);
        patterns.extend((0..MATCHED_EACH_TIME).map(|i| Glob::new(format!("NONE_{i}"))));
        f.narrow(patterns);
        for _ in 0..2 {
            assert!(f.matches("BLOCK_JOB_READY") && f.matches("STOP"));
            assert!(!f.matches("RESUME") && !f.matches("BLOCK_IO_ERROR"));
        }
        // Many distinct names: each still right, the memory bounded.
        for i in 0..1000 {
            assert!(f.matches(&format!("BLOCK_JOB_{i}")));
            assert!(!f.matches(&format!("X_{i}")));
        }
        let n = f.client.as_ref().unwrap().seen.borrow().len();
        assert_eq!(n, REMEMBERED_NAMES);
        // A new narrowing forgets the old outcomes.
        f.narrow(globs(&["RESUME"]));
        assert!(!f.matches("STOP"));
    }
}
