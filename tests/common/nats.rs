//! A real nats-server for the NATS tests: JetStream on, its store in a
//! temporary directory of its own, on 127.0.0.1 and a port the kernel picks
//! (parallel tests never collide), killed on drop and by the death signal if
//! the harness dies first. [`NatsServer::restart`] brings it back on the same
//! port with the same store, so JetStream's streams outlive the restart.
//!
//! The binary is `QMPMUX_NATS_SERVER`, else `nats-server` in `PATH`, else
//! `/usr/sbin/nats-server` (where Debian's package puts it, outside a non-root
//! user's `PATH`); `.ci/run` installs the package. Under CI a missing one
//! fails the test; elsewhere [`NatsServer::start_or_skip`] says so and the
//! test passes without it.
//!
//! What this relies on, checked with nats-server 2.9.10 (Debian bookworm):
//! - `-p -1` listens on a random port, and `--ports_file_dir DIR` then writes
//!   `DIR/<executable name>_<pid>.ports`, `{"nats":["nats://127.0.0.1:PORT"]}`
//!   (removed on a clean shutdown, left behind by SIGKILL);
//! - flags override the config file's settings (`-a`, `-p`), except that
//!   `-sd` next to a config file's `jetstream { store_dir: ... }` is refused
//!   ("Duplicate 'store_dir' configuration"): configs leave the store out;
//! - every connection first gets `INFO {json}\r\n`, before any
//!   authentication; the JSON has `"jetstream":true` with JetStream on;
//! - SIGTERM is a clean shutdown (JetStream flushed, then exit).
//!
//! [`NatsCluster`] starts three such servers routed into one cluster with
//! JetStream (each with a `server_name`, cluster and monitoring ports picked
//! free), for replicated streams and a server lost mid-stream;
//! [`qmpmux_config`] is the `[nats]` the fleet tests give qmpmux.

use super::process::{guard_child, log_file};
use super::STEP;
use qmpmux::config::{NatsAuth, NatsConfig, StreamConfig};
use qmpmux::policy::Policy;
use serde_json::Value;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Whether this is CI (`CI` set, and not to `false` or `0`), where a missing
/// nats-server is a failure rather than a reason to skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The nats-server to run: `QMPMUX_NATS_SERVER`, else `nats-server` in
/// `PATH`, else `/usr/sbin/nats-server`. `None` if there is none (outside CI
/// only: under CI that panics, as does a `QMPMUX_NATS_SERVER` naming nothing).
pub fn nats_binary() -> Option<PathBuf> {
    if let Some(named) = std::env::var_os("QMPMUX_NATS_SERVER").filter(|v| !v.is_empty()) {
        let named = PathBuf::from(named);
        assert!(named.is_file(), "QMPMUX_NATS_SERVER={} is not a file", named.display());
        return Some(named);
    }
    let in_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    let found = in_path.or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()));
    assert!(
        found.is_some() || !in_ci(),
        "CI is set but there is no nats-server: `bash .ci/run` installs it (apt-get install nats-server), \
         or set QMPMUX_NATS_SERVER"
    );
    found
}

/// [`nats_binary`], saying on stderr that the test is skipped if there is
/// none; for tests that start the server another way than
/// [`NatsServer::start_or_skip`]: `let Some(_) = nats_or_skip() else { return };`
pub fn nats_or_skip() -> Option<PathBuf> {
    let bin = nats_binary();
    if bin.is_none() {
        eprintln!(
            "SKIPPED: no nats-server (apt-get install nats-server, run `bash .ci/run`, or set QMPMUX_NATS_SERVER)"
        );
    }
    bin
}

/// A running (or stopped, between [`NatsServer::stop`] and
/// [`NatsServer::restart`]) nats-server.
pub struct NatsServer {
    child: Option<Child>,
    bin: PathBuf,
    /// Arguments the test gave (and `-c FILE` for a config), after the
    /// harness's own.
    extra: Vec<OsString>,
    /// 0 until the first start has read the ports file.
    port: u16,
    dir: Option<tempfile::TempDir>,
    /// INFO's JSON as the last readiness check saw it.
    info: Value,
}

impl NatsServer {
    /// Starts nats-server with JetStream and waits until it serves; panics if
    /// there is no nats-server (see [`nats_binary`]).
    pub async fn start() -> NatsServer {
        NatsServer::start_with_args(&[]).await
    }

    /// [`NatsServer::start`], or `None` (saying so) if there is no
    /// nats-server outside CI.
    pub async fn start_or_skip() -> Option<NatsServer> {
        nats_or_skip()?;
        Some(NatsServer::start().await)
    }

    /// Starts nats-server with `args` added to the harness's own (which are
    /// `-a 127.0.0.1 -p PORT -js -sd STORE --ports_file_dir DIR`: leave these
    /// out), e.g. `["--user", "u", "--pass", "p"]` or `["--auth", "token"]`.
    pub async fn start_with_args(args: &[&str]) -> NatsServer {
        let mut s = NatsServer::new();
        s.extra = args.iter().map(OsString::from).collect();
        s.run().await;
        s
    }

