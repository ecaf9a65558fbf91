//! Secrets kept out of what taps show (the rules docs/cli.md lists). Pure.
//!
//! In a request, at any depth:
//! - every member whose name contains `password`, `secret` or `key` (in
//!   any case), whatever its value: `password` (`set_password`,
//!   `change-vnc-password`), `password-secret`, `proxy-password-secret`,
//!   `passwordid`, `key-secret`, `new-secret`, `old-secret`,
//!   `cookie-secret`, `secret` (`sev-inject-launch-secret`), `keyid`, `key`
//!   and `keys` (keystrokes, `input-send-event` and `send-key`: they may
//!   type a password), and a few numbers that merely share the words
//!   (`keyslot`, `key-offset`, `master-key-iters`);
//! - `data` of an object whose `qom-type` is `secret` (`object-add`), also
//!   under its `props`;
//! - in `human-monitor-command`'s `command-line`: the password of
//!   `set_password`, `block_passwd` and `change vnc password`, the keys of
//!   `sendkey`, and in options (`name=value,...`) every value whose name is
//!   one of the above, and `data=` of a `secret` object.
//!
//! In a reply: the `return` of `qom-get` of a property `data` or named as
//! above (QEMU returns a secret object's data), members named `token` in
//! what qmpmux's own commands return (a lease's token), and the `return` of
//! a reply whose request the tap did not see (it cannot tell).

use crate::qmp::json::{members, push_compact, write_str};
use serde_json::value::RawValue;

/// What a masked value is shown as.
pub const MASK: &str = "\"***\"";

/// Whether a member named `name` holds, or names, a secret.
pub fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["password", "secret", "key"].iter().any(|w| lower.contains(w))
}

/// What a reply's text must lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplyMask {
    #[default]
    Nothing,
    /// Its `return` value.
    Return,
    /// Members named `token` in its `return`.
    Tokens,
}

/// A request as a tap shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `execute` (or `exec-oob`), when it names one.
    pub command: Option<String>,
    pub oob: bool,
    /// The request as compact JSON, masked.
    pub json: String,
    /// What its reply must lose.
    pub reply: ReplyMask,
}

/// `text`, a client's request, masked; `None` when it is not JSON (then
/// nothing of it can be shown safely).
pub fn request(text: &[u8]) -> Option<Request> {
    if serde_json::from_slice::<&RawValue>(text).is_err() {
        return None;
    }
    let mut command = None;
    let mut oob = false;
    let mut property = None;
    if let Ok(m) = members(text) {
        for (k, v) in &m.0 {
            if k == "execute" || k == "exec-oob" {
                command = serde_json::from_str::<String>(v.get()).ok();
                oob = k == "exec-oob";
            }
        }
        if command.as_deref() == Some("qom-get") {
            property = m
                .get("arguments")
                .and_then(|a| members(a.get().as_bytes()).ok())
                .and_then(|a| a.get("property").map(|p| p.get().to_string()))
                .and_then(|p| serde_json::from_str::<String>(&p).ok());
        }
    }
    let hmp = command.as_deref() == Some("human-monitor-command");
    let mut json = String::with_capacity(text.len());
    let text = std::str::from_utf8(text).ok()?;
    write_value(&mut json, text.trim(), Ctx::Request { hmp });
    let reply = match (command.as_deref(), property) {
        (Some("qom-get"), Some(p)) if p == "data" || is_secret_name(&p) => ReplyMask::Return,
        (Some(c), _) if crate::qmp::extensions::is_extension(c) => ReplyMask::Tokens,
        _ => ReplyMask::Nothing,
    };
    Some(Request {
        command,
        oob,
        json,
        reply,
    })
}

