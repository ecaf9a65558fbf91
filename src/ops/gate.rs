//! A cap on the connections a side service (control socket, metrics
//! endpoint) serves at once.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A cap on the connections a service serves at once, so that idle peers
/// cannot use up qmpmux's file descriptors (which its QMP clients need).
/// A connection beyond it is closed at once; the first refusal of a run is
/// logged, and how many there were once one is served again.
pub struct Gate {
    what: &'static str,
    permits: Arc<Semaphore>,
    max: usize,
    refused: u64,
}

impl Gate {
    pub fn new(what: &'static str, max: usize) -> Gate {
        Gate {
            what,
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: 0,
        }
    }

    /// The next connection admitted, until `stop`. Failed accepts are
    /// logged and retried after a pause (they are mostly fd exhaustion).
    pub async fn accept<T, F>(
        &mut self,
        stop: &CancellationToken,
        mut accept: impl FnMut() -> F,
    ) -> Option<(T, OwnedSemaphorePermit)>
    where
        F: std::future::Future<Output = std::io::Result<T>>,
    {
        loop {
            // Cancel-safe: a cancelled `accept` loses no connection.
            let accepted = tokio::select! {
                r = accept() => r,
                () = stop.cancelled() => return None,
            };
            match accepted {
                Ok(conn) => {
                    if let Some(permit) = self.admit() {
                        return Some((conn, permit));
                    }
                }
                Err(e) => {
                    warn!(error = %e, service = self.what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            if self.refused == 0 {
                warn!(target: "qmpmux::audit", service = self.what, max = self.max,
                    "connection refused: the service has its maximum number of connections \
                     (further refusals are counted, not logged)");
            }
            self.refused += 1;
            return None;
        };
        if self.refused > 0 {
            warn!(target: "qmpmux::audit", service = self.what, refused = self.refused,
                "connections were refused while the service had its maximum number");
            self.refused = 0;
        }
        Some(permit)
    }
}
