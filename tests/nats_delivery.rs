//! NATS publishing when things are not as they should be, against real
//! nats-servers and real QEMU: events larger than the server takes, a
//! server behind TLS (and one whose certificate qmpmux must refuse), and a
//! three-server JetStream cluster losing the server qmpmux is connected to.
//!
//! Every test calls `logs()` first: the log capture is this binary's
//! subscriber (see `common::logs`).

mod common;

use async_nats::jetstream;
use common::logs::logs;
use common::nats::{qmpmux_config, NatsCluster, NatsServer};
use common::{Client, Daemon, Qemu};
use futures_util::StreamExt;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The number the VM's next event will get.
async fn next_number(c: &mut Client) -> u64 {
    let r = c.cmd(r#"{"execute":"__org.qmpmux_subscribe","arguments":{}}"#).await;
    r["return"]["next"].as_u64().unwrap()
}

/// The VM's kept events numbered after `since`, as `(seq, name)`.
async fn kept_events(c: &mut Client, since: u64) -> Vec<(u64, String)> {
    let q = json!({"execute": "__org.qmpmux_query-events", "arguments": {"since": since, "limit": 1000}});
    let r = c.cmd(&q.to_string()).await;
    r["return"]["events"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .map(|e| {
            (
                e["__org.qmpmux_seq"].as_u64().unwrap(),
                e["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Polls until `f` gives `Some`, for at most [`WAIT`].
async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `Qmpmux-Seq` of every message in `stream`, in the stream's order,
/// once it holds at least `n` (read through a client of `urls`).
async fn stream_seqs(urls: &[String], stream: &str, n: u64) -> Vec<u64> {
    let js = jetstream::new(async_nats::connect(urls).await.unwrap());
    let mut last = None;
    let count = until(&format!("{n} messages in {stream}"), async || {
        let mut s = js.get_stream(stream).await.ok()?;
        let count = s.info().await.ok()?.state.messages;
        if last != Some(count) {
            eprintln!("{stream}: {count} messages");
            last = Some(count);
        }
        (count >= n).then_some(count)
    })
    .await;
    let s = js.get_stream(stream).await.unwrap();
    let mut seqs = Vec::new();
    for i in 1..=count {
        let m = s.get_raw_message(i).await.unwrap();
        seqs.push(m.headers.get("Qmpmux-Seq").unwrap().as_str().parse().unwrap());
    }
    seqs
}

/// A blockdev-create job whose id is `len` characters long: QEMU names it
/// in each of its JOB_STATUS_CHANGE events (six, `created` to `null`), so
/// each is over `len` bytes. Waits for the last.
async fn long_named_job(c: &mut Client, dir: &Path, len: usize) {
    let id = format!("j{}", "a".repeat(len - 1));
    let create = json!({"execute": "blockdev-create", "arguments": {"job-id": id,
        "options": {"driver": "file", "filename": dir.join("job.img"), "size": 0}}});
    c.send(&create.to_string()).await;
    loop {
        let v = c.recv().await;
        assert!(v.get("error").is_none(), "{v}");
        if v["event"] == "JOB_STATUS_CHANGE" && v["data"]["status"] == "concluded" {
            break;
        }
    }
    let r = c
        .cmd(&json!({"execute": "job-dismiss", "arguments": {"id": id}}).to_string())
        .await;
    assert!(r.get("return").is_some(), "{r}");
}

/// The scenario of both publishing modes: a server taking at most 1 KiB in
/// a message, six events of 1.6 KB, then ten small ones. The big ones are
/// counted and logged with their numbers; every small one is published.
async fn too_large_events_are_dropped_and_publishing_goes_on(stream: Option<&str>) {
    logs();
    let nats = NatsServer::start_with_config("max_payload: 1024\n").await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    let watcher = async_nats::connect(&url).await.unwrap();
    let mut live = watcher.subscribe("qmpmux.hv1.web01.event.>").await.unwrap();
    watcher.flush().await.unwrap();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        c.nats = Some(qmpmux_config(std::slice::from_ref(&url), stream));
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    if let Some(stream) = stream {
        // Publishes before qmpmux has made its stream are sent again, and
        // a live subscriber would see those twice.
        let js = jetstream::new(watcher.clone());
        until("qmpmux's stream", async || js.get_stream(stream).await.ok()).await;
    }
    let mut c = Client::ready(&sock).await;
    let first = next_number(&mut c).await;
    long_named_job(&mut c, dir.path(), 1500).await;
    c.stop_cont(5).await;
    let events = kept_events(&mut c, first - 1).await;
    let (big, small): (Vec<_>, Vec<_>) = events.iter().partition(|(_, name)| name == "JOB_STATUS_CHANGE");
    let (big, small): (Vec<u64>, Vec<u64>) = (big.iter().map(|e| e.0).collect(), small.iter().map(|e| e.0).collect());
    assert_eq!((big.len(), small.len()), (6, 10), "{events:?}");

    // Every small event reaches NATS, in order; none of the big ones.
    let mut seen = Vec::new();
    while seen.len() < small.len() {
        let m = tokio::time::timeout(WAIT, live.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of the small events reached NATS: {seen:?}", seen.len()))
            .unwrap();
        seen.push(
            m.headers
                .unwrap()
                .get("Qmpmux-Seq")
                .unwrap()
                .as_str()
                .parse::<u64>()
                .unwrap(),
        );
    }
    assert_eq!(seen, small);
    if let Some(stream) = stream {
        assert_eq!(
            stream_seqs(std::slice::from_ref(&url), stream, 10).await,
            small,
            "the stream holds the small ones once"
        );
    }
    // Counted by reason, and logged once each with its number.
    let addr = daemon.metrics_addr.unwrap();
    let series = r#"qmpmux_nats_dropped_total{reason="too_large"}"#;
    until("the too large events counted", async || {
        let body = common::http::metrics(addr).await;
        (common::http::sample(&body, series) == Some(6.0)).then_some(())
    })
    .await;
    let body = common::http::metrics(addr).await;
    assert_eq!(
        common::http::sample(&body, r#"qmpmux_nats_dropped_total{reason="history"}"#),
        Some(0.0)
    );
    let log = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    for seq in &big {
        let lines = log
            .lines()
            .filter(|l| l.contains("event too large for NATS") && l.contains(&format!("seq={seq} ")))
            .count();
        assert_eq!(lines, 1, "event {seq} logged once:\n{log}");
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_events_are_dropped_and_plain_publishing_goes_on() {
    too_large_events_are_dropped_and_publishing_goes_on(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_events_are_dropped_and_jetstream_publishing_goes_on() {
    too_large_events_are_dropped_and_publishing_goes_on(Some("QMPMUX")).await;
}

// ---- TLS -------------------------------------------------------------------

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ca {
        cert: params.self_signed(&key).unwrap(),
        key,
    }
}

/// A nats-server requiring TLS, its certificate for 127.0.0.1 from `ca`;
/// the CA's PEM is written to `dir/ca.pem`.
async fn tls_server(dir: &Path, ca: &Ca) -> NatsServer {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "nats");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert.pem()).unwrap();
    let config = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\n",
        dir.join("server.pem").display(),
        dir.join("server.key").display()
    );
    NatsServer::start_with_config(&config).await
}

/// A client of the TLS server trusting `ca_pem`.
async fn tls_client(url: &str, ca_pem: &Path) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .add_root_certificates(ca_pem.into())
        .require_tls(true)
        .connect(url)
        .await
        .expect("connect over TLS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_to_a_nats_server_over_tls() {
    logs();
    let certs = tempfile::tempdir().unwrap();
    let ca = new_ca("fleet CA");
    let nats = tls_server(certs.path(), &ca).await;
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    let ca_pem = certs.path().join("ca.pem");
    let watcher = tls_client(&url, &ca_pem).await;
    let mut events = watcher.subscribe("qmpmux.hv1.web01.event.>").await.unwrap();
    watcher.flush().await.unwrap();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        let mut n = qmpmux_config(std::slice::from_ref(&url), Some("QMPMUX"));
        n.tls_ca = Some(ca_pem.clone());
        n.tls_required = true;
        c.nats = Some(n);
    })
    .await;
    // As above: events once the stream is there, each published once.
    let js = jetstream::new(watcher.clone());
    until("qmpmux's stream", async || js.get_stream("QMPMUX").await.ok()).await;
    let mut c = Client::ready(&sock).await;
    let first = next_number(&mut c).await;
    c.stop_cont(2).await;
    for i in 0..4 {
        let m = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("an event over TLS")
            .unwrap();
        let seq = m
            .headers
            .unwrap()
            .get("Qmpmux-Seq")
            .unwrap()
            .as_str()
            .parse::<u64>()
            .unwrap();
        assert_eq!(seq, first + i);
    }
    assert_eq!(
        stream_seqs_tls(&url, &ca_pem, "QMPMUX", 4).await,
        (first..first + 4).collect::<Vec<_>>()
    );
    daemon.stop().await;
}

async fn stream_seqs_tls(url: &str, ca_pem: &Path, stream: &str, n: u64) -> Vec<u64> {
    let js = jetstream::new(tls_client(url, ca_pem).await);
    until("the stream over TLS", async || {
        let mut s = js.get_stream(stream).await.ok()?;
        (s.info().await.ok()?.state.messages >= n).then_some(())
    })
    .await;
    let s = js.get_stream(stream).await.unwrap();
    let mut seqs = Vec::new();
    for i in 1..=n {
        let m = s.get_raw_message(i).await.unwrap();
        seqs.push(m.headers.get("Qmpmux-Seq").unwrap().as_str().parse().unwrap());
    }
    seqs
}

/// qmpmux trusting another CA than the one that signed the server's
/// certificate: it never connects, says why in the log, and its local
/// clients do not notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_whose_certificate_is_not_from_tls_ca_is_refused() {
    logs();
    let certs = tempfile::tempdir().unwrap();
    let nats = tls_server(certs.path(), &new_ca("the server's CA")).await;
    let other = tempfile::tempdir().unwrap();
    let wrong_ca = other.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, new_ca("another CA").cert.pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let url = nats.url();
    let watcher = tls_client(&url, &certs.path().join("ca.pem")).await;
    let mut events = watcher.subscribe("qmpmux.>").await.unwrap();
    watcher.flush().await.unwrap();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        let mut n = qmpmux_config(std::slice::from_ref(&url), None);
        n.tls_ca = Some(wrong_ca.clone());
        c.nats = Some(n);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let refused = until("the refusal logged", async || {
        let log = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
        log.lines()
            .find(|l| l.contains("the TLS handshake fails") && l.contains(&url))
            .map(str::to_owned)
    })
    .await;
    assert!(refused.contains("WARN"), "{refused}");
    assert!(refused.contains("UnknownIssuer"), "the cause, in words: {refused}");
    // Local clients as ever, commands and events.
    let mut c = Client::ready(&sock).await;
    c.send(r#"{"execute":"stop"}"#).await;
    c.event("STOP").await;
    assert!(c.reply().await.get("return").is_some());
    c.stop_cont(3).await;
    let body = common::http::metrics(daemon.metrics_addr.unwrap()).await;
    assert_eq!(
        common::http::sample(&body, "qmpmux_nats_connected"),
        Some(0.0),
        "{body}"
    );
    // Nothing reached the server: not the VM list, not an event.
    watcher.flush().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), events.next())
            .await
            .is_err(),
        "qmpmux published through a server it must not trust"
    );
    // Once, not at every retry.
    let log = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    let times = log
        .lines()
        .filter(|l| l.contains("the TLS handshake fails") && l.contains(&url))
        .count();
    assert_eq!(times, 1, "{log}");
    daemon.stop().await;
}

// ---- A cluster ---------------------------------------------------------------

/// Three servers, a stream with three replicas, qmpmux given all three
/// URLs. The server qmpmux is connected to is killed in the middle of a
/// burst: qmpmux moves to another, events keep reaching the stream while
/// it is down, and once it is back the stream holds every event exactly
/// once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_losing_qmpmuxs_server_stores_every_event_once_in_order() {
    logs();
    let Some(mut cluster) = NatsCluster::start_or_skip().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (up, sock) = (dir.path().join("q.sock"), dir.path().join("vm.sock"));
    let _qemu = Qemu::start(&up).await;
    let urls = cluster.urls();
    let daemon = Daemon::start_with(&[("web01", &up, &sock)], |c| {
        let mut n = qmpmux_config(&urls, Some("QMPMUX"));
        n.stream.as_mut().unwrap().replicas = 3;
        c.nats = Some(n);
    })
    .await;
    let mut c = Client::ready(&sock).await;
    let first = next_number(&mut c).await;
    let victim = until("qmpmux's server", async || cluster.serving("qmpmux hv1").await).await;
    let others: Vec<String> = (0..3).filter(|i| *i != victim).map(|i| urls[i].clone()).collect();
    let watcher = jetstream::new(async_nats::connect(&others).await.unwrap());
    // 200 events; the server is killed once the stream has some of them.
    let burst = tokio::spawn(async move {
        c.stop_cont(100).await;
        c
    });
    until("the burst under way", async || {
        let mut s = watcher.get_stream("QMPMUX").await.ok()?;
        (s.info().await.ok()?.state.messages >= 20).then_some(())
    })
    .await;
    cluster.servers[victim].kill();
    let mut c = burst.await.unwrap();
    // All of them through the other two while it is down.
    let during = stream_seqs(&others, "QMPMUX", 200).await;
    assert_eq!(
        during,
        (first..first + 200).collect::<Vec<_>>(),
        "with server {victim} down"
    );
    assert_ne!(
        cluster.serving("qmpmux hv1").await,
        None,
        "qmpmux moved to another server"
    );
    cluster.servers[victim].restart().await;
    c.stop_cont(25).await;
    let seqs = stream_seqs(&urls, "QMPMUX", 250).await;
    assert_eq!(seqs, (first..first + 250).collect::<Vec<_>>(), "each once, in order");
    let replicas = until("the stream's info", async || {
        let mut s = watcher.get_stream("QMPMUX").await.ok()?;
        Some(s.info().await.ok()?.config.num_replicas)
    })
    .await;
    assert_eq!(replicas, 3);
    daemon.stop().await;
}
