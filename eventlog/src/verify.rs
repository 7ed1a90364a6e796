//! The verifier core: checks that a decoded log is consistent, and rebuilds from it the bytes
//! each connection delivered to the application.
//!
//! [`Verifier`] (or [`verify`]) checks the container-wide order:
//!
//! * segments: every event inside a segment; each segment starting where the previous one
//!   ended, with the threads the previous one left alive;
//! * sequence numbers dense, with no gap, duplicate or reordering;
//! * each thread's records in increasing sequence order, and its readings of each monotonic
//!   clock (`CLOCK_MONOTONIC`, `_RAW`, `_COARSE`, `CLOCK_BOOTTIME`) and of the time-stamp
//!   counter non-decreasing;
//! * every thread's records after it exists (alive at its segment's start, or after the
//!   [`Event::ThreadCreate`] / [`Event::ProcessFork`] that made it) and before its
//!   [`Event::ThreadExit`] (or the [`Event::Exec`] of another thread of its process); no thread
//!   created twice;
//! * attribution: ingress packets belong to [`Thread::NONE`] with a zero interval, every other
//!   event to a real thread;
//! * a signal delivered at a syscall names that thread's latest syscall record.
//!
//! Intervals are unsigned in the format, so a negative interval cannot be written or decoded;
//! there is nothing left to check about their sign.
//!
//! [`received_streams`] rebuilds, per file descriptor of each process, the bytes the
//! application got from `read`, `readv`, `recvfrom` and `recvmsg` (peeks excluded), split at each
//! `accept`/`accept4` that returned the descriptor: compare a connection's stream with what its
//! client sent to prove the log complete.
//!
//! The decoders already refuse gaps and structural errors; the verifier checks them again
//! because it also serves logs assembled by other means (several files, tests), and it reports
//! every problem rather than stopping at the first.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::event::{Delivery, Event, EventRecord, Record, SegmentStart, Thread, Time};

/// x86_64 syscall numbers the stream rebuild interprets.
pub mod nr {
    /// `read(fd, buf, count)`.
    pub const READ: u64 = 0;
    /// `readv(fd, iov, iovcnt)`.
    pub const READV: u64 = 19;
    /// `accept(fd, addr, addrlen)`.
    pub const ACCEPT: u64 = 43;
    /// `recvfrom(fd, buf, len, flags, src_addr, addrlen)`.
    pub const RECVFROM: u64 = 45;
    /// `recvmsg(fd, msg, flags)`.
    pub const RECVMSG: u64 = 47;
    /// `futex(uaddr, op, ...)`.
    pub const FUTEX: u64 = 202;
    /// `accept4(fd, addr, addrlen, flags)`.
    pub const ACCEPT4: u64 = 288;
}

/// `MSG_PEEK`: the data stays queued, so a peek is not part of the stream.
const MSG_PEEK: u64 = 2;

/// How many violations a report lists; the rest are only counted.
pub const MAX_VIOLATIONS: usize = 100;

