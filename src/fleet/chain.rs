//! The order of one host's JetStream publishes: many events in flight at
//! once, and still each VM's events stored in order, each exactly once.
//!
//! Publishes are pipelined (a window of unacknowledged ones per VM, see
//! [`super::publish`]). A message can then be lost while a later one is
//! stored: the server the connection was on dies with messages in its
//! socket, and those queued in the client meanwhile go to the next server.
//! Sending the lost one again would store it after its successors. So every
//! message sent while an earlier one is still unacknowledged carries
//! `Nats-Expected-Last-Msg-Id` naming that earlier one: JetStream stores it
//! only right after it, and rejects it otherwise (nats-server checks the
//! duplicate window first, so a message already stored is acknowledged as a
//! duplicate instead). The stream (one per host) has one last message, so
//! the chain is the host's, shared by its VMs' publishers.
//!
//! When any publish fails, the chain is broken: every publisher stops
//! sending, waits for all of its own acknowledgements (those after the gap
//! fail, those before it were stored), and once nothing is in flight on the
//! host the chain starts again with a message that expects nothing, which
//! is then right (everything before it has been decided), and each
//! publisher sends again from its first unacknowledged event, with the same
//! message ids (those stored meanwhile come back as duplicates).

use async_nats::jetstream::{self, context::PublishAckFuture, context::PublishError};
use async_nats::HeaderMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{Mutex, MutexGuard, Notify};

/// The header JetStream checks against the stream's last message id.
const EXPECTED_LAST: &str = "Nats-Expected-Last-Msg-Id";

/// One host's chain.
#[derive(Debug, Default)]
pub struct Chain {
    /// The id of the message sent last. Held across a publish's hand-over
    /// to the connection (`.await`), so that the chain's order is the order
    /// in which messages reach the connection's queue.
    last: Mutex<Option<Arc<str>>>,
    state: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Messages sent and not yet decided (acknowledged, failed, or given up).
    outstanding: AtomicUsize,
    /// A publish failed: nothing is sent until `outstanding` is 0.
    broken: AtomicBool,
    /// Woken when `outstanding` falls to 0.
    settled: Notify,
}

/// Why a message was not sent.
#[derive(Debug)]
pub enum SendError {
    /// The chain is broken: decide what is in flight first.
    Broken,
    /// The client refused it (too large, not connected for too long, ...).
    Publish(PublishError),
}

/// The right to send, in the chain's order, while held.
pub struct Sender<'a> {
    last: MutexGuard<'a, Option<Arc<str>>>,
    state: &'a Arc<Counts>,
}

/// One message in flight: resolve it with its outcome; dropped undecided,
/// it counts as failed.
#[derive(Debug)]
pub struct Ticket {
    state: Arc<Counts>,
    decided: bool,
}

impl Chain {
    /// Waits for the right to send (other VMs' publishers may be sending).
    pub async fn sender(&self) -> Sender<'_> {
        Sender {
            last: self.last.lock().await,
            state: &self.state,
        }
    }

    /// Waits until nothing is in flight on the host (after a failure: the
    /// caller has decided its own messages already).
    pub async fn settled(&self) {
        loop {
            // Registered before the check, so a wake-up between the two is
            // not missed.
            let notified = self.state.settled.notified();
            if self.state.outstanding.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Whether a failure has stopped sending.
    #[cfg(test)]
    fn is_broken(&self) -> bool {
        self.state.broken.load(Ordering::Acquire)
    }

    #[cfg(test)]
    fn outstanding(&self) -> usize {
        self.state.outstanding.load(Ordering::Acquire)
    }
}

impl Sender<'_> {
    /// Sends one message with id `id` (already in `headers` as
    /// `Nats-Msg-Id`), expecting the previous one if that is still in
    /// flight.
    pub async fn send(
        &mut self,
        js: &jetstream::Context,
        subject: String,
        mut headers: HeaderMap,
        payload: bytes::Bytes,
        id: Arc<str>,
    ) -> Result<(PublishAckFuture, Ticket), SendError> {
        let s = &self.state;
        if s.broken.load(Ordering::Acquire) {
            if s.outstanding.load(Ordering::Acquire) > 0 {
                return Err(SendError::Broken);
            }
            // Everything sent before has been decided: start afresh.
            s.broken.store(false, Ordering::Release);
            *self.last = None;
        }
        if s.outstanding.load(Ordering::Acquire) > 0 {
            if let Some(last) = self.last.as_deref() {
                headers.insert(EXPECTED_LAST, last);
            }
        }
        let ack = js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(SendError::Publish)?;
        s.outstanding.fetch_add(1, Ordering::AcqRel);
        *self.last = Some(id);
        Ok((
            ack,
            Ticket {
                state: Arc::clone(s),
                decided: false,
            },
        ))
    }
}

impl Ticket {
    /// The message was stored (or found a duplicate): `ok`; anything else
    /// breaks the chain.
    pub fn decide(mut self, ok: bool) {
        self.finish(ok);
    }

    fn finish(&mut self, ok: bool) {
        if self.decided {
            return;
        }
        self.decided = true;
        if !ok {
            self.state.broken.store(true, Ordering::Release);
        }
        if self.state.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.settled.notify_waiters();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.finish(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(chain: &Chain) -> Ticket {
        chain.state.outstanding.fetch_add(1, Ordering::AcqRel);
        Ticket {
            state: chain.state.clone(),
            decided: false,
        }
    }

    #[tokio::test]
    async fn a_failure_breaks_the_chain_until_everything_in_flight_is_decided() {
        let chain = Chain::default();
        let (a, b) = (ticket(&chain), ticket(&chain));
        a.decide(false);
        assert!(chain.is_broken());
        assert_eq!(chain.outstanding(), 1);
        let settled = tokio::spawn(async move {
            chain.settled().await;
            chain
        });
        tokio::task::yield_now().await;
        assert!(!settled.is_finished(), "b is still in flight");
        b.decide(true);
        let chain = settled.await.unwrap();
        assert_eq!(chain.outstanding(), 0);
        assert!(chain.is_broken(), "until the next send starts afresh");
    }

    #[tokio::test]
    async fn a_ticket_dropped_undecided_counts_as_failed() {
        let chain = Chain::default();
        drop(ticket(&chain));
        assert!(chain.is_broken());
        assert_eq!(chain.outstanding(), 0);
        chain.settled().await;
    }

    #[tokio::test]
    async fn successes_keep_the_chain_whole() {
        let chain = Chain::default();
        for _ in 0..3 {
            ticket(&chain).decide(true);
        }
        assert!(!chain.is_broken());
        chain.settled().await;
    }
}
