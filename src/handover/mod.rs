//! Keeping what is live across a restart of qmpmux itself.
//!
//! Everything a successor needs to take over without anyone noticing is a
//! file descriptor: the listening sockets (connections made meanwhile wait
//! in their backlog), the connections to QEMU (QEMU's monitor serves one
//! client; while any process holds the connection open, events wait in the
//! socket) and each VM's event journal (a memfd, see
//! `events::journal`). The [`Keeper`] holds a duplicate of each under a
//! name, and mirrors it into systemd's file descriptor store when qmpmux
//! runs under a unit that has one (`FDSTORE=1`, `FDNAME=`): systemd keeps
//! them through a restart, a package upgrade and a crash, and gives them
//! back to the next process as `LISTEN_FDS`/`LISTEN_FDNAMES`. A re-execution
//! in place (`SIGUSR2`) passes the same fds the same way itself
//! ([`exec::reexec`]), so a starting qmpmux has one path whatever came
//! before: [`Inherited`] by name.
//!
//! At a handover (re-execution, or `SIGTERM` under systemd, which may be a
//! restart) each unix client is kept too, between two of its requests, with
//! a [`state`] describing it; the successor serves it from where it stood.
//!
//! Names (see [`names`]): `listen.N.DEV.INO.VM` (listener N of VM, in
//! `all_listeners` order, and its socket file), `upstream.DEV.INO.VM`
//! (accept mode: where QEMU dials in), `qemu.VM` (the connection to QEMU's
//! monitor), `journal.VM`, `control.DEV.INO`, and at a handover
//! `client.ID.VM`, `passed.ID.VM` (an fd that client passed) and `state`.
//! VM names are letters, digits, `-`, `_` and `.`, so no name holds the `:`
//! that separates them in `LISTEN_FDNAMES`.

pub mod exec;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tracing::{debug, info, warn};

/// The names fds are kept under. A socket file's device and inode are
/// part of its listener's name: a successor takes the listener only if
/// the file at the path is still that one (the socket is bound under
/// another name and renamed into place, so its own address says nothing).
/// The VM's name comes last: it may hold dots.
pub mod names {
    /// Listener `n` of VM `vm` (0: its main socket), whose socket file is
    /// `file` (device, inode; none for TCP).
    pub fn listen(vm: &str, n: usize, file: Option<(u64, u64)>) -> String {
        let (dev, ino) = file.unwrap_or_default();
        format!("listen.{n}.{dev}.{ino}.{vm}")
    }
    /// Accept mode: the socket QEMU dials in to.
    pub fn upstream(vm: &str, file: (u64, u64)) -> String {
        format!("upstream.{}.{}.{vm}", file.0, file.1)
    }
    /// The connection to QEMU's monitor.
    pub fn qemu(vm: &str) -> String {
        format!("qemu.{vm}")
    }
    /// The VM's event journal.
    pub fn journal(vm: &str) -> String {
        format!("journal.{vm}")
    }
    /// A client's connection, handed over.
    pub fn client(vm: &str, id: u64) -> String {
        format!("client.{id}.{vm}")
    }
    /// The fd a client passed that waits for its `getfd`, handed over.
    pub fn passed(vm: &str, id: u64) -> String {
        format!("passed.{id}.{vm}")
    }
    /// The handover state (see `state`).
    pub const STATE: &str = "state";
    /// The control socket.
    pub fn control(file: (u64, u64)) -> String {
        format!("control.{}.{}", file.0, file.1)
    }

    /// A name taken apart.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Parsed<'a> {
        pub kind: &'a str,
        pub listener: Option<usize>,
        /// A client's number (`client`, `passed`).
        pub client: Option<u64>,
        pub file: Option<(u64, u64)>,
        pub vm: Option<&'a str>,
    }

    /// Takes `name` apart; `None` for a name qmpmux does not give.
    pub fn parse(name: &str) -> Option<Parsed<'_>> {
        let (kind, rest) = name.split_once('.')?;
        let num = |s: &str| s.parse::<u64>().ok();
        let mut p = Parsed {
            kind,
            listener: None,
            client: None,
            file: None,
            vm: None,
        };
        match kind {
            "listen" => {
                let mut f = rest.splitn(4, '.');
                p.listener = Some(f.next()?.parse().ok()?);
                p.file = Some((num(f.next()?)?, num(f.next()?)?));
                p.vm = Some(f.next()?);
            }
            "upstream" => {
                let mut f = rest.splitn(3, '.');
                p.file = Some((num(f.next()?)?, num(f.next()?)?));
                p.vm = Some(f.next()?);
            }
            "control" => {
                let (dev, ino) = rest.split_once('.')?;
                p.file = Some((num(dev)?, num(ino)?));
            }
            "client" | "passed" => {
                let (id, vm) = rest.split_once('.')?;
                p.client = Some(id.parse().ok()?);
                p.vm = Some(vm);
            }
            "state" => return None,
            "qemu" | "journal" => p.vm = Some(rest),
            _ => return None,
        }
        p.vm.is_none_or(|v| !v.is_empty()).then_some(p)
    }
}

