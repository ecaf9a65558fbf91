//! The TOML configuration: parsed as [`RawConfig`], validated into [`Config`]
//! (no `Option`s left where a value is needed at run time).

mod nats;
mod raw;
mod secrets;

pub use nats::is_token;
pub use secrets::ExposedSecrets;

use raw::RawConfig;

use crate::policy::{Glob, Policy};
use crate::subject::SubjectPattern;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// Validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `RUST_LOG`-style filter; `RUST_LOG` itself wins when set.
    pub log_level: String,
    pub log_format: LogFormat,
    /// Also log to this file (rotated per `log_rotation`); stdout always.
    pub log_file: Option<PathBuf>,
    pub log_rotation: LogRotation,
    /// Rotated `log_file`s kept (the current one included); all when `None`.
    pub log_keep: Option<usize>,
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
    /// `[nats]`: events and commands for a fleet; off when `None`.
    pub nats: Option<NatsConfig>,
}

/// `[nats]`: where and how qmpmux publishes its VMs' events and state, and
/// whether it answers QMP commands, over NATS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URLs (several for a cluster).
    pub servers: Vec<String>,
    pub auth: NatsAuth,
    /// TLS: the CA to trust (else the system's), a client certificate.
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
    /// This host's name in subjects and headers.
    pub host: String,
    /// Every subject starts with this (`qmpmux.<host>` by default).
    pub prefix: String,
    /// A JetStream stream that captures the events; plain NATS when `None`.
    pub stream: Option<StreamConfig>,
    /// Answer QMP commands on `<prefix>.<vm>.execute`.
    pub commands: bool,
    /// Which commands, as for a listener.
    pub policy: Policy,
}

/// How qmpmux authenticates to NATS.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum NatsAuth {
    #[default]
    None,
    /// A `.creds` file (JWT and nkey seed).
    Credentials(PathBuf),
    /// A file holding an nkey seed (`SU...`).
    NkeyFile(PathBuf),
    Token(String),
    UserPassword {
        user: String,
        password: String,
    },
}

impl std::fmt::Debug for NatsAuth {
    /// Secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsAuth::None => f.write_str("None"),
            NatsAuth::Credentials(p) => f.debug_tuple("Credentials").field(p).finish(),
            NatsAuth::NkeyFile(p) => f.debug_tuple("NkeyFile").field(p).finish(),
            NatsAuth::Token(_) => f.write_str("Token(***)"),
            NatsAuth::UserPassword { user, .. } => write!(f, "UserPassword {{ user: {user:?}, password: *** }}"),
        }
    }
}

/// The JetStream stream for events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    pub name: String,
    /// Retention: the first limit reached drops the oldest messages.
    pub max_age: Option<Duration>,
    pub max_msgs: Option<i64>,
    pub max_bytes: Option<i64>,
    pub replicas: usize,
    /// How long JetStream remembers message ids, so that a retried publish
    /// is stored once.
    pub duplicate_window: Duration,
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
    /// Events kept per VM for consumers that resume (`__org.qmpmux_subscribe`
    /// with `since`); 0 keeps none (events are still numbered).
    pub event_history: usize,
    /// Bytes of events kept per VM, at most (the newest event is always kept).
    pub event_history_bytes: usize,
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
    /// Commands other clients may still run while one client holds the
    /// VM's lease, besides `query-*` (patterns as for `allow`).
    pub lease_exempt: Vec<Glob>,
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
    /// Programs run when events happen (`[[vm.on_event]]`).
    pub on_event: Vec<OnEvent>,
    /// Commands qmpmux sends each time it (re)connects to QEMU, before
    /// clients see the session running (`[[vm.on_connect]]`).
    pub on_connect: Vec<OnConnect>,
}

/// `[[vm.on_event]]`: run a program (no shell) when an event matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnEvent {
    /// A pattern as for `allow`; `upstream_lost` and `upstream_restored`
    /// name qmpmux's own `__org.qmpmux_UPSTREAM_LOST` / `_RESTORED`.
    pub event: Glob,
    /// The program and its arguments; `{vm}`, `{event}` and `{seq}` in them
    /// are replaced.
    pub run: Vec<String>,
    /// Killed after this long.
    pub timeout: Duration,
}

