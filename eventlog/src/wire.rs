//! The byte layout: segment headers and framed records (specified in `FORMAT.md`).
//!
//! These functions are stateless: they encode or decode one header or one record and know
//! nothing of sequence numbers or segment structure (the [`crate::Reader`], the
//! [`crate::Decoder`] and the [`crate::Writer`] do). A decoder function returns `Ok(None)` when
//! `buf` holds only part of what it decodes (ask for more bytes), and refuses anything
//! malformed; it never panics, whatever the input.

use crate::event::{
    Delivery, Event, EventRecord, GapKind, MemWrite, Record, SegmentEnd, SegmentStart, Thread,
    Time, Unrecordable, MAX_ARGS,
};
use crate::EventLogError;

/// The first bytes of every segment header.
pub const MAGIC: [u8; 8] = *b"RRCEVLOG";
/// The format version this build writes. Version 2 adds the gap record (kind `0x1A`) to
/// version 1.
pub const VERSION: u16 = 2;
/// The oldest format version this build reads.
pub const MIN_VERSION: u16 = 1;
/// Bytes in a segment header: magic, version (u16 LE), CRC-32C of the first 10 bytes (u32 LE).
pub const HEADER_LEN: usize = 14;
/// Bytes framing a record: its body length before (u32 LE), its CRC-32C after (u32 LE).
pub const FRAME_OVERHEAD: usize = 8;
/// The largest record body accepted, in bytes (16 MiB). A recorder keeps single results below
/// it (for instance by limiting the length of the reads it lets through).
pub const MAX_RECORD: usize = 16 * 1024 * 1024;

/// Record kinds: the first byte of a record body.
pub(crate) mod tag {
    pub const SEGMENT_START: u8 = 0x01;
    pub const SEGMENT_END: u8 = 0x02;
    pub const SYSCALL_RESULT: u8 = 0x10;
    pub const TIME: u8 = 0x11;
    pub const THREAD_CREATE: u8 = 0x12;
    pub const PROCESS_FORK: u8 = 0x13;
    pub const EXEC: u8 = 0x14;
    pub const THREAD_EXIT: u8 = 0x15;
    pub const SIGNAL: u8 = 0x16;
    pub const SYNC_ORDER: u8 = 0x17;
    pub const INGRESS_PACKET: u8 = 0x18;
    pub const UNRECORDABLE: u8 = 0x19;
    pub const GAP: u8 = 0x1A;
}

/// Appends a segment header.
pub fn encode_header(out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Decodes the segment header at the start of `buf`: `Ok(None)` if more bytes are needed,
/// otherwise its length ([`HEADER_LEN`]). Offsets in errors are relative to `buf`.
pub fn decode_header(buf: &[u8]) -> Result<Option<usize>, EventLogError> {
    decode_header_at(buf, 0)
}

pub(crate) fn decode_header_at(buf: &[u8], at: u64) -> Result<Option<usize>, EventLogError> {
    let seen = buf.len().min(MAGIC.len());
    if buf[..seen] != MAGIC[..seen] {
        return Err(EventLogError::BadMagic {
            offset: at,
            found: buf[..seen].to_vec(),
        });
    }
    if buf.len() < 10 {
        return Ok(None);
    }
    let version = u16::from_le_bytes([buf[8], buf[9]]);
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(EventLogError::UnknownVersion {
            offset: at,
            found: version,
            supported: VERSION,
        });
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let expected = le_u32(&buf[10..14]);
    let found = crc32c::crc32c(&buf[..10]);
    if expected != found {
        return Err(EventLogError::Corrupt {
            offset: at,
            expected,
            found,
        });
    }
    Ok(Some(HEADER_LEN))
}

/// Appends one framed record. On error nothing is appended.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) -> Result<(), EventLogError> {
    match record {
        Record::Event(e) => encode_event(e.seq, e.thread, e.interval_ns, &e.event, out),
        _ => {
            validate_marker(record)?;
            frame(out, kind_name(record), |out| encode_marker(record, out))
        }
    }
}

