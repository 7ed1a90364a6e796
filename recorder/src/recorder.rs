//! The recorder's state machine: attach, follow every thread, record at every stop.
//!
//! One thread runs it (ptrace ties tracees to the tracing thread). It waits for any tracee's
//! stop with `waitpid(-1, __WALL | __WNOTHREAD)` and handles it:
//!
//! * **seccomp stop** (`PTRACE_EVENT_SECCOMP`, a syscall the filter traces): read the syscall
//!   with `PTRACE_GET_SYSCALL_INFO`, snapshot what the exit will need (value-result lengths),
//!   resume with `PTRACE_SYSCALL` so the syscall runs and stops again at its exit;
//! * **syscall-exit stop**: read the return value, read back every byte the syscall wrote
//!   ([`crate::capture`]), emit [`Event::Syscall`], resume with `PTRACE_CONT` (no stop until the
//!   next traced syscall);
//! * **clone/fork/vfork event**: emit [`Event::ThreadCreated`] for the child, which the kernel
//!   has attached already (`PTRACE_O_TRACECLONE|FORK|VFORK`). The child's first stop may be
//!   reported before its creator's event: it is then held, not resumed, until the event has been
//!   emitted, so no event of a thread ever precedes its creation in the log;
//! * **exec event**: emit [`Event::Exec`], forget the threads exec killed, patch the new image's
//!   vDSO ([`crate::vdso`]) and inject `prctl(PR_SET_TSC, PR_TSC_SIGSEGV)` at the execve's exit;
//! * **signal-delivery stop**: a SIGSEGV from `rdtsc`/`rdtscp` is emulated and recorded as
//!   [`Event::Rdtsc`]; any other signal is recorded as [`Event::Signal`] and delivered;
//! * **group-stop**: `PTRACE_LISTEN` (job control keeps working);
//! * **exit**: [`Event::ThreadExited`].
//!
//! Attaching to an existing process seizes every thread (rescanning `/proc/PID/task` until no
//! new one appears), interrupts each, and waits until all have stopped (the *attach barrier*)
//! before patching the vDSO, so that no thread runs while its code changes. A process found in
//! job-control stop (the `--exec` launcher's child, stopped in SIGSTOP) is then sent SIGCONT.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use crate::bpf::{AUDIT_ARCH_X86_64, X32_SYSCALL_BIT};
use crate::capture::{self, EntrySnapshot, MemRead};
use crate::control::{Command, Control, Reply};
use crate::event::{CreateKind, Event, ExitKind, MemWrite, Sink, SyscallRecord, Tid};
use crate::ptrace::{self, is_gone, read_tsc_raw, Regs, Resume, Stop, Tracer};
use crate::scan::ProcessList;
use crate::syscalls::{self, Class};
use crate::vdso;
use rrc_eventlog::GapKind;

/// Errors that end a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A ptrace or wait operation failed other than by the tracee vanishing.
    #[error("{what} (thread {tid}): {err}")]
    Trace {
        /// The operation.
        what: &'static str,
        /// The thread.
        tid: Tid,
        /// Why.
        err: io::Error,
    },
    /// Could not attach to the process at all.
    #[error("attaching to {pid}: {err}")]
    Attach {
        /// The process.
        pid: Tid,
        /// Why.
        err: io::Error,
    },
    /// The sink refused an event.
    #[error("writing an event: {0}")]
    Sink(io::Error),
}

/// Recording options.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Patch the vDSO time entry points at attach and at every exec (default on).
    pub patch_vdso: bool,
    /// Inject `PR_SET_TSC(PR_TSC_SIGSEGV)` at every exec and emulate `rdtsc`/`rdtscp`
    /// (default on; needs `patch_vdso`, whose stub provides the `syscall` instruction).
    ///
    /// The tracing thread then runs with `PR_TSC_SIGSEGV` itself while in [`Recorder::run`]
    /// (see there): code running on it, [`Sink::record`] included, must not read the clock
    /// through the vDSO (`Instant::now`, `SystemTime::now`): that executes `rdtsc` and kills
    /// the recorder with SIGSEGV. Use [`now_ns`], or hand the work to another thread (the
    /// flag is per thread).
    pub trap_rdtsc: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            patch_vdso: true,
            trap_rdtsc: true,
        }
    }
}

/// What a finished recording reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// How the first attached process's main thread ended.
    pub root_exit: Option<ExitKind>,
    /// Events emitted.
    pub events: u64,
    /// Syscalls recorded.
    pub syscalls: u64,
    /// Stops handled.
    pub stops: u64,
}

#[derive(Debug)]
struct Pending {
    nr: u64,
    args: [u64; 6],
    entry: EntrySnapshot,
    gap_ns: u64,
}

#[derive(Debug)]
enum InjectPhase {
    /// Waiting for the injected syscall's entry stop.
    Entry,
    /// Waiting for its exit stop.
    Exit,
}

#[derive(Debug)]
enum State {
    /// Seized, first stop not seen yet.
    Attaching,
    /// Running (or stopped at a stop being handled); resumed with PTRACE_CONT.
    Running,
    /// In a traced syscall; resumed with PTRACE_SYSCALL to see its exit.
    InSyscall(Pending),
    /// Running a syscall the recorder injected; `saved` are the registers to restore after.
    Injecting {
        saved: Box<Regs>,
        phase: InjectPhase,
        nr: u64,
    },
}

#[derive(Debug)]
struct Thread {
    tgid: Tid,
    state: State,
    /// When the recorder last resumed it after a recorded syscall (or created/attached it).
    last: u64,
    /// Inject PR_SET_TSC at the exit of the exec in progress.
    inject_tsc_at_exit: bool,
    /// Its id in its own pid namespace, read when it was seized (attached threads only).
    ns_tid: Option<i32>,
    /// Kept in a group-stop (job control, `PTRACE_LISTEN`) since its last stop.
    job_stopped: bool,
}

impl Thread {
    fn new(tgid: Tid, state: State, ns_tid: Option<i32>) -> Thread {
        Thread {
            tgid,
            state,
            last: now_ns(),
            inject_tsc_at_exit: false,
            ns_tid,
            job_stopped: false,
        }
    }
}

/// How long every thread has to reach its park stop before a checkpoint is given up.
pub const PARK_TIMEOUT_NS: u64 = 2_000_000_000;

/// A park in progress (see [`Recorder`], "Parking for a checkpoint").
#[derive(Debug)]
struct Park {
    epoch: u64,
    /// `now_ns` after which the park is given up.
    deadline: u64,
    /// The threads stopped so far, and whether each is in a group-stop.
    parked: HashMap<Tid, bool>,
}

/// The recorder. `T` does the tracing (the real [`ptrace::Ptrace`] or a test double), `S`
/// receives the events.
pub struct Recorder<T: Tracer, S: Sink> {
    tracer: T,
    sink: S,
    opts: Options,
    threads: HashMap<Tid, Thread>,
    /// First stops of threads whose creation has not been reported yet.
    held: HashMap<Tid, i32>,
    /// Exits of threads whose creation has not been reported yet.
    early_exits: HashMap<Tid, ExitKind>,
    /// Threads still to report their first stop after attach.
    attaching: usize,
    /// First stops collected during the attach barrier.
    deferred: Vec<(Tid, i32)>,
    /// Threads that ended during the attach barrier: (tgid, tid, ns_tid, how), announced and
    /// ended right after the others are announced.
    attach_exits: Vec<(Tid, Tid, Option<i32>, ExitKind)>,
    /// Processes that were in job-control stop when attached (sent SIGCONT after the barrier).
    resume_after_attach: Vec<Tid>,
    /// Attached processes whose vDSO is still to be patched at the barrier.
    to_patch: Vec<Tid>,
    /// Per process: the address of a `syscall` instruction the recorder can inject through.
    syscall_insn: HashMap<Tid, u64>,
    root: Option<Tid>,
    summary: Summary,
    /// Commands from the shim (checkpoints), if any.
    control: Option<Arc<Control>>,
    /// A park in progress.
    park: Option<Park>,
    /// Parked and detached for a checkpoint: nothing is traced until `resume`.
    detached: bool,
    /// A park asked for during the attach barrier: started once it is passed.
    park_after_attach: Option<u64>,
    /// The processes, for the code scanner ([`crate::scan`]).
    processes: Option<Arc<ProcessList>>,
}

impl<T: Tracer, S: Sink> std::fmt::Debug for Recorder<T, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("threads", &self.threads.len())
            .field("summary", &self.summary)
            .finish_non_exhaustive()
    }
}

const SI_KERNEL: i32 = 0x80;
const PR_SET_TSC: u64 = 26;
const PR_TSC_SIGSEGV: u64 = 2;

/// The outcome of ptrace operation `what` on `tid`: `None` when the thread has vanished
/// meanwhile (killed, e.g. by another thread's `exit_group`: its exit report follows).
fn alive<V>(res: io::Result<V>, what: &'static str, tid: Tid) -> Result<Option<V>, RecordError> {
    ptrace::unless_gone(res).map_err(|err| RecordError::Trace { what, tid, err })
}

