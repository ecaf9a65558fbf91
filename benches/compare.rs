//! Side-by-side benchmark: QEMU's QMP monitor used directly versus through
//! qmpmux, plus qmpmux's own limits (instant-reply fake upstream, event
//! fan-out, memory per client, reconnect time).
//!
//! `cargo bench --bench compare` (about 1 to 1.5 minutes on 2 cores), or
//! `cargo bench --bench compare -- --quick` (about 15 s). Prints a table and
//! writes the same figures to `target/bench-results.json`. Nothing here
//! asserts on timings.
//!
//! qmpmux is always the release binary (`CARGO_BIN_EXE_qmpmux`) run as a
//! subprocess, as in production: its CPU time and memory are then its own,
//! and the load generator (this process, 2 tokio workers) does not share a
//! runtime with it. Every child process gets SIGKILL if this process dies
//! (PR_SET_PDEATHSIG), and is killed on drop (also when unwinding a panic).
//! Children are spawned from the main thread only: the death signal follows
//! the spawning *thread*, and tokio's blocking-pool threads come and go.

use serde_json::{json, Value};
use std::io::{self, BufRead, Write};
use std::os::unix::net::UnixStream as StdStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Notify, Semaphore};

/// The command measured everywhere; the id rides through qmpmux as QEMU's
/// clients (libvirt) use one.
const CMD: &[u8] = b"{\"execute\": \"query-status\", \"id\": 7}";
/// A direct client enables OOB, as qmpmux's own upstream session does: QEMU
/// then queues up to 8 in-band commands instead of 1, the same for both.
const CAPS_OOB: &[u8] = b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}";
/// qmpmux offers clients no OOB.
const CAPS: &[u8] = b"{\"execute\": \"qmp_capabilities\"}";
const DEPTH: usize = 8;
/// Longest any single expected step may take before the bench gives up.
const STEP: Duration = Duration::from_secs(10);

const FAKE_GREETING: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"bench-fake\"}, \"capabilities\": [\"oob\"]}}\r\n";

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Monotonic nanoseconds since [`epoch`], shared by the fake upstream
/// (which stamps events) and the clients (which receive them).
fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

// ---------------------------------------------------------------------------
// Run plan

struct Plan {
    quick: bool,
    /// `--only 1,3`: run just these sections (for profiling one path).
    only: Option<Vec<u32>>,
    lat_rounds: usize,
    lat_per_round: usize,
    lat_warmup: usize,
    tput_warmup: Duration,
    tput_window: Duration,
    tput_reps: usize,
    /// (clients, events)
    fanout: [(usize, usize); 3],
    event_gap: Duration,
    mem_clients: usize,
    reconnects: usize,
    /// Rounds of the fairness measurement (section 7).
    fair_rounds: usize,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                only: None,
                lat_rounds: 4,
                lat_per_round: 150,
                lat_warmup: 100,
                tput_warmup: Duration::from_millis(200),
                tput_window: Duration::from_millis(600),
                tput_reps: 1,
                fanout: [(1, 200), (100, 100), (1000, 30)],
                event_gap: Duration::from_millis(2),
                mem_clients: 10_000,
                reconnects: 3,
                fair_rounds: 3,
            }
        } else {
            Plan {
                quick,
                only: None,
                lat_rounds: 10,
                lat_per_round: 300,
                lat_warmup: 200,
                tput_warmup: Duration::from_millis(300),
                tput_window: Duration::from_secs(2),
                tput_reps: 3,
                fanout: [(1, 500), (100, 300), (1000, 100)],
                event_gap: Duration::from_millis(2),
                mem_clients: 10_000,
                reconnects: 5,
                fair_rounds: 5,
            }
        }
    }
}

impl Plan {
    fn wants(&self, section: u32) -> bool {
        self.only.as_ref().is_none_or(|o| o.contains(&section))
    }
}

// ---------------------------------------------------------------------------
// Child processes

/// PR_SET_PDEATHSIG in the child between fork and exec, and optionally a
/// lower RLIMIT_NOFILE soft limit (as systemd's default 1024 would give).
fn guard_child(cmd: &mut Command, nofile_soft: Option<u64>) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe syscalls (prctl, getppid, get/setrlimit)
    // on stack memory; nothing of the parent's heap is touched.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                return Err(io::Error::other("parent already gone"));
            }
            if let Some(soft) = nofile_soft {
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
                    rl.rlim_cur = soft.min(rl.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
                }
            }
            Ok(())
        });
    }
}

/// Raises this process's RLIMIT_NOFILE soft limit to the hard limit;
/// returns the new soft limit.
fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl);
    }
    rl.rlim_cur
}

