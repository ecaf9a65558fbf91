//! One misbehaving party costs the others nothing: slow and frozen clients,
//! oversized and hostile input, too many clients, an upstream that stops
//! answering.

mod common;

use common::fake::FakeServer;
use common::{Client, Daemon, Qemu};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_client_is_cut_off_and_nobody_else_notices() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| c.client.max_queue_bytes = 64 << 10).await;
    // Negotiates, then never reads again.
    let mut frozen = Client::ready(&sock).await;
    let mut busy = Client::ready(&sock).await;
    // Each round makes QEMU emit STOP and RESUME to every client. The frozen
    // client's socket buffer, then qmpmux's buffers for it, fill up.
    for round in 0..4000 {
        let stop = busy.cmd(&format!(r#"{{"execute":"stop","id":{round}}}"#)).await;
        assert_eq!(stop["id"], round, "{stop}");
        let cont = busy.cmd(r#"{"execute":"cont","id":"c"}"#).await;
        assert_eq!(cont["id"], "c");
    }
    // The frozen client was disconnected (after what was queued for it):
    // reading now drains its buffer and reaches EOF.
    let mut lines = 0;
    while frozen.try_line().await.is_some() {
        lines += 1;
    }
    assert!(
        lines < 8000,
        "frozen client got everything ({lines} lines): it was not cut off"
    );
    // The busy one still works and still gets events.
    busy.send(r#"{"execute":"stop"}"#).await;
    busy.event("STOP").await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_too_deep_input_cut_off_only_the_sender() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| {
        c.client.max_message_bytes = 4096;
        c.client.max_depth = 64;
    })
    .await;
    let mut bystander = Client::ready(&sock).await;

    let mut big = Client::ready(&sock).await;
    // A request already in the pipe is still answered, in order.
    big.send(r#"{"execute":"query-status","id":"before"}"#).await;
    big.send(&format!(
        r#"{{"execute":"query-status","arguments":{{"x":"{}"}}}}"#,
        "a".repeat(10_000)
    ))
    .await;
    assert_eq!(big.reply().await["id"], "before");
    assert_eq!(
        big.recv().await,
        json!({"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}})
    );
    big.expect_eof().await;

    let mut deep = Client::ready(&sock).await;
    deep.send(&"[".repeat(100)).await;
    assert_eq!(deep.recv().await["error"]["desc"], "JSON nesting depth limit exceeded");
    deep.expect_eof().await;

    // A message that never ends is cut off too, without being buffered.
    let mut endless = Client::ready(&sock).await;
    endless.send("{\"execute\": \"").await;
    endless.send_bytes(&[b'x'; 8192]).await;
    assert_eq!(endless.recv().await["error"]["desc"], "JSON token size limit exceeded");
    endless.expect_eof().await;

    assert_eq!(bystander.cmd(r#"{"execute":"query-status","id":1}"#).await["id"], 1);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_garbage_gets_errors_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut c = Client::ready(&sock).await;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    c.send_bytes(&garbage).await;
    // Whatever the errors were, QEMU's \xff resynchronisation brings the
    // stream back; a well-formed request afterwards is answered.
    c.send_bytes(b"\xff").await;
    c.send(r#"{"execute":"query-status","id":"after"}"#).await;
    loop {
        let v = c.reply().await;
        if v.get("id").is_some() {
            assert_eq!(v["id"], "after", "{v}");
            break;
        }
        assert_eq!(v["error"]["class"], "GenericError", "{v}");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_limit_refuses_extra_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| c.client.max_clients = 2).await;
    let a = Client::ready(&sock).await;
    let _b = Client::ready(&sock).await;
    let mut c = Client::connect(&sock).await;
    c.expect_eof().await;
    drop(a);
    common::eventually("a slot to free up", async || {
        let mut d = Client::connect(&sock).await;
        d.try_line().await.is_some()
    })
    .await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_answers_and_discards_the_late_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("fake.sock"), dir.path().join("vm.sock"));
    let fake = FakeServer::bind(&up);
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| {
        c.upstream.command_timeout = Some(Duration::from_millis(300));
    })
    .await;
    let mut conn = fake.accept_ready().await;
    let mut c = Client::ready(&sock).await;
    c.send(r#"{"execute":"slow","id":"s"}"#).await;
    let slow = conn.read().await.unwrap();
    let r = c.reply().await;
    assert_eq!(r["id"], "s");
    assert_eq!(r["error"]["class"], "GenericError");
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("did not answer within"),
        "{r}"
    );
    // QEMU answers after all: that reply must not reach anyone.
    conn.reply(&slow, json!("late")).await;
    c.send(r#"{"execute":"fast","id":"f"}"#).await;
    let fast = conn.read().await.unwrap();
    conn.reply(&fast, json!("on time")).await;
    assert_eq!(c.reply().await, json!({"return": "on time", "id": "f"}));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_mid_command_does_not_disturb_others() {
    let (_dir, fake, daemon, sock) = common::fake::vm().await;
    let mut conn = fake.accept_ready().await;
    let mut leaver = Client::ready(&sock).await;
    let mut stayer = Client::ready(&sock).await;
    leaver.send(r#"{"execute":"a","id":1}"#).await;
    let a = conn.read().await.unwrap();
    drop(leaver);
    stayer.send(r#"{"execute":"b","id":1}"#).await;
    let b = conn.read().await.unwrap();
    // Replies for the departed client are dropped; the same id of another
    // client is not confused with it.
    conn.reply(&a, json!("for leaver")).await;
    conn.reply(&b, json!("for stayer")).await;
    assert_eq!(stayer.reply().await, json!({"return": "for stayer", "id": 1}));
    daemon.stop().await;
}

/// Shutdown is not held up by a client that never stops sending: it stops
/// being read, gets what was in flight, and is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_stops_sending_does_not_hold_up_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_dir, fake, daemon, sock) = common::fake::vm().await;
    let mut conn = fake.accept_ready().await;
    // An upstream that answers at once, as fast as it is asked.
    let upstream = tokio::spawn(async move {
        while let Some(req) = conn.read().await {
            conn.reply(&req, json!({})).await;
        }
    });
    let c = Client::ready(&sock).await;
    let (mut rd, mut wr) = c.into_inner();
    let burst = r#"{"execute":"query-status"}"#.repeat(64);
    let flood = tokio::spawn(async move {
        let mut sent = 0u64;
        while wr.write_all(burst.as_bytes()).await.is_ok() {
            sent += 64;
        }
        sent
    });
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        while let Ok(n @ 1..) = rd.read(&mut buf).await {
            got += n as u64;
        }
        got
    });
    // Well under way before the stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Graceful: done well before the grace period after which qmpmux
    // closes clients regardless.
    let grace = qmpmux::STOP_GRACE;
    tokio::time::timeout(grace - Duration::from_secs(1), daemon.stop())
        .await
        .expect("shutdown waited for the grace period behind a flooding client");
    let got = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the flooding client was not disconnected")
        .unwrap();
    assert!(got > 0, "the flooding client got no replies at all");
    flood.abort();
    upstream.abort();
}

/// A thousand clients leaving at once (more than the session's inbox holds)
/// are each cleaned up: every `getfd` name they held is closed in QEMU, as
/// QEMU closes a departed connection's fds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fds_of_clients_that_all_leave_at_once_are_all_closed() {
    // More than the session's inbox (1024) holds; two fds each, here and
    // in the daemon, which runs in this process.
    let fds = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024) as usize;
    let count = 1500.min(fds.saturating_sub(256) / 2);
    assert!(
        count >= 1100,
        "this test needs RLIMIT_NOFILE of at least 2456 (hard limit here: {fds})"
    );
    let (_dir, fake, daemon, sock) = common::fake::vm().await;
    let mut conn = fake.accept_ready().await;
    let mut leaving = Vec::with_capacity(count);
    // A getfd needs an fd; the fake QEMU reads (and so drops) them.
    let (passed, _w) = nix::unistd::pipe().unwrap();
    for i in 0..count {
        let mut c = Client::ready(&sock).await;
        c.send_with_fd(
            &format!(r#"{{"execute":"getfd","arguments":{{"fdname":"fd-{i}"}},"id":{i}}}"#),
            std::os::fd::AsRawFd::as_raw_fd(&passed),
        );
        let req = conn.read().await.unwrap();
        assert_eq!(req["execute"], "getfd", "{req}");
        conn.reply(&req, json!({})).await;
        assert_eq!(c.reply().await["id"], i);
        leaving.push(c);
    }
    drop(leaving);
    let mut closed = std::collections::HashSet::new();
    while closed.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(5), conn.read()).await;
        let Ok(Some(req)) = next else {
            panic!("only {} of {count} getfd names were closed", closed.len());
        };
        assert_eq!(req["execute"], "closefd", "{req}");
        closed.insert(req["arguments"]["fdname"].as_str().unwrap().to_owned());
        conn.reply(&req, json!({})).await;
    }
    assert!((0..count).all(|i| closed.contains(&format!("fd-{i}"))));
    daemon.stop().await;
}

/// A client that closes its connection entirely takes its queued commands
/// with it, as with QEMU (which drops a closed connection's unstarted
/// commands); one that only shuts down its sending side still has them run
/// and gets the replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_client_s_queued_commands_are_dropped_a_half_closed_one_s_are_run() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let (_dir, fake, daemon, sock) = common::fake::vm().await;
    let mut conn = fake.accept_ready().await;
    // QEMU's queue of 8 full (from eight clients: a client with nothing
    // answered yet has one command in QEMU at a time), so that what follows
    // waits in qmpmux.
    let mut holders = Vec::new();
    for _ in 0..8 {
        let mut holder = Client::ready(&sock).await;
        holder.send(r#"{"execute":"held","id":0}"#).await;
        holders.push(holder);
    }
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(conn.read().await.unwrap());
    }
    let mut watcher = Client::ready(&sock).await;
    let queued = async |c: &mut Client| {
        let r = c.cmd(r#"{"execute":"__org.qmpmux_query-proxy","id":"p"}"#).await;
        r["return"]["queued"].as_u64().unwrap()
    };
    let mut gone = Client::ready(&sock).await;
    for i in 0..3 {
        gone.send(&format!(r#"{{"execute":"from-closed","id":{i}}}"#)).await;
    }
    let mut half = Client::ready(&sock).await;
    half.send(r#"{"execute":"from-half-closed","id":"h"}"#).await;
    common::eventually("four commands waiting in qmpmux", async || {
        queued(&mut watcher).await == 4
    })
    .await;
    drop(gone);
    let (mut half_rd, mut half_wr) = half.into_inner();
    half_wr.shutdown().await.unwrap();
    common::eventually("the closed client's commands to be dropped", async || {
        queued(&mut watcher).await == 1
    })
    .await;
    for req in &held {
        conn.reply(req, json!({})).await;
    }
    // Only the half-closed client's command goes on to QEMU.
    let next = conn.read().await.unwrap();
    assert_eq!(next["execute"], "from-half-closed", "{next}");
    conn.reply(&next, json!("done")).await;
    let mut line = String::new();
    half_rd.read_line(&mut line).await.unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&line).unwrap(),
        json!({"return": "done", "id": "h"})
    );
    line.clear();
    assert_eq!(half_rd.read_line(&mut line).await.unwrap(), 0, "then EOF: {line}");
    let after = tokio::time::timeout(Duration::from_millis(500), conn.read()).await;
    assert!(after.is_err(), "a closed client's command reached QEMU: {after:?}");
    for holder in &mut holders {
        assert_eq!(holder.reply().await["id"], 0);
    }
    daemon.stop().await;
}
