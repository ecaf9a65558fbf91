//! The TOML configuration: parsed as [`RawConfig`], validated into [`Config`]
//! (no `Option`s left where a value is needed at run time).

use crate::policy::{Glob, Policy};
use crate::subject::SubjectPattern;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest path a unix socket address can hold (`sun_path` less the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Upper bound of `threads`.
const MAX_THREADS: usize = 256;

/// In-band commands QEMU queues per monitor (with OOB on); the upstream
/// session keeps at most this many in flight.
pub const MAX_IN_QEMU: usize = 8;

/// Where qmpmux's own sockets go by default.
pub const DEFAULT_DIR: &str = "/run/qmpmux";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{field}`: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

/// The file as written. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    log_file: Option<PathBuf>,
    log_rotation: Option<LogRotation>,
    socket_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    metrics_listen: Option<std::net::SocketAddr>,
    socket_mode: Option<String>,
    socket_owner: Option<String>,
    socket_group: Option<String>,
    threads: Option<usize>,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    client: RawClient,
    #[serde(default)]
    vm: Vec<RawVm>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    connect_timeout_ms: Option<u64>,
    greeting_timeout_ms: Option<u64>,
    command_timeout_ms: Option<u64>,
    proxy_events: Option<bool>,
    backoff_initial_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    backoff_multiplier: Option<f64>,
    backoff_jitter: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    greeting_wait_ms: Option<u64>,
    max_message_bytes: Option<usize>,
    max_depth: Option<u32>,
    max_in_flight: Option<usize>,
    max_ahead_us: Option<u64>,
    max_pending_bytes: Option<usize>,
    max_queue_bytes: Option<usize>,
    max_reply_bytes: Option<usize>,
    max_clients: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    upstream: PathBuf,
    #[serde(default)]
    upstream_mode: UpstreamMode,
    listen: Option<PathBuf>,
    /// Peers allowed on the main socket (any when both are empty).
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    listen_reserved_clients: Option<usize>,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
}

/// An extra listen socket with its own policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<String>,
    path: Option<PathBuf>,
    /// TCP address instead of `path`.
    tcp: Option<std::net::SocketAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    #[serde(default)]
    allow_plain_tcp: bool,
    #[serde(default)]
    subjects: Vec<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    max_clients: Option<usize>,
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `RUST_LOG`-style filter; `RUST_LOG` itself wins when set.
    pub log_level: String,
    pub log_format: LogFormat,
    /// Also log to this file (rotated per `log_rotation`); stdout always.
    pub log_file: Option<PathBuf>,
    pub log_rotation: LogRotation,
    /// Mode and owner of every listen socket.
    pub socket: SocketPerms,
    /// Where `qmpmux status` reaches the daemon.
    pub control_socket: Option<PathBuf>,
    /// Prometheus endpoint (`GET /metrics`); off when `None`.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Threads serving VMs: each VM (its upstream session and all its
    /// clients) runs on one of them. 0: one per CPU.
    pub threads: usize,
    pub upstream: UpstreamOptions,
    pub client: ClientOptions,
    pub vms: Vec<VmConfig>,
}

/// How qmpmux reaches a VM's QEMU monitor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// Connect to QEMU's socket (`-qmp unix:PATH,server=on,wait=off`).
    #[default]
    Connect,
    /// Listen at `upstream`; QEMU dials in
    /// (`-chardev socket,id=m,path=PATH,reconnect=1 -mon chardev=m,mode=control`).
    Accept,
}

/// Mode and ownership for listen sockets (owner/group resolved to ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketPerms {
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Default for SocketPerms {
    fn default() -> Self {
        SocketPerms {
            mode: 0o660,
            uid: None,
            gid: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogRotation {
    Minutely,
    Hourly,
    #[default]
    Daily,
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamOptions {
    pub connect_timeout: Duration,
    pub greeting_timeout: Duration,
    /// A command QEMU has not answered after this long gets an error; its
    /// late reply is discarded. `None`: wait forever, as QEMU's own clients do.
    pub command_timeout: Option<Duration>,
    /// Tell clients when the upstream connection is lost and restored, with
    /// `__org.qmpmux_UPSTREAM_LOST` / `__org.qmpmux_UPSTREAM_RESTORED`
    /// events. Off by default: stock clients need not know these names.
    pub proxy_events: bool,
    pub backoff: BackoffOptions,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffOptions {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// Fraction of each delay randomised either way (0 to 1).
    pub jitter: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientOptions {
    /// How long a client that connects before QEMU was ever seen waits for
    /// the first greeting before it is disconnected.
    pub greeting_wait: Duration,
    pub max_message_bytes: usize,
    pub max_depth: u32,
    /// Requests a client may have unanswered before qmpmux stops reading it.
    pub max_in_flight: usize,
    /// How much of QEMU's time one client's commands may queue ahead of
    /// other clients' (judged by how long its recent commands took): a
    /// client adds a command to QEMU's queue only while those it has there
    /// are expected to take less; it always has one. The rest wait in
    /// qmpmux, where clients take turns.
    pub max_ahead: Duration,
    /// Bytes of a client's forwarded requests not answered yet before
    /// qmpmux stops reading it (the request being read, up to
    /// `max_message_bytes`, comes on top).
    pub max_pending_bytes: usize,
    /// Bytes of replies and events waiting for a client before it counts as
    /// not reading and is disconnected. One message larger than this is
    /// still delivered to a client with nothing else waiting.
    pub max_queue_bytes: usize,
    /// A reply larger than this reaches its client as a QMP error instead.
    pub max_reply_bytes: usize,
    /// Clients one VM serves at once; more are refused.
    pub max_clients: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub upstream: PathBuf,
    pub upstream_mode: UpstreamMode,
    /// The main socket (`listen`): full control; a unix socket, whose peers
    /// `[[vm]] uids`/`gids` may restrict. Listener 0 of [`VmConfig::all_listeners`].
    pub main: ListenerConfig,
    /// Further sockets (`[[vm.listener]]`), each with its own policy.
    pub listeners: Vec<ListenerConfig>,
    /// Client slots the extra listeners together may never take, kept for
    /// the main socket; `None`: [`default_listen_reserve`].
    pub listen_reserved_clients: Option<usize>,
}

/// A listen socket with a command policy and optional peer restrictions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub endpoint: Endpoint,
    pub policy: Policy,
    /// Clients this listener serves at once; `None`: as many as the VM's
    /// listeners may have together ([`VmConfig::listener_share`]; no limit
    /// of its own for the main socket).
    pub max_clients: Option<usize>,
}

/// Where a listener listens, and who may connect there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket. When either list is non-empty, only peers whose uid
    /// is in `uids` or whose gid is in `gids` are served.
    Unix {
        path: PathBuf,
        uids: Vec<u32>,
        gids: Vec<u32>,
    },
    /// A TCP address: mutual TLS, or plain on loopback by explicit opt-in.
    /// TLS clients whose certificate subject matches one of `subjects` are
    /// served (all verified clients when empty).
    Tcp {
        addr: std::net::SocketAddr,
        tls: Option<TlsFiles>,
        subjects: Vec<SubjectPattern>,
    },
}

impl Endpoint {
    /// A unix socket any peer may connect to (as the file mode allows).
    pub fn unix(path: impl Into<PathBuf>) -> Endpoint {
        Endpoint::Unix {
            path: path.into(),
            uids: Vec::new(),
            gids: Vec::new(),
        }
    }

    /// The unix socket path, if it is one.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix { path, .. } => Some(path),
            Endpoint::Tcp { .. } => None,
        }
    }

    /// The TCP address, if it is one.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Endpoint::Unix { .. } => None,
            Endpoint::Tcp { addr, .. } => Some(*addr),
        }
    }
}

/// PEM files for a mutual-TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates must chain to this CA.
    pub client_ca: PathBuf,
}

/// Upper bound of the default `listen_reserved_clients`.
const DEFAULT_LISTEN_RESERVE_MAX: usize = 64;

/// The default `listen_reserved_clients`: a quarter of `max_clients`, at
/// least 1 and at most 64, always leaving the listeners at least one slot
/// (so none is kept when `max_clients` is 1).
pub fn default_listen_reserve(max_clients: usize) -> usize {
    (max_clients / 4)
        .clamp(1, DEFAULT_LISTEN_RESERVE_MAX)
        .min(max_clients.saturating_sub(1))
}

impl VmConfig {
    /// A VM whose main socket is `listen`, with no further listeners.
    pub fn new(name: impl Into<String>, upstream: impl Into<PathBuf>, listen: impl Into<PathBuf>) -> VmConfig {
        VmConfig {
            name: name.into(),
            upstream: upstream.into(),
            upstream_mode: UpstreamMode::default(),
            main: ListenerConfig::main(listen),
            listeners: Vec::new(),
            listen_reserved_clients: None,
        }
    }

    /// The main socket's path.
    pub fn listen(&self) -> &Path {
        self.main.endpoint.path().unwrap_or(Path::new(""))
    }

    /// Every listener: the main socket first, then the extra ones.
    pub fn all_listeners(&self) -> impl Iterator<Item = &ListenerConfig> {
        std::iter::once(&self.main).chain(&self.listeners)
    }

    /// Client slots the extra listeners may take together, out of the VM's
    /// `max_clients`.
    pub fn listener_share(&self, max_clients: usize) -> usize {
        let reserved = self
            .listen_reserved_clients
            .unwrap_or_else(|| default_listen_reserve(max_clients));
        max_clients.saturating_sub(reserved)
    }
}

impl ListenerConfig {
    /// The main socket at `path`: named "main", full control.
    pub fn main(path: impl Into<PathBuf>) -> ListenerConfig {
        ListenerConfig::new("main", Endpoint::unix(path))
    }

    /// A listener with full control and no limit of its own.
    pub fn new(name: impl Into<String>, endpoint: Endpoint) -> ListenerConfig {
        ListenerConfig {
            name: name.into(),
            endpoint,
            policy: Policy::default(),
            max_clients: None,
        }
    }

    /// Whether a unix peer with these ids may connect (TCP peers are
    /// checked by their certificate instead).
    pub fn admits(&self, uid: u32, gid: u32) -> bool {
        match &self.endpoint {
            Endpoint::Unix { uids, gids, .. } => {
                (uids.is_empty() && gids.is_empty()) || uids.contains(&uid) || gids.contains(&gid)
            }
            Endpoint::Tcp { .. } => false,
        }
    }

    /// The TLS subject patterns of a TCP listener (none for unix ones).
    pub fn subjects(&self) -> &[SubjectPattern] {
        match &self.endpoint {
            Endpoint::Tcp { subjects, .. } => subjects,
            Endpoint::Unix { .. } => &[],
        }
    }
}

/// A configuration for embedding qmpmux (tests, the demo): no VMs, no
/// control socket, no metrics endpoint, every limit at its default. (A file
/// that sets nothing gets a control socket: see [`Config::from_toml`].)
impl Default for Config {
    fn default() -> Self {
        Config {
            log_level: "info".into(),
            log_format: LogFormat::default(),
            log_file: None,
            log_rotation: LogRotation::default(),
            socket: SocketPerms::default(),
            control_socket: None,
            metrics_listen: None,
            threads: 0,
            upstream: UpstreamOptions::default(),
            client: ClientOptions::default(),
            vms: Vec::new(),
        }
    }
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            connect_timeout: Duration::from_secs(5),
            greeting_timeout: Duration::from_secs(5),
            command_timeout: None,
            proxy_events: false,
            backoff: BackoffOptions {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(1000),
                multiplier: 2.0,
                jitter: 0.1,
            },
        }
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            greeting_wait: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
            max_depth: 1024,
            max_in_flight: 64,
            max_ahead: Duration::from_micros(500),
            max_pending_bytes: 1 << 20,
            max_queue_bytes: 16 << 20,
            max_reply_bytes: 64 << 20,
            max_clients: 4096,
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Parses and validates config text; `path` is only used in messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        })?;
        raw.validate().map_err(|(field, reason)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            reason,
        })
    }
}

type Invalid = (String, String);

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    (field.into(), reason.into())
}

fn ms(v: Option<u64>, default: Duration, field: &str) -> Result<Duration, Invalid> {
    match v {
        None => Ok(default),
        Some(0) => Err(invalid(field, "must be greater than 0")),
        Some(n) => Ok(Duration::from_millis(n)),
    }
}

/// Names and paths the VMs validated so far use: each may be used once.
#[derive(Default)]
struct Taken {
    names: HashSet<String>,
    paths: HashSet<PathBuf>,
}

impl RawConfig {
    fn validate(self) -> Result<Config, Invalid> {
        let upstream = self.upstream.validate()?;
        let client = self.client.validate()?;
        let mut taken = Taken::default();
        let vms = self
            .vm
            .into_iter()
            .enumerate()
            .map(|(i, vm)| vm.validate(i, &client, self.socket_dir.as_deref(), &mut taken))
            .collect::<Result<Vec<_>, _>>()?;
        let log_level = self.log_level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level).map_err(|e| invalid("log_level", e.to_string()))?;
        if let Some(f) = &self.log_file {
            if f.file_name().is_none() {
                return Err(invalid("log_file", "must name a file"));
            }
        }
        let socket = SocketPerms {
            mode: match &self.socket_mode {
                None => SocketPerms::default().mode,
                Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o777)
                    .ok_or_else(|| invalid("socket_mode", format!("{m:?}: use an octal mode such as \"0660\"")))?,
            },
            uid: self
                .socket_owner
                .as_deref()
                .map(resolve_user)
                .transpose()
                .map_err(|r| invalid("socket_owner", r))?,
            gid: self
                .socket_group
                .as_deref()
                .map(resolve_group)
                .transpose()
                .map_err(|r| invalid("socket_group", r))?,
        };
        let control_socket = match self.control_socket {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p),
            None => Some(
                self.socket_dir
                    .as_deref()
                    .unwrap_or(Path::new(DEFAULT_DIR))
                    .join("qmpmux.ctl"),
            ),
        };
        if let Some(p) = &control_socket {
            check_socket_path(p).map_err(|r| invalid("control_socket", r))?;
        }
        let threads = self.threads.unwrap_or(0);
        if threads > MAX_THREADS {
            return Err(invalid(
                "threads",
                format!("{threads}: at most {MAX_THREADS} (0: one per CPU)"),
            ));
        }
        Ok(Config {
            threads,
            log_level,
            socket,
            control_socket,
            metrics_listen: self.metrics_listen,
            log_format: self.log_format.unwrap_or_default(),
            log_file: self.log_file,
            log_rotation: self.log_rotation.unwrap_or_default(),
            upstream,
            client,
            vms,
        })
    }
}

fn resolve_user(name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        _ => Err(format!("no user {name:?}")),
    }
}

fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(format!("no group {name:?}")),
    }
}

fn check_socket_path(p: &Path) -> Result<(), String> {
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "{} is longer than {MAX_SOCKET_PATH} bytes, the limit for unix sockets",
            p.display()
        ));
    }
    Ok(())
}

impl RawVm {
    /// `[[vm]]` number `i`.
    fn validate(
        self,
        i: usize,
        client: &ClientOptions,
        socket_dir: Option<&Path>,
        taken: &mut Taken,
    ) -> Result<VmConfig, Invalid> {
        let at = |f: &str| format!("vm[{i}].{f}");
        let vm = self;
        if vm.name.is_empty()
            || !vm
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || vm.name.starts_with('.')
        {
            return Err(invalid(
                at("name"),
                format!("{:?}: use letters, digits, '-', '_' and '.'", vm.name),
            ));
        }
        if !taken.names.insert(vm.name.clone()) {
            return Err(invalid(at("name"), format!("{:?} is used by another VM", vm.name)));
        }
        if vm.upstream.as_os_str().is_empty() {
            return Err(invalid(at("upstream"), "must be a socket path"));
        }
        check_socket_path(&vm.upstream).map_err(|r| invalid(at("upstream"), r))?;
        let listen = match (vm.listen, socket_dir) {
            (Some(l), _) if !l.as_os_str().is_empty() => l,
            (Some(_), _) => return Err(invalid(at("listen"), "must be a socket path")),
            (None, Some(dir)) => dir.join(format!("{}.sock", vm.name)),
            (None, None) => return Err(invalid(at("listen"), "is required when `socket_dir` is not set")),
        };
        check_socket_path(&listen).map_err(|r| invalid(at("listen"), r))?;
        if listen == vm.upstream {
            return Err(invalid(at("listen"), "is the same path as `upstream`"));
        }
        if !taken.paths.insert(listen.clone()) {
            return Err(invalid(
                at("listen"),
                format!("{} is used by another VM", listen.display()),
            ));
        }
        if vm.upstream_mode == UpstreamMode::Accept && !taken.paths.insert(vm.upstream.clone()) {
            return Err(invalid(at("upstream"), "is also used as a listen path"));
        }
        if vm.listen_reserved_clients.is_some_and(|r| r >= client.max_clients) {
            return Err(invalid(
                at("listen_reserved_clients"),
                format!(
                    "must be less than client.max_clients ({}), or the extra listeners get no client at all",
                    client.max_clients
                ),
            ));
        }
        let share = client.max_clients.saturating_sub(
            vm.listen_reserved_clients
                .unwrap_or_else(|| default_listen_reserve(client.max_clients)),
        );
        let listeners = vm
            .listeners
            .into_iter()
            .enumerate()
            .map(|(j, l)| l.validate(i, j, &vm.upstream, share, taken))
            .collect::<Result<Vec<_>, _>>()?;
        let main = ListenerConfig::new(
            "main",
            Endpoint::Unix {
                path: listen,
                uids: vm.uids,
                gids: vm.gids,
            },
        );
        Ok(VmConfig {
            name: vm.name,
            upstream: vm.upstream,
            upstream_mode: vm.upstream_mode,
            main,
            listeners,
            listen_reserved_clients: vm.listen_reserved_clients,
        })
    }
}

impl RawListener {
    /// `[[vm.listener]]` number `j` of VM `i`, whose QEMU socket is
    /// `upstream` and whose extra listeners share `share` client slots.
    fn validate(
        self,
        i: usize,
        j: usize,
        upstream: &Path,
        share: usize,
        taken: &mut Taken,
    ) -> Result<ListenerConfig, Invalid> {
        let at = |f: &str| format!("vm[{i}].listener[{j}].{f}");
        let l = self;
        for (field, list) in [("allow", &l.allow), ("deny", &l.deny)] {
            if list.iter().any(|p| p.is_empty()) {
                return Err(invalid(at(field), "patterns must not be empty"));
            }
        }
        let endpoint = match (l.path, l.tcp) {
            (Some(path), None) => {
                check_socket_path(&path).map_err(|r| invalid(at("path"), r))?;
                if !taken.paths.insert(path.clone()) || path == upstream {
                    return Err(invalid(at("path"), format!("{} is used elsewhere", path.display())));
                }
                if !l.subjects.is_empty() {
                    return Err(invalid(at("subjects"), "subjects apply to TLS listeners only"));
                }
                Endpoint::Unix {
                    path,
                    uids: l.uids,
                    gids: l.gids,
                }
            }
            (None, Some(addr)) => {
                let tls = match (l.tls_cert, l.tls_key, l.tls_client_ca) {
                    (Some(cert), Some(key), Some(client_ca)) => Some(TlsFiles { cert, key, client_ca }),
                    (None, None, None) if l.allow_plain_tcp && addr.ip().is_loopback() => None,
                    (None, None, None) => {
                        return Err(invalid(
                            at("tcp"),
                            "needs tls_cert, tls_key and tls_client_ca (mutual TLS); plain TCP only \
                             on a loopback address with allow_plain_tcp = true",
                        ))
                    }
                    _ => {
                        return Err(invalid(
                            at("tls_cert"),
                            "tls_cert, tls_key and tls_client_ca go together",
                        ))
                    }
                };
                if !(l.uids.is_empty() && l.gids.is_empty()) {
                    return Err(invalid(
                        at("uids"),
                        "uids/gids apply to unix sockets; use `subjects` for TLS",
                    ));
                }
                if tls.is_none() && !l.subjects.is_empty() {
                    return Err(invalid(at("subjects"), "subjects apply to TLS listeners only"));
                }
                let subjects = l
                    .subjects
                    .iter()
                    .map(|s| SubjectPattern::parse(s))
                    .collect::<Result<_, _>>()
                    .map_err(|r| invalid(at("subjects"), r))?;
                Endpoint::Tcp { addr, tls, subjects }
            }
            _ => return Err(invalid(at("path"), "set exactly one of `path` and `tcp`")),
        };
        let stem = endpoint
            .path()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned());
        let name = l.name.or(stem).unwrap_or_else(|| format!("listener{j}"));
        match l.max_clients {
            Some(0) => return Err(invalid(at("max_clients"), "must be greater than 0")),
            Some(n) if n > share => {
                return Err(invalid(
                    at("max_clients"),
                    format!(
                        "{n} is more than the {share} clients the VM's extra listeners may have together \
                         (client.max_clients less listen_reserved_clients)"
                    ),
                ))
            }
            _ => {}
        }
        Ok(ListenerConfig {
            name,
            endpoint,
            policy: Policy {
                allow: l.allow.into_iter().map(Glob::new).collect(),
                deny: l.deny.into_iter().map(Glob::new).collect(),
            },
            max_clients: l.max_clients,
        })
    }
}

impl RawUpstream {
    fn validate(self) -> Result<UpstreamOptions, Invalid> {
        let d = UpstreamOptions::default();
        let initial = ms(
            self.backoff_initial_ms,
            d.backoff.initial,
            "upstream.backoff_initial_ms",
        )?;
        let max = ms(
            self.backoff_max_ms,
            d.backoff.max.max(initial),
            "upstream.backoff_max_ms",
        )?;
        if max < initial {
            return Err(invalid(
                "upstream.backoff_max_ms",
                "must not be less than backoff_initial_ms",
            ));
        }
        let multiplier = self.backoff_multiplier.unwrap_or(d.backoff.multiplier);
        if !(1.0..=100.0).contains(&multiplier) {
            return Err(invalid("upstream.backoff_multiplier", "must be between 1 and 100"));
        }
        let jitter = self.backoff_jitter.unwrap_or(d.backoff.jitter);
        if !(0.0..=1.0).contains(&jitter) {
            return Err(invalid("upstream.backoff_jitter", "must be between 0 and 1"));
        }
        Ok(UpstreamOptions {
            connect_timeout: ms(
                self.connect_timeout_ms,
                d.connect_timeout,
                "upstream.connect_timeout_ms",
            )?,
            greeting_timeout: ms(
                self.greeting_timeout_ms,
                d.greeting_timeout,
                "upstream.greeting_timeout_ms",
            )?,
            proxy_events: self.proxy_events.unwrap_or(d.proxy_events),
            command_timeout: match self.command_timeout_ms {
                None => None,
                Some(v) => Some(ms(Some(v), Duration::ZERO, "upstream.command_timeout_ms")?),
            },
            backoff: BackoffOptions {
                initial,
                max,
                multiplier,
                jitter,
            },
        })
    }
}

impl RawClient {
    fn validate(self) -> Result<ClientOptions, Invalid> {
        let d = ClientOptions::default();
        let positive = |v: Option<usize>, default: usize, field: &str| match v {
            Some(0) => Err(invalid(field, "must be greater than 0")),
            v => Ok(v.unwrap_or(default)),
        };
        let max_depth = self.max_depth.unwrap_or(d.max_depth);
        if max_depth == 0 {
            return Err(invalid("client.max_depth", "must be greater than 0"));
        }
        if self.max_ahead_us.is_some_and(|us| us > 60_000_000) {
            return Err(invalid("client.max_ahead_us", "must be at most 60000000 (a minute)"));
        }
        Ok(ClientOptions {
            greeting_wait: ms(self.greeting_wait_ms, d.greeting_wait, "client.greeting_wait_ms")?,
            max_message_bytes: positive(self.max_message_bytes, d.max_message_bytes, "client.max_message_bytes")?,
            max_depth,
            max_in_flight: positive(self.max_in_flight, d.max_in_flight, "client.max_in_flight")?,
            max_ahead: Duration::from_micros(self.max_ahead_us.unwrap_or(d.max_ahead.as_micros() as u64)),
            max_pending_bytes: positive(self.max_pending_bytes, d.max_pending_bytes, "client.max_pending_bytes")?,
            max_queue_bytes: positive(self.max_queue_bytes, d.max_queue_bytes, "client.max_queue_bytes")?,
            max_reply_bytes: positive(self.max_reply_bytes, d.max_reply_bytes, "client.max_reply_bytes")?,
            max_clients: positive(self.max_clients, d.max_clients, "client.max_clients")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Path::new("test.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_vm_gets_defaults() {
        let c = load("[[vm]]\nname = \"web01\"\nupstream = \"/q/web01.sock\"\nlisten = \"/run/qmpmux/web01.sock\"\n")
            .unwrap();
        assert_eq!(c.vms.len(), 1);
        assert_eq!(c.vms[0].listen(), Path::new("/run/qmpmux/web01.sock"));
        assert_eq!(c.upstream, UpstreamOptions::default());
        assert_eq!(c.client, ClientOptions::default());
        assert_eq!(c.log_level, "info");
    }

    #[test]
    fn socket_dir_derives_listen_paths() {
        let c = load("socket_dir = \"/run/qmpmux\"\n[[vm]]\nname = \"a\"\nupstream = \"/q/a\"\n").unwrap();
        assert_eq!(c.vms[0].listen(), Path::new("/run/qmpmux/a.sock"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = load("[[vm]]\nname = \"a\"\nupstream = \"/q/a\"\n").unwrap_err();
        assert!(e.contains("vm[0].listen") && e.contains("socket_dir"), "{e}");
        let e = load("[[vm]]\nname = \"a\"\nupstream = \"/q/a\"\nlisten = \"/l/a\"\nbogus = 1\n").unwrap_err();
        assert!(e.contains("unknown field `bogus`") && e.contains("line 5"), "{e}");
        let e = load("[[vm]]\nname = \"a b\"\nupstream = \"/q\"\nlisten = \"/l\"\n").unwrap_err();
        assert!(e.contains("vm[0].name"), "{e}");
        let e = load("[[vm]]\nname = \"a\"\nupstream = \"/q\"\nlisten = \"/l\"\n[[vm]]\nname = \"a\"\nupstream = \"/q2\"\nlisten = \"/l2\"\n")
            .unwrap_err();
        assert!(e.contains("vm[1].name") && e.contains("another VM"), "{e}");
        let e = load("[[vm]]\nname = \"a\"\nupstream = \"/q\"\nlisten = \"/l\"\n[[vm]]\nname = \"b\"\nupstream = \"/q2\"\nlisten = \"/l\"\n")
            .unwrap_err();
        assert!(e.contains("vm[1].listen"), "{e}");
        let long = "x".repeat(120);
        let e = load(&format!(
            "[[vm]]\nname = \"a\"\nupstream = \"/{long}\"\nlisten = \"/l\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("vm[0].upstream") && e.contains("107"), "{e}");
        let e = load("[upstream]\nbackoff_initial_ms = 500\nbackoff_max_ms = 100\n").unwrap_err();
        assert!(e.contains("upstream.backoff_max_ms"), "{e}");
        let e = load("[upstream]\nbackoff_jitter = 2.0\n").unwrap_err();
        assert!(e.contains("upstream.backoff_jitter"), "{e}");
        let e = load("[client]\nmax_in_flight = 0\n").unwrap_err();
        assert!(e.contains("client.max_in_flight"), "{e}");
        let e = load("[client]\nmax_ahead_us = 100000000\n").unwrap_err();
        assert!(e.contains("client.max_ahead_us"), "{e}");
        let e = load("[client]\nmax_pending_bytes = 0\n").unwrap_err();
        assert!(e.contains("client.max_pending_bytes"), "{e}");
        let e = load("log_level = \"info,,=\"\n").unwrap_err();
        assert!(e.contains("log_level"), "{e}");
        let e = load("[[vm]]\nname = 5\n").unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn client_limits_per_listener() {
        assert_eq!(default_listen_reserve(4096), 64);
        assert_eq!(default_listen_reserve(100), 25);
        assert_eq!(default_listen_reserve(4), 1);
        assert_eq!(default_listen_reserve(2), 1);
        assert_eq!(default_listen_reserve(1), 0);
        let vm = "[[vm]]\nname = \"a\"\nupstream = \"/q\"\nlisten = \"/l\"\n";
        let ro = "[[vm.listener]]\npath = \"/ro\"\n";
        let c = load(&format!("{vm}{ro}max_clients = 4032\n")).unwrap();
        assert_eq!(c.vms[0].listener_share(c.client.max_clients), 4032);
        assert_eq!(c.vms[0].listeners[0].max_clients, Some(4032));
        let e = load(&format!("{vm}{ro}max_clients = 4033\n")).unwrap_err();
        assert!(e.contains("vm[0].listener[0].max_clients") && e.contains("4032"), "{e}");
        let e = load(&format!("{vm}{ro}max_clients = 0\n")).unwrap_err();
        assert!(e.contains("vm[0].listener[0].max_clients"), "{e}");
        let c = load(&format!(
            "[client]\nmax_clients = 10\n{vm}listen_reserved_clients = 0\n{ro}max_clients = 10\n"
        ))
        .unwrap();
        assert_eq!(c.vms[0].listener_share(10), 10);
        let e = load(&format!(
            "[client]\nmax_clients = 10\n{vm}listen_reserved_clients = 10\n"
        ))
        .unwrap_err();
        assert!(e.contains("vm[0].listen_reserved_clients"), "{e}");
        let e = load(&format!(
            "[client]\nmax_clients = 10\n{vm}listen_reserved_clients = 2\n{ro}max_clients = 9\n"
        ))
        .unwrap_err();
        assert!(e.contains("listener[0].max_clients") && e.contains(" 8 "), "{e}");
    }

    #[test]
    fn subject_patterns_are_checked() {
        let base = "[[vm]]\nname = \"a\"\nupstream = \"/q\"\nlisten = \"/l\"\n[[vm.listener]]\n\
                    tcp = \"[::]:4444\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\ntls_client_ca = \"/ca\"\n";
        let c = load(&format!("{base}subjects = [\"CN=orchestrator, O=Example\"]\n")).unwrap();
        assert_eq!(
            c.vms[0].listeners[0].subjects()[0].as_str(),
            "CN=orchestrator, O=Example"
        );
        let e = load(&format!("{base}subjects = [\"*CN=orchestrator*\"]\n")).unwrap_err();
        assert!(
            e.contains("vm[0].listener[0].subjects") && e.contains("TYPE=VALUE"),
            "{e}"
        );
    }

    #[test]
    fn no_vms_is_valid() {
        assert!(load("").unwrap().vms.is_empty());
    }

    #[test]
    fn shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/qmpmux.toml");
        let c = Config::load(&path).unwrap();
        assert!(!c.vms.is_empty());
    }
}
