//! `qmpmux exec VM COMMAND [ARGUMENTS]`: one command, its reply.

use super::client::{into_result, Client};
use super::{find, CliError, Reach};
use crate::ops::escape::is_unsafe;
use std::time::Duration;

/// Run one QMP command on a VM and print QEMU's reply.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  qmpmux exec web01 query-status\n  qmpmux exec web01 block-job-cancel device=drive0 force=true\n  qmpmux exec web01 blockdev-add '{\"driver\": \"null-co\", \"node-name\": \"n0\"}'\n  qmpmux exec web01 --hmp 'info status'\n\nExit status: 0 success; 1 QEMU (or the socket's policy) answered with an error; 2 bad arguments or no such VM; 3 qmpmux, the VM's socket or QEMU cannot be reached; 4 --timeout passed without a reply."
)]
pub struct ExecArgs {
    /// The VM, by its name in qmpmux's configuration.
    #[arg(value_name = "VM")]
    pub vm: String,
    /// The QMP command (`query-status`, `stop`, ...).
    #[arg(value_name = "COMMAND", required_unless_present = "hmp")]
    pub command: Option<String>,
    /// The command's arguments: one JSON object (`'{"device": "drive0"}'`),
    /// or `key=value` words (values are JSON where they parse as JSON,
    /// strings otherwise; `a.b=1` nests).
    #[arg(value_name = "ARGUMENTS", requires = "command")]
    pub arguments: Vec<String>,
    /// Run a human monitor (HMP) command line instead, through
    /// `human-monitor-command`, and print its text.
    #[arg(long, short = 'H', value_name = "COMMAND LINE", conflicts_with = "command")]
    pub hmp: Option<String>,
    /// Print the reply line as qmpmux sent it (exact JSON, on standard
    /// output also for an error).
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds without a reply (exit status 4).
    #[arg(long, value_name = "SECONDS", value_parser = super::seconds)]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub reach: Reach,
}

/// Runs `qmpmux exec`; the exit status.
pub async fn run(args: &ExecArgs, config: &std::path::Path) -> u8 {
    match exec(args, config).await {
        Ok(code) => code,
        Err(e) => {
            super::report(&e);
            e.exit_code()
        }
    }
}

async fn exec(args: &ExecArgs, config: &std::path::Path) -> Result<u8, CliError> {
    let (command, arguments) = super::args::command_of(args.hmp.as_deref(), args.command.as_deref(), &args.arguments)?;
    let control = super::control_path(config, args.reach.control.clone());
    let target = find(&control, &args.vm).await?;
    let work = async {
        let mut client = Client::connect(&target.name, &target.socket).await?;
        client.negotiate().await?;
        client.execute(&command, arguments.as_ref()).await
    };
    let reply = match args.timeout {
        None => work.await?,
        Some(s) => tokio::time::timeout(Duration::from_secs_f64(s), work)
            .await
            .map_err(|_| CliError::Timeout {
                vm: target.name.clone(),
                seconds: s,
            })??,
    };
    if args.json {
        super::out(&format!("{}\n", reply.text));
        return Ok(if reply.error().is_some() {
            super::exit::QMP_ERROR
        } else {
            super::exit::OK
        });
    }
    let reply = into_result(&target.name, reply)?;
    let shown = match (&args.hmp, reply.value.get("return")) {
        (Some(_), Some(serde_json::Value::String(text))) => terminal_text(text),
        _ => reply.return_text().unwrap_or_default() + "\n",
    };
    super::out(&shown);
    Ok(super::exit::OK)
}

/// HMP's text for a terminal: lines and tabs as they are, every other
/// character that could act on the terminal escaped; ends with a newline
/// unless empty.
pub fn terminal_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        if c == '\n' || c == '\t' || !is_unsafe(c) {
            out.push(c);
        } else if c == '\r' {
            // HMP ends its lines with \r\n.
        } else {
            out.push_str(&format!("\\u{:04x}", c as u32));
        }
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn hmp_text_keeps_lines_and_escapes_the_rest() {
        assert_eq!(super::terminal_text("VM status: running\r\n"), "VM status: running\n");
        assert_eq!(super::terminal_text("a\tb\u{1b}[2J\u{9b}"), "a\tb\\u001b[2J\\u009b\n");
        assert_eq!(super::terminal_text(""), "");
    }
}
