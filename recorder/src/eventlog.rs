//! The recorder's real output: [`EventlogSink`] maps the recorder's [`Event`]s onto
//! rrc-eventlog's records and appends them with [`rrc_eventlog::Writer`], one segment per
//! recording; [`check_log`] decodes a log and verifies it (`rrc-recorder verify`).
//!
//! # What maps to what
//!
//! Threads are logged with the ids the container sees (`NSpid`'s last field, from
//! [`Event::Attached`] and [`Event::ThreadCreated`]); a process's tgid is its main thread's id.
//! Intervals are the recorder's `gap_ns`: from the recorder resuming the thread after its
//! previous recorded syscall (or `rdtsc` trap) to this one.
//!
//! | recorder event | log record |
//! |---|---|
//! | [`Event::Attached`] (all of them come first) | the segment start's live threads (base 1, the sink's epoch and container id) |
//! | [`Event::Syscall`]: `clock_gettime` returning 0 with its 16-byte `timespec` | [`Time::ClockGettime`] |
//! | `gettimeofday(tv, NULL)` returning 0 | [`Time::Gettimeofday`] |
//! | `time` returning `>= 0` | [`Time::Time`] (the return value) |
//! | `clone` `clone3` `fork` `vfork` `execve` `execveat` `sched_yield` `rt_sigreturn` | `SyncOrder` (nr, ret; addr and op 0): its turn in the order, its result checked |
//! | `exit`, `exit_group` (recorded at entry, `ret` unknown) | `SyncOrder` with ret 0 |
//! | every other syscall, failed time reads included | `SyscallResult`: nr, the six arguments, ret, the writes in the recorder's order (a receive's data first, `ret` bytes, iovec by iovec) |
//! | [`Event::SyscallEntry`] (`futex`, `futex_waitv` at entry) | `SyncOrder`: nr, addr = first argument, op = the futex op (0 for `futex_waitv`), ret 0; the call's exit follows as a `SyscallResult` of the same thread (no writes), with interval 0 |
//! | [`Event::ThreadCreated`] kind thread | `ThreadCreate` (child's id, clone flags) by the creator |
//! | kind process or vfork | `ProcessFork` (child's pid, clone flags) by the creator |
//! | [`Event::Exec`] | `Exec` by the thread that called it (the path as the call named it; `/proc/PID/exe` if unreadable or empty); afterwards the process is its main thread |
//! | [`Event::ThreadExited`] | `ThreadExit` with a wait status: `code << 8`, the signal, or `SIGKILL` for a thread ended by another thread's exec |
//! | [`Event::Signal`] | `Signal` with the raw `siginfo_t`; delivered at the thread's latest syscall record if the thread is returning from that syscall (`orig_rax` is its number), else between syscalls |
//! | [`Event::Rdtsc`] | [`Time::Rdtsc`] / [`Time::Rdtscp`] |
//! | [`Event::VdsoPatched`] | nothing: the recorder's own action (replay patches its vDSO itself); counted |
//! | [`Event::Unrecordable`] | `Gap` (format version 2) with its kind, address and text; also logged as a warning and kept in [`SinkStats::unrecordable`] |
//! | an [`Event::Syscall`] the recorder could not read back whole ([`SyscallRecord::incomplete`]) | its record with the bytes it has, then a `Gap` of kind incomplete-capture naming it |
//!
//! A record made inside a syscall (a futex entry, a `ThreadCreate`/`ProcessFork`, an `Exec`)
//! carries the syscall's interval; the syscall's own record that follows gets 0 (no user code
//! ran in between). `ThreadExit` records get 0 (the recorder does not time a thread's end).
//!
//! # What the log cannot hold
//!
//! Whatever the recorder knows it did not record is in the log as a gap (format version 2):
//! syscalls through the i386/x32 ABIs, `io_uring` (its setup's own result is a
//! `SyscallResult`, nr 425), a vDSO entry or `rdtsc` trap that could not be set up, a result
//! not read back whole. Instruction sites that cannot be trapped (`cpuid`, `rdrand`, `rdseed`,
//! `rdpid`) are `Unrecordable` records, found by scanning the processes' code
//! ([`crate::scan`]). Left:
//!
//! * A record over the format's 16 MiB limit (a single read of more than that) is refused by
//!   the writer, which stops the recording (the tracees are killed: nothing runs unrecorded).
//!   The fix is for the recorder to clamp read lengths at the seccomp stop.
//! * `ThreadExit` intervals are 0, and a thread killed by a signal has no core-dump bit.
//! * An [`Event::Attached`] after the segment started (attaching to a second process after
//!   recording began) cannot be represented and is refused; the recorder does not do that.
//!
//! # Timing
//!
//! [`crate::event::Sink::record`] runs on the tracing thread, which runs with
//! `PR_TSC_SIGSEGV`: nothing here reads a clock, and neither does rrc-eventlog's writer (it only
//! encodes and calls `write_all`; its CRC-32C is table- or SSE4.2-based).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};

use rrc_eventlog::{
    received_streams, verify, Delivery, EventLogError, GapKind, MemWrite as LogWrite, Reader,
    Record, Report, SegmentStart, Streams, Thread, Time, Writer,
};

use crate::event::{CreateKind, Cut, Event, ExitKind, Sink, SyscallRecord, Tid};
use crate::syscalls::{self, Class};

