//! Section 8, what event filters save: qmpmux's CPU per event with 1,000
//! negotiated clients, once with every client receiving the events, once
//! with 900 of them subscribed to other events only (the 100 others, the
//! same in both runs, receive them). Events come from the instant fake
//! upstream, one at a time, each after the previous one reached every
//! client that gets it.

use crate::clients::{open_many, Conn, CAPS};
use crate::common::fake::instant::Events;
use crate::common::STEP;
use crate::stats::{cpu_secs, ratio};
use crate::{progress, Plan, Rig};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

const CLIENTS: usize = 1000;
const FILTERED: usize = 900;

pub fn run(plan: &Plan, rt: &Runtime, rig: &Rig) -> Value {
    let events = if plan.quick { 300 } else { 1000 };
    let pid = rig.daemon.pid();
    let all = rt.block_on(once(&rig.mux_fake, &rig.fire, pid, 0, events));
    let filtered = rt.block_on(once(&rig.mux_fake, &rig.fire, pid, FILTERED, events));
    out!("\n8. Event filters: qmpmux CPU per event, {CLIENTS} clients, {events} events");
    out!(
        "   every client receives:          {:>8.1} us per event ({:.2} us per client)",
        all * 1e6,
        all * 1e6 / CLIENTS as f64
    );
    out!(
        "   {FILTERED} filter the event out:       {:>8.1} us per event ({:.2}x; goal: below 1x)",
        filtered * 1e6,
        ratio(filtered, all)
    );
    json!({
        "clients": CLIENTS, "filtered_out": FILTERED, "events": events,
        "cpu_us_per_event_all": all * 1e6,
        "cpu_us_per_event_filtered": filtered * 1e6,
        "ratio_filtered_vs_all": ratio(filtered, all),
    })
}

struct Count {
    received: AtomicUsize,
    target: AtomicUsize,
    notify: Notify,
}

/// qmpmux's CPU seconds per event with `filtered` of the clients
/// subscribed to another event.
async fn once(path: &Path, fire: &Events, pid: u32, filtered: usize, events: usize) -> f64 {
    progress(&format!(
        "{events} events to {CLIENTS} clients, {filtered} filtering them out"
    ));
    let mut conns = open_many(path, CAPS, CLIENTS, 64).await;
    for c in conns.iter_mut().take(filtered) {
        c.writer
            .write_all(b"{\"execute\": \"__org.qmpmux_subscribe\", \"arguments\": {\"events\": [\"NOT_BENCH\", \"BENCH_END\"]}}")
            .await
            .expect("subscribe");
        let mut line = String::new();
        c.reader.read_line(&mut line).await.expect("subscribe reply");
        assert!(line.contains("\"return\""), "subscribe: {line}");
    }
    let count = Arc::new(Count {
        received: AtomicUsize::new(0),
        target: AtomicUsize::new(usize::MAX),
        notify: Notify::new(),
    });
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(receive(c, count.clone())))
        .collect();
    let receivers = CLIENTS - filtered;
    let cpu0 = cpu_secs(pid);
    for i in 0..events {
        count.target.store((i + 1) * receivers, Ordering::Release);
        if count.received.load(Ordering::Acquire) >= (i + 1) * receivers {
            count.notify.notify_one();
        }
        fire.send("BENCH").expect("fake upstream is gone");
        if tokio::time::timeout(STEP, count.notify.notified()).await.is_err() {
            out!("   !! event {i} did not reach its {receivers} clients within {STEP:?}");
            break;
        }
    }
    let cpu = cpu_secs(pid) - cpu0;
    fire.send("BENCH_END").expect("fake upstream is gone");
    for t in tasks {
        let _ = tokio::time::timeout(STEP, t).await;
    }
    cpu / events as f64
}

/// Counts the benchmark's events until `BENCH_END`.
async fn receive(conn: Conn, count: Arc<Count>) {
    let Conn { mut reader, writer } = conn;
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if line.contains("BENCH_END") {
            break;
        }
        if line.contains("\"BENCH\"")
            && count.received.fetch_add(1, Ordering::AcqRel) + 1 == count.target.load(Ordering::Acquire)
        {
            count.notify.notify_one();
        }
    }
    drop(writer);
}
