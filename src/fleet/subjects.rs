//! The NATS subjects qmpmux uses, all under one prefix
//! (`qmpmux.<host>` by default). Pure.

/// Subjects for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects { prefix: prefix.into() }
    }

    /// `<prefix>.<vm>.event.<EVENT>`. Event names are QMP names: QEMU's are
    /// `[A-Z0-9_]`; anything else a token cannot hold (qmpmux's own
    /// `__org.qmpmux_NAME` has a `.`) becomes `_`. The payload keeps the
    /// real name.
    pub fn event(&self, vm: &str, event: &str) -> String {
        let token: String = event
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{}.{vm}.event.{token}", self.prefix)
    }

    /// What a stream captures: every event of every VM of this host.
    pub fn all_events(&self) -> String {
        format!("{}.*.event.>", self.prefix)
    }

    /// `<prefix>.<vm>.state`: runstate changes.
    pub fn state(&self, vm: &str) -> String {
        format!("{}.{vm}.state", self.prefix)
    }

    /// `<prefix>.vms`: the VM list.
    pub fn vms(&self) -> String {
        format!("{}.vms", self.prefix)
    }

    /// `<parent>.vms`: the prefix's last token replaced by `vms`
    /// (`qmpmux.vms` for `qmpmux.hv01`; `vms` for a one-token prefix).
    /// Every host under the same parent answers a request there with its
    /// VM list, so that one request finds them all (`qmpmux fleet`): a
    /// request to `qmpmux.*.vms` reaches no one, NATS does not publish to
    /// wildcards.
    pub fn discovery(&self) -> String {
        match self.prefix.rsplit_once('.') {
            Some((parent, _)) => format!("{parent}.vms"),
            None => "vms".into(),
        }
    }

    /// `<prefix>.*.execute`: commands for any VM.
    pub fn all_execute(&self) -> String {
        format!("{}.*.execute", self.prefix)
    }

    /// The VM a subject `<prefix>.<vm>.execute` names.
    pub fn execute_vm<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?
            .strip_suffix(".execute")
            .filter(|vm| !vm.contains('.'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_under_the_prefix() {
        let s = Subjects::new("qmpmux.hv01");
        assert_eq!(s.event("web01", "STOP"), "qmpmux.hv01.web01.event.STOP");
        assert_eq!(
            s.event("web01", "__org.qmpmux_UPSTREAM_LOST"),
            "qmpmux.hv01.web01.event.__org_qmpmux_UPSTREAM_LOST"
        );
        assert_eq!(s.all_events(), "qmpmux.hv01.*.event.>");
        assert_eq!(s.state("web01"), "qmpmux.hv01.web01.state");
        assert_eq!(s.vms(), "qmpmux.hv01.vms");
        assert_eq!(s.discovery(), "qmpmux.vms");
        assert_eq!(Subjects::new("dc1.eu.hv01").discovery(), "dc1.eu.vms");
        assert_eq!(Subjects::new("hv01").discovery(), "vms");
        assert_eq!(s.execute_vm("qmpmux.hv01.web01.execute"), Some("web01"));
        assert_eq!(s.execute_vm("qmpmux.hv02.web01.execute"), None);
        assert_eq!(s.execute_vm("qmpmux.hv01.a.b.execute"), None);
    }
}
