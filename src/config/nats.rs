//! `[nats]` as written, and its validation; subject tokens.

use super::raw::{invalid, Invalid};
use super::{NatsAuth, NatsConfig, StreamConfig};
use crate::policy::{Glob, Policy};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNats {
    servers: Vec<String>,
    credentials: Option<PathBuf>,
    nkey_file: Option<PathBuf>,
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    tls_required: bool,
    host: Option<String>,
    prefix: Option<String>,
    stream: Option<String>,
    stream_max_age_s: Option<u64>,
    stream_max_msgs: Option<i64>,
    stream_max_bytes: Option<i64>,
    stream_replicas: Option<usize>,
    stream_duplicate_window_s: Option<u64>,
    #[serde(default)]
    commands: bool,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// Whether `s` can be one token of a NATS subject: letters, digits, `-`
/// and `_` (NATS allows more, but these are safe everywhere: no `.`, `*`,
/// `>`, whitespace).
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The machine's host name up to its first dot.
fn short_hostname() -> String {
    let name = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    name.split('.').next().unwrap_or_default().to_string()
}

impl RawNats {
    pub(super) fn validate(self, vm_names: &[&str]) -> Result<NatsConfig, Invalid> {
        let n = self;
        if n.servers.is_empty() || n.servers.iter().any(|s| s.trim().is_empty()) {
            return Err(invalid(
                "nats.servers",
                "needs at least one server URL, e.g. \"nats://127.0.0.1:4222\"",
            ));
        }
        let auth = match (n.credentials, n.nkey_file, n.token, n.user, n.password) {
            (None, None, None, None, None) => NatsAuth::None,
            (Some(c), None, None, None, None) => NatsAuth::Credentials(c),
            (None, Some(k), None, None, None) => NatsAuth::NkeyFile(k),
            (None, None, Some(t), None, None) => NatsAuth::Token(t),
            (None, None, None, Some(user), Some(password)) => NatsAuth::UserPassword { user, password },
            (None, None, None, Some(_), None) | (None, None, None, None, Some(_)) => {
                return Err(invalid("nats.user", "user and password go together"))
            }
            _ => {
                return Err(invalid(
                    "nats.credentials",
                    "set one way to authenticate: credentials, nkey_file, token, or user and password",
                ))
            }
        };
        if n.tls_cert.is_some() != n.tls_key.is_some() {
            return Err(invalid("nats.tls_cert", "tls_cert and tls_key go together"));
        }
        let host = match n.host {
            Some(h) => h,
            None => short_hostname(),
        };
        if !is_token(&host) {
            return Err(invalid(
                "nats.host",
                format!("{host:?} cannot be one NATS subject token: use letters, digits, '-' and '_' (set `host`)"),
            ));
        }
        let prefix = n.prefix.unwrap_or_else(|| format!("qmpmux.{host}"));
        if !prefix.split('.').all(is_token) {
            return Err(invalid(
                "nats.prefix",
                format!("{prefix:?}: tokens of letters, digits, '-' and '_', separated by '.'"),
            ));
        }
        for (i, vm) in vm_names.iter().enumerate() {
            if !is_token(vm) {
                return Err(invalid(
                    format!("vm[{i}].name"),
                    format!("{vm:?} cannot be one NATS subject token (with [nats]): use letters, digits, '-' and '_'"),
                ));
            }
        }
        let stream = match n.stream.map(|s| s.replace("{host}", &host)) {
            None => None,
            Some(name) if is_token(&name) => Some(StreamConfig {
                name,
                max_age: n.stream_max_age_s.map(Duration::from_secs),
                max_msgs: n.stream_max_msgs,
                max_bytes: n.stream_max_bytes,
                replicas: n.stream_replicas.unwrap_or(1).max(1),
                duplicate_window: Duration::from_secs(n.stream_duplicate_window_s.unwrap_or(120).max(1)),
            }),
            Some(name) => {
                return Err(invalid(
                    "nats.stream",
                    format!("{name:?}: letters, digits, '-' and '_'"),
                ))
            }
        };
        for (field, list) in [("nats.allow", &n.allow), ("nats.deny", &n.deny)] {
            if list.iter().any(|p| p.is_empty()) {
                return Err(invalid(field, "patterns must not be empty"));
            }
        }
        Ok(NatsConfig {
            servers: n.servers,
            auth,
            tls_ca: n.tls_ca,
            tls_cert: n.tls_cert,
            tls_key: n.tls_key,
            tls_required: n.tls_required,
            host,
            prefix,
            stream,
            commands: n.commands,
            policy: Policy {
                allow: n.allow.into_iter().map(Glob::new).collect(),
                deny: n.deny.into_iter().map(Glob::new).collect(),
            },
        })
    }
}
