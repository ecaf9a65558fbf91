//! qmpmux's own QMP commands (`__org.qmpmux_*`): their names and the checks
//! on their arguments, with QEMU's wording for bad ones. Pure code.

use super::measure;
use super::outgoing::EXTENSION_PREFIX;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Largest `seconds` of a lease: a day. A holder that needs longer renews.
pub const MAX_LEASE_SECONDS: u64 = 86_400;

/// Longest `reason` of a lease, in bytes (UTF-8): it goes into every
/// refusal, both lease events, the audit log and `qmpmux status`.
pub const MAX_LEASE_REASON_BYTES: usize = 1024;

/// `limit` of `query-events` when not given.
pub const DEFAULT_QUERY_LIMIT: usize = 100;

/// Most patterns one `subscribe` may give, and most bytes they may hold
/// together: the session keeps them for the client's life, and an event
/// name is matched against them (once per name).
pub const MAX_SUBSCRIBE_PATTERNS: usize = 256;
pub const MAX_SUBSCRIBE_PATTERN_BYTES: usize = 16 << 10;

/// One of qmpmux's commands, its arguments checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    /// `__org.qmpmux_query-proxy`
    QueryProxy,
    /// `__org.qmpmux_subscribe`
    Subscribe(Subscribe),
    /// `__org.qmpmux_query-events`
    QueryEvents { since: Option<u64>, limit: usize },
    /// `__org.qmpmux_lease`
    Lease { seconds: u64, reason: String },
    /// `__org.qmpmux_release`
    Release,
}

/// What a subscribe changes; absent members leave the client's setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscribe {
    /// Patterns narrowing the socket's events (`["*"]`: all of them).
    pub events: Option<Vec<String>>,
    /// Add `__org.qmpmux_seq` to every event.
    pub sequence: Option<bool>,
    /// Resume: first every kept event numbered after this.
    pub since: Option<u64>,
}

/// Why a command of ours was refused: QMP's error class and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub class: &'static str,
    pub desc: String,
}

fn generic(desc: String) -> Refusal {
    Refusal {
        class: "GenericError",
        desc,
    }
}

impl Extension {
    /// The command's name, as clients send it.
    pub fn name(&self) -> &'static str {
        match self {
            Extension::QueryProxy => "__org.qmpmux_query-proxy",
            Extension::Subscribe(_) => "__org.qmpmux_subscribe",
            Extension::QueryEvents { .. } => "__org.qmpmux_query-events",
            Extension::Lease { .. } => "__org.qmpmux_lease",
            Extension::Release => "__org.qmpmux_release",
        }
    }
}

/// Whether `command` is one of qmpmux's (by its prefix).
pub fn is_extension(command: &str) -> bool {
    command.starts_with(EXTENSION_PREFIX)
}

/// Checks the arguments of qmpmux's command `command` (which
/// [`is_extension`]).
pub fn parse(command: &str, arguments: Option<&RawValue>) -> Result<Extension, Refusal> {
    let name = command.strip_prefix(EXTENSION_PREFIX).unwrap_or(command);
    if name == "subscribe" {
        bounded(arguments, "events", MAX_SUBSCRIBE_PATTERNS, MAX_SUBSCRIBE_PATTERN_BYTES)?;
    }
    let args = Args::new(arguments)?;
    let ext = match name {
        "query-proxy" => Extension::QueryProxy,
        "subscribe" => Extension::Subscribe(Subscribe {
            events: args.strings("events")?,
            sequence: args.bool("sequence")?,
            since: args.uint("since")?,
        }),
        "query-events" => Extension::QueryEvents {
            since: args.uint("since")?,
            limit: match args.uint("limit")? {
                None => DEFAULT_QUERY_LIMIT,
                Some(0) => return Err(generic("Parameter 'limit' must be at least 1".into())),
                Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            },
        },
        "lease" => {
            let seconds = args
                .uint("seconds")?
                .ok_or_else(|| generic("Parameter 'seconds' is missing".into()))?;
            if !(1..=MAX_LEASE_SECONDS).contains(&seconds) {
                return Err(generic(format!(
                    "Parameter 'seconds' must be between 1 and {MAX_LEASE_SECONDS}"
                )));
            }
            let reason = args.string("reason")?.unwrap_or_default();
            if reason.len() > MAX_LEASE_REASON_BYTES {
                return Err(generic(format!(
                    "Parameter 'reason' must be at most {MAX_LEASE_REASON_BYTES} bytes (it has {})",
                    reason.len()
                )));
            }
            Extension::Lease { seconds, reason }
        }
        "release" => Extension::Release,
        _ => {
            return Err(Refusal {
                class: "CommandNotFound",
                desc: format!("The command {command} has not been found"),
            })
        }
    };
    args.no_others(match name {
        "subscribe" => &["events", "sequence", "since"],
        "query-events" => &["since", "limit"],
        "lease" => &["seconds", "reason"],
        _ => &[],
    })?;
    Ok(ext)
}

