//! Capped exponential backoff with jitter, for reconnecting to QEMU.

use crate::config::BackoffOptions;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    opts: BackoffOptions,
    /// The delay before jitter that the next failure gets.
    next: Duration,
}

impl Backoff {
    pub fn new(opts: BackoffOptions) -> Self {
        Backoff {
            opts,
            next: opts.initial,
        }
    }

    /// Back to the initial delay, after a connection that worked.
    pub fn reset(&mut self) {
        self.next = self.opts.initial;
    }

    /// The delay before the next attempt; `unit` is a random number in
    /// [0, 1) that places it within the jitter band.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let base = self.next;
        let grown = base.as_secs_f64() * self.opts.multiplier;
        self.next = Duration::from_secs_f64(grown.min(self.opts.max.as_secs_f64()));
        let factor = 1.0 + self.opts.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64(base.as_secs_f64() * factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(jitter: f64) -> BackoffOptions {
        BackoffOptions {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter,
        }
    }

    #[test]
    fn grows_then_caps() {
        let mut b = Backoff::new(opts(0.0));
        let got: Vec<u128> = (0..8).map(|_| b.next_delay(0.5).as_millis()).collect();
        assert_eq!(got, vec![50, 100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(opts(0.0));
        for _ in 0..5 {
            b.next_delay(0.0);
        }
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    #[test]
    fn jitter_stays_within_its_band() {
        let mut lo = Backoff::new(opts(0.2));
        let mut hi = Backoff::new(opts(0.2));
        for _ in 0..10 {
            let (l, h) = (lo.next_delay(0.0), hi.next_delay(1.0));
            assert!(h > l);
            assert!((h.as_secs_f64() / l.as_secs_f64() - 1.2 / 0.8).abs() < 1e-9);
        }
        assert!(hi.next_delay(1.0) <= Duration::from_millis(1200));
    }
}
