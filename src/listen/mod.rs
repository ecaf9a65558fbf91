//! Binding the daemon's sockets before it serves: every VM's unix and TCP
//! listeners (and its upstream socket in accept mode), the control socket
//! and the metrics endpoint; moving them to the VM's thread; and undoing
//! all of it, socket files and directories, when a start or reload fails.

pub mod sockfile;

use crate::config::{Config, Endpoint, SocketPerms, UpstreamMode, VmConfig};
use crate::downstream::tls;
use crate::handover::{names, Handover};
use sockfile::{bind, BindError, Created};
use std::collections::HashMap;
use std::os::fd::AsFd;
use tokio::net::{TcpListener, UnixListener};
use tokio_rustls::TlsAcceptor;
use tracing::{error, warn};

/// Why binding the daemon's sockets failed.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen for metrics on {addr}{}", network_hint(source))]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("VM '{vm}', listener '{listener}': TLS")]
    Tls {
        vm: String,
        listener: String,
        #[source]
        source: crate::downstream::tls::TlsError,
    },
    #[error("VM '{vm}': cannot listen on {addr}{}", network_hint(source))]
    Tcp {
        vm: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("VM '{vm}'")]
    Bind {
        vm: String,
        #[source]
        source: BindError,
    },
}

/// What to say about a TCP bind the system refused outright: a systemd unit
/// that allows unix sockets only (`RestrictAddressFamilies=AF_UNIX`:
/// EAFNOSUPPORT; the shipped one allows loopback too), and a port below
/// 1024 needs `CAP_NET_BIND_SERVICE` (EACCES).
fn network_hint(e: &std::io::Error) -> &'static str {
    macro_rules! unit {
        ($why:literal) => {
            concat!(
                " (",
                $why,
                "; if qmpmux runs under a systemd unit that allows unix sockets only, ",
                "allow the network in a drop-in (`systemctl edit qmpmux`): ",
                "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6, PrivateNetwork=no, ",
                "and IPAddressAllow= for addresses beyond localhost (see docs/operations.md, systemd))"
            )
        };
    }
    match e.raw_os_error() {
        Some(libc::EAFNOSUPPORT) => unit!("address family not allowed"),
        Some(libc::EACCES | libc::EPERM) => {
            unit!("permission denied: a port below 1024 also needs CAP_NET_BIND_SERVICE")
        }
        _ => "",
    }
}

/// A VM's bound sockets: for clients, and in accept mode for QEMU.
#[derive(Debug)]
pub struct VmSockets {
    /// One per listener, in [`VmConfig::all_listeners`]'s order (the main
    /// socket first).
    pub listeners: Vec<Bound>,
    pub upstream: Option<UnixListener>,
    /// The socket files (and directories) binding created.
    pub files: Created,
    /// The names its sockets are kept under for the next process.
    pub kept: Vec<String>,
}

/// An extra listener, bound.
pub enum Bound {
    Unix(UnixListener),
    Tcp(TcpListener, Option<TlsAcceptor>),
}

impl VmSockets {
    /// Registers the sockets with the current runtime (they were bound on
    /// the supervisor's), so that their I/O is driven by the VM's shard.
    pub fn rehome(self) -> std::io::Result<VmSockets> {
        let unix = |l: UnixListener| l.into_std().and_then(UnixListener::from_std);
        let listeners = self
            .listeners
            .into_iter()
            .map(|b| match b {
                Bound::Unix(l) => unix(l).map(Bound::Unix),
                Bound::Tcp(l, tls) => l.into_std().and_then(TcpListener::from_std).map(|l| Bound::Tcp(l, tls)),
            })
            .collect::<std::io::Result<_>>()?;
        Ok(VmSockets {
            listeners,
            upstream: self.upstream.map(unix).transpose()?,
            files: self.files,
            kept: self.kept,
        })
    }
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Unix(l) => write!(f, "Unix({l:?})"),
            Bound::Tcp(l, tls) => write!(f, "Tcp({l:?}, tls: {})", tls.is_some()),
        }
    }
}

/// Everything the daemon listens on, bound before it runs.
#[derive(Debug)]
pub struct Listeners {
    pub(crate) vms: HashMap<String, VmSockets>,
    pub(crate) control: Option<(UnixListener, Created)>,
    pub(crate) metrics: Option<TcpListener>,
    /// What the previous process handed over and is not used yet (its
    /// QEMU connections and journals), and what to keep for the next.
    pub(crate) handover: Handover,
}

impl Default for Listeners {
    fn default() -> Listeners {
        Listeners {
            vms: HashMap::new(),
            control: None,
            metrics: None,
            handover: Handover::none(),
        }
    }
}

impl Listeners {
    /// The metrics endpoint's address, once bound (e.g. for port 0).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Binds every VM's `listen` path, the control socket and the metrics
    /// endpoint. On failure, the socket files and directories already
    /// created are removed; the control socket and the metrics endpoint are
    /// not worth failing for (each is logged and left out).
    pub async fn bind(config: &Config) -> Result<Listeners, ListenError> {
        Listeners::bind_with(config, Handover::none()).await
    }

