//! A crash-proof journal of one VM's numbered events, kept in a memfd that
//! outlives the process: systemd's file descriptor store (or a re-executed
//! qmpmux) hands it to the next qmpmux, which rebuilds the [`History`]
//! with the same numbers even after `kill -9`.
//!
//! # Layout
//! All integers are little-endian. The buffer is a metadata region of
//! [`META_SIZE`] bytes followed by the data region (`capacity` bytes, a
//! multiple of 8):
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `QMPMUXJ1` |
//! | 8 | format version, u32 (1) |
//! | 12 | reserved, zero |
//! | 16 | capacity of the data region, u64 |
//! | 24 | `head`, u64: offset of the oldest record in the data region |
//! | 32 | `tail`, u64: offset where the next record goes |
//! | 40 | `next`, u64: the number the next event gets |
//! | 48 | greeting length, u32 (`0xFFFF_FFFF`: none) |
//! | 52 | crc32 of the greeting |
//! | 56 | leftover length, u32 |
//! | 60 | crc32 of the leftover |
//! | 64 | the greeting (QEMU's greeting line), at most [`MAX_GREETING`] bytes |
//! | 4096 | the leftover, at most [`MAX_LEFTOVER`] bytes |
//!
//! The data region is a ring of records, each aligned to 8 bytes: u32 total
//! length (header, name, line, padding), u32 crc32 of everything after these
//! 8 bytes (padding included), u64 seq, u16 name length, u8 flags
//! (1: the number was skipped), u8 reserved (zero), u32 line length, then the
//! name and the line. A record never straddles the end of the region: when
//! one does not fit before the end, a length of 0 there (a wrap marker)
//! says the ring goes on at offset 0. `head == tail` means empty; `tail`
//! never catches up with `head` from behind (one more record is evicted).
//!
//! # Crash safety
//! An append (1) evicts, storing the new `head` first, (2) writes the
//! record (and a wrap marker) in bytes that are not between `head` and
//! `tail`, (3) commits: stores `tail`, then `next`. So at every instant
//! `head..tail` is a valid chain of records; a crash between the two stores
//! of the commit is repaired by recovery (`next` is at least the last
//! number plus one). Stores are ordered with fences (the mapping outlives a
//! killed process, so only their order matters, not their durability). The
//! greeting and the leftover are invalidated (length none / 0) before their
//! bytes change and carry a crc. So the journal must be appended to before
//! an event goes to anyone: a number is only given out once committed.
//!
//! Recovery ([`recover`]) checks every field and every record (length,
//! crc, numbers growing by exactly one) and keeps the valid prefix of the
//! chain, reporting `truncated` when it stopped early. It returns only what
//! the history can be rebuilt from: the contiguous run of events after the
//! last gap (an event too large for the journal is recorded as a skipped
//! number), and none at all when that run does not end just before `next`
//! (events were lost between them). It never panics on arbitrary bytes and
//! allocates in proportion to the buffer (each kept byte once, plus one
//! entry per record of at least 32 bytes), whatever its length fields say.
//!
//! [`Ring`] is the pure core over any byte buffer (tests and the fuzz target
//! use a `Vec<u8>`); [`Journal`] is the ring in a sealed memfd.
//!
//! [`History`]: super::history::History

use super::history::Entry;
use bytes::Bytes;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

/// The bytes before the data region: the header with the greeting, then
/// the leftover area.
pub const META_SIZE: usize = LEFTOVER_AT + MAX_LEFTOVER;
/// The largest greeting kept.
pub const MAX_GREETING: usize = LEFTOVER_AT - GREETING_AT;
/// The most bytes of an unfinished message kept across a handover.
pub const MAX_LEFTOVER: usize = 64 * 1024;
/// The smallest data region (room for two records with the longest name).
pub const MIN_CAPACITY: usize = 512;
/// The largest data region (record lengths are u32, at most half of it).
pub const MAX_CAPACITY: usize = 1 << 30;
/// Event names are clipped to this many bytes.
pub const MAX_NAME: usize = 128;

const MAGIC: &[u8; 8] = b"QMPMUXJ1";
const VERSION: u32 = 1;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_CAPACITY: usize = 16;
const OFF_HEAD: usize = 24;
const OFF_TAIL: usize = 32;
const OFF_NEXT: usize = 40;
const OFF_GREETING_LEN: usize = 48;
const OFF_GREETING_CRC: usize = 52;
const OFF_LEFTOVER_LEN: usize = 56;
const OFF_LEFTOVER_CRC: usize = 60;
const GREETING_AT: usize = 64;
const LEFTOVER_AT: usize = 4096;
/// Greeting length meaning "no greeting".
const NO_GREETING: u32 = u32::MAX;

/// Record header: length, crc, seq, name length, flags, reserved, line length.
const RECORD_HEADER: usize = 24;
/// The record stands for an event too large to keep: its number was given
/// out, so the events before it cannot be resumed from.
const SKIPPED: u8 = 1;

