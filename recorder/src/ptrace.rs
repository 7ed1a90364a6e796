//! Thin wrappers over ptrace, waitpid and process_vm_readv, behind the [`Tracer`] trait so the
//! recorder's state machine can be driven by a scripted fake in tests.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;

use crate::event::Tid;

/// `PTRACE_O_TRACESYSGOOD`.
pub const O_TRACESYSGOOD: u32 = 1;
/// `PTRACE_O_TRACEFORK`.
pub const O_TRACEFORK: u32 = 1 << 1;
/// `PTRACE_O_TRACEVFORK`.
pub const O_TRACEVFORK: u32 = 1 << 2;
/// `PTRACE_O_TRACECLONE`.
pub const O_TRACECLONE: u32 = 1 << 3;
/// `PTRACE_O_TRACEEXEC`.
pub const O_TRACEEXEC: u32 = 1 << 4;
/// `PTRACE_O_TRACESECCOMP`.
pub const O_TRACESECCOMP: u32 = 1 << 7;
/// `PTRACE_O_EXITKILL`.
pub const O_EXITKILL: u32 = 1 << 20;

/// The options the recorder seizes with.
pub const OPTIONS: u32 = O_TRACESECCOMP
    | O_TRACECLONE
    | O_TRACEFORK
    | O_TRACEVFORK
    | O_TRACEEXEC
    | O_EXITKILL
    | O_TRACESYSGOOD;

/// `PTRACE_EVENT_FORK`.
pub const EVENT_FORK: u32 = 1;
/// `PTRACE_EVENT_VFORK`.
pub const EVENT_VFORK: u32 = 2;
/// `PTRACE_EVENT_CLONE`.
pub const EVENT_CLONE: u32 = 3;
/// `PTRACE_EVENT_EXEC`.
pub const EVENT_EXEC: u32 = 4;
/// `PTRACE_EVENT_VFORK_DONE`.
pub const EVENT_VFORK_DONE: u32 = 5;
/// `PTRACE_EVENT_EXIT`.
pub const EVENT_EXIT: u32 = 6;
/// `PTRACE_EVENT_SECCOMP`.
pub const EVENT_SECCOMP: u32 = 7;
/// `PTRACE_EVENT_STOP`.
pub const EVENT_STOP: u32 = 128;

const PTRACE_SEIZE: libc::c_uint = 0x4206;
const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
const PTRACE_LISTEN: libc::c_uint = 0x4208;
const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;

/// `PTRACE_SYSCALL_INFO_ENTRY`.
pub const INFO_ENTRY: u8 = 1;
/// `PTRACE_SYSCALL_INFO_EXIT`.
pub const INFO_EXIT: u8 = 2;
/// `PTRACE_SYSCALL_INFO_SECCOMP`.
pub const INFO_SECCOMP: u8 = 3;

/// What a `waitpid` status says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The thread exited with this status.
    Exited(i32),
    /// The thread was killed by this signal.
    Killed(i32),
    /// A syscall-entry or syscall-exit stop (`SIGTRAP | 0x80`, thanks to TRACESYSGOOD).
    Syscall,
    /// A `PTRACE_EVENT_*` stop; `sig` is the stop signal (for `EVENT_STOP`: the group-stop
    /// signal, or SIGTRAP for a new thread's first stop or an interrupt).
    Event {
        /// `PTRACE_EVENT_*`.
        event: u32,
        /// `WSTOPSIG`.
        sig: i32,
    },
    /// A signal-delivery-stop.
    Signal(i32),
    /// Something else (`WIFCONTINUED`, unknown encodings).
    Other(i32),
}

