//! JSON the way QEMU writes it, and top-level member access without building
//! values.
//!
//! What qmpmux forwards stays raw (`&RawValue` slices of the input). What it
//! writes itself (local errors echoing a client's id, greetings) is written
//! in QEMU's own style so that a client cannot tell the difference: `": "` and
//! `", "` separators, non-ASCII escaped as `\uXXXX`, floats as `%.17g`, and
//! object members in the order of QEMU's `QDict` hash table.

use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// The members of a top-level JSON object, values left raw.
#[derive(Debug)]
pub struct Members<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Members<'a> {
    pub fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// Appends `, "key": value` for every member but `id`, then the
    /// closing brace: what follows `{"id": N` in a message re-keyed by id.
    /// `compact` (for QEMU's input): `,"key":value` with the whitespace
    /// between tokens left out. QEMU reads its monitor one byte per
    /// main-loop turn (about 4-5 µs a byte on these machines), so every
    /// byte a request does not need is latency saved.
    pub fn write_tail_without_id(&self, out: &mut String, compact: bool) {
        let (comma, colon) = if compact { (",", ":") } else { (", ", ": ") };
        for (k, v) in self.0.iter().filter(|(k, _)| k != "id") {
            out.push_str(comma);
            write_str(out, k);
            out.push_str(colon);
            if compact {
                push_compact(out, v.get());
            } else {
                out.push_str(v.get());
            }
        }
        out.push('}');
    }
}

/// Appends a valid JSON value without the whitespace between its tokens
/// (valid JSON never needs any: no two scalars stand side by side), and
/// with strings untouched.
pub fn push_compact(out: &mut String, value: &str) {
    let bytes = value.as_bytes();
    if !bytes.iter().any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        out.push_str(value);
        return;
    }
    let (mut in_string, mut escaped, mut run) = (false, false, 0);
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.push_str(&value[run..i]);
            run = i + 1;
        } else if b == b'"' {
            in_string = true;
        }
    }
    out.push_str(&value[run..]);
}

/// Why a message is not a usable object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Valid JSON but not an object.
    NotObject,
    /// QEMU's parser would reject it; the text follows "JSON parse error, ".
    Syntax(String),
}

impl ParseError {
    /// The `desc` QEMU sends for this input.
    pub fn desc(&self) -> String {
        match self {
            ParseError::NotObject => "QMP input must be a JSON object".into(),
            ParseError::Syntax(s) => format!("JSON parse error, {s}"),
        }
    }
}

/// Parses a top-level object into raw members, without checking what is
/// inside the values. For trusted input (QEMU's output).
pub fn members(bytes: &[u8]) -> Result<Members<'_>, ParseError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let top = de.deserialize_any(TopVisitor).map_err(syntax_error)?;
    de.end().map_err(syntax_error)?;
    top.ok_or(ParseError::NotObject)
}

/// Parses a client's message the way QEMU's parser judges it: duplicate keys
/// anywhere are errors. Returns its top-level members.
pub fn members_checked(bytes: &[u8]) -> Result<Members<'_>, ParseError> {
    // The usual case in one pass: the top level, then each value walked for
    // what skipping it as raw does not check (keys inside it, escapes,
    // numbers). The first failing value is the first error in the text, as
    // keys and structure are already known good.
    if let Ok(m) = members(bytes) {
        for (_, v) in &m.0 {
            check_all(v.get().as_bytes())?;
        }
        return Ok(m);
    }
    // Broken somewhere: one walk of the whole text finds the first error,
    // which need not be the one the raw pass stopped at.
    check_all(bytes)?;
    members(bytes)
}

/// Walks a whole value as QEMU's parser would judge it.
fn check_all(bytes: &[u8]) -> Result<(), ParseError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    Checked.deserialize(&mut de).map_err(syntax_error)?;
    de.end().map_err(syntax_error)
}

const DUPLICATE_KEY: &str = "duplicate key";

/// Where a standard JSON parser first fails on `bytes` (a byte offset), if
/// it does; duplicate keys are not its concern here.
pub fn syntax_error_offset(bytes: &[u8]) -> Option<usize> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let err = match serde::de::IgnoredAny::deserialize(&mut de).and_then(|_| de.end()) {
        Ok(()) => return None,
        Err(e) => e,
    };
    // Lines and columns are 1-based; the column counts bytes.
    let line_start: usize = bytes
        .split(|&b| b == b'\n')
        .take(err.line().saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    Some(line_start + err.column().saturating_sub(1))
}

