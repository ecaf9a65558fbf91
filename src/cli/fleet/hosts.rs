//! Finding the fleet: one request on `<parent>.vms` (`qmpmux.vms`), which
//! every qmpmux under that parent answers with its VM list; the answers
//! are collected for `--wait` (a request to `qmpmux.*.vms` would reach no
//! one: NATS does not publish to wildcards). Then which hosts and VMs the
//! patterns select. Pure but for [`discover`].

use super::nats::Nats;
use super::{CliError, FleetError};
use crate::config::is_token;
use crate::ops::escape::escaped;
use crate::policy::Glob;
use futures_util::StreamExt;
use serde::Deserialize;
use std::time::Duration;
use tokio::time::Instant;

/// `--prefix`: the hosts' subject prefixes, tokens or `*` (any one token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixPattern(String);

impl PrefixPattern {
    pub fn parse(text: &str) -> Result<PrefixPattern, CliError> {
        if text.split('.').all(|t| t == "*" || is_token(t)) {
            Ok(PrefixPattern(text.to_owned()))
        } else {
            Err(CliError::Usage(format!(
                "--prefix {}: tokens of letters, digits, '-' and '_', or '*', separated by '.'",
                escaped(text)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where to ask for every matching host's VM list: the pattern's
    /// parent (all but its last token), which must have no wildcard.
    pub fn discovery(&self) -> Result<String, CliError> {
        let subject = crate::fleet::subjects::Subjects::new(&self.0).discovery();
        if subject.split('.').any(|t| t == "*") {
            return Err(CliError::Usage(format!(
                "--prefix {}: hosts are asked on the prefix's parent ({subject}), which cannot have a wildcard: \
                 only the last token may be '*' (ask each parent in turn)",
                self.0
            )));
        }
        Ok(subject)
    }

    /// Whether a host's `prefix` matches.
    pub fn matches(&self, prefix: &str) -> bool {
        let (mut want, mut have) = (self.0.split('.'), prefix.split('.'));
        loop {
            match (want.next(), have.next()) {
                (None, None) => return true,
                (Some(w), Some(h)) if w == "*" || w == h => {}
                _ => return false,
            }
        }
    }

    /// The token count of a matching prefix.
    pub fn tokens(&self) -> usize {
        self.0.split('.').count()
    }
}

/// One host's answer: its name, prefix and VMs (sorted).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Host {
    pub host: String,
    pub prefix: String,
    pub vms: Vec<String>,
}

impl Host {
    /// A host's answer read; what the daemon would never send (names that
    /// are not subject tokens, which would make other subjects) refused.
    pub fn from_answer(payload: &[u8]) -> Result<Host, String> {
        let mut host: Host = serde_json::from_slice(payload)
            .map_err(|e| format!("not a VM list ({e}): {}", escaped(&String::from_utf8_lossy(payload))))?;
        if !is_token(&host.host) || !host.prefix.split('.').all(is_token) {
            return Err(format!(
                "a host {} with prefix {}: not subject tokens",
                crate::ops::escape::quoted(&host.host),
                crate::ops::escape::quoted(&host.prefix)
            ));
        }
        if let Some(bad) = host.vms.iter().find(|v| !is_token(v)) {
            return Err(format!(
                "host '{}' lists a VM {}: not a subject token",
                host.host,
                crate::ops::escape::quoted(bad)
            ));
        }
        host.vms.sort();
        host.vms.dedup();
        Ok(host)
    }
}

/// Which hosts and VMs: `--host` patterns (any of them; none: every
/// host), and a VM name pattern (none: every VM). `*` and `?` wildcards.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub hosts: Vec<Glob>,
    pub vm: Option<Glob>,
}

impl Filter {
    pub fn new(vm: Option<&str>, hosts: &[String]) -> Filter {
        Filter {
            hosts: hosts.iter().map(Glob::new).collect(),
            vm: vm.map(Glob::new),
        }
    }

    pub fn host(&self, name: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|g| g.matches(name))
    }

    pub fn vm(&self, name: &str) -> bool {
        self.vm.as_ref().is_none_or(|g| g.matches(name))
    }

    /// The host names `--host` spells out, when none has a wildcard: the
    /// collection can stop once they all answered.
    pub fn named_hosts(&self) -> Option<Vec<&str>> {
        let names: Vec<&str> = self.hosts.iter().map(Glob::as_str).collect();
        (!names.is_empty() && names.iter().all(|n| !n.contains(['*', '?']))).then_some(names)
    }

    /// `hosts` narrowed to the selected hosts and VMs; hosts left with no
    /// VM are dropped unless no VM pattern was given.
    pub fn select(&self, hosts: &[Host]) -> Vec<Host> {
        hosts
            .iter()
            .filter(|h| self.host(&h.host))
            .map(|h| Host {
                vms: h.vms.iter().filter(|v| self.vm(v)).cloned().collect(),
                ..h.clone()
            })
            .filter(|h| self.vm.is_none() || !h.vms.is_empty())
            .collect()
    }

    /// The error for a selection that is empty: what was wanted, and what
    /// there is.
    pub fn no_match(&self, hosts: &[Host]) -> FleetError {
        let mut wanted = match &self.vm {
            Some(g) => format!("'{}'", escaped(g.as_str())),
            None => "at all".into(),
        };
        if !self.hosts.is_empty() {
            let hosts: Vec<String> = self.hosts.iter().map(|g| escaped(g.as_str())).collect();
            wanted.push_str(&format!(" on hosts '{}'", hosts.join(",")));
        }
        let known = hosts
            .iter()
            .map(|h| match h.vms.is_empty() {
                true => format!("{}: no VMs", h.host),
                false => format!("{}: {}", h.host, h.vms.join(", ")),
            })
            .collect::<Vec<_>>()
            .join("; ");
        FleetError::NoMatch { wanted, known }
    }
}

/// Every host under `prefix` that answers within `wait` (sooner when
/// `filter` names its hosts and they all answered), by name. No host at
/// all is an error (exit status 3).
pub async fn discover(
    nats: &Nats,
    prefix: &PrefixPattern,
    filter: &Filter,
    wait: Duration,
) -> Result<Vec<Host>, CliError> {
    let subject = prefix.discovery()?;
    let client = &nats.client;
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| nats.failed(format!("subscribe to {inbox}"), e))?;
    client
        .publish_with_reply(subject.clone(), inbox, bytes::Bytes::new())
        .await
        .map_err(|e| nats.failed(format!("publish on {subject}"), e))?;
    client.flush().await.map_err(|e| nats.failed("reach the server", e))?;
    let deadline = Instant::now() + wait;
    let named = filter.named_hosts();
    let mut hosts: Vec<Host> = Vec::new();
    let mut nobody = false;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
        if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            nobody = true;
            break;
        }
        match Host::from_answer(&msg.payload) {
            Ok(h) if !prefix.matches(&h.prefix) => {}
            Ok(h) if hosts.iter().any(|k| k.prefix == h.prefix) => {
                eprintln!(
                    "qmpmux: two qmpmux answer as {} (the same `host` or `prefix` in their [nats]); showing the first",
                    h.prefix
                );
            }
            Ok(h) => hosts.push(h),
            Err(why) => eprintln!("qmpmux: ignoring an answer on {subject}: {why}"),
        }
        if named
            .as_ref()
            .is_some_and(|n| n.iter().all(|name| hosts.iter().any(|h| h.host == *name)))
        {
            break;
        }
    }
    if hosts.is_empty() {
        let why = match (nobody, nats.said_about(&subject)) {
            (_, Some(said)) => format!(" (the NATS server said: {said})"),
            (true, None) => " (no one subscribes there: no qmpmux with [nats] is connected under this prefix)".into(),
            (false, None) => format!(
                " within {} s (no qmpmux with [nats] is connected under this prefix, or they are older than `qmpmux fleet`; --prefix, --wait)",
                wait.as_secs_f64()
            ),
        };
        return Err(FleetError::NoHosts { subject, why }.into());
    }
    hosts.sort_by(|a, b| (&a.host, &a.prefix).cmp(&(&b.host, &b.prefix)));
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, vms: &[&str]) -> Host {
        Host {
            host: name.into(),
            prefix: format!("qmpmux.{name}"),
            vms: vms.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn prefixes_ask_their_parent_and_match_token_by_token() {
        let p = PrefixPattern::parse("qmpmux.*").unwrap();
        assert_eq!(p.discovery().unwrap(), "qmpmux.vms");
        assert!(p.matches("qmpmux.hv1"));
        assert!(!p.matches("qmpmux"));
        assert!(!p.matches("qmpmux.dc1.hv1"));
        assert!(!p.matches("other.hv1"));
        assert_eq!(p.tokens(), 2);
        let one = PrefixPattern::parse("dc1.eu.hv7").unwrap();
        assert_eq!(one.discovery().unwrap(), "dc1.eu.vms");
        assert!(one.matches("dc1.eu.hv7") && !one.matches("dc1.eu.hv8"));
        assert_eq!(PrefixPattern::parse("*").unwrap().discovery().unwrap(), "vms");
        let deep = PrefixPattern::parse("qmpmux.*.*").unwrap();
        assert!(deep.matches("qmpmux.dc1.hv1"));
        assert!(deep
            .discovery()
            .unwrap_err()
            .to_string()
            .contains("only the last token"));
        for bad in ["qmpmux.>", "a..b", "", "a b.*", "qmpmux.hv*"] {
            assert!(PrefixPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_are_read_and_forgeries_refused() {
        let h = Host::from_answer(br#"{"host":"hv1","prefix":"qmpmux.hv1","vms":["web02","web01"]}"#).unwrap();
        assert_eq!(h, host("hv1", &["web01", "web02"]));
        let bad = Host::from_answer(br#"{"host":"hv1","prefix":"qmpmux.hv1","vms":["a.b"]}"#).unwrap_err();
        assert_eq!(bad, "host 'hv1' lists a VM \"a.b\": not a subject token");
        let bad = Host::from_answer(br#"{"host":"hv\u001b[2J","prefix":"qmpmux.x","vms":[]}"#).unwrap_err();
        assert!(bad.contains("\\u001b") && !bad.contains('\u{1b}'), "{bad}");
        let bad = Host::from_answer(b"\x1b[2Jnope").unwrap_err();
        assert!(bad.starts_with("not a VM list") && !bad.contains('\u{1b}'), "{bad}");
    }

    #[test]
    fn filters_select_hosts_and_vms() {
        let hosts = [
            host("hv1", &["db01", "web01", "web02"]),
            host("hv2", &["web03"]),
            host("hv3", &[]),
        ];
        let all = Filter::new(None, &[]).select(&hosts);
        assert_eq!(all.len(), 3, "without a VM pattern, hosts without VMs stay");
        let web = Filter::new(Some("web*"), &[]).select(&hosts);
        assert_eq!(web, [host("hv1", &["web01", "web02"]), host("hv2", &["web03"])]);
        let f = Filter::new(Some("web0?"), &["hv2".into(), "hv9".into()]);
        assert_eq!(f.select(&hosts), [host("hv2", &["web03"])]);
        assert_eq!(f.named_hosts(), Some(vec!["hv2", "hv9"]));
        assert_eq!(Filter::new(None, &["hv*".into()]).named_hosts(), None);
        assert_eq!(Filter::new(None, &[]).named_hosts(), None);
        let none = Filter::new(Some("x*"), &["hv1".into()]);
        assert!(none.select(&hosts).is_empty());
        assert_eq!(
            none.no_match(&hosts).to_string(),
            "no VM matches 'x*' on hosts 'hv1' (hv1: db01, web01, web02; hv2: web03; hv3: no VMs)"
        );
    }
}
