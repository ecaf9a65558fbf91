//! A tap's records as the JSON lines the control socket sends (the
//! protocol in docs/cli.md, "qmpmux tap"): masked, filtered, a request's
//! command named on its reply too. Pure: records in, text out.
//!
//! Every line is one object with a `type`: `tap` (the first: the VM and
//! who is connected), `connect`, `disconnect`, `request`, `reply`,
//! `event`, `lost` (lines this tap lost here), `end` (the last, when the
//! daemon ends the tap) or `error` (the only one, when there is no tap).
//! `time` is in microseconds since the Unix epoch.

use super::filter::Filter;
use super::mask::{self, ReplyMask};
use crate::qmp::json::write_str;
use crate::upstream::tap::{PeerId, Record, What, Who};
use crate::upstream::Answer;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Requests of one client whose replies a tap waits for, at most; beyond
/// that (its replies were lost) they are forgotten, and their replies show
/// no `return`.
const MAX_PENDING: usize = 4096;

/// What a tap knows between records.
pub struct View {
    vm: String,
    filter: Filter,
    who: HashMap<u64, Who>,
    /// Per client, its requests not answered yet: their command, and what
    /// their reply must lose.
    pending: HashMap<u64, HashMap<u64, Pending>>,
}

struct Pending {
    command: Option<Box<str>>,
    mask: ReplyMask,
}

impl View {
    /// A view of VM `vm` for a tap attached while `clients` were connected.
    pub fn new(vm: &str, filter: Filter, clients: &[Who]) -> View {
        View {
            vm: vm.to_string(),
            filter,
            who: clients.iter().map(|w| (w.client, w.clone())).collect(),
            pending: HashMap::new(),
        }
    }