const CLOCK_GETTIME: u64 = syscalls::nr::CLOCK_GETTIME as u64;
const GETTIMEOFDAY: u64 = syscalls::nr::GETTIMEOFDAY as u64;
const TIME: u64 = syscalls::nr::TIME as u64;
const FUTEX: u64 = 202;
const SCHED_YIELD: u64 = 24;
const RT_SIGRETURN: u64 = 15;

/// What an [`EventlogSink`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Event records appended.
    pub records: u64,
    /// vDSO patches seen (not logged: the recorder's own action).
    pub vdso_patches: u64,
    /// Syscall results the recorder could not read back completely (logged as they are).
    pub incomplete: u64,
    /// Events of threads the sink never saw attached or created (logged with host ids; the
    /// verifier then reports them).
    pub unknown_threads: u64,
    /// What the recorder reported as not recordable (not in the log: format v1 has no kind for
    /// it).
    pub unrecordable: Vec<String>,
    /// Ingress packets appended ([`EventlogSink::ingress`]).
    pub ingress: u64,
    /// Checkpoint cuts made ([`Sink::checkpoint`]).
    pub checkpoints: u64,
    /// Sites of instructions that cannot be trapped, found in the code and logged
    /// ([`EventlogSink::scan_findings`]).
    pub unrecordable_sites: u64,
}

#[derive(Debug)]
struct ThreadInfo {
    /// As the container sees it.
    id: Thread,
    /// Its process, host id.
    host_tgid: Tid,
    /// Its latest syscall record: the sequence number, and the syscall number if the record
    /// was that syscall's result.
    last_syscall: Option<(u64, Option<u64>)>,
    /// A record was made inside the syscall in progress: the syscall's own record gets interval
    /// 0.
    inside: bool,
}

impl ThreadInfo {
    fn new(id: Thread, host_tgid: Tid) -> ThreadInfo {
        ThreadInfo {
            id,
            host_tgid,
            last_syscall: None,
            inside: false,
        }
    }
}

enum Out<W: Write> {
    /// Before the first event other than [`Event::Attached`]: the output, and the threads
    /// announced so far (tgid, tid, ns tid).
    Waiting(W, Vec<(Tid, Tid, Option<i32>)>),
    /// The segment is open (or, after [`Sink::flush`], closed).
    Writing(Writer<W>),
    /// Opening the segment failed.
    Failed,
}

/// A [`Sink`] writing rrc-eventlog's format: one segment (base 1) of container `container_id`,
/// opened once every attached thread is announced, closed by [`Sink::flush`] (which the
/// recorder calls when the last tracee is gone). See the module documentation for the mapping.
pub struct EventlogSink<W: Write> {
    out: Out<W>,
    container_id: String,
    epoch: u64,
    threads: HashMap<Tid, ThreadInfo>,
    stats: SinkStats,
    /// A checkpoint is being taken: ingress packets wait (see [`Sink::checkpoint`]).
    ingress_held: bool,
}

