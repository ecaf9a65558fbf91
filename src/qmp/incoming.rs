//! Messages from QEMU: greeting, replies to correlate, events to broadcast.

use super::json::{members, Members, ParseError};
use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;
use std::ops::Range;

/// One message read from the upstream QMP socket.
#[derive(Debug)]
pub enum Incoming<'a> {
    Greeting(Greeting),
    /// A reply carrying one of our correlation ids.
    Reply(Reply),
    /// An async event, by name; forwarded byte for byte.
    Event(std::borrow::Cow<'a, str>),
    /// A reply without an id, or with one we did not send.
    Stray(Option<&'a RawValue>),
}

/// What qmpmux keeps of QEMU's greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's `version` object, raw.
    pub version: String,
    pub oob: bool,
}

impl Greeting {
    /// The greeting a client sees: QEMU's version, and the capabilities
    /// qmpmux honours for clients (`offer_oob`).
    pub fn line(&self, offer_oob: bool) -> Bytes {
        let caps = if offer_oob && self.oob { "[\"oob\"]" } else { "[]" };
        Bytes::from(format!(
            "{{\"QMP\": {{\"version\": {}, \"capabilities\": {caps}}}}}\r\n",
            self.version
        ))
    }
}

/// A reply to one of qmpmux's requests.
#[derive(Debug)]
pub struct Reply {
    /// Our correlation number.
    pub n: u64,
    /// Whether QEMU answered with an error (for counting and the audit log).
    pub error: bool,
    pub bytes: ReplyBytes,
}

/// QEMU's reply bytes, and where our id sits in them, so that the client
/// task can put the client's own id there (or remove it) with two copies
/// and no parsing.
#[derive(Debug, Clone)]
pub struct ReplyBytes {
    msg: Bytes,
    /// The id's value.
    id_value: Range<usize>,
    /// The whole `"id": N` member with one adjoining separator.
    id_member: Range<usize>,
}

impl ReplyBytes {
    /// The line for a client whose request had id `id` (already in QEMU's
    /// serialisation), or none.
    pub fn line(&self, id: Option<&str>) -> Bytes {
        let (cut, insert) = match id {
            Some(id) => (&self.id_value, id.as_bytes()),
            None => (&self.id_member, &b""[..]),
        };
        let mut out = BytesMut::with_capacity(self.msg.len() + insert.len() + 2);
        out.extend_from_slice(&self.msg[..cut.start]);
        out.extend_from_slice(insert);
        out.extend_from_slice(&self.msg[cut.end..]);
        out.extend_from_slice(b"\r\n");
        out.freeze()
    }

    pub fn len(&self) -> usize {
        self.msg.len()
    }

    pub fn is_empty(&self) -> bool {
        self.msg.is_empty()
    }

    /// `msg` with the id value at `value`; `None` if the id member is not
    /// written the way QEMU writes it.
    fn locate(msg: Bytes, value: Range<usize>) -> Option<ReplyBytes> {
        let id_member = member_span(&msg, value.clone())?;
        Some(ReplyBytes {
            msg,
            id_value: value,
            id_member,
        })
    }

    /// Rebuilds the reply as `{"id": N, ...}` when it could not be located.
    fn canonical(n: u64, m: &Members<'_>) -> ReplyBytes {
        let mut out = format!("{{\"id\": {n}");
        m.write_tail_without_id(&mut out, false);
        let digits = n.to_string().len();
        ReplyBytes {
            id_value: 7..7 + digits,
            id_member: 1..7 + digits + if m.0.len() > 1 { 2 } else { 0 },
            msg: Bytes::from(out),
        }
    }
}

/// The span of the `"id": V` member around the value at `value`, together
/// with the separator that must go with it.
fn member_span(msg: &[u8], value: Range<usize>) -> Option<Range<usize>> {
    let ws = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let mut i = value.start;
    while i > 0 && ws(msg[i - 1]) {
        i -= 1;
    }
    i = i.checked_sub(1).filter(|&j| msg[j] == b':')?;
    while i > 0 && ws(msg[i - 1]) {
        i -= 1;
    }
    let key_start = i.checked_sub(4).filter(|&j| &msg[j..i] == b"\"id\"")?;
    let mut before = key_start;
    while before > 0 && ws(msg[before - 1]) {
        before -= 1;
    }
    match msg.get(before.checked_sub(1)?)? {
        b',' => Some(before - 1..value.end),
        b'{' => {
            let mut end = value.end;
            while end < msg.len() && ws(msg[end]) {
                end += 1;
            }
            if msg.get(end) == Some(&b',') {
                end += 1;
                while end < msg.len() && ws(msg[end]) {
                    end += 1;
                }
                Some(key_start..end)
            } else {
                Some(key_start..value.end)
            }
        }
        _ => None,
    }
}

