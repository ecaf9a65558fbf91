//! Beyond one host, against a real nats-server (with JetStream) and real
//! QEMU: events published, the stream holding each exactly once across a
//! NATS restart, commands over NATS, the VM list, and local clients
//! unaffected while NATS is down.

mod common;

use async_nats::jetstream;
use common::nats::NatsServer;
use common::{Client, Daemon, Qemu};
use futures_util::StreamExt;
use qmpmux::config::{NatsAuth, NatsConfig};
use qmpmux::policy::{Glob, Policy};
use serde_json::Value;
use std::time::Duration;

const SEQ: &str = "__org.qmpmux_seq";
const WAIT: Duration = Duration::from_secs(20);

fn nats_config(url: &str, stream: Option<&str>, commands: bool) -> NatsConfig {
    let mut config = common::nats::qmpmux_config(&[url.to_string()], stream);
    config.commands = commands;
    config.policy = Policy {
        allow: Vec::new(),
        deny: vec![Glob::new("system_reset")],
    };
    config
}

async fn nats_client(url: &str) -> async_nats::Client {
    async_nats::connect(url).await.expect("connect to nats-server")
}

async fn next_number(c: &mut Client) -> u64 {
    let r = c.cmd(r#"{"execute":"__org.qmpmux_subscribe","arguments":{}}"#).await;
    r["return"]["next"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_a_real_qemu_reach_a_subscriber_and_the_vm_list_is_served() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    let watcher = nats_client(&url).await;
    let mut events = watcher.subscribe("qmpmux.hv1.*.event.>").await.unwrap();
    watcher.flush().await.unwrap();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.nats = Some(nats_config(&url, None, false))
    })
    .await;
    let mut c = Client::ready(&sock).await;
    let first = next_number(&mut c).await;
    c.stop_cont(1).await;
    for (i, name) in ["STOP", "RESUME"].iter().enumerate() {
        let msg = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("event over NATS")
            .unwrap();
        assert_eq!(msg.subject.as_str(), format!("qmpmux.hv1.web01.event.{name}"));
        let h = msg.headers.as_ref().expect("headers");
        assert_eq!(h.get("Qmpmux-Vm").unwrap().as_str(), "web01");
        assert_eq!(h.get("Qmpmux-Host").unwrap().as_str(), "hv1");
        assert_eq!(h.get("Qmpmux-Seq").unwrap().as_str(), (first + i as u64).to_string());
        let v: Value = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(v["event"], *name);
        assert!(v["timestamp"]["seconds"].is_u64(), "QEMU's event as it is: {v}");
    }
    // A fleet tool discovers the VMs.
    let list = tokio::time::timeout(WAIT, watcher.request("qmpmux.hv1.vms", "".into()))
        .await
        .unwrap()
        .unwrap();
    let list: Value = serde_json::from_slice(&list.payload).unwrap();
    assert_eq!(list["host"], "hv1");
    assert_eq!(list["vms"], serde_json::json!(["web01"]));
    daemon.stop().await;
}

