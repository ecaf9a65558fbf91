//! Per-VM counters and gauges, exported in Prometheus text format and read
//! by `qmpmux status`.
//!
//! Each session and accept loop holds its own [`VmMetrics`] handles (atomic
//! cells shared with the registry), so recording is lock-free on the hot
//! path; the registry's lock is taken only when a VM starts or stops.
//! [`serve_metrics`] is the HTTP endpoint (`metrics_listen`).

use super::exposition;
use super::gate::Gate;
use crate::state::Runstate;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    vm: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    vm: String,
    reason: String,
}

/// Why an event was not published to NATS.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// Why qmpmux disconnected a client (the `reason` label of
/// `qmpmux_clients_disconnected_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disconnect {
    /// It did not read its replies and events fast enough.
    SlowReader,
    /// Its input exceeded a size or nesting limit.
    InputLimit,
    /// QEMU has not been reachable since qmpmux started: no greeting.
    NoUpstream,
    /// qmpmux stopped, or a reload stopped or restarted its VM.
    Shutdown,
    /// A bug in qmpmux.
    InternalError,
}

impl Disconnect {
    const ALL: [Disconnect; 5] = [
        Disconnect::SlowReader,
        Disconnect::InputLimit,
        Disconnect::NoUpstream,
        Disconnect::Shutdown,
        Disconnect::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Disconnect::SlowReader => "slow_reader",
            Disconnect::InputLimit => "input_limit",
            Disconnect::NoUpstream => "no_upstream",
            Disconnect::Shutdown => "shutdown",
            Disconnect::InternalError => "internal_error",
        }
    }
}

/// Why qmpmux turned a client away when it connected (the `reason` label
/// of `qmpmux_clients_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The VM had `[client] max_clients` clients.
    MaxClients,
    /// The extra listeners had all the clients they may have together:
    /// the rest are kept for the main socket (`listen_reserved_clients`).
    ReservedForMain,
    /// The listener had its own `max_clients` clients.
    ListenerMaxClients,
    /// The TLS listener had as many handshakes in progress as it runs at
    /// once.
    TlsHandshakes,
    /// The peer's uid/gid or certificate subject is not allowed on the
    /// listener.
    NotAllowed,
}

impl Refusal {
    const ALL: [Refusal; 5] = [
        Refusal::MaxClients,
        Refusal::ReservedForMain,
        Refusal::ListenerMaxClients,
        Refusal::TlsHandshakes,
        Refusal::NotAllowed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxClients => "max_clients",
            Refusal::ReservedForMain => "reserved_for_main",
            Refusal::ListenerMaxClients => "listener_max_clients",
            Refusal::TlsHandshakes => "tls_handshakes",
            Refusal::NotAllowed => "not_allowed",
        }
    }
}

const STATES: [Runstate; 4] = [
    Runstate::Idle,
    Runstate::Connecting,
    Runstate::Running,
    Runstate::Disconnecting,
];

fn latency_histogram() -> Histogram {
    // 50 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
}

/// The daemon's metrics registry.
pub struct Metrics {
    registry: Registry,
    process: ProcessMetrics,
    reload_ok: Gauge,
    reload_success_time: Gauge<f64, AtomicU64>,
    reloads: Family<ResultLabel, Counter>,
    handovers: Counter,
    crash_recoveries: Counter,
    handover_fallbacks: Counter,
    handover_pause: Gauge<f64, AtomicU64>,
    handover_clients: Gauge,
    handover_closed: Gauge,
    refusals: Family<VmLabel, Counter>,
    disconnects: Family<ReasonLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    responding: Family<VmLabel, Gauge>,
    history: Family<VmLabel, Gauge>,
    evicted: Family<VmLabel, Counter>,
    lease_held: Family<VmLabel, Gauge>,
    lease_refusals: Family<VmLabel, Counter>,
    nats: NatsMetrics,
    commands: Family<VmLabel, Counter>,
    errors: Family<VmLabel, Counter>,
    events: Family<VmLabel, Counter>,
    connections: Family<VmLabel, Counter>,
    clients: Family<VmLabel, Gauge>,
    in_flight: Family<VmLabel, Gauge>,
    queued: Family<VmLabel, Gauge>,
    runstate: Family<StateLabel, Gauge>,
    latency: Family<VmLabel, Histogram, fn() -> Histogram>,
}

