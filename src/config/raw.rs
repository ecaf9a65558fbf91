//! The file as written ([`RawConfig`]: serde, unknown keys are errors) and
//! its validation into [`Config`], one table at a time; errors name the
//! field's path (`vm[0].listener[1].path`).

use super::*;
use crate::policy::Glob;
use std::collections::HashSet;

/// The file as written. Unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    log_file: Option<PathBuf>,
    log_rotation: Option<LogRotation>,
    log_keep: Option<usize>,
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
    nats: Option<super::nats::RawNats>,
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
    event_history: Option<usize>,
    event_history_bytes: Option<usize>,
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
    #[serde(default)]
    lease_exempt: Vec<String>,
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
    /// The events the main socket's clients receive; all when absent.
    events: Option<Vec<String>>,
    #[serde(default, rename = "listener")]
    listeners: Vec<RawListener>,
    #[serde(default)]
    on_event: Vec<RawOnEvent>,
    #[serde(default)]
    on_connect: Vec<RawOnConnect>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnEvent {
    event: String,
    run: Vec<String>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOnConnect {
    execute: String,
    arguments: Option<toml::Table>,
}

/// How long an `on_event` program may run by default.
const DEFAULT_ACTION_TIMEOUT: Duration = Duration::from_secs(30);

impl RawOnEvent {
    fn validate(self, at: &dyn Fn(&str) -> String) -> Result<OnEvent, Invalid> {
        let event = match self.event.as_str() {
            "" => return Err(invalid(at("event"), "must not be empty")),
            "upstream_lost" => "__org.qmpmux_UPSTREAM_LOST".to_string(),
            "upstream_restored" => "__org.qmpmux_UPSTREAM_RESTORED".to_string(),
            _ => self.event,
        };
        if self.run.first().is_none_or(|p| !Path::new(p).is_absolute()) {
            return Err(invalid(
                at("run"),
                "must start with the program's absolute path (no shell is used)",
            ));
        }
        Ok(OnEvent {
            event: Glob::new(event),
            run: self.run,
            timeout: ms(self.timeout_ms, DEFAULT_ACTION_TIMEOUT, &at("timeout_ms"))?,
        })
    }
}

impl RawOnConnect {
    fn validate(self, at: &dyn Fn(&str) -> String) -> Result<OnConnect, Invalid> {
        if self.execute.is_empty() {
            return Err(invalid(at("execute"), "must name a QMP command"));
        }
        if self.execute == "qmp_capabilities" {
            return Err(invalid(at("execute"), "qmpmux negotiates capabilities itself"));
        }
        let arguments = self
            .arguments
            .map(|t| serde_json::to_string(&t))
            .transpose()
            .map_err(|e| invalid(at("arguments"), e.to_string()))?;
        Ok(OnConnect {
            execute: self.execute,
            arguments,
        })
    }
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
    events: Option<Vec<String>>,
}

pub(crate) type Invalid = (String, String);

/// An `events` list: non-empty patterns.
fn event_patterns(list: Option<Vec<String>>, field: String) -> Result<Option<Arc<[Glob]>>, Invalid> {
    let Some(list) = list else { return Ok(None) };
    if list.iter().any(|p| p.is_empty()) {
        return Err(invalid(field, "patterns must not be empty"));
    }
    Ok(Some(list.into_iter().map(Glob::new).collect()))
}

pub(super) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
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
    pub(super) fn validate(self) -> Result<Config, Invalid> {
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
        check_log_level(&log_level).map_err(|r| invalid("log_level", r))?;
        if let Some(f) = &self.log_file {
            if f.file_name().is_none() {
                return Err(invalid("log_file", "must name a file"));
            }
        }
        let log_rotation = self.log_rotation.unwrap_or_default();
        match self.log_keep {
            Some(0) => return Err(invalid("log_keep", "must be at least 1")),
            Some(_) if log_rotation == LogRotation::Never => {
                return Err(invalid(
                    "log_keep",
                    "needs a `log_rotation` other than \"never\" (with an external rotation, let it prune)",
                ))
            }
            _ => {}
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
        let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
        let nats = self.nats.map(|n| n.validate(&names)).transpose()?;
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
            log_rotation,
            log_keep: self.log_keep,
            upstream,
            client,
            vms,
            nats,
        })
    }
}

/// Levels `log_level` may name, alone or as `target=LEVEL`.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// `log_level`: comma-separated directives, each a level or `target=level`
/// (`target[span{field=value}]=level` too), the level one of
/// [`LOG_LEVELS`]. Stricter than `EnvFilter`, which takes a bare word such
/// as `inf` for a target name and then logs nothing else.
pub(crate) fn check_log_level(spec: &str) -> Result<(), String> {
    let levels = LOG_LEVELS.join(", ");
    if spec.trim().is_empty() {
        return Err(format!("is empty: use one of {levels}, or `target=level` directives"));
    }
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (target, level) = match directive.rsplit_once('=') {
            Some((t, l)) => (Some(t.trim()), l.trim()),
            None => (None, directive),
        };
        if target == Some("") {
            return Err(format!(
                "{directive:?}: a `target=level` directive needs a target (levels: {levels})"
            ));
        }
        if !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(match target {
                None => format!("{directive:?} is not a level: use one of {levels}, or `target=level`"),
                Some(_) => format!("{directive:?}: {level:?} is not a level (one of {levels})"),
            });
        }
    }
    tracing_subscriber::EnvFilter::try_new(spec).map_err(|e| e.to_string())?;
    Ok(())
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
        let mut main = ListenerConfig::new(
            "main",
            Endpoint::Unix {
                path: listen,
                uids: vm.uids,
                gids: vm.gids,
            },
        );
        main.events = event_patterns(vm.events, at("events"))?;
        let on_event = vm
            .on_event
            .into_iter()
            .enumerate()
            .map(|(j, a)| a.validate(&|f: &str| at(&format!("on_event[{j}].{f}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let on_connect = vm
            .on_connect
            .into_iter()
            .enumerate()
            .map(|(j, c)| c.validate(&|f: &str| at(&format!("on_connect[{j}].{f}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VmConfig {
            name: vm.name,
            upstream: vm.upstream,
            upstream_mode: vm.upstream_mode,
            main,
            listeners,
            listen_reserved_clients: vm.listen_reserved_clients,
            on_event,
            on_connect,
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
            events: event_patterns(l.events, at("events"))?,
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
            event_history: self.event_history.unwrap_or(d.event_history),
            event_history_bytes: match self.event_history_bytes {
                Some(0) => return Err(invalid("upstream.event_history_bytes", "must be greater than 0")),
                v => v.unwrap_or(d.event_history_bytes),
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
            lease_exempt: {
                if self.lease_exempt.iter().any(|p| p.is_empty()) {
                    return Err(invalid("client.lease_exempt", "patterns must not be empty"));
                }
                self.lease_exempt.into_iter().map(Glob::new).collect()
            },
        })
    }
}