/// `text`, a reply or an event (JSON), compact, losing what `how` says.
pub fn reply(text: &[u8], how: ReplyMask) -> String {
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    let mut out = String::with_capacity(text.len());
    let Ok(m) = members(text.as_bytes()) else {
        // Not JSON: QEMU's, or qmpmux's own, so there is always some.
        write_str(&mut out, text);
        return out;
    };
    out.push('{');
    for (i, (k, v)) in m.0.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(&mut out, k);
        out.push(':');
        match (how, k.as_ref()) {
            (ReplyMask::Return, "return") => out.push_str(MASK),
            (ReplyMask::Tokens, "return") => write_value(&mut out, v.get(), Ctx::Tokens),
            _ => push_compact(&mut out, v.get()),
        }
    }
    out.push('}');
    out
}

/// Where in a message a value is, for what it must lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// In a request (`hmp`: at its top, of `human-monitor-command`).
    Request { hmp: bool },
    /// `arguments` of `human-monitor-command`.
    HmpArguments,
    /// `props` of a secret object.
    SecretProps,
    /// In what qmpmux's own command returned.
    Tokens,
}

/// Appends the JSON value `text` compact, masked as `ctx` says.
fn write_value(out: &mut String, text: &str, ctx: Ctx) {
    match text.as_bytes().first() {
        Some(b'{') => write_object(out, text, ctx),
        Some(b'[') => match serde_json::from_str::<Vec<&RawValue>>(text) {
            Ok(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let inner = if ctx == Ctx::Tokens {
                        ctx
                    } else {
                        Ctx::Request { hmp: false }
                    };
                    write_value(out, item.get(), inner);
                }
                out.push(']');
            }
            Err(_) => out.push_str(MASK),
        },
        _ => push_compact(out, text),
    }
}

fn write_object(out: &mut String, text: &str, ctx: Ctx) {
    let Ok(m) = members(text.as_bytes()) else {
        out.push_str(MASK);
        return;
    };
    let secret_object = m
        .get("qom-type")
        .is_some_and(|t| serde_json::from_str::<String>(t.get()).is_ok_and(|t| t == "secret"));
    out.push('{');
    for (i, (k, v)) in m.0.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, k);
        out.push(':');
        let k = k.as_ref();
        match ctx {
            Ctx::Tokens if k == "token" => out.push_str(MASK),
            Ctx::Tokens => write_value(out, v.get(), Ctx::Tokens),
            _ if is_secret_name(k) => out.push_str(MASK),
            _ if k == "data" && (secret_object || ctx == Ctx::SecretProps) => out.push_str(MASK),
            _ if k == "props" && secret_object => write_value(out, v.get(), Ctx::SecretProps),
            Ctx::Request { hmp: true } if k == "arguments" => write_value(out, v.get(), Ctx::HmpArguments),
            Ctx::HmpArguments if k == "command-line" => match serde_json::from_str::<String>(v.get()) {
                Ok(line) => match hmp(&line) {
                    Some(masked) => write_str(out, &masked),
                    None => push_compact(out, v.get()),
                },
                Err(_) => push_compact(out, v.get()),
            },
            _ => write_value(out, v.get(), Ctx::Request { hmp: false }),
        }
    }
    out.push('}');
}

/// An HMP command line with its secrets masked; `None` when it has none.
pub fn hmp(line: &str) -> Option<String> {
    let start = line.len() - line.trim_start().len();
    let (lead, body) = line.split_at(start);
    let (command, rest) = body.split_once(char::is_whitespace).unwrap_or((body, ""));
    let words: Vec<&str> = rest.split_whitespace().collect();
    // Commands whose secret is a plain word: everything from it on.
    let keep = match command {
        "set_password" | "block_passwd" => Some(1),
        "sendkey" => Some(0),
        "change" if words.len() >= 2 && words[0] == "vnc" && words[1] == "password" => Some(2),
        _ => None,
    };
    if let Some(keep) = keep {
        if words.len() <= keep {
            return None;
        }
        let mut out = format!("{lead}{command}");
        for w in &words[..keep] {
            out.push(' ');
            out.push_str(w);
        }
        out.push_str(" ***");
        return Some(out);
    }
    let masked = mask_options(rest);
    (masked != rest).then(|| format!("{lead}{command} {masked}"))
}

