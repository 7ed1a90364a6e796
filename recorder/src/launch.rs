//! The `--exec` launcher: start a command under the recorder's seccomp filter, stopped before
//! its exec, and record it. This is what runc does for a container (filter last, then exec),
//! minus the container.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::bpf::{self, Insn};
use crate::event::{Sink, Tid};
use crate::ptrace::Ptrace;
use crate::recorder::{Options, RecordError, Recorder, Summary};

/// Errors of launching.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The program was not found on PATH.
    #[error("{0}: command not found")]
    NotFound(String),
    /// An argument contains a NUL byte.
    #[error("argument contains a NUL byte: {0:?}")]
    Nul(OsString),
    /// Building the filter failed.
    #[error(transparent)]
    Filter(#[from] bpf::BpfError),
    /// fork or wait failed.
    #[error("{what}: {err}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// Why.
        err: io::Error,
    },
    /// The child did not reach its SIGSTOP (it could not install the filter, for instance).
    #[error("the child did not stop before exec (wait status {0:#x})")]
    NoStop(i32),
    /// Recording failed.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// A command to start under recording.
#[derive(Debug)]
pub struct Command {
    program: OsString,
    args: Vec<OsString>,
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    cpu: Option<usize>,
    filter: Option<Vec<Insn>>,
    trap_tsc: bool,
    no_aslr: bool,
}

impl Command {
    /// `program` (searched on PATH when it has no slash) with no arguments.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Command {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            stdin: None,
            stdout: None,
            stderr: None,
            cpu: None,
            filter: None,
            trap_tsc: false,
            no_aslr: false,
        }
    }

    /// Turns address-space randomisation off for the child (`personality(ADDR_NO_RANDOMIZE)`,
    /// kept across exec), so that two runs of the same program lay out memory alike: a log
    /// recorded this way can be replayed on a fresh run (`rrc-replayer`), the addresses it
    /// wrote to being the same, given the same environment (the shell's `_`, which names the
    /// command it ran, is left out). (A process restored from a checkpoint keeps its layout
    /// anyway.)
    pub fn no_aslr(mut self, on: bool) -> Self {
        self.no_aslr = on;
        self
    }

    /// Makes `rdtsc`/`rdtscp` fault (`PR_SET_TSC(PR_TSC_SIGSEGV)`, set in the child before its
    /// exec; the flag survives execve), for a tracer that emulates them from the first
    /// instruction on (the replayer).
    pub fn trap_tsc(mut self, on: bool) -> Self {
        self.trap_tsc = on;
        self
    }

    /// Adds arguments.
    pub fn args<I: IntoIterator<Item = A>, A: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// The child's standard input.
    pub fn stdin(mut self, fd: OwnedFd) -> Self {
        self.stdin = Some(fd);
        self
    }

    /// The child's standard output.
    pub fn stdout(mut self, fd: OwnedFd) -> Self {
        self.stdout = Some(fd);
        self
    }

    /// The child's standard error.
    pub fn stderr(mut self, fd: OwnedFd) -> Self {
        self.stderr = Some(fd);
        self
    }

    /// Pins the child (and the calling thread, which will trace it) to one CPU: a tracer and
    /// its tracee on different vCPUs pay a cross-CPU wake-up per stop (PLATFORM.md).
    pub fn pin_cpu(mut self, cpu: usize) -> Self {
        self.cpu = Some(cpu);
        self
    }

    /// Replaces the seccomp filter (default: [`default_filter`]). An empty program installs
    /// no filter at all (for untraced baselines).
    pub fn filter(mut self, prog: Vec<Insn>) -> Self {
        self.filter = Some(prog);
        self
    }
}

/// The filter tracing [`crate::syscalls::TRACED`].
pub fn default_filter() -> Result<Vec<Insn>, bpf::BpfError> {
    bpf::trace_filter(&crate::syscalls::traced_numbers())
}

/// Resolves `program` on PATH the way execvp would.
pub fn resolve(program: &OsStr) -> Result<PathBuf, LaunchError> {
    let p = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        return Ok(p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let cand = dir.join(p);
        if let Ok(meta) = std::fs::metadata(&cand) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
        }
    }
    Err(LaunchError::NotFound(
        program.to_string_lossy().into_owned(),
    ))
}

