//! rrc's hybrid-mode event log.
//!
//! In hybrid mode the recorder on the primary logs every nondeterministic event of a container,
//! in one container-wide order, and streams the log to the backup; the backup acknowledges
//! cumulative positions, keeps the log since the last committed checkpoint, and on failover
//! replays it on top of that checkpoint. This crate is the log itself:
//!
//! * the record model ([`Record`], [`EventRecord`], [`Event`]);
//! * the versioned, framed, checksummed binary format (specified in `FORMAT.md`, included
//!   below under [`format`](mod@format)): [`Writer`] appends a log to any
//!   [`std::io::Write`], [`Reader`] reads a finished input (a file), [`Decoder`] decodes a
//!   stream arriving in pieces, and [`wire`] has the stateless per-header and per-record
//!   functions;
//! * positions ([`Position`], what the backup acknowledges) and checkpoint cuts
//!   ([`CheckpointCut`], what may be discarded once a checkpoint is committed);
//! * the verifier core ([`verify`](mod@verify)): total-order consistency, and the byte
//!   streams the application received, to compare with what clients sent.
//!
//! It must not touch anything else: no I/O beyond the `Write` it is given and byte slices, no
//! knowledge of ptrace, seccomp or the replication channel (the recorder decides what to record
//! and how, the shim moves the bytes, the replayer applies them), no clocks of its own.
//! Decoding never panics and never trusts a length before checking it: its input comes from
//! the network and from disk (`fuzz/` has a cargo-fuzz target, `decode`).
//!
//! # Records
//!
//! A log is a sequence of **segments**; a segment is the log of one container from one point
//! on (its start, or a checkpoint). It opens with a [`SegmentStart`] (first sequence number,
//! epoch, container id, threads alive) and closes with a [`SegmentEnd`]; in between come
//! [`EventRecord`]s. Segment markers take no sequence number: events are numbered densely
//! across segments, from 1 for a container's first event, and a segment opened at a checkpoint
//! starts at the checkpoint's cut. Every event record carries:
//!
//! * `seq`: its place in the container-wide order, which replay enforces across threads;
//! * `thread`: the thread as the container sees it (`tgid` and `tid` in the container's pid
//!   namespace), [`Thread::NONE`] for ingress packets;
//! * `interval_ns`: nanoseconds since the thread's previous syscall returned, which replay
//!   enforces as a minimum so that racy user code between syscalls runs the way it did (the
//!   data-race mitigation of DESIGN.md).
//!
//! # Event kinds and what each is for at replay
//!
//! | kind | recorded for | at replay |
//! |---|---|---|
//! | [`Event::SyscallResult`] | input syscalls: the read/recv family (incl. `readv`, `preadv`, `recvmsg`, `recvmmsg`), `accept`/`accept4`, `epoll_wait`/`epoll_pwait`/`epoll_pwait2`, `poll`/`ppoll`, `select`/`pselect6`, `getrandom`, reads of `/dev/urandom`, and any other syscall whose result depends on the outside world | the syscall is not executed (or executed and overridden): the recorded return value is set and every recorded write is copied into the thread's memory, so the thread sees exactly what it saw |
//! | [`Event::Time`] | `clock_gettime`, `gettimeofday`, `time` (vDSO entry points patched to trap), `rdtsc`/`rdtscp` (trapped with `PR_SET_TSC`) | the recorded value is returned (written to the call's buffer, or to `rax`/`rdx`/`rcx` for the instructions) |
//! | [`Event::ThreadCreate`] | `clone` with `CLONE_THREAD` | the clone runs; the new thread must get the recorded tid (restored pid namespace), and its records are attributed to it |
//! | [`Event::ProcessFork`] | `fork`, `vfork`, `clone` without `CLONE_THREAD` | likewise for the new process |
//! | [`Event::Exec`] | a successful `execve`/`execveat` | the exec runs; the path checks that replay is on the same program; the other threads of the process end, the caller becomes the main thread |
//! | [`Event::ThreadExit`] | a thread's end (exit, exit_group, killed) | replay checks that the thread ends there with that status |
//! | [`Event::Signal`] | a signal delivered to a thread, with the point of delivery | replay injects the signal with the recorded `siginfo` at the same point: on return from the named syscall, or after at least the recorded interval before the thread's next syscall |
//! | [`Event::SyncOrder`] | futex operations and every other syscall that orders threads | the syscall runs when its turn in the order comes; its result is checked (or forced) |
//! | [`Event::IngressPacket`] | a packet entering the container's network namespace, logged before its kernel processes it | re-injected into the restored network namespace at its place in the order, so the kernel's TCP state (what it acknowledged) is rebuilt |
//! | [`Event::Unrecordable`] | `cpuid`, `rdrand`, `rdseed`, `rdpid` found in the thread's code (not trappable here) | nothing can be replayed: the replayer reports that this epoch's recovery may diverge if the thread executes it |
//! | [`Event::Gap`] (format version 2) | anything else the recorder knows it did not record: a syscall through a foreign ABI, `io_uring`, a vDSO entry or `rdtsc` it could not trap, a result it could not read back whole, code it could not scan | likewise: the replayer reports it, and a divergence near it is explained |
//!
//! # Format, in brief
//!
//! A segment is a 14-byte header (magic `RRCEVLOG`, version 2 as u16 LE, CRC-32C of the ten
//! bytes before) followed by records; each record is its body length (u32 LE, at most
//! [`wire::MAX_RECORD`]), the body (a kind byte and the kind's fields, integers as LEB128
//! varints, signed ones zigzag-encoded, byte strings length-prefixed), and the CRC-32C of the
//! length and body. A reader refuses an unknown version ([`EventLogError::UnknownVersion`]),
//! a checksum mismatch ([`EventLogError::Corrupt`]), a sequence gap ([`EventLogError::Gap`]),
//! and, on a finished input, a record cut short ([`EventLogError::Truncated`]); a stream
//! decoder instead waits for more bytes. See [`format`](mod@format) for every field.

pub mod event;
pub mod position;
pub mod reader;
pub mod verify;
pub mod wire;
pub mod writer;

mod error;

/// The format specification (`FORMAT.md`).
#[doc = include_str!("../FORMAT.md")]
pub mod format {}

pub use error::EventLogError;
pub use event::{
    Delivery, Event, EventRecord, GapKind, MemWrite, Record, SegmentEnd, SegmentStart, Thread,
    Time, Unrecordable, MAX_ARGS,
};
pub use position::{CheckpointCut, Position};
pub use reader::{segments, Decoder, Reader, SegmentSpan};
pub use verify::{received_streams, verify, Report, Streams, Violation};
pub use writer::Writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_prop;
#[cfg(test)]
mod tests_verify;
#[cfg(test)]
mod testutil;
