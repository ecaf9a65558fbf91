//! The shell's front ends, each on a thread of its own (reading a line
//! blocks): the line editor on a terminal, or standard input read line by
//! line (a script). Both ask the session through a [`Handle`] and wait
//! until what they asked for is shown.

use super::helper::Helper;
use super::line::{self, Input};
use super::output;
use super::session::{Ask, Done};
use crate::cli::client::Line;
use crate::cli::exit;
use rustyline::error::ReadlineError;
use rustyline::history::FileHistory;
use rustyline::Editor;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;
use tokio::sync::mpsc;

/// How long completion waits for the schema or HMP's help.
const FETCH_WITHIN: Duration = Duration::from_secs(10);

/// The session, as a front end's thread reaches it.
#[derive(Clone)]
pub struct Handle {
    asks: mpsc::Sender<Ask>,
}

impl Handle {
    pub fn new(asks: mpsc::Sender<Ask>) -> Handle {
        Handle { asks }
    }

    /// Sends `request` and waits until its reply is shown; `None` once the
    /// session has ended.
    pub fn run(&self, name: &str, request: String) -> Option<Done> {
        let (done, shown) = std_mpsc::channel();
        let name = name.to_owned();
        self.asks.blocking_send(Ask::Run { name, request, done }).ok()?;
        shown.recv().ok()
    }

    /// Shows `text` in turn with replies and events.
    pub fn say(&self, text: String) -> Option<()> {
        let (done, shown) = std_mpsc::channel();
        self.asks.blocking_send(Ask::Say { text, done }).ok()?;
        shown.recv().ok().map(drop)
    }

    /// `request`'s reply, unshown, if it comes within [`FETCH_WITHIN`].
    pub fn fetch(&self, request: &str) -> Option<Line> {
        let (reply, got) = std_mpsc::channel();
        let request = request.to_owned();
        self.asks.blocking_send(Ask::Fetch { request, reply }).ok()?;
        got.recv_timeout(FETCH_WITHIN).ok()
    }
}

/// What the front end and whoever ends the shell share about the
/// terminal (see `Terminal::restore` in the parent module).
#[derive(Default)]
pub struct Gate {
    /// The shell is ending: no more editing.
    pub ended: AtomicBool,
    /// The line editor has the terminal (raw mode, a prompt shown).
    pub editing: AtomicBool,
}

/// `qmpmux shell` on a terminal.
pub struct Prompted {
    pub editor: Editor<Helper, FileHistory>,
    pub prompt: String,
    pub hmp: bool,
    pub color: bool,
    pub history: Option<PathBuf>,
    pub handle: Handle,
    pub gate: Arc<Gate>,
}

/// The question before a line that would stop QEMU.
const CONFIRM_QUIT: &str = "That stops QEMU: the VM is gone. (`exit` or Ctrl-D leaves the shell.) Send it? [y/N] ";

impl Prompted {
    /// Reads and runs lines until Ctrl-D or `exit`; the exit status.
    pub fn run(mut self) -> u8 {
        loop {
            let Some(read) = self.read_line(&self.prompt.clone()) else {
                return exit::OK;
            };
            let line = match read {
                Ok(line) => line,
                // Ctrl-C: the line is dropped.
                Err(ReadlineError::Interrupted) => continue,
                Err(ReadlineError::Eof) => return exit::OK,
                Err(e) => {
                    let _ = self.handle.say(output::note(&format!("the terminal: {e}"), self.color));
                    return exit::UNREACHABLE;
                }
            };
            // Several lines pasted at once: each in turn.
            for part in line.split(['\n', '\r']) {
                // `false`: leave; `None`: the session has ended (the
                // caller says why).
                if self.run_line(part) != Some(true) {
                    return exit::OK;
                }
            }
        }
    }

