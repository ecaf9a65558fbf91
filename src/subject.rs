//! Client certificate subjects as identities: printed with RFC 4514
//! escaping, so that one string names one subject, and matched attribute by
//! attribute, so that a pattern never reaches across attribute boundaries.
//!
//! A subject is printed in the certificate's order, RDNs joined by `, `
//! and the attributes of a multi-valued RDN by ` + `. Types are RFC 4514's
//! short names (`CN`, `L`, `ST`, `O`, `OU`, `C`, `STREET`, `DC`, `UID`),
//! any other type its dotted OID. A value is its string, with `,` `+` `"`
//! `\` `<` `>` `;` (and a leading `#` or space, a trailing space) escaped by
//! a backslash and control characters as `\HH`; a value that is not a
//! string (and every value of a type given as an OID) is `#` followed by the
//! hex of its DER encoding.
//!
//! A pattern is `TYPE=VALUE` terms separated by `,` or `+`. It matches a
//! subject when, for each term, the subject has an attribute of that type
//! and every attribute of that type matches the value, whole: `*` stands for
//! any run of characters and `?` for one, both within the one value; `\`
//! escapes as in RFC 4514 (plus `\*` and `\?` for literal ones). Attributes
//! of types the pattern does not name are not looked at.

use std::fmt;

/// Attribute types with RFC 4514 short names, by dotted OID.
const SHORT_NAMES: [(&str, &str); 9] = [
    ("2.5.4.3", "CN"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.6", "C"),
    ("2.5.4.9", "STREET"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
];

/// An attribute's value: text, or (not a string, or of a type without a
/// short name) the DER encoding, printed `#hex`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Der(Vec<u8>),
}

/// One attribute of a subject, its type as printed (`CN`, or a dotted OID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub kind: String,
    pub value: Value,
}

/// A certificate subject: RDNs in the certificate's order, each a set of
/// attributes (nearly always one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject(pub Vec<Vec<Attribute>>);

impl Attribute {
    /// The attribute of type `oid` (dotted) whose value is `text` if it is
    /// a string, else whose DER encoding is `der`.
    pub fn new(oid: &str, text: Option<String>, der: impl FnOnce() -> Vec<u8>) -> Attribute {
        match (short_name(oid), text) {
            (Some(kind), Some(text)) => Attribute {
                kind: kind.into(),
                value: Value::Text(text),
            },
            (kind, _) => Attribute {
                kind: kind.unwrap_or(oid).into(),
                value: Value::Der(der()),
            },
        }
    }
}

fn short_name(oid: &str) -> Option<&'static str> {
    SHORT_NAMES.iter().find(|(o, _)| *o == oid).map(|(_, n)| *n)
}

/// `value` escaped per RFC 4514 section 2.4.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => out.push('\\'),
            '#' if i == 0 => out.push('\\'),
            ' ' if i == 0 || i == last => out.push('\\'),
            '\0'..='\x1f' | '\x7f' => {
                out.push_str(&format!("\\{:02X}", c as u32));
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Attribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Value::Text(t) => write!(f, "{}={}", self.kind, escape(t)),
            Value::Der(d) => {
                write!(f, "{}=#", self.kind)?;
                d.iter().try_for_each(|b| write!(f, "{b:02X}"))
            }
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, rdn) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            for (j, attr) in rdn.iter().enumerate() {
                if j > 0 {
                    f.write_str(" + ")?;
                }
                write!(f, "{attr}")?;
            }
        }
        Ok(())
    }
}

/// One piece of a value pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Char(char),
    Any,
    One,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ValuePattern {
    Text(Vec<Tok>),
    /// `#hex`: exactly this DER encoding.
    Der(Vec<u8>),
}

/// A `subjects` entry, see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPattern {
    source: String,
    terms: Vec<(String, ValuePattern)>,
}

impl SubjectPattern {
    /// Parses a pattern; the error says what is wrong, for config messages.
    pub fn parse(source: &str) -> Result<SubjectPattern, String> {
        let mut terms: Vec<(String, ValuePattern)> = Vec::new();
        let mut rest = source;
        loop {
            let (term, after) = split_term(rest)?;
            let (kind, value) = parse_term(term)?;
            if terms.iter().any(|(k, _)| *k == kind) {
                return Err(format!("{source:?}: names {kind} twice"));
            }
            terms.push((kind, value));
            match after {
                Some(after) => rest = after,
                None => break,
            }
        }
        Ok(SubjectPattern {
            source: source.to_owned(),
            terms,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, subject: &Subject) -> bool {
        self.terms.iter().all(|(kind, pattern)| {
            let mut of_kind = subject.0.iter().flatten().filter(|a| a.kind == *kind).peekable();
            of_kind.peek().is_some() && of_kind.all(|a| value_matches(pattern, &a.value))
        })
    }
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The first term of `s` (up to an unescaped `,` or `+`) and what follows
/// the separator, if there is one.
fn split_term(s: &str) -> Result<(&str, Option<&str>), String> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' | '+' => return Ok((&s[..i], Some(&s[i + 1..]))),
            _ => {}
        }
    }
    Ok((s, None))
}