/// Why a journal could not be created or adopted.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot create the journal's memfd")]
    Create(#[source] io::Error),
    #[error("a journal of {0} bytes does not have a valid size ({META_SIZE} + a data region of {MIN_CAPACITY} to {MAX_CAPACITY} bytes, a multiple of 8)")]
    Size(u64),
    #[error("not a qmpmux journal (wrong magic)")]
    Magic,
    #[error("journal format version {0}; this qmpmux reads version {VERSION}")]
    Version(u32),
    #[error("the journal is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("the journal's descriptor is not one qmpmux made: {0}")]
    Foreign(&'static str),
    #[error("cannot map the journal")]
    Map(#[source] io::Error),
}

/// What a journal held.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// Events numbered one after the other, oldest first, the last one
    /// numbered `next - 1` (or none).
    pub events: Vec<Entry>,
    /// The number the next event gets.
    pub next: u64,
    /// QEMU's greeting, if one was stored.
    pub greeting: Option<Vec<u8>>,
    /// Bytes from QEMU that were not yet a whole message.
    pub leftover: Vec<u8>,
    /// Something was lost: a corrupt record (and what followed it), events
    /// before a hole, or a damaged greeting or leftover.
    pub truncated: bool,
}

/// What a journal in `bytes` holds (pure: for the fuzz target and tests).
pub fn recover(bytes: &[u8]) -> Result<Recovered, JournalError> {
    let scan = scan(bytes)?;
    Ok(recovered(bytes, &scan))
}

/// The data capacity for a history of at most `max_events` events and
/// `max_bytes` bytes (see [`History::new`]) such that the journal always
/// holds every event the history keeps (but an event larger than half the
/// capacity, which is skipped): the history counts an event as its line
/// plus 64 bytes, a record takes up to 24 + [`MAX_NAME`] + 7 bytes more
/// than its line, and the ring may waste up to one record at its end.
/// At least 256 KiB, at most [`MAX_CAPACITY`].
///
/// [`History::new`]: super::history::History::new
pub fn capacity_for(max_events: usize, max_bytes: usize) -> usize {
    let events = max_events.min(max_bytes / 64 + 1);
    let want = max_bytes
        .saturating_mul(2)
        .saturating_add(events.saturating_mul(96))
        .saturating_add(64 * 1024);
    round8(want.clamp(256 * 1024, MAX_CAPACITY)).min(MAX_CAPACITY)
}

/// A journal in a memfd of its own, sealed against resizing.
#[derive(Debug)]
pub struct Journal {
    file: File,
    ring: Ring<memmap2::MmapMut>,
}

impl Journal {
    /// A new, empty journal whose data region holds `capacity` bytes
    /// (rounded up to a multiple of 8) and whose first event will be `next`.
    pub fn create(vm: &str, capacity: usize, next: u64) -> Result<Journal, JournalError> {
        let capacity = round8(capacity);
        if !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
            let len = META_SIZE.saturating_add(capacity);
            return Err(JournalError::Size(u64::try_from(len).unwrap_or(u64::MAX)));
        }
        let file = memfd(vm).map_err(JournalError::Create)?;
        let len = u64::try_from(META_SIZE + capacity).map_err(|_| JournalError::Size(u64::MAX))?;
        file.set_len(len).map_err(JournalError::Create)?;
        seal(&file).map_err(JournalError::Create)?;
        let ring = Ring::create(map(&file)?, next)?;
        Ok(Journal { file, ring })
    }

    /// A journal handed over by the previous process, and what it held.
    /// The descriptor must be a memfd sealed against resizing, of a valid
    /// size; on an error the caller logs it and creates a fresh journal.
    /// The leftover stays stored until [`Journal::set_leftover`] clears it.
    pub fn adopt(fd: OwnedFd) -> Result<(Journal, Recovered), JournalError> {
        let file = File::from(fd);
        let meta = file.metadata().map_err(JournalError::Map)?;
        if !meta.is_file() {
            return Err(JournalError::Foreign("not a regular file"));
        }
        let seals = nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS)
            .map_err(|_| JournalError::Foreign("not a memfd"))?;
        let needed = nix::fcntl::SealFlag::F_SEAL_SHRINK | nix::fcntl::SealFlag::F_SEAL_GROW;
        if !nix::fcntl::SealFlag::from_bits_truncate(seals).contains(needed) {
            return Err(JournalError::Foreign("its size is not sealed"));
        }
        let len = usize::try_from(meta.len()).map_err(|_| JournalError::Size(meta.len()))?;
        if !valid_len(len) {
            return Err(JournalError::Size(meta.len()));
        }
        let (ring, recovered) = Ring::adopt(map(&file)?)?;
        Ok((Journal { file, ring }, recovered))
    }

    /// The memfd, to hand to systemd or the next process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Journals event `seq` (see [`Ring::append`]).
    pub fn append(&mut self, seq: u64, name: &str, line: &[u8]) {
        if seq == u64::MAX {
            // Never given out (numbers stay below 2^53): it has no next.
            return;
        }
        self.ring.append(seq, name, line);
    }

    /// Stores QEMU's greeting, or that there is none; false (and none
    /// stored) if it is longer than [`MAX_GREETING`].
    pub fn set_greeting(&mut self, greeting: Option<&[u8]>) -> bool {
        self.ring.set_greeting(greeting)
    }

    /// Stores bytes read from QEMU that are not a whole message yet (an
    /// empty slice clears them); false (and nothing stored) if longer than
    /// [`MAX_LEFTOVER`].
    pub fn set_leftover(&mut self, bytes: &[u8]) -> bool {
        self.ring.set_leftover(bytes)
    }

    /// Bytes in the data region.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }
}

/// A memfd named after the VM, closed on exec, that can be sealed.
fn memfd(vm: &str) -> io::Result<File> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    // Names are limited to 249 bytes; the VM's is only a label.
    let name = format!("qmpmux-journal-{}", clip(vm, 200));
    let name = std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fd = memfd_create(&name, MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING)?;
    Ok(File::from(fd))
}

/// Seals the memfd's size, so that no holder can shrink it under a mapping.
fn seal(file: &File) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
    fcntl(file.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals))?;
    Ok(())
}

fn map(file: &File) -> Result<memmap2::MmapMut, JournalError> {
    // SAFETY: the file is a memfd qmpmux made (or adopted after checking it
    // is one): its size was checked before mapping and is sealed, so the
    // mapping never loses pages under us (no SIGBUS); only one qmpmux
    // process writes it at a time, systemd just keeps the descriptor.
    #[allow(unsafe_code)]
    let mapped = unsafe { memmap2::MmapMut::map_mut(file) };
    mapped.map_err(JournalError::Map)
}

