//! The set of VMs: one upstream session and one listener each, and the
//! daemon's lifetime from start to clean stop.

use crate::config::Config;
use crate::downstream::client::ClientContext;
use crate::downstream::{accept_loop, bind, BindError};
use crate::upstream;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long clients and sessions get to finish after shutdown is asked.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("VM '{0}': no listener was bound for it")]
    MissingListener(String),
    #[error("VM '{vm}'")]
    Bind {
        vm: String,
        #[source]
        source: BindError,
    },
}

/// Bound listening sockets, by VM name.
#[derive(Debug, Default)]
pub struct Listeners(HashMap<String, (PathBuf, UnixListener)>);

impl Listeners {
    /// Binds every VM's `listen` path.
    pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
        let mut out = Listeners::default();
        for vm in &config.vms {
            let l = bind(&vm.listen).await.map_err(|source| RunError::Bind {
                vm: vm.name.clone(),
                source,
            })?;
            out.0.insert(vm.name.clone(), (vm.listen.clone(), l));
        }
        Ok(out)
    }
}

/// Runs the daemon until `shutdown` is cancelled, then stops cleanly and
/// removes its socket files.
pub async fn run(config: Config, mut listeners: Listeners, shutdown: CancellationToken) -> Result<(), RunError> {
    let tracker = TaskTracker::new();
    let mut paths = Vec::new();
    for vm in &config.vms {
        let (path, listener) = listeners
            .0
            .remove(&vm.name)
            .ok_or_else(|| RunError::MissingListener(vm.name.clone()))?;
        let session = upstream::spawn(vm.clone(), config.upstream.clone(), shutdown.clone(), &tracker);
        let ctx = ClientContext {
            vm: vm.name.as_str().into(),
            session,
            opts: config.client.clone(),
            shutdown: shutdown.clone(),
        };
        info!(vm = %vm.name, listen = %path.display(), upstream = %vm.upstream.display(), "serving VM");
        tracker.spawn(accept_loop(listener, ctx, tracker.clone()));
        paths.push(path);
    }
    shutdown.cancelled().await;
    info!("shutting down");
    tracker.close();
    if tokio::time::timeout(STOP_GRACE, tracker.wait()).await.is_err() {
        warn!("some tasks did not finish within {STOP_GRACE:?}");
    }
    for p in paths {
        let _ = std::fs::remove_file(&p);
    }
    Ok(())
}
