//! Differential tests: the same byte-level conversations go to a real QEMU
//! directly and to another real QEMU through qmpmux; a client must not be
//! able to tell the two apart.
//!
//! Nothing expected is hard-coded: every step's expected output is what
//! QEMU #1 answers, live. To know where one step's output ends, every step
//! is followed by a sentinel command (`query-name` with a unique id) on both
//! connections; each side is read up to and including the sentinel's reply.
//! Both sides receive exactly the same bytes, sentinels included (and one
//! first command, before the steps; see `Diff::start`).
//!
//! Messages are compared after parsing as `serde_json::Value` (so member
//! order and `\uXXXX` spelling do not matter, but `1000` vs `1e3` does), with
//! event timestamps normalised. All mismatches of a test are collected and
//! reported together.
//!
//! Set `QMPMUX_DIFF_TRACE=1` to print every step with both raw outputs.

mod common;

use common::{normalize, Client, Daemon, Qemu, STEP};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Pause between the chunks of one step that must reach the peer as
/// separate reads (there is no signal for "the peer has read these bytes").
const CHUNK_GAP: Duration = Duration::from_millis(10);

/// One raw QMP connection, read line by line with a buffer that survives
/// timeouts (a line cut in two by a timeout is not lost).
struct Peer {
    name: &'static str,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    buf: Vec<u8>,
}

enum Next {
    Line(String),
    Timeout,
    Eof,
}

impl Peer {
    async fn connect(name: &'static str, path: &Path) -> Peer {
        let stream = UnixStream::connect(path)
            .await
            .unwrap_or_else(|e| panic!("connect {name} to {}: {e}", path.display()));
        Peer::from_stream(name, stream)
    }

    /// QEMU's monitor, right after the readiness probe let go of it: on
    /// loaded CI machines QEMU 7.2 has refused the next connection for a
    /// moment (ECONNREFUSED, seen once in a run with two test suites at
    /// once). That is QEMU's, not qmpmux's, so it is retried for up to
    /// [`STEP`]; qmpmux's own socket is connected to once, strictly.
    async fn connect_qemu(path: &Path) -> Peer {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match UnixStream::connect(path).await {
                Ok(stream) => return Peer::from_stream("QEMU", stream),
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("connect QEMU to {}: {e}", path.display()),
            }
        }
    }

    fn from_stream(name: &'static str, stream: UnixStream) -> Peer {
        let (reader, writer) = stream.into_split();
        Peer {
            name,
            reader,
            writer,
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.writer
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("write to {}: {e}", self.name));
    }

    /// The next line (with its line ending) within `d`.
    async fn next_within(&mut self, d: Duration) -> Next {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                return Next::Line(String::from_utf8_lossy(&line).into_owned());
            }
            self.buf.reserve(4096);
            // `read_buf` appends to the buffer and is cancel-safe.
            match tokio::time::timeout_at(deadline, self.reader.read_buf(&mut self.buf)).await {
                Err(_) => return Next::Timeout,
                Ok(Ok(0)) | Ok(Err(_)) => return Next::Eof,
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn line(&mut self) -> String {
        match self.next_within(STEP).await {
            Next::Line(l) => l,
            Next::Timeout => panic!("{}: timed out waiting for a message", self.name),
            Next::Eof => panic!("{}: connection closed", self.name),
        }
    }
}

fn parse(line: &str) -> Value {
    match serde_json::from_str::<Value>(line) {
        Ok(v) => normalize(v),
        // Deeper than serde_json's default limit (ids nested up to QEMU's
        // 1024 levels): compared as raw text instead, which is stricter.
        Err(e) if e.to_string().contains("recursion limit") => json!({ "RAW LINE": line }),
        Err(_) => json!({ "UNPARSEABLE LINE": line }),
    }
}

fn is_sentinel(v: &Value, id: &str) -> bool {
    v.get("id").and_then(Value::as_str) == Some(id)
}

/// What one side said in answer to one step.
#[derive(Debug, Default)]
struct Output {
    lines: Vec<String>,
    values: Vec<Value>,
    /// The sentinel's reply arrived (it is the last element).
    terminated: bool,
    /// How reading stopped, when it was not the sentinel.
    end: Option<&'static str>,
}

