//! The NATS connection: options from `[nats]` (authentication and TLS
//! shared with `qmpmux fleet`), connection events into the log and
//! metrics.

use super::probe;
use crate::config::{NatsAuth, NatsConfig};
use crate::ops::metrics::NatsMetrics;
use async_nats::connection::State;
use async_nats::{ConnectOptions, Event};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// Connects in the background (qmpmux serves its VMs whether or not NATS
/// is up), reconnecting for ever with async-nats's backoff.
pub async fn connect(config: &NatsConfig, metrics: NatsMetrics) -> async_nats::Client {
    let mut opts = options(config, metrics).await;
    loop {
        match opts.connect(config.servers.clone()).await {
            Ok(client) => return client,
            // Only a bad option fails with retry_on_initial_connect; there
            // is nothing better to do than log it and keep trying.
            Err(e) => {
                warn!(error = %e, "cannot set up the NATS connection; retrying in 5 s");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                opts = options(config, NatsMetrics::default()).await;
            }
        }
    }
}

async fn options(config: &NatsConfig, metrics: NatsMetrics) -> ConnectOptions {
    let opts = ConnectOptions::new()
        .name(format!("qmpmux {}", config.host))
        .retry_on_initial_connect()
        .max_reconnects(None);
    // Without them qmpmux still serves its VMs; the server's refusal says
    // the rest.
    let opts = match with_auth(opts.clone(), &config.auth).await {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %crate::error::chain(&e), "cannot use the NATS credentials");
            opts
        }
    };
    let client_cert = config.tls_cert.as_deref().zip(config.tls_key.as_deref());
    let opts = with_tls(opts, config.tls_ca.as_deref(), client_cert, config.tls_required);
    let seen = Arc::new(AtomicBool::new(false));
    // The last connection failure logged: a failing connection is retried
    // for ever, so each distinct failure is said once until connected.
    // (A std Mutex: held for a comparison, never across an await.)
    let failed = Arc::new(Mutex::new(None::<String>));
    let config = Arc::new(config.clone());
    opts.event_callback(move |event| {
        let (metrics, seen, failed, config) = (metrics.clone(), seen.clone(), failed.clone(), config.clone());
        async move {
            match event {
                Event::ClientError(e) => {
                    let text = e.to_string();
                    let new = {
                        let mut last = failed.lock().unwrap_or_else(|p| p.into_inner());
                        let new = last.as_deref() != Some(text.as_str());
                        *last = Some(text.clone());
                        new
                    };
                    if new {
                        warn!(error = %text, hint = failure_hint(&text), "cannot connect to NATS; retrying");
                        if probe::applies(&config) {
                            tokio::spawn(explain_tls(config));
                        }
                    }
                }
                Event::Connected => {
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    metrics.connected.set(1);
                    if seen.swap(true, Ordering::Relaxed) {
                        metrics.reconnects.inc();
                        info!("reconnected to NATS");
                    } else {
                        info!("connected to NATS");
                    }
                }
                Event::Disconnected => {
                    metrics.connected.set(0);
                    warn!("disconnected from NATS; reconnecting");
                }
                Event::Closed => {
                    metrics.connected.set(0);
                }
                other => warn!(event = %other, "NATS"),
            }
        }
    })
}

/// Why credentials cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the NATS credentials file {}", path.display())]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the NATS nkey seed file {}", path.display())]
    NkeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `opts` authenticating with `auth` (qmpmux's `[nats]`, and `qmpmux
/// fleet`'s options).
pub async fn with_auth(opts: ConnectOptions, auth: &NatsAuth) -> Result<ConnectOptions, AuthError> {
    Ok(match auth {
        NatsAuth::None => opts,
        NatsAuth::Credentials(path) => opts
            .credentials_file(path)
            .await
            .map_err(|source| AuthError::Credentials {
                path: path.clone(),
                source,
            })?,
        NatsAuth::NkeyFile(path) => {
            let seed = std::fs::read_to_string(path).map_err(|source| AuthError::NkeyFile {
                path: path.clone(),
                source,
            })?;
            opts.nkey(seed.trim().to_string())
        }
        NatsAuth::Token(t) => opts.token(t.clone()),
        NatsAuth::UserPassword { user, password } => opts.user_and_password(user.clone(), password.clone()),
    })
}

/// `opts` trusting `ca` (else the system's CAs), presenting `client_cert`
/// (certificate, key), and requiring TLS if `required`.
pub fn with_tls(
    mut opts: ConnectOptions,
    ca: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    required: bool,
) -> ConnectOptions {
    if let Some(ca) = ca {
        opts = opts.add_root_certificates(ca.to_owned());
    }
    if let Some((cert, key)) = client_cert {
        opts = opts.add_client_certificate(cert.to_owned(), key.to_owned());
    }
    if required {
        opts = opts.require_tls(true);
    }
    opts
}

/// Says, for each server whose TLS handshake fails, why.
async fn explain_tls(config: Arc<NatsConfig>) {
    for server in &config.servers {
        if let Some(why) = probe::tls_failure(&config, server).await {
            let ca = config.tls_ca.as_deref().map(|p| p.display().to_string());
            warn!(%server, error = %why, tls_ca = ca.as_deref().unwrap_or("-"),
                "cannot connect to NATS: the TLS handshake fails (is the server's certificate signed by tls_ca, \
                 and for the host name or address in `servers`?)");
        }
    }
}

/// What to check, for a connection failure as async-nats words it (it
/// keeps the cause, e.g. the certificate's problem, to its debug log).
fn failure_hint(error: &str) -> &'static str {
    if error.contains("TLS") {
        "the TLS handshake failed: is the server's certificate signed by tls_ca (or a system CA without it), \
         for the host name or address in `servers`, and does the server accept tls_cert?"
    } else if error.contains("authorization") || error.contains("signing nonce") {
        "the server refused qmpmux's credentials"
    } else {
        "the server is unreachable or not speaking NATS"
    }
}

pub fn state_name(state: State) -> &'static str {
    match state {
        State::Connected => "connected",
        State::Disconnected => "disconnected",
        State::Pending => "pending",
    }
}