/// An event's name: the JSON string's text, borrowed unless it has escapes
/// (QEMU's never do); a name that is not a string reads as empty.
fn event_name(raw: &RawValue) -> std::borrow::Cow<'_, str> {
    let text = raw.get();
    match text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') => std::borrow::Cow::Borrowed(inner),
        _ => serde_json::from_str::<String>(text).unwrap_or_default().into(),
    }
}

/// Classifies one framed upstream message.
pub fn classify(bytes: &Bytes) -> Result<Incoming<'_>, ParseError> {
    if let Some(reply) = quick_reply(bytes) {
        return Ok(Incoming::Reply(reply));
    }
    let m = members(bytes)?;
    if let Some(qmp) = m.get("QMP") {
        return Ok(Incoming::Greeting(parse_greeting(qmp)?));
    }
    if let Some(name) = m.get("event") {
        return Ok(Incoming::Event(event_name(name)));
    }
    let Some(id) = m.get("id") else {
        return Ok(Incoming::Stray(None));
    };
    let Ok(n) = id.get().parse::<u64>() else {
        return Ok(Incoming::Stray(Some(id)));
    };
    // The id's position, from where its text lies within `bytes`.
    let start = id.get().as_ptr() as usize - bytes.as_ptr() as usize;
    let value = start..start + id.get().len();
    let error = m.get("error").is_some();
    let located = ReplyBytes::locate(bytes.clone(), value).unwrap_or_else(|| ReplyBytes::canonical(n, &m));
    Ok(Incoming::Reply(Reply {
        n,
        error,
        bytes: located,
    }))
}

/// A reply to one of qmpmux's numeric ids in a layout QEMU writes,
/// `{"return": V, "id": N}` or `{"id": N, "error": E}` (either member
/// order), recognised by its ends alone: `V` or `E` (which can be
/// megabytes) is neither parsed nor copied. The framer has found the
/// message's end at nesting depth zero, so a `"id": N` member right after
/// the opening brace or right before the closing one belongs to the
/// top-level object; what lies between is QEMU's own JSON writer's output,
/// trusted as the full parse trusts it. Anything else (pretty output, other
/// spacing, other members) takes the full parse.
fn quick_reply(bytes: &Bytes) -> Option<Reply> {
    const FIRST: &[u8] = b"{\"id\": ";
    const LAST: &[u8] = b", \"id\": ";
    let digits = |run: &mut dyn Iterator<Item = &u8>| run.take_while(|b| b.is_ascii_digit()).count();
    // Where the id's digits are, and what follows the opening brace or the
    // id member: the other member's key.
    let (value, other) = if bytes.starts_with(FIRST) {
        let end = FIRST.len() + digits(&mut bytes[FIRST.len()..].iter());
        (FIRST.len()..end, bytes[end..].strip_prefix(b", ")?)
    } else {
        let body = bytes.strip_suffix(b"}")?;
        let start = body.len() - digits(&mut body.iter().rev());
        if !body[..start].ends_with(LAST) {
            return None;
        }
        (start..body.len(), &bytes[1..])
    };
    let error = if other.starts_with(b"\"return\": ") {
        false
    } else if other.starts_with(b"\"error\": ") {
        true
    } else {
        return None;
    };
    // qmpmux's numbers have no leading zero (nor would valid JSON).
    let id = &bytes[value.clone()];
    if id.is_empty() || (id.len() > 1 && id[0] == b'0') {
        return None;
    }
    let n = std::str::from_utf8(id).ok()?.parse().ok()?;
    Some(Reply {
        n,
        error,
        bytes: ReplyBytes::locate(bytes.clone(), value)?,
    })
}

