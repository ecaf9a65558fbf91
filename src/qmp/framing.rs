//! Streaming JSON framing, the way QEMU's `json-streamer` splits its input.
//!
//! QMP input is not line based: a message ends when the brace/bracket depth
//! returns to zero, wherever the newlines are. This codec finds message
//! boundaries in one pass over the bytes without building values, reproduces
//! QEMU's lexical errors and their recovery, and hands complete messages on
//! as [`Bytes`] for the (separate) parsing step.

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// One item of the input stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete top-level JSON text (object, array or scalar), not yet
    /// checked beyond its lexical shape.
    Message(Bytes),
    /// Input QEMU's parser would reject before building a value; the reply is
    /// an id-less GenericError with this text.
    Error(String),
    /// A size or nesting limit was exceeded: an id-less GenericError with
    /// QEMU's text, after which qmpmux stops reading this peer.
    Limit(String),
}

/// One step of the scanner.
enum Step {
    Frame(Frame),
    /// State changed without a frame (a discarded message ended): go on.
    Again,
    NeedMore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Str {
    None,
    Double,
    Single,
}

/// Limits applied while framing. QEMU's own are 64 MiB and 1024 levels.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message: usize,
    pub max_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message: 64 << 20,
            max_depth: 1024,
        }
    }
}

/// Decoder state; feed it a growing buffer, get frames out.
#[derive(Debug)]
pub struct JsonFramer {
    limits: Limits,
    /// Bytes of `src` already scanned as part of the current message.
    pos: usize,
    braces: i64,
    brackets: i64,
    string: Str,
    escape: bool,
    /// Offset of the opening quote of the current string (for error text).
    string_start: usize,
    /// Inside a bare top-level token (number or keyword).
    scalar: bool,
    /// The message uses single quotes or `\'`: normalise before parsing.
    needs_requote: bool,
    /// Skipping input after a lexical error, as QEMU's lexer does.
    recovering: bool,
    /// Too-large message being discarded up to its end.
    discarding: bool,
    /// The previous byte outside strings, and whether it began a token.
    prev: u8,
    prev_began: bool,
    /// The current number token is a lone `0` (or `-0`) so far.
    zero_number: bool,
    /// Saw `0e` inside this container (`{` or `[`); see [`Self::step`].
    zero_exponent: Option<u8>,
    /// Open containers, innermost last.
    containers: Vec<u8>,
}

