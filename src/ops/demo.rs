//! `qmpmux --demo`: a throwaway QEMU (`-M none`, no disk, no display) and a
//! config serving it, so qmpmux can be tried with one command.

use crate::config::{Config, VmConfig};
use std::path::PathBuf;
use std::process::Stdio;
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot create {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("cannot start qemu-system-x86_64 (install it, e.g. `apt-get install qemu-system-x86`)")]
    Qemu(#[source] std::io::Error),
}

/// The demo VM; QEMU is killed and the directory removed when dropped.
pub struct Demo {
    pub dir: PathBuf,
    pub config: Config,
    _qemu: Child,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts QEMU and returns once its monitor socket exists (so qmpmux's
/// first connection attempt finds it).
pub async fn start(listen: Option<PathBuf>) -> Result<Demo, DemoError> {
    let dir = std::env::temp_dir().join(format!("qmpmux-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::Dir(dir.clone(), e))?;
    let upstream = dir.join("qemu-qmp.sock");
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "none", "-nodefaults", "-display", "none", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", upstream.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(DemoError::Qemu)?;
    for _ in 0..500 {
        if upstream.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let listen = listen.unwrap_or_else(|| dir.join("demo.sock"));
    let config = Config {
        control_socket: Some(dir.join("qmpmux.ctl")),
        threads: 1,
        vms: vec![VmConfig::new("demo", upstream, listen)],
        ..Config::default()
    };
    Ok(Demo {
        dir,
        config,
        _qemu: qemu,
    })
}
