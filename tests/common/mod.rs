//! Test harness: real QEMU processes, qmpmux started in-process, raw QMP
//! clients, and a scripted fake QMP server for what QEMU cannot do on demand.
#![allow(dead_code)]

pub mod fake;
pub mod logs;

use qmpmux::config::{Config, VmConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any single expected message may take before a test fails.
pub const STEP: Duration = Duration::from_secs(10);

pub fn qemu_binary() -> String {
    let bin = std::env::var("QMPMUX_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{bin} not found: these tests need real QEMU (apt-get install qemu-system-x86, or run `bash .ci/run`)"
    );
    bin
}

/// Makes the child get SIGKILL when the test process dies, even by abort
/// (a failed test must not leave QEMUs behind holding CI's output pipe).
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A real QEMU (`-M none`) serving QMP on a unix socket.
pub struct Qemu {
    child: Child,
    pub socket: PathBuf,
}

impl Qemu {
    /// Starts QEMU and waits until its monitor answers with a greeting.
    pub async fn start(socket: &Path) -> Qemu {
        Qemu::start_args(
            socket,
            &["-qmp".into(), format!("unix:{},server=on,wait=off", socket.display())],
        )
        .await
    }

    /// QEMU with a pretty-printing monitor (`-mon ...,pretty=on`).
    pub async fn start_pretty(socket: &Path) -> Qemu {
        let chardev = format!("socket,id=mon0,path={},server=on,wait=off", socket.display());
        let args = [
            "-chardev".into(),
            chardev,
            "-mon".into(),
            "chardev=mon0,mode=control,pretty=on".into(),
        ];
        Qemu::start_args(socket, &args).await
    }

    /// QEMU as the client: it dials `socket` (qmpmux in accept mode) and
    /// dials again a second after losing it.
    pub async fn start_dialing(socket: &Path) -> Qemu {
        let chardev = format!("socket,id=mon0,path={},reconnect=1", socket.display());
        let args = [
            "-chardev".into(),
            chardev,
            "-mon".into(),
            "chardev=mon0,mode=control".into(),
        ];
        Qemu::spawn(socket, &args)
    }

    async fn start_args(socket: &Path, monitor: &[String]) -> Qemu {
        let _ = std::fs::remove_file(socket);
        let q = Qemu::spawn(socket, monitor);
        q.wait_listening().await;
        q
    }

    fn spawn(socket: &Path, monitor: &[String]) -> Qemu {
        let mut cmd = Command::new(qemu_binary());
        cmd.args(["-M", "none", "-nodefaults", "-display", "none"])
            .args(monitor);
        die_with_parent(&mut cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu");
        Qemu {
            child,
            socket: socket.to_owned(),
        }
    }

    /// Waits for the socket to accept (without taking QEMU's one client slot
    /// for longer than the check).
    async fn wait_listening(&self) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            if let Ok(probe) = UnixStream::connect(&self.socket).await {
                // Read the whole greeting before closing: closing with it
                // unread resets the connection, and QEMU, which serves one
                // client at a time, can then fail the next one.
                let _ = tokio::time::timeout(STEP, read_greeting(probe)).await;
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "QEMU did not start listening");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Reads a (possibly pretty-printed) greeting to its end.
async fn read_greeting(mut stream: UnixStream) {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
        seen.extend_from_slice(&buf[..n]);
        let depth: i64 = seen.iter().map(|b| i64::from(*b == b'{') - i64::from(*b == b'}')).sum();
        if depth == 0 && seen.ends_with(b"\r\n") {
            return;
        }
    }
}

/// qmpmux running in-process on its own runtime tasks.
pub struct Daemon {
    pub shutdown: CancellationToken,
    pub metrics_addr: Option<std::net::SocketAddr>,
    reload_tx: tokio::sync::mpsc::Sender<qmpmux::Reload>,
    task: Option<JoinHandle<Result<(), qmpmux::RunError>>>,
    pub config: Config,
}

impl Daemon {
    /// Starts qmpmux for `vms` (name, upstream socket, listen socket).
    pub async fn start(vms: &[(&str, &Path, &Path)]) -> Daemon {
        Daemon::start_with(vms, |_| {}).await
    }

    pub async fn start_with(vms: &[(&str, &Path, &Path)], tweak: impl FnOnce(&mut Config)) -> Daemon {
        let mut config = Config {
            vms: vms
                .iter()
                .map(|(name, up, listen)| VmConfig::new(*name, *up, *listen))
                .collect(),
            ..Config::default()
        };
        tweak(&mut config);
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let listeners = qmpmux::Listeners::bind(&config).await.expect("bind listeners");
        let metrics_addr = listeners.metrics_addr();
        let shutdown = CancellationToken::new();
        let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(qmpmux::run_with_reload(
            config.clone(),
            listeners,
            shutdown.clone(),
            reload_rx,
        ));
        Daemon {
            shutdown,
            metrics_addr,
            reload_tx,
            task: Some(task),
            config,
        }
    }

    /// Applies a new configuration, as SIGHUP does.
    pub async fn reload(&self, config: Config) -> Result<qmpmux::ReloadSummary, qmpmux::RunError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        self.reload_tx
            .send(qmpmux::Reload { config, done })
            .await
            .expect("daemon running");
        answer.await.expect("reload answered")
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("daemon task").expect("daemon result");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A raw QMP client speaking bytes on a unix socket.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).await.expect("connect to qmpmux");
        let (r, w) = stream.into_split();
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    /// Connects and reads the greeting.
    pub async fn open(path: &Path) -> (Client, Value) {
        let mut c = Client::connect(path).await;
        let g = c.recv().await;
        assert!(g.get("QMP").is_some(), "expected a greeting, got {g}");
        (c, g)
    }

    /// Connects, reads the greeting and negotiates.
    pub async fn ready(path: &Path) -> Client {
        let (mut c, _) = Client::open(path).await;
        c.send(r#"{"execute":"qmp_capabilities"}"#).await;
        assert_eq!(c.recv().await, serde_json::json!({"return": {}}));
        c
    }

    /// A client from the halves [`Client::into_inner`] gave.
    pub fn from_parts(reader: BufReader<OwnedReadHalf>, writer: OwnedWriteHalf) -> Client {
        Client { reader, writer }
    }

    /// The two halves, for raw byte-level use.
    pub fn into_inner(self) -> (BufReader<OwnedReadHalf>, OwnedWriteHalf) {
        (self.reader, self.writer)
    }

    pub async fn send(&mut self, raw: &str) {
        self.writer.write_all(raw.as_bytes()).await.expect("send");
    }

    /// Sends `raw` in one `sendmsg` carrying `fd` (SCM_RIGHTS).
    pub fn send_with_fd(&mut self, raw: &str, fd: std::os::fd::RawFd) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let sock: &UnixStream = self.writer.as_ref();
        let iov = [std::io::IoSlice::new(raw.as_bytes())];
        let fds = [fd];
        let n = sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
        assert_eq!(n, raw.len());
    }

    pub async fn send_bytes(&mut self, raw: &[u8]) {
        self.writer.write_all(raw).await.expect("send");
    }

    /// The next line, raw (with its `\r\n`); `None` at EOF.
    pub async fn try_line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, self.reader.read_line(&mut line))
            .await
            .expect("timed out waiting for a message")
            .expect("read");
        (n > 0).then_some(line)
    }

    pub async fn line(&mut self) -> String {
        self.try_line().await.expect("connection closed")
    }

    pub async fn recv(&mut self) -> Value {
        let line = self.line().await;
        assert!(line.ends_with("\r\n"), "line not ending in CRLF: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
    }

    /// The next message that is not an event.
    pub async fn reply(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// The next event named `name`, skipping other events; panics on a reply.
    pub async fn event(&mut self, name: &str) -> Value {
        loop {
            let v = self.recv().await;
            assert!(v.get("event").is_some(), "expected event {name}, got {v}");
            if v["event"] == name {
                return v;
            }
        }
    }

    /// Sends one command and returns its reply (events skipped).
    pub async fn cmd(&mut self, raw: &str) -> Value {
        self.send(raw).await;
        self.reply().await
    }

    /// Asserts nothing arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        let mut line = String::new();
        if let Ok(r) = tokio::time::timeout(d, self.reader.read_line(&mut line)).await {
            panic!("expected silence, got {r:?}: {line:?}");
        }
    }

    /// Waits for the server to close the connection.
    pub async fn expect_eof(&mut self) {
        let mut line = String::new();
        let n = tokio::time::timeout(STEP, self.reader.read_line(&mut line))
            .await
            .expect("timed out waiting for EOF")
            .unwrap_or(0);
        assert_eq!(n, 0, "expected EOF, got {line:?}");
    }
}

/// Waits until `f` returns true, polling; for conditions with no event to
/// wait on (e.g. the daemon reconnecting).
pub async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + STEP;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Removes what varies between two QEMUs (timestamps) from a message.
pub fn normalize(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        if obj.contains_key("timestamp") {
            obj.insert("timestamp".into(), Value::String("<ts>".into()));
        }
    }
    v
}
