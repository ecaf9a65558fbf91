//! What a VM's session keeps whether or not QEMU is connected: the
//! attached clients with their event filters, the router (turns and
//! correlation), `getfd` names, the numbered event history and the lease.
//! The session task owns it; clients reach it only through the session's
//! inbox, and it answers them through their mailboxes.

use super::fdnames::FdNames;
use super::lease::{Ask, Claim, Ended, Held, Lease, NotGranted, Refused};
use super::mailbox::{MailboxReceiver, MailboxSender, SendError};
use super::{Answer, Extension, Fetched, Request, Runstate, Status, ToClient, ToSession};
use crate::events::actions::Actions;
use crate::events::{EventFilter, History};
use crate::handover::state::{ClientState, InFlight, LeaseState, QueuedRequest, VmState};
use crate::ops::metrics::VmMetrics;
use crate::policy::Glob;
use crate::qmp::extensions::{self, Subscribe};
use crate::qmp::incoming::ReplyBytes;
use crate::qmp::outgoing::{closefd_tail, json_str, numbered, proxy_event};
use crate::router::{Route, Router};
use crate::runtime::fanout::{self, Sent};
use crate::state::{FailKind, LeaseToken};
use bytes::Bytes;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;
use tokio::time::Sleep;
use tracing::{info, warn};

/// Direct writes to idle clients' sockets, gathered and then made in one
/// go (`Hub::flush`): an event's to every client that waits for one, the
/// replies to one read from QEMU. Reused (its vectors keep their room).
#[derive(Default)]
struct Fanout {
    /// A client's socket and its line.
    sends: Vec<(RawFd, Bytes)>,
    /// Their outcomes.
    outcomes: Vec<Sent>,
    /// Whose socket each is, and for a reply, the client's request.
    to: Vec<(u64, Option<u64>)>,
    fanout: fanout::Fanout,
}

/// One attached client.
struct Member {
    mailbox: MailboxSender,
    filter: EventFilter,
    /// Events reach it with `__org.qmpmux_seq`.
    numbered: bool,
    /// A NATS requester's lane (`SessionHandle::attach_requester`).
    requester: bool,
    /// Handed over to the next process: its state so far, and its
    /// mailbox, where its events wait until the session's own handover.
    handed: Option<(Box<ClientState>, MailboxReceiver)>,
}

pub(super) struct Hub {
    vm: Arc<str>,
    clients: HashMap<u64, Member>,
    fanout: Fanout,
    pub router: Router,
    /// Who owns each `getfd` name in QEMU's monitor.
    pub fd_names: FdNames,
    history: History,
    lease: Lease,
    /// Fires when the lease runs out; armed while one is held.
    lease_timer: Pin<Box<Sleep>>,
    pub status: watch::Sender<Status>,
    pub metrics: VmMetrics,
    /// `[[vm.on_event]]` programs.
    actions: Actions,
    /// The number the next event will get, for publishers waiting.
    events_tx: watch::Sender<u64>,
    /// Handed over to the next process: the session stops.
    pub frozen: bool,
    /// What `qmpmux tap` sees of the VM.
    pub tap: Arc<super::tap::TapPoint>,
}

impl Hub {
    pub fn new(
        vm: &str,
        router: Router,
        history: History,
        status: watch::Sender<Status>,
        metrics: VmMetrics,
        actions: Actions,
        events_tx: watch::Sender<u64>,
    ) -> Hub {
        Hub {
            vm: vm.into(),
            clients: HashMap::new(),
            fanout: Fanout::default(),
            router,
            fd_names: FdNames::default(),
            history,
            lease: Lease::default(),
            lease_timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
            status,
            metrics,
            actions,
            events_tx,
            frozen: false,
            tap: super::tap::TapPoint::new(),
        }
    }

