//! TCP listeners with mutual TLS, using certificates made here: the client
//! must present a certificate from the configured CA (and, if listed, with
//! an allowed subject); plain TCP only on loopback by explicit opt-in.

mod common;

use common::logs::{logged, logs};
use common::{Daemon, Qemu};
use qmpmux::config::{Endpoint, ListenerConfig, TlsFiles};
use qmpmux::subject::SubjectPattern;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

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

fn leaf(ca: &Ca, cn: &str, client: bool) -> (rcgen::Certificate, KeyPair) {
    leaf_dn(
        ca,
        &[(DnType::CommonName, cn), (DnType::OrganizationName, "Example")],
        client,
    )
}

/// A certificate whose subject is exactly `dn`, in this order.
fn leaf_dn(ca: &Ca, dn: &[(DnType, &str)], client: bool) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    for (kind, value) in dn {
        params.distinguished_name.push(kind.clone(), *value);
    }
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    (params.signed_by(&key, &ca.cert, &ca.key).unwrap(), key)
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn listener(addr: SocketAddr, tls: Option<TlsFiles>, subjects: &[&str]) -> ListenerConfig {
    let subjects = subjects.iter().map(|s| SubjectPattern::parse(s).unwrap()).collect();
    ListenerConfig::new("tls", Endpoint::Tcp { addr, tls, subjects })
}