/// The ring of records over a buffer of [`META_SIZE`] + capacity bytes.
#[derive(Debug, Clone)]
pub struct Ring<B> {
    buf: B,
    capacity: usize,
    head: usize,
    tail: usize,
    next: u64,
    /// Tests simulate a crash: writes left, in halves (see `write`).
    #[cfg(test)]
    budget: Option<usize>,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Ring<B> {
    /// An empty journal over `buf` (whatever it held), whose first event
    /// will be `next`.
    pub fn create(buf: B, next: u64) -> Result<Ring<B>, JournalError> {
        let len = buf.as_ref().len();
        if !valid_len(len) {
            return Err(JournalError::Size(u64::try_from(len).unwrap_or(u64::MAX)));
        }
        let mut ring = Ring::with(buf, len - META_SIZE, 0, 0, next);
        // The magic last: a journal whose creation was cut short is not one.
        ring.write(OFF_MAGIC, &[0; 8]);
        ring.write_u32(OFF_VERSION, VERSION);
        ring.write_u32(OFF_VERSION + 4, 0);
        ring.write_u64(OFF_CAPACITY, ring.capacity as u64);
        ring.write_u64(OFF_HEAD, 0);
        ring.write_u64(OFF_TAIL, 0);
        ring.write_u64(OFF_NEXT, next);
        ring.write_u32(OFF_GREETING_LEN, NO_GREETING);
        ring.write_u32(OFF_GREETING_CRC, 0);
        ring.write_u32(OFF_LEFTOVER_LEN, 0);
        ring.write_u32(OFF_LEFTOVER_CRC, 0);
        fence(Ordering::Release);
        ring.write(OFF_MAGIC, MAGIC);
        Ok(ring)
    }

    /// The journal in `buf`, and what it held. The header is rewritten to
    /// hold just that (what recovery dropped is gone).
    pub fn adopt(buf: B) -> Result<(Ring<B>, Recovered), JournalError> {
        let bytes = buf.as_ref();
        let scan = scan(bytes)?;
        let recovered = recovered(bytes, &scan);
        let mut ring = Ring::with(buf, scan.capacity, scan.head, scan.head, scan.next);
        // Head first: every state in between recovers the same.
        ring.store_head(scan.run_start);
        ring.store_tail(scan.end);
        ring.write_u64(OFF_NEXT, scan.next);
        if scan.bad_greeting {
            ring.set_greeting(None);
        }
        if scan.bad_leftover {
            ring.set_leftover(&[]);
        }
        Ok((ring, recovered))
    }

    fn with(buf: B, capacity: usize, head: usize, tail: usize, next: u64) -> Ring<B> {
        Ring {
            buf,
            capacity,
            head,
            tail,
            next,
            #[cfg(test)]
            budget: None,
        }
    }

    /// Bytes in the data region.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The number the next event gets.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The whole buffer, header included.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// The buffer.
    pub fn into_inner(self) -> B {
        self.buf
    }

    /// Journals event `seq` named `name` (clipped to [`MAX_NAME`] bytes),
    /// evicting the oldest records to make room, and commits `next = seq +
    /// 1`. An event whose record would take more than half the capacity is
    /// recorded as a skipped number. A `seq` other than the journal's next
    /// number starts the journal over (it could not be resumed across);
    /// `u64::MAX`, which has no next, is ignored.
    pub fn append(&mut self, seq: u64, name: &str, line: &[u8]) {
        if seq == u64::MAX {
            // Never given out (numbers stay below 2^53): it has no next.
            return;
        }
        let name = clip(name, MAX_NAME);
        let (flags, line, n) = match record_len(name.len(), line.len()) {
            Some(n) if n <= self.capacity / 2 => (0, line, n),
            _ => (SKIPPED, &[][..], round8(RECORD_HEADER + name.len())),
        };
        if seq != self.next {
            self.head = self.tail;
        }
        let wrap = self.tail + n > self.capacity;
        let start = if wrap { 0 } else { self.tail };
        let consumed = if wrap { self.capacity - self.tail + n } else { n };
        while !self.is_empty() && self.free() <= consumed {
            self.evict_one();
        }
        self.store_head(self.head);
        fence(Ordering::Release);
        if wrap {
            self.write_u32(META_SIZE + self.tail, 0);
        }
        self.write_record(start, seq, name, flags, line, n);
        fence(Ordering::Release);
        self.store_tail((start + n) % self.capacity);
        fence(Ordering::Release);
        self.next = seq.saturating_add(1);
        self.write_u64(OFF_NEXT, self.next);
    }

    /// Stores QEMU's greeting (or none); false, and none stored, if it is
    /// longer than [`MAX_GREETING`].
    pub fn set_greeting(&mut self, greeting: Option<&[u8]>) -> bool {
        self.write_u32(OFF_GREETING_LEN, NO_GREETING);
        let Some(greeting) = greeting else { return true };
        if greeting.len() > MAX_GREETING {
            return false;
        }
        self.store_blob(GREETING_AT, OFF_GREETING_LEN, OFF_GREETING_CRC, greeting);
        true
    }

    /// Stores bytes from QEMU that are not a whole message yet (empty:
    /// none); false, and none stored, if longer than [`MAX_LEFTOVER`].
    pub fn set_leftover(&mut self, bytes: &[u8]) -> bool {
        self.write_u32(OFF_LEFTOVER_LEN, 0);
        if bytes.len() > MAX_LEFTOVER {
            return false;
        }
        if !bytes.is_empty() {
            self.store_blob(LEFTOVER_AT, OFF_LEFTOVER_LEN, OFF_LEFTOVER_CRC, bytes);
        }
        true
    }

    /// Bytes, their crc, then (once both are there) their length.
    fn store_blob(&mut self, at: usize, len_at: usize, crc_at: usize, bytes: &[u8]) {
        fence(Ordering::Release);
        self.write(at, bytes);
        self.write_u32(crc_at, crc32fast::hash(bytes));
        fence(Ordering::Release);
        self.write_u32(len_at, u32::try_from(bytes.len()).unwrap_or(0));
    }

    fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// Bytes from `tail` up to `head`.
    fn free(&self) -> usize {
        if self.is_empty() {
            self.capacity
        } else {
            (self.head + self.capacity - self.tail) % self.capacity
        }
    }

    /// Moves `head` past the oldest record (or wrap marker); a record that
    /// makes no sense (the buffer was changed behind our back) empties the
    /// ring instead.
    fn evict_one(&mut self) {
        let to_tail = (self.tail + self.capacity - self.head) % self.capacity;
        let len = self.read_u32(META_SIZE + self.head).map_or(usize::MAX, |l| l as usize);
        self.head = if len == 0 && self.head != 0 && self.tail < self.head {
            0
        } else if len.is_multiple_of(8) && len >= RECORD_HEADER && len <= to_tail && self.head + len <= self.capacity {
            (self.head + len) % self.capacity
        } else {
            self.tail
        };
    }

    fn write_record(&mut self, start: usize, seq: u64, name: &str, flags: u8, line: &[u8], n: usize) {
        let name_len = u16::try_from(name.len()).unwrap_or(0);
        let line_len = u32::try_from(line.len()).unwrap_or(0);
        let mut fixed = [0u8; RECORD_HEADER - 8];
        fixed[0..8].copy_from_slice(&seq.to_le_bytes());
        fixed[8..10].copy_from_slice(&name_len.to_le_bytes());
        fixed[10] = flags;
        fixed[12..16].copy_from_slice(&line_len.to_le_bytes());
        let padding = [0u8; 8];
        let padding = &padding[..n - RECORD_HEADER - name.len() - line.len()];
        let mut crc = crc32fast::Hasher::new();
        for part in [&fixed[..], name.as_bytes(), line, padding] {
            crc.update(part);
        }
        let at = META_SIZE + start;
        self.write(at + 8, &fixed);
        self.write(at + RECORD_HEADER, name.as_bytes());
        self.write(at + RECORD_HEADER + name.len(), line);
        self.write(at + RECORD_HEADER + name.len() + line.len(), padding);
        self.write_u32(at + 4, crc.finalize());
        self.write_u32(at, u32::try_from(n).unwrap_or(0));
    }

    fn store_head(&mut self, head: usize) {
        self.head = head;
        self.write_u64(OFF_HEAD, head as u64);
    }

    fn store_tail(&mut self, tail: usize) {
        self.tail = tail;
        self.write_u64(OFF_TAIL, tail as u64);
    }

    fn read_u32(&self, at: usize) -> Option<u32> {
        u32_at(self.buf.as_ref(), at)
    }

    fn write_u32(&mut self, at: usize, v: u32) {
        self.write(at, &v.to_le_bytes());
    }

    fn write_u64(&mut self, at: usize, v: u64) {
        self.write(at, &v.to_le_bytes());
    }

    /// Every store goes through here (nothing if out of bounds, which the
    /// checks before make impossible).
    fn write(&mut self, at: usize, bytes: &[u8]) {
        #[cfg(test)]
        let bytes = match self.budget {
            None => bytes,
            Some(0) => return,
            Some(1) => {
                self.budget = Some(0);
                &bytes[..bytes.len() / 2]
            }
            Some(n) => {
                self.budget = Some(n - 2);
                bytes
            }
        };
        let end = at.saturating_add(bytes.len());
        if let Some(dst) = self.buf.as_mut().get_mut(at..end) {
            dst.copy_from_slice(bytes);
        }
    }
}

/// The header's fields, checked, and where the valid records are.
#[derive(Debug)]
struct Scan {
    capacity: usize,
    head: usize,
    /// Start of the run of events after the last gap.
    run_start: usize,
    /// Events in the run.
    run_len: usize,
    /// Just past the last valid record.
    end: usize,
    next: u64,
    truncated: bool,
    bad_greeting: bool,
    bad_leftover: bool,
}

fn scan(bytes: &[u8]) -> Result<Scan, JournalError> {
    let header = Header::read(bytes)?;
    let data = bytes.get(META_SIZE..).unwrap_or_default();
    let (mut run_start, mut run_len, mut end) = (header.head, 0, header.head);
    let (mut last, mut truncated) = (None, false);
    for record in Walk::new(data, header.head, header.tail) {
        let Ok(record) = record else {
            truncated = true;
            break;
        };
        end = record.end;
        last = Some(record.seq);
        if record.skipped {
            (run_start, run_len) = (record.end, 0);
        } else {
            run_len += 1;
        }
    }
    let after_last = last.map_or(0, |s| s.saturating_add(1));
    let next = header.next.max(after_last);
    if run_len > 0 && after_last != next {
        // Events were numbered after these but are gone: a hole.
        (run_start, run_len, truncated) = (end, 0, true);
    }
    let bad_greeting = greeting(bytes).is_err();
    let bad_leftover = leftover(bytes).is_err();
    Ok(Scan {
        capacity: header.capacity,
        head: header.head,
        run_start,
        run_len,
        end,
        next,
        truncated: truncated || bad_greeting || bad_leftover,
        bad_greeting,
        bad_leftover,
    })
}

fn recovered(bytes: &[u8], scan: &Scan) -> Recovered {
    let data = bytes.get(META_SIZE..).unwrap_or_default();
    let mut events = Vec::with_capacity(scan.run_len);
    for record in Walk::new(data, scan.run_start, scan.end).take(scan.run_len) {
        let Ok(record) = record else { break };
        events.push(Entry {
            seq: record.seq,
            name: record.name.into(),
            line: Bytes::copy_from_slice(record.line),
        });
    }
    Recovered {
        events,
        next: scan.next,
        greeting: greeting(bytes).unwrap_or_default().map(<[u8]>::to_vec),
        leftover: leftover(bytes).unwrap_or_default().to_vec(),
        truncated: scan.truncated,
    }
}

/// The header's fixed fields, each checked against the buffer.
struct Header {
    capacity: usize,
    head: usize,
    tail: usize,
    next: u64,
}

impl Header {
    fn read(bytes: &[u8]) -> Result<Header, JournalError> {
        if bytes.len() < META_SIZE {
            return Err(JournalError::Size(bytes.len() as u64));
        }
        if bytes.get(OFF_MAGIC..OFF_MAGIC + 8) != Some(&MAGIC[..]) {
            return Err(JournalError::Magic);
        }
        let version = u32_at(bytes, OFF_VERSION).unwrap_or(0);
        if version != VERSION {
            return Err(JournalError::Version(version));
        }
        if !valid_len(bytes.len()) {
            return Err(JournalError::Size(bytes.len() as u64));
        }
        let capacity = bytes.len() - META_SIZE;
        let field = |at, what| {
            let v = u64_at(bytes, at).ok_or(JournalError::Corrupt(what))?;
            usize::try_from(v).map_err(|_| JournalError::Corrupt(what))
        };
        if field(OFF_CAPACITY, "capacity")? != capacity {
            return Err(JournalError::Corrupt("capacity"));
        }
        let head = field(OFF_HEAD, "head")?;
        if head >= capacity || !head.is_multiple_of(8) {
            return Err(JournalError::Corrupt("head"));
        }
        let tail = field(OFF_TAIL, "tail")?;
        if tail >= capacity || !tail.is_multiple_of(8) {
            return Err(JournalError::Corrupt("tail"));
        }
        let next = u64_at(bytes, OFF_NEXT).ok_or(JournalError::Corrupt("next"))?;
        Ok(Header {
            capacity,
            head,
            tail,
            next,
        })
    }
}

/// The stored greeting (none), or `Err` if it is damaged.
fn greeting(bytes: &[u8]) -> Result<Option<&[u8]>, ()> {
    if u32_at(bytes, OFF_GREETING_LEN) == Some(NO_GREETING) {
        return Ok(None);
    }
    blob(bytes, GREETING_AT, OFF_GREETING_LEN, OFF_GREETING_CRC, MAX_GREETING).map(Some)
}

/// The stored leftover, or `Err` if it is damaged.
fn leftover(bytes: &[u8]) -> Result<&[u8], ()> {
    blob(bytes, LEFTOVER_AT, OFF_LEFTOVER_LEN, OFF_LEFTOVER_CRC, MAX_LEFTOVER)
}

fn blob(bytes: &[u8], at: usize, len_at: usize, crc_at: usize, max: usize) -> Result<&[u8], ()> {
    let len = u32_at(bytes, len_at).ok_or(())? as usize;
    if len == 0 {
        return Ok(&[]);
    }
    if len > max {
        return Err(());
    }
    let stored = bytes.get(at..at + len).ok_or(())?;
    if u32_at(bytes, crc_at) != Some(crc32fast::hash(stored)) {
        return Err(());
    }
    Ok(stored)
}

/// One valid record.
struct Record<'a> {
    seq: u64,
    skipped: bool,
    name: &'a str,
    line: &'a [u8],
    /// Offset of what follows it.
    end: usize,
}

