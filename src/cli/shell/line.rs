//! What a person types at `qmpmux shell`'s prompt, read into what to do:
//! `COMMAND [key=value ...]`, `COMMAND {json}`, a whole request
//! `{"execute": ...}`, the shell's own words (`exit`, `help`), or a
//! comment (`# ...`, for scripts). Pure.

use crate::cli::args::{self, ArgsError};
use serde_json::Value;

/// One line, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Nothing but blanks, or a comment (`# ...`).
    Nothing,
    /// `exit`: leave the shell.
    Leave,
    /// `help` (or `?`): the shell's own help (QMP mode only).
    Help,
    /// A request for QEMU: `name` is the command (for messages), `request`
    /// the line to send, without its newline.
    Send { name: String, request: String },
}

/// Why a line is not something to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("a quote (\") is not closed")]
    UnclosedQuote,
    #[error("a '{0}' is not closed")]
    UnclosedBracket(char),
    #[error("not a JSON object: {0}")]
    Request(String),
    #[error("a request needs \"execute\" (or \"exec-oob\") naming the command")]
    NoCommand,
    #[error(transparent)]
    Arguments(#[from] ArgsError),
}

/// `line` in QMP mode.
pub fn qmp(line: &str) -> Result<Input, LineError> {
    let text = line.trim();
    if text.is_empty() || text.starts_with('#') {
        return Ok(Input::Nothing);
    }
    if text.starts_with('{') {
        return raw(text);
    }
    let words = split(text)?;
    let (name, rest) = match words.split_first() {
        Some((name, rest)) => (name.clone(), rest),
        None => return Ok(Input::Nothing),
    };
    match (name.as_str(), rest.is_empty()) {
        ("exit", true) => return Ok(Input::Leave),
        ("help" | "?", true) => return Ok(Input::Help),
        _ => {}
    }
    let arguments = args::parse(rest)?;
    Ok(Input::Send {
        request: args::request(&name, arguments.as_ref(), None),
        name,
    })
}

/// `line` in human monitor (`-H`) mode: sent through
/// `human-monitor-command` as it is, but for `exit`.
pub fn hmp(line: &str) -> Input {
    let text = line.trim();
    match text {
        "" => Input::Nothing,
        _ if text.starts_with('#') => Input::Nothing,
        "exit" => Input::Leave,
        _ => {
            let (command, arguments) = args::hmp(text);
            Input::Send {
                name: text.split_whitespace().next().unwrap_or_default().to_owned(),
                request: args::request(&command, Some(&arguments), None),
            }
        }
    }
}

/// Whether `input` would make QEMU exit (`quit`, HMP's `quit` or `q`),
/// which people may type meaning to leave the shell.
pub fn stops_qemu(input: &Input, hmp: bool) -> bool {
    match input {
        Input::Send { name, .. } if hmp => name == "quit" || name == "q",
        Input::Send { name, .. } => name == "quit",
        _ => false,
    }
}

/// A whole request, sent as typed once it reads as one JSON object that
/// names a command (a line QEMU cannot read would leave its parser
/// waiting for the rest).
fn raw(text: &str) -> Result<Input, LineError> {
    let value: Value = serde_json::from_str(text).map_err(|e| LineError::Request(e.to_string()))?;
    let name = ["execute", "exec-oob"]
        .iter()
        .find_map(|k| value.get(k).and_then(Value::as_str))
        .ok_or(LineError::NoCommand)?;
    Ok(Input::Send {
        name: name.to_owned(),
        request: text.to_owned(),
    })
}

/// `text` cut into words at blanks, except within a double-quoted JSON
/// string or a JSON array or object that starts a value (`a=[1, 2]`,
/// `{"a": 1}`): those stay whole, quotes and brackets kept, for
/// [`args::parse`] to read as JSON.
pub fn split(text: &str) -> Result<Vec<String>, LineError> {
    let words = words(text);
    match words.last().and_then(|w| w.open) {
        Some('"') => Err(LineError::UnclosedQuote),
        Some(c) => Err(LineError::UnclosedBracket(c)),
        None => Ok(words.into_iter().map(|w| w.text).collect()),
    }
}

/// A word of a line, as [`words`] cuts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// Its byte offset in the line.
    pub start: usize,
    pub text: String,
    /// The quote or bracket still open at the end of the line, if any.
    pub open: Option<char>,
}

