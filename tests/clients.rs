//! Many clients on one real QEMU through qmpmux: greetings, negotiation,
//! id restoration, ordering, events, framing.

mod common;

use common::{Client, Daemon, Qemu};
use serde_json::{json, Value};
use std::time::Duration;
use tempfile::TempDir;

struct Setup {
    _dir: TempDir,
    qemu: Qemu,
    daemon: Daemon,
    sock: std::path::PathBuf,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("qemu.sock");
    let sock = dir.path().join("vm.sock");
    let qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    Setup {
        _dir: dir,
        qemu,
        daemon,
        sock,
    }
}

/// Reads QEMU's greeting directly (before qmpmux takes the socket).
async fn direct_greeting(qemu: &Qemu) -> Value {
    let (_c, g) = Client::open(&qemu.socket).await;
    g
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_is_qemus_own_version() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("qemu.sock");
    let sock = dir.path().join("vm.sock");
    let qemu = Qemu::start(&up).await;
    let direct = direct_greeting(&qemu).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let (_c, g) = Client::open(&sock).await;
    assert_eq!(g["QMP"]["version"], direct["QMP"]["version"]);
    // OOB is offered exactly when QEMU offers it (qmpmux forwards it).
    assert_eq!(g["QMP"]["capabilities"], direct["QMP"]["capabilities"]);
    assert_eq!(g["QMP"]["capabilities"], json!(["oob"]));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_is_per_client_and_local() {
    let s = setup().await;
    let (mut a, _) = Client::open(&s.sock).await;
    let mut b = Client::ready(&s.sock).await;
    // a has not negotiated: QEMU's exact error, with the id.
    assert_eq!(
        a.cmd(r#"{"execute":"query-status","id":"x"}"#).await,
        json!({"id": "x", "error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
    );
    // b has: it works, and negotiating again is refused as QEMU refuses it.
    assert_eq!(b.cmd(r#"{"execute":"query-status","id":1}"#).await["id"], 1);
    assert_eq!(
        b.cmd(r#"{"execute":"qmp_capabilities","id":2}"#).await,
        json!({"id": 2, "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}})
    );
    assert_eq!(
        a.cmd(r#"{"execute":"qmp_capabilities","id":3}"#).await,
        json!({"return": {}, "id": 3})
    );
    assert!(a.cmd(r#"{"execute":"query-status","id":4}"#).await["return"]["status"].is_string());
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_of_every_json_type_come_back_exactly() {
    let s = setup().await;
    let mut c = Client::ready(&s.sock).await;
    let ids = [
        "1",
        "-7",
        "0",
        "2.5",
        "18446744073709551615",
        "\"__qmp#00001\"",
        "\"\\u00e9\\\"\"",
        "null",
        "true",
        "false",
        "[]",
        "[1, \"a\", null]",
        "{}",
        "{\"b\": {\"c\": [1, 2]}, \"a\": 1}",
    ];
    for id in ids {
        let reply = c.cmd(&format!("{{\"execute\":\"query-status\",\"id\":{id}}}")).await;
        let want: Value = serde_json::from_str(id).unwrap();
        assert_eq!(reply["id"], want, "id {id}");
        assert!(reply["return"].is_object(), "{reply}");
    }
    // null is an id; absent is no id.
    let reply = c.cmd(r#"{"execute":"query-status","id":null}"#).await;
    assert!(reply.as_object().unwrap().contains_key("id"));
    let reply = c.cmd(r#"{"execute":"query-status"}"#).await;
    assert!(!reply.as_object().unwrap().contains_key("id"), "{reply}");
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_keep_request_order_including_local_errors() {
    let s = setup().await;
    let mut c = Client::ready(&s.sock).await;
    // One write, no newlines: forwarded, locally refused, malformed and
    // id-less requests interleaved. Replies must come back in this order.
    c.send(concat!(
        r#"{"execute":"query-status"}"#,
        r#"{"execute":"qmp_capabilities"}"#,
        r#"{"execute":"query-name","id":"n"}"#,
        "[1]",
        r#"{"execute":"no-such-command"}"#,
        r#"{"execute":"query-status","bogus":true}"#,
        r#"{"execute":"query-version"}"#,
    ))
    .await;
    let r: Vec<Value> = futures_collect(&mut c, 7).await;
    assert!(r[0]["return"]["status"].is_string(), "{}", r[0]);
    assert_eq!(
        r[1]["error"]["desc"],
        "Capabilities negotiation is already complete, command ignored"
    );
    assert_eq!(r[2], json!({"return": {}, "id": "n"}));
    assert_eq!(r[3]["error"]["desc"], "QMP input must be a JSON object");
    assert_eq!(
        r[4],
        json!({"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}})
    );
    assert_eq!(r[5]["error"]["desc"], "QMP input member 'bogus' is unexpected");
    assert!(r[6]["return"]["qemu"].is_object(), "{}", r[6]);
    s.daemon.stop().await;
}

async fn futures_collect(c: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(c.reply().await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_like_qemu() {
    let s = setup().await;
    let mut c = Client::ready(&s.sock).await;
    // Over several lines and several writes.
    c.send("{\n  \"execute\":\n").await;
    c.send("  \"query-status\", \"id\": \"multi\"\n}").await;
    assert_eq!(c.reply().await["id"], "multi");
    // Several on one line, single quotes (QEMU accepts them).
    c.send("{'execute':'query-status','id':'sq'} {\"execute\":\"query-status\",\"id\":2}\n")
        .await;
    assert_eq!(c.reply().await["id"], "sq");
    assert_eq!(c.reply().await["id"], 2);
    // Garbage gets QEMU's id-less error and the session goes on.
    c.send("{\"execute\": @}").await;
    assert_eq!(c.reply().await["error"]["desc"], "JSON parse error, stray '@'");
    assert_eq!(c.reply().await["error"]["desc"], "JSON parse error, expecting value");
    assert_eq!(c.cmd(r#"{"execute":"query-status","id":3}"#).await["id"], 3);
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_pipelining_get_only_their_own_replies_in_order() {
    let s = setup().await;
    let mut tasks = Vec::new();
    for n in 0..8 {
        let sock = s.sock.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::ready(&sock).await;
            let mut batch = String::new();
            for i in 0..100 {
                batch.push_str(&format!("{{\"execute\":\"query-status\",\"id\":[{n},{i}]}}"));
            }
            c.send(&batch).await;
            for i in 0..100 {
                let r = c.reply().await;
                assert_eq!(r["id"], json!([n, i]), "client {n}");
                assert!(r["return"].is_object());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_pipeline_without_reading_does_not_deadlock() {
    let s = setup().await;
    let mut c = Client::ready(&s.sock).await;
    let mut other = Client::ready(&s.sock).await;
    // 2000 requests written before reading any reply: far beyond every
    // window and queue; qmpmux must apply backpressure, not deadlock.
    let mut batch = String::new();
    for i in 0..2000 {
        batch.push_str(&format!("{{\"execute\":\"query-status\",\"id\":{i}}}"));
    }
    let send = async {
        c.send(&batch).await;
        for i in 0..2000 {
            assert_eq!(c.reply().await["id"], i);
        }
    };
    let meanwhile = async {
        for i in 0..20 {
            assert_eq!(
                other.cmd(&format!("{{\"execute\":\"query-name\",\"id\":{i}}}")).await["id"],
                i
            );
        }
    };
    tokio::join!(send, meanwhile);
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_every_negotiated_client_and_no_other() {
    let s = setup().await;
    let mut a = Client::ready(&s.sock).await;
    let mut b = Client::ready(&s.sock).await;
    let (mut late, _) = Client::open(&s.sock).await;
    // As in QEMU, STOP may come before the reply to `stop`.
    a.send(r#"{"execute":"stop","id":"s"}"#).await;
    let mut got_event = false;
    loop {
        let v = a.recv().await;
        if v.get("event").is_some() {
            assert_eq!(v["event"], "STOP");
            assert!(v["timestamp"]["seconds"].is_u64());
            got_event = true;
        } else {
            assert_eq!(v, json!({"return": {}, "id": "s"}));
            break;
        }
    }
    if !got_event {
        a.event("STOP").await;
    }
    let e = b.event("STOP").await;
    assert!(e.get("data").is_none(), "STOP has no data member: {e}");
    // The client that had not negotiated got nothing; after negotiating it
    // gets later events.
    late.expect_silence(Duration::from_millis(200)).await;
    late.send(r#"{"execute":"qmp_capabilities"}"#).await;
    assert_eq!(late.recv().await, json!({"return": {}}));
    b.send(r#"{"execute":"cont"}"#).await;
    late.event("RESUME").await;
    a.event("RESUME").await;
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_lines_end_in_crlf_and_are_compact() {
    let s = setup().await;
    let mut c = Client::ready(&s.sock).await;
    c.send(r#"{"execute":"query-status","id":1}"#).await;
    let line = c.line().await;
    assert!(line.ends_with("}\r\n"), "{line:?}");
    assert_eq!(line.matches('\n').count(), 1);
    drop(s.qemu);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pretty_printing_qemu_is_forwarded_one_message_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("qemu.sock");
    let sock = dir.path().join("vm.sock");
    let qemu = Qemu::start_pretty(&up).await;
    // Check the premise: QEMU itself sends multi-line messages here.
    let mut direct = Client::connect(&qemu.socket).await;
    assert_eq!(direct.line().await, "{\r\n");
    drop(direct);
    // Through qmpmux: byte for byte what a compact-mode QEMU sends.
    let compact_qemu = Qemu::start(&dir.path().join("compact.sock")).await;
    let mut reference = Client::ready(&compact_qemu.socket).await;
    reference.send(r#"{"execute":"query-status","id":1}"#).await;
    let want = reference.line().await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let (mut c, greeting) = Client::open(&sock).await;
    assert!(greeting["QMP"]["version"]["qemu"].is_object());
    c.send(r#"{"execute":"qmp_capabilities"}"#).await;
    assert_eq!(c.line().await, "{\"return\": {}}\r\n");
    c.send(r#"{"execute":"query-status","id":1}"#).await;
    assert_eq!(c.line().await, want);
    c.send(r#"{"execute":"stop"}"#).await;
    let e = c.event("STOP").await;
    assert!(e["timestamp"].is_object());
    daemon.stop().await;
}

/// `echo '...' | socat - UNIX-CONNECT:...` style: the client shuts down its
/// sending side after its commands and still reads every reply, then EOF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_shuts_down_its_sending_side_still_gets_its_replies() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let c = Client::ready(&sock).await;
    let (mut rd, mut wr) = c.into_inner();
    wr.write_all(b"{\"execute\":\"query-status\",\"id\":1}\n{\"execute\":\"query-name\",\"id\":2}\n")
        .await
        .unwrap();
    wr.shutdown().await.unwrap();
    let mut ids = Vec::new();
    let mut line = String::new();
    while rd.read_line(&mut line).await.unwrap() > 0 {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v["return"].is_object(), "{v}");
        ids.push(v["id"].clone());
        line.clear();
    }
    assert_eq!(ids, vec![json!(1), json!(2)]);
    daemon.stop().await;
}
