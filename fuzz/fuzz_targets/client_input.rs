//! Arbitrary bytes from a client, in arbitrary chunks: framing, parsing and
//! request handling never panic, never buffer past the limit, and whatever
//! they produce is valid QMP.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qmpmux::policy::{Glob, Policy};
use qmpmux::qmp::framing::{JsonFramer, Limits};
use qmpmux::qmp::request::{decide, Caps, Decision, Session};
use tokio_util::codec::Decoder;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut framer = JsonFramer::new(Limits {
        max_message: MAX,
        max_depth: 64,
    });
    let mut session = Session::default();
    // A restricted policy, so that refusals are exercised too.
    let policy = Policy {
        allow: vec![Glob::new("query-*"), Glob::new("transaction")],
        deny: vec![Glob::new("quit")],
    };
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(frame) = framer.decode(&mut buf).expect("decode never fails") {
            match decide(frame, &mut session, Caps::default(), |c, a| policy.admit(c, a)) {
                Decision::Local(line) => {
                    assert!(line.ends_with(b"\r\n"));
                    serde_json::from_slice::<serde_json::Value>(&line).expect("local replies are JSON");
                }
                Decision::Denied { line, .. } => {
                    serde_json::from_slice::<serde_json::Value>(&line).expect("refusals are JSON");
                }
                Decision::Forward(fwd) => {
                    let mut msg = b"{\"id\": 1".to_vec();
                    msg.extend_from_slice(&fwd.tail);
                    serde_json::from_slice::<serde_json::Value>(&msg).expect("forwarded requests are JSON");
                }
            }
        }
        assert!(buf.len() <= MAX + chunk + 1, "framer buffered {} bytes", buf.len());
    }
});
