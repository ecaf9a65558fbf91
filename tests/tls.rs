//! TCP listeners with mutual TLS, using certificates made here: the client
//! must present a certificate from the configured CA (and, if listed, with
//! an allowed subject); plain TCP only on loopback by explicit opt-in.

mod common;

use common::{Daemon, Qemu};
use qmpmux::config::{ListenerConfig, TcpConfig, TlsFiles};
use qmpmux::policy::{Glob, Policy};
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
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.distinguished_name.push(DnType::OrganizationName, "Example");
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
    ListenerConfig {
        name: "tls".into(),
        path: Default::default(),
        tcp: Some(TcpConfig { addr, tls }),
        subjects: subjects.iter().map(|s| Glob::new(*s)).collect(),
        policy: Policy::default(),
        uids: Vec::new(),
        gids: Vec::new(),
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_certified_allowed_clients() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let ca = new_ca("qmpmux test CA");
    let files = write_pems(dir.path(), &ca, &leaf(&ca, "localhost", false));
    let addr = free_port();
    let daemon = Daemon::start_with(&[("vm", &p("q.sock"), &p("rw.sock"))], |c| {
        c.vms[0].listeners = vec![listener(addr, Some(files), &["CN=orchestrator*"])];
    })
    .await;

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
