//! The record model: what one entry of the log says.
//!
//! A log is a sequence of [`Record`]s: a [`SegmentStart`], the segment's [`EventRecord`]s, and
//! (once the segment is closed) a [`SegmentEnd`]. Every event record carries a container-wide
//! sequence number, the thread it belongs to as the container sees it, and the interval since
//! that thread's previous syscall; what happened is its [`Event`]. The crate documentation says
//! what each kind is for at replay.

use std::fmt;

/// The most syscall arguments a [`Event::SyscallResult`] carries (x86_64 passes six).
pub const MAX_ARGS: usize = 6;

/// A thread as the container sees it: ids in the container's pid namespace.
///
/// [`Thread::NONE`] (`0/0`, never a real id) marks events that belong to no thread: packets
/// entering the container's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Thread {
    /// The process (thread group) id.
    pub tgid: u32,
    /// The thread id (equal to `tgid` for a process's main thread).
    pub tid: u32,
}

impl Thread {
    /// No thread: the owner of [`Event::IngressPacket`] records.
    pub const NONE: Thread = Thread { tgid: 0, tid: 0 };

    /// A thread of process `tgid`.
    pub const fn new(tgid: u32, tid: u32) -> Thread {
        Thread { tgid, tid }
    }

    /// The main thread of process `pid` (`tid == tgid`).
    pub const fn main(pid: u32) -> Thread {
        Thread {
            tgid: pid,
            tid: pid,
        }
    }

    /// Whether this is [`Thread::NONE`].
    pub const fn is_none(self) -> bool {
        self.tgid == 0 && self.tid == 0
    }
}

impl fmt::Display for Thread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tgid, self.tid)
    }
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Opens a segment (always the first record after a segment header).
    SegmentStart(SegmentStart),
    /// Something nondeterministic the container did or received.
    Event(EventRecord),
    /// Closes a segment.
    SegmentEnd(SegmentEnd),
}

impl Record {
    /// The event record, if this is one.
    pub fn as_event(&self) -> Option<&EventRecord> {
        match self {
            Record::Event(e) => Some(e),
            _ => None,
        }
    }

    /// The sequence number of an event record.
    pub fn seq(&self) -> Option<u64> {
        self.as_event().map(|e| e.seq)
    }
}

/// Opens a segment: the log of one container from one point (its start, or a checkpoint) on.
///
/// Segment markers take no sequence number: the segment's first event has `base_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentStart {
    /// The sequence number of the segment's first event; at least 1 (so that
    /// [`crate::Position`] `0` means "nothing recorded"). A container's first segment starts at
    /// 1; a segment opened at a checkpoint starts at the checkpoint's cut (the first sequence
    /// number the checkpoint does not contain).
    pub base_seq: u64,
    /// The replication epoch the segment belongs to (the checkpoint it follows).
    pub epoch: u64,
    /// The container's id (as containerd names it).
    pub container_id: String,
    /// The threads alive when the segment starts, in no particular order: for the first segment
    /// the container's init, for a later one every thread of the checkpoint. The verifier
    /// starts from this set.
    pub live: Vec<Thread>,
}

/// Closes a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentEnd {
    /// The sequence number the next event would have had: `base_seq` plus the number of event
    /// records in the segment. The next segment, if any, starts there.
    pub next_seq: u64,
}

/// One event with its place in the container-wide order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// The container-wide sequence number: dense, increasing by one per event record, at most
    /// `u64::MAX - 1`.
    pub seq: u64,
    /// The thread the event belongs to ([`Thread::NONE`] for ingress packets).
    pub thread: Thread,
    /// Nanoseconds from the return of this thread's previous syscall record to this event (its
    /// syscall entry, its trap, the signal's delivery); 0 for ingress packets and for a thread's
    /// first event when the recorder has no earlier syscall of it. "Syscall records" here are
    /// every kind except [`Event::Signal`], [`Event::Unrecordable`], [`Event::Gap`] and
    /// [`Event::IngressPacket`].
    /// Unsigned: a negative interval cannot be written.
    pub interval_ns: u64,
    /// What happened.
    pub event: Event,
}

