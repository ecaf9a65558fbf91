//! Which lines a tap shows (`--client`, `--command`, `--event`). Pure.
//!
//! With no filter, everything. Otherwise what the filters select, the
//! commands and the events each: `--client` and `--command` select the
//! commands (requests and their replies) of those clients and with those
//! names (both, when both are given), and with `--client` alone those
//! clients' connections and disconnections too; `--event` selects events
//! by name. So `--command 'migrate*'` shows no events, and
//! `--event STOP` no commands. Lost-line notices always show.

use crate::policy::Glob;
use serde::{Deserialize, Serialize};

/// The filters as the command line sends them (JSON on the request line).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<u64>,
    /// Command name patterns (`*`, `?`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// Event name patterns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

/// At most this many patterns and clients in all, each pattern at most
/// [`MAX_PATTERN`] bytes: the request line is read up to a bound.
pub const MAX_FILTERS: usize = 64;
pub const MAX_PATTERN: usize = 256;

/// [`Filters`] ready to match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    clients: Vec<u64>,
    commands: Vec<Glob>,
    events: Vec<Glob>,
}

impl Filter {
    /// Checks `f`; the error says what is wrong.
    pub fn new(f: Filters) -> Result<Filter, String> {
        if f.clients.len() + f.commands.len() + f.events.len() > MAX_FILTERS {
            return Err(format!("at most {MAX_FILTERS} filters"));
        }
        if let Some(p) = f.commands.iter().chain(&f.events).find(|p| p.len() > MAX_PATTERN) {
            return Err(format!("a pattern longer than {MAX_PATTERN} bytes ({} bytes)", p.len()));
        }
        Ok(Filter {
            clients: f.clients,
            commands: f.commands.into_iter().map(Glob::new).collect(),
            events: f.events.into_iter().map(Glob::new).collect(),
        })
    }

    fn selects_commands(&self) -> bool {
        !self.clients.is_empty() || !self.commands.is_empty()
    }

    fn everything(&self) -> bool {
        !self.selects_commands() && self.events.is_empty()
    }

    fn client_ok(&self, client: u64) -> bool {
        self.clients.is_empty() || self.clients.contains(&client)
    }

    /// A request or reply of `client`'s, for command `command` (`None`:
    /// unknown).
    pub fn command(&self, client: u64, command: Option<&str>) -> bool {
        if self.everything() {
            return true;
        }
        let named = self.commands.is_empty() || command.is_some_and(|c| self.commands.iter().any(|g| g.matches(c)));
        self.selects_commands() && self.client_ok(client) && named
    }

    /// `client` connected or left.
    pub fn client(&self, client: u64) -> bool {
        self.everything() || (!self.clients.is_empty() && self.commands.is_empty() && self.client_ok(client))
    }

    /// Event `name`.
    pub fn event(&self, name: &str) -> bool {
        self.everything() || self.events.iter().any(|g| g.matches(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(clients: &[u64], commands: &[&str], events: &[&str]) -> Filter {
        Filter::new(Filters {
            clients: clients.to_vec(),
            commands: commands.iter().map(|s| s.to_string()).collect(),
            events: events.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    #[test]
    fn no_filter_shows_everything() {
        let f = filter(&[], &[], &[]);
        assert!(f.command(3, Some("stop")) && f.command(3, None) && f.client(3) && f.event("STOP"));
    }

    #[test]
    fn clients_and_commands_select_commands() {
        let f = filter(&[3], &[], &[]);
        assert!(f.command(3, Some("stop")) && f.command(3, None) && f.client(3));
        assert!(!f.command(4, Some("stop")) && !f.client(4) && !f.event("STOP"));
        let f = filter(&[], &["query-*", "stop"], &[]);
        assert!(f.command(3, Some("query-status")) && f.command(4, Some("stop")));
        assert!(!f.command(3, Some("cont")) && !f.command(3, None) && !f.client(3) && !f.event("STOP"));
        let f = filter(&[3, 5], &["stop"], &[]);
        assert!(f.command(5, Some("stop")) && !f.command(4, Some("stop")) && !f.command(5, Some("cont")));
        assert!(!f.client(5));
    }

    #[test]
    fn events_select_events() {
        let f = filter(&[], &[], &["BLOCK_JOB_*", "STOP"]);
        assert!(f.event("STOP") && f.event("BLOCK_JOB_READY") && !f.event("RESUME"));
        assert!(!f.command(3, Some("stop")) && !f.client(3));
        let f = filter(&[3], &[], &["STOP"]);
        assert!(f.event("STOP") && f.command(3, Some("x")) && !f.command(4, Some("x")));
    }

    #[test]
    fn bounded() {
        let many = Filters {
            clients: (0..65).collect(),
            ..Filters::default()
        };
        assert!(Filter::new(many).is_err());
        let long = Filters {
            events: vec!["x".repeat(MAX_PATTERN + 1)],
            ..Filters::default()
        };
        assert!(Filter::new(long).unwrap_err().contains("longer than"));
        let json = serde_json::to_string(&Filters::default()).unwrap();
        assert_eq!(json, "{}");
        assert!(serde_json::from_str::<Filters>(r#"{"bogus": 1}"#).is_err());
    }
}
