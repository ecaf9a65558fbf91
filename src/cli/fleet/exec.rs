//! `qmpmux fleet exec PATTERN COMMAND [ARGUMENTS]`: one command on every
//! matching VM of every host, in parallel, over `<prefix>.<vm>.execute`.

use super::ls::FindArgs;
use super::nats::{Nats, NatsArgs};
use super::{CliError, FleetError};
use crate::cli::client::{into_result, Line};
use crate::cli::show::Ordered;
use futures_util::StreamExt;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// The widest RESULT shown in the table; longer ones end in `...` (--json
/// has them whole).
const RESULT_WIDTH: usize = 100;

/// Run one QMP command on every VM whose name matches, across hosts.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  qmpmux fleet exec 'web*' query-status\n  qmpmux fleet exec 'web*' --host 'hv0?' stop\n  qmpmux fleet exec '*' --hmp 'info version' --json\n\nEach line: HOST, VM, TIME (until the reply) and RESULT (QEMU's return on one line, cut at 100 characters; or the error); with --json one object per VM as its reply comes: {\"host\", \"vm\", \"status\", \"ms\", \"reply\" (QEMU's, when one came), \"error\" (when status is not 0)}.\nExit status: the highest of the VMs' statuses: 0 every VM succeeded; 1 QEMU (or qmpmux's policy) answered with an error; 3 a VM cannot be reached (no qmpmux takes commands for it: `commands = false` on its host, or that qmpmux is not connected to NATS; or QEMU is not connected); 4 no reply within --timeout (the command may have run). And: 2 bad arguments, or no VM matches; 3 NATS cannot be reached, or no qmpmux answered."
)]
pub struct ExecArgs {
    /// The VMs: names matching this pattern (`*` and `?` wildcards).
    #[arg(value_name = "PATTERN")]
    pub pattern: String,
    /// The QMP command (`query-status`, `stop`, ...).
    #[arg(value_name = "COMMAND", required_unless_present = "hmp")]
    pub command: Option<String>,
    /// The command's arguments: one JSON object, or `key=value` words (as
    /// for `qmpmux exec`).
    #[arg(value_name = "ARGUMENTS", requires = "command")]
    pub arguments: Vec<String>,
    /// Run a human monitor (HMP) command line instead.
    #[arg(long, short = 'H', value_name = "COMMAND LINE", conflicts_with = "command")]
    pub hmp: Option<String>,
    #[command(flatten)]
    pub find: FindArgs,
    /// One JSON object per VM, as each reply comes.
    #[arg(long)]
    pub json: bool,
    /// Give up on a VM after this many seconds without its reply.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = crate::cli::seconds)]
    pub timeout: f64,
    /// Commands in flight at once.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub parallel: u16,
}

/// One VM's outcome.
#[derive(Debug)]
pub struct Row {
    pub host: String,
    pub vm: String,
    /// From the request to the reply (or the failure).
    pub elapsed: Duration,
    /// The reply, when one came.
    pub reply: Option<Line>,
    pub outcome: Result<(), CliError>,
}

impl Row {
    /// The VM's exit status, as `qmpmux exec`'s would be.
    pub fn status(&self) -> u8 {
        match &self.outcome {
            Ok(()) => crate::cli::exit::OK,
            Err(e) => e.exit_code(),
        }
    }

    /// The result on one line, escaped: the return (HMP's text), or the
    /// error.
    pub fn result(&self, hmp: bool) -> String {
        if let Err(e) = &self.outcome {
            return crate::error::chain(e);
        }
        let Some(ret) = self
            .reply
            .as_ref()
            .and_then(|r| Ordered::parse(&r.text).ok())
            .and_then(|o| o.get("return").cloned())
        else {
            return String::new();
        };
        match (hmp, ret) {
            (true, Ordered::String(text)) => crate::ops::escape::escaped(text.trim_end()),
            (_, ret) => ret.compact(),
        }
    }