/// Handovers so far (carried from process to process in the state), for
/// `qmpmux status` and metrics.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Handovers (re-executions, restarts under systemd) since qmpmux last
    /// started from nothing.
    pub handovers: u64,
    /// Starts from what a crash left (and from a state that could not be
    /// read: `fallbacks`).
    pub crash_recoveries: u64,
    pub fallbacks: u64,
    /// The last handover's pause: from the old process stopping to serve
    /// to the new one serving, in seconds.
    pub last_pause_seconds: Option<f64>,
    /// Clients the last handover moved.
    pub clients_handed_over: u64,
    /// Clients the last handover closed instead (TLS ones; those that left
    /// while it waited for their commands).
    #[serde(default)]
    pub clients_closed: u64,
}

impl Counts {
    /// The counts of a process that took over from the one that wrote
    /// `state`.
    pub fn after(state: &state::State) -> Counts {
        let now = crate::events::History::first_number();
        Counts {
            handovers: state.handovers + 1,
            crash_recoveries: state.crash_recoveries,
            fallbacks: state.fallbacks,
            last_pause_seconds: Some(now.saturating_sub(state.frozen_at_us) as f64 / 1e6),
            clients_handed_over: state.vms.iter().map(|v| v.clients.len() as u64).sum(),
            clients_closed: state.clients_closed,
        }
    }
}

/// What a starting qmpmux was handed, and what it keeps for the next one.
#[derive(Debug)]
pub struct Handover {
    pub keeper: std::sync::Arc<Keeper>,
    pub inherited: Inherited,
    /// A state was handed over but could not be read.
    pub fallback: bool,
}

impl Handover {
    /// Nothing inherited, nothing kept: tests in process, and the default.
    pub fn none() -> Handover {
        Handover {
            keeper: std::sync::Arc::new(Keeper::disabled()),
            inherited: Inherited::none(),
            fallback: false,
        }
    }

    /// The fd inherited as `name`, if any; one that is not used must be
    /// [`Keeper::release`]d.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.inherited.take(name)
    }

    /// The state the previous process wrote when it handed over, if it
    /// did and it can be read; taken out of systemd's store (a crash later
    /// must not find it). One that cannot be read is logged: the clients
    /// it describes are closed, and what a crash leaves (the journal, the
    /// connection to QEMU, the listeners) is used.
    pub fn take_state(&mut self) -> Option<state::State> {
        let fd = self.inherited.take(names::STATE)?;
        self.keeper.release(names::STATE);
        let decoded = state::from_fd(fd)
            .map_err(|e| e.to_string())
            .and_then(|bytes| state::decode(&bytes).map_err(|e| e.to_string()));
        match decoded {
            Ok(s) => {
                let clients: usize = s.vms.iter().map(|v| v.clients.len()).sum();
                info!(from = %s.version, clients, "taking over from the previous qmpmux process");
                Some(s)
            }
            Err(e) => {
                warn!(error = %e, "the handover state cannot be read: its clients are closed; going on as after a crash");
                self.fallback = true;
                None
            }
        }
    }

    /// Whether this start follows a crash (or a state that could not be
    /// read): fds were handed over (by systemd's store) without a state.
    pub fn after_crash(&self) -> bool {
        self.fallback || !self.inherited.is_empty()
    }
}

/// File descriptors handed over by the previous process, by name.
#[derive(Debug, Default)]
pub struct Inherited {
    fds: HashMap<String, Vec<OwnedFd>>,
}

impl Inherited {
    /// Nothing inherited (tests, and a start with no predecessor).
    pub fn none() -> Inherited {
        Inherited::default()
    }

    /// What systemd (or the process that re-executed this one) passed:
    /// `LISTEN_FDS` fds from fd 3, named by `LISTEN_FDNAMES`, if
    /// `LISTEN_PID` is this process. The variables are removed (so that
    /// programs qmpmux starts do not see them) and each fd gets
    /// close-on-exec. A malformed set is logged and ignored.
    pub fn from_env() -> Inherited {
        let fds = match sd_notify::listen_fds_with_names(true) {
            Ok(fds) => fds.collect::<Vec<_>>(),
            Err(e) => {
                warn!(error = %e, "ignoring the file descriptors passed by the previous process");
                return Inherited::none();
            }
        };
        let mut out = Inherited::none();
        for (fd, name) in fds {
            if let Some(fd) = own(fd) {
                out.fds.entry(name).or_default().push(fd);
            }
        }
        out
    }