/// The NATS connection's handles (`[nats]`), shared by the fleet's tasks.
#[derive(Clone, Debug, Default)]
pub struct NatsMetrics {
    /// 1 while connected.
    pub connected: Gauge,
    pub reconnects: Counter,
    /// Events and state messages sent.
    pub published: Counter,
    /// Events JetStream acknowledged (with `stream`), or flushed to the
    /// server (without).
    pub acknowledged: Counter,
    /// Events numbered but not acknowledged yet, over all VMs.
    pub pending: Gauge,
    /// Events that fell out of a VM's history before they were published
    /// (`reason="history"`).
    pub dropped: Counter,
    /// Events larger than the server's `max_payload` (or the stream's
    /// `max_msg_size`), never publishable (`reason="too_large"`).
    pub too_large: Counter,
    /// Commands received over NATS.
    pub commands: Counter,
}

/// One VM's handles.
#[derive(Clone, Debug, Default)]
pub struct VmMetrics {
    /// Commands forwarded towards QEMU.
    pub commands: Counter,
    /// Error replies: QEMU's, and qmpmux's own for forwarded commands.
    pub errors: Counter,
    pub events: Counter,
    /// Successful upstream connections (the first one included).
    pub connections: Counter,
    pub clients: Gauge,
    pub in_flight: Gauge,
    pub queued: Gauge,
    /// Seconds from a command's arrival to its reply.
    pub latency: Option<Histogram>,
    /// Commands a listener's policy refused.
    pub refusals: Counter,
    runstate: Vec<Gauge>,
    /// Per [`Disconnect::ALL`].
    disconnects: Vec<Counter>,
    /// Per [`Refusal::ALL`].
    refused: Vec<Counter>,
    /// Whether the VM's thread ran a probe task in time at the last check
    /// (set by the supervisor, which probes; 1 until the first check).
    pub responding: Gauge,
    /// Events kept for consumers that resume.
    pub history: Gauge,
    /// Events that fell out of the history.
    pub evicted: Counter,
    /// 1 while a client holds the VM's lease.
    pub lease_held: Gauge,
    /// Commands refused because another client held the lease.
    pub lease_refusals: Counter,
}

impl VmMetrics {
    pub fn set_runstate(&self, state: Runstate) {
        for (s, g) in STATES.iter().zip(&self.runstate) {
            g.set(i64::from(*s == state));
        }
    }

    /// Counts a client qmpmux disconnected.
    pub fn disconnected(&self, why: Disconnect) {
        if let Some(c) = Disconnect::ALL
            .iter()
            .position(|d| *d == why)
            .and_then(|i| self.disconnects.get(i))
        {
            c.inc();
        }
    }

    /// Counts a client turned away when it connected.
    pub fn refused(&self, why: Refusal) {
        if let Some(c) = Refusal::ALL
            .iter()
            .position(|r| *r == why)
            .and_then(|i| self.refused.get(i))
        {
            c.inc();
        }
    }

