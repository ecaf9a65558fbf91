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