/// Something wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A sequence number out of turn (missing records, a duplicate, a reordering), or a segment
    /// not starting where the previous one ended.
    #[error("sequence gap: expected #{expected}, found #{found}")]
    Gap {
        /// The sequence number due.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// Records that do not fit the segment structure.
    #[error("segment structure: {what}{}", at(*seq))]
    Structure {
        /// The event's sequence number, if it is an event.
        seq: Option<u64>,
        /// What is wrong.
        what: &'static str,
    },
    /// A segment starts with other threads alive than the previous one left.
    #[error(
        "segment at #{base_seq} lists other live threads than the log left: missing {missing:?}, \
         unexpected {unexpected:?}"
    )]
    LiveSetMismatch {
        /// The segment's base.
        base_seq: u64,
        /// Alive per the log, absent from the segment start.
        missing: Vec<Thread>,
        /// Listed by the segment start, not alive per the log.
        unexpected: Vec<Thread>,
    },
    /// A thread's record with a sequence number not above its previous one.
    #[error("thread {thread}: record #{seq} after its record #{previous}")]
    ThreadOutOfOrder {
        /// The record.
        seq: u64,
        /// The thread.
        thread: Thread,
        /// The thread's previous record.
        previous: u64,
    },
    /// A record of a thread that does not exist at that point (before its creation, after its
    /// exit).
    #[error("#{seq}: thread {thread} is not alive")]
    NotAlive {
        /// The record.
        seq: u64,
        /// The thread.
        thread: Thread,
    },
    /// A thread or process created while one with its id is alive.
    #[error("#{seq}: created thread {thread}, which is already alive")]
    AlreadyAlive {
        /// The record.
        seq: u64,
        /// The new thread.
        thread: Thread,
    },
    /// A record attributed to the wrong kind of owner.
    #[error("#{seq}: {what}")]
    BadAttribution {
        /// The record.
        seq: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// A monotonic clock (or the TSC) read by one thread went backwards.
    #[error("#{seq}: thread {thread} read {clock} {found} after {previous}")]
    ClockWentBack {
        /// The record.
        seq: u64,
        /// The thread.
        thread: Thread,
        /// The clock.
        clock: ClockKey,
        /// The earlier reading (nanoseconds, or TSC ticks).
        previous: i128,
        /// This reading.
        found: i128,
    },
    /// A signal's delivery point is not the thread's latest syscall.
    #[error(
        "#{seq}: signal to thread {thread} delivered at #{point}, but its latest syscall record \
         is {}",
        match latest { Some(l) => format!("#{l}"), None => "before the log".to_string() }
    )]
    BadDeliveryPoint {
        /// The signal record.
        seq: u64,
        /// The thread.
        thread: Thread,
        /// The delivery point it names.
        point: u64,
        /// The thread's latest syscall record in the log.
        latest: Option<u64>,
    },
    /// A read-family result that returned more bytes than its writes carry.
    #[error("#{seq}: returned {ret} bytes but the log holds {recorded} written bytes")]
    MissingBytes {
        /// The record.
        seq: u64,
        /// The return value.
        ret: i64,
        /// Bytes in its writes.
        recorded: u64,
    },
    /// A read-family result without the file descriptor argument.
    #[error("#{seq}: read-family result without its file descriptor argument")]
    NoFd {
        /// The record.
        seq: u64,
    },
}

fn at(seq: Option<u64>) -> String {
    seq.map(|s| format!(" (#{s})")).unwrap_or_default()
}

/// A clock whose readings by one thread never decrease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClockKey {
    /// A `clock_gettime` clock id.
    Clock(i32),
    /// The time-stamp counter (`rdtsc`, `rdtscp`).
    Tsc,
}

impl std::fmt::Display for ClockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClockKey::Clock(c) => write!(f, "clock {c}"),
            ClockKey::Tsc => f.write_str("the TSC"),
        }
    }
}

/// The monotonic clocks: `CLOCK_MONOTONIC`, `CLOCK_MONOTONIC_RAW`, `CLOCK_MONOTONIC_COARSE`,
/// `CLOCK_BOOTTIME`.
const MONOTONIC_CLOCKS: [i32; 4] = [1, 4, 6, 7];

fn monotonic_reading(t: &Time) -> Option<(ClockKey, i128)> {
    match *t {
        Time::ClockGettime { clock, sec, nsec } if MONOTONIC_CLOCKS.contains(&clock) => Some((
            ClockKey::Clock(clock),
            i128::from(sec) * 1_000_000_000 + i128::from(nsec),
        )),
        Time::Rdtsc { tsc } | Time::Rdtscp { tsc, .. } => Some((ClockKey::Tsc, i128::from(tsc))),
        _ => None,
    }
}

/// What a verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Records checked.
    pub records: u64,
    /// Event records among them.
    pub events: u64,
    /// Segments started.
    pub segments: u64,
    /// Distinct threads seen (alive at a segment start, created, or with records).
    pub threads: usize,
    /// Event records per kind ([`Event::kind_name`]).
    pub kinds: BTreeMap<&'static str, u64>,
    /// The first [`MAX_VIOLATIONS`] problems, in log order.
    pub violations: Vec<Violation>,
    /// Problems found beyond those listed.
    pub omitted: u64,
}

