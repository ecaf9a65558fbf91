//! `[[vm.on_event]]`: programs run when an event happens, without a shell,
//! with the event in their environment, a time limit and a bounded number
//! at once per VM; their exit status and output go to the log.
//!
//! The session only matches and hands a job over ([`Actions::fire`], never
//! waiting); a runner task per VM on qmpmux's main runtime (which has the
//! process driver: the VM threads do not) starts the programs.

use crate::config::OnEvent;
use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, Semaphore};
use tracing::{info, warn, Instrument};

/// Programs one VM runs at once; more wait their turn.
pub const CONCURRENCY: usize = 4;
/// Jobs waiting for a turn; beyond that, new ones are dropped and logged.
const QUEUE: usize = 64;
/// Output of a program kept for the log, per stream.
const OUTPUT_KEPT: usize = 4096;
/// How long the output of a program that has exited may still take to end
/// once its group is killed (at most its time left, at least
/// [`MIN_GRACE`]): only a process that left the group can make it last.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
const MIN_GRACE: Duration = Duration::from_millis(50);

/// One program to run.
#[derive(Debug)]
pub struct Job {
    argv: Vec<String>,
    env: [(&'static str, String); 4],
    timeout: Duration,
    event: String,
}

/// A VM's actions, as its session holds them.
#[derive(Debug, Clone, Default)]
pub struct Actions {
    list: Arc<[OnEvent]>,
    tx: Option<mpsc::Sender<Job>>,
    vm: Arc<str>,
}

impl Actions {
    /// The actions of VM `vm`, and their runner spawned on the current
    /// runtime (none when `list` is empty). The runner ends once every
    /// clone of the returned value is gone.
    pub fn spawn(vm: &str, list: &[OnEvent]) -> Actions {
        if list.is_empty() {
            return Actions::default();
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let span = tracing::info_span!("vm", vm = %vm);
        tokio::spawn(run(rx).instrument(span));
        Actions {
            list: list.into(),
            tx: Some(tx),
            vm: vm.into(),
        }
    }

    /// Runs every action whose pattern matches `event`; `line` is the
    /// event's JSON, `seq` its number (none for events not numbered).
    pub fn fire(&self, event: &str, line: &[u8], seq: Option<u64>) {
        let Some(tx) = &self.tx else { return };
        let seq = seq.map(|n| n.to_string()).unwrap_or_default();
        let json = String::from_utf8_lossy(line.trim_ascii_end());
        for action in self.list.iter().filter(|a| a.event.matches(event)) {
            let argv = action
                .run
                .iter()
                .map(|a| {
                    a.replace("{vm}", &self.vm)
                        .replace("{event}", event)
                        .replace("{seq}", &seq)
                })
                .collect();
            let job = Job {
                argv,
                env: [
                    ("QMPMUX_VM", self.vm.to_string()),
                    ("QMPMUX_EVENT", event.to_string()),
                    ("QMPMUX_EVENT_JSON", json.to_string()),
                    ("QMPMUX_SEQ", seq.clone()),
                ],
                timeout: action.timeout,
                event: event.to_string(),
            };
            if let Err(e) = tx.try_send(job) {
                let program = &action.run[0];
                match e {
                    mpsc::error::TrySendError::Full(_) => warn!(
                        event, %program, queued = QUEUE,
                        "on_event: too many programs waiting; not running this one"
                    ),
                    mpsc::error::TrySendError::Closed(_) => {}
                }
            }
        }
    }
}

/// Runs jobs, [`CONCURRENCY`] at a time, until the sender is gone.
async fn run(mut rx: mpsc::Receiver<Job>) {
    let turns = Arc::new(Semaphore::new(CONCURRENCY));
    while let Some(job) = rx.recv().await {
        let Ok(turn) = turns.clone().acquire_owned().await else {
            return;
        };
        tokio::spawn(
            async move {
                execute(job).await;
                drop(turn);
            }
            .in_current_span(),
        );
    }
}

async fn execute(job: Job) {
    let program = job.argv[0].clone();
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&job.argv[1..])
        .envs(job.env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A group of its own: what it starts (`sleep 60 &`) is killed with
        // it, so that "CONCURRENCY at once" holds for those too.
        .process_group(0)
        // Should this future be dropped (qmpmux stopping), the program
        // goes too; `Group`'s drop takes the rest of its group.
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return warn!(event = %job.event, %program, error = %e, "on_event: cannot run program"),
    };
    let (out, err) = (child.stdout.take(), child.stderr.take());
    // Declared after `child`, so dropped before it: the group is killed
    // while its leader is still unreaped.
    let Some(mut group) = child.id().map(Group::new) else {
        return warn!(event = %job.event, %program, "on_event: program gone at once");
    };
    let deadline = tokio::time::Instant::now() + job.timeout;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let timed_out = {
        let reading = async { tokio::join!(keep(out, &mut stdout), keep(err, &mut stderr)) };
        tokio::pin!(reading);
        let exited = tokio::time::timeout_at(deadline, group.leader_exited());
        tokio::pin!(exited);
        let mut read_all = false;
        // Read its output while waiting for it to exit (a full pipe would
        // block it). Both arms are cancel-safe here: `reading` keeps what
        // it read in the buffers, and `exited` is polled to its end.
        let timed_out = loop {
            tokio::select! {
                r = &mut exited => break r.is_err(),
                _ = &mut reading, if !read_all => read_all = true,
            }
        };
        // Its leftovers (or, past its time, all of it): a child that
        // still holds its stdout must not keep the turn until the time
        // limit, and would run outside the limit on programs at once.
        group.kill();
        if !read_all {
            // The group is gone, so the pipes end at once, unless a
            // process left the group (setsid) and keeps them: then what
            // was read so far is logged.
            let grace = OUTPUT_GRACE.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
            let _ = tokio::time::timeout(grace.max(MIN_GRACE), &mut reading).await;
        }
        timed_out
    };
    let status = child.wait().await;
    let (stdout, stderr) = (String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    match status {
        _ if timed_out => warn!(
            event = %job.event, %program, timeout = ?job.timeout, %stdout, %stderr,
            "on_event: program timed out; killed"
        ),
        Ok(status) if status.success() => {
            info!(event = %job.event, %program, %status, %stdout, %stderr, "on_event: program finished")
        }
        Ok(status) => warn!(event = %job.event, %program, %status, %stdout, %stderr, "on_event: program failed"),
        Err(e) => warn!(event = %job.event, %program, error = %e, "on_event: waiting for program"),
    }
}

/// A program's process group (its id is the program's pid), killed on
/// drop unless killed before. The program is reaped only after
/// [`Group::kill`]: until then its pid, and so the group's id, cannot be
/// taken by an unrelated group.
struct Group {
    id: Pid,
    killed: bool,
}

impl Group {
    fn new(pid: u32) -> Group {
        Group {
            id: Pid::from_raw(pid as i32),
            killed: false,
        }
    }

    /// Resolves once the program (the group's leader) has exited, leaving
    /// it unreaped (`WNOWAIT`). `waitid` blocks, so it runs on a blocking
    /// thread, which returns at the latest when [`Group::kill`] kills the
    /// leader.
    fn leader_exited(&self) -> impl std::future::Future<Output = ()> + 'static {
        let pid = self.id;
        async move {
            let _ = tokio::task::spawn_blocking(move || {
                // Interrupted by a signal: wait again. Any other error
                // (no such child) means there is nothing to wait for.
                while let Err(Errno::EINTR) = waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {}
            })
            .await;
        }
    }

    /// SIGKILL to every process of the group; none left is fine.
    fn kill(&mut self) {
        let _ = killpg(self.id, Signal::SIGKILL);
        self.killed = true;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.killed {
            self.kill();
        }
    }
}

/// Reads a stream to its end into `keep`, up to [`OUTPUT_KEPT`] bytes (the
/// rest is read and dropped). Cancel-safe: what was read is in `keep`.
async fn keep(stream: Option<impl AsyncRead + Unpin>, keep: &mut Vec<u8>) {
    let Some(mut s) = stream else { return };
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_KEPT.saturating_sub(keep.len());
        keep.extend_from_slice(&buf[..n.min(room)]);
    }
}
