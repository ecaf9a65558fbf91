//! qmpmux running in-process, on the caller's runtime, for tests that need
//! its internals (reload, metrics address) or many quick starts.

use qmpmux::config::Config;
use std::path::Path;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// qmpmux running in-process on its own runtime tasks.
pub struct Daemon {
    pub shutdown: CancellationToken,
    pub metrics_addr: Option<std::net::SocketAddr>,
    reload_tx: tokio::sync::mpsc::Sender<qmpmux::Reload>,
    task: Option<JoinHandle<Result<(), qmpmux::RunError>>>,
    pub config: Config,
}

impl Daemon {
    /// Starts qmpmux for `vms` (name, upstream socket, listen socket).
    pub async fn start(vms: &[(&str, &Path, &Path)]) -> Daemon {
        Daemon::start_with(vms, |_| {}).await
    }

    pub async fn start_with(vms: &[(&str, &Path, &Path)], tweak: impl FnOnce(&mut Config)) -> Daemon {
        let mut config = super::config::config(vms);
        tweak(&mut config);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let listeners = qmpmux::Listeners::bind(&config).await.expect("bind listeners");
        let metrics_addr = listeners.metrics_addr();
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(qmpmux::run_with_reload(
            config.clone(),
            listeners,
            shutdown.clone(),
            reload_rx,
        ));
        Daemon {
            shutdown,
            metrics_addr,
            reload_tx,
            task: Some(task),
            config,
        }
    }

    /// Applies a new configuration, as SIGHUP does.
    pub async fn reload(&self, config: Config) -> Result<qmpmux::ReloadSummary, qmpmux::RunError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.reload_tx
            .send(qmpmux::Reload {
                config: Ok(config),
                done,
            })
            .await
            .expect("daemon running");
        answer.await.expect("reload answered")
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("daemon task").expect("daemon result");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