    /// The `--json` line.
    pub fn json(&self) -> String {
        let ms = (self.elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
        let mut members = vec![
            ("host".to_owned(), Ordered::String(self.host.clone())),
            ("vm".to_owned(), Ordered::String(self.vm.clone())),
            ("status".to_owned(), Ordered::Number(self.status().into())),
            (
                "ms".to_owned(),
                serde_json::Number::from_f64(ms).map_or(Ordered::Null, Ordered::Number),
            ),
        ];
        if let Some(reply) = self.reply.as_ref().and_then(|r| Ordered::parse(&r.text).ok()) {
            members.push(("reply".to_owned(), reply));
        }
        if let Err(e) = &self.outcome {
            members.push(("error".to_owned(), Ordered::String(crate::error::chain(e))));
        }
        Ordered::Object(members).compact() + "\n"
    }
}

/// Runs `qmpmux fleet exec`; the exit status.
pub async fn run(args: &ExecArgs, nats: &NatsArgs, config: &Path) -> Result<u8, CliError> {
    let (command, arguments) =
        crate::cli::args::command_of(args.hmp.as_deref(), args.command.as_deref(), &args.arguments)?;
    let timeout = Duration::from_secs_f64(args.timeout);
    let (conn, hosts) = args.find.find(Some(&args.pattern), nats, config).await?;
    let request = bytes::Bytes::from(crate::cli::args::request(&command, arguments.as_ref(), None));
    let targets: Vec<(String, String, String)> = hosts
        .iter()
        .flat_map(|h| h.vms.iter().map(|vm| (h.host.clone(), h.prefix.clone(), vm.clone())))
        .collect();
    let conn = &conn;
    let mut replies = futures_util::stream::iter(targets)
        .map(|(host, prefix, vm)| {
            let request = request.clone();
            async move { execute(conn, host, &prefix, vm, request, timeout).await }
        })
        .buffer_unordered(usize::from(args.parallel));
    let mut rows = Vec::new();
    while let Some(row) = replies.next().await {
        if args.json {
            crate::cli::out(&row.json());
        }
        rows.push(row);
    }
    if !args.json {
        rows.sort_by(|a, b| (&a.host, &a.vm).cmp(&(&b.host, &b.vm)));
        crate::cli::out(&table(&rows, args.hmp.is_some()));
    }
    if let Some(summary) = summary(&rows) {
        eprintln!("qmpmux: {summary}");
    }
    Ok(rows.iter().map(Row::status).max().unwrap_or_default())
}

/// One request, its outcome.
async fn execute(conn: &Nats, host: String, prefix: &str, vm: String, request: bytes::Bytes, timeout: Duration) -> Row {
    let subject = format!("{prefix}.{vm}.execute");
    let start = Instant::now();
    let sent = conn
        .client
        .send_request(
            subject.clone(),
            async_nats::Request::new().payload(request).timeout(Some(timeout)),
        )
        .await;
    let elapsed = start.elapsed();
    let (reply, outcome) = match sent {
        Ok(msg) => match reply_line(&vm, &msg.payload) {
            Ok(line) => {
                let outcome = into_result(&vm, line.clone()).map(drop);
                (Some(line), outcome)
            }
            Err(e) => (None, Err(e)),
        },
        Err(e) => (None, Err(failure(conn, &subject, &vm, prefix, e, timeout))),
    };
    Row {
        host,
        vm,
        elapsed,
        reply,
        outcome,
    }
}

/// A reply's payload as a message.
fn reply_line(vm: &str, payload: &[u8]) -> Result<Line, CliError> {
    let not = |what: &str| CliError::Protocol {
        vm: vm.to_owned(),
        what: format!(
            "a reply that is not {what}: {}",
            crate::ops::escape::escaped(&String::from_utf8_lossy(payload))
        ),
    };
    let text = std::str::from_utf8(payload).map_err(|_| not("UTF-8"))?;
    let value: Value = serde_json::from_str(text).map_err(|_| not("JSON"))?;
    Ok(Line {
        text: text.to_owned(),
        value,
    })
}

/// Why a request got no reply.
fn failure(
    conn: &Nats,
    subject: &str,
    vm: &str,
    prefix: &str,
    e: async_nats::RequestError,
    timeout: Duration,
) -> CliError {
    use async_nats::RequestErrorKind as K;
    if let Some(said) = conn.said_about(subject) {
        return FleetError::Refused { said }.into();
    }
    match e.kind() {
        K::NoResponders => FleetError::NoResponders {
            vm: vm.to_owned(),
            prefix: prefix.to_owned(),
        }
        .into(),
        K::TimedOut => CliError::Timeout {
            vm: vm.to_owned(),
            seconds: timeout.as_secs_f64(),
        },
        _ => conn.failed(format!("send the request on {subject}"), e),
    }
}

/// `HOST  VM  TIME  RESULT` rows, aligned; the result last, so that a
/// long one pushes nothing: a return is cut at [`RESULT_WIDTH`]
/// characters, an error is shown whole.
pub fn table(rows: &[Row], hmp: bool) -> String {
    let times: Vec<String> = rows
        .iter()
        .map(|r| format!("{:.1} ms", r.elapsed.as_secs_f64() * 1000.0))
        .collect();
    let width = |header: &str, cells: &mut dyn Iterator<Item = usize>| cells.fold(header.len(), usize::max);
    let wh = width("HOST", &mut rows.iter().map(|r| r.host.chars().count()));
    let wv = width("VM", &mut rows.iter().map(|r| r.vm.chars().count()));
    let wt = width("TIME", &mut times.iter().map(String::len));
    let mut out = format!("{:wh$}  {:wv$}  {:>wt$}  RESULT\n", "HOST", "VM", "TIME");
    for (row, time) in rows.iter().zip(&times) {
        let result = match row.outcome {
            Ok(()) => cut(&row.result(hmp), RESULT_WIDTH),
            Err(_) => row.result(hmp),
        };
        out.push_str(&format!("{:wh$}  {:wv$}  {time:>wt$}  {result}\n", row.host, row.vm));
    }
    out
}

/// `text` cut to `width` characters, ending in `...` when cut.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    text.chars().take(width - 3).chain("...".chars()).collect()
}

