//! The one place the harness builds qmpmux configuration, typed (for
//! qmpmux in-process) or as a file's text (for its binary): a change to the
//! config types is adapted here.

use qmpmux::config::{Config, VmConfig};
use std::path::Path;

/// One VM: its name, upstream (QEMU's) socket and listen socket.
pub type Vm<'a> = (&'a str, &'a Path, &'a Path);

/// Defaults everywhere, with one VM per entry of `vms`.
pub fn config(vms: &[Vm]) -> Config {
    Config {
        vms: vms
            .iter()
            .map(|(name, up, listen)| VmConfig::new(*name, *up, *listen))
            .collect(),
        ..Config::default()
    }
}

/// A config file: `log_level = "warn"`, `[client] max_clients`, and one
/// `[[vm]]` per entry of `vms`.
pub fn config_toml(vms: &[Vm], max_clients: usize) -> String {
    let mut s = format!("log_level = \"warn\"\n[client]\nmax_clients = {max_clients}\n");
    for (name, up, listen) in vms {
        s += &format!(
            "[[vm]]\nname = \"{name}\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
            up.display(),
            listen.display()
        );
    }
    s
}

/// `[nats]` on `url` with host `hv1`, prefix `qmpmux.hv1`, commands on,
/// no stream, and the default policy.
pub fn nats_commands(url: &str) -> qmpmux::config::NatsConfig {
    qmpmux::config::NatsConfig {
        commands: true,
        ..super::nats::qmpmux_config(&[url.to_string()], None)
    }
}
