//! One VM's publisher: its events, in order, from the VM's own history,
//! each to `<prefix>.<vm>.event.<EVENT>` with the sequence number, VM and
//! host in headers; its runstate changes to `<prefix>.<vm>.state`.
//!
//! With a stream, each event carries the message id `<host>.<vm>.<seq>`,
//! up to [`WINDOW`] are in flight at once, and from the first one that is
//! not acknowledged all are sent again, in order, with the same ids (a
//! retry within the stream's duplicate window is stored once; [`chain`]
//! keeps a message from being stored after a lost predecessor). Without,
//! events count as acknowledged once flushed to the server, and a batch
//! that could not be flushed is sent again. Either way the next event
//! published is the one after the last acknowledged, so an outage of NATS
//! delays events but does not reorder or skip them, unless they fall out
//! of the history first, or are larger than the server takes: those are
//! counted (`qmpmux_nats_dropped_total` by reason), logged with their
//! numbers, and publishing goes on with the next.
//!
//! [`chain`]: super::chain

use super::chain::{SendError, Ticket};
use super::subjects::Subjects;
use super::{FleetVm, Shared};
use crate::config::StreamConfig;
use crate::events::history::Entry;
use crate::state::Runstate;
use async_nats::connection::State;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::{self, publish::PublishAck};
use async_nats::HeaderMap;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How long after an event wakes it the publisher waits before it fetches:
/// local clients get the VM's thread (and the machine's CPUs) first, and a
/// burst goes out in batches. Events reach NATS this much later.
const LOCAL_FIRST: Duration = Duration::from_millis(1);

/// Events fetched from the history at a time (plain NATS), and the least
/// room in the window worth a fetch (JetStream).
const BATCH: usize = 128;
/// The most events fetched at a time for the window: the session copies
/// them while the VM's clients wait.
const FETCH_MAX: usize = 512;
/// Events of one VM sent to JetStream and not yet acknowledged, at most.
/// One at a time, a host published 4.1-6.5k events/s here (each waits for
/// its acknowledgement, a round trip through the stream's storage); with
/// this window 28-46k/s, with 1024 20-41k/s (benchmark section 9, on a
/// loaded 2-core machine). Fetched from the history as room frees.
pub const WINDOW: usize = 4096;
/// Events of all the host's VMs in flight to JetStream, at most: beyond,
/// a VM's publisher waits for its own acknowledgements (or, with none in
/// flight, a moment) before it sends more.
const HOST_WINDOW: usize = 16384;

/// The JetStream context the publishers use: a send beyond
/// [`HOST_WINDOW`] fails at once rather than waiting (a publisher waiting
/// for a slot while holding the chain would keep the others from
/// collecting the acknowledgements that free one).
pub fn context(client: async_nats::Client) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .max_ack_inflight(HOST_WINDOW)
        .backpressure_on_inflight(false)
        .build(client)
}
/// How long a publisher with nothing in flight waits while the other VMs
/// fill the host's window.
const HOST_WINDOW_FULL: Duration = Duration::from_millis(5);
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
    /// The VM's next event number, to see whether the history has more.
    events: watch::Receiver<u64>,
    /// The last event acknowledged (or given up on).
    acked: u64,
    /// The last event fetched from the history into `window` (or known
    /// lost); `acked` when nothing is in flight.
    fetched: u64,
    /// With a stream: events fetched and not acknowledged, oldest first;
    /// the first `sent` of them are in flight.
    window: VecDeque<InFlight>,
    sent: usize,
    /// The last event counted as too large (plain NATS sends a batch again
    /// after a failed flush: counted once).
    too_large_upto: u64,
    /// This VM's share of the pending gauge.
    pending: i64,
    stop: CancellationToken,
}

/// An event on its way to JetStream.
struct InFlight {
    entry: Entry,
    /// Once sent: the acknowledgement to come, and its place in the chain.
    ack: Option<(PublishAckFuture, Ticket)>,
}

/// What came of one publish to JetStream.
enum Outcome {
    Stored,
    /// Never storable: larger than the server or the stream takes.
    TooLarge(String),
    /// Not acknowledged (lost, timed out, refused for now): send again.
    Failed(String),
}