/// Refuses a member `key` of more than `max` items or `max_bytes` of
/// text, before the arguments are read into memory (see [`measure`]).
fn bounded(arguments: Option<&RawValue>, key: &str, max: usize, max_bytes: usize) -> Result<(), Refusal> {
    let Some(size) = arguments.and_then(|a| measure::member(a.get(), key)) else {
        return Ok(());
    };
    if size.items > max {
        return Err(generic(format!(
            "Parameter '{key}' has {} items; at most {max} are allowed",
            size.items
        )));
    }
    if size.bytes > max_bytes {
        return Err(generic(format!(
            "Parameter '{key}' has {} bytes of text; at most {max_bytes} are allowed",
            size.bytes
        )));
    }
    Ok(())
}

/// A command's arguments object.
struct Args(Map<String, Value>);

impl Args {
    fn new(arguments: Option<&RawValue>) -> Result<Args, Refusal> {
        match arguments {
            None => Ok(Args(Map::new())),
            Some(raw) => serde_json::from_str(raw.get())
                .map(Args)
                .map_err(|_| generic("QMP input member 'arguments' must be an object".into())),
        }
    }

    fn typed<T>(&self, key: &str, expected: &str, get: impl Fn(&Value) -> Option<T>) -> Result<Option<T>, Refusal> {
        match self.0.get(key) {
            None => Ok(None),
            Some(v) => get(v)
                .map(Some)
                .ok_or_else(|| generic(format!("Invalid parameter type for '{key}', expected: {expected}"))),
        }
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, Refusal> {
        self.typed(key, "integer", Value::as_u64)
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, Refusal> {
        self.typed(key, "boolean", Value::as_bool)
    }

    fn string(&self, key: &str) -> Result<Option<String>, Refusal> {
        self.typed(key, "string", |v| v.as_str().map(str::to_owned))
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, Refusal> {
        let list = self.typed(key, "array", |v| v.as_array().cloned())?;
        let Some(list) = list else { return Ok(None) };
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| generic(format!("Invalid parameter type for '{key}[{i}]', expected: string")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn no_others(&self, known: &[&str]) -> Result<(), Refusal> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(generic(format!("Parameter '{k}' is unexpected"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_what_clients_send() {
        for name in ["query-proxy", "subscribe", "query-events", "release"] {
            let command = format!("__org.qmpmux_{name}");
            assert_eq!(parse(&command, None).unwrap().name(), command);
        }
        let args = serde_json::value::RawValue::from_string(r#"{"seconds": 5}"#.into()).unwrap();
        assert_eq!(
            parse("__org.qmpmux_lease", Some(&args)).unwrap().name(),
            "__org.qmpmux_lease"
        );
    }

    fn p(command: &str, args: &str) -> Result<Extension, Refusal> {
        let raw = RawValue::from_string(args.to_string()).unwrap();
        parse(&format!("{EXTENSION_PREFIX}{command}"), Some(&raw))
    }

    #[test]
    fn subscribe_takes_events_sequence_and_since() {
        assert_eq!(
            p(
                "subscribe",
                r#"{"events": ["BLOCK_JOB_*"], "sequence": true, "since": 7}"#
            ),
            Ok(Extension::Subscribe(Subscribe {
                events: Some(vec!["BLOCK_JOB_*".into()]),
                sequence: Some(true),
                since: Some(7),
            }))
        );
        assert_eq!(p("subscribe", "{}"), Ok(Extension::Subscribe(Subscribe::default())));
        assert_eq!(
            parse("__org.qmpmux_subscribe", None),
            Ok(Extension::Subscribe(Subscribe::default()))
        );
    }

    #[test]
    fn bad_arguments_are_refused_in_qemu_s_words() {
        let desc = |r: Result<Extension, Refusal>| r.unwrap_err().desc;
        assert_eq!(
            desc(p("subscribe", r#"{"since": -1}"#)),
            "Invalid parameter type for 'since', expected: integer"
        );
        assert_eq!(
            desc(p("subscribe", r#"{"events": "STOP"}"#)),
            "Invalid parameter type for 'events', expected: array"
        );
        assert_eq!(
            desc(p("subscribe", r#"{"events": ["STOP", 1]}"#)),
            "Invalid parameter type for 'events[1]', expected: string"
        );
        assert_eq!(
            desc(p("subscribe", r#"{"bogus": 1}"#)),
            "Parameter 'bogus' is unexpected"
        );
        let many = serde_json::to_string(&vec!["STOP"; MAX_SUBSCRIBE_PATTERNS + 1]).unwrap();
        assert_eq!(
            desc(p("subscribe", &format!(r#"{{"events": {many}}}"#))),
            "Parameter 'events' has 257 items; at most 256 are allowed"
        );
        let long = serde_json::to_string(&vec!["X".repeat(100); 200]).unwrap();
        assert_eq!(
            desc(p("subscribe", &format!(r#"{{"events": {long}}}"#))),
            "Parameter 'events' has 20000 bytes of text; at most 16384 are allowed"
        );
        let most = serde_json::to_string(&vec!["X".repeat(64); MAX_SUBSCRIBE_PATTERNS]).unwrap();
        assert!(p("subscribe", &format!(r#"{{"events": {most}}}"#)).is_ok());
        assert_eq!(desc(p("lease", "{}")), "Parameter 'seconds' is missing");
        assert!(desc(p("lease", r#"{"seconds": 0}"#)).contains("between 1 and"));
        assert_eq!(desc(p("release", r#"{"x": 1}"#)), "Parameter 'x' is unexpected");
        let unknown = p("frobnicate", "{}").unwrap_err();
        assert_eq!(unknown.class, "CommandNotFound");
        assert_eq!(unknown.desc, "The command __org.qmpmux_frobnicate has not been found");
    }

    #[test]
    fn lease_and_query_events() {
        assert_eq!(
            p("lease", r#"{"seconds": 30, "reason": "migration"}"#),
            Ok(Extension::Lease {
                seconds: 30,
                reason: "migration".into()
            })
        );
        assert_eq!(
            p("query-events", "{}"),
            Ok(Extension::QueryEvents {
                since: None,
                limit: DEFAULT_QUERY_LIMIT
            })
        );
        assert!(p("query-events", r#"{"limit": 0}"#).is_err());
    }

    #[test]
    fn a_lease_reason_is_bounded() {
        let at = "é".repeat(MAX_LEASE_REASON_BYTES / 2);
        let ok = p("lease", &format!(r#"{{"seconds": 5, "reason": "{at}"}}"#));
        assert!(ok.is_ok(), "{ok:?}");
        let over = p("lease", &format!(r#"{{"seconds": 5, "reason": "{at}x"}}"#)).unwrap_err();
        assert_eq!(over.class, "GenericError");
        assert_eq!(
            over.desc,
            format!("Parameter 'reason' must be at most {MAX_LEASE_REASON_BYTES} bytes (it has 1025)")
        );
    }
}
