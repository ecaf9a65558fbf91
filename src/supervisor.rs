//! The set of VMs: one upstream session, one listener and its clients each;
//! live reload (start, stop or restart only the VMs whose configuration
//! changed) and clean stop.

use crate::config::{Config, SocketPerms, UpstreamMode, VmConfig};
use crate::downstream::client::ClientContext;
use crate::downstream::{accept_loop, bind, BindError};
use crate::upstream::{self, SessionHandle};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// How long clients get to receive replies to commands already in flight
/// when their VM stops (below systemd's default stop timeout).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

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

/// A VM's bound sockets: for clients, and in accept mode for QEMU.
#[derive(Debug)]
struct VmSockets {
    clients: UnixListener,
    upstream: Option<UnixListener>,
}

/// Bound listening sockets, by VM name.
#[derive(Debug, Default)]
pub struct Listeners(HashMap<String, VmSockets>);

impl Listeners {
    /// Binds every VM's `listen` path.
    pub async fn bind(config: &Config) -> Result<Listeners, RunError> {
        let mut out = Listeners::default();
        for vm in &config.vms {
            out.0.insert(vm.name.clone(), bind_vm(vm, &config.socket).await?);
        }
        Ok(out)
    }
}

async fn bind_vm(vm: &VmConfig, perms: &SocketPerms) -> Result<VmSockets, RunError> {
    let err = |source| RunError::Bind {
        vm: vm.name.clone(),
        source,
    };
    let clients = bind(&vm.listen, perms).await.map_err(err)?;
    let upstream = match vm.upstream_mode {
        UpstreamMode::Connect => None,
        UpstreamMode::Accept => Some(bind(&vm.upstream, perms).await.map_err(err)?),
    };
    Ok(VmSockets { clients, upstream })
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: Vec<String>,
}

/// A request to apply a new configuration; the answer says what changed.
pub struct Reload {
    pub config: Config,
    pub done: oneshot::Sender<Result<ReloadSummary, RunError>>,
}

/// One running VM.
struct Vm {
    config: VmConfig,
    session: SessionHandle,
    slots: Arc<Semaphore>,
    max_clients: usize,
    /// Graceful stop of the listener and clients.
    stop: CancellationToken,
    /// Immediate stop of everything, session included.
    hard: CancellationToken,
    clients: TaskTracker,
    tasks: TaskTracker,
}

/// A snapshot of one VM for status reports.
#[derive(Debug, Clone)]
pub struct VmView {
    pub config: VmConfig,
    pub session: SessionHandle,
    pub clients: usize,
}

struct Supervisor {
    config: Config,
    vms: HashMap<String, Vm>,
}

/// Runs the daemon until `shutdown` is cancelled, then stops cleanly and
/// removes its socket files.
pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> Result<(), RunError> {
    let (_tx, rx) = mpsc::channel(1);
    run_with_reload(config, listeners, shutdown, rx).await
}

/// [`run`], also applying configurations received on `reloads`.
pub async fn run_with_reload(
    config: Config,
    mut listeners: Listeners,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<Reload>,
) -> Result<(), RunError> {
    let mut sup = Supervisor {
        config: config.clone(),
        vms: HashMap::new(),
    };
    for vm in &config.vms {
        let listener = listeners
            .0
            .remove(&vm.name)
            .ok_or_else(|| RunError::MissingListener(vm.name.clone()))?;
        sup.start_vm(vm.clone(), listener);
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(reload) = reloads.recv() => {
                let result = sup.reload(reload.config).await;
                let _ = reload.done.send(result);
            }
        }
    }
    info!("shutting down");
    let all: Vec<Vm> = sup.vms.drain().map(|(_, vm)| vm).collect();
    futures_util::future::join_all(all.into_iter().map(stop_vm)).await;
    Ok(())
}

