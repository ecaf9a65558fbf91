//! A QMP client for the command line: connects to a VM's socket, reads
//! the greeting, negotiates, runs commands and reads events. Events that
//! arrive while it waits for a reply are kept for [`Client::next`].
//! [`Client::into_split`] hands its two directions to a caller that reads
//! in a task of its own while it writes (`qmpmux shell`).

use super::CliError;
use serde_json::Value;
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The longest line the client takes (`query-qmp-schema` is some 200 KiB).
const MAX_LINE: usize = 64 << 20;

/// How long the greeting may take: qmpmux holds a new client up to
/// `greeting_wait_ms` while QEMU was never reachable.
pub const GREETING_WITHIN: Duration = Duration::from_secs(15);

/// One message as read: its text exactly as it came, and parsed.
#[derive(Debug, Clone)]
pub struct Line {
    pub text: String,
    pub value: Value,
}

impl Line {
    /// The event's name, if this is an event.
    pub fn event(&self) -> Option<&str> {
        self.value.get("event").and_then(Value::as_str)
    }

    /// `(class, desc)` if this is an error reply.
    pub fn error(&self) -> Option<(&str, &str)> {
        let e = self.value.get("error")?;
        Some((
            e.get("class").and_then(Value::as_str).unwrap_or("GenericError"),
            e.get("desc").and_then(Value::as_str).unwrap_or(""),
        ))
    }

    /// The `return` member's text, in QEMU's order (for showing).
    pub fn return_text(&self) -> Option<String> {
        let ordered = super::show::Ordered::parse(&self.text).ok()?;
        ordered.get("return").map(super::show::Ordered::pretty)
    }
}

pub struct Client {
    vm: String,
    reader: Reader,
    write: OwnedWriteHalf,
    /// QEMU's greeting, as qmpmux passed it on.
    pub greeting: Line,
    next_id: u64,
}

/// The reading half of a connection: every message in the order qmpmux
/// sent it, after the events the [`Client`] kept while it waited for
/// replies.
pub struct Reader {
    vm: String,
    read: BufReader<OwnedReadHalf>,
    /// Events read while waiting for a reply, oldest first.
    pending: VecDeque<Line>,
}

impl Reader {
    /// The next message (kept events first); `None` when the connection
    /// ends. Cancel-safe only between messages: a partly read line is lost
    /// if the future is dropped.
    pub async fn next(&mut self) -> Result<Option<Line>, CliError> {
        if let Some(line) = self.pending.pop_front() {
            return Ok(Some(line));
        }
        read_line(&mut self.read, &self.vm).await
    }
}

impl Client {
    /// Connects to VM `vm`'s socket `path` and reads the greeting.
    pub async fn connect(vm: &str, path: &Path) -> Result<Client, CliError> {
        let stream = UnixStream::connect(path).await.map_err(|source| CliError::Connect {
            vm: crate::ops::escape::escaped(vm),
            path: path.display().to_string(),
            hint: connect_hint(&source),
            source,
        })?;
        let (read, write) = stream.into_split();
        let mut read = BufReader::with_capacity(64 << 10, read);
        let greeting = match tokio::time::timeout(GREETING_WITHIN, read_line(&mut read, vm)).await {
            Err(_) => {
                return Err(CliError::Timeout {
                    vm: vm.into(),
                    seconds: GREETING_WITHIN.as_secs_f64(),
                })
            }
            Ok(Ok(Some(line))) if line.value.get("QMP").is_some() => line,
            Ok(Ok(Some(line))) => {
                return Err(CliError::Protocol {
                    vm: vm.into(),
                    what: format!("expected QMP's greeting, got {}", super::show::pretty(&line.text)),
                })
            }
            Ok(Ok(None)) => return Err(CliError::NoGreeting { vm: vm.into() }),
            Ok(Err(e)) => return Err(e),
        };
        Ok(Client {
            vm: vm.to_owned(),
            reader: Reader {
                vm: vm.to_owned(),
                read,
                pending: VecDeque::new(),
            },
            write,
            greeting,
            next_id: 1,
        })
    }

    /// The VM's name.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// `qmp_capabilities`.
    pub async fn negotiate(&mut self) -> Result<(), CliError> {
        let reply = self.execute("qmp_capabilities", None).await?;
        into_result(&self.vm, reply).map(drop)
    }

