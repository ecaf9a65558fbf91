//! The `qmpmux` binary: arguments, logging, signals, systemd notification;
//! the rest is the library.

use clap::Parser;
use futures_util::StreamExt;
use qmpmux::config::{Config, LogFormat};
use qmpmux::handover::{exec, Handover, Inherited, Keeper};
use qmpmux::ops::demo;
use qmpmux::ops::logging::{self, Journal, LogFile, TextFields};
use qmpmux::ops::systemd::notify;
use qmpmux::{run_from_file, Listeners, Reload};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The version and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("QMPMUX_COMMIT"), ")");

/// Multiplex QEMU's QMP monitor: many clients, one upstream session per VM.
#[derive(Debug, Parser)]
#[command(name = "qmpmux", version = VERSION, about, disable_help_subcommand = true)]
struct Args {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "/etc/qmpmux/qmpmux.toml")]
    config: PathBuf,
    /// Validate the configuration, print a summary and exit.
    #[arg(long, conflicts_with = "demo")]
    check_config: bool,
    /// Ignore --config: start a demo QEMU (`-M none`) and serve it.
    #[arg(long)]
    demo: bool,
    /// With --demo: where to listen (default: a fresh temporary directory).
    #[arg(long, requires = "demo")]
    demo_listen: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    Exec(qmpmux::cli::exec::ExecArgs),
    Events(qmpmux::cli::events::EventsArgs),
    Shell(qmpmux::cli::shell::ShellArgs),
    Tap(qmpmux::cli::tap::TapArgs),
    Fleet(Box<qmpmux::cli::fleet::FleetArgs>),
    /// Show the running daemon's VMs: runstate, clients, commands in flight,
    /// reconnects, last error.
    Status {
        /// The daemon's control socket (default: `control_socket` from
        /// --config, else /run/qmpmux/qmpmux.ctl).
        #[arg(long, env = "QMPMUX_CONTROL", value_name = "PATH")]
        control: Option<PathBuf>,
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
        /// Print only the VMs' names, one per line (for scripts and shell
        /// completion).
        #[arg(long, conflicts_with = "json")]
        names: bool,
    },
    /// Make the running daemon reload its configuration file, wait for the
    /// outcome and print it (what `systemctl reload qmpmux` runs). Exit
    /// status: 0 applied; 1 the reload failed (a socket could not be bound:
    /// the running configuration stays); 2 the file was rejected (unreadable
    /// or invalid: nothing changed); 3 the daemon cannot be reached.
    Reload {
        /// The daemon's control socket (default: `control_socket` from
        /// --config, else /run/qmpmux/qmpmux.ctl).
        #[arg(long, env = "QMPMUX_CONTROL", value_name = "PATH")]
        control: Option<PathBuf>,
        /// Print the daemon's answer as JSON.
        #[arg(long)]
        json: bool,
        /// The daemon's pid: when its control socket cannot be reached,
        /// send it SIGHUP instead (the outcome is then only in its log).
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Print the man page (roff) or shell completions, generated from this
    /// command line's own definition, for packaging.
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
}