impl<W: Write> fmt::Debug for EventlogSink<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventlogSink")
            .field("container_id", &self.container_id)
            .field("epoch", &self.epoch)
            .field("threads", &self.threads.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn log_err(e: EventLogError) -> io::Error {
    io::Error::other(e)
}

/// The id the container sees: `ns` if known, else the host id.
fn ns_id(ns: Option<i32>, host: Tid) -> u32 {
    ns.filter(|&i| i > 0).unwrap_or(host).max(0) as u32
}

impl<W: Write> EventlogSink<W> {
    /// A sink writing the log of container `container_id` (epoch 0) to `out` (wrap files in a
    /// `BufWriter`). Nothing is written before the first event.
    pub fn new(out: W, container_id: impl Into<String>) -> Self {
        EventlogSink {
            out: Out::Waiting(out, Vec::new()),
            container_id: container_id.into(),
            epoch: 0,
            threads: HashMap::new(),
            stats: SinkStats::default(),
            ingress_held: false,
        }
    }

    /// Sets the segment's epoch (before the first event).
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// What the sink did so far.
    pub fn stats(&self) -> &SinkStats {
        &self.stats
    }

    /// Bytes written to the output so far.
    pub fn bytes_written(&self) -> u64 {
        match &self.out {
            Out::Writing(w) => w.bytes_written(),
            _ => 0,
        }
    }

    /// Ends the segment (opening it first if nothing was recorded), flushes, and returns the
    /// output.
    pub fn finish(mut self) -> io::Result<W> {
        self.open()?;
        match self.out {
            Out::Writing(w) => w.finish().map_err(log_err),
            _ => Err(failed()),
        }
    }

    /// Appends a packet that entered the container's network namespace (logged before its
    /// kernel processes it). Returns false, appending nothing, while the segment is not open
    /// yet (the recorder is still attaching), or while a checkpoint is being taken (between
    /// [`Sink::checkpoint`] and [`Sink::checkpoint_done`]: a packet the kernel took then would
    /// be in the checkpoint's socket state and after its cut in the log): the caller keeps the
    /// packet, does not let the kernel have it, and tries again.
    pub fn ingress(&mut self, packet: &[u8]) -> io::Result<bool> {
        if self.ingress_held {
            return Ok(false);
        }
        let Out::Writing(w) = &mut self.out else {
            return match self.out {
                Out::Waiting(..) => Ok(false),
                _ => Err(failed()),
            };
        };
        let event = rrc_eventlog::Event::IngressPacket {
            bytes: packet.to_vec(),
        };
        w.append(Thread::NONE, 0, &event).map_err(log_err)?;
        self.stats.records += 1;
        self.stats.ingress += 1;
        Ok(true)
    }

    /// Appends what the code scanner ([`crate::scan`]) found in process `host_pid` (host id):
    /// an `Unrecordable` record per instruction site, a `Gap` for code it could not scan, as
    /// records of one of the process's threads. Returns false, appending nothing, while the
    /// segment is not open or no thread of the process is known (the caller offers them again).
    pub fn scan_findings(
        &mut self,
        host_pid: Tid,
        findings: &[crate::scan::Finding],
    ) -> io::Result<bool> {
        use crate::scan::Finding;
        if !matches!(self.out, Out::Writing(_)) {
            return match self.out {
                Out::Waiting(..) => Ok(false),
                _ => Err(failed()),
            };
        }
        let Some((&tid, info)) = self
            .threads
            .iter()
            .filter(|(_, t)| t.host_tgid == host_pid)
            .min_by_key(|(&t, _)| (t != host_pid, t))
        else {
            return Ok(false);
        };
        let thread = info.id;
        for f in findings {
            let ev = match f {
                Finding::Site { site, .. } => rrc_eventlog::Event::Unrecordable {
                    what: site.what,
                    ip: site.ip,
                },
                Finding::Gap { kind, ip, detail } => rrc_eventlog::Event::Gap {
                    what: *kind,
                    ip: *ip,
                    detail: detail.clone(),
                },
            };
            self.append(tid, thread, 0, &ev, None)?;
            self.stats.unrecordable_sites += u64::from(matches!(f, Finding::Site { .. }));
        }
        Ok(true)
    }

    /// Opens the segment with the threads announced so far, if not done yet.
    fn open(&mut self) -> io::Result<()> {
        if !matches!(self.out, Out::Waiting(..)) {
            return Ok(());
        }
        let Out::Waiting(out, attached) = std::mem::replace(&mut self.out, Out::Failed) else {
            return Ok(());
        };
        let leaders: HashMap<Tid, u32> = attached
            .iter()
            .filter(|(tgid, tid, _)| tgid == tid)
            .map(|&(tgid, tid, ns)| (tgid, ns_id(ns, tid)))
            .collect();
        let mut live = Vec::with_capacity(attached.len());
        for &(tgid, tid, ns) in &attached {
            let tgid_ns = leaders.get(&tgid).copied().unwrap_or(tgid.max(0) as u32);
            let id = Thread::new(tgid_ns, ns_id(ns, tid));
            self.threads.insert(tid, ThreadInfo::new(id, tgid));
            live.push(id);
        }
        let start = SegmentStart {
            base_seq: 1,
            epoch: self.epoch,
            container_id: self.container_id.clone(),
            live,
        };
        self.out = Out::Writing(Writer::new(out, start).map_err(log_err)?);
        Ok(())
    }

    fn thread_of(&mut self, tid: Tid) -> Thread {
        match self.threads.get(&tid) {
            Some(t) => t.id,
            None => {
                self.stats.unknown_threads += 1;
                log::warn!("event of thread {tid}, never attached nor created: logged as {tid}");
                let id = tid.max(0) as u32;
                Thread::new(id, id)
            }
        }
    }

    /// The interval of `tid`'s next record: `gap_ns`, or 0 inside a syscall already recorded.
    fn interval(&mut self, tid: Tid, gap_ns: u64) -> u64 {
        match self.threads.get_mut(&tid) {
            Some(t) if t.inside => {
                t.inside = false;
                0
            }
            _ => gap_ns,
        }
    }

    /// Appends, and notes a syscall record of `tid` (`nr` if it is a syscall's result).
    fn append(
        &mut self,
        tid: Tid,
        thread: Thread,
        interval_ns: u64,
        event: &rrc_eventlog::Event,
        nr: Option<u64>,
    ) -> io::Result<u64> {
        let Out::Writing(w) = &mut self.out else {
            return Err(failed());
        };
        let seq = w.append(thread, interval_ns, event).map_err(log_err)?;
        self.stats.records += 1;
        if event.is_syscall() {
            if let Some(t) = self.threads.get_mut(&tid) {
                t.last_syscall = Some((seq, nr));
            }
        }
        Ok(seq)
    }

    fn set_inside(&mut self, tid: Tid) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.inside = true;
        }
    }
}

fn failed() -> io::Error {
    io::Error::other("the event log could not be started; nothing more can be written")
}

/// The log event for a completed (or, for exit/exit_group, entered) syscall.
pub fn syscall_event(s: SyscallRecord) -> rrc_eventlog::Event {
    use rrc_eventlog::Event as E;
    let nr = s.nr;
    let Some(ret) = s.ret else {
        return E::SyncOrder {
            nr,
            addr: 0,
            op: 0,
            ret: 0,
        };
    };
    if let Some(t) = time_of(&s, ret) {
        return E::Time(t);
    }
    let class = syscalls::by_nr(nr).map(|c| c.class);
    if class == Some(Class::Lifecycle) || nr == SCHED_YIELD || nr == RT_SIGRETURN {
        return E::SyncOrder {
            nr,
            addr: 0,
            op: 0,
            ret,
        };
    }
    E::SyscallResult {
        nr,
        args: s.args.to_vec(),
        ret,
        writes: s
            .writes
            .into_iter()
            .map(|w| LogWrite {
                addr: w.addr,
                bytes: w.data,
            })
            .collect(),
    }
}

