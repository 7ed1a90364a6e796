//! The replay engine: drives the traced threads of a process tree through a [`Plan`].
//!
//! The tracees run under the same seccomp filter as when they were recorded, so every
//! recorded system call stops in the replayer (`SECCOMP_RET_TRACE`). At each stop the engine
//! looks at the thread's next record; the record's turn is its sequence number, and nothing
//! happens before every earlier record of the container has been replayed (the recorded
//! container-wide order, across threads and processes). Then:
//!
//! | the thread stops at | its next record | what the replayer does |
//! |---|---|---|
//! | an input, time or randomness syscall | its result | **injects** it: the syscall is skipped (its number set to -1), every recorded byte is written into the thread's memory, and the return value set |
//! | a clock read through the patched vDSO | a `Time` record | injects the value (`timespec`, `timeval`, or the return of `time`) |
//! | `futex`, `futex_waitv` | the entry's order record | runs it for real at its turn; its exit waits for the exit record's turn, and the recorded return value is forced |
//! | another ordering or lifecycle syscall (`clone`, `execve`, `exit`, `wait4`, `sched_yield`, ...) | its record | runs it for real at its turn; a creation maps the new thread to the recorded one, an `execve` is checked against the recorded path and the new image's vDSO is patched; the exit record is checked (return value) |
//! | `rdtsc`/`rdtscp` (trapped with `PR_SET_TSC`) | a `Time` record | emulates it with the recorded value |
//! | a signal | the same `Signal` record | delivers it |
//!
//! Records of no thread (ingress packets, gap and unrecordable reports) are taken in their
//! turn. Each thread's recorded interval is enforced as a minimum before its record is applied
//! (the data-race mitigation): if it got there sooner than when recorded, it waits.
//!
//! Anything else is a **divergence**: the thread made another syscall (or got another signal,
//! or ended) than the log says. It is reported with where and what, and replay stops: every
//! traced process is killed, because a diverged execution cannot be trusted to be the one the
//! clients saw (policy: a diverged recovery is a failed recovery).
//!
//! Once the last record to replay (`until`, by default the log's last) is applied, the
//! execution is **live**: system calls run for real, clocks and `rdtsc` read the real time,
//! and the engine only keeps the threads traced (their seccomp filter needs a tracer).
//!
//! Not yet: processes restored from a checkpoint (this engine starts from a fresh process at
//! its first record), descriptors created by a replayed `accept`/`socket` (their calls are
//! injected, so no real descriptor exists), signals that came from outside the container,
//! TCP state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use rrc_eventlog::{Event, EventRecord, Thread, Time};
use rrc_recorder::event::Tid;
use rrc_recorder::ptrace::{self, is_gone, Resume, Stop, SyscallInfo, Tracer};
use rrc_recorder::syscalls::{self, Class};
use rrc_recorder::vdso;

use crate::plan::{is_passive, Plan};

/// How long a replay may go without applying a record before it is declared stalled.
pub const STALL: Duration = Duration::from_secs(5);
/// How often the replaying thread's wait is interrupted to check for a stall.
const KICK: Duration = Duration::from_millis(500);

extern "C" fn wake(_: libc::c_int) {}

/// Interrupts the calling thread's `waitpid` every [`KICK`] (`SIGUSR1`, a handler that does
/// nothing, installed without `SA_RESTART`) while it lives, so a replay can notice it stalled.
struct Kicker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kicker {
    fn start() -> Kicker {
        use std::sync::atomic::{AtomicBool, Ordering};
        // SAFETY: a zeroed sigaction with a handler that does nothing is valid; the handler is
        // async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = wake as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
        // SAFETY: gettid has no arguments and cannot fail.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("rrc-replay-kick".into())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    // Parked, not slept: dropping the kicker wakes it at once.
                    std::thread::park_timeout(KICK);
                    if !s.load(Ordering::SeqCst) {
                        // SAFETY: tgkill to a thread of this process with a signal whose
                        // handler does nothing.
                        unsafe {
                            libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1);
                        }
                    }
                }
            })
            .ok();
        Kicker { stop, thread }
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// `rt_sigreturn`: returns the interrupted context's value, not a result of its own.
const RT_SIGRETURN: u64 = 15;

/// The longest a single interval is enforced (an interval that long is a pause, not a race).
pub const MAX_INTERVAL_WAIT: Duration = Duration::from_millis(200);