fn parse_term(term: &str) -> Result<(String, ValuePattern), String> {
    let Some((kind, value)) = term.split_once('=') else {
        return Err(format!("{:?}: expected TYPE=VALUE, e.g. CN=orchestrator", term.trim()));
    };
    let kind = canonical_kind(kind.trim())?;
    let value = value.trim_start_matches(' ');
    if let Some(hex) = value.strip_prefix('#') {
        let der = parse_hex(hex.trim_end_matches(' '))
            .ok_or_else(|| format!("{kind}: `#` starts a hex DER value; write \\# for a literal #"))?;
        return Ok((kind, ValuePattern::Der(der)));
    }
    let text = parse_text(value).map_err(|e| format!("{kind}: {e}"))?;
    Ok((kind, ValuePattern::Text(text)))
}

/// A type as the subject prints it: a short name in capitals, or an OID.
fn canonical_kind(kind: &str) -> Result<String, String> {
    if let Some((_, name)) = SHORT_NAMES.iter().find(|(_, n)| n.eq_ignore_ascii_case(kind)) {
        return Ok((*name).to_owned());
    }
    let is_oid = !kind.is_empty()
        && kind.split('.').count() >= 2
        && kind
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    match (is_oid, short_name(kind)) {
        (true, Some(name)) => Ok(name.to_owned()),
        (true, None) => Ok(kind.to_owned()),
        (false, _) => Err(format!(
            "{kind:?} is not an attribute type: write TYPE=VALUE terms, TYPE one of CN, L, ST, O, OU, C, \
             STREET, DC, UID or a dotted OID, and wildcards only in VALUE (e.g. CN=orchestrator)"
        )),
    }
}

fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A text value pattern: unescaped `*`/`?` are wildcards, unescaped
/// trailing spaces are dropped, `\HH` sequences are UTF-8 bytes.
fn parse_text(value: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    // Unescaped spaces at the end are not part of the value.
    let mut trailing = 0;
    let mut chars = value.chars().peekable();
    let flush = |bytes: &mut Vec<u8>, toks: &mut Vec<Tok>| -> Result<(), String> {
        if !bytes.is_empty() {
            let s = String::from_utf8(std::mem::take(bytes)).map_err(|_| "\\HH escapes are not UTF-8")?;
            toks.extend(s.chars().map(Tok::Char));
        }
        Ok(())
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            flush(&mut bytes, &mut toks)?;
            trailing = if c == ' ' { trailing + 1 } else { 0 };
            toks.push(match c {
                '*' => Tok::Any,
                '?' => Tok::One,
                c => Tok::Char(c),
            });
            continue;
        }
        trailing = 0;
        let Some(e) = chars.next() else {
            return Err("ends with a lone backslash".into());
        };
        if e.is_ascii_hexdigit() {
            let Some(lo) = chars.next().filter(char::is_ascii_hexdigit) else {
                return Err(format!("\\{e} is neither an escaped character nor two hex digits"));
            };
            bytes.push(u8::from_str_radix(&format!("{e}{lo}"), 16).map_err(|e| e.to_string())?);
            continue;
        }
        flush(&mut bytes, &mut toks)?;
        toks.push(Tok::Char(e));
    }
    flush(&mut bytes, &mut toks)?;
    toks.truncate(toks.len() - trailing);
    if toks.is_empty() {
        return Err("the value is empty".into());
    }
    Ok(toks)
}

fn value_matches(pattern: &ValuePattern, value: &Value) -> bool {
    match (pattern, value) {
        (ValuePattern::Der(p), Value::Der(v)) => p == v,
        (ValuePattern::Text(p), Value::Text(v)) => {
            let v: Vec<char> = v.chars().collect();
            glob(p, &v)
        }
        _ => false,
    }
}

