//! The syscalls the recorder traces (x86_64 numbers), what each writes to the tracee's memory,
//! and why it is traced. The crate docs and README list the same table in prose; a unit test
//! keeps them in step.

/// Which part of the tracee's memory a syscall wrote, described by its arguments and result.
///
/// Every variant is read at the syscall's exit stop. Recording a little more than the kernel
/// wrote is harmless (the replayer writes back bytes that were already there); recording less
/// would lose input, so where the kernel's exact extent is unknowable the description errs on
/// the larger side, within caps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    /// `args[buf]`, as many bytes as the (non-negative) return value.
    RetBytes {
        /// Index of the buffer argument.
        buf: usize,
    },
    /// `args[buf]`, `extra` bytes more than the return value (msgrcv: the `mtype` word).
    RetBytesPlus {
        /// Index of the buffer argument.
        buf: usize,
        /// Bytes before the counted data.
        extra: usize,
    },
    /// An iovec array (`args[iov]`, `args[cnt]` entries) filled in order with `ret` bytes.
    RetIov {
        /// Index of the iovec pointer.
        iov: usize,
        /// Index of the iovec count.
        cnt: usize,
    },
    /// `ret` elements of `elem` bytes at `args[buf]` (epoll events).
    RetElems {
        /// Index of the array pointer.
        buf: usize,
        /// Element size.
        elem: usize,
    },
    /// `args[count]` elements of `elem` bytes at `args[buf]` (poll's `pollfd` array).
    ArgElems {
        /// Index of the array pointer.
        buf: usize,
        /// Index of the element count.
        count: usize,
        /// Element size.
        elem: usize,
    },
    /// A `select` fd set at `args[set]`, sized by `args[0]` (nfds).
    FdSet {
        /// Index of the fd set pointer.
        set: usize,
    },
    /// A fixed-size struct at `args[buf]` (skipped when the pointer is null).
    Fixed {
        /// Index of the pointer.
        buf: usize,
        /// Its size in bytes.
        size: usize,
    },
    /// A value-result socket address: `args[addr]` with its length at `args[len]` (a
    /// `socklen_t*` the recorder also reads at entry, since the kernel writes at most the
    /// length given there), and the length word itself.
    SockAddr {
        /// Index of the address pointer.
        addr: usize,
        /// Index of the `socklen_t*`.
        len: usize,
    },
    /// A `struct msghdr*` (recvmsg): the header itself (the kernel updates `msg_namelen`,
    /// `msg_controllen`, `msg_flags`), the name, the iovecs filled with `ret` bytes, the control
    /// data.
    Msghdr {
        /// Index of the msghdr pointer.
        msg: usize,
    },
    /// A `struct mmsghdr*` array (recvmmsg): `ret` entries, each as [`Out::Msghdr`] with its own
    /// `msg_len`.
    Mmsghdr {
        /// Index of the array pointer.
        vec: usize,
    },
}

/// What a traced syscall is traced for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Its result depends on the world outside the container (network, other processes,
    /// devices, files other hosts may change).
    Input,
    /// It reads a clock.
    Time,
    /// It returns randomness.
    Random,
    /// It orders threads against each other (who wakes whom, who ran first).
    Order,
    /// It creates, replaces or ends a thread or process.
    Lifecycle,
    /// It ends a signal handler or waits for a signal.
    Signal,
    /// Its effect cannot be recorded by syscall results alone; traced so that its use is
    /// detected and reported.
    Unrecordable,
}

/// One traced syscall.
#[derive(Clone, Copy, Debug)]
pub struct TracedSyscall {
    /// x86_64 syscall number.
    pub nr: u32,
    /// Its name (as libseccomp and OCI profiles spell it).
    pub name: &'static str,
    /// Why it is traced.
    pub class: Class,
    /// What it writes to the tracee's memory.
    pub outs: &'static [Out],
    /// True when the syscall does not return to the caller on success (exit, exit_group).
    pub no_return: bool,
    /// Why the result is nondeterministic, in one line (the crate docs list these).
    pub reason: &'static str,
}

const fn t(
    nr: u32,
    name: &'static str,
    class: Class,
    outs: &'static [Out],
    reason: &'static str,
) -> TracedSyscall {
    TracedSyscall {
        nr,
        name,
        class,
        outs,
        no_return: false,
        reason,
    }
}

use Class::*;
use Out::*;

const TIMESPEC: usize = 16;
const TIMEVAL: usize = 16;
const ITIMERSPEC: usize = 32;
const ITIMERVAL: usize = 32;
const RUSAGE: usize = 144;
const SIGINFO: usize = 128;
const SYSINFO: usize = 112;
const TMS: usize = 32;