impl Outcome {
    fn of(r: Result<PublishAck, PublishError>) -> Outcome {
        match r {
            Ok(_) => Outcome::Stored,
            Err(e) if is_too_large(&e) => Outcome::TooLarge(e.to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// The client's own check against the server's `max_payload`, or the
/// stream's `max_msg_size` (JetStream error 10054).
fn is_too_large(e: &PublishError) -> bool {
    if e.kind() == PublishErrorKind::MaxPayloadExceeded {
        return true;
    }
    let js = std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
    js.is_some_and(|j| {
        j.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
            || j.to_string().contains("message size exceeds maximum")
    })
}

/// Publishes VM `vm`'s events from now on, and its state, until `stop`.
pub async fn run(shared: Shared, vm: FleetVm, stop: CancellationToken) {
    let mut events = vm.session.watch_events();
    let mut status = vm.session.watch_status();
    events.borrow_and_update();
    let mut p = Publisher {
        shared,
        events: events.clone(),
        acked: vm.after,
        fetched: vm.after,
        window: VecDeque::new(),
        sent: 0,
        too_large_upto: 0,
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
        if let Some(js) = self.shared.jetstream.clone() {
            return self.publish_windowed(&js).await;
        }
        loop {
            if !self.fetch(BATCH).await {
                return false;
            }
            let batch: Vec<Entry> = self.window.drain(..).map(|f| f.entry).collect();
            if batch.is_empty() {
                self.acked = self.fetched;
                return true;
            }
            if !self.publish_flushed(&batch).await {
                return false;
            }
        }
    }

    /// Fetches up to `n` events after `fetched` into the window; counts
    /// those lost to the history's bounds. False once the session is gone.
    async fn fetch(&mut self, n: usize) -> bool {
        let Ok(fetched) = self.vm.session.fetch_events(self.fetched, n).await else {
            return false;
        };
        if fetched.lost && fetched.oldest > self.fetched + 1 {
            let missed = fetched.oldest - self.fetched - 1;
            self.shared.metrics.dropped.inc_by(missed);
            warn!(
                missed,
                from = self.fetched + 1,
                "events fell out of the VM's history before NATS took them (raise event_history?)"
            );
            self.fetched = fetched.oldest - 1;
        }
        for entry in fetched.events {
            self.fetched = entry.seq;
            self.window.push_back(InFlight { entry, ack: None });
        }
        self.set_pending(fetched.next);
        true
    }

    /// With a stream: up to [`WINDOW`] events in flight, acknowledged in
    /// order; false once stopped.
    async fn publish_windowed(&mut self, js: &jetstream::Context) -> bool {
        let mut delay = RETRY_MIN;
        loop {
            let more = *self.events.borrow() > self.fetched + 1;
            let room = (WINDOW - self.window.len()).min(FETCH_MAX);
            if more && room >= BATCH && !self.fetch(room).await {
                return false;
            }
            if self.window.is_empty() {
                self.acked = self.fetched;
                return true;
            }
            if self.sent < self.window.len() && !self.send_unsent(js).await {
                if !self.recover(js, &mut delay).await {
                    return false;
                }
                continue;
            }
            if self.sent == 0 {
                // Empty (all that was left was too large to send), or the
                // other VMs hold all of the host's window for now.
                if !self.window.is_empty() && self.pause(HOST_WINDOW_FULL).await {
                    return false;
                }
                continue;
            }
            let front = self.window.front_mut().expect("sent > 0");
            let (ack, ticket) = front.ack.take().expect("the first `sent` are in flight");
            let seq = front.entry.seq;
            // Cancel-safe: an ack dropped with its ticket counts as failed.
            let outcome = tokio::select! {
                r = ack => Outcome::of(r),
                () = self.stop.cancelled() => return false,
            };
            match outcome {
                Outcome::Stored => {
                    ticket.decide(true);
                    self.window.pop_front();
                    self.sent -= 1;
                    self.shared.metrics.acknowledged.inc();
                    self.settle(seq);
                    delay = RETRY_MIN;
                }
                Outcome::TooLarge(why) => {
                    // Its successors expected it: they fail, and go again.
                    ticket.decide(false);
                    self.window.pop_front();
                    self.sent -= 1;
                    self.too_large(seq, &why);
                    self.settle(seq);
                }
                Outcome::Failed(why) => {
                    ticket.decide(false);
                    debug!(seq, error = %why, "not acknowledged; sending again from it");
                    if !self.recover(js, &mut delay).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Sends the window's unsent events in order; false if the chain is
    /// broken or the client refused one (too large ones are dropped here).
    async fn send_unsent(&mut self, js: &jetstream::Context) -> bool {
        let chain = self.shared.chain.clone();
        let mut sender = chain.sender().await;
        while self.sent < self.window.len() {
            let (subject, headers, payload, id) = self.message(&self.window[self.sent].entry, true);
            let id = id.expect("asked for");
            match sender.send(js, subject, headers, payload, id).await {
                Ok(flight) => {
                    self.window[self.sent].ack = Some(flight);
                    self.sent += 1;
                    self.shared.metrics.published.inc();
                }
                // The host's bound: collect acknowledgements first.
                Err(SendError::Publish(e)) if e.kind() == PublishErrorKind::MaxAckPending => break,
                Err(SendError::Publish(e)) if is_too_large(&e) => {
                    let gone = self.window.remove(self.sent).expect("in the window");
                    self.too_large(gone.entry.seq, &e.to_string());
                    if self.pending > 0 {
                        self.pending -= 1;
                        self.shared.metrics.pending.dec();
                    }
                }
                Err(SendError::Publish(e)) => {
                    debug!(seq = self.window[self.sent].entry.seq, error = %e, "cannot publish; sending again");
                    return false;
                }
                Err(SendError::Broken) => return false,
            }
        }
        true
    }

    /// After a failure: decides what is in flight (a stored beginning
    /// still counts), waits until nothing is in flight on the host and a
    /// while more, and makes sure of the stream; then everything left is
    /// sent again. False once stopped.
    async fn recover(&mut self, js: &jetstream::Context, delay: &mut Duration) -> bool {
        // All at once: each waits out its own timeout, and lost ones would
        // take a timeout each in turn.
        let flights: Vec<_> = self.window.iter_mut().take(self.sent).map(|f| f.ack.take()).collect();
        let decide = flights.into_iter().map(|flight| async move {
            let (ack, ticket) = flight?;
            let ok = matches!(Outcome::of(ack.await), Outcome::Stored);
            ticket.decide(ok);
            Some(ok)
        });
        // Cancel-safe: as in `publish_windowed`.
        let decided = tokio::select! {
            d = futures_util::future::join_all(decide) => d,
            () = self.stop.cancelled() => return false,
        };
        // A stored beginning counts (the failed front, taken already, ends it).
        let stored = decided.iter().take_while(|d| **d == Some(true)).count();
        for _ in 0..stored {
            let f = self.window.pop_front().expect("stored ones are in the window");
            self.shared.metrics.acknowledged.inc();
            self.settle(f.entry.seq);
        }
        self.sent = 0;
        tokio::select! {
            () = self.shared.chain.settled() => {}
            () = self.stop.cancelled() => return false,
        }
        if self.pause(*delay).await {
            return false;
        }
        *delay = (*delay * 2).min(RETRY_MAX);
        // Perhaps the stream is missing (not made yet, or deleted): make
        // sure of it before the next try.
        if let Some(stream) = &self.shared.config.stream {
            ensure_stream(js, stream, &self.shared.subjects).await;
        }
        true
    }

    /// Event `seq` is decided (stored, or given up): the next to publish
    /// is after it.
    fn settle(&mut self, seq: u64) {
        self.acked = seq;
        if self.pending > 0 {
            self.pending -= 1;
            self.shared.metrics.pending.dec();
        }
    }

    /// Event `seq` cannot be published: counted and logged, once.
    fn too_large(&mut self, seq: u64, why: &str) {
        if seq <= self.too_large_upto {
            return;
        }
        self.too_large_upto = seq;
        self.shared.metrics.too_large.inc();
        warn!(
            seq,
            error = %why,
            "event too large for NATS (the server's max_payload or the stream's max_msg_size); \
             not published, going on with the next"
        );
    }

    /// Without a stream: the batch while connected, then a flush; a batch
    /// not flushed goes again (plain NATS is at most once per attempt).
    async fn publish_flushed(&mut self, events: &[Entry]) -> bool {
        let mut delay = RETRY_MIN;
        loop {
            if self.shared.client.connection_state() == State::Connected {
                let mut sent = true;
                for e in events {
                    let (subject, headers, payload, _) = self.message(e, false);
                    match self.shared.client.publish_with_headers(subject, headers, payload).await {
                        Ok(()) => {
                            self.shared.metrics.published.inc();
                        }
                        Err(err) if err.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                            self.too_large(e.seq, &err.to_string());
                        }
                        Err(_) => {
                            sent = false;
                            break;
                        }
                    }
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

    /// The subject, headers and payload of event `e`, and `with_id` its
    /// message id (also in the headers).
    fn message(&self, e: &Entry, with_id: bool) -> (String, HeaderMap, bytes::Bytes, Option<Arc<str>>) {
        let cfg = &self.shared.config;
        let mut headers = HeaderMap::new();
        headers.insert("Qmpmux-Seq", e.seq.to_string().as_str());
        headers.insert("Qmpmux-Vm", self.vm.name.as_str());
        headers.insert("Qmpmux-Host", cfg.host.as_str());
        let id = with_id.then(|| Arc::<str>::from(format!("{}.{}.{}", cfg.host, self.vm.name, e.seq)));
        if let Some(id) = &id {
            headers.insert("Nats-Msg-Id", &**id);
        }
        let payload = e.line.slice(..e.line.trim_ascii_end().len());
        (self.shared.subjects.event(&self.vm.name, &e.name), headers, payload, id)
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
