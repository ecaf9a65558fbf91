//! Where `qmpmux fleet` finds NATS and how it authenticates: `--nats` and
//! the credential options, or else `[nats]` of `--config` (so that on a
//! host `qmpmux fleet ls` just works), each option given replacing the
//! file's. The options themselves are applied by the daemon's own code
//! ([`crate::fleet::with_auth`], [`crate::fleet::with_tls`]).

use super::{CliError, FleetError};
use crate::config::{ConfigError, NatsAuth, NatsConfig};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// How `qmpmux fleet` reaches NATS.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "NATS")]
pub struct NatsArgs {
    /// A NATS server's URL (repeat for a cluster). Without it, `servers`
    /// and the rest of --config's [nats] (credentials, TLS) are used, each
    /// replaced by the options given here.
    #[arg(long = "nats", value_name = "URL", global = true)]
    pub servers: Vec<String>,
    /// A `.creds` file (JWT and nkey seed).
    #[arg(long, value_name = "FILE", global = true)]
    pub creds: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    #[arg(long, value_name = "FILE", global = true)]
    pub nkey: Option<PathBuf>,
    /// A user name (with --password).
    #[arg(long, value_name = "NAME", global = true)]
    pub user: Option<String>,
    /// The user's password (better in QMPMUX_NATS_PASSWORD than on a
    /// command line others can read).
    #[arg(
        long,
        value_name = "PASSWORD",
        env = "QMPMUX_NATS_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub password: Option<String>,
    /// A token (better in QMPMUX_NATS_TOKEN).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "QMPMUX_NATS_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
    /// The CA that signed the servers' certificates (else the system's).
    #[arg(long, value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (with --tls-key).
    #[arg(long, value_name = "FILE", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, value_name = "FILE", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Refuse a connection without TLS.
    #[arg(long, global = true)]
    pub tls_required: bool,
    /// The hosts' subject prefixes: `qmpmux.*` is `qmpmux.<host>`, the
    /// default; `*` stands for one token. Hosts are asked on the prefix
    /// without its last token, `.vms` added (`qmpmux.vms`).
    #[arg(long, value_name = "PATTERN", default_value = "qmpmux.*", global = true)]
    pub prefix: String,
}

/// The connection's settings, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub servers: Vec<String>,
    pub auth: NatsAuth,
    pub tls_ca: Option<PathBuf>,
    /// Certificate and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub tls_required: bool,
}

impl NatsArgs {
    /// The settings: the options, and where they are silent `[nats]` of
    /// the configuration `file` (read only without `--nats`).
    pub fn settings(
        &self,
        file: impl FnOnce() -> Result<Option<NatsConfig>, ConfigError>,
    ) -> Result<Settings, CliError> {
        let auth = self.auth()?;
        let client_cert = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => return Err(CliError::Usage("--tls-cert and --tls-key go together".into())),
        };
        if !self.servers.is_empty() {
            return Ok(Settings {
                servers: self.servers.clone(),
                auth: auth.unwrap_or_default(),
                tls_ca: self.tls_ca.clone(),
                client_cert,
                tls_required: self.tls_required,
            });
        }
        let n = match file() {
            Ok(Some(n)) => n,
            Ok(None) => {
                return Err(FleetError::NoServers {
                    why: "the configuration has no [nats] table".into(),
                }
                .into())
            }
            Err(e) => {
                return Err(FleetError::NoServers {
                    why: crate::error::chain(&e),
                }
                .into())
            }
        };
        let file_cert = n.tls_cert.zip(n.tls_key);
        Ok(Settings {
            servers: n.servers,
            auth: auth.unwrap_or(n.auth),
            tls_ca: self.tls_ca.clone().or(n.tls_ca),
            client_cert: client_cert.or(file_cert),
            tls_required: self.tls_required || n.tls_required,
        })
    }

    /// The way to authenticate the options give, if any.
    fn auth(&self) -> Result<Option<NatsAuth>, CliError> {
        let password = match (&self.user, &self.password) {
            (Some(user), Some(password)) => Some(NatsAuth::UserPassword {
                user: user.clone(),
                password: password.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(CliError::Usage(
                    "--user needs --password (or QMPMUX_NATS_PASSWORD)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(CliError::Usage(
                    "--password (or QMPMUX_NATS_PASSWORD) needs --user".into(),
                ))
            }
        };
        let given = [
            self.creds.clone().map(NatsAuth::Credentials),
            self.nkey.clone().map(NatsAuth::NkeyFile),
            self.token.clone().map(NatsAuth::Token),
            password,
        ];
        let mut given = given.into_iter().flatten();
        let auth = given.next();
        if given.next().is_some() {
            return Err(CliError::Usage(
                "give one way to authenticate: --creds, --nkey, --token, or --user and --password".into(),
            ));
        }
        Ok(auth)
    }
}

