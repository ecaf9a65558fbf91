//! qmpmux's own restarts: a re-execution in place (`SIGUSR2`) keeps the
//! listening sockets (no connection refused), the connection to QEMU (no
//! event lost meanwhile) and the numbered event history, with a new binary
//! file at the path too. Ground truth is QEMU's own second monitor.

mod common;

use common::fdstore::Supervised;
use common::process::{guard_child, log_file};
use common::qemu::Monitor;
use common::{Client, Qemu, STEP};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// qmpmux started from a copy of its binary in `dir/bin` (so that the test
/// can put a new file there), on `config`.
struct Daemon {
    child: Child,
    log: PathBuf,
    exe: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, config: &str) -> Daemon {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let exe = bin.join("qmpmux");
        std::fs::copy(env!("CARGO_BIN_EXE_qmpmux"), &exe).unwrap();
        let config_path = dir.join("qmpmux.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = dir.join("qmpmux.log");
        let mut cmd = Command::new(&exe);
        cmd.arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "qmpmux=info")
            .stdin(Stdio::null())
            .stdout(log_file(&log))
            .stderr(log_file(&log));
        guard_child(&mut cmd, None);
        Daemon {
            child: cmd.spawn().expect("spawn qmpmux"),
            log,
            exe,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn count(&self, what: &str) -> usize {
        self.log().matches(what).count()
    }

    /// A new file at the binary's path (as a package upgrade does: a new
    /// inode renamed into place).
    fn replace_binary(&self) {
        let new = self.exe.with_extension("new");
        std::fs::copy(env!("CARGO_BIN_EXE_qmpmux"), &new).unwrap();
        std::fs::rename(&new, &self.exe).unwrap();
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Sends SIGUSR2 and waits until the new program serves the VM's
    /// connection to QEMU again.
    async fn reexec(&self) {
        let before = self.count("serving the connection to QEMU handed over");
        self.signal(nix::sys::signal::Signal::SIGUSR2);
        let deadline = Instant::now() + STEP;
        while self.count("serving the connection to QEMU handed over") == before {
            assert!(Instant::now() < deadline, "no re-execution; log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Events as their name and QEMU's timestamp (which tells each one apart).
fn key(e: &Value) -> (String, u64, u64) {
    (
        e["event"].as_str().unwrap_or_default().to_string(),
        e["timestamp"]["seconds"].as_u64().unwrap_or_default(),
        e["timestamp"]["microseconds"].as_u64().unwrap_or_default(),
    )
}

/// Makes QEMU emit STOP and RESUME `n` times through its other monitor,
/// recording every event that monitor gets.
async fn stop_cont(truth: &mut Client, n: usize, events: &mut Vec<Value>) {
    for _ in 0..n {
        truth.send(r#"{"execute":"stop"}"#).await;
        truth.send(r#"{"execute":"cont"}"#).await;
    }
    let mut replies = 0;
    while replies < 2 * n {
        let v = truth.recv().await;
        if v.get("event").is_some() {
            events.push(v);
        } else {
            assert!(v.get("return").is_some(), "{v}");
            replies += 1;
        }
    }
}

/// Connects again and again until `stop`, each time reading the greeting;
/// counts the connections, and the failures with what failed.
fn connect_in_a_loop(
    path: PathBuf,
    stop: Arc<AtomicBool>,
    made: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let mut failures = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match tokio::net::UnixStream::connect(&path).await {
                Ok(s) => {
                    let mut c = tokio::io::BufReader::new(s);
                    let mut line = String::new();
                    use tokio::io::AsyncBufReadExt;
                    match tokio::time::timeout(STEP, c.read_line(&mut line)).await {
                        Ok(Ok(n)) if n > 0 && line.contains("\"QMP\"") => {}
                        other => failures.push(format!("no greeting: {other:?} {line:?}")),
                    }
                    made.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => failures.push(format!("connect: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        failures
    })
}

/// Sends `query-status` with ids 0, 1, 2, ... pipelined (up to 16 ahead)
/// until `stop`, checking each reply has the next id; returns how many
/// were answered, or why it failed (a reply out of order, EOF).
fn pipeline(path: PathBuf, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Result<u64, String>> {
    tokio::spawn(async move {
        let mut c = Client::ready(&path).await;
        let (mut sent, mut answered) = (0u64, 0u64);
        loop {
            while sent < answered + 16 && !stop.load(Ordering::SeqCst) {
                c.send(&format!(r#"{{"execute":"query-status","id":{sent}}}"#)).await;
                sent += 1;
            }
            if answered == sent {
                return Ok(answered);
            }
            let Some(line) = c.try_line().await else {
                return Err(format!("EOF after {answered} replies"));
            };
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
            if v.get("event").is_some() {
                continue;
            }
            if v["id"] != json!(answered) || v.get("return").is_none() {
                return Err(format!("reply {answered} expected, got {v}"));
            }
            answered += 1;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reexecution_costs_clients_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let qemu = Qemu::spawn(&[Monitor::Serve(&p("q.sock")), Monitor::Serve(&p("truth.sock"))], None)
        .listening()
        .await;
    let config = format!(
        "control_socket = {:?}\n[[vm]]\nname = \"vm.1\"\nupstream = {:?}\nlisten = {:?}\n",
        p("ctl.sock"),
        p("q.sock"),
        p("vm.sock")
    );
    let daemon = Daemon::start(dir.path(), &config);
    let deadline = Instant::now() + STEP;
    assert!(
        common::ready::wait_greeted_blocking(&p("vm.sock"), deadline, Duration::from_millis(10)),
        "qmpmux did not start; log:\n{}",
        daemon.log()
    );

    // Ground truth: QEMU's other monitor, which also drives the VM.
    let mut truth = Client::ready(&p("truth.sock")).await;
    let mut truth_events = Vec::new();
    // A consumer of numbered events through qmpmux, connected throughout.
    let mut consumer = Client::ready(&p("vm.sock")).await;
    let r = consumer
        .cmd(r#"{"execute":"__org.qmpmux_subscribe","arguments":{"sequence":true},"id":"s"}"#)
        .await;
    assert!(r.get("return").is_some(), "{r}");
    let first_seq = r["return"]["next"].as_u64();
    // A client that pipelines commands throughout, and one that connects
    // again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let connector = connect_in_a_loop(p("vm.sock"), stop.clone(), made.clone());
    let pipeliner = pipeline(p("vm.sock"), stop.clone());

    for round in 0..5 {
        // Events before, during (QEMU emits them while qmpmux re-executes)
        // and after each re-execution.
        stop_cont(&mut truth, 2, &mut truth_events).await;
        if round == 2 {
            daemon.replace_binary();
        }
        let during = stop_cont(&mut truth, 2, &mut truth_events);
        tokio::join!(daemon.reexec(), during);
    }
    stop_cont(&mut truth, 2, &mut truth_events).await;

    // Every event QEMU emitted, through the same connection, numbered
    // without a gap.
    let expected = truth_events.len();
    assert_eq!(expected, 5 * 2 * 4 + 4);
    let mut got = Vec::new();
    while got.len() < expected {
        let Some(line) = consumer.try_line().await else {
            panic!(
                "the consumer was disconnected after {} events; log:\n{}",
                got.len(),
                daemon.log()
            );
        };
        let v: Value = serde_json::from_str(&line).unwrap();
        if v.get("event").is_some() {
            got.push(v);
        }
    }
    let seqs: Vec<u64> = got.iter().map(|e| e["__org.qmpmux_seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "numbers with a gap: {seqs:?}"
    );
    if let Some(first) = first_seq {
        assert_eq!(seqs[0], first, "the first number is the one the subscription announced");
    }
    let through: Vec<_> = got.iter().map(key).collect();
    let direct: Vec<_> = truth_events.iter().map(key).collect();
    assert_eq!(through, direct, "events through qmpmux differ from QEMU's own monitor");
    // Nothing is owed to it after all that.
    consumer.expect_silence(Duration::from_millis(100)).await;
    assert_eq!(
        consumer.cmd(r#"{"execute":"query-status","id":"end"}"#).await["id"],
        "end"
    );

    stop.store(true, Ordering::SeqCst);
    let answered = pipeliner
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", daemon.log()));
    assert!(answered > 50, "only {answered} commands answered");
    let failures = connector.await.unwrap();
    assert!(failures.is_empty(), "connects failed: {failures:?}");
    assert!(made.load(Ordering::SeqCst) > 10, "too few connects to mean anything");
    assert_eq!(daemon.count("re-executing"), 5, "{}", daemon.log());
    // Clients leave only of their own accord (the connector's).
    let log = daemon.log();
    let by_qmpmux = log
        .lines()
        .filter(|l| l.contains("client disconnected") && !l.contains("reason=ClientClosed"));
    assert_eq!(by_qmpmux.count(), 0, "{log}");
    assert_eq!(
        daemon.count("client handed over"),
        daemon.count("client resumed"),
        "{log}"
    );
    drop(qemu);
}

/// QEMU with a second monitor (`truth.sock`, the ground truth, negotiated
/// here), and qmpmux under a scripted fd store serving it on `vm.sock`
/// (with a control socket `ctl.sock` if `control`).
async fn supervised(dir: &Path, control: bool) -> (Qemu, Supervised, Client) {
    let p = |n: &str| dir.join(n);
    let qemu = Qemu::spawn(&[Monitor::Serve(&p("q.sock")), Monitor::Serve(&p("truth.sock"))], None)
        .listening()
        .await;
    let control = if control {
        format!("{:?}", p("ctl.sock"))
    } else {
        "\"\"".into()
    };
    let config = format!(
        "control_socket = {control}\n[[vm]]\nname = \"vm\"\nupstream = {:?}\nlisten = {:?}\n",
        p("q.sock"),
        p("vm.sock")
    );
    let mut qmpmux = Supervised::new(dir, &config);
    qmpmux.start(&p("vm.sock"));
    let truth = Client::ready(&p("truth.sock")).await;
    (qemu, qmpmux, truth)
}

/// Reads `c`'s events until it has `n` (or EOF: `false`).
async fn events_until(c: &mut Client, got: &mut Vec<Value>, n: usize) -> bool {
    while got.len() < n {
        let Some(line) = c.try_line().await else { return false };
        let v: Value = serde_json::from_str(&line).unwrap();
        if v.get("event").is_some() {
            got.push(v);
        }
    }
    true
}

/// Subscribes to numbered events after `since` (from now on if `None`).
async fn subscribe(path: &Path, since: Option<u64>) -> (Client, Value) {
    let mut c = Client::ready(path).await;
    let args = match since {
        Some(s) => format!(r#"{{"since":{s}}}"#),
        None => r#"{"sequence":true}"#.into(),
    };
    let r = c
        .cmd(&format!(
            r#"{{"execute":"__org.qmpmux_subscribe","arguments":{args},"id":"s"}}"#
        ))
        .await;
    assert!(r.get("return").is_some(), "{r}");
    (c, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loses_no_event_and_connections_made_meanwhile_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (qemu, mut qmpmux, mut truth) = supervised(dir.path(), false).await;
    let mut truth_events = Vec::new();
    let (mut consumer, _) = subscribe(&p("vm.sock"), None).await;
    let mut got = Vec::new();
    stop_cont(&mut truth, 3, &mut truth_events).await;
    assert!(events_until(&mut consumer, &mut got, truth_events.len()).await);
    let names = qmpmux.store.names();
    for want in ["qemu.vm", "journal.vm"] {
        assert!(names.iter().any(|n| n == want), "{want} not stored: {names:?}");
    }

    qmpmux.crash();
    // The crash closed its clients (nobody can say what their commands in
    // flight did)...
    consumer.expect_eof().await;
    // ... QEMU goes on emitting events, and a client connects meanwhile:
    // the listening socket is in the store, the connection waits.
    stop_cont(&mut truth, 3, &mut truth_events).await;
    let waiting = tokio::spawn({
        let path = p("vm.sock");
        async move { Client::ready(&path).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "served with no qmpmux running?");
    qmpmux.start(&p("vm.sock"));
    let mut early = tokio::time::timeout(STEP, waiting)
        .await
        .expect("connection made during the gap not served")
        .unwrap();
    assert_eq!(early.cmd(r#"{"execute":"query-status","id":1}"#).await["id"], 1);
    stop_cont(&mut truth, 1, &mut truth_events).await;

    // Resuming from the last event seen: every one QEMU emitted, in order,
    // numbered without a gap, nothing lost.
    let last = got.last().unwrap()["__org.qmpmux_seq"].as_u64().unwrap();
    let (mut resumed, r) = subscribe(&p("vm.sock"), Some(last)).await;
    assert_eq!(r["return"]["lost"], json!(false), "{r}");
    assert!(events_until(&mut resumed, &mut got, truth_events.len()).await);
    let seqs: Vec<u64> = got.iter().map(|e| e["__org.qmpmux_seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "numbers with a gap: {seqs:?}"
    );
    let through: Vec<_> = got.iter().map(key).collect();
    let direct: Vec<_> = truth_events.iter().map(key).collect();
    assert_eq!(through, direct, "events through qmpmux differ from QEMU's own monitor");
    assert!(qmpmux.log().contains("crash"), "{}", qmpmux.log());
    drop(qemu);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_cannot_be_read_falls_back_to_the_crash_path() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let (qemu, mut qmpmux, mut truth) = supervised(dir.path(), true).await;
    let mut truth_events = Vec::new();
    for (what, damage) in [
        (
            "truncated",
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)) as Box<dyn Fn(&mut Vec<u8>)>,
        ),
        (
            "corrupt",
            Box::new(|b: &mut Vec<u8>| {
                let at = b.len() - 3;
                b[at] ^= 0x20;
            }),
        ),
        ("of an unknown format", Box::new(|b: &mut Vec<u8>| b[7] = 99)),
    ] {
        // A client, handed over by a stop (as for a restart)...
        let (mut consumer, _) = subscribe(&p("vm.sock"), None).await;
        let mut got = Vec::new();
        stop_cont(&mut truth, 1, &mut truth_events).await;
        let n = truth_events.len();
        assert!(events_until(&mut consumer, &mut got, 2).await);
        qmpmux.stop();
        // ... but the state describing it is damaged.
        let mut bytes = qmpmux::handover::state::from_fd(qmpmux.store.take("state").expect("no state stored")).unwrap();
        assert!(qmpmux::handover::state::decode(&bytes).is_ok());
        damage(&mut bytes);
        let fd = qmpmux::handover::state::to_memfd(&bytes).unwrap();
        qmpmux.store.replace("state", fd);
        stop_cont(&mut truth, 1, &mut truth_events).await;
        qmpmux.start(&p("vm.sock"));
        // It starts, says why, closes the client it cannot describe, and
        // keeps the events (the journal) and the connection to QEMU.
        assert!(
            qmpmux.log().contains("the handover state cannot be read"),
            "{what}: {}",
            qmpmux.log()
        );
        consumer.expect_eof().await;
        let last = got.last().unwrap()["__org.qmpmux_seq"].as_u64().unwrap();
        let (mut resumed, r) = subscribe(&p("vm.sock"), Some(last)).await;
        assert_eq!(r["return"]["lost"], json!(false), "{what}: {r}");
        assert!(events_until(&mut resumed, &mut got, truth_events.len() - n + 2).await);
        let tail: Vec<_> = got.iter().map(key).collect();
        let direct: Vec<_> = truth_events[n - 2..].iter().map(key).collect();
        assert_eq!(tail, direct, "{what}");
    }
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_qmpmux"))
        .args(["status", "--control"])
        .arg(p("ctl.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("fallbacks to the crash path: 1"), "{text}");
    drop(qemu);
}

/// A command QEMU takes longer over than the handover waits for goes to
/// the next process with its client: the reply reaches the client, with its
/// id, in order. (A scripted upstream: QEMU cannot be made slow on demand.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_qemu_gives_after_the_handover_reach_their_clients_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let fake = common::fake::FakeServer::bind(&p("fake.sock"));
    let config = format!(
        "control_socket = \"\"\n[[vm]]\nname = \"vm\"\nupstream = {:?}\nlisten = {:?}\n",
        p("fake.sock"),
        p("vm.sock")
    );
    let upstream = tokio::spawn(async move {
        let conn = fake.accept_ready().await;
        (fake, conn)
    });
    let daemon = Daemon::start(dir.path(), &config);
    let (_fake, mut up) = upstream.await.unwrap();
    let mut c = Client::ready(&p("vm.sock")).await;
    c.send(r#"{"execute":"slow-one","id":"a"}"#).await;
    c.send(r#"{"execute":"slow-two","id":{"b":[1]}}"#).await;
    // QEMU has the first; the second waits its turn in qmpmux (a client
    // adds commands to QEMU's queue only while they are cheap).
    let a = up.read().await.expect("first request");
    assert_eq!(a["execute"], "slow-one");

    // qmpmux re-executes while QEMU has the first; it waits for it a
    // while, then hands both over with the client.
    daemon.reexec().await;
    assert!(
        daemon.log().contains("they go to the next process with it"),
        "{}",
        daemon.log()
    );
    // Another client's request now gets a number QEMU does not still have.
    let mut d = Client::ready(&p("vm.sock")).await;
    d.send(r#"{"execute":"query-status","id":"d"}"#).await;
    let r = up.read().await.expect("another client's request");
    assert_ne!(r["id"], a["id"], "a number still in QEMU's hands was given out again");
    up.reply(&r, json!({"status": "running"})).await;
    assert_eq!(d.recv().await["id"], "d");
    up.reply(&a, json!({"one": 1})).await;
    // The new process sends the second, and routes both replies.
    let b = up.read().await.expect("second request");
    assert_eq!(b["execute"], "slow-two");
    up.reply(&b, json!({})).await;
    assert_eq!(c.recv().await, json!({"return": {"one": 1}, "id": "a"}));
    assert_eq!(c.recv().await, json!({"return": {}, "id": {"b": [1]}}));
    // The connection goes on.
    c.send(r#"{"execute":"query-status","id":"c"}"#).await;
    let r = up.read().await.expect("third request");
    up.reply(&r, json!({"status": "running"})).await;
    assert_eq!(c.recv().await["id"], "c");
}
