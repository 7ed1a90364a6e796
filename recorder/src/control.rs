//! Commands for a running recorder: park the container for a checkpoint, and resume it.
//!
//! The shim drives checkpoints (see `docs/hybrid-mode.md`); the recorder must step aside for
//! each, because CRIU seizes the tasks with ptrace and a task has one tracer. The commands
//! arrive on another thread than the tracing one (ptrace ties tracees to the thread that seized
//! them), so [`Control`] hands them over:
//!
//! * the caller ([`Control::call`], the recorder's control thread serving the shim's socket)
//!   posts a command, then wakes the tracing thread with a signal (`SIGUSR1`, whose handler does
//!   nothing, installed without `SA_RESTART`) so that its `waitpid` returns `EINTR`, and repeats
//!   the wake-up every few milliseconds until the answer comes (a wake-up that lands just before
//!   the tracing thread blocks is not lost, and a park's deadline gets checked);
//! * the tracing thread takes the command between two stops ([`Control::take`]), or blocks for
//!   one while it is detached ([`Control::wait_command`]), and answers ([`Control::answer`]).
//!
//! The wire form the shim speaks ([`Command::parse`], [`Reply::line`]) is one line each way:
//!
//! ```text
//! park EPOCH            ->  parked SEQ OFFSET      (the cut: first sequence number after it,
//!                                                   byte offset of its segment's header)
//! resume                ->  resumed THREADS
//! (either)              ->  error TEXT
//! ```

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::event::Cut;

/// How often a waiting caller wakes the tracing thread.
const KICK: Duration = Duration::from_millis(5);

/// A command for the recorder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Stop every thread, cut the log for checkpoint `epoch`, hold ingress, freeze the cgroup,
    /// detach.
    Park {
        /// The checkpoint's epoch (the new segment's).
        epoch: u64,
    },
    /// Re-seize every thread, thaw, let ingress in again.
    Resume,
}

impl Command {
    /// Parses a command line (without its newline).
    pub fn parse(line: &str) -> Result<Command, String> {
        let mut w = line.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("park"), Some(e), None) => e
                .parse()
                .map(|epoch| Command::Park { epoch })
                .map_err(|_| format!("park needs an epoch number, got {e:?}")),
            (Some("resume"), None, None) => Ok(Command::Resume),
            _ => Err(format!(
                "unknown command {line:?} (expected \"park EPOCH\" or \"resume\")"
            )),
        }
    }

    /// The command's line (without its newline).
    pub fn line(&self) -> String {
        match self {
            Command::Park { epoch } => format!("park {epoch}"),
            Command::Resume => "resume".into(),
        }
    }
}

/// The recorder's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Every thread is parked, the cgroup frozen, the tracer detached: the log is cut here.
    Parked(Cut),
    /// Every thread is traced again and the cgroup thawed.
    Resumed {
        /// Threads re-seized.
        threads: usize,
    },
    /// The command failed; the container is running and traced (or, if that was impossible,
    /// the recording ended and the recorder exits).
    Error(String),
}

impl Reply {
    /// The reply's line (without its newline).
    pub fn line(&self) -> String {
        match self {
            Reply::Parked(c) => format!("parked {} {}", c.seq, c.offset),
            Reply::Resumed { threads } => format!("resumed {threads}"),
            Reply::Error(e) => format!("error {}", e.replace('\n', " ")),
        }
    }

    /// Parses a reply line.
    pub fn parse(line: &str) -> Result<Reply, String> {
        let line = line.trim_end();
        if let Some(e) = line.strip_prefix("error ") {
            return Ok(Reply::Error(e.to_string()));
        }
        let mut w = line.split_whitespace();
        let num = |v: Option<&str>| -> Result<u64, String> {
            v.and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("malformed reply {line:?}"))
        };
        match w.next() {
            Some("parked") => {
                let seq = num(w.next())?;
                let offset = num(w.next())?;
                Ok(Reply::Parked(Cut { seq, offset }))
            }
            Some("resumed") => Ok(Reply::Resumed {
                threads: usize::try_from(num(w.next())?).unwrap_or(usize::MAX),
            }),
            _ => Err(format!("malformed reply {line:?}")),
        }
    }
}

#[derive(Default)]
struct Slots {
    command: Option<Command>,
    reply: Option<Reply>,
}

