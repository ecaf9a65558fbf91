//! Section 4, event fan-out: events from the instant fake upstream through
//! qmpmux to N clients, against a minimal send loop in its place.

use crate::clients::{open_many, Conn, CAPS};
use crate::common::fake::instant::{now_ns, Events};
use crate::common::fake::FakeServer;
use crate::common::STEP;
use crate::floors::Floor;
use crate::stats::{cpu_secs, cpu_user_sys, pct, ratio, us};
use crate::{progress, Plan, Rig};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::AsyncBufReadExt;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

/// Measures and prints section 4: each client count through the floor
/// (on a second fake upstream), then through qmpmux.
pub fn run(plan: &Plan, rt: &Runtime, rig: &Rig) -> Value {
    let (fake_b, bcast) = (rig.path("fake-b.sock"), rig.path("sendloop.sock"));
    let fire_b = FakeServer::bind(&fake_b).answer_all();
    let bcast_floor = Floor::start("--child-sendloop", &bcast, &fake_b);
    let mut fan: Vec<FanRow> = Vec::new();
    let mut floor: Vec<FanRow> = Vec::new();
    for &(n, ev) in &plan.fanout {
        floor.push(rt.block_on(fanout_once(plan, &bcast, &fire_b, n, ev, Some(bcast_floor.pid()))));
        fan.push(rt.block_on(fanout_once(
            plan,
            &rig.mux_fake,
            &rig.fire,
            n,
            ev,
            Some(rig.daemon.pid()),
        )));
    }
    let fan_base = fan.first().map(|f| f.p50).unwrap_or(0) as f64;
    let floor_base = floor.first().map(|f| f.p50).unwrap_or(0) as f64;
    print(&fan, &floor, fan_base, floor_base);
    // The CPU and p99 ratios at the largest count again, floor and qmpmux
    // alternated: this machine's speed drifts by more than the difference
    // between runs moments apart.
    let (n, ev) = plan.fanout[plan.fanout.len() - 1];
    let mut pairs: Vec<(f64, f64)> = (0..plan.fan_pairs)
        .map(|_| {
            let b = rt.block_on(fanout_once(plan, &bcast, &fire_b, n, ev, Some(bcast_floor.pid())));
            let f = rt.block_on(fanout_once(
                plan,
                &rig.mux_fake,
                &rig.fire,
                n,
                ev,
                Some(rig.daemon.pid()),
            ));
            pair_ratios(&f, &b)
        })
        .collect();
    pairs.push(pair_ratios(&fan[fan.len() - 1], &floor[floor.len() - 1]));
    let sorted = |pick: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = pairs.iter().map(pick).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    let (cpu, p99) = (sorted(|p| p.0), sorted(|p| p.1));
    let (median, p99_median) = (cpu[cpu.len() / 2], p99[p99.len() / 2]);
    let list = |v: &[f64]| v.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(", ");
    out!(
        "   {:<8}{:>8}   CPU per delivered event, qmpmux / send loop, {} alternated pairs: {} (median {:.2}x; goal 0.8x or less)",
        "pairs",
        n,
        pairs.len(),
        list(&cpu),
        median
    );
    out!(
        "   {:<8}{:>8}   p99 delivery, qmpmux / send loop, the same pairs: {} (median {:.2}x; goal 1.1x or less)",
        "",
        n,
        list(&p99),
        p99_median
    );
    // What batching the system calls would save: the same send loop
    // submitting each line's sends in one io_uring_enter, at the largest
    // client count only (on a third fake upstream).
    drop(bcast_floor);
    let (fake_c, uring) = (rig.path("fake-c.sock"), rig.path("uring.sock"));
    let fire_c = FakeServer::bind(&fake_c).answer_all();
    let uring_floor = Floor::start("--child-uring-sendloop", &uring, &fake_c);
    let batched = rt.block_on(fanout_once(plan, &uring, &fire_c, n, ev, Some(uring_floor.pid())));
    let (f, b) = (&fan[fan.len() - 1], &floor[floor.len() - 1]);
    out!(
        "   {:<8}{:>8}   CPU per delivered event {:.2} us: {:.2}x the send loop's; p50 {:.1} us, p99 {:.1} us (qmpmux: {:.2}x of this floor's CPU)",
        "io_uring",
        n,
        batched.cpu_per_delivery * 1e6,
        ratio(batched.cpu_per_delivery, b.cpu_per_delivery),
        us(batched.p50),
        us(batched.p99),
        ratio(f.cpu_per_delivery, batched.cpu_per_delivery)
    );
    out!(
        "   {:<8}{:>8}   share of CPU in the kernel: send loop {:.0}%, io_uring send loop {:.0}%, qmpmux {:.0}%",
        "kernel",
        n,
        b.sys_share * 100.0,
        batched.sys_share * 100.0,
        f.sys_share * 100.0
    );
    let mut rows = json!(fan
        .iter()
        .zip(&floor)
        .map(|(f, b)| json!({
            "clients": f.clients, "events": f.events, "delivered": f.delivered,
            "p50_us": us(f.p50), "p99_us": us(f.p99), "max_us": us(f.max),
            "last_client_p50_us": us(f.last_p50),
            "p50_ratio_vs_1_client": ratio(f.p50 as f64, fan_base),
            "floor": {"p50_us": us(b.p50), "p99_us": us(b.p99), "max_us": us(b.max), "last_client_p50_us": us(b.last_p50)},
            "ratio_vs_floor_p50": ratio(f.p50 as f64, b.p50 as f64),
            "ratio_vs_floor_p99": ratio(f.p99 as f64, b.p99 as f64),
            "cpu_us_per_delivery": f.cpu_per_delivery * 1e6,
            "floor_cpu_us_per_delivery": b.cpu_per_delivery * 1e6,
            "cpu_ratio_vs_floor": ratio(f.cpu_per_delivery, b.cpu_per_delivery),
            "kernel_share": f.sys_share,
            "floor_kernel_share": b.sys_share,
        }))
        .collect::<Vec<_>>());
    if let Some(last) = rows.as_array_mut().and_then(|r| r.last_mut()) {
        last["cpu_ratio_alternated"] = json!(cpu);
        last["cpu_ratio_median"] = json!(median);
        last["p99_ratio_alternated"] = json!(p99);
        last["p99_ratio_median"] = json!(p99_median);
        last["uring_floor"] = json!({
            "cpu_us_per_delivery": batched.cpu_per_delivery * 1e6,
            "cpu_ratio_vs_send_loop": ratio(batched.cpu_per_delivery, b.cpu_per_delivery),
            "kernel_share": batched.sys_share,
            "p50_us": us(batched.p50), "p99_us": us(batched.p99),
        });
    }
    rows
}