struct Mem<'a, T: Tracer> {
    tracer: &'a mut T,
    tid: Tid,
}

impl<T: Tracer> MemRead for Mem<'_, T> {
    fn read(&mut self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        self.tracer.read_mem(self.tid, addr, len)
    }
}

impl<T: Tracer, S: Sink> Recorder<T, S> {
    /// A recorder with no tracee yet.
    pub fn new(tracer: T, sink: S, opts: Options) -> Self {
        Recorder {
            tracer,
            sink,
            opts,
            threads: HashMap::new(),
            held: HashMap::new(),
            early_exits: HashMap::new(),
            attaching: 0,
            deferred: Vec::new(),
            attach_exits: Vec::new(),
            resume_after_attach: Vec::new(),
            to_patch: Vec::new(),
            syscall_insn: HashMap::new(),
            root: None,
            summary: Summary::default(),
            control: None,
            park: None,
            detached: false,
            park_after_attach: None,
            processes: None,
        }
    }

    /// Keeps `list` up to date with the traced processes (attach, fork, exec, exit), for the
    /// code scanner ([`crate::scan::spawn_scanner`]).
    pub fn with_process_list(mut self, list: Arc<ProcessList>) -> Self {
        self.processes = Some(list);
        self
    }

    fn process_added(&self, tgid: Tid) {
        if let Some(l) = &self.processes {
            l.add(tgid);
        }
    }

    /// Takes commands from `control` while recording (checkpoints: see the module docs).
    pub fn with_control(mut self, control: Arc<Control>) -> Self {
        self.control = Some(control);
        self
    }

    /// The sink back (after [`Recorder::run`]).
    pub fn into_sink(self) -> S {
        self.sink
    }