/// `[nats]` of the configuration file at `path`.
pub fn from_file(path: &Path) -> Result<Option<NatsConfig>, ConfigError> {
    crate::config::Config::load(path).map(|c| c.nats)
}

/// A connection to NATS, with what its server said wrong (a permissions
/// violation reaches the client only this way).
pub struct Nats {
    pub client: async_nats::Client,
    /// The server's error messages, oldest first. (A std Mutex: the event
    /// callback pushes, readers copy; never held across an await.)
    said: Arc<Mutex<Vec<String>>>,
    /// How many times the server said something wrong.
    heard: Arc<tokio::sync::watch::Sender<u64>>,
}

/// How many of the server's messages are kept.
const SAID_KEPT: usize = 16;

impl Nats {
    /// Connects once to the first server of `settings` that answers (no
    /// retrying: a person is waiting); reconnects later by itself.
    pub async fn connect(settings: &Settings) -> Result<Nats, CliError> {
        let said = Arc::new(Mutex::new(Vec::new()));
        let heard = Arc::new(tokio::sync::watch::Sender::new(0));
        let (said_to, heard_to) = (said.clone(), heard.clone());
        let opts = async_nats::ConnectOptions::new()
            .name("qmpmux fleet")
            .connection_timeout(std::time::Duration::from_secs(5))
            .event_callback(move |event| {
                let (said, heard) = (said_to.clone(), heard_to.clone());
                async move { heard_from_server(&said, &heard, event) }
            });
        let opts = crate::fleet::with_auth(opts, &settings.auth)
            .await
            .map_err(FleetError::from)?;
        let cert = settings.client_cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        let opts = crate::fleet::with_tls(opts, settings.tls_ca.as_deref(), cert, settings.tls_required);
        let client = opts
            .connect(settings.servers.clone())
            .await
            .map_err(|e| FleetError::Connect {
                servers: settings.servers.join(", "),
                cause: crate::ops::escape::escaped(&e.to_string()),
                hint: connect_hint(e.kind()),
            })?;
        Ok(Nats { client, said, heard })
    }

    /// Changes whenever the server says something wrong (then see
    /// [`Nats::said_about`]).
    pub fn refusals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.heard.subscribe()
    }

    /// What the server said about `subject` (a permissions violation names
    /// it in quotes), if anything; escaped.
    pub fn said_about(&self, subject: &str) -> Option<String> {
        let quoted = format!("\"{subject}\"");
        let said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        said.iter()
            .rev()
            .find(|s| s.contains(&quoted))
            .map(|s| crate::ops::escape::escaped(s))
    }

    /// What the server said last, as `" (the NATS server said: ...)"`, or
    /// nothing.
    pub fn said_last(&self) -> String {
        let said = self.said.lock().unwrap_or_else(|p| p.into_inner());
        said.last()
            .map(|s| format!(" (the NATS server said: {})", crate::ops::escape::escaped(s)))
            .unwrap_or_default()
    }

    /// A failure of `what` on this connection.
    pub fn failed(&self, what: impl Into<String>, cause: impl std::fmt::Display) -> CliError {
        FleetError::Nats {
            what: what.into(),
            cause: crate::ops::escape::escaped(&cause.to_string()),
            server_said: self.said_last(),
        }
        .into()
    }
}