/// A successful clock read as a [`Time`] (failed or partly recorded ones stay syscall results).
fn time_of(s: &SyscallRecord, ret: i64) -> Option<Time> {
    if s.incomplete {
        return None;
    }
    let pair = |buf: u64| -> Option<(i64, i64)> {
        match s.writes.as_slice() {
            [w] if w.addr == buf && w.data.len() == 16 => {
                let a = i64::from_ne_bytes(w.data.get(..8)?.try_into().ok()?);
                let b = i64::from_ne_bytes(w.data.get(8..16)?.try_into().ok()?);
                Some((a, b))
            }
            _ => None,
        }
    };
    match s.nr {
        CLOCK_GETTIME if ret == 0 => {
            let (sec, nsec) = pair(s.args[1])?;
            Some(Time::ClockGettime {
                // The kernel takes the clock id from the register's low 32 bits.
                clock: s.args[0] as u32 as i32,
                sec,
                nsec,
            })
        }
        GETTIMEOFDAY if ret == 0 && s.args[1] == 0 => {
            let (sec, usec) = pair(s.args[0])?;
            Some(Time::Gettimeofday { sec, usec })
        }
        TIME if ret >= 0 => Some(Time::Time { sec: ret }),
        _ => None,
    }
}

fn wait_status(how: ExitKind) -> i32 {
    match how {
        ExitKind::Exited(code) => (code & 0xff) << 8,
        ExitKind::Killed(sig) => sig & 0x7f,
        // de_thread ends the other threads with SIGKILL.
        ExitKind::ReplacedByExec => libc::SIGKILL,
    }
}