/// The hand-over between a control thread and the tracing thread (see the module docs).
#[derive(Default)]
pub struct Control {
    slots: Mutex<Slots>,
    changed: Condvar,
    posted: AtomicBool,
    closed: AtomicBool,
    ended: AtomicBool,
    tracer: AtomicI32,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("posted", &self.posted.load(Ordering::SeqCst))
            .field("closed", &self.closed.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

extern "C" fn wake(_: libc::c_int) {}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

impl Control {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the calling thread the one [`Control::call`] wakes, and installs the wake-up
    /// signal's handler (without `SA_RESTART`, so a blocked `waitpid` returns `EINTR`).
    pub fn bind_current_thread(&self) {
        // SAFETY: a zeroed sigaction with a handler that does nothing is valid; the handler is
        // async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = wake as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = 0;
            libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        }
        self.tracer.store(gettid(), Ordering::SeqCst);
    }

    /// Tracing thread: the posted command, if any (cheap when there is none).
    pub fn take(&self) -> Option<Command> {
        if !self.posted.swap(false, Ordering::SeqCst) {
            return None;
        }
        self.slots().command.take()
    }

    /// Tracing thread: whether the caller went away (no more commands will come).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Tracing thread: blocks until a command is posted; `None` once the control is closed.
    /// (It waits without a timeout: a timed wait would read the clock through the vDSO, which
    /// the tracing thread must not do.)
    pub fn wait_command(&self) -> Option<Command> {
        let mut s = self.slots();
        loop {
            if let Some(c) = s.command.take() {
                self.posted.store(false, Ordering::SeqCst);
                return Some(c);
            }
            if self.is_closed() {
                return None;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Tracing thread: answers the command taken last.
    pub fn answer(&self, reply: Reply) {
        self.slots().reply = Some(reply);
        self.changed.notify_all();
    }

    /// Tracing thread: the recording is over; commands are refused from now on.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
        self.tracer.store(0, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Caller: posts `cmd` and waits for the answer, waking the tracing thread until it comes.
    /// Gives up after `timeout` (the recorder is stuck or gone).
    pub fn call(&self, cmd: Command, timeout: Duration) -> Reply {
        let ended = || Reply::Error("the recording has ended".into());
        if self.ended.load(Ordering::SeqCst) {
            return ended();
        }
        {
            let mut s = self.slots();
            s.reply = None;
            s.command = Some(cmd);
        }
        self.posted.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        let rounds = (timeout.as_millis() / KICK.as_millis()).max(1);
        for _ in 0..rounds {
            let tid = self.tracer.load(Ordering::SeqCst);
            if tid > 0 {
                // SAFETY: tgkill to a thread of this process with a signal whose handler does
                // nothing.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1);
                }
            }
            let s = self.slots();
            let (mut s, _) = self
                .changed
                .wait_timeout_while(s, KICK, |s| s.reply.is_none())
                .unwrap_or_else(|e| e.into_inner());
            if let Some(r) = s.reply.take() {
                return r;
            }
            if self.ended.load(Ordering::SeqCst) {
                return ended();
            }
        }
        // Withdraw the command if it was never taken.
        let mut s = self.slots();
        s.command = None;
        Reply::Error(format!(
            "the recorder did not answer {:?} within {timeout:?}",
            cmd.line()
        ))
    }

    /// Caller: no more commands (the shim went away). A detached recorder resumes the
    /// container on its own.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_all();
        let tid = self.tracer.load(Ordering::SeqCst);
        if tid > 0 {
            // SAFETY: as in `call`.
            unsafe {
                libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lines_round_trip_and_bad_ones_are_refused() {
        for c in [Command::Park { epoch: 7 }, Command::Resume] {
            assert_eq!(Command::parse(&c.line()), Ok(c));
        }
        assert!(Command::parse("park").is_err());
        assert!(Command::parse("park x").is_err());
        assert!(Command::parse("dance").is_err());
        for r in [
            Reply::Parked(Cut {
                seq: 12,
                offset: 3456,
            }),
            Reply::Resumed { threads: 3 },
            Reply::Error("no such thing".into()),
        ] {
            assert_eq!(Reply::parse(&r.line()), Ok(r));
        }
        assert_eq!(
            Reply::parse(&Reply::Error("two\nlines".into()).line()),
            Ok(Reply::Error("two lines".into()))
        );
        assert!(Reply::parse("parked 1").is_err());
        assert!(Reply::parse("hello").is_err());
    }

    #[test]
    fn a_command_is_handed_over_and_answered() {
        let c = Arc::new(Control::default());
        let t = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.bind_current_thread();
                let cmd = c.wait_command();
                c.answer(Reply::Resumed { threads: 1 });
                cmd
            })
        };
        let reply = c.call(Command::Resume, Duration::from_secs(5));
        assert_eq!(reply, Reply::Resumed { threads: 1 });
        assert_eq!(t.join().expect("thread"), Some(Command::Resume));
        // Nobody answers: the call gives up and says so.
        let reply = c.call(Command::Park { epoch: 1 }, Duration::from_millis(20));
        assert!(matches!(reply, Reply::Error(e) if e.contains("did not answer")));
        c.close();
        assert_eq!(c.wait_command(), None);
    }
}
