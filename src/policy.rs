//! Which commands a listener lets its clients run.
//!
//! Matching is on the command name after JSON decoding (so `\u0071uit` is
//! `quit`), for `execute` and `exec-oob` alike, and QEMU's own lookup is
//! exact, so there are no other spellings to catch. `transaction` is checked
//! action by action, since each action is a command in disguise.
//! `human-monitor-command` reaches HMP, which can do nearly anything: under
//! any restriction (allow or deny list) it is allowed only when named
//! literally in the allow list.

use serde_json::value::RawValue;

const HMP: &str = "human-monitor-command";

/// A shell-style pattern: `*` any run of characters, `?` any one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(p: impl Into<String>) -> Glob {
        Glob(p.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn matches(&self, s: &str) -> bool {
        use crate::wildcard::{matches, Pat};
        matches(self.0.as_bytes(), s.as_bytes(), |b| match b {
            b'*' => Pat::Any,
            b'?' => Pat::One,
            c => Pat::Lit(c),
        })
    }

    fn is_literal(&self) -> bool {
        !self.0.contains(['*', '?'])
    }
}

/// A listener's command policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Empty: everything not denied (full control, HMP included).
    pub allow: Vec<Glob>,
    pub deny: Vec<Glob>,
}

impl Policy {
    pub fn is_full_control(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    fn permits_name(&self, command: &str) -> bool {
        if self.deny.iter().any(|g| g.matches(command)) {
            return false;
        }
        // Any restriction at all would be moot if HMP could do the rest.
        if command == HMP {
            return self.allow.iter().any(|g| g.is_literal() && g.matches(command));
        }
        if self.allow.is_empty() {
            return true;
        }
        self.allow.iter().any(|g| g.matches(command))
    }

    /// Whether `command` (with its raw `arguments`) may run; on refusal, the
    /// name that was refused (the command, or a transaction's action).
    pub fn check(&self, command: &str, arguments: Option<&RawValue>) -> Result<(), String> {
        if self.is_full_control() {
            return Ok(());
        }
        if !self.permits_name(command) {
            return Err(command.to_string());
        }
        if command == "transaction" {
            for action in transaction_actions(arguments) {
                if !self.permits_name(&action) {
                    return Err(action);
                }
            }
        }
        Ok(())
    }

    /// A short description for error messages and logs.
    /// [`Policy::check`], refusing with the text a client gets.
    pub fn admit(&self, command: &str, arguments: Option<&RawValue>) -> Result<(), String> {
        self.check(command, arguments).map_err(|name| {
            format!(
                "qmpmux: command '{name}' is not allowed on this socket (policy: {})",
                self.describe()
            )
        })
    }

    pub fn describe(&self) -> String {
        let list = |v: &[Glob]| v.iter().map(|g| g.as_str()).collect::<Vec<_>>().join(", ");
        match (self.allow.is_empty(), self.deny.is_empty()) {
            (true, true) => "full control".into(),
            (false, true) => format!("allow [{}]", list(&self.allow)),
            (true, false) => format!("deny [{}]", list(&self.deny)),
            (false, false) => format!("allow [{}], deny [{}]", list(&self.allow), list(&self.deny)),
        }
    }
}

/// The `type` of each action of a `transaction`; an unreadable action list
/// yields a name no policy allows, so it is refused rather than waved through.
fn transaction_actions(arguments: Option<&RawValue>) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Args {
        actions: Vec<Action>,
    }
    #[derive(serde::Deserialize)]
    struct Action {
        #[serde(rename = "type")]
        kind: String,
    }
    match arguments.map(|a| serde_json::from_str::<Args>(a.get())) {
        Some(Ok(args)) => args.actions.into_iter().map(|a| a.kind).collect(),
        Some(Err(_)) => vec!["transaction (unreadable actions)".into()],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> Policy {
        Policy {
            allow: allow.iter().map(|s| Glob::new(*s)).collect(),
            deny: deny.iter().map(|s| Glob::new(*s)).collect(),
        }
    }

    fn raw(s: &str) -> Box<RawValue> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn globs() {
        assert!(Glob::new("query-*").matches("query-status"));
        assert!(Glob::new("query-*").matches("query-"));
        assert!(!Glob::new("query-*").matches("x-query-status"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("?uit").matches("quit"));
        assert!(Glob::new("a*b*c").matches("aXXbYYc"));
        assert!(!Glob::new("a*b*c").matches("aXXbYY"));
        assert!(Glob::new("**a").matches("a") && !Glob::new("a?").matches("a"));
        assert!(Glob::new("*ab").matches("aab") && !Glob::new("*ab").matches("aba"));
        assert!(Glob::new("").matches("") && !Glob::new("").matches("x"));
    }

    #[test]
    fn globs_take_linear_time_on_patterns_that_made_the_old_matcher_exponential() {
        let text = "a".repeat(10_000);
        let pattern = format!("{}b", "*a".repeat(40));
        let t = std::time::Instant::now();
        assert!(!Glob::new(&pattern).matches(&text));
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "{:?}", t.elapsed());
    }

    proptest::proptest! {
        /// Agrees with a plain (recursive, memoised) reference matcher.
        #[test]
        fn glob_matches_like_the_reference(p in "[ab*?]{0,8}", s in "[ab]{0,10}") {
            fn reference(p: &[u8], s: &[u8]) -> bool {
                let mut m = vec![vec![false; s.len() + 1]; p.len() + 1];
                m[p.len()][s.len()] = true;
                for i in (0..p.len()).rev() {
                    for j in (0..=s.len()).rev() {
                        m[i][j] = match p[i] {
                            b'*' => m[i + 1][j] || (j < s.len() && m[i][j + 1]),
                            c => j < s.len() && (c == b'?' || c == s[j]) && m[i + 1][j + 1],
                        };
                    }
                }
                m[0][0]
            }
            proptest::prop_assert_eq!(Glob::new(&p).matches(&s), reference(p.as_bytes(), s.as_bytes()));
        }
    }

    #[test]
    fn read_only_policy() {
        let p = policy(&["query-*"], &[]);
        assert!(p.check("query-status", None).is_ok());
        assert_eq!(p.check("quit", None), Err("quit".into()));
        assert_eq!(p.check(HMP, None), Err(HMP.into()));
    }

    #[test]
    fn hmp_needs_a_literal_allow() {
        assert!(policy(&["*"], &[]).check(HMP, None).is_err());
        assert!(policy(&["human-*"], &[]).check(HMP, None).is_err());
        assert!(policy(&["query-*", HMP], &[]).check(HMP, None).is_ok());
        assert!(policy(&[], &[]).check(HMP, None).is_ok(), "full control includes HMP");
        assert!(
            policy(&[], &["quit"]).check(HMP, None).is_err(),
            "HMP could `quit` past the deny list"
        );
    }

    #[test]
    fn deny_wins() {
        let p = policy(&["*"], &["quit", "system_*"]);
        assert!(p.check("device_add", None).is_ok());
        assert!(p.check("system_reset", None).is_err());
    }

    #[test]
    fn transactions_are_checked_action_by_action() {
        let p = policy(&["transaction", "blockdev-snapshot-sync"], &[]);
        let ok = raw(r#"{"actions":[{"type":"blockdev-snapshot-sync","data":{}}]}"#);
        assert!(p.check("transaction", Some(&ok)).is_ok());
        let sneaky =
            raw(r#"{"actions":[{"type":"blockdev-snapshot-sync","data":{}},{"type":"drive-backup","data":{}}]}"#);
        assert_eq!(p.check("transaction", Some(&sneaky)), Err("drive-backup".into()));
        assert!(p.check("transaction", Some(&raw(r#"{"actions":5}"#))).is_err());
    }
}
