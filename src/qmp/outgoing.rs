//! Everything qmpmux itself writes on the QMP wire, to clients and to QEMU,
//! in QEMU's own layout (`incoming` reads what QEMU writes). Pure code.

use super::json::{qemu_style, write_str};
use bytes::Bytes;
use serde_json::value::RawValue;

/// The vendor prefix of qmpmux's own QMP extensions (QMP spec:
/// "Downstream extension of QMP", `__RFQDN_`).
pub const EXTENSION_PREFIX: &str = "__org.qmpmux_";

/// QEMU's error for `getfd`/`add-fd` with no fd passed (checked on 7.2).
pub const NO_FD_PASSED: &str = "No file descriptor supplied via SCM_RIGHTS";

/// One QMP error class and text, as it goes on the wire.
pub fn error_line(id: Option<&str>, class: &str, desc: &str) -> Bytes {
    let mut out = String::with_capacity(desc.len() + 64);
    match id {
        Some(id) => {
            out.push_str("{\"id\": ");
            out.push_str(id);
            out.push_str(", \"error\": {\"class\": ");
        }
        None => out.push_str("{\"error\": {\"class\": "),
    }
    write_str(&mut out, class);
    out.push_str(", \"desc\": ");
    write_str(&mut out, desc);
    out.push_str("}}\r\n");
    Bytes::from(out)
}

/// `{"return": {}}` with the id, in QEMU's member order.
pub fn empty_return_line(id: Option<&str>) -> Bytes {
    match id {
        Some(id) => Bytes::from(format!("{{\"return\": {{}}, \"id\": {id}}}\r\n")),
        None => Bytes::from_static(b"{\"return\": {}}\r\n"),
    }
}

/// `{"return": value}` with the client's id, both in QEMU's serialisation.
pub fn return_line(id: Option<&RawValue>, value: &serde_json::Value) -> Bytes {
    let ret = RawValue::from_string(value.to_string())
        .map(|r| qemu_style(&r))
        .unwrap_or_default();
    let line = match id.map(qemu_style) {
        Some(id) => format!("{{\"return\": {ret}, \"id\": {id}}}\r\n"),
        None => format!("{{\"return\": {ret}}}\r\n"),
    };
    Bytes::from(line)
}

/// `{"return": RAW}` with the id in QEMU's serialisation; `raw` is JSON
/// text already in QEMU's layout.
pub fn return_raw_line(id: Option<&str>, raw: &str) -> Bytes {
    let line = match id {
        Some(id) => format!("{{\"return\": {raw}, \"id\": {id}}}\r\n"),
        None => format!("{{\"return\": {raw}}}\r\n"),
    };
    Bytes::from(line)
}

/// The member qmpmux adds to events for clients that asked for numbers.
pub const SEQ_MEMBER: &str = "__org.qmpmux_seq";

/// An event line (one JSON object, then `\r\n`) with its sequence number
/// added as the last member: `{..., "__org.qmpmux_seq": N}`.
pub fn numbered(line: &[u8], seq: u64) -> Bytes {
    let end = line.iter().rposition(|&b| b == b'}').unwrap_or(line.len());
    let mut out = Vec::with_capacity(line.len() + 40);
    out.extend_from_slice(&line[..end]);
    let _ = std::io::Write::write_fmt(&mut out, format_args!(", \"{SEQ_MEMBER}\": {seq}}}\r\n"));
    Bytes::from(out)
}

/// An event of qmpmux's own (`__org.qmpmux_NAME`), in QEMU's event format;
/// `data` is a JSON object.
pub fn proxy_event(name: &str, data: &str) -> Bytes {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Bytes::from(format!(
        "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": \"{EXTENSION_PREFIX}{name}\", \"data\": {data}}}\r\n",
        now.as_secs(),
        now.subsec_micros()
    ))
}

/// The upstream negotiation: `qmp_capabilities`, enabling OOB when QEMU
/// offers it, with the id `id`; one line, ending in `\n` like every message
/// qmpmux sends upstream (QEMU does not need it; line-based QMP servers and
/// proxies do).
pub fn capabilities_request(oob: bool, id: &str) -> String {
    let enable = if oob { "[\"oob\"]" } else { "[]" };
    format!(
        "{{\"execute\": \"qmp_capabilities\", \"arguments\": {{\"enable\": {enable}}}, \"id\": {}}}\n",
        json_str(id)
    )
}

/// One of qmpmux's own commands on a new connection (`[[vm.on_connect]]`):
/// `arguments` is JSON text of an object.
pub fn on_connect_request(execute: &str, arguments: Option<&str>, id: &str) -> String {
    let args = arguments.map(|a| format!(", \"arguments\": {a}")).unwrap_or_default();
    format!(
        "{{\"execute\": {}{args}, \"id\": {}}}\n",
        json_str(execute),
        json_str(id)
    )
}

/// What follows `{"id":N` in a `closefd` of `name` sent upstream (compact,
/// as every request qmpmux sends QEMU).
pub fn closefd_tail(name: &str) -> Bytes {
    Bytes::from(format!(
        ",\"execute\":\"closefd\",\"arguments\":{{\"fdname\":{}}}}}",
        json_str(name)
    ))
}

/// `s` as a JSON string, escaped as QEMU escapes.
pub fn json_str(s: &str) -> String {
    let mut out = String::new();
    write_str(&mut out, s);
    out
}

/// The start of a message, for logs: at most 200 bytes, lossily decoded.
pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_events_gain_one_last_member() {
        let line = b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n";
        let n = numbered(line, 42);
        assert_eq!(
            &n[..],
            &b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\", \"__org.qmpmux_seq\": 42}\r\n"[..]
        );
        let v: serde_json::Value = serde_json::from_slice(&n).unwrap();
        assert_eq!(v[SEQ_MEMBER], 42);
        assert_eq!(
            &return_raw_line(Some("\"a\""), "{\"next\": 3}")[..],
            &b"{\"return\": {\"next\": 3}, \"id\": \"a\"}\r\n"[..]
        );
    }

    #[test]
    fn lines_are_in_qemu_s_layout() {
        assert_eq!(
            &error_line(Some("1"), "GenericError", "a \"b\"")[..],
            b"{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"a \\\"b\\\"\"}}\r\n"
        );
        assert_eq!(&empty_return_line(None)[..], b"{\"return\": {}}\r\n");
        let id = RawValue::from_string("{\"b\":1,\"a\":2}".into()).unwrap();
        assert_eq!(
            &return_line(Some(&id), &serde_json::json!({"x": [1]}))[..],
            b"{\"return\": {\"x\": [1]}, \"id\": {\"a\": 2, \"b\": 1}}\r\n"
        );
        assert_eq!(
            capabilities_request(true, "n"),
            "{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}, \"id\": \"n\"}\n"
        );
        assert_eq!(
            &closefd_tail("x")[..],
            br#","execute":"closefd","arguments":{"fdname":"x"}}"#
        );
        let ev = proxy_event("UPSTREAM_LOST", "{}");
        let v: serde_json::Value = serde_json::from_slice(&ev).unwrap();
        assert_eq!(v["event"], "__org.qmpmux_UPSTREAM_LOST");
        assert!(ev.ends_with(b"}\r\n"));
        assert_eq!(lossy(&[b'x'; 300]).len(), 200);
    }
}
