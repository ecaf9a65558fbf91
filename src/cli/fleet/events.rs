//! `qmpmux fleet events [PATTERN]`: the events of every matching VM of
//! every host as they come, from `<prefix>.<vm>.event.<EVENT>`.

use super::hosts::{Filter, PrefixPattern};
use super::nats::{from_file, Nats, NatsArgs};
use super::{CliError, FleetError};
use crate::cli::client::Line;
use crate::cli::show::Ordered;
use crate::policy::Glob;
use futures_util::StreamExt;
use std::path::Path;
use tokio::time::Instant;

/// Print the events of every matching VM across hosts, one per line.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  qmpmux fleet events\n  qmpmux fleet events 'web*' --host hv01 --events SHUTDOWN,RESET\n  qmpmux fleet events --events 'BLOCK_JOB_*' --json\n  qmpmux fleet events web01 --events STOP --count 1 --timeout 60 && echo stopped\n\nEach line: the event's time (QEMU's, UTC), host, VM, name and data; with --json {\"host\", \"vm\", \"seq\" (the event's number on its VM), \"event\" (QEMU's event as published)}. Live events only (NATS keeps no history unless the hosts have a stream); VMs and hosts that appear later are followed too.\nExit status: 0 --count events came (or --timeout passed without --count); 2 bad arguments; 3 NATS cannot be reached, or refused the subscription; 4 --timeout passed before --count events came."
)]
pub struct EventsArgs {
    /// Only VMs whose names match (`*` and `?` wildcards).
    #[arg(value_name = "PATTERN")]
    pub pattern: Option<String>,
    /// Only hosts whose names match (`*` and `?`; several with commas).
    #[arg(long = "host", value_name = "PATTERN", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Only events whose names match these patterns (`*` and `?`).
    #[arg(long, value_name = "PATTERN", num_args = 1.., value_delimiter = ',')]
    pub events: Vec<String>,
    /// Stop after N events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = crate::cli::seconds)]
    pub timeout: Option<f64>,
    /// One JSON object per event.
    #[arg(long)]
    pub json: bool,
}

/// What to subscribe to, and what to keep of what comes.
#[derive(Debug)]
pub struct Selection {
    prefix: PrefixPattern,
    filter: Filter,
    events: Vec<Glob>,
}

/// One event as it came: where from, and QEMU's event.
#[derive(Debug)]
pub struct Event {
    pub host: String,
    pub vm: String,
    pub seq: Option<u64>,
    pub line: Line,
}

impl Selection {
    pub fn new(prefix: PrefixPattern, args: &EventsArgs) -> Selection {
        Selection {
            prefix,
            filter: Filter::new(args.pattern.as_deref(), &args.hosts),
            events: args.events.iter().map(Glob::new).collect(),
        }
    }

    /// The one subject to subscribe to: the VM's and the event's own
    /// tokens when the patterns name exactly one, wildcards otherwise
    /// (the rest is filtered here).
    pub fn subject(&self) -> String {
        let literal = |p: &str| !p.contains(['*', '?']) && crate::config::is_token(p);
        let vm = match &self.filter.vm {
            Some(g) if literal(g.as_str()) => g.as_str(),
            _ => "*",
        };
        match self.events.as_slice() {
            [one] if !one.as_str().contains(['*', '?']) => {
                crate::fleet::subjects::Subjects::new(self.prefix.as_str()).event(vm, one.as_str())
            }
            _ => format!("{}.{vm}.event.>", self.prefix.as_str()),
        }
    }

    /// The event a message carries, if it is one selected.
    pub fn select(&self, msg: &async_nats::Message) -> Option<Event> {
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let vm = header("Qmpmux-Vm").or_else(|| msg.subject.split('.').nth(self.prefix.tokens()).map(str::to_owned))?;
        let host = header("Qmpmux-Host").unwrap_or_else(|| "?".into());
        let text = std::str::from_utf8(&msg.payload).ok()?.to_owned();
        let line = Line {
            value: serde_json::from_str(&text).ok()?,
            text,
        };
        let name = line.event()?;
        let wanted = self.filter.host(&host)
            && self.filter.vm(&vm)
            && (self.events.is_empty() || self.events.iter().any(|g| g.matches(name)));
        wanted.then(|| Event {
            host,
            vm,
            seq: header("Qmpmux-Seq").and_then(|s| s.parse().ok()),
            line,
        })
    }
}

