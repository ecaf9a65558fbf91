//! Operating qmpmux: what it offers operators beside the QMP sockets.
//! - [`control`]: the control socket behind `qmpmux status`.
//! - [`metrics`]: the Prometheus metrics and their HTTP endpoint.
//! - `exposition`: its two text formats, OpenMetrics and Prometheus's 0.0.4.
//! - [`gate`]: the connection cap both serve behind.
//! - [`logging`]: journal priorities, escaped text fields, and the
//!   reopenable `log_file`.
//! - [`escape`]: text others control, made safe to show (logs, status).
//! - [`systemd`]: readiness notifications, and the watchdog, fed while the
//!   VM threads answer.
//! - [`trim`]: freed memory handed back after many clients leave.
//! - [`demo`]: the demo VM `qmpmux` serves when no VM is configured.
//! - [`tap`]: `qmpmux tap`, a VM's traffic on the control socket.

pub mod control;
pub mod demo;
pub mod escape;
mod exposition;
mod gate;
pub mod logging;
pub mod metrics;
pub mod systemd;
pub mod tap;
pub mod trim;
