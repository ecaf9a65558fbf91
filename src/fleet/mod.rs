//! Beyond one host: every VM's events and state published to NATS (with
//! JetStream, durably and exactly once), QMP commands answered from NATS
//! requests, and the VM list for discovery (`[nats]`).
//!
//! One task on qmpmux's main runtime owns the NATS connection (async-nats
//! reconnects by itself) and, per VM, an event publisher ([`publish`]) and,
//! with `commands = true`, a commander ([`commands`]) attached to the VM's
//! session as one client per requester ([`lanes`]). The publishers read from each VM's event history
//! (the session owns it), so while NATS is unreachable nothing piles up
//! here and local clients are unaffected; once it is back, publishing
//! resumes from the last acknowledged number.

mod chain;
mod commands;
mod connect;
mod lanes;
mod probe;
mod publish;
pub mod subjects;

pub use commands::one_frame as request_frame;
pub use connect::{with_auth, with_tls, AuthError};

use crate::config::NatsConfig;
use crate::ops::control::NatsStatus;
use crate::ops::metrics::NatsMetrics;
use crate::policy::Policy;
use crate::upstream::SessionHandle;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use subjects::Subjects;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

/// A VM the fleet serves.
#[derive(Debug, Clone)]
pub struct FleetVm {
    pub name: String,
    pub session: SessionHandle,
    /// Publish events numbered after this one: those the VM had when the
    /// fleet was told about it were not for NATS (its start, or a change
    /// of `[nats]`), all later ones are, even if NATS is not reachable yet.
    pub after: u64,
}

impl FleetVm {
    /// VM `name` served by `session`, publishing from its next event on.
    pub fn new(name: &str, session: &SessionHandle) -> FleetVm {
        let next = *session.watch_events().borrow();
        FleetVm {
            name: name.into(),
            session: session.clone(),
            after: next.saturating_sub(1),
        }
    }
}

/// The running fleet service; stopped by [`FleetHandle::stop`] or when the
/// daemon's token is cancelled.
#[derive(Debug)]
pub struct FleetHandle {
    config: NatsConfig,
    vms: mpsc::Sender<Vec<FleetVm>>,
    client: async_nats::Client,
    metrics: NatsMetrics,
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// What the fleet's tasks share.
#[derive(Clone)]
struct Shared {
    client: async_nats::Client,
    jetstream: Option<async_nats::jetstream::Context>,
    /// The order of the host's JetStream publishes (all VMs share a stream).
    chain: Arc<chain::Chain>,
    config: Arc<NatsConfig>,
    /// `[client] lease_exempt`: commands a lease does not hold up.
    lease_exempt: Arc<[crate::policy::Glob]>,
    subjects: Subjects,
    metrics: NatsMetrics,
    stop: CancellationToken,
}

impl FleetHandle {
    /// Connects (in the background: qmpmux starts even while NATS is down)
    /// and starts publishing; `vms` follow with [`FleetHandle::set_vms`].
    pub async fn spawn(
        config: NatsConfig,
        lease_exempt: &[crate::policy::Glob],
        metrics: NatsMetrics,
        parent: &CancellationToken,
    ) -> FleetHandle {
        let stop = parent.child_token();
        let client = connect::connect(&config, metrics.clone()).await;
        let jetstream = config.stream.as_ref().map(|_| publish::context(client.clone()));
        let shared = Shared {
            client: client.clone(),
            jetstream,
            chain: Arc::default(),
            subjects: Subjects::new(&config.prefix),
            config: Arc::new(config.clone()),
            lease_exempt: lease_exempt.into(),
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        let (vms_tx, vms_rx) = mpsc::channel(4);
        let tasks = TaskTracker::new();
        let span = tracing::info_span!("nats", prefix = %config.prefix);
        tasks.spawn(run(shared, vms_rx, tasks.clone()).instrument(span));
        info!(servers = ?config.servers, prefix = %config.prefix, stream = ?config.stream.as_ref().map(|s| &s.name),
            commands = config.commands, "publishing to NATS");
        FleetHandle {
            config,
            vms: vms_tx,
            client,
            metrics,
            stop,
            tasks,
        }
    }

    /// The VMs to serve now (at start and after each reload).
    pub async fn set_vms(&self, vms: Vec<FleetVm>) {
        let _ = self.vms.send(vms).await;
    }

    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    pub fn status(&self) -> NatsStatus {
        let m = &self.metrics;
        NatsStatus {
            servers: self.config.servers.clone(),
            state: connect::state_name(self.client.connection_state()).into(),
            prefix: self.config.prefix.clone(),
            stream: self.config.stream.as_ref().map(|s| s.name.clone()),
            commands: self.config.commands,
            published: m.published.get(),
            acknowledged: m.acknowledged.get(),
            pending: m.pending.get(),
            dropped: m.dropped.get() + m.too_large.get(),
            reconnects: m.reconnects.get(),
        }
    }

    /// Stops publishing and closes the connection (what is not published
    /// yet stays unpublished: the history is the VM's).
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.client.flush()).await;
        let _ = self.client.drain().await;
        self.metrics.connected.set(0);
        self.metrics.pending.set(0);
    }
}

