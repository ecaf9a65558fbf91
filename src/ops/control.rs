//! The control socket, through which `qmpmux status` asks the running
//! daemon how its VMs are, and `qmpmux reload` has it reload its
//! configuration file.
//!
//! Protocol: the client sends one request line, `status` or `reload`; the
//! daemon answers one JSON line ([`StatusReport`], [`ReloadReply`]) and
//! closes. It serves a limited number of connections at once and gives
//! each a time limit ([`Gate`]), so that idle peers cannot use up qmpmux's
//! file descriptors. Whoever may connect may reload: the socket has the
//! same permissions as the VMs' sockets, whose clients control the VMs.
//!
//! `tap VM [FILTERS]` turns the connection into a stream of the VM's
//! traffic (see [`super::tap`]): it leaves the slots above for a few of
//! its own ([`super::tap::MAX_TAPS`]), and lasts as long as the peer
//! wants.

use super::escape::{escaped, quoted};
use super::gate::Gate;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// One VM as `qmpmux status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmStatus {
    pub name: String,
    pub upstream: String,
    pub upstream_mode: String,
    pub listen: String,
    /// The upstream runstate its thread last published, or
    /// [`UNRESPONSIVE`] when that thread did not answer a probe.
    pub runstate: String,
    /// Whether the thread serving the VM ran a probe task within
    /// [`RESPONSIVE_WITHIN`] when the report was made. When it did not,
    /// the VM's clients get no answers, and its other fields are what it
    /// last recorded. (Absent from an older daemon's report: true.)
    #[serde(default = "yes")]
    pub responding: bool,
    /// QEMU's greeting's `version` object (`{"qemu": {"major": ...},
    /// "package": ...}`) once connected.
    pub qemu_version: Option<serde_json::Value>,
    pub clients: i64,
    pub in_flight: i64,
    pub queued: i64,
    /// Successful upstream connections; reconnects are this minus one.
    pub connections: u64,
    pub commands: u64,
    pub errors: u64,
    pub events: u64,
    pub last_error: Option<String>,
    /// Who holds the VM's lease (`__org.qmpmux_lease`), if anyone.
    #[serde(default)]
    pub lease: Option<LeaseStatus>,
}

/// A held lease, as `qmpmux status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseStatus {
    pub client: u64,
    pub holder: String,
    pub reason: String,
    pub seconds_left: u64,
}

fn yes() -> bool {
    true
}

/// The runstate shown for a VM whose thread did not answer.
pub const UNRESPONSIVE: &str = "unresponsive";

/// How long a VM's thread gets to run a probe task before the VM is
/// reported unresponsive. A command takes microseconds; a thread this late
/// is blocked, not busy.
pub const RESPONSIVE_WITHIN: Duration = Duration::from_secs(1);

impl VmStatus {
    /// Marks the VM as not responding: its thread did not run a probe.
    pub fn mark_unresponsive(&mut self) {
        self.responding = false;
        self.runstate = UNRESPONSIVE.into();
    }
}

/// The daemon as `qmpmux status` shows it. Fields an older daemon does not
/// send are left at their defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// The daemon's version (`qmpmux --version`).
    #[serde(default)]
    pub version: String,
    /// When it started, in Unix time (seconds).
    #[serde(default)]
    pub started_at: f64,
    #[serde(default)]
    pub uptime_seconds: f64,
    /// The last `SIGHUP`; `None` if there was none.
    #[serde(default)]
    pub last_reload: Option<ReloadStatus>,
    /// Restarts of qmpmux itself that clients did not see (re-execution,
    /// restart under systemd) and crash recoveries.
    #[serde(default)]
    pub handover: Option<crate::handover::Counts>,
    pub vms: Vec<VmStatus>,
    /// The NATS connection, with `[nats]`.
    #[serde(default)]
    pub nats: Option<NatsStatus>,
}

/// The NATS side (`[nats]`) as `qmpmux status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NatsStatus {
    pub servers: Vec<String>,
    /// `connected`, `disconnected` or `pending` (not connected yet).
    pub state: String,
    pub prefix: String,
    pub stream: Option<String>,
    pub commands: bool,
    pub published: u64,
    pub acknowledged: u64,
    /// Events numbered and not acknowledged yet, over all VMs.
    pub pending: i64,
    /// Events that fell out of a history before they were published.
    pub dropped: u64,
    pub reconnects: u64,
}

