//! QMP commands over NATS (`commands = true`): a request on
//! `<prefix>.<vm>.execute` whose payload is one QMP command runs on that
//! VM's session like a client's: the same checks and errors as on a
//! socket, the `[nats]` policy, fair turns (each requester, known by its
//! reply subject, is a client of its own to the session: see [`lanes`]),
//! the lease (over NATS, the holder is whoever sends the lease's token in
//! the `Qmpmux-Lease` header), the audit log with the subject as the
//! remote. The reply, QEMU's with the request's id, goes to the request's
//! reply subject. Who may send requests is for NATS's account permissions.
//!
//! Each VM's commander is a task owning its lanes (a client id and mailbox
//! each at the session) and the map of requests waiting for QEMU; the
//! router task hands it requests through a bounded channel.

use super::lanes::{self, Choice, Lanes};
use super::{FleetVm, Shared};
use crate::config::ClientOptions;
use crate::policy::Policy;
use crate::qmp::extensions::{self, Extension};
use crate::qmp::framing::{Frame, JsonFramer, Limits};
use crate::qmp::json::qemu_style;
use crate::qmp::outgoing::{error_line, NO_FD_PASSED};
use crate::qmp::request::{decide, Caps, Decision, Session};
use crate::state::LeaseToken;
use crate::upstream::fdnames::FdNameOp;
use crate::upstream::mailbox::{mailbox, MailboxReceiver};
use crate::upstream::{Request, ToClient};
use async_nats::Message;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{SelectAll, Stream, StreamExt};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::pin::Pin;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

/// Requests for one VM waiting for the commander; more get an error at once.
const QUEUE: usize = 256;
/// Requests one requester (lane) may have with the session at once; its
/// bytes are bounded by `[client] max_pending_bytes`'s default, as a
/// socket client's. More get an error at once.
const LANE_REQUESTS: usize = 256;
/// How often idle lanes are looked for.
const SWEEP: std::time::Duration = std::time::Duration::from_secs(5);
/// The header whose value is the lease token a command carries.
pub const LEASE_HEADER: &str = "Qmpmux-Lease";

/// The handle on one VM's commander.
pub struct Commander {
    tx: mpsc::Sender<Message>,
    shared: Shared,
}

impl Commander {
    pub fn spawn(
        shared: Shared,
        vm: FleetVm,
        policy: Policy,
        stop: CancellationToken,
        tasks: &TaskTracker,
        span: tracing::Span,
    ) -> Commander {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = Task {
            shared: shared.clone(),
            vm,
            policy,
            lanes: Lanes::new(lanes::MAX_LANES),
            mailboxes: SelectAll::new(),
            waiting: HashMap::new(),
            next_seq: 0,
        };
        tasks.spawn(task.run(rx, stop).instrument(span));
        Commander { tx, shared }
    }

    /// Hands a request over; answered with an error when the VM has too
    /// many waiting.
    pub async fn submit(&self, msg: Message) {
        if let Err(e) = self.tx.try_send(msg) {
            let (mpsc::error::TrySendError::Full(msg) | mpsc::error::TrySendError::Closed(msg)) = e;
            let desc = "qmpmux: too many NATS requests waiting for this VM; try again";
            answer_unrouted(&self.shared, msg, "GenericError", desc).await;
        }
    }
}

/// Answers a request qmpmux could not route, with the request's id.
pub async fn answer_unrouted(shared: &Shared, msg: Message, class: &str, desc: &str) {
    let id = request_id(&msg.payload);
    let line = error_line(id.as_deref(), class, desc);
    respond(shared, msg.reply.as_ref(), line).await;
}

/// The id of a request, as QEMU would echo it, if one can be read.
fn request_id(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct WithId<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
    }
    let w: WithId = serde_json::from_slice(payload).ok()?;
    w.id.map(qemu_style)
}

async fn respond(shared: &Shared, reply: Option<&async_nats::Subject>, line: Bytes) {
    let Some(reply) = reply else { return };
    let line = line.slice(..line.trim_ascii_end().len());
    let max = shared.client.server_info().max_payload;
    let line = if max > 0 && line.len() > max {
        error_line(
            None,
            "GenericError",
            &format!(
                "qmpmux: the reply ({} bytes) is larger than the NATS server's max_payload ({max}); the command was executed",
                line.len()
            ),
        )
    } else {
        line
    };
    if let Err(e) = shared.client.publish(reply.clone(), line).await {
        warn!(error = %e, "cannot send a reply over NATS");
    } else {
        shared.metrics.published.inc();
    }
}

/// A request waiting for the session.
struct Waiting {
    lane: u64,
    /// Its bytes, counted in its lane's until answered.
    bytes: usize,
    id: Option<Box<RawValue>>,
    reply: Option<async_nats::Subject>,
    command: String,
    subject: String,
    start: Instant,
}