    /// Handles a client joining or leaving, or one of qmpmux's commands,
    /// the same whatever the runstate; hands any other message back.
    pub fn membership(&mut self, msg: ToSession) -> Option<ToSession> {
        match msg {
            ToSession::Attach {
                client,
                mailbox,
                events,
                requester,
                attached,
            } => {
                let member = Member {
                    mailbox,
                    filter: EventFilter::new(events),
                    numbered: false,
                    requester,
                    handed: None,
                };
                self.clients.insert(client, member);
                let _ = attached.send(());
            }
            ToSession::Detach { client } => self.detach(client),
            ToSession::HandOver {
                client,
                mut state,
                mailbox,
            } => match self.clients.get_mut(&client) {
                Some(m) => {
                    state.numbered = m.numbered;
                    state.narrowed = m.filter.narrowing();
                    m.handed = Some((state, mailbox));
                }
                None => warn!(client, "a client handed over after it was dropped; not handed over"),
            },
            ToSession::Freeze { done } => {
                let _ = done.send(self.freeze());
                self.frozen = true;
            }
            ToSession::Extension { client, seq, ext } => self.extension(client, seq, *ext),
            ToSession::Fetch { since, limit, reply } => {
                let r = self.history.since(since);
                let _ = reply.send(Fetched {
                    lost: r.lost,
                    oldest: r.oldest,
                    next: r.next,
                    events: r.events.take(limit).cloned().collect(),
                });
            }
            other => return Some(other),
        }
        None
    }

    /// Records QEMU's greeting for the connection up now (`None`: none is)
    /// in the journal, for a successor that takes the connection over.
    pub fn journal_greeting(&mut self, greeting: Option<&[u8]>) {
        if let Some(j) = self.history.journal_mut() {
            j.set_greeting(greeting);
        }
    }

    /// Records bytes read from QEMU that are not yet a whole message, for
    /// the process this one hands over to (which reads on after them).
    pub fn hand_over_leftover(&mut self, bytes: &[u8]) {
        let Some(j) = self.history.journal_mut() else { return };
        let mut marked = Vec::with_capacity(bytes.len() + 1);
        marked.push(b'G');
        marked.extend_from_slice(bytes);
        if !j.set_leftover(&marked) {
            warn!(
                bytes = bytes.len(),
                "a partial message from QEMU is too large to hand over; the next process skips it"
            );
        }
    }

    /// The VM's state for the next process: each client handed over, with
    /// the events that came for it since (in its unwritten bytes), the
    /// lease and the `getfd` names.
    fn freeze(&mut self) -> VmState {
        let mut clients = Vec::new();
        let (mut in_flight, mut queued) = (Vec::new(), Vec::new());
        let members: Vec<(u64, Member)> = self.clients.drain().collect();
        for (id, m) in members {
            let Some((mut state, mut mailbox)) = m.handed else {
                continue;
            };
            let takes_events = state.negotiated || state.subscribed_early;
            while let Some(msg) = mailbox.try_recv() {
                match msg {
                    ToClient::Event(line) if takes_events => state.unwritten.extend_from_slice(&line),
                    ToClient::Replay(lines) => lines.iter().for_each(|l| state.unwritten.extend_from_slice(l)),
                    ToClient::Reply { seq, reply, .. } => answer(&mut state, seq, |id| {
                        reply.line(id.map(crate::qmp::json::qemu_style).as_deref())
                    }),
                    ToClient::Failed { seq, kind } => {
                        answer(&mut state, seq, |id| super::failure_line(&self.vm, id, kind))
                    }
                    ToClient::Answer { seq, answer: a } => answer(&mut state, seq, |id| a.line(id)),
                    ToClient::Written(w) => answer(&mut state, w.seq, |_| w.rest),
                    _ => {}
                }
            }
            // Its commands QEMU still has: their replies go to the next
            // process, which routes them by these numbers.
            let (sent, waiting) = self.router.hand_over_client(id);
            in_flight.extend(sent.into_iter().map(|(n, seq, oob)| InFlight {
                n,
                client: id,
                seq,
                oob,
            }));
            for (seq, tail, oob, fd) in waiting {
                if fd.is_some() {
                    // An fd that never reached QEMU cannot follow its
                    // command: answered as not sent (not executed).
                    answer(&mut state, seq, |id| {
                        super::failure_line(&self.vm, id, FailKind::NotSent)
                    });
                } else {
                    queued.push(QueuedRequest {
                        client: id,
                        seq,
                        oob,
                        tail: tail.to_vec(),
                    });
                }
            }
            clients.push(*state);
        }
        clients.sort_by_key(|c| c.id);
        let now = Instant::now();
        let lease = self.lease.holder().map(|h| LeaseState {
            client: h.client,
            connection: h.connection,
            who: h.who.clone(),
            reason: h.reason.clone(),
            token: h.token.as_str().to_string(),
            left_ms: u64::try_from(h.until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX),
        });
        VmState {
            name: self.vm.to_string(),
            clients,
            lease,
            fd_names: self.fd_names.owned(),
            in_flight,
            queued,
        }
    }