fn qemu_binary() -> String {
    std::env::var("QMPMUX_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

fn qemu_version() -> String {
    Command::new(qemu_binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| panic!("{} not found: the benchmark needs real QEMU", qemu_binary()))
}

/// A real QEMU (`-M none`) serving QMP on a unix socket.
struct Qemu {
    child: Child,
    socket: PathBuf,
}

impl Qemu {
    /// Starts QEMU (replacing a stale socket file) without waiting.
    fn spawn(socket: &Path, log: &Path) -> Qemu {
        Qemu::spawn_monitors(&[socket], log)
    }

    /// Starts QEMU with one `-qmp` monitor per socket; `socket` is the first.
    fn spawn_monitors(sockets: &[&Path], log: &Path) -> Qemu {
        let mut cmd = Command::new(qemu_binary());
        cmd.args(["-M", "none", "-nodefaults", "-display", "none"]);
        for socket in sockets {
            let _ = std::fs::remove_file(socket);
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", socket.display()));
        }
        let socket = sockets[0];
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file(log));
        guard_child(&mut cmd, None);
        Qemu {
            child: cmd.spawn().expect("spawn qemu"),
            socket: socket.to_owned(),
        }
    }

    /// Starts QEMU and waits until its socket accepts (a connect that is
    /// closed at once, as tests/common does).
    fn start(socket: &Path, log: &Path) -> Qemu {
        Qemu::start_monitors(&[socket], log)
    }

    fn start_monitors(sockets: &[&Path], log: &Path) -> Qemu {
        let q = Qemu::spawn_monitors(sockets, log);
        let deadline = Instant::now() + STEP;
        while sockets.iter().any(|s| StdStream::connect(s).is_err()) {
            assert!(
                Instant::now() < deadline,
                "QEMU did not start listening; see {}",
                log.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        q
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// The qmpmux binary running with a config file.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts qmpmux and waits until every listen socket gives a greeting
    /// (i.e. the upstream session is up). `nofile_soft`: start it with this
    /// RLIMIT_NOFILE soft limit instead of this process's (raised) one.
    fn start(config_path: &Path, config: &str, log: &Path, listens: &[&Path], nofile_soft: Option<u64>) -> Daemon {
        std::fs::write(config_path, config).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmpmux"));
        cmd.arg("--config")
            .arg(config_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log_file(log))
            .stderr(log_file(log));
        guard_child(&mut cmd, nofile_soft);
        let d = Daemon {
            child: cmd.spawn().expect("spawn qmpmux"),
            log: log.to_owned(),
        };
        for l in listens {
            let deadline = Instant::now() + 3 * STEP;
            while SyncClient::open(l, CAPS).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "qmpmux did not serve {}; log:\n{}",
                    l.display(),
                    std::fs::read_to_string(&d.log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        d
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Floors: the least any proxy must do, as separate processes like qmpmux
// (this binary run again in a child mode, on one single-threaded runtime).

/// A floor process: `--child-relay LISTEN UPSTREAM` copies bytes both ways
/// between each client and its own upstream connection (one task per
/// client, tokio's `copy_bidirectional`); `--child-broadcast LISTEN
/// UPSTREAM` reads lines from one upstream connection and writes each to
/// every client (after a fake greeting and negotiation).
struct Floor {
    child: Child,
}

impl Floor {
    fn start(mode: &str, listen: &Path, upstream: &Path) -> Floor {
        let _ = std::fs::remove_file(listen);
        let mut cmd = Command::new(std::env::current_exe().expect("own path"));
        cmd.arg(mode)
            .arg(listen)
            .arg(upstream)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        guard_child(&mut cmd, None);
        let f = Floor {
            child: cmd.spawn().expect("spawn floor process"),
        };
        let deadline = Instant::now() + STEP;
        while !listen.exists() {
            assert!(Instant::now() < deadline, "{mode} did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        f
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a child mode if asked to; returns whether it did.
fn child_mode(args: &[String]) -> bool {
    let Some(i) = args.iter().position(|a| a.starts_with("--child-")) else {
        return false;
    };
    let (mode, listen, upstream) = (
        args[i].clone(),
        PathBuf::from(&args[i + 1]),
        PathBuf::from(&args[i + 2]),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = UnixListener::bind(&listen).expect("bind");
        match mode.as_str() {
            "--child-relay" => {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut up = UnixStream::connect(&upstream).await.expect("relay upstream");
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    });
                }
            }
            "--child-broadcast" => broadcast(listener, &upstream).await,
            other => panic!("unknown child mode {other}"),
        }
    });
    true
}

async fn broadcast(listener: UnixListener, upstream: &Path) {
    let up = loop {
        match UnixStream::connect(upstream).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let mut lines = BufReader::new(up).lines();
    let _greeting = lines.next_line().await;
    let (join_tx, mut joined) = mpsc::unbounded_channel::<OwnedWriteHalf>();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let join_tx = join_tx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut rd = BufReader::new(rd);
                let mut req = Vec::new();
                if wr.write_all(FAKE_GREETING).await.is_err()
                    || rd.read_until(b'}', &mut req).await.is_err()
                    || wr.write_all(b"{\"return\": {}}\r\n").await.is_err()
                {
                    return;
                }
                let _ = join_tx.send(wr);
                // Keep the read half until the client leaves.
                let _ = rd.read_to_end(&mut req).await;
            });
        }
    });
    let mut clients: Vec<OwnedWriteHalf> = Vec::new();
    loop {
        tokio::select! {
            Some(wr) = joined.recv() => clients.push(wr),
            line = lines.next_line() => {
                let Ok(Some(mut line)) = line else { return };
                line.push_str("\r\n");
                let mut kept = Vec::with_capacity(clients.len());
                for mut wr in clients.drain(..) {
                    if wr.write_all(line.as_bytes()).await.is_ok() {
                        kept.push(wr);
                    }
                }
                clients = kept;
            }
        }
    }
}

fn daemon_config(vms: &[(&str, &Path, &Path)], max_clients: usize) -> String {
    let mut s = format!("log_level = \"warn\"\n[client]\nmax_clients = {max_clients}\n");
    for (name, up, listen) in vms {
        s += &format!(
            "[[vm]]\nname = \"{name}\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
            up.display(),
            listen.display()
        );
    }
    s
}

// ---------------------------------------------------------------------------
// /proc readings

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The soft RLIMIT_NOFILE of a process, from /proc/PID/limits.
fn nofile_of(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// User + system CPU time of a whole process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    // SAFETY: sysconf has no memory effects.
    let tck = *TCK.get_or_init(|| unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64);
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0.0;
    };
    // Fields after the command name start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / tck
}

// ---------------------------------------------------------------------------
// Clients

fn is_event(line: &str) -> bool {
    line.contains("\"event\": ")
}

fn is_ok(line: &str) -> bool {
    line.contains("\"return\"") && !line.contains("\"error\"")
}

/// A blocking QMP client, for the sequential measurements (least client
/// overhead: no runtime between the syscall and the clock).
struct SyncClient {
    reader: io::BufReader<StdStream>,
    writer: StdStream,
    line: String,
}

impl SyncClient {
    fn open(path: &Path, caps: &[u8]) -> io::Result<SyncClient> {
        let s = StdStream::connect(path)?;
        s.set_read_timeout(Some(STEP))?;
        let mut c = SyncClient {
            writer: s.try_clone()?,
            reader: io::BufReader::new(s),
            line: String::new(),
        };
        c.read_line()?;
        if !c.line.contains("\"QMP\"") {
            return Err(io::Error::other(format!("no greeting: {}", c.line)));
        }
        c.writer.write_all(caps)?;
        if !c.reply()? {
            return Err(io::Error::other(format!("negotiation failed: {}", c.line)));
        }
        Ok(c)
    }

    fn read_line(&mut self) -> io::Result<()> {
        self.line.clear();
        if self.reader.read_line(&mut self.line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// The next reply (events skipped): whether it is a success.
    fn reply(&mut self) -> io::Result<bool> {
        loop {
            self.read_line()?;
            if !is_event(&self.line) {
                return Ok(is_ok(&self.line));
            }
        }
    }

    fn cmd(&mut self) -> io::Result<bool> {
        self.writer.write_all(CMD)?;
        self.reply()
    }
}

/// An async QMP client, negotiated.
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

async fn open(path: &Path, caps: &[u8]) -> io::Result<Conn> {
    let go = async {
        let (r, w) = UnixStream::connect(path).await?.into_split();
        let mut c = Conn {
            reader: BufReader::with_capacity(4096, r),
            writer: w,
        };
        let mut line = String::new();
        c.reader.read_line(&mut line).await?;
        if !line.contains("\"QMP\"") {
            return Err(io::Error::other(format!("no greeting: {line:?}")));
        }
        c.writer.write_all(caps).await?;
        loop {
            line.clear();
            if c.reader.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if !is_event(&line) {
                break;
            }
        }
        if !is_ok(&line) {
            return Err(io::Error::other(format!("negotiation failed: {line:?}")));
        }
        Ok(c)
    };
    tokio::time::timeout(STEP, go)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Opens `n` negotiated clients, at most `parallel` handshakes at a time.
async fn open_many(path: &Path, caps: &'static [u8], n: usize, parallel: usize) -> Vec<Conn> {
    let sem = Arc::new(Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (sem, path) = (sem.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            open(&path, caps).await
        }));
    }
    let mut out = Vec::with_capacity(n);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("open task") {
            Ok(c) => out.push(c),
            Err(e) => panic!("client {i} of {n} to {} failed: {e}", path.display()),
        }
    }
    out
}

/// Keeps `depth` commands in flight until `stop`, then drains its replies.
async fn pipeline_client(
    conn: Conn,
    depth: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> io::Result<()> {
    let Conn { mut reader, mut writer } = conn;
    let batch = CMD.repeat(depth);
    writer.write_all(&batch).await?;
    let mut outstanding = depth;
    let mut line = String::new();
    while outstanding > 0 {
        // Take every reply already buffered, then refill in one write.
        let mut got = 0;
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if !is_event(&line) {
                got += 1;
                if !is_ok(&line) {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !reader.buffer().contains(&b'\n') {
                break;
            }
        }
        if got == 0 {
            continue;
        }
        done.fetch_add(got as u64, Ordering::Relaxed);
        outstanding -= got;
        if !stop.load(Ordering::Relaxed) {
            writer.write_all(&batch[..got * CMD.len()]).await?;
            outstanding += got;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The fake upstream: greets, then answers every request at once.

#[derive(serde::Deserialize)]
struct FakeReq<'a> {
    #[serde(borrow)]
    id: Option<&'a serde_json::value::RawValue>,
}

/// Answers every complete request in `buf` (a stream of JSON objects with
/// no separators); returns how many bytes were consumed.
fn fake_answer_all(buf: &[u8], out: &mut Vec<u8>) -> usize {
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<FakeReq>();
    loop {
        match it.next() {
            Some(Ok(req)) => {
                out.extend_from_slice(b"{\"return\": {}");
                if let Some(id) = req.id {
                    out.extend_from_slice(b", \"id\": ");
                    out.extend_from_slice(id.get().as_bytes());
                }
                out.extend_from_slice(b"}\r\n");
            }
            Some(Err(e)) if e.is_eof() => break,
            Some(Err(e)) => {
                eprintln!("fake upstream: bad request ({e}); dropping input");
                return buf.len();
            }
            None => break,
        }
    }
    it.byte_offset()
}

fn fake_event_line(name: &str) -> String {
    let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!(
        "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": \"{name}\", \"data\": {{\"t\": {}}}}}\r\n",
        wall.as_secs(),
        wall.subsec_micros(),
        now_ns()
    )
}

async fn fake_serve(stream: UnixStream, events: &mut mpsc::UnboundedReceiver<&'static str>) {
    let (mut rd, mut wr) = stream.into_split();
    if wr.write_all(FAKE_GREETING).await.is_err() {
        return;
    }
    let mut buf = Vec::with_capacity(1 << 16);
    let mut chunk = vec![0u8; 1 << 16];
    let mut out = Vec::with_capacity(1 << 16);
    loop {
        tokio::select! {
            r = rd.read(&mut chunk) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                let used = fake_answer_all(&buf, &mut out);
                buf.drain(..used);
                if !out.is_empty() {
                    if wr.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            }
            ev = events.recv() => {
                let Some(name) = ev else { return };
                // Stamped right before the write.
                if wr.write_all(fake_event_line(name).as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Starts the fake upstream; the sender fires one event per message.
fn fake_upstream(path: &Path) -> mpsc::UnboundedSender<&'static str> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).expect("bind fake upstream");
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            fake_serve(stream, &mut rx).await;
        }
    });
    tx
}

// ---------------------------------------------------------------------------
// Statistics and formatting

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median_f(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        0.0
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Prints a line to stdout and keeps it for nothing else: the table is the
/// output. Progress goes to stderr.
macro_rules! out {
    ($($t:tt)*) => {{
        println!($($t)*);
        let _ = io::stdout().flush();
    }};
}

fn progress(what: &str) {
    eprintln!("  .. {what}");
}

// ---------------------------------------------------------------------------
// 1. Sequential round trips

struct LatStats {
    p50: u64,
    p99: u64,
    mean: f64,
    errors: u64,
}

fn lat_stats(mut v: Vec<u64>, errors: u64) -> LatStats {
    v.sort_unstable();
    let mean = v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    LatStats {
        p50: pct(&v, 50.0),
        p99: pct(&v, 99.0),
        mean,
        errors,
    }
}

fn bench_sequential(plan: &Plan, direct: &Path, mux: &Path, relay: &Path) -> Value {
    progress("sequential round trips");
    let mut clients = [
        SyncClient::open(direct, CAPS_OOB).expect("direct client"),
        SyncClient::open(mux, CAPS).expect("qmpmux client"),
        SyncClient::open(relay, CAPS_OOB).expect("relay client"),
    ];
    let mut samples = [Vec::new(), Vec::new(), Vec::new()];
    let mut errors = [0u64; 3];
    for c in clients.iter_mut() {
        for _ in 0..plan.lat_warmup {
            c.cmd().expect("warm-up round trip");
        }
    }
    for round in 0..plan.lat_rounds {
        let order = [[0, 1, 2], [1, 2, 0], [2, 0, 1]][round % 3];
        for which in order {
            let c = &mut clients[which];
            for _ in 0..plan.lat_per_round {
                let t = Instant::now();
                let ok = c.cmd().expect("round trip");
                samples[which].push(t.elapsed().as_nanos() as u64);
                errors[which] += u64::from(!ok);
            }
        }
    }
    let [sd, sm, sr] = samples;
    let d = lat_stats(sd, errors[0]);
    let m = lat_stats(sm, errors[1]);
    let f = lat_stats(sr, errors[2]);
    let r = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    out!(
        "\n1. Sequential query-status round trips, one client, 1 in flight ({} rounds x {}, rotating which path goes first)",
        plan.lat_rounds,
        plan.lat_per_round
    );
    out!(
        "   {:<22}{:>10}{:>10}{:>10}{:>8}",
        "path",
        "p50 us",
        "p99 us",
        "mean us",
        "errors"
    );
    for (name, s) in [("direct QEMU", &d), ("via qmpmux", &m), ("floor: bare relay", &f)] {
        out!(
            "   {:<22}{:>10.1}{:>10.1}{:>10.1}{:>8}",
            name,
            us(s.p50),
            us(s.p99),
            s.mean / 1000.0,
            s.errors
        );
    }
    let (rp50, rp99, rmean) = (
        r(m.p50 as f64, d.p50 as f64),
        r(m.p99 as f64, d.p99 as f64),
        r(m.mean, d.mean),
    );
    out!(
        "   {:<22}{:>9.2}x{:>9.2}x{:>9.2}x    (qmpmux adds {:+.1} us at p50)",
        "ratio qmpmux/direct",
        rp50,
        rp99,
        rmean,
        us(m.p50) - us(d.p50)
    );
    out!(
        "   {:<22}{:>9.2}x{:>9.2}x{:>9.2}x    (a bare byte relay adds {:+.1} us at p50: any proxy hop costs that here)",
        "ratio relay/direct",
        r(f.p50 as f64, d.p50 as f64),
        r(f.p99 as f64, d.p99 as f64),
        r(f.mean, d.mean),
        us(f.p50) - us(d.p50)
    );
    out!(
        "   {:<22}{:>9.2}x{:>9.2}x{:>9.2}x    (qmpmux's own share: {:+.1} us at p50)",
        "ratio qmpmux/relay",
        r(m.p50 as f64, f.p50 as f64),
        r(m.p99 as f64, f.p99 as f64),
        r(m.mean, f.mean),
        us(m.p50) - us(f.p50)
    );
    let j = |s: &LatStats| json!({"p50_us": us(s.p50), "p99_us": us(s.p99), "mean_us": s.mean / 1000.0, "errors": s.errors});
    json!({
        "rounds": plan.lat_rounds, "per_round": plan.lat_per_round,
        "direct": j(&d), "qmpmux": j(&m), "bare_relay": j(&f),
        "ratio_p50": rp50, "ratio_p99": rp99, "ratio_mean": rmean,
        "ratio_relay_p50": r(f.p50 as f64, d.p50 as f64),
        "ratio_qmpmux_vs_relay_p50": r(m.p50 as f64, f.p50 as f64),
    })
}

// ---------------------------------------------------------------------------
// 2 and 3. Pipelined throughput

struct Scenario {
    label: String,
    path: PathBuf,
    caps: &'static [u8],
    clients: usize,
    /// Whether qmpmux is on the path (its CPU is then reported).
    via_mux: bool,
    /// QEMU's pid, or this process for the fake upstream.
    upstream_pid: u32,
}

#[derive(Default, Clone)]
struct TputSample {
    rate: f64,
    errors: u64,
    mux_cpu: f64,
    upstream_cpu: f64,
    bench_cpu: f64,
}

async fn tput_once(plan: &Plan, sc: &Scenario, mux_pid: u32) -> TputSample {
    let conns = open_many(&sc.path, sc.caps, sc.clients, 64).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(pipeline_client(c, DEPTH, stop.clone(), done.clone(), errors.clone())))
        .collect();
    tokio::time::sleep(plan.tput_warmup).await;
    let me = std::process::id();
    let cpu0 = (cpu_secs(mux_pid), cpu_secs(sc.upstream_pid), cpu_secs(me));
    let (c0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(plan.tput_window).await;
    let (c1, secs) = (done.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
    let cpu1 = (cpu_secs(mux_pid), cpu_secs(sc.upstream_pid), cpu_secs(me));
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        match tokio::time::timeout(STEP, t).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!(
                "{}: client did not finish cleanly: {:?}",
                sc.label,
                other.map(|r| r.map(|_| ()))
            ),
        }
    }
    TputSample {
        rate: (c1 - c0) as f64 / secs,
        errors: errors.load(Ordering::Relaxed),
        mux_cpu: (cpu1.0 - cpu0.0) / secs,
        upstream_cpu: (cpu1.1 - cpu0.1) / secs,
        bench_cpu: (cpu1.2 - cpu0.2) / secs,
    }
}

struct TputRow {
    label: String,
    clients: usize,
    via_mux: bool,
    median: TputSample,
    min: f64,
    max: f64,
}

/// Runs every scenario `tput_reps` times, interleaved (order reversed on
/// odd repetitions), and keeps medians.
async fn tput_group(plan: &Plan, scenarios: &[Scenario], mux_pid: u32) -> Vec<TputRow> {
    let mut samples: Vec<Vec<TputSample>> = vec![Vec::new(); scenarios.len()];
    for rep in 0..plan.tput_reps {
        let mut order: Vec<usize> = (0..scenarios.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for i in order {
            progress(&format!(
                "throughput: {} (rep {}/{})",
                scenarios[i].label,
                rep + 1,
                plan.tput_reps
            ));
            samples[i].push(tput_once(plan, &scenarios[i], mux_pid).await);
        }
    }
    scenarios
        .iter()
        .zip(samples)
        .map(|(sc, s)| {
            let f = |g: fn(&TputSample) -> f64| median_f(&s.iter().map(g).collect::<Vec<_>>());
            let rates: Vec<f64> = s.iter().map(|x| x.rate).collect();
            TputRow {
                label: sc.label.clone(),
                clients: sc.clients,
                via_mux: sc.via_mux,
                median: TputSample {
                    rate: f(|x| x.rate),
                    errors: s.iter().map(|x| x.errors).sum(),
                    mux_cpu: f(|x| x.mux_cpu),
                    upstream_cpu: f(|x| x.upstream_cpu),
                    bench_cpu: f(|x| x.bench_cpu),
                },
                min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                max: rates.iter().copied().fold(0.0, f64::max),
            }
        })
        .collect()
}

fn pct_cpu(v: f64) -> String {
    format!("{:.0}%", v * 100.0)
}

fn tput_json(r: &TputRow, base: f64) -> Value {
    json!({
        "label": r.label, "clients": r.clients, "depth": DEPTH,
        "cmds_per_s": r.median.rate, "min": r.min, "max": r.max,
        "ratio": if base > 0.0 { r.median.rate / base } else { 0.0 },
        "errors": r.median.errors,
        "qmpmux_cpu_fraction": r.via_mux.then_some(r.median.mux_cpu),
        "upstream_cpu_fraction": r.median.upstream_cpu,
        "bench_cpu_fraction": r.median.bench_cpu,
        "qmpmux_cpu_us_per_cmd": r.via_mux.then(|| r.median.mux_cpu * 1e6 / r.median.rate.max(1.0)),
    })
}

fn print_tput(rows: &[TputRow], base: f64, base_name: &str, upstream_name: &str) {
    out!(
        "   {:<22}{:>8}{:>12}  {:<21}{:>10}{:>12}{:>11}{:>11}{:>8}",
        "path",
        "clients",
        "cmds/s",
        "[min - max]",
        base_name,
        "qmpmux CPU",
        upstream_name,
        "us CPU/cmd",
        "errors"
    );
    for r in rows {
        let m = &r.median;
        out!(
            "   {:<22}{:>8}{:>12}  {:<21}{:>9.2}x{:>12}{:>11}{:>11}{:>8}",
            r.label,
            r.clients,
            thousands(m.rate),
            format!("[{} - {}]", thousands(r.min), thousands(r.max)),
            if base > 0.0 { m.rate / base } else { 0.0 },
            if r.via_mux { pct_cpu(m.mux_cpu) } else { "-".into() },
            pct_cpu(m.upstream_cpu),
            if r.via_mux {
                format!("{:.1}", m.mux_cpu * 1e6 / m.rate.max(1.0))
            } else {
                "-".into()
            },
            m.errors
        );
    }
}

// ---------------------------------------------------------------------------
// 4. Event fan-out

struct FanState {
    received: AtomicUsize,
    target: AtomicUsize,
    notify: Notify,
}

fn parse_t(line: &str) -> Option<u64> {
    let i = line.find("\"t\": ")? + 5;
    let digits: &str = &line[i..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

async fn fan_client(conn: Conn, st: Arc<FanState>) -> Vec<u64> {
    let Conn { mut reader, writer } = conn;
    let mut lat = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let now = now_ns();
        if line.contains("BENCH_END") {
            break;
        }
        if let Some(t) = parse_t(&line) {
            lat.push(now.saturating_sub(t));
            if st.received.fetch_add(1, Ordering::AcqRel) + 1 == st.target.load(Ordering::Acquire) {
                st.notify.notify_one();
            }
        }
    }
    drop(writer);
    lat
}

struct FanRow {
    clients: usize,
    events: usize,
    delivered: usize,
    p50: u64,
    p99: u64,
    max: u64,
    last_p50: u64,
}

async fn fanout_once(
    plan: &Plan,
    path: &Path,
    fire: &mpsc::UnboundedSender<&'static str>,
    n: usize,
    events: usize,
) -> FanRow {
    progress(&format!("event fan-out to {n} clients"));
    let conns = open_many(path, CAPS, n, 64).await;
    let st = Arc::new(FanState {
        received: AtomicUsize::new(0),
        target: AtomicUsize::new(0),
        notify: Notify::new(),
    });
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|c| tokio::spawn(fan_client(c, st.clone())))
        .collect();
    let mut sent = 0;
    for i in 0..events {
        st.target.store((i + 1) * n, Ordering::Release);
        fire.send("BENCH").expect("fake upstream is gone");
        sent += 1;
        if tokio::time::timeout(STEP, st.notify.notified()).await.is_err() {
            out!("   !! event {i} did not reach all {n} clients within {STEP:?}; stopping this run");
            break;
        }
        tokio::time::sleep(plan.event_gap).await;
    }
    fire.send("BENCH_END").expect("fake upstream is gone");
    let mut per_client = Vec::with_capacity(n);
    for t in tasks {
        per_client.push(
            tokio::time::timeout(STEP, t)
                .await
                .expect("fan-out client hung")
                .expect("task"),
        );
    }
    let mut all: Vec<u64> = per_client.iter().flatten().copied().collect();
    all.sort_unstable();
    // Per event: when its last client got it.
    let mut last: Vec<u64> = (0..sent)
        .map(|i| per_client.iter().filter_map(|v| v.get(i)).copied().max().unwrap_or(0))
        .collect();
    last.sort_unstable();
    FanRow {
        clients: n,
        events: sent,
        delivered: all.len(),
        p50: pct(&all, 50.0),
        p99: pct(&all, 99.0),
        max: all.last().copied().unwrap_or(0),
        last_p50: pct(&last, 50.0),
    }
}

// ---------------------------------------------------------------------------
// 5. Memory per idle client

struct MemResult {
    wanted: usize,
    clients: usize,
    failure: Option<String>,
    connect_secs: f64,
    rss_before: u64,
    rss_after: u64,
    rss_closed: u64,
    /// With a second wave of as many clients (allocator reuse vs growth).
    rss_second: u64,
    fds_after: usize,
    still_works: bool,
}

/// Opens up to `n` negotiated clients, `parallel` handshakes at a time; stops
/// at the first failure (a daemon out of fds would otherwise make every
/// remaining client wait for its timeout).
async fn open_until_failure(path: &Path, n: usize, parallel: usize) -> (Vec<Conn>, Option<String>) {
    let sem = Arc::new(Semaphore::new(parallel));
    let failed = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (sem, failed, path) = (sem.clone(), failed.clone(), path.to_owned());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.expect("semaphore");
            if failed.load(Ordering::Relaxed) {
                return None;
            }
            let r = open(&path, CAPS).await;
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            Some(r)
        }));
    }
    let (mut conns, mut first_error) = (Vec::with_capacity(n), None);
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.expect("open task") {
            Some(Ok(c)) => conns.push(c),
            Some(Err(e)) => {
                first_error.get_or_insert_with(|| format!("client #{i}: {e}"));
            }
            None => {}
        }
    }
    (conns, first_error)
}

async fn memory_clients(listen: &Path, pid: u32, n: usize) -> MemResult {
    // Baseline after one full client life (a command forwarded), so that the
    // session's buffers and the runtime's first allocations are counted.
    {
        let mut c = open(listen, CAPS).await.expect("memory probe client");
        c.writer.write_all(CMD).await.expect("probe send");
        let mut line = String::new();
        c.reader.read_line(&mut line).await.expect("probe reply");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);
    let t = Instant::now();
    let (mut conns, failure) = open_until_failure(listen, n, 256).await;
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid);
    let fds_after = fd_count(pid);
    // One of them still gets answers.
    let mut still_works = false;
    let mid = conns.len() / 2;
    if let Some(c) = conns.get_mut(mid) {
        let mut line = String::new();
        still_works = c.writer.write_all(CMD).await.is_ok()
            && matches!(
                tokio::time::timeout(STEP, c.reader.read_line(&mut line)).await,
                Ok(Ok(_))
            )
            && is_ok(&line);
    }
    let clients = conns.len();
    drop(conns);
    // qmpmux looks at its client count every second and hands freed memory
    // back after a large fall: give it time for that.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let rss_closed = rss_kib(pid);
    let (second, _) = open_until_failure(listen, clients, 256).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_second = rss_kib(pid);
    drop(second);
    MemResult {
        wanted: n,
        clients,
        failure,
        connect_secs,
        rss_before,
        rss_after,
        rss_closed,
        rss_second,
        fds_after,
        still_works,
    }
}

// ---------------------------------------------------------------------------
// 6. Reconnect

struct Reconnect {
    /// Kill until a command through qmpmux fails.
    detect_ms: f64,
    /// Spawn until the socket file exists.
    socket_ms: f64,
    /// Socket file until the first successful command.
    recover_ms: f64,
    attempts: u64,
}

fn wait_socket_file(socket: &Path, since: Instant) -> Instant {
    while std::fs::symlink_metadata(socket).is_err() {
        assert!(since.elapsed() < STEP, "QEMU did not create its socket");
        std::thread::sleep(Duration::from_micros(100));
    }
    Instant::now()
}

/// Kills QEMU, waits for qmpmux to report it, starts QEMU again and times
/// from its socket file appearing (stat only: QEMU serves one client at a
/// time, and that must be qmpmux) to the first successful command through
/// an already-connected qmpmux client.
fn reconnect_mux(qemu: &mut Qemu, log: &Path, client: &mut SyncClient) -> Reconnect {
    let socket = qemu.socket.clone();
    let tk = Instant::now();
    qemu.kill();
    while client.cmd().expect("client through qmpmux") {
        assert!(tk.elapsed() < STEP, "commands kept succeeding with QEMU dead");
        std::thread::sleep(Duration::from_millis(1));
    }
    let detect_ms = tk.elapsed().as_secs_f64() * 1e3;
    let ts = Instant::now();
    *qemu = Qemu::spawn(&socket, log);
    let t0 = wait_socket_file(&socket, ts);
    let mut attempts = 0;
    loop {
        attempts += 1;
        if client.cmd().expect("client through qmpmux") {
            break;
        }
        assert!(t0.elapsed() < 3 * STEP, "qmpmux did not reconnect");
        std::thread::sleep(Duration::from_micros(500));
    }
    Reconnect {
        detect_ms,
        socket_ms: (t0 - ts).as_secs_f64() * 1e3,
        recover_ms: t0.elapsed().as_secs_f64() * 1e3,
        attempts,
    }
}

/// The baseline: a direct client that, from the socket file appearing,
/// tries to connect every 0.5 ms, then negotiates and sends query-status.
fn reconnect_direct(qemu: &mut Qemu, log: &Path) -> Reconnect {
    let socket = qemu.socket.clone();
    qemu.kill();
    let ts = Instant::now();
    *qemu = Qemu::spawn(&socket, log);
    let t0 = wait_socket_file(&socket, ts);
    let mut attempts = 0;
    loop {
        attempts += 1;
        if let Ok(mut c) = SyncClient::open(&socket, CAPS_OOB) {
            if c.cmd().unwrap_or(false) {
                break;
            }
        }
        assert!(t0.elapsed() < 3 * STEP, "QEMU did not come up");
        std::thread::sleep(Duration::from_micros(500));
    }
    Reconnect {
        detect_ms: 0.0,
        socket_ms: (t0 - ts).as_secs_f64() * 1e3,
        recover_ms: t0.elapsed().as_secs_f64() * 1e3,
        attempts,
    }
}

// ---------------------------------------------------------------------------

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------
// 7. Fair turns

/// Commands client A pipelines in section 7, and how long after them
/// client B sends its one command.
const FAIR_BURST: usize = 64;
const FAIR_DELAY: Duration = Duration::from_millis(20);
const SCHEMA: &[u8] = b"{\"execute\": \"query-qmp-schema\", \"id\": 1}";

struct FairRound {
    /// B's command: sent to its reply, ns.
    b_wait: u64,
    /// A's burst: sent to its last reply, ns.
    a_burst: u64,
    /// Bytes of A's replies (all of them).
    a_bytes: usize,
}

/// One round: A (at `a_path`) pipelines [`FAIR_BURST`] `query-qmp-schema`
/// and reads the replies as they come; [`FAIR_DELAY`] later B (at
/// `b_path`) sends one `query-status`.
async fn fair_round(a_path: &Path, b_path: &Path, caps: &'static [u8]) -> FairRound {
    let Conn {
        reader: mut a_reader,
        writer: mut a_writer,
    } = open(a_path, caps).await.expect("client A");
    let mut b = open(b_path, caps).await.expect("client B");
    let burst = SCHEMA.repeat(FAIR_BURST);
    let a_start = Instant::now();
    a_writer.write_all(&burst).await.expect("A sends");
    let a = tokio::spawn(async move {
        let (mut got, mut bytes) = (0, 0);
        let mut line = String::new();
        while got < FAIR_BURST {
            line.clear();
            let n = tokio::time::timeout(STEP * 6, a_reader.read_line(&mut line))
                .await
                .expect("A's replies")
                .expect("A reads");
            assert!(n > 0, "A: EOF");
            if !is_event(&line) {
                // (The schema itself mentions "error": look at the start.)
                assert!(line.starts_with("{\"return\""), "A: {}", &line[..line.len().min(200)]);
                got += 1;
                bytes += n;
            }
        }
        (a_start.elapsed(), bytes, a_writer)
    });
    tokio::time::sleep(FAIR_DELAY).await;
    let b_start = Instant::now();
    b.writer.write_all(CMD).await.expect("B sends");
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(STEP * 6, b.reader.read_line(&mut line))
            .await
            .expect("B's reply")
            .expect("B reads");
        assert!(n > 0, "B: EOF");
        if !is_event(&line) {
            break;
        }
    }
    let b_wait = b_start.elapsed();
    assert!(is_ok(&line), "B: {line}");
    let (a_burst, a_bytes, _w) = a.await.expect("A task");
    FairRound {
        b_wait: b_wait.as_nanos() as u64,
        a_burst: a_burst.as_nanos() as u64,
        a_bytes,
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn main() {
    if child_mode(&std::env::args().collect::<Vec<_>>()) {
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let mut plan = Plan::new(quick);
    let args: Vec<String> = std::env::args().collect();
    plan.only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let started = Instant::now();
    epoch();
    let nofile = raise_nofile();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let qemu_ver = qemu_version();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();

    let dir = tempfile::tempdir().expect("tempdir");
    let p = |n: &str| dir.path().join(n);
    let (qa, qb, fake_sock) = (p("qemu-a.sock"), p("qemu-b.sock"), p("fake.sock"));
    let (mux_qemu, mux_fake) = (p("mux-qemu.sock"), p("mux-fake.sock"));

    out!(
        "qmpmux vs direct QEMU QMP ({} run)",
        if plan.quick { "--quick" } else { "full" }
    );
    out!(
        "  qmpmux: the release binary ({}) as a subprocess, log_level=warn, for every section",
        env!("CARGO_BIN_EXE_qmpmux")
    );
    out!("  QEMU: {qemu_ver}, -M none, QMP on a unix socket; direct clients enable OOB, as qmpmux does upstream");
    out!("  load generator: this process, 2 tokio workers; {cpus} CPUs; RLIMIT_NOFILE {nofile}; commit {commit}");
    out!("  CPU columns: % of one core over the measuring window; ratios are qmpmux / baseline");

    eprintln!("starting QEMUs, fake upstream and qmpmux in {}", dir.path().display());
    let mut qemu_a = Qemu::start(&qa, &p("qemu-a.log"));
    let mut qemu_b = Qemu::start(&qb, &p("qemu-b.log"));
    let fire = fake_upstream(&fake_sock);
    let mut daemon = Daemon::start(
        &p("qmpmux.toml"),
        &daemon_config(&[("qemu", &qb, &mux_qemu), ("fake", &fake_sock, &mux_fake)], 4096),
        &p("qmpmux.log"),
        &[&mux_qemu, &mux_fake],
        None,
    );

    let mut results = json!({
        "meta": {
            "mode": if plan.quick { "quick" } else { "full" },
            "qmpmux": "release binary as a subprocess",
            "qemu": qemu_ver, "cpus": cpus, "commit": commit,
            "depth": DEPTH,
            "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        }
    });

    // 1.
    if plan.wants(1) {
        let (qr, relay) = (p("qemu-r.sock"), p("relay.sock"));
        let _qemu_r = Qemu::start(&qr, &p("qemu-r.log"));
        let _relay = Floor::start("--child-relay", &relay, &qr);
        results["sequential"] = bench_sequential(&plan, &qa, &mux_qemu, &relay);
    }

    // 2.
    let scen = |label: &str, path: &Path, caps, clients, via_mux, upstream_pid| Scenario {
        label: label.into(),
        path: path.to_owned(),
        caps,
        clients,
        via_mux,
        upstream_pid,
    };
    let (pa, pb, me) = (qemu_a.pid(), qemu_b.pid(), std::process::id());
    let mut base = 0.0;
    if plan.wants(2) {
        let rows2 = rt.block_on(tput_group(
            &plan,
            &[
                scen("direct QEMU", &qa, CAPS_OOB, 1, false, pa),
                scen("via qmpmux", &mux_qemu, CAPS, 1, true, pb),
                scen("via qmpmux", &mux_qemu, CAPS, 16, true, pb),
                scen("via qmpmux", &mux_qemu, CAPS, 64, true, pb),
            ],
            daemon.pid(),
        ));
        base = rows2[0].median.rate;
        out!(
        "\n2. Pipelined query-status throughput, {DEPTH} in flight per client ({} rep(s) x {:.1} s per row, interleaved; median [min - max])",
        plan.tput_reps,
        plan.tput_window.as_secs_f64()
    );
        print_tput(&rows2, base, "vs direct", "QEMU CPU");
        results["throughput_qemu"] = json!({
            "direct_baseline_cmds_per_s": base,
            "rows": rows2.iter().map(|r| tput_json(r, base)).collect::<Vec<_>>(),
        });
    }

    // 3.
    if plan.wants(3) {
        let rows3 = rt.block_on(tput_group(
            &plan,
            &[
                scen("fake upstream", &mux_fake, CAPS, 1, true, me),
                scen("fake upstream", &mux_fake, CAPS, 16, true, me),
                scen("fake upstream", &mux_fake, CAPS, 64, true, me),
            ],
            daemon.pid(),
        ));
        out!(
            "\n3. qmpmux ceiling: instant-reply fake upstream (in the bench process), one upstream session (window 8)"
        );
        print_tput(&rows3, base, "vs QEMU", "bench CPU");
        results["throughput_fake"] = json!({
            "note": "ratio is vs the direct-QEMU baseline of section 2; upstream CPU is this bench process (fake + clients)",
            "rows": rows3.iter().map(|r| tput_json(r, base)).collect::<Vec<_>>(),
        });
    }

    // 4.
    if plan.wants(4) {
        let (fake_b, bcast) = (p("fake-b.sock"), p("broadcast.sock"));
        let fire_b = fake_upstream(&fake_b);
        let _bcast = Floor::start("--child-broadcast", &bcast, &fake_b);
        let mut fan: Vec<FanRow> = Vec::new();
        let mut floor: Vec<FanRow> = Vec::new();
        for &(n, ev) in &plan.fanout {
            floor.push(rt.block_on(fanout_once(&plan, &bcast, &fire_b, n, ev)));
            fan.push(rt.block_on(fanout_once(&plan, &mux_fake, &fire, n, ev)));
        }
        out!("\n4. Event fan-out latency: fake upstream -> qmpmux -> N clients (stamped before the upstream write, read by each client)");
        out!("   floor: a bare broadcaster process in qmpmux's place (one thread: read a line, write it to each client in turn)");
        out!(
            "   {:<8}{:>8}{:>8}{:>11}{:>10}{:>10}{:>10}{:>17}{:>14}",
            "path",
            "clients",
            "events",
            "delivered",
            "p50 us",
            "p99 us",
            "max us",
            "last-client p50",
            "p50 vs 1 cl."
        );
        let fan_base = fan.first().map(|f| f.p50).unwrap_or(0) as f64;
        let floor_base = floor.first().map(|f| f.p50).unwrap_or(0) as f64;
        for (f, b) in fan.iter().zip(&floor) {
            for (name, row, base) in [("floor", b, floor_base), ("qmpmux", f, fan_base)] {
                out!(
                    "   {:<8}{:>8}{:>8}{:>11}{:>10.1}{:>10.1}{:>10.1}{:>17.1}{:>13.1}x",
                    name,
                    row.clients,
                    row.events,
                    row.delivered,
                    us(row.p50),
                    us(row.p99),
                    us(row.max),
                    us(row.last_p50),
                    ratio(row.p50 as f64, base)
                );
            }
            out!(
                "   {:<8}{:>8}   p50 {:.2}x, p99 {:.2}x, last-client p50 {:.2}x",
                "ratio",
                "",
                ratio(f.p50 as f64, b.p50 as f64),
                ratio(f.p99 as f64, b.p99 as f64),
                ratio(f.last_p50 as f64, b.last_p50 as f64)
            );
        }
        results["fanout"] = json!(fan
            .iter()
            .zip(&floor)
            .map(|(f, b)| json!({
                "clients": f.clients, "events": f.events, "delivered": f.delivered,
                "p50_us": us(f.p50), "p99_us": us(f.p99), "max_us": us(f.max),
                "last_client_p50_us": us(f.last_p50),
                "p50_ratio_vs_1_client": ratio(f.p50 as f64, fan_base),
                "floor": {"p50_us": us(b.p50), "p99_us": us(b.p99), "max_us": us(b.max), "last_client_p50_us": us(b.last_p50)},
                "ratio_vs_floor_p50": ratio(f.p50 as f64, b.p50 as f64),
                "ratio_vs_floor_p99": ratio(f.p99 as f64, b.p99 as f64),
            }))
            .collect::<Vec<_>>());
    }

    // 7. (measured here, on the daemon of 1-4, before 6 restarts its QEMU)
    if plan.wants(7) {
        progress("fair turns");
        let (f1, f2) = (p("qemu-f1.sock"), p("qemu-f2.sock"));
        let _qemu_f = Qemu::start_monitors(&[&f1, &f2], &p("qemu-f.log"));
        let mut direct = Vec::new();
        let mut via = Vec::new();
        for _ in 0..plan.fair_rounds {
            direct.push(rt.block_on(fair_round(&f1, &f2, CAPS_OOB)));
            via.push(rt.block_on(fair_round(&mux_qemu, &mux_qemu, CAPS)));
        }
        out!(
            "\n7. Fair turns: client A pipelines {FAIR_BURST} query-qmp-schema ({} KB of replies each, read as they come); {} ms later client B sends one query-status",
            direct[0].a_bytes / FAIR_BURST / 1000,
            FAIR_DELAY.as_millis()
        );
        out!("   direct: A and B on two -qmp monitors of one QEMU (QEMU's own turns between monitors); via qmpmux: both on one qmpmux socket, one upstream monitor (QEMU identical)");
        out!(
            "   {:>5}{:>18}{:>22}{:>20}{:>24}",
            "round",
            "B wait direct ms",
            "B wait via qmpmux ms",
            "A burst direct ms",
            "A burst via qmpmux ms"
        );
        for (i, (d, v)) in direct.iter().zip(&via).enumerate() {
            out!(
                "   {:>5}{:>18.1}{:>22.1}{:>20.1}{:>24.1}",
                i + 1,
                ms(d.b_wait),
                ms(v.b_wait),
                ms(d.a_burst),
                ms(v.a_burst)
            );
        }
        let med =
            |v: &[FairRound], f: fn(&FairRound) -> u64| median_f(&v.iter().map(|r| f(r) as f64).collect::<Vec<_>>());
        let (bd, bv) = (med(&direct, |r| r.b_wait), med(&via, |r| r.b_wait));
        let (ad, av) = (med(&direct, |r| r.a_burst), med(&via, |r| r.a_burst));
        out!(
            "   {:>5}{:>18.1}{:>22.1}{:>20.1}{:>24.1}",
            "p50",
            bd / 1e6,
            bv / 1e6,
            ad / 1e6,
            av / 1e6
        );
        out!(
            "   => B waits {:.2}x as long through qmpmux as on its own QEMU monitor (goal <= 2x); A's burst takes {:.2}x",
            ratio(bv, bd),
            ratio(av, ad)
        );
        let rounds = |v: &[FairRound]| {
            v.iter()
                .map(|r| json!({"b_wait_ms": ms(r.b_wait), "a_burst_ms": ms(r.a_burst)}))
                .collect::<Vec<_>>()
        };
        results["fairness"] = json!({
            "burst": FAIR_BURST, "delay_ms": FAIR_DELAY.as_millis() as u64,
            "reply_bytes": direct[0].a_bytes / FAIR_BURST,
            "direct": rounds(&direct), "via_qmpmux": rounds(&via),
            "b_wait_p50_ms": {"direct": bd / 1e6, "via_qmpmux": bv / 1e6},
            "a_burst_p50_ms": {"direct": ad / 1e6, "via_qmpmux": av / 1e6},
            "b_wait_ratio": ratio(bv, bd), "a_burst_ratio": ratio(av, ad),
        });
    }

    // 6. (measured before 5, on the daemon of 1-4; printed last)
    if plan.wants(6) {
        progress("reconnect after QEMU restart");
    }
    let mut rc_client = SyncClient::open(&mux_qemu, CAPS).expect("reconnect client");
    let mut mux_runs = Vec::new();
    let mut direct_runs = Vec::new();
    for _ in 0..if plan.wants(6) { plan.reconnects } else { 0 } {
        mux_runs.push(reconnect_mux(&mut qemu_b, &p("qemu-b.log"), &mut rc_client));
        direct_runs.push(reconnect_direct(&mut qemu_a, &p("qemu-a.log")));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(rc_client);
    daemon.kill();
    drop(qemu_a);
    drop(qemu_b);

    // 5.
    if plan.wants(5) {
        let mem_clients = plan.mem_clients.min(nofile.saturating_sub(200) as usize);
        progress(&format!("memory with {mem_clients} idle clients"));
        let (qc, mux_mem) = (p("qemu-c.sock"), p("mux-mem.sock"));
        let qemu_c = Qemu::start(&qc, &p("qemu-c.log"));
        // Started with a soft fd limit of 1024 (systemd's default): qmpmux must
        // raise its own limit to serve 10,000 clients.
        let mem_daemon = Daemon::start(
            &p("qmpmux-mem.toml"),
            &daemon_config(&[("mem", &qc, &mux_mem)], 20_000),
            &p("qmpmux-mem.log"),
            &[&mux_mem],
            Some(1024),
        );
        let daemon_nofile = nofile_of(mem_daemon.pid());
        let mem = rt.block_on(memory_clients(&mux_mem, mem_daemon.pid(), mem_clients));
        let qemu_rss = rss_kib(qemu_c.pid());
        let mem_log = std::fs::read_to_string(&mem_daemon.log).unwrap_or_default();
        drop(mem_daemon);
        drop(qemu_c);

        let grown = mem.rss_after.saturating_sub(mem.rss_before);
        let per_client = grown as f64 / mem.clients.max(1) as f64;
        out!("\n5. Memory per idle negotiated client (fresh qmpmux on a real QEMU, [client] max_clients = 20000)");
        out!(
            "   qmpmux started with RLIMIT_NOFILE soft 1024, runs with {} (its own raise); daemon fds with clients: {}",
            daemon_nofile.map_or("?".into(), |v| v.to_string()),
            mem.fds_after
        );
        out!(
        "   {} of {} clients connected and negotiated in {:.2} s ({} clients/s); a command on one still answered: {}",
        mem.clients,
        mem.wanted,
        mem.connect_secs,
        thousands(mem.clients as f64 / mem.connect_secs.max(1e-9)),
        if mem.still_works { "yes" } else { "NO" }
    );
        if let Some(e) = &mem.failure {
            out!("   !! connecting stopped at the first failure: {e}");
        }
        out!(
        "   qmpmux VmRSS: {} KiB before, {} KiB with the clients, {} KiB after they all closed, {} KiB with a second wave",
        thousands(mem.rss_before as f64),
        thousands(mem.rss_after as f64),
        thousands(mem.rss_closed as f64),
        thousands(mem.rss_second as f64)
    );
        out!(
            "   => {:.2} KiB per idle client; all {} together: {:.2}x the RSS of the QEMU they share ({} KiB)",
            per_client,
            mem.clients,
            ratio(grown as f64, qemu_rss as f64),
            thousands(qemu_rss as f64)
        );
        let accept_errors = mem_log.lines().filter(|l| l.contains("cannot accept client")).count();
        if accept_errors > 0 {
            out!("   !! qmpmux logged {accept_errors} 'cannot accept client' errors (fd limit?)");
        }
        results["memory"] = json!({
            "clients_wanted": mem.wanted, "clients": mem.clients, "failure": mem.failure,
            "connect_secs": mem.connect_secs,
            "rss_before_kib": mem.rss_before, "rss_after_kib": mem.rss_after, "rss_closed_kib": mem.rss_closed, "rss_second_wave_kib": mem.rss_second,
            "kib_per_client": per_client, "daemon_fds": mem.fds_after, "daemon_nofile_soft": daemon_nofile,
            "qemu_rss_kib": qemu_rss, "command_answered": mem.still_works, "accept_errors_logged": accept_errors,
        });
    }

    // 6.
    if plan.wants(6) {
        out!("\n6. Reconnect: QEMU killed (SIGKILL) and restarted; t0 = its socket file appears (stat), t1 = first successful query-status");
        out!("   via qmpmux: an already-connected client retries every 0.5 ms (qmpmux: backoff 50 ms initial, x2, max 1 s, +-10%, cut short by a watch for the socket file)");
        out!("   direct: a new client tries to connect every 0.5 ms from t0 (the best a client of QEMU itself can do)");
        out!(
            "   {:>4}{:>17}{:>17}{:>22}{:>17}{:>12}",
            "run",
            "kill->error ms",
            "spawn->socket ms",
            "t1-t0 via qmpmux ms",
            "t1-t0 direct ms",
            "ratio"
        );
        for (i, (m, d)) in mux_runs.iter().zip(&direct_runs).enumerate() {
            out!(
                "   {:>4}{:>17.1}{:>17.1}{:>22.1}{:>17.1}{:>11.1}x",
                i + 1,
                m.detect_ms,
                m.socket_ms,
                m.recover_ms,
                d.recover_ms,
                ratio(m.recover_ms, d.recover_ms)
            );
        }
        let med = |runs: &[Reconnect], f: fn(&Reconnect) -> f64| median_f(&runs.iter().map(f).collect::<Vec<_>>());
        let (md, ms, mr, dr) = (
            med(&mux_runs, |r| r.detect_ms),
            med(&mux_runs, |r| r.socket_ms),
            med(&mux_runs, |r| r.recover_ms),
            med(&direct_runs, |r| r.recover_ms),
        );
        out!(
            "   {:>4}{:>17.1}{:>17.1}{:>22.1}{:>17.1}{:>11.1}x   (qmpmux adds {:+.1} ms at the median)",
            "med",
            md,
            ms,
            mr,
            dr,
            ratio(mr, dr),
            mr - dr
        );
        let runs_json = |runs: &[Reconnect]| {
            runs.iter()
                .map(|r| {
                    json!({
                        "kill_to_error_ms": r.detect_ms, "spawn_to_socket_ms": r.socket_ms,
                        "socket_to_success_ms": r.recover_ms, "attempts": r.attempts,
                    })
                })
                .collect::<Vec<_>>()
        };
        results["reconnect"] = json!({
            "via_qmpmux": runs_json(&mux_runs), "direct": runs_json(&direct_runs),
            "median_socket_to_success_ms": mr, "median_direct_socket_to_success_ms": dr,
            "ratio": ratio(mr, dr), "median_kill_to_error_ms": md, "median_spawn_to_socket_ms": ms,
        });
    }

    let total = started.elapsed().as_secs_f64();
    results["meta"]["wall_secs"] = json!(total);
    let path = target_dir().join("bench-results.json");
    let _ = std::fs::create_dir_all(target_dir());
    match std::fs::write(&path, serde_json::to_string_pretty(&results).unwrap_or_default()) {
        Ok(()) => out!("\nwhole run {total:.1} s; results also in {}", path.display()),
        Err(e) => out!("\nwhole run {total:.1} s; cannot write {}: {e}", path.display()),
    }
    drop(fire);
}
