//! Out-of-band execution end to end: offered when QEMU offers it, `exec-oob`
//! sent at once past a full in-band window, its reply overtaking in-band
//! ones, and policy applying to it as to `execute`.

mod common;

use common::{Client, Daemon, Qemu};
use serde_json::json;
use std::path::Path;

async fn oob_client(sock: &Path) -> Client {
    let (mut c, g) = Client::open(sock).await;
    assert_eq!(g["QMP"]["capabilities"], json!(["oob"]));
    c.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
        .await;
    assert_eq!(c.recv().await, json!({"return": {}}));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oob_skips_a_full_window_and_its_reply_overtakes() {
    let (_dir, fake, daemon, sock) = common::fake::vm().await;
    let mut conn = fake.accept_ready().await;
    // Nine clients with one in-band command each: QEMU's queue takes eight,
    // the ninth waits in qmpmux. Then an OOB command, which must not wait
    // behind them.
    let mut clients = Vec::new();
    for c in 0..9 {
        let mut client = oob_client(&sock).await;
        client.send(&format!(r#"{{"execute":"slow","id":"c{c}"}}"#)).await;
        clients.push(client);
    }
    let mut held = Vec::new();
    for _ in 0..8 {
        let req = conn.read().await.unwrap();
        assert_eq!(req["execute"], "slow", "{req}");
        assert!(
            req["id"].is_u64(),
            "qmpmux's own ids go upstream, not the client's: {req}"
        );
        held.push(req);
    }
    let c = &mut clients[0];
    c.send(r#"{"exec-oob":"yank","id":"urgent"}"#).await;
    let oob = conn.read().await.unwrap();
    assert_eq!(
        oob["exec-oob"], "yank",
        "the OOB command must pass the full window: {oob}"
    );
    conn.reply(&oob, json!({})).await;
    // Its reply comes first, ahead of the client's older in-band one.
    assert_eq!(c.reply().await, json!({"return": {}, "id": "urgent"}));
    for req in &held {
        conn.reply(req, json!("done")).await;
    }
    let ninth = conn.read().await.unwrap();
    conn.reply(&ninth, json!("done")).await;
    for (n, c) in clients.iter_mut().enumerate() {
        assert_eq!(c.reply().await, json!({"return": "done", "id": format!("c{n}")}));
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oob_against_real_qemu_and_policy() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
        c.vms[0].listeners = vec![qmpmux::config::ListenerConfig {
            policy: qmpmux::policy::Policy {
                allow: vec![qmpmux::policy::Glob::new("query-*")],
                deny: Vec::new(),
            },
            ..qmpmux::config::ListenerConfig::new("ro", qmpmux::config::Endpoint::unix(p("ro.sock")))
        }];
    })
    .await;
    let mut rw = oob_client(&p("rw.sock")).await;
    // QEMU's own answers to exec-oob come back with the client's id.
    assert_eq!(
        rw.cmd(r#"{"exec-oob":"query-status","id":1}"#).await,
        json!({"id": 1, "error": {"class": "GenericError", "desc": "The command query-status does not support OOB"}})
    );
    let r = rw.cmd(r#"{"exec-oob":"migrate-pause","id":2}"#).await;
    assert_eq!(r["id"], 2);
    assert!(r["error"]["desc"].as_str().unwrap().contains("migrate-pause"), "{r}");
    // In-band still works on the same connection.
    assert!(rw.cmd(r#"{"execute":"query-status","id":3}"#).await["return"].is_object());
    // Policy covers exec-oob as it covers execute.
    let mut ro = oob_client(&p("ro.sock")).await;
    let r = ro.cmd(r#"{"exec-oob":"migrate-pause","id":"x"}"#).await;
    assert!(
        r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("'migrate-pause' is not allowed"),
        "{r}"
    );
    daemon.stop().await;
}
