//! Section 12, what a `qmpmux tap` costs a busy VM: section 2's and 3's
//! pipelined load (16 clients, [`DEPTH`] in flight each) with no tap, with
//! `qmpmux tap VM` attached (the command-line tool, its human lines going
//! to a file), and with a tap that never reads (a raw control-socket
//! connection), alternated, on real QEMU and on the instant fake upstream.
//! The goal: a tap costs at most 10% of the throughput.

use crate::common::binary;
use crate::stats::{median_f, ratio, thousands};
use crate::throughput::{scenario, tput_once, Scenario, TputSample};
use crate::{progress, Plan, Rig, DEPTH};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::runtime::Runtime;

/// How the load runs: with which tap.
#[derive(Clone, Copy, PartialEq, Eq)]
enum With {
    Nothing,
    /// `qmpmux tap VM`, reading as fast as it can.
    Tap,
    /// A tap connection that never reads.
    Stalled,
}

impl With {
    fn label(self) -> &'static str {
        match self {
            With::Nothing => "no tap",
            With::Tap => "qmpmux tap attached",
            With::Stalled => "a tap not reading",
        }
    }
}

const ALL: [With; 3] = [With::Nothing, With::Tap, With::Stalled];

pub fn run(plan: &Plan, rt: &Runtime, rig: &Rig) -> Value {
    // Other work on the machine moves throughput by more than a tap
    // should: many short alternations, and the median of each one's ratio.
    let reps = if plan.quick { 3 } else { 8 };
    let (qemu, fake) = (rig.qemu_b.pid(), std::process::id());
    let loads = [
        (
            "qemu",
            scenario("QEMU", &rig.mux_qemu, crate::clients::CAPS, 16, true, qemu),
        ),
        (
            "fake",
            scenario("fake upstream", &rig.mux_fake, crate::clients::CAPS, 16, true, fake),
        ),
    ];
    let mut rows = Vec::new();
    for (vm, sc) in &loads {
        let mut samples: Vec<Vec<(TputSample, Shown)>> = vec![Vec::new(); ALL.len()];
        for rep in 0..reps {
            let mut order: Vec<usize> = (0..ALL.len()).collect();
            if rep % 2 == 1 {
                order.reverse();
            }
            for i in order {
                progress(&format!(
                    "tap: {}, {} (rep {}/{reps})",
                    sc.label,
                    ALL[i].label(),
                    rep + 1
                ));
                samples[i].push(once(plan, rt, rig, vm, sc, ALL[i]));
            }
        }
        rows.push((sc.label.clone(), samples));
    }
    out!(
        "\n12. A tap on a busy VM: pipelined query-status, 16 clients x {DEPTH} in flight, without and with a tap ({reps} reps x {:.1} s, alternated; medians)",
        plan.tput_window.as_secs_f64()
    );
    out!(
        "   {:<16}{:<22}{:>10}{:>9}  {:<15}{:>11}{:>9}{:>13}",
        "upstream",
        "tap",
        "cmds/s",
        "ratio",
        "[min - max]",
        "qmpmux CPU",
        "tap CPU",
        "lines shown"
    );
    let mut json_rows = Vec::new();
    for (label, samples) in &rows {
        for (with, s) in ALL.iter().zip(samples) {
            let rate = median_f(&s.iter().map(|x| x.0.rate).collect::<Vec<_>>());
            // Each rep's ratio to the rep without a tap next to it.
            let ratios: Vec<f64> = s
                .iter()
                .zip(&samples[0])
                .map(|(x, b)| ratio(x.0.rate, b.0.rate))
                .collect();
            let r = median_f(&ratios);
            let (lo, hi) = (
                ratios.iter().copied().fold(f64::INFINITY, f64::min),
                ratios.iter().copied().fold(0.0, f64::max),
            );
            let mux = median_f(&s.iter().map(|x| x.0.mux_cpu).collect::<Vec<_>>());
            let tap_cpu = median_f(&s.iter().map(|x| x.1.cpu).collect::<Vec<_>>());
            let shown = median_f(&s.iter().map(|x| x.1.fraction()).collect::<Vec<_>>());
            out!(
                "   {:<16}{:<22}{:>10}{:>8.3}x  {:<15}{:>11}{:>9}{:>13}",
                label,
                with.label(),
                thousands(rate),
                r,
                format!("[{lo:.2} - {hi:.2}]"),
                format!("{:.0}%", mux * 100.0),
                if *with == With::Tap {
                    format!("{:.0}%", tap_cpu * 100.0)
                } else {
                    "-".into()
                },
                if *with == With::Tap {
                    format!("{:.1}%", shown * 100.0)
                } else {
                    "-".into()
                },
            );
            json_rows.push(json!({
                "upstream": label, "with": with.label(), "cmds_per_s": rate,
                "ratio_vs_no_tap": r, "ratios": ratios,
                "rates": s.iter().map(|x| x.0.rate).collect::<Vec<_>>(),
                "qmpmux_cpu_fraction": mux,
                "tap_cpu_fraction": (*with == With::Tap).then_some(tap_cpu),
                "lines_shown_fraction": (*with == With::Tap).then_some(shown),
            }));
        }
    }
    out!("   goal: a tap costs at most 10% (ratio >= 0.90); `lines shown`: of the lines the tap made, the rest lost (counted);");
    out!("   `tap CPU`: the `qmpmux tap` process, over the window (qmpmux's side of it is in the qmpmux column)");
    json!({ "clients": 16, "depth": DEPTH, "reps": reps, "rows": json_rows })
}