impl Event {
    /// `TIME  HOST  VM  NAME  DATA` (escaped).
    pub fn human(&self) -> String {
        let one = crate::cli::events::human(&self.line);
        // `TIME  NAME  DATA`: the time has no blanks.
        let (time, rest) = one.split_once("  ").unwrap_or(("", one.as_str()));
        let esc = crate::ops::escape::escaped;
        format!("{time}  {}  {}  {rest}", esc(&self.host), esc(&self.vm))
    }

    /// `{"host", "vm", "seq", "event"}` on one line (escaped).
    pub fn json(&self) -> String {
        let event = Ordered::parse(&self.line.text).unwrap_or(Ordered::Null);
        Ordered::Object(vec![
            ("host".into(), Ordered::String(self.host.clone())),
            ("vm".into(), Ordered::String(self.vm.clone())),
            (
                "seq".into(),
                self.seq.map_or(Ordered::Null, |n| Ordered::Number(n.into())),
            ),
            ("event".into(), event),
        ])
        .compact()
            + "\n"
    }
}

/// Runs `qmpmux fleet events`; the exit status.
pub async fn run(args: &EventsArgs, nats: &NatsArgs, config: &Path) -> Result<u8, CliError> {
    let deadline = args
        .timeout
        .map(|s| Instant::now() + std::time::Duration::from_secs_f64(s));
    let selection = Selection::new(PrefixPattern::parse(&nats.prefix)?, args);
    if args.count == Some(0) {
        return Ok(crate::cli::exit::OK);
    }
    let settings = nats.settings(|| from_file(config))?;
    let conn = Nats::connect(&settings).await?;
    let subject = selection.subject();
    let mut sub = conn
        .client
        .subscribe(subject.clone())
        .await
        .map_err(|e| conn.failed(format!("subscribe to {subject}"), e))?;
    conn.client
        .flush()
        .await
        .map_err(|e| conn.failed("reach the server", e))?;
    let mut got = 0;
    let mut refusals = conn.refusals();
    let follow = async {
        loop {
            // Both cancel-safe: a subscription's next message, a watch
            // (whose sender `conn` holds: it ends only with a change).
            let msg = tokio::select! {
                msg = sub.next() => msg,
                _ = refusals.changed() => match conn.said_about(&subject) {
                    Some(said) => return Err(FleetError::Refused { said }.into()),
                    None => continue,
                },
            };
            let Some(msg) = msg else {
                return Err(conn.failed(format!("follow {subject}"), "the connection closed"));
            };
            let Some(event) = selection.select(&msg) else { continue };
            crate::cli::out(&match args.json {
                true => event.json(),
                false => event.human(),
            });
            got += 1;
            if args.count == Some(got) {
                return Ok(());
            }
        }
    };
    let outcome = match deadline {
        None => follow.await,
        Some(at) => match tokio::time::timeout_at(at, follow).await {
            Ok(done) => done,
            // Only a wait for a number of events can fall short.
            Err(_) => match args.count {
                Some(count) => Err(FleetError::TooFew {
                    wanted: wanted(args),
                    got,
                    count,
                    seconds: args.timeout.unwrap_or_default(),
                }
                .into()),
                None => Ok(()),
            },
        },
    };
    outcome.map(|()| crate::cli::exit::OK)
}

