//! The binary's logs as an operator meets them: in the journal (priority
//! prefixes, no timestamp), and in `log_file`, reopened on SIGUSR1.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

async fn wait(child: Child) -> ExitStatus {
    let mut child = child;
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A config with one VM whose QEMU is missing (a warning), and `extra`.
fn config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("qmpmux.toml");
    std::fs::write(
        &path,
        format!(
            "control_socket = \"\"\n{extra}\n[[vm]]\nname = \"one\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
            dir.join("missing.sock").display(),
            dir.join("one.sock").display()
        ),
    )
    .unwrap();
    path
}

/// `JOURNAL_STREAM` naming this file, as systemd sets it for the stream it
/// connects to standard output and error.
fn journal_stream(file: &std::fs::File) -> String {
    let meta = file.metadata().unwrap();
    format!("{}:{}", meta.dev(), meta.ino())
}

/// Every line: `<P>LEVEL target: ...`, P matching LEVEL, and no timestamp.
fn assert_journal_lines(text: &str) {
    for line in text.lines() {
        let (p, rest) = line
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .unwrap_or_else(|| panic!("no priority prefix: {line:?}"));
        let level = rest.split(' ').next().unwrap();
        let want = match level {
            "ERROR" => "3",
            "WARN" => "4",
            "INFO" => "6",
            "DEBUG" | "TRACE" => "7",
            _ => panic!("no level after the prefix (a timestamp?): {line:?}"),
        };
        assert_eq!(p, want, "{line:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_lines_carry_their_priority_and_no_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let stream = journal_stream(&out);
    let child = common::binary::command()
        .arg("--config")
        .arg(config(dir.path(), ""))
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", &stream)
        .stdout(out.try_clone().unwrap())
        .spawn()
        .unwrap();
    common::eventually("the warning about QEMU", async || {
        read(&out_path).contains("cannot reach QEMU monitor")
    })
    .await;
    signal(child.id(), libc::SIGTERM);
    assert!(wait(child).await.success());
    let text = read(&out_path);
    assert_journal_lines(&text);
    assert!(
        text.lines()
            .any(|l| l.starts_with("<6>INFO") && l.contains("serving VM")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("<4>WARN") && l.contains("cannot reach QEMU monitor")),
        "{text}"
    );

    // An error: metrics_listen taken. qmpmux serves the VM all the same,
    // and says what it does not serve, and why.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = std::fs::File::create(&out_path).unwrap();
    let extra = format!("metrics_listen = \"{}\"", taken.local_addr().unwrap());
    let child = common::binary::command()
        .arg("--config")
        .arg(config(dir.path(), &extra))
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", journal_stream(&out))
        .stdout(out)
        .spawn()
        .unwrap();
    let metrics_error = |text: &str| {
        text.lines().any(|l| {
            l.starts_with("<3>ERROR")
                && l.contains("without the metrics endpoint")
                && l.contains("cannot listen for metrics")
        })
    };
    common::eventually("the metrics error in the log", async || metrics_error(&read(&out_path))).await;
    assert!(dir.path().join("one.sock").exists(), "the VM is not served");
    signal(child.id(), libc::SIGTERM);
    assert_eq!(wait(child).await.code(), Some(0));
    assert_journal_lines(&read(&out_path));

    // Before logging starts: a bad config file, on standard error.
    let err = std::fs::File::create(dir.path().join("err")).unwrap();
    std::fs::write(dir.path().join("bad.toml"), "log_level = \"inf\"\n").unwrap();
    let child = common::binary::command()
        .arg("--config")
        .arg(dir.path().join("bad.toml"))
        .env("JOURNAL_STREAM", journal_stream(&err))
        .stderr(err)
        .spawn()
        .unwrap();
    assert_eq!(wait(child).await.code(), Some(2));
    let text = read(&dir.path().join("err"));
    assert!(
        text.starts_with("<3>qmpmux: ") && text.contains("`log_level`"),
        "{text}"
    );

    // Elsewhere (JOURNAL_STREAM names another file): no prefix, timestamps.
    let out_path = dir.path().join("elsewhere");
    let out = std::fs::File::create(&out_path).unwrap();
    let child = common::binary::command()
        .arg("--config")
        .arg(config(dir.path(), ""))
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", stream)
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::eventually("the warning about QEMU", async || {
        read(&out_path).contains("cannot reach QEMU monitor")
    })
    .await;
    signal(child.id(), libc::SIGTERM);
    assert!(wait(child).await.success());
    let text = read(&out_path);
    assert!(text.lines().all(|l| l.starts_with("20")), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_log_file_after_logrotate_moved_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("q.log");
    let extra = format!("log_file = \"{}\"\nlog_rotation = \"never\"", log.display());
    let child = common::binary::command()
        .arg("--config")
        .arg(config(dir.path(), &extra))
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    common::eventually("qmpmux to log to its file", async || read(&log).contains("serving VM")).await;

    // logrotate, with `postrotate kill -USR1 ...`:
    std::fs::rename(&log, dir.path().join("q.log.1")).unwrap();
    signal(child.id(), libc::SIGUSR1);
    common::eventually("a new log file", async || read(&log).contains("log file reopened")).await;
    let mut child = child;
    assert!(child.try_wait().unwrap().is_none(), "SIGUSR1 stopped qmpmux");
    assert!(dir.path().join("one.sock").exists());
    // Twice, to be sure the signal stays handled.
    signal(child.id(), libc::SIGUSR1);
    common::eventually("a second reopen", async || {
        read(&log).matches("log file reopened").count() == 2
    })
    .await;

    signal(child.id(), libc::SIGTERM);
    assert!(wait(child).await.success());
    let (old, new) = (read(&dir.path().join("q.log.1")), read(&log));
    assert!(old.contains("serving VM") && !old.contains("stopped"), "{old}");
    assert!(new.contains("stopped") && !new.contains("serving VM"), "{new}");
    assert!(!dir.path().join("one.sock").exists());
}

/// Without `log_file`, SIGUSR1 is harmless too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_without_log_file_does_not_stop_qmpmux() {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let mut child = common::binary::command()
        .arg("--config")
        .arg(config(dir.path(), ""))
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .spawn()
        .unwrap();
    common::eventually("qmpmux to serve", async || dir.path().join("one.sock").exists()).await;
    signal(child.id(), libc::SIGUSR1);
    common::eventually("the SIGUSR1 line", async || {
        read(&out_path).contains("no log_file to reopen")
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "SIGUSR1 stopped qmpmux");
    signal(child.id(), libc::SIGTERM);
    assert!(wait(child).await.success());
}
