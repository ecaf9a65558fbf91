//! The metrics endpoint as scrapers see it: after real traffic (commands,
//! a policy refusal, a client disconnected, clients turned away at accept)
//! Prometheus's own `promtool check metrics` accepts what it serves, and
//! Prometheus itself gets OpenMetrics.
//!
//! promtool is `QMPMUX_PROMTOOL`, else `promtool` in `PATH`; `.ci/run`
//! provides it (`.ci/promtool`). Under CI (`CI=true`) a missing promtool
//! fails the test; elsewhere the test says so and passes without checking.

mod common;

use common::http::{metrics, sample, scrape, PROMETHEUS_ACCEPT};
use common::{Client, Daemon, Qemu};
use qmpmux::config::{Endpoint, ListenerConfig};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The promtool to use; `None` (outside CI only) if there is none.
fn promtool() -> Option<PathBuf> {
    let named = std::env::var_os("QMPMUX_PROMTOOL").map(PathBuf::from);
    let found = named.clone().or_else(|| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("promtool"))
                .find(|p| p.is_file())
        })
    });
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match found {
        Some(p) => Some(p),
        None if in_ci => panic!(
            "CI=true but no promtool: set QMPMUX_PROMTOOL (`bash .ci/promtool` provides one) or put promtool in PATH"
        ),
        None => {
            eprintln!(
                "SKIPPED: no promtool (set QMPMUX_PROMTOOL, or run `bash .ci/promtool`); /metrics not checked with it"
            );
            None
        }
    }
}

/// `promtool check metrics` on `text`: whether it passed, and what it said.
fn promtool_check(promtool: &PathBuf, text: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_the_metrics_after_real_traffic() {
    let promtool = promtool();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let _qemu = Qemu::start(&p("q.sock")).await;
    let daemon = Daemon::start_with(&[("web01", &p("q.sock"), &p("rw.sock"))], |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        c.client.max_clients = 2;
        c.client.max_depth = 16;
        c.vms[0].main.policy.deny = vec![qmpmux::policy::Glob::new("system_powerdown")];
        // A socket nobody here may use: only a uid no process has.
        c.vms[0].listeners = vec![ListenerConfig::new(
            "closed",
            Endpoint::Unix {
                path: p("closed.sock"),
                uids: vec![4_000_000_000],
                gids: vec![4_000_000_000],
            },
        )];
    })
    .await;
    let addr = daemon.metrics_addr.unwrap();

    let mut c = Client::ready(&p("rw.sock")).await;
    for i in 0..3 {
        assert!(c.cmd(&format!(r#"{{"execute":"query-status","id":{i}}}"#)).await["return"].is_object());
    }
    assert!(c.cmd(r#"{"execute":"no-such-command"}"#).await["error"].is_object());
    assert!(c.cmd(r#"{"execute":"system_powerdown"}"#).await["error"].is_object());
    // Disconnected by qmpmux: nested too deep.
    let mut deep = Client::ready(&p("rw.sock")).await;
    deep.send(&"[".repeat(100)).await;
    deep.recv().await;
    deep.expect_eof().await;
    // Turned away: a uid not allowed (while there is a slot for it), then
    // one more than the VM's two slots.
    Client::connect(&p("closed.sock")).await.expect_eof().await;
    let _second = Client::ready(&p("rw.sock")).await;
    Client::connect(&p("rw.sock")).await.expect_eof().await;

    let body = metrics(addr).await;
    for (series, want) in [
        ("qmpmux_commands_total{vm=\"web01\"}", 4.0),
        ("qmpmux_errors_total{vm=\"web01\"}", 1.0),
        ("qmpmux_policy_refusals_total{vm=\"web01\"}", 1.0),
        (
            "qmpmux_clients_disconnected_total{vm=\"web01\",reason=\"input_limit\"}",
            1.0,
        ),
        ("qmpmux_clients_refused_total{vm=\"web01\",reason=\"max_clients\"}", 1.0),
        ("qmpmux_clients_refused_total{vm=\"web01\",reason=\"not_allowed\"}", 1.0),
        ("qmpmux_responding{vm=\"web01\"}", 1.0),
        ("qmpmux_clients{vm=\"web01\"}", 2.0),
    ] {
        assert_eq!(sample(&body, series), Some(want), "{series} in\n{body}");
    }
    // Prometheus's text format: counters are typed under their samples'
    // names, and there is no `# EOF`.
    assert!(body.contains("# TYPE qmpmux_commands_total counter\n"), "{body}");
    assert!(!body.contains("# EOF"), "{body}");

    // Prometheus asks for OpenMetrics, and gets it.
    let (head, om) = scrape(addr, Some(PROMETHEUS_ACCEPT)).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE qmpmux_commands counter\n"), "{om}");
    assert_eq!(sample(&om, "qmpmux_commands_total{vm=\"web01\"}"), Some(4.0));

    if let Some(promtool) = promtool {
        let (ok, said) = promtool_check(&promtool, &body);
        assert!(ok, "promtool check metrics failed:\n{said}\non:\n{body}");
        assert!(said.trim().is_empty(), "promtool had remarks:\n{said}");
        // And it does check: a counter without help text or `_total` fails.
        let (ok, said) = promtool_check(&promtool, "# TYPE qmpmux_bad counter\nqmpmux_bad 1\n");
        assert!(!ok && said.contains("qmpmux_bad"), "{said}");
    }
    daemon.stop().await;
}