/// The records from `pos` to `tail`, each checked, numbers growing by one;
/// ends after the first invalid one (an `Err`).
struct Walk<'a> {
    data: &'a [u8],
    pos: usize,
    tail: usize,
    prev: Option<u64>,
    failed: bool,
}

impl<'a> Walk<'a> {
    fn new(data: &'a [u8], pos: usize, tail: usize) -> Walk<'a> {
        Walk {
            data,
            pos,
            tail,
            prev: None,
            failed: data.is_empty(),
        }
    }

    fn step(&mut self) -> Result<Record<'a>, &'static str> {
        let cap = self.data.len();
        let mut at = self.pos;
        let mut len = u32_at(self.data, at).ok_or("record past the end")? as usize;
        if len == 0 {
            // A wrap marker: the chain goes on at 0, and the tail is before it.
            if at == 0 || self.tail >= at {
                return Err("misplaced wrap marker");
            }
            at = 0;
            if self.tail == 0 {
                return Err("wrap marker at the tail");
            }
            len = u32_at(self.data, at).ok_or("record past the end")? as usize;
        }
        let to_tail = (self.tail + cap - at) % cap;
        if !len.is_multiple_of(8) || len < RECORD_HEADER || len > to_tail || at + len > cap {
            return Err("record length");
        }
        let bytes = self.data.get(at..at + len).ok_or("record past the end")?;
        let record = parse(bytes, at, cap)?;
        if self.prev.is_some_and(|p| p.checked_add(1) != Some(record.seq)) {
            return Err("numbers not consecutive");
        }
        self.prev = Some(record.seq);
        self.pos = record.end;
        Ok(record)
    }
}

impl<'a> Iterator for Walk<'a> {
    type Item = Result<Record<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos == self.tail {
            return None;
        }
        let step = self.step();
        self.failed = step.is_err();
        Some(step)
    }
}

