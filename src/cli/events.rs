//! `qmpmux events VM`: a VM's events as they come, from the kept history
//! on with `--since`/`--last`, until `--count` or `--timeout`.

use super::client::{into_result, Client, Line};
use super::show::Ordered;
use super::{find, CliError, Reach};
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Print a VM's events as they come, one per line.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  qmpmux events web01\n  qmpmux events web01 --last 20 --count 20\n  qmpmux events web01 --events 'JOB_*' SHUTDOWN --json\n  qmpmux events web01 --events SHUTDOWN --count 1 --timeout 300 && echo 'shut down'\n\nEach line: the event's time (QEMU's, UTC), its name and its data; with --json the event's line as qmpmux sent it, with its number (`__org.qmpmux_seq`) for --since.\nExit status: 0 --count events came (or --timeout passed without --count); 2 bad arguments or no such VM; 3 qmpmux or the VM cannot be reached, or the connection ended; 4 --timeout passed before --count events came."
)]
pub struct EventsArgs {
    /// The VM, by its name in qmpmux's configuration.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Only events whose names match these patterns (`*` and `?`
    /// wildcards; within what the socket lets through).
    #[arg(long, value_name = "PATTERN", num_args = 1.., value_delimiter = ',')]
    pub events: Vec<String>,
    /// First the kept events numbered after N (a number from `--json`'s
    /// `__org.qmpmux_seq`), then live ones, with no gap.
    #[arg(long, value_name = "N", conflicts_with = "last")]
    pub since: Option<u64>,
    /// First the last N kept events, then live ones, with no gap.
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    /// Stop after N events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = super::seconds)]
    pub timeout: Option<f64>,
    /// Print each event's line as qmpmux sent it (JSON, numbered).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub reach: Reach,
}

/// Runs `qmpmux events`; the exit status.
pub async fn run(args: &EventsArgs, config: &std::path::Path) -> u8 {
    match follow(args, config).await {
        Ok(code) => code,
        Err(e) => {
            super::report(&e);
            e.exit_code()
        }
    }
}

async fn follow(args: &EventsArgs, config: &std::path::Path) -> Result<u8, CliError> {
    let deadline = args.timeout.map(|s| Instant::now() + Duration::from_secs_f64(s));
    if args.count == Some(0) {
        return Ok(super::exit::OK);
    }
    let control = super::control_path(config, args.reach.control.clone());
    let target = find(&control, &args.vm).await?;
    let vm = target.name.clone();
    let mut printer = Printer {
        json: args.json,
        left: args.count,
    };
    let work = async {
        let mut client = Client::connect(&vm, &target.socket).await?;
        // Subscribing before negotiating: every event the connection gets
        // is numbered and filtered, the replay (if any) first.
        let mut sub = Map::new();
        sub.insert("sequence".into(), Value::Bool(true));
        if !args.events.is_empty() {
            sub.insert("events".into(), args.events.clone().into());
        }
        match (args.since, args.last) {
            (Some(n), _) => {
                sub.insert("since".into(), n.into());
            }
            (None, Some(_)) => {
                sub.insert("since".into(), 0.into());
            }
            _ => {}
        }
        let reply = into_result(&vm, client.execute("__org.qmpmux_subscribe", Some(&sub)).await?)?;
        let ret = reply.value.get("return").cloned().unwrap_or_default();
        let next = ret.get("next").and_then(Value::as_u64).unwrap_or(0);
        if let (Some(since), Some(true)) = (args.since, ret.get("lost").and_then(Value::as_bool)) {
            eprintln!(
                "qmpmux: events after {since} are no longer all kept (the oldest kept is {}); showing those kept",
                ret.get("oldest").and_then(Value::as_u64).unwrap_or(0)
            );
        }
        client.negotiate().await?;
        // The replay came before the reply to qmp_capabilities.
        let mut first = VecDeque::new();
        for line in client.take_pending() {
            let replayed = seq(&line).is_some_and(|n| n < next);
            if replayed && args.since.is_none() {
                if let Some(last) = args.last {
                    if first.len() == last {
                        first.pop_front();
                    }
                    if last > 0 {
                        first.push_back(line);
                    }
                }
                continue;
            }
            first.push_back(line);
        }
        for line in first {
            if printer.print(&line) {
                return Ok(());
            }
        }
        loop {
            match client.next().await? {
                Some(line) if line.event().is_some() => {
                    if printer.print(&line) {
                        return Ok(());
                    }
                }
                Some(_) => {}
                None => {
                    return Err(CliError::Closed {
                        vm: vm.clone(),
                        during: " (qmpmux stopped, or the VM was removed)",
                    })
                }
            }
        }
    };
    let outcome = match deadline {
        None => work.await,
        Some(at) => match tokio::time::timeout_at(at, work).await {
            Ok(done) => done,
            // Only a wait for a number of events can fall short.
            Err(_) if args.count.is_some() => {
                let wanted = args.count.unwrap_or_default();
                return Err(CliError::TooFew {
                    vm,
                    got: wanted - printer.left.unwrap_or_default(),
                    wanted,
                    seconds: args.timeout.unwrap_or_default(),
                });
            }
            Err(_) => Ok(()),
        },
    };
    outcome.map(|()| super::exit::OK)
}

