//! Per-socket policy and identity against real QEMU: a read-only socket for
//! monitoring beside the full-control one, no bypass, peers filtered by uid.

mod common;

use common::{binary, Client, Daemon, Qemu};
use qmpmux::config::{Endpoint, ListenerConfig};
use qmpmux::policy::{Glob, Policy};
use serde_json::Value;
use std::path::Path;
use std::process::Stdio;

fn listener(name: &str, path: &Path, allow: &[&str], deny: &[&str]) -> ListenerConfig {
    ListenerConfig {
        policy: Policy {
            allow: allow.iter().map(|s| Glob::new(*s)).collect(),
            deny: deny.iter().map(|s| Glob::new(*s)).collect(),
        },
        ..ListenerConfig::new(name, Endpoint::unix(path))
    }
}

fn assert_denied(r: &Value, id: &str, command: &str) {
    assert_eq!(r["id"], id, "{r}");
    assert_eq!(r["error"]["class"], "GenericError", "{r}");
    let desc = r["error"]["desc"].as_str().unwrap();
    assert!(
        desc.contains(&format!("'{command}' is not allowed")) && desc.contains("policy"),
        "{desc}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_socket_beside_full_control() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
        c.vms[0].listeners = vec![
            listener("ro", &p("ro.sock"), &["query-*"], &[]),
            listener("nostop", &p("nostop.sock"), &[], &["stop", "quit", "system_*"]),
        ];
    })
    .await;
    let mut ro = Client::ready(&p("ro.sock")).await;
    let mut rw = Client::ready(&p("rw.sock")).await;
    assert!(ro.cmd(r#"{"execute":"query-status","id":"q"}"#).await["return"].is_object());
    for (req, id, name) in [
        (r#"{"execute":"quit","id":"a"}"#, "a", "quit"),
        // The same name, spelled with a JSON escape.
        (r#"{"execute":"\u0071uit","id":"b"}"#, "b", "quit"),
        (r#"{"execute":"stop","id":"c"}"#, "c", "stop"),
        (
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"quit"},"id":"d"}"#,
            "d",
            "human-monitor-command",
        ),
        (
            r#"{"execute":"transaction","arguments":{"actions":[]},"id":"e"}"#,
            "e",
            "transaction",
        ),
    ] {
        assert_denied(&ro.cmd(req).await, id, name);
    }
    // exec-oob is no way around it either (this client did not enable OOB,
    // so QEMU's own rule answers first; with OOB the policy would).
    let r = ro.cmd(r#"{"exec-oob":"quit","id":"f"}"#).await;
    assert_eq!(r["error"]["desc"], "QMP input member 'exec-oob' is unexpected");

    // Deny list: stop refused, HMP refused too (it could `stop` for us).
    let mut nostop = Client::ready(&p("nostop.sock")).await;
    assert_denied(&nostop.cmd(r#"{"execute":"stop","id":"s"}"#).await, "s", "stop");
    assert_denied(
        &nostop
            .cmd(r#"{"execute":"human-monitor-command","arguments":{"command-line":"stop"},"id":"h"}"#)
            .await,
        "h",
        "human-monitor-command",
    );
    assert_denied(
        &nostop.cmd(r#"{"execute":"system_reset","id":"r"}"#).await,
        "r",
        "system_reset",
    );
    assert_eq!(nostop.cmd(r#"{"execute":"query-name","id":1}"#).await["id"], 1);

    // Nothing reached QEMU: still running, and the full-control socket can
    // do what the others cannot, HMP included.
    let status = rw.cmd(r#"{"execute":"query-status"}"#).await;
    assert_eq!(status["return"]["status"], "running", "{status}");
    let hmp = rw
        .cmd(r#"{"execute":"human-monitor-command","arguments":{"command-line":"info status"},"id":"h"}"#)
        .await;
    assert!(hmp["return"].as_str().unwrap().contains("running"), "{hmp}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_restricted_to_uids_refuse_other_peers() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let me = nix::unistd::getuid().as_raw();
    let only = |uid: u32, path: &std::path::Path| Endpoint::Unix {
        path: path.to_owned(),
        uids: vec![uid],
        gids: Vec::new(),
    };
    let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
        let mut mine = listener("mine", &p("mine.sock"), &[], &[]);
        mine.endpoint = only(me, &p("mine.sock"));
        let mut theirs = listener("theirs", &p("theirs.sock"), &[], &[]);
        theirs.endpoint = only(me.wrapping_add(4242), &p("theirs.sock"));
        c.vms[0].listeners = vec![mine, theirs];
        // The main socket too ([[vm]] uids), as listener 0.
        c.vms[0].main.endpoint = only(me.wrapping_add(4242), &p("rw.sock"));
    })
    .await;
    Client::ready(&p("mine.sock")).await;
    for other in ["theirs.sock", "rw.sock"] {
        let mut refused = Client::connect(&p(other)).await;
        refused.expect_eof().await;
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_records_who_did_what() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    std::fs::write(
        p("qmpmux.toml"),
        format!(
            "log_format = \"json\"\n[[vm]]\nname = \"web01\"\nupstream = \"{}\"\nlisten = \"{}\"\n\
             [[vm.listener]]\nname = \"ro\"\npath = \"{}\"\nallow = [\"query-*\"]\n",
            p("q.sock").display(),
            p("rw.sock").display(),
            p("ro.sock").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(p("out.log")).unwrap();
    let mut cmd = binary::command();
    cmd.arg("--config").arg(p("qmpmux.toml")).stdout(Stdio::from(log));
    let mut child = cmd.spawn().unwrap();
    common::eventually("qmpmux to serve", async || {
        tokio::net::UnixStream::connect(p("ro.sock")).await.is_ok()
    })
    .await;
    let mut rw = Client::ready(&p("rw.sock")).await;
    let mut ro = Client::ready(&p("ro.sock")).await;
    assert!(rw.cmd(r#"{"execute":"stop","id":1}"#).await.get("return").is_some());
    assert!(rw.cmd(r#"{"execute":"no-such","id":2}"#).await.get("error").is_some());
    assert!(ro.cmd(r#"{"execute":"cont","id":3}"#).await.get("error").is_some());
    assert!(ro
        .cmd(r#"{"execute":"query-status","id":4}"#)
        .await
        .get("return")
        .is_some());
    let me = nix::unistd::getuid().as_raw();
    let entries = || -> Vec<Value> {
        std::fs::read_to_string(p("out.log"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "qmpmux::audit")
            .collect()
    };
    common::eventually("audit lines to be written", async || entries().len() >= 3).await;
    let got: Vec<(String, String, String)> = entries()
        .iter()
        .map(|v| {
            let f = &v["fields"];
            assert_eq!(f["vm"], "web01");
            assert_eq!(f["uid"], me);
            assert!(f["pid"].as_i64().unwrap() > 0 && f["duration_ms"].is_number(), "{v}");
            (
                f["listener"].as_str().unwrap().to_string(),
                f["command"].as_str().unwrap().to_string(),
                f["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    // Queries are not audited; everything else is, refusals included.
    assert_eq!(
        got,
        vec![
            s("main", "stop", "ok"),
            s("main", "no-such", "error"),
            s("ro", "cont", "denied by policy")
        ]
    );
    let _ = child.kill();
    let _ = child.wait();
}