/// What the tap showed, and its CPU.
#[derive(Clone, Copy, Default)]
struct Shown {
    lines: u64,
    lost: u64,
    /// The tap process's CPU, in cores over the measuring window.
    cpu: f64,
}

impl Shown {
    fn fraction(&self) -> f64 {
        ratio(self.lines as f64, (self.lines + self.lost) as f64)
    }
}

fn once(plan: &Plan, rt: &Runtime, rig: &Rig, vm: &str, sc: &Scenario, with: With) -> (TputSample, Shown) {
    let out = rig.path("tap.out");
    let mut tap = (with == With::Tap).then(|| start_tap(&rig.control, vm, &out));
    let stalled = (with == With::Stalled).then(|| rt.block_on(stalled_tap(&rig.control, vm)));
    let cpu0 = tap.as_ref().map_or(0.0, |t| crate::stats::cpu_secs(t.id()));
    let t0 = Instant::now();
    let sample = rt.block_on(tput_once(plan, sc, rig.daemon.pid()));
    let mut shown = Shown::default();
    if let Some(child) = tap.as_mut() {
        shown.cpu = (crate::stats::cpu_secs(child.id()) - cpu0) / t0.elapsed().as_secs_f64();
        // Once the load is over the tap catches up: every client's leaving
        // is its last line.
        let deadline = Instant::now() + crate::common::STEP;
        while count_text(&out, "disconnected") < sc.clients && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        (shown.lines, shown.lost) = count(&out);
        let _ = std::fs::remove_file(&out);
    }
    drop(stalled);
    (sample, shown)
}

/// `qmpmux tap VM` writing to `out`, attached (its first line written).
fn start_tap(control: &Path, vm: &str, out: &Path) -> Child {
    let mut child = binary::command()
        .arg("tap")
        .arg("--control")
        .arg(control)
        .arg(vm)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).expect("tap output"))
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qmpmux tap");
    let deadline = Instant::now() + crate::common::STEP;
    while !std::fs::read_to_string(out).is_ok_and(|t| t.starts_with("tapping")) {
        assert!(Instant::now() < deadline, "qmpmux tap did not attach");
        assert!(child.try_wait().ok().flatten().is_none(), "qmpmux tap ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// A tap that asks for everything and never reads.
async fn stalled_tap(control: &PathBuf, vm: &str) -> tokio::net::UnixStream {
    let mut s = tokio::net::UnixStream::connect(control).await.expect("control socket");
    s.write_all(format!("tap {vm}\n").as_bytes())
        .await
        .expect("tap request");
    s
}

/// Lines of `out` that contain `text`.
fn count_text(out: &Path, text: &str) -> usize {
    let bytes = std::fs::read(out).unwrap_or_default();
    String::from_utf8_lossy(&bytes).matches(text).count()
}

/// Lines the tap wrote, and the lines it said it lost.
fn count(out: &Path) -> (u64, u64) {
    let text = std::fs::read(out).unwrap_or_default();
    let mut lines = 0;
    let mut lost = 0;
    for line in text.split(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(line);
        match line.split_once(" lines lost here") {
            Some((before, _)) => lost += before.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0),
            None if !line.is_empty() => lines += 1,
            None => {}
        }
    }
    (lines, lost)
}
