//! `qmpmux shell VM`: an interactive shell on a VM's monitor, as
//! qmp-shell: line editing, history kept per VM, Tab completion from the
//! VM's own schema, `key=value` arguments, replies pretty, events shown
//! as they come (also while a line is being typed), `-H` for the human
//! monitor. With standard input not a terminal it runs the lines it reads
//! (a script).
//!
//! # Layout
//! - `line`: what a typed line means (pure).
//! - `complete`: completion candidates from the schema and HMP's help
//!   (pure); `helper`: the line editor's side of it.
//! - `history`: where each VM's history is kept.
//! - `output`: how replies, errors and events are shown (pure).
//! - `session`: the task that owns the connection.
//! - `front`: the line editor and the script reader, each on a thread of
//!   its own; a printer thread shows what the session hands it.

mod complete;
mod front;
mod helper;
mod history;
mod line;
mod output;
mod session;

use super::client::{into_result, Client};
use super::{find, CliError, Reach};
use crate::ops::escape::escaped;
use front::{Gate, Handle, Prompted};
use rustyline::ExternalPrinter as _;
use session::{Ended, Out, Session};
use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// An interactive shell on a VM's monitor: line editing, history, Tab
/// completion, events as they come.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Type a QMP command and its arguments as key=value words (values are JSON where they read as JSON, text otherwise; a.b=1 nests), or its arguments as one JSON object, or a whole request {\"execute\": ...}. Tab completes command and argument names; Up and Down recall earlier lines, kept per VM in $XDG_STATE_HOME/qmpmux/history/ (default ~/.local/state); `help` shows the keys. Ctrl-D or `exit` leaves (`quit` would stop QEMU: the shell asks first). With standard input not a terminal, the lines read are run in turn.\n\nExamples:\n  qmpmux shell web01\n  qmpmux shell -H web01\n  printf 'stop\\nquery-status\\ncont\\n' | qmpmux shell web01\n\nExit status: 0 left with Ctrl-D or `exit` (a script: every line succeeded); 1 a script's command got an error reply; 2 no such VM (a script: a line that is not a command); 3 qmpmux, the VM's socket or QEMU cannot be reached, or the connection ended."
)]
pub struct ShellArgs {
    /// The VM, by its name in qmpmux's configuration.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// Speak the human monitor (HMP): each line goes through
    /// `human-monitor-command`, and its text is shown.
    #[arg(long, short = 'H')]
    pub hmp: bool,
    #[command(flatten)]
    pub reach: Reach,
}

/// Runs `qmpmux shell`; the exit status.
pub async fn run(args: &ShellArgs, config: &Path) -> u8 {
    match shell(args, config).await {
        Ok(code) => code,
        Err(e) => {
            super::report(&e);
            e.exit_code()
        }
    }
}

async fn shell(args: &ShellArgs, config: &Path) -> Result<u8, CliError> {
    let control = super::control_path(config, args.reach.control.clone());
    let target = find(&control, &args.vm).await?;
    let vm = target.name.clone();
    let mut client = Client::connect(&vm, &target.socket).await?;
    client.negotiate().await?;
    let (commands, missing) = command_names(&mut client).await?;
    let early = client.take_pending();
    let qemu = qemu_version(&client.greeting.value);
    let (reader, write) = client.into_split();

    let interactive = std::io::stdin().is_terminal();
    let color = output::color_wanted(
        interactive && std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR"),
        std::env::var_os("TERM"),
    );
    let (ask_tx, asks) = mpsc::channel(16);
    let (out, out_rx) = mpsc::channel::<Out>(256);
    let gate = Arc::new(Gate::default());
    let terminal = Terminal::save(interactive, gate.clone());
    let front = if interactive {
        let mut front = prompted(&vm, args.hmp, color, commands, Handle::new(ask_tx), gate)?;
        front.first.insert(0, banner(&vm, &qemu, args.hmp));
        front.first.extend(missing.map(|m| output::note(&m, color)));
        front
    } else {
        script(Handle::new(ask_tx), args.hmp)
    };
    let print = front.print;
    let printer = std::thread::spawn(move || printer(out_rx, print));
    for text in front
        .first
        .into_iter()
        .chain(early.iter().map(|e| output::event(e, color)))
    {
        let _ = out.send(Out { text, then: None }).await;
    }
    let signals = if interactive {
        let signals = session::signals().map_err(|e| CliError::Usage(format!("cannot handle signals: {e}")))?;
        Some(signals)
    } else {
        None
    };
    let reading = std::thread::spawn(front.run);
    let ended = Session::new(&vm, args.hmp, color, reader, write, asks, out)
        .run(signals)
        .await;
    // The session is gone, and with it the printer's last sender: the
    // printer ends once all is shown.
    let _ = printer.join();
    match ended {
        Ok(Ended::Left) => Ok(reading.join().unwrap_or(super::exit::UNREACHABLE)),
        Ok(Ended::Signal(signal)) => {
            terminal.restore(&reading);
            Ok(128u8.saturating_add(u8::try_from(signal).unwrap_or(0)))
        }
        Err(e) => {
            terminal.restore(&reading);
            Err(e)
        }
    }
}

/// A front end, ready for its thread: what it runs there (giving the
/// exit status), how the printer shows text, what it shows first.
struct Front {
    run: Box<dyn FnOnce() -> u8 + Send>,
    print: Printer,
    first: Vec<String>,
}

/// The script reader: text to standard output.
fn script(handle: Handle, hmp: bool) -> Front {
    Front {
        run: Box::new(move || front::script(handle, hmp)),
        print: Box::new(|text| super::out(&text)),
        first: Vec::new(),
    }
}