impl<W: Write> Sink for EventlogSink<W> {
    fn record(&mut self, event: Event) -> io::Result<()> {
        use rrc_eventlog::Event as E;
        if let Event::Attached { tid, tgid, ns_tid } = event {
            return match &mut self.out {
                Out::Waiting(_, attached) => {
                    attached.push((tgid, tid, ns_tid));
                    Ok(())
                }
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "thread {tid} attached after the log's segment started: a segment's \
                         threads are fixed at its start"
                    ),
                )),
            };
        }
        self.open()?;
        match event {
            Event::Attached { .. } => Ok(()),
            Event::Syscall(s) => {
                let tid = s.tid;
                let nr = s.nr;
                let incomplete = s.incomplete;
                let thread = self.thread_of(tid);
                let interval = self.interval(tid, s.gap_ns);
                let ev = syscall_event(s);
                let seq = self.append(tid, thread, interval, &ev, Some(nr))?;
                if incomplete {
                    // Flagged right after it: replay must not trust this record's bytes.
                    self.stats.incomplete += 1;
                    let gap = E::Gap {
                        what: GapKind::IncompleteCapture,
                        ip: 0,
                        detail: format!(
                            "{} (record #{seq}): not every byte the call wrote could be read back",
                            syscalls::name_of(nr).unwrap_or("a syscall")
                        ),
                    };
                    self.append(tid, thread, 0, &gap, None)?;
                }
                Ok(())
            }
            Event::SyscallEntry {
                tid,
                nr,
                args,
                gap_ns,
            } => {
                let thread = self.thread_of(tid);
                let interval = self.interval(tid, gap_ns);
                let op = if nr == FUTEX { args[1] } else { 0 };
                let ev = E::SyncOrder {
                    nr,
                    addr: args[0],
                    op,
                    ret: 0,
                };
                self.append(tid, thread, interval, &ev, None)?;
                self.set_inside(tid);
                Ok(())
            }
            Event::ThreadCreated {
                parent,
                child,
                child_tgid,
                kind,
                ns_tid,
                flags,
                gap_ns,
            } => {
                let thread = self.thread_of(parent);
                let child_ns = ns_id(ns_tid, child);
                let (ev, id) = match kind {
                    CreateKind::Thread => (
                        E::ThreadCreate {
                            child_tid: child_ns,
                            flags,
                        },
                        Thread::new(thread.tgid, child_ns),
                    ),
                    CreateKind::Process | CreateKind::Vfork => (
                        E::ProcessFork {
                            child_pid: child_ns,
                            flags,
                        },
                        Thread::main(child_ns),
                    ),
                };
                let interval = self.interval(parent, gap_ns);
                self.append(parent, thread, interval, &ev, None)?;
                self.set_inside(parent);
                self.threads.insert(child, ThreadInfo::new(id, child_tgid));
                Ok(())
            }
            Event::Exec {
                tid,
                former_tid,
                exe,
                path,
                gap_ns,
            } => {
                let thread = self.thread_of(former_tid);
                // An exec that names no path (`execveat` of a descriptor) logs the program.
                let path = path
                    .filter(|p| !p.is_empty())
                    .or_else(|| exe.map(String::into_bytes))
                    .unwrap_or_default();
                let interval = self.interval(former_tid, gap_ns);
                let seq = self.append(former_tid, thread, interval, &E::Exec { path }, None)?;
                // The process is now one thread, its main thread, under the leader's id.
                let host_tgid = self.threads.get(&former_tid).map_or(tid, |t| t.host_tgid);
                self.threads
                    .retain(|&t, info| info.host_tgid != host_tgid && t != former_tid);
                let mut info = ThreadInfo::new(Thread::main(thread.tgid), tid);
                info.last_syscall = Some((seq, None));
                info.inside = true;
                self.threads.insert(tid, info);
                Ok(())
            }
            Event::VdsoPatched { .. } => {
                self.stats.vdso_patches += 1;
                Ok(())
            }
            Event::Signal {
                tid,
                signo,
                syscall,
                siginfo,
                gap_ns,
                ..
            } => {
                let thread = self.thread_of(tid);
                let last = self.threads.get(&tid).and_then(|t| t.last_syscall);
                let delivered_at = match (syscall, last) {
                    (Some(nr), Some((seq, Some(last_nr)))) if nr == last_nr => {
                        Delivery::Syscall { seq }
                    }
                    _ => Delivery::BetweenSyscalls,
                };
                let ev = E::Signal {
                    signo: signo.max(0) as u32,
                    delivered_at,
                    siginfo,
                };
                self.append(tid, thread, gap_ns, &ev, None)?;
                Ok(())
            }
            Event::Rdtsc {
                tid,
                value,
                aux,
                gap_ns,
                ..
            } => {
                let thread = self.thread_of(tid);
                let t = match aux {
                    Some(aux) => Time::Rdtscp { tsc: value, aux },
                    None => Time::Rdtsc { tsc: value },
                };
                let interval = self.interval(tid, gap_ns);
                self.append(tid, thread, interval, &E::Time(t), None)?;
                Ok(())
            }
            Event::ThreadExited { tid, how } => {
                let thread = self.thread_of(tid);
                let ev = E::ThreadExit {
                    status: wait_status(how),
                };
                self.append(tid, thread, 0, &ev, None)?;
                self.threads.remove(&tid);
                Ok(())
            }
            Event::Unrecordable {
                tid,
                kind,
                ip,
                what,
            } => {
                log::warn!("thread {tid}: not recordable ({}): {what}", kind.name());
                self.stats
                    .unrecordable
                    .push(format!("thread {tid}: {what}"));
                let thread = self.thread_of(tid);
                let ev = E::Gap {
                    what: kind,
                    ip,
                    detail: what,
                };
                self.append(tid, thread, 0, &ev, None)?;
                Ok(())
            }
        }
    }

    /// Opens the segment now: every attached thread is announced.
    fn attached(&mut self) -> io::Result<()> {
        self.open()
    }

    /// Ends the segment and opens the next one, for `epoch`, with the threads alive now; holds
    /// ingress packets until [`Sink::checkpoint_done`].
    fn checkpoint(&mut self, epoch: u64) -> io::Result<Cut> {
        self.open()?;
        let mut live: Vec<Thread> = self.threads.values().map(|t| t.id).collect();
        live.sort_unstable_by_key(|t| (t.tgid, t.tid));
        let Out::Writing(w) = &mut self.out else {
            return Err(failed());
        };
        if w.is_open() {
            w.end_segment().map_err(log_err)?;
        }
        let offset = w.bytes_written();
        w.start_segment(epoch, live).map_err(log_err)?;
        self.epoch = epoch;
        self.ingress_held = true;
        self.stats.checkpoints += 1;
        Ok(Cut {
            seq: w.next_seq(),
            offset,
        })
    }

    fn checkpoint_done(&mut self) -> io::Result<()> {
        self.ingress_held = false;
        Ok(())
    }

    /// Ends the segment (the recording is over) and flushes the output.
    fn flush(&mut self) -> io::Result<()> {
        self.open()?;
        let Out::Writing(w) = &mut self.out else {
            return Err(failed());
        };
        if w.is_open() {
            w.end_segment().map_err(log_err)?;
        }
        w.get_mut().flush()
    }
}

/// What [`check_log`] found.
#[derive(Debug)]
pub struct LogCheck {
    /// Bytes in the input.
    pub bytes: usize,
    /// The records decoded (all of them, or those before [`LogCheck::error`]).
    pub records: Vec<Record>,
    /// Why decoding stopped early (truncated or corrupt input), with the byte offset.
    pub error: Option<EventLogError>,
    /// The verifier's report on the records decoded.
    pub report: Report,
    /// The byte streams the application received, rebuilt from the records decoded.
    pub streams: Streams,
}

impl LogCheck {
    /// Whether the whole input decoded and verified cleanly.
    pub fn is_ok(&self) -> bool {
        self.error.is_none() && self.report.is_ok() && self.streams.problems.is_empty()
    }

    /// Every problem found, one line each (empty when [`LogCheck::is_ok`]).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.error {
            out.push(format!(
                "{e} ({} records before it decoded and verified)",
                self.records.len()
            ));
        }
        out.extend(self.report.violations.iter().map(|v| v.to_string()));
        if self.report.omitted > 0 {
            out.push(format!("... and {} more violations", self.report.omitted));
        }
        out.extend(self.streams.problems.iter().map(|v| format!("stream: {v}")));
        out
    }
}

impl fmt::Display for LogCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        writeln!(
            f,
            "{} bytes, {} records: {} events in {} segment(s), {} threads",
            self.bytes, r.records, r.events, r.segments, r.threads
        )?;
        let kinds: Vec<String> = r.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        writeln!(f, "events by kind: {}", kinds.join(", "))?;
        for s in &self.streams.streams {
            let origin = match s.accepted_at {
                Some(seq) => format!("accepted at #{seq}"),
                None => "open before the log".to_string(),
            };
            writeln!(
                f,
                "received: process {} fd {} ({origin}): {} bytes in {} reads{}",
                s.tgid,
                s.fd,
                s.data.len(),
                s.reads,
                if s.eof { ", then end of stream" } else { "" }
            )?;
        }
        if self.is_ok() {
            write!(f, "consistent: no gap, order and attribution checked")
        } else {
            write!(f, "NOT consistent: {} problem(s)", self.problems().len())
        }
    }
}