/// What `args` follow, in words.
fn wanted(args: &EventsArgs) -> String {
    let esc = crate::ops::escape::escaped;
    let mut s = match &args.pattern {
        Some(p) => format!("VMs '{}'", esc(p)),
        None => "every VM".into(),
    };
    if !args.hosts.is_empty() {
        s.push_str(&format!(" on hosts '{}'", esc(&args.hosts.join(","))));
    }
    if !args.events.is_empty() {
        s.push_str(&format!(", events '{}'", esc(&args.events.join(","))));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::HeaderMap;

    fn args(words: &[&str]) -> EventsArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            events: EventsArgs,
        }
        Cli::try_parse_from(std::iter::once("x").chain(words.iter().copied()))
            .unwrap()
            .events
    }

    fn selection(words: &[&str]) -> Selection {
        Selection::new(PrefixPattern::parse("qmpmux.*").unwrap(), &args(words))
    }

    fn message(subject: &str, host: &str, vm: &str, payload: &str) -> async_nats::Message {
        let mut headers = HeaderMap::new();
        headers.insert("Qmpmux-Seq", "42");
        headers.insert("Qmpmux-Vm", vm);
        headers.insert("Qmpmux-Host", host);
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: payload.to_owned().into(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        }
    }

    const STOP: &str = r#"{"timestamp": {"seconds": 1796000000, "microseconds": 5}, "event": "STOP"}"#;

    #[test]
    fn subjects_narrow_where_the_patterns_name_one() {
        assert_eq!(selection(&[]).subject(), "qmpmux.*.*.event.>");
        assert_eq!(selection(&["web01"]).subject(), "qmpmux.*.web01.event.>");
        assert_eq!(selection(&["web*"]).subject(), "qmpmux.*.*.event.>");
        assert_eq!(
            selection(&["web01", "--events", "STOP"]).subject(),
            "qmpmux.*.web01.event.STOP"
        );
        assert_eq!(
            selection(&["--events", "__org.qmpmux_UPSTREAM_LOST"]).subject(),
            "qmpmux.*.*.event.__org_qmpmux_UPSTREAM_LOST"
        );
        assert_eq!(selection(&["--events", "STOP,RESUME"]).subject(), "qmpmux.*.*.event.>");
        assert_eq!(selection(&["--events", "JOB_*"]).subject(), "qmpmux.*.*.event.>");
    }

    #[test]
    fn messages_are_kept_by_host_vm_and_name() {
        let s = selection(&["web*", "--host", "hv1,hv3", "--events", "ST*"]);
        let m =
            |host: &str, vm: &str, payload: &str| message(&format!("qmpmux.{host}.{vm}.event.X"), host, vm, payload);
        let e = s.select(&m("hv1", "web01", STOP)).expect("selected");
        assert_eq!((e.host.as_str(), e.vm.as_str(), e.seq), ("hv1", "web01", Some(42)));
        assert!(s.select(&m("hv2", "web01", STOP)).is_none());
        assert!(s.select(&m("hv1", "db01", STOP)).is_none());
        assert!(s.select(&m("hv1", "web01", r#"{"event": "RESUME"}"#)).is_none());
        assert!(s.select(&m("hv1", "web01", "not json")).is_none());
    }

    #[test]
    fn lines_name_host_and_vm() {
        let s = selection(&[]);
        let e = s
            .select(&message("qmpmux.hv1.web01.event.STOP", "hv1", "web01", STOP))
            .unwrap();
        assert_eq!(e.human(), "2026-11-30T00:53:20.000005Z  hv1  web01  STOP\n");
        assert_eq!(
            e.json(),
            "{\"host\": \"hv1\", \"vm\": \"web01\", \"seq\": 42, \"event\": {\"timestamp\": {\"seconds\": 1796000000, \"microseconds\": 5}, \"event\": \"STOP\"}}\n"
        );
        // Headers anyone allowed to publish there could forge are escaped.
        let forged = s
            .select(&message("qmpmux.hv1.web01.event.STOP", "hv\u{1b}[2J", "web01", STOP))
            .unwrap();
        assert!(!forged.human().contains('\u{1b}') && !forged.json().contains('\u{1b}'));
    }

    #[test]
    fn too_few_says_what_was_followed() {
        assert_eq!(
            wanted(&args(&["web*", "--host", "hv1", "--events", "STOP"])),
            "VMs 'web*' on hosts 'hv1', events 'STOP'"
        );
        assert_eq!(wanted(&args(&[])), "every VM");
    }
}