    /// [`Listeners::bind`], first taking the sockets `handover` holds from
    /// the previous process, and keeping every socket for the next one.
    pub async fn bind_with(config: &Config, handover: Handover) -> Result<Listeners, ListenError> {
        let mut out = Listeners {
            handover,
            ..Listeners::default()
        };
        for vm in &config.vms {
            match bind_vm(vm, &config.socket, &mut out.handover).await {
                Ok(s) => out.vms.insert(vm.name.clone(), s),
                Err(e) => return Err(out.undo(e)),
            };
        }
        if let Some(path) = &config.control_socket {
            // Status reporting is not worth refusing to serve VMs over.
            let mut created = Created::default();
            match bind_unix(
                path,
                &config.socket,
                &mut created,
                &mut out.handover,
                Kept::Control,
                &mut Vec::new(),
            )
            .await
            {
                Ok(l) => out.control = Some((l, created)),
                Err(e) => warn!(error = %crate::error::chain(&e), "no control socket: `qmpmux status` will not work"),
            }
        }
        if let Some(addr) = config.metrics_listen {
            // Nor are metrics: the VMs' sockets are what clients need, and a
            // restart after `metrics_listen` was set must not take them all
            // down. The error says what is not served, and why.
            match TcpListener::bind(addr).await {
                Ok(l) => out.metrics = Some(l),
                Err(source) => error!(
                    error = %crate::error::chain(&ListenError::Metrics { addr, source }),
                    "serving the VMs without the metrics endpoint: fix metrics_listen, then restart qmpmux"
                ),
            }
        }
        Ok(out)
    }

    /// Closes everything and removes what binding created; returns `e`.
    pub(crate) fn undo<E>(self, e: E) -> E {
        let mut all = Created::default();
        for (_, s) in self.vms {
            all.append(s.files);
        }
        if let Some((_, files)) = self.control {
            all.append(files);
        }
        all.undo();
        e
    }
}

/// Binds a VM's sockets; on failure, removes those it did bind and the
/// directories it created.
pub async fn bind_vm(vm: &VmConfig, perms: &SocketPerms, ho: &mut Handover) -> Result<VmSockets, ListenError> {
    let mut files = Created::default();
    match bind_vm_into(vm, perms, &mut files, ho).await {
        Ok(mut s) => {
            s.files = files;
            Ok(s)
        }
        Err(e) => {
            files.undo();
            Err(e)
        }
    }
}

/// Which socket of the daemon's an fd is, for the handover (see
/// `handover::names`).
#[derive(Clone, Copy)]
enum Kept<'a> {
    Listen(&'a str, usize),
    Upstream(&'a str),
    Control,
}

impl Kept<'_> {
    fn name(self, file: Option<(u64, u64)>) -> String {
        match self {
            Kept::Listen(vm, n) => names::listen(vm, n, file),
            Kept::Upstream(vm) => names::upstream(vm, file.unwrap_or_default()),
            Kept::Control => names::control(file.unwrap_or_default()),
        }
    }

    fn take(self, ho: &mut Handover) -> Option<(String, std::os::fd::OwnedFd)> {
        match self {
            Kept::Listen(vm, n) => ho.inherited.take_socket("listen", Some(n), Some(vm)),
            Kept::Upstream(vm) => ho.inherited.take_socket("upstream", None, Some(vm)),
            Kept::Control => ho.inherited.take_socket("control", None, None),
        }
    }
}

/// A unix listening socket at `path`: the one handed over for it if its
/// file is still there, else bound afresh; kept for the next process.
async fn bind_unix(
    path: &std::path::Path,
    perms: &SocketPerms,
    files: &mut Created,
    ho: &mut Handover,
    kept: Kept<'_>,
    names: &mut Vec<String>,
) -> Result<UnixListener, BindError> {
    if let Some((name, fd)) = kept.take(ho) {
        let file = names::parse(&name).and_then(|p| p.file).unwrap_or_default();
        if let Some(l) = sockfile::adopt(path, fd, file, files) {
            ho.keeper.adopted(&name, l.as_fd());
            names.push(name);
            return Ok(l);
        }
        // Out of systemd's store: it would keep the old socket listening.
        ho.keeper.release(&name);
    }
    let l = bind(path, perms, files).await?;
    let name = kept.name(files.sockets.last().map(sockfile::SocketFile::id));
    ho.keeper.keep(&name, l.as_fd());
    names.push(name);
    Ok(l)
}