    /// Sends `command` with `arguments` and waits for its reply (error
    /// replies included: see [`into_result`]).
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<&serde_json::Map<String, Value>>,
    ) -> Result<Line, CliError> {
        let id = Value::from(self.next_id);
        self.next_id += 1;
        let mut line = super::args::request(command, arguments, Some(&id));
        line.push('\n');
        self.send_raw(&line).await?;
        loop {
            let Some(msg) = read_line(&mut self.reader.read, &self.vm).await? else {
                return Err(CliError::Closed {
                    vm: self.vm.clone(),
                    during: " before the reply came",
                });
            };
            if msg.event().is_some() {
                self.reader.pending.push_back(msg);
            } else if msg.value.get("id") == Some(&id) {
                return Ok(msg);
            } else {
                return Err(CliError::Protocol {
                    vm: self.vm.clone(),
                    what: format!("a reply to a request not sent: {}", super::show::pretty(&msg.text)),
                });
            }
        }
    }

    /// Writes `text` as it is.
    pub async fn send_raw(&mut self, text: &str) -> Result<(), CliError> {
        self.write
            .write_all(text.as_bytes())
            .await
            .map_err(|source| CliError::Io {
                vm: self.vm.clone(),
                source,
            })
    }

    /// The next message: events kept while waiting for a reply first;
    /// `None` when the connection ends.
    pub async fn next(&mut self) -> Result<Option<Line>, CliError> {
        self.reader.next().await
    }

    /// Events kept while waiting for replies, taken.
    pub fn take_pending(&mut self) -> Vec<Line> {
        self.reader.pending.drain(..).collect()
    }

    /// The connection's two directions: the reader (with the events kept
    /// so far) and the writing half. Requests written from then on are the
    /// caller's to match with replies (QMP answers one client's commands in
    /// the order it sent them).
    pub fn into_split(self) -> (Reader, OwnedWriteHalf) {
        (self.reader, self.write)
    }
}

/// A reply as a result: QEMU's (or qmpmux's) error reply is
/// [`CliError::Qmp`], or [`CliError::QemuDown`] when qmpmux says QEMU is
/// not connected (the command did not run, or its outcome is unknown).
pub fn into_result(vm: &str, reply: Line) -> Result<Line, CliError> {
    let Some((class, desc)) = reply.error() else {
        return Ok(reply);
    };
    let unreachable = desc.starts_with("qmpmux: ")
        && (desc.contains("is not connected") || desc.contains("connection to QEMU monitor"));
    if unreachable {
        return Err(CliError::QemuDown {
            vm: crate::ops::escape::escaped(vm),
            desc: crate::ops::escape::escaped(desc),
        });
    }
    Err(CliError::Qmp {
        class: crate::ops::escape::escaped(class),
        desc: crate::ops::escape::escaped(desc),
    })
}

fn connect_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            " (permission denied: the socket's owner, group and mode (`socket_mode`, `socket_group`) do not let this user in)"
        }
        std::io::ErrorKind::NotFound => " (no such socket: is qmpmux running?)",
        std::io::ErrorKind::ConnectionRefused => " (nothing listens there: is qmpmux running?)",
        _ => "",
    }
}

/// One line, without its newline; `None` at the end of the connection.
async fn read_line(read: &mut BufReader<OwnedReadHalf>, vm: &str) -> Result<Option<Line>, CliError> {
    let mut bytes = Vec::new();
    loop {
        let chunk = read
            .fill_buf()
            .await
            .map_err(|source| CliError::Io { vm: vm.into(), source })?;
        if chunk.is_empty() {
            return Ok(None);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        bytes.extend_from_slice(&chunk[..take]);
        read.consume(take);
        if bytes.len() > MAX_LINE {
            return Err(CliError::Protocol {
                vm: vm.into(),
                what: format!("a message longer than {} MiB", MAX_LINE >> 20),
            });
        }
        if done {
            break;
        }
    }
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Box::pin(read_line(read, vm)).await;
    }
    let text = String::from_utf8(bytes).map_err(|_| CliError::Protocol {
        vm: vm.into(),
        what: "a message that is not UTF-8".into(),
    })?;
    let value = serde_json::from_str(&text).map_err(|_| CliError::Protocol {
        vm: vm.into(),
        what: format!("a message that is not JSON: {}", crate::ops::escape::escaped(&text)),
    })?;
    Ok(Some(Line { text, value }))
}
