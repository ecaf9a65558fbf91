//! The exclusive lease one client may hold on a VM for multi-step work
//! (migration, block jobs, fsfreeze): while it is held, other clients'
//! commands that could change the VM are refused. Pure: the session owns
//! it, gives it the time and randomness, and runs the timer for its expiry.
//!
//! Each lease has a token. A socket client's connection is its identity
//! (it gets the token too); a NATS requester has no connection of its own,
//! so there the token, sent with each command, is the only proof of being
//! the holder, and a command naming an ended lease is refused (fencing).

pub use crate::state::LeaseHolder as Held;
use crate::state::LeaseToken;
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

/// Who asks: a client of the session, and the lease token its command
/// carries, if any (`Qmpmux-Lease` over NATS).
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub client: u64,
    pub token: Option<&'a LeaseToken>,
}

/// A request for the lease.
#[derive(Debug, Clone)]
pub struct Ask {
    /// The claiming client's connection identifies the holder too (a
    /// socket client; not a NATS requester).
    pub connection: bool,
    /// The holder as people know it.
    pub who: String,
    pub reason: String,
    pub seconds: u64,
}

/// Why a command may not run now.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused<'a> {
    /// Someone else holds an unexpired lease.
    Held(&'a Held),
    /// The command names a lease (by its token) that is no longer held:
    /// its holder must not go on as if it were (fencing).
    Stale,
}

/// Why a lease was not granted.
#[derive(Debug, PartialEq, Eq)]
pub enum NotGranted {
    /// Someone else holds it (no queueing).
    Held(Box<Held>),
    /// No token could be made (the system's random source failed).
    NoToken(String),
}

#[derive(Debug, Default)]
pub struct Lease {
    held: Option<Held>,
    /// Leases granted on this VM so far: the token's fencing number.
    granted: u64,
}

impl Lease {
    /// `claim` asks for the lease. Granted when free (with a new token
    /// from `random`, 16 random bytes), or renewed when `claim` is the
    /// holder (same token and holder, new reason and time); `Err` with the
    /// holder when someone else holds it.
    pub fn acquire(
        &mut self,
        claim: Claim<'_>,
        ask: Ask,
        now: Instant,
        random: impl FnOnce() -> std::io::Result<[u8; 16]>,
    ) -> Result<&Held, NotGranted> {
        let Ask {
            connection,
            who,
            reason,
            seconds,
        } = ask;
        let until = now + Duration::from_secs(seconds);
        match &mut self.held {
            Some(h) if h.is_holder(claim) => {
                h.reason = reason;
                h.until = until;
            }
            // Even if its time is up: the timer ends it (and says so) first.
            Some(h) => return Err(NotGranted::Held(Box::new(h.clone()))),
            None => {
                let bytes = random().map_err(|e| NotGranted::NoToken(e.to_string()))?;
                self.granted += 1;
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                self.held = Some(Held {
                    client: claim.client,
                    connection,
                    who,
                    reason,
                    until,
                    token: LeaseToken::new(format!("{}-{hex}", self.granted)),
                });
            }
        }
        Ok(self.held.as_ref().expect("just set"))
    }

    /// `claim` gives the lease back; `None` if it does not hold it.
    pub fn release(&mut self, claim: Claim<'_>) -> Option<Held> {
        self.held.take_if(|h| h.is_holder(claim))
    }

    /// Client `client` left: the lease ends if its connection held it.
    pub fn disconnected(&mut self, client: u64) -> Option<Held> {
        self.held.take_if(|h| h.connection && h.client == client)
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

    /// The lease the previous process handed over (its token's number
    /// goes on counting).
    pub fn restore(&mut self, held: Held) {
        let n = held.token.as_str().split('-').next().and_then(|n| n.parse().ok());
        self.granted = self.granted.max(n.unwrap_or(0));
        self.held = Some(held);
    }

    /// When the lease runs out.
    pub fn deadline(&self) -> Option<Instant> {
        self.held.as_ref().map(|h| h.until)
    }

    /// Whether `claim` may run a command that is not exempt now: `Err`
    /// when another holds an unexpired lease, or when the command names a
    /// lease (by token) that is not the one held now.
    pub fn check(&self, claim: Claim<'_>, now: Instant) -> Result<(), Refused<'_>> {
        let live = self.held.as_ref().filter(|h| h.until > now);
        if let Some(token) = claim.token {
            if !live.is_some_and(|h| h.token.matches(token)) {
                return Err(Refused::Stale);
            }
        }
        match live {
            Some(h) if !h.is_holder(claim) => Err(Refused::Held(h)),
            _ => Ok(()),
        }
    }
}

impl Held {
    /// Whether `claim` is this lease's holder: its token, or the holding
    /// connection.
    fn is_holder(&self, claim: Claim<'_>) -> bool {
        (self.connection && self.client == claim.client) || claim.token.is_some_and(|t| self.token.matches(t))
    }
}

/// 16 bytes from the system's random source, for a lease token.
pub fn random_bytes() -> std::io::Result<[u8; 16]> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(client: u64) -> Claim<'static> {
        Claim { client, token: None }
    }

