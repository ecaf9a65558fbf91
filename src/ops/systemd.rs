//! Telling systemd (`Type=notify`) how things stand, and feeding its
//! watchdog (`WatchdogSec=`): `WATCHDOG=1` every half interval, but only
//! while every thread serving VMs still runs its tasks.
//!
//! A ping from the main thread alone would say nothing about the VM
//! threads, and a VM thread blocked by a bug leaves every client of its
//! VMs hanging. With the ping withheld, systemd restarts qmpmux (clients
//! reconnect, QEMU keeps running).

use crate::runtime::shards::Liveness;
use sd_notify::NotifyState;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

/// Sends `state` to systemd; without systemd (no `NOTIFY_SOCKET`) it does
/// nothing.
pub fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// `RELOADING=1` with the time, before a reload.
pub fn notify_reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
}

/// `READY=1`, serving: after start and after each reload.
pub fn notify_ready() {
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}

/// The watchdog interval systemd asked for, if it asked this process.
pub fn interval() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings until `stop`, while every shard answers; returns at once when no
/// watchdog is configured.
pub async fn run_watchdog(shards: Liveness, stop: CancellationToken) {
    let Some(interval) = interval() else { return };
    let mut tick = tokio::time::interval(interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A shard that cannot run an empty task in a quarter of the
        // interval is stuck, not busy: a command takes microseconds.
        let stuck = shards.unresponsive(interval / 4).await;
        if stuck.is_empty() {
            notify(&[NotifyState::Watchdog]);
        } else {
            let threads: Vec<String> = stuck.iter().map(|i| format!("qmpmux-vm-{i}")).collect();
            error!(
                threads = %threads.join(", "),
                "VM threads not responding; withholding the systemd watchdog ping"
            );
        }
    }
}
