//! What a process handing over writes for its successor, besides the fds:
//! each VM's clients as they stand (the QMP state of each connection, the
//! bytes read but not yet a whole request, the bytes owed but not yet
//! written), its lease and `getfd` names; and counts for `qmpmux status`.
//!
//! The encoding: `QMPMUXS`, a format number (u32 LE), the length (u64 LE)
//! and CRC-32 (u32 LE) of the JSON that follows. A successor that cannot
//! read it (another format, truncated, corrupt) falls back to what a crash
//! leaves (the journal and the fds in systemd's store), and says so.

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 7] = b"QMPMUXS";
/// The format this build writes and reads.
pub const FORMAT: u32 = 1;
const HEADER: usize = MAGIC.len() + 4 + 8 + 4;
/// A state larger than this is refused (a client's unread and unwritten
/// bytes are bounded by its limits; 1 GiB is far beyond any).
const MAX_LEN: u64 = 1 << 30;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("too short to be a handover state ({0} bytes)")]
    Short(usize),
    #[error("not a handover state (bad magic)")]
    Magic,
    #[error("handover state format {0}; this qmpmux reads format {FORMAT}")]
    Format(u32),
    #[error("handover state truncated: {have} of {want} bytes")]
    Truncated { have: u64, want: u64 },
    #[error("handover state corrupt (checksum mismatch)")]
    Checksum,
    #[error("handover state unreadable: {0}")]
    Json(String),
}

/// Everything handed over.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// The qmpmux version that wrote it.
    pub version: String,
    /// When it stopped serving (microseconds since 1970), for the pause.
    pub frozen_at_us: u64,
    /// Handovers before this one, since the last start from nothing.
    pub handovers: u64,
    /// Recoveries from a crash, likewise.
    pub crash_recoveries: u64,
    /// Fallbacks to the crash path (a state that could not be read).
    pub fallbacks: u64,
    /// Clients this handover closed instead (TLS ones, whose session
    /// cannot move; those that left while it drained).
    pub clients_closed: u64,
    pub vms: Vec<VmState>,
}

/// One VM's part.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VmState {
    pub name: String,
    pub clients: Vec<ClientState>,
    /// The lease, if one is held.
    pub lease: Option<LeaseState>,
    /// `getfd` names in QEMU's monitor and the client that owns each.
    pub fd_names: Vec<(String, u64)>,
    /// Requests QEMU has not answered yet (still so when the handover
    /// stopped waiting for them): their replies come to the next process.
    pub in_flight: Vec<InFlight>,
    /// Requests not sent to QEMU yet, in the order they were submitted.
    pub queued: Vec<QueuedRequest>,
}

/// A request QEMU has and has not answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InFlight {
    /// The number qmpmux gave it upstream (QEMU's reply carries it).
    pub n: u64,
    pub client: u64,
    /// The client's own number for it.
    pub seq: u64,
    pub oob: bool,
}

/// A request not sent to QEMU yet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueuedRequest {
    pub client: u64,
    pub seq: u64,
    pub oob: bool,
    /// What follows `{"id": N` upstream.
    #[serde(with = "hex")]
    pub tail: Vec<u8>,
}

/// One of a client's requests, in its order: waiting for its reply, or
/// answered and waiting for those before it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SlotState {
    pub seq: u64,
    /// The id the client gave it (JSON text), if any.
    pub id: Option<String>,
    pub oob: bool,
    /// Bytes of the request, counted against the client's budget.
    pub bytes: usize,
    pub answered: bool,
    /// The reply line, once answered.
    #[serde(with = "hex")]
    pub line: Vec<u8>,
}

/// The lease as it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaseState {
    pub client: u64,
    pub connection: bool,
    pub who: String,
    pub reason: String,
    pub token: String,
    /// Milliseconds left.
    pub left_ms: u64,
}

/// One client connection, between two requests: every request it sent
/// was answered (or is still unread: `unread`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClientState {
    pub id: u64,
    /// Which of the VM's listeners it came in on (0: the main socket).
    pub listener: usize,
    /// It sent `qmp_capabilities`.
    pub negotiated: bool,
    /// The capabilities it enabled (`oob`).
    pub oob: bool,
    /// It subscribed before negotiating: events reach it.
    pub subscribed_early: bool,
    /// Its events carry `__org.qmpmux_seq`.
    pub numbered: bool,
    /// Its own event patterns (`__org.qmpmux_subscribe`); `None`: all the
    /// socket lets through.
    pub narrowed: Option<Vec<String>>,
    /// Bytes it sent that are not yet a whole request.
    #[serde(with = "hex")]
    pub unread: Vec<u8>,
    /// Bytes owed to it (replies, events) not yet written.
    #[serde(with = "hex")]
    pub unwritten: Vec<u8>,
    /// A passed fd waits for its next `getfd`/`add-fd` (handed over with
    /// it).
    pub passed_fd: bool,
    /// Its requests still waiting for a reply when the handover stopped
    /// waiting for QEMU, and answered ones behind them, in order.
    pub slots: Vec<SlotState>,
    /// The number its next request gets.
    pub next_seq: u64,
}

/// Encodes `state` for the successor.
pub fn encode(state: &State) -> Vec<u8> {
    frame(&serde_json::to_vec(state).unwrap_or_default())
}

/// `json` with the header [`decode`] checks (for [`encode`], and for the
/// fuzz target, which gets past the checksum this way).
pub fn frame(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
    out.extend_from_slice(json);
    out
}