    /// The clients, lease and `getfd` names the previous process handed
    /// over.
    pub fn restore(&mut self, state: &VmState, members: Vec<super::ResumedMember>) {
        let now = Instant::now();
        for r in &state.in_flight {
            let route = Route {
                client: r.client,
                seq: r.seq,
            };
            self.router.restore_sent(r.n, route, r.oob, now);
        }
        for q in &state.queued {
            let route = Route {
                client: q.client,
                seq: q.seq,
            };
            let tail = Bytes::from(q.tail.clone());
            if q.oob {
                self.router.submit_oob(route, tail, now);
            } else {
                self.router.submit(route, tail, now);
            }
        }
        for m in members {
            let mut filter = EventFilter::new(m.events);
            if let Some(patterns) = m.resumed.narrowed {
                filter.narrow(patterns.into_iter().map(Glob::new).collect());
            }
            let member = Member {
                mailbox: m.mailbox,
                filter,
                numbered: m.resumed.numbered,
                requester: false,
                handed: None,
            };
            self.clients.insert(m.client, member);
        }
        self.fd_names.restore(state.fd_names.iter().cloned());
        if let Some(l) = &state.lease {
            let held = Held {
                client: l.client,
                connection: l.connection,
                who: l.who.clone(),
                reason: l.reason.clone(),
                until: Instant::now() + std::time::Duration::from_millis(l.left_ms),
                token: LeaseToken::new(l.token.clone()),
            };
            self.lease_timer.as_mut().reset(held.until.into());
            self.status.send_modify(|s| s.lease = Some(held.clone()));
            self.metrics.lease_held.set(1);
            self.lease.restore(held);
        }
    }

    fn detach(&mut self, client: u64) {
        self.clients.remove(&client);
        // `getfd` names live in QEMU's monitor: close those this client
        // still owns, as QEMU closes a departed connection's fds. While
        // QEMU is away they wait in the queue for its return.
        let router = &self.router;
        let names = self.fd_names.detached(client, |r| router.is_in_flight(r));
        self.router.forget_client(client);
        self.close_fd_names(names);
        if let Some(held) = self.lease.disconnected(client) {
            self.lease_ended(held, Ended::Disconnected);
        }
    }

    /// Queues a `closefd` of each name; the replies go to client 0, which
    /// does not exist, and are dropped.
    pub fn close_fd_names(&mut self, names: impl IntoIterator<Item = String>) {
        let route = Route { client: 0, seq: 0 };
        for name in names {
            let tail = closefd_tail(&name);
            if self.tap.on() {
                let (client, seq, tail) = (0, 0, tail.clone());
                self.tap.offer(super::tap::What::Request { client, seq, tail });
            }
            self.router.submit(route, tail, Instant::now());
        }
    }

    /// Whether `client`'s request may go to QEMU now: `Err` with the
    /// answer when another client holds the lease and it is not exempt.
    pub fn admit(&self, client: u64, request: &Request, now: Instant) -> Result<(), Answer> {
        if request.exempt {
            return Ok(());
        }
        let claim = Claim {
            client,
            token: request.lease.as_ref(),
        };
        self.lease.check(claim, now).map_err(|refused| {
            self.metrics.lease_refusals.inc();
            match refused {
                Refused::Held(held) => Answer::Leased(held.refusal(&self.vm, now)),
                Refused::Stale => Answer::Leased(format!(
                    "qmpmux: the lease this command names (its token) is no longer held on VM '{}' (released or expired); the command was not executed",
                    self.vm
                )),
            }
        })
    }