    /// Logs what was handed over (once logging is set up).
    pub fn log(&self) {
        if self.fds.is_empty() {
            return;
        }
        let mut names: Vec<&str> = self.fds.keys().map(String::as_str).collect();
        names.sort_unstable();
        let shown: Vec<&str> = names.iter().copied().filter(|n| !n.starts_with("client.")).collect();
        info!(
            count = self.fds.values().map(Vec::len).sum::<usize>(),
            clients = names.len() - shown.len(),
            names = %shown.join(" "),
            "file descriptors handed over"
        );
    }

    /// Builds a set from fds and names (for tests).
    pub fn from_fds(fds: impl IntoIterator<Item = (String, OwnedFd)>) -> Inherited {
        let mut out = Inherited::none();
        for (name, fd) in fds {
            out.fds.entry(name).or_default().push(fd);
        }
        out
    }

    /// An fd of `kind` (and listener number) for VM `vm` (`None`: the
    /// control socket), with its name.
    pub fn take_socket(&mut self, kind: &str, listener: Option<usize>, vm: Option<&str>) -> Option<(String, OwnedFd)> {
        let name = self
            .fds
            .keys()
            .find(|n| names::parse(n).is_some_and(|p| p.kind == kind && p.listener == listener && p.vm == vm))?
            .clone();
        let fd = self.take(&name)?;
        Some((name, fd))
    }

    /// The fd kept under `name` (the last one, if several were), if any.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let list = self.fds.get_mut(name)?;
        let fd = list.pop();
        if list.is_empty() {
            self.fds.remove(name);
        }
        fd
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Closes what nobody took (a VM no longer configured, a socket the
    /// configuration moved), saying which, and takes it out of systemd's
    /// store: a connection to QEMU left there would keep QEMU's monitor
    /// from anyone else.
    pub fn close_rest(&mut self, keeper: &Keeper) {
        for (name, fds) in self.fds.drain() {
            info!(%name, count = fds.len(), "handed-over file descriptor no longer needed; closed");
            keeper.release(&name);
        }
    }
}

/// Takes ownership of an fd `LISTEN_FDS` passed to this process, once it
/// is known to be open.
fn own(fd: RawFd) -> Option<OwnedFd> {
    if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
        warn!(fd, "a handed-over file descriptor is not open; ignored");
        return None;
    }
    // SAFETY: the fd is open (checked above) and was passed to this process
    // under the LISTEN_FDS protocol, which gives it to the process alone:
    // nothing else in it knows or closes this number (`listen_fds_with_names`
    // has just removed the variables that name it).
    #[allow(unsafe_code)]
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Duplicates of every fd a successor needs, by name, mirrored into
/// systemd's file descriptor store when there is one. Disabled (tests in
/// process, `handover = false`): it keeps nothing.
#[derive(Debug)]
pub struct Keeper {
    enabled: bool,
    /// Mirror into systemd's store (`NOTIFY_SOCKET` is set).
    systemd: bool,
    /// Sends to systemd's store from a thread of its own: a send may wait
    /// (systemd busy, a burst of clients at a handover), and must not hold
    /// up a thread that serves VMs.
    store: Option<Mutex<std::sync::mpsc::Sender<StoreOp>>>,
    kept: Mutex<BTreeMap<String, OwnedFd>>,
    /// The process is handing over: what stops from now on stays kept
    /// (and socket files stay in place).
    frozen: AtomicBool,
    /// ... by re-executing itself: what it keeps from now on goes to the
    /// next program directly, not through systemd's store.
    exec: AtomicBool,
}

impl Keeper {
    /// A keeper that keeps nothing.
    pub fn disabled() -> Keeper {
        Keeper {
            enabled: false,
            systemd: false,
            store: None,
            kept: Mutex::default(),
            frozen: AtomicBool::new(false),
            exec: AtomicBool::new(false),
        }
    }

    /// A keeper for the daemon: it keeps fds for a re-execution, and for
    /// systemd's store when `NOTIFY_SOCKET` is set.
    pub fn for_daemon() -> Keeper {
        let systemd = std::env::var_os("NOTIFY_SOCKET").is_some();
        Keeper {
            enabled: true,
            systemd,
            store: systemd.then(|| Mutex::new(spawn_store_sender())),
            ..Keeper::disabled()
        }
    }

