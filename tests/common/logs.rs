//! What qmpmux logs, captured for tests that check the audit log.
//!
//! The capture is the process's global subscriber: a test binary that uses
//! it must call [`logs`] in every test before starting qmpmux, or the
//! harness's own subscriber may be installed first.

use std::sync::{Mutex, OnceLock};

/// Everything logged (at info and above) by this test binary so far.
pub fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: &'static Mutex<Vec<u8>> = Box::leak(Box::default());
        tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Capture(buf))
            .init();
        buf
    })
}

/// Whether `what` has been logged.
pub fn logged(what: &str) -> bool {
    String::from_utf8_lossy(&logs().lock().unwrap()).contains(what)
}

struct Capture(&'static Mutex<Vec<u8>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
