//! The set of VMs: one upstream session, one listener and its clients each;
//! live reload (start, stop or restart only the VMs whose configuration
//! changed) and clean stop.

use crate::config::{Config, VmConfig};
use crate::downstream::client::ClientContext;
use crate::downstream::slots::VmSlots;
use crate::downstream::{accept_loop, accept_tcp_loop};
use crate::handover::state::VmState;
use crate::handover::{names, Counts, Handover, Keeper};
use crate::listen::sockfile::SocketFile;
use crate::listen::{bind_or_undo, bind_vm, shares_a_path, Bound, ListenError, Listeners, VmSockets};
use crate::ops::control::{
    serve_control, ControlRequest, ReloadReply, ReloadStatus, StatusQuery, StatusReport, VmStatus, RESPONSIVE_WITHIN,
};
use crate::ops::metrics::serve_metrics;
use crate::ops::metrics::{Metrics, SharedMetrics, VmMetrics};
use crate::runtime::shards::{Lease, Shards};
use crate::upstream::{self, SessionHandle};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
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
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot start the threads that serve VMs")]
    Threads(#[source] std::io::Error),
    #[error("configuration rejected: {0}")]
    Rejected(String),
    #[error("VM '{vm}': cannot move its sockets to the thread that serves it")]
    Rehome {
        vm: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: Vec<String>,
    /// Settings that changed but are read only at start (see
    /// [`Config::need_restart`]): left as they were.
    pub need_restart: Vec<&'static str>,
}

/// Reads the configuration file for a reload (SIGHUP or the control
/// socket): the error on one line, and a warning when the file shows its
/// NATS secrets to others.
pub fn load_for_reload(path: &Path) -> Result<Config, String> {
    let config = Config::load(path).map_err(|e| crate::error::chain(&e).replace('\n', " "));
    if let Some(e) = config.as_ref().ok().and_then(|c| c.exposed_secrets(path)) {
        warn!("{e}");
    }
    config
}

/// A request to apply a new configuration; the answer says what changed.
pub struct Reload {
    /// The new configuration, or why the file was rejected (then nothing
    /// changes; the failure is recorded for `qmpmux status` and metrics).
    pub config: Result<Config, String>,
    pub done: oneshot::Sender<Result<ReloadSummary, RunError>>,
}

/// One running VM.
struct Vm {
    config: VmConfig,
    session: SessionHandle,
    metrics: VmMetrics,
    /// Graceful stop of the listener and clients.
    stop: CancellationToken,
    /// Immediate stop of everything, session included.
    hard: CancellationToken,
    clients: TaskTracker,
    tasks: TaskTracker,
    /// The shard the VM's tasks run on.
    shard: Lease,
    /// Its socket files, removed when it stops (if still ours).
    files: Vec<SocketFile>,
    keeper: Arc<Keeper>,
    /// The names its sockets are kept under for the next process.
    kept: Vec<String>,
    /// Hand the clients over to the next process.
    handover: CancellationToken,
}

struct Supervisor {
    config: Config,
    vms: HashMap<String, Vm>,
    metrics: SharedMetrics,
    shards: Shards,
    started: std::time::Instant,
    last_reload: Option<ReloadStatus>,
    /// The NATS side, with `[nats]`.
    fleet: Option<crate::fleet::FleetHandle>,
    /// The daemon's stop, which the fleet's tasks follow.
    shutdown: CancellationToken,
    /// The file the configuration came from: what `reload` on the control
    /// socket reads (`None`: the demo, or a test's configuration).
    source: Option<PathBuf>,
    /// What the previous process handed over (until the VMs took it), and
    /// what is kept for the next.
    handover: Handover,
    counts: Counts,
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
    listeners: Listeners,
    shutdown: CancellationToken,
    reloads: mpsc::Receiver<Reload>,
) -> Result<(), RunError> {
    run_from_file(config, None, listeners, shutdown, reloads).await
}

/// [`run_with_reload`] for a configuration read from `source`, which a
/// `reload` request on the control socket reads again.
pub async fn run_from_file(
    config: Config,
    source: Option<PathBuf>,
    mut listeners: Listeners,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<Reload>,
) -> Result<(), RunError> {
    let shards = match Shards::start(config.threads) {
        Ok(s) => s,
        Err(e) => return Err(listeners.undo(RunError::Threads(e))),
    };
    let mut sup = Supervisor {
        config: config.clone(),
        vms: HashMap::new(),
        metrics: Arc::new(Metrics::new()),
        shards,
        started: std::time::Instant::now(),
        last_reload: None,
        fleet: None,
        shutdown: shutdown.clone(),
        source,
        handover: std::mem::replace(&mut listeners.handover, Handover::none()),
        counts: Counts::default(),
    };
    // What the previous process wrote when it handed over, if it did.
    let state = sup.handover.take_state();
    let mut restored: HashMap<String, VmState> = HashMap::new();
    if let Some(state) = state {
        sup.counts = Counts::after(&state);
        restored = state.vms.into_iter().map(|v| (v.name.clone(), v)).collect();
    } else if sup.handover.after_crash() {
        sup.counts.crash_recoveries += 1;
        if sup.handover.fallback {
            sup.counts.fallbacks += 1;
        }
        warn!("started from what a crash of the previous qmpmux left (its clients were closed)");
    }
    sup.metrics.record_handovers(&sup.counts);
    for vm in &config.vms {
        let started = match listeners.vms.remove(&vm.name) {
            Some(sockets) => {
                let restored = restored.remove(&vm.name);
                sup.start_vm(vm.clone(), sockets, restored)
            }
            None => Err(RunError::MissingListener(vm.name.clone())),
        };
        if let Err(e) = started {
            // A failed start leaves no socket files behind.
            let all: Vec<Vm> = sup.vms.drain().map(|(_, vm)| vm).collect();
            futures_util::future::join_all(all.into_iter().map(stop_vm)).await;
            return Err(listeners.undo(e));
        }
    }
    let keeper = sup.handover.keeper.clone();
    sup.handover.inherited.close_rest(&keeper);
    sup.sync_fleet().await;
    let services = TaskTracker::new();
    let (request_tx, mut requests) = mpsc::channel(16);
    // Removed at exit only if qmpmux bound it: when binding failed, the
    // file there is another's (a running instance's, or not a socket).
    let mut control_file = None;
    if let Some((l, created)) = listeners.control.take() {
        control_file = Some(created);
        services.spawn(serve_control(l, request_tx, shutdown.clone()));
    }
    if let Some(l) = listeners.metrics.take() {
        services.spawn(serve_metrics(l, sup.metrics.clone(), shutdown.clone()));
    }
    services.spawn(crate::ops::systemd::run_watchdog(
        sup.shards.liveness(),
        shutdown.clone(),
    ));
    // Every second, which VM threads are blocked, for `qmpmux_responding`
    // (`qmpmux status` probes afresh for each report).
    let (stuck_tx, mut stuck) = watch::channel(Vec::new());
    services.spawn(sup.shards.liveness().publish(
        Duration::from_secs(1),
        RESPONSIVE_WITHIN,
        stuck_tx,
        shutdown.clone(),
    ));
    // Freed memory goes back to the system after many clients leave.
    let mut clients_mark = crate::ops::trim::HighWater::default();
    let mut trim_tick = tokio::time::interval(Duration::from_secs(1));
    trim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = trim_tick.tick() => clients_mark.observe(sup.clients()),
            Some(reload) = reloads.recv() => {
                let result = sup.apply(reload.config).await;
                let _ = reload.done.send(result);
            }
            Some(request) = requests.recv() => match request {
                ControlRequest::Status(query) => sup.answer(query, &services),
                ControlRequest::Reload(done) => {
                    let reply = sup.reload_file().await;
                    let _ = done.send(reply);
                }
                ControlRequest::Tap { vm, reply } => {
                    let _ = reply.send(sup.tap(&vm));
                }
            },
            Ok(()) = stuck.changed() => sup.mark_responding(&stuck.borrow_and_update()),
        }
    }
    info!("shutting down");
    if let Some(fleet) = sup.fleet.take() {
        fleet.stop().await;
    }
    services.close();
    services.wait().await;
    // Handing over: the next process serves the same socket files.
    if !keeper.is_frozen() {
        for s in control_file.iter().flat_map(|c| &c.sockets) {
            s.remove();
        }
    }
    let all: Vec<Vm> = sup.vms.drain().map(|(_, vm)| vm).collect();
    if keeper.is_frozen() {
        sup.hand_over(all).await;
    } else {
        futures_util::future::join_all(all.into_iter().map(stop_vm)).await;
    }
    Ok(())
}