fn syntax_error(e: serde_json::Error) -> ParseError {
    let text = e.to_string();
    let qemu = if text.starts_with(DUPLICATE_KEY) {
        DUPLICATE_KEY
    } else if text.contains("invalid unicode")
        || text.contains("invalid UTF-8")
        || text.contains("lone leading surrogate")
    {
        "invalid UTF-8 sequence in string"
    } else if text.contains("invalid escape") {
        "invalid escape sequence in string"
    } else if text.contains("expected `:`") {
        "missing : in object pair"
    } else if text.contains("key must be a string") {
        "key is not a string in object"
    } else if text.contains("expected `,` or `}`") {
        "expected separator in dict"
    } else if text.contains("expected `,` or `]`") {
        "expected separator in list"
    } else {
        "expecting value"
    };
    ParseError::Syntax(qemu.into())
}

/// Borrows keys when they have no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

struct TopVisitor;

macro_rules! not_object {
    ($($name:ident: $t:ty),*) => {
        $(fn $name<E>(self, _: $t) -> Result<Self::Value, E> { Ok(None) })*
    };
}

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Option<Members<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::with_capacity(4);
        while let Some(Key(k)) = map.next_key()? {
            if out.iter().any(|(seen, _)| *seen == k) {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
            let v: &'de RawValue = map.next_value()?;
            out.push((k, v));
        }
        Ok(Some(Members(out)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    not_object!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);
}

/// Walks any value, rejecting duplicate keys at every depth.
struct Checked;

impl<'de> DeserializeSeed<'de> for Checked {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut keys: Vec<Cow<'de, str>> = Vec::new();
        while let Some(Key(k)) = map.next_key()? {
            if keys.contains(&k) {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
            keys.push(k);
            map.next_value_seed(Checked)?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Checked)?.is_some() {}
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
}

/// QEMU's `tdb_hash`, used to place keys in a `QDict`'s 512 buckets.
fn tdb_hash(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The order in which QEMU emits the members of an object whose keys were
/// inserted in the given order: by bucket, newest first within a bucket.
pub fn qdict_order<K: AsRef<str>>(keys: &[K]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..keys.len()).collect();
    idx.sort_by_key(|&i| (tdb_hash(keys[i].as_ref()) % 512, std::cmp::Reverse(i)));
    idx
}

/// glib's `g_str_hash` (djb2 over signed chars).
fn g_str_hash(key: &str) -> u32 {
    key.bytes().fold(5381u32, |h, b| {
        (h << 5).wrapping_add(h).wrapping_add(i32::from(b as i8) as u32)
    })
}

/// The order in which a glib `GHashTable` of 8 buckets (what QEMU's QAPI
/// input visitor uses to track unvisited members) iterates over `keys`
/// inserted in that order. `None` when so many keys would have grown the
/// table that this model no longer holds.
pub fn ghash_order<K: AsRef<str>>(keys: &[K]) -> Option<Vec<usize>> {
    const SIZE: usize = 8;
    const MOD: u32 = 7;
    if keys.len() > 5 {
        return None;
    }
    let mut slots: [Option<usize>; SIZE] = [None; SIZE];
    for (i, k) in keys.iter().enumerate() {
        let mut index = (g_str_hash(k.as_ref()).wrapping_mul(11) % MOD) as usize;
        let mut step = 0;
        while slots[index].is_some() {
            step += 1;
            index = (index + step) & (SIZE - 1);
        }
        slots[index] = Some(i);
    }
    Some(slots.iter().flatten().copied().collect())
}

/// Writes `s` as a QEMU-style JSON string.
pub fn write_str(out: &mut String, s: &str) {
    use std::fmt::Write;
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04X}");
                }
            }
        }
    }
    out.push('"');
}

/// C's `%.17g`, which QEMU uses for floating-point numbers.
pub fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sci = format!("{x:.16e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..17).contains(&exp) {
        let m = trim_fraction(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (16 - exp) as usize;
        trim_fraction(&format!("{x:.decimals$}")).to_string()
    }
}

fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// A JSON number token as QEMU prints it after parsing: integers stay
/// integers while they fit in i64 or u64, everything else is a double.
fn write_number(out: &mut String, token: &str) {
    let integer = !token.contains(['.', 'e', 'E']);
    if integer {
        if let Ok(i) = token.parse::<i64>() {
            out.push_str(&i.to_string());
            return;
        }
        if let Ok(u) = token.parse::<u64>() {
            out.push_str(&u.to_string());
            return;
        }
    }
    // Out-of-range values become inf, as in QEMU.
    out.push_str(&format_g17(token.parse::<f64>().unwrap_or(f64::NAN)));
}