/// One served VM's tasks.
struct Served {
    vm: FleetVm,
    stop: CancellationToken,
    commander: Option<commands::Commander>,
}

/// Owns the set of served VMs; answers `<prefix>.vms` and `<parent>.vms`
/// requests and routes `<prefix>.<vm>.execute` requests to the VM's
/// commander.
async fn run(shared: Shared, mut vms_rx: mpsc::Receiver<Vec<FleetVm>>, tasks: TaskTracker) {
    if let (Some(js), Some(stream)) = (shared.jetstream.clone(), shared.config.stream.clone()) {
        // Not waited for: NATS may be down; publishers retry it.
        let subjects = shared.subjects.clone();
        tasks.spawn(async move { publish::ensure_stream(&js, &stream, &subjects).await });
    }
    let client = &shared.client;
    let mut list_requests = subscribe(client, shared.subjects.vms()).await;
    let mut discovery = subscribe(client, shared.subjects.discovery()).await;
    let mut execute = match shared.config.commands {
        true => subscribe(client, shared.subjects.all_execute()).await,
        false => None,
    };
    let mut served: HashMap<String, Served> = HashMap::new();
    loop {
        // All cancel-safe: channel and subscription streams.
        tokio::select! {
            vms = vms_rx.recv() => match vms {
                Some(vms) => set_vms(&shared, &tasks, &mut served, vms).await,
                None => break,
            },
            Some(msg) = next(&mut list_requests) => answer_list(&shared, &served, msg).await,
            Some(msg) = next(&mut discovery) => answer_list(&shared, &served, msg).await,
            Some(msg) = next(&mut execute) => route_command(&shared, &served, msg).await,
            () = shared.stop.cancelled() => break,
        }
    }
    for s in served.values() {
        s.stop.cancel();
    }
}

async fn subscribe(client: &async_nats::Client, subject: String) -> Option<async_nats::Subscriber> {
    match client.subscribe(subject.clone()).await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(%subject, error = %e, "cannot subscribe on NATS");
            None
        }
    }
}

async fn next(sub: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Starts and stops VMs' tasks to match `vms`, then publishes the list.
async fn set_vms(shared: &Shared, tasks: &TaskTracker, served: &mut HashMap<String, Served>, vms: Vec<FleetVm>) {
    // Gone, or restarted by a reload (a new session): stop its tasks.
    served.retain(|name, s| {
        let keep = vms
            .iter()
            .any(|v| v.name == *name && v.session.same_session(&s.vm.session));
        if !keep {
            s.stop.cancel();
        }
        keep
    });
    for vm in vms {
        if served.contains_key(&vm.name) {
            continue;
        }
        let stop = shared.stop.child_token();
        let span = tracing::info_span!("vm", vm = %vm.name);
        tasks.spawn(publish::run(shared.clone(), vm.clone(), stop.clone()).instrument(span.clone()));
        let commander = shared.config.commands.then(|| {
            let policy: Policy = shared.config.policy.clone();
            commands::Commander::spawn(shared.clone(), vm.clone(), policy, stop.clone(), tasks, span)
        });
        let vm = vm.clone();
        served.insert(vm.name.clone(), Served { vm, stop, commander });
    }
    let list = vm_list(shared, served);
    if let Err(e) = shared.client.publish(shared.subjects.vms(), list.into()).await {
        warn!(error = %e, "cannot publish the VM list");
    } else {
        shared.metrics.published.inc();
    }
}

/// A request for the VM list (on `<prefix>.vms` or the parent's
/// `<parent>.vms`), answered.
async fn answer_list(shared: &Shared, served: &HashMap<String, Served>, msg: async_nats::Message) {
    if let Some(reply) = msg.reply {
        let _ = shared.client.publish(reply, vm_list(shared, served).into()).await;
    }
}

/// `{"host": ..., "vms": [...]}`, names sorted.
fn vm_list(shared: &Shared, served: &HashMap<String, Served>) -> String {
    let mut names: Vec<&String> = served.keys().collect();
    names.sort();
    serde_json::json!({"host": shared.config.host, "prefix": shared.config.prefix, "vms": names}).to_string()
}

/// A request on `<prefix>.<vm>.execute`: to the VM's commander, or an
/// error naming the VM when this host has none by that name.
async fn route_command(shared: &Shared, served: &HashMap<String, Served>, msg: async_nats::Message) {
    shared.metrics.commands.inc();
    let vm = shared.subjects.execute_vm(msg.subject.as_str()).unwrap_or("");
    match served.get(vm).and_then(|s| s.commander.as_ref()) {
        Some(c) => c.submit(msg).await,
        None => {
            let desc = format!("qmpmux: no VM '{vm}' on host '{}'", shared.config.host);
            commands::answer_unrouted(shared, msg, "GenericError", &desc).await;
        }
    }
}
