//! Per-VM counters and gauges, exported in Prometheus text format and read
//! by `qmpmux status`.
//!
//! Each session and accept loop holds its own [`VmMetrics`] handles (atomic
//! cells shared with the registry), so recording is lock-free on the hot
//! path; the registry's lock is taken only when a VM starts or stops.
//! [`serve_metrics`] is the HTTP endpoint (`metrics_listen`).

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
use std::sync::Arc;
use std::time::Duration;
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
    runstate: Vec<Gauge>,
}

impl VmMetrics {
    pub fn set_runstate(&self, state: Runstate) {
        for (s, g) in STATES.iter().zip(&self.runstate) {
            g.set(i64::from(*s == state));
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
        let mut registry = Registry::with_prefix("qmpmux");
        let m = Metrics {
            commands: Family::default(),
            errors: Family::default(),
            events: Family::default(),
            connections: Family::default(),
            clients: Family::default(),
            in_flight: Family::default(),
            queued: Family::default(),
            runstate: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            registry: Registry::default(),
        };
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
        Metrics { registry, ..m }
    }

    pub fn vm(&self, name: &str) -> VmMetrics {
        let l = VmLabel { vm: name.into() };
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
            runstate,
        }
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
        for s in STATES {
            self.runstate.remove(&StateLabel {
                vm: name.into(),
                state: s.to_string(),
            });
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
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

/// `GET` (or `HEAD`) `/metrics`: the metrics; anything else an error.
fn metrics_reply<B>(req: &Request<B>, metrics: &SharedMetrics) -> Response<String> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, metrics.encode()),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, String::new()),
        _ => (StatusCode::NOT_FOUND, String::new()),
    };
    let mut reply = Response::new(body);
    *reply.status_mut() = status;
    if status == StatusCode::OK {
        reply.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
    }
    reply
}