    /// Starts nats-server on a config file with `config` as its text, where
    /// `{dir}` is replaced by the server's temporary directory and `{store}`
    /// by its JetStream store (e.g. for `accounts`, `authorization`,
    /// `jetstream { max_file_store: ... }`). The listen address, the port and
    /// the store are the harness's (flags): the config leaves out `host`,
    /// `port` and `store_dir` (nats-server refuses a second `store_dir`).
    /// Accounts other than the global one need `jetstream: enabled` to use
    /// JetStream.
    pub async fn start_with_config(config: &str) -> NatsServer {
        let mut s = NatsServer::new();
        let text = config
            .replace("{dir}", &s.dir().display().to_string())
            .replace("{store}", &s.store_dir().display().to_string());
        let conf = s.dir().join("nats-server.conf");
        std::fs::write(&conf, text).expect("write nats-server config");
        s.extra = vec!["-c".into(), conf.into_os_string()];
        s.run().await;
        s
    }

    /// Not started yet: the binary, and a temporary directory with `store/`.
    fn new() -> NatsServer {
        let bin = nats_binary().expect("no nats-server: apt-get install nats-server, or set QMPMUX_NATS_SERVER");
        let dir = tempfile::Builder::new()
            .prefix("qmpmux-nats-")
            .tempdir()
            .expect("temp dir for nats-server");
        std::fs::create_dir(dir.path().join("store")).expect("nats-server store dir");
        NatsServer {
            child: None,
            bin,
            extra: Vec::new(),
            port: 0,
            dir: Some(dir),
            info: Value::Null,
        }
    }

    /// `nats://127.0.0.1:PORT`, the same across restarts.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The temporary directory holding the store, the log, the config and
    /// the ports files; removed on drop unless the test is panicking.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir lives as long as the server").path()
    }

    /// JetStream's store (`-sd`); nats-server keeps its data in `jetstream/`
    /// under it.
    pub fn store_dir(&self) -> PathBuf {
        self.dir().join("store")
    }

    /// nats-server's stderr (its log), appended to across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("nats-server.log")
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The JSON of the INFO line the last start's readiness check got.
    pub fn info(&self) -> &Value {
        &self.info
    }

    /// The running server's pid; `None` once stopped or killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops it cleanly (SIGTERM) and waits until it has exited; panics if it
    /// takes longer than [`STEP`] (after SIGKILL). A no-op if not running.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill(2) on our own child, not yet waited for (its pid
        // cannot have been reused).
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STEP;
        loop {
            if child.try_wait().expect("wait for nats-server").is_some() {
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "nats-server did not exit within {STEP:?} of SIGTERM; {}",
                    self.failure_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Kills it (SIGKILL) and waits for it. A no-op if not running. Streams
    /// survive it, and so did an acknowledged message in every try with
    /// 2.9.10, but without a clean shutdown nothing promises that: tests that
    /// count JetStream's messages across a restart use [`NatsServer::stop`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it (cleanly) if it is running, then starts it again on the same
    /// port with the same store and arguments, and waits until it serves.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.run().await;
    }

    /// Spawns nats-server from the calling thread (the death signal follows
    /// it) and waits until it serves. On the first start the port is the
    /// kernel's pick, read from the ports file; later it is that port again,
    /// retried for a while if something else holds it.
    async fn run(&mut self) {
        assert!(self.child.is_none(), "nats-server is already running");
        let deadline = Instant::now() + 3 * STEP;
        loop {
            let log_len = std::fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
            self.spawn();
            match self.wait_ready(deadline).await {
                Ok(info) => {
                    self.info = info;
                    return;
                }
                Err(exited) => {
                    let log = self.log();
                    let this_run = log.get(log_len as usize..).unwrap_or_default();
                    if self.port != 0 && this_run.contains("address already in use") && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    panic!("nats-server {exited}; {}", self.failure_log());
                }
            }
        }
    }

    fn spawn(&mut self) {
        let dir = self.dir().to_owned();
        let port = if self.port == 0 {
            "-1".to_owned()
        } else {
            self.port.to_string()
        };
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.extra)
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(dir.join("store"))
            .arg("--ports_file_dir")
            .arg(&dir)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log_file(&self.log_path()))
            .stderr(log_file(&self.log_path()));
        guard_child(&mut cmd, None);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display())),
        );
    }

    /// Waits until the child has written its ports file (first start only)
    /// and a connection gets INFO; `Err` (what happened) if it exited or the
    /// deadline passed.
    async fn wait_ready(&mut self, deadline: Instant) -> Result<Value, String> {
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Some(status) = child.try_wait().expect("wait for nats-server") {
                self.child = None;
                return Err(format!("exited ({status}) before serving"));
            }
            if self.port == 0 {
                self.port = self.ports_file_port().unwrap_or(0);
            }
            if self.port != 0 {
                if let Some(info) = read_info(self.addr()).await {
                    return Ok(info);
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("did not serve within {:?}", 3 * STEP));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The client port in this run's ports file (`<exe>_<pid>.ports`), once
    /// it is there and whole.
    fn ports_file_port(&self) -> Option<u16> {
        let suffix = format!("_{}.ports", self.pid()?);
        let file = std::fs::read_dir(self.dir())
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))?;
        let json: Value = serde_json::from_slice(&std::fs::read(file.path()).ok()?).ok()?;
        let url = json["nats"].get(0)?.as_str()?;
        url.rsplit(':').next()?.parse().ok()
    }

    /// Where the log is, and its last lines, for a panic message.
    pub fn failure_log(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "log {} ends:\n{}",
            self.log_path().display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("nats-server's directory (log, store) kept: {}", kept.display());
            }
        }
    }
}

