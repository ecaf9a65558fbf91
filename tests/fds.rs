//! File descriptors passed by clients (SCM_RIGHTS), against real QEMU:
//! every fd qmpmux receives is kept or closed, whatever the control
//! message looks like; `getfd` names belong to whoever set them last; an fd
//! a command does not take waits for the next `getfd`/`add-fd`, as on QEMU.

mod common;

use common::{Client, Daemon, Qemu};
use qmpmux::config::{Endpoint, ListenerConfig};
use qmpmux::policy::{Glob, Policy};
use serde_json::{json, Value};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

fn listener(path: &Path, allow: &[&str], deny: &[&str]) -> ListenerConfig {
    ListenerConfig {
        policy: Policy {
            allow: allow.iter().map(|s| Glob::new(*s)).collect(),
            deny: deny.iter().map(|s| Glob::new(*s)).collect(),
        },
        ..ListenerConfig::new("limited", Endpoint::unix(path))
    }
}

/// Open fds of this process (the daemon runs in it).
/// The tests here count this process's open fds: they run one at a time,
/// so that another test's sockets and QEMU pipes never enter the count.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits until this process has at most `n` fds open (the daemon closes a
/// departed client's in its own time); returns the count.
async fn settle_to(n: usize) -> usize {
    let mut last = open_fds();
    common::eventually(&format!("at most {n} open fds"), async || {
        last = open_fds();
        last <= n
    })
    .await;
    last
}

/// One `sendmsg` of `bytes` with one SCM_RIGHTS control message per entry
/// of `groups`.
fn send_fds(sock: &tokio::net::unix::OwnedWriteHalf, bytes: &[u8], groups: &[&[RawFd]]) {
    let sock: &tokio::net::UnixStream = sock.as_ref();
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(bytes)];
    let cmsgs: Vec<_> = groups.iter().map(|g| ControlMessage::ScmRights(g)).collect();
    let n = sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).expect("sendmsg");
    assert_eq!(n, bytes.len());
}

fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe().unwrap()
}

/// What `/proc/PID/fd/FD` points at, e.g. `pipe:[1234]`.
fn fd_target(pid: u32, fd: &Value) -> String {
    let link = format!("/proc/{pid}/fd/{}", fd.as_u64().expect("fd number"));
    std::fs::read_link(link).unwrap().display().to_string()
}

fn self_target(fd: &OwnedFd) -> String {
    fd_target(std::process::id(), &json!(fd.as_raw_fd()))
}

/// Reads until the connection ends (EOF or reset); panics on a timeout.
async fn until_closed(c: Client) {
    use tokio::io::AsyncReadExt;
    let (mut r, _w) = c.into_inner();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(common::STEP, r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("qmpmux did not disconnect the client"),
        }
    }
}