/// One record's `bytes` (its length checked), at offset `at` of a data
/// region of `cap` bytes.
fn parse(bytes: &[u8], at: usize, cap: usize) -> Result<Record<'_>, &'static str> {
    let body = bytes.get(8..).unwrap_or_default();
    if u32_at(bytes, 4) != Some(crc32fast::hash(body)) {
        return Err("crc");
    }
    let seq = u64_at(bytes, 8)
        .filter(|&s| s != u64::MAX)
        .ok_or("number out of range")?;
    let name_len = bytes
        .get(16..18)
        .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])));
    let (flags, reserved) = (bytes.get(18).copied(), bytes.get(19).copied());
    let line_len = u32_at(bytes, 20).ok_or("short record")? as usize;
    if flags.is_none_or(|f| f & !SKIPPED != 0) || reserved != Some(0) {
        return Err("flags");
    }
    let skipped = flags == Some(SKIPPED);
    if name_len > MAX_NAME || (skipped && line_len != 0) {
        return Err("field lengths");
    }
    if record_len(name_len, line_len) != Some(bytes.len()) {
        return Err("field lengths");
    }
    let name = bytes
        .get(RECORD_HEADER..RECORD_HEADER + name_len)
        .ok_or("short record")?;
    let name = std::str::from_utf8(name).map_err(|_| "name")?;
    let line_at = RECORD_HEADER + name_len;
    let line = bytes.get(line_at..line_at + line_len).ok_or("short record")?;
    Ok(Record {
        seq,
        skipped,
        name,
        line,
        end: (at + bytes.len()) % cap,
    })
}