/// Connects with TLS; `cert` is the client's certificate, if any.
async fn tls_connect(
    addr: SocketAddr,
    server_ca: &Ca,
    cert: Option<&(rcgen::Certificate, KeyPair)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = RootCertStore::empty();
    roots.add(server_ca.cert.der().clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(c.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.serialize_der())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await
}

/// Reads one line; `None` at EOF or on a connection error.
async fn line<S: AsyncRead + Unpin>(r: &mut BufReader<S>) -> Option<Value> {
    let mut s = String::new();
    match tokio::time::timeout(common::STEP, r.read_line(&mut s))
        .await
        .expect("timed out")
    {
        Ok(n) if n > 0 => Some(serde_json::from_str(&s).unwrap()),
        _ => None,
    }
}

async fn talk<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> Option<Value> {
    let mut r = BufReader::new(stream);
    let greeting = line(&mut r).await?;
    assert!(greeting["QMP"].is_object());
    r.get_mut().write_all(br#"{"execute":"qmp_capabilities"}"#).await.ok()?;
    assert_eq!(line(&mut r).await?, json!({"return": {}}));
    r.get_mut()
        .write_all(br#"{"execute":"query-status","id":"tls"}"#)
        .await
        .ok()?;
    line(&mut r).await
}

fn write_pems(dir: &Path, ca: &Ca, server: &(rcgen::Certificate, KeyPair)) -> TlsFiles {
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_ca: dir.join("ca.pem"),
    };
    std::fs::write(&files.cert, server.0.pem()).unwrap();
    std::fs::write(&files.key, server.1.serialize_pem()).unwrap();
    std::fs::write(&files.client_ca, ca.cert.pem()).unwrap();
    files
}

/// A VM behind a mutual-TLS listener on a free port (certificate chain
/// from a fresh CA), with `subjects` allowed; `tweak` adjusts the config.
struct TlsVm {
    dir: tempfile::TempDir,
    _qemu: Qemu,
    ca: Ca,
    addr: SocketAddr,
    daemon: Daemon,
}

impl TlsVm {
    async fn start(subjects: &[&str], tweak: impl FnOnce(&mut qmpmux::config::Config)) -> TlsVm {
        logs();
        let dir = tempfile::tempdir().unwrap();
        let qemu = Qemu::start(&dir.path().join("q.sock")).await;
        let ca = new_ca("qmpmux test CA");
        let files = write_pems(dir.path(), &ca, &leaf(&ca, "localhost", false));
        let addr = free_port();
        let (q, rw) = (dir.path().join("q.sock"), dir.path().join("rw.sock"));
        let daemon = Daemon::start_with(&[("vm", &q, &rw)], |c| {
            c.vms[0].listeners = vec![listener(addr, Some(files), subjects)];
            tweak(c);
        })
        .await;
        TlsVm {
            dir,
            _qemu: qemu,
            ca,
            addr,
            daemon,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_certified_allowed_clients() {
    let vm = TlsVm::start(&["CN=orchestrator*"], |_| {}).await;
    let TlsVm {
        dir: _dir,
        _qemu,
        ca,
        addr,
        daemon,
    } = vm;

    let good = leaf(&ca, "orchestrator-1", true);
    let stream = tls_connect(addr, &ca, Some(&good)).await.unwrap();
    let reply = talk(stream).await.expect("served");
    assert_eq!(reply["id"], "tls");
    assert_eq!(reply["return"]["status"], "running");

    // Right CA, subject not allowed.
    let other = leaf(&ca, "intruder", true);
    let refused = match tls_connect(addr, &ca, Some(&other)).await {
        Ok(s) => talk(s).await,
        Err(_) => None,
    };
    assert_eq!(refused, None, "a subject not listed must not be served");

    // No client certificate, or one from another CA: no session.
    let no_cert = match tls_connect(addr, &ca, None).await {
        Ok(s) => talk(s).await,
        Err(_) => None,
    };
    assert_eq!(no_cert, None);
    let stranger_ca = new_ca("another CA");
    let stranger = leaf(&stranger_ca, "orchestrator-2", true);
    let foreign = match tls_connect(addr, &ca, Some(&stranger)).await {
        Ok(s) => talk(s).await,
        Err(_) => None,
    };
    assert_eq!(foreign, None);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_tcp_only_on_loopback_by_opt_in() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let addr = free_port();
    let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
        c.vms[0].listeners = vec![listener(addr, None, &[])];
    })
    .await;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_eq!(talk(stream).await.unwrap()["id"], "tls");
    daemon.stop().await;

    // The config file refuses plain TCP elsewhere, and half a TLS setup.
    let base = "[[vm]]\nname = \"a\"\nupstream = \"/q\"\nlisten = \"/l\"\n[[vm.listener]]\n";
    let load = |extra: &str| qmpmux::config::Config::from_toml(&format!("{base}{extra}"), Path::new("t.toml"));
    let e = load("tcp = \"0.0.0.0:4444\"\nallow_plain_tcp = true\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("vm[0].listener[0].tcp") && e.contains("loopback"), "{e}");
    let e = load("tcp = \"127.0.0.1:4444\"\n").unwrap_err().to_string();
    assert!(e.contains("allow_plain_tcp"), "{e}");
    let e = load("tcp = \"0.0.0.0:4444\"\ntls_cert = \"/c\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("go together"), "{e}");
    assert!(load("tcp = \"127.0.0.1:4444\"\nallow_plain_tcp = true\n").is_ok());
    // Peer filters that could not apply are refused, not ignored.
    let e = load("tcp = \"127.0.0.1:4444\"\nallow_plain_tcp = true\nuids = [0]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listener[0].uids"), "{e}");
    let e = load("path = \"/ro.sock\"\nsubjects = [\"CN=x\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listener[0].subjects"), "{e}");
    assert!(load("tcp = \"[::]:4444\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\ntls_client_ca = \"/ca\"\n").is_ok());
}

async fn served(addr: SocketAddr, ca: &Ca, cert: &(rcgen::Certificate, KeyPair)) -> bool {
    match tls_connect(addr, ca, Some(cert)).await {
        Ok(s) => talk(s).await.is_some(),
        Err(_) => false,
    }
}

/// A subject value holding `, CN=...` is one attribute, not two, and
/// `CN=orchestrator` does not admit `CN=orchestrator-evil`; the audit log
/// shows the subject escaped, as exactly what it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_match_whole_attributes() {
    let vm = TlsVm::start(&["O=Example, CN=orchestrator"], |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let TlsVm {
        dir: _dir,
        _qemu,
        ca,
        addr,
        daemon,
    } = vm;

    let forged = leaf_dn(&ca, &[(DnType::OrganizationName, "Example, CN=orchestrator")], true);
    assert!(
        !served(addr, &ca, &forged).await,
        "one O attribute must not pass for O and CN"
    );
    let evil = leaf(&ca, "orchestrator-evil", true);
    assert!(!served(addr, &ca, &evil).await, "CN must match whole");
    let real = leaf_dn(
        &ca,
        &[
            (DnType::CommonName, "orchestrator"),
            (DnType::OrganizationName, "Example"),
        ],
        true,
    );
    assert!(
        served(addr, &ca, &real).await,
        "the order of attributes does not matter"
    );
    common::eventually("the refusals in the audit log", async || {
        logged(r"qmpmux::audit: client refused: certificate subject not allowed vm=vm addr=")
            && logged(r"subject=O=Example\, CN=orchestrator listener=tls")
            && logged("subject=CN=orchestrator-evil, O=Example listener=tls")
    })
    .await;
    assert!(logged(r#"remote="tls:CN=orchestrator, O=Example@127.0.0.1:"#));
    // Both refusals are counted (counted before they are logged).
    let body = common::http::metrics(daemon.metrics_addr.unwrap()).await;
    let series = "qmpmux_clients_refused_total{vm=\"vm\",reason=\"not_allowed\"}";
    assert_eq!(common::http::sample(&body, series), Some(2.0), "{body}");
    daemon.stop().await;
}

/// How many of these raw TCP connections (which have sent nothing and been
/// sent nothing) qmpmux has not closed.
fn still_open(conns: &[tokio::net::TcpStream]) -> usize {
    let mut buf = [0u8; 16];
    conns
        .iter()
        .filter(|c| matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count()
}

/// Connections that never complete their TLS handshake take no client slot,
/// so they cannot lock the VM's other sockets out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_take_no_client_slot() {
    let vm = TlsVm::start(&[], |c| {
        c.client.max_clients = 2;
    })
    .await;
    let TlsVm {
        dir,
        _qemu,
        ca,
        addr,
        daemon,
    } = vm;
    let p = |n: &str| dir.path().join(n);
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Both of the VM's slots are free: the main socket and a certified
    // client each get one.
    let (_main, _) = common::Client::open(&p("rw.sock")).await;
    let good = leaf(&ca, "orchestrator", true);
    let stream = tls_connect(addr, &ca, Some(&good)).await.unwrap();
    let mut r = BufReader::new(stream);
    assert!(line(&mut r).await.expect("a greeting")["QMP"].is_object());
    assert_eq!(
        still_open(&idle),
        idle.len(),
        "the handshakes in progress are left alone"
    );
    daemon.stop().await;
}

/// At most `MAX_HANDSHAKES` handshakes run at once per listener; beyond
/// them, connections are closed at once and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_capped() {
    let vm = TlsVm::start(&[], |c| c.metrics_listen = Some("127.0.0.1:0".parse().unwrap())).await;
    let TlsVm {
        dir: _dir,
        _qemu,
        ca,
        addr,
        daemon,
    } = vm;
    let cap = qmpmux::MAX_HANDSHAKES;
    let extra = 20;
    let mut idle = Vec::new();
    for _ in 0..cap + extra {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    common::eventually("the connections beyond the cap to be closed", async || {
        still_open(&idle) <= cap
    })
    .await;
    assert!(logged(
        "client refused: too many TLS handshakes in progress on this listener"
    ));
    let body = common::http::metrics(daemon.metrics_addr.unwrap()).await;
    let series = "qmpmux_clients_refused_total{vm=\"vm\",reason=\"tls_handshakes\"}";
    assert_eq!(common::http::sample(&body, series), Some(extra as f64), "{body}");
    // The refused connections are gone; once the idle ones leave, their
    // handshakes end and a certified client gets through again.
    drop(idle);
    let good = leaf(&ca, "orchestrator", true);
    common::eventually("a certified client to be served", async || {
        served(addr, &ca, &good).await
    })
    .await;
    daemon.stop().await;
}