/// Appends one framed event record (what [`encode_record`] does for a [`Record::Event`],
/// without owning the event).
pub(crate) fn encode_event(
    seq: u64,
    thread: Thread,
    interval_ns: u64,
    event: &Event,
    out: &mut Vec<u8>,
) -> Result<(), EventLogError> {
    validate_event(seq, event)?;
    frame(out, event.kind_name(), |out| {
        encode_event_body(seq, thread, interval_ns, event, out)
    })
}

/// Appends a length, the body `body` writes, and the CRC.
fn frame(
    out: &mut Vec<u8>,
    kind: &str,
    body: impl FnOnce(&mut Vec<u8>),
) -> Result<(), EventLogError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = out.len() - start - 4;
    if len > MAX_RECORD {
        out.truncate(start);
        return Err(EventLogError::Unencodable(format!(
            "a {kind} record of {len} bytes exceeds the {MAX_RECORD}-byte limit"
        )));
    }
    // len <= MAX_RECORD < u32::MAX.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes the framed record at the start of `buf`: `Ok(None)` if more bytes are needed,
/// otherwise the record and how many bytes it used. Offsets in errors are relative to `buf`.
pub fn decode_record(buf: &[u8]) -> Result<Option<(Record, usize)>, EventLogError> {
    decode_record_at(buf, 0)
}

pub(crate) fn decode_record_at(
    buf: &[u8],
    at: u64,
) -> Result<Option<(Record, usize)>, EventLogError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = le_u32(&buf[..4]);
    let body = usize::try_from(len).unwrap_or(usize::MAX);
    if body > MAX_RECORD {
        return Err(EventLogError::TooLarge {
            offset: at,
            len: u64::from(len),
        });
    }
    let total = 4 + body + 4;
    if buf.len() < total {
        return Ok(None);
    }
    let expected = le_u32(&buf[4 + body..total]);
    let found = crc32c::crc32c(&buf[..4 + body]);
    if expected != found {
        return Err(EventLogError::Corrupt {
            offset: at,
            expected,
            found,
        });
    }
    let record = decode_body(&buf[4..4 + body])
        .map_err(|what| EventLogError::Malformed { offset: at, what })?;
    Ok(Some((record, total)))
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn kind_name(record: &Record) -> &'static str {
    match record {
        Record::SegmentStart(_) => "segment-start",
        Record::SegmentEnd(_) => "segment-end",
        Record::Event(e) => e.event.kind_name(),
    }
}

// The limits the body decoder enforces, checked before encoding so that everything written
// reads back.

fn validate_marker(record: &Record) -> Result<(), EventLogError> {
    match record {
        Record::SegmentStart(s) if s.base_seq == 0 || s.base_seq == u64::MAX => {
            Err(EventLogError::Unencodable(format!(
                "segment base sequence number {} is outside 1..u64::MAX",
                s.base_seq
            )))
        }
        Record::SegmentEnd(e) if e.next_seq == 0 => Err(EventLogError::Unencodable(
            "segment end with next sequence number 0".into(),
        )),
        _ => Ok(()),
    }
}

fn validate_event(seq: u64, event: &Event) -> Result<(), EventLogError> {
    if seq == 0 || seq == u64::MAX {
        return Err(EventLogError::Unencodable(format!(
            "event sequence number {seq} is outside 1..u64::MAX"
        )));
    }
    if let Event::SyscallResult { args, .. } = event {
        if args.len() > MAX_ARGS {
            return Err(EventLogError::Unencodable(format!(
                "{} syscall arguments, at most {MAX_ARGS}",
                args.len()
            )));
        }
    }
    Ok(())
}

// ---- encoding -------------------------------------------------------------------------------

