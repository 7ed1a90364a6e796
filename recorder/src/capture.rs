//! Which bytes a syscall wrote into the tracee, read back at its exit stop.
//!
//! Pure logic over a [`MemRead`], so that every layout (iovecs, msghdr, mmsghdr, value-result
//! socket addresses) is unit-tested against fake memory.

use std::io;

use crate::event::MemWrite;
use crate::syscalls::{Out, TracedSyscall};

/// Reads tracee memory. A short result means the rest was not readable.
pub trait MemRead {
    /// Up to `len` bytes at `addr`.
    fn read(&mut self, addr: u64, len: usize) -> io::Result<Vec<u8>>;
}

impl<F: FnMut(u64, usize) -> io::Result<Vec<u8>>> MemRead for F {
    fn read(&mut self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        self(addr, len)
    }
}

/// Largest single region recorded (a bound against a racing thread rewriting lengths the
/// recorder reads back from the tracee).
pub const MAX_REGION: usize = 64 << 20;
/// Largest iovec count (`UIO_MAXIOV`).
pub const MAX_IOV: usize = 1024;
/// Largest socket address (`sizeof(struct sockaddr_storage)`).
pub const MAX_SOCKADDR: usize = 128;
/// Largest getsockopt value or control message area recorded.
pub const MAX_OPT: usize = 1 << 20;
/// Largest fd count for poll/select.
pub const MAX_FDS: usize = 1 << 20;

const MSGHDR: usize = 56;
const MMSGHDR: usize = 64;
const EINTR: i64 = 4;

/// What the recorder reads at a syscall's entry: the value of each value-result length
/// ([`Out::SockAddr`]'s `len`), in the order of the syscall's `outs`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntrySnapshot {
    /// `*args[len]` at entry for each `SockAddr` out; `None` when the pointer was null or
    /// unreadable.
    pub lens: Vec<Option<u32>>,
    /// For `execve`/`execveat`: the program path the call names (without its NUL), read at
    /// entry because the exec replaces the memory holding it; `None` if unreadable.
    pub path: Option<Vec<u8>>,
}

/// The longest path read for an exec (`PATH_MAX`).
pub const MAX_PATH: usize = 4096;

/// Reads what the syscall's exit will need to know about its arguments' state at entry.
pub fn entry_snapshot(sc: &TracedSyscall, args: &[u64; 6], mem: &mut dyn MemRead) -> EntrySnapshot {
    let mut lens = Vec::new();
    for out in sc.outs {
        if let Out::SockAddr { len, .. } = *out {
            let ptr = arg(args, len);
            lens.push(if ptr == 0 { None } else { read_u32(mem, ptr) });
        }
    }
    let path = match sc.nr {
        crate::syscalls::nr::EXECVE => read_cstr(mem, arg(args, 0)),
        crate::syscalls::nr::EXECVEAT => read_cstr(mem, arg(args, 1)),
        _ => None,
    };
    EntrySnapshot { lens, path }
}

/// The NUL-terminated string at `addr` (at most [`MAX_PATH`] bytes, without the NUL); `None`
/// for a null pointer, an unreadable one, or no NUL within the limit.
pub fn read_cstr(mem: &mut dyn MemRead, addr: u64) -> Option<Vec<u8>> {
    if addr == 0 {
        return None;
    }
    let mut out = Vec::new();
    while out.len() < MAX_PATH {
        // Small pieces, so that a string near the end of a mapping is read up to its end.
        let want = 256.min(MAX_PATH - out.len());
        let chunk = mem.read(addr.wrapping_add(out.len() as u64), want).ok()?;
        if let Some(i) = chunk.iter().position(|&b| b == 0) {
            out.extend_from_slice(&chunk[..i]);
            return Some(out);
        }
        if chunk.is_empty() {
            return None;
        }
        out.extend_from_slice(&chunk);
    }
    None
}

/// The memory a completed syscall wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// The regions, in the order the syscall's description lists them.
    pub writes: Vec<MemWrite>,
    /// Some region could not be read back completely.
    pub incomplete: bool,
}

struct Cap<'a> {
    mem: &'a mut dyn MemRead,
    out: Captured,
}

