//! Unit and property tests of the framer.

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
fn numbers_and_keywords_lex_like_qemu() {
    let f = |s: &str| frames(Limits::default(), &[s.as_bytes()]);
    // One lexical error with the token so far, recovery, then `}`.
    assert_eq!(
        f("{\"id\":01}"),
        vec![
            err("JSON parse error, stray '01'"),
            err("JSON parse error, expecting value")
        ]
    );
    assert_eq!(
        f("{\"id\":+1}"),
        vec![
            err("JSON parse error, stray '+'"),
            err("JSON parse error, expecting value")
        ]
    );
    // The error token swallows the `}`: one error only.
    assert_eq!(f("{\"id\":1.}"), vec![err("JSON parse error, stray '1.}'")]);
    assert_eq!(f("{\"id\":-}"), vec![err("JSON parse error, stray '-}'")]);
    // Parser-level: reported when the message ends.
    assert_eq!(f("{\"id\":tru}"), vec![err("JSON parse error, invalid keyword 'tru'")]);
    assert_eq!(
        f("{\"a\" \"b\"}"),
        vec![err("JSON parse error, missing : in object pair")]
    );
    assert_eq!(
        f("{\"a\":[1 2]}"),
        vec![err("JSON parse error, expected separator in list")]
    );
    assert_eq!(
        f("{\"a\":1.5e3,\"b\":[-0.25,true,null]}"),
        vec![msg("{\"a\":1.5e3,\"b\":[-0.25,true,null]}")]
    );
}

#[test]
fn unicode_escapes_checked_like_qemu() {
    let f = |s: &str| frames(Limits::default(), &[s.as_bytes()]);
    assert_eq!(
        f(r#"{"id":"\u12"}"#),
        vec![err(r#"JSON parse error, \u12" is not a valid Unicode character"#)]
    );
    assert_eq!(
        f(r#"{"id":"\ud800"}"#),
        vec![err(r#"JSON parse error, \ud800 is not a valid Unicode character"#)]
    );
    assert_eq!(f(r#"{"id":"\ud83d\ude00"}"#), vec![msg(r#"{"id":"\ud83d\ude00"}"#)]);
    // QEMU's two-byte NUL becomes a standard escape.
    assert_eq!(
        frames(Limits::default(), &[b"{\"id\":\"\xc0\x80\"}"]),
        vec![msg("{\"id\":\"\\u0000\"}")]
    );
}

#[test]
fn partial_message_at_eof_is_dropped() {
    assert_eq!(frames(Limits::default(), &[b"{\"a\":1}{\"b\""]), vec![msg("{\"a\":1}")]);
}

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
                    }
                }
                prop_assert!(buf.len() <= 256 + 300 + 1, "buffer {}", buf.len());
            }
        }
    }
}