impl JsonFramer {
    pub fn new(limits: Limits) -> Self {
        JsonFramer {
            limits,
            pos: 0,
            braces: 0,
            brackets: 0,
            string: Str::None,
            escape: false,
            string_start: 0,
            scalar: false,
            needs_requote: false,
            recovering: false,
            discarding: false,
            prev: b' ',
            prev_began: false,
            zero_number: false,
            zero_exponent: None,
            containers: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.pos = 0;
        self.braces = 0;
        self.brackets = 0;
        self.string = Str::None;
        self.escape = false;
        self.scalar = false;
        self.needs_requote = false;
        self.prev = b' ';
        self.prev_began = false;
        self.zero_number = false;
        self.zero_exponent = None;
        self.containers.clear();
    }

    fn depth(&self) -> i64 {
        self.braces + self.brackets
    }

    /// Takes the message that ends at `end` (exclusive) out of `src`.
    fn emit(&mut self, src: &mut BytesMut, end: usize) -> Step {
        let requote = self.needs_requote;
        let zero_exponent = self.zero_exponent;
        let discarding = std::mem::replace(&mut self.discarding, false);
        let raw = src.split_to(end);
        self.reset();
        if discarding {
            // Already reported when it grew too large.
            return Step::Again;
        }
        if let Some(container) = zero_exponent {
            let within = if container == b'{' { "dict" } else { "list" };
            return Step::Frame(Frame::Error(format!(
                "JSON parse error, expected separator in {within}"
            )));
        }
        if raw.len() > self.limits.max_message {
            // Arrived whole in one read, so never caught while growing.
            return Step::Frame(Frame::Limit("JSON token size limit exceeded".into()));
        }
        Step::Frame(if requote {
            Frame::Message(requote_single_quotes(&raw).into())
        } else {
            Frame::Message(raw.freeze())
        })
    }

    /// A lexical error at `at`: QEMU reports the token text so far, then
    /// skips to a resynchronisation point.
    fn lexical_error(&mut self, src: &mut BytesMut, at: usize) -> Step {
        let from = if self.string != Str::None {
            self.string_start
        } else {
            at
        };
        let token = String::from_utf8_lossy(&src[from..=at]).into_owned();
        let _ = src.split_to(at + 1);
        self.reset();
        self.discarding = false;
        self.recovering = true;
        Step::Frame(Frame::Error(format!("JSON parse error, stray '{token}'")))
    }

    fn too_deep(&mut self, src: &mut BytesMut, at: usize) -> Step {
        let _ = src.split_to(at + 1);
        self.reset();
        self.recovering = true;
        Step::Frame(Frame::Limit("JSON nesting depth limit exceeded".into()))
    }

    fn structural_error(&mut self, src: &mut BytesMut, at: usize) -> Step {
        let _ = src.split_to(at + 1);
        self.reset();
        Step::Frame(Frame::Error("JSON parse error, expecting value".into()))
    }

    /// Skips bytes after a lexical error until a byte QEMU resynchronises on.
    fn skip_recovery(&mut self, src: &mut BytesMut) {
        let n = src
            .iter()
            .position(|&b| matches!(b, b'{' | b'}' | b'[' | b']' | 0xFE | 0xFF) || (b < 0x20 && b != b'\t'))
            .unwrap_or(src.len());
        if n < src.len() {
            self.recovering = false;
        }
        let _ = src.split_to(n);
    }

    /// A message longer than allowed is reported as soon as it is, then
    /// dropped as it arrives (never buffered) until its end is found.
    fn check_size(&mut self, src: &mut BytesMut) -> Step {
        let mut step = Step::NeedMore;
        if self.pos > self.limits.max_message && !self.discarding {
            self.discarding = true;
            step = Step::Frame(Frame::Limit("JSON token size limit exceeded".into()));
        }
        if self.discarding && self.pos > 0 {
            let _ = src.split_to(self.pos);
            self.string_start = 0;
            self.pos = 0;
        }
        step
    }

    fn scan(&mut self, src: &mut BytesMut) -> Option<Frame> {
        loop {
            match self.step(src) {
                Step::Frame(f) => return Some(f),
                Step::Again => continue,
                Step::NeedMore => return None,
            }
        }
    }

    fn step(&mut self, src: &mut BytesMut) -> Step {
        if self.recovering {
            self.skip_recovery(src);
            if self.recovering {
                return Step::NeedMore;
            }
        }
        if self.pos == 0 && !self.discarding {
            let ws = src.iter().take_while(|b| is_ws(**b)).count();
            let _ = src.split_to(ws);
        }
        let mut i = self.pos;
        while i < src.len() {
            let b = src[i];
            if self.string != Str::None {
                if self.escape {
                    self.escape = false;
                    if b == b'\'' {
                        self.needs_requote = true;
                    }
                } else if b == b'\\' {
                    self.escape = true;
                } else if (b == b'"' && self.string == Str::Double) || (b == b'\'' && self.string == Str::Single) {
                    self.string = Str::None;
                    self.prev = b'"';
                    if self.depth() == 0 {
                        return self.emit(src, i + 1);
                    }
                } else if !(0x20..0xFE).contains(&b) {
                    return self.lexical_error(src, i);
                }
                i += 1;
                continue;
            }
            if self.scalar {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.') {
                    i += 1;
                    continue;
                }
                // The bare token ends before this byte, which is looked at again.
                return self.emit(src, i);
            }
            // QEMU's lexer ends a number at a leading `0` when `e` or `E`
            // follows: `0e0` is JSON but not QEMU's JSON. Reject it as QEMU
            // would, rather than forward what QEMU answers with an error
            // qmpmux could not attribute to any request.
            let began = !is_token_byte(self.prev);
            if self.zero_number && matches!(b, b'e' | b'E') {
                if b == b'E' {
                    return self.lexical_error(src, i);
                }
                let innermost = self.containers.last().copied().unwrap_or(b'{');
                self.zero_exponent.get_or_insert(innermost);
            }
            self.zero_number = b == b'0' && (began || (self.prev == b'-' && self.prev_began));
            self.prev_began = began;
            self.prev = b;
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'{' | b'[' => {
                    if b == b'{' {
                        self.braces += 1
                    } else {
                        self.brackets += 1
                    }
                    self.containers.push(b);
                    if self.depth() > i64::from(self.limits.max_depth) {
                        return self.too_deep(src, i);
                    }
                }
                b'}' | b']' => {
                    if b == b'}' {
                        self.braces -= 1
                    } else {
                        self.brackets -= 1
                    }
                    self.containers.pop();
                    if self.braces < 0 || self.brackets < 0 {
                        return self.structural_error(src, i);
                    }
                    if self.depth() == 0 {
                        return self.emit(src, i + 1);
                    }
                }
                b'"' | b'\'' => {
                    self.string = if b == b'"' { Str::Double } else { Str::Single };
                    self.needs_requote |= b == b'\'';
                    self.string_start = i;
                }
                b':' | b',' if self.depth() == 0 => {
                    return self.structural_error(src, i);
                }
                b':' | b',' => {}
                b'a'..=b'z' | b'0'..=b'9' | b'-' => {
                    if self.depth() == 0 {
                        self.scalar = true;
                    }
                }
                b'A'..=b'Z' | b'+' | b'.' if self.depth() > 0 => {}
                _ => return self.lexical_error(src, i),
            }
            i += 1;
        }
        self.pos = i;
        self.check_size(src)
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-')
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Rewrites QEMU's single-quoted strings (and `\'` escapes) as standard JSON.
fn requote_single_quotes(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 8);
    let mut string = Str::None;
    let mut escape = false;
    for &b in raw {
        match string {
            Str::None => {
                if b == b'\'' {
                    string = Str::Single;
                    out.push(b'"');
                } else {
                    if b == b'"' {
                        string = Str::Double;
                    }
                    out.push(b);
                }
            }
            _ if escape => {
                escape = false;
                if b != b'\'' {
                    out.push(b'\\');
                }
                out.push(b);
            }
            _ if b == b'\\' => escape = true,
            Str::Single if b == b'\'' => {
                string = Str::None;
                out.push(b'"');
            }
            Str::Single if b == b'"' => out.extend_from_slice(b"\\\""),
            Str::Double if b == b'"' => {
                string = Str::None;
                out.push(b);
            }
            _ => out.push(b),
        }
    }
    out
}