fn cstring(s: &OsStr) -> Result<CString, LaunchError> {
    CString::new(s.as_bytes()).map_err(|_| LaunchError::Nul(s.to_owned()))
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; CPU_SET writes inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Forks `cmd`: the child sets `PR_SET_NO_NEW_PRIVS`, installs the filter, stops itself with
/// SIGSTOP and, once resumed, execs. Returns the child's pid once it is stopped. Only the
/// calling thread may wait for it (and must be the one that traces it).
pub fn spawn_stopped(cmd: &Command) -> Result<Tid, LaunchError> {
    let path = cstring(resolve(&cmd.program)?.as_os_str())?;
    let mut argv_c = vec![cstring(&cmd.program)?];
    for a in &cmd.args {
        argv_c.push(cstring(a)?);
    }
    let mut envp_c = Vec::new();
    for (k, v) in std::env::vars_os() {
        // The shell sets `_` to the command it ran, which differs between the recorder and
        // the replayer: it would move the stack of a run meant to be laid out alike.
        if cmd.no_aslr && k == "_" {
            continue;
        }
        let mut kv = k;
        kv.push("=");
        kv.push(v);
        envp_c.push(cstring(&kv)?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let filter = match &cmd.filter {
        Some(f) => f.clone(),
        None => default_filter()?,
    };
    let fds = [
        cmd.stdin.as_ref().map(|f| f.as_raw_fd()),
        cmd.stdout.as_ref().map(|f| f.as_raw_fd()),
        cmd.stderr.as_ref().map(|f| f.as_raw_fd()),
    ];
    let setup = ChildSetup {
        fds,
        cpu: cmd.cpu,
        trap_tsc: cmd.trap_tsc,
        no_aslr: cmd.no_aslr,
    };

    // SAFETY: fork in a possibly multi-threaded process: the child only makes
    // async-signal-safe calls (sched_setaffinity, dup2, prctl, seccomp, kill, execve, _exit)
    // on memory prepared before the fork, then execs or exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(LaunchError::Sys {
            what: "fork",
            err: io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // SAFETY: see above; every pointer refers to memory that the fork copied.
        unsafe { child(&path, &argv, &envp, &filter, setup) }
    }
    let mut status = 0;
    loop {
        // SAFETY: valid out-pointer; waits for this specific child.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WUNTRACED | libc::__WALL) };
        if rc == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(LaunchError::Sys {
                what: "waitpid",
                err,
            });
        }
    }
    if !(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGSTOP) {
        return Err(LaunchError::NoStop(status));
    }
    Ok(pid)
}

/// What the child sets up before it stops: its standard streams, CPU, rdtsc trap, layout.
#[derive(Clone, Copy)]
struct ChildSetup {
    fds: [Option<i32>; 3],
    cpu: Option<usize>,
    trap_tsc: bool,
    no_aslr: bool,
}

/// The child side of [`spawn_stopped`]. Never returns.
///
/// # Safety
///
/// Must only be called in a freshly forked child; the pointers must be valid NUL-terminated
/// arrays of C strings.
unsafe fn child(
    path: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    filter: &[Insn],
    setup: ChildSetup,
) -> ! {
    let ChildSetup {
        fds,
        cpu,
        trap_tsc,
        no_aslr,
    } = setup;
    if let Some(cpu) = cpu {
        let _ = pin_current_thread(cpu);
    }
    for (target, fd) in fds.iter().enumerate() {
        if let Some(fd) = *fd {
            // SAFETY: dup2 on descriptors this process owns; the target is 0, 1 or 2.
            if unsafe { libc::dup2(fd, target as i32) } < 0 {
                // SAFETY: _exit is always safe to call.
                unsafe { libc::_exit(126) };
            }
        }
    }
    if !filter.is_empty() {
        // SAFETY: plain prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            // SAFETY: as above.
            unsafe { libc::_exit(126) };
        }
        if bpf::install(filter).is_err() {
            // SAFETY: as above.
            unsafe { libc::_exit(126) };
        }
    }
    if no_aslr {
        const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;
        // SAFETY: personality with an integer argument; affects only this (child) process.
        if unsafe { libc::personality(ADDR_NO_RANDOMIZE) } == -1 {
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(126) };
        }
    }
    if trap_tsc {
        // SAFETY: plain prctl with integer arguments; affects only this (child) thread.
        if unsafe { libc::prctl(libc::PR_SET_TSC, libc::PR_TSC_SIGSEGV, 0, 0, 0) } != 0 {
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(126) };
        }
    }
    // SAFETY: signals ourselves; returns once the tracer has attached and sent SIGCONT.
    unsafe { libc::kill(libc::getpid(), libc::SIGSTOP) };
    // SAFETY: argv and envp are NULL-terminated arrays of valid C strings (caller's contract).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    // SAFETY: as above.
    unsafe { libc::_exit(127) }
}

/// Starts `cmd` stopped, attaches, and records it (and everything it starts) into `sink` until
/// every traced thread is gone. Runs on the calling thread, which must not be waiting for other
/// children concurrently.
pub fn record_command<S: Sink>(
    cmd: &Command,
    sink: S,
    opts: Options,
) -> Result<(Summary, S), LaunchError> {
    if let Some(cpu) = cmd.cpu {
        pin_current_thread(cpu).map_err(|err| LaunchError::Sys {
            what: "sched_setaffinity",
            err,
        })?;
    }
    let pid = spawn_stopped(cmd)?;
    let mut rec = Recorder::new(Ptrace, sink, opts);
    if let Err(e) = rec.attach(pid) {
        // SAFETY: kills and reaps our own child, which would otherwise stay stopped forever.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), libc::__WALL);
        }
        return Err(e.into());
    }
    let summary = rec.run()?;
    Ok((summary, rec.into_sink()))
}