fn put_u(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_i(out: &mut Vec<u8>, v: i64) {
    put_u(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn encode_marker(record: &Record, out: &mut Vec<u8>) {
    match record {
        Record::SegmentStart(s) => {
            out.push(tag::SEGMENT_START);
            put_u(out, s.base_seq);
            put_u(out, s.epoch);
            put_bytes(out, s.container_id.as_bytes());
            put_u(out, s.live.len() as u64);
            for t in &s.live {
                put_u(out, u64::from(t.tgid));
                put_u(out, u64::from(t.tid));
            }
        }
        Record::SegmentEnd(e) => {
            out.push(tag::SEGMENT_END);
            put_u(out, e.next_seq);
        }
        // Events are encoded by encode_event_body.
        Record::Event(_) => {}
    }
}

fn encode_event_body(seq: u64, thread: Thread, interval_ns: u64, event: &Event, out: &mut Vec<u8>) {
    let tag = match event {
        Event::SyscallResult { .. } => tag::SYSCALL_RESULT,
        Event::Time(_) => tag::TIME,
        Event::ThreadCreate { .. } => tag::THREAD_CREATE,
        Event::ProcessFork { .. } => tag::PROCESS_FORK,
        Event::Exec { .. } => tag::EXEC,
        Event::ThreadExit { .. } => tag::THREAD_EXIT,
        Event::Signal { .. } => tag::SIGNAL,
        Event::SyncOrder { .. } => tag::SYNC_ORDER,
        Event::IngressPacket { .. } => tag::INGRESS_PACKET,
        Event::Unrecordable { .. } => tag::UNRECORDABLE,
        Event::Gap { .. } => tag::GAP,
    };
    out.push(tag);
    put_u(out, seq);
    put_u(out, u64::from(thread.tgid));
    put_u(out, u64::from(thread.tid));
    put_u(out, interval_ns);
    match event {
        Event::SyscallResult {
            nr,
            args,
            ret,
            writes,
        } => {
            put_u(out, *nr);
            put_u(out, args.len() as u64);
            for a in args {
                put_u(out, *a);
            }
            put_i(out, *ret);
            put_u(out, writes.len() as u64);
            for w in writes {
                put_u(out, w.addr);
                put_bytes(out, &w.bytes);
            }
        }
        Event::Time(t) => match *t {
            Time::ClockGettime { clock, sec, nsec } => {
                out.push(1);
                put_i(out, i64::from(clock));
                put_i(out, sec);
                put_i(out, nsec);
            }
            Time::Gettimeofday { sec, usec } => {
                out.push(2);
                put_i(out, sec);
                put_i(out, usec);
            }
            Time::Time { sec } => {
                out.push(3);
                put_i(out, sec);
            }
            Time::Rdtsc { tsc } => {
                out.push(4);
                put_u(out, tsc);
            }
            Time::Rdtscp { tsc, aux } => {
                out.push(5);
                put_u(out, tsc);
                put_u(out, u64::from(aux));
            }
        },
        Event::ThreadCreate { child_tid, flags } => {
            put_u(out, u64::from(*child_tid));
            put_u(out, *flags);
        }
        Event::ProcessFork { child_pid, flags } => {
            put_u(out, u64::from(*child_pid));
            put_u(out, *flags);
        }
        Event::Exec { path } => put_bytes(out, path),
        Event::ThreadExit { status } => put_i(out, i64::from(*status)),
        Event::Signal {
            signo,
            delivered_at,
            siginfo,
        } => {
            put_u(out, u64::from(*signo));
            match delivered_at {
                Delivery::BetweenSyscalls => out.push(0),
                Delivery::Syscall { seq } => {
                    out.push(1);
                    put_u(out, *seq);
                }
            }
            put_bytes(out, siginfo);
        }
        Event::SyncOrder { nr, addr, op, ret } => {
            put_u(out, *nr);
            put_u(out, *addr);
            put_u(out, *op);
            put_i(out, *ret);
        }
        Event::IngressPacket { bytes } => put_bytes(out, bytes),
        Event::Unrecordable { what, ip } => {
            out.push(match what {
                Unrecordable::Cpuid => 1,
                Unrecordable::Rdrand => 2,
                Unrecordable::Rdseed => 3,
                Unrecordable::Rdpid => 4,
            });
            put_u(out, *ip);
        }
        Event::Gap { what, ip, detail } => {
            out.push(match what {
                GapKind::ForeignAbi => 1,
                GapKind::IoUring => 2,
                GapKind::VdsoUnpatched => 3,
                GapKind::RdtscUntrapped => 4,
                GapKind::IncompleteCapture => 5,
                GapKind::UnscannedCode => 6,
                GapKind::Other => 7,
            });
            put_u(out, *ip);
            put_bytes(out, detail.as_bytes());
        }
    }
}

// ---- decoding -------------------------------------------------------------------------------

/// Reads a record body; every error is a description for [`EventLogError::Malformed`].
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Bad<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self, what: &str) -> Bad<u8> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| format!("body ends before {what}"))?;
        self.pos += 1;
        Ok(b)
    }

    /// An unsigned LEB128 varint, canonical (no redundant trailing zero groups), at most 64
    /// bits.
    fn u(&mut self, what: &str) -> Bad<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte(what)?;
            if i == 9 && b > 1 {
                return Err(format!("{what}: varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(format!("{what}: non-canonical varint"));
                }
                return Ok(v);
            }
        }
        Err(format!("{what}: varint longer than 10 bytes"))
    }

    fn u32(&mut self, what: &str) -> Bad<u32> {
        let v = self.u(what)?;
        u32::try_from(v).map_err(|_| format!("{what}: {v} does not fit 32 bits"))
    }

    fn i(&mut self, what: &str) -> Bad<i64> {
        let v = self.u(what)?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    fn i32(&mut self, what: &str) -> Bad<i32> {
        let v = self.i(what)?;
        i32::try_from(v).map_err(|_| format!("{what}: {v} does not fit 32 bits"))
    }

    /// A count of items each at least one byte long (so a count larger than what is left
    /// is refused before anything is allocated).
    fn count(&mut self, what: &str) -> Bad<usize> {
        let n = self.u(what)?;
        match usize::try_from(n) {
            Ok(n) if n <= self.remaining() => Ok(n),
            _ => Err(format!(
                "{what}: {n} items in {} remaining bytes",
                self.remaining()
            )),
        }
    }

    fn bytes(&mut self, what: &str) -> Bad<Vec<u8>> {
        let n = self.count(what)?;
        let b = self.buf[self.pos..self.pos + n].to_vec();
        self.pos += n;
        Ok(b)
    }

    fn thread(&mut self) -> Bad<Thread> {
        Ok(Thread {
            tgid: self.u32("tgid")?,
            tid: self.u32("tid")?,
        })
    }
}

