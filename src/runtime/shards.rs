//! The threads VMs run on: one single-threaded tokio runtime each.
//!
//! A VM's session task, its accept loops and all its client tasks live on
//! one shard, so a command goes client task -> session task -> QEMU ->
//! session task -> client task without leaving the thread: every hand-off
//! is a local wake-up, with no cross-thread signalling and no work
//! stealing. (On tokio's work-stealing runtime the same hand-offs kept
//! moving between workers; the benchmark measured about 1.6x the CPU per
//! command there.) VMs spread over the shards, each new one going to the
//! shard with the fewest; a busy VM never slows another shard's VMs.

use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::{Builder, Handle};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The shard threads, stopped when dropped.
#[derive(Debug)]
pub struct Shards {
    shards: Vec<Shard>,
    stop: CancellationToken,
    /// One message from each thread once its runtime is gone, with its
    /// sockets, timers and epoll descriptor: a re-execution must not have
    /// a thread closing descriptor numbers it is reusing.
    gone: Vec<std::sync::mpsc::Receiver<()>>,
}

#[derive(Debug)]
struct Shard {
    handle: Handle,
    /// One clone per VM placed here.
    load: Arc<()>,
}

/// A VM's place on a shard; the shard counts it while it is alive.
#[derive(Debug)]
pub struct Lease {
    pub handle: Handle,
    /// The shard's index, as in [`Liveness::unresponsive`] and the thread
    /// name `qmpmux-vm-N`.
    pub shard: usize,
    _load: Arc<()>,
}

impl Shards {
    /// Starts `n` shard threads (0: one per CPU).
    pub fn start(n: usize) -> std::io::Result<Shards> {
        let n = match n {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // Built in place, so that a failure part way still stops (on drop)
        // the threads already started.
        let mut all = Shards {
            shards: Vec::with_capacity(n),
            stop: CancellationToken::new(),
            gone: Vec::with_capacity(n),
        };
        for i in 0..n {
            // Sockets and timers only: signals and child processes are the
            // main runtime's, and their drivers would cost every turn.
            let runtime = Builder::new_current_thread().enable_io().enable_time().build()?;
            let handle = runtime.handle().clone();
            let stopped = all.stop.clone();
            let (gone_tx, gone) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("qmpmux-vm-{i}"))
                // Drives the runtime's tasks until the daemon stops; the
                // runtime, and what is left on it, goes with the thread.
                .spawn(move || {
                    runtime.block_on(stopped.cancelled_owned());
                    drop(runtime);
                    let _ = gone_tx.send(());
                })?;
            all.gone.push(gone);
            all.shards.push(Shard {
                handle,
                load: Arc::new(()),
            });
        }
        Ok(all)
    }

    /// A place for one more VM: the shard with the fewest VMs.
    pub fn place(&self) -> Lease {
        let (index, shard) = self
            .shards
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| Arc::strong_count(&s.load))
            .expect("at least one shard");
        Lease {
            handle: shard.handle.clone(),
            shard: index,
            _load: shard.load.clone(),
        }
    }

    /// VMs per shard, in shard order.
    #[cfg(test)]
    pub fn loads(&self) -> Vec<usize> {
        self.shards.iter().map(|s| Arc::strong_count(&s.load) - 1).collect()
    }

    /// A way to ask, from any thread, whether every shard still runs its
    /// tasks.
    pub fn liveness(&self) -> Liveness {
        Liveness {
            handles: self.shards.iter().map(|s| s.handle.clone()).collect(),
        }
    }
}

/// Probes the shard threads (for the systemd watchdog).
#[derive(Debug, Clone)]
pub struct Liveness {
    handles: Vec<Handle>,
}

impl Liveness {
    /// The shards (by index, as in the thread names `qmpmux-vm-N`) that did
    /// not run a trivial task within `within`: something is blocking their
    /// thread, and every VM on it is stuck.
    pub async fn unresponsive(&self, within: Duration) -> Vec<usize> {
        let probes = self.handles.iter().map(|h| {
            let ran = h.spawn(async {});
            async move { matches!(tokio::time::timeout(within, ran).await, Ok(Ok(()))) }
        });
        let answers = futures_util::future::join_all(probes).await;
        answers
            .iter()
            .enumerate()
            .filter(|(_, ok)| !**ok)
            .map(|(i, _)| i)
            .collect()
    }
}

impl Liveness {
    /// Probes every shard every `every` (each given `within`), publishing
    /// the unresponsive ones on `to` after each round, changed or not, until
    /// `stop` or until nobody listens.
    pub async fn publish(
        self,
        every: Duration,
        within: Duration,
        to: watch::Sender<Vec<usize>>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Cancel-safe: a probe cut short is simply not published.
            let stuck = tokio::select! {
                () = stop.cancelled() => return,
                stuck = async {
                    tick.tick().await;
                    self.unresponsive(within).await
                } => stuck,
            };
            if to.send(stuck).is_err() {
                return;
            }
        }
    }
}

impl Drop for Shards {
    /// Stops the threads, and waits (a moment at most) until each has
    /// dropped its runtime.
    fn drop(&mut self) {
        self.stop.cancel();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for gone in &self.gone {
            let _ = gone.recv_timeout(until.saturating_duration_since(std::time::Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_go_to_the_least_loaded_shard_and_leave_it() {
        let shards = Shards::start(2).unwrap();
        let a = shards.place();
        let b = shards.place();
        assert_eq!(shards.loads(), vec![1, 1]);
        let c = shards.place();
        assert_eq!(shards.loads().iter().sum::<usize>(), 3);
        drop(a);
        drop(b);
        assert_eq!(shards.loads().iter().sum::<usize>(), 1);
        // Tasks spawned through a lease run on that shard's own thread.
        let (tx, rx) = std::sync::mpsc::channel();
        c.handle.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert!(name.is_some_and(|n| n.starts_with("qmpmux-vm-")));
    }

    #[tokio::test]
    async fn a_blocked_shard_thread_is_reported_and_the_others_are_not() {
        let shards = Shards::start(2).unwrap();
        let live = shards.liveness();
        assert_eq!(live.unresponsive(Duration::from_secs(5)).await, Vec::<usize>::new());
        // A task that blocks its thread, as a bug would.
        let stuck = shards.place();
        let (started, wait) = std::sync::mpsc::channel();
        stuck.handle.spawn(async move {
            let _ = started.send(());
            std::thread::sleep(Duration::from_secs(3));
        });
        wait.recv_timeout(Duration::from_secs(5)).unwrap();
        // The lease names the shard the probe finds blocked.
        assert_eq!(live.unresponsive(Duration::from_secs(1)).await, vec![stuck.shard]);
        // Once the thread is free again it answers.
        assert_eq!(live.unresponsive(Duration::from_secs(5)).await, Vec::<usize>::new());
    }

    #[test]
    fn zero_means_one_per_cpu() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(Shards::start(0).unwrap().loads().len(), cpus);
    }
}