impl Stop {
    /// Decodes a raw `waitpid` status.
    pub fn decode(status: i32) -> Stop {
        if libc::WIFEXITED(status) {
            return Stop::Exited(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            return Stop::Killed(libc::WTERMSIG(status));
        }
        if !libc::WIFSTOPPED(status) {
            return Stop::Other(status);
        }
        let sig = libc::WSTOPSIG(status);
        let event = ((status as u32) >> 16) & 0xffff;
        if event != 0 {
            return Stop::Event { event, sig };
        }
        if sig == (libc::SIGTRAP | 0x80) {
            return Stop::Syscall;
        }
        Stop::Signal(sig)
    }
}

/// The useful part of `struct ptrace_syscall_info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallInfo {
    /// `PTRACE_SYSCALL_INFO_*`.
    pub op: u8,
    /// `AUDIT_ARCH_*`.
    pub arch: u32,
    /// User-mode instruction pointer.
    pub ip: u64,
    /// Syscall number (entry and seccomp stops).
    pub nr: u64,
    /// Arguments (entry and seccomp stops).
    pub args: [u64; 6],
    /// Return value (exit stops).
    pub rval: i64,
    /// Seccomp's `SECCOMP_RET_DATA` (seccomp stops).
    pub ret_data: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct RawSyscallInfo {
    op: u8,
    pad: [u8; 3],
    arch: u32,
    instruction_pointer: u64,
    stack_pointer: u64,
    // Union of entry {nr, args[6]}, exit {rval, is_error}, seccomp {nr, args[6], ret_data}.
    u: [u64; 8],
}

impl SyscallInfo {
    fn from_raw(r: &RawSyscallInfo) -> SyscallInfo {
        let [a0, a1, a2, a3, a4, a5, a6, a7] = r.u;
        let mut info = SyscallInfo {
            op: r.op,
            arch: r.arch,
            ip: r.instruction_pointer,
            nr: 0,
            args: [0; 6],
            rval: 0,
            ret_data: 0,
        };
        match r.op {
            INFO_ENTRY | INFO_SECCOMP => {
                info.nr = a0;
                info.args = [a1, a2, a3, a4, a5, a6];
                info.ret_data = a7 as u32;
            }
            INFO_EXIT => info.rval = a0 as i64,
            _ => {}
        }
        info
    }
}

/// How to resume a stopped tracee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// `PTRACE_CONT`: run to the next seccomp or event stop.
    Cont,
    /// `PTRACE_SYSCALL`: also stop at the next syscall-entry/exit.
    Syscall,
    /// `PTRACE_LISTEN`: stay in group-stop, but report its end.
    Listen,
}

/// The signal information the recorder keeps from `PTRACE_GETSIGINFO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigInfo {
    /// `si_signo`.
    pub signo: i32,
    /// `si_code`.
    pub code: i32,
    /// `si_errno`.
    pub errno: i32,
    /// The whole `siginfo_t`.
    pub raw: [u8; SIGINFO_SIZE],
}

/// Whether a ptrace or wait error says the thread is gone (killed meanwhile; its exit report
/// follows).
pub fn is_gone(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::ESRCH)
}

