//! What a client's message means: QEMU's request checks, capabilities
//! negotiation answered locally, and the bytes to forward upstream.
//!
//! This mirrors `qmp_dispatch()` and `qmp_dispatch_check_obj()` in QEMU's
//! `qapi/qmp-dispatch.c` and `qmp_qmp_capabilities()` in `monitor/`, so that
//! everything qmpmux answers itself reads exactly as QEMU would answer it.

use super::framing::Frame;
use super::json::{ghash_order, members_checked, qdict_order, qemu_style, Members};
use super::outgoing::{empty_return_line, error_line};
use bytes::Bytes;
use serde_json::value::RawValue;

/// The one command a client may send before `qmp_capabilities`.
pub const EARLY_COMMAND: &str = "__org.qmpmux_subscribe";

/// Capabilities a client may enable; QEMU knows only `oob`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub oob: bool,
}

/// Per-client negotiation state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Session {
    pub negotiated: bool,
    pub enabled: Caps,
}

/// What to do with one frame from a client.
#[derive(Debug)]
pub enum Decision {
    /// Answer with this line; nothing goes upstream.
    Local(Bytes),
    /// Forward upstream; the reply comes back by upstream id.
    Forward(Forward),
    /// Refused by the caller's `admit` check: answer with this line.
    Denied { line: Bytes, command: String },
}

/// A request to forward. The upstream message is `{"id": N` + `tail`, where
/// N is the upstream session's correlation number. The client's own id
/// stays with the client task, which puts it into the reply in QEMU's
/// serialisation ([`qemu_style`]); it never goes upstream, so it cannot push
/// a request over QEMU's nesting or token limits.
#[derive(Debug)]
pub struct Forward {
    pub tail: Bytes,
    /// The client's id, to put into the reply.
    pub id: Option<Box<RawValue>>,
    pub command: String,
    /// `exec-oob`: may overtake in-band requests, and its reply too.
    pub oob: bool,
    /// For `getfd` and `closefd`: the fd name (monitor-wide in QEMU, so
    /// qmpmux tracks which client holds which).
    pub fdname: Option<String>,
    /// QEMU will take a passed fd for it ([`consumes_fd`]): send the
    /// client's waiting fd along.
    pub takes_fd: bool,
    /// The arguments of one of qmpmux's own commands
    /// ([`super::extensions::is_extension`]), which qmpmux reads; `None`
    /// for QEMU's commands, whose arguments travel in `tail` unread.
    pub ext_arguments: Option<Box<RawValue>>,
}

struct Reject {
    class: &'static str,
    desc: String,
}

fn generic(desc: impl Into<String>) -> Reject {
    Reject {
        class: "GenericError",
        desc: desc.into(),
    }
}

fn command_not_found(desc: &str) -> Reject {
    Reject {
        class: "CommandNotFound",
        desc: desc.into(),
    }
}

fn is_string(v: &RawValue) -> bool {
    v.get().starts_with('"')
}

/// `qmp_dispatch_check_obj()`: returns the command name.
fn check_obj(m: &Members<'_>, allow_oob: bool) -> Result<(String, bool), Reject> {
    let mut exec: Option<(&str, &RawValue)> = None;
    for i in qdict_order(&m.0.iter().map(|(k, _)| k.as_ref()).collect::<Vec<_>>()) {
        let (key, value) = (&m.0[i].0, m.0[i].1);
        match key.as_ref() {
            k @ ("execute" | "exec-oob") if k == "execute" || allow_oob => {
                if !is_string(value) {
                    return Err(generic(format!("QMP input member '{k}' must be a string")));
                }
                if let Some((other, _)) = exec {
                    return Err(generic(format!("QMP input member '{k}' clashes with '{other}'")));
                }
                exec = Some((k, value));
            }
            "arguments" => {
                if !value.get().starts_with('{') {
                    return Err(generic("QMP input member 'arguments' must be an object"));
                }
            }
            "id" => {}
            k => return Err(generic(format!("QMP input member '{k}' is unexpected"))),
        }
    }
    let (key, value) = exec.ok_or_else(|| generic("QMP input lacks member 'execute'"))?;
    let name: String =
        serde_json::from_str(value.get()).map_err(|_| generic("QMP input member 'execute' must be a string"))?;
    Ok((name, key == "exec-oob"))
}