/// qmpmux's CPU per delivery and p99 as ratios of the floor's in one run.
fn pair_ratios(f: &FanRow, b: &FanRow) -> (f64, f64) {
    (
        ratio(f.cpu_per_delivery, b.cpu_per_delivery),
        ratio(f.p99 as f64, b.p99 as f64),
    )
}

fn print(fan: &[FanRow], floor: &[FanRow], fan_base: f64, floor_base: f64) {
    out!("\n4. Event fan-out latency: fake upstream -> qmpmux -> N clients (stamped before the upstream write, read by each client)");
    out!("   floor: a minimal send loop in qmpmux's place (one thread: read a line, one blocking write of it to each client in turn)");
    out!(
        "   {:<8}{:>8}{:>8}{:>11}{:>10}{:>10}{:>10}{:>17}{:>14}",
        "path",
        "clients",
        "events",
        "delivered",
        "p50 us",
        "p99 us",
        "max us",
        "last-client p50",
        "p50 vs 1 cl."
    );
    for (f, b) in fan.iter().zip(floor) {
        for (name, row, base) in [("floor", b, floor_base), ("qmpmux", f, fan_base)] {
            out!(
                "   {:<8}{:>8}{:>8}{:>11}{:>10.1}{:>10.1}{:>10.1}{:>17.1}{:>13.1}x",
                name,
                row.clients,
                row.events,
                row.delivered,
                us(row.p50),
                us(row.p99),
                us(row.max),
                us(row.last_p50),
                ratio(row.p50 as f64, base)
            );
        }
        out!(
            "   {:<8}{:>8}   p50 {:.2}x, p99 {:.2}x, last-client p50 {:.2}x; CPU per delivered event {:.2} us vs the floor's {:.2} us: {:.2}x",
            "ratio",
            "",
            ratio(f.p50 as f64, b.p50 as f64),
            ratio(f.p99 as f64, b.p99 as f64),
            ratio(f.last_p50 as f64, b.last_p50 as f64),
            f.cpu_per_delivery * 1e6,
            b.cpu_per_delivery * 1e6,
            ratio(f.cpu_per_delivery, b.cpu_per_delivery)
        );
    }
}

