//! Arbitrary payloads of NATS command requests (`<prefix>.<vm>.execute`),
//! read as the commander reads them: one message or a refusal, then the
//! checks a socket client's request gets, against a `[nats]` policy, then
//! the arguments of qmpmux's own commands. Never a panic; every answer
//! qmpmux writes itself is valid JSON; what goes to QEMU is too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmpmux::policy::{Glob, Policy};
use qmpmux::qmp::extensions;
use qmpmux::qmp::outgoing::error_line;
use qmpmux::qmp::request::{decide, Caps, Decision, Session};

fuzz_target!(|data: &[u8]| {
    let Some(frame) = qmpmux::nats_request_frame(data) else {
        return;
    };
    // Every request stands alone: negotiated, no out-of-band.
    let mut session = Session {
        negotiated: true,
        enabled: Caps::default(),
    };
    let policy = Policy {
        allow: vec![Glob::new("query-*"), Glob::new("stop"), Glob::new("__org.qmpmux_*")],
        deny: vec![Glob::new("__org.qmpmux_subscribe")],
    };
    match decide(frame, &mut session, Caps::default(), |c, a| policy.admit(c, a)) {
        Decision::Local(line) | Decision::Denied { line, .. } => json(&line),
        Decision::Forward(fwd) => {
            if extensions::is_extension(&fwd.command) {
                if let Err(r) = extensions::parse(&fwd.command, fwd.ext_arguments.as_deref()) {
                    json(&error_line(Some("1"), r.class, &r.desc));
                }
            } else {
                let mut msg = b"{\"id\": 1".to_vec();
                msg.extend_from_slice(&fwd.tail);
                serde_json::from_slice::<serde_json::Value>(&msg).expect("forwarded requests are JSON");
            }
        }
    }
});

fn json(line: &[u8]) {
    assert!(line.ends_with(b"\r\n"));
    serde_json::from_slice::<serde_json::Value>(line).expect("qmpmux's answers are JSON");
}