/// Shows the printer's texts, in turn, and tells who waits for each.
type Printer = Box<dyn FnMut(String) + Send>;

fn printer(mut texts: mpsc::Receiver<Out>, mut print: Printer) {
    while let Some(Out { text, then }) = texts.blocking_recv() {
        if !text.is_empty() {
            print(text);
        }
        if let Some((done, how)) = then {
            let _ = done.send(how);
        }
    }
}

/// The line editor, its history loaded; its external printer shows text
/// (above the line being typed while it reads one).
fn prompted(
    vm: &str,
    hmp: bool,
    color: bool,
    commands: Vec<String>,
    handle: Handle,
    gate: Arc<Gate>,
) -> Result<Front, CliError> {
    use rustyline::config::{CompletionType, Config};
    let config = Config::builder()
        .max_history_size(history::MAX_LINES)
        .and_then(|b| b.history_ignore_dups(true))
        .map(|b| {
            b.history_ignore_space(true)
                .completion_type(CompletionType::List)
                .build()
        })
        .map_err(|e| CliError::Usage(format!("the line editor: {e}")))?;
    let mut editor = rustyline::Editor::with_config(config)
        .map_err(|e| CliError::Usage(format!("cannot edit lines on this terminal: {e}")))?;
    editor.set_helper(Some(helper::Helper::new(hmp, commands, handle.clone())));
    let history = history::from_env(vm, hmp).filter(|path| match history::prepare(path) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("qmpmux: history not kept in {}: {e}", path.display());
            false
        }
    });
    if let Some(path) = history.as_deref().filter(|p| p.exists()) {
        if let Err(e) = editor.load_history(path) {
            eprintln!("qmpmux: cannot read the history in {}: {e}", path.display());
        }
    }
    let prompt = if hmp {
        format!("{} (hmp)> ", escaped(vm))
    } else {
        format!("{}> ", escaped(vm))
    };
    // Without a terminal for output (`| tee`) there is none: then text
    // goes to standard output as it is.
    let print: Printer = match editor.create_external_printer() {
        Ok(mut p) => Box::new(move |text| {
            let _ = p.print(text);
        }),
        Err(_) => Box::new(|text| super::out(&text)),
    };
    let prompted = Prompted {
        editor,
        prompt,
        hmp,
        color,
        history,
        handle,
        gate,
    };
    Ok(Front {
        run: Box::new(move || prompted.run()),
        print,
        first: Vec::new(),
    })
}

/// The names `query-commands` gives, for completion, and why there are
/// none when the socket's policy refuses it; QEMU not connected is an
/// error (the shell would have nothing to talk to).
async fn command_names(client: &mut Client) -> Result<(Vec<String>, Option<String>), CliError> {
    let reply = client.execute("query-commands", None).await?;
    match into_result(client.vm(), reply) {
        Ok(line) => {
            let list = line.value.get("return").and_then(serde_json::Value::as_array);
            let names = list
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("name")?.as_str().map(str::to_owned))
                .collect();
            Ok((names, None))
        }
        Err(e @ CliError::QemuDown { .. }) => Err(e),
        Err(e) => Ok((Vec::new(), Some(format!("no command names to complete: {e}")))),
    }
}

/// `major.minor.micro` from the greeting.
fn qemu_version(greeting: &serde_json::Value) -> Option<String> {
    let v = greeting.get("QMP")?.get("version")?.get("qemu")?;
    let part = |k: &str| v.get(k).and_then(serde_json::Value::as_u64);
    Some(format!("{}.{}.{}", part("major")?, part("minor")?, part("micro")?))
}

fn banner(vm: &str, qemu: &Option<String>, hmp: bool) -> String {
    let qemu = qemu.as_deref().map(|v| format!(" (QEMU {v})")).unwrap_or_default();
    let mode = if hmp {
        ", human monitor. `help` lists its commands"
    } else {
        ". `help` shows how to type commands"
    };
    format!(
        "Connected to VM '{}'{qemu} through qmpmux{mode}; Tab completes; Ctrl-D or `exit` leaves.\n",
        escaped(vm)
    )
}

/// The terminal's settings from before the line editor, put back when
/// the shell ends while the editor may hold the terminal (the connection
/// ended, a signal): a read in progress cannot be interrupted.
struct Terminal {
    saved: Option<nix::sys::termios::Termios>,
    gate: Arc<Gate>,
}

impl Terminal {
    fn save(interactive: bool, gate: Arc<Gate>) -> Terminal {
        let saved = interactive
            .then(|| nix::sys::termios::tcgetattr(std::io::stdin()).ok())
            .flatten();
        Terminal { saved, gate }
    }

    /// Ends editing and puts the settings back.
    fn restore(&self, front: &JoinHandle<u8>) {
        use nix::sys::termios::{tcsetattr, SetArg};
        self.gate.ended.store(true, Ordering::SeqCst);
        let Some(saved) = &self.saved else { return };
        let editing = self.gate.editing.load(Ordering::SeqCst);
        let put_back = || {
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSADRAIN, saved);
        };
        put_back();
        // The editor may have been between its look at `ended` and taking
        // the terminal: a moment for it to do so (or to finish), and the
        // settings go back once more.
        let until = Instant::now() + Duration::from_millis(100);
        while !front.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        put_back();
        if editing {
            // Bracketed paste off (the editor turned it on), and the
            // prompt's line ended.
            super::out("\x1b[?2004l\n");
        }
    }
}