impl Supervisor {
    /// Hands every VM over to the next process: their clients once each
    /// one's commands are answered, then the state that describes them,
    /// kept (in a sealed memfd) with the rest.
    async fn hand_over(&mut self, all: Vec<Vm>) {
        let frozen_at_us = crate::events::History::first_number();
        let connected = self.clients();
        let vms: Vec<VmState> = futures_util::future::join_all(all.into_iter().map(hand_over_vm))
            .await
            .into_iter()
            .flatten()
            .collect();
        let clients: usize = vms.iter().map(|v| v.clients.len()).sum();
        let state = crate::handover::state::State {
            version: env!("CARGO_PKG_VERSION").into(),
            frozen_at_us,
            handovers: self.counts.handovers,
            crash_recoveries: self.counts.crash_recoveries,
            fallbacks: self.counts.fallbacks,
            clients_closed: connected.saturating_sub(clients) as u64,
            vms,
        };
        match crate::handover::state::to_memfd(&crate::handover::state::encode(&state)) {
            Ok(fd) => {
                self.handover.keeper.keep(names::STATE, std::os::fd::AsFd::as_fd(&fd));
                info!(clients, closed = connected.saturating_sub(clients), "handed over");
            }
            Err(e) => error!(error = %e, "cannot write the handover state: the next process closes the clients"),
        }
        let keeper = self.handover.keeper.clone();
        let flushed = tokio::task::spawn_blocking(move || keeper.flush(Duration::from_secs(10))).await;
        if !matches!(flushed, Ok(true)) {
            error!("systemd's file descriptor store did not take everything in time; some clients may be closed");
        }
    }
}