#[derive(Debug, clap::Subcommand)]
enum Generate {
    /// The man page, qmpmux(1): `qmpmux generate man > qmpmux.1`; with
    /// --dir, it and a page for each subcommand (qmpmux-status(1), ...).
    Man {
        /// Write every page into this directory (NAME.1) instead.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Completions for a shell: `qmpmux generate completions bash`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Writes the man page(s) or completions.
fn generate(what: &Generate) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Args::command();
    let mut out = std::io::stdout();
    let written = match what {
        Generate::Man { dir: None } => man_page(&cmd, &mut out),
        Generate::Man { dir: Some(dir) } => man_pages(cmd, dir),
        Generate::Completions { shell } => {
            std::io::Write::write_all(&mut out, qmpmux::cli::complete::script(*shell, &mut cmd).as_bytes())
        }
    };
    match written {
        // A closed pipe (`| head`) is the reader's choice, not an error.
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            fail(&format!("cannot write: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// qmpmux(1): clap's sections, then what a daemon's page needs besides.
fn man_page(cmd: &clap::Command, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    out.write_all(MAN_SECTIONS.as_bytes())?;
    man.render_version_section(out)
}

/// qmpmux.1 and a page for every subcommand (and theirs), which qmpmux.1's
/// SUBCOMMANDS section refers to, into `dir`.
fn man_pages(mut cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    cmd.build();
    let mut main = std::fs::File::create(dir.join("qmpmux.1"))?;
    man_page(&cmd, &mut main)?;
    let mut subs: Vec<clap::Command> = cmd.get_subcommands().cloned().collect();
    while let Some(sub) = subs.pop() {
        if sub.is_hide_set() {
            continue;
        }
        let name = sub.get_display_name().unwrap_or(sub.get_name()).to_string();
        subs.extend(sub.get_subcommands().cloned());
        let mut file = std::fs::File::create(dir.join(format!("{name}.1")))?;
        clap_mangen::Man::new(sub).render(&mut file)?;
    }
    Ok(())
}

/// The sections of qmpmux(1) that clap does not make (roff).
const MAN_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/qmpmux/qmpmux.toml\fR
The configuration (\fB\-\-config\fR): the VMs, their sockets and policies, limits, logging, NATS. Examples in \fI/usr/share/doc/qmpmux/examples/\fR.
.TP
\fI/run/qmpmux/\fR
The VMs' client sockets (\fBlisten\fR, \fBsocket_dir\fR) and the control socket \fIqmpmux.ctl\fR (\fBcontrol_socket\fR), through which the subcommands reach the daemon and find VMs by name.
.TP
\fI/usr/lib/systemd/system/qmpmux.service\fR
The systemd unit (\fBsystemctl reload qmpmux\fR runs \fBqmpmux reload\fR).
.TP
\fI/usr/share/doc/qmpmux/docs/\fR
The documentation: behaviour, configuration, operations, security, fleet, performance.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop gracefully: sockets removed at once, clients get up to 5 s for replies to commands in flight, then qmpmux exits 0. Under systemd, qmpmux hands everything to systemd's file descriptor store instead: a restart then costs clients nothing, a stop ends it all. QEMU keeps running.
.TP
\fBSIGHUP\fR
Reload the configuration file, as \fBqmpmux reload\fR does (whose exit status tells the outcome).
.TP
\fBSIGUSR2\fR
Re\-execute the binary at the path qmpmux was started from (after checking it with \fB\-\-version\fR and \fB\-\-check\-config\fR), in place: same pid, every listening socket, connection to QEMU, event history and unix client handed over; clients do not notice.
.TP
\fBSIGUSR1\fR
Reopen \fBlog_file\fR (after logrotate moved it).
.SH "EXIT STATUS"
.TP
\fB0\fR
A clean stop; a valid \fB\-\-check\-config\fR; a subcommand that succeeded.
.TP
\fB1\fR
Start\-up failed (a socket could not be created or bound, \fBlog_file\fR could not be opened, ...); \fBstatus\fR could not reach the daemon; \fBreload\fR failed (a socket could not be bound; the running configuration stays); \fBexec\fR, \fBshell\fR (reading a script) or \fBfleet exec\fR got an error reply from QEMU or from the socket's policy.
.TP
\fB2\fR
The configuration file is unreadable or invalid (at start, with \fB\-\-check\-config\fR, or rejected by \fBreload\fR), or bad command\-line arguments, or no VM of the name given.
.TP
\fB3\fR
\fBreload\fR could not reach the daemon; \fBexec\fR, \fBevents\fR, \fBshell\fR, \fBtap\fR or \fBfleet\fR could not reach the daemon, the VM's socket (absent, or its permissions do not let the user in), QEMU (not connected) or NATS, or the connection ended.
.TP
\fB4\fR
\fB\-\-timeout\fR passed first: no reply came (\fBexec\fR), or fewer events than \fB\-\-count\fR (\fBevents\fR).
.SH ENVIRONMENT
.TP
\fBQMPMUX_CONTROL\fR
The daemon's control socket for the subcommands (as \fB\-\-control\fR), e.g. the demo's.
.TP
\fBRUST_LOG\fR
A log filter (e.g. \fIqmpmux=debug\fR) that overrides \fBlog_level\fR.
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR, \fBJOURNAL_STREAM\fR
Set by systemd: readiness and reload notifications, the watchdog, and log lines with priorities for the journal.
.SH "SEE ALSO"
\fBqemu\-system\-x86_64\fR(1), \fBsystemctl\fR(1), \fBjournalctl\fR(1), \fBsocat\fR(1); QEMU's QMP reference: \fIhttps://www.qemu.org/docs/master/interop/qemu\-qmp\-ref.html\fR
"#;

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// How a log output is written.
#[derive(Clone, Copy, PartialEq)]
enum Output {
    /// Colours: standard output on a terminal.
    Terminal,
    /// Standard output connected to the journal: each line starts with its
    /// priority (`<4>`), and text lines have no timestamp.
    Journal,
    Plain,
}

/// One log output: text or JSON.
fn log_layer(config: &Config, writer: NonBlocking, output: Output) -> BoxedLayer {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(output == Output::Terminal);
    match (config.log_format, output) {
        // Text fields escaped: what clients send cannot forge a line.
        (LogFormat::Text, Output::Journal) => layer
            .fmt_fields(TextFields)
            .without_time()
            .map_event_format(Journal)
            .with_filter(filter)
            .boxed(),
        (LogFormat::Text, _) => layer.fmt_fields(TextFields).with_filter(filter).boxed(),
        // The timestamp stays: it is one of the object's fields.
        (LogFormat::Json, Output::Journal) => layer.json().map_event_format(Journal).with_filter(filter).boxed(),
        (LogFormat::Json, _) => layer.json().with_filter(filter).boxed(),
    }
}

/// Sets up logging to stdout (plain when not a terminal; with priorities
/// when it is the journal) and optionally to `log_file`. The guards flush
/// on drop; the [`LogFile`] is for reopening it.
fn init_logging(config: &Config) -> Result<(Vec<WorkerGuard>, Option<LogFile>), String> {
    let output = if logging::is_journal_stream(std::io::stdout()) {
        Output::Journal
    } else if std::io::stdout().is_terminal() {
        Output::Terminal
    } else {
        Output::Plain
    };
    let (stdout, stdout_guard) = tracing_appender::non_blocking(std::io::stdout());
    let mut guards = vec![stdout_guard];
    let mut layers = vec![log_layer(config, stdout, output)];
    let mut log_file = None;
    if let Some(path) = &config.log_file {
        let file = LogFile::open(path, config.log_rotation, config.log_keep).map_err(|e| e.to_string())?;
        let (writer, file_guard) = tracing_appender::non_blocking(file.clone());
        guards.push(file_guard);
        layers.push(log_layer(config, writer, Output::Plain));
        log_file = Some(file);
    }
    tracing_subscriber::registry().with(layers).init();
    Ok((guards, log_file))
}

/// An error before logging is set up, on standard error: with the error
/// priority when that is the journal.
fn fail(message: &str) {
    let line = format!("qmpmux: {message}");
    if logging::is_journal_stream(std::io::stderr()) {
        eprint!("{}", logging::journal_lines(3, &line));
    } else {
        eprintln!("{line}");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Cmd::Generate { what }) = &args.command {
        return generate(what);
    }
    // Before anything opens a file: what the previous process (systemd's
    // store, or this same process before a re-execution) handed over.
    let daemon = args.command.is_none() && !args.check_config;
    let inherited = if daemon {
        Inherited::from_env()
    } else {
        Inherited::none()
    };
    // The VMs run on threads of their own (see `qmpmux::runtime::shards`); this one
    // only has signals, reloads, the control socket and metrics to serve.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            fail(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let program = exec::program_path();
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (code, reexec) = runtime.block_on(async_main(args, inherited));
    drop(runtime);
    let Some(keeper) = reexec else { return code };
    let Some(program) = program else {
        fail("cannot re-execute: the path qmpmux was started from is unknown");
        return ExitCode::FAILURE;
    };
    // Only now, with every runtime and its descriptors gone.
    let e = exec::reexec(&program, &argv, keeper.take_all());
    fail(&format!("cannot re-execute {}: {e}", program.display()));
    ExitCode::FAILURE
}

/// The control socket (see [`qmpmux::cli::control_path`]).
fn control_path(args: &Args, control: Option<PathBuf>) -> PathBuf {
    qmpmux::cli::control_path(&args.config, control)
}

/// `qmpmux reload`.
async fn reload_command(args: &Args, control: Option<PathBuf>, json: bool, pid: Option<i32>) -> ExitCode {
    use qmpmux::ops::control::{request_reload, QueryError};
    let path = control_path(args, control);
    let reply = match request_reload(&path).await {
        Ok(r) => r,
        Err(QueryError::Connect(..)) if pid.is_some() => return sighup(pid.unwrap_or_default(), &path),
        Err(e) => {
            fail(&qmpmux::error::chain(&e));
            return ExitCode::from(3);
        }
    };
    let text = if json {
        qmpmux::ops::escape::to_json(&reply, true) + "\n"
    } else {
        qmpmux::ops::control::render_reload(&reply)
    };
    if reply.ok {
        let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
        ExitCode::SUCCESS
    } else {
        let _ = std::io::Write::write_all(&mut std::io::stderr(), text.as_bytes());
        ExitCode::from(if reply.rejected { 2 } else { 1 })
    }
}

/// `qmpmux reload --pid`, without a control socket to ask.
fn sighup(pid: i32, control: &std::path::Path) -> ExitCode {
    use nix::sys::signal::{kill, Signal};
    match kill(nix::unistd::Pid::from_raw(pid), Signal::SIGHUP) {
        Ok(()) => {
            println!(
                "control socket {} unreachable: sent SIGHUP to pid {pid}; the outcome is in qmpmux's log and `qmpmux status`",
                control.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            fail(&format!(
                "cannot reach the control socket {} nor signal pid {pid}: {e}",
                control.display()
            ));
            ExitCode::from(3)
        }
    }
}

async fn status(args: &Args, control: Option<PathBuf>, json: bool, names: bool) -> ExitCode {
    let path = control_path(args, control);
    match qmpmux::ops::control::query_status(&path).await {
        Ok(report) => {
            let text = if names {
                report
                    .vms
                    .iter()
                    .map(|vm| qmpmux::ops::escape::escaped(&vm.name) + "\n")
                    .collect()
            } else if json {
                // Escaped beyond JSON's needs: it goes to a terminal.
                qmpmux::ops::escape::to_json(&report, true) + "\n"
            } else {
                qmpmux::ops::control::render(&report)
            };
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            fail(&qmpmux::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The daemon, or a subcommand; with the keeper to re-execute with, when
/// `SIGUSR2` asked for that.
async fn async_main(args: Args, inherited: Inherited) -> (ExitCode, Option<Arc<Keeper>>) {
    match &args.command {
        Some(Cmd::Exec(a)) => return (ExitCode::from(qmpmux::cli::exec::run(a, &args.config).await), None),
        Some(Cmd::Events(a)) => return (ExitCode::from(qmpmux::cli::events::run(a, &args.config).await), None),
        Some(Cmd::Shell(a)) => return (ExitCode::from(qmpmux::cli::shell::run(a, &args.config).await), None),
        Some(Cmd::Tap(a)) => return (ExitCode::from(qmpmux::cli::tap::run(a, &args.config).await), None),
        Some(Cmd::Fleet(a)) => return (ExitCode::from(qmpmux::cli::fleet::run(a, &args.config).await), None),
        Some(Cmd::Status { control, json, names }) => {
            return (status(&args, control.clone(), *json, *names).await, None)
        }
        Some(Cmd::Reload { control, json, pid }) => {
            return (reload_command(&args, control.clone(), *json, *pid).await, None)
        }
        _ => {}
    }
    let mut reexec = None;
    let code = daemon(args, inherited, &mut reexec).await;
    (code, reexec)
}

/// Serves until stopped; sets `reexec` when it stopped to re-execute.
async fn daemon(args: Args, mut inherited: Inherited, reexec: &mut Option<Arc<Keeper>>) -> ExitCode {
    let mut demo_vm = None;
    let config = if args.demo {
        match demo::start(args.demo_listen.clone()).await {
            Ok(d) => {
                let c = d.config.clone();
                demo_vm = Some(d);
                c
            }
            Err(e) => {
                fail(&qmpmux::error::chain(&e));
                return ExitCode::FAILURE;
            }
        }
    } else {
        match Config::load(&args.config) {
            Ok(c) => c,
            Err(e) => {
                fail(&qmpmux::error::chain(&e));
                return ExitCode::from(2);
            }
        }
    };
    // Not in demo mode: its configuration is made, not read.
    let exposed = (!args.demo).then(|| config.exposed_secrets(&args.config)).flatten();
    if args.check_config {
        print_summary(&args, &config);
        if let Some(e) = &exposed {
            eprintln!("qmpmux: warning: {e}");
        }
        return ExitCode::SUCCESS;
    }
    let (_log_guards, log_file) = match init_logging(&config) {
        Ok(g) => g,
        Err(e) => {
            fail(&e);
            return ExitCode::FAILURE;
        }
    };
    if let Some(e) = &exposed {
        warn!("{e}");
    }
    // Each client is a file descriptor: allow as many as the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => info!(max_fds = n, "file descriptor limit"),
        Err(e) => warn!(error = %e, "cannot raise the file descriptor limit"),
    }
    // Handlers first: once a socket exists, tools (and systemd, after
    // READY=1) may signal qmpmux, and SIGHUP or SIGUSR1 would otherwise
    // kill it. A signal that comes before the handling task runs waits.
    let signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2]) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    inherited.log();
    // The demo's QEMU is this process's child, started afresh each time:
    // nothing to hand over.
    let keeper = Arc::new(if args.demo {
        Keeper::disabled()
    } else {
        Keeper::for_daemon()
    });
    if !keeper.enabled() {
        inherited.close_rest(&keeper);
    }
    let handover = Handover {
        keeper: keeper.clone(),
        inherited,
        fallback: false,
    };
    let listeners = match Listeners::bind_with(&config, handover).await {
        Ok(l) => l,
        Err(e) => {
            error!("{}", qmpmux::error::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if let (Some(vm), Some(ctl)) = (config.vms.first().filter(|_| demo_vm.is_some()), &config.control_socket) {
        let me = invocation();
        info!(
            "demo VM ready; in another terminal: `export QMPMUX_CONTROL={}`, then `{me} shell demo`, `{me} exec demo query-status` or `{me} events demo` (or `socat - UNIX-CONNECT:{}`)",
            ctl.display(),
            vm.listen().display()
        );
    }
    qmpmux::ops::systemd::notify_ready();
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let config_path = (!args.demo).then(|| args.config.clone());
    let signal_task = tokio::spawn(handle_signals(
        signals,
        shutdown.clone(),
        keeper.clone(),
        reload_tx,
        config_path,
        log_file,
    ));
    let source = (!args.demo).then(|| args.config.clone());
    let result = run_from_file(config, source, listeners, shutdown, reload_rx).await;
    signal_task.abort();
    drop(demo_vm);
    match result {
        Ok(()) if keeper.is_frozen() && REEXEC.load(std::sync::atomic::Ordering::SeqCst) => {
            info!("re-executing");
            *reexec = Some(keeper);
            ExitCode::SUCCESS
        }
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("{}", qmpmux::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// How to run this binary again from a shell: `qmpmux` when that is what
/// the PATH finds, else its full path (`cargo run` leaves it in target/).
fn invocation() -> String {
    let me = std::env::current_exe().ok();
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("qmpmux"))
            .find(|candidate| candidate.is_file())
    });
    match (me, on_path) {
        (Some(me), Some(found)) if std::fs::canonicalize(&found).ok() == std::fs::canonicalize(&me).ok() => {
            "qmpmux".into()
        }
        (Some(me), _) => me.display().to_string(),
        (None, _) => "qmpmux".into(),
    }
}

fn print_summary(args: &Args, config: &Config) {
    println!("{}: OK, {} VM(s)", args.config.display(), config.vms.len());
    for vm in &config.vms {
        println!("  {}: {} -> {}", vm.name, vm.upstream.display(), vm.listen().display());
    }
}

/// Set once `SIGUSR2`'s checks passed: the daemon stops to re-execute.
static REEXEC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn handle_signals(
    mut signals: signal_hook_tokio::Signals,
    shutdown: CancellationToken,
    keeper: Arc<Keeper>,
    reloads: mpsc::Sender<Reload>,
    config_path: Option<PathBuf>,
    log_file: Option<LogFile>,
) {
    while let Some(sig) = signals.next().await {
        if sig == SIGUSR1 {
            reopen_log(log_file.as_ref());
            continue;
        }
        if sig == SIGUSR2 {
            if shutdown.is_cancelled() {
                continue;
            }
            if reexec_checked(&keeper, config_path.as_deref()).await {
                info!("SIGUSR2: handing over to the new binary");
                qmpmux::ops::systemd::notify_reloading();
                REEXEC.store(true, std::sync::atomic::Ordering::SeqCst);
                keeper.freeze_for_exec();
                shutdown.cancel();
            }
            continue;
        }
        if sig != SIGHUP {
            // Under systemd, its store keeps what this process kept: a
            // stop ends it all, but a restart (or an upgrade) hands over.
            if keeper.under_systemd() {
                keeper.freeze();
            }
            info!(signal = sig, "stopping");
            notify(&[NotifyState::Stopping]);
            shutdown.cancel();
            continue;
        }
        let Some(path) = &config_path else {
            warn!("SIGHUP: nothing to reload in demo mode");
            continue;
        };
        qmpmux::ops::systemd::notify_reloading();
        reload(path, &reloads).await;
        qmpmux::ops::systemd::notify_ready();
    }
}

/// SIGUSR2: whether re-executing can go ahead: not in demo mode, and the
/// binary at the path qmpmux was started from says its version and
/// accepts the configuration. Why not is logged; qmpmux keeps serving.
async fn reexec_checked(keeper: &Keeper, config: Option<&std::path::Path>) -> bool {
    if !keeper.enabled() {
        warn!("SIGUSR2: re-execution is not available in demo mode; ignored");
        return false;
    }
    let Some(program) = exec::program_path() else {
        error!("SIGUSR2: the path qmpmux was started from is unknown; not re-executing");
        return false;
    };
    match exec::check(&program, config).await {
        Ok(version) => {
            info!(path = %program.display(), %version, "SIGUSR2: new binary checked");
            true
        }
        Err(e) => {
            error!(error = %qmpmux::error::chain(&e), "SIGUSR2: not re-executing; still serving");
            false
        }
    }
}

/// SIGUSR1: after logrotate moved `log_file` away, write to a new one.
fn reopen_log(log_file: Option<&LogFile>) {
    let Some(file) = log_file else {
        info!("SIGUSR1: no log_file to reopen");
        return;
    };
    match file.reopen() {
        Ok(()) => info!(path = %file.path().display(), "SIGUSR1: log file reopened"),
        Err(e) => error!(error = %e, "SIGUSR1: cannot reopen the log file; still writing to the old one"),
    }
}

/// SIGHUP: the supervisor applies the file and logs the outcome.
async fn reload(path: &std::path::Path, reloads: &mpsc::Sender<Reload>) {
    info!(path = %path.display(), "SIGHUP: reloading configuration");
    let config = qmpmux::load_for_reload(path);
    let (done, answer) = oneshot::channel();
    if reloads.send(Reload { config, done }).await.is_ok() {
        let _ = answer.await;
    }
}