fn heard_from_server(said: &Mutex<Vec<String>>, heard: &tokio::sync::watch::Sender<u64>, event: async_nats::Event) {
    match event {
        async_nats::Event::ServerError(e) => {
            {
                let mut said = said.lock().unwrap_or_else(|p| p.into_inner());
                if said.len() == SAID_KEPT {
                    said.remove(0);
                }
                said.push(e.to_string());
            }
            heard.send_modify(|n| *n += 1);
        }
        async_nats::Event::Disconnected => eprintln!("qmpmux: disconnected from NATS; reconnecting"),
        _ => {}
    }
}

fn connect_hint(kind: async_nats::ConnectErrorKind) -> &'static str {
    use async_nats::ConnectErrorKind as K;
    match kind {
        K::AuthorizationViolation | K::Authentication => {
            " (the server refused these credentials: --creds, --nkey, --token, --user, or [nats] of --config)"
        }
        K::Tls => {
            " (the TLS handshake failed: is the server's certificate signed by --tls-ca (or a system CA), for the name in the URL, and does the server accept --tls-cert?)"
        }
        K::ServerParse => " (not a NATS URL: nats://HOST:PORT or tls://HOST:PORT)",
        _ => " (is a NATS server listening there?)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> NatsArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            nats: NatsArgs,
        }
        Cli::try_parse_from(std::iter::once("x").chain(words.iter().copied()))
            .unwrap()
            .nats
    }

    fn file_nats() -> NatsConfig {
        crate::config::Config::from_toml(
            "[nats]\nservers = [\"nats://a:4222\", \"nats://b:4222\"]\nhost = \"hv1\"\ncredentials = \"/etc/q.creds\"\ntls_ca = \"/etc/ca.pem\"\n",
            Path::new("t.toml"),
        )
        .unwrap()
        .nats
        .unwrap()
    }

    #[test]
    fn without_nats_the_file_s_settings_apply_each_option_replacing_its_own() {
        let s = args(&[]).settings(|| Ok(Some(file_nats()))).unwrap();
        assert_eq!(s.servers, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(s.auth, NatsAuth::Credentials("/etc/q.creds".into()));
        assert_eq!(s.tls_ca, Some(PathBuf::from("/etc/ca.pem")));
        let s = args(&["--token", "t", "--tls-required"])
            .settings(|| Ok(Some(file_nats())))
            .unwrap();
        assert_eq!(s.auth, NatsAuth::Token("t".into()));
        assert!(s.tls_required);
        assert_eq!(s.servers.len(), 2);
    }

    #[test]
    fn with_nats_the_file_is_not_read() {
        let s = args(&[
            "--nats",
            "nats://x:1",
            "--nats",
            "nats://y:2",
            "--user",
            "u",
            "--password",
            "p",
        ])
        .settings(|| panic!("read"))
        .unwrap();
        assert_eq!(s.servers, ["nats://x:1", "nats://y:2"]);
        assert_eq!(
            s.auth,
            NatsAuth::UserPassword {
                user: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(s.tls_ca, None);
    }

    #[test]
    fn mistakes_are_named() {
        let no = |w: &[&str]| args(w).settings(|| Ok(None)).unwrap_err().to_string();
        assert!(no(&[]).contains("no [nats] table"), "{}", no(&[]));
        assert!(no(&["--nats", "n", "--user", "u"]).contains("--user needs --password"));
        assert!(no(&["--nats", "n", "--token", "t", "--creds", "c"]).contains("one way to authenticate"));
        assert!(no(&["--nats", "n", "--tls-cert", "c"]).contains("go together"));
        let e = args(&[])
            .settings(|| from_file(Path::new("/nonexistent/qmpmux.toml")))
            .unwrap_err();
        assert_eq!(e.exit_code(), crate::cli::exit::USAGE);
        assert!(
            e.to_string().contains("give --nats URL") && e.to_string().contains("/nonexistent/qmpmux.toml"),
            "{e}"
        );
    }
}
