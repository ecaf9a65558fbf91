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
    /// The message uses single quotes or `\'`: normalise before parsing.
    needs_requote: bool,
    /// Skipping input after a lexical error, as QEMU's lexer does.
    recovering: bool,
    /// Too-large message being discarded up to its end.
    discarding: bool,
    /// The number or keyword being lexed, and where it began.
    tok: Tok,
    tok_start: usize,
    /// The current string has a `\u` escape (checked when it ends).
    string_has_u: bool,
    /// The message holds QEMU's two-byte NUL (0xC0 0x80) in a string.
    overlong_nul: bool,
    /// The first error QEMU's parser would report for this message, found
    /// while framing (where serde_json's judgement differs from QEMU's).
    problem: Option<(usize, String)>,
    /// Open containers, innermost last, with what each expects next.
    containers: Vec<(u8, Phase)>,
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
            needs_requote: false,
            recovering: false,
            discarding: false,
            tok: Tok::None,
            tok_start: 0,
            string_has_u: false,
            overlong_nul: false,
            problem: None,
            containers: Vec::new(),
        }
    }

    fn reset(&mut self) {
        self.pos = 0;
        self.braces = 0;
        self.brackets = 0;
        self.string = Str::None;
        self.escape = false;
        self.needs_requote = false;
        self.tok = Tok::None;
        self.tok_start = 0;
        self.string_has_u = false;
        self.overlong_nul = false;
        self.problem = None;
        self.containers.clear();
    }

    fn depth(&self) -> i64 {
        self.braces + self.brackets
    }

    /// Takes the message that ends at `end` (exclusive) out of `src`.
    fn emit(&mut self, src: &mut BytesMut, end: usize) -> Step {
        let requote = self.needs_requote;
        let problem = self.problem.take();
        let overlong_nul = self.overlong_nul;
        let discarding = std::mem::replace(&mut self.discarding, false);
        let raw = src.split_to(end);
        self.reset();
        if discarding {
            // Already reported when it grew too large.
            return Step::Again;
        }
        if let Some((at, problem)) = problem {
            // Unless a standard parser fails earlier: then that error is
            // the first QEMU's parser meets too, and request handling
            // reports it.
            if crate::qmp::json::syntax_error_offset(&raw).is_none_or(|off| off >= at) {
                return Step::Frame(Frame::Error(format!("JSON parse error, {problem}")));
            }
        }
        if raw.len() > self.limits.max_message {
            // Arrived whole in one read, so never caught while growing.
            return Step::Frame(Frame::Limit("JSON token size limit exceeded".into()));
        }
        let raw = if overlong_nul { replace_overlong_nul(&raw) } else { raw };
        Step::Frame(if requote {
            Frame::Message(requote_single_quotes(&raw).into())
        } else {
            Frame::Message(raw.freeze())
        })
    }

    /// A lexical error at `at` in the token that began at `from`: QEMU
    /// reports the token text so far, then skips to a resynchronisation
    /// point.
    fn lexical_error_from(&mut self, src: &mut BytesMut, from: usize, at: usize) -> Step {
        let token = String::from_utf8_lossy(&src[from.min(at)..=at]).into_owned();
        let _ = src.split_to(at + 1);
        self.reset();
        self.discarding = false;
        self.recovering = true;
        Step::Frame(Frame::Error(format!("JSON parse error, stray '{token}'")))
    }

    /// A number or keyword ended before `end`.
    fn end_token(&mut self, src: &BytesMut, end: usize) {
        if self.tok == Tok::Keyword && self.problem.is_none() {
            let word = &src[self.tok_start..end];
            if !matches!(word, b"true" | b"false" | b"null") {
                let text = format!("invalid keyword '{}'", String::from_utf8_lossy(word));
                self.problem = Some((self.tok_start, text));
            }
        }
        self.tok = Tok::None;
    }

    /// A value (or key) begins at `at`: where QEMU's parser wants a `:` or
    /// a `,` instead, note its complaint.
    fn value_start(&mut self, at: usize, string: bool) {
        let Some((container, phase)) = self.containers.last_mut() else {
            return;
        };
        let in_list = *container == b'[';
        let complaint = match *phase {
            Phase::Key if string => {
                *phase = Phase::Colon;
                None
            }
            Phase::Key | Phase::Value => {
                *phase = Phase::Comma;
                None
            }
            Phase::Colon => Some("missing : in object pair"),
            Phase::Comma if in_list => Some("expected separator in list"),
            Phase::Comma => Some("expected separator in dict"),
        };
        if let Some(text) = complaint {
            self.problem.get_or_insert((at, text.to_string()));
        }
    }

    fn separator(&mut self, b: u8) {
        if let Some((c, phase)) = self.containers.last_mut() {
            *phase = match (b, *c, *phase) {
                (b':', b'{', Phase::Colon) => Phase::Value,
                (b',', b'{', Phase::Comma) => Phase::Key,
                (b',', b'[', Phase::Comma) => Phase::Value,
                // Misplaced: the standard parser reports it.
                (_, _, p) => p,
            };
        }
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
            self.tok_start = 0;
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
            if self.string != Str::None && !self.escape {
                // Most of a message is plain string content: skip it at once.
                i += plain_string_bytes(&src[i..], self.string);
                if i == src.len() {
                    break;
                }
            }
            let b = src[i];
            if self.string != Str::None {
                if self.escape {
                    self.escape = false;
                    if b == b'\'' {
                        self.needs_requote = true;
                    }
                    self.string_has_u |= b == b'u';
                } else if b == b'\\' {
                    self.escape = true;
                } else if (b == b'"' && self.string == Str::Double) || (b == b'\'' && self.string == Str::Single) {
                    self.string = Str::None;
                    if self.string_has_u && self.problem.is_none() {
                        let at = self.string_start;
                        self.problem = check_u_escapes(&src[at..=i]).map(|p| (at, p));
                    }
                    if self.depth() == 0 {
                        return self.emit(src, i + 1);
                    }
                } else if !(0x20..0xFE).contains(&b) {
                    let from = self.string_start;
                    return self.lexical_error_from(src, from, i);
                } else if b == 0x80 && i > 0 && src[i - 1] == 0xC0 {
                    // QEMU's "modified UTF-8" NUL: accepted, as U+0000.
                    self.overlong_nul = true;
                }
                i += 1;
                continue;
            }
            if self.tok != Tok::None {
                match self.tok.next(b) {
                    Next::Stay(t) => {
                        self.tok = t;
                        i += 1;
                        continue;
                    }
                    Next::End => {
                        self.end_token(src, i);
                        if self.depth() == 0 {
                            // A bare top-level token is a message of its own.
                            return self.emit(src, i);
                        }
                        // This byte starts afresh.
                    }
                    Next::Error => {
                        let from = self.tok_start;
                        return self.lexical_error_from(src, from, i);
                    }
                }
            }
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'{' | b'[' => {
                    self.value_start(i, false);
                    if b == b'{' {
                        self.braces += 1
                    } else {
                        self.brackets += 1
                    }
                    self.containers
                        .push((b, if b == b'{' { Phase::Key } else { Phase::Value }));
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
                    self.value_start(i, true);
                    self.string = if b == b'"' { Str::Double } else { Str::Single };
                    self.needs_requote |= b == b'\'';
                    self.string_start = i;
                    self.string_has_u = false;
                }
                b':' | b',' if self.depth() == 0 => {
                    return self.structural_error(src, i);
                }
                b':' | b',' => self.separator(b),
                b'0' | b'1'..=b'9' | b'-' | b'a'..=b'z' => {
                    self.value_start(i, false);
                    self.tok = Tok::start(b);
                    self.tok_start = i;
                }
                _ => return self.lexical_error_from(src, i, i),
            }
            i += 1;
        }
        self.pos = i;
        self.check_size(src)
    }
}

