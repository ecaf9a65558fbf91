//! Messages from QEMU: greeting, replies to correlate, events to broadcast.

use super::json::{members, write_str, Members, ParseError};
use bytes::Bytes;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// One message read from the upstream QMP socket.
#[derive(Debug)]
pub enum Incoming<'a> {
    Greeting(Greeting),
    /// A reply carrying one of our correlation ids.
    Reply(Reply<'a>),
    /// An async event; forwarded byte for byte.
    Event,
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

#[derive(Debug)]
pub struct Reply<'a> {
    pub n: u64,
    pub client_id: Option<&'a RawValue>,
    members: Members<'a>,
}

impl Reply<'_> {
    /// The reply as the client must see it: our correlation wrapper replaced
    /// by the client's own id (as QEMU re-serialised it), or no id at all.
    pub fn client_line(&self) -> Bytes {
        let size: usize = self.members.0.iter().map(|(k, v)| k.len() + v.get().len() + 6).sum();
        let mut out = String::with_capacity(size + 4);
        out.push('{');
        let mut first = true;
        for (k, v) in &self.members.0 {
            let v = if k == "id" {
                match self.client_id {
                    Some(id) => id,
                    None => continue,
                }
            } else {
                v
            };
            if !first {
                out.push_str(", ");
            }
            first = false;
            write_str(&mut out, k);
            out.push_str(": ");
            out.push_str(v.get());
        }
        out.push_str("}\r\n");
        Bytes::from(out)
    }

    /// Whether QEMU answered with an error (for counting and logs).
    pub fn is_error(&self) -> bool {
        self.members.get("error").is_some()
    }
}

/// Classifies one framed upstream message.
pub fn classify(bytes: &[u8]) -> Result<Incoming<'_>, ParseError> {
    let m = members(bytes)?;
    if let Some(qmp) = m.get("QMP") {
        return Ok(Incoming::Greeting(parse_greeting(qmp)?));
    }
    if m.get("event").is_some() {
        return Ok(Incoming::Event);
    }
    let Some(id) = m.get("id") else {
        return Ok(Incoming::Stray(None));
    };
    match parse_corr_id(id) {
        Some((n, client_id)) => Ok(Incoming::Reply(Reply {
            n,
            client_id,
            members: m,
        })),
        None => Ok(Incoming::Stray(Some(id))),
    }
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

/// Our correlation ids are `[N]` or `[N, client id]`.
fn parse_corr_id(id: &RawValue) -> Option<(u64, Option<&RawValue>)> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<(u64, Option<&'de RawValue>)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a correlation id")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let Some(n) = seq.next_element::<u64>()? else {
                return Ok(None);
            };
            let client: Option<&'de RawValue> = seq.next_element()?;
            if seq.next_element::<de::IgnoredAny>()?.is_some() {
                return Ok(None);
            }
            Ok(Some((n, client)))
        }
    }
    let mut de = serde_json::Deserializer::from_str(id.get());
    de.deserialize_seq(V).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(input: &str) -> String {
        match classify(input.as_bytes()).unwrap() {
            Incoming::Reply(r) => String::from_utf8(r.client_line().to_vec()).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reply_gets_the_client_id_back_in_qemus_position() {
        assert_eq!(
            line(r#"{"return": {}, "id": [7, "__qmp#00001"]}"#),
            "{\"return\": {}, \"id\": \"__qmp#00001\"}\r\n"
        );
        assert_eq!(
            line(r#"{"id": [8, {"a": [1, null]}], "error": {"class": "GenericError", "desc": "x"}}"#),
            "{\"id\": {\"a\": [1, null]}, \"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n"
        );
        assert_eq!(
            line(r#"{"id": [9, null], "return": 1}"#),
            "{\"id\": null, \"return\": 1}\r\n"
        );
    }

    #[test]
    fn id_less_request_gets_an_id_less_reply() {
        assert_eq!(
            line(r#"{"return": {"status": "running"}, "id": [7]}"#),
            "{\"return\": {\"status\": \"running\"}}\r\n"
        );
        assert_eq!(
            line(r#"{"id": [7], "error": {"class": "C", "desc": "d"}}"#),
            "{\"error\": {\"class\": \"C\", \"desc\": \"d\"}}\r\n"
        );
    }

    #[test]
    fn classifies_greeting_events_and_strays() {
        let g = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "x"}, "capabilities": ["oob"]}}"#;
        match classify(g.as_bytes()).unwrap() {
            Incoming::Greeting(gr) => {
                assert!(gr.oob);
                assert_eq!(
                    &gr.line(false)[..],
                    &b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"x\"}, \"capabilities\": []}}\r\n"[..]
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#).unwrap(),
            Incoming::Event
        ));
        assert!(matches!(classify(br#"{"return": {}}"#).unwrap(), Incoming::Stray(None)));
        assert!(matches!(
            classify(br#"{"return": {}, "id": "x"}"#).unwrap(),
            Incoming::Stray(Some(_))
        ));
        assert!(matches!(
            classify(br#"{"return": {}, "id": [1, 2, 3]}"#).unwrap(),
            Incoming::Stray(Some(_))
        ));
        assert!(classify(b"[1]").is_err());
    }
}