impl Output {
    /// The raw lines, long ones shortened and repeats counted.
    fn render(&self) -> String {
        let mut s = String::new();
        let mut i = 0;
        while i < self.lines.len() {
            let line = &self.lines[i];
            let repeats = self.lines[i..].iter().take_while(|l| *l == line).count();
            let shown = if line.len() > 300 {
                let cut = (0..=200).rev().find(|&n| line.is_char_boundary(n)).unwrap_or(0);
                format!("{:?}... ({} bytes)", &line[..cut], line.len())
            } else {
                format!("{line:?}")
            };
            match repeats {
                1 => s.push_str(&format!("    {shown}\n")),
                n => s.push_str(&format!("    {n} x {shown}\n")),
            }
            i += repeats;
        }
        if let Some(end) = self.end {
            s.push_str(&format!("    <{end}>\n"));
        }
        s
    }
}

/// A pair of connections: `direct` to QEMU #1, `mux` through qmpmux to QEMU #2.
struct Diff {
    name: &'static str,
    direct: Peer,
    mux: Peer,
    sentinel: u32,
    /// How long any one message may take.
    patience: Duration,
    mismatches: Vec<String>,
    trace: bool,
    // Fields drop in declaration order: these go after the connections.
    daemon: Option<Daemon>,
    _qemu1: Qemu,
    _qemu2: Qemu,
    /// qmpmux's socket.
    sock: PathBuf,
    _dir: TempDir,
}

impl Diff {
    /// Starts both QEMUs and qmpmux, connects both clients, checks the
    /// greetings (identical: qmpmux offers `oob` when QEMU does) and sends
    /// both sides a first command that leaves no state behind.
    ///
    /// QEMU 7.2 itself, freshly started, now and then never answers the
    /// first commands on a connection it has greeted (seen twice in about
    /// 400 runs of this file on 2 loaded cores, always on the first step;
    /// not reproduced with a plain client in 1,700 tries). That says nothing
    /// about qmpmux, and without an answer from QEMU there is nothing to
    /// compare with, so the pair is started over on fresh QEMUs. Only
    /// QEMU's own silence on the direct connection is retried: whatever
    /// qmpmux does is compared as in every other step.
    async fn start(name: &'static str) -> Diff {
        for attempt in 1.. {
            let mut d = Self::start_once(name).await;
            let id = "warm-up";
            let warm_up = format!("{{\"execute\": \"query-name\", \"id\": \"{id}\"}}");
            d.direct.write(warm_up.as_bytes()).await;
            let want = Self::collect(&mut d.direct, id, STEP).await;
            if !want.terminated && attempt < 3 {
                eprintln!(
                    "{name}: QEMU #1 did not answer its first command ({}); starting over on fresh QEMUs",
                    want.render().trim()
                );
                d.close().await;
                continue;
            }
            assert!(
                want.terminated,
                "{name}: QEMU itself did not answer its first command, {attempt} times"
            );
            d.mux.write(warm_up.as_bytes()).await;
            let got = Self::collect(&mut d.mux, id, STEP).await;
            assert_eq!(got.values, want.values, "{name}: first command through qmpmux");
            return d;
        }
        unreachable!()
    }

    async fn start_once(name: &'static str) -> Diff {
        let dir = tempfile::tempdir().unwrap();
        let q1 = dir.path().join("q1.sock");
        let q2 = dir.path().join("q2.sock");
        let sock = dir.path().join("mux.sock");
        let (qemu1, qemu2) = tokio::join!(Qemu::start(&q1), Qemu::start(&q2));
        let daemon = Daemon::start(&[("vm", &q2, &sock)]).await;
        let mut direct = Peer::connect_qemu(&q1).await;
        let mut mux = Peer::connect("qmpmux", &sock).await;
        let g1 = parse(&direct.line().await);
        let g2 = parse(&mux.line().await);
        assert_eq!(g1["QMP"]["capabilities"], json!(["oob"]), "QEMU's greeting: {g1}");
        assert_eq!(g2, g1, "greeting through qmpmux");
        Diff {
            name,
            direct,
            mux,
            sentinel: 0,
            patience: STEP,
            mismatches: Vec::new(),
            trace: std::env::var_os("QMPMUX_DIFF_TRACE").is_some(),
            daemon: Some(daemon),
            _qemu1: qemu1,
            _qemu2: qemu2,
            sock,
            _dir: dir,
        }
    }

    /// Sends `input` (one write) to both sides and compares what comes back.
    async fn step(&mut self, input: impl AsRef<[u8]>) {
        self.step_chunks(&[input.as_ref()]).await;
    }

