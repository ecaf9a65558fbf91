//! Arbitrary bytes from "QEMU", framed as qmpmux frames them: classification
//! never panics, and a reply rewritten for a client (its own id put in, or
//! none) is valid JSON whenever QEMU's message was.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qmpmux::qmp::framing::{Frame, JsonFramer, Limits};
use qmpmux::qmp::incoming::{classify, Incoming};
use qmpmux::qmp::json::compact_pretty;
use tokio_util::codec::Decoder;

/// Ids as clients send them, already in QEMU's serialisation.
const IDS: [Option<&str>; 3] = [Some("\"__qmp#00001\""), Some("[1, {\"a\": null}]"), None];

fuzz_target!(|data: &[u8]| {
    let mut framer = JsonFramer::new(Limits {
        max_message: 1 << 16,
        max_depth: 64,
    });
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = framer.decode_eof(&mut buf) {
        let Frame::Message(msg) = frame else { continue };
        let valid = serde_json::from_slice::<serde_json::Value>(&msg).is_ok();
        if valid {
            let compacted = compact_pretty(&msg);
            serde_json::from_slice::<serde_json::Value>(&compacted).expect("compaction keeps JSON valid");
        }
        if let Ok(Incoming::Reply(reply)) = classify(&msg) {
            for id in IDS {
                let line = reply.bytes.line(id);
                assert!(line.ends_with(b"\r\n"));
                if valid {
                    serde_json::from_slice::<serde_json::Value>(&line).expect("a client's reply line is JSON");
                }
            }
        }
    }
});
