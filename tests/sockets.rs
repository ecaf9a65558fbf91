//! Socket files handled safely: bound where nobody else can swap them,
//! a live socket never taken for a stale one, and only qmpmux's own files
//! removed, also after a failed start or a rejected reload.

mod common;

use common::{Client, Daemon, Qemu};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn vm(name: &str, up: &Path, listen: &Path) -> qmpmux::config::VmConfig {
    qmpmux::config::VmConfig::new(name, up, listen)
}

/// The test harness's configuration, with these VMs.
async fn config_with(vms: Vec<qmpmux::config::VmConfig>) -> qmpmux::config::Config {
    let daemon = Daemon::start(&[]).await;
    let mut config = daemon.config.clone();
    daemon.stop().await;
    config.vms = vms;
    config
}

/// What happens in the socket's directory while qmpmux binds there: no
/// file is created under a name and then has its mode or owner changed in
/// that directory, where whoever can write it could have swapped the name
/// for a link to any file (before: `vm.sock.PID.tmp`, chmod and chown by
/// name). Only a directory appears (private, removed again) and the socket
/// is moved into place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_changes_no_mode_or_owner_by_name_in_the_socket_s_directory() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let (up, sock) = (dir.path().join("q.sock"), shared.join("vm.sock"));
    let watch = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    watch.add_watch(&shared, AddWatchFlags::IN_ALL_EVENTS).unwrap();
    let gid = nix::unistd::getgid().as_raw();
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| {
        c.socket.mode = 0o600;
        c.socket.gid = Some(gid);
    })
    .await;
    let mut events = Vec::new();
    while let Ok(batch) = watch.read_events() {
        events.extend(batch);
    }
    let describe = |e: &nix::sys::inotify::InotifyEvent| format!("{:?} {:?}", e.mask, e.name);
    for e in &events {
        assert!(
            !e.mask.contains(AddWatchFlags::IN_ATTRIB),
            "mode/owner changed by name in the shared directory: {}",
            describe(e)
        );
        if e.mask.contains(AddWatchFlags::IN_CREATE) {
            assert!(
                e.mask.contains(AddWatchFlags::IN_ISDIR),
                "created by name: {}",
                describe(e)
            );
        }
    }
    let moved_in = events
        .iter()
        .any(|e| e.mask.contains(AddWatchFlags::IN_MOVED_TO) && e.name.as_deref() == Some("vm.sock".as_ref()));
    assert!(moved_in, "the socket was not moved into place: {events:?}");
    // Nothing else is left there, and the socket has its mode.
    let names: Vec<_> = std::fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("vm.sock")]);
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    daemon.stop().await;
}

/// Someone who can write the socket's directory swaps every new entry for a
/// link to a file of their choosing, as fast as inotify tells them: the
/// file's mode never changes, whatever becomes of the bind. (A race: before
/// the fix the attacker won it here every time, 0600 -> 0666, but nothing
/// guarantees that; the test above shows the cause deterministically.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_name_never_redirects_a_chmod() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "secret").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attacker = {
        let (shared, victim, stop) = (shared.clone(), victim.clone(), stop.clone());
        let watch = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        watch.add_watch(&shared, AddWatchFlags::IN_CREATE).unwrap();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for e in watch.read_events().unwrap_or_default() {
                    let Some(name) = e.name else { continue };
                    let at = shared.join(&name);
                    n += 1;
                    if std::fs::rename(&at, shared.join(format!("moved-{n}"))).is_ok() {
                        let _ = std::os::unix::fs::symlink(&victim, &at);
                    }
                }
            }
        })
    };
    let perms = qmpmux::config::SocketPerms {
        mode: 0o666,
        uid: None,
        gid: None,
    };
    for i in 0..50 {
        let path = shared.join(format!("vm{i}.sock"));
        let mut created = qmpmux::listen::sockfile::Created::default();
        let _ = qmpmux::listen::sockfile::bind(&path, &perms, &mut created).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    attacker.join().unwrap();
    let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the victim's mode was changed");
}

/// Only ECONNREFUSED proves a socket stale. A live listener whose backlog
/// is full answers EAGAIN: qmpmux must refuse to start, not unlink it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_live_socket_is_not_taken_for_stale() {
    use nix::sys::socket::{bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let other = socket(AddressFamily::Unix, SockType::Stream, SockFlag::empty(), None).unwrap();
    let addr = UnixAddr::new(&sock).unwrap();
    bind(std::os::fd::AsRawFd::as_raw_fd(&other), &addr).unwrap();
    listen(&other, Backlog::new(0).unwrap()).unwrap();
    // Fill its backlog: the next connect gets EAGAIN.
    let mut pending = Vec::new();
    loop {
        let c = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK, None).unwrap();
        match connect(std::os::fd::AsRawFd::as_raw_fd(&c), &addr) {
            Ok(()) => pending.push(c),
            Err(nix::errno::Errno::EAGAIN) => break,
            Err(e) => panic!("connect: {e}"),
        }
        assert!(pending.len() < 1000, "backlog never filled");
    }
    let config = config_with(vec![vm("vm", &up, &sock)]).await;
    let err = qmpmux::Listeners::bind(&config).await.unwrap_err();
    let text = qmpmux::error::chain(&err);
    assert!(text.contains("cannot tell whether"), "{text}");
    assert!(sock.exists(), "a live socket was unlinked");
    // Still the other process's: its queued connections are still there.
    let accepted = nix::sys::socket::accept(std::os::fd::AsRawFd::as_raw_fd(&other));
    assert!(accepted.is_ok(), "{accepted:?}");
}