/// The words of `text` (see [`split`]), leniently: the last may be left
/// open (for completion, which reads a line as it is being typed).
pub fn words(text: &str) -> Vec<Word> {
    let mut out: Vec<Word> = Vec::new();
    let mut chars = text.char_indices().peekable();
    let mut current: Option<Word> = None;
    while let Some((i, c)) = chars.next() {
        if c.is_whitespace() {
            out.extend(current.take());
            continue;
        }
        let word = current.get_or_insert_with(|| Word {
            start: i,
            text: String::new(),
            open: None,
        });
        let value_starts = word.text.is_empty() || word.text.ends_with('=');
        word.text.push(c);
        let mut stack = match c {
            '"' => vec!['"'],
            '[' | '{' if value_starts => vec![c],
            _ => continue,
        };
        // Inside a JSON string or value: until it closes.
        while let Some(&top) = stack.last() {
            let Some((_, c)) = chars.next() else { break };
            word.text.push(c);
            match (top, c) {
                ('"', '\\') => {
                    if let Some((_, escaped)) = chars.next() {
                        word.text.push(escaped);
                    }
                }
                ('"', '"') | ('[', ']') | ('{', '}') => {
                    stack.pop();
                }
                ('"', _) => {}
                (_, '"' | '[' | '{') => stack.push(c),
                _ => {}
            }
        }
        word.open = stack.last().copied();
    }
    out.extend(current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(line: &str) -> (String, String) {
        match qmp(line).unwrap() {
            Input::Send { name, request } => (name, request),
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn commands_with_key_value_arguments() {
        assert_eq!(
            sent("query-status"),
            ("query-status".into(), r#"{"execute":"query-status"}"#.into())
        );
        assert_eq!(
            sent("  qom-get   path=/machine property=type "),
            (
                "qom-get".into(),
                r#"{"execute":"qom-get","arguments":{"path":"/machine","property":"type"}}"#.into()
            )
        );
        // Quoted strings keep their blanks; JSON values stay whole.
        assert_eq!(
            sent(r#"human-monitor-command command-line="info status" cpu-index=0"#).1,
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status","cpu-index":0}}"#
        );
        assert_eq!(
            sent(r#"x list=[1, "a b", {"c": [2]}] n.m=true"#).1,
            r#"{"execute":"x","arguments":{"list":[1,"a b",{"c":[2]}],"n":{"m":true}}}"#
        );
        // A JSON object for the arguments.
        assert_eq!(
            sent(r#"blockdev-add {"driver": "null-co", "node-name": "n 0"}"#).1,
            r#"{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n 0"}}"#
        );
        // Brackets within a value are text, not JSON.
        assert_eq!(
            sent("x b=c{ file=a[1").1,
            r#"{"execute":"x","arguments":{"b":"c{","file":"a[1"}}"#
        );
    }

    #[test]
    fn a_whole_request_goes_as_typed() {
        let line = r#"{"execute": "query-status", "id": "mine"}"#;
        assert_eq!(sent(line), ("query-status".into(), line.into()));
        assert_eq!(
            sent(r#" {"exec-oob": "x"} "#),
            ("x".into(), r#"{"exec-oob": "x"}"#.into())
        );
        assert_eq!(qmp(r#"{"id": 1}"#), Err(LineError::NoCommand));
        assert!(matches!(qmp(r#"{"execute": "x""#), Err(LineError::Request(_))));
    }

    #[test]
    fn the_shell_s_own_words() {
        assert_eq!(qmp(""), Ok(Input::Nothing));
        assert_eq!(qmp(" \t "), Ok(Input::Nothing));
        assert_eq!(qmp(" # a comment"), Ok(Input::Nothing));
        assert_eq!(hmp("# info status"), Input::Nothing);
        assert_eq!(qmp("exit"), Ok(Input::Leave));
        assert_eq!(qmp(" help "), Ok(Input::Help));
        assert_eq!(qmp("?"), Ok(Input::Help));
        // With arguments they are commands like any other.
        assert_eq!(sent("exit now=1").0, "exit");
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(qmp(r#"x a="b c"#), Err(LineError::UnclosedQuote));
        assert_eq!(qmp("x a=[1, 2"), Err(LineError::UnclosedBracket('[')));
        assert_eq!(qmp(r#"x a={"b": [1}"#), Err(LineError::UnclosedBracket('[')));
        assert_eq!(qmp(r#"x a={"b": [1]"#), Err(LineError::UnclosedBracket('{')));
        assert_eq!(
            qmp("x device"),
            Err(LineError::Arguments(ArgsError::NotPair("device".into())))
        );
    }

    #[test]
    fn words_for_completion_stay_open() {
        let w = words(r#"qom-get path="/a b"#);
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[1].start, w[1].text.as_str(), w[1].open),
            (8, r#"path="/a b"#, Some('"'))
        );
        let w = words(r#"x a="q\"" b"#);
        assert_eq!(
            w.iter().map(|w| (w.text.as_str(), w.open)).collect::<Vec<_>>(),
            vec![("x", None), (r#"a="q\"""#, None), ("b", None)]
        );
        assert!(words("   ").is_empty());
    }

    #[test]
    fn human_monitor_lines() {
        assert_eq!(hmp("  "), Input::Nothing);
        assert_eq!(hmp("exit"), Input::Leave);
        assert_eq!(
            hmp(" info status "),
            Input::Send {
                name: "info".into(),
                request: r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status"}}"#.into()
            }
        );
        assert!(stops_qemu(&hmp("q"), true));
        assert!(stops_qemu(&hmp("quit"), true));
        assert!(!stops_qemu(&hmp("info quit"), true));
        assert!(stops_qemu(&qmp("quit").unwrap(), false));
        assert!(stops_qemu(&qmp(r#"{"execute": "quit"}"#).unwrap(), false));
        assert!(!stops_qemu(&qmp("q").unwrap(), false));
    }
}