/// How many bytes at the start of `rest`, inside a string quoted as
/// `string`, change nothing in the scanner's state: printable ASCII other
/// than the backslash and the closing quote. The byte after them (if any)
/// needs the byte-by-byte rules.
fn plain_string_bytes(rest: &[u8], string: Str) -> usize {
    let quote = if string == Str::Single { b'\'' } else { b'"' };
    rest.iter()
        .position(|&c| c == quote || c == b'\\' || !(0x20..0x80).contains(&c))
        .unwrap_or(rest.len())
}

/// What a container expects next, as QEMU's parser sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Key,
    Colon,
    Value,
    Comma,
}

/// QEMU's lexer states for numbers and keywords (`qobject/json-lexer.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    None,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

enum Next {
    Stay(Tok),
    /// The token is complete; the byte is looked at again from the start.
    End,
    Error,
}

impl Tok {
    fn start(b: u8) -> Tok {
        match b {
            b'0' => Tok::Zero,
            b'1'..=b'9' => Tok::Digits,
            b'-' => Tok::Sign,
            _ => Tok::Keyword,
        }
    }

    fn next(self, b: u8) -> Next {
        use Tok::*;
        let digit = b.is_ascii_digit();
        // A complete token ends at any other ASCII byte; a byte >= 0x80
        // right after one is an error, as in QEMU.
        let end = if b < 0x80 { Next::End } else { Next::Error };
        match self {
            Zero if digit => Next::Error,
            Zero if b == b'.' => Next::Stay(Mantissa),
            // No exponent after a lone zero: QEMU ends the number there, so
            // `0e0` is `0` then the keyword `e0` (JSON would say 0.0).
            Zero => end,
            Sign if b == b'0' => Next::Stay(Zero),
            Sign if digit => Next::Stay(Digits),
            Digits if digit => Next::Stay(Digits),
            Digits | MantissaDigits if matches!(b, b'e' | b'E') => Next::Stay(ExpE),
            Digits if b == b'.' => Next::Stay(Mantissa),
            Digits => end,
            Mantissa if digit => Next::Stay(MantissaDigits),
            MantissaDigits if digit => Next::Stay(MantissaDigits),
            MantissaDigits => end,
            ExpE if matches!(b, b'+' | b'-') => Next::Stay(ExpSign),
            ExpE | ExpSign | ExpDigits if digit => Next::Stay(ExpDigits),
            ExpDigits => end,
            Keyword if b.is_ascii_lowercase() => Next::Stay(Keyword),
            Keyword => end,
            _ => Next::Error,
        }
    }
}

