//! Mutual TLS for TCP listeners: a server certificate, a CA client
//! certificates must chain to, and the client's subject as its identity.

use crate::config::TlsFiles;
use crate::subject::{Attribute, Subject};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls::crypto::ring::default_provider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig, ServerConnection};
use tokio_rustls::TlsAcceptor;
use x509_parser::der_parser::asn1_rs::{Tag, ToDer};
use x509_parser::x509::AttributeTypeAndValue;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no private key")]
    NoKey(PathBuf),
    #[error("invalid TLS setup")]
    Rustls(#[from] tokio_rustls::rustls::Error),
    #[error("invalid client CA")]
    Verifier(#[from] tokio_rustls::rustls::server::VerifierBuilderError),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file = std::fs::File::open(path).map_err(|e| TlsError::Read(path.to_owned(), e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Read(path.to_owned(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let file = std::fs::File::open(path).map_err(|e| TlsError::Read(path.to_owned(), e))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| TlsError::Read(path.to_owned(), e))?
        .ok_or_else(|| TlsError::NoKey(path.to_owned()))
}

/// A server that requires a client certificate chaining to `client_ca`.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certs(&files.client_ca)? {
        roots.add(ca)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The verified client certificate's subject (see [`crate::subject`] for
/// how it prints and matches), e.g. `CN=orchestrator, O=Example`.
pub fn peer_subject(conn: &ServerConnection) -> Option<Subject> {
    let der = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let rdns = cert.subject().iter_rdn().map(|rdn| rdn.iter().map(attribute).collect());
    Some(Subject(rdns.collect()))
}

fn attribute(attr: &AttributeTypeAndValue) -> Attribute {
    let value = attr.attr_value();
    let text = match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::NumericString | Tag::VisibleString => {
            std::str::from_utf8(value.data).ok().map(str::to_owned)
        }
        Tag::BmpString => utf16(value.data),
        _ => None,
    };
    Attribute::new(&attr.attr_type().to_id_string(), text, || {
        value.to_der_vec().unwrap_or_default()
    })
}

/// A BMPString (UTF-16, big-endian); `None` if it is not valid.
fn utf16(data: &[u8]) -> Option<String> {
    if !data.len().is_multiple_of(2) {
        return None;
    }
    let units = data.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
    char::decode_utf16(units).collect::<Result<String, _>>().ok()
}