fn decode_body(body: &[u8]) -> Bad<Record> {
    let mut c = Cursor { buf: body, pos: 0 };
    let tag = c.byte("the record kind")?;
    let record = match tag {
        tag::SEGMENT_START => {
            let base_seq = c.u("base sequence number")?;
            if base_seq == 0 || base_seq == u64::MAX {
                return Err(format!(
                    "segment base sequence number {base_seq} is outside 1..u64::MAX"
                ));
            }
            let epoch = c.u("epoch")?;
            let id = c.bytes("container id")?;
            let container_id =
                String::from_utf8(id).map_err(|_| "container id is not UTF-8".to_string())?;
            let n = c.count("live threads")?;
            let mut live = Vec::new();
            for _ in 0..n {
                live.push(c.thread()?);
            }
            Record::SegmentStart(SegmentStart {
                base_seq,
                epoch,
                container_id,
                live,
            })
        }
        tag::SEGMENT_END => {
            let next_seq = c.u("next sequence number")?;
            if next_seq == 0 {
                return Err("segment end with next sequence number 0".into());
            }
            Record::SegmentEnd(SegmentEnd { next_seq })
        }
        tag::SYSCALL_RESULT..=tag::GAP => Record::Event(decode_event(tag, &mut c)?),
        other => return Err(format!("unknown record kind 0x{other:02x}")),
    };
    if c.remaining() != 0 {
        return Err(format!("{} bytes after the record's fields", c.remaining()));
    }
    Ok(record)
}

