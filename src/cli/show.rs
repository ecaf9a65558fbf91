//! JSON as the command line shows it to people: in the order QEMU wrote
//! it (serde_json's own maps would sort the members), pretty or on one
//! line, with every character that could act on a terminal escaped
//! ([`crate::ops::escape::is_unsafe`]). Pure.

use crate::ops::escape::write_quoted;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt::{self, Write};

/// A JSON value that keeps its members' order.
#[derive(Debug, Clone, PartialEq)]
pub enum Ordered {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Ordered>),
    Object(Vec<(String, Ordered)>),
}

impl Ordered {
    /// `text` read as JSON.
    pub fn parse(text: &str) -> Result<Ordered, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Ordered> {
        match self {
            Ordered::Object(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Laid out over lines, indented by two spaces a level; empty arrays
    /// and objects stay `[]` and `{}`.
    pub fn pretty(&self) -> String {
        let mut out = String::new();
        let _ = self.write(&mut out, Some(0));
        out
    }

    /// On one line, with a space after `:` and `,` as QEMU writes.
    pub fn compact(&self) -> String {
        let mut out = String::new();
        let _ = self.write(&mut out, None);
        out
    }

    fn write(&self, out: &mut String, indent: Option<usize>) -> fmt::Result {
        let newline = |out: &mut String, level: usize| {
            out.push('\n');
            for _ in 0..level {
                out.push_str("  ");
            }
        };
        match self {
            Ordered::Null => out.write_str("null"),
            Ordered::Bool(b) => write!(out, "{b}"),
            Ordered::Number(n) => write!(out, "{n}"),
            Ordered::String(s) => write_quoted(out, s),
            Ordered::Array(items) if items.is_empty() => out.write_str("[]"),
            Ordered::Object(members) if members.is_empty() => out.write_str("{}"),
            Ordered::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if indent.is_none() {
                            out.push(' ');
                        }
                    }
                    if let Some(level) = indent {
                        newline(out, level + 1);
                    }
                    item.write(out, indent.map(|l| l + 1))?;
                }
                if let Some(level) = indent {
                    newline(out, level);
                }
                out.write_char(']')
            }
            Ordered::Object(members) => {
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if indent.is_none() {
                            out.push(' ');
                        }
                    }
                    if let Some(level) = indent {
                        newline(out, level + 1);
                    }
                    write_quoted(out, key)?;
                    out.push_str(": ");
                    value.write(out, indent.map(|l| l + 1))?;
                }
                if let Some(level) = indent {
                    newline(out, level);
                }
                out.write_char('}')
            }
        }
    }
}

/// `text` (a JSON document) pretty, or as it is, escaped, when it is not
/// JSON.
pub fn pretty(text: &str) -> String {
    match Ordered::parse(text) {
        Ok(v) => v.pretty(),
        Err(_) => crate::ops::escape::escaped(text),
    }
}

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OrderedVisitor)
    }
}

struct OrderedVisitor;

impl<'de> Visitor<'de> for OrderedVisitor {
    type Value = Ordered;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_unit<E>(self) -> Result<Ordered, E> {
        Ok(Ordered::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Ordered, E> {
        Ok(Ordered::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Ordered, E> {
        Ok(Ordered::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Ordered, E> {
        Ok(Ordered::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Ordered, E> {
        Ok(serde_json::Number::from_f64(n).map_or(Ordered::Null, Ordered::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Ordered, E> {
        Ok(Ordered::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Ordered, E> {
        Ok(Ordered::String(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ordered, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Ordered::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
        let mut members = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, Ordered>()? {
            members.push((k, v));
        }
        Ok(Ordered::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_qemu_s_order() {
        let v = Ordered::parse(r#"{"status": "running", "singlestep": false, "running": true}"#).unwrap();
        assert_eq!(
            v.pretty(),
            "{\n  \"status\": \"running\",\n  \"singlestep\": false,\n  \"running\": true\n}"
        );
        assert_eq!(
            v.compact(),
            r#"{"status": "running", "singlestep": false, "running": true}"#
        );
    }

    #[test]
    fn nesting_and_empties() {
        let v = Ordered::parse(r#"{"a": [1, {"b": null}, []], "c": {}, "d": -2.5}"#).unwrap();
        assert_eq!(
            v.pretty(),
            "{\n  \"a\": [\n    1,\n    {\n      \"b\": null\n    },\n    []\n  ],\n  \"c\": {},\n  \"d\": -2.5\n}"
        );
        assert_eq!(v.compact(), r#"{"a": [1, {"b": null}, []], "c": {}, "d": -2.5}"#);
        assert_eq!(Ordered::parse("{}").unwrap().pretty(), "{}");
        assert_eq!(
            v.get("d"),
            Some(&Ordered::Number(serde_json::Number::from_f64(-2.5).unwrap()))
        );
    }

    #[test]
    fn text_that_could_act_on_a_terminal_is_escaped() {
        let v = Ordered::parse(r#"{"desc\u001b[2J": "a\u001b[31mred\u0007\u009b\u202e\nb"}"#).unwrap();
        let shown = v.pretty();
        assert!(
            !shown.chars().any(|c| crate::ops::escape::is_unsafe(c) && c != '\n'),
            "{shown:?}"
        );
        assert_eq!(
            shown,
            "{\n  \"desc\\u001b[2J\": \"a\\u001b[31mred\\u0007\\u009b\\u202e\\nb\"\n}"
        );
        assert_eq!(pretty("not json\u{1b}"), "not json\\u001b");
    }
}