/// One line describing `record` (`rrc-recorder verify --records`): sequence number, thread,
/// interval, kind and fields, byte strings as their length and first bytes in hex.
pub fn describe(record: &Record) -> String {
    use rrc_eventlog::Event as E;
    fn bytes(b: &[u8]) -> String {
        let head = crate::event::to_hex(&b[..b.len().min(16)]);
        let more = if b.len() > 16 { "..." } else { "" };
        format!("{} bytes {head}{more}", b.len())
    }
    fn name(nr: u64) -> String {
        syscalls::name_of(nr).map_or_else(|| format!("syscall {nr}"), str::to_string)
    }
    let e = match record {
        Record::SegmentStart(s) => {
            let live: Vec<String> = s.live.iter().map(Thread::to_string).collect();
            return format!(
                "segment start: base #{}, epoch {}, container {:?}, live [{}]",
                s.base_seq,
                s.epoch,
                s.container_id,
                live.join(" ")
            );
        }
        Record::SegmentEnd(end) => return format!("segment end: next #{}", end.next_seq),
        Record::Event(e) => e,
    };
    let what = match &e.event {
        E::SyscallResult {
            nr,
            args,
            ret,
            writes,
        } => {
            let args: Vec<String> = args.iter().map(|a| format!("{a:#x}")).collect();
            let w: Vec<String> = writes
                .iter()
                .map(|w| format!("{:#x}: {}", w.addr, bytes(&w.bytes)))
                .collect();
            format!(
                "{}({}) = {ret} [{}]",
                name(*nr),
                args.join(", "),
                w.join("; ")
            )
        }
        E::SyncOrder { nr, addr, op, ret } => {
            format!("{} addr {addr:#x} op {op} = {ret}", name(*nr))
        }
        E::Time(t) => format!("{t:?}"),
        E::ThreadCreate { child_tid, flags } => format!("child {child_tid}, flags {flags:#x}"),
        E::ProcessFork { child_pid, flags } => format!("child {child_pid}, flags {flags:#x}"),
        E::Exec { path } => String::from_utf8_lossy(path).into_owned(),
        E::ThreadExit { status } => format!("status {status:#x}"),
        E::Signal {
            signo,
            delivered_at,
            siginfo,
        } => format!("{signo} {delivered_at:?}, siginfo {}", bytes(siginfo)),
        E::IngressPacket { bytes: b } => bytes(b),
        E::Unrecordable { what, ip } => format!("{what:?} at {ip:#x}"),
        E::Gap { what, ip, detail } => format!("{} at {ip:#x}: {detail}", what.name()),
    };
    format!(
        "#{} {} +{}ns {}: {what}",
        e.seq,
        e.thread,
        e.interval_ns,
        e.event.kind_name()
    )
}