/// `[[vm.on_connect]]`: one QMP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnConnect {
    pub execute: String,
    /// JSON text of the arguments object.
    pub arguments: Option<String>,
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
    /// The events its clients receive (patterns as for `allow`); `None`:
    /// every event.
    pub events: Option<Arc<[Glob]>>,
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
            on_event: Vec::new(),
            on_connect: Vec::new(),
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
            events: None,
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
            log_keep: None,
            socket: SocketPerms::default(),
            control_socket: None,
            metrics_listen: None,
            threads: 0,
            upstream: UpstreamOptions::default(),
            client: ClientOptions::default(),
            vms: Vec::new(),
            nats: None,
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
            event_history: 1000,
            event_history_bytes: 1 << 20,
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
            lease_exempt: Vec::new(),
        }
    }
}

/// The control socket a configuration file names, read from its top-level
/// `control_socket` and `socket_dir` alone: for reaching the daemon when the
/// rest of the file is invalid. `None` when it cannot be read as TOML or the
/// control socket is turned off (`""`).
pub fn control_socket_of(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    let table: toml::Table = toml::from_str(&text).ok()?;
    match table.get("control_socket") {
        Some(toml::Value::String(p)) if p.is_empty() => None,
        Some(toml::Value::String(p)) => Some(PathBuf::from(p)),
        _ => {
            let dir = match table.get("socket_dir") {
                Some(toml::Value::String(d)) => PathBuf::from(d),
                _ => PathBuf::from(DEFAULT_DIR),
            };
            Some(dir.join("qmpmux.ctl"))
        }
    }
}

impl Config {
    /// The settings that differ in `new` but are read only at start: a
    /// reload leaves them as they are (and says so).
    pub fn need_restart(&self, new: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut check = |name, differs: bool| {
            if differs {
                changed.push(name);
            }
        };
        check("log_level", self.log_level != new.log_level);
        check("log_format", self.log_format != new.log_format);
        check("log_file", self.log_file != new.log_file);
        check("log_rotation", self.log_rotation != new.log_rotation);
        check("log_keep", self.log_keep != new.log_keep);
        check("control_socket", self.control_socket != new.control_socket);
        check("metrics_listen", self.metrics_listen != new.metrics_listen);
        check("threads", self.threads != new.threads);
        changed
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Path::new("test.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_reload_names_the_settings_read_only_at_start() {
        let old = load("").unwrap();
        let new = load("metrics_listen = \"127.0.0.1:9100\"\nthreads = 3\nlog_level = \"debug\"\n").unwrap();
        assert_eq!(old.need_restart(&new), ["log_level", "metrics_listen", "threads"]);
        assert!(old.need_restart(&old.clone()).is_empty());
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
        for bad in ["inf", "", "qmpmux", "info,qmpmux=verbose", "=debug", "warning"] {
            let e = load(&format!("log_level = \"{bad}\"\n")).unwrap_err();
            assert!(
                e.contains("`log_level`") && e.contains("trace, debug, info, warn, error, off"),
                "{bad}: {e}"
            );
        }
        for good in [
            "info",
            "WARN",
            "off",
            "info,qmpmux::upstream=debug",
            "warn,qmpmux::audit=info",
            "qmpmux[vm{vm=a}]=trace",
        ] {
            assert!(load(&format!("log_level = \"{good}\"\n")).is_ok(), "{good}");
        }
        let e = load("log_keep = 0\n").unwrap_err();
        assert!(e.contains("log_keep"), "{e}");
        let e = load("log_keep = 3\nlog_rotation = \"never\"\n").unwrap_err();
        assert!(e.contains("log_keep") && e.contains("never"), "{e}");
        assert_eq!(load("log_keep = 3\n").unwrap().log_keep, Some(3));
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
