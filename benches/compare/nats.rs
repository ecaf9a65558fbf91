//! Section 9, NATS (`[nats]`): events per second one host publishes, and
//! what publishing adds to local clients' event latency. A real
//! nats-server (JetStream on), the instant fake upstream, and a second
//! qmpmux with `[nats]` beside the rig's own, which has none.

use crate::common::binary::Binary;
use crate::common::config::config_toml;
use crate::common::fake::FakeServer;
use crate::common::nats::NatsServer;
use crate::common::STEP;
use crate::fanout::fanout_once;
use crate::stats::{ratio, us};
use crate::{progress, Plan, Rig};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Instant;
use tokio::runtime::Runtime;

pub fn run(plan: &Plan, rt: &Runtime, rig: &Rig) -> Value {
    let Some(mut nats) = rt.block_on(NatsServer::start_or_skip()) else {
        out!("\n9. NATS: skipped (no nats-server)");
        return json!(null);
    };
    let burst = if plan.quick { 2000 } else { 10_000 };
    let rounds = if plan.quick { 100 } else { 300 };
    let mut rows = Vec::new();
    for stream in [None, Some("BENCH")] {
        let label = if stream.is_some() { "JetStream" } else { "plain NATS" };
        let fake_path = rig.path(&format!("fake-nats-{}.sock", stream.is_some()));
        let listen = rig.path(&format!("mux-nats-{}.sock", stream.is_some()));
        let fire = {
            let _rt = rt.enter();
            FakeServer::bind(&fake_path).answer_all()
        };
        // History for the whole burst: the bench measures publishing, not
        // what is dropped when NATS falls behind.
        let mut config = config_toml(&[("fake", &fake_path, &listen)], 64).replacen(
            "[client]",
            &format!(
                "[upstream]\nevent_history = {}\nevent_history_bytes = 67108864\n[client]",
                burst * 2
            ),
            1,
        );
        config += &format!("[nats]\nservers = [\"{}\"]\nhost = \"bench\"\n", nats.url());
        if let Some(s) = stream {
            config += &format!("stream = \"{s}\"\n");
        }
        let name = format!("qmpmux-nats-{}", stream.is_some());
        let mux = Binary::start(
            &rig.path(&format!("{name}.toml")),
            &config,
            &rig.path(&format!("{name}.log")),
            &[&listen],
            None,
        );
        progress(&format!("{label}: event latency to one local client"));
        // Alternated, so that drift on a shared machine hits both alike.
        let without_a = rt.block_on(fanout_once(plan, &rig.mux_fake, &rig.fire, 1, rounds, None));
        let with = rt.block_on(fanout_once(plan, &listen, &fire, 1, 2 * rounds, None));
        let without_b = rt.block_on(fanout_once(plan, &rig.mux_fake, &rig.fire, 1, rounds, None));
        let without = if without_a.p50 <= without_b.p50 {
            without_b
        } else {
            without_a
        };
        progress(&format!("{label}: a burst of {burst} events"));
        let secs = rt.block_on(published_burst(&nats.url(), &fire, burst, stream));
        rows.push((label, with, without, secs));
        drop(mux);
    }
    nats.kill();
    out!("\n9. NATS: events published per second by one host, and local event latency with [nats] on");
    out!(
        "   {:<12}{:>14}{:>18}{:>18}{:>10}",
        "publishing",
        "events/s",
        "local p50 us (on)",
        "local p50 us (off)",
        "ratio"
    );
    let mut out = Vec::new();
    for (label, with, without, secs) in &rows {
        let rate = if *secs > 0.0 { burst as f64 / secs } else { 0.0 };
        out!(
            "   {:<12}{:>14.0}{:>18.1}{:>18.1}{:>9.2}x",
            label,
            rate,
            us(with.p50),
            us(without.p50),
            ratio(with.p50 as f64, without.p50 as f64)
        );
        out.push(json!({
            "publishing": label, "burst": burst, "events_per_s": rate,
            "local_p50_us_on": us(with.p50), "local_p99_us_on": us(with.p99),
            "local_p50_us_off": us(without.p50), "local_p99_us_off": us(without.p99),
            "p50_ratio": ratio(with.p50 as f64, without.p50 as f64),
        }));
    }
    json!(out)
}

/// Fires `n` events at once and returns the seconds until a subscriber
/// has seen all of them (plain NATS) or the stream holds them (JetStream).
async fn published_burst(
    url: &str,
    fire: &crate::common::fake::instant::Events,
    n: usize,
    stream: Option<&str>,
) -> f64 {
    let client = async_nats::connect(url).await.expect("connect to nats-server");
    let mut sub = client
        .subscribe("qmpmux.bench.fake.event.BENCH")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    let js = async_nats::jetstream::new(client.clone());
    let before = match stream {
        Some(s) => match js.get_stream(s).await {
            Ok(mut st) => st.info().await.map(|i| i.state.messages).unwrap_or(0),
            Err(_) => 0,
        },
        None => 0,
    };
    let start = Instant::now();
    for _ in 0..n {
        fire.send("BENCH").expect("fake upstream is gone");
    }
    let mut seen = 0;
    while seen < n {
        match tokio::time::timeout(STEP, sub.next()).await {
            Ok(Some(_)) => seen += 1,
            _ => {
                out!("   !! only {seen} of {n} events reached a NATS subscriber");
                return 0.0;
            }
        }
    }
    if let Some(s) = stream {
        let mut st = js.get_stream(s).await.expect("stream");
        let deadline = Instant::now() + STEP;
        while st.info().await.map(|i| i.state.messages).unwrap_or(0) < before + n as u64 {
            if Instant::now() > deadline {
                out!("   !! the stream did not get all {n} events");
                return 0.0;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    start.elapsed().as_secs_f64()
}