/// The QAPI input visitor's checks on `qmp_capabilities` arguments.
fn capabilities_args(m: &Members<'_>) -> Result<Caps, Reject> {
    let mut caps = Caps::default();
    let Some(args) = m.get("arguments") else {
        return Ok(caps);
    };
    let args: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(args.get()).map_err(|_| generic("QMP input member 'arguments' must be an object"))?;
    if let Some(enable) = args.get("enable") {
        let list = enable
            .as_array()
            .ok_or_else(|| generic("Invalid parameter type for 'enable', expected: array"))?;
        for (i, item) in list.iter().enumerate() {
            match item.as_str() {
                Some("oob") => caps.oob = true,
                // QEMU really does say 'null' here.
                Some(other) => return Err(generic(format!("Parameter 'null' does not accept value '{other}'"))),
                None => {
                    return Err(generic(format!(
                        "Invalid parameter type for 'enable[{i}]', expected: string"
                    )))
                }
            }
        }
    }
    // QEMU names the first unexpected one in the order of the glib hash
    // table its input visitor fills from the arguments' QDict.
    if let Ok(raw) = super::json::members(m.get("arguments").map(|a| a.get().as_bytes()).unwrap_or(b"{}")) {
        let keys: Vec<&str> = raw.0.iter().map(|(k, _)| k.as_ref()).collect();
        let inserted: Vec<&str> = qdict_order(&keys).into_iter().map(|i| keys[i]).collect();
        let order = ghash_order(&inserted).unwrap_or_else(|| (0..inserted.len()).collect());
        if let Some(i) = order.into_iter().find(|&i| inserted[i] != "enable") {
            return Err(generic(format!("Parameter '{}' is unexpected", inserted[i])));
        }
    }
    Ok(caps)
}