/// QEMU's check of `\u` escapes in one string token (quotes included):
/// the first invalid one, as its parser words it.
fn check_u_escapes(tok: &[u8]) -> Option<String> {
    let hex4 = |at: usize| -> Option<u32> {
        let s = tok.get(at..at + 4)?;
        std::str::from_utf8(s)
            .ok()
            .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))?;
        u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
    };
    let mut i = 1;
    while i + 1 < tok.len() {
        if tok[i] != b'\\' {
            i += 1;
            continue;
        }
        if tok[i + 1] != b'u' {
            i += 2;
            continue;
        }
        let beg = i;
        let mut end = i + 6;
        let mut cp = hex4(i + 2).map(i64::from).unwrap_or(-1);
        if (0xD800..=0xDBFF).contains(&cp) && tok.get(end) == Some(&b'\\') && tok.get(end + 1) == Some(&b'u') {
            match hex4(end + 2) {
                Some(t) if (0xDC00..=0xDFFF).contains(&t) => end += 6,
                _ => cp = -1,
            }
        } else if (0xD800..=0xDFFF).contains(&cp) {
            cp = -1;
        }
        if cp < 0 {
            let text = String::from_utf8_lossy(&tok[beg..end.min(tok.len())]);
            return Some(format!("{text} is not a valid Unicode character"));
        }
        i = end;
    }
    None
}

/// QEMU accepts 0xC0 0x80 in strings as U+0000; standard JSON parsers do
/// not. Rewritten as `\u0000`, which means the same.
fn replace_overlong_nul(raw: &[u8]) -> BytesMut {
    let mut out = BytesMut::with_capacity(raw.len() + 8);
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == 0xC0 && raw.get(i + 1) == Some(&0x80) {
            out.extend_from_slice(b"\\u0000");
            i += 2;
        } else {
            out.extend_from_slice(&raw[i..=i]);
            i += 1;
        }
    }
    out
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
        if self.tok != Tok::None && self.depth() == 0 && !src.is_empty() {
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
#[path = "framing_tests.rs"]
mod tests;
