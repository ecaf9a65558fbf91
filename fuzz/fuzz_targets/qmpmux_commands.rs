//! Arguments of qmpmux's own commands (`__org.qmpmux_*`) from a client:
//! checked directly and through the request path a socket client takes
//! (framing, `decide`, then `extensions::parse`). Never a panic; accepted
//! arguments are within their documented bounds; a refusal is a QMP error
//! class with a description that makes a valid error line.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use qmpmux::qmp::extensions::{self, Extension, Refusal, MAX_LEASE_SECONDS};
use qmpmux::qmp::framing::{JsonFramer, Limits};
use qmpmux::qmp::outgoing::{error_line, EXTENSION_PREFIX};
use qmpmux::qmp::request::{decide, Caps, Decision, Session};
use serde_json::value::RawValue;
use tokio_util::codec::Decoder;

const NAMES: [&str; 6] = [
    "query-proxy",
    "subscribe",
    "query-events",
    "lease",
    "release",
    "no-such-command",
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, args)) = data.split_first() else {
        return;
    };
    let command = format!("{EXTENSION_PREFIX}{}", NAMES[usize::from(which) % NAMES.len()]);
    // As the session gets them: any JSON text.
    if let Ok(Ok(raw)) = std::str::from_utf8(args).map(serde_json::from_str::<&RawValue>) {
        check(&command, extensions::parse(&command, Some(raw)));
    }
    // As a client sends them: `arguments` of a request, whatever the bytes.
    let mut msg = format!("{{\"execute\": \"{command}\", \"id\": 7, \"arguments\": ").into_bytes();
    msg.extend_from_slice(args);
    msg.push(b'}');
    let mut framer = JsonFramer::new(Limits {
        max_message: 1 << 16,
        max_depth: 64,
    });
    let mut buf = BytesMut::from(&msg[..]);
    let mut session = Session {
        negotiated: true,
        enabled: Caps::default(),
    };
    while let Ok(Some(frame)) = framer.decode_eof(&mut buf) {
        match decide(frame, &mut session, Caps::default(), |_, _| Ok(())) {
            Decision::Forward(fwd) if extensions::is_extension(&fwd.command) => {
                check(
                    &fwd.command,
                    extensions::parse(&fwd.command, fwd.ext_arguments.as_deref()),
                );
            }
            Decision::Local(line) | Decision::Denied { line, .. } => {
                json(&line);
            }
            Decision::Forward(_) => {}
        }
    }
});

fn check(command: &str, result: Result<Extension, Refusal>) {
    match result {
        Ok(Extension::Lease { seconds, .. }) => assert!((1..=MAX_LEASE_SECONDS).contains(&seconds)),
        Ok(Extension::QueryEvents { limit, .. }) => assert!(limit >= 1),
        Ok(Extension::Subscribe(s)) => {
            assert!(s.events.iter().flatten().all(|p| !p.is_empty()), "{s:?}");
        }
        Ok(_) => assert!(!command.ends_with("no-such-command")),
        Err(r) => {
            assert!(["GenericError", "CommandNotFound"].contains(&r.class), "{r:?}");
            let line = error_line(Some("7"), r.class, &r.desc);
            let v = json(&line);
            assert_eq!(v["error"]["desc"], r.desc.as_str());
        }
    }
}

fn json(line: &[u8]) -> serde_json::Value {
    assert!(line.ends_with(b"\r\n"));
    serde_json::from_slice(line).expect("qmpmux's lines are JSON")
}
