//! Error helpers shared by every module. Each module has its own typed
//! errors (thiserror); the one mapping to QMP wire errors is
//! [`crate::upstream::FailKind::to_qmp`].

/// Formats an error with its sources: `outer: inner: root`.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