    pub fn observe_latency(&self, seconds: f64) {
        if let Some(h) = &self.latency {
            h.observe(seconds);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        let mut m = Metrics {
            commands: Family::default(),
            errors: Family::default(),
            events: Family::default(),
            connections: Family::default(),
            clients: Family::default(),
            in_flight: Family::default(),
            queued: Family::default(),
            runstate: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            process: ProcessMetrics::new(),
            reload_ok: Gauge::default(),
            reload_success_time: Gauge::default(),
            reloads: Family::default(),
            handovers: Counter::default(),
            crash_recoveries: Counter::default(),
            handover_fallbacks: Counter::default(),
            handover_pause: Gauge::default(),
            handover_clients: Gauge::default(),
            handover_closed: Gauge::default(),
            refusals: Family::default(),
            disconnects: Family::default(),
            refused: Family::default(),
            responding: Family::default(),
            history: Family::default(),
            evicted: Family::default(),
            lease_held: Family::default(),
            lease_refusals: Family::default(),
            nats: NatsMetrics::default(),
            registry: Registry::default(),
        };
        m.process.register(&mut root);
        let registry = root.sub_registry_with_prefix("qmpmux");
        let build_info = Family::<VersionLabel, Gauge>::default();
        build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("build_info", "qmpmux's version (always 1)", build_info);
        // Until a reload, the configuration loaded at start is the last.
        m.reload_ok.set(1);
        m.reload_success_time.set(m.process.start_time.get());
        registry.register(
            "config_last_reload_successful",
            "Whether the last configuration reload (or the load at start) succeeded",
            m.reload_ok.clone(),
        );
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully (at start or by a reload), in Unix time",
            m.reload_success_time.clone(),
        );
        for result in ["success", "failure"] {
            let _ = m.reloads.get_or_create(&ResultLabel { result: result.into() });
        }
        registry.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            m.reloads.clone(),
        );
        registry.register(
            "handovers",
            "Restarts of qmpmux that handed everything over to the next process (re-execution, restart under systemd), since it last started from nothing",
            m.handovers.clone(),
        );
        registry.register(
            "crash_recoveries",
            "Starts from what a crash of the previous process left (its clients were closed)",
            m.crash_recoveries.clone(),
        );
        registry.register(
            "handover_fallbacks",
            "Handover states that could not be read (the crash path was taken)",
            m.handover_fallbacks.clone(),
        );
        registry.register(
            "handover_last_pause_seconds",
            "The last handover's pause, from the old process's stop to the new one serving",
            m.handover_pause.clone(),
        );
        registry.register(
            "handover_last_clients",
            "Clients the last handover moved to the new process",
            m.handover_clients.clone(),
        );
        registry.register(
            "handover_last_closed_clients",
            "Clients the last handover closed instead of moving them (TLS clients; clients that left during it)",
            m.handover_closed.clone(),
        );
        registry.register("commands", "Commands forwarded to QEMU", m.commands.clone());
        registry.register("errors", "Error replies to forwarded commands", m.errors.clone());
        registry.register("events", "Events received from QEMU", m.events.clone());
        registry.register(
            "upstream_connections",
            "Successful connections to QEMU",
            m.connections.clone(),
        );
        registry.register("clients", "Connected clients", m.clients.clone());
        registry.register(
            "in_flight",
            "Commands sent to QEMU and not answered",
            m.in_flight.clone(),
        );
        registry.register("queue_depth", "Commands waiting to be sent to QEMU", m.queued.clone());
        registry.register(
            "runstate",
            "Upstream runstate (1 for the current one)",
            m.runstate.clone(),
        );
        registry.register(
            "command_latency_seconds",
            "Time from a command's arrival to its reply",
            m.latency.clone(),
        );
        registry.register(
            "policy_refusals",
            "Commands refused by a listener's policy",
            m.refusals.clone(),
        );
        registry.register(
            "clients_disconnected",
            "Clients disconnected by qmpmux, by reason",
            m.disconnects.clone(),
        );
        registry.register(
            "clients_refused",
            "Clients turned away when they connected, by reason",
            m.refused.clone(),
        );
        registry.register(
            "event_history_events",
            "Events kept for consumers that resume (__org.qmpmux_subscribe with since)",
            m.history.clone(),
        );
        registry.register(
            "event_history_evicted",
            "Events that fell out of the history (event_history, event_history_bytes)",
            m.evicted.clone(),
        );
        for (name, help, metric) in [
            ("nats_published", "Messages published to NATS", &m.nats.published),
            (
                "nats_acknowledged",
                "Events JetStream acknowledged (or flushed to the server, without a stream)",
                &m.nats.acknowledged,
            ),
            ("nats_reconnects", "Reconnections to NATS", &m.nats.reconnects),
            ("nats_commands", "QMP commands received over NATS", &m.nats.commands),
        ] {
            registry.register(name, help, metric.clone());
        }
        // One counter per reason; the publishers' handles are clones of
        // the family's (a clone shares the count).
        let dropped = Family::<DropLabel, Counter>::default();
        let by_reason = |reason: &str| dropped.get_or_create(&DropLabel { reason: reason.into() }).clone();
        m.nats.dropped = by_reason("history");
        m.nats.too_large = by_reason("too_large");
        registry.register(
            "nats_dropped",
            "Events not published to NATS, by reason: fell out of a VM's history first (history), larger than the server accepts (too_large)",
            dropped,
        );
        registry.register(
            "nats_connected",
            "Whether qmpmux is connected to NATS",
            m.nats.connected.clone(),
        );
        registry.register(
            "nats_pending",
            "Events numbered but not yet acknowledged by NATS, over all VMs",
            m.nats.pending.clone(),
        );
        registry.register(
            "lease_held",
            "Whether a client holds the VM's lease (__org.qmpmux_lease)",
            m.lease_held.clone(),
        );
        registry.register(
            "lease_refusals",
            "Commands refused because another client held the VM's lease",
            m.lease_refusals.clone(),
        );
        registry.register(
            "responding",
            "Whether the thread serving the VM ran a probe task within a second at the last check, every second (0: it is blocked, and so are the VM's clients)",
            m.responding.clone(),
        );
        Metrics { registry: root, ..m }
    }

    /// Records a reload's outcome (a rejected file included).
    pub fn record_reload(&self, ok: bool, at: SystemTime) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabel { result: result.into() }).inc();
        self.reload_ok.set(i64::from(ok));
        if ok {
            self.reload_success_time.set(unix_seconds(at));
        }
    }

    /// What the handovers so far were (carried over from the previous
    /// process).
    pub fn record_handovers(&self, c: &crate::handover::Counts) {
        self.handovers.inc_by(c.handovers);
        self.crash_recoveries.inc_by(c.crash_recoveries);
        self.handover_fallbacks.inc_by(c.fallbacks);
        self.handover_pause.set(c.last_pause_seconds.unwrap_or(0.0));
        self.handover_clients
            .set(i64::try_from(c.clients_handed_over).unwrap_or(i64::MAX));
    }

    /// When qmpmux started, in Unix time.
    pub fn start_time(&self) -> f64 {
        self.process.start_time.get()
    }

    pub fn vm(&self, name: &str) -> VmMetrics {
        let l = VmLabel { vm: name.into() };
        let responding = self.responding.get_or_create(&l).clone();
        // Until the supervisor's first probe says otherwise.
        responding.set(1);
        let runstate = STATES
            .iter()
            .map(|s| {
                let label = StateLabel {
                    vm: name.into(),
                    state: s.to_string(),
                };
                self.runstate.get_or_create(&label).clone()
            })
            .collect();
        VmMetrics {
            commands: self.commands.get_or_create(&l).clone(),
            errors: self.errors.get_or_create(&l).clone(),
            events: self.events.get_or_create(&l).clone(),
            connections: self.connections.get_or_create(&l).clone(),
            clients: self.clients.get_or_create(&l).clone(),
            in_flight: self.in_flight.get_or_create(&l).clone(),
            queued: self.queued.get_or_create(&l).clone(),
            latency: Some(self.latency.get_or_create(&l).clone()),
            refusals: self.refusals.get_or_create(&l).clone(),
            runstate,
            disconnects: Disconnect::ALL
                .iter()
                .map(|d| self.disconnects.get_or_create(&reason_label(name, d.as_str())).clone())
                .collect(),
            refused: Refusal::ALL
                .iter()
                .map(|r| self.refused.get_or_create(&reason_label(name, r.as_str())).clone())
                .collect(),
            responding,
            history: self.history.get_or_create(&l).clone(),
            evicted: self.evicted.get_or_create(&l).clone(),
            lease_held: self.lease_held.get_or_create(&l).clone(),
            lease_refusals: self.lease_refusals.get_or_create(&l).clone(),
        }
    }

    /// The NATS connection's handles.
    pub fn nats(&self) -> NatsMetrics {
        self.nats.clone()
    }

    /// Forgets a VM that was removed from the configuration.
    pub fn remove_vm(&self, name: &str) {
        let l = VmLabel { vm: name.into() };
        self.commands.remove(&l);
        self.errors.remove(&l);
        self.events.remove(&l);
        self.connections.remove(&l);
        self.clients.remove(&l);
        self.in_flight.remove(&l);
        self.queued.remove(&l);
        self.latency.remove(&l);
        self.refusals.remove(&l);
        self.responding.remove(&l);
        self.history.remove(&l);
        self.evicted.remove(&l);
        self.lease_held.remove(&l);
        self.lease_refusals.remove(&l);
        for d in Disconnect::ALL {
            self.disconnects.remove(&reason_label(name, d.as_str()));
        }
        for r in Refusal::ALL {
            self.refused.remove(&reason_label(name, r.as_str()));
        }
        for s in STATES {
            self.runstate.remove(&StateLabel {
                vm: name.into(),
                state: s.to_string(),
            });
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.process.refresh();
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn reason_label(vm: &str, reason: &str) -> ReasonLabel {
    ReasonLabel {
        vm: vm.into(),
        reason: reason.into(),
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The `process_*` metrics Prometheus' client libraries export, read from
/// `/proc/self` at each scrape. The start time is taken when the registry
/// is made, at start (`/proc/stat`, needed to convert the kernel's, is
/// hidden by the unit's `ProcSubset=pid`).
struct ProcessMetrics {
    rss: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

impl ProcessMetrics {
    fn new() -> ProcessMetrics {
        let p = ProcessMetrics {
            rss: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            start_time: Gauge::default(),
        };
        p.start_time.set(unix_seconds(SystemTime::now()));
        p
    }

    fn register(&self, root: &mut Registry) {
        root.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            self.rss.clone(),
        );
        root.register("process_open_fds", "Open file descriptors", self.open_fds.clone());
        root.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            self.max_fds.clone(),
        );
        root.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            self.start_time.clone(),
        );
    }

    /// Reads what changed; a value that cannot be read is left as it was.
    fn refresh(&self) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        {
            self.rss.set(kb * 1024);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Less the one reading the directory.
            self.open_fds.set(dir.count() as i64 - 1);
        }
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            self.max_fds.set(i64::try_from(soft).unwrap_or(i64::MAX));
        }
    }
}

