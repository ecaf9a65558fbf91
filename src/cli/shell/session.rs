//! The connection while the shell runs. One task owns it: it writes what
//! the front end (the line editor or the script reader, on a thread of
//! its own) asks, matches replies with requests in the order they were
//! sent (QMP answers a client's commands in that order), and hands
//! everything to show to the printer in the order it came, so that an
//! event that came before a reply is shown before it.

use super::output;
use crate::cli::client::{Line, Reader};
use crate::cli::CliError;
use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::collections::VecDeque;
use std::sync::mpsc as std_mpsc;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::mpsc;

/// What the front end asks of the session.
pub enum Ask {
    /// Send `request` (one QMP message, without its newline) and show its
    /// reply; `done` hears once it is shown, or the wait is given up.
    Run {
        name: String,
        request: String,
        done: std_mpsc::Sender<Done>,
    },
    /// Send `request` and hand its reply back unshown (for completion).
    Fetch {
        request: String,
        reply: std_mpsc::Sender<Line>,
    },
    /// Show `text` in turn with the rest; `done` hears once it is shown.
    Say { text: String, done: std_mpsc::Sender<Done> },
}

/// How a request ended, for the front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    Ok,
    /// An error reply.
    Failed,
    /// Ctrl-C: no longer waited for (its reply is shown when it comes).
    Interrupted,
}

/// Text for the printer (ending with a newline, or empty), and whom to
/// tell once it is out.
pub struct Out {
    pub text: String,
    pub then: Option<(std_mpsc::Sender<Done>, Done)>,
}

/// A request sent whose reply has not come yet.
enum Waiter {
    /// `done`: `None` once the front end stopped waiting.
    Show {
        name: String,
        done: Option<std_mpsc::Sender<Done>>,
    },
    Fetch(std_mpsc::Sender<Line>),
}

/// How a session ended, but for the connection's end (an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The front end left (Ctrl-D, `exit`, the end of a script).
    Left,
    /// A signal asked the shell to stop.
    Signal(i32),
}

pub struct Session {
    vm: String,
    hmp: bool,
    color: bool,
    /// From the reader task; closed when the connection ends.
    lines: mpsc::Receiver<Result<Line, CliError>>,
    write: OwnedWriteHalf,
    /// From the front end's thread; closed when it has left.
    asks: mpsc::Receiver<Ask>,
    /// To the printer thread.
    out: mpsc::Sender<Out>,
    waiting: VecDeque<Waiter>,
}

/// Messages read ahead of the session: a bound, so a flood of events
/// waits in the socket (and qmpmux's own bounds) rather than here.
const READ_AHEAD: usize = 256;

impl Session {
    /// A session on the connection's two halves; spawns the task that
    /// reads (reading a line is not cancel-safe, a channel's receive is).
    pub fn new(
        vm: &str,
        hmp: bool,
        color: bool,
        mut reader: Reader,
        write: OwnedWriteHalf,
        asks: mpsc::Receiver<Ask>,
        out: mpsc::Sender<Out>,
    ) -> Session {
        let (tx, lines) = mpsc::channel(READ_AHEAD);
        tokio::spawn(async move {
            loop {
                let next = reader.next().await.transpose();
                let last = !matches!(next, Some(Ok(_)));
                let Some(next) = next else { break };
                if tx.send(next).await.is_err() || last {
                    break;
                }
            }
        });
        Session {
            vm: vm.to_owned(),
            hmp,
            color,
            lines,
            write,
            asks,
            out,
            waiting: VecDeque::new(),
        }
    }

