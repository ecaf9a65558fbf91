//! QMP commands over NATS (`commands = true`): a request on
//! `<prefix>.<vm>.execute` whose payload is one QMP command runs on that
//! VM's session like a client's: the same checks and errors as on a
//! socket, the `[nats]` policy, fair turns (all NATS requests for a VM are
//! one client to the session), the audit log with the subject as the
//! remote. The reply, QEMU's with the request's id, goes to the request's
//! reply subject. Who may send requests is for NATS's account permissions.
//!
//! Each VM's commander is a task owning its mailbox and the map of
//! requests waiting for QEMU; the router task hands it requests through a
//! bounded channel.

use super::{FleetVm, Shared};
use crate::config::ClientOptions;
use crate::policy::Policy;
use crate::qmp::extensions::{self, Extension};
use crate::qmp::framing::{Frame, JsonFramer, Limits};
use crate::qmp::json::qemu_style;
use crate::qmp::outgoing::{error_line, NO_FD_PASSED};
use crate::qmp::request::{decide, Caps, Decision, Session};
use crate::upstream::fdnames::FdNameOp;
use crate::upstream::mailbox::{mailbox, MailboxReceiver};
use crate::upstream::{Request, ToClient};
use async_nats::Message;
use bytes::{Bytes, BytesMut};
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

/// Requests for one VM waiting for the commander; more get an error at once.
const QUEUE: usize = 256;
/// Requests one VM's commander has with the session at once.
const IN_FLIGHT: usize = 64;

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
            id: crate::downstream::next_client_id(),
            vm,
            policy,
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
    id: Option<Box<RawValue>>,
    reply: Option<async_nats::Subject>,
    command: String,
    subject: String,
    start: Instant,
}

struct Task {
    shared: Shared,
    id: u64,
    vm: FleetVm,
    policy: Policy,
    waiting: HashMap<u64, Waiting>,
    next_seq: u64,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>, stop: CancellationToken) {
        let limit = ClientOptions::default().max_queue_bytes;
        let (tx, mut mailbox) = mailbox(limit);
        // No events: the fleet publishes those itself.
        let none: Arc<[crate::policy::Glob]> = Arc::from(Vec::new());
        if self.vm.session.attach(self.id, tx, Some(none)).await.is_err() {
            return;
        }
        loop {
            // Cancel-safe: channel receives and a token.
            tokio::select! {
                msg = mailbox.recv() => match msg {
                    Some(msg) => self.on_session(msg).await,
                    None => break,
                },
                msg = rx.recv(), if self.waiting.len() < IN_FLIGHT => match msg {
                    Some(msg) => self.on_request(msg).await,
                    None => break,
                },
                () = stop.cancelled() => break,
            }
        }
        self.vm.session.detach(self.id).await;
        drain(&mut mailbox);
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
                self.audit(&subject, &command, "denied by policy", Instant::now());
                respond(&self.shared, msg.reply.as_ref(), line).await
            }
            Decision::Forward(fwd) => {
                let id = fwd.id.as_deref().map(qemu_style);
                let refuse = |desc: &str| error_line(id.as_deref(), "GenericError", desc);
                if fwd.takes_fd {
                    return respond(&self.shared, msg.reply.as_ref(), refuse(NO_FD_PASSED)).await;
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                let sent = if extensions::is_extension(&fwd.command) {
                    match extensions::parse(&fwd.command, fwd.ext_arguments.as_deref()) {
                        Ok(ext @ (Extension::QueryEvents { .. } | Extension::Lease { .. } | Extension::Release)) => {
                            let ext = crate::upstream::Extension {
                                ext,
                                who: format!("nats:{subject}"),
                            };
                            self.vm.session.extension(self.id, seq, ext).await
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
                    };
                    self.vm.session.execute(self.id, request).await
                };
                if sent.is_err() {
                    let line = refuse(&format!("qmpmux: VM '{}' is stopping", self.vm.name));
                    return respond(&self.shared, msg.reply.as_ref(), line).await;
                }
                self.waiting.insert(
                    seq,
                    Waiting {
                        id: fwd.id,
                        reply: msg.reply,
                        command: fwd.command,
                        subject,
                        start: Instant::now(),
                    },
                );
            }
        }
    }

    async fn on_session(&mut self, msg: ToClient) {
        let error = matches!(&msg, ToClient::Reply { error: true, .. } | ToClient::Failed { .. });
        let seq = match &msg {
            ToClient::Reply { seq, .. } | ToClient::Failed { seq, .. } | ToClient::Answer { seq, .. } => *seq,
            ToClient::Event(_) | ToClient::Replay(_) | ToClient::Written(_) => return,
        };
        let Some(w) = self.waiting.remove(&seq) else { return };
        let Some((_, line)) = msg.into_reply_line(&self.vm.name, w.id.as_deref()) else {
            return;
        };
        if !w.command.starts_with("query-") {
            self.audit(&w.subject, &w.command, if error { "error" } else { "ok" }, w.start);
        }
        respond(&self.shared, w.reply.as_ref(), line).await;
    }

    fn audit(&self, subject: &str, command: &str, outcome: &str, start: Instant) {
        info!(
            target: "qmpmux::audit",
            vm = %self.vm.name,
            listener = "nats",
            client = self.id,
            remote = %format!("nats:{subject}"),
            command,
            outcome,
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            "command"
        );
    }
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

fn drain(mailbox: &mut MailboxReceiver) {
    while mailbox.try_recv().is_some() {}
}