/// Every syscall the recorder asks seccomp to trace, sorted by number.
#[rustfmt::skip]
pub static TRACED: &[TracedSyscall] = &[
    t(0, "read", Input, &[RetBytes { buf: 1 }], "bytes from files, pipes, sockets, ttys, /dev/urandom, eventfd, timerfd, signalfd"),
    t(7, "poll", Input, &[ArgElems { buf: 0, count: 1, elem: 8 }], "which fds are ready depends on peers and timing"),
    t(15, "rt_sigreturn", Signal, &[], "marks where a signal handler ends, so replay knows which events the handler made"),
    t(17, "pread64", Input, &[RetBytes { buf: 1 }], "file contents (files may be changed from outside)"),
    t(19, "readv", Input, &[RetIov { iov: 1, cnt: 2 }], "vectored read"),
    t(23, "select", Input, &[FdSet { set: 1 }, FdSet { set: 2 }, FdSet { set: 3 }, Fixed { buf: 4, size: TIMEVAL }], "readiness and the remaining timeout"),
    t(24, "sched_yield", Order, &[], "a scheduling point between threads"),
    t(35, "nanosleep", Time, &[Fixed { buf: 1, size: TIMESPEC }], "how long was left when interrupted"),
    t(36, "getitimer", Time, &[Fixed { buf: 1, size: ITIMERVAL }], "time left on an interval timer"),
    t(42, "connect", Input, &[], "success or failure depends on the peer"),
    t(43, "accept", Input, &[SockAddr { addr: 1, len: 2 }], "which client connected, and its address"),
    t(45, "recvfrom", Input, &[RetBytes { buf: 1 }, SockAddr { addr: 4, len: 5 }], "bytes and sender from the network"),
    t(47, "recvmsg", Input, &[Msghdr { msg: 1 }], "bytes, sender, ancillary data from the network"),
    t(55, "getsockopt", Input, &[SockAddr { addr: 3, len: 4 }], "socket state such as SO_ERROR after a non-blocking connect"),
    t(56, "clone", Lifecycle, &[], "new thread or process (the id it gets and when)"),
    t(57, "fork", Lifecycle, &[], "new process"),
    t(58, "vfork", Lifecycle, &[], "new process"),
    t(59, "execve", Lifecycle, &[], "new program image (the vDSO is patched again after it)"),
    TracedSyscall { no_return: true, ..t(60, "exit", Lifecycle, &[], "thread end, ordered against the other threads") },
    t(61, "wait4", Order, &[Fixed { buf: 1, size: 4 }, Fixed { buf: 3, size: RUSAGE }], "which child ended first, and its resource usage"),
    t(70, "msgrcv", Input, &[RetBytesPlus { buf: 1, extra: 8 }], "System V message from another process"),
    t(96, "gettimeofday", Time, &[Fixed { buf: 0, size: TIMEVAL }, Fixed { buf: 1, size: 8 }], "wall clock (vDSO entry patched to trap)"),
    t(98, "getrusage", Time, &[Fixed { buf: 1, size: RUSAGE }], "CPU times used so far"),
    t(99, "sysinfo", Time, &[Fixed { buf: 0, size: SYSINFO }], "uptime, load, free memory"),
    t(100, "times", Time, &[Fixed { buf: 0, size: TMS }], "clock ticks and CPU times"),
    t(128, "rt_sigtimedwait", Signal, &[Fixed { buf: 1, size: SIGINFO }], "which signal arrived"),
    t(201, "time", Time, &[Fixed { buf: 0, size: 8 }], "wall clock seconds (vDSO entry patched to trap)"),
    t(202, "futex", Order, &[], "wait/wake order between threads"),
    t(224, "timer_gettime", Time, &[Fixed { buf: 1, size: ITIMERSPEC }], "time left on a POSIX timer"),
    t(228, "clock_gettime", Time, &[Fixed { buf: 1, size: TIMESPEC }], "clocks (vDSO entry patched to trap)"),
    t(230, "clock_nanosleep", Time, &[Fixed { buf: 3, size: TIMESPEC }], "how long was left when interrupted"),
    TracedSyscall { no_return: true, ..t(231, "exit_group", Lifecycle, &[], "process end, ordered against the other threads") },
    t(232, "epoll_wait", Input, &[RetElems { buf: 1, elem: 12 }], "which fds are ready, in what order"),
    t(247, "waitid", Order, &[Fixed { buf: 2, size: SIGINFO }, Fixed { buf: 4, size: RUSAGE }], "which child changed state first"),
    t(270, "pselect6", Input, &[FdSet { set: 1 }, FdSet { set: 2 }, FdSet { set: 3 }, Fixed { buf: 4, size: TIMESPEC }], "readiness and the remaining timeout"),
    t(271, "ppoll", Input, &[ArgElems { buf: 0, count: 1, elem: 8 }, Fixed { buf: 2, size: TIMESPEC }], "readiness and the remaining timeout"),
    t(281, "epoll_pwait", Input, &[RetElems { buf: 1, elem: 12 }], "which fds are ready, in what order"),
    t(287, "timerfd_gettime", Time, &[Fixed { buf: 1, size: ITIMERSPEC }], "time left on a timerfd"),
    t(288, "accept4", Input, &[SockAddr { addr: 1, len: 2 }], "which client connected, and its address"),
    t(295, "preadv", Input, &[RetIov { iov: 1, cnt: 2 }], "vectored file read"),
    t(299, "recvmmsg", Input, &[Mmsghdr { vec: 1 }], "several messages from the network"),
    t(309, "getcpu", Time, &[Fixed { buf: 0, size: 4 }, Fixed { buf: 1, size: 4 }], "which CPU the thread runs on (vDSO entry patched to trap)"),
    t(318, "getrandom", Random, &[RetBytes { buf: 0 }], "randomness (the vDSO getrandom is disabled so glibc uses the syscall)"),
    t(322, "execveat", Lifecycle, &[], "new program image"),
    t(327, "preadv2", Input, &[RetIov { iov: 1, cnt: 2 }], "vectored file read"),
    t(425, "io_uring_setup", Unrecordable, &[], "io_uring completions bypass syscalls: detected and reported"),
    t(435, "clone3", Lifecycle, &[], "new thread or process"),
    t(441, "epoll_pwait2", Input, &[RetElems { buf: 1, elem: 12 }], "which fds are ready, in what order"),
    t(449, "futex_waitv", Order, &[], "wait order between threads"),
];

