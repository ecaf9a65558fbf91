//! The control socket, through which `qmpmux status` asks the running
//! daemon how its VMs are, and the Prometheus metrics endpoint.
//!
//! Protocol: the client sends `status\n`; the daemon answers one JSON line
//! ([`StatusReport`]) and closes.
//!
//! Both serve a limited number of connections at once and give each a time
//! limit, so that idle peers cannot use up qmpmux's file descriptors.

use crate::metrics::SharedMetrics;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// One VM as `qmpmux status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmStatus {
    pub name: String,
    pub upstream: String,
    pub upstream_mode: String,
    pub listen: String,
    pub runstate: String,
    pub qemu_version: Option<String>,
    pub clients: i64,
    pub in_flight: i64,
    pub queued: i64,
    /// Successful upstream connections; reconnects are this minus one.
    pub connections: u64,
    pub commands: u64,
    pub errors: u64,
    pub events: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub vms: Vec<VmStatus>,
}

/// Asks the supervisor for a report.
pub type StatusQuery = oneshot::Sender<StatusReport>;

/// Control connections served at once; more are closed at once.
pub const CONTROL_MAX_CONNECTIONS: usize = 16;

/// How long a control connection may take, request and answer together.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the control socket until `stop`.
pub async fn serve_control(listener: UnixListener, queries: mpsc::Sender<StatusQuery>, stop: CancellationToken) {
    let mut gate = Gate::new("control socket", CONTROL_MAX_CONNECTIONS);
    while let Some(((stream, _), permit)) = gate.accept(&stop, || listener.accept()).await {
        let queries = queries.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONTROL_TIMEOUT, answer(stream, queries)).await;
            drop(permit);
        });
    }
}

/// A cap on the connections a service serves at once, so that idle peers
/// cannot use up qmpmux's file descriptors (which its QMP clients need).
/// A connection beyond it is closed at once; the first refusal of a run is
/// logged, and how many there were once one is served again.
struct Gate {
    what: &'static str,
    permits: Arc<Semaphore>,
    max: usize,
    refused: u64,
}

impl Gate {
    fn new(what: &'static str, max: usize) -> Gate {
        Gate {
            what,
            permits: Arc::new(Semaphore::new(max)),
            max,
            refused: 0,
        }
    }

    /// The next connection admitted, until `stop`. Failed accepts are
    /// logged and retried after a pause (they are mostly fd exhaustion).
    async fn accept<T, F>(
        &mut self,
        stop: &CancellationToken,
        mut accept: impl FnMut() -> F,
    ) -> Option<(T, OwnedSemaphorePermit)>
    where
        F: std::future::Future<Output = std::io::Result<T>>,
    {
        loop {
            // Cancel-safe: a cancelled `accept` loses no connection.
            let accepted = tokio::select! {
                r = accept() => r,
                () = stop.cancelled() => return None,
            };
            match accepted {
                Ok(conn) => {
                    if let Some(permit) = self.admit() {
                        return Some((conn, permit));
                    }
                }
                Err(e) => {
                    warn!(error = %e, service = self.what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            if self.refused == 0 {
                warn!(target: "qmpmux::audit", service = self.what, max = self.max,
                    "connection refused: the service has its maximum number of connections \
                     (further refusals are counted, not logged)");
            }
            self.refused += 1;
            return None;
        };
        if self.refused > 0 {
            warn!(target: "qmpmux::audit", service = self.what, refused = self.refused,
                "connections were refused while the service had its maximum number");
            self.refused = 0;
        }
        Some(permit)
    }
}

async fn answer(stream: UnixStream, queries: mpsc::Sender<StatusQuery>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(1024)).read_line(&mut line).await?;
    let reply = match line.trim() {
        "status" => {
            let (tx, rx) = oneshot::channel();
            if queries.send(tx).await.is_err() {
                return Ok(());
            }
            match rx.await {
                Ok(report) => serde_json::to_string(&report).unwrap_or_default(),
                Err(_) => return Ok(()),
            }
        }
        other => serde_json::json!({ "error": format!("unknown request {other:?}; try \"status\"") }).to_string(),
    };
    write.write_all(reply.as_bytes()).await?;
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
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| QueryError::Connect(path.display().to_string(), e))?;
    stream.write_all(b"status\n").await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    serde_json::from_str(text.trim()).map_err(|_| QueryError::Answer(text))
}

/// A table for humans.
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
            vm.name,
            vm.runstate,
            vm.clients,
            vm.in_flight,
            vm.connections.saturating_sub(1),
            vm.commands,
            vm.errors,
            vm.last_error.as_deref().unwrap_or("-")
        );
    }
    out
}

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