/// The outcome of a configuration reload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReloadStatus {
    /// When, in Unix time (seconds).
    pub at: f64,
    pub ok: bool,
    /// Why it failed: the file rejected, or a socket that could not be bound.
    pub error: Option<String>,
}

/// Asks the supervisor for a report.
pub type StatusQuery = oneshot::Sender<StatusReport>;

/// What the control socket asks of the supervisor.
#[derive(Debug)]
pub enum ControlRequest {
    Status(StatusQuery),
    /// Reload the configuration file the daemon was started with, as
    /// SIGHUP does, and say how it went.
    Reload(oneshot::Sender<ReloadReply>),
    /// Attach a tap to VM `vm`; no such VM: the names of those there are.
    Tap {
        vm: String,
        reply: oneshot::Sender<Result<crate::upstream::tap::Tap, Vec<String>>>,
    },
}

/// The outcome of `reload` on the control socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ReloadReply {
    pub ok: bool,
    /// The file was rejected (unreadable or invalid): nothing changed.
    #[serde(default)]
    pub rejected: bool,
    /// Why it failed, as the daemon logged it.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub added: Vec<String>,
    #[serde(default)]
    pub removed: Vec<String>,
    #[serde(default)]
    pub restarted: Vec<String>,
    #[serde(default)]
    pub unchanged: Vec<String>,
    /// Settings that changed in the file but take effect only when qmpmux
    /// restarts (`control_socket`, `metrics_listen`, `threads`, logging).
    #[serde(default)]
    pub need_restart: Vec<String>,
}

/// Control connections served at once; more are closed at once.
pub const CONTROL_MAX_CONNECTIONS: usize = 16;

/// How long a control connection may take to send its request, and a
/// status report to be made and written.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a reload may take: restarting a VM waits up to
/// [`crate::STOP_GRACE`] for its clients' replies. Below systemd's default
/// `TimeoutSec=` for `ExecReload=` (90 s).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest request line.
const MAX_REQUEST: u64 = 16 << 10;

/// Serves the control socket until `stop`; taps get an `end` line then.
pub async fn serve_control(listener: UnixListener, requests: mpsc::Sender<ControlRequest>, stop: CancellationToken) {
    let mut gate = Gate::new("control socket", CONTROL_MAX_CONNECTIONS);
    let taps = Taps {
        slots: std::sync::Arc::new(tokio::sync::Semaphore::new(super::tap::MAX_TAPS)),
        running: tokio_util::task::TaskTracker::new(),
        stop: stop.clone(),
    };
    while let Some(((stream, _), permit)) = gate.accept(&stop, || listener.accept()).await {
        let requests = requests.clone();
        let taps = taps.clone();
        tokio::spawn(async move {
            let _ = answer(stream, requests, permit, &taps).await;
        });
    }
    taps.running.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), taps.running.wait()).await;
}

/// The taps' own slots, and their tasks (waited for briefly at the end,
/// so that each gets its `end` line out).
#[derive(Clone)]
struct Taps {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    running: tokio_util::task::TaskTracker,
    stop: CancellationToken,
}

async fn answer(
    stream: UnixStream,
    requests: mpsc::Sender<ControlRequest>,
    permit: tokio::sync::OwnedSemaphorePermit,
    taps: &Taps,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    tokio::time::timeout(CONTROL_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| timed_out())??;
    if let Some(rest) = line.trim().strip_prefix("tap ") {
        // Long-lived: out of the gate's slots, into the taps'.
        drop(permit);
        let read = reader.into_inner().into_inner();
        return tap(rest, read, write, requests, taps).await;
    }
    let (request, pending) = match line.trim() {
        "status" => {
            let (tx, rx) = oneshot::channel();
            (ControlRequest::Status(tx), Reply::Status(rx))
        }
        "reload" => {
            let (tx, rx) = oneshot::channel();
            (ControlRequest::Reload(tx), Reply::Reload(rx))
        }
        other => {
            let other = escaped(other);
            let reply = serde_json::json!({ "error": format!("unknown request \"{other}\"; try \"status\", \"reload\" or \"tap VM\"") });
            return write_line(&mut write, &reply.to_string()).await;
        }
    };
    if requests.send(request).await.is_err() {
        return Ok(());
    }
    let reply = match pending {
        Reply::Status(rx) => match tokio::time::timeout(CONTROL_TIMEOUT, rx).await {
            Ok(Ok(report)) => super::escape::to_json(&report, false),
            _ => return Ok(()),
        },
        Reply::Reload(rx) => match tokio::time::timeout(RELOAD_TIMEOUT, rx).await {
            Ok(Ok(reply)) => super::escape::to_json(&reply, false),
            _ => return Ok(()),
        },
    };
    tokio::time::timeout(CONTROL_TIMEOUT, write_line(&mut write, &reply))
        .await
        .map_err(|_| timed_out())?
}