    /// Numbers and keeps one event, and gives it to every client whose
    /// filter lets it through: QEMU's bytes to most, the numbered line
    /// (built once) to those that asked for numbers.
    pub fn event(&mut self, name: &str, line: Bytes) {
        let evicted = self.history.evicted();
        let seq = self.history.push(name, line.clone());
        self.metrics.history.set(self.history.len() as i64);
        self.metrics.evicted.inc_by(self.history.evicted() - evicted);
        self.actions.fire(name, &line, Some(seq));
        self.events_tx.send_replace(seq + 1);
        if self.tap.on() {
            self.tap.offer(super::tap::What::Event(line.clone()));
        }
        let mut with_seq: Option<Bytes> = None;
        let mut gone = Vec::new();
        // Idle clients get the event straight on their sockets, all in one
        // go (`Fanout`); the others in their mailboxes.
        let Fanout { sends, to, .. } = &mut self.fanout;
        for (&client, m) in &self.clients {
            if !m.filter.matches(name) {
                continue;
            }
            let line = if m.numbered {
                with_seq.get_or_insert_with(|| numbered(&line, seq)).clone()
            } else {
                line.clone()
            };
            match m.mailbox.direct_fd() {
                Some(fd) => {
                    sends.push((fd, line));
                    to.push((client, None));
                }
                None => {
                    if let Err(e) = m.mailbox.queue_event(line) {
                        gone.push((client, e == SendError::Full));
                    }
                }
            }
        }
        self.flush();
        for (client, full) in gone {
            self.drop_client(client, full);
        }
    }

    /// QEMU's reply to `client`'s request `seq`: straight to the client's
    /// socket if the client is idle and waits for this reply first (written
    /// at the next [`Hub::flush`], with the others), else to its mailbox.
    pub fn reply(&mut self, client: u64, seq: u64, reply: ReplyBytes, error: bool) {
        let direct = self
            .clients
            .get(&client)
            .and_then(|m| m.mailbox.direct_reply(seq, &reply));
        let Some((fd, line)) = direct else {
            let reply = Box::new(reply);
            return self.deliver(client, ToClient::Reply { seq, reply, error });
        };
        self.finished(client, seq, !error);
        self.fanout.sends.push((fd, line));
        self.fanout.to.push((client, Some(seq)));
    }

    /// Makes the direct writes gathered so far, all in one go; what did
    /// not go goes to the client's mailbox, to be written first.
    pub fn flush(&mut self) {
        let Fanout {
            sends,
            outcomes,
            to,
            fanout,
        } = &mut self.fanout;
        if sends.is_empty() {
            return;
        }
        fanout.send_all(sends, outcomes);
        let mut gone = Vec::new();
        for (((client, reply), (_, line)), sent) in to.drain(..).zip(sends.drain(..)).zip(outcomes.drain(..)) {
            let rest = match sent {
                Sent::All => continue,
                Sent::Part(n) => line.slice(n..),
                Sent::Nothing => line,
                Sent::Unknown => {
                    warn!(
                        client,
                        "the kernel did not complete a send to the client; disconnecting it"
                    );
                    gone.push((client, false));
                    continue;
                }
            };
            let Some(m) = self.clients.get(&client) else { continue };
            match reply {
                Some(seq) => m.mailbox.written_rest(seq, rest),
                None => {
                    if let Err(e) = m.mailbox.queue_event(rest) {
                        gone.push((client, e == SendError::Full));
                    }
                }
            }
        }
        for (client, full) in gone {
            self.drop_client(client, full);
        }
    }

    /// One of qmpmux's own events (`__org.qmpmux_NAME`): with `deliver`,
    /// numbered, kept and sent like QEMU's; without, only its actions run.
    pub fn proxy_event(&mut self, name: &str, data: &str, deliver: bool) {
        let full = format!("{}{name}", crate::qmp::outgoing::EXTENSION_PREFIX);
        let line = proxy_event(name, data);
        if deliver {
            self.event(&full, line);
        } else {
            self.actions.fire(&full, &line, None);
        }
    }