/// Writes a raw value as QEMU would after parsing it.
fn write_raw(out: &mut String, raw: &RawValue) {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'{') => match members(text.as_bytes()) {
            Ok(m) => {
                let keys: Vec<&str> = m.0.iter().map(|(k, _)| k.as_ref()).collect();
                out.push('{');
                for (n, i) in qdict_order(&keys).into_iter().enumerate() {
                    if n > 0 {
                        out.push_str(", ");
                    }
                    write_str(out, keys[i]);
                    out.push_str(": ");
                    write_raw(out, m.0[i].1);
                }
                out.push('}');
            }
            Err(_) => out.push_str(text),
        },
        Some(b'[') => match serde_json::from_str::<Vec<&RawValue>>(text) {
            Ok(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_raw(out, item);
                }
                out.push(']');
            }
            Err(_) => out.push_str(text),
        },
        Some(b'"') => match serde_json::from_str::<Cow<'_, str>>(text) {
            Ok(s) => write_str(out, &s),
            Err(_) => out.push_str(text),
        },
        Some(b'-' | b'0'..=b'9') => write_number(out, text),
        _ => out.push_str(text),
    }
}

/// A raw JSON value re-serialised the way QEMU echoes it.
pub fn qemu_style(raw: &RawValue) -> String {
    let mut out = String::with_capacity(raw.get().len());
    write_raw(&mut out, raw);
    out
}

