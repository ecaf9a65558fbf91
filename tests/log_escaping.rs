//! Text a client controls cannot forge a log line or a `qmpmux status`
//! line, nor reach the operator's terminal as control characters: the
//! binary's text log and `qmpmux status` (table and `--json`), against
//! real QEMU.

mod common;

use common::binary::{self, Binary};
use common::{Client, Qemu};
use serde_json::Value;
use std::path::Path;

/// What a client of the ops socket sends as a lease reason: a line that
/// reads like an audit record of someone else's `quit`, a quote that ends
/// the field, a screen clear, a bell, a C1 CSI, DEL and a bidi override.
const FORGED: &str =
    "ok\" outcome=\"ok\"\n2026-12-06T19:00:00.000000Z  INFO client{id=1}: qmpmux::audit: command vm=vm \
     listener=main client=1 pid=1 uid=0 gid=0 remote=\"-\" command=\"quit\" outcome=\"ok\" duration_ms=0.5\r\
     \u{1b}[2J\u{1b}]0;pwned\u{7}\u{9b}31m\u{7f}\u{202e}";

/// Whether `c` would act on a terminal rather than show.
fn acts(c: char) -> bool {
    c != '\n' && qmpmux::ops::escape::is_unsafe(c)
}

/// A log line's target, message and fields (name and value).
struct Record {
    target: String,
    message: String,
    fields: Vec<(String, String)>,
}

/// One text log line: its target, message and fields, read by the
/// documented format (`TIME LEVEL [SPAN: ...] TARGET: MESSAGE NAME=VALUE
/// ...`, a value one word or a JSON string, the message plain words or a
/// JSON string); `None` if it does not read so.
fn parse(line: &str) -> Option<Record> {
    let mut rest = line.split_once(' ')?.1.trim_start();
    let level;
    (level, rest) = rest.split_once(' ')?;
    if !["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level) {
        return None;
    }
    // Spans (`client{id=2}:`), then the target.
    let target = loop {
        let (token, after) = rest.split_once(' ')?;
        rest = after;
        let name = token.strip_suffix(':')?;
        if !name.contains('{') {
            break name.to_owned();
        }
    };
    let (mut message, mut fields) = (Vec::new(), Vec::new());
    while !rest.is_empty() {
        let (word, after) = match rest.strip_prefix('"') {
            Some(_) if fields.is_empty() && message.is_empty() => {
                let (s, after) = json_string(rest)?;
                message.push(s);
                rest = after.strip_prefix(' ').unwrap_or(after);
                continue;
            }
            _ => rest.split_once(' ').unwrap_or((rest, "")),
        };
        match word.split_once('=') {
            None if fields.is_empty() && !word.contains('"') => {
                message.push(word.to_owned());
                rest = after;
            }
            None => return None,
            Some((name, value)) if value.starts_with('"') => {
                let at = rest.find('=')? + 1;
                let (s, after) = json_string(&rest[at..])?;
                fields.push((name.to_owned(), s));
                rest = after.strip_prefix(' ').unwrap_or(after);
            }
            Some((name, value)) => {
                if value.is_empty() || value.contains('"') {
                    return None;
                }
                fields.push((name.to_owned(), value.to_owned()));
                rest = after;
            }
        }
    }
    Some(Record {
        target,
        message: message.join(" "),
        fields,
    })
}

