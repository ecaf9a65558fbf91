//! Section 1, sequential round trips: one client, one command in flight,
//! direct QEMU against qmpmux against two relays (a bare tokio one and
//! socat), on a quiet machine and with one CPU kept busy.

use crate::clients::{SyncClient, CAPS, CAPS_OOB};
use crate::common::qemu::{Monitor, Qemu};
use crate::floors::Floor;
use crate::stats::{pct, ratio, us};
use crate::{progress, Plan, Rig};
use serde_json::{json, Value};
use std::time::Instant;

struct LatStats {
    p50: u64,
    p99: u64,
    mean: f64,
    errors: u64,
}

fn lat_stats(mut v: Vec<u64>, errors: u64) -> LatStats {
    v.sort_unstable();
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    LatStats {
        p50: pct(&v, 50.0),
        p99: pct(&v, 99.0),
        mean,
        errors,
    }
}

/// Starts the relay floor (on its own QEMU), measures and prints section 1.
pub fn run(plan: &Plan, rig: &Rig) -> Value {
    let (qr, relay) = (rig.path("qemu-r.sock"), rig.path("relay.sock"));
    let _qemu_r = Qemu::start_blocking(&[Monitor::Serve(&qr)], &rig.path("qemu-r.log"));
    let _relay = Floor::start("--child-relay", &relay, &qr);
    let (qs, socat) = (rig.path("qemu-s.sock"), rig.path("socat.sock"));
    let _qemu_s = Qemu::start_blocking(&[Monitor::Serve(&qs)], &rig.path("qemu-s.log"));
    let _socat = Floor::socat(&socat, &qs);
    progress("sequential round trips");
    let mut clients = [
        SyncClient::open(&rig.qa, CAPS_OOB).expect("direct client"),
        SyncClient::open(&rig.mux_qemu, CAPS).expect("qmpmux client"),
        SyncClient::open(&relay, CAPS_OOB).expect("relay client"),
        SyncClient::open(&socat, CAPS_OOB).expect("socat client"),
    ];
    for c in clients.iter_mut() {
        for _ in 0..plan.lat_warmup {
            c.cmd().expect("warm-up round trip");
        }
    }
    let quiet = measure(plan, &mut clients);
    print(plan, &quiet, "");
    // The same again with one of the machine's CPUs kept busy by a
    // spinning process: wake-ups then find that CPU taken.
    progress("sequential round trips, one CPU busy");
    let loaded = {
        let _spin = Floor::spinner();
        measure(plan, &mut clients)
    };
    print(plan, &loaded, ", one CPU kept busy by a spinning process");
    let mut j = quiet.json(plan);
    j["loaded"] = loaded.json(plan);
    j
}

/// One measurement of the four paths.
struct Paths {
    /// Direct, via qmpmux, bare relay, socat.
    d: LatStats,
    m: LatStats,
    f: LatStats,
    so: LatStats,
}

impl Paths {
    /// What a path adds over direct QEMU at p50, in µs.
    fn added(&self, s: &LatStats) -> f64 {
        us(s.p50) - us(self.d.p50)
    }

    fn json(&self, plan: &Plan) -> Value {
        let (d, m, f, so) = (&self.d, &self.m, &self.f, &self.so);
        let j = |s: &LatStats| json!({"p50_us": us(s.p50), "p99_us": us(s.p99), "mean_us": s.mean / 1000.0, "errors": s.errors});
        json!({
            "rounds": plan.lat_rounds, "per_round": plan.lat_per_round,
            "direct": j(d), "qmpmux": j(m), "bare_relay": j(f),
            "ratio_p50": ratio(m.p50 as f64, d.p50 as f64),
            "ratio_p99": ratio(m.p99 as f64, d.p99 as f64),
            "ratio_mean": ratio(m.mean, d.mean),
            "ratio_relay_p50": ratio(f.p50 as f64, d.p50 as f64),
            "ratio_qmpmux_vs_relay_p50": ratio(m.p50 as f64, f.p50 as f64),
            "socat": j(so),
            "added_us_p50": {"qmpmux": self.added(m), "bare_relay": self.added(f), "socat": self.added(so)},
            "added_ratio_qmpmux_vs_socat": (self.added(so) > 0.0).then(|| self.added(m) / self.added(so)),
        })
    }
}

fn measure(plan: &Plan, clients: &mut [SyncClient; 4]) -> Paths {
    let mut samples = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    let mut errors = [0u64; 4];
    for round in 0..plan.lat_rounds {
        let order = [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]][round % 4];
        for which in order {
            let c = &mut clients[which];
            for _ in 0..plan.lat_per_round {
                let t = Instant::now();
                let ok = c.cmd().expect("round trip");
                samples[which].push(t.elapsed().as_nanos() as u64);
                errors[which] += u64::from(!ok);
            }
        }
    }
    let [sd, sm, sr, ss] = samples;
    Paths {
        d: lat_stats(sd, errors[0]),
        m: lat_stats(sm, errors[1]),
        f: lat_stats(sr, errors[2]),
        so: lat_stats(ss, errors[3]),
    }
}

fn print(plan: &Plan, p: &Paths, load: &str) {
    let (d, m, f, so) = (&p.d, &p.m, &p.f, &p.so);
    out!(
        "\n1. Sequential query-status round trips, one client, 1 in flight ({} rounds x {}, rotating which path goes first{load})",
        plan.lat_rounds,
        plan.lat_per_round
    );
    out!(
        "   {:<22}{:>10}{:>10}{:>10}{:>8}",
        "path",
        "p50 us",
        "p99 us",
        "mean us",
        "errors"
    );
    for (name, s) in [
        ("direct QEMU", d),
        ("via qmpmux", m),
        ("floor: bare relay", f),
        ("floor: socat relay", so),
    ] {
        out!(
            "   {:<22}{:>10.1}{:>10.1}{:>10.1}{:>8}",
            name,
            us(s.p50),
            us(s.p99),
            s.mean / 1000.0,
            s.errors
        );
    }
    for (name, s, who) in [
        ("ratio qmpmux/direct", m, "qmpmux"),
        ("ratio relay/direct", f, "a bare byte relay"),
        ("ratio socat/direct", so, "socat"),
    ] {
        out!(
            "   {:<22}{:>9.2}x{:>9.2}x{:>9.2}x    ({who} adds {:+.1} us at p50)",
            name,
            ratio(s.p50 as f64, d.p50 as f64),
            ratio(s.p99 as f64, d.p99 as f64),
            ratio(s.mean, d.mean),
            p.added(s)
        );
    }
    let (mine, socat) = (p.added(m), p.added(so));
    if socat > 0.0 {
        out!(
            "   {:<22}{:>9.2}x socat's added latency at p50 (qmpmux {mine:+.1} us, socat {socat:+.1} us; goal 1x or less)",
            "qmpmux added / socat",
            mine / socat
        );
    } else {
        out!(
            "   {:<22} socat adds nothing measurable at p50 here ({socat:+.1} us); qmpmux {mine:+.1} us",
            "qmpmux added / socat"
        );
    }
}