    /// Sends `chunks` as separate writes (with a pause between them, so
    /// each arrives on its own) to both sides, then compares.
    async fn step_chunks(&mut self, chunks: &[&[u8]]) {
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(CHUNK_GAP).await;
            }
            self.direct.write(chunk).await;
            self.mux.write(chunk).await;
        }
        self.sentinel += 1;
        let id = format!("sentinel-{}", self.sentinel);
        let sentinel = format!("{{\"execute\": \"query-name\", \"id\": \"{id}\"}}");
        self.direct.write(sentinel.as_bytes()).await;
        self.mux.write(sentinel.as_bytes()).await;

        let want = Self::collect(&mut self.direct, &id, self.patience).await;
        assert!(
            want.terminated,
            "{}: QEMU itself did not answer the sentinel after {chunks:?}: {}",
            self.name,
            want.render()
        );
        let got = Self::collect(&mut self.mux, &id, self.patience).await;
        let mut input: String = chunks.iter().map(|c| String::from_utf8_lossy(c)).collect();
        if input.len() > 300 {
            let cut = (0..=200).rev().find(|&n| input.is_char_boundary(n)).unwrap_or(0);
            input = format!("{}... ({} bytes)", &input[..cut], input.len());
        }
        let same = got.terminated && got.values == want.values && got.lines.iter().all(|l| l.ends_with("\r\n"));
        if self.trace || !same {
            let report = format!("input {input:?}\n  QEMU:\n{}  qmpmux:\n{}", want.render(), got.render());
            if self.trace {
                // Byte differences are not failures (clients parse JSON), but
                // worth seeing; events differ in their timestamps anyway.
                let raw_same = got.lines.len() == want.lines.len()
                    && got
                        .lines
                        .iter()
                        .zip(&want.lines)
                        .all(|(g, w)| g == w || g.contains("\"timestamp\""));
                let tag = match (same, raw_same) {
                    (false, _) => "MISMATCH ",
                    (true, false) => "BYTES DIFFER ",
                    (true, true) => "",
                };
                eprintln!("[{}] {tag}{report}", self.name);
            }
            if !same {
                self.mismatches.push(report);
            }
        }
    }

    /// Reads up to and including the reply to sentinel `id`.
    async fn collect(peer: &mut Peer, id: &str, patience: Duration) -> Output {
        let mut out = Output::default();
        loop {
            match peer.next_within(patience).await {
                Next::Line(line) => {
                    let v = parse(&line);
                    let done = is_sentinel(&v, id);
                    out.lines.push(line);
                    out.values.push(v);
                    if done {
                        out.terminated = true;
                        return out;
                    }
                }
                Next::Timeout => {
                    out.end = Some("timed out");
                    return out;
                }
                Next::Eof => {
                    out.end = Some("EOF");
                    return out;
                }
            }
        }
    }

    /// Negotiates on both sides (compared like any step).
    async fn negotiate(&mut self) {
        self.step(r#"{"execute":"qmp_capabilities"}"#).await;
    }

    /// Stops qmpmux; returns every mismatch seen.
    async fn close(mut self) -> Vec<String> {
        let mismatches = std::mem::take(&mut self.mismatches);
        if let Some(d) = self.daemon.take() {
            d.stop().await;
        }
        mismatches
    }

    /// Fails with every mismatch seen.
    async fn finish(self) {
        let name = self.name;
        assert_mismatches(name, self.close().await);
    }
}