    fn random() -> std::io::Result<[u8; 16]> {
        Ok([7; 16])
    }

    fn take(l: &mut Lease, claim: Claim<'_>, connection: bool, seconds: u64, t: Instant) -> Result<Held, NotGranted> {
        let ask = Ask {
            connection,
            who: format!("client {}", claim.client),
            reason: "migration".into(),
            seconds,
        };
        l.acquire(claim, ask, t, random).cloned()
    }

    #[test]
    fn one_holder_at_a_time_renewals_allowed() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        let first = take(&mut l, socket(1), true, 30, t0).unwrap();
        assert_eq!(first.token.as_str(), format!("1-{}", "07".repeat(16)));
        let Err(NotGranted::Held(busy)) = take(&mut l, socket(2), true, 5, t0) else {
            panic!("granted twice")
        };
        assert_eq!(busy.client, 1);
        // The holder renews: same token, new time.
        let renewed = take(&mut l, socket(1), true, 60, t0).unwrap();
        assert_eq!(renewed.until, t0 + Duration::from_secs(60));
        assert_eq!(renewed.token, first.token);
        assert_eq!(l.check(socket(1), t0), Ok(()));
        let Err(Refused::Held(held)) = l.check(socket(2), t0) else {
            panic!("not refused")
        };
        let text = held.refusal("vm1", t0 + Duration::from_millis(500));
        assert!(text.contains("VM 'vm1'") && text.contains("client 1") && text.contains("(migration)"));
        assert!(text.contains("60 more seconds"), "{text}");
    }

    #[test]
    fn release_only_by_the_holder_and_expiry() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        take(&mut l, socket(1), true, 10, t0).unwrap();
        assert_eq!(l.release(socket(2)), None);
        assert!(l.expire(t0 + Duration::from_secs(9)).is_none());
        // Past its time it is no longer enforced, even before the timer.
        assert_eq!(l.check(socket(2), t0 + Duration::from_secs(10)), Ok(()));
        assert_eq!(l.expire(t0 + Duration::from_secs(10)).map(|h| h.client), Some(1));
        assert!(l.holder().is_none());
        take(&mut l, socket(2), true, 10, t0).unwrap();
        assert_eq!(l.release(socket(2)).map(|h| h.client), Some(2));
        assert_eq!(l.deadline(), None);
    }

    /// Over NATS the token is the holder: not the lane the lease came in
    /// on, which other requesters may share.
    #[test]
    fn a_token_lease_is_held_by_the_token_only() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        let held = take(&mut l, socket(5), false, 30, t0).unwrap();
        let token = held.token.clone();
        let with = Claim {
            client: 9,
            token: Some(&token),
        };
        // The same lane without the token is not the holder...
        assert!(matches!(l.check(socket(5), t0), Err(Refused::Held(_))));
        assert_eq!(l.release(socket(5)), None);
        assert!(matches!(
            take(&mut l, socket(5), false, 30, t0),
            Err(NotGranted::Held(_))
        ));
        // ...nor does its lane leaving end the lease.
        assert_eq!(l.disconnected(5), None);
        // Any lane with the token is.
        assert_eq!(l.check(with, t0), Ok(()));
        assert_eq!(take(&mut l, with, false, 60, t0).unwrap().token, token);
        assert_eq!(l.release(with).map(|h| h.token), Some(token.clone()));
        // Once it ended, its token fences: refused, even with no lease held.
        assert_eq!(l.check(with, t0), Err(Refused::Stale));
        let other = take(&mut l, socket(6), true, 30, t0).unwrap();
        assert_ne!(other.token, token);
        assert!(other.token.as_str().starts_with("2-"), "{:?}", other.token.as_str());
        assert_eq!(l.check(with, t0), Err(Refused::Stale));
        // A socket holder's token works from anywhere too.
        let theirs = Claim {
            client: 9,
            token: Some(&other.token),
        };
        assert_eq!(l.check(theirs, t0), Ok(()));
        assert_eq!(l.disconnected(6).map(|h| h.client), Some(6));
    }

    #[test]
    fn no_token_no_lease() {
        let mut l = Lease::default();
        let ask = Ask {
            connection: true,
            who: "a".into(),
            reason: String::new(),
            seconds: 5,
        };
        let failed = l.acquire(socket(1), ask, Instant::now(), || {
            Err(std::io::Error::other("no entropy"))
        });
        assert!(matches!(failed, Err(NotGranted::NoToken(_))));
        assert!(l.holder().is_none());
    }

    #[test]
    fn tokens_compare_whole() {
        let a = LeaseToken::new("1-abc");
        assert!(a.matches(&LeaseToken::new("1-abc")));
        assert!(!a.matches(&LeaseToken::new("1-abd")));
        assert!(!a.matches(&LeaseToken::new("1-ab")));
        assert_eq!(format!("{a:?}"), "LeaseToken(..)");
    }
}