/// The traced syscall with number `nr` (x86_64), if any.
pub fn by_nr(nr: u64) -> Option<&'static TracedSyscall> {
    let nr = u32::try_from(nr).ok()?;
    TRACED
        .binary_search_by_key(&nr, |s| s.nr)
        .ok()
        .and_then(|i| TRACED.get(i))
}

/// The traced syscall named `name`, if any.
pub fn by_name(name: &str) -> Option<&'static TracedSyscall> {
    TRACED.iter().find(|s| s.name == name)
}

/// The name of syscall `nr` if the recorder knows it (it knows the ones it traces).
pub fn name_of(nr: u64) -> Option<&'static str> {
    by_nr(nr).map(|s| s.name)
}

/// True for the syscalls recorded at entry too ([`crate::event::Event::SyscallEntry`]): the
/// futex family, whose wakes must precede the waits they end in the log.
pub fn records_entry(nr: u64) -> bool {
    matches!(nr, 202 | 449)
}

/// The names of every traced syscall, in table order.
pub fn traced_names() -> Vec<&'static str> {
    TRACED.iter().map(|s| s.name).collect()
}

/// The numbers of every traced syscall, in table order.
pub fn traced_numbers() -> Vec<u32> {
    TRACED.iter().map(|s| s.nr).collect()
}

/// x86_64 syscall numbers the recorder itself uses or injects.
pub mod nr {
    /// `clock_gettime`.
    pub const CLOCK_GETTIME: u32 = 228;
    /// `gettimeofday`.
    pub const GETTIMEOFDAY: u32 = 96;
    /// `time`.
    pub const TIME: u32 = 201;
    /// `getcpu`.
    pub const GETCPU: u32 = 309;
    /// `prctl`.
    pub const PRCTL: u32 = 157;
    /// `execve`.
    pub const EXECVE: u32 = 59;
    /// `clone`.
    pub const CLONE: u32 = 56;
    /// `fork`.
    pub const FORK: u32 = 57;
    /// `vfork`.
    pub const VFORK: u32 = 58;
    /// `clone3`.
    pub const CLONE3: u32 = 435;
    /// `execveat`.
    pub const EXECVEAT: u32 = 322;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_and_unique() {
        for w in TRACED.windows(2) {
            assert!(w[0].nr < w[1].nr, "{} before {}", w[0].name, w[1].name);
        }
    }

    #[test]
    fn numbers_match_the_system_headers_where_available() {
        let Ok(h) = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_64.h") else {
            return;
        };
        for s in TRACED {
            let want = format!("#define __NR_{} {}", s.name, s.nr);
            assert!(
                h.lines().any(|l| l.trim() == want),
                "{want} not in unistd_64.h"
            );
        }
    }

    #[test]
    fn lookups() {
        assert_eq!(by_nr(0).map(|s| s.name), Some("read"));
        assert_eq!(by_nr(318).map(|s| s.name), Some("getrandom"));
        assert!(by_nr(1).is_none(), "write is not traced");
        assert!(by_nr(u64::MAX).is_none());
        assert_eq!(by_name("clock_gettime").map(|s| s.nr), Some(228));
        assert!(by_nr(231).is_some_and(|s| s.no_return));
    }

    #[test]
    fn every_traced_syscall_is_documented() {
        let docs = include_str!("lib.rs");
        let readme = include_str!("../README.md");
        for s in TRACED {
            let needle = format!("`{}`", s.name);
            assert!(
                docs.contains(&needle),
                "{} missing from the crate docs",
                s.name
            );
            assert!(
                readme.contains(&needle),
                "{} missing from README.md",
                s.name
            );
        }
    }
}
