//! Which events one client receives: those its socket's `events` patterns
//! allow, narrowed by the client's own `__org.qmpmux_subscribe`.

use crate::policy::Glob;
use std::sync::Arc;

/// A client's event filter. Applied by the session before an event goes
/// into the client's mailbox, so an event filtered out costs the client
/// only this match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// The socket's set (`events = [...]`); `None`: every event. Shared by
    /// all the socket's clients.
    socket: Option<Arc<[Glob]>>,
    /// The client's own narrowing; `None`: the socket's whole set.
    client: Option<Box<[Glob]>>,
}

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
            Some(patterns.into_boxed_slice())
        };
    }

    pub fn matches(&self, event: &str) -> bool {
        let any = |set: &[Glob]| set.iter().any(|g| g.matches(event));
        self.socket.as_deref().is_none_or(any) && self.client.as_deref().is_none_or(any)
    }

    /// The client's own patterns, `["*"]` when it has not narrowed.
    pub fn client_patterns(&self) -> Vec<String> {
        match &self.client {
            None => vec!["*".to_string()],
            Some(p) => p.iter().map(|g| g.as_str().to_string()).collect(),
        }
    }
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
}