/// Shared by the supervisor, the sessions and the metrics endpoint.
pub type SharedMetrics = Arc<Metrics>;

/// Metrics connections served at once; more are closed at once.
pub const METRICS_MAX_CONNECTIONS: usize = 16;

/// How long a metrics client may take to send its request's headers.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a metrics connection may last in all (one request: no
/// keep-alive), so that a client that does not read its answer still goes.
const METRICS_CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` in Prometheus text format until `stop`: one
/// request per connection, at most [`METRICS_MAX_CONNECTIONS`] at once.
pub async fn serve_metrics(listener: TcpListener, metrics: SharedMetrics, stop: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics at /metrics");
    }
    let mut gate = Gate::new("metrics", METRICS_MAX_CONNECTIONS);
    while let Some(((stream, _), permit)) = gate.accept(&stop, || listener.accept()).await {
        tokio::spawn(serve_metrics_connection(stream, metrics.clone(), stop.clone(), permit));
    }
}

async fn serve_metrics_connection(
    stream: TcpStream,
    metrics: SharedMetrics,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let service = hyper::service::service_fn(move |req| {
        let reply = metrics_reply(&req, &metrics);
        async move { Ok::<_, std::convert::Infallible>(reply) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(METRICS_HEADER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    // Cancel-safe: dropping the connection closes it.
    tokio::select! {
        r = tokio::time::timeout(METRICS_CONNECTION_TIMEOUT, conn) => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "metrics connection failed"),
            Err(_) => debug!("metrics connection timed out"),
        },
        () = stop.cancelled() => {}
    }
}

/// `GET` (or `HEAD`) `/metrics`: the metrics, in OpenMetrics if the request
/// asks for it, else in Prometheus's text format; anything else an error.
fn metrics_reply<B>(req: &Request<B>, metrics: &SharedMetrics) -> Response<String> {
    let openmetrics = exposition::wants_openmetrics(req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") if openmetrics => (StatusCode::OK, metrics.encode()),
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, exposition::to_prometheus_text(&metrics.encode()))
        }
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
        _ => (StatusCode::NOT_FOUND, String::new()),
    };
    let mut reply = Response::new(body);
    *reply.status_mut() = status;
    if status == StatusCode::OK {
        let kind = if openmetrics {
            exposition::OPENMETRICS
        } else {
            exposition::PROMETHEUS_TEXT
        };
        reply
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, start: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} in\n{text}"))
    }

    fn value(text: &str, start: &str) -> f64 {
        line(text, start).rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn build_process_and_reload_metrics() {
        let m = Metrics::new();
        let text = m.encode();
        let version = env!("CARGO_PKG_VERSION");
        line(&text, &format!("qmpmux_build_info{{version=\"{version}\"}} 1"));
        assert!(value(&text, "process_resident_memory_bytes ") > 1e5, "{text}");
        assert!(value(&text, "process_open_fds ") >= 3.0, "{text}");
        assert!(value(&text, "process_max_fds ") >= value(&text, "process_open_fds "));
        let start = value(&text, "process_start_time_seconds ");
        let now = unix_seconds(SystemTime::now());
        assert!(start > now - 60.0 && start <= now, "{start} {now}");
        line(&text, "qmpmux_config_last_reload_successful 1");
        assert_eq!(
            value(&text, "qmpmux_config_last_reload_success_timestamp_seconds "),
            start
        );
        line(&text, "qmpmux_config_reloads_total{result=\"failure\"} 0");

        m.record_reload(false, SystemTime::now());
        let text = m.encode();
        line(&text, "qmpmux_config_last_reload_successful 0");
        line(&text, "qmpmux_config_reloads_total{result=\"failure\"} 1");
        assert_eq!(
            value(&text, "qmpmux_config_last_reload_success_timestamp_seconds "),
            start
        );
        let later = UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        m.record_reload(true, later);
        let text = m.encode();
        line(&text, "qmpmux_config_last_reload_successful 1");
        line(&text, "qmpmux_config_reloads_total{result=\"success\"} 1");
        assert_eq!(
            value(&text, "qmpmux_config_last_reload_success_timestamp_seconds "),
            4e9
        );
    }

    #[test]
    fn refusals_and_disconnects_per_vm_until_it_is_removed() {
        let m = Metrics::new();
        let vm = m.vm("web01");
        vm.refusals.inc();
        vm.disconnected(Disconnect::SlowReader);
        vm.disconnected(Disconnect::SlowReader);
        vm.disconnected(Disconnect::InputLimit);
        let text = m.encode();
        line(&text, "qmpmux_policy_refusals_total{vm=\"web01\"} 1");
        line(
            &text,
            "qmpmux_clients_disconnected_total{vm=\"web01\",reason=\"slow_reader\"} 2",
        );
        line(
            &text,
            "qmpmux_clients_disconnected_total{vm=\"web01\",reason=\"input_limit\"} 1",
        );
        line(
            &text,
            "qmpmux_clients_disconnected_total{vm=\"web01\",reason=\"shutdown\"} 0",
        );
        vm.refused(Refusal::MaxClients);
        vm.refused(Refusal::TlsHandshakes);
        vm.refused(Refusal::TlsHandshakes);
        vm.responding.set(0);
        let text = m.encode();
        line(
            &text,
            "qmpmux_clients_refused_total{vm=\"web01\",reason=\"max_clients\"} 1",
        );
        line(
            &text,
            "qmpmux_clients_refused_total{vm=\"web01\",reason=\"tls_handshakes\"} 2",
        );
        line(
            &text,
            "qmpmux_clients_refused_total{vm=\"web01\",reason=\"not_allowed\"} 0",
        );
        line(&text, "qmpmux_responding{vm=\"web01\"} 0");
        m.remove_vm("web01");
        let text = m.encode();
        assert!(!text.contains("web01"), "{text}");
        // A VM started again (a reload) counts as responding until probed.
        let _again = m.vm("web01");
        line(&m.encode(), "qmpmux_responding{vm=\"web01\"} 1");
    }
}