/// A JSON string at the start of `s`, and what follows it.
fn json_string(s: &str) -> Option<(String, &str)> {
    let mut stream = serde_json::Deserializer::from_str(s).into_iter::<String>();
    let value = stream.next()?.ok()?;
    Some((value, &s[stream.byte_offset()..]))
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn status(config: &Path, json: bool) -> String {
    let mut cmd = binary::command();
    cmd.arg("status").arg("--config").arg(config);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_text_cannot_forge_log_or_status_lines() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let config = format!(
        "log_level = \"info\"\ncontrol_socket = \"{}\"\n[[vm]]\nname = \"vm\"\nupstream = \"{}\"\nlisten = \"{}\"\n\
         [[vm.listener]]\nname = \"ops\"\npath = \"{}\"\ndeny = [\"quit\"]\n",
        p("ctl").display(),
        p("q.sock").display(),
        p("vm.sock").display(),
        p("ops.sock").display()
    );
    let (cfg, log, ops) = (p("qmpmux.toml"), p("qmpmux.log"), p("ops.sock"));
    let _qmpmux = Binary::start(&cfg, &config, &log, &[&p("vm.sock"), &ops], None);

    let mut c = Client::ready(&ops).await;
    let lease = serde_json::json!({
        "execute": "__org.qmpmux_lease", "arguments": {"seconds": 60, "reason": FORGED}, "id": "l"
    });
    let r = c.cmd(&lease.to_string()).await;
    assert_eq!(r["return"]["seconds"], 60, "{r}");
    // A command name and an id of the same kind: QEMU does not know it.
    let hostile = serde_json::json!({"execute": FORGED, "id": FORGED});
    let r = c.cmd(&hostile.to_string()).await;
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    assert_eq!(r["id"], FORGED);
    // `quit` itself is denied on this socket.
    let r = c.cmd(r#"{"execute":"quit","id":"q"}"#).await;
    assert_eq!(r["error"]["class"], "GenericError", "{r}");

    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + common::STEP;
    while !read().contains("outcome=\"denied by policy\"") {
        assert!(
            std::time::Instant::now() < deadline,
            "no audit record of the denied quit:\n{}",
            read()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let text = read();
    let bad: Vec<char> = text.chars().filter(|&c| acts(c)).collect();
    assert!(bad.is_empty(), "control characters {bad:?} in the log:\n{text}");
    let mut reasons = Vec::new();
    let mut commands = Vec::new();
    for line in text.lines() {
        let Record {
            target,
            message,
            fields,
        } = parse(line).unwrap_or_else(|| panic!("a line not in the documented format: {line:?}\n{text}"));
        if target != "qmpmux::audit" {
            continue;
        }
        if message == "lease acquired" {
            reasons.push(field(&fields, "reason").unwrap().to_owned());
        }
        if message == "command" {
            let (command, outcome) = (field(&fields, "command").unwrap(), field(&fields, "outcome").unwrap());
            assert!(
                !(command == "quit" && outcome == "ok"),
                "a forged audit record: {line:?}\n{text}"
            );
            commands.push((command.to_owned(), outcome.to_owned()));
        }
    }
    // Each value still reads back as the client sent it.
    assert_eq!(reasons, [FORGED], "{text}");
    assert!(
        commands.contains(&(FORGED.to_owned(), "error".to_owned())),
        "{commands:?}"
    );
    assert!(
        commands.contains(&("quit".to_owned(), "denied by policy".to_owned())),
        "{commands:?}"
    );

    // `qmpmux status`: one line for the lease, the reason quoted.
    let table = status(&cfg, false);
    let bad: Vec<char> = table.chars().filter(|&c| acts(c)).collect();
    assert!(bad.is_empty(), "control characters {bad:?} in status:\n{table}");
    let leased: Vec<&str> = table.lines().filter(|l| l.starts_with("LEASED:")).collect();
    assert_eq!(leased.len(), 1, "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    let quoted = leased[0].split_once(", reason ").unwrap().1;
    let (reason, rest) = json_string(quoted).unwrap();
    assert_eq!(reason, FORGED);
    assert!(rest.starts_with(", ") && rest.ends_with(" s left"), "{rest}");
    // `--json`: the same, also DEL, C1 and bidi controls escaped.
    let json = status(&cfg, true);
    let bad: Vec<char> = json.chars().filter(|&c| acts(c)).collect();
    assert!(bad.is_empty(), "control characters {bad:?} in status --json:\n{json}");
    let report: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["vms"][0]["lease"]["reason"], FORGED);
}
