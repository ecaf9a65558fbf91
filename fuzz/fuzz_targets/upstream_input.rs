//! Arbitrary messages from "QEMU": classification never panics, and a reply
//! rewritten for a client is valid JSON whenever the input was.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmpmux::qmp::incoming::{classify, Incoming};
use qmpmux::qmp::json::compact_pretty;

fuzz_target!(|data: &[u8]| {
    let valid = serde_json::from_slice::<serde_json::Value>(data).is_ok();
    let compacted = compact_pretty(data);
    if valid {
        serde_json::from_slice::<serde_json::Value>(&compacted).expect("compaction keeps JSON valid");
    }
    if let Ok(Incoming::Reply(reply)) = classify(data) {
        let line = reply.client_line();
        serde_json::from_slice::<serde_json::Value>(&line).expect("client line is JSON");
    }
});