impl Cap<'_> {
    /// Records `len` bytes at `addr` (nothing for a null pointer or zero length).
    fn region(&mut self, addr: u64, len: usize) {
        if addr == 0 || len == 0 {
            return;
        }
        let want = len.min(MAX_REGION);
        if want < len {
            self.out.incomplete = true;
        }
        match self.mem.read(addr, want) {
            Ok(data) => {
                if data.len() < want {
                    self.out.incomplete = true;
                }
                if !data.is_empty() {
                    self.out.writes.push(MemWrite { addr, data });
                }
            }
            Err(_) => self.out.incomplete = true,
        }
    }

    /// Reads (without recording) `len` bytes the recorder needs to interpret the layout.
    fn peek(&mut self, addr: u64, len: usize) -> Option<Vec<u8>> {
        match self.mem.read(addr, len) {
            Ok(d) if d.len() == len => Some(d),
            _ => {
                self.out.incomplete = true;
                None
            }
        }
    }

    /// Records the first `total` bytes of the iovec array at `iov` with `cnt` entries.
    fn iovecs(&mut self, iov: u64, cnt: u64, total: u64) {
        if iov == 0 || total == 0 {
            return;
        }
        let cnt = (cnt as usize).min(MAX_IOV);
        let Some(raw) = self.peek(iov, cnt * 16) else {
            return;
        };
        let mut left = total;
        for e in raw.chunks_exact(16) {
            if left == 0 {
                break;
            }
            let base = u64_at(e, 0);
            let len = u64_at(e, 8);
            let n = len.min(left);
            self.region(base, n as usize);
            left -= n;
        }
        if left > 0 {
            self.out.incomplete = true;
        }
    }

    /// Records a `struct msghdr` at `msg` after a receive of `len` bytes: the data, the
    /// control data, the sender's address, then the header itself, the order in which the
    /// kernel writes them (and the event log's rule: a receive's data comes first).
    fn msghdr(&mut self, msg: u64, len: u64) {
        let Some(h) = self.peek(msg, MSGHDR) else {
            return;
        };
        self.msghdr_parts(&h, len);
        self.out.writes.push(MemWrite { addr: msg, data: h });
    }

    fn msghdr_parts(&mut self, h: &[u8], len: u64) {
        let name = u64_at(h, 0);
        let namelen = u64::from(u32_at(h, 8));
        let iov = u64_at(h, 16);
        let iovlen = u64_at(h, 24);
        let control = u64_at(h, 32);
        let controllen = u64_at(h, 40);
        self.iovecs(iov, iovlen, len);
        self.region(control, (controllen as usize).min(MAX_OPT));
        self.region(name, (namelen as usize).min(MAX_SOCKADDR));
    }
}

