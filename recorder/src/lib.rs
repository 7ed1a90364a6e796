//! rrc's recorder: records every nondeterministic event of a container's processes, without
//! LD_PRELOAD and without anything in the image, using seccomp `SECCOMP_RET_TRACE` + ptrace.
//!
//! # What it owns, what it must not touch
//!
//! It owns: the list of syscalls rrc traces and why ([`syscalls::TRACED`]), the merge of those
//! rules into a container's OCI seccomp profile ([`profile`]), the tracing of the container's
//! threads from before their first instruction to their exit ([`recorder`]), the patching of
//! their vDSO ([`vdso`]) and the emulation of `rdtsc`. It produces [`event::Event`]s into a
//! [`event::Sink`], normally [`eventlog::EventlogSink`], which maps them onto rrc-eventlog's
//! records ([`eventlog`] documents the mapping and the gaps); the log format itself, its
//! transport and the release of outputs belong to other crates (eventlog, channel,
//! output-hold). It runs as a **process of its own**, never as a
//! thread of the shim: the shim's SIGCHLD reaper calls `waitpid(-1)` and would steal ptrace
//! stops. It never changes the container's results: every traced syscall runs for real.
//!
//! # How it works
//!
//! The shim merges [`profile::merge`]'s rules into the OCI spec; runc installs the filter as
//! the very last step before the entrypoint's exec. The recorder `PTRACE_SEIZE`s every thread
//! of the container's init between `runc create` and `runc start` (options
//! `TRACESECCOMP|TRACECLONE|TRACEFORK|TRACEVFORK|TRACEEXEC|EXITKILL|TRACESYSGOOD`), so every
//! traced syscall stops in the recorder, which lets it run to its exit stop and records the
//! return value and every byte it wrote. Threads and processes created later are attached by
//! the kernel. With no tracer attached, a traced syscall fails with ENOSYS: the recorder must
//! stay attached; `EXITKILL` kills the tracees if the recorder dies, so nothing runs
//! unrecorded.
//!
//! For tests and measurements, [`launch::record_command`] (`rrc-recorder --exec -- CMD`) does
//! what runc does without a container: fork, `PR_SET_NO_NEW_PRIVS`, install a BPF filter
//! written by [`bpf::trace_filter`], SIGSTOP, attach, exec.
//!
//! # The traced syscalls, and why each
//!
//! Input (results depend on the world outside the container):
//!
//! * `read`, `pread64`, `readv`, `preadv`, `preadv2`: bytes from files, pipes, sockets, ttys,
//!   eventfd/timerfd/signalfd, and `/dev/urandom`/`/dev/random` (randomness read as a file);
//!   recorded: the buffer up to the return value, or the iovecs filled in order.
//! * `recvfrom`, `recvmsg`, `recvmmsg`: network data, the sender's address, ancillary data;
//!   recorded: data, address (up to the length given at entry), the updated `msghdr`s.
//! * `accept`, `accept4`: which client connected and its address.
//! * `connect`: success or failure depends on the peer; `getsockopt`: socket state such as
//!   `SO_ERROR` after a non-blocking connect (value and length recorded).
//! * `epoll_wait`, `epoll_pwait`, `epoll_pwait2`: ready events, in the kernel's order.
//! * `poll`, `ppoll`, `select`, `pselect6`: readiness (the whole `pollfd` array or fd sets) and
//!   the remaining timeout the kernel writes back.
//! * `msgrcv`: a System V message from another process.
//!
//! Time (the vDSO entry points of `clock_gettime`, `gettimeofday`, `time` and `getcpu` are
//! overwritten with `mov $nr,%eax; syscall; ret` at attach and at every exec, so that they
//! become these syscalls):
//!
//! * `clock_gettime`, `gettimeofday`, `time`: clocks; `getcpu`: which CPU runs the thread.
//! * `nanosleep`, `clock_nanosleep`: the time left when interrupted.
//! * `getitimer`, `timer_gettime`, `timerfd_gettime`: time left on timers.
//! * `getrusage`, `times`, `sysinfo`: CPU times, ticks, uptime and load.
//! * `rdtsc`/`rdtscp` are instructions, not syscalls: `prctl(PR_SET_TSC, PR_TSC_SIGSEGV)` is
//!   injected at every exec, each resulting SIGSEGV is emulated by the recorder and recorded.
//!
//! Randomness: `getrandom` (the vDSO `getrandom` of Linux 6.11+ is patched to return ENOSYS, so
//! glibc uses the syscall), and reads of `/dev/urandom` through `read`.
//!
//! Order between threads (so replay can enforce the recorded cross-thread order):
//!
//! * `futex`, `futex_waitv`: who waited and who woke whom, in the observed order.
//! * `sched_yield`: an explicit scheduling point.
//! * `wait4`, `waitid`: which child changed state first (status and rusage recorded).
//!
//! Lifecycle (thread and process ids as the container sees them, via `NSpid`):
//!
//! * `clone`, `clone3`, `fork`, `vfork`: creation (the child is reported by the ptrace clone,
//!   fork and vfork events; the syscall records its return value and when).
//! * `execve`, `execveat`: new image; the vDSO is patched again and `PR_SET_TSC` injected.
//! * `exit`, `exit_group`: recorded at entry (they do not return), ordered against other
//!   threads; the thread's end is also recorded from `waitpid`.
//!
//! Signals: `rt_sigreturn` marks where a handler ends; `rt_sigtimedwait` records which signal
//! was taken. Every signal delivered (signal-delivery-stop) is recorded with the user-mode
//! address it was delivered at.
//!
//! Detected and reported, not recordable here: `io_uring_setup` (io_uring completions bypass
//! syscalls: an [`event::Event::Unrecordable`] is emitted), syscalls through the i386 or x32
//! ABIs, and `rdrand`/`rdseed`/`cpuid` (no CPUID faulting on this platform; see README).
//!
//! Every record also carries the time since the same thread's previous recorded syscall
//! (CLOCK_MONOTONIC in the recorder), for the replay's data-race mitigation.

pub mod bpf;
pub mod capture;
pub mod control;
pub mod event;
pub mod eventlog;
pub mod freezer;
pub mod launch;
pub mod position;
pub mod procfs;
pub mod profile;
pub mod ptrace;
pub mod recorder;
pub mod scan;
pub mod stream;
pub mod syscalls;
#[doc(hidden)]
pub mod testprog;
pub mod vdso;

pub use event::{Event, JsonLinesSink, Sink, VecSink};
pub use eventlog::{check_log, EventlogSink, LogCheck};
pub use launch::{record_command, Command};
pub use recorder::{Options, RecordError, Recorder, Summary};

#[cfg(test)]
mod tests;