/// Wildcard matching over a value's characters ([`crate::wildcard`]).
fn glob(p: &[Tok], s: &[char]) -> bool {
    use crate::wildcard::{matches, Pat};
    matches(p, s, |t| match t {
        Tok::Any => Pat::Any,
        Tok::One => Pat::One,
        Tok::Char(c) => Pat::Lit(c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(kind: &str, v: &str) -> Attribute {
        Attribute {
            kind: kind.into(),
            value: Value::Text(v.into()),
        }
    }

    fn subject(rdns: &[&[(&str, &str)]]) -> Subject {
        Subject(
            rdns.iter()
                .map(|rdn| rdn.iter().map(|(k, v)| text(k, v)).collect())
                .collect(),
        )
    }

    fn pat(p: &str) -> SubjectPattern {
        SubjectPattern::parse(p).unwrap()
    }

    #[test]
    fn escaping_follows_rfc_4514() {
        assert_eq!(escape("Example, CN=orchestrator"), "Example\\, CN=orchestrator");
        assert_eq!(escape("a+b\"c\\d<e>f;g"), "a\\+b\\\"c\\\\d\\<e\\>f\\;g");
        assert_eq!(escape("#x#"), "\\#x#");
        assert_eq!(escape(" x y "), "\\ x y\\ ");
        assert_eq!(escape(" "), "\\ ");
        assert_eq!(escape("a\nb\0"), "a\\0Ab\\00");
        assert_eq!(escape("Zürich"), "Zürich");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn subjects_print_unambiguously() {
        let forged = subject(&[&[("O", "Example, CN=orchestrator")]]);
        let real = subject(&[&[("O", "Example")], &[("CN", "orchestrator")]]);
        assert_eq!(forged.to_string(), "O=Example\\, CN=orchestrator");
        assert_eq!(real.to_string(), "O=Example, CN=orchestrator");
        let multi = subject(&[&[("CN", "a"), ("UID", "b")]]);
        assert_eq!(multi.to_string(), "CN=a + UID=b");
        let der = Attribute::new("1.2.840.113549.1.9.1", Some("x@y".into()), || vec![0x16, 1, b'x']);
        assert_eq!(der.to_string(), "1.2.840.113549.1.9.1=#160178");
        let cn = Attribute::new("2.5.4.3", None, || vec![0x04, 0]);
        assert_eq!(cn.to_string(), "CN=#0400");
    }

    #[test]
    fn attributes_match_whole() {
        let real = subject(&[&[("O", "Example")], &[("CN", "orchestrator")]]);
        let forged = subject(&[&[("O", "Example, CN=orchestrator")]]);
        let evil = subject(&[&[("O", "Example")], &[("CN", "orchestrator-evil")]]);
        let p = pat("O=Example, CN=orchestrator");
        assert!(p.matches(&real));
        assert!(!p.matches(&forged));
        assert!(!p.matches(&evil));
        assert!(pat("CN=orchestrator").matches(&real));
        assert!(!pat("CN=orchestrator").matches(&evil));
        assert!(pat("cn=orchestrator*").matches(&evil), "a wildcard is asked for");
        assert!(!pat("CN=*").matches(&forged), "no CN at all");
        assert!(pat("O=Example\\, CN=orchestrator").matches(&forged));
        assert!(pat("O=Example\\2C CN=orchestrator").matches(&forged));
        assert!(!pat("O=Example\\, CN=orchestrator").matches(&real));
        // Every attribute of a named type must match.
        let two = subject(&[&[("CN", "orchestrator")], &[("CN", "evil")]]);
        assert!(!pat("CN=orchestrator").matches(&two));
        assert!(pat("CN=*").matches(&two));
        // Literal wildcards and escaped spaces.
        assert!(pat("CN=a\\*").matches(&subject(&[&[("CN", "a*")]])));
        assert!(!pat("CN=a\\*").matches(&subject(&[&[("CN", "ab")]])));
        assert!(pat("CN=a\\ ").matches(&subject(&[&[("CN", "a ")]])));
        assert!(!pat("CN=a ").matches(&subject(&[&[("CN", "a ")]])));
        assert!(pat("CN=\\#1").matches(&subject(&[&[("CN", "#1")]])));
        let der = Subject(vec![vec![Attribute::new("2.5.4.3", None, || vec![0x04, 1, 0xAB])]]);
        assert!(pat("CN=#0401AB").matches(&der));
        assert!(!pat("CN=\\#0401AB").matches(&der));
        assert!(
            pat("2.5.4.3=orchestrator").matches(&real),
            "a known OID is its short name"
        );
    }

    #[test]
    fn bad_patterns_are_refused() {
        for p in [
            "*CN=orchestrator*",
            "",
            "CN=",
            "CN=a,",
            "CN=a\\",
            "CN=\\4",
            "CN=\\FF",
            "Email=x",
            "CN=a, cn=b",
            "CN=#12F",
            "1..2=x",
        ] {
            assert!(SubjectPattern::parse(p).is_err(), "{p:?} should be refused");
        }
    }

    proptest::proptest! {
        #[test]
        fn printed_subjects_are_patterns_matching_them(
            values in proptest::collection::vec("\\PC{1,12}|[ #,+\"\\\\<>;=*?\x00-\x1f]{1,6}", 1..4)
        ) {
            let kinds = ["CN", "O", "OU", "L"];
            let rdns: Vec<Vec<Attribute>> =
                values.iter().zip(kinds).map(|(v, k)| vec![text(k, v)]).collect();
            let s = Subject(rdns);
            let printed = s.to_string();
            let p = SubjectPattern::parse(&printed);
            proptest::prop_assert!(p.as_ref().is_ok_and(|p| p.matches(&s)), "{printed:?}: {p:?}");
        }

        #[test]
        fn parsing_never_panics(p in "\\PC{0,40}|[\\\\,+= #*?A-F0-9a-z]{0,20}") {
            let _ = SubjectPattern::parse(&p);
        }
    }

    #[test]
    fn glob_is_linear_enough() {
        let p = pat(&format!("CN={}b", "*a".repeat(30)));
        let s = subject(&[&[("CN", &"a".repeat(5000))]]);
        assert!(!p.matches(&s));
    }
}