/// Hands one VM over: no new clients (connections wait in the backlog),
/// each unix client handed over once its commands are answered (TLS ones
/// closed after theirs), then the session's state; the connection to QEMU
/// and the journal stay kept.
async fn hand_over_vm(vm: Vm) -> Option<VmState> {
    vm.handover.cancel();
    vm.clients.close();
    if tokio::time::timeout(STOP_GRACE + Duration::from_secs(1), vm.clients.wait())
        .await
        .is_err()
    {
        warn!(vm = %vm.config.name, "clients still busy after {STOP_GRACE:?}; closing them");
        vm.stop.cancel();
    }
    let state = match tokio::time::timeout(STOP_GRACE, vm.session.freeze()).await {
        Ok(Ok(s)) => Some(s),
        _ => {
            warn!(vm = %vm.config.name, "the VM's session did not hand over its state");
            None
        }
    };
    vm.hard.cancel();
    vm.tasks.close();
    vm.clients.wait().await;
    vm.tasks.wait().await;
    state
}

impl Supervisor {
    fn start_vm(&mut self, vm: VmConfig, sockets: VmSockets, restored: Option<VmState>) -> Result<(), RunError> {
        // Programs run on events start from the main runtime, which has the
        // process driver; everything else runs on the VM's shard.
        let actions = crate::events::actions::Actions::spawn(&vm.name, &vm.on_event);
        let shard = self.shards.place();
        let _on_shard = shard.handle.enter();
        let files = sockets.files.sockets.clone();
        let kept = sockets.kept.clone();
        let sockets = sockets.rehome().map_err(|source| {
            files.iter().for_each(SocketFile::remove);
            RunError::Rehome {
                vm: vm.name.clone(),
                source,
            }
        })?;
        let (stop, hard, handover) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        let (tasks, clients) = (TaskTracker::new(), TaskTracker::new());
        let upstream_opts = self.config.upstream.clone();
        let metrics = self.metrics.vm(&vm.name);
        let keeper = self.handover.keeper.clone();
        // Clients handed over: members of the session from its first
        // event on, each with the mailbox its task will read.
        let mut resumed = Vec::new();
        let mut members = Vec::new();
        let mut restored = restored.unwrap_or_default();
        for state in std::mem::take(&mut restored.clients) {
            let Some(fd) = self.handover.take(&names::client(&vm.name, state.id)) else {
                info!(vm = %vm.name, client = state.id, "a client handed over has gone meanwhile");
                continue;
            };
            // Out of systemd's store: the connection is this process's now
            // (the store's copy would keep it open after a close).
            keeper.release(&names::client(&vm.name, state.id));
            let passed = state
                .passed_fd
                .then(|| self.handover.take(&names::passed(&vm.name, state.id)))
                .flatten();
            keeper.release(&names::passed(&vm.name, state.id));
            crate::downstream::numbers_above(state.id);
            let Some(l) = vm.all_listeners().nth(state.listener) else {
                warn!(vm = %vm.name, client = state.id, "a client handed over came in on a listener no longer configured; closed");
                continue;
            };
            let (tx, rx) = crate::upstream::mailbox::mailbox(self.config.client.max_queue_bytes);
            members.push(crate::upstream::ResumedMember {
                client: state.id,
                mailbox: tx,
                events: l.events.clone(),
                resumed: crate::upstream::Resumed {
                    numbered: state.numbered,
                    narrowed: state.narrowed.clone(),
                },
            });
            resumed.push((state, fd, passed, rx));
        }
        let spec = upstream::Spec {
            vm: vm.clone(),
            opts: upstream_opts,
            ahead: self.config.client.max_ahead,
            listener: sockets.upstream,
            metrics: metrics.clone(),
            actions,
            keeper: keeper.clone(),
            inherited_qemu: self.handover.take(&names::qemu(&vm.name)),
            inherited_journal: self.handover.take(&names::journal(&vm.name)),
            restored: (restored, members),
        };
        let session = upstream::spawn(spec, hard.clone(), &tasks);
        let max_clients = self.config.client.max_clients;
        let slots = VmSlots::new(max_clients, vm.listener_share(max_clients));
        let ctx = ClientContext {
            vm: vm.name.as_str().into(),
            session: session.clone(),
            opts: self.config.client.clone(),
            stop: stop.clone(),
            hard: hard.clone(),
            metrics: metrics.clone(),
            listener: Arc::new(vm.main.clone()),
            listener_index: 0,
            handover: handover.clone(),
            keeper: keeper.clone(),
        };
        info!(vm = %vm.name, listen = %vm.listen().display(), upstream = %vm.upstream.display(), "serving VM");
        // Listener 0 is the main socket: slots kept for it, no limit of its own.
        for (n, (l, bound)) in vm.all_listeners().zip(sockets.listeners).enumerate() {
            let ctx = ClientContext {
                listener: Arc::new(l.clone()),
                listener_index: n,
                ..ctx.clone()
            };
            let slots = if n == 0 {
                slots.main()
            } else {
                slots.listener(l.max_clients)
            };
            let shared = Arc::new(ctx.clone());
            for (state, fd, passed, mailbox) in resumed.extract_if(.., |r| r.0.listener == n) {
                let Some(slot) = crate::downstream::take_slot(&slots, &shared, None) else {
                    continue;
                };
                let id = state.id;
                if let Err(e) = crate::downstream::resume_client(&clients, &shared, slot, fd, passed, state, mailbox) {
                    warn!(vm = %vm.name, client = id, error = %e, "cannot serve a client handed over; closed");
                }
            }
            let policy = l.policy.describe();
            match bound {
                Bound::Unix(sock) => {
                    if n > 0 {
                        let path = l.endpoint.path().unwrap_or(Path::new("")).display();
                        info!(vm = %vm.name, listener = %l.name, %path, %policy, "extra listener");
                    }
                    tasks.spawn(accept_loop(sock, ctx, clients.clone(), slots));
                }
                Bound::Tcp(sock, tls) => {
                    let addr = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    info!(vm = %vm.name, listener = %l.name, %addr, tls = tls.is_some(), %policy, "extra listener");
                    tasks.spawn(accept_tcp_loop(sock, tls, ctx, clients.clone(), slots));
                }
            }
        }
        self.vms.insert(
            vm.name.clone(),
            Vm {
                config: vm,
                session,
                metrics,
                stop,
                hard,
                clients,
                tasks,
                shard,
                files,
                keeper,
                kept,
                handover,
            },
        );
        Ok(())
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
                    if shares_a_path(&running.config, vm) {
                        // Same path: it must be free before binding again.
                        to_stop.push(vm.name.clone());
                        to_start.push((vm.clone(), None));
                    } else {
                        let bound = bind_or_undo(vm, &new.socket, &mut to_start, &mut self.handover).await?;
                        to_start.push((vm.clone(), Some(bound)));
                        to_stop.push(vm.name.clone());
                    }
                }
                None => {
                    let bound = bind_or_undo(vm, &new.socket, &mut to_start, &mut self.handover).await?;
                    to_start.push((vm.clone(), Some(bound)));
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
        for name in &summary.removed {
            self.metrics.remove_vm(name);
        }
        self.config = new;
        for (vm, listener) in to_start {
            let listener = match listener {
                Some(l) => l,
                None => match bind_vm(&vm, &self.config.socket, &mut self.handover).await {
                    Ok(l) => l,
                    Err(e) => {
                        error!(vm = %vm.name, error = %crate::error::chain(&e), "cannot restart VM after reload");
                        continue;
                    }
                },
            };
            if let Err(e) = self.start_vm(vm, listener, None) {
                error!(error = %crate::error::chain(&e), "cannot start VM after reload");
            }
        }
        self.sync_fleet().await;
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

/// Stops one VM: no new clients (its sockets are removed at once), replies
/// to what is in flight for up to [`STOP_GRACE`], then everything.
async fn stop_vm(vm: Vm) {
    vm.stop.cancel();
    // Handing over: the next process serves the same socket files, and
    // everything kept stays kept.
    if !vm.keeper.is_frozen() {
        for f in &vm.files {
            f.remove();
        }
    }
    vm.clients.close();
    if tokio::time::timeout(STOP_GRACE, vm.clients.wait()).await.is_err() {
        warn!(vm = %vm.config.name, "clients still waiting for replies after {STOP_GRACE:?}; closing them");
    }
    vm.hard.cancel();
    vm.tasks.close();
    vm.clients.wait().await;
    vm.tasks.wait().await;
    // Not handing over: nobody needs its sockets and journal any more (a
    // VM restarted by a reload keeps sockets, and a journal, of its own).
    if !vm.keeper.is_frozen() {
        for name in &vm.kept {
            vm.keeper.forget(name);
        }
        vm.keeper.forget(&names::journal(&vm.config.name));
    }
    info!(vm = %vm.config.name, "VM stopped");
}

impl Supervisor {
    /// Clients connected, over all VMs.
    fn clients(&self) -> usize {
        self.vms
            .values()
            .map(|vm| vm.metrics.clients.get().max(0) as usize)
            .sum()
    }

    /// Answers `query` with a report once each VM's thread has been
    /// probed (up to [`RESPONSIVE_WITHIN`] when one is blocked), without
    /// holding up the supervisor meanwhile.
    fn answer(&self, query: StatusQuery, services: &TaskTracker) {
        let mut report = self.report();
        let shards: Vec<Option<usize>> = report
            .vms
            .iter()
            .map(|s| self.vms.get(&s.name).map(|vm| vm.shard.shard))
            .collect();
        let live = self.shards.liveness();
        services.spawn(async move {
            let stuck = live.unresponsive(RESPONSIVE_WITHIN).await;
            for (vm, shard) in report.vms.iter_mut().zip(shards) {
                if shard.is_some_and(|s| stuck.contains(&s)) {
                    vm.mark_unresponsive();
                }
            }
            let _ = query.send(report);
        });
    }

    /// Attaches a tap to VM `vm`; no such VM: the names there are.
    fn tap(&self, vm: &str) -> Result<crate::upstream::tap::Tap, Vec<String>> {
        match self.vms.get(vm) {
            Some(v) => Ok(v.session.tap().attach()),
            None => {
                let mut known: Vec<String> = self.vms.keys().cloned().collect();
                known.sort();
                Err(known)
            }
        }
    }

    /// Sets each VM's `responding` gauge from the latest probe.
    fn mark_responding(&self, stuck: &[usize]) {
        for vm in self.vms.values() {
            vm.metrics.responding.set(i64::from(!stuck.contains(&vm.shard.shard)));
        }
    }

    fn report(&self) -> StatusReport {
        let mut vms: Vec<VmStatus> = self.vms.values().map(Vm::status).collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            started_at: self.metrics.start_time(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            last_reload: self.last_reload.clone(),
            handover: Some(self.counts.clone()),
            vms,
            nats: self.fleet.as_ref().map(|f| f.status()),
        }
    }

    /// Starts, restarts (changed `[nats]`) or stops the fleet service to
    /// match the configuration, and gives it the VMs running now.
    async fn sync_fleet(&mut self) {
        let wanted = self.config.nats.clone();
        if self.fleet.as_ref().map(|f| f.config()) != wanted.as_ref() {
            if let Some(old) = self.fleet.take() {
                info!("[nats] changed: reconnecting");
                old.stop().await;
            }
            if let Some(cfg) = wanted {
                let exempt = &self.config.client.lease_exempt;
                let fleet = crate::fleet::FleetHandle::spawn(cfg, exempt, self.metrics.nats(), &self.shutdown).await;
                self.fleet = Some(fleet);
            }
        }
        if let Some(fleet) = &self.fleet {
            let vms = self
                .vms
                .values()
                .map(|vm| crate::fleet::FleetVm::new(&vm.config.name, &vm.session))
                .collect();
            fleet.set_vms(vms).await;
        }
    }

    /// Applies a configuration (or records why its file was rejected), as
    /// SIGHUP and the control socket's `reload` both do; logs the outcome.
    async fn apply(&mut self, config: Result<Config, String>) -> Result<ReloadSummary, RunError> {
        let result = match config {
            Ok(config) => {
                let need_restart = self.config.need_restart(&config);
                for setting in &need_restart {
                    warn!(
                        setting,
                        "reload: this setting changed; it takes effect only when qmpmux restarts"
                    );
                }
                self.reload(config).await.map(|s| ReloadSummary { need_restart, ..s })
            }
            Err(why) => Err(RunError::Rejected(why)),
        };
        match &result {
            Err(RunError::Rejected(error)) => error!(%error, "new configuration rejected; keeping the running one"),
            Err(e) => error!(error = %crate::error::chain(e), "reload failed; running VMs unchanged"),
            Ok(_) => {}
        }
        self.record_reload(&result);
        result
    }

    /// `reload` on the control socket: reads the configuration file again
    /// and applies it, with systemd told as for SIGHUP.
    async fn reload_file(&mut self) -> ReloadReply {
        let Some(path) = self.source.clone() else {
            let error = "this qmpmux has no configuration file to reload (demo mode)".to_string();
            warn!("reload requested on the control socket: {error}");
            return ReloadReply {
                error: Some(error),
                ..ReloadReply::default()
            };
        };
        info!(path = %path.display(), "reload requested on the control socket: reloading configuration");
        crate::ops::systemd::notify_reloading();
        let result = self.apply(load_for_reload(&path)).await;
        crate::ops::systemd::notify_ready();
        match result {
            Ok(s) => ReloadReply {
                ok: true,
                added: s.added,
                removed: s.removed,
                restarted: s.restarted,
                unchanged: s.unchanged,
                need_restart: s.need_restart.into_iter().map(String::from).collect(),
                ..ReloadReply::default()
            },
            Err(e) => ReloadReply {
                rejected: matches!(e, RunError::Rejected(_)),
                error: Some(match e {
                    RunError::Rejected(why) => why,
                    other => crate::error::chain(&other),
                }),
                ..ReloadReply::default()
            },
        }
    }

    fn record_reload(&mut self, result: &Result<ReloadSummary, RunError>) {
        let now = std::time::SystemTime::now();
        self.metrics.record_reload(result.is_ok(), now);
        self.last_reload = Some(ReloadStatus {
            at: now
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            ok: result.is_ok(),
            error: result.as_ref().err().map(|e| crate::error::chain(e)),
        });
    }
}

impl Vm {
    fn status(&self) -> VmStatus {
        let s = self.session.status();
        let m = &self.metrics;
        VmStatus {
            name: self.config.name.clone(),
            upstream: self.config.upstream.display().to_string(),
            upstream_mode: format!("{:?}", self.config.upstream_mode).to_lowercase(),
            listen: self.config.listen().display().to_string(),
            runstate: s.runstate.to_string(),
            responding: true,
            qemu_version: s
                .greeting
                .as_ref()
                .map(|g| serde_json::from_str(&g.version).unwrap_or_else(|_| g.version.clone().into())),
            clients: m.clients.get(),
            in_flight: m.in_flight.get(),
            queued: m.queued.get(),
            connections: m.connections.get(),
            commands: m.commands.get(),
            errors: m.errors.get(),
            events: m.events.get(),
            last_error: s.last_error.clone(),
            lease: s.lease.as_ref().map(|h| crate::ops::control::LeaseStatus {
                client: h.client,
                holder: h.who.clone(),
                reason: h.reason.clone(),
                seconds_left: h
                    .until
                    .saturating_duration_since(std::time::Instant::now())
                    .as_secs_f64()
                    .ceil() as u64,
            }),
        }
    }
}
