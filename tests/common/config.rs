//! The one place the harness builds qmpmux configuration, typed (for
//! qmpmux in-process) or as a file's text (for its binary): a change to the
//! config types is adapted here.

use qmpmux::config::{ClientOptions, Config, UpstreamOptions, VmConfig};
use std::path::Path;

/// One VM: its name, upstream (QEMU's) socket and listen socket.
pub type Vm<'a> = (&'a str, &'a Path, &'a Path);

/// Defaults everywhere, with one VM per entry of `vms`.
pub fn config(vms: &[Vm]) -> Config {
    Config {
        log_level: "info".into(),
        log_format: Default::default(),
        log_file: None,
        socket: Default::default(),
        control_socket: None,
        metrics_listen: None,
        threads: 0,
        log_rotation: Default::default(),
        upstream: UpstreamOptions::default(),
        client: ClientOptions::default(),
        vms: vms
            .iter()
            .map(|(name, up, listen)| VmConfig {
                name: name.to_string(),
                upstream: up.to_path_buf(),
                upstream_mode: Default::default(),
                listeners: Vec::new(),
                listen_reserved_clients: None,
                listen: listen.to_path_buf(),
            })
            .collect(),
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