    /// Serves until the front end leaves, a signal comes (`signals`:
    /// SIGINT, SIGTERM, SIGHUP, in interactive mode) or the connection
    /// ends (an error: the shell cannot go on without it).
    pub async fn run(mut self, mut signals: Option<signal_hook_tokio::Signals>) -> Result<Ended, CliError> {
        loop {
            // Every branch is cancel-safe: channel receives and a signal
            // stream's next.
            tokio::select! {
                line = self.lines.recv() => match line {
                    Some(Ok(line)) => self.on_line(line).await,
                    Some(Err(e)) => return Err(e),
                    None => {
                        return Err(CliError::Closed {
                            vm: self.vm.clone(),
                            during: " (qmpmux stopped, or the VM left its configuration)",
                        })
                    }
                },
                ask = self.asks.recv() => match ask {
                    Some(ask) => self.on_ask(ask).await?,
                    None => return Ok(Ended::Left),
                },
                Some(signal) = next_signal(&mut signals) => {
                    if let Some(ended) = self.on_signal(signal).await {
                        return Ok(ended);
                    }
                }
            }
        }
    }

    async fn on_line(&mut self, line: Line) {
        if line.event().is_some() {
            let text = output::event(&line, self.color);
            return self.show(text, None).await;
        }
        match self.waiting.pop_front() {
            Some(Waiter::Show { done: Some(done), .. }) => {
                let shown = output::reply(&line, self.hmp, self.color);
                let how = if shown.failed { Done::Failed } else { Done::Ok };
                self.show(shown.text, Some((done, how))).await;
            }
            Some(Waiter::Show { name, done: None }) => {
                let shown = output::reply(&line, self.hmp, self.color);
                self.show(output::late(&name, &shown), None).await;
            }
            Some(Waiter::Fetch(reply)) => {
                let _ = reply.send(line);
            }
            // Nothing asked for it (qmpmux sends no such thing): shown.
            None => {
                let shown = output::reply(&line, false, self.color);
                self.show(shown.text, None).await;
            }
        }
    }

    async fn on_ask(&mut self, ask: Ask) -> Result<(), CliError> {
        match ask {
            Ask::Run { name, request, done } => {
                self.send(&request).await?;
                self.waiting.push_back(Waiter::Show { name, done: Some(done) });
            }
            Ask::Fetch { request, reply } => {
                self.send(&request).await?;
                self.waiting.push_back(Waiter::Fetch(reply));
            }
            Ask::Say { text, done } => self.show(text, Some((done, Done::Ok))).await,
        }
        Ok(())
    }

    /// SIGINT while a reply is awaited (Ctrl-C outside the line editor):
    /// stop waiting; otherwise, and SIGTERM, SIGHUP: stop.
    async fn on_signal(&mut self, signal: i32) -> Option<Ended> {
        if signal != SIGINT {
            return Some(Ended::Signal(signal));
        }
        let awaited = self.waiting.iter_mut().rev().find_map(|w| match w {
            Waiter::Show { name, done } => done.take().map(|d| (name.clone(), d)),
            Waiter::Fetch(_) => None,
        });
        let Some((name, done)) = awaited else {
            return Some(Ended::Signal(signal));
        };
        let text = format!(
            "\n(no longer waiting for the reply to {}: shown when it comes)\n",
            crate::ops::escape::escaped(&name)
        );
        self.show(text, Some((done, Done::Interrupted))).await;
        None
    }

    async fn send(&mut self, request: &str) -> Result<(), CliError> {
        let mut line = String::with_capacity(request.len() + 1);
        line.push_str(request);
        line.push('\n');
        self.write
            .write_all(line.as_bytes())
            .await
            .map_err(|source| CliError::Io {
                vm: self.vm.clone(),
                source,
            })
    }

    /// Hands `text` to the printer (gone only if its thread died: then
    /// there is no one to show it to).
    async fn show(&self, text: String, then: Option<(std_mpsc::Sender<Done>, Done)>) {
        let _ = self.out.send(Out { text, then }).await;
    }
}

/// The next signal, or never without signals.
async fn next_signal(signals: &mut Option<signal_hook_tokio::Signals>) -> Option<i32> {
    match signals {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// The signals an interactive shell handles: SIGINT (Ctrl-C while a reply
/// is awaited), and SIGTERM and SIGHUP, to leave the terminal as it was.
pub fn signals() -> std::io::Result<signal_hook_tokio::Signals> {
    signal_hook_tokio::Signals::new([SIGINT, SIGTERM, signal_hook::consts::SIGHUP])
}