/// Where replay and recording parted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    /// The record the replay was at.
    pub seq: u64,
    /// The thread (as the log names it).
    pub thread: Thread,
    /// What the log says comes next for that thread.
    pub expected: String,
    /// What the thread did instead.
    pub found: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replay diverged at record #{} of thread {}: the log has {}, the thread {}",
            self.seq, self.thread, self.expected, self.found
        )
    }
}

/// Errors that end a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The replayed execution is not the recorded one.
    #[error("{0}")]
    Diverged(Divergence),
    /// A ptrace or wait operation failed.
    #[error("{what} (thread {tid}): {err}")]
    Trace {
        /// The operation.
        what: &'static str,
        /// The thread.
        tid: Tid,
        /// Why.
        err: io::Error,
    },
    /// The plan cannot start on this process.
    #[error("cannot start replay: {0}")]
    Start(String),
}

/// What a replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Records applied, by kind.
    pub applied: BTreeMap<&'static str, u64>,
    /// Syscalls whose recorded result was injected (not run).
    pub injected: u64,
    /// Syscalls run for real at their turn.
    pub executed: u64,
    /// Total time threads were held back to respect recorded intervals.
    pub interval_wait: Duration,
    /// The record after which execution went live (`None`: it never did).
    pub live_after: Option<u64>,
    /// How the first process's main thread ended.
    pub root_exit: Option<i32>,
}

/// Where a stopped thread is.
#[derive(Clone, Copy, Debug)]
enum At {
    /// At a seccomp stop: the syscall has not run.
    Entry(SyscallInfo),
    /// At the exit stop of a syscall that ran for real (its number).
    Exit(u64),
    /// At a signal-delivery stop.
    Signal(i32),
}

#[derive(Debug, Default)]
struct ThreadState {
    /// The log's name for it.
    log: Option<Thread>,
    /// Its process (host pid).
    tgid: Tid,
    /// When the replayer last let it run after one of its records.
    last: Option<Instant>,
    /// The syscall it runs for real, whose exit record is taken at its exit stop.
    running: Option<u64>,
}

/// The replayer. `T` does the tracing (the recorder's [`ptrace::Ptrace`], or a test double).
pub struct Replayer<T: Tracer> {
    tracer: T,
    plan: Plan,
    next: u64,
    until: u64,
    threads: HashMap<Tid, ThreadState>,
    by_log: HashMap<Thread, Tid>,
    /// Threads stopped, waiting for their record's turn.
    waiting: BTreeMap<Tid, At>,
    /// New threads stopped before their creation was replayed.
    unmapped: HashSet<Tid>,
    /// Threads ended, their exit record not yet taken.
    exited: HashSet<Thread>,
    /// Ended threads' host ids, by their names in the log (a parent's wait4 names them).
    reaped: HashMap<Thread, Tid>,
    live: bool,
    root: Option<Tid>,
    summary: ReplaySummary,
    /// When a record was last applied.
    progress_at: Instant,
}

impl<T: Tracer> fmt::Debug for Replayer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replayer")
            .field("next", &self.next)
            .field("until", &self.until)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

/// The outcome of ptrace operation `what` on `tid`: `None` when the thread vanished meanwhile
/// (its exit report follows).
fn traced<V>(r: io::Result<V>, what: &'static str, tid: Tid) -> Result<Option<V>, ReplayError> {
    ptrace::unless_gone(r).map_err(|err| ReplayError::Trace { what, tid, err })
}

impl<T: Tracer> Replayer<T> {
    /// A replayer of `plan` up to and including record `until` (`None`: all of it).
    pub fn new(tracer: T, plan: Plan, until: Option<u64>) -> Self {
        let next = plan.start.base_seq;
        let until = until.unwrap_or(plan.last_seq()).min(plan.last_seq());
        Replayer {
            tracer,
            plan,
            next,
            until,
            threads: HashMap::new(),
            by_log: HashMap::new(),
            waiting: BTreeMap::new(),
            unmapped: HashSet::new(),
            exited: HashSet::new(),
            reaped: HashMap::new(),
            live: false,
            root: None,
            summary: ReplaySummary::default(),
            progress_at: Instant::now(),
        }
    }

    /// What it did so far.
    pub fn summary(&self) -> &ReplaySummary {
        &self.summary
    }