/// `rest` with the values of secret options masked, in each word of
/// `name=value,...` options (`,,` is a comma within a value).
fn mask_options(rest: &str) -> String {
    let mut out = String::with_capacity(rest.len());
    let mut word_start = None;
    for (i, c) in rest.char_indices().chain([(rest.len(), ' ')]) {
        match (c.is_whitespace(), word_start) {
            (false, None) => word_start = Some(i),
            (true, Some(s)) => {
                out.push_str(&mask_word(&rest[s..i]));
                word_start = None;
                if i < rest.len() {
                    out.push(c);
                }
            }
            (true, None) if i < rest.len() => out.push(c),
            _ => {}
        }
    }
    out
}

fn mask_word(word: &str) -> String {
    let items = split_options(word);
    let secret_object = items.first() == Some(&"secret") || items.contains(&"qom-type=secret");
    let masked: Vec<String> = items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((name, _)) if is_secret_name(name) || (name == "data" && secret_object) => format!("{name}=***"),
            _ => (*item).to_string(),
        })
        .collect();
    masked.join(",")
}

/// QEMU's option list split at each comma that is not doubled.
fn split_options(word: &str) -> Vec<&str> {
    let bytes = word.as_bytes();
    let (mut items, mut start, mut i) = (Vec::new(), 0, 0);
    while i < bytes.len() {
        if bytes[i] == b',' {
            if bytes.get(i + 1) == Some(&b',') {
                i += 2;
                continue;
            }
            items.push(&word[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    items.push(&word[start..]);
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(text: &str) -> String {
        request(text.as_bytes()).unwrap().json
    }

    #[test]
    fn secret_names() {
        for name in [
            "password",
            "password-secret",
            "proxy-password-secret",
            "passwordid",
            "key-secret",
            "new-secret",
            "old-secret",
            "cookie-secret",
            "secret",
            "keyid",
            "keys",
            "key",
            "Password",
            "KEY",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "pass",
            "pass-discard-request",
            "data",
            "id",
            "tls-creds",
            "monkey-business",
        ] {
            assert_eq!(is_secret_name(name), name.contains("key"), "{name}");
        }
    }

    #[test]
    fn arguments_named_as_secrets_are_masked_at_any_depth() {
        assert_eq!(
            masked(r#"{"execute": "set_password", "arguments": {"protocol": "vnc", "password": "hunter2"}, "id": 1}"#),
            r#"{"execute":"set_password","arguments":{"protocol":"vnc","password":"***"},"id":1}"#
        );
        assert_eq!(
            masked(
                r#"{"execute":"blockdev-add","arguments":{"driver":"luks","key-secret":"sec0","file":{"driver":"rbd","auth":{"Password-Secret":{"x":1}}}}}"#
            ),
            r#"{"execute":"blockdev-add","arguments":{"driver":"luks","key-secret":"***","file":{"driver":"rbd","auth":{"Password-Secret":"***"}}}}"#
        );
        assert_eq!(
            masked(r#"{"execute":"send-key","arguments":{"keys":[{"type":"qcode","data":"h"}],"hold-time":5}}"#),
            r#"{"execute":"send-key","arguments":{"keys":"***","hold-time":5}}"#
        );
        assert_eq!(
            masked(
                r#"{"execute":"input-send-event","arguments":{"events":[{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"a"}}}]}}"#
            ),
            r#"{"execute":"input-send-event","arguments":{"events":[{"type":"key","data":{"down":true,"key":"***"}}]}}"#
        );
        // Nothing to mask: the same message, compact, in its order.
        assert_eq!(
            masked("{ \"id\": \"x\",\n \"execute\" : \"query-status\" }"),
            r#"{"id":"x","execute":"query-status"}"#
        );
    }

    #[test]
    fn secret_objects_lose_their_data() {
        assert_eq!(
            masked(
                r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"hunter2","format":"raw"}}"#
            ),
            r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","data":"***","format":"raw"}}"#
        );
        assert_eq!(
            masked(
                r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","props":{"data":"aHVudGVyMg==","format":"base64"}}}"#
            ),
            r#"{"execute":"object-add","arguments":{"qom-type":"secret","id":"s0","props":{"data":"***","format":"base64"}}}"#
        );
        // Other objects keep their data.
        assert_eq!(
            masked(r#"{"execute":"object-add","arguments":{"qom-type":"memory-backend-ram","id":"m","data":1}}"#),
            r#"{"execute":"object-add","arguments":{"qom-type":"memory-backend-ram","id":"m","data":1}}"#
        );
        let tls =
            masked(r#"{"execute":"object-add","arguments":{"qom-type":"tls-creds-x509","id":"t","passwordid":"s0"}}"#);
        assert!(tls.ends_with(r#""passwordid":"***"}}"#), "{tls}");
    }

    #[test]
    fn hmp_secrets_are_masked() {
        let cases = [
            ("set_password vnc hunter2", Some("set_password vnc ***")),
            ("set_password spice hunter2 keep", Some("set_password spice ***")),
            ("set_password vnc", None),
            ("  block_passwd drive0 hunter2", Some("  block_passwd drive0 ***")),
            ("change vnc password hunter2", Some("change vnc password ***")),
            ("change vnc password", None),
            ("change ide1-cd0 /x.iso", None),
            ("sendkey h-u-n-t-e-r-2", Some("sendkey ***")),
            (
                "object_add secret,id=s0,data=hunter2",
                Some("object_add secret,id=s0,data=***"),
            ),
            (
                "object_add qom-type=secret,id=s0,data=a,,b,format=raw",
                Some("object_add qom-type=secret,id=s0,data=***,format=raw"),
            ),
            ("object_add memory-backend-ram,id=m,size=1M,data=1", None),
            (
                "drive_add 0 if=none,id=d,password-secret=s0,key-secret=k",
                Some("drive_add 0 if=none,id=d,password-secret=***,key-secret=***"),
            ),
            ("info status", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(hmp(line).as_deref(), want, "{line:?}");
        }
        assert_eq!(
            masked(r#"{"execute":"human-monitor-command","arguments":{"command-line":"set_password vnc hunter2"}}"#),
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"set_password vnc ***"}}"#
        );
    }

    #[test]
    fn what_replies_lose() {
        let r = request(br#"{"execute":"qom-get","arguments":{"path":"/objects/s0","property":"data"}}"#).unwrap();
        assert_eq!(r.reply, ReplyMask::Return);
        assert_eq!(r.command.as_deref(), Some("qom-get"));
        assert_eq!(reply(b"{\"return\": \"hunter2\"}\r\n", r.reply), r#"{"return":"***"}"#);
        // An error keeps its text.
        let e = br#"{"error": {"class": "GenericError", "desc": "no"}}"#;
        assert_eq!(
            reply(e, ReplyMask::Return),
            r#"{"error":{"class":"GenericError","desc":"no"}}"#
        );
        let r = request(br#"{"execute":"qom-get","arguments":{"path":"/machine","property":"type"}}"#).unwrap();
        assert_eq!(r.reply, ReplyMask::Nothing);
        let r = request(br#"{"exec-oob":"__org.qmpmux_lease","arguments":{"seconds":5}}"#).unwrap();
        assert!(r.oob);
        assert_eq!(r.reply, ReplyMask::Tokens);
        assert_eq!(
            reply(
                br#"{"return": {"lease": {"token": "t0k3n", "client": 3}, "seconds": 5, "token": "x"}}"#,
                r.reply
            ),
            r#"{"return":{"lease":{"token":"***","client":3},"seconds":5,"token":"***"}}"#
        );
        assert_eq!(reply(b"{\"return\": {}}", ReplyMask::Nothing), r#"{"return":{}}"#);
    }

    #[test]
    fn what_is_not_json_is_not_shown() {
        assert_eq!(
            request(br#"{"execute":"set_password","arguments":{"password":"hunter2""#),
            None
        );
        assert_eq!(request(b"hunter2"), None);
        // JSON but not an object: masked all the same.
        assert_eq!(masked(r#"[{"password":"x"},1]"#), r#"[{"password":"***"},1]"#);
    }
}
