//! Property: whatever the interleaving of many clients' commands, upstream
//! replies and events, every client receives exactly its own replies, once
//! each, in request order, and every event, in upstream order relative to
//! those replies.

mod common;

use common::fake::FakeConn;
use common::Client;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::VecDeque;

const CLIENTS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// Client i sends a command (with or without an id).
    Send(usize, bool),
    /// QEMU answers the oldest command it has.
    Reply,
    /// QEMU emits an event.
    Event,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            4 => (0..CLIENTS, any::<bool>()).prop_map(|(c, id)| Op::Send(c, id)),
            3 => Just(Op::Reply),
            1 => Just(Op::Event),
        ],
        1..60,
    )
}

/// What one client must see, in order.
#[derive(Debug, PartialEq, Clone)]
enum Seen {
    Reply(Value),
    Event(u64),
}

struct Upstream {
    conn: FakeConn,
    /// Commands read from qmpmux, not yet answered, in QEMU's FIFO order.
    fifo: VecDeque<Value>,
    events: u64,
}

impl Upstream {
    /// Answers the oldest command; the reply says who sent it and what
    /// number it was, and carries our correlation id back.
    async fn reply(&mut self, expected: &mut [Vec<Seen>], outstanding: &mut usize) {
        if *outstanding == 0 {
            return;
        }
        if self.fifo.is_empty() {
            self.fifo
                .push_back(self.conn.read().await.expect("qmpmux closed upstream"));
        }
        let req = self.fifo.pop_front().unwrap();
        let tag = req["arguments"]["tag"].clone();
        let client = tag["client"].as_u64().unwrap() as usize;
        self.conn.reply(&req, tag.clone()).await;
        let mut want = json!({ "return": tag });
        if let Some(id) = tag.get("id").filter(|_| tag["has_id"] == true) {
            want["id"] = id.clone();
        }
        expected[client].push(Seen::Reply(want));
        *outstanding -= 1;
    }

    async fn event(&mut self, expected: &mut [Vec<Seen>]) {
        self.events += 1;
        let n = self.events;
        self.conn
            .write(&format!(
                "{{\"timestamp\": {{\"seconds\": 1, \"microseconds\": 2}}, \"event\": \"E\", \"data\": {{\"n\": {n}}}}}\r\n"
            ))
            .await;
        for e in expected.iter_mut() {
            e.push(Seen::Event(n));
        }
    }
}

async fn run_schedule(ops: Vec<Op>) {
    let (_dir, fake, daemon, sock) = common::fake::vm().await;
    let conn = fake.accept_ready().await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::ready(&sock).await);
    }
    let mut upstream = Upstream {
        conn,
        fifo: VecDeque::new(),
        events: 0,
    };
    let mut expected: Vec<Vec<Seen>> = vec![Vec::new(); CLIENTS];
    let mut sent = [0u64; CLIENTS];
    let mut outstanding = 0usize;
    for op in ops {
        match op {
            Op::Send(c, with_id) => {
                let tag = json!({"client": c, "n": sent[c], "id": ["c", c, sent[c]], "has_id": with_id});
                let id = if with_id {
                    format!(",\"id\":{}", tag["id"])
                } else {
                    String::new()
                };
                clients[c]
                    .send(&format!("{{\"execute\":\"x\",\"arguments\":{{\"tag\":{tag}}}{id}}}"))
                    .await;
                sent[c] += 1;
                outstanding += 1;
            }
            Op::Reply => upstream.reply(&mut expected, &mut outstanding).await,
            Op::Event => upstream.event(&mut expected).await,
        }
    }
    while outstanding > 0 {
        upstream.reply(&mut expected, &mut outstanding).await;
    }
    // A final event marks the end of each client's stream.
    upstream.event(&mut expected).await;
    for (c, want) in expected.iter().enumerate() {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let v = clients[c].recv().await;
            got.push(match v.get("event") {
                Some(_) => Seen::Event(v["data"]["n"].as_u64().unwrap()),
                None => Seen::Reply(v),
            });
        }
        assert_eq!(&got, want, "client {c}");
    }
    daemon.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn every_reply_once_to_its_sender_in_order(ops in ops()) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run_schedule(ops));
    }
}
