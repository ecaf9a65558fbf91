//! Sections 2 and 3, pipelined throughput: clients keeping [`DEPTH`]
//! commands in flight, against real QEMU (section 2) and against the
//! instant fake upstream (section 3, qmpmux's own ceiling).

use crate::clients::{is_event, is_ok, open_many, Conn, CAPS, CAPS_OOB, CMD};
use crate::common::fake::FakeServer;
use crate::common::STEP;
use crate::floors::Floor;
use crate::stats::{cpu_secs, median_f, ratio, thousands};
use crate::{progress, Plan, Rig, DEPTH};
use serde_json::{json, Value};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

pub struct Scenario {
    pub label: String,
    path: PathBuf,
    caps: &'static [u8],
    pub clients: usize,
    /// Whether qmpmux is on the path (its CPU is then reported).
    via_mux: bool,
    /// QEMU's pid, or this process for the fake upstream.
    upstream_pid: u32,
}

pub fn scenario(
    label: &str,
    path: &Path,
    caps: &'static [u8],
    clients: usize,
    via_mux: bool,
    upstream_pid: u32,
) -> Scenario {
    Scenario {
        label: label.into(),
        path: path.to_owned(),
        caps,
        clients,
        via_mux,
        upstream_pid,
    }
}

/// Section 2: direct QEMU against qmpmux on QEMU; returns its JSON and the
/// direct baseline (cmds/s) that section 3 compares with.
pub fn run_qemu(plan: &Plan, rt: &Runtime, rig: &Rig) -> (Value, f64) {
    let (pa, pb) = (rig.qemu_a.pid(), rig.qemu_b.pid());
    let rows = rt.block_on(tput_group(
        plan,
        &[
            scenario("direct QEMU", &rig.qa, CAPS_OOB, 1, false, pa),
            scenario("via qmpmux", &rig.mux_qemu, CAPS, 1, true, pb),
            scenario("via qmpmux", &rig.mux_qemu, CAPS, 16, true, pb),
            scenario("via qmpmux", &rig.mux_qemu, CAPS, 64, true, pb),
        ],
        rig.daemon.pid(),
    ));
    let base = rows[0].median.rate;
    out!(
        "\n2. Pipelined query-status throughput, {DEPTH} in flight per client ({} rep(s) x {:.1} s per row, interleaved; median [min - max])",
        plan.tput_reps,
        plan.tput_window.as_secs_f64()
    );
    print_tput(&rows, base, "vs direct", "QEMU CPU");
    let json = json!({
        "direct_baseline_cmds_per_s": base,
        "rows": rows.iter().map(|r| tput_json(r, base)).collect::<Vec<_>>(),
    });
    (json, base)
}

/// Section 3: qmpmux on the instant fake upstream (in this process);
/// ratios against section 2's direct baseline `base` (0 if it did not run).
pub fn run_fake(plan: &Plan, rt: &Runtime, rig: &Rig, base: f64) -> Value {
    let me = std::process::id();
    let rows = rt.block_on(tput_group(
        plan,
        &[
            scenario("fake upstream", &rig.mux_fake, CAPS, 1, true, me),
            scenario("fake upstream", &rig.mux_fake, CAPS, 16, true, me),
            scenario("fake upstream", &rig.mux_fake, CAPS, 64, true, me),
        ],
        rig.daemon.pid(),
    ));
    // The floor: a bare relay in qmpmux's place, each client with an
    // upstream connection of its own to a fake that serves them all at once
    // (more than qmpmux gets: one connection, 8 in flight).
    let (fake_each, relay) = (rig.path("fake-each.sock"), rig.path("relay-fake.sock"));
    rt.block_on(async { FakeServer::bind(&fake_each).answer_each() });
    let floor = Floor::start("--child-relay", &relay, &fake_each);
    let floor_rows = rt.block_on(tput_group(
        plan,
        &[
            scenario("floor: bare relay", &relay, CAPS, 16, true, me),
            scenario("floor: bare relay", &relay, CAPS, 64, true, me),
        ],
        floor.pid(),
    ));
    out!("\n3. qmpmux ceiling: instant-reply fake upstream (in the bench process), one upstream session (window 8)");
    out!("   floor: a bare relay process in qmpmux's place, one upstream connection per client (its CPU in the qmpmux column)");
    print_tput(&rows, base, "vs QEMU", "bench CPU");
    for r in &floor_rows {
        print_tput_row(r, base);
    }
    let of_floor = |clients: usize| {
        let rate = |rs: &[TputRow]| rs.iter().find(|r| r.clients == clients).map_or(0.0, |r| r.median.rate);
        ratio(rate(&rows), rate(&floor_rows))
    };
    out!(
        "   {:<22}qmpmux at 16 clients {:.2}x the relay's rate, at 64 clients {:.2}x (goal: 150,000 cmds/s)",
        "ratio qmpmux/floor",
        of_floor(16),
        of_floor(64)
    );
    json!({
        "note": "ratio is vs the direct-QEMU baseline of section 2; upstream CPU is this bench process (fake + clients)",
        "rows": rows.iter().map(|r| tput_json(r, base)).collect::<Vec<_>>(),
        "floor_bare_relay": floor_rows.iter().map(|r| tput_json(r, base)).collect::<Vec<_>>(),
        "ratio_vs_floor": {"16": of_floor(16), "64": of_floor(64)},
    })
}

