//! Section 7, fair turns: how long client B's one command waits behind
//! client A's burst, on two monitors of one QEMU (QEMU's own turns) and
//! through one qmpmux socket.

use crate::clients::{is_event, is_ok, open, Conn, CAPS, CAPS_OOB, CMD};
use crate::common::qemu::{Monitor, Qemu};
use crate::common::STEP;
use crate::stats::{median_f, ms, ratio};
use crate::{progress, Plan, Rig};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Commands client A pipelines, and how long after them client B sends its
/// one command.
const FAIR_BURST: usize = 64;
const FAIR_DELAY: Duration = Duration::from_millis(20);
const SCHEMA: &[u8] = b"{\"execute\": \"query-qmp-schema\", \"id\": 1}";

struct FairRound {
    /// B's command: sent to its reply, ns.
    b_wait: u64,
    /// A's burst: sent to its last reply, ns.
    a_burst: u64,
    /// Bytes of A's replies (all of them).
    a_bytes: usize,
}

/// Measures and prints section 7: direct on a QEMU with two monitors,
/// then via `rig`'s qmpmux, round after round.
pub fn run(plan: &Plan, rt: &Runtime, rig: &Rig) -> Value {
    progress("fair turns");
    let (f1, f2) = (rig.path("qemu-f1.sock"), rig.path("qemu-f2.sock"));
    let _qemu_f = Qemu::start_blocking(&[Monitor::Serve(&f1), Monitor::Serve(&f2)], &rig.path("qemu-f.log"));
    let mut direct = Vec::new();
    let mut via = Vec::new();
    for _ in 0..plan.fair_rounds {
        direct.push(rt.block_on(fair_round(&f1, &f2, CAPS_OOB)));
        via.push(rt.block_on(fair_round(&rig.mux_qemu, &rig.mux_qemu, CAPS)));
    }
    let med = |v: &[FairRound], f: fn(&FairRound) -> u64| median_f(&v.iter().map(|r| f(r) as f64).collect::<Vec<_>>());
    let (bd, bv) = (med(&direct, |r| r.b_wait), med(&via, |r| r.b_wait));
    let (ad, av) = (med(&direct, |r| r.a_burst), med(&via, |r| r.a_burst));
    print(&direct, &via, (bd, bv), (ad, av));
    let rounds = |v: &[FairRound]| {
        v.iter()
            .map(|r| json!({"b_wait_ms": ms(r.b_wait), "a_burst_ms": ms(r.a_burst)}))
            .collect::<Vec<_>>()
    };
    json!({
        "burst": FAIR_BURST, "delay_ms": FAIR_DELAY.as_millis() as u64,
        "reply_bytes": direct[0].a_bytes / FAIR_BURST,
        "direct": rounds(&direct), "via_qmpmux": rounds(&via),
        "b_wait_p50_ms": {"direct": bd / 1e6, "via_qmpmux": bv / 1e6},
        "a_burst_p50_ms": {"direct": ad / 1e6, "via_qmpmux": av / 1e6},
        "b_wait_ratio": ratio(bv, bd), "a_burst_ratio": ratio(av, ad),
    })
}

/// `(bd, bv)`: B's median wait direct and via qmpmux, ns; `(ad, av)` the
/// same for A's burst.
fn print(direct: &[FairRound], via: &[FairRound], (bd, bv): (f64, f64), (ad, av): (f64, f64)) {
    out!(
        "\n7. Fair turns: client A pipelines {FAIR_BURST} query-qmp-schema ({} KB of replies each, read as they come); {} ms later client B sends one query-status",
        direct[0].a_bytes / FAIR_BURST / 1000,
        FAIR_DELAY.as_millis()
    );
    out!("   direct: A and B on two -qmp monitors of one QEMU (QEMU's own turns between monitors); via qmpmux: both on one qmpmux socket, one upstream monitor (QEMU identical)");
    out!(
        "   {:>5}{:>18}{:>22}{:>20}{:>24}",
        "round",
        "B wait direct ms",
        "B wait via qmpmux ms",
        "A burst direct ms",
        "A burst via qmpmux ms"
    );
    for (i, (d, v)) in direct.iter().zip(via).enumerate() {
        out!(
            "   {:>5}{:>18.1}{:>22.1}{:>20.1}{:>24.1}",
            i + 1,
            ms(d.b_wait),
            ms(v.b_wait),
            ms(d.a_burst),
            ms(v.a_burst)
        );
    }
    out!(
        "   {:>5}{:>18.1}{:>22.1}{:>20.1}{:>24.1}",
        "p50",
        bd / 1e6,
        bv / 1e6,
        ad / 1e6,
        av / 1e6
    );
    out!(
        "   => B waits {:.2}x as long through qmpmux as on its own QEMU monitor (goal <= 2x); A's burst takes {:.2}x",
        ratio(bv, bd),
        ratio(av, ad)
    );
}

/// One round: A (at `a_path`) pipelines [`FAIR_BURST`] `query-qmp-schema`
/// and reads the replies as they come; [`FAIR_DELAY`] later B (at
/// `b_path`) sends one `query-status`.
async fn fair_round(a_path: &Path, b_path: &Path, caps: &'static [u8]) -> FairRound {
    let Conn {
        reader: mut a_reader,
        writer: mut a_writer,
    } = open(a_path, caps).await.expect("client A");
    let mut b = open(b_path, caps).await.expect("client B");
    let burst = SCHEMA.repeat(FAIR_BURST);
    let a_start = Instant::now();
    a_writer.write_all(&burst).await.expect("A sends");
    let a = tokio::spawn(async move {
        let (mut got, mut bytes) = (0, 0);
        let mut line = String::new();
        while got < FAIR_BURST {
            line.clear();
            let n = tokio::time::timeout(STEP * 6, a_reader.read_line(&mut line))
                .await
                .expect("A's replies")
                .expect("A reads");
            assert!(n > 0, "A: EOF");
            if !is_event(&line) {
                // (The schema itself mentions "error": look at the start.)
                assert!(line.starts_with("{\"return\""), "A: {}", &line[..line.len().min(200)]);
                got += 1;
                bytes += n;
            }
        }
        (a_start.elapsed(), bytes, a_writer)
    });
    tokio::time::sleep(FAIR_DELAY).await;
    let b_start = Instant::now();
    b.writer.write_all(CMD).await.expect("B sends");
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(STEP * 6, b.reader.read_line(&mut line))
            .await
            .expect("B's reply")
            .expect("B reads");
        assert!(n > 0, "B: EOF");
        if !is_event(&line) {
            break;
        }
    }
    let b_wait = b_start.elapsed();
    assert!(is_ok(&line), "B: {line}");
    let (a_burst, a_bytes, _w) = a.await.expect("A task");
    FairRound {
        b_wait: b_wait.as_nanos() as u64,
        a_burst: a_burst.as_nanos() as u64,
        a_bytes,
    }
}
