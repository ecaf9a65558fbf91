//! The two text formats `/metrics` speaks: OpenMetrics, which
//! `prometheus_client` writes and Prometheus asks for, and Prometheus's own
//! text format (0.0.4) for every other scraper (curl, `promtool check
//! metrics`, older Prometheus versions, other agents), as Prometheus's
//! client libraries do.
//!
//! The two differ only in what qmpmux uses of them in three ways: a
//! counter's family is named without `_total` in OpenMetrics and with it
//! (as its samples are) in the 0.0.4 format; OpenMetrics ends with
//! `# EOF`; and it may carry `# UNIT` lines, which 0.0.4 does not know.

/// `Content-Type` of an OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `Content-Type` of a Prometheus text format answer.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header asks for OpenMetrics: it names
/// `application/openmetrics-text` with a quality above zero and at least
/// that of anything that would match `text/plain`. No header, or `*/*`:
/// the 0.0.4 format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|v| v.parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

/// OpenMetrics text (as `prometheus_client` writes it) in Prometheus's text
/// format 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    // The counter families, by their OpenMetrics names.
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|t| t.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 8 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').map_or((rest, None), |(n, t)| (n, Some(t)));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(&name) {
                    out.push_str("_total");
                }
                if let Some(tail) = tail {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_and_others_get_the_text_format() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(Some(prometheus)));
        assert!(wants_openmetrics(Some("application/openmetrics-text")));
        for other in [
            None,
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4"),
            Some("application/openmetrics-text;q=0"),
            Some("text/plain, application/openmetrics-text;q=0.5"),
            Some("application/json"),
        ] {
            assert!(!wants_openmetrics(other), "{other:?}");
        }
    }

    #[test]
    fn counters_are_named_as_their_samples_and_eof_goes() {
        let om = "# HELP up Whether.\n# TYPE up gauge\nup 1\n\
                  # HELP qmpmux_commands Commands forwarded to QEMU.\n# TYPE qmpmux_commands counter\n\
                  qmpmux_commands_total{vm=\"a\"} 5\n\
                  # HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n# UNIT lat_seconds seconds\n\
                  lat_seconds_sum 0.5\nlat_seconds_count 1\nlat_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP up Whether.\n# TYPE up gauge\nup 1\n\
             # HELP qmpmux_commands_total Commands forwarded to QEMU.\n# TYPE qmpmux_commands_total counter\n\
             qmpmux_commands_total{vm=\"a\"} 5\n\
             # HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n\
             lat_seconds_sum 0.5\nlat_seconds_count 1\nlat_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }
}
