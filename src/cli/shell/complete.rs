//! Tab completion for `qmpmux shell`: command names (from
//! `query-commands`), then argument names and the values of booleans and
//! enumerations (from `query-qmp-schema`: the command's `arg-type`, its
//! variants and nested objects); in `-H` mode, HMP command names (from
//! HMP's `help` and `help info`). Pure: the schema and names are given.

use super::line::{words, Word};
use serde_json::{Map, Value};
use std::collections::{BTreeSet, HashMap};

/// One completion: as listed, and the text that replaces the word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub display: String,
    pub replacement: String,
}

/// Where the word being completed starts, and its candidates.
pub type Completion = (usize, Vec<Candidate>);

/// How deep types may nest before completion stops looking (the schema
/// has recursive types: `BlockdevOptions` within itself).
const MAX_DEPTH: usize = 16;

/// `query-qmp-schema`'s entities by name.
#[derive(Debug, Default)]
pub struct Schema {
    entities: HashMap<String, Value>,
}

impl Schema {
    /// The schema from `query-qmp-schema`'s `return`.
    pub fn from_return(ret: &Value) -> Schema {
        let entities = ret
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e.get("name")?.as_str()?.to_owned(), e.clone())))
            .collect();
        Schema { entities }
    }

    fn entity(&self, name: &str) -> Option<&Value> {
        self.entities.get(name)
    }

    fn meta(&self, name: &str) -> &str {
        self.entity(name)
            .and_then(|e| e.get("meta-type"))
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// Command `command`'s argument type.
    fn arguments_of(&self, command: &str) -> Option<&str> {
        let e = self.entity(command)?;
        (e.get("meta-type")?.as_str()? == "command").then_some(())?;
        e.get("arg-type")?.as_str()
    }

    /// The members of object type `ty` (or of the objects an alternate can
    /// be), as `(name, type)`: its own (the base's among them, as QEMU
    /// introspects them), then its variants': only the one `given`'s tag
    /// selects when it is given, all of them otherwise.
    fn members(&self, ty: &str, given: Option<&Map<String, Value>>, depth: usize) -> Vec<(String, String)> {
        let Some(e) = self.entity(ty).filter(|_| depth < MAX_DEPTH) else {
            return Vec::new();
        };
        let pairs = |list: Option<&Value>| -> Vec<(String, String)> {
            list.and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| Some((m.get("name")?.as_str()?.to_owned(), m.get("type")?.as_str()?.to_owned())))
                .collect()
        };
        let mut out = Vec::new();
        match self.meta(ty) {
            "object" => {
                out = pairs(e.get("members"));
                let tag = e.get("tag").and_then(Value::as_str);
                let chosen = tag.and_then(|t| given?.get(t)?.as_str());
                for v in e.get("variants").and_then(Value::as_array).into_iter().flatten() {
                    let case = v.get("case").and_then(Value::as_str);
                    if chosen.is_some() && case != chosen {
                        continue;
                    }
                    if let Some(t) = v.get("type").and_then(Value::as_str) {
                        out.extend(self.members(t, given, depth + 1));
                    }
                }
            }
            "alternate" => {
                for m in e.get("members").and_then(Value::as_array).into_iter().flatten() {
                    if let Some(t) = m.get("type").and_then(Value::as_str) {
                        out.extend(self.members(t, given, depth + 1));
                    }
                }
            }
            _ => {}
        }
        let mut seen = BTreeSet::new();
        out.retain(|(name, _)| seen.insert(name.clone()));
        out
    }

    /// The type at `path` (member names) within type `ty`.
    fn type_at(&self, ty: &str, path: &[&str], given: Option<&Map<String, Value>>) -> Option<String> {
        let mut ty = ty.to_owned();
        let mut given = given;
        for part in path {
            let found = self.members(&ty, given, 0).into_iter().find(|(n, _)| n == part)?;
            ty = found.1;
            given = given.and_then(|g| g.get(*part)).and_then(Value::as_object);
        }
        Some(ty)
    }

    /// The values a member of type `ty` can take, where they are few:
    /// booleans and enumerations (also as an alternate's branch).
    fn values(&self, ty: &str, depth: usize) -> Vec<String> {
        let Some(e) = self.entity(ty).filter(|_| depth < MAX_DEPTH) else {
            return if ty == "bool" {
                vec!["false".into(), "true".into()]
            } else {
                Vec::new()
            };
        };
        match self.meta(ty) {
            "builtin" if e.get("json-type").and_then(Value::as_str) == Some("boolean") => {
                vec!["false".into(), "true".into()]
            }
            "enum" => {
                let listed = e.get("values").or_else(|| e.get("members"));
                listed
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().or_else(|| v.get("name")?.as_str()))
                    .map(str::to_owned)
                    .collect()
            }
            "alternate" => e
                .get("members")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|m| m.get("type")?.as_str())
                .flat_map(|t| self.values(t, depth + 1))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Completions for `text` (the line up to the cursor) in QMP mode:
/// the first word from `commands`; after it, argument names (`name=`,
/// dotted for nested objects) and the values of booleans and
/// enumerations, from the schema `schema` gives when asked (asked only
/// then: it is some 200 KiB).
pub fn qmp<'s>(text: &str, commands: &[String], schema: impl FnOnce() -> Option<&'s Schema>) -> Completion {
    let all = words(text);
    // A blank within an open quote or bracket is part of the last word.
    let open = all.last().is_some_and(|w| w.open.is_some());
    let at_blank = !open && (text.is_empty() || text.ends_with(char::is_whitespace));
    let (done, current) = match (at_blank, all.split_last()) {
        (false, Some((last, before))) if last.open != Some('"') || last.text.contains('=') => (before, last.clone()),
        (false, Some(_)) => return (text.len(), Vec::new()),
        _ => (
            &all[..],
            Word {
                start: text.len(),
                text: String::new(),
                open: None,
            },
        ),
    };
    let Some((command, arguments)) = done.split_first() else {
        return (current.start, matching(commands, &current.text, |c| format!("{c} ")));
    };
    if command.text.starts_with('{') || arguments.iter().any(|w| w.text.starts_with('{')) {
        return (current.start, Vec::new());
    }
    if current.text.starts_with('{') || current.open.is_some_and(|c| c != '"') {
        return (current.start, Vec::new());
    }
    let Some(schema) = schema() else {
        return (current.start, Vec::new());
    };
    let Some(ty) = schema.arguments_of(&command.text) else {
        return (current.start, Vec::new());
    };
    let given = given(arguments);
    let candidates = match current.text.split_once('=') {
        None => names(schema, ty, &given, &current.text),
        Some((key, prefix)) => {
            let path: Vec<&str> = key.split('.').collect();
            let values = schema
                .type_at(ty, &path, Some(&given))
                .map(|t| schema.values(&t, 0))
                .unwrap_or_default();
            matching(&values, prefix, |v| format!("{key}={v} "))
        }
    };
    (current.start, candidates)
}

/// Argument names for the key being typed, `key` (maybe dotted): the
/// members of the type at its path not already `given`.
fn names(schema: &Schema, ty: &str, given: &Map<String, Value>, key: &str) -> Vec<Candidate> {
    let (path, prefix) = match key.rsplit_once('.') {
        Some((path, prefix)) => (path.split('.').collect::<Vec<_>>(), prefix),
        None => (Vec::new(), key),
    };
    let Some(ty) = schema.type_at(ty, &path, Some(given)) else {
        return Vec::new();
    };
    let mut here = Some(given);
    for part in &path {
        here = here.and_then(|g| g.get(*part)).and_then(Value::as_object);
    }
    let lead: String = path.iter().map(|p| format!("{p}.")).collect();
    let members: Vec<String> = schema
        .members(&ty, here, 0)
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !here.is_some_and(|g| g.contains_key(name)))
        .collect();
    matching(&members, prefix, |m| format!("{lead}{m}="))
}

/// The arguments the finished words give (words that do not read are
/// left out): the tag that selects a variant, keys not to offer again.
fn given(words: &[Word]) -> Map<String, Value> {
    let good: Vec<String> = words
        .iter()
        .filter(|w| w.open.is_none())
        .map(|w| w.text.clone())
        .filter(|w| crate::cli::args::parse(std::slice::from_ref(w)).is_ok())
        .collect();
    crate::cli::args::parse(&good).ok().flatten().unwrap_or_default()
}

/// The names starting with `prefix`, sorted, without repeats; none with
/// a blank or a character that would act on the terminal (QEMU's names
/// have none: they could not be typed, nor shown as they are).
fn matching(names: &[String], prefix: &str, replace: impl Fn(&str) -> String) -> Vec<Candidate> {
    let typable = |n: &&str| !n.chars().any(|c| c.is_whitespace() || crate::ops::escape::is_unsafe(c));
    let set: BTreeSet<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with(prefix))
        .filter(typable)
        .collect();
    set.into_iter()
        .map(|n| Candidate {
            display: n.to_owned(),
            replacement: replace(n),
        })
        .collect()
}

/// HMP's command names and `info` topics.
#[derive(Debug, Default, Clone)]
pub struct HmpNames {
    pub commands: Vec<String>,
    pub info: Vec<String>,
}

