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