/// Decodes a finished log (a file's bytes) and verifies it: structure, checksums and sequence
/// numbers (the reader), the container-wide order ([`rrc_eventlog::verify()`]), and the streams
/// the application received ([`rrc_eventlog::received_streams`]). A truncated or corrupt input
/// is verified up to the damage and reported in [`LogCheck::error`].
pub fn check_log(bytes: &[u8]) -> LogCheck {
    let mut reader = Reader::new(bytes);
    let mut records = Vec::new();
    let error = loop {
        match reader.next() {
            Ok(Some(r)) => records.push(r),
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    let report = verify(&records);
    let streams = received_streams(&records);
    LogCheck {
        bytes: bytes.len(),
        records,
        error,
        report,
        streams,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::MemWrite;

    fn sys(tid: Tid, nr: u64, args: [u64; 6], ret: Option<i64>, writes: Vec<MemWrite>) -> Event {
        Event::Syscall(SyscallRecord {
            tid,
            nr,
            args,
            ret,
            gap_ns: 50,
            writes,
            incomplete: false,
        })
    }

    /// A sink for container "c" that has recorded the attach of process `pid`.
    fn attached(pid: Tid) -> EventlogSink<Vec<u8>> {
        let mut sink = EventlogSink::new(Vec::new(), "c");
        sink.record(Event::Attached {
            tid: pid,
            tgid: pid,
            ns_tid: None,
        })
        .expect("attach");
        sink
    }

    fn events(log: &[u8]) -> Vec<rrc_eventlog::EventRecord> {
        let check = check_log(log);
        assert!(check.is_ok(), "{:?}\n{check}", check.problems());
        check
            .records
            .iter()
            .filter_map(|r| r.as_event().cloned())
            .collect()
    }

    /// A scripted stream through the sink: ids translated, kinds mapped, intervals and
    /// delivery points as documented, and the result verifies cleanly.
    #[test]
    fn maps_a_scripted_recording() {
        let mut sink = EventlogSink::new(Vec::new(), "c1");
        let ts: Vec<u8> = 5i64
            .to_ne_bytes()
            .into_iter()
            .chain(7i64.to_ne_bytes())
            .collect();
        let script = vec![
            // Host 1000 is the container's 1, host 1001 its 2.
            Event::Attached {
                tid: 1001,
                tgid: 1000,
                ns_tid: Some(2),
            },
            Event::Attached {
                tid: 1000,
                tgid: 1000,
                ns_tid: Some(1),
            },
            Event::VdsoPatched {
                tgid: 1000,
                base: 0x7000,
                symbols: Vec::new(),
            },
            sys(
                1000,
                CLOCK_GETTIME,
                [1, 0x10, 0, 0, 0, 0],
                Some(0),
                vec![MemWrite {
                    addr: 0x10,
                    data: ts.clone(),
                }],
            ),
            // A failed clock read stays a syscall result.
            sys(
                1000,
                CLOCK_GETTIME,
                [1, 0, 0, 0, 0, 0],
                Some(-14),
                Vec::new(),
            ),
            sys(1001, TIME, [0; 6], Some(1_700_000_000), Vec::new()),
            Event::SyscallEntry {
                tid: 1001,
                nr: FUTEX,
                args: [0x99, 1, 1, 0, 0, 0],
                gap_ns: 30,
            },
            sys(1001, FUTEX, [0x99, 1, 1, 0, 0, 0], Some(0), Vec::new()),
            Event::Signal {
                tid: 1001,
                signo: 10,
                code: 0,
                errno: 0,
                ip: 0,
                syscall: Some(FUTEX),
                siginfo: vec![10, 0, 0, 0],
                gap_ns: 3,
            },
            Event::Signal {
                tid: 1000,
                signo: 14,
                code: 0,
                errno: 0,
                ip: 0,
                syscall: None,
                siginfo: vec![14],
                gap_ns: 4,
            },
            Event::ThreadCreated {
                parent: 1001,
                child: 1002,
                child_tgid: 1000,
                kind: CreateKind::Thread,
                ns_tid: Some(3),
                flags: 0x3d0f00,
                gap_ns: 20,
            },
            sys(1001, 56, [0x3d0f00, 0, 0, 0, 0, 0], Some(3), Vec::new()),
            Event::ThreadCreated {
                parent: 1002,
                child: 2000,
                child_tgid: 2000,
                kind: CreateKind::Process,
                ns_tid: Some(9),
                flags: 17,
                gap_ns: 20,
            },
            Event::Rdtsc {
                tid: 2000,
                ip: 0,
                value: 77,
                aux: Some(1),
                gap_ns: 8,
            },
            Event::Unrecordable {
                tid: 2000,
                kind: GapKind::Other,
                ip: 0x1234,
                what: "something".into(),
            },
            sys(2000, 231, [3, 0, 0, 0, 0, 0], None, Vec::new()),
            Event::ThreadExited {
                tid: 2000,
                how: ExitKind::Exited(3),
            },
            // Thread 2 execs: 3 ends first, then the process is its main thread again.
            Event::ThreadExited {
                tid: 1002,
                how: ExitKind::ReplacedByExec,
            },
            Event::Exec {
                tid: 1000,
                former_tid: 1001,
                exe: Some("/bin/x".into()),
                path: Some(b"x".to_vec()),
                gap_ns: 11,
            },
            sys(1000, 59, [0; 6], Some(0), Vec::new()),
            Event::ThreadExited {
                tid: 1000,
                how: ExitKind::Killed(9),
            },
        ];
        for e in script {
            sink.record(e).expect("record");
        }
        sink.flush().expect("flush");
        assert_eq!(sink.stats().vdso_patches, 1);
        assert_eq!(sink.stats().unrecordable.len(), 1);
        assert_eq!(sink.stats().unknown_threads, 0);
        let log = sink.finish().expect("finish");
        let check = check_log(&log);
        match &check.records[0] {
            Record::SegmentStart(s) => {
                assert_eq!(s.container_id, "c1");
                assert_eq!(s.base_seq, 1);
                assert_eq!(s.live, vec![Thread::new(1, 2), Thread::main(1)]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(check.records.last(), Some(Record::SegmentEnd(_))));
        let ev = events(&log);
        use rrc_eventlog::Event as E;
        let got: Vec<(u64, Thread, u64, E)> = ev
            .into_iter()
            .map(|e| (e.seq, e.thread, e.interval_ns, e.event))
            .collect();
        let t1 = Thread::main(1);
        let t2 = Thread::new(1, 2);
        let t3 = Thread::new(1, 3);
        let p9 = Thread::main(9);
        let want = vec![
            (
                1,
                t1,
                50,
                E::Time(Time::ClockGettime {
                    clock: 1,
                    sec: 5,
                    nsec: 7,
                }),
            ),
            (
                2,
                t1,
                50,
                E::SyscallResult {
                    nr: CLOCK_GETTIME,
                    args: vec![1, 0, 0, 0, 0, 0],
                    ret: -14,
                    writes: Vec::new(),
                },
            ),
            (3, t2, 50, E::Time(Time::Time { sec: 1_700_000_000 })),
            (
                4,
                t2,
                30,
                E::SyncOrder {
                    nr: FUTEX,
                    addr: 0x99,
                    op: 1,
                    ret: 0,
                },
            ),
            (
                5,
                t2,
                0,
                E::SyscallResult {
                    nr: FUTEX,
                    args: vec![0x99, 1, 1, 0, 0, 0],
                    ret: 0,
                    writes: Vec::new(),
                },
            ),
            (
                6,
                t2,
                3,
                E::Signal {
                    signo: 10,
                    delivered_at: Delivery::Syscall { seq: 5 },
                    siginfo: vec![10, 0, 0, 0],
                },
            ),
            (
                7,
                t1,
                4,
                E::Signal {
                    signo: 14,
                    delivered_at: Delivery::BetweenSyscalls,
                    siginfo: vec![14],
                },
            ),
            (
                8,
                t2,
                20,
                E::ThreadCreate {
                    child_tid: 3,
                    flags: 0x3d0f00,
                },
            ),
            (
                9,
                t2,
                0,
                E::SyncOrder {
                    nr: 56,
                    addr: 0,
                    op: 0,
                    ret: 3,
                },
            ),
            (
                10,
                t3,
                20,
                E::ProcessFork {
                    child_pid: 9,
                    flags: 17,
                },
            ),
            (11, p9, 8, E::Time(Time::Rdtscp { tsc: 77, aux: 1 })),
            (
                12,
                p9,
                0,
                E::Gap {
                    what: GapKind::Other,
                    ip: 0x1234,
                    detail: "something".into(),
                },
            ),
            (
                13,
                p9,
                50,
                E::SyncOrder {
                    nr: 231,
                    addr: 0,
                    op: 0,
                    ret: 0,
                },
            ),
            (14, p9, 0, E::ThreadExit { status: 3 << 8 }),
            (15, t3, 0, E::ThreadExit { status: 9 }),
            (
                16,
                t2,
                11,
                E::Exec {
                    path: b"x".to_vec(),
                },
            ),
            (
                17,
                t1,
                0,
                E::SyncOrder {
                    nr: 59,
                    addr: 0,
                    op: 0,
                    ret: 0,
                },
            ),
            (18, t1, 0, E::ThreadExit { status: 9 }),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn a_receive_keeps_its_data_first_and_the_streams_rebuild() {
        let mut sink = attached(5);
        // accept4 → fd 4; recvmsg of 5 bytes over two iovecs, then name and header.
        sink.record(sys(
            5,
            288,
            [3, 0x10, 0x20, 0, 0, 0],
            Some(4),
            vec![
                MemWrite {
                    addr: 0x10,
                    data: vec![2; 16],
                },
                MemWrite {
                    addr: 0x20,
                    data: 16u32.to_ne_bytes().to_vec(),
                },
            ],
        ))
        .expect("accept");
        sink.record(sys(
            5,
            47,
            [4, 0x50, 0, 0, 0, 0],
            Some(5),
            vec![
                MemWrite {
                    addr: 0x100,
                    data: b"ab".to_vec(),
                },
                MemWrite {
                    addr: 0x200,
                    data: b"cde".to_vec(),
                },
                MemWrite {
                    addr: 0x50,
                    data: vec![0; 56],
                },
            ],
        ))
        .expect("recvmsg");
        let log = sink.finish().expect("finish");
        let check = check_log(&log);
        assert!(check.is_ok(), "{:?}", check.problems());
        let streams: Vec<_> = check.streams.accepted().collect();
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].data, b"abcde");
        assert_eq!((streams[0].tgid, streams[0].fd), (5, 4));
        let summary = check.to_string();
        assert!(summary.contains("process 5 fd 4 (accepted at #1): 5 bytes in 1 reads"));
        assert_eq!(
            describe(&check.records[2]),
            "#2 5/5 +50ns syscall-result: recvmsg(0x4, 0x50, 0x0, 0x0, 0x0, 0x0) = 5 \
             [0x100: 2 bytes 6162; 0x200: 3 bytes 636465; 0x50: 56 bytes \
             00000000000000000000000000000000...]"
        );
    }

    #[test]
    fn an_empty_recording_is_a_valid_log_and_late_attach_is_refused() {
        let sink = EventlogSink::new(Vec::new(), "c");
        let log = sink.finish().expect("finish");
        let check = check_log(&log);
        assert!(check.is_ok());
        assert_eq!(check.report.segments, 1);

        let mut sink = attached(5);
        sink.record(sys(5, 24, [0; 6], Some(0), Vec::new()))
            .expect("yield");
        let err = sink
            .record(Event::Attached {
                tid: 6,
                tgid: 6,
                ns_tid: None,
            })
            .expect_err("late attach");
        assert!(err.to_string().contains("attached after"), "{err}");
    }

    #[test]
    fn damaged_logs_are_reported_with_their_offset() {
        let mut sink = attached(5);
        for _ in 0..3 {
            sink.record(sys(5, 24, [0; 6], Some(0), Vec::new()))
                .expect("yield");
        }
        let log = sink.finish().expect("finish");
        assert!(check_log(&log).is_ok());
        let cut = check_log(&log[..log.len() - 3]);
        assert!(!cut.is_ok());
        assert!(matches!(cut.error, Some(EventLogError::Truncated { .. })));
        assert_eq!(cut.records.len(), 4, "start and three events intact");
        assert!(
            cut.problems()[0].contains("truncated"),
            "{:?}",
            cut.problems()
        );
        let mut bad = log.clone();
        let at = bad.len() - 12;
        bad[at] ^= 0x40;
        let corrupt = check_log(&bad);
        assert!(matches!(corrupt.error, Some(EventLogError::Corrupt { .. })));
        assert!(corrupt.problems()[0].contains("checksum mismatch at byte"));
    }
}