/// The bytes syscall `sc` wrote, given its arguments, its entry snapshot and its return value.
pub fn capture(
    sc: &TracedSyscall,
    args: &[u64; 6],
    entry: &EntrySnapshot,
    ret: i64,
    mem: &mut dyn MemRead,
) -> Captured {
    let mut cap = Cap {
        mem,
        out: Captured::default(),
    };
    // Failed calls write nothing, except the "time left" of sleeps and waits cut short.
    if ret < 0 && ret != -EINTR {
        return cap.out;
    }
    let count = ret.max(0) as u64;
    let mut sockaddr_i = 0usize;
    for out in sc.outs {
        match *out {
            Out::RetBytes { buf } => cap.region(arg(args, buf), count as usize),
            Out::RetBytesPlus { buf, extra } if ret >= 0 => {
                cap.region(arg(args, buf), count as usize + extra)
            }
            Out::RetBytesPlus { .. } => {}
            Out::RetIov { iov, cnt } => cap.iovecs(arg(args, iov), arg(args, cnt), count),
            Out::RetElems { buf, elem } => {
                cap.region(arg(args, buf), (count as usize).saturating_mul(elem))
            }
            Out::ArgElems {
                buf,
                count: n,
                elem,
            } => {
                let n = (arg(args, n) as usize).min(MAX_FDS);
                cap.region(arg(args, buf), n * elem);
            }
            Out::FdSet { set } => {
                let nfds = (arg(args, 0) as usize).min(MAX_FDS);
                cap.region(arg(args, set), nfds.div_ceil(64) * 8);
            }
            Out::Fixed { buf, size } => {
                let before = cap.out.incomplete;
                cap.region(arg(args, buf), size);
                if ret < 0 {
                    // On EINTR only some of these were written; unreadable ones were not.
                    cap.out.incomplete = before;
                }
            }
            Out::SockAddr { addr, len } => {
                let given = entry.lens.get(sockaddr_i).copied().flatten();
                sockaddr_i += 1;
                let lenp = arg(args, len);
                if ret < 0 || lenp == 0 {
                    continue;
                }
                let Some(actual) = read_u32(cap.mem, lenp) else {
                    cap.out.incomplete = true;
                    continue;
                };
                let n = given.unwrap_or(actual).min(actual) as usize;
                cap.region(arg(args, addr), n.min(MAX_OPT));
                cap.out.writes.push(MemWrite {
                    addr: lenp,
                    data: actual.to_ne_bytes().to_vec(),
                });
            }
            Out::Msghdr { msg } if ret >= 0 => cap.msghdr(arg(args, msg), count),
            Out::Msghdr { .. } => {}
            Out::Mmsghdr { vec } if ret > 0 => {
                let vec = arg(args, vec);
                let n = (count as usize).min(MAX_IOV);
                let Some(raw) = cap.peek(vec, n * MMSGHDR) else {
                    continue;
                };
                // Each message's data, control data and address, then the headers (with
                // their `msg_len`), as the kernel writes them.
                for e in raw.chunks_exact(MMSGHDR) {
                    let len = u64::from(u32_at(e, MSGHDR));
                    cap.msghdr_parts(&e[..MSGHDR], len);
                }
                cap.out.writes.push(MemWrite {
                    addr: vec,
                    data: raw,
                });
            }
            Out::Mmsghdr { .. } => {}
        }
    }
    cap.out
}

fn arg(args: &[u64; 6], i: usize) -> u64 {
    args.get(i).copied().unwrap_or(0)
}