    pub fn deliver(&mut self, client: u64, msg: ToClient) {
        if matches!(msg, ToClient::Failed { .. }) {
            self.metrics.errors.inc();
        }
        // Every outcome of a forwarded request passes here, also for a
        // client that has left.
        let outcome = match &msg {
            ToClient::Reply { seq, error, .. } => Some((*seq, !error)),
            ToClient::Failed { seq, kind } => Some((*seq, kind.may_have_run())),
            ToClient::Event(_)
            | ToClient::Answer { .. }
            | ToClient::Replay(_)
            | ToClient::Written(_)
            | ToClient::FdBack(_) => None,
        };
        if let Some((seq, done)) = outcome {
            self.finished(client, seq, done);
        }
        if self.tap.on() {
            self.tap_answer(client, &msg);
        }
        let Some(member) = self.clients.get(&client) else {
            return;
        };
        if let Err(e) = member.mailbox.send(msg) {
            self.drop_client(client, e == SendError::Full);
        }
    }

    /// qmpmux's own answer (not QEMU's reply, which the session offers
    /// with its times), for the taps.
    fn tap_answer(&self, client: u64, msg: &ToClient) {
        use super::tap::What;
        let what = match msg {
            ToClient::Failed { seq, kind } => What::Failed {
                client,
                seq: *seq,
                kind: *kind,
            },
            ToClient::Answer { seq, answer } => What::Answer {
                client,
                seq: *seq,
                answer: (**answer).clone(),
            },
            _ => return,
        };
        self.tap.offer(what);
    }

    /// `client`'s request `seq` is over (`done`: it may have run).
    fn finished(&mut self, client: u64, seq: u64, done: bool) {
        if let Some(name) = self.fd_names.finished(Route { client, seq }, done) {
            self.close_fd_names([name]);
        }
    }

    /// Dropping its mailbox sender ends the client's task once it has
    /// written what it already has.
    fn drop_client(&mut self, client: u64, full: bool) {
        if full {
            warn!(
                client,
                "client is not reading: its queue of replies and events is full; disconnecting it"
            );
        }
        self.clients.remove(&client);
        self.router.forget_client(client);
    }

    /// Answers every outstanding command: those sent with `sent`, the
    /// others with `queued`.
    pub fn fail_outstanding(&mut self, sent: FailKind, queued: FailKind) {
        let abandoned = self.router.abandon();
        for (routes, kind) in [(abandoned.in_flight, sent), (abandoned.queued, queued)] {
            for r in routes {
                self.deliver(r.client, ToClient::Failed { seq: r.seq, kind });
            }
        }
    }

    /// A command while QEMU is not connected: an error at once (after the
    /// lease's, which says more).
    pub fn refuse_down(&mut self, client: u64, request: Request, state: Runstate) {
        let seq = request.seq;
        let msg = match self.admit(client, &request, Instant::now()) {
            Err(answer) => ToClient::Answer {
                seq,
                answer: Box::new(answer),
            },
            Ok(()) => ToClient::Failed {
                seq,
                kind: FailKind::Down(state),
            },
        };
        self.refuse(client, request, msg);
    }

    /// Answers `client`'s `request` with `msg` without sending it to QEMU.
    /// Its passed fd goes back to the client first, to wait for its next
    /// `getfd`/`add-fd`: QEMU keeps an fd that no command took.
    pub fn refuse(&mut self, client: u64, request: Request, msg: ToClient) {
        if let Some(fd) = request.fd {
            self.deliver(client, ToClient::FdBack(fd));
        }
        self.deliver(client, msg);
    }

    fn answer(&mut self, client: u64, seq: u64, answer: Answer) {
        let answer = Box::new(answer);
        self.deliver(client, ToClient::Answer { seq, answer });
    }

    fn extension(&mut self, client: u64, seq: u64, ext: Extension) {
        let now = Instant::now();
        match ext.ext {
            extensions::Extension::Subscribe(s) => self.subscribe(client, seq, s),
            extensions::Extension::QueryEvents { since, limit } => {
                let answer = self.query_events(client, since, limit);
                self.answer(client, seq, answer);
            }
            extensions::Extension::Lease { seconds, reason } => {
                let ask = Ask {
                    connection: !self.is_requester(client),
                    who: ext.who,
                    reason,
                    seconds,
                };
                self.take_lease(client, seq, ext.token, ask, now)
            }
            extensions::Extension::Release => self.release_lease(client, seq, ext.token),
            // Answered by the client task itself.
            extensions::Extension::QueryProxy => {}
        }
    }