/// Keeps `depth` commands in flight until `stop`, then drains its replies.
async fn pipeline_client(
    conn: Conn,
    depth: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> io::Result<()> {
    let Conn { mut reader, mut writer } = conn;
    let batch = CMD.repeat(depth);
    writer.write_all(&batch).await?;
    let mut outstanding = depth;
    let mut line = String::new();
    while outstanding > 0 {
        // Take every reply already buffered, then refill in one write.
        let mut got = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if !is_event(&line) {
                got += 1;
                if !is_ok(&line) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !reader.buffer().contains(&b'\n') {
                break;
            }
        }
        if got == 0 {
            continue;
        }
        done.fetch_add(got as u64, Ordering::Relaxed);
        outstanding -= got;
        if !stop.load(Ordering::Relaxed) {
            writer.write_all(&batch[..got * CMD.len()]).await?;
            outstanding += got;
        }
    }
    Ok(())
}

#[derive(Default, Clone)]
pub struct TputSample {
    pub rate: f64,
    errors: u64,
    pub mux_cpu: f64,
    upstream_cpu: f64,
    bench_cpu: f64,
}

/// One measuring window of scenario `sc` (after a warm-up).
pub async fn tput_once(plan: &Plan, sc: &Scenario, mux_pid: u32) -> TputSample {
    let conns = open_many(&sc.path, sc.caps, sc.clients, 64).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(pipeline_client(c, DEPTH, stop.clone(), done.clone(), errors.clone())))
        .collect();
    tokio::time::sleep(plan.tput_warmup).await;
    let me = std::process::id();
    let cpu0 = (cpu_secs(mux_pid), cpu_secs(sc.upstream_pid), cpu_secs(me));
    let (c0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(plan.tput_window).await;
    let (c1, secs) = (done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    let cpu1 = (cpu_secs(mux_pid), cpu_secs(sc.upstream_pid), cpu_secs(me));
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        match tokio::time::timeout(STEP, t).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!(
                "{}: client did not finish cleanly: {:?}",
                sc.label,
                other.map(|r| r.map(|_| ()))
            ),
        }
    }
    TputSample {
        rate: (c1 - c0) as f64 / secs,
        errors: errors.load(Ordering::Relaxed),
        mux_cpu: (cpu1.0 - cpu0.0) / secs,
        upstream_cpu: (cpu1.1 - cpu0.1) / secs,
        bench_cpu: (cpu1.2 - cpu0.2) / secs,
    }
}

struct TputRow {
    label: String,
    pub clients: usize,
    via_mux: bool,
    median: TputSample,
    min: f64,
    max: f64,
}

/// Runs every scenario `tput_reps` times, interleaved (order reversed on
/// odd repetitions), and keeps medians.
async fn tput_group(plan: &Plan, scenarios: &[Scenario], mux_pid: u32) -> Vec<TputRow> {
    let mut samples: Vec<Vec<TputSample>> = vec![Vec::new(); scenarios.len()];
    for rep in 0..plan.tput_reps {
        let mut order: Vec<usize> = (0..scenarios.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for i in order {
            progress(&format!(
                "throughput: {} (rep {}/{})",
                scenarios[i].label,
                rep + 1,
                plan.tput_reps
            ));
            samples[i].push(tput_once(plan, &scenarios[i], mux_pid).await);
        }
    }
    scenarios
        .iter()
        .zip(samples)
        .map(|(sc, s)| {
            let f = |g: fn(&TputSample) -> f64| median_f(&s.iter().map(g).collect::<Vec<_>>());
            let rates: Vec<f64> = s.iter().map(|x| x.rate).collect();
            TputRow {
                label: sc.label.clone(),
                clients: sc.clients,
                via_mux: sc.via_mux,
                median: TputSample {
                    rate: f(|x| x.rate),
                    errors: s.iter().map(|x| x.errors).sum(),
                    mux_cpu: f(|x| x.mux_cpu),
                    upstream_cpu: f(|x| x.upstream_cpu),
                    bench_cpu: f(|x| x.bench_cpu),
                },
                min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                max: rates.iter().copied().fold(0.0, f64::max),
            }
        })
        .collect()
}

fn pct_cpu(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

fn tput_json(r: &TputRow, base: f64) -> Value {
    json!({
        "label": r.label, "clients": r.clients, "depth": DEPTH,
        "cmds_per_s": r.median.rate, "min": r.min, "max": r.max,
        "ratio": if base > 0.0 { r.median.rate / base } else { 0.0 },
        "errors": r.median.errors,
        "qmpmux_cpu_fraction": r.via_mux.then_some(r.median.mux_cpu),
        "upstream_cpu_fraction": r.median.upstream_cpu,
        "bench_cpu_fraction": r.median.bench_cpu,
        "qmpmux_cpu_us_per_cmd": r.via_mux.then(|| r.median.mux_cpu * 1e6 / r.median.rate.max(1.0)),
    })
}

fn print_tput(rows: &[TputRow], base: f64, base_name: &str, upstream_name: &str) {
    out!(
        "   {:<22}{:>8}{:>12}  {:<21}{:>10}{:>12}{:>11}{:>11}{:>8}",
        "path",
        "clients",
        "cmds/s",
        "[min - max]",
        base_name,
        "qmpmux CPU",
        upstream_name,
        "us CPU/cmd",
        "errors"
    );
    for r in rows {
        print_tput_row(r, base);
    }
}

fn print_tput_row(r: &TputRow, base: f64) {
    let m = &r.median;
    out!(
        "   {:<22}{:>8}{:>12}  {:<21}{:>9.2}x{:>12}{:>11}{:>11}{:>8}",
        r.label,
        r.clients,
        thousands(m.rate),
        format!("[{} - {}]", thousands(r.min), thousands(r.max)),
        if base > 0.0 { m.rate / base } else { 0.0 },
        if r.via_mux { pct_cpu(m.mux_cpu) } else { "-".into() },
        pct_cpu(m.upstream_cpu),
        if r.via_mux {
            format!("{:.1}", m.mux_cpu * 1e6 / m.rate.max(1.0))
        } else {
            "-".into()
        },
        m.errors
    );
}