fn parse_greeting(qmp: &RawValue) -> Result<Greeting, ParseError> {
    #[derive(serde::Deserialize)]
    struct Qmp<'a> {
        #[serde(borrow)]
        version: &'a RawValue,
        #[serde(default)]
        capabilities: Vec<String>,
    }
    let q: Qmp<'_> = serde_json::from_str(qmp.get()).map_err(|_| ParseError::Syntax("bad greeting".into()))?;
    Ok(Greeting {
        version: q.version.get().to_owned(),
        oob: q.capabilities.iter().any(|c| c == "oob"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(input: &str) -> ReplyBytes {
        match classify(&Bytes::copy_from_slice(input.as_bytes())).unwrap() {
            Incoming::Reply(r) => r.bytes,
            other => panic!("{other:?}"),
        }
    }

    fn line(input: &str, id: Option<&str>) -> String {
        String::from_utf8(reply(input).line(id).to_vec()).unwrap()
    }

    #[test]
    fn reply_gets_the_client_id_in_qemus_position() {
        assert_eq!(
            line(r#"{"return": {}, "id": 7}"#, Some("\"__qmp#00001\"")),
            "{\"return\": {}, \"id\": \"__qmp#00001\"}\r\n"
        );
        assert_eq!(
            line(
                r#"{"id": 8, "error": {"class": "GenericError", "desc": "x"}}"#,
                Some("{\"a\": [1, null]}")
            ),
            "{\"id\": {\"a\": [1, null]}, \"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n"
        );
    }

    #[test]
    fn id_less_request_gets_an_id_less_reply() {
        assert_eq!(
            line(r#"{"return": {"status": "running"}, "id": 7}"#, None),
            "{\"return\": {\"status\": \"running\"}}\r\n"
        );
        assert_eq!(
            line(r#"{"id": 7, "error": {"class": "C", "desc": "d"}}"#, None),
            "{\"error\": {\"class\": \"C\", \"desc\": \"d\"}}\r\n"
        );
        assert_eq!(line(r#"{"id": 7}"#, None), "{}\r\n");
    }

    #[test]
    fn unusual_layouts_fall_back_to_a_rebuilt_reply() {
        // An escaped key: not how QEMU writes it, but still handled.
        assert_eq!(
            line(r#"{"\u0069d": 3, "return": 1}"#, Some("\"x\"")),
            "{\"id\": \"x\", \"return\": 1}\r\n"
        );
        assert_eq!(line(r#"{"\u0069d": 3, "return": 1}"#, None), "{\"return\": 1}\r\n");
        assert_eq!(line(r#"{"return":1,"id":3}"#, None), "{\"return\":1}\r\n");
    }

    /// The quick path gives exactly what the full parse gives, and leaves
    /// everything else to it.
    #[test]
    fn quick_replies_match_the_full_parse() {
        let full = |s: &str| {
            let b = Bytes::copy_from_slice(s.as_bytes());
            let m = members(&b).unwrap();
            let id = m.get("id").unwrap();
            let start = id.get().as_ptr() as usize - b.as_ptr() as usize;
            let n: u64 = id.get().parse().unwrap();
            let r = ReplyBytes::locate(b.clone(), start..start + id.get().len()).unwrap();
            (n, m.get("error").is_some(), r.line(None), r.line(Some("\"c\"")))
        };
        for s in [
            r#"{"return": {}, "id": 7}"#,
            r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 1234567}"#,
            r#"{"return": [{"id": 5}, "x, \"id\": 6"], "id": 0}"#,
            r#"{"error": {"class": "GenericError", "desc": "no \"id\": 9}"}, "id": 18446744073709551615}"#,
            r#"{"id": 5, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
            r#"{"id": 0, "return": {"id": 1}}"#,
            r#"{"id": 12, "error": {}, "x": 1}"#,
        ] {
            let b = Bytes::copy_from_slice(s.as_bytes());
            let q = quick_reply(&b).unwrap_or_else(|| panic!("not quick: {s}"));
            assert_eq!(
                (q.n, q.error, q.bytes.line(None), q.bytes.line(Some("\"c\""))),
                full(s),
                "{s}"
            );
        }
        for s in [
            r#"{"id": 7,"return": {}}"#,
            r#"{"id": 7, "event": "X"}"#,
            r#"{"id": 07, "error": {}}"#,
            r#"{"id": "7", "error": {}}"#,
            r#"{"return": {},"id": 7}"#,
            r#"{"return": {"id": 7}}"#,
            r#"{"return": {}, "id": "7"}"#,
            r#"{"return": {}, "id": 07}"#,
            r#"{"return": {}, "id": 18446744073709551616}"#,
            r#"{"event": "STOP", "id": 7}"#,
            "{\n    \"return\": {},\n    \"id\": 7\n}",
        ] {
            assert!(quick_reply(&Bytes::copy_from_slice(s.as_bytes())).is_none(), "{s}");
        }
    }

    #[test]
    fn classifies_greeting_events_and_strays() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "x"}, "capabilities": ["oob"]}}"#;
        match classify(&Bytes::from(g)).unwrap() {
            Incoming::Greeting(gr) => {
                assert!(gr.oob);
                assert_eq!(
                    &gr.line(false)[..],
                    &b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"x\"}, \"capabilities\": []}}\r\n"[..]
                );
            }
            other => panic!("{other:?}"),
        }
        let c = |s: &'static str| classify(&Bytes::from(s)).map(|i| format!("{i:?}"));
        assert_eq!(
            c(r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#).unwrap(),
            "Event(\"STOP\")"
        );
        assert_eq!(c(r#"{"event": "A\u0042"}"#).unwrap(), "Event(\"AB\")");
        assert!(c(r#"{"return": {}}"#).unwrap().starts_with("Stray(None)"));
        assert!(c(r#"{"return": {}, "id": "x"}"#).unwrap().starts_with("Stray(Some"));
        assert!(c(r#"{"return": {}, "id": [1]}"#).unwrap().starts_with("Stray(Some"));
        assert!(c("[1]").is_err());
    }
}