impl Report {
    /// Whether the log is consistent.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

#[derive(Debug, Clone, Default)]
struct ThreadState {
    last_seq: Option<u64>,
    last_syscall: Option<u64>,
    clocks: HashMap<ClockKey, i128>,
}

/// Checks a log record by record (see the module documentation for what).
#[derive(Debug, Default)]
pub struct Verifier {
    report: Report,
    in_segment: bool,
    /// The next sequence number due, once a segment started.
    expected: Option<u64>,
    /// The first segment's base: delivery points before it cannot be checked.
    first_base: Option<u64>,
    live: BTreeSet<Thread>,
    seen: BTreeSet<Thread>,
    threads: HashMap<Thread, ThreadState>,
}

impl Verifier {
    /// A verifier at the start of a log.
    pub fn new() -> Verifier {
        Verifier::default()
    }

    /// Checks the next record.
    pub fn check(&mut self, record: &Record) {
        self.report.records += 1;
        match record {
            Record::SegmentStart(s) => self.segment_start(s),
            Record::SegmentEnd(e) => {
                if !self.in_segment {
                    self.violation(Violation::Structure {
                        seq: None,
                        what: "segment end outside a segment",
                    });
                }
                if let Some(expected) = self.expected {
                    if e.next_seq != expected {
                        self.violation(Violation::Gap {
                            expected,
                            found: e.next_seq,
                        });
                        self.expected = Some(e.next_seq);
                    }
                }
                self.in_segment = false;
            }
            Record::Event(e) => self.event(e),
        }
    }

    /// The report.
    pub fn finish(mut self) -> Report {
        self.report.threads = self.seen.len();
        self.report
    }

    fn violation(&mut self, v: Violation) {
        if self.report.violations.len() < MAX_VIOLATIONS {
            self.report.violations.push(v);
        } else {
            self.report.omitted += 1;
        }
    }

    fn segment_start(&mut self, s: &SegmentStart) {
        self.report.segments += 1;
        let listed: BTreeSet<Thread> = s.live.iter().copied().collect();
        if self.in_segment {
            self.violation(Violation::Structure {
                seq: None,
                what: "segment start inside an open segment",
            });
        }
        if let Some(expected) = self.expected {
            if s.base_seq != expected {
                self.violation(Violation::Gap {
                    expected,
                    found: s.base_seq,
                });
            }
            if listed != self.live {
                self.violation(Violation::LiveSetMismatch {
                    base_seq: s.base_seq,
                    missing: self.live.difference(&listed).copied().collect(),
                    unexpected: listed.difference(&self.live).copied().collect(),
                });
            }
        }
        self.first_base.get_or_insert(s.base_seq);
        self.expected = Some(s.base_seq);
        self.in_segment = true;
        self.seen.extend(listed.iter().copied());
        self.live = listed;
    }

    fn event(&mut self, e: &EventRecord) {
        self.report.events += 1;
        *self.report.kinds.entry(e.event.kind_name()).or_default() += 1;
        let seq = e.seq;
        if !self.in_segment {
            self.violation(Violation::Structure {
                seq: Some(seq),
                what: "event outside a segment",
            });
        }
        if let Some(expected) = self.expected {
            if seq != expected {
                self.violation(Violation::Gap {
                    expected,
                    found: seq,
                });
            }
        }
        self.expected = Some(seq.saturating_add(1));

        let ingress = matches!(e.event, Event::IngressPacket { .. });
        if ingress {
            if !e.thread.is_none() {
                self.violation(Violation::BadAttribution {
                    seq,
                    what: "an ingress packet attributed to a thread",
                });
            }
            if e.interval_ns != 0 {
                self.violation(Violation::BadAttribution {
                    seq,
                    what: "an ingress packet with an interval",
                });
            }
            return;
        }
        if e.thread.is_none() {
            self.violation(Violation::BadAttribution {
                seq,
                what: "a thread's event attributed to no thread",
            });
            return;
        }

        let thread = e.thread;
        self.seen.insert(thread);
        if !self.live.contains(&thread) {
            self.violation(Violation::NotAlive { seq, thread });
        }
        let state = self.threads.entry(thread).or_default();
        let previous = state.last_seq;
        state.last_seq = Some(previous.map_or(seq, |p| p.max(seq)));
        if let Some(previous) = previous.filter(|&p| p >= seq) {
            self.violation(Violation::ThreadOutOfOrder {
                seq,
                thread,
                previous,
            });
        }
        self.effects(e);
    }