/// Decodes what [`encode`] wrote; any other input is an error, never a
/// panic.
pub fn decode(bytes: &[u8]) -> Result<State, StateError> {
    if bytes.len() < HEADER {
        return Err(StateError::Short(bytes.len()));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(StateError::Magic);
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let format = word(MAGIC.len());
    if format != FORMAT {
        return Err(StateError::Format(format));
    }
    let len = u64::from_le_bytes(bytes[MAGIC.len() + 4..MAGIC.len() + 12].try_into().unwrap_or_default());
    let crc = word(MAGIC.len() + 12);
    let have = (bytes.len() - HEADER) as u64;
    if len > MAX_LEN || have < len {
        return Err(StateError::Truncated { have, want: len });
    }
    let json = &bytes[HEADER..HEADER + len as usize];
    if crc32fast::hash(json) != crc {
        return Err(StateError::Checksum);
    }
    serde_json::from_slice(json).map_err(|e| StateError::Json(e.to_string()))
}

/// Writes `bytes` to a new memfd, sealed against change, for the
/// successor.
pub fn to_memfd(bytes: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    use std::io::Write;
    let fd = memfd_create(
        c"qmpmux-handover",
        MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
    )
    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    let seals = nix::fcntl::SealFlag::F_SEAL_SEAL
        | nix::fcntl::SealFlag::F_SEAL_SHRINK
        | nix::fcntl::SealFlag::F_SEAL_GROW
        | nix::fcntl::SealFlag::F_SEAL_WRITE;
    let _ = nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&file),
        nix::fcntl::FcntlArg::F_ADD_SEALS(seals),
    );
    Ok(file.into())
}

/// Reads a state memfd (at most a little more than the largest state).
pub fn from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek};
    let mut file = std::fs::File::from(fd);
    file.rewind()?;
    let mut out = Vec::new();
    file.take(MAX_LEN + HEADER as u64 + 1).read_to_end(&mut out)?;
    Ok(out)
}

/// Bytes as a hex string in JSON (compact and plain for the few bytes a
/// client usually has pending).
mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <&str>::deserialize(d)?;
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(serde::de::Error::custom("not a hex digit")),
        };
        if text.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        text.as_bytes()
            .chunks(2)
            .map(|p| Ok(digit(p[0])? << 4 | digit(p[1])?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            version: "0.1.0".into(),
            frozen_at_us: 1_796_000_000_000_000,
            handovers: 3,
            crash_recoveries: 1,
            fallbacks: 0,
            clients_closed: 2,
            vms: vec![VmState {
                name: "web.01".into(),
                clients: vec![ClientState {
                    id: 7,
                    listener: 1,
                    negotiated: true,
                    oob: true,
                    numbered: true,
                    narrowed: Some(vec!["BLOCK_*".into()]),
                    unread: b"{\"execute\": \"qu".to_vec(),
                    unwritten: vec![0, 255, b'\r', b'\n'],
                    passed_fd: true,
                    slots: vec![
                        SlotState {
                            seq: 9,
                            id: Some("\"a\"".into()),
                            bytes: 30,
                            ..SlotState::default()
                        },
                        SlotState {
                            seq: 8,
                            answered: true,
                            line: b"{\"return\": {}}\r\n".to_vec(),
                            ..SlotState::default()
                        },
                    ],
                    next_seq: 11,
                    ..ClientState::default()
                }],
                lease: Some(LeaseState {
                    client: 7,
                    connection: true,
                    who: "client 7 (pid 1, uid 0)".into(),
                    reason: "migration".into(),
                    token: "abc".into(),
                    left_ms: 1500,
                }),
                fd_names: vec![("fd0".into(), 7)],
                in_flight: vec![InFlight {
                    n: 3,
                    client: 7,
                    seq: 9,
                    oob: false,
                }],
                queued: vec![QueuedRequest {
                    client: 7,
                    seq: 10,
                    oob: false,
                    tail: b", \"execute\": \"cont\"}".to_vec(),
                }],
            }],
        }
    }

    #[test]
    fn a_state_round_trips() {
        let s = sample();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        assert_eq!(decode(&encode(&State::default())).unwrap(), State::default());
    }

    #[test]
    fn truncated_corrupt_and_foreign_states_are_refused() {
        let bytes = encode(&sample());
        for cut in [0, 5, HEADER - 1, HEADER, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        assert_eq!(decode(&flipped), Err(StateError::Checksum));
        let mut newer = bytes.clone();
        newer[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(decode(&newer), Err(StateError::Format(2)));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert_eq!(decode(&other), Err(StateError::Magic));
        let mut huge = bytes;
        huge[MAGIC.len() + 4..MAGIC.len() + 12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&huge), Err(StateError::Truncated { .. })));
        // Valid framing around JSON of another shape.
        let json = br#"{"vms": 5}"#;
        let mut wrong = Vec::new();
        wrong.extend_from_slice(MAGIC);
        wrong.extend_from_slice(&FORMAT.to_le_bytes());
        wrong.extend_from_slice(&(json.len() as u64).to_le_bytes());
        wrong.extend_from_slice(&crc32fast::hash(json).to_le_bytes());
        wrong.extend_from_slice(json);
        assert!(matches!(decode(&wrong), Err(StateError::Json(_))));
    }

    #[test]
    fn a_state_travels_in_a_sealed_memfd() {
        let bytes = encode(&sample());
        let fd = to_memfd(&bytes).unwrap();
        let dup = fd.try_clone().unwrap();
        // Sealed: not writable any more.
        let mut f = std::fs::File::from(fd);
        assert!(std::io::Write::write_all(&mut f, b"x").is_err());
        assert_eq!(decode(&from_fd(dup).unwrap()).unwrap(), sample());
    }
}
