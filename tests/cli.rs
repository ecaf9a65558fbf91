//! The command line as packagers and operators use it: the version names
//! the commit, and the man page and completions come from the binary.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qmpmux")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn version_names_the_commit() {
    let v = run(&["--version"]);
    let git = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let hash = String::from_utf8_lossy(&git.stdout).trim().to_owned();
    assert!(
        v.starts_with(&format!("qmpmux {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    if git.status.success() {
        assert!(v.contains(&hash), "{v} does not name {hash}");
    }
}

#[test]
fn man_page_and_completions_are_generated() {
    let man = run(&["generate", "man"]);
    assert!(man.contains(".TH qmpmux 1"), "{}", &man[..man.len().min(300)]);
    for option in ["check\\-config", "demo", "status"] {
        assert!(man.contains(option), "man page lacks {option}");
    }
    let bash = run(&["generate", "completions", "bash"]);
    assert!(bash.contains("_qmpmux()") && bash.contains("--check-config"), "{bash}");
    let zsh = run(&["generate", "completions", "zsh"]);
    assert!(zsh.starts_with("#compdef qmpmux"), "{}", &zsh[..zsh.len().min(100)]);
}

/// Every page qmpmux(1) refers to is made with it (the package installs
/// them all), and it has the sections of a daemon's page.
#[test]
fn man_pages_cover_every_reference_and_the_daemon_s_sections() {
    let dir = tempfile::tempdir().unwrap();
    run(&["generate", "man", "--dir", dir.path().to_str().unwrap()]);
    let main = std::fs::read_to_string(dir.path().join("qmpmux.1")).unwrap();
    for section in ["FILES", "SIGNALS", "\"EXIT STATUS\"", "ENVIRONMENT", "\"SEE ALSO\""] {
        assert!(main.contains(&format!("\n.SH {section}\n")), "no {section} in qmpmux.1");
    }
    let mut referred = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for (at, _) in text.match_indices("(1)") {
            let start = text[..at].rfind(|c: char| c.is_whitespace()).map_or(0, |i| i + 1);
            let name = text[start..at].replace('\\', "");
            if name.starts_with("qmpmux") {
                referred.push(name);
            }
        }
    }
    assert!(referred.iter().any(|n| n == "qmpmux-reload"), "{referred:?}");
    for name in referred {
        assert!(
            dir.path().join(format!("{name}.1")).exists(),
            "{name}(1) is referred to but not made"
        );
    }
    assert!(!main.contains("qmpmux\\-help"), "a help subcommand page is referred to");
}

/// A configuration with NATS authentication `auth`, written at `mode`.
fn nats_config(dir: &std::path::Path, auth: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("qmpmux.toml");
    let text = format!(
        "control_socket = \"{0}/qmpmux.ctl\"\n\
         [[vm]]\nname = \"vm\"\nupstream = \"{0}/q.sock\"\nlisten = \"{0}/vm.sock\"\n\
         [nats]\nservers = [\"nats://127.0.0.1:1\"]\nhost = \"h\"\n{auth}\n",
        dir.display()
    );
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// `--check-config` on `path`: it must pass; its standard error.
fn check_config(path: &std::path::Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_qmpmux"))
        .arg("--check-config")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

#[test]
fn check_config_warns_of_nats_secrets_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "token = \"s3cr3t-token\"";
    let path = nats_config(dir.path(), secret, 0o644);
    let warning = check_config(&path);
    // The file, its mode, the setting and the fix; never the secret.
    for part in [
        &path.display().to_string(),
        "holds NATS secrets (nats.token)",
        "mode 0644",
        "its group and others",
        &format!("chmod go-rwx {}", path.display()),
    ] {
        assert!(warning.contains(part), "{part:?} not in {warning:?}");
    }
    assert!(!warning.contains("s3cr3t"), "{warning}");
    let path = nats_config(dir.path(), "user = \"u\"\npassword = \"pw\"", 0o640);
    let warning = check_config(&path);
    assert!(
        warning.contains("(nats.password)") && warning.contains("mode 0640 lets its group"),
        "{warning}"
    );
    // Readable by its owner alone, or no secret in it: nothing to say.
    let path = nats_config(dir.path(), secret, 0o600);
    assert_eq!(check_config(&path), "");
    let path = nats_config(dir.path(), "nkey_file = \"/etc/qmpmux/nats.nk\"", 0o644);
    assert_eq!(check_config(&path), "");
}

#[test]
fn start_warns_of_nats_secrets_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = nats_config(dir.path(), "token = \"s3cr3t-token\"", 0o604);
    let log = dir.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qmpmux"))
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("holds NATS secrets") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    let line = text
        .lines()
        .find(|l| l.contains("holds NATS secrets"))
        .unwrap_or_else(|| panic!("no warning in {text:?}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(
        line.contains("mode 0604 lets others read") && line.contains(&path.display().to_string()),
        "{line}"
    );
}