    /// Per-kind checks and the kind's effect on the set of live threads.
    fn effects(&mut self, e: &EventRecord) {
        let (seq, thread) = (e.seq, e.thread);
        match &e.event {
            Event::Time(t) => {
                if let Some((clock, found)) = monotonic_reading(t) {
                    let state = self.threads.entry(thread).or_default();
                    let previous = state.clocks.insert(clock, found);
                    if let Some(previous) = previous.filter(|&p| p > found) {
                        self.violation(Violation::ClockWentBack {
                            seq,
                            thread,
                            clock,
                            previous,
                            found,
                        });
                    }
                }
            }
            Event::ThreadCreate { child_tid, .. } => {
                let child = Thread::new(thread.tgid, *child_tid);
                let taken = self.live.contains(&child);
                self.create(seq, child, taken);
            }
            Event::ProcessFork { child_pid, .. } => {
                let child = Thread::main(*child_pid);
                // A new process's pid is no live thread's tgid.
                let taken = self.live.iter().any(|t| t.tgid == child.tgid);
                self.create(seq, child, taken);
            }
            Event::ThreadExit { .. } => {
                self.live.remove(&thread);
            }
            Event::Exec { .. } => {
                self.live.retain(|t| t.tgid != thread.tgid);
                let main = Thread::main(thread.tgid);
                self.live.insert(main);
                if main != thread {
                    let state = self.threads.remove(&thread).unwrap_or_default();
                    self.threads.insert(main, state);
                }
            }
            Event::Signal {
                delivered_at: Delivery::Syscall { seq: point },
                ..
            } => {
                let point = *point;
                let latest = self.threads.get(&thread).and_then(|s| s.last_syscall);
                let ok = match latest {
                    Some(l) => point == l,
                    None => self.first_base.is_some_and(|b| point < b),
                };
                if !ok {
                    self.violation(Violation::BadDeliveryPoint {
                        seq,
                        thread,
                        point,
                        latest,
                    });
                }
            }
            _ => {}
        }
        if e.event.is_syscall() {
            let id = match e.event {
                Event::Exec { .. } => Thread::main(thread.tgid),
                _ => thread,
            };
            self.threads.entry(id).or_default().last_syscall = Some(seq);
        }
    }

    fn create(&mut self, seq: u64, child: Thread, taken: bool) {
        if taken || child.tid == 0 {
            self.violation(Violation::AlreadyAlive { seq, thread: child });
        }
        self.live.insert(child);
        self.seen.insert(child);
        self.threads.insert(child, ThreadState::default());
    }
}

/// Checks a whole log.
pub fn verify<'a>(records: impl IntoIterator<Item = &'a Record>) -> Report {
    let mut v = Verifier::new();
    for r in records {
        v.check(r);
    }
    v.finish()
}

/// The bytes one file descriptor of one process delivered to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedStream {
    /// The process.
    pub tgid: u32,
    /// The file descriptor.
    pub fd: i32,
    /// The sequence number of the `accept`/`accept4` that returned the descriptor; `None` if it
    /// was open before the log (or not a socket accepted in it).
    pub accepted_at: Option<u64>,
    /// The bytes, in the order the application received them.
    pub data: Vec<u8>,
    /// Calls that returned data.
    pub reads: u64,
    /// Whether a read returned 0 (end of stream).
    pub eof: bool,
}

/// The streams of a log, and the problems found rebuilding them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Streams {
    /// Every stream, in order of first appearance (an `accept` or a read).
    pub streams: Vec<ReceivedStream>,
    /// Results whose data is not all in the log, or that name no descriptor.
    pub problems: Vec<Violation>,
}

impl Streams {
    /// The streams of descriptor `fd` of process `tgid`, oldest first.
    pub fn of(&self, tgid: u32, fd: i32) -> impl Iterator<Item = &ReceivedStream> {
        self.streams
            .iter()
            .filter(move |s| s.tgid == tgid && s.fd == fd)
    }