    /// `__org.qmpmux_lease`: granted (or renewed) with the token in the
    /// answer, or refused.
    fn take_lease(&mut self, client: u64, seq: u64, token: Option<LeaseToken>, ask: Ask, now: Instant) {
        let seconds = ask.seconds;
        let claim = Claim {
            client,
            token: token.as_ref(),
        };
        let desc = match self.lease.acquire(claim, ask, now, super::lease::random_bytes) {
            Ok(held) => {
                let held = held.clone();
                self.lease_timer.as_mut().reset(held.until.into());
                let ret = format!(
                    "{{\"seconds\": {seconds}, \"token\": {}}}",
                    json_str(held.token.as_str())
                );
                self.answer(client, seq, Answer::Return(ret));
                return self.lease_granted(&held, seconds);
            }
            Err(NotGranted::Held(held)) => {
                format!("qmpmux: VM '{}' is already leased by {}", self.vm, held.describe(now))
            }
            Err(NotGranted::NoToken(e)) => {
                warn!(error = %e, "cannot make a lease token");
                format!(
                    "qmpmux: cannot make a lease token ({e}); VM '{}' is not leased",
                    self.vm
                )
            }
        };
        let class = "GenericError";
        self.answer(client, seq, Answer::Error { class, desc });
    }

    /// `__org.qmpmux_release`: by the holding connection, or with the
    /// lease's token.
    fn release_lease(&mut self, client: u64, seq: u64, token: Option<LeaseToken>) {
        let claim = Claim {
            client,
            token: token.as_ref(),
        };
        match self.lease.release(claim) {
            Some(held) => {
                self.answer(client, seq, Answer::Return("{}".into()));
                self.lease_ended(held, Ended::Released);
            }
            None => {
                let desc = self.not_holder(client);
                let class = "GenericError";
                self.answer(client, seq, Answer::Error { class, desc });
            }
        }
    }

    fn is_requester(&self, client: u64) -> bool {
        self.clients.get(&client).is_some_and(|m| m.requester)
    }

    /// Why `client` may not release the lease: over NATS, only the token
    /// makes a requester the holder.
    fn not_holder(&self, client: u64) -> String {
        match self.is_requester(client) {
            true => format!(
                "qmpmux: this request does not hold the lease of VM '{}' (over NATS, send the lease's token in the Qmpmux-Lease header)",
                self.vm
            ),
            false => format!("qmpmux: this client does not hold the lease of VM '{}'", self.vm),
        }
    }

    /// `__org.qmpmux_subscribe`: narrows the client's events, turns
    /// numbers on or off, and with `since` replays what it missed, all at
    /// one point in the VM's event stream: no gap, no duplicate.
    fn subscribe(&mut self, client: u64, seq: u64, s: Subscribe) {
        let Some(m) = self.clients.get_mut(&client) else {
            return;
        };
        if let Some(events) = s.events {
            m.filter.narrow(events.into_iter().map(Glob::new).collect());
        }
        // Resuming implies numbers (the next resume needs them), unless
        // the client says otherwise.
        if let Some(on) = s.sequence.or(s.since.map(|_| true)) {
            m.numbered = on;
        }
        let mut ret = format!("{{\"next\": {}", self.history.next());
        let mut replay = Vec::new();
        match s.since {
            Some(since) => {
                let r = self.history.since(since);
                let _ = write!(ret, ", \"lost\": {}", r.lost);
                if r.lost {
                    let _ = write!(ret, ", \"oldest\": {}", r.oldest);
                }
                replay.extend(
                    r.events
                        .filter(|e| m.filter.matches(&e.name))
                        .map(|e| numbered(&e.line, e.seq)),
                );
            }
            None => ret.push_str(", \"lost\": false"),
        }
        let patterns: Vec<String> = m.filter.client_patterns().iter().map(|p| json_str(p)).collect();
        let _ = write!(
            ret,
            ", \"events\": [{}], \"sequence\": {}}}",
            patterns.join(", "),
            m.numbered
        );
        self.answer(client, seq, Answer::Return(ret));
        if !replay.is_empty() {
            self.deliver(client, ToClient::Replay(replay.into_boxed_slice()));
        }
    }