impl Supervisor {
    fn start_vm(&mut self, vm: VmConfig, sockets: VmSockets) {
        let (stop, hard) = (CancellationToken::new(), CancellationToken::new());
        let (tasks, clients) = (TaskTracker::new(), TaskTracker::new());
        let upstream_opts = self.config.upstream.clone();
        let session = upstream::spawn(vm.clone(), upstream_opts, sockets.upstream, hard.clone(), &tasks);
        let listener = sockets.clients;
        let max_clients = self.config.client.max_clients;
        let slots = Arc::new(Semaphore::new(max_clients));
        let ctx = ClientContext {
            vm: vm.name.as_str().into(),
            session: session.clone(),
            opts: self.config.client.clone(),
            stop: stop.clone(),
            hard: hard.clone(),
        };
        info!(vm = %vm.name, listen = %vm.listen.display(), upstream = %vm.upstream.display(), "serving VM");
        tasks.spawn(accept_loop(listener, ctx, clients.clone(), slots.clone()));
        self.vms.insert(
            vm.name.clone(),
            Vm {
                config: vm,
                session,
                slots,
                max_clients,
                stop,
                hard,
                clients,
                tasks,
            },
        );
    }

    /// Applies a new configuration: VMs whose entry is unchanged keep
    /// running untouched; others are started, stopped or restarted. New
    /// `[upstream]`/`[client]` options apply to VMs (re)started from now on.
    async fn reload(&mut self, new: Config) -> Result<ReloadSummary, RunError> {
        let mut summary = ReloadSummary::default();
        let wanted: HashMap<&str, &VmConfig> = new.vms.iter().map(|v| (v.name.as_str(), v)).collect();
        // Bind what is new first, so a bad path leaves everything as it was.
        let mut to_start = Vec::new();
        let mut to_stop = Vec::new();
        for vm in &new.vms {
            match self.vms.get(&vm.name) {
                Some(running) if running.config == *vm => summary.unchanged.push(vm.name.clone()),
                Some(running) => {
                    summary.restarted.push(vm.name.clone());
                    if running.config.listen == vm.listen || running.config.upstream_mode == UpstreamMode::Accept {
                        // Same path: it must be free before binding again.
                        to_stop.push(vm.name.clone());
                        to_start.push((vm.clone(), None));
                    } else {
                        to_start.push((vm.clone(), Some(bind_vm(vm, &new.socket).await?)));
                        to_stop.push(vm.name.clone());
                    }
                }
                None => {
                    to_start.push((vm.clone(), Some(bind_vm(vm, &new.socket).await?)));
                    summary.added.push(vm.name.clone());
                }
            }
        }
        for name in self.vms.keys() {
            if !wanted.contains_key(name.as_str()) {
                to_stop.push(name.clone());
                summary.removed.push(name.clone());
            }
        }
        let stopping: Vec<Vm> = to_stop.iter().filter_map(|n| self.vms.remove(n)).collect();
        futures_util::future::join_all(stopping.into_iter().map(stop_vm)).await;
        self.config = new;
        for (vm, listener) in to_start {
            let listener = match listener {
                Some(l) => l,
                None => match bind_vm(&vm, &self.config.socket).await {
                    Ok(l) => l,
                    Err(e) => {
                        error!(vm = %vm.name, error = %crate::error::chain(&e), "cannot restart VM after reload");
                        continue;
                    }
                },
            };
            self.start_vm(vm, listener);
        }
        info!(
            added = ?summary.added,
            removed = ?summary.removed,
            restarted = ?summary.restarted,
            unchanged = summary.unchanged.len(),
            "configuration reloaded"
        );
        Ok(summary)
    }
}

/// Stops one VM: no new clients (socket removed at once), replies to what is
/// in flight for up to [`STOP_GRACE`], then everything.
async fn stop_vm(vm: Vm) {
    vm.stop.cancel();
    vm.clients.close();
    if tokio::time::timeout(STOP_GRACE, vm.clients.wait()).await.is_err() {
        warn!(vm = %vm.config.name, "clients still waiting for replies after {STOP_GRACE:?}; closing them");
    }
    vm.hard.cancel();
    vm.tasks.close();
    vm.clients.wait().await;
    vm.tasks.wait().await;
    let _ = std::fs::remove_file(&vm.config.listen);
    if vm.config.upstream_mode == UpstreamMode::Accept {
        let _ = std::fs::remove_file(&vm.config.upstream);
    }
    info!(vm = %vm.config.name, "VM stopped");
}

impl Vm {
    #[allow(dead_code)]
    fn view(&self) -> VmView {
        VmView {
            config: self.config.clone(),
            session: self.session.clone(),
            clients: self.max_clients - self.slots.available_permits(),
        }
    }
}