/// What went wrong, counted, if anything did.
fn summary(rows: &[Row]) -> Option<String> {
    let count = |status: u8| rows.iter().filter(|r| r.status() == status).count();
    let parts: Vec<String> = [
        (crate::cli::exit::QMP_ERROR, "with an error"),
        (crate::cli::exit::UNREACHABLE, "not reached"),
        (crate::cli::exit::TIMED_OUT, "without a reply in time"),
    ]
    .iter()
    .filter(|(s, _)| count(*s) > 0)
    .map(|(s, what)| format!("{} {what}", count(*s)))
    .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "{} of {} VMs failed: {}",
            rows.len() - count(0),
            rows.len(),
            parts.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(host: &str, vm: &str, ms: u64, reply: Option<&str>, outcome: Result<(), CliError>) -> Row {
        Row {
            host: host.into(),
            vm: vm.into(),
            elapsed: Duration::from_micros(ms * 1000 + 250),
            reply: reply.map(|t| reply_line(vm, t.as_bytes()).unwrap()),
            outcome,
        }
    }

    fn ok(host: &str, vm: &str, reply: &str) -> Row {
        let line = reply_line(vm, reply.as_bytes()).unwrap();
        let outcome = into_result(vm, line).map(drop);
        row(host, vm, 2, Some(reply), outcome)
    }

    #[test]
    fn replies_become_statuses() {
        let good = ok("hv1", "web01", r#"{"return": {"status": "running", "running": true}}"#);
        assert_eq!(good.status(), 0);
        assert_eq!(good.result(false), r#"{"status": "running", "running": true}"#);
        let refused = ok(
            "hv1",
            "web02",
            r#"{"error": {"class": "GenericError", "desc": "no\u001b[2J"}}"#,
        );
        assert_eq!(refused.status(), 1);
        assert_eq!(refused.result(false), "GenericError: no\\u001b[2J");
        let down = ok(
            "hv2",
            "web03",
            r#"{"error": {"class": "GenericError", "desc": "qmpmux: QEMU is not connected (reconnecting)"}}"#,
        );
        assert_eq!(down.status(), 3);
        let hmp = ok("hv1", "web01", r#"{"return": "VM status: running\r\n"}"#);
        assert_eq!(hmp.result(true), "VM status: running");
        assert!(reply_line("web01", b"\xff").is_err());
        assert_eq!(reply_line("web01", b"nope").unwrap_err().exit_code(), 3);
    }

    #[test]
    fn the_table_aligns_and_cuts_long_returns() {
        let long = format!(r#"{{"return": "{}"}}"#, "x".repeat(200));
        let unreached: CliError = FleetError::NoResponders {
            vm: "w".into(),
            prefix: "qmpmux.hypervisor2".into(),
        }
        .into();
        let rows = [
            ok("hv1", "web01", r#"{"return": {}}"#),
            ok("hv1", "web02", &long),
            row("hypervisor2", "w", 10_000, None, Err(unreached)),
        ];
        let t = table(&rows, false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "HOST         VM           TIME  RESULT", "{t}");
        assert_eq!(lines[1], "hv1          web01      2.2 ms  {}", "{t}");
        assert_eq!(
            lines[2],
            format!("hv1          web02      2.2 ms  \"{}...", "x".repeat(RESULT_WIDTH - 4)),
            "{t}"
        );
        assert_eq!(
            lines[3],
            "hypervisor2  w      10000.2 ms  no qmpmux takes commands for VM 'w' on qmpmux.hypervisor2 \
             (`commands = false` there, or it is not connected to NATS)",
            "errors are shown whole"
        );
    }

    #[test]
    fn json_lines_carry_the_reply_and_the_status() {
        let r = ok("hv1", "web02", r#"{"error": {"class": "GenericError", "desc": "x"}}"#);
        assert_eq!(
            r.json(),
            "{\"host\": \"hv1\", \"vm\": \"web02\", \"status\": 1, \"ms\": 2.25, \"reply\": {\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}, \"error\": \"GenericError: x\"}\n"
        );
        let t = row(
            "hv1",
            "web01",
            1,
            None,
            Err(CliError::Timeout {
                vm: "web01".into(),
                seconds: 1.5,
            }),
        );
        let v: Value = serde_json::from_str(&t.json()).unwrap();
        assert_eq!(v["status"], 4);
        assert_eq!(v["error"], "VM 'web01': no answer within 1.5 s");
        assert!(v.get("reply").is_none());
    }

    #[test]
    fn the_summary_counts_failures() {
        let rows = [
            ok("hv1", "a", r#"{"return": {}}"#),
            ok("hv1", "b", r#"{"error": {"class": "GenericError", "desc": "x"}}"#),
            row(
                "hv1",
                "c",
                1,
                None,
                Err(CliError::Timeout {
                    vm: "c".into(),
                    seconds: 1.0,
                }),
            ),
        ];
        assert_eq!(
            summary(&rows).unwrap(),
            "2 of 3 VMs failed: 1 with an error, 1 without a reply in time"
        );
        assert_eq!(summary(&rows[..1]), None);
        assert_eq!(rows.iter().map(Row::status).max(), Some(4));
    }
}