/// A TCP listener on `addr`: the one handed over if it listens there, else
/// bound afresh; kept for the next process.
async fn bind_tcp(
    addr: std::net::SocketAddr,
    ho: &mut Handover,
    kept: Kept<'_>,
    names: &mut Vec<String>,
) -> std::io::Result<TcpListener> {
    if let Some((name, fd)) = kept.take(ho) {
        let l = std::net::TcpListener::from(fd);
        let here = l
            .local_addr()
            .is_ok_and(|a| a == addr || (addr.port() == 0 && a.ip() == addr.ip()));
        let adopted = here
            .then_some(l)
            .and_then(|l| l.set_nonblocking(true).ok().map(|()| l))
            .and_then(|l| TcpListener::from_std(l).ok());
        if let Some(l) = adopted {
            ho.keeper.adopted(&name, l.as_fd());
            names.push(name);
            return Ok(l);
        }
        ho.keeper.release(&name);
    }
    let l = TcpListener::bind(addr).await?;
    let name = kept.name(None);
    ho.keeper.keep(&name, l.as_fd());
    names.push(name);
    Ok(l)
}

async fn bind_vm_into(
    vm: &VmConfig,
    perms: &SocketPerms,
    files: &mut Created,
    ho: &mut Handover,
) -> Result<VmSockets, ListenError> {
    let err = |source| ListenError::Bind {
        vm: vm.name.clone(),
        source,
    };
    let mut listeners = Vec::new();
    let mut kept_names = Vec::new();
    let names = &mut kept_names;
    for (n, l) in vm.all_listeners().enumerate() {
        let kept = Kept::Listen(&vm.name, n);
        listeners.push(match &l.endpoint {
            Endpoint::Unix { path, .. } => {
                Bound::Unix(bind_unix(path, perms, files, ho, kept, names).await.map_err(err)?)
            }
            Endpoint::Tcp {
                addr, tls: tls_files, ..
            } => {
                let acceptor = match tls_files {
                    Some(files) => Some(tls::acceptor(files).map_err(|source| ListenError::Tls {
                        vm: vm.name.clone(),
                        listener: l.name.clone(),
                        source,
                    })?),
                    None => None,
                };
                let listener = bind_tcp(*addr, ho, kept, names)
                    .await
                    .map_err(|source| ListenError::Tcp {
                        vm: vm.name.clone(),
                        addr: *addr,
                        source,
                    })?;
                Bound::Tcp(listener, acceptor)
            }
        });
    }
    let upstream = match vm.upstream_mode {
        UpstreamMode::Connect => None,
        UpstreamMode::Accept => Some(
            bind_unix(&vm.upstream, perms, files, ho, Kept::Upstream(&vm.name), names)
                .await
                .map_err(err)?,
        ),
    };
    Ok(VmSockets {
        listeners,
        upstream,
        files: Created::default(),
        kept: kept_names,
    })
}

/// Binds a VM's sockets during a reload; on failure, removes the socket
/// files and directories this reload already created (`done`), so nothing
/// is left behind.
pub async fn bind_or_undo(
    vm: &VmConfig,
    perms: &SocketPerms,
    done: &mut Vec<(VmConfig, Option<VmSockets>)>,
    ho: &mut Handover,
) -> Result<VmSockets, ListenError> {
    let result = bind_vm(vm, perms, ho).await;
    if result.is_err() {
        // All sockets first, then directories, so that one VM's socket does
        // not keep a directory another created.
        let mut all = Created::default();
        for (_, s) in done.drain(..) {
            if let Some(s) = s {
                all.append(s.files);
            }
        }
        all.undo();
    }
    result
}

/// The socket paths a VM binds.
pub fn bound_paths(vm: &VmConfig) -> Vec<&std::path::Path> {
    let mut paths: Vec<_> = vm.all_listeners().filter_map(|l| l.endpoint.path()).collect();
    if vm.upstream_mode == UpstreamMode::Accept {
        paths.push(vm.upstream.as_path());
    }
    paths
}

/// Whether the new configuration of a VM binds a path or TCP address the
/// old one holds (it must then stop before the new one binds).
pub fn shares_a_path(old: &VmConfig, new: &VmConfig) -> bool {
    let tcp = |vm: &VmConfig| vm.all_listeners().filter_map(|l| l.endpoint.addr()).collect::<Vec<_>>();
    let (old_paths, old_tcp) = (bound_paths(old), tcp(old));
    bound_paths(new).iter().any(|p| old_paths.contains(p)) || tcp(new).iter().any(|a| old_tcp.contains(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_tcp_bind_points_to_the_unit_s_drop_in() {
        let addr = "127.0.0.1:9187".parse().unwrap();
        let refused = |errno| ListenError::Metrics {
            addr,
            source: std::io::Error::from_raw_os_error(errno),
        };
        for errno in [libc::EAFNOSUPPORT, libc::EACCES] {
            let e = crate::error::chain(&refused(errno));
            assert!(e.starts_with("cannot listen for metrics on 127.0.0.1:9187 ("), "{e}");
            assert!(e.contains("RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"), "{e}");
        }
        assert!(crate::error::chain(&refused(libc::EACCES)).contains("CAP_NET_BIND_SERVICE"));
        let e = crate::error::chain(&refused(libc::EADDRINUSE));
        assert!(!e.contains("systemd"), "{e}");
        let e = ListenError::Tcp {
            vm: "a".into(),
            addr,
            source: std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
        };
        assert!(e.to_string().contains("drop-in"), "{e}");
    }
}
