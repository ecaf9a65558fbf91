//! What `qmpmux shell` shows, as text: a reply's `return` pretty in
//! QEMU's order (HMP's text as it is in `-H` mode), an error reply as
//! `error: CLASS: desc`, an event on one line as `qmpmux events` shows
//! it; red and cyan on a colour terminal. Everything QEMU or a guest
//! wrote is escaped for the terminal. Pure.

use crate::cli::client::Line;
use crate::cli::exec::terminal_text;
use crate::ops::escape::escaped;

const RED: &str = "\x1b[31m";
const CYAN: &str = "\x1b[36m";
const RESET: &str = "\x1b[0m";

/// Whether to colour, from the environment: on a terminal, unless
/// `NO_COLOR` is set (<https://no-color.org>) or `TERM` is `dumb`.
pub fn color_wanted(terminal: bool, no_color: Option<std::ffi::OsString>, term: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty()) && term.is_none_or(|t| t != "dumb")
}

/// A reply as shown, and whether it is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shown {
    pub text: String,
    pub failed: bool,
}

/// Reply `line` to a command (`hmp`: to `human-monitor-command`, whose
/// text is shown as it is).
pub fn reply(line: &Line, hmp: bool, color: bool) -> Shown {
    if let Some((class, desc)) = line.error() {
        return Shown {
            text: paint(&format!("error: {}: {}", escaped(class), escaped(desc)), RED, color),
            failed: true,
        };
    }
    let text = match (hmp, line.value.get("return")) {
        (true, Some(serde_json::Value::String(text))) => terminal_text(text),
        (_, Some(_)) => line.return_text().unwrap_or_default() + "\n",
        // Not a reply QMP knows: all of it.
        (_, None) => crate::cli::show::pretty(&line.text) + "\n",
    };
    Shown { text, failed: false }
}

/// Event `line`, on one line.
pub fn event(line: &Line, color: bool) -> String {
    let text = crate::cli::events::human(line);
    paint(text.trim_end_matches('\n'), CYAN, color)
}

/// A reply that came after Ctrl-C stopped the wait for it.
pub fn late(name: &str, shown: &Shown) -> String {
    format!(
        "(the reply to {}, no longer waited for:)\n{}",
        escaped(name),
        shown.text
    )
}

/// One of the shell's own messages (a line it cannot send, ...).
pub fn note(message: &str, color: bool) -> String {
    paint(&format!("qmpmux: {message}"), RED, color)
}

/// `text` (one or more lines, without the last newline) in `code`'s
/// colour, ending with a newline.
fn paint(text: &str, code: &str, color: bool) -> String {
    if color {
        format!("{code}{text}{RESET}\n")
    } else {
        format!("{text}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> Line {
        Line {
            text: text.into(),
            value: serde_json::from_str(text).unwrap(),
        }
    }

    #[test]
    fn replies_pretty_in_qemu_s_order() {
        let r = reply(
            &line(r#"{"return": {"status": "running", "singlestep": false, "running": true}}"#),
            false,
            true,
        );
        assert_eq!(
            r.text,
            "{\n  \"status\": \"running\",\n  \"singlestep\": false,\n  \"running\": true\n}\n"
        );
        assert!(!r.failed);
        assert_eq!(reply(&line(r#"{"return": {}}"#), false, false).text, "{}\n");
        assert_eq!(
            reply(&line(r#"{"return": "VM status: running\r\n\u001b[2J"}"#), true, false).text,
            "VM status: running\n\\u001b[2J\n"
        );
        // In QMP mode a string is JSON like any value.
        assert_eq!(
            reply(&line(r#"{"return": "a\r\n"}"#), false, false).text,
            "\"a\\r\\n\"\n"
        );
    }

    #[test]
    fn errors_stand_out() {
        let e = line(r#"{"error": {"class": "CommandNotFound", "desc": "The command x\u001b[2J has not been found"}}"#);
        assert_eq!(
            reply(&e, false, false),
            Shown {
                text: "error: CommandNotFound: The command x\\u001b[2J has not been found\n".into(),
                failed: true
            }
        );
        assert_eq!(
            reply(&e, true, true).text,
            "\x1b[31merror: CommandNotFound: The command x\\u001b[2J has not been found\x1b[0m\n"
        );
        assert_eq!(
            late("stop", &reply(&e, false, false)),
            "(the reply to stop, no longer waited for:)\nerror: CommandNotFound: The command x\\u001b[2J has not been found\n"
        );
    }

    #[test]
    fn events_on_one_line() {
        let e = line(r#"{"timestamp": {"seconds": 1796000000, "microseconds": 5}, "event": "STOP"}"#);
        assert_eq!(event(&e, false), "2026-11-30T00:53:20.000005Z  STOP\n");
        assert_eq!(event(&e, true), "\x1b[36m2026-11-30T00:53:20.000005Z  STOP\x1b[0m\n");
    }

    #[test]
    fn colour_only_where_wanted() {
        let s = |v: &str| Some(std::ffi::OsString::from(v));
        assert!(color_wanted(true, None, s("xterm")));
        assert!(color_wanted(true, s(""), None));
        assert!(!color_wanted(false, None, s("xterm")));
        assert!(!color_wanted(true, s("1"), s("xterm")));
        assert!(!color_wanted(true, None, s("dumb")));
    }
}
