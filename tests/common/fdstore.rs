//! systemd's file descriptor store, scripted: the `NOTIFY_SOCKET` qmpmux
//! sends `FDSTORE=1`/`FDSTOREREMOVE=1` to (with the fds), and a start of
//! qmpmux with what it holds as `LISTEN_FDS`/`LISTEN_FDNAMES`, as systemd
//! does after a restart or a crash. For what the real systemd cannot do on
//! demand in a test (a `kill -9` at a chosen point, a corrupt state); the
//! real one is proven in `.ci/systemd-test`. [`Supervised`]: qmpmux's
//! binary run under it, for the handover tests and the benchmark.

use super::process::{guard_child, log_file};
use super::STEP;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct FakeStore {
    inner: Arc<Mutex<Inner>>,
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

struct Inner {
    sock: UnixDatagram,
    /// Name -> fds, as systemd keeps them (several may share a name).
    fds: BTreeMap<String, Vec<OwnedFd>>,
}

impl FakeStore {
    /// A store whose socket is read all the time (as systemd reads its
    /// own: a sender must not wait).
    pub fn new(dir: &Path) -> FakeStore {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            sock,
            fds: BTreeMap::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (reader, stopped) = (inner.clone(), stop.clone());
        let fd = reader.lock().unwrap().sock.as_raw_fd();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                // Waits for a message (or 20 ms), as systemd's event loop
                // would, then takes all there are.
                let mut pfd = [libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd; the socket outlives this thread's
                // use of it (the store owns it, `stop` ends the loop first).
                unsafe { libc::poll(pfd.as_mut_ptr(), 1, 20) };
                reader.lock().unwrap().drain();
            }
        });
        FakeStore { inner, path, stop }
    }

    /// Takes every notification sent so far into the store.
    pub fn pump(&mut self) {
        self.inner.lock().unwrap().drain();
    }
}

impl Drop for FakeStore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Inner {
    fn drain(&mut self) {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        loop {
            let mut buf = [0u8; 4096];
            let mut cmsg = nix::cmsg_space!([RawFd; 16]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(e) => panic!("recvmsg: {e}"),
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(got) = c {
                    // SAFETY: the kernel just installed these fds for us.
                    fds.extend(got.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
            let n = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_string();
            if text.lines().any(|l| l == "FDSTORE=1") {
                self.fds.entry(name).or_default().extend(fds);
            } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                self.fds.remove(&name);
            }
        }
    }
}

impl FakeStore {
    /// The names held now.
    pub fn names(&mut self) -> Vec<String> {
        self.pump();
        self.inner.lock().unwrap().fds.keys().cloned().collect()
    }

    /// Takes the (last) fd stored under `name` out of the store.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.pump();
        let mut inner = self.inner.lock().unwrap();
        let fds = inner.fds.get_mut(name)?;
        let fd = fds.pop();
        if fds.is_empty() {
            inner.fds.remove(name);
        }
        fd
    }

    /// Puts `fd` under `name`, replacing what was there.
    pub fn replace(&mut self, name: &str, fd: OwnedFd) {
        self.pump();
        self.inner.lock().unwrap().fds.insert(name.to_string(), vec![fd]);
    }

    /// `exe ARGS` started as systemd starts a service: `NOTIFY_SOCKET` set,
    /// and the stored fds given from fd 3 (`LISTEN_FDS`, `LISTEN_FDNAMES`,
    /// `LISTEN_PID` the service's own pid, through `sh -c exec`).
    pub fn command(&mut self, exe: &Path, args: &[&std::ffi::OsStr]) -> Command {
        self.pump();
        let inner = self.inner.lock().unwrap();
        let mut names = Vec::new();
        let mut raw = Vec::new();
        for (name, fds) in &inner.fds {
            for fd in fds {
                names.push(name.clone());
                raw.push(fd.as_raw_fd());
            }
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(exe)
            .args(args)
            .env("NOTIFY_SOCKET", &self.path)
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let n = raw.len() as RawFd;
        // Allocated here: nothing may allocate between fork and exec.
        let mut high: Vec<RawFd> = vec![0; raw.len()];
        // SAFETY: only fcntl and dup2 (async-signal-safe) between fork and
        // exec; the fds stay open in the parent meanwhile.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                for (i, fd) in raw.iter().enumerate() {
                    let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3 + n);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high[i] = h;
                }
                for (i, h) in high.iter().enumerate() {
                    if libc::dup2(*h, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd
    }
}

/// qmpmux under a scripted file descriptor store (see `common::fdstore`):
/// started with what the store holds, like systemd does.
pub struct Supervised {
    pub store: FakeStore,
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
    /// Its `RUST_LOG`.
    pub rust_log: &'static str,
}

impl Supervised {
    /// Writes `config` (to `dir/qmpmux.toml`); nothing runs yet.
    pub fn new(dir: &Path, config: &str) -> Supervised {
        std::fs::write(dir.join("qmpmux.toml"), config).unwrap();
        Supervised {
            store: FakeStore::new(dir),
            child: None,
            dir: dir.to_owned(),
            log: dir.join("qmpmux.log"),
            rust_log: "qmpmux=info",
        }
    }

    /// Starts qmpmux with what the store holds; waits until `listen` greets.
    pub fn start(&mut self, listen: &Path) {
        let config = self.dir.join("qmpmux.toml");
        let mut cmd = self.store.command(
            Path::new(env!("CARGO_BIN_EXE_qmpmux")),
            &[std::ffi::OsStr::new("--config"), config.as_os_str()],
        );
        cmd.env("RUST_LOG", self.rust_log)
            .stdin(Stdio::null())
            .stdout(log_file(&self.log))
            .stderr(log_file(&self.log));
        guard_child(&mut cmd, None);
        self.child = Some(cmd.spawn().expect("spawn qmpmux"));
        let deadline = Instant::now() + STEP;
        assert!(
            super::ready::wait_greeted_blocking(listen, deadline, Duration::from_millis(1)),
            "qmpmux did not serve; log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, then what it stored is all there is.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        self.store.pump();
    }

    /// SIGTERM, as systemd stops (or restarts) it; waits for the exit.
    pub fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if let Some(mut c) = self.child.take() {
            assert!(c.wait().unwrap().success(), "log:\n{}", self.log());
        }
        self.store.pump();
    }

    /// How many times its log says `what`.
    pub fn count(&self, what: &str) -> usize {
        self.log().matches(what).count()
    }

    /// Sends `sig` to it.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = self.child.as_ref().map_or(0, |c| c.id() as i32);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal qmpmux");
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
