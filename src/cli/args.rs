//! A command's arguments as people type them (`qmpmux exec`, `qmpmux
//! shell`, `qmpmux fleet exec`): one JSON object, or `key=value` words as
//! qmp-shell takes them. Pure.

use serde_json::{Map, Value};

/// Why the words are not a command's arguments.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("the arguments are not a JSON object: {0}")]
    Json(String),
    #[error("the arguments must be a JSON object, not {0}")]
    NotObject(&'static str),
    #[error("'{0}' is not key=value (nor a JSON object)")]
    NotPair(String),
    #[error("argument '{0}' is given twice")]
    Twice(String),
    #[error("'{0}' is an empty key")]
    EmptyKey(String),
}

/// The arguments `words` spell: nothing (`None`: no `arguments` member);
/// a single word that starts with `{`: that JSON object; else `key=value`
/// words, each value JSON where it parses as JSON (`42`, `true`, `null`,
/// `[1, 2]`, `{"a": 1}`, `"quoted"`) and a string otherwise
/// (`device=drive0`). A dotted key makes nested objects, as qmp-shell's
/// do: `backing.driver=qcow2 backing.file=a.qcow2` is
/// `{"backing": {"driver": "qcow2", "file": "a.qcow2"}}`.
pub fn parse(words: &[String]) -> Result<Option<Map<String, Value>>, ArgsError> {
    match words {
        [] => Ok(None),
        [one] if one.trim_start().starts_with('{') => match serde_json::from_str::<Value>(one) {
            Ok(Value::Object(map)) => Ok(Some(map)),
            Ok(other) => Err(ArgsError::NotObject(kind(&other))),
            Err(e) => Err(ArgsError::Json(e.to_string())),
        },
        _ => {
            let mut map = Map::new();
            for word in words {
                let (key, value) = word.split_once('=').ok_or_else(|| ArgsError::NotPair(word.clone()))?;
                insert(&mut map, key, value_of(value), word)?;
            }
            Ok(Some(map))
        }
    }
}

/// The command and arguments that run human monitor (HMP) `command_line`
/// through QMP's `human-monitor-command`.
pub fn hmp(command_line: &str) -> (String, Map<String, Value>) {
    let mut arguments = Map::new();
    arguments.insert("command-line".into(), Value::String(command_line.to_owned()));
    ("human-monitor-command".to_owned(), arguments)
}

/// What `--hmp LINE`, or `COMMAND ARGUMENTS...`, of `qmpmux exec` and
/// `qmpmux fleet exec` run: the command and its arguments.
pub fn command_of(
    hmp_line: Option<&str>,
    command: Option<&str>,
    words: &[String],
) -> Result<(String, Option<Map<String, Value>>), super::CliError> {
    match (hmp_line, command) {
        (Some(line), _) => {
            let (command, arguments) = hmp(line);
            Ok((command, Some(arguments)))
        }
        (None, Some(command)) => Ok((command.to_owned(), parse(words)?)),
        (None, None) => Err(super::CliError::Usage("no COMMAND (nor --hmp) given".into())),
    }
}

