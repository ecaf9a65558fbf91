//! `qmpmux tap VM`: the VM's whole monitor traffic as it happens (every
//! client's commands and the replies, qmpmux's own answers, events),
//! through the daemon's control socket (`ops::tap` serves it), one line
//! each, or the daemon's JSON lines with `--json`.

use super::show::Ordered;
use super::{CliError, Reach};
use crate::ops::control::QueryError;
use crate::ops::escape::escaped;
use crate::ops::tap::Filters;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Show a VM's monitor traffic as it happens: every client's commands and
/// their replies, and every event.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  qmpmux tap web01\n  qmpmux tap web01 --command 'block*' --command 'job-*' --event 'BLOCK_JOB_*' --event 'JOB_*'\n  qmpmux tap web01 --client 12 --json\n\nEach line: the time (UTC), the client (#N, with its pid and uid or TLS subject, and its socket), `->` its command or `<-` the reply (with QEMU's time for it, or `qmpmux` when qmpmux answered), or an event. Passwords, keys and secret objects' data are shown as \"***\" (see docs/cli.md). A tap that cannot keep up loses lines and says how many. It needs the control socket, and shows every client's traffic.\nExit status: 2 bad arguments or no such VM; 3 qmpmux cannot be reached, or it ended the tap (it stopped, or the VM went away)."
)]
pub struct TapArgs {
    /// The VM, by its name in qmpmux's configuration.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Only the commands of client N (`#N` in the lines); repeatable.
    #[arg(long = "client", value_name = "N")]
    pub clients: Vec<u64>,
    /// Only commands whose names match PATTERN (`*` and `?` wildcards);
    /// repeatable.
    #[arg(long = "command", value_name = "PATTERN")]
    pub commands: Vec<String>,
    /// Only events whose names match PATTERN; repeatable. With --client or
    /// --command and no --event, no events are shown, and the other way
    /// round.
    #[arg(long = "event", value_name = "PATTERN")]
    pub events: Vec<String>,
    /// Print qmpmux's JSON lines (one object per line, with a `type`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub reach: Reach,
}

/// The longest line taken (a reply can be as large as QEMU makes it).
const MAX_LINE: usize = 256 << 20;

/// Human lines show JSON up to this many characters.
const MAX_SHOWN: usize = 4096;

/// Runs `qmpmux tap`; the exit status.
pub async fn run(args: &TapArgs, config: &std::path::Path) -> u8 {
    match tap(args, config).await {
        Ok(()) => super::exit::OK,
        Err(e) => {
            super::report(&e);
            e.exit_code()
        }
    }
}

async fn tap(args: &TapArgs, config: &std::path::Path) -> Result<(), CliError> {
    // What the VMs need comes first: on busy CPUs a tap falls behind, and
    // qmpmux counts the lines it loses.
    crate::runtime::background::lowest_priority();
    let control = super::control_path(config, args.reach.control.clone());
    let vm = escaped(&args.vm);
    let mut stream = UnixStream::connect(&control)
        .await
        .map_err(|e| CliError::Control(QueryError::Connect(control.display().to_string(), e)))?;
    let filters = Filters {
        clients: args.clients.clone(),
        commands: args.commands.clone(),
        events: args.events.clone(),
    };
    let filters = serde_json::to_string(&filters).unwrap_or_default();
    let io = |source| CliError::Io { vm: vm.clone(), source };
    stream
        .write_all(format!("tap {} {filters}\n", args.vm).as_bytes())
        .await
        .map_err(io)?;
    let mut read = BufReader::with_capacity(256 << 10, stream);
    let mut shown = Shown::default();
    let mut out = std::io::BufWriter::with_capacity(64 << 10, std::io::stdout().lock());
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        let n = (&mut read)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut bytes)
            .await
            .map_err(io)?;
        if n == 0 {
            return Err(CliError::Closed {
                vm,
                during: " (qmpmux stopped, or restarted)",
            });
        }
        let Ok(line) = std::str::from_utf8(&bytes)
            .map_err(drop)
            .and_then(|t| Ordered::parse(t).map_err(drop))
        else {
            return Err(CliError::Protocol {
                vm,
                what: "qmpmux sent a tap line that is not JSON".into(),
            });
        };
        let kind = str_of(&line, "type");
        if kind == Some("error") {
            return Err(refusal(vm, &line));
        }
        let text = if args.json {
            let mut t = line.compact();
            t.push('\n');
            t
        } else {
            shown.human(&line)
        };
        if kind == Some("end") {
            if args.json {
                let _ = out.write_all(text.as_bytes());
            }
            let _ = out.flush();
            let reason = str_of(&line, "reason").unwrap_or("no reason given");
            return Err(CliError::Protocol {
                vm,
                what: format!("the tap ended: {}", escaped(reason)),
            });
        }
        // A closed pipe (`| head`) is the reader's choice.
        if out.write_all(text.as_bytes()).is_err() {
            return Ok(());
        }
        // Written once nothing more waits: many lines, one write.
        if read.buffer().is_empty() && out.flush().is_err() {
            return Ok(());
        }
    }
}