/// A lane's mailbox as a stream of its messages, ending with `(lane,
/// None)` when the session drops the lane (detached, or not reading).
type LaneMailbox = Pin<Box<dyn Stream<Item = (u64, Option<ToClient>)> + Send>>;

fn lane_mailbox(lane: u64, mailbox: MailboxReceiver) -> LaneMailbox {
    Box::pin(futures_util::stream::unfold(Some(mailbox), move |mailbox| async move {
        let mut mailbox = mailbox?;
        match mailbox.recv().await {
            Some(msg) => Some(((lane, Some(msg)), Some(mailbox))),
            None => Some(((lane, None), None)),
        }
    }))
}

struct Task {
    shared: Shared,
    vm: FleetVm,
    policy: Policy,
    lanes: Lanes,
    /// Every lane's mailbox.
    mailboxes: SelectAll<LaneMailbox>,
    /// By request number (unique across lanes).
    waiting: HashMap<u64, Waiting>,
    next_seq: u64,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>, stop: CancellationToken) {
        let mut sweep = tokio::time::interval(SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Cancel-safe: SelectAll::next (each mailbox's pending receive
            // lives in its stream), a channel receive, a tick, a token.
            tokio::select! {
                Some((lane, msg)) = self.mailboxes.next(), if !self.mailboxes.is_empty() => match msg {
                    Some(msg) => self.on_session(msg).await,
                    None => self.lane_ended(lane).await,
                },
                msg = rx.recv() => match msg {
                    Some(msg) => self.on_request(msg).await,
                    None => break,
                },
                _ = sweep.tick() => self.sweep().await,
                () = stop.cancelled() => break,
            }
        }
        for lane in self.lanes.ids().collect::<Vec<_>>() {
            self.vm.session.detach(lane).await;
        }
    }

    /// The lane for a request replying to `reply`, attached if new; `None`
    /// if the session is gone.
    async fn lane(&mut self, reply: Option<&str>) -> Option<u64> {
        let (key, evicted) = match self.lanes.choose(lanes::key(reply)) {
            Choice::Lane(id) => return Some(id),
            Choice::Open { key, evicted } => (key, evicted),
        };
        if let Some(old) = evicted {
            self.vm.session.detach(old).await;
        }
        let id = crate::downstream::next_client_id();
        let (tx, mailbox) = mailbox(ClientOptions::default().max_queue_bytes);
        self.vm.session.attach_requester(id, tx).await.ok()?;
        self.mailboxes.push(lane_mailbox(id, mailbox));
        self.lanes.open(key, id, Instant::now());
        Some(id)
    }

    /// Detaches lanes that have been idle for a while.
    async fn sweep(&mut self) {
        for lane in self.lanes.idle(Instant::now()) {
            self.vm.session.detach(lane).await;
        }
    }

    /// The session dropped lane `lane` (the VM stops, or the lane's
    /// mailbox was full): its requests still waiting get an error (their
    /// outcome is unknown), its requester a new lane next time.
    async fn lane_ended(&mut self, lane: u64) {
        self.lanes.remove(lane);
        let lost: Vec<u64> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.lane == lane)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in lost {
            let kind = crate::upstream::FailKind::Stopping { sent: true };
            self.on_session(ToClient::Failed { seq, kind }).await;
        }
    }

    async fn on_request(&mut self, msg: Message) {
        let subject = msg.subject.to_string();
        let Some(frame) = one_frame(&msg.payload) else {
            let line = error_line(
                None,
                "GenericError",
                "qmpmux: a request's payload must be one QMP command",
            );
            return respond(&self.shared, msg.reply.as_ref(), line).await;
        };
        // Every request stands alone: negotiated, no out-of-band.
        let mut session = Session {
            negotiated: true,
            enabled: Caps::default(),
        };
        let policy = &self.policy;
        match decide(frame, &mut session, Caps::default(), |c, a| policy.admit(c, a)) {
            Decision::Local(line) => respond(&self.shared, msg.reply.as_ref(), line).await,
            Decision::Denied { line, command } => {
                let lane = self.lanes.find(lanes::key(msg.reply.as_deref())).unwrap_or(0);
                self.audit_lane(lane, &subject, &command, "denied by policy", Instant::now());
                respond(&self.shared, msg.reply.as_ref(), line).await
            }
            Decision::Forward(fwd) => self.forward(msg, subject, fwd).await,
        }
    }

    /// A command for the session, on its requester's lane.
    async fn forward(&mut self, msg: Message, subject: String, fwd: crate::qmp::request::Forward) {
        let id = fwd.id.as_deref().map(qemu_style);
        let refuse = |desc: &str| error_line(id.as_deref(), "GenericError", desc);
        if fwd.takes_fd {
            return respond(&self.shared, msg.reply.as_ref(), refuse(NO_FD_PASSED)).await;
        }
        let stopping = format!("qmpmux: VM '{}' is stopping", self.vm.name);
        let Some(lane) = self.lane(msg.reply.as_deref()).await else {
            return respond(&self.shared, msg.reply.as_ref(), refuse(&stopping)).await;
        };
        let bytes = fwd.tail.len();
        let max_bytes = ClientOptions::default().max_pending_bytes;
        if self
            .lanes
            .get(lane)
            .is_some_and(|l| l.waiting >= LANE_REQUESTS || l.bytes >= max_bytes)
        {
            let desc = format!(
                "qmpmux: this requester has too many requests waiting for VM '{}' (at most {LANE_REQUESTS}, {max_bytes} bytes); try again",
                self.vm.name
            );
            return respond(&self.shared, msg.reply.as_ref(), refuse(&desc)).await;
        }
        let token = lease_token(&msg);
        let seq = self.next_seq;
        self.next_seq += 1;
        let sent = if extensions::is_extension(&fwd.command) {
            match extensions::parse(&fwd.command, fwd.ext_arguments.as_deref()) {
                Ok(ext @ (Extension::QueryEvents { .. } | Extension::Lease { .. } | Extension::Release)) => {
                    let ext = crate::upstream::Extension {
                        ext,
                        who: format!("nats:{subject}"),
                        token,
                    };
                    self.vm.session.extension(lane, seq, ext).await
                }
                Ok(_) => {
                    let line = refuse(&format!("qmpmux: {} is not available over NATS", fwd.command));
                    return respond(&self.shared, msg.reply.as_ref(), line).await;
                }
                Err(r) => {
                    let line = error_line(id.as_deref(), r.class, &r.desc);
                    return respond(&self.shared, msg.reply.as_ref(), line).await;
                }
            }
        } else {
            let fdname = fwd.fdname.map(|n| match fwd.command.as_str() {
                "getfd" => FdNameOp::Get(n),
                _ => FdNameOp::Close(n),
            });
            let exempt = crate::upstream::lease::exempt(&fwd.command, &self.shared.lease_exempt);
            let request = Request {
                seq,
                tail: fwd.tail,
                oob: false,
                fd: None,
                fdname,
                exempt,
                lease: token,
            };
            self.vm.session.execute(lane, request).await
        };
        if sent.is_err() {
            return respond(&self.shared, msg.reply.as_ref(), refuse(&stopping)).await;
        }
        self.lanes.started(lane, bytes, Instant::now());
        self.waiting.insert(
            seq,
            Waiting {
                lane,
                bytes,
                id: fwd.id,
                reply: msg.reply,
                command: fwd.command,
                subject,
                start: Instant::now(),
            },
        );
    }

    async fn on_session(&mut self, msg: ToClient) {
        let error = matches!(&msg, ToClient::Reply { error: true, .. } | ToClient::Failed { .. });
        let seq = match &msg {
            ToClient::Reply { seq, .. } | ToClient::Failed { seq, .. } | ToClient::Answer { seq, .. } => *seq,
            ToClient::Event(_) | ToClient::Replay(_) | ToClient::Written(_) | ToClient::FdBack(_) => return,
        };
        let Some(w) = self.waiting.remove(&seq) else { return };
        self.lanes.finished(w.lane, w.bytes, Instant::now());
        let Some((_, line)) = msg.into_reply_line(&self.vm.name, w.id.as_deref()) else {
            return;
        };
        if !w.command.starts_with("query-") {
            self.audit_lane(
                w.lane,
                &w.subject,
                &w.command,
                if error { "error" } else { "ok" },
                w.start,
            );
        }
        respond(&self.shared, w.reply.as_ref(), line).await;
    }

    /// `lane`: the requester's client number (0: it has no lane, having
    /// had nothing for the session).
    fn audit_lane(&self, lane: u64, subject: &str, command: &str, outcome: &str, start: Instant) {
        info!(
            target: "qmpmux::audit",
            vm = %self.vm.name,
            listener = "nats",
            client = lane,
            remote = %format!("nats:{subject}"),
            command,
            outcome,
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "command"
        );
    }
}

/// The lease token a request carries in its `Qmpmux-Lease` header.
fn lease_token(msg: &Message) -> Option<LeaseToken> {
    let value = msg.headers.as_ref()?.get(LEASE_HEADER)?;
    Some(LeaseToken::new(value.as_str()))
}

/// The payload as one frame, with the socket's size and depth limits; `None`
/// unless it is exactly one message. Public for the fuzz targets.
pub fn one_frame(payload: &[u8]) -> Option<Frame> {
    let opts = ClientOptions::default();
    let mut framer = JsonFramer::new(Limits {
        max_message: opts.max_message_bytes,
        max_depth: opts.max_depth,
    });
    let mut buf = BytesMut::from(payload);
    let frame = framer.decode_eof(&mut buf).ok()??;
    let rest_blank = buf.iter().all(u8::is_ascii_whitespace);
    (rest_blank && framer.decode_eof(&mut buf).ok()?.is_none()).then_some(frame)
}