    /// The first line: the VM, and who is connected.
    pub fn hello(&self) -> String {
        let mut out = String::from("{\"type\":\"tap\",\"vm\":");
        write_str(&mut out, &self.vm);
        out.push_str(",\"clients\":[");
        let mut clients: Vec<u64> = self.who.keys().copied().collect();
        clients.sort_unstable();
        for (i, c) in clients.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            self.write_who(&mut out, c);
        }
        out.push_str("]}\n");
        out
    }

    /// Appends the lines `rec` makes (none, one or two).
    pub fn line(&mut self, rec: &Record, out: &mut String) {
        let at = rec.at;
        match &rec.what {
            What::Joined(who) => {
                self.who.insert(who.client, who.clone());
                if self.filter.client(who.client) {
                    self.start(out, at, "connect", who.client);
                    out.push_str(",\"who\":");
                    self.write_who(out, who.client);
                    out.push_str("}\n");
                }
            }
            What::Left { client } => {
                self.pending.remove(client);
                if self.filter.client(*client) {
                    self.start(out, at, "disconnect", *client);
                    out.push_str(",\"who\":");
                    self.write_who(out, *client);
                    out.push_str("}\n");
                }
                self.who.remove(client);
            }
            What::Request { client, seq, tail } => {
                let text = match tail.first() {
                    Some(b',') => [b"{", &tail[1..]].concat(),
                    _ => tail.to_vec(),
                };
                let req = mask::request(&text);
                let command = req.as_ref().and_then(|r| r.command.as_deref());
                if self.filter.command(*client, command) {
                    self.request_line(out, at, *client, Some(*seq), req.as_ref(), text.len());
                }
                self.expect(*client, *seq, req);
            }
            What::Reply {
                client,
                seq,
                reply,
                error,
                queued,
                qemu,
            } => {
                let (command, how) = self.answered(*client, *seq);
                if self.filter.command(*client, command.as_deref()) {
                    let text = mask::reply(&reply.line(None), how);
                    let times = Some((*queued, *qemu));
                    self.reply_line(out, at, *client, Some(*seq), command.as_deref(), *error, times, &text);
                }
            }
            What::Failed { client, seq, kind } => {
                let (command, _) = self.answered(*client, *seq);
                if self.filter.command(*client, command.as_deref()) {
                    let line = crate::upstream::failure_line(&self.vm, None, *kind);
                    let text = mask::reply(&line, ReplyMask::Nothing);
                    self.reply_line(out, at, *client, Some(*seq), command.as_deref(), true, None, &text);
                }
            }
            What::Answer { client, seq, answer } => {
                let (command, how) = self.answered(*client, *seq);
                if self.filter.command(*client, command.as_deref()) {
                    let error = !matches!(answer, Answer::Return(_));
                    let text = mask::reply(&answer.clone().line(None), how);
                    self.reply_line(out, at, *client, Some(*seq), command.as_deref(), error, None, &text);
                }
            }
            What::Local { client, request, reply } => {
                let len = request.as_ref().map_or(0, |r| r.len());
                let req = request.as_deref().and_then(mask::request);
                let command = req.as_ref().and_then(|r| r.command.clone());
                if self.filter.command(*client, command.as_deref()) {
                    if request.is_some() {
                        self.request_line(out, at, *client, None, req.as_ref(), len);
                    }
                    let how = req.map_or(ReplyMask::Nothing, |r| r.reply);
                    let text = mask::reply(reply, how);
                    let error =
                        crate::qmp::json::members(reply.trim_ascii_end()).is_ok_and(|m| m.get("error").is_some());
                    self.reply_line(out, at, *client, None, command.as_deref(), error, None, &text);
                }
            }
            What::Event(line) => {
                let name = crate::qmp::json::members(line.trim_ascii_end())
                    .ok()
                    .and_then(|m| m.get("event").map(|e| e.get().to_string()))
                    .and_then(|e| serde_json::from_str::<String>(&e).ok())
                    .unwrap_or_default();
                if self.filter.event(&name) {
                    out.push_str("{\"time\":");
                    let _ = write!(out, "{}", micros(at));
                    out.push_str(",\"type\":\"event\",\"event\":");
                    write_str(out, &name);
                    out.push_str(",\"message\":");
                    out.push_str(&mask::reply(line, ReplyMask::Nothing));
                    out.push_str("}\n");
                }
            }
            What::Lost(n) => {
                let _ = writeln!(out, "{{\"time\":{},\"type\":\"lost\",\"count\":{n}}}", micros(at));
            }
        }
    }

    /// `{"time":T,"type":TYPE,"client":N` (open).
    fn start(&self, out: &mut String, at: SystemTime, kind: &str, client: u64) {
        let _ = write!(out, "{{\"time\":{},\"type\":\"{kind}\",\"client\":{client}", micros(at));
    }

    fn request_line(
        &self,
        out: &mut String,
        at: SystemTime,
        client: u64,
        seq: Option<u64>,
        req: Option<&mask::Request>,
        len: usize,
    ) {
        self.start(out, at, "request", client);
        if let Some(seq) = seq {
            let _ = write!(out, ",\"seq\":{seq}");
        } else {
            out.push_str(",\"by\":\"qmpmux\"");
        }
        out.push_str(",\"who\":");
        self.write_who(out, client);
        match req {
            Some(r) => {
                out.push_str(",\"command\":");
                match &r.command {
                    Some(c) => write_str(out, c),
                    None => out.push_str("null"),
                }
                if r.oob {
                    out.push_str(",\"oob\":true");
                }
                out.push_str(",\"request\":");
                out.push_str(&r.json);
            }
            // Not JSON: nothing of it is shown (a password may be in it).
            None => {
                let _ = write!(out, ",\"command\":null,\"request_bytes\":{len}");
            }
        }
        out.push_str("}\n");
    }

    /// `times`: qmpmux's queue and QEMU's, for QEMU's replies.
    #[allow(clippy::too_many_arguments)]
    fn reply_line(
        &self,
        out: &mut String,
        at: SystemTime,
        client: u64,
        seq: Option<u64>,
        command: Option<&str>,
        error: bool,
        times: Option<(Duration, Duration)>,
        text: &str,
    ) {
        self.start(out, at, "reply", client);
        if let Some(seq) = seq {
            let _ = write!(out, ",\"seq\":{seq}");
        }
        out.push_str(",\"command\":");
        match command {
            Some(c) => write_str(out, c),
            None => out.push_str("null"),
        }
        match times {
            Some((queued, qemu)) => {
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                let _ = write!(
                    out,
                    ",\"by\":\"qemu\",\"ms\":{:.3},\"queued_ms\":{:.3}",
                    ms(qemu),
                    ms(queued)
                );
            }
            None => out.push_str(",\"by\":\"qmpmux\""),
        }
        let _ = write!(out, ",\"error\":{error},\"reply\":{text}}}");
        out.push('\n');
    }

    /// Remembers request `seq` of `client`, for its reply.
    fn expect(&mut self, client: u64, seq: u64, req: Option<mask::Request>) {
        let waiting = self.pending.entry(client).or_default();
        if waiting.len() >= MAX_PENDING {
            waiting.clear();
        }
        let (command, mask) = match req {
            Some(r) => (r.command.map(String::into_boxed_str), r.reply),
            None => (None, ReplyMask::Return),
        };
        waiting.insert(seq, Pending { command, mask });
    }

    /// Request `seq` of `client` is answered: its command, and what the
    /// answer must lose (its `return` when the request was not seen).
    fn answered(&mut self, client: u64, seq: u64) -> (Option<Box<str>>, ReplyMask) {
        let found = self.pending.get_mut(&client).and_then(|w| w.remove(&seq));
        match found {
            Some(p) => (p.command, p.mask),
            None => (None, ReplyMask::Return),
        }
    }

    /// `{"client":N,...}`: the client as people know it.
    fn write_who(&self, out: &mut String, client: u64) {
        let _ = write!(out, "{{\"client\":{client}");
        match self.who.get(&client) {
            _ if client == 0 => out.push_str(",\"qmpmux\":true"),
            None => {}
            Some(w) => {
                match &w.peer {
                    PeerId::Unix { pid, uid } => {
                        let _ = write!(out, ",\"pid\":{pid},\"uid\":{uid}");
                    }
                    PeerId::Remote(r) => {
                        out.push_str(",\"remote\":");
                        write_str(out, r);
                    }
                    PeerId::Nats => out.push_str(",\"nats\":true"),
                }
                if let Some(l) = &w.listener {
                    out.push_str(",\"listener\":");
                    write_str(out, &l.name);
                }
            }
        }
        out.push('}');
    }
}

