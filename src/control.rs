//! The control socket, through which `qmpmux status` asks the running
//! daemon how its VMs are, and the Prometheus metrics endpoint.
//!
//! Protocol: the client sends `status\n`; the daemon answers one JSON line
//! ([`StatusReport`]) and closes.

use crate::metrics::SharedMetrics;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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

/// Serves the control socket until `stop`.
pub async fn serve_control(listener: UnixListener, queries: mpsc::Sender<StatusQuery>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let queries = queries.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, queries)).await;
        });
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

/// Serves `GET /metrics` in Prometheus text format until `stop`.
pub async fn serve_metrics(listener: TcpListener, metrics: SharedMetrics, stop: CancellationToken) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics at /metrics");
    }
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        warn!(error = %e, "metrics endpoint failed");
    }
}