/// `tap VM [FILTERS]` (`rest` is what follows `tap `): the VM's traffic
/// until the peer closes, or an `error` line.
async fn tap(
    rest: &str,
    read: tokio::net::unix::OwnedReadHalf,
    mut write: tokio::net::unix::OwnedWriteHalf,
    requests: mpsc::Sender<ControlRequest>,
    taps: &Taps,
) -> std::io::Result<()> {
    use super::tap::{error, Filter, Filters};
    let (vm, filters) = rest.trim().split_once(char::is_whitespace).unwrap_or((rest.trim(), ""));
    let filters = match filters.trim() {
        "" => Ok(Filters::default()),
        json => serde_json::from_str::<Filters>(json).map_err(|e| format!("bad filters: {e}")),
    };
    let filter = match filters.and_then(Filter::new) {
        Ok(f) => f,
        Err(e) => return write_line(&mut write, error("usage", &e).trim_end()).await,
    };
    let Ok(slot) = taps.slots.clone().try_acquire_owned() else {
        let busy = format!("qmpmux serves {} taps at once, and has them", super::tap::MAX_TAPS);
        return write_line(&mut write, error("busy", &busy).trim_end()).await;
    };
    let (reply, answer) = oneshot::channel();
    let vm = vm.to_string();
    if requests
        .send(ControlRequest::Tap { vm: vm.clone(), reply })
        .await
        .is_err()
    {
        return Ok(());
    }
    let tap = match tokio::time::timeout(CONTROL_TIMEOUT, answer).await {
        Ok(Ok(Ok(tap))) => tap,
        Ok(Ok(Err(known))) => {
            let known = if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            };
            let text = format!("no VM '{vm}' in qmpmux (VMs: {known})");
            return write_line(&mut write, error("unknown-vm", &text).trim_end()).await;
        }
        _ => return Ok(()),
    };
    // Served on the background thread, which yields to the VMs' threads:
    // the connection moves to its runtime.
    let stream = read
        .reunite(write)
        .map_err(|_| std::io::Error::other("a connection's halves do not match"))?
        .into_std()?;
    let stop = taps.stop.clone();
    let served = taps.running.track_future(async move {
        let (read, write) = UnixStream::from_std(stream)?.into_split();
        let result = super::tap::serve(read, write, &vm, tap, filter, &stop).await;
        drop(slot);
        result
    });
    crate::runtime::background::handle()?.spawn(served);
    Ok(())
}

/// Where the supervisor's answer comes from.
enum Reply {
    Status(oneshot::Receiver<StatusReport>),
    Reload(oneshot::Receiver<ReloadReply>),
}

