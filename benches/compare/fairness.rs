//! Section 7, fair turns: how long client B's one command waits behind
//! client A's burst, on two monitors of one QEMU (QEMU's own turns) and
//! through one qmpmux socket; then the same between two NATS requesters
//! (`[nats] commands`), each on a lane of its own, and sharing one (as all
//! NATS requesters of a VM did before lanes).

use crate::clients::{is_event, is_ok, open, Conn, CAPS, CAPS_OOB, CMD};
use crate::common::binary::Binary;
use crate::common::config::config_toml;
use crate::common::nats::NatsServer;
use crate::common::qemu::{Monitor, Qemu};
use crate::common::STEP;
use crate::stats::{median_f, ms, ratio};
use crate::{progress, Plan, Rig};
use futures_util::stream::{FuturesUnordered, StreamExt};
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
    let nats = run_nats(plan, rt, rig);
    json!({
        "nats": nats,
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

/// The NATS subject of the VM `fair` on host `bench`.
const NATS_EXECUTE: &str = "qmpmux.bench.fair.execute";

/// Section 7 over NATS: a QEMU of its own behind a qmpmux with `[nats]
/// commands = true`; requester A pipelines [`FAIR_BURST`]
/// `query-qmp-schema`, [`FAIR_DELAY`] later requester B sends one
/// `query-status`, from a connection of its own (a lane of its own) or
/// from A's (A's lane, as every NATS requester shared one before lanes).
fn run_nats(plan: &Plan, rt: &Runtime, rig: &Rig) -> Value {
    let Some(nats) = rt.block_on(NatsServer::start_or_skip()) else {
        out!("   over NATS: skipped (no nats-server)");
        return json!(null);
    };
    progress("fair turns over NATS");
    let up = rig.path("qemu-fn.sock");
    let listen = rig.path("mux-fn.sock");
    let _qemu = Qemu::start_blocking(&[Monitor::Serve(&up)], &rig.path("qemu-fn.log"));
    let mut config = config_toml(&[("fair", &up, &listen)], 64);
    config += &format!(
        "[nats]\nservers = [\"{}\"]\nhost = \"bench\"\ncommands = true\n",
        nats.url()
    );
    let _mux = Binary::start(
        &rig.path("qmpmux-fn.toml"),
        &config,
        &rig.path("qmpmux-fn.log"),
        &[&listen],
        None,
    );
    let (own, shared) = rt.block_on(async {
        let connect = || async {
            async_nats::ConnectOptions::new()
                .request_timeout(Some(STEP * 6))
                .connect(nats.url())
                .await
                .expect("connect to nats-server")
        };
        let (a, b) = (connect().await, connect().await);
        wait_commands(&a).await;
        let (mut own, mut shared) = (Vec::new(), Vec::new());
        for _ in 0..plan.fair_rounds {
            own.push(nats_round(&a, &b).await);
            shared.push(nats_round(&a, &a).await);
        }
        (own, shared)
    });
    let med = |v: &[FairRound], f: fn(&FairRound) -> u64| median_f(&v.iter().map(|r| f(r) as f64).collect::<Vec<_>>());
    let (bo, bs) = (med(&own, |r| r.b_wait), med(&shared, |r| r.b_wait));
    let (ao, as_) = (med(&own, |r| r.a_burst), med(&shared, |r| r.a_burst));
    out!(
        "   over NATS: requester A pipelines {FAIR_BURST} query-qmp-schema; {} ms later requester B sends one query-status",
        FAIR_DELAY.as_millis()
    );
    out!("   own lane: B on a NATS connection of its own; shared lane: B on A's connection (one lane, as all NATS requesters were before lanes)");
    out!(
        "   {:>5}{:>20}{:>23}{:>20}{:>23}",
        "round",
        "B wait own lane ms",
        "B wait shared lane ms",
        "A burst own ms",
        "A burst shared ms"
    );
    for (i, (o, s)) in own.iter().zip(&shared).enumerate() {
        out!(
            "   {:>5}{:>20.1}{:>23.1}{:>20.1}{:>23.1}",
            i + 1,
            ms(o.b_wait),
            ms(s.b_wait),
            ms(o.a_burst),
            ms(s.a_burst)
        );
    }
    out!(
        "   {:>5}{:>20.1}{:>23.1}{:>20.1}{:>23.1}",
        "p50",
        bo / 1e6,
        bs / 1e6,
        ao / 1e6,
        as_ / 1e6
    );
    out!(
        "   => with lanes B waits {:.2}x as long as sharing A's lane",
        ratio(bo, bs)
    );
    let rounds = |v: &[FairRound]| {
        v.iter()
            .map(|r| json!({"b_wait_ms": ms(r.b_wait), "a_burst_ms": ms(r.a_burst)}))
            .collect::<Vec<_>>()
    };
    json!({
        "own_lane": rounds(&own), "shared_lane": rounds(&shared),
        "b_wait_p50_ms": {"own_lane": bo / 1e6, "shared_lane": bs / 1e6},
        "a_burst_p50_ms": {"own_lane": ao / 1e6, "shared_lane": as_ / 1e6},
        "b_wait_ratio": ratio(bo, bs),
    })
}

/// Waits until qmpmux answers commands over NATS (it connects, then
/// serves the VM, in the background).
async fn wait_commands(c: &async_nats::Client) {
    let deadline = Instant::now() + STEP * 3;
    loop {
        let r = tokio::time::timeout(Duration::from_millis(500), c.request(NATS_EXECUTE, CMD.to_vec().into())).await;
        if matches!(r, Ok(Ok(m)) if m.payload.starts_with(b"{\"return\"")) {
            return;
        }
        assert!(Instant::now() < deadline, "qmpmux does not answer over NATS");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One round over NATS: A's burst from `a`, B's command from `b`.
async fn nats_round(a: &async_nats::Client, b: &async_nats::Client) -> FairRound {
    let a_start = Instant::now();
    let mut burst: FuturesUnordered<_> = (0..FAIR_BURST)
        .map(|_| a.request(NATS_EXECUTE, SCHEMA.to_vec().into()))
        .collect();
    let a_task = async {
        let mut bytes = 0;
        while let Some(r) = burst.next().await {
            let m = r.expect("A's reply");
            assert!(
                m.payload.starts_with(b"{\"return\""),
                "A: {:?}",
                &m.payload[..m.payload.len().min(200)]
            );
            bytes += m.payload.len();
        }
        (a_start.elapsed(), bytes)
    };
    let b_task = async {
        tokio::time::sleep(FAIR_DELAY).await;
        let b_start = Instant::now();
        let m = b.request(NATS_EXECUTE, CMD.to_vec().into()).await.expect("B's reply");
        let b_wait = b_start.elapsed();
        assert!(is_ok(&String::from_utf8_lossy(&m.payload)), "B: {:?}", m.payload);
        b_wait
    };
    let ((a_burst, a_bytes), b_wait) = tokio::join!(a_task, b_task);
    FairRound {
        b_wait: b_wait.as_nanos() as u64,
        a_burst: a_burst.as_nanos() as u64,
        a_bytes,
    }
}
