//! `[[vm.on_event]]`: programs run when an event happens, without a shell,
//! with the event in their environment, a time limit and a bounded number
//! at once per VM; their exit status and output go to the log.
//!
//! The session only matches and hands a job over ([`Actions::fire`], never
//! waiting); a runner task per VM on qmpmux's main runtime (which has the
//! process driver: the VM threads do not) starts the programs.

use crate::config::OnEvent;
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
        // A program past its time is killed when its future is dropped.
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return warn!(event = %job.event, %program, error = %e, "on_event: cannot run program"),
    };
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let finished = async {
        let (status, out, err) = tokio::join!(child.wait(), kept(out), kept(err));
        (status, out, err)
    };
    match tokio::time::timeout(job.timeout, finished).await {
        Ok((Ok(status), out, err)) => {
            let (stdout, stderr) = (String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
            if status.success() {
                info!(event = %job.event, %program, %status, %stdout, %stderr, "on_event: program finished");
            } else {
                warn!(event = %job.event, %program, %status, %stdout, %stderr, "on_event: program failed");
            }
        }
        Ok((Err(e), ..)) => warn!(event = %job.event, %program, error = %e, "on_event: waiting for program"),
        Err(_) => warn!(event = %job.event, %program, timeout = ?job.timeout, "on_event: program timed out; killed"),
    }
}

/// Reads a stream to its end, keeping the first [`OUTPUT_KEPT`] bytes.
async fn kept(stream: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut keep = Vec::new();
    let Some(mut s) = stream else { return keep };
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = OUTPUT_KEPT.saturating_sub(keep.len());
        keep.extend_from_slice(&buf[..n.min(room)]);
    }
    keep
}
