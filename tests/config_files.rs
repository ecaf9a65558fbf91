//! The shipped example configurations: every `*.toml` under `config/` loads;
//! `full.toml` really sets every option (each differs from what
//! `minimal.toml` gets by default, so each was read); and every key that
//! `qmpmux.toml`, the commented reference, mentions is set in `full.toml`.

use qmpmux::config::{Config, Endpoint, LogFormat, LogRotation, NatsAuth, UpstreamMode};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

fn load(name: &str) -> Config {
    Config::load(&config_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_shipped_config_loads() {
    let mut files = Vec::new();
    toml_files(&config_dir(), &mut files);
    files.sort();
    assert!(files.len() >= 3, "expected at least 3 config files, found {files:?}");
    for path in &files {
        if let Err(e) = Config::load(path) {
            panic!("{}: {e}", path.display());
        }
    }
    for name in ["qmpmux.toml", "full.toml", "minimal.toml"] {
        assert!(files.contains(&config_dir().join(name)), "config/{name} is missing");
    }
}

#[test]
fn minimal_is_one_vm_and_nothing_else() {
    let text = std::fs::read_to_string(config_dir().join("minimal.toml")).unwrap();
    let c = Config::from_toml(&text, Path::new("minimal.toml")).unwrap();
    assert_eq!(c.vms.len(), 1);
    assert!(c.vms[0].listeners.is_empty());
    let keys = keys_of(&text);
    assert_eq!(
        keys,
        ["listen", "name", "upstream", "vm"].map(String::from).into(),
        "minimal.toml should set only one VM's name, upstream and listen"
    );
}

#[test]
fn full_sets_every_option_to_something_read() {
    let text = std::fs::read_to_string(config_dir().join("minimal.toml")).unwrap();
    let d = Config::from_toml(&text, Path::new("minimal.toml")).unwrap();
    let f = load("full.toml");

    // Top level.
    assert_ne!(f.log_level, d.log_level);
    assert_eq!(f.log_level, "info,qmpmux::upstream=debug");
    assert_eq!((d.log_format, f.log_format), (LogFormat::Text, LogFormat::Json));
    assert_eq!(d.log_file, None);
    assert_eq!(f.log_file.as_deref(), Some(Path::new("/var/log/qmpmux/qmpmux.log")));
    assert_eq!(
        (d.log_rotation, f.log_rotation),
        (LogRotation::Daily, LogRotation::Hourly)
    );
    assert_eq!((d.log_keep, f.log_keep), (None, Some(48)));
    assert_ne!(f.control_socket, d.control_socket);
    assert_eq!(f.control_socket.as_deref(), Some(Path::new("/run/qmpmux/control.sock")));
    assert_eq!(d.metrics_listen, None);
    assert_eq!(f.metrics_listen, Some("127.0.0.1:9187".parse().unwrap()));
    assert_eq!((d.socket.mode, f.socket.mode), (0o660, 0o600));
    assert_eq!((d.socket.uid, f.socket.uid), (None, Some(0)), "socket_owner = \"root\"");
    assert_eq!((d.socket.gid, f.socket.gid), (None, Some(0)), "socket_group = \"0\"");
    assert_eq!((d.threads, f.threads), (0, 3));

    // [upstream]: every field differs.
    let (du, fu) = (&d.upstream, &f.upstream);
    assert_ne!(fu.connect_timeout, du.connect_timeout);
    assert_ne!(fu.greeting_timeout, du.greeting_timeout);
    assert_eq!(
        (du.command_timeout, fu.command_timeout),
        (None, Some(Duration::from_secs(30)))
    );
    assert_eq!((du.proxy_events, fu.proxy_events), (false, true));
    assert_ne!(fu.backoff.initial, du.backoff.initial);
    assert_ne!(fu.backoff.max, du.backoff.max);
    assert_ne!(fu.backoff.multiplier, du.backoff.multiplier);
    assert_ne!(fu.backoff.jitter, du.backoff.jitter);
    assert_eq!((du.event_history, fu.event_history), (1000, 5000));
    assert_eq!((du.event_history_bytes, fu.event_history_bytes), (1 << 20, 4 << 20));

    // [client]: every field differs.
    let (dc, fc) = (&d.client, &f.client);
    assert_ne!(fc.greeting_wait, dc.greeting_wait);
    assert_ne!(fc.max_message_bytes, dc.max_message_bytes);
    assert_ne!(fc.max_depth, dc.max_depth);
    assert_ne!(fc.max_in_flight, dc.max_in_flight);
    assert_ne!(fc.max_queue_bytes, dc.max_queue_bytes);
    assert_ne!(fc.max_clients, dc.max_clients);
    assert_eq!(
        (dc.max_ahead, fc.max_ahead),
        (Duration::from_micros(500), Duration::from_millis(2))
    );
    assert_eq!((dc.max_pending_bytes, fc.max_pending_bytes), (1 << 20, 512 << 10));
    assert_eq!((dc.max_reply_bytes, fc.max_reply_bytes), (64 << 20, 8 << 20));
    assert!(dc.lease_exempt.is_empty());
    assert_eq!(fc.lease_exempt, [qmpmux::policy::Glob::new("human-monitor-command")]);

    // [[vm]] and [[vm.listener]].
    assert_eq!(f.vms.len(), 2);
    let web = &f.vms[0];
    assert_eq!(web.name, "web01");
    assert_eq!(web.upstream_mode, UpstreamMode::Connect);
    assert_eq!(web.listen(), Path::new("/run/qmpmux/web01.sock"));
    // The main socket is listener 0: full control, its peers restricted by
    // [[vm]] uids/gids.
    assert_eq!(web.main.name, "main");
    assert!(web.main.policy.allow.is_empty() && web.main.policy.deny.is_empty());
    assert!(web.main.admits(0, 12345) && !web.main.admits(12345, 12345));
    let main_events: Vec<&str> = web
        .main
        .events
        .iter()
        .flat_map(|e| e.iter())
        .map(|g| g.as_str())
        .collect();
    assert_eq!(main_events, ["*"]);
    // Actions: an event pattern, `upstream_lost` as qmpmux's own event.
    assert_eq!(web.on_event.len(), 2);
    assert_eq!(web.on_event[0].event.as_str(), "SHUTDOWN");
    assert_eq!(web.on_event[0].run, ["/usr/local/libexec/vm-cleanup", "--vm", "{vm}"]);
    assert_eq!(web.on_event[0].timeout, Duration::from_secs(10));
    assert_eq!(web.on_event[1].event.as_str(), "__org.qmpmux_UPSTREAM_LOST");
    assert_eq!(web.on_event[1].timeout, Duration::from_secs(30));
    assert_eq!(web.on_connect.len(), 1);
    assert_eq!(web.on_connect[0].execute, "migrate-set-capabilities");
    let args: serde_json::Value = serde_json::from_str(web.on_connect[0].arguments.as_deref().unwrap()).unwrap();
    assert_eq!(
        args,
        serde_json::json!({"capabilities": [{"capability": "events", "state": true}]})
    );
    assert_eq!(web.listeners.len(), 4);
    let ro = &web.listeners[0];
    assert_eq!(
        (ro.name.as_str(), ro.endpoint.path()),
        ("monitoring", Some(Path::new("/run/qmpmux/web01-ro.sock")))
    );
    let allow: Vec<&str> = ro.policy.allow.iter().map(|g| g.as_str()).collect();
    assert_eq!(allow, ["query-*"]);
    let events: Vec<&str> = ro.events.iter().flat_map(|e| e.iter()).map(|g| g.as_str()).collect();
    assert_eq!(events, ["STOP", "RESUME", "JOB_*", "BLOCK_JOB_*"]);
    assert!(ro.policy.deny.is_empty() && ro.endpoint == Endpoint::unix("/run/qmpmux/web01-ro.sock"));
    assert!(ro.policy.check("query-status", None).is_ok());
    assert!(ro.policy.check("quit", None).is_err());
    let ops = &web.listeners[1];
    assert_eq!(ops.name, "ops");
    let deny: Vec<&str> = ops.policy.deny.iter().map(|g| g.as_str()).collect();
    assert_eq!(deny, ["system_reset"]);
    let Endpoint::Unix { uids, gids, .. } = &ops.endpoint else {
        panic!("ops is a unix socket")
    };
    assert_eq!((uids.as_slice(), gids.as_slice()), (&[0][..], &[0][..]));
    assert!(ops.policy.check("system_powerdown", None).is_ok());
    assert!(ops.policy.check("system_reset", None).is_err());
    assert!(ops.admits(0, 12345) && ops.admits(12345, 0) && !ops.admits(12345, 12345));

    let tls = &web.listeners[2];
    assert_eq!(tls.name, "orchestrator");
    let Endpoint::Tcp { addr, tls: files, .. } = &tls.endpoint else {
        panic!("a TCP listener")
    };
    assert_eq!(*addr, "192.0.2.10:4444".parse().unwrap());
    let files = files.as_ref().expect("mutual TLS");
    assert_eq!(files.cert, Path::new("/etc/qmpmux/tls/server.pem"));
    assert_eq!(files.key, Path::new("/etc/qmpmux/tls/server.key"));
    assert_eq!(files.client_ca, Path::new("/etc/qmpmux/tls/clients-ca.pem"));
    let subjects: Vec<&str> = tls.subjects().iter().map(|g| g.as_str()).collect();
    assert_eq!(subjects, ["CN=orchestrator, O=Example"]);
    assert_eq!(tls.max_clients, Some(16));
    assert_eq!((web.listen_reserved_clients, web.listener_share(256)), (Some(32), 224));
    let plain = &web.listeners[3];
    let Endpoint::Tcp { addr, tls, .. } = &plain.endpoint else {
        panic!("a TCP listener")
    };
    assert_eq!((*addr, tls.is_none()), ("127.0.0.1:4445".parse().unwrap(), true));

    // [nats].
    assert_eq!(d.nats, None);
    let n = f.nats.as_ref().expect("[nats]");
    assert_eq!(n.servers, ["nats://10.0.0.5:4222", "nats://10.0.0.6:4222"]);
    assert_eq!(
        n.auth,
        NatsAuth::UserPassword {
            user: "qmpmux".into(),
            password: "s3cret".into()
        }
    );
    assert!(!format!("{:?}", n.auth).contains("s3cret"), "secrets stay out of Debug");
    assert_eq!(n.tls_ca.as_deref(), Some(Path::new("/etc/qmpmux/nats-ca.pem")));
    assert_eq!(n.tls_cert.as_deref(), Some(Path::new("/etc/qmpmux/nats-client.pem")));
    assert_eq!(n.tls_key.as_deref(), Some(Path::new("/etc/qmpmux/nats-client.key")));
    assert!(n.tls_required && n.commands);
    assert_eq!((n.host.as_str(), n.prefix.as_str()), ("hv01", "fleet.eu1.hv01"));
    let st = n.stream.as_ref().unwrap();
    assert_eq!(st.name, "QMPMUX");
    assert_eq!(st.max_age, Some(Duration::from_secs(604800)));
    assert_eq!(
        (st.max_msgs, st.max_bytes, st.replicas),
        (Some(1000000), Some(1 << 30), 3)
    );
    assert_eq!(st.duplicate_window, Duration::from_secs(300));
    assert!(n.policy.check("stop", None).is_ok() && n.policy.check("quit", None).is_err());

    let db = &f.vms[1];
    assert_eq!(db.name, "db01");
    assert_eq!(db.upstream_mode, UpstreamMode::Accept);
    assert_eq!(db.upstream, Path::new("/run/qmpmux/qemu/db01.sock"));
    // No `listen`: derived from socket_dir, which shows socket_dir was read.
    assert_eq!(db.listen(), Path::new("/run/qmpmux/db01.sock"));
}

/// Key names on lines of the form `key = ...` or `# key = ...`
/// (`^#? *([a-z_]+) *=`).
fn mentioned_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let rest = line.strip_prefix('#').unwrap_or(line).trim_start_matches(' ');
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(rest.len());
        if end > 0 && rest[end..].trim_start_matches(' ').starts_with('=') {
            keys.insert(rest[..end].to_string());
        }
    }
    keys
}

