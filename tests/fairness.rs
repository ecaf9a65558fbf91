//! Clients take turns at the one QEMU monitor they share, as QEMU's own
//! monitors take turns: a client pipelining many slow commands does not make
//! another wait for all of them.

mod common;

use common::{Client, Daemon, Qemu};
use serde_json::Value;

/// The VM's queue as `__org.qmpmux_query-proxy` (answered by qmpmux itself)
/// reports it: (commands in QEMU, commands waiting in qmpmux).
async fn queue(c: &mut Client) -> (i64, i64) {
    let r = c.cmd(r#"{"execute":"__org.qmpmux_query-proxy","id":"q"}"#).await;
    let ret = &r["return"];
    (ret["in-flight"].as_i64().unwrap(), ret["queued"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_waits_behind_a_few_of_a_busy_clients_commands_not_all() {
    const BURST: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut busy = Client::ready(&sock).await;
    let mut newcomer = Client::ready(&sock).await;

    // The busy client pipelines slow commands (each reply is the whole
    // schema, ~200 KB) and does not read its replies yet.
    let burst: String = (0..BURST)
        .map(|i| format!(r#"{{"execute":"query-qmp-schema","id":{i}}}"#))
        .collect();
    busy.send(&burst).await;
    common::eventually("the burst to reach qmpmux", async || {
        queue(&mut newcomer).await.1 > BURST as i64 / 2
    })
    .await;

    // The newcomer's command is answered while most of the burst still
    // waits in qmpmux: it went ahead of the busy client's backlog.
    let status = newcomer.cmd(r#"{"execute":"query-status","id":"mine"}"#).await;
    assert_eq!(status["id"], "mine", "{status}");
    assert!(status["return"]["running"].is_boolean(), "{status}");
    let (in_flight, queued) = queue(&mut newcomer).await;
    assert!(
        queued >= BURST as i64 / 4,
        "the newcomer waited for the busy client's backlog: only {queued} left queued ({in_flight} in QEMU)"
    );
    // And the busy client keeps a small share of QEMU's queue, so the next
    // newcomer would wait behind just as few.
    assert!(
        in_flight <= 2,
        "{in_flight} of the busy client's commands in QEMU at once"
    );

    // The busy client gets every reply, in its own order, with its ids.
    for i in 0..BURST {
        let r: Value = busy.reply().await;
        assert_eq!(r["id"], i, "reply out of order");
        assert!(
            r["return"].is_array(),
            "{i}: {}",
            &r.to_string()[..100.min(r.to_string().len())]
        );
    }
    daemon.stop().await;
}
