//! The harness shared by the integration tests and the benchmark
//! (`benches/compare/main.rs` includes this directory with `#[path]`).
//!
//! # Layout
//! - `process.rs`: the death signal and fd limit every child gets; log files
//! - `ready.rs`: readiness of a QMP server, i.e. a whole greeting
//! - `qemu.rs`: the QEMU launcher (one or more monitors, serving or dialing)
//! - `config.rs`: the one place that builds qmpmux configuration
//! - `daemon.rs`: qmpmux in-process; `binary.rs`: its binary as a subprocess
//! - `client.rs`: a raw async QMP client with assertions
//! - `fdstore.rs`: systemd's file descriptor store, scripted (crash tests)
//! - `fake/`: a scripted fake QMP server (`mod.rs`) and one answering every
//!   request at once (`instant.rs`), for upstreams QEMU cannot imitate
//! - `logs.rs`: qmpmux's log, captured
//! - `http.rs`: scraping the metrics endpoint
//! - `nats.rs`: a real nats-server (JetStream, random port, own store,
//!   restartable on the same port), or a skip outside CI without one
//! - `tmux.rs`: a terminal to drive interactive commands in (tmux), or a
//!   skip outside CI without one
// Each test binary and the benchmark use a different part of the harness.
#![allow(dead_code, unused_imports)]

pub mod binary;
pub mod client;
pub mod config;
pub mod daemon;
pub mod fake;
pub mod fdstore;
pub mod http;
pub mod logs;
pub mod nats;
pub mod process;
pub mod qemu;
pub mod ready;
pub mod tmux;

pub use client::Client;
pub use daemon::Daemon;
pub use process::die_with_parent;
pub use qemu::Qemu;

use serde_json::Value;
use std::time::Duration;

/// How long any single expected message may take before a test fails.
pub const STEP: Duration = Duration::from_secs(10);

/// Waits until `f` returns true, polling; for conditions with no event to
/// wait on (e.g. the daemon reconnecting).
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes what varies between two QEMUs (timestamps) from a message.
pub fn normalize(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        if obj.contains_key("timestamp") {
            obj.insert("timestamp".into(), Value::String("<ts>".into()));
        }
    }
    v
}
