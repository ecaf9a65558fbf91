//! Where `qmpmux shell` keeps each VM's history: in the user's state
//! directory (XDG), one file per VM and mode. Pure but for creating the
//! directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Lines kept per file.
pub const MAX_LINES: usize = 1000;

/// The history file for VM `vm`: `$XDG_STATE_HOME/qmpmux/history/VM`
/// (`hmp-history/VM` in `-H` mode: the lines are of another language),
/// with `~/.local/state` when `XDG_STATE_HOME` is unset, empty or not
/// absolute (as the XDG specification says); `None` without either.
/// `state_home` and `home` are those variables' values.
pub fn path(state_home: Option<OsString>, home: Option<OsString>, vm: &str, hmp: bool) -> Option<PathBuf> {
    let state = match state_home.map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => {
            let home = PathBuf::from(home.filter(|h| !h.is_empty())?);
            home.join(".local").join("state")
        }
    };
    let dir = if hmp { "hmp-history" } else { "history" };
    Some(state.join("qmpmux").join(dir).join(file_name(vm)))
}

/// The history file for VM `vm` from this process's environment.
pub fn from_env(vm: &str, hmp: bool) -> Option<PathBuf> {
    path(std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"), vm, hmp)
}

/// `vm` as one file name: qmpmux's VM names (letters, digits, `-`, `_`,
/// `.`, not first) as they are; any other byte, and a leading dot, as
/// `%XX`, so that no name can reach another directory or file.
pub fn file_name(vm: &str) -> String {
    let mut out = String::with_capacity(vm.len());
    for (i, b) in vm.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

/// Creates the file's directory, readable by the user alone (history
/// can hold what was typed as an argument: a password, a key).
pub fn prepare(file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match file.parent() {
        Some(dir) => std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn under_the_state_directory() {
        assert_eq!(
            path(os("/s"), os("/home/u"), "web01", false),
            Some(PathBuf::from("/s/qmpmux/history/web01"))
        );
        assert_eq!(
            path(None, os("/home/u"), "web01", true),
            Some(PathBuf::from("/home/u/.local/state/qmpmux/hmp-history/web01"))
        );
        // Empty or relative: ignored, as XDG says.
        for bad in ["", "rel/dir"] {
            assert_eq!(
                path(os(bad), os("/home/u"), "a", false),
                Some(PathBuf::from("/home/u/.local/state/qmpmux/history/a"))
            );
        }
        assert_eq!(path(None, None, "a", false), None);
        assert_eq!(path(None, os(""), "a", false), None);
    }

    #[test]
    fn any_name_is_one_file() {
        assert_eq!(file_name("web01.example_a-b"), "web01.example_a-b");
        assert_eq!(file_name(".."), "%2E.");
        assert_eq!(file_name("a/b"), "a%2Fb");
        assert_eq!(file_name("50%"), "50%25");
        assert_eq!(file_name("é"), "%C3%A9");
        assert_eq!(file_name(""), "%");
        for name in ["..", ".", "a/../b", "/", "\n"] {
            let f = file_name(name);
            assert!(!f.contains('/') && f != "." && f != ".." && !f.starts_with('.'), "{f}");
        }
    }
}