/// A burst of events with NATS restarted in the middle: the stream ends up
/// with each event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_holds_every_event_once_across_a_nats_restart() {
    let mut nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.nats = Some(nats_config(&url, Some("QMPMUX"), false));
    })
    .await;
    let js = jetstream::new(nats_client(&url).await);
    // The stream exists once qmpmux has made it.
    let mut stream = None;
    for _ in 0..400 {
        if let Ok(s) = js.get_stream("QMPMUX").await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stream.expect("qmpmux created the stream");
    let mut c = Client::ready(&sock).await;
    let first = next_number(&mut c).await;
    let total = 200u64;
    c.stop_cont(50).await;
    nats.stop().await;
    // Local clients do not notice: commands and events as ever.
    c.stop_cont(25).await;
    nats.restart().await;
    c.stop_cont(25).await;

    let js = jetstream::new(nats_client(&url).await);
    let mut stream = js.get_stream("QMPMUX").await.unwrap();
    let mut count = 0;
    for _ in 0..800 {
        count = stream.info().await.unwrap().state.messages;
        if count >= total {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(count, total, "messages in the stream");
    let mut seqs = Vec::new();
    for n in 1..=count {
        let m = stream.get_raw_message(n).await.unwrap();
        let seq: u64 = m.headers.get("Qmpmux-Seq").unwrap().as_str().parse().unwrap();
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        assert!(v.get(SEQ).is_none(), "QEMU's event as it is: {v}");
        seqs.push(seq);
    }
    assert_eq!(seqs, (first..first + total).collect::<Vec<_>>());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_nats_run_are_refused_by_policy_and_unknown_vms_get_an_error() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.nats = Some(nats_config(&url, None, true))
    })
    .await;
    let client = nats_client(&url).await;
    let request = |subject: &'static str, body: &'static str| {
        let client = client.clone();
        async move {
            // The commander subscribes once qmpmux is connected: retry
            // while nobody answers.
            for _ in 0..200 {
                match client.request(subject, body.into()).await {
                    Ok(m) => return serde_json::from_slice::<Value>(&m.payload).unwrap(),
                    Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
                }
            }
            panic!("no answer on {subject}");
        }
    };
    // Once qmpmux has QEMU's greeting (a local client gets it), commands
    // reach QEMU; before that they would get "not connected".
    let mut local = Client::ready(&sock).await;
    let r = request("qmpmux.hv1.web01.execute", r#"{"execute":"query-status","id":"a"}"#).await;
    assert_eq!(r["id"], "a");
    assert_eq!(r["return"]["status"], "running", "{r}");
    // A command that changes the VM, seen by a local client's events.
    let r = request("qmpmux.hv1.web01.execute", r#"{"execute":"stop","id":1}"#).await;
    assert!(r.get("return").is_some(), "{r}");
    local.event("STOP").await;
    let r = request("qmpmux.hv1.web01.execute", r#"{"execute":"system_reset","id":2}"#).await;
    assert_eq!(r["id"], 2);
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("not allowed"),
        "policy refusal: {r}"
    );
    let r = request("qmpmux.hv1.nope.execute", r#"{"execute":"query-status","id":3}"#).await;
    assert_eq!(r["id"], 3);
    assert!(r["error"]["desc"].as_str().unwrap().contains("no VM 'nope'"), "{r}");
    let r = request("qmpmux.hv1.web01.execute", r#"{"execute":"no-such-thing","id":4}"#).await;
    assert_eq!(r["error"]["class"], "CommandNotFound", "QEMU's own answer: {r}");
    let r = request("qmpmux.hv1.web01.execute", r#"not json"#).await;
    assert!(r["error"].is_object(), "{r}");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_clients_work_while_nats_is_down() {
    let mut nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    nats.stop().await;
    // NATS down from the start: qmpmux serves all the same.
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.nats = Some(nats_config(&url, Some("QMPMUX"), true));
    })
    .await;
    let mut c = Client::ready(&sock).await;
    let first = next_number(&mut c).await;
    c.send(r#"{"execute":"stop"}"#).await;
    c.event("STOP").await;
    assert!(c.reply().await.get("return").is_some());
    c.send(r#"{"execute":"cont"}"#).await;
    c.event("RESUME").await;
    assert!(c.reply().await.get("return").is_some());
    c.stop_cont(2).await;
    // Once NATS is up, what happened meanwhile is published, in order.
    nats.restart().await;
    let js = jetstream::new(nats_client(&url).await);
    let mut count = 0;
    for _ in 0..800 {
        if let Ok(mut s) = js.get_stream("QMPMUX").await {
            count = s.info().await.unwrap().state.messages;
            if count >= 6 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(count, 6);
    let stream = js.get_stream("QMPMUX").await.unwrap();
    let last = stream.get_raw_message(6).await.unwrap();
    assert_eq!(
        last.headers.get("Qmpmux-Seq").unwrap().as_str(),
        (first + 5).to_string()
    );
    daemon.stop().await;
}

/// The permissions docs/fleet.md shows, on a real server: qmpmux's own
/// user, a monitoring user that may only watch, an orchestrator that may
/// send commands. (Keep in step with the guide.)
const PERMISSIONS: &str = r#"
authorization {
  users = [
    { user: qmpmux, password: qmpmux-secret, permissions: {
        publish: ["qmpmux.>", "$JS.API.>", "_INBOX.>"]
        subscribe: ["qmpmux.*.*.execute", "qmpmux.*.vms", "qmpmux.vms", "_INBOX.>"] } }
    { user: monitor, password: monitor-secret, permissions: {
        publish: ["qmpmux.*.vms", "qmpmux.vms"]
        subscribe: ["qmpmux.*.*.event.>", "qmpmux.*.*.state", "qmpmux.*.vms", "_INBOX.>"] } }
    { user: orchestrator, password: orchestrator-secret, permissions: {
        publish: ["qmpmux.*.*.execute", "qmpmux.*.vms", "qmpmux.vms"]
        subscribe: ["_INBOX.>"] } }
  ]
}
"#;

async fn connect_as(url: &str, user: &str, password: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .connect(url)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_decide_who_watches_and_who_commands() {
    let nats = NatsServer::start_with_config(PERMISSIONS).await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    let monitor = connect_as(&url, "monitor", "monitor-secret").await;
    let mut events = monitor.subscribe("qmpmux.*.*.event.>").await.unwrap();
    monitor.flush().await.unwrap();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        let mut n = nats_config(&url, None, true);
        n.auth = NatsAuth::UserPassword {
            user: "qmpmux".into(),
            password: "qmpmux-secret".into(),
        };
        c.nats = Some(n);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    // Commands reach QEMU once qmpmux has its greeting.
    let mut c = Client::ready(&sock).await;
    let orchestrator = connect_as(&url, "orchestrator", "orchestrator-secret").await;
    let mut answer = None;
    for _ in 0..200 {
        if let Ok(m) = orchestrator
            .request("qmpmux.hv1.web01.execute", r#"{"execute":"stop","id":"o"}"#.into())
            .await
        {
            answer = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let r: Value = serde_json::from_slice(&answer.expect("orchestrator's command answered").payload).unwrap();
    assert_eq!(r["id"], "o");
    assert!(r.get("return").is_some(), "{r}");
    // The monitor sees the event the orchestrator caused...
    let msg = tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap();
    assert_eq!(msg.subject.as_str(), "qmpmux.hv1.web01.event.STOP");
    // ...but may not send commands: the server refuses its request.
    let refused = monitor
        .request("qmpmux.hv1.web01.execute", r#"{"execute":"cont"}"#.into())
        .await;
    assert!(refused.is_err(), "the monitor's command went through");
    // ...and finds the hosts with a request on `qmpmux.vms`.
    let list = monitor
        .request("qmpmux.vms", "".into())
        .await
        .expect("qmpmux.vms answered");
    let list: Value = serde_json::from_slice(&list.payload).unwrap();
    assert_eq!(list["host"], "hv1", "{list}");
    let r = c.cmd(r#"{"execute":"query-status"}"#).await;
    assert_eq!(
        r["return"]["status"], "paused",
        "the monitor's `cont` must not have run: {r}"
    );
    // qmpmux counts what it did.
    let body = common::http::metrics(daemon.metrics_addr.unwrap()).await;
    let sample = |s: &str| common::http::sample(&body, s).unwrap_or(0.0);
    assert_eq!(sample("qmpmux_nats_connected"), 1.0, "{body}");
    assert!(sample("qmpmux_nats_published_total") >= 2.0, "{body}");
    assert_eq!(sample("qmpmux_nats_commands_total"), 1.0, "{body}");
    daemon.stop().await;
}

/// A reload that changes `[nats]` moves publishing to the new server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_nats_changes() {
    let (old, new) = (NatsServer::start().await, NatsServer::start().await);
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let old_url = old.url();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.nats = Some(nats_config(&old_url, None, false))
    })
    .await;
    let watcher = nats_client(&new.url()).await;
    let mut events = watcher.subscribe("qmpmux.hv1.web01.event.>").await.unwrap();
    let mut vms = watcher.subscribe("qmpmux.hv1.vms").await.unwrap();
    watcher.flush().await.unwrap();
    let mut config = daemon.config.clone();
    config.nats = Some(nats_config(&new.url(), None, false));
    let summary = daemon.reload(config).await.expect("reload");
    assert_eq!(summary.unchanged, ["web01"]);
    // The new connection announces the VMs, then carries their events.
    let list = tokio::time::timeout(WAIT, vms.next()).await.unwrap().unwrap();
    let list: Value = serde_json::from_slice(&list.payload).unwrap();
    assert_eq!(list["vms"], serde_json::json!(["web01"]));
    let mut c = Client::ready(&sock).await;
    c.stop_cont(1).await;
    let msg = tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap();
    assert_eq!(msg.subject.as_str(), "qmpmux.hv1.web01.event.STOP");
    daemon.stop().await;
}

/// Runstate changes on `<prefix>.<vm>.state`, with qmpmux's losing and
/// regaining QEMU's monitor named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_are_published() {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let mut qemu = Qemu::start(&up).await;
    let url = nats.url();
    let watcher = nats_client(&url).await;
    let mut states = watcher.subscribe("qmpmux.hv1.web01.state").await.unwrap();
    watcher.flush().await.unwrap();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.nats = Some(nats_config(&url, None, false))
    })
    .await;
    let _c = Client::ready(&sock).await;
    let mut next_state = async || {
        let m = tokio::time::timeout(WAIT, states.next())
            .await
            .expect("a state message")
            .unwrap();
        serde_json::from_slice::<Value>(&m.payload).unwrap()
    };
    // Until it runs (it may have before the subscription took).
    loop {
        let v = next_state().await;
        assert_eq!(
            (v["vm"].as_str(), v["host"].as_str()),
            (Some("web01"), Some("hv1")),
            "{v}"
        );
        if v["runstate"] == "running" {
            break;
        }
    }
    qemu.kill9();
    loop {
        let v = next_state().await;
        if v["event"] == "__org.qmpmux_UPSTREAM_LOST" {
            assert_ne!(v["runstate"], "running");
            break;
        }
    }
    let _qemu2 = Qemu::start_watched(&up);
    loop {
        let v = next_state().await;
        if v["runstate"] == "running" {
            assert_eq!(v["event"], "__org.qmpmux_UPSTREAM_RESTORED", "{v}");
            break;
        }
    }
    daemon.stop().await;
}

/// Events that fall out of the history while NATS is away are counted and
/// the rest published: never a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_lost_to_a_long_outage_are_counted() {
    let mut nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    nats.stop().await;
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.nats = Some(nats_config(&url, Some("QMPMUX"), false));
        c.upstream.event_history = 4;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut c = Client::ready(&sock).await;
    let first = next_number(&mut c).await;
    c.stop_cont(10).await;
    nats.restart().await;
    // Every event is either in the stream or counted as dropped: the
    // publisher may have held a few in hand (fetched, waiting for NATS)
    // before the rest fell out of the history of 4.
    let js = jetstream::new(nats_client(&url).await);
    let addr = daemon.metrics_addr.unwrap();
    let (mut stored, mut dropped) = (0, 0);
    for _ in 0..800 {
        if let Ok(mut s) = js.get_stream("QMPMUX").await {
            stored = s.info().await.unwrap().state.messages;
        }
        let body = common::http::metrics(addr).await;
        dropped = common::http::sample(&body, "qmpmux_nats_dropped_total{reason=\"history\"}").unwrap_or(0.0) as u64;
        if stored + dropped >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(stored + dropped, 20, "stored {stored}, dropped {dropped}");
    assert!(dropped >= 12, "at most 4 kept and 4 in hand: dropped {dropped}");
    let stream = js.get_stream("QMPMUX").await.unwrap();
    let mut seqs = Vec::new();
    for n in 1..=stored {
        let m = stream.get_raw_message(n).await.unwrap();
        seqs.push(m.headers.get("Qmpmux-Seq").unwrap().as_str().parse::<u64>().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    // The newest four, which the history kept, are all there.
    assert_eq!(seqs[seqs.len() - 4..], [first + 16, first + 17, first + 18, first + 19]);
    daemon.stop().await;
}
