//! A real terminal for interactive commands (`qmpmux shell`): a tmux
//! server of the test's own (its socket in the test's directory, no user
//! configuration), one detached session of a fixed size running one
//! command. Keys go in with `send-keys`, the screen comes out with
//! `capture-pane`; tests poll the screen until what they expect is there.
//! The server (and what runs in it) is killed on drop.
//!
//! `.ci/run` installs tmux. Under CI a missing one fails the test;
//! elsewhere [`tmux_or_skip`] says so and the test passes without it.

use super::STEP;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Whether tmux runs here; panics under CI if it does not.
pub fn tmux_or_skip() -> bool {
    let ok = Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok || !super::nats::in_ci(),
        "CI is set but there is no tmux: `bash .ci/run` installs it (apt-get install tmux)"
    );
    if !ok {
        eprintln!("SKIPPED: no tmux (apt-get install tmux, or run `bash .ci/run`)");
    }
    ok
}

/// Words quoted for `sh`.
pub fn quote(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tmux server with one session.
pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Starts `command` (for `sh -c`) in a 200x50 terminal, with its
    /// socket `dir/NAME.tmux`.
    pub fn start(dir: &Path, name: &str, command: &str) -> Tmux {
        let t = Tmux {
            socket: dir.join(format!("{name}.tmux")),
        };
        t.run(&["-f", "/dev/null", "new-session", "-d", "-x", "200", "-y", "50", command]);
        t
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `text` as it is.
    pub fn type_text(&self, text: &str) {
        self.run(&["send-keys", "-l", text]);
    }

    /// Pastes `text` as a terminal does, bracketed where the program asked
    /// for that.
    pub fn paste(&self, text: &str) {
        self.run(&["set-buffer", "--", text]);
        self.run(&["paste-buffer", "-p", "-d"]);
    }

    /// Presses keys by tmux's names: `Enter`, `Tab`, `Up`, `C-c`, `C-d`.
    pub fn press(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Everything the terminal shows and has scrolled away, wrapped lines
    /// joined, blanks at the ends of lines and screen dropped.
    pub fn screen(&self) -> String {
        let text = self.run(&["capture-pane", "-p", "-J", "-S", "-"]);
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        lines.join("\n").trim_end().to_owned() + "\n"
    }

    /// The last line with anything on it (where the prompt is).
    pub fn last_line(&self) -> String {
        self.screen().lines().last().unwrap_or_default().to_owned()
    }

    /// Waits until `ok` holds for the screen (generously: a loaded
    /// machine); the screen then.
    pub async fn wait(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + 2 * STEP;
        loop {
            let screen = self.screen();
            if ok(&screen) {
                return screen;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{screen}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the screen shows `text`.
    pub async fn wait_for(&self, text: &str) -> String {
        self.wait(&format!("{text:?}"), |s| s.contains(text)).await
    }

    /// Waits until the last line is `line`.
    pub async fn wait_line(&self, line: &str) -> String {
        self.wait(&format!("the last line {line:?}"), |s| {
            s.lines().last().is_some_and(|l| l == line)
        })
        .await
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