impl Decoder for JsonFramer {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        Ok(self.scan(src))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        if let Some(frame) = self.scan(src) {
            return Ok(Some(frame));
        }
        if self.scalar && !src.is_empty() {
            let end = src.len();
            if let Step::Frame(f) = self.emit(src, end) {
                return Ok(Some(f));
            }
        }
        // A partial message at EOF is discarded, as QEMU does.
        src.clear();
        self.reset();
        self.discarding = false;
        self.recovering = false;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(limits: Limits, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut f = JsonFramer::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for c in chunks {
            buf.extend_from_slice(c);
            while let Some(fr) = f.decode(&mut buf).unwrap() {
                out.push(fr);
            }
        }
        while let Some(fr) = f.decode_eof(&mut buf).unwrap() {
            out.push(fr);
        }
        out
    }

    fn msg(s: &str) -> Frame {
        Frame::Message(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn err(s: &str) -> Frame {
        Frame::Error(s.to_string())
    }

    #[test]
    fn several_per_line_and_no_newline() {
        let out = frames(Limits::default(), &[b"{\"a\":1}{\"b\":[2]} {\"c\":3}"]);
        assert_eq!(out, vec![msg("{\"a\":1}"), msg("{\"b\":[2]}"), msg("{\"c\":3}")]);
    }

    #[test]
    fn one_message_over_lines_and_chunks() {
        let out = frames(
            Limits::default(),
            &[b"{\n \"exe", b"cute\": \"x\",\n", b"\"id\": \"}{\"\n}\r\n"],
        );
        assert_eq!(out, vec![msg("{\n \"execute\": \"x\",\n\"id\": \"}{\"\n}")]);
    }

    #[test]
    fn every_split_point_gives_the_same_frames() {
        let input: &[u8] = b" {\"a\":\"x\\\"}\"} [1,{\"b\":[]}]\n{'c':'d\\'e'}5 ";
        let whole = frames(Limits::default(), &[input]);
        assert_eq!(whole.len(), 4);
        for cut in 0..input.len() {
            assert_eq!(
                frames(Limits::default(), &[&input[..cut], &input[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn escaped_quotes_and_brackets_inside_strings() {
        let out = frames(Limits::default(), &[br#"{"a":"\\"}{"b":"]}\""}"#]);
        assert_eq!(out, vec![msg(r#"{"a":"\\"}"#), msg(r#"{"b":"]}\""}"#)]);
    }

    #[test]
    fn single_quotes_are_requoted() {
        let out = frames(Limits::default(), &[br#"{'execute':'x', 'id':'a"b\'c', "k":"it\'s"}"#]);
        assert_eq!(out, vec![msg(r#"{"execute":"x", "id":"a\"b'c", "k":"it's"}"#)]);
    }

    #[test]
    fn stray_byte_reports_and_recovers_like_qemu() {
        // QEMU: stray '@', then the `}` is a token of its own: expecting value.
        let out = frames(Limits::default(), &[b"{\"a\":1 @ }{\"b\":2}"]);
        assert_eq!(
            out,
            vec![
                err("JSON parse error, stray '@'"),
                err("JSON parse error, expecting value"),
                msg("{\"b\":2}")
            ]
        );
    }

    #[test]
    fn control_char_in_string_reports_the_token() {
        let out = frames(Limits::default(), &[b"{\"a\":\"x\x01\"}"]);
        assert_eq!(
            out,
            vec![
                err("JSON parse error, stray '\"x\u{1}'"),
                err("JSON parse error, expecting value")
            ]
        );
    }

    #[test]
    fn escape_byte_resets_a_partial_message() {
        let out = frames(Limits::default(), &[b"{\"execute\": \x1b{\"a\":1}"]);
        assert_eq!(out, vec![err("JSON parse error, stray '\u{1b}'"), msg("{\"a\":1}")]);
    }

    #[test]
    fn unbalanced_close_is_an_error() {
        assert_eq!(
            frames(Limits::default(), &[b"}"]),
            vec![err("JSON parse error, expecting value")]
        );
        assert_eq!(
            frames(Limits::default(), &[b"[}"]),
            vec![err("JSON parse error, expecting value")]
        );
    }

    #[test]
    fn top_level_scalars_are_frames() {
        let out = frames(Limits::default(), &[b"5 \"s\" [1]"]);
        assert_eq!(out, vec![msg("5"), msg("\"s\""), msg("[1]")]);
    }

    #[test]
    fn depth_limit() {
        let limits = Limits {
            max_message: 1 << 20,
            max_depth: 3,
        };
        let out = frames(limits, &[b"[[[1]]] [[[[1]]]]{\"a\":1}"]);
        assert_eq!(out[0], msg("[[[1]]]"));
        assert_eq!(out[1], Frame::Limit("JSON nesting depth limit exceeded".into()));
        assert_eq!(out.last(), Some(&msg("{\"a\":1}")));
    }

    #[test]
    fn size_limit_discards_without_buffering_and_resyncs() {
        let limits = Limits {
            max_message: 16,
            max_depth: 10,
        };
        let mut f = JsonFramer::new(limits);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"{\"a\":\"");
        buf.extend_from_slice(&[b'x'; 100]);
        // Reported as soon as it is too large, not when (if ever) it ends.
        assert_eq!(
            f.decode(&mut buf).unwrap(),
            Some(Frame::Limit("JSON token size limit exceeded".into()))
        );
        for _ in 0..100 {
            buf.extend_from_slice(&[b'x'; 100]);
            assert_eq!(f.decode(&mut buf).unwrap(), None);
            assert!(buf.len() <= 200, "buffer grew to {}", buf.len());
        }
        buf.extend_from_slice(b"\"}{\"b\":1}");
        assert_eq!(f.decode(&mut buf).unwrap(), Some(msg("{\"b\":1}")));
    }

    #[test]
    fn size_limit_applies_to_a_message_that_arrives_whole() {
        let limits = Limits {
            max_message: 16,
            max_depth: 10,
        };
        let out = frames(limits, &[b"{\"a\":\"0123456789012345678\"}{\"b\":1}"]);
        assert_eq!(
            out,
            vec![Frame::Limit("JSON token size limit exceeded".into()), msg("{\"b\":1}")]
        );
    }

    #[test]
    fn zero_with_exponent_is_refused_as_qemu_does() {
        let out = frames(
            Limits::default(),
            &[b"{\"id\":0e0}{\"a\":[-0e1]}{\"b\":10e1,\"c\":0.5e1,\"d\":\"0e0\"}"],
        );
        assert_eq!(
            out,
            vec![
                err("JSON parse error, expected separator in dict"),
                err("JSON parse error, expected separator in list"),
                msg("{\"b\":10e1,\"c\":0.5e1,\"d\":\"0e0\"}"),
            ]
        );
        let out = frames(Limits::default(), &[b"{\"id\":0E1}"]);
        assert_eq!(
            out,
            vec![
                err("JSON parse error, stray 'E'"),
                err("JSON parse error, expecting value")
            ]
        );
    }

    #[test]
    fn partial_message_at_eof_is_dropped() {
        assert_eq!(frames(Limits::default(), &[b"{\"a\":1}{\"b\""]), vec![msg("{\"a\":1}")]);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[ -~]{0,12}".prop_map(Value::String),
            "\\PC{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::btree_map("[a-z{}\\[\\]\"\\\\ ]{0,6}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn objects() -> impl Strategy<Value = Vec<Value>> {
        prop::collection::vec(
            prop::collection::btree_map("[a-z]{1,5}", json_value(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            1..6,
        )
    }

    proptest! {
        /// Whatever the whitespace and however the bytes are split into
        /// reads, the framer yields exactly the messages that were sent.
        #[test]
        fn any_messages_any_chunking(msgs in objects(), pretty in any::<bool>(), cuts in prop::collection::vec(0usize..400, 0..8)) {
            let mut wire = Vec::new();
            for m in &msgs {
                let text = if pretty { serde_json::to_string_pretty(m).unwrap() } else { serde_json::to_string(m).unwrap() };
                wire.extend_from_slice(text.as_bytes());
                wire.extend_from_slice(if pretty { b"\r\n" } else { b"" });
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            let mut framer = JsonFramer::new(Limits::default());
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut last = 0;
            for c in cuts.into_iter().chain([wire.len()]) {
                buf.extend_from_slice(&wire[last..c]);
                last = c;
                while let Some(f) = framer.decode(&mut buf).unwrap() {
                    match f {
                        Frame::Message(b) => got.push(serde_json::from_slice::<Value>(&b).unwrap()),
                        other => prop_assert!(false, "unexpected {:?}", other),
                    }
                }
            }
            prop_assert_eq!(got, msgs);
        }

        /// Arbitrary bytes never panic, and the buffer never holds more
        /// than the size limit plus one read.
        #[test]
        fn arbitrary_bytes_are_safe_and_bounded(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let limits = Limits { max_message: 256, max_depth: 8 };
            let mut framer = JsonFramer::new(limits);
            let mut buf = BytesMut::new();
            for c in chunks {
                buf.extend_from_slice(&c);
                while let Some(f) = framer.decode(&mut buf).unwrap() {
                    if let Frame::Message(m) = f {
                        prop_assert!(m.len() <= 256 + 300);
                        // Whatever is framed, request handling copes with it.
                        let mut s = crate::qmp::request::Session::default();
                        let _ = crate::qmp::request::decide(Frame::Message(m), &mut s, Default::default(), &Default::default());
                    }
                }
                prop_assert!(buf.len() <= 256 + 300 + 1, "buffer {}", buf.len());
            }
        }
    }
}
