//! `qmpmux fleet ls | exec | events`: every host's VMs over NATS, the
//! way `qmpmux exec` and `events` reach one VM through its socket.
//!
//! - [`nats`]: where NATS is (`--nats` and credentials, else `[nats]` of
//!   `--config`), and the connection.
//! - [`hosts`]: finding hosts (one request on `<parent>.vms`, every host's
//!   answer collected for a moment), and which hosts and VMs a pattern
//!   selects. Pure but for the collection.
//! - [`ls`], [`exec`], [`events`]: the subcommands.
//!
//! Exit statuses are the command line's ([`super::exit`]); what each
//! subcommand means by them is in its `after_help` and docs/cli.md.

pub mod events;
pub mod exec;
pub mod hosts;
pub mod ls;
pub mod nats;

use super::CliError;
use std::path::Path;

/// Every host's VMs over NATS: list them, run a command on many, follow
/// their events.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Each host's qmpmux must have a [nats] table (commands = true for `fleet exec`). On a host, `qmpmux fleet ls` uses --config's [nats]; elsewhere give --nats URL and credentials.\n\nExit status: 0 success; 1 a QMP error; 2 bad arguments, or no VM matches; 3 NATS, a host or a VM cannot be reached; 4 --timeout passed first. See each subcommand's --help."
)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: FleetCmd,
    #[command(flatten)]
    pub nats: nats::NatsArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum FleetCmd {
    Ls(ls::LsArgs),
    Exec(exec::ExecArgs),
    Events(events::EventsArgs),
}

/// Why a fleet subcommand failed (the command line's own reasons are in
/// [`CliError`]).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("no NATS server to ask: give --nats URL, or a --config with a [nats] table ({why})")]
    NoServers { why: String },
    #[error(transparent)]
    Auth(#[from] crate::fleet::AuthError),
    // async-nats's errors name their cause in their text and again as
    // their source: the text alone says it once.
    #[error("cannot connect to NATS ({servers}): {cause}{hint}")]
    Connect {
        servers: String,
        cause: String,
        hint: &'static str,
    },
    #[error("NATS: cannot {what}: {cause}{server_said}")]
    Nats {
        what: String,
        cause: String,
        server_said: String,
    },
    #[error("no qmpmux answered on {subject}{why}")]
    NoHosts { subject: String, why: String },
    #[error("no VM matches {wanted} ({known})")]
    NoMatch { wanted: String, known: String },
    #[error(
        "no qmpmux takes commands for VM '{vm}' on {prefix} (`commands = false` there, or it is not connected to NATS)"
    )]
    NoResponders { vm: String, prefix: String },
    #[error("the NATS server refused: {said}")]
    Refused { said: String },
    #[error("{wanted}: {got} of {count} events within {seconds} s")]
    TooFew {
        wanted: String,
        got: u64,
        count: u64,
        seconds: f64,
    },
}

impl FleetError {
    pub fn exit_code(&self) -> u8 {
        use super::exit;
        match self {
            FleetError::NoServers { .. } | FleetError::Auth(_) | FleetError::NoMatch { .. } => exit::USAGE,
            FleetError::TooFew { .. } => exit::TIMED_OUT,
            FleetError::Connect { .. }
            | FleetError::Nats { .. }
            | FleetError::NoHosts { .. }
            | FleetError::NoResponders { .. }
            | FleetError::Refused { .. } => exit::UNREACHABLE,
        }
    }
}

/// Runs `qmpmux fleet ...`; the exit status.
pub async fn run(args: &FleetArgs, config: &Path) -> u8 {
    let outcome = match &args.command {
        FleetCmd::Ls(a) => ls::run(a, &args.nats, config).await,
        FleetCmd::Exec(a) => exec::run(a, &args.nats, config).await,
        FleetCmd::Events(a) => events::run(a, &args.nats, config).await,
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            super::report(&e);
            e.exit_code()
        }
    }
}