/// The last line when the daemon ends a tap.
pub fn end(reason: &str) -> String {
    let mut out = String::from("{\"type\":\"end\",\"reason\":");
    write_str(&mut out, reason);
    out.push_str("}\n");
    out
}

/// The one line when there is no tap: `kind` is `unknown-vm`, `usage` or
/// `busy`.
pub fn error(kind: &str, text: &str) -> String {
    let mut out = String::from("{\"type\":\"error\",\"kind\":");
    write_str(&mut out, kind);
    out.push_str(",\"error\":");
    write_str(&mut out, text);
    out.push_str("}\n");
    out
}

fn micros(at: SystemTime) -> u128 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

#[cfg(test)]
mod tests {
    use super::super::filter::Filters;
    use super::*;
    use crate::state::FailKind;
    use bytes::Bytes;
    use serde_json::Value;

    fn rec(what: What) -> Record {
        Record {
            at: UNIX_EPOCH + Duration::from_micros(1_796_000_000_000_042),
            what,
        }
    }

    fn who(client: u64, pid: i32) -> Who {
        let listener = crate::config::ListenerConfig::new("main", crate::config::Endpoint::unix("/x.sock"));
        Who {
            client,
            peer: PeerId::Unix { pid, uid: 0 },
            listener: Some(std::sync::Arc::new(listener)),
        }
    }