/// The control socket is removed at exit only if this instance bound it: a
/// second instance must not delete the first one's, nor a regular file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_control_socket_qmpmux_bound_is_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("qmpmux.ctl");
    let first = Daemon::start_with(&[], |c| c.control_socket = Some(ctl.clone())).await;
    let second = Daemon::start_with(&[], |c| c.control_socket = Some(ctl.clone())).await;
    second.stop().await;
    assert!(
        ctl.exists(),
        "the second instance deleted the first one's control socket"
    );
    let report = qmpmux::ops::control::query_status(&ctl)
        .await
        .expect("first instance still answers");
    assert!(report.vms.is_empty());
    first.stop().await;
    assert!(!ctl.exists(), "an instance's own control socket is removed at exit");

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let daemon = Daemon::start_with(&[], |c| c.control_socket = Some(file.clone())).await;
    daemon.stop().await;
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

/// A start that fails (one VM's socket cannot be bound) leaves no socket
/// files nor directories of the VMs bound before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_removes_what_it_bound() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("blocker"), "not a socket").unwrap();
    let config = config_with(vec![
        vm("a", &p("a.q"), &p("new/a.sock")),
        vm("b", &p("b.q"), &p("b.sock")),
        vm("c", &p("c.q"), &p("blocker")),
    ])
    .await;
    let err = qmpmux::Listeners::bind(&config).await.unwrap_err();
    assert!(qmpmux::error::chain(&err).contains("not a socket"), "{err}");
    assert!(!p("b.sock").exists(), "b's socket left behind");
    assert!(!p("new").exists(), "a's socket or directory left behind");
    assert_eq!(std::fs::read_to_string(p("blocker")).unwrap(), "not a socket");
}

/// The metrics endpoint is bound last: when its address is taken, every
/// socket bound before it (VMs', control socket) and their directories go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_that_cannot_be_bound_does_not_keep_the_vms_from_being_served() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("a.q")).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config_with(vec![vm("a", &p("a.q"), &p("new/a.sock"))]).await;
    config.control_socket = Some(p("ctl/qmpmux.ctl"));
    config.metrics_listen = Some(taken.local_addr().unwrap());
    let listeners = qmpmux::Listeners::bind(&config).await.unwrap();
    assert_eq!(listeners.metrics_addr(), None);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(qmpmux::run(config, listeners, shutdown.clone()));
    let mut a = Client::ready(&p("new/a.sock")).await;
    assert_eq!(a.cmd(r#"{"execute":"query-status","id":1}"#).await["id"], 1);
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert!(!p("new/a.sock").exists(), "a's socket left behind");
}

/// A rejected reload leaves no trace: no socket of the VMs it bound first,
/// none of the VM it failed on, no directory; what ran goes on running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_reload_leaves_no_sockets_or_directories() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("a.q")).await;
    let daemon = Daemon::start(&[("a", &p("a.q"), &p("a.sock"))]).await;
    let mut a = Client::ready(&p("a.sock")).await;
    std::fs::write(p("blocker"), "not a socket").unwrap();
    let mut bad = daemon.config.clone();
    bad.vms.push(vm("b", &p("a.q"), &p("dir-b/sub/b.sock")));
    // c binds its main socket, then fails on its extra listener.
    let mut c = vm("c", &p("a.q"), &p("dir-c/c.sock"));
    c.listeners.push(qmpmux::config::ListenerConfig::new(
        "x",
        qmpmux::config::Endpoint::unix(p("blocker")),
    ));
    bad.vms.push(c);
    assert!(daemon.reload(bad).await.is_err());
    for left in ["dir-b", "dir-c"] {
        assert!(!p(left).exists(), "{left} left behind by a rejected reload");
    }
    assert_eq!(a.cmd(r#"{"execute":"query-status","id":1}"#).await["id"], 1);
    daemon.stop().await;
    assert!(!p("a.sock").exists());
}

/// A start that fails after binding (here: a VM without its sockets) also
/// removes every socket already bound, those of VMs started included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_failing_after_binding_removes_the_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let config = config_with(vec![vm("a", &p("a.q"), &p("a.sock")), vm("b", &p("b.q"), &p("b.sock"))]).await;
    let listeners = qmpmux::Listeners::bind(&config).await.unwrap();
    assert!(p("a.sock").exists() && p("b.sock").exists());
    let mut more = config.clone();
    more.vms.push(vm("c", &p("c.q"), &p("c.sock")));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let err = qmpmux::run(more, listeners, shutdown).await.unwrap_err();
    assert!(matches!(err, qmpmux::RunError::MissingListener(_)), "{err}");
    assert!(!p("a.sock").exists() && !p("b.sock").exists(), "sockets left behind");
}