/// Rewrites a pretty-printed message (QEMU's `-mon ...,pretty=on`) into
/// QEMU's compact form: whitespace runs outside strings that contain a
/// newline become nothing after an opening or before a closing bracket, and
/// one space elsewhere (after `,`). Compact input comes back unchanged.
pub fn compact_pretty(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len());
    let (mut in_str, mut escape) = (false, false);
    let mut i = 0;
    while i < msg.len() {
        let b = msg[i];
        if in_str {
            out.push(b);
            if escape {
                escape = false;
            } else if b == b'\\' {
                escape = true;
            } else if b == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
            let start = i;
            while i < msg.len() && matches!(msg[i], b' ' | b'\t' | b'\r' | b'\n') {
                i += 1;
            }
            let run = &msg[start..i];
            if !run.contains(&b'\n') {
                out.extend_from_slice(run);
            } else {
                let after_open = matches!(out.last(), Some(b'{' | b'[') | None);
                let before_close = matches!(msg.get(i), Some(b'}' | b']') | None);
                if !after_open && !before_close {
                    out.push(b' ');
                }
            }
            continue;
        }
        in_str = b == b'"';
        out.push(b);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu(json: &str) -> String {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        qemu_style(&raw)
    }

    fn compact(json: &str) -> String {
        let mut out = String::new();
        push_compact(&mut out, json);
        out
    }

    #[test]
    fn compact_values_lose_only_the_whitespace_between_tokens() {
        let input = concat!(
            r#"{ "a b" :"#,
            "\t[ 1 , -2.5e3,\r\n",
            r#""x \" y\\" ] ,"c": { "\u00e9 ":null } }"#
        );
        let got = compact(input);
        assert_eq!(got, r#"{"a b":[1,-2.5e3,"x \" y\\"],"c":{"\u00e9 ":null}}"#);
        // The same value, as any JSON parser reads it.
        let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(parse(&got), parse(input));
        // Nothing to take out: the very same text.
        assert_eq!(compact(r#"{"k":"v w"}"#), r#"{"k":"v w"}"#);
        assert_eq!(compact(" 7 "), "7");
    }

    #[test]
    fn the_upstream_tail_is_compact_and_keeps_member_order() {
        let text =
            r#"{ "execute" : "human-monitor-command", "id": "x y", "arguments": { "command-line": "info  status" } }"#;
        let m = members(text.as_bytes()).unwrap();
        let mut tail = String::new();
        m.write_tail_without_id(&mut tail, true);
        assert_eq!(
            tail,
            r#","execute":"human-monitor-command","arguments":{"command-line":"info  status"}}"#
        );
    }

    #[test]
    fn object_member_order_matches_qemu() {
        // Observed on QEMU 7.2 for this insertion order.
        let got = qemu(r#"{"x":1,"y":2,"z":3,"id":1,"error":2,"return":3,"class":4,"desc":5,"ab":6,"ba":7}"#);
        assert_eq!(
            got,
            r#"{"x": 1, "class": 4, "ba": 7, "y": 2, "z": 3, "desc": 5, "return": 3, "ab": 6, "id": 1, "error": 2}"#
        );
        assert_eq!(qemu(r#"{"b":1,"a":[]}"#), r#"{"a": [], "b": 1}"#);
    }

    #[test]
    fn numbers_match_qemu() {
        assert_eq!(
            qemu("[1.5,-0.0,1e-5,123456789012345678,1e17,1e16,0.000123,1e3,0.1]"),
            "[1.5, -0, 1.0000000000000001e-05, 123456789012345678, 1e+17, 10000000000000000, \
             0.00012300000000000001, 1000, 0.10000000000000001]"
        );
        assert_eq!(
            qemu("[-0, 18446744073709551615, 18446744073709551616, -9223372036854775809]"),
            "[0, 18446744073709551615, 1.8446744073709552e+19, -9.2233720368547758e+18]"
        );
    }

    #[test]
    fn strings_match_qemu() {
        assert_eq!(
            qemu(r#""a/b\u007f\ud83d\ude00\u00e9\"\\\n""#),
            r#""a/b\u007F\uD83D\uDE00\u00E9\"\\\n""#
        );
    }

    #[test]
    fn members_keep_null_distinct_from_absent() {
        let m = members(br#"{"execute":"x","id":null}"#).unwrap();
        assert_eq!(m.get("id").map(|v| v.get()), Some("null"));
        assert!(m.get("arguments").is_none());
    }

    #[test]
    fn parse_errors_match_qemu_texts() {
        let e = |s: &str| members_checked(s.as_bytes()).unwrap_err().desc();
        assert_eq!(e(r#"{"execute":"x","execute":"y"}"#), "JSON parse error, duplicate key");
        assert_eq!(
            e(r#"{"arguments":{"a":[{"b":1,"b":2}]}}"#),
            "JSON parse error, duplicate key"
        );
        assert_eq!(e(r#"{"execute":}"#), "JSON parse error, expecting value");
        assert_eq!(e(r#"{"a":1]"#), "JSON parse error, expected separator in dict");
        assert_eq!(e(r#"{"a" 1}"#), "JSON parse error, missing : in object pair");
        assert_eq!(
            e(r#"{"a":"\q"}"#),
            "JSON parse error, invalid escape sequence in string"
        );
        assert_eq!(e("[1]"), "QMP input must be a JSON object");
        assert_eq!(e("5"), "QMP input must be a JSON object");
        let bad_utf8 = b"{\"id\":\"\xe9\"}";
        assert_eq!(
            members_checked(bad_utf8).unwrap_err().desc(),
            "JSON parse error, invalid UTF-8 sequence in string"
        );
    }

    /// The first error in the text is reported, whichever pass finds it.
    #[test]
    fn the_first_error_in_the_text_wins() {
        let e = |s: &str| members_checked(s.as_bytes()).unwrap_err().desc();
        // Found by the walk of one value, the structure being good.
        assert_eq!(
            e(r#"{"execute":"x","arguments":{"a":1,"a":2}}"#),
            "JSON parse error, duplicate key"
        );
        // Before a structural error later in the text.
        assert_eq!(
            e(r#"{"arguments":{"a":1,"a":2},"execute" 1}"#),
            "JSON parse error, duplicate key"
        );
        assert_eq!(
            e(r#"{"arguments":{"a":1},"execute" 1}"#),
            "JSON parse error, missing : in object pair"
        );
        // A duplicate inside a value before a bad escape in a later one.
        assert_eq!(
            e(r#"{"arguments":{"a":1,"a":2},"id":"\q"}"#),
            "JSON parse error, duplicate key"
        );
        assert_eq!(
            e(r#"{"id":"\q","arguments":{"a":1,"a":2}}"#),
            "JSON parse error, invalid escape sequence in string"
        );
    }

    #[test]
    fn pretty_output_is_compacted_like_qemus_compact_mode() {
        let pretty = "{\n    \"return\": {\n        \"status\": \"a b\\n\",\n        \"list\": [\n            1,\n            2\n        ],\n        \"e\": {\n        }\n    },\n    \"id\": 8\n}";
        assert_eq!(
            String::from_utf8(compact_pretty(pretty.as_bytes())).unwrap(),
            r#"{"return": {"status": "a b\n", "list": [1, 2], "e": {}}, "id": 8}"#
        );
        let compact = br#"{"return": {}, "id": "x  y"}"#;
        assert_eq!(compact_pretty(compact), compact.to_vec());
    }

    #[test]
    fn deep_nesting_within_qemu_limit_is_accepted() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(1000), "]".repeat(1000));
        assert!(members_checked(deep.as_bytes()).is_ok());
    }
}