    fn lines(view: &mut View, records: Vec<What>) -> Vec<Value> {
        let mut out = String::new();
        for r in records {
            view.line(&rec(r), &mut out);
        }
        out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn reply_bytes(text: &str) -> crate::qmp::incoming::ReplyBytes {
        let bytes = Bytes::from(text.to_string());
        match crate::qmp::incoming::classify(&bytes).unwrap() {
            crate::qmp::incoming::Incoming::Reply(r) => r.bytes,
            other => panic!("{other:?}"),
        }
    }

    fn request(client: u64, seq: u64, tail: &str) -> What {
        What::Request {
            client,
            seq,
            tail: Bytes::from(tail.to_string()),
        }
    }

    #[test]
    fn a_command_its_reply_and_who() {
        let mut view = View::new("vm", Filter::default(), &[who(3, 1234)]);
        assert_eq!(
            view.hello(),
            "{\"type\":\"tap\",\"vm\":\"vm\",\"clients\":[{\"client\":3,\"pid\":1234,\"uid\":0,\"listener\":\"main\"}]}\n"
        );
        let got = lines(
            &mut view,
            vec![
                request(
                    3,
                    7,
                    r#","execute":"qom-get","arguments":{"path":"/objects/s0","property":"data"}}"#,
                ),
                What::Reply {
                    client: 3,
                    seq: 7,
                    reply: reply_bytes(r#"{"return": "hunter2", "id": 0}"#),
                    error: false,
                    queued: Duration::from_micros(10),
                    qemu: Duration::from_micros(210),
                },
                What::Joined(who(4, 99)),
                What::Left { client: 4 },
            ],
        );
        assert_eq!(got.len(), 4);
        assert_eq!(got[0]["type"], "request");
        assert_eq!(got[0]["time"], 1_796_000_000_000_042u64);
        assert_eq!(got[0]["seq"], 7);
        assert_eq!(got[0]["command"], "qom-get");
        assert_eq!(got[0]["who"]["pid"], 1234);
        assert_eq!(got[0]["request"]["arguments"]["property"], "data");
        assert_eq!(got[1]["type"], "reply");
        assert_eq!(got[1]["command"], "qom-get");
        assert_eq!(got[1]["by"], "qemu");
        assert_eq!(got[1]["ms"], 0.21);
        assert_eq!(got[1]["queued_ms"], 0.01);
        assert_eq!(got[1]["reply"], serde_json::json!({"return": "***"}));
        assert_eq!(got[2]["type"], "connect");
        assert_eq!(got[2]["who"]["pid"], 99);
        assert_eq!(got[3]["type"], "disconnect");
        assert_eq!(got[3]["who"]["pid"], 99);
    }

    #[test]
    fn replies_to_unseen_requests_lose_their_return() {
        let mut view = View::new("vm", Filter::default(), &[]);
        let got = lines(
            &mut view,
            vec![
                What::Reply {
                    client: 3,
                    seq: 1,
                    reply: reply_bytes(r#"{"return": "maybe a secret", "id": 0}"#),
                    error: false,
                    queued: Duration::ZERO,
                    qemu: Duration::ZERO,
                },
                What::Failed {
                    client: 3,
                    seq: 2,
                    kind: FailKind::Lost,
                },
            ],
        );
        assert_eq!(got[0]["reply"]["return"], "***");
        assert_eq!(got[0]["command"], Value::Null);
        assert_eq!(got[0]["who"], Value::Null);
        assert_eq!(got[1]["by"], "qmpmux");
        assert_eq!(got[1]["error"], true);
        assert!(got[1]["reply"]["error"]["desc"].as_str().unwrap().contains("VM 'vm'"));
    }

    #[test]
    fn local_answers_events_and_losses() {
        let mut view = View::new("vm", Filter::default(), &[who(3, 1)]);
        let got = lines(
            &mut view,
            vec![
                What::Local {
                    client: 3,
                    request: Some(Bytes::from_static(
                        br#"{"execute":"set_password","arguments":{"protocol":"vnc","password":"hunter2"},"id":1}"#,
                    )),
                    reply: Bytes::from_static(
                        b"{\"id\": 1, \"error\": {\"class\": \"GenericError\", \"desc\": \"not allowed\"}}\r\n",
                    ),
                },
                What::Local {
                    client: 3,
                    request: Some(Bytes::from_static(
                        br#"{"execute":"set_password","arguments":{"password":"hunter2""#,
                    )),
                    reply: Bytes::from_static(
                        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error\"}}\r\n",
                    ),
                },
                What::Event(Bytes::from_static(
                    b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n",
                )),
                What::Lost(17),
            ],
        );
        let text: String = got.iter().map(|v| v.to_string()).collect();
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(got.len(), 6, "{text}");
        assert_eq!(got[0]["by"], "qmpmux");
        assert_eq!(got[0]["request"]["arguments"]["password"], "***");
        assert_eq!(got[1]["error"], true);
        assert_eq!(got[1]["command"], "set_password");
        assert_eq!(got[2]["request_bytes"], 59);
        assert_eq!(got[2]["command"], Value::Null);
        assert_eq!(got[4]["event"], "STOP");
        assert_eq!(got[4]["message"]["timestamp"]["microseconds"], 2);
        assert_eq!(got[5]["type"], "lost");
        assert_eq!(got[5]["count"], 17);
    }

    #[test]
    fn filters_apply_to_replies_by_their_request_s_command() {
        let filter = Filter::new(Filters {
            commands: vec!["stop".into()],
            ..Filters::default()
        })
        .unwrap();
        let mut view = View::new("vm", filter, &[]);
        let answer = |seq| What::Answer {
            client: 3,
            seq,
            answer: Answer::Return("{}".into()),
        };
        let got = lines(
            &mut view,
            vec![
                request(3, 1, r#","execute":"stop"}"#),
                request(3, 2, r#","execute":"cont"}"#),
                answer(2),
                answer(1),
                What::Event(Bytes::from_static(b"{\"event\": \"STOP\"}")),
                What::Joined(who(4, 1)),
            ],
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["command"], "stop");
        assert_eq!(got[1]["type"], "reply");
        assert_eq!(got[1]["seq"], 1);
        assert_eq!(got[1]["by"], "qmpmux");
    }

    #[test]
    fn text_from_clients_is_json_escaped() {
        let mut view = View::new("v\"m\n", Filter::default(), &[]);
        assert!(view.hello().starts_with("{\"type\":\"tap\",\"vm\":\"v\\\"m\\n\""));
        let got = lines(&mut view, vec![request(3, 1, ",\"execute\":\"x\\u001b[2J\\u009b\"}")]);
        assert_eq!(got[0]["command"], "x\u{1b}[2J\u{9b}");
        assert_eq!(end("bye\n"), "{\"type\":\"end\",\"reason\":\"bye\\n\"}\n");
        let e: Value = serde_json::from_str(&error("unknown-vm", "no VM 'x'")).unwrap();
        assert_eq!(e["kind"], "unknown-vm");
    }
}
