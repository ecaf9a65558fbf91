//! A client's mailbox: the session's messages to one client, bounded in
//! bytes rather than in messages (one QEMU reply can be megabytes, and a
//! client that stops reading must not make qmpmux grow without bound).
//!
//! The byte count is the one piece of state the two ends share: the session
//! adds what it sends, the client task subtracts what it takes out.

use super::ToClient;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Fixed cost counted per message besides its bytes (channel slot, Bytes
/// header), so that a flood of tiny messages is bounded too.
const PER_MESSAGE: usize = 64;

/// Why a message could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    /// The client has more than its budget waiting: it is not reading.
    Full,
    /// The client task is gone.
    Closed,
}

/// The session's end.
#[derive(Debug)]
pub struct MailboxSender {
    tx: mpsc::UnboundedSender<ToClient>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// The client task's end.
#[derive(Debug)]
pub struct MailboxReceiver {
    rx: mpsc::UnboundedReceiver<ToClient>,
    queued: Arc<AtomicUsize>,
}

pub fn mailbox(limit: usize) -> (MailboxSender, MailboxReceiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        MailboxSender {
            tx,
            queued: queued.clone(),
            limit,
        },
        MailboxReceiver { rx, queued },
    )
}

fn cost(msg: &ToClient) -> usize {
    PER_MESSAGE
        + match msg {
            ToClient::Reply { reply, .. } => reply.len(),
            ToClient::Event(line) => line.len(),
            ToClient::Failed { .. } => 0,
        }
}

impl MailboxSender {
    pub fn send(&self, msg: ToClient) -> Result<(), SendError> {
        let c = cost(&msg);
        // Failures are small and must always get through: they are replies.
        let must = matches!(msg, ToClient::Failed { .. });
        if !must && self.queued.load(Ordering::Acquire) + c > self.limit {
            return Err(SendError::Full);
        }
        self.queued.fetch_add(c, Ordering::AcqRel);
        self.tx.send(msg).map_err(|_| SendError::Closed)
    }

    /// Bytes waiting for the client.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

impl MailboxReceiver {
    /// The next message; `None` once the session dropped the sender.
    /// Cancel-safe, like `mpsc::UnboundedReceiver::recv`.
    pub async fn recv(&mut self) -> Option<ToClient> {
        let msg = self.rx.recv().await?;
        self.queued.fetch_sub(cost(&msg), Ordering::AcqRel);
        Some(msg)
    }

    /// The next message if one is waiting.
    pub fn try_recv(&mut self) -> Option<ToClient> {
        let msg = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(cost(&msg), Ordering::AcqRel);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn budget_is_in_bytes_and_freed_by_reading() {
        let (tx, mut rx) = mailbox(1000);
        let big = || ToClient::Event(Bytes::from(vec![b'x'; 400]));
        assert_eq!(tx.send(big()), Ok(()));
        assert_eq!(tx.send(big()), Ok(()));
        assert_eq!(tx.send(big()), Err(SendError::Full));
        // A failure notice is a reply: never refused for space.
        assert_eq!(
            tx.send(ToClient::Failed {
                seq: 1,
                kind: crate::error::FailKind::Lost
            }),
            Ok(())
        );
        rx.recv().await.unwrap();
        assert_eq!(tx.send(big()), Ok(()));
        drop(rx);
        assert_eq!(
            tx.send(ToClient::Failed {
                seq: 2,
                kind: crate::error::FailKind::Lost
            }),
            Err(SendError::Closed)
        );
    }
}