/// A `key=value` word's value: JSON where it parses as JSON, else the text.
pub fn value_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn insert(map: &mut Map<String, Value>, key: &str, value: Value, word: &str) -> Result<(), ArgsError> {
    let mut parts = key.split('.').peekable();
    let mut at = map;
    let mut path = String::new();
    while let Some(part) = parts.next() {
        if part.is_empty() {
            return Err(ArgsError::EmptyKey(word.to_owned()));
        }
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(part);
        if parts.peek().is_none() {
            if at.contains_key(part) {
                return Err(ArgsError::Twice(path));
            }
            at.insert(part.to_owned(), value);
            return Ok(());
        }
        let next = at.entry(part.to_owned()).or_insert_with(|| Value::Object(Map::new()));
        at = match next {
            Value::Object(inner) => inner,
            _ => return Err(ArgsError::Twice(path)),
        };
    }
    Err(ArgsError::EmptyKey(word.to_owned()))
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The request line for `command` with `arguments` and `id`, compact, as
/// one QMP message: `execute` first, as people write it.
pub fn request(command: &str, arguments: Option<&Map<String, Value>>, id: Option<&Value>) -> String {
    let mut line = format!("{{\"execute\":{}", Value::String(command.to_owned()));
    if let Some(args) = arguments {
        line.push_str(",\"arguments\":");
        line.push_str(&Value::Object(args.clone()).to_string());
    }
    if let Some(id) = id {
        line.push_str(",\"id\":");
        line.push_str(&id.to_string());
    }
    line.push('}');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn words(w: &[&str]) -> Vec<String> {
        w.iter().map(|s| s.to_string()).collect()
    }

    fn parsed(w: &[&str]) -> Value {
        Value::Object(parse(&words(w)).unwrap().unwrap())
    }

    #[test]
    fn nothing_is_no_arguments() {
        assert_eq!(parse(&[]).unwrap(), None);
    }

    #[test]
    fn one_json_object() {
        assert_eq!(
            parsed(&[r#"{"device": "drive0", "n": [1]}"#]),
            json!({"device": "drive0", "n": [1]})
        );
        assert_eq!(parsed(&["  {}"]), json!({}));
        assert_eq!(parse(&words(&["[1]"])).unwrap_err(), ArgsError::NotPair("[1]".into()));
        assert_eq!(
            parse(&words(&["{]"])).unwrap_err().to_string().split(':').next(),
            Some("the arguments are not a JSON object")
        );
    }

    #[test]
    fn values_are_json_where_they_parse_and_strings_otherwise() {
        assert_eq!(
            parsed(&[
                "device=drive0",
                "speed=42",
                "on=true",
                "off=false",
                "none=null",
                "list=[1,\"a\"]",
                "obj={\"a\":1}",
                "q=\"42\"",
                "empty=",
                "eq=a=b"
            ]),
            json!({"device": "drive0", "speed": 42, "on": true, "off": false, "none": null, "list": [1, "a"], "obj": {"a": 1}, "q": "42", "empty": "", "eq": "a=b"})
        );
        // Text that starts like JSON but is not stays text.
        assert_eq!(
            parsed(&["file=/tmp/a b", "x=1.2.3", "y=[oops"]),
            json!({"file": "/tmp/a b", "x": "1.2.3", "y": "[oops"})
        );
    }

    #[test]
    fn dotted_keys_nest() {
        assert_eq!(
            parsed(&["backing.driver=qcow2", "backing.file.filename=a.qcow2", "node-name=n"]),
            json!({"backing": {"driver": "qcow2", "file": {"filename": "a.qcow2"}}, "node-name": "n"})
        );
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(
            parse(&words(&["device"])).unwrap_err(),
            ArgsError::NotPair("device".into())
        );
        assert_eq!(
            parse(&words(&["a=1", "a=2"])).unwrap_err(),
            ArgsError::Twice("a".into())
        );
        assert_eq!(
            parse(&words(&["a=1", "a.b=2"])).unwrap_err(),
            ArgsError::Twice("a".into())
        );
        assert_eq!(
            parse(&words(&["a.b=1", "a.b=2"])).unwrap_err(),
            ArgsError::Twice("a.b".into())
        );
        assert_eq!(parse(&words(&["=1"])).unwrap_err(), ArgsError::EmptyKey("=1".into()));
        assert_eq!(
            parse(&words(&["a..b=1"])).unwrap_err(),
            ArgsError::EmptyKey("a..b=1".into())
        );
        assert_eq!(
            parse(&words(&["{}", "a=1"])).unwrap_err(),
            ArgsError::NotPair("{}".into())
        );
    }

    #[test]
    fn requests_are_one_line() {
        let args = parse(&words(&["device=drive0"])).unwrap();
        assert_eq!(request("query-status", None, None), r#"{"execute":"query-status"}"#);
        assert_eq!(
            request("block-job-cancel", args.as_ref(), Some(&json!(1))),
            r#"{"execute":"block-job-cancel","arguments":{"device":"drive0"},"id":1}"#
        );
        assert_eq!(request("x\n", None, None), r#"{"execute":"x\n"}"#);
    }
}