fn assert_mismatches(name: &str, mismatches: Vec<String>) {
    assert!(
        mismatches.is_empty(),
        "{name}: {} step(s) answered differently through qmpmux than by QEMU:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// Runs `case` on a fresh, negotiated pair, then a plain command: for inputs
/// that may cost qmpmux its upstream connection, so that they cannot affect
/// other cases.
async fn on_fresh_pair(name: &'static str, case: &[u8]) -> Vec<String> {
    on_fresh_pair_patiently(name, case, STEP).await
}

async fn on_fresh_pair_patiently(name: &'static str, case: &[u8], patience: Duration) -> Vec<String> {
    let mut d = Diff::start(name).await;
    d.patience = patience;
    d.negotiate().await;
    d.step(case).await;
    // Whatever the case did, the next command must fare as it does on QEMU.
    d.step(r#"{"execute":"query-status","id":"next"}"#).await;
    d.close().await
}

/// Ids of many JSON types and spellings; QEMU echoes them as it parsed them.
const IDS: &[&str] = &[
    "1",
    "0",
    "-7",
    "1e3",
    "1E3",
    "1e-3",
    "0.1",
    "2.5",
    "-0",
    "-0.0",
    "1.0",
    "1.5e300",
    "1e-400",
    "-1e-400",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "123456789012345678901234567890",
    "\"\"",
    "\"__qmp#00001\"",
    "\"caf\u{e9} \u{1f600} \u{4e2d}\"",
    r#""\u00e9\u00E9\ud83d\ude00""#,
    r#""tab\tnl\nquote\"backslash\\slash\/bs\bff\fcr\r""#,
    r#""\u0001\u001f\u007f""#,
    "null",
    "true",
    "false",
    "[]",
    "{}",
    "[1, \"a\", null, true, {}, [[]]]",
    r#"{"b": {"c": [1, 2]}, "a": 1, "z": null, "id": "x", "error": 0, "return": []}"#,
    r#"{"x":1,"y":2,"z":3,"class":4,"desc":5,"ab":6,"ba":7}"#,
];

fn with_id(id: &str) -> String {
    format!(r#"{{"execute":"query-status","id":{id}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_mode_errors() {
    let mut d = Diff::start("negotiation_mode_errors").await;
    for id in IDS {
        d.step(with_id(id)).await;
    }
    // Id first, other commands, unknown ones, id-less.
    d.step(r#"{"id":{"k":[1,2]},"execute":"query-name"}"#).await;
    d.step(r#"{"execute":"no-such-command","id":"n"}"#).await;
    d.step(r#"{"execute":"query-status"}"#).await;
    d.step(r#"{"execute":"quit"}"#).await;
    // Structural errors are checked before negotiation is.
    d.step(r#"{"execute":5,"id":1}"#).await;
    d.step(r#"{"execute":"query-status","bogus":1,"id":2}"#).await;
    d.step(r#"{"id":3}"#).await;
    d.step(r#"{"execute":"query-status","arguments":[],"id":4}"#).await;
    d.step(r#"{"exec-oob":"query-status","id":5}"#).await;
    d.step("[1]").await;
    d.step("{\"execute\": }").await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_after_negotiation() {
    let mut d = Diff::start("ids_after_negotiation").await;
    d.negotiate().await;
    for id in IDS {
        d.step(with_id(id)).await;
    }
    for id in IDS {
        // Errors from QEMU itself carry the id too.
        d.step(format!(r#"{{"execute":"no-such-command","id":{id}}}"#)).await;
        // Errors qmpmux generates itself (structural) as well.
        d.step(format!(r#"{{"execute":"query-status","bogus":0,"id":{id}}}"#))
            .await;
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input() {
    let mut d = Diff::start("malformed_input").await;
    for negotiated in [false, true] {
        if negotiated {
            d.negotiate().await;
        }
        let cases: &[&[u8]] = &[
            b"{\"execute\": }",
            b"}",
            b"]",
            b"[}",
            b"{]",
            b"[1]",
            b"[]",
            b"{}",
            b"5 ",
            b"-1.5 ",
            b"\"str\" ",
            b"'str' ",
            b"null ",
            b"true ",
            b"false ",
            b"{\"a\":1 @ }",
            b"@",
            b"{\"execute\":\"query-status\",\"id\":1}@{\"execute\":\"query-status\",\"id\":2}",
            b"{\"execute\":\"query-status\",\"execute\":\"query-name\",\"id\":1}",
            b"{\"execute\":\"query-status\",\"id\":{\"a\":1,\"a\":2}}",
            b"{\"execute\":\"query-status\",\"id\":[{\"a\":1,\"b\":{\"c\":1,\"c\":1}}]}",
            b"{\"execute\":\"query-status\",\"id\":\"a\x01b\"}",
            b"{\"execute\":\"query-status\",\"id\":\"a\x1fb\"}",
            b"{\"execute\":\"query-status\",\"id\":\"a\tb\"}",
            b"{\"execute\":\"query-status\",\"id\":\"a\nb\"}",
            b"{\"execute\":\"query-status\",\"id\":\"a\x7fb\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\\q\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\\u0000\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\xc3\x28\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\xe2\x82\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\xed\xa0\x80\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\xf4\x90\x80\x80\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\x80\"}",
            b"{\"execute\":\"query-status\",}",
            b"{\"execute\" \"query-status\"}",
            b"{\"execute\":\"query-status\" \"id\":1}",
            b"{1:2}",
            b"{\"execute\":\"query-status\",\"id\":[1 2]}",
            b"{\"execute\":\"query-status\",\"id\":[1,]}",
            b"{\"execute\":\"query-status\",\"id\":0x10}",
            b"{\"execute\":\"query-status\",\"id\":\"\\u12\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\\u12g4\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\\ud800\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\\udc00\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\\ud800\\u0041\"}",
            b"{\"execute\":\"query-status\",\"id\":\"\xc0\x80\"}",
            b"{\"execute\":\"query-status\",\"id\":01}",
            b"{\"execute\":\"query-status\",\"id\":1.}",
            b"{\"execute\":\"query-status\",\"id\":.5}",
            b"{\"execute\":\"query-status\",\"id\":+1}",
            b"{\"execute\":\"query-status\",\"id\":1e}",
            b"{\"execute\":\"query-status\",\"id\":-}",
            b"{\"execute\":\"query-status\",\"id\":tru}",
            b"{\"execute\":\"query-status\",\"id\":True}",
            b"{\"execute\":\"query-status\",\"id\":nan}",
            b"{\"execute\":\"query-status\",\"id\":Infinity}",
            b"{\"\\u0065xecute\":\"query-status\",\"id\":\"escaped key\"}",
            b"{\"execute\":\"query-\\u0073tatus\",\"id\":\"escaped name\"}",
            b"{\"execute\":\"query-status\",\"id\":1}}",
            b"{\"execute\":\"query-status\",\"id\":1}]",
            b"\x1b{\"execute\":\"query-status\",\"id\":\"after esc\"}",
            b"{\"execute\": \x1b{\"execute\":\"query-status\",\"id\":\"esc resets\"}",
            b"{\"execute\": \xff{\"execute\":\"query-status\",\"id\":\"ff resets\"}",
        ];
        for case in cases {
            d.step(case).await;
        }
    }
    d.finish().await;
}

/// Numbers that are valid JSON but that QEMU's lexer splits differently
/// (`0e0` is `0` then the keyword `e0`).
const ODD_NUMBERS: &[&str] = &["0e0", "-0e0", "0E1", "0e-1"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_numbers_before_negotiation() {
    let mut d = Diff::start("odd_numbers_before_negotiation").await;
    for n in ODD_NUMBERS {
        d.step(with_id(n)).await;
        d.step(format!(
            r#"{{"execute":"query-status","arguments":{{"x":{n}}},"id":1}}"#
        ))
        .await;
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_numbers_after_negotiation() {
    let mut cases = Vec::new();
    for n in ODD_NUMBERS {
        cases.push(with_id(n));
        cases.push(format!(
            r#"{{"execute":"human-monitor-command","arguments":{{"command-line":"info version","x":{n}}},"id":1}}"#
        ));
    }
    // One pair per case, all at once.
    let mut runs = tokio::task::JoinSet::new();
    for case in cases {
        runs.spawn(async move { on_fresh_pair("odd_numbers_after_negotiation", case.as_bytes()).await });
    }
    let mut all = Vec::new();
    while let Some(mismatches) = runs.join_next().await {
        all.extend(mismatches.expect("case panicked"));
    }
    assert_mismatches("odd_numbers_after_negotiation", all);
}

/// The known gap, kept runnable (`cargo test --test differential --
/// --ignored`) so it stays visible: `1e400` is accepted by QEMU as `inf`
/// (which is not JSON) and refused by qmpmux with a parse error. It never
/// reaches QEMU, so other clients are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known gap: 1e400 (QEMU: inf; qmpmux: parse error)"]
async fn known_lexical_gaps() {
    let mut d = Diff::start("known_lexical_gaps").await;
    for negotiated in [false, true] {
        if negotiated {
            d.negotiate().await;
        }
        let cases: Vec<Vec<u8>> = vec![
            with_id("1e400").into_bytes(),
            with_id("-1e400").into_bytes(),
            br#"{"execute":"query-status","arguments":{"x":1e400},"id":1}"#.to_vec(),
        ];
        for case in &cases {
            d.step(case).await;
        }
    }
    d.finish().await;
}

fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// QEMU allows 1024 levels of nesting per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nesting_up_to_the_limit() {
    let mut d = Diff::start("nesting_up_to_the_limit").await;
    d.negotiate().await;
    for depth in [1023usize, 1024] {
        d.step(nested(depth)).await;
    }
    // One level below the limit, counting the request's own object.
    d.step(with_id(&nested(1022))).await;
    d.finish().await;
}

/// Beyond 1024 levels QEMU reports the error and goes on lexing the rest of
/// the message as new input (a thousand more errors); qmpmux intentionally
/// reports the same first error and then disconnects the client (input
/// limits cut off the offender). Not comparable beyond the first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nesting_beyond_the_limit() {
    for input in [nested(1025), with_id(&nested(1024))] {
        let mut d = Diff::start("nesting_beyond_the_limit").await;
        d.negotiate().await;
        d.direct.write(input.as_bytes()).await;
        d.mux.write(input.as_bytes()).await;
        let want = json!({"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}});
        assert_eq!(parse(&d.direct.line().await), want);
        assert_eq!(parse(&d.mux.line().await), want);
        assert!(
            matches!(d.mux.next_within(STEP).await, Next::Eof),
            "qmpmux should disconnect the client"
        );
        // Other clients are unaffected.
        let mut other = Client::ready(&d.sock).await;
        assert!(other.cmd(r#"{"execute":"query-status","id":1}"#).await["return"].is_object());
        assert_mismatches("nesting_beyond_the_limit", d.close().await);
    }
}

/// An id nested exactly to QEMU's limit (1023 levels inside the request's
/// own object): QEMU accepts it, so qmpmux must too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nesting_limit_id_at_the_limit() {
    let case = with_id(&nested(1023));
    let mismatches = on_fresh_pair("nesting_limit_id_at_the_limit", case.as_bytes()).await;
    assert_mismatches("nesting_limit_id_at_the_limit", mismatches);
}

// Not covered: QEMU's 64 MiB per-message limit. QEMU 7.2 lexes so slowly
// that a 64 MiB message did not finish within 30 minutes.

/// QEMU allows 2 Mi tokens per message; an id just under that limit is
/// accepted by QEMU. Ignored by default: QEMU itself needs about 14 s to
/// lex a message that size. Run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "QEMU takes ~14 s per 2 Mi-token message"]
async fn token_count_just_under_the_limit() {
    // Tokens: `{ "execute" : "query-status" , "id" : [` (8), then `0` and
    // `,` per element (2n - 1), then `] }` (2): 2n + 9 = 2 097 151.
    let n = 1_048_571;
    let id = format!("[{}]", vec!["0"; n].join(","));
    let case = with_id(&id);
    let mismatches = on_fresh_pair_patiently("token_count_just_under_the_limit", case.as_bytes(), 4 * STEP).await;
    assert_mismatches("token_count_just_under_the_limit", mismatches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structural_errors() {
    let mut d = Diff::start("structural_errors").await;
    d.negotiate().await;
    let cases = [
        r#"{"execute":5,"id":1}"#,
        r#"{"execute":null,"id":1}"#,
        r#"{"execute":["query-status"],"id":1}"#,
        r#"{"execute":{},"id":1}"#,
        r#"{"execute":"query-status","bogus":true,"id":2}"#,
        r#"{"bogus":true,"execute":"query-status","id":2}"#,
        r#"{"execute":"query-status","zzz":1,"aaa":2,"mmm":3,"id":2}"#,
        r#"{"aaa":2,"zzz":1,"execute":"query-status"}"#,
        r#"{"execute":5,"bogus":1,"arguments":[],"id":3}"#,
        r#"{"arguments":[],"execute":5,"id":3}"#,
        r#"{"arguments":[],"bogus":1,"id":3}"#,
        r#"{"id":4}"#,
        r#"{"arguments":{}}"#,
        r#"{}"#,
        r#"{"execute":"query-status","arguments":[],"id":5}"#,
        r#"{"execute":"query-status","arguments":null,"id":5}"#,
        r#"{"execute":"query-status","arguments":"x","id":5}"#,
        r#"{"execute":"query-status","arguments":1,"id":5}"#,
        r#"{"execute":"query-status","arguments":{},"id":5}"#,
        r#"{"exec-oob":"query-status","id":6}"#,
        r#"{"exec-oob":"migrate-pause","id":6}"#,
        r#"{"exec-oob":5,"id":6}"#,
        r#"{"execute":"query-status","exec-oob":"query-status","id":7}"#,
        r#"{"exec-oob":"query-status","execute":"query-status","id":7}"#,
        r#"{"execute":"query-status","id":8,"control":{"run-oob":true}}"#,
        r#"{"execute":"","id":9}"#,
        r#"{"execute":"qmp_capabilities","bogus":1,"id":10}"#,
        r#"{"execute":"qmp_capabilities","arguments":[],"id":10}"#,
    ];
    for case in cases {
        d.step(case).await;
    }
    // Without OOB enabled, `exec-oob` is an ordinary error and keeps its
    // place among in-band replies (QEMU: in order, every time).
    d.step(concat!(
        r#"{"execute":"query-status","id":1}"#,
        r#"{"exec-oob":"query-status","id":2}"#,
        r#"{"execute":"query-status","id":3}"#,
        r#"{"exec-oob":"migrate-pause"}"#,
        r#"{"execute":"query-name"}"#,
    ))
    .await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_negotiation() {
    let mut d = Diff::start("capabilities_negotiation").await;
    // Refused attempts leave the connection in negotiation mode.
    let refused = [
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":1}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[1]},"id":2}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[null]},"id":2}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[["oob"]]},"id":2}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["OOB"]},"id":2}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":"oob"},"id":3}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":null},"id":3}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":{}},"id":3}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"x":1},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[],"x":1},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"x":1,"y":2},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"],"x":1},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":[1,"foo"]},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo",1]},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob","foo"]},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob",1]},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"],"x":1},"id":4}"#,
        r#"{"execute":"qmp_capabilities","arguments":[],"id":5}"#,
        r#"{"execute":"qmp_capabilities","bogus":1,"id":5}"#,
        r#"{"exec-oob":"qmp_capabilities","id":5}"#,
        r#"{"execute":"query-status","id":6}"#,
    ];
    for case in refused {
        d.step(case).await;
    }
    // Accepted, with an id and an empty enable list.
    d.step(r#"{"execute":"qmp_capabilities","arguments":{"enable":[]},"id":{"n":[1]}}"#)
        .await;
    d.step(r#"{"execute":"query-status","id":7}"#).await;
    // Once negotiated: argument errors still come first, then "already complete".
    let again = [
        r#"{"execute":"qmp_capabilities"}"#,
        r#"{"execute":"qmp_capabilities","id":8}"#,
        r#"{"execute":"qmp_capabilities","arguments":{},"id":8}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":9}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]},"id":9}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":"oob"},"id":9}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"x":1},"id":9}"#,
        r#"{"exec-oob":"qmp_capabilities","id":10}"#,
    ];
    for case in again {
        d.step(case).await;
    }
    d.finish().await;
}

/// OOB end to end: negotiated like QEMU, `exec-oob` answered like QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oob_enabled() {
    let mut d = Diff::start("oob_enabled").await;
    d.step(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob","oob"]},"id":"oob"}"#)
        .await;
    for case in [
        r#"{"exec-oob":"query-status","id":1}"#,
        r#"{"exec-oob":"migrate-pause","id":2}"#,
        r#"{"exec-oob":"migrate-pause"}"#,
        r#"{"exec-oob":"qmp_capabilities","id":3}"#,
        r#"{"exec-oob":"no-such-command","id":4}"#,
        r#"{"exec-oob":5,"id":5}"#,
        r#"{"execute":"query-status","exec-oob":"query-name","id":6}"#,
        r#"{"execute":"query-status","id":7}"#,
        r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":8}"#,
    ] {
        d.step(case).await;
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_commands() {
    let mut d = Diff::start("normal_commands").await;
    d.negotiate().await;
    let cases = [
        r#"{"execute":"query-status","id":1}"#,
        r#"{"execute":"query-status"}"#,
        r#"{"execute":"query-name","id":2}"#,
        r#"{"execute":"query-version","id":3}"#,
        r#"{"execute":"query-version"}"#,
        r#"{"execute":"query-commands","id":4}"#,
        r#"{"execute":"query-uuid","id":5}"#,
        r#"{"execute":"query-kvm","id":5}"#,
        r#"{"execute":"query-machines","id":5}"#,
        r#"{"execute":"no-such-command","id":6}"#,
        r#"{"execute":"no-such-command"}"#,
        r#"{"execute":"__org.example_query-foo","id":6}"#,
        r#"{"execute":"query-status","arguments":{"x":1},"id":7}"#,
        r#"{"execute":"query-status","arguments":{"x":1}}"#,
        r#"{"execute":"query-status","arguments":{},"id":7}"#,
        r#"{"arguments":{},"id":7,"execute":"query-status"}"#,
        r#"{"execute":"device_add","arguments":{"driver":"no-such-device"},"id":8}"#,
        r#"{"execute":"device_del","arguments":{"id":"nope"},"id":8}"#,
        r#"{"execute":"human-monitor-command","arguments":{"command-line":"info version"},"id":9}"#,
        r#"{"execute":"human-monitor-command","arguments":{"command-line":"help info"},"id":9}"#,
        r#"{"execute":"human-monitor-command","arguments":{},"id":9}"#,
        r#"{"execute":"human-monitor-command","arguments":{"command-line":1},"id":9}"#,
        r#"{"execute":"qom-list","arguments":{"path":"/machine"},"id":10}"#,
        r#"{"execute":"qom-get","arguments":{"path":"/machine","property":"type"},"id":10}"#,
        r#"{"execute":"closefd","arguments":{"fdname":"nope"},"id":11}"#,
        r#"{"execute":"getfd","arguments":{"fdname":"nofd"},"id":11}"#,
        r#"{"execute":"query-fdsets","id":12}"#,
        r#"{"execute":"remove-fd","arguments":{"fdset-id":99},"id":12}"#,
        r#"{"execute":"qmp_capabilities","id":13}"#,
        r#"{"execute":"query-status","id":14}"#,
    ];
    for case in cases {
        d.step(case).await;
    }
    // Pipelined: many requests in one write, replies in order.
    let batch: String = cases.concat();
    d.step(batch).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_variants() {
    let mut d = Diff::start("framing_variants").await;
    // Before negotiation, framing is already QEMU's.
    d.step_chunks(&[b"{\"exec", b"ute\":\"query-status\",\"id\":\"early split\"}"])
        .await;
    d.step("{'execute':'qmp_capabilities','id':'sq'}\r\n").await;
    d.step(concat!(
        r#"{"execute":"query-status","id":1}"#,
        r#"{"execute":"query-name","id":2}"#,
        "\n",
        r#"  {"execute":"query-version","id":3}"#,
        "\r\n\r\n",
        r#"{"execute":"no-such","id":4} [1] {"execute":"query-status"}"#,
    ))
    .await;
    d.step_chunks(&[
        b"{\"exe",
        b"cute\":\n \"query-status\",",
        b"\r\n \"id\": \"split\"",
        b"\n}",
    ])
    .await;
    d.step_chunks(&[
        b"{\"execute\":\"query-status\",\"id\":\"esc \\",
        b"u00e9 \\",
        b"\" \\u",
        b"00",
        b"E9\"}",
    ])
    .await;
    d.step_chunks(&[b"{\"execute\":\"query-status\",\"id\":\"utf8 \xc3", b"\xa9\"}"])
        .await;
    d.step_chunks(&[b"{\"execute\":\"query-status\",\"id\":12", b"34}"])
        .await;
    d.step_chunks(&[b"{\"execute\":\"query-status\",\"id\":tr", b"ue}"])
        .await;
    d.step_chunks(&[
        b"{\"execute\":\"query-status\",\"id\":1}",
        b"{\"execute\":\"query-status\",\"id\":2}",
    ])
    .await;
    d.step_chunks(&[b"{\"execute\":\"query-status\",\"id\":\"}{\"", b"}"])
        .await;
    d.step_chunks(&[b"\n", b"  \t", b"\r\n"]).await;
    d.step("{\"execute\":\"query-status\",\"id\":\"no newline\"}").await;
    d.step("{\"execute\":\"query-status\",\"id\":\"lf\"}\n").await;
    d.step("{\"execute\":\"query-status\",\"id\":\"crlf\"}\r\n").await;
    d.step("\t{\"execute\"\t:\t\"query-status\"\t,\t\"id\"\t:\t\"tabs\"\t}\t")
        .await;
    d.step("{\n  \"execute\": \"query-status\",\n  \"id\": \"pretty\"\n}\n")
        .await;
    d.step("{'execute':'query-status','id':'single'}").await;
    d.step(r#"{'execute':'query-status','id':'it\'s "quoted"'}"#).await;
    d.step(r#"{"execute":'query-status',"id":["a",'b',"c'd",'e"f']}"#).await;
    d.step(r#"{'execute':'query-status','id':'\u00e9\n\\'}"#).await;
    d.step(r#"{'execute':'no-such','id':'sq error'}"#).await;
    d.step(r#"{'execute':'query-status','bogus':1,'id':'sq local error'}"#)
        .await;
    // A bare scalar without a delimiter ends at the next token (the sentinel).
    d.step("5").await;
    d.step_chunks(&[b"12", b"3 "]).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_replies_in_order() {
    let mut d = Diff::start("events_and_replies_in_order").await;
    // Not negotiated: no events at all, only the reply.
    d.step(r#"{"execute":"stop","id":"early"}"#).await;
    d.negotiate().await;
    d.step(r#"{"execute":"stop","id":"s1"}"#).await;
    d.step(r#"{"execute":"query-status","id":"q1"}"#).await;
    // Stopping a stopped VM: no event.
    d.step(r#"{"execute":"stop","id":"s2"}"#).await;
    d.step(r#"{"execute":"cont","id":"c1"}"#).await;
    d.step(r#"{"execute":"cont","id":"c2"}"#).await;
    d.step(r#"{"execute":"stop"}"#).await;
    d.step(r#"{"execute":"cont"}"#).await;
    // Pipelined in one write: events interleave with replies in QEMU's order.
    d.step(concat!(
        r#"{"execute":"stop","id":1}"#,
        r#"{"execute":"query-status","id":2}"#,
        r#"{"execute":"cont","id":3}"#,
        r#"{"execute":"query-status","id":4}"#,
        r#"{"execute":"stop"}"#,
        r#"{"execute":"cont"}"#,
        r#"{"execute":"query-status"}"#,
    ))
    .await;
    d.finish().await;
}