fn seq(line: &Line) -> Option<u64> {
    line.value.get("__org.qmpmux_seq").and_then(Value::as_u64)
}

struct Printer {
    json: bool,
    /// Events still to print, with `--count`.
    left: Option<u64>,
}

impl Printer {
    /// Prints an event; whether `--count` is reached.
    fn print(&mut self, line: &Line) -> bool {
        let text = if self.json {
            format!("{}\n", line.text)
        } else {
            human(line)
        };
        super::out(&text);
        match &mut self.left {
            Some(n) => {
                *n -= 1;
                *n == 0
            }
            None => false,
        }
    }
}

/// `TIME  NAME  DATA`: QEMU's timestamp in UTC, the name, the data on one
/// line (escaped for the terminal).
pub fn human(line: &Line) -> String {
    let ts = line.value.get("timestamp");
    let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_i64).unwrap_or(0);
    let micros = ts
        .and_then(|t| t.get("microseconds"))
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let name = crate::ops::escape::escaped(line.event().unwrap_or("?"));
    let data = Ordered::parse(&line.text)
        .ok()
        .and_then(|o| o.get("data").map(Ordered::compact))
        .unwrap_or_default();
    let mut out = format!("{}  {name}", utc(secs, micros));
    if !data.is_empty() {
        out.push_str("  ");
        out.push_str(&data);
    }
    out.push('\n');
    out
}

/// `2026-12-07T01:23:45.123456Z`.
pub fn utc(secs: i64, micros: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        micros.clamp(0, 999_999)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc() {
        assert_eq!(utc(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(utc(1_796_000_000, 42), "2026-11-30T00:53:20.000042Z");
        assert_eq!(utc(951_782_400, 1), "2000-02-29T00:00:00.000001Z");
        assert_eq!(utc(-1, 0), "1969-12-31T23:59:59.000000Z");
    }

    #[test]
    fn an_event_on_one_line() {
        let text = r#"{"timestamp": {"seconds": 1796000000, "microseconds": 5}, "event": "BLOCK_JOB_COMPLETED", "data": {"type": "mirror", "device": "d\n\u001b[2J", "len": 10}, "__org.qmpmux_seq": 7}"#;
        let line = Line {
            text: text.into(),
            value: serde_json::from_str(text).unwrap(),
        };
        assert_eq!(
            human(&line),
            "2026-11-30T00:53:20.000005Z  BLOCK_JOB_COMPLETED  {\"type\": \"mirror\", \"device\": \"d\\n\\u001b[2J\", \"len\": 10}\n"
        );
        assert_eq!(seq(&line), Some(7));
    }
}