/// The daemon's `error` line, as an error of the command line's: no such
/// VM or bad filters (exit status 2), or too many taps (3).
fn refusal(vm: String, line: &Ordered) -> CliError {
    let what = escaped(str_of(line, "error").unwrap_or("refused"));
    match str_of(line, "kind") {
        Some("unknown-vm") | Some("usage") => CliError::Usage(what),
        _ => CliError::Protocol { vm, what },
    }
}

fn str_of<'a>(v: &'a Ordered, key: &str) -> Option<&'a str> {
    match v.get(key) {
        Some(Ordered::String(s)) => Some(s),
        _ => None,
    }
}

fn num_of(v: &Ordered, key: &str) -> Option<f64> {
    match v.get(key) {
        Some(Ordered::Number(n)) => n.as_f64(),
        _ => None,
    }
}

/// What the human lines remember: who each client is.
#[derive(Default)]
struct Shown {
    who: HashMap<u64, String>,
}

impl Shown {
    /// One tap line for people (ending in a newline), escaped for the
    /// terminal.
    fn human(&mut self, line: &Ordered) -> String {
        let time = num_of(line, "time").map_or_else(String::new, |us| {
            let us = us as i64;
            let t = super::events::utc(us.div_euclid(1_000_000), us.rem_euclid(1_000_000));
            t[11..26].to_string()
        });
        let client = num_of(line, "client").map(|c| c as u64);
        let mut out = String::new();
        match (str_of(line, "type").unwrap_or(""), client) {
            ("tap", _) => {
                let _ = write!(out, "tapping {}", escaped(str_of(line, "vm").unwrap_or("?")));
                let mut clients = Vec::new();
                if let Some(Ordered::Array(list)) = line.get("clients") {
                    for w in list {
                        if let Some(c) = num_of(w, "client") {
                            let who = who(w);
                            clients.push(format!("#{c} ({who})"));
                            self.who.insert(c as u64, who);
                        }
                    }
                }
                match clients.is_empty() {
                    true => out.push_str("; no client connected"),
                    false => {
                        let _ = write!(out, "; connected: {}", clients.join(", "));
                    }
                }
            }
            ("connect", Some(c)) => {
                let who = line.get("who").map_or_else(|| "?".into(), who);
                let _ = write!(out, "{time}  #{c} ({who}) connected");
                self.who.insert(c, who);
            }
            ("disconnect", Some(c)) => {
                let who = self.who.remove(&c).unwrap_or_else(|| "?".into());
                let _ = write!(out, "{time}  #{c} ({who}) disconnected");
            }
            ("request", Some(c)) => {
                let who = match line.get("who") {
                    Some(w) => {
                        let w = who(w);
                        self.who.insert(c, w.clone());
                        w
                    }
                    None => self.who.get(&c).cloned().unwrap_or_else(|| "?".into()),
                };
                let _ = write!(out, "{time}  #{c} ({who}) -> {}", request(line));
            }
            ("reply", Some(c)) => {
                let _ = write!(out, "{time}  #{c} <- {}", reply(line));
            }
            ("event", _) => {
                let _ = write!(out, "{time}  event {}", escaped(str_of(line, "event").unwrap_or("?")));
                if let Some(data) = line.get("message").and_then(|m| m.get("data")) {
                    let _ = write!(out, " {}", clip(data.compact()));
                }
            }
            ("lost", _) => {
                let n = num_of(line, "count").unwrap_or(0.0);
                let _ = write!(out, "{time}  {n} lines lost here: this tap did not keep up");
            }
            _ => out.push_str(&clip(line.compact())),
        }
        out.push('\n');
        out
    }
}

