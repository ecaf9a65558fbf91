//! One VM's publisher: its events, in order, from the VM's own history,
//! each to `<prefix>.<vm>.event.<EVENT>` with the sequence number, VM and
//! host in headers; its runstate changes to `<prefix>.<vm>.state`.
//!
//! With a stream, each event carries the message id `<host>.<vm>.<seq>`
//! and is retried until JetStream acknowledges it (a retry within the
//! stream's duplicate window is stored once); without, events count as
//! acknowledged once flushed to the server, and a batch that could not be
//! flushed is sent again. Either way the next event published is the one
//! after the last acknowledged, so an outage of NATS delays events but
//! does not reorder or skip them, unless they fall out of the history
//! first: those are counted (`qmpmux_nats_dropped_total`) and logged.

use super::subjects::Subjects;
use super::{FleetVm, Shared};
use crate::config::StreamConfig;
use crate::events::history::Entry;
use crate::state::Runstate;
use async_nats::connection::State;
use async_nats::jetstream;
use async_nats::HeaderMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long after an event wakes it the publisher waits before it fetches:
/// local clients get the VM's thread (and the machine's CPUs) first, and a
/// burst goes out in batches. Events reach NATS this much later.
const LOCAL_FIRST: Duration = Duration::from_millis(1);

/// Events fetched from the history at a time.
const BATCH: usize = 128;
/// Retry delays while NATS does not acknowledge.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Makes sure the stream exists and captures this host's events; retried
/// (in the publishers, on a failed publish) while it cannot be created.
pub async fn ensure_stream(js: &jetstream::Context, stream: &StreamConfig, subjects: &Subjects) -> bool {
    let config = jetstream::stream::Config {
        name: stream.name.clone(),
        subjects: vec![subjects.all_events()],
        max_age: stream.max_age.unwrap_or_default(),
        max_messages: stream.max_msgs.unwrap_or(-1),
        max_bytes: stream.max_bytes.unwrap_or(-1),
        num_replicas: stream.replicas,
        duplicate_window: stream.duplicate_window,
        ..Default::default()
    };
    match js.get_or_create_stream(config).await {
        Ok(s) => {
            let ours = subjects.all_events();
            if !s.cached_info().config.subjects.contains(&ours) {
                warn!(stream = %stream.name, subjects = ?s.cached_info().config.subjects, %ours,
                    "the JetStream stream exists but does not capture this host's events (another host's? \
                     use a stream per host, e.g. stream = \"QMPMUX_{{host}}\"); they are not stored");
                return false;
            }
            debug!(stream = %stream.name, "JetStream stream ready");
            true
        }
        Err(e) => {
            warn!(stream = %stream.name, error = %e, "cannot create or find the JetStream stream; will retry");
            false
        }
    }
}

struct Publisher {
    shared: Shared,
    vm: FleetVm,
    /// The last event acknowledged.
    acked: u64,
    /// This VM's share of the pending gauge.
    pending: i64,
    stop: CancellationToken,
}

/// Publishes VM `vm`'s events from now on, and its state, until `stop`.
pub async fn run(shared: Shared, vm: FleetVm, stop: CancellationToken) {
    let mut events = vm.session.watch_events();
    let mut status = vm.session.watch_status();
    events.borrow_and_update();
    let mut p = Publisher {
        shared,
        acked: vm.after,
        vm,
        pending: 0,
        stop,
    };
    let mut runstate = status.borrow_and_update().runstate;
    p.publish_state(runstate, None).await;
    loop {
        let next = *events.borrow_and_update();
        p.set_pending(next);
        // `borrow_and_update` first: an event after it wakes `changed`.
        if next > p.acked + 1 {
            if p.pause(LOCAL_FIRST).await || !p.publish_available().await {
                break;
            }
            continue;
        }
        // Cancel-safe: watch::changed and a token.
        tokio::select! {
            r = events.changed() => if r.is_err() { break },
            r = status.changed() => {
                if r.is_err() { break }
                let now = status.borrow_and_update().runstate;
                if now != runstate {
                    let event = match (runstate, now) {
                        (Runstate::Running, _) => Some("UPSTREAM_LOST"),
                        (_, Runstate::Running) => Some("UPSTREAM_RESTORED"),
                        _ => None,
                    };
                    runstate = now;
                    p.publish_state(now, event).await;
                }
            }
            () = p.stop.cancelled() => break,
        }
    }
    p.set_pending(p.acked + 1);
}