    /// `__org.qmpmux_query-events`: kept events after `since` (all kept
    /// when absent) that the client's filter lets through, at most `limit`.
    fn query_events(&self, client: u64, since: Option<u64>, limit: usize) -> Answer {
        let Some(m) = self.clients.get(&client) else {
            return Answer::Return("{}".into());
        };
        let since = since.unwrap_or_else(|| self.history.oldest().saturating_sub(1));
        let r = self.history.since(since);
        let mut events = Vec::new();
        // A NATS requester sees every event, as NATS does.
        for e in r
            .events
            .filter(|e| m.requester || m.filter.matches(&e.name))
            .take(limit)
        {
            let line = numbered(&e.line, e.seq);
            events.push(String::from_utf8_lossy(line.trim_ascii_end()).into_owned());
        }
        Answer::Return(format!(
            "{{\"events\": [{}], \"next\": {}, \"lost\": {}, \"oldest\": {}}}",
            events.join(", "),
            r.next,
            r.lost,
            r.oldest
        ))
    }

    /// The lease was granted (or renewed): publish it and tell everyone.
    fn lease_granted(&mut self, held: &Held, seconds: u64) {
        self.status.send_modify(|s| s.lease = Some(held.clone()));
        self.metrics.lease_held.set(1);
        info!(target: "qmpmux::audit", vm = %self.vm, client = held.client, holder = %held.who,
            reason = %held.reason, seconds, "lease acquired");
        let data = format!("{{{}, \"seconds\": {seconds}}}", self.lease_members(held));
        self.proxy_event("LEASE_ACQUIRED", &data, true);
    }

    /// The lease ended (`how`): publish it and tell everyone.
    fn lease_ended(&mut self, held: Held, how: Ended) {
        self.status.send_modify(|s| s.lease = None);
        self.metrics.lease_held.set(0);
        info!(target: "qmpmux::audit", vm = %self.vm, client = held.client, holder = %held.who,
            how = how.as_str(), "lease ended");
        let data = format!("{{{}, \"how\": {}}}", self.lease_members(&held), json_str(how.as_str()));
        self.proxy_event("LEASE_RELEASED", &data, true);
    }

    /// The members both lease events carry.
    fn lease_members(&self, held: &Held) -> String {
        format!(
            "\"vm\": {}, \"client\": {}, \"holder\": {}, \"reason\": {}",
            json_str(&self.vm),
            held.client,
            json_str(&held.who),
            json_str(&held.reason)
        )
    }

    /// Whether a lease is held (its timer is worth waiting for).
    pub fn lease_held(&self) -> bool {
        self.lease.holder().is_some()
    }

    /// Waits for the lease's time to run out. Cancel-safe.
    pub async fn lease_timeout(&mut self) {
        self.lease_timer.as_mut().await;
    }

    /// The lease timer fired: end the lease if its time is up (a renewal
    /// may have moved it; the timer then waits again).
    pub fn expire_lease(&mut self) {
        let now = Instant::now();
        match self.lease.expire(now) {
            Some(held) => self.lease_ended(held, Ended::Expired),
            None => {
                if let Some(deadline) = self.lease.deadline() {
                    self.lease_timer.as_mut().reset(deadline.into());
                }
            }
        }
    }
}

/// Fills the handed-over request `seq` of `state` with the reply `make`
/// builds from its id: in its place among the requests, or (`exec-oob`)
/// at once, as the client would have.
fn answer(state: &mut ClientState, seq: u64, make: impl FnOnce(Option<&serde_json::value::RawValue>) -> Bytes) {
    let Some(at) = state.slots.iter().position(|s| s.seq == seq && !s.answered) else {
        return;
    };
    let id = state.slots[at]
        .id
        .as_ref()
        .and_then(|j| serde_json::value::RawValue::from_string(j.clone()).ok());
    let line = make(id.as_deref());
    if state.slots[at].oob {
        state.slots.remove(at);
        state.unwritten.extend_from_slice(&line);
    } else {
        state.slots[at].answered = true;
        state.slots[at].line = line.to_vec();
    }
    // Answered ones at the front go out, as the client's own would.
    while state.slots.first().is_some_and(|s| s.answered) {
        let s = state.slots.remove(0);
        state.unwritten.extend_from_slice(&s.line);
    }
}
