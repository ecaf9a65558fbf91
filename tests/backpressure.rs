//! What one client sends or is sent is bounded in bytes, not only in
//! messages: a client sending big requests is read no faster than they are
//! answered, a reading client gets a reply of any size (up to
//! `max_reply_bytes`), and a stopping qmpmux answers what it still owes.

mod common;

use common::fake::FakeServer;
use common::{binary, Client, Daemon, Qemu};
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::net::UnixStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_big_requests_is_not_read_beyond_its_byte_budget() {
    const REQUESTS: usize = 40;
    const PAD: usize = 256 << 10;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("fake.sock"), dir.path().join("vm.sock"));
    let fake = FakeServer::bind(&up);
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| c.client.max_pending_bytes = 1 << 20).await;
    let mut conn = fake.accept_ready().await;
    let mut client = Client::ready(&sock).await;
    client.send(r#"{"execute":"query-status","id":"hello"}"#).await;
    let req = conn.read().await.unwrap();
    conn.reply(&req, json!({})).await;
    assert_eq!(client.reply().await["id"], "hello");

    // 40 requests of 256 KiB each (10 MiB) that QEMU does not answer yet.
    let pad = "x".repeat(PAD);
    let data: Vec<u8> = (0..REQUESTS)
        .flat_map(|i| format!(r#"{{"execute":"big","arguments":{{"pad":"{pad}"}},"id":{i}}}"#).into_bytes())
        .collect();
    let (reader, writer) = client.into_inner();
    let stream = writer.as_ref();
    let mut sent = 0;
    // Write until qmpmux stops taking bytes for a while.
    while sent < data.len() {
        match tokio::time::timeout(Duration::from_millis(500), stream.writable()).await {
            Err(_) => break,
            Ok(r) => r.unwrap(),
        }
        match stream.try_write(&data[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("write: {e}"),
        }
    }
    // qmpmux took its 1 MiB budget, the request it was reading, and what
    // the kernel buffers; not the 64 requests `max_in_flight` allows.
    assert!(
        sent < 3 << 20,
        "qmpmux took {sent} bytes of requests nobody answered (budget 1 MiB)"
    );

    // Once QEMU answers, reading resumes and every request is served, in order.
    let rest = data[sent..].to_vec();
    let mut writer = writer;
    let write_rest = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        writer.write_all(&rest).await.unwrap();
        writer
    });
    let answer = tokio::spawn(async move {
        for _ in 0..REQUESTS {
            let req = conn.read().await.expect("request");
            assert_eq!(req["arguments"]["pad"].as_str().map(str::len), Some(PAD));
            conn.reply(&req, json!("ok")).await;
        }
        conn
    });
    let mut reader = reader;
    for i in 0..REQUESTS {
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line))
            .await
            .expect("reply")
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v, json!({"return": "ok", "id": i}));
    }
    let _conn = answer.await.unwrap();
    let _writer = write_rest.await.unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_bigger_than_the_queue_budget_reaches_a_reading_client() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    // The schema is ~200 KB: more than the whole queue budget.
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| c.client.max_queue_bytes = 64 << 10).await;
    let mut c = Client::ready(&sock).await;
    for id in 0..3 {
        let r = c.cmd(&format!(r#"{{"execute":"query-qmp-schema","id":{id}}}"#)).await;
        assert_eq!(r["id"], id);
        assert!(r["return"].as_array().is_some_and(|a| a.len() > 100), "{id}");
    }
    assert!(c.cmd(r#"{"execute":"query-status","id":"s"}"#).await["return"].is_object());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_larger_than_the_socket_reaches_an_idle_client_whole_and_before_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut c = Client::ready(&sock).await;
    // The schema (~200 KB) is more than the client's socket holds: qmpmux
    // writes what fits at once and the rest as the client reads, before
    // the events and replies that come after it.
    c.send(r#"{"execute":"query-qmp-schema","id":"big"}"#).await;
    c.send(r#"{"execute":"stop","id":"s"}"#).await;
    c.send(r#"{"execute":"cont","id":"c"}"#).await;
    // Not reading for a moment: the socket is full when qmpmux writes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = c.recv().await;
    assert_eq!(r["id"], "big", "the reply first, whole");
    assert!(r["return"].as_array().is_some_and(|a| a.len() > 100));
    let mut rest = Vec::new();
    for _ in 0..4 {
        let m = c.recv().await;
        rest.push(m["event"].as_str().or(m["id"].as_str()).unwrap_or_default().to_string());
    }
    assert_eq!(rest, ["STOP", "s", "RESUME", "c"]);
    assert_eq!(c.cmd(r#"{"execute":"query-status","id":2}"#).await["id"], 2);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_above_max_reply_bytes_is_an_error_with_its_id_and_the_client_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| c.client.max_reply_bytes = 64 << 10).await;
    let mut c = Client::ready(&sock).await;
    let r = c.cmd(r#"{"execute":"query-qmp-schema","id":"big"}"#).await;
    assert_eq!(r["id"], "big", "{r}");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let desc = r["error"]["desc"].as_str().unwrap();
    assert!(desc.contains("max_reply_bytes = 65536"), "{desc}");
    // Smaller replies still come, on the same connection.
    assert!(c.cmd(r#"{"execute":"query-status","id":"s"}"#).await["return"].is_object());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_qmpmux_answers_unanswered_commands_before_closing() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let fake = FakeServer::bind(&p("fake.sock"));
    std::fs::write(
        p("qmpmux.toml"),
        format!(
            "log_format = \"json\"\n[[vm]]\nname = \"vm\"\nupstream = \"{}\"\nlisten = \"{}\"\n",
            p("fake.sock").display(),
            p("vm.sock").display(),
        ),
    )
    .unwrap();
    let log = std::fs::File::create(p("out.log")).unwrap();
    let mut cmd = binary::command();
    cmd.arg("--config").arg(p("qmpmux.toml")).stdout(Stdio::from(log));
    let mut child = cmd.spawn().unwrap();
    let mut conn = fake.accept_ready().await;
    common::eventually("qmpmux to serve", async || {
        UnixStream::connect(p("vm.sock")).await.is_ok()
    })
    .await;
    let mut c = Client::ready(&p("vm.sock")).await;
    c.send(r#"{"execute":"stop","id":"pending"}"#).await;
    // QEMU takes the command and never answers it.
    assert_eq!(conn.read().await.unwrap()["execute"], "stop");
    // From this process: no kill(1), which a minimal system lacks.
    // SAFETY: kill(2) on our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    // After the grace period: an error reply with the client's id, then EOF.
    let r = c.recv().await;
    assert_eq!(r["id"], "pending", "{r}");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    assert!(r["error"]["desc"].as_str().unwrap().contains("stopping"), "{r}");
    c.expect_eof().await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    let lines: Vec<Value> = std::fs::read_to_string(p("out.log"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let audit: Vec<&Value> = lines.iter().filter(|v| v["target"] == "qmpmux::audit").collect();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["fields"]["command"], "stop");
    assert_eq!(audit[0]["fields"]["outcome"], "no reply: connection ended first");
    let text = std::fs::read_to_string(p("out.log")).unwrap();
    assert!(!text.contains("not reading"), "the client was blamed:\n{text}");
    drop(conn);
}