/// Decides what one frame means for a client in state `session`, whose
/// greeting offered `offered`. Updates `session` on successful negotiation.
/// A well-formed command of a negotiated client is put to `admit` (its name
/// and arguments), which may refuse it with a description (the caller's
/// policy: the wire layer knows none).
pub fn decide(
    frame: Frame,
    session: &mut Session,
    offered: Caps,
    admit: impl FnOnce(&str, Option<&RawValue>) -> Result<(), String>,
) -> Decision {
    let bytes = match frame {
        Frame::Error(desc) | Frame::Limit(desc) => return Decision::Local(error_line(None, "GenericError", &desc)),
        Frame::Message(bytes) => bytes,
    };
    let members = match members_checked(&bytes) {
        Ok(m) => m,
        Err(e) => return Decision::Local(error_line(None, "GenericError", &e.desc())),
    };
    let id = members.get("id");
    let reject = |r: Reject| {
        let id = id.map(qemu_style);
        Decision::Local(error_line(id.as_deref(), r.class, &r.desc))
    };
    let (command, oob) = match check_obj(&members, session.negotiated && session.enabled.oob) {
        Ok(c) => c,
        Err(r) => return reject(r),
    };
    if command == "qmp_capabilities" && oob {
        return reject(generic("The command qmp_capabilities does not support OOB"));
    }
    if command == "qmp_capabilities" {
        let caps = match capabilities_args(&members) {
            Ok(c) => c,
            Err(r) => return reject(r),
        };
        if session.negotiated {
            return reject(command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        if caps.oob && !offered.oob {
            return reject(generic("Capability oob not available"));
        }
        session.negotiated = true;
        session.enabled = caps;
        return Decision::Local(empty_return_line(id.map(qemu_style).as_deref()));
    }
    // The one exception: a subscription before negotiation, so that a
    // resuming client gets no unnumbered event first. Stock clients never
    // send it (QEMU would refuse it, as it does anything else here).
    if !session.negotiated && command != EARLY_COMMAND {
        return reject(command_not_found(
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        ));
    }
    if let Err(desc) = admit(&command, members.get("arguments")) {
        let id = id.map(qemu_style);
        return Decision::Denied {
            line: error_line(id.as_deref(), "GenericError", &desc),
            command,
        };
    }
    let fdname = match command.as_str() {
        "getfd" | "closefd" => fdname(members.get("arguments")),
        _ => None,
    };
    let takes_fd = !oob && consumes_fd(&command, members.get("arguments"));
    let ext_arguments = match super::extensions::is_extension(&command) {
        true => members.get("arguments").map(|a| a.to_owned()),
        false => None,
    };
    Decision::Forward(Forward {
        ext_arguments,
        tail: forward_tail(&members),
        id: id.map(|v| v.to_owned()),
        command,
        oob,
        fdname,
        takes_fd,
    })
}

/// Whether QEMU takes the connection's passed fd for this in-band request:
/// `getfd` and `add-fd` do, first thing, once their arguments are
/// accepted; arguments QEMU rejects (missing, unexpected, wrongly typed)
/// leave the fd with the connection for the next one (checked on 7.2), and
/// as qmpmux's connection is shared, another client's fd-less `getfd`
/// would take it. So qmpmux sends the fd only with arguments QEMU accepts,
/// and otherwise keeps it waiting for this client, as QEMU would.
pub fn consumes_fd(command: &str, arguments: Option<&RawValue>) -> bool {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct GetFd {
        #[serde(rename = "fdname")]
        _fdname: String,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct AddFd {
        #[serde(rename = "fdset-id")]
        _fdset_id: Option<i64>,
        #[serde(rename = "opaque")]
        _opaque: Option<String>,
    }
    let args = arguments.map_or("{}", |a| a.get());
    match command {
        "getfd" => serde_json::from_str::<GetFd>(args).is_ok(),
        "add-fd" => serde_json::from_str::<AddFd>(args).is_ok(),
        _ => false,
    }
}

fn fdname(arguments: Option<&RawValue>) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Args {
        fdname: String,
    }
    serde_json::from_str::<Args>(arguments?.get()).ok().map(|a| a.fdname)
}

/// Everything after `{"id":N` of the upstream message, compact: QEMU reads
/// its input a byte per main-loop turn, so a byte left out is a few µs off
/// every round trip. Whitespace between tokens is all that goes (with it,
/// any `\n` or `\r`: the message goes upstream as one line).
fn forward_tail(m: &Members<'_>) -> Bytes {
    let size: usize = m.0.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum();
    let mut out = String::with_capacity(size + 2);
    m.write_tail_without_id(&mut out, true);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut Session, offered: Caps, input: &str) -> String {
        match decide(
            Frame::Message(Bytes::copy_from_slice(input.as_bytes())),
            s,
            offered,
            |_, _| Ok(()),
        ) {
            Decision::Local(b) => String::from_utf8(b.to_vec()).unwrap(),
            Decision::Forward(f) => format!("FORWARD {{\"id\":N{}", String::from_utf8(f.tail.to_vec()).unwrap()),
            Decision::Denied { line, .. } => format!("DENIED {}", String::from_utf8(line.to_vec()).unwrap()),
        }
    }

    #[test]
    fn negotiation_mode_matches_qemu() {
        let mut s = Session::default();
        let no = Caps::default();
        assert_eq!(
            run(&mut s, no, r#"{"execute":"query-status","id":1e3}"#),
            "{\"id\": 1000, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"
        );
        assert_eq!(
            run(&mut s, no, r#"{"execute":"query-status","bogus":1,"id":2}"#),
            "{\"id\": 2, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'bogus' is unexpected\"}}\r\n"
        );
        assert_eq!(
            run(&mut s, no, r#"{"exec-oob":"query-status","id":1}"#),
            "{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input member 'exec-oob' is unexpected\"}}\r\n"
        );
        assert_eq!(
            run(
                &mut s,
                no,
                r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
            ),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Capability oob not available\"}}\r\n"
        );
        assert_eq!(
            run(&mut s, no, r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'null' does not accept value 'foo'\"}}\r\n"
        );
        assert_eq!(
            run(&mut s, no, r#"{"execute":"qmp_capabilities","arguments":{"enable":[1]}}"#),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Invalid parameter type for 'enable[0]', expected: string\"}}\r\n"
        );
        // qmpmux's subscription alone is taken before negotiation (other
        // extensions are refused as QEMU refuses everything here).
        assert!(run(&mut s, no, r#"{"execute":"__org.qmpmux_subscribe","id":3}"#).starts_with("FORWARD"));
        assert!(run(&mut s, no, r#"{"execute":"__org.qmpmux_query-events","id":4}"#).contains("CommandNotFound"));
        assert!(!s.negotiated);
        assert_eq!(
            run(&mut s, no, r#"{"execute":"qmp_capabilities","id":null}"#),
            "{\"return\": {}, \"id\": null}\r\n"
        );
        assert!(s.negotiated);
        assert_eq!(
            run(&mut s, no, r#"{"execute":"qmp_capabilities"}"#),
            "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Capabilities negotiation is already complete, command ignored\"}}\r\n"
        );
        assert_eq!(
            run(&mut s, no, r#"{"execute":"qmp_capabilities","arguments":{"x":1}}"#),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Parameter 'x' is unexpected\"}}\r\n"
        );
    }

    #[test]
    fn forwarded_requests_carry_the_client_id_inside_ours() {
        let mut s = Session {
            negotiated: true,
            enabled: Caps::default(),
        };
        let no = Caps::default();
        assert_eq!(
            run(&mut s, no, r#"{"execute":"query-status","id":{"a": [1, "x"]}}"#),
            r#"FORWARD {"id":N,"execute":"query-status"}"#
        );
        assert_eq!(
            run(&mut s, no, r#"{"arguments":{"a":1},"execute":"x"}"#),
            r#"FORWARD {"id":N,"arguments":{"a":1},"execute":"x"}"#
        );
        // A message over several lines goes upstream as one, without the
        // whitespace between tokens; strings keep theirs.
        assert_eq!(
            run(
                &mut s,
                no,
                "{\"execute\":\"x\",\r\n \"arguments\": {\n  \"a\": [1,\n 2, \" b \"]\n}\n}"
            ),
            "FORWARD {\"id\":N,\"execute\":\"x\",\"arguments\":{\"a\":[1,2,\" b \"]}}"
        );
        // Not negotiated for OOB: exec-oob is an unknown member, as in QEMU.
        assert!(run(&mut s, no, r#"{"exec-oob":"x","id":3}"#).contains("QMP input member 'exec-oob' is unexpected"));
        assert!(run(&mut s, no, r#"{"execute":"x","arguments":[]}"#).contains("'arguments' must be an object"));
    }

    #[test]
    fn framing_and_parse_errors_are_id_less() {
        let mut s = Session::default();
        let out = decide(
            Frame::Error("JSON parse error, stray '@'".into()),
            &mut s,
            Caps::default(),
            |_, _| Ok(()),
        );
        match out {
            Decision::Local(b) => assert_eq!(
                &b[..],
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '@'\"}}\r\n"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            run(&mut s, Caps::default(), "[1]"),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"QMP input must be a JSON object\"}}\r\n"
        );
    }
}

#[cfg(test)]
mod fd_tests {
    use super::*;
    use serde_json::value::RawValue;

    fn args(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.into()).unwrap()
    }

    #[test]
    fn an_fd_goes_only_with_arguments_qemu_accepts() {
        assert!(consumes_fd("getfd", Some(&args(r#"{"fdname": "x"}"#))));
        // QEMU takes (and closes) the fd, then refuses the name.
        assert!(consumes_fd("getfd", Some(&args(r#"{"fdname": "9"}"#))));
        assert!(!consumes_fd("getfd", None));
        assert!(!consumes_fd("getfd", Some(&args(r#"{"fdname": 5}"#))));
        assert!(!consumes_fd("getfd", Some(&args(r#"{"fdname": "x", "y": 1}"#))));
        assert!(consumes_fd("add-fd", None));
        assert!(consumes_fd("add-fd", Some(&args(r#"{"fdset-id": -1, "opaque": "o"}"#))));
        assert!(!consumes_fd("add-fd", Some(&args(r#"{"fdset-id": "1"}"#))));
        assert!(!consumes_fd("add-fd", Some(&args(r#"{"bogus": 1}"#))));
        assert!(!consumes_fd("query-status", None));
    }

    proptest::proptest! {
        /// Whatever the framer lets through, request handling copes with it:
        /// every outcome is a JSON line or a forwardable tail, never a panic.
        #[test]
        fn whatever_is_framed_is_decided(chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0..20)) {
            use super::super::framing::{JsonFramer, Limits};
            use tokio_util::codec::Decoder;
            let mut framer = JsonFramer::new(Limits { max_message: 256, max_depth: 8 });
            let mut buf = bytes::BytesMut::new();
            let mut s = Session::default();
            for c in chunks {
                buf.extend_from_slice(&c);
                while let Some(f) = framer.decode(&mut buf).unwrap() {
                    match decide(f, &mut s, Caps { oob: true }, |c, _| if c == "quit" { Err("no".into()) } else { Ok(()) }) {
                        Decision::Local(line) | Decision::Denied { line, .. } => {
                            proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&line).is_ok());
                        }
                        Decision::Forward(fwd) => {
                            let mut msg = b"{\"id\": 1".to_vec();
                            msg.extend_from_slice(&fwd.tail);
                            proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&msg).is_ok());
                        }
                    }
                }
            }
        }
    }
}