    /// Runs one typed line: whether to go on (`false`: leave), `None` once
    /// the session has ended.
    fn run_line(&mut self, text: &str) -> Option<bool> {
        self.remember(text);
        let input = if self.hmp { Ok(line::hmp(text)) } else { line::qmp(text) };
        match input {
            Ok(Input::Nothing) => {}
            Ok(Input::Leave) => return Some(false),
            Ok(Input::Help) => self.handle.say(help(self.history.as_deref()))?,
            Ok(input @ Input::Send { .. }) if line::stops_qemu(&input, self.hmp) && !self.confirmed() => {
                self.handle.say("(not sent)\n".into())?
            }
            Ok(Input::Send { name, request }) => {
                self.handle.run(&name, request)?;
            }
            Err(e) => self.handle.say(output::note(&e.to_string(), self.color))?,
        }
        Some(true)
    }

    /// One line from the editor; `None` once the shell is ending.
    fn read_line(&mut self, prompt: &str) -> Option<rustyline::Result<String>> {
        if self.gate.ended.load(Ordering::SeqCst) {
            return None;
        }
        self.gate.editing.store(true, Ordering::SeqCst);
        let read = self.editor.readline(prompt);
        self.gate.editing.store(false, Ordering::SeqCst);
        Some(read)
    }

    fn confirmed(&mut self) -> bool {
        matches!(self.read_line(CONFIRM_QUIT), Some(Ok(answer)) if matches!(answer.trim(), "y" | "Y" | "yes"))
    }

    /// Adds `line` to the history and appends it to the file at once (a
    /// shell killed keeps what was typed); a line that starts with a blank
    /// is not kept.
    fn remember(&mut self, line: &str) {
        // Without the blank completion leaves after a name.
        let line = line.trim_end();
        if line.is_empty() || !matches!(self.editor.add_history_entry(line), Ok(true)) {
            return;
        }
        let Some(path) = &self.history else { return };
        if let Err(e) = self.editor.append_history(path) {
            let message = format!("history not kept in {}: {e}", path.display());
            let _ = self.handle.say(output::note(&message, self.color));
            self.history = None;
        }
    }
}

/// `qmpmux shell` reading standard input (not a terminal): each line run
/// in turn, no prompt, no history. The exit status: that of the first
/// line that failed (1 an error reply, 2 a line that is not a command),
/// else 0.
pub fn script(handle: Handle, hmp: bool) -> u8 {
    use std::io::BufRead;
    let mut status = exit::OK;
    let mut fail = |code: u8| {
        if status == exit::OK {
            status = code;
        }
    };
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                let _ = handle.say(output::note(&format!("standard input: {e}"), false));
                fail(exit::USAGE);
                break;
            }
        };
        let input = if hmp { Ok(line::hmp(&line)) } else { line::qmp(&line) };
        match input {
            Ok(Input::Nothing) => {}
            Ok(Input::Leave) => break,
            Ok(Input::Help) => {
                let _ = handle.say(help(None));
            }
            Ok(Input::Send { name, request }) => match handle.run(&name, request) {
                Some(Done::Ok) => {}
                Some(Done::Failed | Done::Interrupted) => fail(exit::QMP_ERROR),
                // The session has ended; the caller says why.
                None => break,
            },
            Err(e) => {
                let _ = handle.say(output::note(&format!("line {}: {e}", n + 1), false));
                fail(exit::USAGE);
            }
        }
    }
    status
}

/// The shell's `help` (QMP mode).
fn help(history: Option<&std::path::Path>) -> String {
    let kept = match history {
        Some(p) => format!(
            "Earlier lines are kept in {}.\n",
            crate::ops::escape::escaped(&p.display().to_string())
        ),
        None => String::new(),
    };
    format!(
        "  COMMAND [key=value ...]   a QMP command; values are JSON where they read as JSON\n\
         \x20                           (42, true, [1, 2], \"a b\"), text otherwise; a.b=1 nests\n\
         \x20 COMMAND {{\"key\": value}}    its arguments as one JSON object\n\
         \x20 {{\"execute\": ...}}          a whole request, sent as typed\n\
         \x20 exit, Ctrl-D              leave the shell (`quit` stops QEMU, after asking)\n\
         Tab completes command and argument names, and values of booleans and enumerations.\n\
         Up and Down recall earlier lines, Ctrl-R searches them; a line that starts with a\n\
         blank is not kept. Ctrl-C drops the line, or stops waiting for a reply. Events are\n\
         shown as they come. `qmpmux shell -H` speaks the human monitor.\n{kept}"
    )
}
