//! Why a NATS server over TLS refuses qmpmux, in words an operator can act
//! on. async-nats reports a failed handshake as a bare "IO error" (the
//! cause goes to its debug log only), so after a failure with TLS in use
//! qmpmux tries the handshake once itself, as async-nats does it (INFO in
//! clear, then TLS, with `tls_ca` and `tls_cert`/`tls_key`), and says what
//! failed.

use crate::config::NatsConfig;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// How long one probe may take.
const PROBE: Duration = Duration::from_secs(5);

/// Whether `config` uses TLS with a CA of its own (the probe needs one: it
/// has no system roots to check against).
pub fn applies(config: &NatsConfig) -> bool {
    config.tls_ca.is_some()
}

/// The TLS failure with `server` (a URL of `servers`), if the handshake
/// fails; `None` if it succeeds or the server cannot be reached at all.
pub async fn tls_failure(config: &NatsConfig, server: &str) -> Option<String> {
    tokio::time::timeout(PROBE, handshake(config, server))
        .await
        .unwrap_or(None)
}

async fn handshake(config: &NatsConfig, server: &str) -> Option<String> {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let hostport = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hostport = hostport.split('/').next().unwrap_or(hostport);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']), p.parse().ok()?),
        None => (hostport, 4222),
    };
    let tls = match client_config(config) {
        Ok(c) => c,
        Err(why) => return Some(why),
    };
    let name = match ServerName::try_from(host.to_owned()) {
        Ok(n) => n,
        Err(e) => return Some(format!("{host:?} cannot be a TLS server name: {e}")),
    };
    let mut tcp = tokio::io::BufReader::new(TcpStream::connect((host, port)).await.ok()?);
    // NATS greets in clear (INFO), then the client starts TLS.
    let mut info = String::new();
    tcp.read_line(&mut info).await.ok()?;
    if !info.starts_with("INFO ") {
        return None;
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    match connector.connect(name, tcp.into_inner()).await {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// A client configuration as async-nats builds it from `[nats]`.
fn client_config(config: &NatsConfig) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    if let Some(ca) = &config.tls_ca {
        for cert in certs(ca)? {
            roots.add(cert).map_err(|e| format!("tls_ca {}: {e}", ca.display()))?;
        }
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(certs(cert)?, private_key(key)?)
            .map_err(|e| format!("tls_cert/tls_key: {e}")),
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let read = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(read)?;
    rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let read = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
    let file = std::fs::File::open(path).map_err(read)?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(read)?
        .ok_or_else(|| format!("no private key in {}", path.display()))
}
