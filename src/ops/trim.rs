//! Giving memory back to the system after many clients leave.
//!
//! glibc keeps what a program frees in its arenas for later use, so a
//! daemon that once had 10,000 clients would keep their 33 MB (measured:
//! 43 MB RSS with them, still 43 MB after they all left). Once the client
//! count has fallen well below its high-water mark, `malloc_trim` hands the
//! free pages back (43 -> 11 MB in the same test).

use tracing::debug;

/// Trim once this many clients have left since the most there were: about
/// a megabyte of client memory (3.3 KiB each), worth a system call.
const TRIM_AFTER: usize = 256;

/// When to trim, fed the number of connected clients (over all VMs) now
/// and then: after a fall of [`TRIM_AFTER`] from the high-water mark, which
/// then starts again from the new level.
#[derive(Debug, Default)]
pub struct HighWater {
    high: usize,
}

impl HighWater {
    /// Looks at the client count; trims when it has fallen far enough.
    pub fn observe(&mut self, clients: usize) {
        if self.should_trim(clients) {
            debug!(clients, "returning freed memory to the system");
            release_free_memory();
        }
    }

    fn should_trim(&mut self, now: usize) -> bool {
        if now >= self.high {
            self.high = now;
            false
        } else if self.high - now >= TRIM_AFTER {
            self.high = now;
            true
        } else {
            false
        }
    }
}

/// Hands free heap pages back to the kernel (glibc only; elsewhere the
/// allocator is left to its own policy).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free
    // lists, under its own locks; it may be called from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_large_fall_from_the_high_water_mark_only() {
        let mut m = HighWater::default();
        assert!(!m.should_trim(0));
        assert!(!m.should_trim(10_000));
        // Churn around a level: nothing to give back.
        assert!(!m.should_trim(10_000 - TRIM_AFTER + 1));
        assert!(!m.should_trim(10_000));
        // A large fall: once, then the mark starts from there.
        assert!(m.should_trim(10_000 - TRIM_AFTER));
        assert!(!m.should_trim(10_000 - TRIM_AFTER - 1));
        assert!(m.should_trim(0));
        assert!(!m.should_trim(0));
        // Growing again raises the mark.
        assert!(!m.should_trim(300));
        assert!(m.should_trim(300 - TRIM_AFTER));
    }
}