/// The result of a ptrace request on a thread that may have gone meanwhile: `None` when it
/// has ([`is_gone`]), the error otherwise.
pub fn unless_gone<V>(res: io::Result<V>) -> io::Result<Option<V>> {
    match res {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The `rdtsc` (`0f 31`) or `rdtscp` (`0f 01 f9`) instruction at the start of `code`: its
/// length and whether it is `rdtscp`.
pub fn tsc_instruction(code: &[u8]) -> Option<(u64, bool)> {
    match code {
        [0x0f, 0x31, ..] => Some((2, false)),
        [0x0f, 0x01, 0xf9, ..] => Some((3, true)),
        _ => None,
    }
}

/// Makes `regs` look as if the `rdtsc`/`rdtscp` of length `len` at `rip` ran and read `tsc`
/// (and `aux`, for `rdtscp`).
pub fn set_tsc_result(regs: &mut Regs, len: u64, tsc: u64, aux: Option<u32>) {
    regs.rax = tsc & 0xffff_ffff;
    regs.rdx = tsc >> 32;
    if let Some(aux) = aux {
        regs.rcx = u64::from(aux);
    }
    regs.rip = regs.rip.wrapping_add(len);
}

/// This thread's own TSC (and `IA32_TSC_AUX` with `rdtscp`). The calling thread must be
/// allowed to read it (see `PR_SET_TSC`).
pub fn read_tsc_raw(rdtscp: bool) -> (u64, Option<u32>) {
    if rdtscp {
        let mut aux = 0u32;
        // SAFETY: rdtscp has no memory effects besides writing `aux`, a valid local.
        let v = unsafe { core::arch::x86_64::__rdtscp(&mut aux) };
        (v, Some(aux))
    } else {
        // SAFETY: rdtsc has no memory effects.
        (unsafe { core::arch::x86_64::_rdtsc() }, None)
    }
}

/// Bytes in a `siginfo_t` (x86_64).
pub const SIGINFO_SIZE: usize = 128;

/// The x86_64 user registers the recorder reads and writes.
pub type Regs = libc::user_regs_struct;

/// The tracing operations the recorder needs. [`Ptrace`] is the real one.
pub trait Tracer {
    /// Waits for the next stop or exit of any tracee of this thread; `None` when there is none
    /// left (ECHILD). A signal interrupting the wait (the control's wake-up, see
    /// [`crate::control`]) returns an error of kind [`io::ErrorKind::Interrupted`].
    fn wait(&mut self) -> io::Result<Option<(Tid, i32)>>;
    /// `PTRACE_SEIZE` with `options`.
    fn seize(&mut self, tid: Tid, options: u32) -> io::Result<()>;
    /// `PTRACE_DETACH` of a stopped tracee (it resumes, or stays frozen if its cgroup is).
    fn detach(&mut self, tid: Tid) -> io::Result<()>;
    /// `PTRACE_INTERRUPT`.
    fn interrupt(&mut self, tid: Tid) -> io::Result<()>;
    /// Resumes a stopped tracee, delivering `sig` (0 for none).
    fn resume(&mut self, tid: Tid, how: Resume, sig: i32) -> io::Result<()>;
    /// `PTRACE_GET_SYSCALL_INFO`.
    fn syscall_info(&mut self, tid: Tid) -> io::Result<SyscallInfo>;
    /// `PTRACE_GETEVENTMSG`.
    fn event_msg(&mut self, tid: Tid) -> io::Result<u64>;
    /// `PTRACE_GETSIGINFO`.
    fn siginfo(&mut self, tid: Tid) -> io::Result<SigInfo>;
    /// `PTRACE_GETREGS`.
    fn regs(&mut self, tid: Tid) -> io::Result<Regs>;
    /// `PTRACE_SETREGS`.
    fn set_regs(&mut self, tid: Tid, regs: &Regs) -> io::Result<()>;
    /// Reads up to `len` bytes of the tracee's memory at `addr`; a short result means the rest
    /// was not readable.
    fn read_mem(&mut self, tid: Tid, addr: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Writes `data` into the tracee's memory at `addr`, even into read-only mappings (through
    /// `/proc/TID/mem`, which breaks copy-on-write like a debugger's breakpoint).
    fn write_mem(&mut self, tid: Tid, addr: u64, data: &[u8]) -> io::Result<()>;
    /// Sends `sig` to the whole thread group `tgid`.
    fn kill(&mut self, tgid: Tid, sig: i32) -> io::Result<()>;

    /// `/proc/TID/status`.
    fn status(&mut self, tid: Tid) -> io::Result<crate::procfs::Status> {
        crate::procfs::status(tid)
    }
    /// The threads of process `pid`.
    fn task_ids(&mut self, pid: Tid) -> io::Result<Vec<Tid>> {
        crate::procfs::task_ids(pid)
    }
    /// `/proc/PID/maps`.
    fn maps(&mut self, pid: Tid) -> io::Result<String> {
        crate::procfs::maps(pid)
    }
    /// `/proc/PID/exe`.
    fn exe(&mut self, pid: Tid) -> Option<String> {
        crate::procfs::exe(pid)
    }
    /// Freezes (and waits until frozen) or thaws the cgroup of process `pid`
    /// ([`crate::freezer`]).
    fn freeze(&mut self, pid: Tid, frozen: bool) -> io::Result<()> {
        crate::freezer::of_process(pid)
            .and_then(|f| f.set(frozen))
            .map_err(io::Error::other)
    }
}

/// The real [`Tracer`]: the calling thread is the tracer.
#[derive(Debug, Default)]
pub struct Ptrace;

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn ptrace(req: libc::c_uint, tid: Tid, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: every request this module issues passes either plain integers or a pointer to a
    // live, correctly sized buffer owned by the caller for the duration of the call.
    let rc = unsafe {
        libc::ptrace(
            req,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    check(rc)
}

impl Tracer for Ptrace {
    fn wait(&mut self) -> io::Result<Option<(Tid, i32)>> {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer. `__WNOTHREAD` limits the wait to this
        // thread's own children and tracees, so a recorder running on one thread of a larger
        // process (tests) neither steals nor loses anyone else's children.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::__WALL | libc::__WNOTHREAD) };
        if pid > 0 {
            return Ok(Some((pid, status)));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ECHILD) => Ok(None),
            // EINTR comes back as an error of kind Interrupted (the control's wake-up).
            _ => Err(err),
        }
    }

    fn seize(&mut self, tid: Tid, options: u32) -> io::Result<()> {
        ptrace(PTRACE_SEIZE, tid, 0, options as usize).map(drop)
    }

    fn detach(&mut self, tid: Tid) -> io::Result<()> {
        ptrace(libc::PTRACE_DETACH, tid, 0, 0).map(drop)
    }

    fn interrupt(&mut self, tid: Tid) -> io::Result<()> {
        ptrace(PTRACE_INTERRUPT, tid, 0, 0).map(drop)
    }

    fn resume(&mut self, tid: Tid, how: Resume, sig: i32) -> io::Result<()> {
        let req = match how {
            Resume::Cont => libc::PTRACE_CONT,
            Resume::Syscall => libc::PTRACE_SYSCALL,
            Resume::Listen => PTRACE_LISTEN,
        };
        ptrace(req, tid, 0, sig as usize).map(drop)
    }

    fn syscall_info(&mut self, tid: Tid) -> io::Result<SyscallInfo> {
        let mut raw = RawSyscallInfo {
            op: 0,
            pad: [0; 3],
            arch: 0,
            instruction_pointer: 0,
            stack_pointer: 0,
            u: [0; 8],
        };
        ptrace(
            PTRACE_GET_SYSCALL_INFO,
            tid,
            std::mem::size_of::<RawSyscallInfo>(),
            &mut raw as *mut RawSyscallInfo as usize,
        )?;
        Ok(SyscallInfo::from_raw(&raw))
    }

    fn event_msg(&mut self, tid: Tid) -> io::Result<u64> {
        let mut msg: libc::c_ulong = 0;
        ptrace(
            libc::PTRACE_GETEVENTMSG,
            tid,
            0,
            &mut msg as *mut libc::c_ulong as usize,
        )?;
        Ok(msg)
    }

    fn siginfo(&mut self, tid: Tid) -> io::Result<SigInfo> {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        ptrace(
            libc::PTRACE_GETSIGINFO,
            tid,
            0,
            &mut si as *mut libc::siginfo_t as usize,
        )?;
        let mut raw = [0u8; SIGINFO_SIZE];
        const _: () = assert!(std::mem::size_of::<libc::siginfo_t>() == SIGINFO_SIZE);
        // SAFETY: `si` is a plain-old-data siginfo_t of exactly SIGINFO_SIZE bytes (checked
        // above at compile time); copying its bytes reads initialised memory only.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&si as *const libc::siginfo_t).cast::<u8>(),
                raw.as_mut_ptr(),
                SIGINFO_SIZE,
            );
        }
        Ok(SigInfo {
            signo: si.si_signo,
            code: si.si_code,
            errno: si.si_errno,
            raw,
        })
    }

    fn regs(&mut self, tid: Tid) -> io::Result<Regs> {
        // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
        let mut regs: Regs = unsafe { std::mem::zeroed() };
        ptrace(
            libc::PTRACE_GETREGS,
            tid,
            0,
            &mut regs as *mut Regs as usize,
        )?;
        Ok(regs)
    }

    fn set_regs(&mut self, tid: Tid, regs: &Regs) -> io::Result<()> {
        ptrace(libc::PTRACE_SETREGS, tid, 0, regs as *const Regs as usize).map(drop)
    }

    fn read_mem(&mut self, tid: Tid, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        read_process_memory(tid, addr, len)
    }

    fn write_mem(&mut self, tid: Tid, addr: u64, data: &[u8]) -> io::Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .open(format!("/proc/{tid}/mem"))?;
        f.write_all_at(data, addr)
    }

    fn kill(&mut self, tgid: Tid, sig: i32) -> io::Result<()> {
        // SAFETY: plain syscall with integer arguments.
        let rc = unsafe { libc::kill(tgid, sig) };
        check(rc.into()).map(drop)
    }
}

/// Reads up to `len` bytes of process `tid`'s memory at `addr` with `process_vm_readv`
/// (retrying after partial reads that end at a page boundary). A short result means the rest is
/// not mapped or not readable.
pub fn read_process_memory(tid: Tid, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0usize;
    while done < len {
        let local = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: len - done,
        };
        let remote = libc::iovec {
            iov_base: (addr.wrapping_add(done as u64)) as usize as *mut libc::c_void,
            iov_len: len - done,
        };
        // SAFETY: `local` covers the unfilled tail of `buf`, which we own; the kernel checks
        // the remote range itself and never writes outside `local`.
        let n = unsafe { libc::process_vm_readv(tid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if done > 0 || err.raw_os_error() == Some(libc::EFAULT) {
                break;
            }
            return Err(err);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    buf.truncate(done);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_statuses() {
        assert_eq!(Stop::decode(0), Stop::Exited(0));
        assert_eq!(Stop::decode(3 << 8), Stop::Exited(3));
        assert_eq!(Stop::decode(9), Stop::Killed(9));
        let stopped = |sig: i32, event: u32| ((event as i32) << 16) | (sig << 8) | 0x7f;
        assert_eq!(
            Stop::decode(stopped(libc::SIGTRAP | 0x80, 0)),
            Stop::Syscall
        );
        assert_eq!(
            Stop::decode(stopped(libc::SIGUSR1, 0)),
            Stop::Signal(libc::SIGUSR1)
        );
        assert_eq!(
            Stop::decode(stopped(libc::SIGTRAP, EVENT_SECCOMP)),
            Stop::Event {
                event: EVENT_SECCOMP,
                sig: libc::SIGTRAP
            }
        );
        assert_eq!(
            Stop::decode(stopped(libc::SIGSTOP, EVENT_STOP)),
            Stop::Event {
                event: EVENT_STOP,
                sig: libc::SIGSTOP
            }
        );
    }

    #[test]
    fn raw_syscall_info_layout() {
        // struct ptrace_syscall_info is 88 bytes on x86_64 (24-byte header, 64-byte union).
        assert_eq!(std::mem::size_of::<RawSyscallInfo>(), 88);
    }

    #[test]
    fn read_own_memory() {
        let data = *b"hello, recorder";
        let me = std::process::id() as Tid;
        let got = read_process_memory(me, data.as_ptr() as u64, data.len()).expect("read");
        assert_eq!(got, data);
        let bad = read_process_memory(me, 8, 16).expect("unmapped reads come back short");
        assert!(bad.is_empty());
    }
}