    /// The streams of connections accepted in the log.
    pub fn accepted(&self) -> impl Iterator<Item = &ReceivedStream> {
        self.streams.iter().filter(|s| s.accepted_at.is_some())
    }
}

/// Rebuilds received streams record by record (see [`received_streams`]).
#[derive(Debug, Default)]
pub struct StreamRebuilder {
    out: Streams,
    current: HashMap<(u32, i32), usize>,
}

impl StreamRebuilder {
    /// A rebuilder at the start of a log.
    pub fn new() -> StreamRebuilder {
        StreamRebuilder::default()
    }

    /// Takes in the next record.
    pub fn feed(&mut self, record: &Record) {
        let Some(e) = record.as_event() else {
            return;
        };
        let Event::SyscallResult {
            nr,
            args,
            ret,
            writes,
        } = &e.event
        else {
            return;
        };
        let tgid = e.thread.tgid;
        match *nr {
            nr::ACCEPT | nr::ACCEPT4 => {
                if let Ok(fd) = i32::try_from(*ret) {
                    if fd >= 0 {
                        self.open(tgid, fd, Some(e.seq));
                    }
                }
            }
            nr::READ | nr::READV | nr::RECVFROM | nr::RECVMSG => {
                let flags = match *nr {
                    nr::RECVFROM => args.get(3),
                    nr::RECVMSG => args.get(2),
                    _ => None,
                };
                if flags.is_some_and(|f| f & MSG_PEEK != 0) || *ret < 0 {
                    return;
                }
                // The kernel takes the descriptor from the register's low 32 bits.
                let Some(fd) = args.first().map(|&a| a as u32 as i32) else {
                    self.out.problems.push(Violation::NoFd { seq: e.seq });
                    return;
                };
                let i = match self.current.get(&(tgid, fd)) {
                    // Data after end of stream: the descriptor was closed and reused for
                    // something else (`close` and `open` are not in the log).
                    Some(&i) if self.out.streams[i].eof && *ret > 0 => self.open(tgid, fd, None),
                    Some(&i) => i,
                    None => self.open(tgid, fd, None),
                };
                let stream = &mut self.out.streams[i];
                if *ret == 0 {
                    stream.eof = true;
                    return;
                }
                let want = u64::try_from(*ret).unwrap_or(0);
                let mut left = want;
                for w in writes {
                    if left == 0 {
                        break;
                    }
                    let take = w
                        .bytes
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    stream.data.extend_from_slice(&w.bytes[..take]);
                    left -= take as u64;
                }
                stream.reads += 1;
                if left > 0 {
                    self.out.problems.push(Violation::MissingBytes {
                        seq: e.seq,
                        ret: *ret,
                        recorded: want - left,
                    });
                }
            }
            _ => {}
        }
    }

    /// The streams.
    pub fn finish(self) -> Streams {
        self.out
    }

    fn open(&mut self, tgid: u32, fd: i32, accepted_at: Option<u64>) -> usize {
        let i = self.out.streams.len();
        self.out.streams.push(ReceivedStream {
            tgid,
            fd,
            accepted_at,
            data: Vec::new(),
            reads: 0,
            eof: false,
        });
        self.current.insert((tgid, fd), i);
        i
    }
}

/// Rebuilds, per file descriptor of each process, the bytes the application received through
/// `read`, `readv`, `recvfrom` and `recvmsg` results: the first `ret` bytes of each result's
/// writes (the format puts a read's data first). Peeks (`MSG_PEEK`) and failed calls are left
/// out; a descriptor returned by `accept`/`accept4` starts a new stream, and so does data read
/// from a descriptor after it reported end of stream (it was closed and reused: `close` and
/// `open` are not in the log). Threads of a process
/// share its descriptors. Not covered: `recvmmsg` (datagrams), `pread`/`preadv` (files),
/// `MSG_TRUNC` reads on stream sockets (their discarded bytes are reported missing), and data
/// that never reaches user memory (`splice`, `sendfile`).
pub fn received_streams<'a>(records: impl IntoIterator<Item = &'a Record>) -> Streams {
    let mut r = StreamRebuilder::new();
    for record in records {
        r.feed(record);
    }
    r.finish()
}