/// `pid 1234, uid 0, main`: a client as the daemon describes it.
fn who(w: &Ordered) -> String {
    let mut parts = Vec::new();
    if w.get("qmpmux").is_some() {
        parts.push("qmpmux".to_string());
    }
    if w.get("nats").is_some() {
        parts.push("NATS".to_string());
    }
    if let (Some(pid), Some(uid)) = (num_of(w, "pid"), num_of(w, "uid")) {
        parts.push(format!("pid {pid}, uid {uid}"));
    }
    if let Some(r) = str_of(w, "remote") {
        parts.push(escaped(r));
    }
    if let Some(l) = str_of(w, "listener") {
        parts.push(escaped(l));
    }
    if parts.is_empty() {
        parts.push("?".into());
    }
    parts.join(", ")
}

/// `query-status`, `object-add {"qom-type": ...}`: a request's command
/// and arguments.
fn request(line: &Ordered) -> String {
    let mut out = match str_of(line, "command") {
        Some(c) => escaped(c),
        None => match num_of(line, "request_bytes") {
            Some(n) => return format!("({n} bytes that are not JSON)"),
            None => return clip(line.get("request").map(Ordered::compact).unwrap_or_default()),
        },
    };
    if line.get("oob").is_some() {
        out.push_str(" (oob)");
    }
    if let Some(args) = line.get("request").and_then(|r| r.get("arguments")) {
        let _ = write!(out, " {}", clip(args.compact()));
    }
    out
}

/// `query-status 0.21 ms {"status": ...}`, `stop qmpmux: error ...`: a
/// reply, by whom, how long QEMU took, what it says.
fn reply(line: &Ordered) -> String {
    let mut out = str_of(line, "command").map_or_else(|| "?".into(), escaped);
    match num_of(line, "ms") {
        Some(ms) => {
            let _ = write!(out, " {ms:.2} ms");
            if let Some(q) = num_of(line, "queued_ms").filter(|q| *q >= 0.05) {
                let _ = write!(out, " (queued {q:.2} ms)");
            }
        }
        None => out.push_str(" qmpmux:"),
    }
    let Some(msg) = line.get("reply") else {
        return out;
    };
    match msg.get("error") {
        Some(e) => {
            let _ = write!(
                out,
                " error {}: {}",
                escaped(str_of(e, "class").unwrap_or("?")),
                escaped(str_of(e, "desc").unwrap_or(""))
            );
        }
        None => {
            let ret = msg.get("return").map_or_else(|| msg.compact(), Ordered::compact);
            let _ = write!(out, " {}", clip(ret));
        }
    }
    out
}