    /// Attaches to `pid`, a single-threaded process stopped in SIGSTOP before the first
    /// recorded instruction (the launcher's child, as when it was recorded): it becomes the
    /// segment's one live thread, and is continued as the recorder continued it.
    pub fn attach(&mut self, pid: Tid) -> Result<(), ReplayError> {
        let [first] = self.plan.start.live.as_slice() else {
            return Err(ReplayError::Start(format!(
                "the segment starts with {} live threads; a fresh process has one",
                self.plan.start.live.len()
            )));
        };
        let first = *first;
        let seize = |t: &mut T| {
            t.seize(pid, ptrace::OPTIONS)
                .and_then(|()| t.interrupt(pid))
        };
        seize(&mut self.tracer).map_err(|err| ReplayError::Trace {
            what: "PTRACE_SEIZE",
            tid: pid,
            err,
        })?;
        // Its attach stop, then SIGCONT as the recorder sent it (logged as a signal).
        loop {
            match self.tracer.wait() {
                Ok(Some((tid, _))) if tid == pid => break,
                Ok(Some(_)) => continue,
                Ok(None) => return Err(ReplayError::Start(format!("process {pid} is gone"))),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    return Err(ReplayError::Trace {
                        what: "waitpid",
                        tid: pid,
                        err,
                    })
                }
            }
        }
        self.threads.insert(
            pid,
            ThreadState {
                log: Some(first),
                tgid: pid,
                ..ThreadState::default()
            },
        );
        self.by_log.insert(first, pid);
        self.root = Some(pid);
        let _ = self.tracer.kill(pid, libc::SIGCONT);
        traced(self.tracer.resume(pid, Resume::Cont, 0), "resume", pid)?;
        Ok(())
    }

    /// Replays until every traced thread has ended.
    pub fn run(&mut self) -> Result<ReplaySummary, ReplayError> {
        let _kick = Kicker::start();
        self.progress_at = Instant::now();
        self.advance()?;
        loop {
            let (tid, status) = match self.tracer.wait() {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if let Some(e) = self.stalled() {
                        self.kill_all();
                        return Err(e);
                    }
                    continue;
                }
                Err(err) => {
                    return Err(ReplayError::Trace {
                        what: "waitpid",
                        tid: -1,
                        err,
                    })
                }
            };
            if let Err(e) = self.on_stop(tid, status).and_then(|()| self.advance()) {
                if matches!(e, ReplayError::Diverged(_)) {
                    self.kill_all();
                }
                return Err(e);
            }
        }
        Ok(self.summary.clone())
    }

    /// A replay that applied no record for [`STALL`]: the thread whose record is next never
    /// got there (blocked for real, waiting for something the recorded order has not let
    /// happen yet: a user-space race took another course). A divergence.
    fn stalled(&self) -> Option<ReplayError> {
        if self.live || self.progress_at.elapsed() < STALL {
            return None;
        }
        let rec = self.plan.record(self.next)?;
        let waiting: Vec<String> = self
            .waiting
            .iter()
            .map(|(t, at)| {
                let name = self
                    .threads
                    .get(t)
                    .and_then(|s| s.log)
                    .map_or(t.to_string(), |l| l.to_string());
                format!("{name} {}", describe(*at))
            })
            .collect();
        Some(ReplayError::Diverged(Divergence {
            seq: self.next,
            thread: rec.thread,
            expected: describe_record(rec),
            found: format!(
                "did not get there within {STALL:?} (stopped, waiting for their turn: {})",
                if waiting.is_empty() {
                    "none".to_string()
                } else {
                    waiting.join("; ")
                }
            ),
        }))
    }

    /// Kills every traced process (a diverged replay must not go on).
    fn kill_all(&mut self) {
        let mut tgids: Vec<Tid> = self.threads.values().map(|t| t.tgid).collect();
        tgids.sort_unstable();
        tgids.dedup();
        for tgid in tgids {
            let _ = self.tracer.kill(tgid, libc::SIGKILL);
        }
        // Reap them, so nothing is left behind.
        while let Ok(Some(_)) = self.tracer.wait() {}
    }

    fn diverged(&self, tid: Tid, expected: String, found: String) -> ReplayError {
        let thread = self
            .threads
            .get(&tid)
            .and_then(|t| t.log)
            .unwrap_or(Thread::new(0, tid.max(0) as u32));
        ReplayError::Diverged(Divergence {
            seq: self.next,
            thread,
            expected,
            found,
        })
    }

    fn on_stop(&mut self, tid: Tid, status: i32) -> Result<(), ReplayError> {
        let stop = Stop::decode(status);
        if let Stop::Exited(_) | Stop::Killed(_) = stop {
            let code = match stop {
                Stop::Exited(c) => c,
                Stop::Killed(s) => 128 + s,
                _ => 0,
            };
            if self.root == Some(tid) {
                self.summary.root_exit = Some(code);
            }
            self.waiting.remove(&tid);
            self.unmapped.remove(&tid);
            if let Some(t) = self.threads.remove(&tid) {
                if let Some(log) = t.log {
                    self.by_log.remove(&log);
                    self.reaped.insert(log, tid);
                    if !self.live {
                        self.exited.insert(log);
                    }
                }
            }
            return Ok(());
        }
        if !self.threads.contains_key(&tid) {
            // A new thread whose creation is not replayed yet: it waits.
            self.unmapped.insert(tid);
            return Ok(());
        }
        match stop {
            Stop::Event {
                event: ptrace::EVENT_SECCOMP,
                ..
            } => {
                let Some(info) = traced(
                    self.tracer.syscall_info(tid),
                    "PTRACE_GET_SYSCALL_INFO",
                    tid,
                )?
                else {
                    return Ok(());
                };
                self.stopped(tid, At::Entry(info))
            }
            Stop::Syscall => {
                let running = self.threads.get_mut(&tid).and_then(|t| t.running.take());
                match running {
                    Some(nr) if !self.live => self.stopped(tid, At::Exit(nr)),
                    _ => self.resume(tid, Resume::Cont, 0),
                }
            }
            Stop::Event {
                event: ev @ (ptrace::EVENT_CLONE | ptrace::EVENT_FORK | ptrace::EVENT_VFORK),
                ..
            } => self.on_create(tid, ev),
            Stop::Event {
                event: ptrace::EVENT_EXEC,
                ..
            } => self.on_exec(tid),
            Stop::Event { .. } | Stop::Other(_) => self.resume(tid, Resume::Cont, 0),
            Stop::Signal(sig) => self.stopped(tid, At::Signal(sig)),
            Stop::Exited(_) | Stop::Killed(_) => Ok(()),
        }
    }

    fn stopped(&mut self, tid: Tid, at: At) -> Result<(), ReplayError> {
        if self.live {
            return self.run_live(tid, at);
        }
        self.waiting.insert(tid, at);
        Ok(())
    }

    fn resume(&mut self, tid: Tid, how: Resume, sig: i32) -> Result<(), ReplayError> {
        traced(self.tracer.resume(tid, how, sig), "resume", tid)?;
        Ok(())
    }

    /// Applies every record whose turn has come and whose thread is there.
    fn advance(&mut self) -> Result<(), ReplayError> {
        while !self.live {
            if self.next > self.until {
                return self.go_live();
            }
            let Some(rec) = self.plan.record(self.next).cloned() else {
                // A hole in the numbering cannot happen in a decoded plan; treat as the end.
                return self.go_live();
            };
            if is_passive(&rec.event) {
                self.took(&rec);
                continue;
            }
            if let Event::ThreadExit { .. } = rec.event {
                if self.exited.remove(&rec.thread) {
                    self.plan.take(rec.thread, rec.seq);
                    self.took(&rec);
                    continue;
                }
                if let Some(&tid) = self.by_log.get(&rec.thread) {
                    if let Some(at) = self.waiting.get(&tid).copied() {
                        return Err(self.diverged(tid, "its end".into(), describe(at)));
                    }
                }
                return Ok(());
            }
            let Some(&tid) = self.by_log.get(&rec.thread) else {
                return Ok(());
            };
            let Some(at) = self.waiting.get(&tid).copied() else {
                return Ok(());
            };
            if self.plan.next_of(rec.thread) != Some(rec.seq) {
                return Err(self.diverged(
                    tid,
                    format!("record #{} next", rec.seq),
                    "is out of step with its own records".into(),
                ));
            }
            self.wait_interval(tid, &rec);
            self.waiting.remove(&tid);
            self.apply(tid, at, &rec)?;
        }
        Ok(())
    }

    fn took(&mut self, rec: &EventRecord) {
        self.progress_at = Instant::now();
        *self
            .summary
            .applied
            .entry(rec.event.kind_name())
            .or_default() += 1;
        self.next = rec.seq + 1;
    }

    /// Holds the thread back until its recorded interval has passed since it last ran.
    fn wait_interval(&mut self, tid: Tid, rec: &EventRecord) {
        let Some(last) = self.threads.get(&tid).and_then(|t| t.last) else {
            return;
        };
        let want = Duration::from_nanos(rec.interval_ns).min(MAX_INTERVAL_WAIT);
        let ran = last.elapsed();
        if ran < want {
            std::thread::sleep(want - ran);
            self.summary.interval_wait += want - ran;
        }
    }

    fn ran(&mut self, tid: Tid) {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.last = Some(Instant::now());
        }
    }

    /// Applies `rec`, the turn of thread `tid` stopped at `at`.
    fn apply(&mut self, tid: Tid, at: At, rec: &EventRecord) -> Result<(), ReplayError> {
        let expected = describe_record(rec);
        match (at, &rec.event) {
            (
                At::Entry(info),
                Event::SyscallResult {
                    nr, ret, writes, ..
                },
            ) if *nr == info.nr => {
                let class = syscalls::by_nr(*nr).map(|s| s.class);
                if matches!(class, Some(Class::Input | Class::Time | Class::Random)) {
                    for w in writes {
                        traced(
                            self.tracer.write_mem(tid, w.addr, &w.bytes),
                            "writing memory",
                            tid,
                        )?;
                    }
                    self.inject(tid, *ret)?;
                    self.summary.injected += 1;
                    self.plan.take(rec.thread, rec.seq);
                    self.took(rec);
                    self.ran(tid);
                    return self.resume(tid, Resume::Cont, 0);
                }
                // Run for real; its record is taken at the exit stop, at its turn.
                self.run_for_real(tid, info.nr)
            }
            (At::Entry(info), Event::Time(t)) => {
                self.inject_time(tid, &info, t)?;
                self.summary.injected += 1;
                self.plan.take(rec.thread, rec.seq);
                self.took(rec);
                self.ran(tid);
                self.resume(tid, Resume::Cont, 0)
            }
            (At::Entry(info), Event::SyncOrder { nr, .. }) if *nr == info.nr => {
                let sc = syscalls::by_nr(*nr);
                if syscalls::records_entry(*nr) || sc.is_some_and(|s| s.no_return) {
                    // The entry's record: taken now, the call runs at its turn.
                    self.plan.take(rec.thread, rec.seq);
                    self.took(rec);
                    self.ran(tid);
                    self.summary.executed += 1;
                    if sc.is_some_and(|s| s.no_return) {
                        return self.resume(tid, Resume::Cont, 0);
                    }
                    return self.run_for_real(tid, info.nr);
                }
                self.run_for_real(tid, info.nr)
            }
            (At::Entry(info), Event::ThreadCreate { .. } | Event::ProcessFork { .. })
                if is_creation(info.nr) =>
            {
                // The record is taken at the creation event, inside the call.
                self.run_for_real(tid, info.nr)
            }
            (At::Entry(info), Event::Exec { .. }) if is_exec(info.nr) => {
                self.run_for_real(tid, info.nr)
            }
            (At::Exit(nr), Event::SyscallResult { nr: rnr, ret, .. })
            | (At::Exit(nr), Event::SyncOrder { nr: rnr, ret, .. })
                if *rnr == nr =>
            {
                let real =
                    traced(self.tracer.regs(tid), "PTRACE_GETREGS", tid)?.map(|r| r.rax as i64);
                let nr = *rnr;
                if syscalls::records_entry(nr) || nr == 24 {
                    // futex, sched_yield: the recorded result is forced.
                    self.inject_exit(tid, *ret)?;
                } else if !is_creation(nr)
                    && !is_exec(nr)
                    && nr != RT_SIGRETURN
                    && real.is_some_and(|r| r != *ret && !self.same_pid(nr, r, *ret))
                {
                    return Err(self.diverged(
                        tid,
                        expected,
                        format!("returned {} from it", real.unwrap_or(0)),
                    ));
                }
                self.plan.take(rec.thread, rec.seq);
                self.took(rec);
                self.summary.executed += u64::from(!syscalls::records_entry(nr));
                self.ran(tid);
                self.resume(tid, Resume::Cont, 0)
            }
            (At::Signal(sig), Event::Time(t @ (Time::Rdtsc { .. } | Time::Rdtscp { .. })))
                if sig == libc::SIGSEGV =>
            {
                if !self.emulate_rdtsc(tid, Some(*t))? {
                    return Err(self.diverged(tid, expected, "faulted (SIGSEGV) elsewhere".into()));
                }
                self.summary.injected += 1;
                self.plan.take(rec.thread, rec.seq);
                self.took(rec);
                self.ran(tid);
                self.resume(tid, Resume::Cont, 0)
            }
            (At::Signal(sig), Event::Signal { signo, .. }) if sig == *signo as i32 => {
                self.plan.take(rec.thread, rec.seq);
                self.took(rec);
                self.resume(tid, Resume::Cont, sig)
            }
            (at, _) => Err(self.diverged(tid, expected, describe(at))),
        }
    }

    /// Whether `real`, returned by wait4/waitid, is the process the log names `recorded`
    /// (ids differ between recording and replay unless a pid namespace was restored).
    fn same_pid(&self, nr: u64, real: i64, recorded: i64) -> bool {
        const WAIT4: u64 = 61;
        const WAITID: u64 = 247;
        if nr != WAIT4 && nr != WAITID || recorded <= 0 {
            return false;
        }
        let log = Thread::main(u32::try_from(recorded).unwrap_or(0));
        self.by_log.get(&log).is_some_and(|&t| i64::from(t) == real)
            || self.reaped.get(&log).is_some_and(|&t| i64::from(t) == real)
    }

    /// Lets syscall `nr` run for real; its exit stops again (for its exit record).
    fn run_for_real(&mut self, tid: Tid, nr: u64) -> Result<(), ReplayError> {
        if let Some(t) = self.threads.get_mut(&tid) {
            t.running = Some(nr);
        }
        self.resume(tid, Resume::Syscall, 0)
    }

    /// Skips the syscall at this seccomp stop, returning `ret`.
    fn inject(&mut self, tid: Tid, ret: i64) -> Result<(), ReplayError> {
        let Some(mut regs) = traced(self.tracer.regs(tid), "PTRACE_GETREGS", tid)? else {
            return Ok(());
        };
        regs.orig_rax = u64::MAX;
        regs.rax = ret as u64;
        traced(self.tracer.set_regs(tid, &regs), "PTRACE_SETREGS", tid)?;
        Ok(())
    }

    /// Sets the return value at a syscall-exit stop.
    fn inject_exit(&mut self, tid: Tid, ret: i64) -> Result<(), ReplayError> {
        let Some(mut regs) = traced(self.tracer.regs(tid), "PTRACE_GETREGS", tid)? else {
            return Ok(());
        };
        regs.rax = ret as u64;
        traced(self.tracer.set_regs(tid, &regs), "PTRACE_SETREGS", tid)?;
        Ok(())
    }

    fn inject_time(&mut self, tid: Tid, info: &SyscallInfo, t: &Time) -> Result<(), ReplayError> {
        let (bytes, at, ret): (Vec<u8>, u64, i64) = match (info.nr as u32, t) {
            (syscalls::nr::CLOCK_GETTIME, Time::ClockGettime { sec, nsec, .. }) => (
                [sec.to_ne_bytes(), nsec.to_ne_bytes()].concat(),
                info.args[1],
                0,
            ),
            (syscalls::nr::GETTIMEOFDAY, Time::Gettimeofday { sec, usec }) => (
                [sec.to_ne_bytes(), usec.to_ne_bytes()].concat(),
                info.args[0],
                0,
            ),
            (syscalls::nr::TIME, Time::Time { sec }) => {
                (sec.to_ne_bytes().to_vec(), info.args[0], *sec)
            }
            _ => {
                return Err(self.diverged(
                    tid,
                    format!("{t:?}"),
                    format!("made {}", syscall_name(info.nr)),
                ))
            }
        };
        if at != 0 {
            traced(
                self.tracer.write_mem(tid, at, &bytes),
                "writing memory",
                tid,
            )?;
        }
        self.inject(tid, ret)
    }

    /// Emulates the `rdtsc`/`rdtscp` the thread faulted on, with `value` (the recorded one) or
    /// the real counter (live). False if the fault was not at such an instruction.
    fn emulate_rdtsc(&mut self, tid: Tid, value: Option<Time>) -> Result<bool, ReplayError> {
        let Some(mut regs) = traced(self.tracer.regs(tid), "PTRACE_GETREGS", tid)? else {
            return Ok(true);
        };
        let code = self.tracer.read_mem(tid, regs.rip, 3).unwrap_or_default();
        let Some((len, is_p)) = ptrace::tsc_instruction(&code) else {
            return Ok(false);
        };
        let (tsc, aux) = match value {
            Some(Time::Rdtsc { tsc }) if !is_p => (tsc, None),
            Some(Time::Rdtscp { tsc, aux }) if is_p => (tsc, Some(aux)),
            Some(_) => return Ok(false),
            None => ptrace::read_tsc_raw(is_p),
        };
        ptrace::set_tsc_result(&mut regs, len, tsc, aux);
        traced(self.tracer.set_regs(tid, &regs), "PTRACE_SETREGS", tid)?;
        Ok(true)
    }

    fn on_create(&mut self, tid: Tid, event: u32) -> Result<(), ReplayError> {
        let Some(child) = traced(self.tracer.event_msg(tid), "PTRACE_GETEVENTMSG", tid)? else {
            return Ok(());
        };
        let child = child as Tid;
        let parent = self.threads.get(&tid).map(|t| (t.log, t.tgid));
        let (log_parent, parent_tgid) = parent.unwrap_or((None, tid));
        if self.live {
            let tgid = if event == ptrace::EVENT_CLONE
                && self
                    .tracer
                    .status(child)
                    .is_ok_and(|s| s.tgid == parent_tgid)
            {
                parent_tgid
            } else {
                child
            };
            self.threads.insert(
                child,
                ThreadState {
                    tgid,
                    ..ThreadState::default()
                },
            );
            if self.unmapped.remove(&child) {
                self.resume(child, Resume::Cont, 0)?;
            }
            return self.resume(tid, Resume::Syscall, 0);
        }
        let Some(log_parent) = log_parent else {
            return self.resume(tid, Resume::Syscall, 0);
        };
        let Some(seq) = self.plan.next_of(log_parent) else {
            return Err(self.diverged(tid, "nothing more".into(), "created a thread".into()));
        };
        let rec = self.plan.record(seq).cloned();
        let (log_child, tgid) = match rec.as_ref().map(|r| &r.event) {
            Some(Event::ThreadCreate { child_tid, .. }) => {
                (Thread::new(log_parent.tgid, *child_tid), parent_tgid)
            }
            Some(Event::ProcessFork { child_pid, .. }) => (Thread::main(*child_pid), child),
            _ => {
                let expected = rec.as_ref().map(describe_record).unwrap_or_default();
                return Err(self.diverged(tid, expected, "created a thread".into()));
            }
        };
        if let Some(rec) = rec {
            self.plan.take(log_parent, seq);
            self.took(&rec);
        }
        self.threads.insert(
            child,
            ThreadState {
                log: Some(log_child),
                tgid,
                last: Some(Instant::now()),
                running: None,
            },
        );
        self.by_log.insert(log_child, child);
        if self.unmapped.remove(&child) {
            self.resume(child, Resume::Cont, 0)?;
        }
        self.resume(tid, Resume::Syscall, 0)
    }

    fn on_exec(&mut self, tid: Tid) -> Result<(), ReplayError> {
        let Some(former) = traced(self.tracer.event_msg(tid), "PTRACE_GETEVENTMSG", tid)? else {
            return Ok(());
        };
        let former = former as Tid;
        let state = self.threads.remove(&former);
        // The other threads of the process are gone; it is its main thread now, under the
        // leader's id.
        let tgid = state.as_ref().map(|s| s.tgid).unwrap_or(tid);
        let others: Vec<Tid> = self
            .threads
            .iter()
            .filter(|(_, t)| t.tgid == tgid)
            .map(|(&t, _)| t)
            .collect();
        for t in others {
            if let Some(s) = self.threads.remove(&t) {
                if let Some(l) = s.log {
                    self.by_log.remove(&l);
                }
            }
            self.waiting.remove(&t);
        }
        let log_former = state.as_ref().and_then(|s| s.log);
        if let Some(l) = log_former {
            self.by_log.remove(&l);
        }
        if !self.live {
            let Some(lf) = log_former else {
                return self.resume(tid, Resume::Syscall, 0);
            };
            let seq = self.plan.next_of(lf);
            let rec = seq.and_then(|s| self.plan.record(s)).cloned();
            match rec {
                Some(r) if matches!(r.event, Event::Exec { .. }) => {
                    self.plan.take(lf, r.seq);
                    self.took(&r);
                }
                other => {
                    let expected = other.as_ref().map(describe_record).unwrap_or_default();
                    return Err(self.diverged(former, expected, "exec'd a new program".into()));
                }
            }
            let main = Thread::main(lf.tgid);
            self.by_log.insert(main, tid);
            self.threads.insert(
                tid,
                ThreadState {
                    log: Some(main),
                    tgid: tid,
                    last: Some(Instant::now()),
                    running: state.as_ref().and_then(|s| s.running),
                },
            );
        } else {
            self.threads.insert(
                tid,
                ThreadState {
                    tgid: tid,
                    ..ThreadState::default()
                },
            );
        }
        // The new image's clocks must trap as they did when it was recorded.
        match vdso::patch_process(&mut self.tracer, tid, tid, &[]) {
            Ok(_) => {}
            Err(e) if is_gone(&e) => return Ok(()),
            Err(e) => tracing::warn!(tid, "vDSO not patched after exec: {e}"),
        }
        let how = if self.live {
            Resume::Cont
        } else {
            Resume::Syscall
        };
        self.resume(tid, how, 0)
    }

    /// Every record to replay is applied: from now on everything runs for real.
    fn go_live(&mut self) -> Result<(), ReplayError> {
        self.live = true;
        self.summary.live_after = Some(self.next.saturating_sub(1));
        tracing::info!(after = self.next.saturating_sub(1), "replay done: live");
        for (tid, at) in std::mem::take(&mut self.waiting) {
            self.run_live(tid, at)?;
        }
        for tid in std::mem::take(&mut self.unmapped) {
            self.threads.entry(tid).or_insert(ThreadState {
                tgid: tid,
                ..ThreadState::default()
            });
            self.resume(tid, Resume::Cont, 0)?;
        }
        Ok(())
    }

    fn run_live(&mut self, tid: Tid, at: At) -> Result<(), ReplayError> {
        match at {
            At::Entry(_) | At::Exit(_) => self.resume(tid, Resume::Cont, 0),
            At::Signal(sig) => {
                if sig == libc::SIGSEGV && self.emulate_rdtsc(tid, None)? {
                    return self.resume(tid, Resume::Cont, 0);
                }
                self.resume(tid, Resume::Cont, sig)
            }
        }
    }
}