/// Every key set anywhere in a TOML document, tables and arrays of tables
/// included; not inside `arguments` (a QMP command's, not qmpmux's).
fn keys_of(text: &str) -> BTreeSet<String> {
    fn walk(v: &toml::Value, out: &mut BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    out.insert(k.clone());
                    if k != "arguments" {
                        walk(v, out);
                    }
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let doc: toml::Value = toml::from_str(text).unwrap();
    let mut out = BTreeSet::new();
    walk(&doc, &mut out);
    out
}

#[test]
fn full_sets_every_key_the_reference_mentions() {
    let reference = std::fs::read_to_string(config_dir().join("qmpmux.toml")).unwrap();
    let full = std::fs::read_to_string(config_dir().join("full.toml")).unwrap();
    let mentioned = mentioned_keys(&reference);
    // The scan itself must find the commented-out ones too.
    for k in [
        "log_level",
        "command_timeout_ms",
        "socket_owner",
        "log_file",
        "max_clients",
    ] {
        assert!(mentioned.contains(k), "scan of qmpmux.toml missed {k}: {mentioned:?}");
    }
    let set = keys_of(&full);
    // Ways to authenticate to NATS that exclude each other: full.toml sets
    // user and password; `nats_auth_alternatives_load` reads the others.
    let alternatives = ["credentials", "nkey_file", "token"];
    let missing: Vec<&String> = mentioned
        .iter()
        .filter(|k| !set.contains(*k) && !alternatives.contains(&k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "keys in qmpmux.toml but not set in full.toml: {missing:?}"
    );
    // And the reference mentions every key full.toml sets (table names aside).
    let tables = ["upstream", "client", "vm", "listener", "on_event", "on_connect", "nats"];
    let unmentioned: Vec<&String> = set
        .iter()
        .filter(|k| !mentioned.contains(*k) && !tables.contains(&k.as_str()))
        .collect();
    assert!(
        unmentioned.is_empty(),
        "keys in full.toml not mentioned in qmpmux.toml: {unmentioned:?}"
    );
}

#[test]
fn key_scan_reads_plain_and_commented_lines() {
    let keys = mentioned_keys("a_b = 1\n# c = 2\n#d=3\n  # e = 4\n# F = 5\n# g h = 6\n# i == 7\n[t]\n");
    assert_eq!(keys, ["a_b", "c", "d", "i"].map(String::from).into());
}

fn nats_toml(nats: &str, vm: &str) -> Result<Config, String> {
    let text =
        format!("[[vm]]\nname = \"{vm}\"\nupstream = \"/tmp/q.sock\"\nlisten = \"/tmp/l.sock\"\n[nats]\n{nats}\n");
    Config::from_toml(&text, Path::new("t.toml")).map_err(|e| e.to_string())
}

#[test]
fn nats_auth_alternatives_load() {
    let auth = |extra: &str| {
        nats_toml(&format!("servers = [\"nats://h:4222\"]\nhost = \"h\"\n{extra}"), "vm").map(|c| c.nats.unwrap().auth)
    };
    assert_eq!(auth(""), Ok(NatsAuth::None));
    assert_eq!(
        auth("credentials = \"/etc/q.creds\""),
        Ok(NatsAuth::Credentials("/etc/q.creds".into()))
    );
    assert_eq!(
        auth("nkey_file = \"/etc/q.nk\""),
        Ok(NatsAuth::NkeyFile("/etc/q.nk".into()))
    );
    assert_eq!(auth("token = \"t\""), Ok(NatsAuth::Token("t".into())));
    assert!(auth("token = \"t\"\nuser = \"u\"\npassword = \"p\"").is_err());
    assert!(auth("user = \"u\"")
        .unwrap_err()
        .contains("user and password go together"));
    let c = nats_toml(
        "servers = [\"nats://h:4222\"]\nhost = \"hv7\"\nstream = \"Q_{host}\"",
        "vm",
    )
    .unwrap();
    let n = c.nats.unwrap();
    assert_eq!(n.prefix, "qmpmux.hv7");
    assert_eq!(n.stream.unwrap().name, "Q_hv7");
}

#[test]
fn names_that_cannot_be_subject_tokens_are_rejected() {
    let e = nats_toml("servers = [\"nats://h:4222\"]\nhost = \"h\"", "web.01").unwrap_err();
    assert!(e.contains("vm[0].name") && e.contains("NATS subject token"), "{e}");
    // Without [nats], such a name is fine.
    let text = "[[vm]]\nname = \"web.01\"\nupstream = \"/tmp/q.sock\"\nlisten = \"/tmp/l.sock\"\n";
    assert!(Config::from_toml(text, Path::new("t.toml")).is_ok());
    let e = nats_toml("servers = [\"nats://h:4222\"]\nhost = \"hv01.example.com\"", "vm").unwrap_err();
    assert!(e.contains("nats.host"), "{e}");
    let e = nats_toml("servers = [\"nats://h:4222\"]\nhost = \"h\"\nprefix = \"a.*\"", "vm").unwrap_err();
    assert!(e.contains("nats.prefix"), "{e}");
    assert!(nats_toml("servers = []\nhost = \"h\"", "vm")
        .unwrap_err()
        .contains("nats.servers"));
}