    /// Waits (up to `within`) until everything given to systemd's store so
    /// far has been sent: before the process exits or re-executes.
    pub fn flush(&self, within: std::time::Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(StoreOp::Flush(tx));
        self.store.is_none() || rx.recv_timeout(within).is_ok()
    }

    fn send(&self, op: StoreOp) {
        if let Some(store) = &self.store {
            let _ = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner).send(op);
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether systemd's file descriptor store holds what is kept, so that a
    /// stop by systemd may be a restart: the successor needs the socket
    /// files where they are.
    pub fn under_systemd(&self) -> bool {
        self.enabled && self.systemd
    }

    /// Keeps a duplicate of `fd` under `name`, replacing what was kept
    /// under it.
    pub fn keep(&self, name: &str, fd: BorrowedFd<'_>) {
        self.keep_as(name, fd, true);
    }

    /// [`Keeper::keep`] for a name nothing was kept under (a client handed
    /// over): systemd's store needs no removal first, one message instead
    /// of two per client at a handover.
    pub fn keep_new(&self, name: &str, fd: BorrowedFd<'_>) {
        self.keep_as(name, fd, false);
    }

    fn keep_as(&self, name: &str, fd: BorrowedFd<'_>, replace: bool) {
        if !self.enabled {
            return;
        }
        let dup = match fd.try_clone_to_owned() {
            Ok(d) => d,
            Err(e) => {
                warn!(%name, error = %e, "cannot keep a file descriptor for a restart of qmpmux");
                return;
            }
        };
        if self.systemd && !self.exec.load(Ordering::SeqCst) {
            // Remove first: the store keeps every fd given a name.
            if replace {
                self.send(StoreOp::Remove(name.to_string()));
            }
            match dup.try_clone() {
                Ok(fd) => self.send(StoreOp::Store(name.to_string(), fd)),
                Err(e) => warn!(%name, error = %e, "cannot put a file descriptor in systemd's store"),
            }
        }
        debug!(%name, "kept for a restart of qmpmux");
        self.lock().insert(name.to_string(), dup);
    }

    /// Keeps `fd`, handed over under `name` and still in systemd's store,
    /// for a re-execution (the store is left as it is: taking it out and
    /// putting it back would lose it to a crash in between).
    pub fn adopted(&self, name: &str, fd: BorrowedFd<'_>) {
        if !self.enabled {
            return;
        }
        match fd.try_clone_to_owned() {
            Ok(dup) => {
                self.lock().insert(name.to_string(), dup);
            }
            Err(e) => warn!(%name, error = %e, "cannot keep a file descriptor for a restart of qmpmux"),
        }
    }

    /// Stops keeping `name` (the connection ended, the VM went). Ignored
    /// once the process is handing over.
    pub fn forget(&self, name: &str) {
        if !self.enabled || self.is_frozen() {
            return;
        }
        if self.lock().remove(name).is_some() && self.systemd {
            self.send(StoreOp::Remove(name.to_string()));
        }
    }

    /// Takes `name` out of systemd's store whether or not this process
    /// kept it (an inherited fd it does not use).
    pub fn release(&self, name: &str) {
        if self.under_systemd() {
            self.send(StoreOp::Remove(name.to_string()));
        }
    }

    /// From now on, what stops stays kept: the process hands over.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// [`Keeper::freeze`], to re-execute: the next program gets what is
    /// kept from now on as its fds, so systemd's store is left alone (if
    /// the exec fails, the process exits, and a restart takes what the
    /// store already held, as after a crash).
    pub fn freeze_for_exec(&self) {
        self.exec.store(true, Ordering::SeqCst);
        self.freeze();
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// Everything kept, for a re-execution.
    pub fn take_all(&self) -> Vec<(String, OwnedFd)> {
        std::mem::take(&mut *self.lock()).into_iter().collect()
    }

    /// The names kept now.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OwnedFd>> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the thread that talks to systemd's store does next.
#[derive(Debug)]
enum StoreOp {
    Store(String, OwnedFd),
    Remove(String),
    /// Answer once everything before has been sent.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The thread that sends to systemd's store, in order.
fn spawn_store_sender() -> std::sync::mpsc::Sender<StoreOp> {
    let (tx, rx) = std::sync::mpsc::channel::<StoreOp>();
    let spawned = std::thread::Builder::new()
        .name("qmpmux-fdstore".into())
        .spawn(move || {
            for op in rx {
                match op {
                    StoreOp::Store(name, fd) => store(&name, fd.as_fd()),
                    StoreOp::Remove(name) => store_remove(&name),
                    StoreOp::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the thread that talks to systemd's file descriptor store");
    }
    tx
}

/// `FDSTORE=1` with `FDNAME=name` and the fd.
fn store(name: &str, fd: BorrowedFd<'_>) {
    let msg = format!("FDSTORE=1\nFDNAME={name}\n");
    if let Err(e) = notify_with_fds(&msg, &[fd.as_raw_fd()]) {
        warn!(%name, error = %e, "cannot put a file descriptor in systemd's store");
    }
}

/// `FDSTOREREMOVE=1` for `name`.
fn store_remove(name: &str) {
    let msg = format!("FDSTOREREMOVE=1\nFDNAME={name}\n");
    if let Err(e) = notify_with_fds(&msg, &[]) {
        warn!(%name, error = %e, "cannot remove a file descriptor from systemd's store");
    }
}

/// One sd_notify datagram, with fds (SCM_RIGHTS).
fn notify_with_fds(msg: &str, fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr};
    use std::os::unix::ffi::OsStrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let errno = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(abstract_name) => UnixAddr::new_abstract(abstract_name),
        None => UnixAddr::new(bytes),
    }
    .map_err(errno)?;
    let sock = socket(AddressFamily::Unix, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None).map_err(errno)?;
    // A store that does not read (systemd hung) costs this thread a few
    // seconds per message, not forever.
    let wait = nix::sys::time::TimeVal::new(5, 0);
    let _ = nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::SendTimeout, &wait);
    let iov = [std::io::IoSlice::new(msg.as_bytes())];
    let cmsg: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    sendmsg(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, Some(&addr)).map_err(errno)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_a_vm_are_told_from_those_of_others() {
        for vm in ["a", "a.1", "web-01_x.2.3"] {
            for n in [
                names::listen(vm, 0, Some((1, 2))),
                names::listen(vm, 12, None),
                names::qemu(vm),
                names::journal(vm),
                names::upstream(vm, (3, 4)),
                names::client(vm, 7),
                names::passed(vm, 7),
            ] {
                assert_eq!(names::parse(&n).and_then(|p| p.vm), Some(vm), "{n}");
                assert!(!n.contains(':') && n.len() < 256, "{n}");
            }
        }
        let other = names::listen("a.1", 0, None);
        assert_eq!(names::parse(&other).and_then(|p| p.vm), Some("a.1"));
        let p = names::parse("listen.3.66.77.a.1").unwrap();
        assert_eq!((p.listener, p.file, p.vm), (Some(3), Some((66, 77)), Some("a.1")));
        let up = names::upstream("x.y.z", (5, 6));
        let p = names::parse(&up).unwrap();
        assert_eq!((p.file, p.vm), (Some((5, 6)), Some("x.y.z")));
        let ctl = names::control((8, 9));
        let p = names::parse(&ctl).unwrap();
        assert_eq!((p.kind, p.file, p.vm), ("control", Some((8, 9)), None));
        for bad in [
            "",
            "qemu",
            "qemu.",
            "listen.x.1.2.a",
            "listen.0.1.2",
            "control.1.2.a",
            "other.a",
            "upstream.1.a",
        ] {
            assert_eq!(names::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_disabled_keeper_keeps_nothing_and_an_enabled_one_replaces_by_name() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let off = Keeper::disabled();
        off.keep("qemu.x", a.as_fd());
        assert!(off.names().is_empty());
        let on = Keeper {
            enabled: true,
            ..Keeper::disabled()
        };
        on.keep("qemu.x", a.as_fd());
        on.keep("qemu.x", a.as_fd());
        on.keep("listen.x.0", a.as_fd());
        assert_eq!(on.names(), ["listen.x.0", "qemu.x"]);
        on.forget("qemu.x");
        assert_eq!(on.names(), ["listen.x.0"]);
        on.freeze();
        on.forget("listen.x.0");
        assert_eq!(on.names(), ["listen.x.0"], "a frozen keeper forgets nothing");
        assert_eq!(on.take_all().len(), 1);
    }

    #[test]
    fn inherited_fds_are_taken_by_name_once() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut got = Inherited::from_fds([("qemu.x".to_string(), a.into()), ("control".to_string(), b.into())]);
        assert!(got.take("qemu.x").is_some());
        assert!(got.take("qemu.x").is_none());
        assert!(got.take("journal.x").is_none());
        assert!(!got.is_empty());
        assert!(got.take("control").is_some());
        assert!(got.is_empty());
    }
}
