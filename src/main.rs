//! The `qmpmux` binary: arguments, logging, signals, systemd notification;
//! the rest is the library.

use clap::Parser;
use futures_util::StreamExt;
use qmpmux::config::{Config, LogFormat};
use qmpmux::ops::demo;
use qmpmux::ops::logging::{self, Journal, LogFile};
use qmpmux::ops::systemd::notify;
use qmpmux::{run_with_reload, Listeners, Reload};
use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
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
#[command(name = "qmpmux", version = VERSION, about)]
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
    /// Show the running daemon's VMs: runstate, clients, commands in flight,
    /// reconnects, last error.
    Status {
        /// The daemon's control socket (default: `control_socket` from
        /// --config, else /run/qmpmux/qmpmux.ctl).
        #[arg(long)]
        control: Option<PathBuf>,
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
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
    /// The man page, qmpmux(1): `qmpmux generate man > qmpmux.1`.
    Man,
    /// Completions for a shell: `qmpmux generate completions bash`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Writes the man page or completions to stdout.
fn generate(what: &Generate) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Args::command();
    let mut out = std::io::stdout();
    let written = match what {
        Generate::Man => clap_mangen::Man::new(cmd).render(&mut out),
        Generate::Completions { shell } => {
            clap_complete::generate(*shell, &mut cmd, "qmpmux", &mut out);
            Ok(())
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
        (LogFormat::Text, Output::Journal) => layer
            .without_time()
            .map_event_format(Journal)
            .with_filter(filter)
            .boxed(),
        (LogFormat::Text, _) => layer.with_filter(filter).boxed(),
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
    // The VMs run on threads of their own (see `qmpmux::runtime::shards`); this one
    // only has signals, reloads, the control socket and metrics to serve.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            fail(&format!("cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main(args))
}

async fn status(args: &Args, control: Option<PathBuf>, json: bool) -> ExitCode {
    let path = control
        .or_else(|| Config::load(&args.config).ok().and_then(|c| c.control_socket))
        .unwrap_or_else(|| PathBuf::from(qmpmux::config::DEFAULT_DIR).join("qmpmux.ctl"));
    match qmpmux::ops::control::query_status(&path).await {
        Ok(report) => {
            let text = if json {
                serde_json::to_string_pretty(&report).unwrap_or_default() + "\n"
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

async fn async_main(args: Args) -> ExitCode {
    if let Some(Cmd::Status { control, json }) = &args.command {
        return status(&args, control.clone(), *json).await;
    }
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
    let signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1]) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            error!("{}", qmpmux::error::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if let Some(vm) = config.vms.first().filter(|_| demo_vm.is_some()) {
        info!("demo VM ready: try `socat - UNIX-CONNECT:{}`", vm.listen().display());
    }
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let shutdown = CancellationToken::new();
    let (reload_tx, reload_rx) = mpsc::channel(1);
    let config_path = (!args.demo).then(|| args.config.clone());
    let signal_task = tokio::spawn(handle_signals(
        signals,
        shutdown.clone(),
        reload_tx,
        config_path,
        log_file,
    ));
    let result = run_with_reload(config, listeners, shutdown, reload_rx).await;
    signal_task.abort();
    drop(demo_vm);
    match result {
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

fn print_summary(args: &Args, config: &Config) {
    println!("{}: OK, {} VM(s)", args.config.display(), config.vms.len());
    for vm in &config.vms {
        println!("  {}: {} -> {}", vm.name, vm.upstream.display(), vm.listen().display());
    }
}

async fn handle_signals(
    mut signals: signal_hook_tokio::Signals,
    shutdown: CancellationToken,
    reloads: mpsc::Sender<Reload>,
    config_path: Option<PathBuf>,
    log_file: Option<LogFile>,
) {
    while let Some(sig) = signals.next().await {
        if sig == SIGUSR1 {
            reopen_log(log_file.as_ref());
            continue;
        }
        if sig != SIGHUP {
            info!(signal = sig, "stopping");
            notify(&[NotifyState::Stopping]);
            shutdown.cancel();
            continue;
        }
        let Some(path) = &config_path else {
            warn!("SIGHUP: nothing to reload in demo mode");
            continue;
        };
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        notify(&states);
        reload(path, &reloads).await;
        notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
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

async fn reload(path: &std::path::Path, reloads: &mpsc::Sender<Reload>) {
    info!(path = %path.display(), "SIGHUP: reloading configuration");
    let config = Config::load(path).map_err(|e| qmpmux::error::chain(&e).replace('\n', " "));
    match &config {
        Err(error) => error!(%error, "new configuration rejected; keeping the running one"),
        Ok(c) => {
            if let Some(e) = c.exposed_secrets(path) {
                warn!("{e}");
            }
        }
    }
    let (done, answer) = oneshot::channel();
    let rejected = config.is_err();
    if reloads.send(Reload { config, done }).await.is_err() {
        return;
    }
    match answer.await {
        Ok(Err(e)) if !rejected => error!(error = %qmpmux::error::chain(&e), "reload failed; running VMs unchanged"),
        _ => {}
    }
}