async fn write_line(write: &mut (impl AsyncWriteExt + Unpin), line: &str) -> std::io::Result<()> {
    write.write_all(line.as_bytes()).await?;
    write.write_all(b"\n").await
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot reach qmpmux's control socket {0} (is qmpmux running? see `control_socket`)")]
    Connect(String, #[source] std::io::Error),
    #[error("talking to qmpmux")]
    Io(#[from] std::io::Error),
    #[error("unexpected answer from qmpmux: {0}")]
    Answer(String),
}

/// The client side of `qmpmux status`.
pub async fn query_status(path: &Path) -> Result<StatusReport, QueryError> {
    ask(path, "status").await
}

/// The client side of `qmpmux reload`: waits for the outcome.
pub async fn request_reload(path: &Path) -> Result<ReloadReply, QueryError> {
    ask(path, "reload").await
}

async fn ask<T: serde::de::DeserializeOwned>(path: &Path, request: &str) -> Result<T, QueryError> {
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| QueryError::Connect(path.display().to_string(), e))?;
    stream.write_all(format!("{request}\n").as_bytes()).await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    serde_json::from_str(text.trim()).map_err(|_| QueryError::Answer(escaped(&text)))
}

/// A reload's outcome for humans: what changed, or why nothing did.
pub fn render_reload(reply: &ReloadReply) -> String {
    if !reply.ok {
        let what = if reply.rejected {
            "configuration rejected; the running one is kept"
        } else {
            "reload failed; running VMs unchanged"
        };
        let why = reply.error.as_deref().unwrap_or("no reason given");
        return format!("qmpmux: {what}: {}\n", escaped(why));
    }
    let list = |names: &[String]| names.iter().map(|n| escaped(n)).collect::<Vec<_>>().join(", ");
    let mut out = String::from("reloaded");
    for (label, names) in [
        ("added", &reply.added),
        ("removed", &reply.removed),
        ("restarted", &reply.restarted),
    ] {
        if !names.is_empty() {
            let _ = write!(out, "; {label}: {}", list(names));
        }
    }
    let _ = writeln!(out, "; {} VM(s) unchanged", reply.unchanged.len());
    for setting in &reply.need_restart {
        let _ = writeln!(
            out,
            "note: {setting} changed; it takes effect only when qmpmux restarts"
        );
    }
    out
}

/// A table for humans, then a line about the daemon. Text from elsewhere
/// (a lease's reason and holder, QEMU's errors) is escaped, so that no
/// value can pass for a line or reach the terminal as control characters;
/// the lease's reason, free text, is quoted.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<13} {:>7} {:>9} {:>10} {:>10} {:>8}  LAST ERROR",
        "VM", "RUNSTATE", "CLIENTS", "IN FLIGHT", "RECONNECTS", "COMMANDS", "ERRORS"
    );
    for vm in &report.vms {
        let _ = writeln!(
            out,
            "{:<16} {:<13} {:>7} {:>9} {:>10} {:>10} {:>8}  {}",
            escaped(&vm.name),
            escaped(&vm.runstate),
            vm.clients,
            vm.in_flight,
            vm.connections.saturating_sub(1),
            vm.commands,
            vm.errors,
            vm.last_error.as_deref().map_or("-".into(), escaped)
        );
    }
    let stuck: Vec<String> = report
        .vms
        .iter()
        .filter(|vm| !vm.responding)
        .map(|vm| escaped(&vm.name))
        .collect();
    for vm in &report.vms {
        if let Some(l) = &vm.lease {
            let reason = if l.reason.is_empty() {
                String::new()
            } else {
                format!(", reason {}", quoted(&l.reason))
            };
            let _ = writeln!(
                out,
                "LEASED: {} by {}{reason}, {} s left",
                escaped(&vm.name),
                escaped(&l.holder),
                l.seconds_left
            );
        }
    }
    if !stuck.is_empty() {
        let _ = writeln!(
            out,
            "NOT RESPONDING: {} (the thread serving {} did not run a probe within {} s: \
             {} clients get no answers; the other columns are the last values recorded)",
            stuck.join(", "),
            if stuck.len() == 1 { "it" } else { "them" },
            RESPONSIVE_WITHIN.as_secs(),
            if stuck.len() == 1 { "its" } else { "their" },
        );
    }
    if let Some(n) = &report.nats {
        let _ = writeln!(
            out,
            "NATS: {} ({}), prefix {}{}, {} published, {} acknowledged, {} pending, {} dropped, {} reconnects",
            escaped(&n.state),
            escaped(&n.servers.join(", ")),
            escaped(&n.prefix),
            n.stream
                .as_ref()
                .map(|s| format!(", stream {}", escaped(s)))
                .unwrap_or_default(),
            n.published,
            n.acknowledged,
            n.pending,
            n.dropped,
            n.reconnects
        );
    }
    let up = report.uptime_seconds as u64;
    let _ = write!(
        out,
        "qmpmux {}, up {}d {:02}:{:02}:{:02}; last reload: ",
        escaped(&report.version),
        up / 86400,
        up / 3600 % 24,
        up / 60 % 60,
        up % 60
    );
    let _ = match &report.last_reload {
        None => writeln!(out, "none"),
        Some(r) => {
            let ago = (report.started_at + report.uptime_seconds - r.at).max(0.0) as u64;
            match &r.error {
                None => writeln!(out, "ok, {ago} s ago"),
                Some(e) => writeln!(out, "FAILED, {ago} s ago: {}", escaped(e)),
            }
        }
    };
    if let Some(h) = report
        .handover
        .as_ref()
        .filter(|h| h.handovers + h.crash_recoveries > 0)
    {
        let _ = write!(out, "handovers: {}", h.handovers);
        if let Some(pause) = h.last_pause_seconds {
            let _ = write!(
                out,
                " (last: {:.1} ms pause, {} clients handed over, {} closed)",
                pause * 1000.0,
                h.clients_handed_over,
                h.clients_closed
            );
        }
        let _ = writeln!(
            out,
            "; crash recoveries: {}; fallbacks to the crash path: {}",
            h.crash_recoveries, h.fallbacks
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmStatus {
        VmStatus {
            name: name.into(),
            upstream: "/q.sock".into(),
            upstream_mode: "connect".into(),
            listen: "/l.sock".into(),
            runstate: "running".into(),
            responding: true,
            qemu_version: None,
            clients: 2,
            in_flight: 0,
            queued: 0,
            connections: 1,
            commands: 5,
            errors: 0,
            events: 0,
            last_error: None,
            lease: None,
        }
    }

    #[test]
    fn an_unresponsive_vm_is_shown_as_such() {
        let mut frozen = vm("web01");
        frozen.mark_unresponsive();
        let report = StatusReport {
            vms: vec![frozen, vm("db01")],
            ..StatusReport::default()
        };
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[1].starts_with("web01            unresponsive        2"), "{text}");
        assert!(lines[2].starts_with("db01             running             2"), "{text}");
        assert!(
            lines[3].starts_with("NOT RESPONDING: web01 (the thread serving it"),
            "{text}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["vms"][0]["responding"], false);
        assert_eq!(json["vms"][0]["runstate"], "unresponsive");
        assert_eq!(json["vms"][1]["responding"], true);
        // All well: no such line.
        let fine = StatusReport {
            vms: vec![vm("db01")],
            ..StatusReport::default()
        };
        assert!(!render(&fine).contains("NOT RESPONDING"));
    }

    #[test]
    fn the_nats_connection_is_shown() {
        let mut report = StatusReport::default();
        report.vms.push(vm("web01"));
        assert!(!render(&report).contains("NATS"));
        report.nats = Some(NatsStatus {
            servers: vec!["nats://n1:4222".into()],
            state: "disconnected".into(),
            prefix: "qmpmux.hv01".into(),
            stream: Some("QMPMUX".into()),
            commands: true,
            published: 10,
            acknowledged: 8,
            pending: 2,
            dropped: 0,
            reconnects: 1,
        });
        let text = render(&report);
        assert!(
            text.contains("NATS: disconnected (nats://n1:4222), prefix qmpmux.hv01, stream QMPMUX, 10 published, 8 acknowledged, 2 pending, 0 dropped, 1 reconnects"),
            "{text}"
        );
        let back: StatusReport = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn a_held_lease_is_shown() {
        let mut report = StatusReport::default();
        let mut vm = vm("web01");
        vm.lease = Some(LeaseStatus {
            client: 12,
            holder: "client 12 (pid 7, uid 0)".into(),
            reason: "migration".into(),
            seconds_left: 30,
        });
        report.vms.push(vm);
        let text = render(&report);
        assert!(
            text.contains("LEASED: web01 by client 12 (pid 7, uid 0), reason \"migration\", 30 s left"),
            "{text}"
        );
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["vms"][0]["lease"]["seconds_left"], 30);
    }

    #[test]
    fn text_from_clients_and_qemu_is_escaped() {
        let mut report = StatusReport::default();
        let mut vm = vm("web01");
        let forged = "x\"), 1 s left\nLEASED: db01 by root\u{1b}[31m\u{7}\u{9b}";
        vm.last_error = Some("QEMU said\r\nweb02 running".into());
        vm.lease = Some(LeaseStatus {
            client: 12,
            holder: "client 12 (tls:CN=a\nb)".into(),
            reason: forged.into(),
            seconds_left: 30,
        });
        report.vms.push(vm);
        let text = render(&report);
        assert!(
            !text.chars().any(|c| super::super::escape::is_unsafe(c) && c != '\n'),
            "{text:?}"
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].ends_with("QEMU said\\r\\nweb02 running"), "{text}");
        assert_eq!(
            lines[2],
            r#"LEASED: web01 by client 12 (tls:CN=a\nb), reason "x\"), 1 s left\nLEASED: db01 by root\u001b[31m\u0007\u009b", 30 s left"#
        );
    }

    #[test]
    fn an_older_daemon_s_report_reads_as_responding() {
        let mut json = serde_json::to_value(vm("web01")).unwrap();
        json.as_object_mut().unwrap().remove("responding");
        let back: VmStatus = serde_json::from_value(json).unwrap();
        assert!(back.responding);
    }
}
