//! Scraping qmpmux's metrics endpoint, as Prometheus or curl would.

use super::STEP;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What Prometheus 2.x sends as `Accept`.
pub const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `GET /metrics` with `accept` (none if `None`): the header block and
/// the body.
pub async fn scrape(addr: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to metrics");
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(STEP, s.read_to_string(&mut out))
        .await
        .expect("the answer and the close")
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{out}");
    (head.to_owned(), body.to_owned())
}

/// The body of `GET /metrics` (the Prometheus text format).
pub async fn metrics(addr: SocketAddr) -> String {
    scrape(addr, None).await.1
}

/// The value of the one sample `series` (name and labels, exactly as
/// written) in `body`, if there is one.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter_map(|l| l.strip_prefix(series))
        .find_map(|rest| rest.strip_prefix(' '))
        .map(|v| v.parse().expect("a number"))
}
