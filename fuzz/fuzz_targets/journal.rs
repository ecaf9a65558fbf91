//! Arbitrary bytes as an event journal handed over by a previous qmpmux:
//! recovery never panics, returns numbers one after the other ending just
//! before the next one, and a journal adopted from them takes the next
//! event and gives it back. The input is tried as a journal as it is, and
//! (since crcs are out of a fuzzer's reach and a real journal is over
//! 64 KiB) as a script: appends, greetings, leftovers and stray bytes
//! written over a small journal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmpmux::events::journal::{recover, Recovered, Ring, META_SIZE, MIN_CAPACITY};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = recover(data) {
        check(&r);
    }
    let Some((&size, script)) = data.split_first() else {
        return;
    };
    let capacity = MIN_CAPACITY + usize::from(size) * 8;
    let Ok(mut ring) = Ring::create(vec![0; META_SIZE + capacity], 1) else {
        return;
    };
    let mut image = None;
    for op in script.chunks(4) {
        let &[what, a, b, c] = op else { break };
        let n = usize::from(u16::from_le_bytes([a, b]));
        match what % 8 {
            0..=3 => ring.append(ring.next(), &"N".repeat(usize::from(c)), &vec![b'x'; n]),
            4 => ring.append(ring.next() + u64::from(c), "JUMP", b"{}\r\n"),
            5 => drop(ring.set_greeting((c % 2 == 0).then_some(&vec![b'g'; n][..]))),
            6 => drop(ring.set_leftover(&vec![b'l'; n])),
            _ => {
                // A stray byte: from here on the journal is only read.
                let bytes = image.get_or_insert_with(|| ring.as_bytes().to_vec());
                let len = bytes.len();
                let at = if c % 2 == 0 {
                    n % 64
                } else {
                    META_SIZE + n % (len - META_SIZE)
                };
                bytes[at] = c;
            }
        }
    }
    let image = image.unwrap_or_else(|| ring.as_bytes().to_vec());
    let Ok(r) = recover(&image) else { return };
    check(&r);
    let Some(after_next) = r.next.checked_add(1) else {
        return;
    };
    let (mut ring, again) = Ring::adopt(image).expect("what recovers is adopted");
    assert_eq!(seqs(&again), seqs(&r));
    ring.append(r.next, "E", b"{\"event\": \"E\"}\r\n");
    let after = recover(ring.as_bytes()).expect("an adopted journal recovers");
    check(&after);
    assert!(!after.truncated, "an adopted journal is repaired");
    assert_eq!(after.events.last().map(|e| e.seq), Some(r.next));
    assert_eq!(after.next, after_next);
});

fn check(r: &Recovered) {
    for pair in r.events.windows(2) {
        assert_eq!(pair[0].seq.checked_add(1), Some(pair[1].seq));
    }
    if let Some(last) = r.events.last() {
        assert_eq!(last.seq.checked_add(1), Some(r.next));
    }
}

fn seqs(r: &Recovered) -> Vec<u64> {
    r.events.iter().map(|e| e.seq).collect()
}