    /// The sink.
    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Seizes every thread of process `pid`. The process may be running, blocked, or stopped
    /// in SIGSTOP (it is then continued once every thread is attached). Call [`Recorder::run`]
    /// next, on the same thread.
    pub fn attach(&mut self, pid: Tid) -> Result<(), RecordError> {
        let status = self
            .tracer
            .status(pid)
            .map_err(|err| RecordError::Attach { pid, err })?;
        let mut seized: Vec<Tid> = Vec::new();
        loop {
            let tids = self
                .tracer
                .task_ids(pid)
                .map_err(|err| RecordError::Attach { pid, err })?;
            let new: Vec<Tid> = tids.into_iter().filter(|t| !seized.contains(t)).collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                seized.push(tid);
                match self.tracer.seize(tid, ptrace::OPTIONS) {
                    Ok(()) => {}
                    Err(e) if is_gone(&e) && tid != pid => continue,
                    // A thread created meanwhile by a seized thread is auto-attached already.
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) && tid != pid => continue,
                    Err(err) => return Err(RecordError::Attach { pid, err }),
                }
                let ns_tid = self.tracer.status(tid).ok().and_then(|s| s.ns_tid);
                self.threads
                    .insert(tid, Thread::new(pid, State::Attaching, ns_tid));
                self.attaching += 1;
            }
        }
        for &tid in &seized {
            alive(self.tracer.interrupt(tid), "PTRACE_INTERRUPT", tid)?;
        }
        if status.stopped {
            self.resume_after_attach.push(pid);
        }
        if self.opts.patch_vdso {
            self.to_patch.push(pid);
        }
        self.root.get_or_insert(pid);
        tracing::debug!(pid, threads = seized.len(), "seized");
        Ok(())
    }

    /// Runs until no tracee is left. Returns how the root process ended and counters.
    ///
    /// With [`Options::trap_rdtsc`], the calling thread runs with `PR_TSC_SIGSEGV` too while it
    /// records: the kernel rewrites CR4 at every context switch between a task that may read
    /// the TSC and one that may not, and in this platform's VMs that costs about 4 µs per
    /// switch, four switches per recorded syscall. (The recorder reads its clock with the
    /// `clock_gettime` syscall, never the vDSO, and lifts the flag around its own `rdtsc`.)
    pub fn run(&mut self) -> Result<Summary, RecordError> {
        let _tsc = self.opts.trap_rdtsc.then(SelfNoTsc::set);
        if let Some(c) = &self.control {
            c.bind_current_thread();
        }
        let result = self.run_loop();
        if let Some(c) = &self.control {
            c.end();
        }
        result?;
        self.sink.flush().map_err(RecordError::Sink)?;
        Ok(self.summary.clone())
    }

    fn run_loop(&mut self) -> Result<(), RecordError> {
        loop {
            self.poll_control()?;
            match self.tracer.wait() {
                Ok(Some((tid, status))) => {
                    self.summary.stops += 1;
                    self.handle(tid, status)?;
                }
                Ok(None) => return Ok(()),
                // The control's wake-up: a command may be waiting.
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    return Err(RecordError::Trace {
                        what: "waitpid",
                        tid: -1,
                        err,
                    })
                }
            }
        }
    }

    /// Handles one `waitpid` report.
    pub fn handle(&mut self, tid: Tid, status: i32) -> Result<(), RecordError> {
        let stop = Stop::decode(status);
        match stop {
            Stop::Exited(code) => {
                self.on_exit(tid, ExitKind::Exited(code))?;
                return self.maybe_finish_park();
            }
            Stop::Killed(sig) => {
                self.on_exit(tid, ExitKind::Killed(sig))?;
                return self.maybe_finish_park();
            }
            _ => {}
        }
        let Some(thread) = self.threads.get_mut(&tid) else {
            // A new thread whose creator's event has not been handled yet: hold it.
            tracing::trace!(tid, "holding unannounced thread");
            self.held.insert(tid, status);
            return Ok(());
        };
        if matches!(thread.state, State::Attaching) {
            thread.state = State::Running;
            self.attaching = self.attaching.saturating_sub(1);
            self.deferred.push((tid, status));
            return self.maybe_finish_attach();
        }
        thread.job_stopped = false;
        self.on_stop(tid, stop, false)?;
        self.maybe_finish_park()
    }

    fn maybe_finish_attach(&mut self) -> Result<(), RecordError> {
        if self.attaching > 0 {
            return Ok(());
        }
        // Every attached thread is stopped: announce them (and those that ended meanwhile,
        // which were alive when attached), patch, then let them go.
        let mut tids: Vec<(Tid, Tid, Option<i32>)> = self
            .deferred
            .iter()
            .filter_map(|(t, _)| self.threads.get(t).map(|th| (th.tgid, *t, th.ns_tid)))
            .collect();
        let exits = std::mem::take(&mut self.attach_exits);
        tids.extend(
            exits
                .iter()
                .map(|&(tgid, tid, ns_tid, _)| (tgid, tid, ns_tid)),
        );
        tids.sort_unstable();
        for (tgid, tid, ns_tid) in tids {
            self.emit(Event::Attached { tid, tgid, ns_tid })?;
        }
        for (_, tid, _, how) in exits {
            self.emit(Event::ThreadExited { tid, how })?;
        }
        for tgid in std::mem::take(&mut self.to_patch) {
            // Where each stopped thread of the process will resume: no stub may cover it.
            let members: Vec<Tid> = self
                .deferred
                .iter()
                .map(|(t, _)| *t)
                .filter(|t| self.threads.get(t).is_some_and(|th| th.tgid == tgid))
                .collect();
            let avoid: Vec<u64> = members
                .iter()
                .filter_map(|&t| self.tracer.regs(t).ok().map(|r| r.rip))
                .collect();
            self.patch_vdso(tgid, tgid, &avoid)?;
        }
        self.sink.attached().map_err(RecordError::Sink)?;
        let mut tgids: Vec<Tid> = self.threads.values().map(|t| t.tgid).collect();
        tgids.sort_unstable();
        tgids.dedup();
        for tgid in tgids {
            self.process_added(tgid);
        }
        for pid in std::mem::take(&mut self.resume_after_attach) {
            if let Err(e) = self.tracer.kill(pid, libc::SIGCONT) {
                tracing::warn!(pid, "SIGCONT after attach: {e}");
            }
        }
        for (tid, status) in std::mem::take(&mut self.deferred) {
            self.on_stop(tid, Stop::decode(status), true)?;
        }
        if let Some(epoch) = self.park_after_attach.take() {
            self.start_park(epoch)?;
        }
        Ok(())
    }

    fn emit(&mut self, event: Event) -> Result<(), RecordError> {
        self.summary.events += 1;
        if matches!(event, Event::Syscall(_)) {
            self.summary.syscalls += 1;
        }
        self.sink.record(event).map_err(RecordError::Sink)
    }

    /// Resumes `tid` the way its state needs, delivering `sig`.
    fn resume(&mut self, tid: Tid, sig: i32) -> Result<(), RecordError> {
        let how = match self.threads.get(&tid).map(|t| &t.state) {
            Some(State::InSyscall(_)) | Some(State::Injecting { .. }) => Resume::Syscall,
            _ => Resume::Cont,
        };
        self.resume_as(tid, how, sig)
    }

    fn resume_as(&mut self, tid: Tid, how: Resume, sig: i32) -> Result<(), RecordError> {
        // Killed meanwhile (e.g. another thread's exit_group): its exit report follows.
        if alive(self.tracer.resume(tid, how, sig), "resume", tid)?.is_some() && self.park.is_some()
        {
            // Any ptrace stop satisfies (and clears) a pending PTRACE_INTERRUPT: while
            // parking, ask again each time, until the thread stops between system calls.
            alive(self.tracer.interrupt(tid), "PTRACE_INTERRUPT", tid)?;
        }
        Ok(())
    }

    fn on_stop(&mut self, tid: Tid, stop: Stop, first: bool) -> Result<(), RecordError> {
        match stop {
            Stop::Event {
                event: ptrace::EVENT_SECCOMP,
                ..
            } => self.on_seccomp(tid),
            Stop::Syscall => self.on_syscall_stop(tid),
            Stop::Event {
                event: ev @ (ptrace::EVENT_FORK | ptrace::EVENT_VFORK | ptrace::EVENT_CLONE),
                ..
            } => self.on_create(tid, ev),
            Stop::Event {
                event: ptrace::EVENT_EXEC,
                ..
            } => self.on_exec(tid),
            Stop::Event {
                event: ptrace::EVENT_STOP,
                sig,
            } => {
                let group_stop = matches!(
                    sig,
                    libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                ) && !first;
                if self.park.is_some() {
                    return self.park_stop(tid, group_stop);
                }
                if group_stop {
                    // Job control: stay stopped until SIGCONT, which reports another stop.
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.job_stopped = true;
                    }
                    self.resume_as(tid, Resume::Listen, 0)
                } else {
                    self.resume(tid, 0)
                }
            }
            Stop::Signal(sig) => self.on_signal(tid, sig),
            Stop::Event { .. } | Stop::Other(_) => self.resume(tid, 0),
            Stop::Exited(_) | Stop::Killed(_) => Ok(()),
        }
    }

    fn on_seccomp(&mut self, tid: Tid) -> Result<(), RecordError> {
        let now = now_ns();
        if let Some(State::Injecting { .. }) = self.threads.get(&tid).map(|t| &t.state) {
            // The recorder's own injected syscall, traced by a container profile: let it run.
            return self.resume_as(tid, Resume::Syscall, 0);
        }
        let Some(info) = alive(
            self.tracer.syscall_info(tid),
            "PTRACE_GET_SYSCALL_INFO",
            tid,
        )?
        else {
            return Ok(());
        };
        let gap_ns = self
            .threads
            .get(&tid)
            .map(|t| now.saturating_sub(t.last))
            .unwrap_or(0);
        if info.op != ptrace::INFO_SECCOMP {
            tracing::warn!(tid, op = info.op, "seccomp stop without seccomp info");
            return self.resume(tid, 0);
        }
        if info.arch != AUDIT_ARCH_X86_64 || info.nr & u64::from(X32_SYSCALL_BIT) != 0 {
            self.emit(Event::Unrecordable {
                tid,
                kind: GapKind::ForeignAbi,
                ip: info.ip,
                what: format!(
                    "syscall {} through a foreign ABI (audit arch {:#x}): not recorded",
                    info.nr, info.arch
                ),
            })?;
            return self.resume(tid, 0);
        }
        let sc = syscalls::by_nr(info.nr);
        if sc.is_some_and(|s| s.no_return) {
            self.emit(Event::Syscall(SyscallRecord {
                tid,
                nr: info.nr,
                args: info.args,
                ret: None,
                gap_ns,
                writes: Vec::new(),
                incomplete: false,
            }))?;
            if let Some(t) = self.threads.get_mut(&tid) {
                t.last = now_ns();
            }
            return self.resume(tid, 0);
        }
        if let Some(s) = sc.filter(|s| s.class == Class::Unrecordable) {
            self.emit(Event::Unrecordable {
                tid,
                kind: GapKind::IoUring,
                ip: info.ip,
                what: format!("{}: {}", s.name, s.reason),
            })?;
        }
        if syscalls::records_entry(info.nr) {
            self.emit(Event::SyscallEntry {
                tid,
                nr: info.nr,
                args: info.args,
                gap_ns,
            })?;
        }
        let entry = match sc {
            Some(s) => capture::entry_snapshot(
                s,
                &info.args,
                &mut Mem {
                    tracer: &mut self.tracer,
                    tid,
                },
            ),
            None => EntrySnapshot::default(),
        };
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = State::InSyscall(Pending {
                nr: info.nr,
                args: info.args,
                entry,
                gap_ns,
            });
        }
        self.resume_as(tid, Resume::Syscall, 0)
    }

    fn on_syscall_stop(&mut self, tid: Tid) -> Result<(), RecordError> {
        let Some(thread) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        match std::mem::replace(&mut thread.state, State::Running) {
            State::InSyscall(p) => self.finish_syscall(tid, p),
            State::Injecting { saved, phase, nr } => self.continue_injection(tid, saved, phase, nr),
            other => {
                // Not expecting one: carry on.
                thread.state = other;
                self.resume(tid, 0)
            }
        }
    }

    fn finish_syscall(&mut self, tid: Tid, p: Pending) -> Result<(), RecordError> {
        let Some(info) = alive(
            self.tracer.syscall_info(tid),
            "PTRACE_GET_SYSCALL_INFO",
            tid,
        )?
        else {
            return Ok(());
        };
        if info.op != ptrace::INFO_EXIT {
            tracing::warn!(tid, nr = p.nr, op = info.op, "expected a syscall-exit stop");
        }
        let ret = info.rval;
        let captured = match syscalls::by_nr(p.nr) {
            Some(sc) => capture::capture(
                sc,
                &p.args,
                &p.entry,
                ret,
                &mut Mem {
                    tracer: &mut self.tracer,
                    tid,
                },
            ),
            None => capture::Captured::default(),
        };
        if captured.incomplete {
            tracing::warn!(
                tid,
                nr = p.nr,
                ret,
                "could not read back all memory the syscall wrote"
            );
        }
        self.emit(Event::Syscall(SyscallRecord {
            tid,
            nr: p.nr,
            args: p.args,
            ret: Some(ret),
            gap_ns: p.gap_ns,
            writes: captured.writes,
            incomplete: captured.incomplete,
        }))?;
        let inject = match self.threads.get_mut(&tid) {
            Some(t) => {
                t.last = now_ns();
                std::mem::take(&mut t.inject_tsc_at_exit) && ret == 0
            }
            None => false,
        };
        if inject && self.start_tsc_injection(tid)? {
            return Ok(());
        }
        self.resume(tid, 0)
    }

    fn on_create(&mut self, tid: Tid, event: u32) -> Result<(), RecordError> {
        let msg = self.tracer.event_msg(tid).map(|m| m as Tid);
        let Some(child) = alive(msg, "PTRACE_GETEVENTMSG", tid)? else {
            return Ok(());
        };
        let parent_tgid = self.threads.get(&tid).map(|t| t.tgid).unwrap_or(tid);
        let (flags, gap_ns) = match self.threads.get(&tid).map(|t| &t.state) {
            Some(State::InSyscall(p)) => {
                let (nr, args0, gap) = (p.nr, p.args[0], p.gap_ns);
                (self.clone_flags(tid, nr, args0), gap)
            }
            _ => (0, 0),
        };
        let status = self.tracer.status(child).ok();
        let child_tgid = status.map(|s| s.tgid).unwrap_or(child);
        let kind = match event {
            ptrace::EVENT_VFORK => CreateKind::Vfork,
            ptrace::EVENT_CLONE if child_tgid == parent_tgid => CreateKind::Thread,
            _ => CreateKind::Process,
        };
        self.emit(Event::ThreadCreated {
            parent: tid,
            child,
            child_tgid,
            kind,
            ns_tid: status.and_then(|s| s.ns_tid),
            flags,
            gap_ns,
        })?;
        self.threads
            .insert(child, Thread::new(child_tgid, State::Running, None));
        if kind != CreateKind::Thread {
            if let Some(&insn) = self.syscall_insn.get(&parent_tgid) {
                // Same memory image (fork copies it, vfork shares it).
                self.syscall_insn.insert(child_tgid, insn);
            }
            self.process_added(child_tgid);
        }
        if let Some(how) = self.early_exits.remove(&child) {
            self.threads.remove(&child);
            self.emit(Event::ThreadExited { tid: child, how })?;
        } else if let Some(status) = self.held.remove(&child) {
            self.on_stop(child, Stop::decode(status), true)?;
        }
        self.resume(tid, 0)
    }

    fn on_exec(&mut self, tid: Tid) -> Result<(), RecordError> {
        let msg = self.tracer.event_msg(tid).map(|m| m as Tid);
        let Some(former) = alive(msg, "PTRACE_GETEVENTMSG", tid)? else {
            return Ok(());
        };
        // After exec the process has one thread, `tid` (the leader's id), carrying on the
        // state of the thread that called execve (`former`).
        let carried = self.threads.remove(&former);
        if former != tid {
            self.threads.remove(&tid);
        }
        let mut others: Vec<Tid> = self
            .threads
            .iter()
            .filter(|(_, t)| t.tgid == tid)
            .map(|(&t, _)| t)
            .collect();
        others.sort_unstable();
        for t in others {
            self.threads.remove(&t);
            self.emit(Event::ThreadExited {
                tid: t,
                how: ExitKind::ReplacedByExec,
            })?;
        }
        let mut thread = carried.unwrap_or_else(|| Thread::new(tid, State::Running, None));
        thread.tgid = tid;
        let (path, gap_ns) = match &thread.state {
            State::InSyscall(p) => (p.entry.path.clone(), p.gap_ns),
            _ => (None, 0),
        };
        self.threads.insert(tid, thread);
        self.syscall_insn.remove(&tid);
        self.process_added(tid);
        let exe = self.tracer.exe(tid);
        self.emit(Event::Exec {
            tid,
            former_tid: former,
            exe,
            path,
            gap_ns,
        })?;
        if self.opts.patch_vdso {
            self.patch_vdso(tid, tid, &[])?;
        }
        if self.opts.trap_rdtsc {
            if let Some(t) = self.threads.get_mut(&tid) {
                // At the execve's exit stop, when the thread is about to enter the new image.
                t.inject_tsc_at_exit = matches!(t.state, State::InSyscall(_));
            }
        }
        self.resume(tid, 0)
    }

    fn on_signal(&mut self, tid: Tid, sig: i32) -> Result<(), RecordError> {
        let Some(si) = alive(self.tracer.siginfo(tid), "PTRACE_GETSIGINFO", tid)? else {
            return Ok(());
        };
        let Some(regs) = alive(self.tracer.regs(tid), "PTRACE_GETREGS", tid)? else {
            return Ok(());
        };
        let gap_ns = self
            .threads
            .get(&tid)
            .map(|t| now_ns().saturating_sub(t.last))
            .unwrap_or(0);
        if sig == libc::SIGSEGV && si.code == SI_KERNEL && self.opts.trap_rdtsc {
            if let Some(event) = self.emulate_rdtsc(tid, regs, gap_ns)? {
                self.emit(event)?;
                // The trap counts as the thread's latest syscall for the next interval.
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.last = now_ns();
                }
                return self.resume(tid, 0);
            }
        }
        // orig_rax is the syscall being returned from, or -1 after an interrupt or fault.
        let syscall = ((regs.orig_rax as i64) >= 0).then_some(regs.orig_rax);
        self.emit(Event::Signal {
            tid,
            signo: sig,
            code: si.code,
            errno: si.errno,
            ip: regs.rip,
            syscall,
            siginfo: si.raw.to_vec(),
            gap_ns,
        })?;
        self.resume(tid, sig)
    }

    fn on_exit(&mut self, tid: Tid, how: ExitKind) -> Result<(), RecordError> {
        if self.root == Some(tid) {
            self.summary.root_exit = Some(how);
        }
        if let Some(p) = self.park.as_mut() {
            p.parked.remove(&tid);
        }
        match self.threads.remove(&tid) {
            Some(t) => {
                if matches!(t.state, State::Attaching) {
                    // Alive when seized: announced with the others at the barrier, then ended.
                    self.attaching = self.attaching.saturating_sub(1);
                    self.deferred.retain(|(d, _)| *d != tid);
                    self.attach_exits.push((t.tgid, tid, t.ns_tid, how));
                    return self.maybe_finish_attach();
                }
                self.deferred.retain(|(d, _)| *d != tid);
                if let Some(l) = &self.processes {
                    if !self.threads.values().any(|o| o.tgid == t.tgid) {
                        l.remove(t.tgid);
                    }
                }
                self.emit(Event::ThreadExited { tid, how })
            }
            None => {
                if self.held.remove(&tid).is_some() {
                    self.early_exits.insert(tid, how);
                }
                // Otherwise: a thread exec already accounted for, or not ours.
                Ok(())
            }
        }
    }

    /// Takes and carries out a command from the control, if one is waiting; gives up a park
    /// past its deadline. While detached it blocks until told to resume (or until the control
    /// closes: then it resumes on its own, so the container is never left frozen).
    fn poll_control(&mut self) -> Result<(), RecordError> {
        let Some(c) = self.control.clone() else {
            return Ok(());
        };
        if self.detached {
            let cmd = c.wait_command();
            match cmd {
                Some(Command::Park { .. }) => {
                    c.answer(Reply::Error("already parked: resume first".into()));
                }
                Some(Command::Resume) | None => {
                    if cmd.is_none() {
                        tracing::warn!(
                            "the control closed while the container was parked: resuming it"
                        );
                    }
                    let reply = self.resume_detached()?;
                    if cmd.is_some() {
                        c.answer(reply);
                    }
                }
            }
            return Ok(());
        }
        if let Some(p) = &self.park {
            if now_ns() > p.deadline {
                let missing: Vec<String> = self
                    .threads
                    .keys()
                    .filter(|t| !p.parked.contains_key(t))
                    .map(ToString::to_string)
                    .collect();
                return self.abort_park(format!(
                    "thread(s) {} did not stop within {} ms (in an uninterruptible system \
                     call?); the checkpoint is not taken",
                    missing.join(", "),
                    PARK_TIMEOUT_NS / 1_000_000
                ));
            }
        }
        match c.take() {
            None => Ok(()),
            Some(Command::Resume) => {
                // Not parked (a park failed, or none was asked for): already running, traced.
                c.answer(Reply::Resumed {
                    threads: self.threads.len(),
                });
                Ok(())
            }
            Some(Command::Park { epoch }) => self.start_park(epoch),
        }
    }

    fn answer(&self, reply: Reply) {
        if let Some(c) = &self.control {
            c.answer(reply);
        }
    }

    /// Starts parking every thread for the checkpoint of `epoch`: each is interrupted, and
    /// stays in the stop that interrupt produces (see the module docs).
    fn start_park(&mut self, epoch: u64) -> Result<(), RecordError> {
        if self.park.is_some() {
            self.answer(Reply::Error("a park is already in progress".into()));
            return Ok(());
        }
        if self.root.is_none() {
            self.answer(Reply::Error("no process is being recorded".into()));
            return Ok(());
        }
        if self.attaching > 0 || !self.deferred.is_empty() {
            // Parked once every thread is attached.
            self.park_after_attach = Some(epoch);
            return Ok(());
        }
        if let Some((tid, t)) = self.threads.iter().find(|(_, t)| t.job_stopped) {
            let why = format!(
                "process {} is in job-control stop (thread {tid}, SIGSTOP or similar): it \
                 cannot be checkpointed until it is continued",
                t.tgid
            );
            self.answer(Reply::Error(why));
            return Ok(());
        }
        self.park = Some(Park {
            epoch,
            deadline: now_ns().saturating_add(PARK_TIMEOUT_NS),
            parked: HashMap::new(),
        });
        let mut tids: Vec<Tid> = self.threads.keys().copied().collect();
        tids.sort_unstable();
        for tid in tids {
            alive(self.tracer.interrupt(tid), "PTRACE_INTERRUPT", tid)?;
        }
        tracing::debug!(epoch, threads = self.threads.len(), "parking");
        self.maybe_finish_park()
    }

    /// A `PTRACE_EVENT_STOP` while parking: the thread stays stopped if it is between system
    /// calls; otherwise it carries on and is interrupted again.
    ///
    /// Every ptrace stop satisfies a pending `PTRACE_INTERRUPT` (the kernel clears it at any
    /// trap), so a thread that hits a seccomp or syscall-exit stop first is interrupted again
    /// each time it is resumed ([`Recorder::resume_as`]): a blocking call then returns at once
    /// with a restart code (recorded as its result; it runs again after the checkpoint), and
    /// the thread stops on its way back to user mode.
    fn park_stop(&mut self, tid: Tid, group_stop: bool) -> Result<(), RecordError> {
        let running = matches!(
            self.threads.get(&tid).map(|t| &t.state),
            Some(State::Running)
        );
        if running {
            if let Some(p) = self.park.as_mut() {
                p.parked.insert(tid, group_stop);
            }
            return Ok(());
        }
        // Resumed and interrupted again (see `resume_as`).
        self.resume(tid, 0)
    }

    /// Once every thread is parked: cuts the log, freezes the cgroup, detaches, and answers.
    fn maybe_finish_park(&mut self) -> Result<(), RecordError> {
        let Some(p) = &self.park else {
            return Ok(());
        };
        if let Some((&tid, _)) = p.parked.iter().find(|(_, &g)| g) {
            let tgid = self.threads.get(&tid).map_or(tid, |t| t.tgid);
            return self.abort_park(format!(
                "process {tgid} entered job-control stop (thread {tid}): it cannot be \
                 checkpointed until it is continued"
            ));
        }
        let all = self.held.is_empty() && self.threads.keys().all(|t| p.parked.contains_key(t));
        if !all {
            return Ok(());
        }
        let epoch = p.epoch;
        let Some(root) = self.root else {
            return self.abort_park("no process to checkpoint".into());
        };
        let cut = match self.sink.checkpoint(epoch) {
            Ok(c) => c,
            Err(e) => return self.abort_park(format!("cutting the log: {e}")),
        };
        if let Err(e) = self.tracer.freeze(root, true) {
            let _ = self.tracer.freeze(root, false);
            self.sink.checkpoint_done().map_err(RecordError::Sink)?;
            return self.abort_park(format!("freezing the container's cgroup: {e}"));
        }
        let mut tids: Vec<Tid> = self.threads.keys().copied().collect();
        tids.sort_unstable();
        let mut detached = Vec::new();
        for &tid in &tids {
            match self.tracer.detach(tid) {
                Ok(()) => detached.push(tid),
                // Killed meanwhile: still ours; its exit report comes after the resume.
                Err(e) if is_gone(&e) => {}
                Err(e) => {
                    for &d in &detached {
                        self.reseize(d)?;
                    }
                    let _ = self.tracer.freeze(root, false);
                    self.sink.checkpoint_done().map_err(RecordError::Sink)?;
                    return self.abort_park(format!("detaching from thread {tid}: {e}"));
                }
            }
        }
        self.park = None;
        self.detached = true;
        tracing::debug!(
            epoch,
            seq = cut.seq,
            offset = cut.offset,
            "parked and detached"
        );
        self.answer(Reply::Parked(cut));
        Ok(())
    }

    /// Gives up a park: the threads parked so far carry on; answers with `why`.
    fn abort_park(&mut self, why: String) -> Result<(), RecordError> {
        let Some(p) = self.park.take() else {
            return Ok(());
        };
        let mut parked: Vec<(Tid, bool)> = p.parked.into_iter().collect();
        parked.sort_unstable();
        for (tid, group_stop) in parked {
            if group_stop {
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.job_stopped = true;
                }
                self.resume_as(tid, Resume::Listen, 0)?;
            } else {
                self.resume(tid, 0)?;
            }
        }
        tracing::warn!("checkpoint not taken: {why}");
        self.answer(Reply::Error(why));
        Ok(())
    }

    /// Seizes a thread the recorder detached from, and interrupts it so that it reports a stop
    /// once it runs (after the thaw).
    fn reseize(&mut self, tid: Tid) -> Result<(), RecordError> {
        self.tracer
            .seize(tid, ptrace::OPTIONS)
            .and_then(|()| self.tracer.interrupt(tid))
            .map_err(|err| RecordError::Trace {
                what: "PTRACE_SEIZE after a checkpoint",
                tid,
                err,
            })
    }

    /// After the dump: seizes every thread again, thaws, lets ingress in. A thread that cannot
    /// be traced again ends the recording, and the container is killed first: it could not
    /// run correctly untraced.
    fn resume_detached(&mut self) -> Result<Reply, RecordError> {
        self.detached = false;
        let Some(root) = self.root else {
            return Ok(Reply::Resumed { threads: 0 });
        };
        let mut tids: Vec<Tid> = self.threads.keys().copied().collect();
        tids.sort_unstable();
        let mut failure = None;
        for &tid in &tids {
            match self.tracer.seize(tid, ptrace::OPTIONS) {
                Ok(()) => {
                    if let Err(e) = self.tracer.interrupt(tid) {
                        failure.get_or_insert(format!("interrupting thread {tid}: {e}"));
                    }
                }
                Err(e) if is_gone(&e) => {
                    // Gone while detached (killed): its end was reported to its parent, not
                    // to the recorder.
                    tracing::warn!(tid, "thread gone while the container was parked");
                    self.threads.remove(&tid);
                    self.emit(Event::ThreadExited {
                        tid,
                        how: ExitKind::Killed(libc::SIGKILL),
                    })?;
                }
                Err(e) => {
                    failure.get_or_insert(format!(
                        "thread {tid} cannot be traced again ({e}); is another tracer attached?"
                    ));
                }
            }
        }
        // Nothing can start a thread while the cgroup is frozen; a stranger would run
        // unrecorded.
        let mut tgids: Vec<Tid> = self.threads.values().map(|t| t.tgid).collect();
        tgids.sort_unstable();
        tgids.dedup();
        for tgid in &tgids {
            if let Ok(now) = self.tracer.task_ids(*tgid) {
                if let Some(new) = now.iter().find(|t| !self.threads.contains_key(t)) {
                    failure.get_or_insert(format!(
                        "thread {new} of process {tgid} appeared while the container was parked"
                    ));
                }
            }
        }
        let thawed = self.tracer.freeze(root, false);
        self.sink.checkpoint_done().map_err(RecordError::Sink)?;
        if let Some(why) = failure {
            tracing::error!("{why}: the container is killed");
            for tgid in &tgids {
                let _ = self.tracer.kill(*tgid, libc::SIGKILL);
            }
            self.answer(Reply::Error(format!("{why}; the container was killed")));
            return Err(RecordError::Trace {
                what: "resuming after a checkpoint",
                tid: root,
                err: io::Error::other(why),
            });
        }
        if let Err(e) = thawed {
            tracing::error!("thawing the container's cgroup: {e}");
            return Ok(Reply::Error(format!(
                "every thread is traced again, but thawing the cgroup failed: {e}"
            )));
        }
        // The pause is not part of any thread's interval.
        let now = now_ns();
        for t in self.threads.values_mut() {
            t.last = now;
        }
        tracing::debug!(threads = self.threads.len(), "resumed after a checkpoint");
        Ok(Reply::Resumed {
            threads: self.threads.len(),
        })
    }

    /// Patches the vDSO of process `tgid` (through thread `tid`). Failures are reported as
    /// [`Event::Unrecordable`]: the process then reads clocks unrecorded.
    fn patch_vdso(&mut self, tgid: Tid, tid: Tid, avoid: &[u64]) -> Result<(), RecordError> {
        match self.try_patch_vdso(tgid, tid, avoid) {
            Ok(Some((event, skipped))) => {
                self.emit(event)?;
                for name in skipped {
                    self.emit(Event::Unrecordable {
                        tid,
                        kind: GapKind::VdsoUnpatched,
                        ip: 0,
                        what: format!(
                            "vDSO entry {name} not patched (a thread was stopped inside it): \
                             its calls in this process are not recorded"
                        ),
                    })?;
                }
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => {
                tracing::warn!(tgid, "vDSO not patched: {e}");
                self.emit(Event::Unrecordable {
                    tid,
                    kind: GapKind::VdsoUnpatched,
                    ip: 0,
                    what: format!("vDSO not patched, its clock reads are not recorded: {e}"),
                })
            }
        }
    }

    fn try_patch_vdso(
        &mut self,
        tgid: Tid,
        tid: Tid,
        avoid: &[u64],
    ) -> io::Result<Option<(Event, Vec<String>)>> {
        let Some(done) = vdso::patch_process(&mut self.tracer, tgid, tid, avoid)? else {
            return Ok(None);
        };
        if let Some(insn) = done.syscall_insn {
            self.syscall_insn.insert(tgid, insn);
        }
        let event = Event::VdsoPatched {
            tgid,
            base: done.base,
            symbols: done.patches.iter().map(|p| p.to_event(done.base)).collect(),
        };
        Ok(Some((event, done.skipped)))
    }

    /// Starts injecting `prctl(PR_SET_TSC, PR_TSC_SIGSEGV)` into `tid`, stopped at a
    /// syscall-exit stop. Returns false (and reports) when it cannot.
    fn start_tsc_injection(&mut self, tid: Tid) -> Result<bool, RecordError> {
        let tgid = self.threads.get(&tid).map(|t| t.tgid).unwrap_or(tid);
        let Some(&insn) = self.syscall_insn.get(&tgid) else {
            self.emit(Event::Unrecordable {
                tid,
                kind: GapKind::RdtscUntrapped,
                ip: 0,
                what: "rdtsc not trapped: no syscall instruction to inject through (vDSO not \
                       patched)"
                    .into(),
            })?;
            return Ok(false);
        };
        let Some(saved) = alive(self.tracer.regs(tid), "PTRACE_GETREGS", tid)? else {
            return Ok(true);
        };
        let mut regs = saved;
        regs.rax = u64::from(syscalls::nr::PRCTL);
        regs.orig_rax = u64::MAX;
        regs.rdi = PR_SET_TSC;
        regs.rsi = PR_TSC_SIGSEGV;
        regs.rdx = 0;
        regs.r10 = 0;
        regs.r8 = 0;
        regs.rip = insn;
        if alive(self.tracer.set_regs(tid, &regs), "PTRACE_SETREGS", tid)?.is_none() {
            return Ok(true);
        }
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = State::Injecting {
                saved: Box::new(saved),
                phase: InjectPhase::Entry,
                nr: u64::from(syscalls::nr::PRCTL),
            };
        }
        self.resume_as(tid, Resume::Syscall, 0)?;
        Ok(true)
    }

    fn continue_injection(
        &mut self,
        tid: Tid,
        saved: Box<Regs>,
        phase: InjectPhase,
        nr: u64,
    ) -> Result<(), RecordError> {
        match phase {
            InjectPhase::Entry => {
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.state = State::Injecting {
                        saved,
                        phase: InjectPhase::Exit,
                        nr,
                    };
                }
                self.resume_as(tid, Resume::Syscall, 0)
            }
            InjectPhase::Exit => {
                let Some(regs) = alive(self.tracer.regs(tid), "PTRACE_GETREGS", tid)? else {
                    return Ok(());
                };
                match regs.rax as i64 {
                    0 => tracing::debug!(tid, "PR_SET_TSC injected"),
                    r => {
                        self.emit(Event::Unrecordable {
                            tid,
                            kind: GapKind::RdtscUntrapped,
                            ip: 0,
                            what: format!("rdtsc not trapped: injected prctl returned {r}"),
                        })?;
                    }
                }
                if alive(self.tracer.set_regs(tid, &saved), "PTRACE_SETREGS", tid)?.is_none() {
                    return Ok(());
                }
                if let Some(t) = self.threads.get_mut(&tid) {
                    t.state = State::Running;
                    t.last = now_ns();
                }
                self.resume_as(tid, Resume::Cont, 0)
            }
        }
    }

    /// If `tid` faulted on `rdtsc`/`rdtscp`, performs it for the tracee and returns the event.
    fn emulate_rdtsc(
        &mut self,
        tid: Tid,
        mut regs: Regs,
        gap_ns: u64,
    ) -> Result<Option<Event>, RecordError> {
        let code = match self.tracer.read_mem(tid, regs.rip, 3) {
            Ok(c) => c,
            Err(_) => return Ok(None),
        };
        let Some((len, rdtscp)) = ptrace::tsc_instruction(&code) else {
            return Ok(None);
        };
        let (value, aux) = read_tsc(rdtscp);
        let ip = regs.rip;
        ptrace::set_tsc_result(&mut regs, len, value, aux);
        if alive(self.tracer.set_regs(tid, &regs), "PTRACE_SETREGS", tid)?.is_none() {
            return Ok(None);
        }
        Ok(Some(Event::Rdtsc {
            tid,
            ip,
            value,
            aux,
            gap_ns,
        }))
    }

    /// The clone flags of the creating syscall `nr` of `tid` (first argument `arg0`), in
    /// `clone(2)`'s encoding (see [`Event::ThreadCreated`]).
    fn clone_flags(&mut self, tid: Tid, nr: u64, arg0: u64) -> u64 {
        const CLONE_VM: u64 = 0x100;
        const CLONE_VFORK: u64 = 0x4000;
        let sigchld = libc::SIGCHLD as u64;
        match nr {
            n if n == u64::from(syscalls::nr::CLONE) => arg0,
            n if n == u64::from(syscalls::nr::FORK) => sigchld,
            n if n == u64::from(syscalls::nr::VFORK) => CLONE_VM | CLONE_VFORK | sigchld,
            n if n == u64::from(syscalls::nr::CLONE3) => {
                // struct clone_args: flags at 0, exit_signal at 32.
                match self.tracer.read_mem(tid, arg0, 40) {
                    Ok(b) if b.len() == 40 => {
                        let word = |o: usize| {
                            b.get(o..o + 8)
                                .and_then(|s| s.try_into().ok())
                                .map(u64::from_ne_bytes)
                                .unwrap_or(0)
                        };
                        word(0) | (word(32) & 0xff)
                    }
                    _ => 0,
                }
            }
            _ => 0,
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, through the syscall: the vDSO would execute `rdtsc`, which
/// faults while the recorder runs with `PR_TSC_SIGSEGV` (see [`Recorder::run`]).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    unsafe { libc::syscall(libc::SYS_clock_gettime, libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

fn set_tsc(mode: libc::c_int) -> bool {
    // SAFETY: prctl with integer arguments; affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TSC, mode, 0, 0, 0) == 0 }
}

fn get_tsc_mode() -> Option<libc::c_int> {
    let mut mode: libc::c_int = 0;
    // SAFETY: `mode` is a valid out-pointer.
    let rc = unsafe { libc::prctl(libc::PR_GET_TSC, &mut mode as *mut libc::c_int, 0, 0, 0) };
    (rc == 0).then_some(mode)
}

/// Makes the calling thread run with `PR_TSC_SIGSEGV` until dropped.
struct SelfNoTsc {
    was: Option<libc::c_int>,
}

impl SelfNoTsc {
    fn set() -> SelfNoTsc {
        let was = get_tsc_mode();
        if !set_tsc(libc::PR_TSC_SIGSEGV) {
            tracing::debug!("PR_SET_TSC on the recorder thread failed");
        }
        SelfNoTsc { was }
    }
}

impl Drop for SelfNoTsc {
    fn drop(&mut self) {
        set_tsc(self.was.unwrap_or(libc::PR_TSC_ENABLE));
    }
}

/// The recorder's own TSC, for an emulated `rdtsc`; lifts the calling thread's
/// `PR_TSC_SIGSEGV` for the instant of the read if it is set.
fn read_tsc(rdtscp: bool) -> (u64, Option<u32>) {
    let mode = get_tsc_mode();
    let lifted = mode == Some(libc::PR_TSC_SIGSEGV) && set_tsc(libc::PR_TSC_ENABLE);
    let out = read_tsc_raw(rdtscp);
    if lifted {
        set_tsc(libc::PR_TSC_SIGSEGV);
    }
    out
}

/// Checks the invariants a recorded event stream must satisfy (used by the tests, and a start
/// for the verifier): every thread's events come after its creation or attach and before its
/// exit, and nothing follows an exit. Returns the first violation.
pub fn check_order(events: &[Event]) -> Result<(), String> {
    let mut alive: BTreeMap<Tid, bool> = BTreeMap::new();
    for (i, ev) in events.iter().enumerate() {
        match ev {
            Event::Attached { tid, .. } => {
                alive.insert(*tid, true);
            }
            Event::ThreadCreated { parent, child, .. } => {
                if alive.get(parent) != Some(&true) {
                    return Err(format!("event {i}: creator {parent} not alive"));
                }
                alive.insert(*child, true);
            }
            Event::Exec {
                tid, former_tid, ..
            } => {
                if alive.get(former_tid) != Some(&true) {
                    return Err(format!("event {i}: exec by unknown thread {former_tid}"));
                }
                alive.remove(former_tid);
                alive.insert(*tid, true);
            }
            Event::ThreadExited { tid, .. } => {
                if alive.insert(*tid, false) != Some(true) {
                    return Err(format!("event {i}: exit of thread {tid} not alive"));
                }
            }
            Event::VdsoPatched { .. } => {}
            other => {
                let tid = other.tid();
                if alive.get(&tid) != Some(&true) {
                    return Err(format!("event {i}: {other:?} from thread {tid} not alive"));
                }
            }
        }
    }
    Ok(())
}

/// Copies of memory writes are large; tests look them up by address.
pub fn writes_concat(writes: &[MemWrite]) -> Vec<u8> {
    writes.iter().flat_map(|w| w.data.iter().copied()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::VecSink;
    use crate::ptrace::{SigInfo, SyscallInfo};
    use std::collections::VecDeque;
    use std::sync::Arc;

    /// A scripted tracer: `wait` replays `stops`; every other call answers from queues and is
    /// logged.
    #[derive(Default)]
    struct Fake {
        stops: VecDeque<(Tid, i32)>,
        /// When set, stops come from here instead (`None`: an interrupted wait), so a test
        /// thread can interleave them with control commands.
        feed: Option<std::sync::mpsc::Receiver<Option<(Tid, i32)>>>,
        /// interrupt / seize / detach / freeze / thaw calls, in order.
        ops: Vec<String>,
        /// Threads `seize` refuses (EPERM) after their first seize.
        unseizable: Vec<Tid>,
        infos: VecDeque<SyscallInfo>,
        msgs: VecDeque<u64>,
        mem: HashMap<u64, Vec<u8>>,
        resumed: Vec<(Tid, Resume, i32)>,
        tgids: HashMap<Tid, Tid>,
        tasks: HashMap<Tid, Vec<Tid>>,
    }

    fn stopped(sig: i32, event: u32) -> i32 {
        ((event as i32) << 16) | (sig << 8) | 0x7f
    }

    impl Tracer for Fake {
        fn wait(&mut self) -> io::Result<Option<(Tid, i32)>> {
            if let Some(feed) = &self.feed {
                return match feed.recv() {
                    Ok(Some(stop)) => Ok(Some(stop)),
                    Ok(None) => Err(io::ErrorKind::Interrupted.into()),
                    Err(_) => Ok(None),
                };
            }
            Ok(self.stops.pop_front())
        }
        fn seize(&mut self, tid: Tid, _: u32) -> io::Result<()> {
            let again = self.ops.contains(&format!("seize {tid}"));
            self.ops.push(format!("seize {tid}"));
            if again && self.unseizable.contains(&tid) {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        }
        fn interrupt(&mut self, tid: Tid) -> io::Result<()> {
            self.ops.push(format!("interrupt {tid}"));
            Ok(())
        }
        fn detach(&mut self, tid: Tid) -> io::Result<()> {
            self.ops.push(format!("detach {tid}"));
            Ok(())
        }
        fn freeze(&mut self, pid: Tid, frozen: bool) -> io::Result<()> {
            self.ops
                .push(format!("{} {pid}", if frozen { "freeze" } else { "thaw" }));
            Ok(())
        }
        fn resume(&mut self, tid: Tid, how: Resume, sig: i32) -> io::Result<()> {
            self.resumed.push((tid, how, sig));
            Ok(())
        }
        fn syscall_info(&mut self, _: Tid) -> io::Result<SyscallInfo> {
            self.infos
                .pop_front()
                .ok_or_else(|| io::Error::other("no info scripted"))
        }
        fn event_msg(&mut self, _: Tid) -> io::Result<u64> {
            self.msgs
                .pop_front()
                .ok_or_else(|| io::Error::other("no msg scripted"))
        }
        fn siginfo(&mut self, _: Tid) -> io::Result<SigInfo> {
            Ok(SigInfo {
                signo: libc::SIGUSR1,
                code: 0,
                errno: 0,
                raw: [0; ptrace::SIGINFO_SIZE],
            })
        }
        fn regs(&mut self, _: Tid) -> io::Result<Regs> {
            // SAFETY: plain old data.
            Ok(unsafe { std::mem::zeroed() })
        }
        fn set_regs(&mut self, _: Tid, _: &Regs) -> io::Result<()> {
            Ok(())
        }
        fn read_mem(&mut self, _: Tid, addr: u64, len: usize) -> io::Result<Vec<u8>> {
            let mut d = self.mem.get(&addr).cloned().unwrap_or_default();
            d.truncate(len);
            Ok(d)
        }
        fn write_mem(&mut self, _: Tid, _: u64, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn kill(&mut self, _: Tid, _: i32) -> io::Result<()> {
            Ok(())
        }
        fn status(&mut self, tid: Tid) -> io::Result<crate::procfs::Status> {
            Ok(crate::procfs::Status {
                tgid: self.tgids.get(&tid).copied().unwrap_or(tid),
                ns_tid: Some(tid - 99),
                stopped: false,
            })
        }
        fn task_ids(&mut self, pid: Tid) -> io::Result<Vec<Tid>> {
            Ok(self.tasks.get(&pid).cloned().unwrap_or_else(|| vec![pid]))
        }
        fn maps(&mut self, _: Tid) -> io::Result<String> {
            Ok(String::new())
        }
        fn exe(&mut self, _: Tid) -> Option<String> {
            None
        }
    }

    fn seccomp(nr: u64, args: [u64; 6]) -> SyscallInfo {
        SyscallInfo {
            op: ptrace::INFO_SECCOMP,
            arch: AUDIT_ARCH_X86_64,
            ip: 0,
            nr,
            args,
            rval: 0,
            ret_data: 0,
        }
    }

    /// Attaches to process 100 through `f` and records until it ends: the summary, how the
    /// threads were resumed, and the events.
    fn record(f: Fake, opts: Options) -> (Summary, Vec<(Tid, Resume, i32)>, Vec<Event>) {
        let mut rec = Recorder::new(f, VecSink::default(), opts);
        rec.attach(100).expect("attach");
        let summary = rec.run().expect("run");
        let resumed = std::mem::take(&mut rec.tracer.resumed);
        (summary, resumed, rec.into_sink().events)
    }

    fn exit(rval: i64) -> SyscallInfo {
        SyscallInfo {
            op: ptrace::INFO_EXIT,
            arch: AUDIT_ARCH_X86_64,
            ip: 0,
            nr: 0,
            args: [0; 6],
            rval,
            ret_data: 0,
        }
    }

    #[test]
    fn a_new_thread_is_held_until_its_creation_is_recorded() {
        let mut f = Fake::default();
        f.stops.extend([
            (100, stopped(libc::SIGTRAP, ptrace::EVENT_STOP)),
            // The child's first stop is reported before its creator's clone event.
            (101, stopped(libc::SIGTRAP, ptrace::EVENT_STOP)),
            (100, stopped(libc::SIGTRAP, ptrace::EVENT_CLONE)),
            (101, stopped(libc::SIGTRAP, ptrace::EVENT_SECCOMP)),
            (101, stopped(libc::SIGTRAP | 0x80, 0)),
            (101, 0),
            (100, 3 << 8),
        ]);
        f.msgs.push_back(101);
        f.tgids.insert(101, 100);
        f.infos
            .extend([seccomp(318, [0x1000, 4, 0, 0, 0, 0]), exit(4)]);
        f.mem.insert(0x1000, vec![1, 2, 3, 4, 5]);
        let opts = Options {
            patch_vdso: true,
            trap_rdtsc: false,
        };
        let (summary, resumed, events) = record(f, opts);
        assert_eq!(summary.root_exit, Some(ExitKind::Exited(3)));
        check_order(&events).expect("order");
        assert_eq!(
            events,
            vec![
                Event::Attached {
                    tid: 100,
                    tgid: 100,
                    ns_tid: Some(1)
                },
                Event::ThreadCreated {
                    parent: 100,
                    child: 101,
                    child_tgid: 100,
                    kind: CreateKind::Thread,
                    ns_tid: Some(2),
                    flags: 0,
                    gap_ns: 0,
                },
                Event::Syscall(SyscallRecord {
                    tid: 101,
                    nr: 318,
                    args: [0x1000, 4, 0, 0, 0, 0],
                    ret: Some(4),
                    gap_ns: match &events[2] {
                        Event::Syscall(s) => s.gap_ns,
                        _ => 0,
                    },
                    writes: vec![MemWrite {
                        addr: 0x1000,
                        data: vec![1, 2, 3, 4]
                    }],
                    incomplete: false,
                }),
                Event::ThreadExited {
                    tid: 101,
                    how: ExitKind::Exited(0)
                },
                Event::ThreadExited {
                    tid: 100,
                    how: ExitKind::Exited(3)
                },
            ]
        );
        // The child ran only after its creation was recorded; the syscall ran to its exit stop.
        assert_eq!(
            resumed,
            vec![
                (100, Resume::Cont, 0),
                (101, Resume::Cont, 0),
                (100, Resume::Cont, 0),
                (101, Resume::Syscall, 0),
                (101, Resume::Cont, 0),
            ]
        );
    }

    #[test]
    fn signals_are_recorded_and_delivered_and_group_stops_listened() {
        let mut f = Fake::default();
        f.stops.extend([
            (100, stopped(libc::SIGTRAP, ptrace::EVENT_STOP)),
            (100, stopped(libc::SIGUSR1, 0)),
            (100, stopped(libc::SIGSTOP, ptrace::EVENT_STOP)),
            (100, stopped(libc::SIGTRAP, ptrace::EVENT_STOP)),
            (100, stopped(libc::SIGTRAP, ptrace::EVENT_SECCOMP)),
            (100, libc::SIGKILL),
        ]);
        f.infos.push_back(seccomp(231, [5, 0, 0, 0, 0, 0]));
        let (_, resumed, events) = record(f, Options::default());
        assert!(matches!(
            events[1],
            Event::Signal {
                tid: 100,
                signo: libc::SIGUSR1,
                ..
            }
        ));
        assert!(matches!(&events[2], Event::Syscall(s) if s.nr == 231 && s.ret.is_none()));
        assert_eq!(
            events[3],
            Event::ThreadExited {
                tid: 100,
                how: ExitKind::Killed(libc::SIGKILL)
            }
        );
        assert_eq!(
            resumed,
            vec![
                (100, Resume::Cont, 0),
                (100, Resume::Cont, libc::SIGUSR1),
                (100, Resume::Listen, 0),
                (100, Resume::Cont, 0),
                (100, Resume::Cont, 0),
            ]
        );
    }

    #[test]
    fn a_thread_ending_during_attach_is_announced_then_ended() {
        let mut f = Fake::default();
        f.tasks.insert(100, vec![100, 101]);
        f.tgids.insert(101, 100);
        f.stops.extend([
            // 101 ends before its attach stop; 100 stops, then runs to its end.
            (101, 0),
            (100, stopped(libc::SIGTRAP, ptrace::EVENT_STOP)),
            (100, 0),
        ]);
        let opts = Options {
            patch_vdso: false,
            trap_rdtsc: false,
        };
        let (_, _, events) = record(f, opts);
        check_order(&events).expect("order");
        assert_eq!(
            events,
            vec![
                Event::Attached {
                    tid: 100,
                    tgid: 100,
                    ns_tid: Some(1)
                },
                Event::Attached {
                    tid: 101,
                    tgid: 100,
                    ns_tid: Some(2)
                },
                Event::ThreadExited {
                    tid: 101,
                    how: ExitKind::Exited(0)
                },
                Event::ThreadExited {
                    tid: 100,
                    how: ExitKind::Exited(0)
                },
            ]
        );
    }

    #[test]
    fn order_checker_catches_events_of_unknown_threads() {
        let ev = vec![Event::Signal {
            tid: 5,
            signo: 10,
            code: 0,
            errno: 0,
            ip: 0,
            syscall: None,
            siginfo: Vec::new(),
            gap_ns: 0,
        }];
        assert!(check_order(&ev).is_err());
        let ev = vec![
            Event::Attached {
                tid: 5,
                tgid: 5,
                ns_tid: None,
            },
            Event::ThreadExited {
                tid: 5,
                how: ExitKind::Exited(0),
            },
            Event::Signal {
                tid: 5,
                signo: 10,
                code: 0,
                errno: 0,
                ip: 0,
                syscall: None,
                siginfo: Vec::new(),
                gap_ns: 0,
            },
        ];
        assert!(check_order(&ev).is_err());
    }

    type Feed = std::sync::mpsc::Sender<Option<(Tid, i32)>>;
    type Finished = std::thread::JoinHandle<(Result<Summary, String>, Fake, VecSink)>;

    /// Runs a recorder of process 100 (threads `tasks`) on a thread of its own, fed by the
    /// returned sender; `f` is set up first.
    fn threaded(tasks: Vec<Tid>, f: impl FnOnce(&mut Fake)) -> (Feed, Arc<Control>, Finished) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut fake = Fake {
            feed: Some(rx),
            ..Fake::default()
        };
        for &t in &tasks {
            fake.tgids.insert(t, 100);
        }
        fake.tasks.insert(100, tasks);
        f(&mut fake);
        let control = Arc::new(Control::default());
        let c = control.clone();
        let opts = Options {
            patch_vdso: false,
            trap_rdtsc: false,
        };
        let h = std::thread::spawn(move || {
            let mut rec = Recorder::new(fake, VecSink::default(), opts).with_control(c);
            let r = rec.attach(100).map_err(|e| e.to_string());
            let r = r.and_then(|()| rec.run().map_err(|e| e.to_string()));
            let Recorder { tracer, sink, .. } = rec;
            (r, tracer, sink)
        });
        (tx, control, h)
    }

    /// Calls the control from another thread, waking the recorder's (fake) wait meanwhile.
    fn call(tx: &Feed, control: &Arc<Control>, cmd: Command) -> std::thread::JoinHandle<Reply> {
        let c = control.clone();
        let h = std::thread::spawn(move || c.call(cmd, std::time::Duration::from_secs(10)));
        // The command is posted before the wake-up is fed (the call posts at once).
        std::thread::sleep(std::time::Duration::from_millis(20));
        tx.send(None).expect("feed");
        h
    }

    const STOP: fn() -> i32 = || stopped(libc::SIGTRAP, ptrace::EVENT_STOP);

    #[test]
    fn a_park_cuts_freezes_and_detaches_and_a_resume_seizes_again() {
        let (tx, control, rec) = threaded(vec![100, 101], |_| {});
        tx.send(Some((100, STOP()))).expect("feed");
        tx.send(Some((101, STOP()))).expect("feed");
        let parked = call(&tx, &control, Command::Park { epoch: 4 });
        // Both threads reach their interrupt stop.
        tx.send(Some((101, STOP()))).expect("feed");
        tx.send(Some((100, STOP()))).expect("feed");
        let cut = match parked.join().expect("call") {
            Reply::Parked(cut) => cut,
            other => panic!("not parked: {other:?}"),
        };
        // Parked: a resume seizes both again, thaws, and they carry on.
        let resumed = control.call(Command::Resume, std::time::Duration::from_secs(10));
        assert_eq!(resumed, Reply::Resumed { threads: 2 });
        tx.send(Some((100, STOP()))).expect("feed");
        tx.send(Some((101, STOP()))).expect("feed");
        tx.send(Some((101, 0))).expect("feed");
        tx.send(Some((100, 0))).expect("feed");
        drop(tx);
        let (r, fake, sink) = rec.join().expect("recorder");
        r.expect("run");
        assert_eq!(sink.cuts, vec![(4, 2)]);
        assert_eq!(cut.seq, 3);
        assert!(!sink.in_checkpoint, "ingress held after the resume");
        assert_eq!(
            fake.ops,
            [
                "seize 100",
                "seize 101",
                "interrupt 100",
                "interrupt 101",
                "interrupt 100",
                "interrupt 101",
                "freeze 100",
                "detach 100",
                "detach 101",
                "seize 100",
                "interrupt 100",
                "seize 101",
                "interrupt 101",
                "thaw 100",
            ]
        );
        // Parked threads were not resumed until the checkpoint was over: after the attach,
        // each thread is resumed exactly once more, after the resume.
        let resumed: Vec<Tid> = fake.resumed.iter().map(|r| r.0).collect();
        assert_eq!(resumed, [100, 101, 100, 101]);
        // Another park after the recording ended is refused.
        assert!(matches!(
            control.call(Command::Park { epoch: 5 }, std::time::Duration::from_secs(1)),
            Reply::Error(e) if e.contains("ended")
        ));
    }

    #[test]
    fn a_thread_in_a_syscall_parks_after_its_exit_stop() {
        let (tx, control, rec) = threaded(vec![100], |f| {
            f.infos
                .extend([seccomp(0, [3, 0x1000, 8, 0, 0, 0]), exit(-512)]);
        });
        tx.send(Some((100, STOP()))).expect("feed");
        // In a read when the park starts: the read is interrupted, then the thread stops.
        tx.send(Some((100, stopped(libc::SIGTRAP, ptrace::EVENT_SECCOMP))))
            .expect("feed");
        let parked = call(&tx, &control, Command::Park { epoch: 1 });
        tx.send(Some((100, stopped(libc::SIGTRAP | 0x80, 0))))
            .expect("feed");
        tx.send(Some((100, STOP()))).expect("feed");
        let reply = parked.join().expect("call");
        assert!(matches!(reply, Reply::Parked(_)), "{reply:?}");
        assert_eq!(
            control.call(Command::Resume, std::time::Duration::from_secs(10)),
            Reply::Resumed { threads: 1 }
        );
        tx.send(Some((100, 0))).expect("feed");
        drop(tx);
        let (r, _, sink) = rec.join().expect("recorder");
        r.expect("run");
        // The interrupted read is recorded before the cut, as the restart code.
        let (_, before) = sink.cuts[0];
        assert!(matches!(&sink.events[before - 1], Event::Syscall(s) if s.ret == Some(-512)));
    }

    #[test]
    fn a_job_stopped_process_is_not_parked() {
        let (tx, control, rec) = threaded(vec![100], |_| {});
        tx.send(Some((100, STOP()))).expect("feed");
        tx.send(Some((100, stopped(libc::SIGSTOP, ptrace::EVENT_STOP))))
            .expect("feed");
        let parked = call(&tx, &control, Command::Park { epoch: 1 });
        match parked.join().expect("call") {
            Reply::Error(e) => assert!(e.contains("job-control stop"), "{e}"),
            other => panic!("parked a stopped process: {other:?}"),
        }
        tx.send(Some((100, 0))).expect("feed");
        drop(tx);
        let (r, fake, sink) = rec.join().expect("recorder");
        r.expect("run");
        assert!(sink.cuts.is_empty());
        assert!(!fake.ops.iter().any(|o| o.starts_with("freeze")));
    }

    #[test]
    fn a_thread_that_cannot_be_seized_again_ends_the_recording_and_the_container() {
        let (tx, control, rec) = threaded(vec![100], |f| f.unseizable.push(100));
        tx.send(Some((100, STOP()))).expect("feed");
        let parked = call(&tx, &control, Command::Park { epoch: 1 });
        tx.send(Some((100, STOP()))).expect("feed");
        assert!(matches!(parked.join().expect("call"), Reply::Parked(_)));
        match control.call(Command::Resume, std::time::Duration::from_secs(10)) {
            Reply::Error(e) => assert!(e.contains("cannot be traced again"), "{e}"),
            other => panic!("resumed: {other:?}"),
        }
        drop(tx);
        let (r, fake, _) = rec.join().expect("recorder");
        assert!(r.is_err());
        // Thawed so that the kill takes effect.
        assert!(fake.ops.iter().any(|o| o == "thaw 100"));
    }
}