impl HmpNames {
    /// From the texts of HMP's `help` (`name|alias args -- what`, the
    /// lines that go on indented) and `help info` (`info name ...`).
    pub fn from_help(help: &str, help_info: &str) -> HmpNames {
        let firsts = |text: &str, skip: usize| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with(char::is_whitespace))
                .filter_map(|l| l.split_whitespace().nth(skip))
                .flat_map(|w| w.split('|'))
                .filter(|w| !w.is_empty())
                .map(str::to_owned)
                .collect()
        };
        HmpNames {
            commands: firsts(help, 0),
            info: firsts(help_info, 1),
        }
    }
}

/// Completions for `text` (the line up to the cursor) in `-H` mode:
/// the command's name, and the topic after `info`.
pub fn hmp<'n>(text: &str, names: impl FnOnce() -> Option<&'n HmpNames>) -> Completion {
    let at_blank = text.is_empty() || text.ends_with(char::is_whitespace);
    let mut all: Vec<(usize, &str)> = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(|c: char| !c.is_whitespace()) {
        let start = text.len() - rest.len() + i;
        let word = text[start..].split(char::is_whitespace).next().unwrap_or_default();
        all.push((start, word));
        rest = &text[start + word.len()..];
    }
    let (start, prefix, index) = match (at_blank, all.last()) {
        (true, _) => (text.len(), "", all.len()),
        (false, Some(&(start, word))) => (start, word, all.len() - 1),
        (false, None) => (text.len(), "", 0),
    };
    let Some(names) = names() else {
        return (start, Vec::new());
    };
    let list = match (index, all.first()) {
        (0, _) => &names.commands,
        (1, Some((_, "info" | "i"))) => &names.info,
        _ => return (start, Vec::new()),
    };
    (start, matching(list, prefix, |n| format!("{n} ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A schema shaped as QEMU introspects one (masked type names).
    fn schema() -> Schema {
        Schema::from_return(&json!([
            {"name": "qom-get", "meta-type": "command", "arg-type": "1", "ret-type": "any"},
            {"name": "1", "meta-type": "object", "members": [
                {"name": "path", "type": "str"}, {"name": "property", "type": "str"}]},
            {"name": "block-job-cancel", "meta-type": "command", "arg-type": "2", "ret-type": "0"},
            {"name": "2", "meta-type": "object", "members": [
                {"name": "device", "type": "str"}, {"name": "force", "type": "bool", "default": null}]},
            {"name": "blockdev-add", "meta-type": "command", "arg-type": "3", "ret-type": "0"},
            {"name": "3", "meta-type": "object", "tag": "driver",
             "members": [{"name": "driver", "type": "4"}, {"name": "node-name", "type": "str", "default": null},
                         {"name": "cache", "type": "7", "default": null}],
             "variants": [{"case": "file", "type": "5"}, {"case": "qcow2", "type": "6"}]},
            {"name": "4", "meta-type": "enum", "values": ["file", "qcow2"],
             "members": [{"name": "file"}, {"name": "qcow2"}]},
            {"name": "5", "meta-type": "object", "members": [{"name": "filename", "type": "str"}]},
            {"name": "6", "meta-type": "object", "members": [
                {"name": "file", "type": "8"}, {"name": "lazy-refcounts", "type": "bool", "default": null}]},
            {"name": "7", "meta-type": "object", "members": [
                {"name": "direct", "type": "bool", "default": null}, {"name": "no-flush", "type": "bool", "default": null}]},
            {"name": "8", "meta-type": "alternate", "members": [{"type": "3"}, {"type": "str"}]},
            {"name": "bool", "meta-type": "builtin", "json-type": "boolean"},
            {"name": "str", "meta-type": "builtin", "json-type": "string"},
            {"name": "query-status", "meta-type": "command", "arg-type": "0", "ret-type": "9"},
            {"name": "0", "meta-type": "object", "members": []}
        ]))
    }

    fn commands() -> Vec<String> {
        [
            "query-status",
            "query-stats",
            "qom-get",
            "quit",
            "block-job-cancel",
            "blockdev-add",
        ]
        .map(String::from)
        .to_vec()
    }

    /// The replacements for `text`, and where they go.
    fn complete(text: &str) -> (usize, Vec<String>) {
        let s = schema();
        let (start, c) = qmp(text, &commands(), || Some(&s));
        (start, c.into_iter().map(|c| c.replacement).collect())
    }

    #[test]
    fn command_names() {
        assert_eq!(complete("query-statu"), (0, vec!["query-status ".into()]));
        assert_eq!(
            complete("  query-sta"),
            (2, vec!["query-stats ".into(), "query-status ".into()])
        );
        assert_eq!(complete("nothing").1, Vec::<String>::new());
        let odd = ["x\u{1b}[2J".to_owned(), "x y".to_owned(), "xz".to_owned()];
        assert_eq!(qmp("x", &odd, || None).1.len(), 1, "untypable names left out");
        assert_eq!(complete("").1.len(), commands().len());
        // The first word never asks for the schema.
        let (_, c) = qmp("q", &commands(), || panic!("schema fetched"));
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn argument_names_not_given_yet() {
        assert_eq!(complete("qom-get "), (8, vec!["path=".into(), "property=".into()]));
        assert_eq!(complete("qom-get pr"), (8, vec!["property=".into()]));
        assert_eq!(complete("qom-get path=/machine p"), (22, vec!["property=".into()]));
        assert_eq!(complete("qom-get path=/machine property=type ").1, Vec::<String>::new());
        assert_eq!(complete("query-status ").1, Vec::<String>::new());
        assert_eq!(complete("no-such-command ").1, Vec::<String>::new());
        let display = qmp("qom-get pr", &commands(), || None).1;
        assert!(display.is_empty(), "no schema, no names");
    }

    #[test]
    fn variants_follow_the_tag_and_nested_objects_their_path() {
        // Every variant's members before the tag is given...
        assert_eq!(
            complete("blockdev-add ").1,
            [
                "cache=",
                "driver=",
                "file=",
                "filename=",
                "lazy-refcounts=",
                "node-name="
            ]
        );
        // ...only the chosen one's after.
        assert_eq!(
            complete("blockdev-add driver=qcow2 ").1,
            ["cache=", "file=", "lazy-refcounts=", "node-name="]
        );
        assert_eq!(complete("blockdev-add driver=file f").1, ["filename="]);
        assert_eq!(
            complete("blockdev-add driver=qcow2 cache.").1,
            ["cache.direct=", "cache.no-flush="]
        );
        // Through an alternate, and a nested tag.
        assert_eq!(
            complete("blockdev-add driver=qcow2 file.driver=file file.f").1,
            ["file.filename="]
        );
    }

    #[test]
    fn values_of_booleans_and_enumerations() {
        assert_eq!(
            complete("block-job-cancel force="),
            (17, vec!["force=false ".into(), "force=true ".into()])
        );
        assert_eq!(complete("block-job-cancel force=t").1, ["force=true "]);
        assert_eq!(complete("blockdev-add driver=q").1, ["driver=qcow2 "]);
        assert_eq!(
            complete("blockdev-add cache.direct=").1,
            ["cache.direct=false ", "cache.direct=true "]
        );
        assert_eq!(complete("qom-get path=").1, Vec::<String>::new());
    }

    #[test]
    fn json_is_left_alone() {
        assert_eq!(complete(r#"{"execute": "q"#).1, Vec::<String>::new());
        assert_eq!(complete(r#"blockdev-add {"dri"#).1, Vec::<String>::new());
        assert_eq!(complete("qom-get path=[1, ").1, Vec::<String>::new());
        // An open quote in a value is still a key=value word.
        assert_eq!(complete(r#"block-job-cancel device="a b" f"#).1, ["force="]);
    }

    #[test]
    fn human_monitor_names() {
        let help = "announce_self [interfaces] [id] -- Trigger GARP/RARP announcements\n\
                    block_job_cancel [-f] device -- stop an active background block operation (use -f\n\
                    \t\t\t if you want to abort\n\
                    c|cont  -- resume emulation\n\
                    info [subcommand] -- show various information about the system state\n\
                    q|quit  -- quit the emulator\n";
        let info =
            "info balloon  -- show balloon information\ninfo status  -- show the current VM status (running|paused)\n";
        let names = HmpNames::from_help(help, info);
        assert_eq!(
            names.commands,
            ["announce_self", "block_job_cancel", "c", "cont", "info", "q", "quit"]
        );
        assert_eq!(names.info, ["balloon", "status"]);
        let got = |text: &str| {
            let (start, c) = hmp(text, || Some(&names));
            (start, c.into_iter().map(|c| c.replacement).collect::<Vec<_>>())
        };
        assert_eq!(got("co"), (0, vec!["cont ".into()]));
        assert_eq!(got("info s"), (5, vec!["status ".into()]));
        assert_eq!(got("  info  "), (8, vec!["balloon ".into(), "status ".into()]));
        assert_eq!(got("cont x").1, Vec::<String>::new());
        assert_eq!(got("").1.len(), 7);
    }
}