/// Bytes written to the thread's memory by a syscall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemWrite {
    /// The user-space address of the first byte.
    pub addr: u64,
    /// The bytes, as written.
    pub bytes: Vec<u8>,
}

/// Where a signal was delivered to its thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// On the return of the thread's syscall with this sequence number (interrupted, or
    /// completed and then the handler ran): the thread's latest syscall record before the
    /// signal.
    Syscall {
        /// The syscall record's sequence number.
        seq: u64,
    },
    /// While the thread ran user code, after its previous syscall (no hardware counters here,
    /// so the exact instruction is not known): replay delivers it after at least the recorded
    /// interval and before the thread's next syscall.
    BetweenSyscalls,
}

/// A read of a clock or of the time-stamp counter, with the value the thread got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Time {
    /// `clock_gettime(clock, &ts)` (a vDSO call patched to trap, or the syscall) that succeeded.
    ClockGettime {
        /// The clock id (`CLOCK_REALTIME` 0, `CLOCK_MONOTONIC` 1, ...).
        clock: i32,
        /// `ts.tv_sec`.
        sec: i64,
        /// `ts.tv_nsec`.
        nsec: i64,
    },
    /// `gettimeofday(&tv, NULL)` that succeeded (a call with a non-null timezone is recorded as
    /// a [`Event::SyscallResult`] with its writes).
    Gettimeofday {
        /// `tv.tv_sec`.
        sec: i64,
        /// `tv.tv_usec`.
        usec: i64,
    },
    /// `time(tloc)`: the return value (also written to `*tloc` when non-null; replay does that).
    Time {
        /// Seconds since the epoch.
        sec: i64,
    },
    /// `rdtsc` (trapped with `PR_SET_TSC`): `edx:eax`.
    Rdtsc {
        /// The counter.
        tsc: u64,
    },
    /// `rdtscp`: `edx:eax` and `ecx`.
    Rdtscp {
        /// The counter.
        tsc: u64,
        /// `IA32_TSC_AUX` (the CPU number on Linux).
        aux: u32,
    },
}

/// Instructions whose results depend on the machine and cannot be trapped here (PLATFORM.md:
/// CPUID faulting is unavailable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unrecordable {
    /// `cpuid`.
    Cpuid,
    /// `rdrand`.
    Rdrand,
    /// `rdseed`.
    Rdseed,
    /// `rdpid`.
    Rdpid,
}

/// What a [`Event::Gap`] says the log lacks (format version 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GapKind {
    /// A syscall made through the i386 or x32 ABI: seen, not recorded.
    ForeignAbi,
    /// `io_uring` in use: its completions bypass syscalls and are not recorded.
    IoUring,
    /// A vDSO time entry could not be patched: that process's clock reads are not recorded.
    VdsoUnpatched,
    /// `rdtsc` could not be trapped in that process: its reads are not recorded.
    RdtscUntrapped,
    /// The thread's previous syscall record lacks bytes the call wrote (they could not be read
    /// back from the thread's memory).
    IncompleteCapture,
    /// Executable memory that could not be scanned for unrecordable instructions (anonymous or
    /// generated at run time); `ip` is its start.
    UnscannedCode,
    /// Anything else the recorder knows it did not record.
    Other,
}

impl GapKind {
    /// A short name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            GapKind::ForeignAbi => "foreign-abi-syscall",
            GapKind::IoUring => "io-uring",
            GapKind::VdsoUnpatched => "vdso-unpatched",
            GapKind::RdtscUntrapped => "rdtsc-untrapped",
            GapKind::IncompleteCapture => "incomplete-capture",
            GapKind::UnscannedCode => "unscanned-code",
            GapKind::Other => "other",
        }
    }
}

