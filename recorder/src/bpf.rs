//! A classic-BPF seccomp filter written directly from the traced syscall list (no libseccomp),
//! for the `--exec` launcher. In containers runc compiles the merged OCI profile instead
//! ([`crate::profile`]).
//!
//! The filter returns `SECCOMP_RET_TRACE` for every listed x86_64 syscall, and also for every
//! syscall made through another ABI (i386 `int 0x80`, x32), which the recorder cannot decode and
//! reports as unrecordable; everything else is allowed.

use std::io;

/// `AUDIT_ARCH_X86_64`.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_TRACE` (the low 16 bits are data the tracer can read with GETEVENTMSG).
pub const RET_TRACE: u32 = 0x7ff0_0000;
/// Data returned with `RET_TRACE` for a syscall from the list.
pub const DATA_LISTED: u32 = 0;
/// Data returned with `RET_TRACE` for a syscall through a foreign ABI.
pub const DATA_FOREIGN_ABI: u32 = 1;
/// Bit set in x32 syscall numbers.
pub const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K
const OFF_NR: u32 = 0; // offsetof(struct seccomp_data, nr)
const OFF_ARCH: u32 = 4; // offsetof(struct seccomp_data, arch)

/// One BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant.
    pub k: u32,
}

const fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// Errors of filter construction and installation.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// Too many syscalls for the linear filter's 8-bit jumps.
    #[error("{0} syscalls is too many for one linear filter (at most 250)")]
    TooMany(usize),
    /// The kernel refused.
    #[error("{what}: {err}")]
    Sys {
        /// Which call.
        what: &'static str,
        /// Why.
        err: io::Error,
    },
}

/// The filter: trace every syscall in `nrs` (x86_64 numbers) and every foreign-ABI syscall,
/// allow the rest.
pub fn trace_filter(nrs: &[u32]) -> Result<Vec<Insn>, BpfError> {
    let n = nrs.len();
    let jt_max = u8::try_from(n).map_err(|_| BpfError::TooMany(n))?;
    if n > 250 {
        return Err(BpfError::TooMany(n));
    }
    let mut p = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET_K, RET_TRACE | DATA_FOREIGN_ABI),
        stmt(BPF_LD_W_ABS, OFF_NR),
        jump(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, RET_TRACE | DATA_FOREIGN_ABI),
    ];
    // After the n comparisons: [ret ALLOW, ret TRACE]. Comparison i jumps n - i forward to
    // reach the TRACE return.
    for (i, &nr) in nrs.iter().enumerate() {
        let jt = jt_max - u8::try_from(i).map_err(|_| BpfError::TooMany(n))?;
        p.push(jump(BPF_JEQ_K, nr, jt, 0));
    }
    p.push(stmt(BPF_RET_K, RET_ALLOW));
    p.push(stmt(BPF_RET_K, RET_TRACE | DATA_LISTED));
    Ok(p)
}

/// Runs `prog` on one syscall the way the kernel would, for the instructions this module emits.
/// Returns the action, or `None` for a program it does not understand.
pub fn run(prog: &[Insn], arch: u32, nr: u32) -> Option<u32> {
    let mut acc = 0u32;
    let mut pc = 0usize;
    loop {
        let insn = prog.get(pc)?;
        pc += 1;
        match insn.code {
            BPF_LD_W_ABS => {
                acc = match insn.k {
                    OFF_NR => nr,
                    OFF_ARCH => arch,
                    _ => return None,
                }
            }
            BPF_JEQ_K | BPF_JGE_K => {
                let taken = if insn.code == BPF_JEQ_K {
                    acc == insn.k
                } else {
                    acc >= insn.k
                };
                pc += usize::from(if taken { insn.jt } else { insn.jf });
            }
            BPF_RET_K => return Some(insn.k),
            _ => return None,
        }
    }
}

/// Installs `prog` as a seccomp filter on the calling thread. The caller must already have set
/// `PR_SET_NO_NEW_PRIVS` (or hold CAP_SYS_ADMIN). Async-signal-safe: usable between fork and
/// exec.
pub fn install(prog: &[Insn]) -> Result<(), BpfError> {
    let len = u16::try_from(prog.len()).map_err(|_| BpfError::TooMany(prog.len()))?;
    let fprog = libc::sock_fprog {
        len,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `prog`, a live slice of `#[repr(C)]` instructions laid out as
    // `struct sock_filter`; the kernel copies the program during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(BpfError::Sys {
            what: "seccomp(SECCOMP_SET_MODE_FILTER)",
            err: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_decisions() {
        let nrs = crate::syscalls::traced_numbers();
        let prog = trace_filter(&nrs).expect("filter");
        for nr in 0..500u32 {
            let want = if nrs.contains(&nr) {
                RET_TRACE | DATA_LISTED
            } else {
                RET_ALLOW
            };
            assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr), Some(want), "nr {nr}");
        }
        assert_eq!(
            run(&prog, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT),
            Some(RET_TRACE | DATA_FOREIGN_ABI)
        );
        assert_eq!(
            run(&prog, 0x4000_0003, 3),
            Some(RET_TRACE | DATA_FOREIGN_ABI),
            "i386"
        );
    }

    #[test]
    fn empty_and_oversized_lists() {
        let prog = trace_filter(&[]).expect("filter");
        assert_eq!(run(&prog, AUDIT_ARCH_X86_64, 0), Some(RET_ALLOW));
        let many: Vec<u32> = (0..300).collect();
        assert!(matches!(trace_filter(&many), Err(BpfError::TooMany(300))));
    }

    #[test]
    fn insn_layout_matches_sock_filter() {
        assert_eq!(
            std::mem::size_of::<Insn>(),
            std::mem::size_of::<libc::sock_filter>()
        );
    }
}
