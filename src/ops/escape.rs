//! Text that clients, guests or QEMU control, made safe to show people:
//! in text logs (through [`crate::ops::logging::TextFields`]) and in
//! `qmpmux status`. A lease reason, a command name, a TLS subject or a
//! QEMU error can hold a newline (a forged log line), a quote (a forged
//! field) or a terminal escape sequence (ESC, BEL, CSI): none of them may
//! reach the reader as it is.
//!
//! The escapes are JSON's (`\"`, `\\`, `\n`, `\r`, `\t`, `\u001b`), so a
//! quoted value is a JSON string literal any JSON parser reads back.

use serde::Serialize;
use std::fmt::{self, Write};

/// Whether `c` must not be shown as it is: control characters (C0, DEL,
/// C1), and the invisible characters that reorder or break what a
/// terminal shows (bidirectional overrides and isolates, line and
/// paragraph separators, the byte order mark).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}')
}

/// Writes `s` with `"`, `\` and every [`is_unsafe`] character escaped as
/// in JSON, without surrounding quotes.
pub fn write_escaped(out: &mut impl Write, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some(i) = rest.find(|c: char| c == '"' || c == '\\' || is_unsafe(c)) {
        out.write_str(&rest[..i])?;
        let c = rest[i..].chars().next().unwrap_or_default();
        match c {
            '"' => out.write_str("\\\"")?,
            '\\' => out.write_str("\\\\")?,
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c => write!(out, "\\u{:04x}", c as u32)?,
        }
        rest = &rest[i + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// Writes `s` in double quotes, escaped: a JSON string.
pub fn write_quoted(out: &mut impl Write, s: &str) -> fmt::Result {
    out.write_char('"')?;
    write_escaped(out, s)?;
    out.write_char('"')
}

/// `s` escaped (see [`write_escaped`]), for a column or a sentence.
pub fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let _ = write_escaped(&mut out, s);
    out
}

/// `s` in double quotes, escaped.
pub fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    let _ = write_quoted(&mut out, s);
    out
}

/// Whether `s` can be a log field's value without quotes: one word of
/// visible characters, no quote or backslash.
pub fn is_word(s: &str) -> bool {
    !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '\\' || is_unsafe(c))
}

/// Whether a log message can be shown without quotes: no quote,
/// backslash, `=` (which would read as a field) or unsafe character, and
/// no blank at either end.
pub fn is_plain_message(s: &str) -> bool {
    !s.chars().any(|c| c == '"' || c == '\\' || c == '=' || is_unsafe(c)) && s.trim() == s
}

/// `value` as JSON (pretty with `pretty`) in which every [`is_unsafe`]
/// character is escaped, also those JSON allows raw (DEL, C1, bidi
/// controls): for terminals.
pub fn to_json<T: Serialize + ?Sized>(value: &T, pretty: bool) -> String {
    fn with<F: serde_json::ser::Formatter, T: Serialize + ?Sized>(value: &T, f: F) -> String {
        let mut out = Vec::new();
        let _ = value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, Escaping(f)));
        String::from_utf8(out).unwrap_or_default()
    }
    if pretty {
        with(value, serde_json::ser::PrettyFormatter::new())
    } else {
        with(value, serde_json::ser::CompactFormatter)
    }
}

/// A JSON formatter that escapes the [`is_unsafe`] characters serde_json
/// leaves raw, around one that lays the document out.
struct Escaping<F>(F);

impl<F: serde_json::ser::Formatter> serde_json::ser::Formatter for Escaping<F> {
    fn write_string_fragment<W: ?Sized + std::io::Write>(&mut self, w: &mut W, fragment: &str) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some(i) = rest.find(is_unsafe) {
            w.write_all(&rest.as_bytes()[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            write!(w, "\\u{:04x}", c as u32)?;
            rest = &rest[i + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }

    // The layout is the inner formatter's.
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.0.end_object_value(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str =
        "ok\"\n2026-12-06T00:00:00Z  INFO qmpmux::audit: command=\"quit\"\u{1b}[2J\u{7}\r\t\\\u{7f}\u{9b}\u{202e}";

    #[test]
    fn quoted_text_is_one_line_of_visible_characters_and_reads_back() {
        let q = quoted(HOSTILE);
        assert!(!q.chars().any(is_unsafe), "{q}");
        let back: String = serde_json::from_str(&q).unwrap();
        assert_eq!(back, HOSTILE);
        assert_eq!(quoted("migration to host7"), "\"migration to host7\"");
        assert_eq!(escaped("a \"b\""), "a \\\"b\\\"");
        assert_eq!(escaped("plain é"), "plain é");
    }

    #[test]
    fn words_and_plain_messages() {
        assert!(is_word("web01") && is_word("/run/qmpmux/a.sock") && is_word("a=b"));
        assert!(!is_word("") && !is_word("a b") && !is_word("\"a\"") && !is_word("a\u{1b}"));
        assert!(is_plain_message("client refused: too many; closing"));
        assert!(!is_plain_message("x command=quit") && !is_plain_message("a\nb"));
        assert!(!is_plain_message(" padded") && !is_plain_message("say \"hi\""));
    }

    #[test]
    fn json_escapes_what_serde_json_leaves_raw() {
        let v = serde_json::json!({ "reason": HOSTILE });
        for pretty in [false, true] {
            let text = to_json(&v, pretty);
            assert!(!text.chars().any(|c| is_unsafe(c) && c != '\n'), "{text}");
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, v);
        }
        assert_eq!(to_json(&v, true).lines().count(), 3);
    }
}