fn read_u32(mem: &mut dyn MemRead, addr: u64) -> Option<u32> {
    let d = mem.read(addr, 4).ok()?;
    Some(u32::from_ne_bytes(d.get(..4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_ne_bytes)
        .unwrap_or(0)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_ne_bytes)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscalls::by_name;
    use std::collections::BTreeMap;

    /// Sparse fake memory: regions by start address.
    #[derive(Default)]
    struct Fake(BTreeMap<u64, Vec<u8>>);

    impl Fake {
        fn put(&mut self, addr: u64, data: &[u8]) {
            self.0.insert(addr, data.to_vec());
        }
    }

    impl MemRead for Fake {
        fn read(&mut self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
            for (&start, data) in self.0.range(..=addr).rev().take(1) {
                let off = (addr - start) as usize;
                if off <= data.len() {
                    let end = (off + len).min(data.len());
                    return Ok(data[off..end].to_vec());
                }
            }
            Ok(Vec::new())
        }
    }

    fn sc(name: &str) -> &'static TracedSyscall {
        by_name(name).expect("traced")
    }

    fn run(name: &str, args: [u64; 6], ret: i64, mem: &mut Fake) -> Captured {
        let s = sc(name);
        let entry = entry_snapshot(s, &args, mem);
        capture(s, &args, &entry, ret, mem)
    }

    fn iov(parts: &[(u64, u64)]) -> Vec<u8> {
        parts
            .iter()
            .flat_map(|(b, l)| b.to_ne_bytes().into_iter().chain(l.to_ne_bytes()))
            .collect()
    }

    #[test]
    fn read_records_ret_bytes() {
        let mut m = Fake::default();
        m.put(0x1000, b"hello world");
        let c = run("read", [3, 0x1000, 100, 0, 0, 0], 5, &mut m);
        assert_eq!(
            c.writes,
            vec![MemWrite {
                addr: 0x1000,
                data: b"hello".to_vec()
            }]
        );
        assert!(!c.incomplete);
        assert_eq!(
            run("read", [3, 0x1000, 100, 0, 0, 0], 0, &mut m),
            Captured::default()
        );
        assert_eq!(
            run("read", [3, 0x1000, 100, 0, 0, 0], -11, &mut m),
            Captured::default()
        );
    }

    #[test]
    fn short_memory_is_incomplete() {
        let mut m = Fake::default();
        m.put(0x1000, b"abc");
        let c = run("getrandom", [0x1000, 8, 0, 0, 0, 0], 8, &mut m);
        assert!(c.incomplete);
        assert_eq!(c.writes[0].data, b"abc");
    }

    #[test]
    fn readv_distributes_over_iovecs() {
        let mut m = Fake::default();
        m.put(0x100, &iov(&[(0x1000, 4), (0x2000, 0), (0x3000, 10)]));
        m.put(0x1000, b"abcd");
        m.put(0x3000, b"efghijklmn");
        let c = run("readv", [3, 0x100, 3, 0, 0, 0], 7, &mut m);
        assert_eq!(
            c.writes,
            vec![
                MemWrite {
                    addr: 0x1000,
                    data: b"abcd".to_vec()
                },
                MemWrite {
                    addr: 0x3000,
                    data: b"efg".to_vec()
                },
            ]
        );
        assert!(!c.incomplete);
        // More returned than the iovecs hold: a racing thread changed them.
        let c = run("readv", [3, 0x100, 1, 0, 0, 0], 7, &mut m);
        assert!(c.incomplete);
    }

    #[test]
    fn accept_records_address_up_to_the_given_length() {
        let mut m = Fake::default();
        m.put(0x500, &16u32.to_ne_bytes()); // kernel's actual length, also the given one
        m.put(
            0x600,
            &[2, 0, 0x1f, 0x90, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        let c = run("accept4", [3, 0x600, 0x500, 0, 0, 0], 5, &mut m);
        assert_eq!(c.writes.len(), 2);
        assert_eq!(c.writes[0].addr, 0x600);
        assert_eq!(c.writes[0].data.len(), 16);
        assert_eq!(
            c.writes[1],
            MemWrite {
                addr: 0x500,
                data: 16u32.to_ne_bytes().to_vec()
            }
        );

        // Given 8 at entry, actual 16 at exit: only 8 bytes were written.
        let s = sc("accept");
        let args = [3, 0x600, 0x500, 0, 0, 0];
        let entry = EntrySnapshot {
            lens: vec![Some(8)],
            path: None,
        };
        let c = capture(s, &args, &entry, 5, &mut m);
        assert_eq!(c.writes[0].data.len(), 8);
        // Null address: nothing.
        let c = run("accept", [3, 0, 0, 0, 0, 0], 5, &mut m);
        assert!(c.writes.is_empty() && !c.incomplete);
    }

    #[test]
    fn recvmsg_records_data_control_name_then_header() {
        let mut m = Fake::default();
        let mut h = Vec::new();
        h.extend(0x700u64.to_ne_bytes()); // msg_name
        h.extend(16u32.to_ne_bytes()); // msg_namelen (kernel-updated)
        h.extend([0u8; 4]);
        h.extend(0x100u64.to_ne_bytes()); // msg_iov
        h.extend(2u64.to_ne_bytes()); // msg_iovlen
        h.extend(0x800u64.to_ne_bytes()); // msg_control
        h.extend(24u64.to_ne_bytes()); // msg_controllen (kernel-updated)
        h.extend(0u32.to_ne_bytes()); // msg_flags
        h.extend([0u8; 4]);
        assert_eq!(h.len(), MSGHDR);
        m.put(0x50, &h);
        m.put(0x100, &iov(&[(0x1000, 3), (0x2000, 100)]));
        m.put(0x700, &[9u8; 16]);
        m.put(0x800, &[7u8; 64]);
        m.put(0x1000, b"abc");
        m.put(0x2000, b"defghi");
        let c = run("recvmsg", [3, 0x50, 0, 0, 0, 0], 5, &mut m);
        let addrs: Vec<(u64, usize)> = c.writes.iter().map(|w| (w.addr, w.data.len())).collect();
        assert_eq!(
            addrs,
            vec![
                (0x1000, 3),
                (0x2000, 2),
                (0x800, 24),
                (0x700, 16),
                (0x50, MSGHDR),
            ]
        );
        assert!(!c.incomplete);
    }

    #[test]
    fn exec_path_is_read_at_entry() {
        let mut m = Fake::default();
        let mut long = vec![b'a'; 300];
        long.push(0);
        m.put(0x1000, b"/bin/true\0garbage");
        m.put(0x2000, &long);
        m.put(0x3000, &[b'b'; 100]); // no NUL before the end of the mapping
        let s = sc("execve");
        let e = entry_snapshot(s, &[0x1000, 0, 0, 0, 0, 0], &mut m);
        assert_eq!(e.path.as_deref(), Some(&b"/bin/true"[..]));
        let e = entry_snapshot(s, &[0x2000, 0, 0, 0, 0, 0], &mut m);
        assert_eq!(e.path, Some(vec![b'a'; 300]), "read across pieces");
        assert_eq!(
            entry_snapshot(s, &[0x3000, 0, 0, 0, 0, 0], &mut m).path,
            None
        );
        assert_eq!(entry_snapshot(s, &[0, 0, 0, 0, 0, 0], &mut m).path, None);
        let at = sc("execveat");
        let e = entry_snapshot(at, &[3, 0x1000, 0, 0, 0, 0], &mut m);
        assert_eq!(e.path.as_deref(), Some(&b"/bin/true"[..]));
        assert_eq!(
            entry_snapshot(sc("read"), &[0x1000, 0, 0, 0, 0, 0], &mut m).path,
            None
        );
    }

    #[test]
    fn recvmmsg_records_each_message() {
        let mut m = Fake::default();
        let mut v = Vec::new();
        for (iovp, len) in [(0x100u64, 2u32), (0x200, 1)] {
            v.extend(0u64.to_ne_bytes()); // no name
            v.extend(0u32.to_ne_bytes());
            v.extend([0u8; 4]);
            v.extend(iovp.to_ne_bytes());
            v.extend(1u64.to_ne_bytes());
            v.extend(0u64.to_ne_bytes()); // no control
            v.extend(0u64.to_ne_bytes());
            v.extend(0u32.to_ne_bytes());
            v.extend([0u8; 4]);
            v.extend(len.to_ne_bytes()); // msg_len
            v.extend([0u8; 4]);
        }
        m.put(0x50, &v);
        m.put(0x100, &iov(&[(0x1000, 10)]));
        m.put(0x200, &iov(&[(0x2000, 10)]));
        m.put(0x1000, b"xyz");
        m.put(0x2000, b"q");
        let c = run("recvmmsg", [3, 0x50, 8, 0, 0, 0], 2, &mut m);
        let addrs: Vec<(u64, usize)> = c.writes.iter().map(|w| (w.addr, w.data.len())).collect();
        assert_eq!(addrs, vec![(0x1000, 2), (0x2000, 1), (0x50, 2 * MMSGHDR)]);
    }

    #[test]
    fn epoll_poll_select_sizes() {
        let mut m = Fake::default();
        m.put(0x1000, &[1u8; 4096]);
        let c = run("epoll_wait", [3, 0x1000, 64, -1i64 as u64, 0, 0], 3, &mut m);
        assert_eq!(c.writes[0].data.len(), 36);
        let c = run("poll", [0x1000, 5, 100, 0, 0, 0], 1, &mut m);
        assert_eq!(c.writes[0].data.len(), 40);
        let c = run("pselect6", [65, 0x1000, 0, 0x1000, 0x1000, 0], 1, &mut m);
        let lens: Vec<usize> = c.writes.iter().map(|w| w.data.len()).collect();
        assert_eq!(lens, vec![16, 16, 16]);
    }

    #[test]
    fn time_and_interrupted_sleeps() {
        let mut m = Fake::default();
        m.put(0x1000, &[5u8; 16]);
        let c = run("clock_gettime", [1, 0x1000, 0, 0, 0, 0], 0, &mut m);
        assert_eq!(
            c.writes,
            vec![MemWrite {
                addr: 0x1000,
                data: vec![5u8; 16]
            }]
        );
        let c = run("gettimeofday", [0x1000, 0, 0, 0, 0, 0], 0, &mut m);
        assert_eq!(c.writes.len(), 1);
        // nanosleep interrupted: the remaining time was written.
        let c = run("nanosleep", [0x2000, 0x1000, 0, 0, 0, 0], -EINTR, &mut m);
        assert_eq!(c.writes.len(), 1);
        assert!(!c.incomplete);
        // time(NULL): only the return value.
        let c = run("time", [0, 0, 0, 0, 0, 0], 1_700_000_000, &mut m);
        assert!(c.writes.is_empty());
    }
}