/// The JSON of the INFO line a new connection to `addr` gets; `None` if it
/// cannot connect or gets no INFO within [`STEP`].
pub async fn read_info(addr: SocketAddr) -> Option<Value> {
    let mut conn = TcpStream::connect(addr).await.ok()?;
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !seen.ends_with(b"\r\n") {
            let n = conn.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(STEP, read).await.ok()??;
    let line = std::str::from_utf8(&seen).ok()?.trim_end();
    serde_json::from_str(line.strip_prefix("INFO ")?).ok()
}

/// qmpmux's `[nats]` for tests: host `hv1` (prefix `qmpmux.hv1`), these
/// servers, a stream of that name (one replica, 120 s duplicate window) or
/// plain NATS, no commands.
pub fn qmpmux_config(servers: &[String], stream: Option<&str>) -> NatsConfig {
    NatsConfig {
        servers: servers.to_vec(),
        auth: NatsAuth::None,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        tls_required: false,
        host: "hv1".into(),
        prefix: "qmpmux.hv1".into(),
        stream: stream.map(|name| StreamConfig {
            name: name.into(),
            max_age: None,
            max_msgs: None,
            max_bytes: None,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
        }),
        commands: false,
        policy: Policy::default(),
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for ports a server's
/// config must name before it starts: cluster routes, monitoring).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Three nats-servers routed into one cluster, JetStream on each: streams
/// may have three replicas. Each keeps its store, ports and config across
/// [`NatsServer::kill`] and [`NatsServer::restart`] (it rejoins).
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
    /// Each server's monitoring port (`/connz`, `/jsz`).
    pub http_ports: Vec<u16>,
}

impl NatsCluster {
    /// Starts the three and waits until JetStream answers (a meta leader
    /// is elected); `None` (saying so) without nats-server outside CI.
    pub async fn start_or_skip() -> Option<NatsCluster> {
        nats_or_skip()?;
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let http_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for i in 0..3 {
            let others: Vec<String> = routes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            let config = format!(
                "server_name: n{i}\nhttp: 127.0.0.1:{http}\n\
                 cluster {{\n  name: qmpmux-test\n  listen: 127.0.0.1:{route}\n  routes: [{others}]\n}}\n",
                http = http_ports[i],
                route = routes[i],
                others = others.join(", ")
            );
            servers.push(NatsServer::start_with_config(&config).await);
        }
        let cluster = NatsCluster { servers, http_ports };
        cluster.wait_for_jetstream(&cluster.urls()).await;
        Some(cluster)
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// Waits until a client of `urls` gets JetStream's account information
    /// without an error (which needs a meta leader).
    pub async fn wait_for_jetstream(&self, urls: &[String]) {
        let deadline = Instant::now() + 6 * STEP;
        loop {
            // The raw request: async-nats 0.51's account type does not
            // parse every server's answer.
            let ready = async {
                let client = async_nats::connect(urls).await.ok()?;
                let answer = client.request("$JS.API.INFO", "".into()).await.ok()?;
                let v: Value = serde_json::from_slice(&answer.payload).ok()?;
                v.get("error").is_none().then_some(())
            };
            if tokio::time::timeout(STEP, ready).await.ok().flatten().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the NATS cluster has no JetStream meta leader; logs:\n{}",
                self.servers
                    .iter()
                    .map(|s| s.failure_log())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the server that has a client connection named `name`
    /// (async-nats's `ConnectOptions::name`), if one has.
    pub async fn serving(&self, name: &str) -> Option<usize> {
        for (i, port) in self.http_ports.iter().enumerate() {
            if self.servers[i].pid().is_none() {
                continue;
            }
            let Some(connz) = http_get_json(*port, "/connz").await else {
                continue;
            };
            let conns = connz["connections"].as_array().cloned().unwrap_or_default();
            if conns.iter().any(|c| c["name"] == name) {
                return Some(i);
            }
        }
        None
    }
}

/// `GET path` on 127.0.0.1:`port`, the body as JSON; `None` if it fails.
async fn http_get_json(port: u16, path: &str) -> Option<Value> {
    let get = async {
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await.ok()?;
        // HTTP/1.0: the whole body at once, never chunked.
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        let (_, body) = out.split_once("\r\n\r\n")?;
        serde_json::from_str(body).ok()
    };
    tokio::time::timeout(STEP, get).await.ok().flatten()
}