struct FanState {
    received: AtomicUsize,
    target: AtomicUsize,
    notify: Notify,
}

/// The stamp the instant fake put in an event (`"data": {"t": NS}`).
fn parse_t(line: &str) -> Option<u64> {
    let i = line.find("\"t\": ")? + 5;
    let digits: &str = &line[i..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

async fn fan_client(conn: Conn, st: Arc<FanState>) -> Vec<u64> {
    let Conn { mut reader, writer } = conn;
    let mut lat = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let now = now_ns();
        if line.contains("BENCH_END") {
            break;
        }
        if let Some(t) = parse_t(&line) {
            lat.push(now.saturating_sub(t));
            if st.received.fetch_add(1, Ordering::AcqRel) + 1 == st.target.load(Ordering::Acquire) {
                st.notify.notify_one();
            }
        }
    }
    drop(writer);
    lat
}

pub struct FanRow {
    pub clients: usize,
    pub events: usize,
    pub delivered: usize,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub last_p50: u64,
    /// CPU seconds of the serving process per event per client (0 when
    /// not measured).
    pub cpu_per_delivery: f64,
    /// The share of that CPU time spent in the kernel (in clock ticks).
    pub sys_share: f64,
}

/// One fan-out run; `pid`: the serving process, whose CPU time is read
/// around the events.
pub async fn fanout_once(plan: &Plan, path: &Path, fire: &Events, n: usize, events: usize, pid: Option<u32>) -> FanRow {
    progress(&format!("event fan-out to {n} clients"));
    let conns = open_many(path, CAPS, n, 64).await;
    let st = Arc::new(FanState {
        received: AtomicUsize::new(0),
        target: AtomicUsize::new(0),
        notify: Notify::new(),
    });
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(fan_client(c, st.clone())))
        .collect();
    let mut sent = 0;
    let cpu0 = pid.map(cpu_secs);
    let split0 = pid.map(cpu_user_sys);
    for i in 0..events {
        st.target.store((i + 1) * n, Ordering::Release);
        fire.send("BENCH").expect("fake upstream is gone");
        sent += 1;
        if tokio::time::timeout(STEP, st.notify.notified()).await.is_err() {
            out!("   !! event {i} did not reach all {n} clients within {STEP:?}; stopping this run");
            break;
        }
        tokio::time::sleep(plan.event_gap).await;
    }
    let cpu = pid.map(cpu_secs).zip(cpu0).map_or(0.0, |(b, a)| b - a);
    let (user, sys) = pid
        .map(cpu_user_sys)
        .zip(split0)
        .map_or((0.0, 0.0), |(b, a)| (b.0 - a.0, b.1 - a.1));
    fire.send("BENCH_END").expect("fake upstream is gone");
    let mut per_client = Vec::with_capacity(n);
    for t in tasks {
        per_client.push(
            tokio::time::timeout(STEP, t)
                .await
                .expect("fan-out client hung")
                .expect("task"),
        );
    }
    let mut all: Vec<u64> = per_client.iter().flatten().copied().collect();
    all.sort_unstable();
    // Per event: when its last client got it.
    let mut last: Vec<u64> = (0..sent)
        .map(|i| per_client.iter().filter_map(|v| v.get(i)).copied().max().unwrap_or(0))
        .collect();
    last.sort_unstable();
    FanRow {
        clients: n,
        events: sent,
        delivered: all.len(),
        p50: pct(&all, 50.0),
        p99: pct(&all, 99.0),
        max: all.last().copied().unwrap_or(0),
        last_p50: pct(&last, 50.0),
        cpu_per_delivery: if sent > 0 { cpu / (sent * n) as f64 } else { 0.0 },
        sys_share: if user + sys > 0.0 { sys / (user + sys) } else { 0.0 },
    }
}
