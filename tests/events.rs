//! Events users can rely on, against real QEMU: filters per socket and per
//! client, sequence numbers, history and resume without loss, and the
//! query of kept events.

mod common;

use common::http::{metrics, sample};
use common::qemu::Monitor;
use common::{Client, Daemon, Qemu};
use qmpmux::config::{Endpoint, ListenerConfig};
use qmpmux::policy::Glob;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

const SEQ: &str = "__org.qmpmux_seq";

fn globs(p: &[&str]) -> Option<Arc<[Glob]>> {
    Some(p.iter().map(|s| Glob::new(*s)).collect())
}

/// Every event `c` receives until the reply to a `query-status` marker
/// (sent after the events were caused, so all of them precede it).
async fn events_until_marker(c: &mut Client) -> Vec<Value> {
    c.send(r#"{"execute":"query-status","id":"marker"}"#).await;
    let mut events = Vec::new();
    loop {
        let v = c.recv().await;
        if v.get("event").is_some() {
            events.push(v);
        } else {
            assert_eq!(v["id"], "marker", "{v}");
            return events;
        }
    }
}

fn names(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["event"].as_str().unwrap()).collect()
}

async fn subscribe(c: &mut Client, args: &str) -> Value {
    let r = c
        .cmd(&format!(
            r#"{{"execute":"__org.qmpmux_subscribe","arguments":{args},"id":"sub"}}"#
        ))
        .await;
    assert_eq!(r["id"], "sub", "{r}");
    r["return"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_and_clients_filter_events() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock, ro) = (
        dir.path().join("q.sock"),
        dir.path().join("vm.sock"),
        dir.path().join("ro.sock"),
    );
    let _qemu = Qemu::start(&up).await;
    let ro2 = ro.clone();
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], move |c| {
        let mut l = ListenerConfig::new("resumes", Endpoint::unix(ro2));
        l.events = globs(&["RES*"]);
        c.vms[0].listeners.push(l);
    })
    .await;
    let mut driver = Client::ready(&sock).await;
    let mut all = Client::ready(&sock).await;
    let mut narrowed = Client::ready(&sock).await;
    let mut on_socket = Client::ready(&ro).await;
    let ret = subscribe(&mut narrowed, r#"{"events": ["STOP"]}"#).await;
    assert_eq!(ret["events"], serde_json::json!(["STOP"]));
    // A client on a socket with a set asks for more than the set.
    let ret = subscribe(&mut on_socket, r#"{"events": ["RESUME", "STOP"]}"#).await;
    assert_eq!(ret["sequence"], false);

    driver.stop_cont(2).await;
    assert_eq!(
        names(&events_until_marker(&mut all).await),
        ["STOP", "RESUME", "STOP", "RESUME"]
    );
    assert_eq!(names(&events_until_marker(&mut narrowed).await), ["STOP", "STOP"]);
    // Narrowing stays within the socket's set: STOP never reaches it.
    assert_eq!(names(&events_until_marker(&mut on_socket).await), ["RESUME", "RESUME"]);

    // `["*"]` restores the socket's set.
    subscribe(&mut narrowed, r#"{"events": ["*"]}"#).await;
    driver.stop_cont(1).await;
    assert_eq!(names(&events_until_marker(&mut narrowed).await), ["STOP", "RESUME"]);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_only_for_clients_that_ask_and_qemu_s_bytes_for_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut plain = Client::ready(&sock).await;
    let mut counted = Client::ready(&sock).await;
    let ret = subscribe(&mut counted, r#"{"sequence": true}"#).await;
    let next = ret["next"].as_u64().unwrap();
    assert_eq!(ret["sequence"], true);
    assert_eq!(ret["lost"], false);
    plain.send(r#"{"execute":"stop"}"#).await;
    plain.send(r#"{"execute":"cont"}"#).await;
    let mut plain_lines = Vec::new();
    while plain_lines.len() < 2 {
        let line = plain.line().await;
        if line.contains("\"event\"") {
            plain_lines.push(line);
        }
    }
    let mut counted_lines = Vec::new();
    while counted_lines.len() < 2 {
        counted_lines.push(counted.line().await);
    }
    for (i, (p, c)) in plain_lines.iter().zip(&counted_lines).enumerate() {
        assert!(!p.contains(SEQ), "{p}");
        // The numbered line is QEMU's, with one member added at the end.
        let member = format!(", \"{SEQ}\": {}}}\r\n", next + i as u64);
        assert_eq!(c.strip_suffix(&member), p.strip_suffix("}\r\n"), "{c} vs {p}");
    }
    daemon.stop().await;
}

/// A consumer drops out in the middle of a burst of 1,000 events and comes
/// straight back: counting numbered events only, it sees every one exactly
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resuming_mid_burst_gets_every_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut consumer = Client::ready(&sock).await;
    let first = subscribe(&mut consumer, r#"{"sequence": true}"#).await["next"]
        .as_u64()
        .unwrap();
    let burst = tokio::spawn({
        let sock = sock.clone();
        async move {
            let mut driver = Client::ready(&sock).await;
            driver.stop_cont(500).await;
        }
    });
    let mut seen = Vec::new();
    while seen.len() < 300 {
        let v = consumer.recv().await;
        seen.push(v[SEQ].as_u64().expect("numbered event"));
    }
    drop(consumer);
    let mut consumer = Client::ready(&sock).await;
    let ret = subscribe(&mut consumer, &format!(r#"{{"since": {}}}"#, seen.last().unwrap())).await;
    assert_eq!(ret["lost"], false, "{ret}");
    while seen.len() < 1000 {
        let v = consumer.recv().await;
        // Events that reached the new connection before its subscribe are
        // QEMU's own, unnumbered: they come again, numbered, in the replay.
        if let Some(n) = v.get(SEQ) {
            seen.push(n.as_u64().unwrap());
        }
    }
    burst.await.unwrap();
    let want: Vec<u64> = (first..first + 1000).collect();
    assert_eq!(seen, want);
    consumer.expect_silence(Duration::from_millis(200)).await;
    daemon.stop().await;
}

/// Events that happen while no client is connected at all are kept and
/// delivered on resume. QEMU gets a second monitor to be driven through,
/// so qmpmux has no client at all meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_while_nobody_is_connected_are_delivered_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (up, direct, sock) = (
        dir.path().join("q.sock"),
        dir.path().join("direct.sock"),
        dir.path().join("vm.sock"),
    );
    let _qemu = Qemu::spawn(&[Monitor::Serve(&up), Monitor::Serve(&direct)], None)
        .listening()
        .await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut consumer = Client::ready(&sock).await;
    let next = subscribe(&mut consumer, r#"{"sequence": true}"#).await["next"]
        .as_u64()
        .unwrap();
    drop(consumer);
    let mut driver = Client::ready(&direct).await;
    driver.stop_cont(3).await;
    // qmpmux reads QEMU's events on its own monitor a moment after the
    // driver's replies: wait until it has numbered all six.
    let mut consumer = Client::ready(&sock).await;
    for _ in 0..250 {
        let r = consumer
            .cmd(r#"{"execute":"__org.qmpmux_query-events","arguments":{"limit":1},"id":"q"}"#)
            .await;
        if r["return"]["next"].as_u64() == Some(next + 6) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ret = subscribe(&mut consumer, &format!(r#"{{"since": {}}}"#, next - 1)).await;
    assert_eq!(ret["lost"], false);
    assert_eq!(ret["next"], next + 6);
    let got = events_until_marker(&mut consumer).await;
    assert_eq!(names(&got), ["STOP", "RESUME", "STOP", "RESUME", "STOP", "RESUME"]);
    let seqs: Vec<u64> = got.iter().map(|v| v[SEQ].as_u64().unwrap()).collect();
    assert_eq!(seqs, (next..next + 6).collect::<Vec<_>>());
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowed_history_says_lost_and_replays_what_it_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start_with(&[("vm", &up, &sock)], |c| {
        c.upstream.event_history = 10;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut c = Client::ready(&sock).await;
    let next = subscribe(&mut c, "{}").await["next"].as_u64().unwrap();
    c.stop_cont(15).await;
    let _ = events_until_marker(&mut c).await;
    let mut r = Client::ready(&sock).await;
    let ret = subscribe(&mut r, &format!(r#"{{"since": {}}}"#, next - 1)).await;
    assert_eq!(ret["lost"], true, "{ret}");
    assert_eq!(ret["oldest"], next + 20);
    assert_eq!(ret["next"], next + 30);
    let replayed: Vec<u64> = events_until_marker(&mut r)
        .await
        .iter()
        .map(|v| v[SEQ].as_u64().unwrap())
        .collect();
    assert_eq!(replayed, (next + 20..next + 30).collect::<Vec<_>>());
    // Resuming from a number this run never gave out is a loss too, not a
    // silent replay of the wrong events.
    let ret = subscribe(&mut r, &format!(r#"{{"since": {}}}"#, next + 1000)).await;
    assert_eq!(ret["lost"], true);
    let body = metrics(daemon.metrics_addr.unwrap()).await;
    assert_eq!(
        sample(&body, "qmpmux_event_history_events{vm=\"vm\"}"),
        Some(10.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "qmpmux_event_history_evicted_total{vm=\"vm\"}"),
        Some(20.0)
    );
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_events_returns_kept_events_without_subscribing() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut c = Client::ready(&sock).await;
    c.stop_cont(2).await;
    let _ = events_until_marker(&mut c).await;
    let r = c
        .cmd(r#"{"execute":"__org.qmpmux_query-events","arguments":{"limit":3},"id":1}"#)
        .await;
    let ret = &r["return"];
    let events = ret["events"].as_array().unwrap();
    assert_eq!(names(events), ["STOP", "RESUME", "STOP"]);
    let first = events[0][SEQ].as_u64().unwrap();
    assert_eq!(ret["oldest"], first);
    assert_eq!(ret["next"], first + 4);
    let r = c
        .cmd(&format!(
            r#"{{"execute":"__org.qmpmux_query-events","arguments":{{"since":{}}},"id":2}}"#,
            first + 2
        ))
        .await;
    assert_eq!(names(r["return"]["events"].as_array().unwrap()), ["RESUME"]);
    // Bad arguments get QEMU's kind of error, with the id.
    let r = c
        .cmd(r#"{"execute":"__org.qmpmux_query-events","arguments":{"since":"x"},"id":3}"#)
        .await;
    assert_eq!(r["id"], 3);
    assert_eq!(
        r["error"]["desc"],
        "Invalid parameter type for 'since', expected: integer"
    );
    // query-events subscribes to nothing: the plain client gets no numbers.
    c.stop_cont(1).await;
    for e in events_until_marker(&mut c).await {
        assert!(e.get(SEQ).is_none(), "{e}");
    }
    daemon.stop().await;
}

/// A consumer that subscribes with `since` before `qmp_capabilities` (the
/// one command qmpmux takes then) gets no unnumbered event first: every
/// event after its number exactly once, numbered and in order, also those
/// QEMU emits while it switches over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_subscribing_before_negotiation_gets_every_event_once_numbered() {
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let daemon = Daemon::start(&[("vm", &up, &sock)]).await;
    let mut driver = Client::ready(&sock).await;
    driver.stop_cont(10).await;
    let kept = driver
        .cmd(r#"{"execute":"__org.qmpmux_query-events","arguments":{"limit":1000},"id":"q"}"#)
        .await;
    let since = kept["return"]["events"][5][SEQ].as_u64().expect("a kept event");
    // QEMU emits events all through the consumer's switch.
    let burst = tokio::spawn(async move {
        driver.stop_cont(200).await;
        driver
    });
    let (mut c, _) = Client::open(&sock).await;
    c.send(&format!(
        r#"{{"execute":"__org.qmpmux_subscribe","arguments":{{"since":{since}}},"id":"sub"}}{{"execute":"qmp_capabilities","id":"cap"}}"#
    ))
    .await;
    let mut seen = Vec::new();
    let mut replies = Vec::new();
    while replies.len() < 2 {
        let v = c.recv().await;
        match v.get("event") {
            Some(_) => seen.push(v[SEQ].as_u64().unwrap_or_else(|| panic!("unnumbered event {v}"))),
            None => replies.push(v),
        }
    }
    assert_eq!(replies[0]["id"], "sub", "{}", replies[0]);
    assert_eq!(replies[0]["return"]["lost"], false, "{}", replies[0]);
    assert_eq!(replies[1], serde_json::json!({"return": {}, "id": "cap"}));
    let mut driver = burst.await.unwrap();
    let next = driver
        .cmd(r#"{"execute":"__org.qmpmux_query-events","arguments":{"limit":1},"id":"n"}"#)
        .await["return"]["next"]
        .as_u64()
        .unwrap();
    for v in events_until_marker(&mut c).await {
        seen.push(v[SEQ].as_u64().unwrap_or_else(|| panic!("unnumbered event {v}")));
    }
    let want: Vec<u64> = (since + 1..next).collect();
    assert_eq!(seen, want);
    // Other commands still wait for negotiation, as with QEMU: checked on
    // a fresh connection.
    let (mut early, _) = Client::open(&sock).await;
    let r = early.cmd(r#"{"execute":"__org.qmpmux_query-events","id":1}"#).await;
    assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    daemon.stop().await;
}
