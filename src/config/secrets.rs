//! NATS secrets written in the configuration file, and a file mode that
//! lets others read them: qmpmux warns, as ssh does for a private key.

use super::{Config, NatsAuth};
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A configuration file holding secrets that its group or others can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExposedSecrets {
    pub path: PathBuf,
    /// The file's permission bits.
    pub mode: u32,
    /// Which settings hold the secrets (`nats.token`, ...), never their values.
    pub fields: Vec<&'static str>,
}

impl Config {
    /// The settings of this configuration that hold secrets in the clear:
    /// `token`, `password`, a server URL with credentials in it. Paths to
    /// a credentials or nkey file are not secrets; those files are guarded
    /// on their own.
    pub fn secret_fields(&self) -> Vec<&'static str> {
        let Some(nats) = &self.nats else { return Vec::new() };
        let mut fields = Vec::new();
        match nats.auth {
            NatsAuth::Token(_) => fields.push("nats.token"),
            NatsAuth::UserPassword { .. } => fields.push("nats.password"),
            NatsAuth::None | NatsAuth::Credentials(_) | NatsAuth::NkeyFile(_) => {}
        }
        if nats.servers.iter().any(|s| has_userinfo(s)) {
            fields.push("nats.servers");
        }
        fields
    }

    /// Whether the file this configuration was read from, `path`, holds
    /// secrets and can be read by its group or others. A file that cannot
    /// be inspected is not reported (it was just read).
    pub fn exposed_secrets(&self, path: &Path) -> Option<ExposedSecrets> {
        let fields = self.secret_fields();
        if fields.is_empty() {
            return None;
        }
        let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
        (mode & 0o044 != 0).then(|| ExposedSecrets {
            path: path.to_owned(),
            mode,
            fields,
        })
    }
}

/// `nats://user:pass@host` or `tls://token@host`: credentials in the URL.
fn has_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    authority.contains('@')
}

impl fmt::Display for ExposedSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match (self.mode & 0o040 != 0, self.mode & 0o004 != 0) {
            (true, true) => "its group and others",
            (true, false) => "its group",
            _ => "others",
        };
        let path = shell_word(&self.path.display().to_string());
        write!(
            f,
            "{path} holds NATS secrets ({}) and its mode {:04o} lets {who} read them: \
             run `chmod go-rwx {path}`, or keep the secret in a `credentials` or `nkey_file` \
             readable by qmpmux alone",
            self.fields.join(", "),
            self.mode
        )
    }
}

/// `s` as one shell word, quoted only when it needs to be.
fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+,:@%=".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(nats: &str) -> Config {
        let text = format!(
            "[[vm]]\nname = \"vm\"\nupstream = \"/tmp/q.sock\"\nlisten = \"/tmp/l.sock\"\n[nats]\nhost = \"h\"\n{nats}\n"
        );
        Config::from_toml(&text, Path::new("t.toml")).unwrap()
    }

    #[test]
    fn secrets_are_tokens_passwords_and_urls_with_credentials() {
        let servers = "servers = [\"nats://127.0.0.1:4222\"]";
        assert_eq!(
            config(&format!("{servers}\ntoken = \"t\"")).secret_fields(),
            ["nats.token"]
        );
        assert_eq!(
            config(&format!("{servers}\nuser = \"u\"\npassword = \"p\"")).secret_fields(),
            ["nats.password"]
        );
        assert!(config(&format!("{servers}\nnkey_file = \"/etc/q.nk\""))
            .secret_fields()
            .is_empty());
        assert!(config(&format!("{servers}\ncredentials = \"/etc/q.creds\""))
            .secret_fields()
            .is_empty());
        assert_eq!(
            config("servers = [\"nats://a:4222\", \"tls://u:p@b:4222/x\"]").secret_fields(),
            ["nats.servers"]
        );
        // An `@` after the authority is no credential.
        assert!(config("servers = [\"nats://a:4222/x@y\"]").secret_fields().is_empty());
    }

    #[test]
    fn only_group_or_other_read_bits_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.toml");
        std::fs::write(&path, "").unwrap();
        let c = config("servers = [\"nats://a:4222\"]\ntoken = \"s3cr3t\"");
        for (mode, exposed) in [
            (0o600, false),
            (0o620, false),
            (0o640, true),
            (0o604, true),
            (0o644, true),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(c.exposed_secrets(&path).is_some(), exposed, "{mode:o}");
        }
        let e = c.exposed_secrets(&path).unwrap();
        let text = e.to_string();
        assert!(text.contains("0644") && text.contains("its group and others"), "{text}");
        assert!(text.contains(&format!("chmod go-rwx {}", path.display())), "{text}");
        assert!(!text.contains("s3cr3t"), "{text}");
    }

    #[test]
    fn paths_are_quoted_for_the_shell_when_needed() {
        assert_eq!(shell_word("/etc/qmpmux/qmpmux.toml"), "/etc/qmpmux/qmpmux.toml");
        assert_eq!(shell_word("/etc/my conf's.toml"), r"'/etc/my conf'\''s.toml'");
    }
}