/// A whole buffer: the metadata region and a data region of a valid size.
fn valid_len(len: usize) -> bool {
    len.checked_sub(META_SIZE)
        .is_some_and(|c| (MIN_CAPACITY..=MAX_CAPACITY).contains(&c) && c.is_multiple_of(8))
}

/// A record's length, padded to 8.
fn record_len(name: usize, line: usize) -> Option<usize> {
    let n = RECORD_HEADER.checked_add(name)?.checked_add(line)?;
    n.checked_add(7).map(|n| n & !7)
}

fn round8(n: usize) -> usize {
    n.saturating_add(7) & !7
}

/// The longest prefix of `s` of at most `max` bytes.
fn clip(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let b = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let b = b.get(at..at.checked_add(8)?)?;
    let mut v = [0; 8];
    v.copy_from_slice(b);
    Some(u64::from_le_bytes(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(capacity: usize, next: u64) -> Ring<Vec<u8>> {
        // Whatever the buffer held before does not matter.
        Ring::create(vec![0xA5; META_SIZE + capacity], next).expect("a valid size")
    }

    fn line(seq: u64, pad: usize) -> Vec<u8> {
        format!("{{\"event\": \"E{seq}\", \"data\": \"{}\"}}\r\n", "x".repeat(pad)).into_bytes()
    }

    fn seqs(r: &Recovered) -> Vec<u64> {
        r.events.iter().map(|e| e.seq).collect()
    }

    /// What recovery promises: consecutive numbers ending just before `next`.
    fn assert_consistent(r: &Recovered) {
        for pair in r.events.windows(2) {
            assert_eq!(pair[0].seq + 1, pair[1].seq);
        }
        if let Some(last) = r.events.last() {
            assert_eq!(last.seq + 1, r.next);
        }
    }

    #[test]
    fn appended_events_are_recovered() {
        let mut j = ring(4096, 100);
        let empty = recover(j.as_bytes()).unwrap();
        assert!(empty.events.is_empty() && !empty.truncated);
        assert_eq!(empty.next, 100);
        assert_eq!(empty.greeting, None);
        for seq in 100..105 {
            j.append(seq, "STOP", &line(seq, 3));
        }
        let r = recover(j.as_bytes()).unwrap();
        assert!(!r.truncated);
        assert_eq!(seqs(&r), (100..105).collect::<Vec<_>>());
        assert_eq!(r.next, 105);
        for e in &r.events {
            assert_eq!(&*e.name, "STOP");
            assert_eq!(&e.line[..], &line(e.seq, 3)[..]);
        }
        assert!(r.leftover.is_empty());
    }

    #[test]
    fn wrapping_many_times_keeps_the_newest_events() {
        let capacity = 1024;
        let mut j = ring(capacity, 1);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut sizes = Vec::new();
        for seq in 1..2000u64 {
            let l = line(seq, rng.usize(0..300));
            j.append(seq, "E", &l);
            sizes.push(record_len(1, l.len()).unwrap());
            let r = recover(j.as_bytes()).unwrap();
            assert!(!r.truncated);
            assert_consistent(&r);
            assert_eq!(r.events.last().map(|e| e.seq), Some(seq));
            for e in &r.events {
                assert!(e.line.starts_with(format!("{{\"event\": \"E{}\"", e.seq).as_bytes()));
            }
            // Nothing evicted that fitted: what is kept plus the last one
            // evicted fill the ring but for a wrap's waste and a record.
            let kept: usize = r.events.iter().map(|e| sizes[(e.seq - 1) as usize]).sum();
            let first = r.events[0].seq;
            if first > 1 {
                let max = sizes.iter().max().copied().unwrap_or(0);
                assert!(
                    kept + sizes[(first - 2) as usize] + 2 * max >= capacity,
                    "seq {seq}: {kept} kept"
                );
            }
        }
    }

    #[test]
    fn a_journal_of_capacity_for_holds_what_the_history_keeps() {
        // The worst case: small events with the longest names (the
        // history counts 64 bytes for a name, a record takes up to 159),
        // now and then a large one (the ring wastes more when it wraps).
        let (max_events, max_bytes) = (50_000, 1 << 20);
        let mut history = crate::events::History::new(1, max_events, max_bytes);
        let mut j = ring(capacity_for(max_events, max_bytes), 1);
        let mut rng = fastrand::Rng::with_seed(3);
        for i in 0..24_000 {
            let name = "N".repeat(rng.usize(100..200));
            let l = match rng.usize(0..3_000) {
                0 => line(0, rng.usize(0..20_000)),
                _ => b"{}\r\n".to_vec(),
            };
            let seq = history.push(&name, Bytes::from(l.clone()));
            j.append(seq, &name, &l);
            if i % 400 == 399 {
                let r = recover(j.as_bytes()).unwrap();
                assert_consistent(&r);
                assert!(
                    r.events[0].seq <= history.oldest(),
                    "{} > {}",
                    r.events[0].seq,
                    history.oldest()
                );
                assert_eq!(r.next, history.next());
            }
        }
    }

    /// Appends `seq`, crashing after `writes` half-writes; the journal
    /// left behind.
    fn crashed(j: &Ring<Vec<u8>>, writes: usize, seq: u64, l: &[u8]) -> (Ring<Vec<u8>>, bool) {
        let mut c = j.clone();
        c.budget = Some(writes);
        c.append(seq, "E", l);
        let finished = c.budget.is_some_and(|b| b > 0);
        (c, finished)
    }

    #[test]
    fn a_crash_at_any_point_of_an_append_leaves_a_valid_journal() {
        let mut j = ring(1024, 1);
        let mut rng = fastrand::Rng::with_seed(11);
        for seq in 1..80u64 {
            let l = line(seq, rng.usize(0..250));
            let before = recover(j.as_bytes()).unwrap();
            for writes in 0.. {
                let (c, finished) = crashed(&j, writes, seq, &l);
                let r = recover(c.as_bytes()).unwrap();
                assert!(!r.truncated, "seq {seq}, {writes} writes");
                assert_consistent(&r);
                let last = r.events.last().map_or(0, |e| e.seq);
                assert!(last == seq || last + 1 == seq, "seq {seq}: last {last}");
                assert!(r.next == seq || r.next == seq + 1);
                // Old events kept are the newest of those before.
                let old: Vec<u64> = seqs(&r).into_iter().filter(|&s| s < seq).collect();
                assert!(seqs(&before).ends_with(&old));
                // The successor goes on from there.
                let (mut adopted, again) = Ring::adopt(c.into_inner()).unwrap();
                assert_eq!(seqs(&again), seqs(&r));
                adopted.append(r.next, "E", &line(r.next, 1));
                let after = recover(adopted.as_bytes()).unwrap();
                assert!(!after.truncated);
                assert_consistent(&after);
                assert_eq!(after.next, r.next + 1);
                if finished {
                    assert_eq!(last, seq);
                    break;
                }
            }
            j.append(seq, "E", &l);
        }
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack.windows(needle.len()).position(|w| w == needle).unwrap()
    }

    #[test]
    fn a_damaged_record_ends_the_chain_there() {
        let mut j = ring(4096, 0);
        for seq in 0..10 {
            j.append(seq, "E", &line(seq, 5));
        }
        let mut bytes = j.into_inner();
        let at = find(&bytes, b"\"E5\"");
        bytes[at + 1] ^= 1;
        let scan = scan(&bytes).unwrap();
        assert!(scan.truncated);
        // The valid prefix ends where record 5 starts.
        let five = record_len(1, line(5, 5).len()).unwrap() * 5;
        assert_eq!(scan.end, five);
        // Events 6 to 9 were numbered but are gone: the history cannot
        // hold the ones before the hole.
        let r = recover(&bytes).unwrap();
        assert!(r.truncated && r.events.is_empty());
        assert_eq!(r.next, 10);
        // Adopting repairs it: what follows is kept.
        let (mut j, _) = Ring::adopt(bytes).unwrap();
        j.append(10, "E", &line(10, 5));
        let r = recover(j.as_bytes()).unwrap();
        assert!(!r.truncated);
        assert_eq!(seqs(&r), vec![10]);
    }

    #[test]
    fn a_damaged_last_record_is_dropped_with_the_next_number_kept() {
        let mut j = ring(4096, 0);
        for seq in 0..3 {
            j.append(seq, "E", &line(seq, 5));
        }
        let mut bytes = j.into_inner();
        let at = find(&bytes, b"\"E2\"");
        bytes[at + 1] ^= 1;
        let r = recover(&bytes).unwrap();
        assert!(r.truncated && r.events.is_empty());
        assert_eq!(r.next, 3);
    }

    #[test]
    fn foreign_or_damaged_headers_are_errors() {
        let good = ring(1024, 5).into_inner();
        assert!(matches!(recover(&good[..100]), Err(JournalError::Size(100))));
        assert!(matches!(recover(&[]), Err(JournalError::Size(0))));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(recover(&bad), Err(JournalError::Magic)));
        let mut bad = good.clone();
        bad[OFF_VERSION] = 2;
        assert!(matches!(recover(&bad), Err(JournalError::Version(2))));
        let mut bad = good.clone();
        bad.extend_from_slice(&[0; 8]);
        assert!(matches!(recover(&bad), Err(JournalError::Corrupt("capacity"))));
        let mut bad = good.clone();
        bad.push(0);
        assert!(matches!(recover(&bad), Err(JournalError::Size(_))));
        for (at, what) in [(OFF_HEAD, "head"), (OFF_TAIL, "tail")] {
            let mut bad = good.clone();
            bad[at..at + 8].copy_from_slice(&1024u64.to_le_bytes());
            assert!(matches!(recover(&bad), Err(JournalError::Corrupt(w)) if w == what));
            bad[at..at + 8].copy_from_slice(&4u64.to_le_bytes());
            assert!(matches!(recover(&bad), Err(JournalError::Corrupt(w)) if w == what));
        }
        assert!(matches!(
            Ring::create(vec![0; META_SIZE + 8], 0),
            Err(JournalError::Size(_))
        ));
    }

    #[test]
    fn an_event_too_large_is_a_gap() {
        let mut j = ring(1024, 1);
        for seq in 1..4 {
            j.append(seq, "E", &line(seq, 5));
        }
        j.append(4, "BIG", &line(4, 600));
        let r = recover(j.as_bytes()).unwrap();
        assert!(r.events.is_empty() && !r.truncated);
        assert_eq!(r.next, 5);
        for seq in 5..7 {
            j.append(seq, "E", &line(seq, 5));
        }
        let r = recover(j.as_bytes()).unwrap();
        assert!(!r.truncated);
        assert_eq!(seqs(&r), vec![5, 6]);
        assert_eq!(r.next, 7);
    }

    #[test]
    fn a_number_out_of_turn_starts_over() {
        let mut j = ring(1024, 1);
        for seq in 1..4 {
            j.append(seq, "E", &line(seq, 5));
        }
        j.append(10, "E", &line(10, 5));
        let r = recover(j.as_bytes()).unwrap();
        assert_eq!(seqs(&r), vec![10]);
        assert_eq!(r.next, 11);
    }

    #[test]
    fn long_names_are_clipped_on_a_character() {
        let mut j = ring(1024, 1);
        j.append(1, &"é".repeat(100), &line(1, 0));
        let r = recover(j.as_bytes()).unwrap();
        assert_eq!(&*r.events[0].name, "é".repeat(64));
    }

    #[test]
    fn greeting_and_leftover_are_kept() {
        let mut j = ring(1024, 1);
        let greeting = br#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#;
        assert!(j.set_greeting(Some(greeting)));
        assert!(j.set_leftover(b"{\"event\": \"ST"));
        j.append(1, "E", &line(1, 0));
        let r = recover(j.as_bytes()).unwrap();
        assert_eq!(r.greeting.as_deref(), Some(&greeting[..]));
        assert_eq!(r.leftover, b"{\"event\": \"ST");
        assert!(!r.truncated);
        assert!(j.set_greeting(Some(b"")));
        assert_eq!(recover(j.as_bytes()).unwrap().greeting, Some(vec![]));
        assert!(j.set_greeting(None));
        assert!(j.set_leftover(&[]));
        let r = recover(j.as_bytes()).unwrap();
        assert_eq!((r.greeting, r.leftover.len()), (None, 0));
        // Too large: nothing stored.
        assert!(j.set_greeting(Some(greeting)));
        assert!(!j.set_greeting(Some(&[b'x'; MAX_GREETING + 1])));
        assert!(j.set_leftover(b"abc"));
        assert!(!j.set_leftover(&vec![b'x'; MAX_LEFTOVER + 1]));
        let r = recover(j.as_bytes()).unwrap();
        assert_eq!((r.greeting, r.leftover.len(), r.truncated), (None, 0, false));
        assert!(j.set_greeting(Some(&[b'x'; MAX_GREETING])));
        assert!(j.set_leftover(&vec![b'y'; MAX_LEFTOVER]));
        let r = recover(j.as_bytes()).unwrap();
        assert_eq!(r.greeting.map(|g| g.len()), Some(MAX_GREETING));
        assert_eq!(r.leftover.len(), MAX_LEFTOVER);
    }

    #[test]
    fn a_damaged_greeting_is_dropped_and_repaired_on_adoption() {
        let mut j = ring(1024, 1);
        j.set_greeting(Some(b"{\"QMP\": {}}"));
        j.set_leftover(b"{\"ev");
        j.append(1, "E", &line(1, 0));
        let mut bytes = j.into_inner();
        bytes[GREETING_AT] ^= 1;
        bytes[LEFTOVER_AT] ^= 1;
        let r = recover(&bytes).unwrap();
        assert!(r.truncated);
        assert_eq!((seqs(&r).len(), r.greeting, r.leftover.len()), (1, None, 0));
        let (j, _) = Ring::adopt(bytes).unwrap();
        let r = recover(j.as_bytes()).unwrap();
        assert!(!r.truncated);
        assert_eq!(seqs(&r), vec![1]);
    }

    #[test]
    fn garbage_never_panics_and_is_repaired_on_adoption() {
        let mut rng = fastrand::Rng::with_seed(5);
        let mut base = ring(1024, 1);
        for seq in 1..40 {
            base.append(seq, "E", &line(seq, rng.usize(0..100)));
        }
        for _ in 0..3_000 {
            let mut bytes = base.clone().into_inner();
            for _ in 0..rng.usize(1..6) {
                let at = if rng.bool() {
                    rng.usize(0..64)
                } else {
                    rng.usize(META_SIZE..bytes.len())
                };
                bytes[at] = rng.u8(..);
            }
            if rng.bool() {
                // Plausible header fields, so that the walk is what is tested.
                let head = rng.usize(0..128) * 8;
                bytes[OFF_HEAD..OFF_HEAD + 8].copy_from_slice(&(head as u64).to_le_bytes());
            }
            let Ok(r) = recover(&bytes) else { continue };
            assert_consistent(&r);
            let (mut j, again) = Ring::adopt(bytes).unwrap();
            assert_eq!(seqs(&again), seqs(&r));
            let Some(next) = r.next.checked_add(1) else { continue };
            j.append(r.next, "E", &line(r.next, 1));
            let after = recover(j.as_bytes()).unwrap();
            assert!(!after.truncated);
            assert_consistent(&after);
            assert_eq!(after.next, next);
        }
    }

    #[test]
    fn capacity_for_covers_the_history() {
        assert_eq!(capacity_for(0, 0), 256 * 1024);
        let c = capacity_for(1_000, 1 << 20);
        assert!(c >= 2 << 20 && c.is_multiple_of(8), "{c}");
        assert_eq!(capacity_for(usize::MAX, usize::MAX), MAX_CAPACITY);
    }

    #[test]
    fn a_memfd_journal_is_adopted_through_a_copy_of_its_descriptor() {
        let mut j = Journal::create("vm0", 64 * 1024, 100).unwrap();
        assert_eq!(j.capacity(), 64 * 1024);
        for seq in 100..103 {
            j.append(seq, "STOP", &line(seq, 2));
        }
        assert!(j.set_greeting(Some(b"{\"QMP\": {}}")));
        let fd = j.fd().try_clone_to_owned().unwrap();
        let (mut adopted, r) = Journal::adopt(fd).unwrap();
        assert!(!r.truncated);
        assert_eq!(seqs(&r), vec![100, 101, 102]);
        assert_eq!(r.next, 103);
        assert_eq!(r.greeting.as_deref(), Some(&b"{\"QMP\": {}}"[..]));
        // The same memory: the first sees what the second appends.
        adopted.append(103, "STOP", &line(103, 2));
        assert_eq!(recover(j.ring.as_bytes()).unwrap().next, 104);
        assert!(Journal::create("vm\0", 64 * 1024, 0).is_err());
        assert!(matches!(Journal::create("vm0", 8, 0), Err(JournalError::Size(_))));
    }

    #[test]
    fn only_a_sealed_memfd_of_a_valid_size_is_adopted() {
        let file = tempfile::tempfile().unwrap();
        file.set_len((META_SIZE + 1024) as u64).unwrap();
        assert!(matches!(Journal::adopt(file.into()), Err(JournalError::Foreign(_))));
        let (read, _write) = nix::unistd::pipe().unwrap();
        assert!(matches!(Journal::adopt(read), Err(JournalError::Foreign(_))));
        let sealed = memfd("x").unwrap();
        sealed.set_len(100).unwrap();
        seal(&sealed).unwrap();
        assert!(matches!(Journal::adopt(sealed.into()), Err(JournalError::Size(100))));
        let blank = memfd("x").unwrap();
        blank.set_len((META_SIZE + 1024) as u64).unwrap();
        seal(&blank).unwrap();
        assert!(matches!(Journal::adopt(blank.into()), Err(JournalError::Magic)));
    }
}