impl Publisher {
    /// Publishes every kept event after `acked`; false once stopped.
    async fn publish_available(&mut self) -> bool {
        loop {
            let Ok(fetched) = self.vm.session.fetch_events(self.acked, BATCH).await else {
                return false;
            };
            if fetched.lost && fetched.oldest > self.acked + 1 {
                let missed = fetched.oldest - self.acked - 1;
                self.shared.metrics.dropped.inc_by(missed);
                warn!(
                    missed,
                    from = self.acked + 1,
                    "events fell out of the VM's history before NATS took them (raise event_history?)"
                );
                self.acked = fetched.oldest - 1;
            }
            if fetched.events.is_empty() {
                return true;
            }
            let ok = match &self.shared.jetstream {
                Some(js) => self.publish_acked(js.clone(), &fetched.events).await,
                None => self.publish_flushed(&fetched.events).await,
            };
            if !ok {
                return false;
            }
            self.set_pending(fetched.next);
        }
    }

    /// With a stream: one at a time, each retried until acknowledged.
    async fn publish_acked(&mut self, js: jetstream::Context, events: &[Entry]) -> bool {
        for e in events {
            let mut delay = RETRY_MIN;
            loop {
                let (subject, headers, payload) = self.message(e, true);
                let acked = async {
                    js.publish_with_headers(subject, headers, payload)
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())
                };
                self.shared.metrics.published.inc();
                match acked.await {
                    Ok(ack) => {
                        if ack.duplicate {
                            debug!(seq = e.seq, "JetStream had it already");
                        }
                        break;
                    }
                    Err(why) => {
                        debug!(seq = e.seq, error = %why, "not acknowledged; retrying");
                        if self.pause(delay).await {
                            return false;
                        }
                        delay = (delay * 2).min(RETRY_MAX);
                        // Perhaps the stream is missing (not made yet, or
                        // deleted): make sure of it before the next try.
                        if let Some(stream) = &self.shared.config.stream {
                            ensure_stream(&js, stream, &self.shared.subjects).await;
                        }
                    }
                }
            }
            self.acked = e.seq;
            self.shared.metrics.acknowledged.inc();
            if self.pending > 0 {
                self.pending -= 1;
                self.shared.metrics.pending.dec();
            }
        }
        true
    }

    /// Without a stream: the batch while connected, then a flush; a batch
    /// not flushed goes again (plain NATS is at most once per attempt).
    async fn publish_flushed(&mut self, events: &[Entry]) -> bool {
        let mut delay = RETRY_MIN;
        loop {
            if self.shared.client.connection_state() == State::Connected {
                let mut sent = true;
                for e in events {
                    let (subject, headers, payload) = self.message(e, false);
                    if self
                        .shared
                        .client
                        .publish_with_headers(subject, headers, payload)
                        .await
                        .is_err()
                    {
                        sent = false;
                        break;
                    }
                    self.shared.metrics.published.inc();
                }
                if sent && self.shared.client.flush().await.is_ok() {
                    if let Some(last) = events.last() {
                        self.shared.metrics.acknowledged.inc_by(events.len() as u64);
                        self.acked = last.seq;
                    }
                    return true;
                }
            }
            if self.pause(delay).await {
                return false;
            }
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    fn message(&self, e: &Entry, with_id: bool) -> (String, HeaderMap, bytes::Bytes) {
        let cfg = &self.shared.config;
        let mut headers = HeaderMap::new();
        headers.insert("Qmpmux-Seq", e.seq.to_string().as_str());
        headers.insert("Qmpmux-Vm", self.vm.name.as_str());
        headers.insert("Qmpmux-Host", cfg.host.as_str());
        if with_id {
            headers.insert(
                "Nats-Msg-Id",
                format!("{}.{}.{}", cfg.host, self.vm.name, e.seq).as_str(),
            );
        }
        let payload = e.line.slice(..e.line.trim_ascii_end().len());
        (self.shared.subjects.event(&self.vm.name, &e.name), headers, payload)
    }

    /// `<prefix>.<vm>.state`: best effort, plain NATS.
    async fn publish_state(&self, runstate: Runstate, event: Option<&str>) {
        let cfg = &self.shared.config;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let body = serde_json::json!({
            "vm": self.vm.name, "host": cfg.host, "runstate": runstate.to_string(),
            "event": event.map(|e| format!("{}{e}", crate::qmp::outgoing::EXTENSION_PREFIX)),
            "time": now,
        });
        let subject = self.shared.subjects.state(&self.vm.name);
        if let Some(e) = event {
            info!(runstate = %runstate, event = e, "publishing state");
        }
        if self
            .shared
            .client
            .publish(subject, body.to_string().into())
            .await
            .is_ok()
        {
            self.shared.metrics.published.inc();
        }
    }

    /// Events numbered and not acknowledged: this VM's share of the gauge.
    fn set_pending(&mut self, next: u64) {
        let now = next.saturating_sub(self.acked + 1) as i64;
        self.shared.metrics.pending.inc_by(now - self.pending);
        self.pending = now;
    }

    /// Waits `d`; true if stopped meanwhile.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(d) => false,
            () = self.stop.cancelled() => true,
        }
    }
}