/// 200 clients of a read-only socket each send one message carrying more
/// fds than qmpmux accepts in one (the kernel truncates the control data):
/// each is disconnected and every fd that reached qmpmux is closed. Before
/// the fix the 16 that fitted leaked every time (22 -> 1,622 fds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_full_fd_messages_are_closed_and_their_sender_disconnected() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock, ro) = (
        dir.path().join("q.sock"),
        dir.path().join("vm.sock"),
        dir.path().join("ro.sock"),
    );
    let _qemu = Qemu::start(&up).await;
    let ro_listener = listener(&ro, &["query-*"], &[]);
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| c.vms[0].listeners.push(ro_listener)).await;
    let (keep, _w) = pipe();
    let many = vec![keep.as_raw_fd(); qmpmux::MAX_FDS_PER_MESSAGE + 4];
    // Warm up (first client, first upstream command), then take the count.
    let mut c = Client::ready(&ro).await;
    assert!(c.cmd(r#"{"execute":"query-status"}"#).await.get("return").is_some());
    drop(c);
    let before = settle_to(open_fds()).await;
    let mut bystander = Client::ready(&ro).await;
    for _ in 0..200 {
        let c = Client::ready(&ro).await;
        let (r, w) = c.into_inner();
        send_fds(&w, br#"{"execute":"query-status","id":1}"#, &[&many]);
        until_closed(Client::from_parts(r, w)).await;
    }
    let reply = bystander.cmd(r#"{"execute":"query-status","id":"b"}"#).await;
    assert_eq!(reply["id"], "b", "{reply}");
    drop(bystander);
    let after = settle_to(before).await;
    eprintln!("open fds: {before} before 200 over-full messages, {after} after");
    daemon.stop().await;
}

/// Several SCM_RIGHTS control messages in one `sendmsg`, and fds sent with
/// no bytes: at most one fd waits per client (QEMU too keeps only the
/// first of the latest message's), the rest are closed at once, and the
/// client goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_control_messages_leave_at_most_one_fd_waiting() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let (p, _w) = pipe();
    let four = [p.as_raw_fd(); 4];
    let c = Client::ready(&sock).await;
    let (r, w) = c.into_inner();
    let mut c = Client::from_parts(r, w);
    assert!(c.cmd(r#"{"execute":"query-status"}"#).await.get("return").is_some());
    let before = settle_to(open_fds()).await;
    for i in 0..50 {
        let (r, w) = c.into_inner();
        send_fds(&w, b" ", &[&four, &four]);
        // No bytes at all: the kernel either drops these fds or delivers
        // them; either way nothing may stay behind but one.
        let _ = nix::sys::socket::sendmsg::<()>(
            AsRef::<tokio::net::UnixStream>::as_ref(&w).as_raw_fd(),
            &[],
            &[nix::sys::socket::ControlMessage::ScmRights(&four)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        );
        send_fds(
            &w,
            format!(r#"{{"execute":"query-status","id":{i}}}"#).as_bytes(),
            &[&four],
        );
        c = Client::from_parts(r, w);
        assert_eq!(c.reply().await["id"], i);
    }
    // Exactly the most accepted in one message.
    let (r, w) = c.into_inner();
    let most = [p.as_raw_fd(); qmpmux::MAX_FDS_PER_MESSAGE];
    send_fds(&w, br#"{"execute":"query-status","id":"most"}"#, &[&most]);
    c = Client::from_parts(r, w);
    assert_eq!(c.reply().await["id"], "most");
    let now = open_fds();
    assert!(
        now <= before + 1,
        "{now} fds open, {before} before: more than one fd kept waiting"
    );
    // The waiting fd is usable.
    let got = c
        .cmd(r#"{"execute":"getfd","arguments":{"fdname":"last"},"id":"g"}"#)
        .await;
    assert_eq!(got, json!({"return": {}, "id": "g"}));
    drop(c);
    settle_to(before).await;
    daemon.stop().await;
}

/// QEMU (checked on 7.2) keeps a passed fd that the command it came with
/// did not take (`exec-oob getfd`, which it refuses, or any other command)
/// for the next `getfd`/`add-fd`, and a newer fd-carrying message replaces
/// it. Through qmpmux the same, a command refused by policy included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_sent_with_a_command_that_does_not_take_it_waits_for_the_next_getfd() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock, limited) = (
        dir.path().join("q.sock"),
        dir.path().join("vm.sock"),
        dir.path().join("limited.sock"),
    );
    let qemu = Qemu::start(&up).await;
    let l = listener(&limited, &[], &["stop"]);
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| c.vms[0].listeners.push(l)).await;
    let (mut c, _) = Client::open(&limited).await;
    c.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
        .await;
    assert_eq!(c.recv().await, json!({"return": {}}));
    let (p1, _w1) = pipe();
    let (p2, _w2) = pipe();
    let (p3, _w3) = pipe();
    let cmd_with = async |c: Client, fd: &OwnedFd, cmd: &str| -> (Client, Value) {
        let (r, w) = c.into_inner();
        send_fds(&w, cmd.as_bytes(), &[&[fd.as_raw_fd()]]);
        let mut c = Client::from_parts(r, w);
        let v = c.reply().await;
        (c, v)
    };

    // Out of band: QEMU refuses it and keeps the fd.
    let (c, r) = cmd_with(c, &p1, r#"{"exec-oob":"getfd","arguments":{"fdname":"x"},"id":1}"#).await;
    assert_eq!(r["error"]["desc"], "The command getfd does not support OOB", "{r}");
    let mut c = c;
    let r = c.cmd(r#"{"execute":"add-fd","id":2}"#).await;
    assert_eq!(fd_target(qemu.pid(), &r["return"]["fd"]), self_target(&p1), "{r}");

    // Refused by policy: the fd waits too.
    let (c, r) = cmd_with(c, &p2, r#"{"execute":"stop","id":3}"#).await;
    assert!(r["error"]["desc"].as_str().unwrap().contains("not allowed"), "{r}");
    let mut c = c;
    let r = c.cmd(r#"{"execute":"add-fd","id":4}"#).await;
    assert_eq!(fd_target(qemu.pid(), &r["return"]["fd"]), self_target(&p2), "{r}");

    // A later fd-carrying message replaces the one waiting.
    let (c, _) = cmd_with(c, &p1, r#"{"execute":"query-status","id":5}"#).await;
    let (c, r) = cmd_with(c, &p3, r#"{"execute":"stop","id":6}"#).await;
    assert!(r.get("error").is_some(), "{r}");
    let mut c = c;
    let r = c.cmd(r#"{"execute":"add-fd","id":7}"#).await;
    assert_eq!(fd_target(qemu.pid(), &r["return"]["fd"]), self_target(&p3), "{r}");
    // And it was taken: nothing waits now.
    let r = c
        .cmd(r#"{"execute":"getfd","arguments":{"fdname":"none"},"id":8}"#)
        .await;
    assert_eq!(r["error"]["desc"], "No file descriptor supplied via SCM_RIGHTS", "{r}");
    drop(c);
    daemon.stop().await;
}

/// `getfd` names are the monitor's: when B replaces a name A created, A
/// leaving must not close it; names A still owns are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_getfd_name_replaced_by_another_client_survives_its_creator_leaving() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let (p, _w) = pipe();
    let getfd = async |c: Client, name: &str| -> Client {
        let (r, w) = c.into_inner();
        let cmd = format!(r#"{{"execute":"getfd","arguments":{{"fdname":"{name}"}},"id":"{name}"}}"#);
        send_fds(&w, cmd.as_bytes(), &[&[p.as_raw_fd()]]);
        let mut c = Client::from_parts(r, w);
        assert_eq!(c.reply().await, json!({"return": {}, "id": name}));
        c
    };
    let qemu_fds = || std::fs::read_dir(format!("/proc/{}/fd", qemu.pid())).unwrap().count();
    let a = getfd(Client::ready(&sock).await, "shared").await;
    let a = getfd(a, "mine").await;
    let b = getfd(Client::ready(&sock).await, "shared").await;
    let with_both = qemu_fds();
    drop(a);
    let mut b = b;
    common::eventually("A's leaving to reach the session", async || {
        let r = b.cmd(r#"{"execute":"__org.qmpmux_query-proxy"}"#).await;
        r["return"]["clients"] == 1
    })
    .await;
    // A's own name is closed in QEMU, B's is not.
    let r = b
        .cmd(r#"{"execute":"closefd","arguments":{"fdname":"mine"},"id":1}"#)
        .await;
    assert_eq!(r["error"]["desc"], "File descriptor named 'mine' not found", "{r}");
    assert_eq!(qemu_fds(), with_both - 1);
    let r = b
        .cmd(r#"{"execute":"closefd","arguments":{"fdname":"shared"},"id":2}"#)
        .await;
    assert_eq!(r, json!({"return": {}, "id": 2}));
    // B closed it itself: B leaving closes nothing more (the name is gone).
    let b = getfd(b, "b-own").await;
    drop(b);
    let mut watcher = Client::ready(&sock).await;
    common::eventually("B's leaving to reach the session", async || {
        let r = watcher.cmd(r#"{"execute":"__org.qmpmux_query-proxy"}"#).await;
        r["return"]["clients"] == 1
    })
    .await;
    let r = watcher
        .cmd(r#"{"execute":"closefd","arguments":{"fdname":"b-own"},"id":3}"#)
        .await;
    assert_eq!(r["error"]["desc"], "File descriptor named 'b-own' not found", "{r}");
    assert_eq!(qemu_fds(), with_both - 2);
    daemon.stop().await;
}

/// QEMU keeps a passed fd whose `getfd`/`add-fd` it rejects for bad
/// arguments. qmpmux's one connection is shared: had qmpmux sent the fd
/// along, another client's fd-less `getfd` would have got it. Instead it
/// stays with its client, for that client's next `getfd`, as on QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_with_malformed_getfd_arguments_never_reaches_another_client() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let (p, _w) = pipe();
    let mut b = Client::ready(&sock).await;
    let (mut r, mut w) = Client::ready(&sock).await.into_inner();
    for (i, bad) in [
        r#"{"execute":"getfd","arguments":{"fdname":5},"id":1}"#,
        r#"{"execute":"getfd","arguments":{"fdname":"a","x":1},"id":2}"#,
        r#"{"execute":"getfd","id":3}"#,
        r#"{"execute":"add-fd","arguments":{"fdset-id":"x"},"id":4}"#,
    ]
    .into_iter()
    .enumerate()
    {
        send_fds(&w, bad.as_bytes(), &[&[p.as_raw_fd()]]);
        let mut a = Client::from_parts(r, w);
        let reply = a.reply().await;
        assert_eq!(reply["id"], i + 1, "{reply}");
        assert!(reply.get("error").is_some(), "{reply}");
        let stolen = b
            .cmd(r#"{"execute":"getfd","arguments":{"fdname":"stolen"},"id":"b"}"#)
            .await;
        assert_eq!(
            stolen["error"]["desc"], "No file descriptor supplied via SCM_RIGHTS",
            "another client's fd-less getfd got A's fd: {stolen}"
        );
        (r, w) = a.into_inner();
    }
    // A's fd still waits for A.
    let mut a = Client::from_parts(r, w);
    let mine = a
        .cmd(r#"{"execute":"getfd","arguments":{"fdname":"mine"},"id":"a"}"#)
        .await;
    assert_eq!(mine, json!({"return": {}, "id": "a"}));
    daemon.stop().await;
}

/// With OOB on, QEMU reads ahead of the command it runs: a `getfd` waiting
/// in QEMU's queue takes an fd that arrives before it runs, whoever sent
/// it. Here B's fd-less `getfd` waits behind a long command (QEMU is
/// stopped while the three are queued) and A's `getfd` comes with an fd:
/// B must get QEMU's "no fd" error and A its own fd, not B A's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_getfd_without_an_fd_never_takes_another_client_s() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let (mut a, mut b, mut c, mut watcher) = (
        Client::ready(&sock).await,
        Client::ready(&sock).await,
        Client::ready(&sock).await,
        Client::ready(&sock).await,
    );
    let signal = |sig| {
        // SAFETY: kill(2) on our own child process.
        assert_eq!(unsafe { libc::kill(qemu.pid() as i32, sig) }, 0);
    };
    signal(libc::SIGSTOP);
    c.send(r#"{"execute":"query-qmp-schema","id":"slow"}"#).await;
    b.send(r#"{"execute":"getfd","arguments":{"fdname":"b"},"id":"b"}"#)
        .await;
    b.send(r#"{"execute":"query-version","id":"marker"}"#).await;
    // B's getfd has been dealt with (sent to QEMU or answered) once a later
    // command of B's is with QEMU.
    common::eventually("B's commands to reach QEMU", async || {
        let r = watcher.cmd(r#"{"execute":"__org.qmpmux_query-proxy"}"#).await;
        r["return"]["in-flight"].as_u64().unwrap() >= 2 && r["return"]["queued"] == 0
    })
    .await;
    let (p, _w) = pipe();
    let (r, w) = a.into_inner();
    send_fds(
        &w,
        br#"{"execute":"getfd","arguments":{"fdname":"a"},"id":"a"}"#,
        &[&[p.as_raw_fd()]],
    );
    a = Client::from_parts(r, w);
    signal(libc::SIGCONT);
    assert_eq!(
        b.reply().await,
        json!({"id": "b", "error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}})
    );
    assert_eq!(a.reply().await, json!({"return": {}, "id": "a"}));
    assert_eq!(c.reply().await["id"], "slow");
    daemon.stop().await;
}

/// An fd passed with a command the lease refuses waits for the next
/// `getfd`/`add-fd`, as one refused by policy does (QEMU keeps an fd no
/// command took). Before, it was closed with the refused command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fd_sent_with_a_command_the_lease_refuses_waits_for_the_next_getfd() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut holder = Client::ready(&sock).await;
    let r = holder
        .cmd(r#"{"execute":"__org.qmpmux_lease","arguments":{"seconds":60},"id":"l"}"#)
        .await;
    assert!(r.get("return").is_some(), "{r}");
    let c = Client::ready(&sock).await;
    let (p1, _w1) = pipe();
    let (r, w) = c.into_inner();
    // Refused by the lease, and so is the fd-less one right behind it,
    // which finds the fd back (it is read only after the first's answer).
    let two = r#"{"execute":"add-fd","id":1}{"execute":"add-fd","id":2}"#;
    send_fds(&w, two.as_bytes(), &[&[p1.as_raw_fd()]]);
    let mut c = Client::from_parts(r, w);
    for id in 1..=2 {
        let r = c.reply().await;
        assert_eq!(r["id"], id, "{r}");
        assert!(r["error"]["desc"].as_str().unwrap().contains("is leased by"), "{r}");
    }
    let r = holder.cmd(r#"{"execute":"__org.qmpmux_release","id":"r"}"#).await;
    assert!(r.get("return").is_some(), "{r}");
    // The lease is gone: the next add-fd gets the fd passed with the first.
    let r = c.cmd(r#"{"execute":"add-fd","id":3}"#).await;
    assert_eq!(fd_target(qemu.pid(), &r["return"]["fd"]), self_target(&p1), "{r}");
    // And it was taken: nothing waits now.
    let r = c.cmd(r#"{"execute":"add-fd","id":4}"#).await;
    assert_eq!(r["error"]["desc"], "No file descriptor supplied via SCM_RIGHTS", "{r}");
    drop((c, holder));
    daemon.stop().await;
}
