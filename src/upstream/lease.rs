//! The exclusive lease one client may hold on a VM for multi-step work
//! (migration, block jobs, fsfreeze): while it is held, other clients'
//! commands that could change the VM are refused. Pure: the session owns
//! it, gives it the time, and runs the timer for its expiry.

pub use crate::state::LeaseHolder as Held;
use std::time::{Duration, Instant};

/// How a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Released,
    Disconnected,
    Expired,
}

impl Ended {
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Released => "released",
            Ended::Disconnected => "holder disconnected",
            Ended::Expired => "expired",
        }
    }
}

/// Whether `command` runs even while another client holds the lease:
/// queries, and what `[client] lease_exempt` names.
pub fn exempt(command: &str, lease_exempt: &[crate::policy::Glob]) -> bool {
    command.starts_with("query-") || lease_exempt.iter().any(|g| g.matches(command))
}

#[derive(Debug, Default)]
pub struct Lease {
    held: Option<Held>,
}

impl Lease {
    /// Client `client` asks for the lease for `seconds`. Granted when free
    /// (or held by it already: renewed); `Err` with the holder when another
    /// client holds it (no queueing).
    pub fn acquire(
        &mut self,
        client: u64,
        who: String,
        reason: String,
        seconds: u64,
        now: Instant,
    ) -> Result<&Held, Held> {
        match &self.held {
            Some(h) if h.client != client => Err(h.clone()),
            _ => Ok(self.held.insert(Held {
                client,
                who,
                reason,
                until: now + Duration::from_secs(seconds),
            })),
        }
    }

    /// Client `client` gives the lease back; `None` if it did not hold it.
    pub fn release(&mut self, client: u64) -> Option<Held> {
        self.held.take_if(|h| h.client == client)
    }

    /// The lease, if it has run out by `now`.
    pub fn expire(&mut self, now: Instant) -> Option<Held> {
        self.held.take_if(|h| h.until <= now)
    }

    /// The holder, if any (even if its time is up and the timer has not
    /// fired yet: [`Lease::check`] no longer enforces it).
    pub fn holder(&self) -> Option<&Held> {
        self.held.as_ref()
    }

    /// When the lease runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| h.until)
    }

    /// Whether `client` may run a command that is not exempt now: `Err`
    /// with the holder when another client holds an unexpired lease.
    pub fn check(&self, client: u64, now: Instant) -> Result<(), &Held> {
        match &self.held {
            Some(h) if h.client != client && h.until > now => Err(h),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_renewals_allowed() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        assert!(l.acquire(1, "client 1".into(), "migration".into(), 30, t0).is_ok());
        let busy = l.acquire(2, "client 2".into(), String::new(), 5, t0).unwrap_err();
        assert_eq!(busy.client, 1);
        // The holder renews.
        let renewed = l.acquire(1, "client 1".into(), "migration".into(), 60, t0).unwrap();
        assert_eq!(renewed.until, t0 + Duration::from_secs(60));
        assert_eq!(l.check(1, t0), Ok(()));
        let held = l.check(2, t0).unwrap_err();
        let text = held.refusal("vm1", t0 + Duration::from_millis(500));
        assert!(text.contains("VM 'vm1'") && text.contains("client 1") && text.contains("(migration)"));
        assert!(text.contains("60 more seconds"), "{text}");
    }

    #[test]
    fn release_only_by_the_holder_and_expiry() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        l.acquire(1, "a".into(), String::new(), 10, t0).unwrap();
        assert_eq!(l.release(2), None);
        assert!(l.expire(t0 + Duration::from_secs(9)).is_none());
        // Past its time it is no longer enforced, even before the timer.
        assert_eq!(l.check(2, t0 + Duration::from_secs(10)), Ok(()));
        assert_eq!(l.expire(t0 + Duration::from_secs(10)).map(|h| h.client), Some(1));
        assert!(l.holder().is_none());
        l.acquire(2, "b".into(), String::new(), 10, t0).unwrap();
        assert_eq!(l.release(2).map(|h| h.client), Some(2));
        assert_eq!(l.deadline(), None);
    }
}
