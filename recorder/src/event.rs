//! What the recorder records, and where it goes.
//!
//! [`Event`] is this crate's own small vocabulary. [`crate::eventlog::EventlogSink`] maps it
//! onto rrc-eventlog's versioned, framed, checksummed log (the real output);
//! [`JsonLinesSink`] writes one JSON object per line (a debug format: byte buffers as hex
//! strings) and [`VecSink`] keeps events in memory for tests.

use std::io::{self, Write};

use serde::Serialize;

/// A thread id as the recorder sees it (host pid namespace).
pub type Tid = i32;

/// Bytes the kernel wrote into the tracee's memory during a syscall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MemWrite {
    /// Address in the tracee.
    pub addr: u64,
    /// The bytes found there at the syscall's exit stop.
    #[serde(serialize_with = "hex")]
    pub data: Vec<u8>,
}

/// A completed (or, for exit/exit_group, entered) traced syscall.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SyscallRecord {
    /// Thread.
    pub tid: Tid,
    /// x86_64 syscall number.
    pub nr: u64,
    /// Arguments at entry.
    pub args: [u64; 6],
    /// Return value (negative errno on failure; the kernel's restart codes -512..-516 mean the
    /// call was interrupted by a signal, recorded next, and restarted or failed with EINTR).
    /// `None` for syscalls that do not return (exit, exit_group): recorded at entry.
    pub ret: Option<i64>,
    /// Nanoseconds from the recorder resuming this thread after its previous recorded syscall
    /// (or from its creation or attach) to this syscall's seccomp stop (CLOCK_MONOTONIC in the
    /// recorder). This is user-mode run time plus the recorder's own latency.
    pub gap_ns: u64,
    /// Every byte the syscall wrote into the tracee's memory, in the order the kernel wrote it.
    pub writes: Vec<MemWrite>,
    /// True if some memory the syscall wrote could not be read back (the record is then
    /// incomplete; the recorder also logs a warning).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub incomplete: bool,
}

/// How a new thread or process was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CreateKind {
    /// A thread in the creator's thread group.
    Thread,
    /// A new process (fork, or clone without CLONE_THREAD).
    Process,
    /// A new process sharing the creator's memory until it execs or exits (vfork).
    Vfork,
}

/// How a thread ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    /// It exited with this status.
    Exited(i32),
    /// It was killed by this signal.
    Killed(i32),
    /// Another thread of its group called execve, which ended it.
    ReplacedByExec,
}

/// A vDSO entry point the recorder overwrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PatchedSymbol {
    /// Symbol names at this address (`__vdso_clock_gettime`, `clock_gettime`, ...).
    pub names: Vec<String>,
    /// Address in the tracee.
    pub addr: u64,
    /// The syscall the stub makes, or `None` for a stub that returns -ENOSYS.
    pub syscall: Option<u32>,
}