/// What happened. See the crate documentation for what each kind is for at replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The result of an input syscall: its return value and every byte it wrote to the thread's
    /// memory.
    SyscallResult {
        /// The syscall number (x86_64).
        nr: u64,
        /// The key arguments, in register order, at most [`MAX_ARGS`] (the recorder keeps the
        /// ones replay and the verifier need; trailing ones may be left out).
        args: Vec<u64>,
        /// The return value (`-errno` on failure).
        ret: i64,
        /// Every write to user memory, in the order the kernel made them. For the read/recv
        /// family the data the call delivered comes first (`ret` bytes, iovec by iovec), then
        /// anything else it wrote (address, lengths, control messages, flags).
        writes: Vec<MemWrite>,
    },
    /// A clock or time-stamp counter read.
    Time(Time),
    /// The thread created a thread of its own process (`clone` with `CLONE_THREAD`).
    ThreadCreate {
        /// The new thread's id; its tgid is the creator's.
        child_tid: u32,
        /// The clone flags.
        flags: u64,
    },
    /// The thread created a process (`fork`, `vfork`, `clone` without `CLONE_THREAD`).
    ProcessFork {
        /// The new process's pid (its main thread is `child_pid/child_pid`).
        child_pid: u32,
        /// The clone flags (`SIGCHLD` for `fork`, `CLONE_VM | CLONE_VFORK | SIGCHLD` for
        /// `vfork`).
        flags: u64,
    },
    /// The thread's `execve`/`execveat` succeeded. Every other thread of the process is gone
    /// afterwards, and the thread continues as the process's main thread (`tid` becomes
    /// `tgid`), as the kernel does.
    Exec {
        /// The program, as the call named it (bytes: paths need not be UTF-8).
        path: Vec<u8>,
    },
    /// The thread ended.
    ThreadExit {
        /// The wait status (`PTRACE_EVENT_EXIT`'s message): exit code or terminating signal.
        status: i32,
    },
    /// A signal was delivered to the thread.
    Signal {
        /// The signal number.
        signo: u32,
        /// Where it was delivered.
        delivered_at: Delivery,
        /// The `siginfo_t` the handler got (raw bytes, 128 on x86_64).
        siginfo: Vec<u8>,
    },
    /// A syscall that orders threads (futex, ...): only its place in the order and its result.
    SyncOrder {
        /// The syscall number.
        nr: u64,
        /// The address it synchronises on (the futex word), 0 if none.
        addr: u64,
        /// The operation (the futex op), 0 if none.
        op: u64,
        /// The return value.
        ret: i64,
    },
    /// A packet entering the container's network namespace, logged before its kernel
    /// processed it. Belongs to [`Thread::NONE`].
    IngressPacket {
        /// The packet (IP header on).
        bytes: Vec<u8>,
    },
    /// An instruction that cannot be recorded was found in the thread.
    Unrecordable {
        /// Which instruction.
        what: Unrecordable,
        /// Its address, 0 if unknown.
        ip: u64,
    },
    /// Something of the thread the recorder knows it did not record (format version 2): a
    /// replay of the epoch may diverge there.
    Gap {
        /// What.
        what: GapKind,
        /// An address it concerns, 0 if none.
        ip: u64,
        /// What exactly, in words (UTF-8).
        detail: String,
    },
}

impl Event {
    /// Whether this kind stands for a syscall (or trap) of its thread, so that the next
    /// record's `interval_ns` is measured from it.
    pub fn is_syscall(&self) -> bool {
        !matches!(
            self,
            Event::Signal { .. }
                | Event::Unrecordable { .. }
                | Event::Gap { .. }
                | Event::IngressPacket { .. }
        )
    }

    /// A short name of the kind, for messages and statistics.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Event::SyscallResult { .. } => "syscall-result",
            Event::Time(_) => "time",
            Event::ThreadCreate { .. } => "thread-create",
            Event::ProcessFork { .. } => "process-fork",
            Event::Exec { .. } => "exec",
            Event::ThreadExit { .. } => "thread-exit",
            Event::Signal { .. } => "signal",
            Event::SyncOrder { .. } => "sync-order",
            Event::IngressPacket { .. } => "ingress-packet",
            Event::Unrecordable { .. } => "unrecordable",
            Event::Gap { .. } => "gap",
        }
    }
}