/// `text` cut to [`MAX_SHOWN`] characters, saying so.
fn clip(text: String) -> String {
    match text.char_indices().nth(MAX_SHOWN) {
        None => text,
        Some((at, _)) => format!("{}... ({} bytes more; --json shows all)", &text[..at], text.len() - at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn human(shown: &mut Shown, line: &str) -> String {
        shown.human(&Ordered::parse(line).unwrap())
    }

    #[test]
    fn lines_for_people() {
        let mut s = Shown::default();
        assert_eq!(
            human(
                &mut s,
                r#"{"type":"tap","vm":"web01","clients":[{"client":3,"pid":1234,"uid":0,"listener":"main"},{"client":0,"qmpmux":true}]}"#
            ),
            "tapping web01; connected: #3 (pid 1234, uid 0, main), #0 (qmpmux)\n"
        );
        let t = 1_796_000_000_000_042u64;
        assert_eq!(
            human(&mut s, &format!(r#"{{"time":{t},"type":"request","client":3,"seq":1,"who":{{"client":3,"pid":1234,"uid":0,"listener":"main"}},"command":"object-add","request":{{"execute":"object-add","arguments":{{"qom-type":"secret","id":"s0","data":"***"}}}}}}"#)),
            "00:53:20.000042  #3 (pid 1234, uid 0, main) -> object-add {\"qom-type\": \"secret\", \"id\": \"s0\", \"data\": \"***\"}\n"
        );
        assert_eq!(
            human(
                &mut s,
                &format!(
                    r#"{{"time":{t},"type":"reply","client":3,"seq":1,"command":"query-status","by":"qemu","ms":0.213,"queued_ms":0.001,"error":false,"reply":{{"return":{{"status":"running"}}}}}}"#
                )
            ),
            "00:53:20.000042  #3 <- query-status 0.21 ms {\"status\": \"running\"}\n"
        );
        assert_eq!(
            human(
                &mut s,
                &format!(
                    r#"{{"time":{t},"type":"reply","client":3,"command":"stop","by":"qmpmux","error":true,"reply":{{"id":1,"error":{{"class":"GenericError","desc":"no\u001b[2J"}}}}}}"#
                )
            ),
            "00:53:20.000042  #3 <- stop qmpmux: error GenericError: no\\u001b[2J\n"
        );
        assert_eq!(
            human(
                &mut s,
                &format!(
                    r#"{{"time":{t},"type":"reply","client":3,"seq":2,"command":"cont","by":"qemu","ms":1.5,"queued_ms":0.25,"error":false,"reply":{{"return":{{}}}}}}"#
                )
            ),
            "00:53:20.000042  #3 <- cont 1.50 ms (queued 0.25 ms) {}\n"
        );
        assert_eq!(
            human(
                &mut s,
                &format!(
                    r#"{{"time":{t},"type":"event","event":"STOP","message":{{"event":"STOP","data":{{"reason":"x"}}}}}}"#
                )
            ),
            "00:53:20.000042  event STOP {\"reason\": \"x\"}\n"
        );
        assert_eq!(
            human(&mut s, &format!(r#"{{"time":{t},"type":"lost","count":12}}"#)),
            "00:53:20.000042  12 lines lost here: this tap did not keep up\n"
        );
        assert_eq!(
            human(
                &mut s,
                &format!(r#"{{"time":{t},"type":"disconnect","client":3,"who":{{"client":3}}}}"#)
            ),
            "00:53:20.000042  #3 (pid 1234, uid 0, main) disconnected\n"
        );
        assert_eq!(
            human(
                &mut s,
                &format!(
                    r#"{{"time":{t},"type":"request","client":5,"by":"qmpmux","who":{{"client":5,"remote":"tls:CN=a\nb@1.2.3.4:5","listener":"tls"}},"command":null,"request_bytes":12}}"#
                )
            ),
            "00:53:20.000042  #5 (tls:CN=a\\nb@1.2.3.4:5, tls) -> (12 bytes that are not JSON)\n"
        );
    }

    #[test]
    fn long_json_is_clipped() {
        let long = format!("\"{}\"", "x".repeat(MAX_SHOWN * 2));
        let clipped = clip(long.clone());
        assert!(clipped.starts_with(&long[..MAX_SHOWN]));
        assert!(clipped.ends_with(&format!("({} bytes more; --json shows all)", long.len() - MAX_SHOWN)));
        assert_eq!(clip("short".into()), "short");
    }
}
