//! The `qmpmux` binary: arguments, logging, signals; the rest is the library.

use clap::Parser;
use futures_util::StreamExt;
use qmpmux::config::Config;
use qmpmux::{demo, run, Listeners};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

/// Multiplex QEMU's QMP monitor: many clients, one upstream session per VM.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/qmpmux/qmpmux.toml")]
    config: PathBuf,
    /// Validate the configuration, print a summary and exit.
    #[arg(long)]
    check_config: bool,
    /// Ignore --config: start a demo QEMU (`-M none`) and serve it.
    #[arg(long)]
    demo: bool,
    /// With --demo: where to listen (default: a fresh temporary directory).
    #[arg(long, requires = "demo")]
    demo_listen: Option<PathBuf>,
}

fn init_logging(level: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(writer)
        .init();
    guard
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("qmpmux: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main(args))
}

async fn async_main(args: Args) -> ExitCode {
    let mut demo_vm = None;
    let config = if args.demo {
        match demo::start(args.demo_listen.clone()) {
            Ok(d) => {
                let c = d.config.clone();
                demo_vm = Some(d);
                c
            }
            Err(e) => {
                eprintln!("qmpmux: {}", qmpmux::error::chain(&e));
                return ExitCode::FAILURE;
            }
        }
    } else {
        match Config::load(&args.config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("qmpmux: {}", qmpmux::error::chain(&e));
                return ExitCode::from(2);
            }
        }
    };
    if args.check_config {
        println!("{}: OK, {} VM(s)", args.config.display(), config.vms.len());
        for vm in &config.vms {
            println!("  {}: {} -> {}", vm.name, vm.upstream.display(), vm.listen.display());
        }
        return ExitCode::SUCCESS;
    }
    let _log_guard = init_logging(&config.log_level);
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            error!("{}", qmpmux::error::chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if let Some(vm) = config.vms.first().filter(|_| demo_vm.is_some()) {
        info!("demo VM ready: try `socat - UNIX-CONNECT:{}`", vm.listen.display());
    }
    let shutdown = CancellationToken::new();
    let signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let signal_task = tokio::spawn(handle_signals(signals, shutdown.clone()));
    let result = run(config, listeners, shutdown).await;
    signal_task.abort();
    drop(demo_vm);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", qmpmux::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn handle_signals(mut signals: signal_hook_tokio::Signals, shutdown: CancellationToken) {
    while let Some(sig) = signals.next().await {
        match sig {
            SIGHUP => warn!("SIGHUP: live reload is not implemented yet; restart qmpmux to apply config changes"),
            _ => {
                info!(signal = sig, "stopping");
                shutdown.cancel();
            }
        }
    }
}
