//! Arbitrary bytes as the state a previous qmpmux handed over: decoding
//! never panics; as the JSON inside a well-framed state (past the
//! checksum), whatever decodes encodes and decodes back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmpmux::handover::state::{decode, encode, frame};

fuzz_target!(|data: &[u8]| {
    let _ = decode(data);
    if let Ok(state) = decode(&frame(data)) {
        assert_eq!(decode(&encode(&state)).as_ref(), Ok(&state));
    }
});