/// One recorded event. Events reach the [`Sink`] in the one global order the recorder observed
/// them in (across all threads and processes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// The recorder attached to an existing thread.
    Attached {
        /// Thread.
        tid: Tid,
        /// Its thread group (process).
        tgid: Tid,
        /// Its id in its own pid namespace (what the container sees), if known.
        ns_tid: Option<i32>,
    },
    /// A traced syscall, recorded at its exit (or, for exit/exit_group, at entry).
    Syscall(SyscallRecord),
    /// A thread entered a syscall that orders threads (`futex`, `futex_waitv`), recorded at its
    /// seccomp stop, before the kernel acts on it; its [`Event::Syscall`] follows at its exit.
    /// The entry is what makes the log causally consistent: a FUTEX_WAKE's entry always precedes
    /// the exit of the FUTEX_WAIT it woke, whereas the two exits may be observed either way.
    SyscallEntry {
        /// Thread.
        tid: Tid,
        /// Syscall number.
        nr: u64,
        /// Arguments.
        args: [u64; 6],
        /// As [`SyscallRecord::gap_ns`].
        gap_ns: u64,
    },
    /// A thread or process was created.
    ThreadCreated {
        /// The creating thread.
        parent: Tid,
        /// The new thread.
        child: Tid,
        /// The new thread's thread group.
        child_tgid: Tid,
        /// How.
        kind: CreateKind,
        /// The new thread's id in its own pid namespace, if known.
        ns_tid: Option<i32>,
        /// The clone flags, in `clone(2)`'s encoding: `clone`'s first argument; `SIGCHLD` for
        /// `fork`; `CLONE_VM | CLONE_VFORK | SIGCHLD` for `vfork`; for `clone3`, the
        /// `clone_args` flags with the exit signal in the low byte. 0 if the creator was not
        /// seen entering one of these calls.
        flags: u64,
        /// As [`SyscallRecord::gap_ns`], of the creating syscall (0 if not seen).
        gap_ns: u64,
    },
    /// A process replaced its image (PTRACE_EVENT_EXEC).
    Exec {
        /// The thread, after exec (the thread group leader's id).
        tid: Tid,
        /// The id the execing thread had before (differs when a non-leader thread execs).
        former_tid: Tid,
        /// `/proc/TID/exe` after the exec, if readable.
        exe: Option<String>,
        /// The program as the call named it (`execve`'s `pathname`, `execveat`'s), read at the
        /// call's entry; `None` if it could not be read.
        #[serde(serialize_with = "lossy")]
        path: Option<Vec<u8>>,
        /// As [`SyscallRecord::gap_ns`], of the `execve`/`execveat` (0 if not seen).
        gap_ns: u64,
    },
    /// The recorder patched a process's vDSO.
    VdsoPatched {
        /// The thread group.
        tgid: Tid,
        /// Base address of the `[vdso]` mapping.
        base: u64,
        /// What was patched.
        symbols: Vec<PatchedSymbol>,
    },
    /// A signal was delivered to a thread (signal-delivery-stop), at this point of its
    /// execution: after its previous recorded event, at user-mode address `ip`.
    Signal {
        /// Thread.
        tid: Tid,
        /// Signal number.
        signo: i32,
        /// `si_code`.
        code: i32,
        /// `si_errno`.
        errno: i32,
        /// User-mode instruction pointer where it is delivered.
        ip: u64,
        /// The syscall the thread is returning from as the signal is delivered (`orig_rax`),
        /// `None` when it is delivered while the thread ran user code (an interrupt or a fault).
        syscall: Option<u64>,
        /// The whole `siginfo_t` (128 bytes), as `PTRACE_GETSIGINFO` returned it.
        #[serde(serialize_with = "hex")]
        siginfo: Vec<u8>,
        /// Nanoseconds from the recorder resuming the thread after its previous recorded
        /// syscall (or trap) to this delivery.
        gap_ns: u64,
    },
    /// A `rdtsc`/`rdtscp` the recorder emulated (the tracee runs with PR_TSC_SIGSEGV).
    Rdtsc {
        /// Thread.
        tid: Tid,
        /// Instruction address.
        ip: u64,
        /// The counter value returned.
        value: u64,
        /// For `rdtscp`: the TSC_AUX value returned in ecx; `None` for `rdtsc`.
        aux: Option<u32>,
        /// As [`SyscallRecord::gap_ns`], to the trap.
        gap_ns: u64,
    },
    /// A thread ended.
    ThreadExited {
        /// Thread.
        tid: Tid,
        /// How.
        how: ExitKind,
    },
    /// Something that happened and cannot be recorded faithfully (reported, not ignored): a
    /// gap record in the log.
    Unrecordable {
        /// Thread.
        tid: Tid,
        /// What kind of gap.
        #[serde(serialize_with = "gap_name")]
        kind: rrc_eventlog::GapKind,
        /// An address it concerns, 0 if none.
        ip: u64,
        /// What, in words.
        what: String,
    },
}

fn gap_name<S: serde::Serializer>(k: &rrc_eventlog::GapKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.name())
}

impl Event {
    /// The thread this event belongs to.
    pub fn tid(&self) -> Tid {
        match self {
            Event::Attached { tid, .. }
            | Event::Exec { tid, .. }
            | Event::Signal { tid, .. }
            | Event::Rdtsc { tid, .. }
            | Event::ThreadExited { tid, .. }
            | Event::Unrecordable { tid, .. }
            | Event::SyscallEntry { tid, .. } => *tid,
            Event::VdsoPatched { tgid, .. } => *tgid,
            Event::Syscall(s) => s.tid,
            Event::ThreadCreated { parent, .. } => *parent,
        }
    }
}

/// Where events go, in order: [`crate::eventlog::EventlogSink`] (the log), [`JsonLinesSink`]
/// (debugging), [`VecSink`] (tests).
///
/// `record` runs on the tracing thread, synchronously, while the traced thread waits: keep it
/// cheap. With [`crate::Options::trap_rdtsc`] that thread runs with `PR_TSC_SIGSEGV`: do not
/// read clocks through the vDSO in `record` (`Instant::now`, `SystemTime::now` execute
/// `rdtsc` and would kill the recorder); use [`crate::recorder::now_ns`].
pub trait Sink {
    /// Takes the next event. An error stops the recording (the tracees are then killed by
    /// `PTRACE_O_EXITKILL` when the recorder exits: nothing runs unrecorded).
    fn record(&mut self, event: Event) -> io::Result<()>;

    /// Makes everything recorded so far durable or visible (called at the end).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Every attached thread has been announced ([`Event::Attached`]) and is still stopped:
    /// called once per attach, before any of them resumes.
    fn attached(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Every thread is parked for the checkpoint of `epoch` (none runs until
    /// [`Sink::checkpoint_done`]): cut the log here, and let no ingress packet in until then.
    /// Returns where the log was cut. A sink that cannot cut refuses, and the checkpoint is
    /// not taken.
    fn checkpoint(&mut self, epoch: u64) -> io::Result<Cut> {
        let _ = epoch;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this output cannot be cut for a checkpoint",
        ))
    }