fn is_creation(nr: u64) -> bool {
    [
        syscalls::nr::CLONE,
        syscalls::nr::CLONE3,
        syscalls::nr::FORK,
        syscalls::nr::VFORK,
    ]
    .contains(&(nr as u32))
}

fn is_exec(nr: u64) -> bool {
    [syscalls::nr::EXECVE, syscalls::nr::EXECVEAT].contains(&(nr as u32))
}

fn syscall_name(nr: u64) -> String {
    syscalls::name_of(nr).map_or_else(|| format!("syscall {nr}"), str::to_string)
}

fn describe(at: At) -> String {
    match at {
        At::Entry(info) => format!("made {}", syscall_name(info.nr)),
        At::Exit(nr) => format!("returned from {}", syscall_name(nr)),
        At::Signal(sig) => format!("got signal {sig}"),
    }
}

fn describe_record(r: &EventRecord) -> String {
    match &r.event {
        Event::SyscallResult { nr, ret, .. } => format!("{} = {ret}", syscall_name(*nr)),
        Event::SyncOrder { nr, .. } => format!("{} (its turn)", syscall_name(*nr)),
        Event::Time(t) => format!("a clock read ({t:?})"),
        Event::ThreadCreate { child_tid, .. } => format!("the creation of thread {child_tid}"),
        Event::ProcessFork { child_pid, .. } => format!("the fork of process {child_pid}"),
        Event::Exec { path } => format!("an exec of {}", String::from_utf8_lossy(path)),
        Event::ThreadExit { status } => format!("its end (status {status:#x})"),
        Event::Signal { signo, .. } => format!("signal {signo}"),
        other => other.kind_name().to_string(),
    }
}