fn decode_event(tag: u8, c: &mut Cursor<'_>) -> Bad<EventRecord> {
    let seq = c.u("sequence number")?;
    if seq == 0 || seq == u64::MAX {
        return Err(format!(
            "event sequence number {seq} is outside 1..u64::MAX"
        ));
    }
    let thread = c.thread()?;
    let interval_ns = c.u("interval")?;
    let event = match tag {
        tag::SYSCALL_RESULT => {
            let nr = c.u("syscall number")?;
            let n = c.count("argument count")?;
            if n > MAX_ARGS {
                return Err(format!("{n} syscall arguments, at most {MAX_ARGS}"));
            }
            let mut args = Vec::with_capacity(n);
            for _ in 0..n {
                args.push(c.u("argument")?);
            }
            let ret = c.i("return value")?;
            let n = c.count("write count")?;
            let mut writes = Vec::new();
            for _ in 0..n {
                let addr = c.u("write address")?;
                let bytes = c.bytes("write bytes")?;
                writes.push(MemWrite { addr, bytes });
            }
            Event::SyscallResult {
                nr,
                args,
                ret,
                writes,
            }
        }
        tag::TIME => Event::Time(match c.byte("the time source")? {
            1 => Time::ClockGettime {
                clock: c.i32("clock id")?,
                sec: c.i("seconds")?,
                nsec: c.i("nanoseconds")?,
            },
            2 => Time::Gettimeofday {
                sec: c.i("seconds")?,
                usec: c.i("microseconds")?,
            },
            3 => Time::Time {
                sec: c.i("seconds")?,
            },
            4 => Time::Rdtsc { tsc: c.u("tsc")? },
            5 => Time::Rdtscp {
                tsc: c.u("tsc")?,
                aux: c.u32("tsc aux")?,
            },
            other => return Err(format!("unknown time source {other}")),
        }),
        tag::THREAD_CREATE => Event::ThreadCreate {
            child_tid: c.u32("child tid")?,
            flags: c.u("clone flags")?,
        },
        tag::PROCESS_FORK => Event::ProcessFork {
            child_pid: c.u32("child pid")?,
            flags: c.u("clone flags")?,
        },
        tag::EXEC => Event::Exec {
            path: c.bytes("exec path")?,
        },
        tag::THREAD_EXIT => Event::ThreadExit {
            status: c.i32("exit status")?,
        },
        tag::SIGNAL => {
            let signo = c.u32("signal number")?;
            let delivered_at = match c.byte("the delivery point")? {
                0 => Delivery::BetweenSyscalls,
                1 => Delivery::Syscall {
                    seq: c.u("delivery sequence number")?,
                },
                other => return Err(format!("unknown delivery point kind {other}")),
            };
            Event::Signal {
                signo,
                delivered_at,
                siginfo: c.bytes("siginfo")?,
            }
        }
        tag::SYNC_ORDER => Event::SyncOrder {
            nr: c.u("syscall number")?,
            addr: c.u("address")?,
            op: c.u("operation")?,
            ret: c.i("return value")?,
        },
        tag::INGRESS_PACKET => Event::IngressPacket {
            bytes: c.bytes("packet")?,
        },
        tag::UNRECORDABLE => Event::Unrecordable {
            what: match c.byte("the instruction kind")? {
                1 => Unrecordable::Cpuid,
                2 => Unrecordable::Rdrand,
                3 => Unrecordable::Rdseed,
                4 => Unrecordable::Rdpid,
                other => return Err(format!("unknown unrecordable instruction {other}")),
            },
            ip: c.u("instruction address")?,
        },
        tag::GAP => Event::Gap {
            what: match c.byte("the gap kind")? {
                1 => GapKind::ForeignAbi,
                2 => GapKind::IoUring,
                3 => GapKind::VdsoUnpatched,
                4 => GapKind::RdtscUntrapped,
                5 => GapKind::IncompleteCapture,
                6 => GapKind::UnscannedCode,
                7 => GapKind::Other,
                other => return Err(format!("unknown gap kind {other}")),
            },
            ip: c.u("address")?,
            detail: String::from_utf8(c.bytes("detail")?)
                .map_err(|_| "the gap's detail is not UTF-8".to_string())?,
        },
        other => return Err(format!("unknown record kind 0x{other:02x}")),
    };
    Ok(EventRecord {
        seq,
        thread,
        interval_ns,
        event,
    })
}