    /// The checkpoint is dumped (or abandoned): ingress packets may be logged again.
    fn checkpoint_done(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a checkpoint cuts the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// The first sequence number the checkpoint does not contain (the new segment's base).
    pub seq: u64,
    /// The byte offset, in the log's output, of the new segment's header: every byte before
    /// it may be dropped once the checkpoint is committed.
    pub offset: u64,
}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn record(&mut self, event: Event) -> io::Result<()> {
        (**self).record(event)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
    fn attached(&mut self) -> io::Result<()> {
        (**self).attached()
    }
    fn checkpoint(&mut self, epoch: u64) -> io::Result<Cut> {
        (**self).checkpoint(epoch)
    }
    fn checkpoint_done(&mut self) -> io::Result<()> {
        (**self).checkpoint_done()
    }
}

/// Keeps events in memory (tests).
#[derive(Debug, Default)]
pub struct VecSink {
    /// The events, in order.
    pub events: Vec<Event>,
    /// Checkpoints cut: (epoch, number of events before the cut).
    pub cuts: Vec<(u64, usize)>,
    /// Whether a checkpoint is in progress (between `checkpoint` and `checkpoint_done`).
    pub in_checkpoint: bool,
}

impl Sink for VecSink {
    fn record(&mut self, event: Event) -> io::Result<()> {
        self.events.push(event);
        Ok(())
    }

    fn checkpoint(&mut self, epoch: u64) -> io::Result<Cut> {
        self.cuts.push((epoch, self.events.len()));
        self.in_checkpoint = true;
        Ok(Cut {
            seq: self.events.len() as u64 + 1,
            offset: self.events.len() as u64,
        })
    }

    fn checkpoint_done(&mut self) -> io::Result<()> {
        self.in_checkpoint = false;
        Ok(())
    }
}

/// Writes one JSON object per event and line: `{"seq":N,"ev":"syscall","name":"read",...}`.
/// A debug format; the log is [`crate::eventlog::EventlogSink`]'s.
#[derive(Debug)]
pub struct JsonLinesSink<W: Write> {
    out: W,
    seq: u64,
}

impl<W: Write> JsonLinesSink<W> {
    /// A sink writing to `out` (wrap files in a `BufWriter`).
    pub fn new(out: W) -> Self {
        Self { out, seq: 0 }
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'static str>,
    #[serde(flatten)]
    event: &'a Event,
}

impl<W: Write> Sink for JsonLinesSink<W> {
    fn record(&mut self, event: Event) -> io::Result<()> {
        let name = match &event {
            Event::Syscall(s) => crate::syscalls::name_of(s.nr),
            Event::SyscallEntry { nr, .. } => crate::syscalls::name_of(*nr),
            _ => None,
        };
        let line = Line {
            seq: self.seq,
            name,
            event: &event,
        };
        serde_json::to_writer(&mut self.out, &line).map_err(io::Error::other)?;
        self.out.write_all(b"\n")?;
        self.seq += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn hex<S: serde::Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(data))
}

fn lossy<S: serde::Serializer>(data: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match data {
        Some(d) => s.serialize_some(&String::from_utf8_lossy(d)),
        None => s.serialize_none(),
    }
}

/// Lower-case hex of `data`.
pub fn to_hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(data.len() * 2);
    for b in data {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_format() {
        let mut sink = JsonLinesSink::new(Vec::new());
        sink.record(Event::Syscall(SyscallRecord {
            tid: 7,
            nr: 0,
            args: [3, 0x1000, 4, 0, 0, 0],
            ret: Some(2),
            gap_ns: 5,
            writes: vec![MemWrite {
                addr: 0x1000,
                data: vec![0xab, 0x01],
            }],
            incomplete: false,
        }))
        .expect("record");
        sink.record(Event::ThreadExited {
            tid: 7,
            how: ExitKind::Exited(0),
        })
        .expect("record");
        let text = String::from_utf8(sink.into_inner()).expect("utf8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["seq"], 0);
        assert_eq!(lines[0]["ev"], "syscall");
        assert_eq!(lines[0]["name"], "read");
        assert_eq!(lines[0]["ret"], 2);
        assert_eq!(lines[0]["writes"][0]["data"], "ab01");
        assert!(lines[0].get("incomplete").is_none());
        assert_eq!(lines[1]["seq"], 1);
        assert_eq!(lines[1]["ev"], "thread_exited");
        assert_eq!(lines[1]["how"]["exited"], 0);
    }

    #[test]
    fn hex_encoding() {
        assert_eq!(to_hex(&[]), "");
        assert_eq!(to_hex(&[0, 15, 16, 255]), "000f10ff");
    }
}
