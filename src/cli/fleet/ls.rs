//! `qmpmux fleet ls [PATTERN]`: every host's VMs.

use super::hosts::{discover, Filter, Host, PrefixPattern};
use super::nats::{from_file, Nats, NatsArgs};
use super::CliError;
use crate::cli::show::Ordered;
use std::path::Path;

/// List every host's VMs (hosts answering on NATS).
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  qmpmux fleet ls\n  qmpmux fleet ls 'web*' --host 'hv0?'\n  qmpmux fleet ls --nats nats://nats-1:4222 --creds ops.creds --json\n\nEach line: a host and one of its VMs (a host without VMs: `-`); with --json one line per host, {\"host\", \"prefix\", \"vms\": [...]}.\nExit status: 0 listed; 2 bad arguments, or PATTERN/--host match nothing; 3 NATS cannot be reached, or no qmpmux answered."
)]
pub struct LsArgs {
    /// Only VMs whose names match (`*` and `?` wildcards).
    #[arg(value_name = "PATTERN")]
    pub pattern: Option<String>,
    #[command(flatten)]
    pub find: FindArgs,
    /// One JSON object per host.
    #[arg(long)]
    pub json: bool,
}

/// Which hosts, and how long to wait for them (`ls`, `exec`).
#[derive(Debug, Clone, clap::Args)]
pub struct FindArgs {
    /// Only hosts whose names match (`*` and `?` wildcards; several
    /// patterns with commas).
    #[arg(long = "host", value_name = "PATTERN", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// How long hosts have to answer, in seconds (with --host naming hosts
    /// without wildcards: until they have).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = crate::cli::seconds)]
    pub wait: f64,
}

impl FindArgs {
    /// Connects and asks every host; the hosts and VMs `vm` and `--host`
    /// select, never none (a usage error, exit status 2).
    pub async fn find(&self, vm: Option<&str>, nats: &NatsArgs, config: &Path) -> Result<(Nats, Vec<Host>), CliError> {
        let wait = std::time::Duration::from_secs_f64(self.wait);
        let prefix = PrefixPattern::parse(&nats.prefix)?;
        prefix.discovery()?;
        let settings = nats.settings(|| from_file(config))?;
        let conn = Nats::connect(&settings).await?;
        let filter = Filter::new(vm, &self.hosts);
        let hosts = discover(&conn, &prefix, &filter, wait).await?;
        let selected = filter.select(&hosts);
        if selected.is_empty() {
            return Err(filter.no_match(&hosts).into());
        }
        Ok((conn, selected))
    }
}

/// Runs `qmpmux fleet ls`; the exit status.
pub async fn run(args: &LsArgs, nats: &NatsArgs, config: &Path) -> Result<u8, CliError> {
    let (_conn, hosts) = args.find.find(args.pattern.as_deref(), nats, config).await?;
    let text = match args.json {
        true => hosts.iter().map(json).collect(),
        false => table(&hosts),
    };
    crate::cli::out(&text);
    Ok(crate::cli::exit::OK)
}

/// `HOST  VM` rows, aligned.
pub fn table(hosts: &[Host]) -> String {
    let width = hosts.iter().map(|h| h.host.len()).max().unwrap_or(0).max(4);
    let mut out = format!("{:width$}  VM\n", "HOST");
    for h in hosts {
        if h.vms.is_empty() {
            out.push_str(&format!("{:width$}  -\n", h.host));
        }
        for vm in &h.vms {
            out.push_str(&format!("{:width$}  {vm}\n", h.host));
        }
    }
    out
}

/// `{"host": ..., "prefix": ..., "vms": [...]}` on one line.
pub fn json(h: &Host) -> String {
    let s = |t: &str| Ordered::String(t.to_owned());
    let obj = Ordered::Object(vec![
        ("host".into(), s(&h.host)),
        ("prefix".into(), s(&h.prefix)),
        ("vms".into(), Ordered::Array(h.vms.iter().map(|v| s(v)).collect())),
    ]);
    obj.compact() + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_per_vm_and_a_line_per_host() {
        let hosts = [
            Host {
                host: "hv1".into(),
                prefix: "qmpmux.hv1".into(),
                vms: vec!["db01".into(), "web01".into()],
            },
            Host {
                host: "hypervisor2".into(),
                prefix: "qmpmux.hypervisor2".into(),
                vms: vec![],
            },
        ];
        assert_eq!(
            table(&hosts),
            "HOST         VM\nhv1          db01\nhv1          web01\nhypervisor2  -\n"
        );
        assert_eq!(
            json(&hosts[0]),
            "{\"host\": \"hv1\", \"prefix\": \"qmpmux.hv1\", \"vms\": [\"db01\", \"web01\"]}\n"
        );
    }
}
