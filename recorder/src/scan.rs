//! Finding, in a traced process's code, the instructions the recorder cannot trap here.
//!
//! `cpuid`, `rdrand`, `rdseed` and `rdpid` return machine-dependent values without a system
//! call, and this platform has no CPUID faulting (PLATFORM.md), so they cannot be recorded. The
//! recorder reports where they are instead: a replay of an epoch in which one executed may
//! diverge, and the log says so (format `Unrecordable` records, one per site).
//!
//! How: every executable mapping of every traced process is looked at once (files are cached by
//! device and inode, so a library mapped by many processes is decoded once). For a file-backed
//! mapping the file is read through `/proc/PID/map_files/` (the very file mapped, even if
//! replaced on disk since), its executable sections (ELF section headers; program headers if it
//! has none) are decoded with a linear sweep (`iced-x86`), and every site of those four
//! instructions inside the mapping is reported with its address in the process. Executable
//! memory that is not a file (code generated at run time) cannot be scanned ahead: it is
//! reported as a gap with its range. The vDSO is skipped: its time entry points are patched
//! by the recorder, and its own code is not reached through them.
//!
//! A linear sweep can misread data embedded in code, and a site found is not necessarily
//! executed: what is reported is "present in the code", an upper bound of what might diverge.
//! The scan runs beside the traced threads, not in their way: a process that ends before the
//! scanner first looks at it (a few milliseconds on an idle machine, longer on a loaded one)
//! goes unscanned.
//!
//! [`spawn_scanner`] runs this on a thread of its own (never the tracing thread: reading files
//! takes milliseconds), told by the recorder which processes exist ([`ProcessList`]: attach,
//! fork, exec) and rescanning each one every [`RESCAN`] for libraries loaded later.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use rrc_eventlog::{GapKind, Unrecordable};

use crate::event::Tid;
use crate::vdso::{u16_at, u32_at, u64_at};

/// How often every process is looked at again (libraries opened later).
pub const RESCAN: Duration = Duration::from_secs(1);
/// Sites reported per mapping and instruction at most; the rest are counted in one gap.
pub const MAX_SITES: usize = 64;

/// An instruction site found in code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    /// Which instruction.
    pub what: Unrecordable,
    /// Its address (in the process for [`scan_process`], else as given to [`sites_in_code`]).
    pub ip: u64,
}

/// Every `cpuid`, `rdrand`, `rdseed` and `rdpid` of a linear sweep over `code`, which is
/// loaded at `ip`.
pub fn sites_in_code(code: &[u8], ip: u64) -> Vec<Site> {
    let mut out = Vec::new();
    let mut d = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    while d.can_decode() {
        let insn = d.decode();
        let what = match insn.mnemonic() {
            Mnemonic::Cpuid => Unrecordable::Cpuid,
            Mnemonic::Rdrand => Unrecordable::Rdrand,
            Mnemonic::Rdseed => Unrecordable::Rdseed,
            Mnemonic::Rdpid => Unrecordable::Rdpid,
            _ => continue,
        };
        out.push(Site {
            what,
            ip: insn.ip(),
        });
    }
    out
}

/// The executable ranges of an ELF64 little-endian x86_64 file, as (file offset, length):
/// sections with `SHF_EXECINSTR` (`SHT_PROGBITS`), or the `PF_X` `PT_LOAD` segments of a file
/// without section headers. Every range lies inside the file.
pub fn exec_ranges(elf: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let len = elf.len() as u64;
    let inside = |off: u64, size: u64| off.checked_add(size).is_some_and(|end| end <= len);
    let bad = || "truncated ELF header".to_string();
    let shoff = u64_at(elf, 0x28).ok_or_else(bad)?;
    let shentsize = u64::from(u16_at(elf, 0x3a).ok_or_else(bad)?);
    let shnum = u64::from(u16_at(elf, 0x3c).ok_or_else(bad)?);
    let mut out = Vec::new();
    if shoff != 0 && shnum > 0 && shentsize >= 0x40 {
        for i in 0..shnum {
            let at = shoff.saturating_add(i.saturating_mul(shentsize));
            let Ok(at) = usize::try_from(at) else { break };
            let (Some(kind), Some(flags), Some(off), Some(size)) = (
                u32_at(elf, at + 4),
                u64_at(elf, at + 8),
                u64_at(elf, at + 0x18),
                u64_at(elf, at + 0x20),
            ) else {
                break;
            };
            const SHT_PROGBITS: u32 = 1;
            const SHF_EXECINSTR: u64 = 4;
            if kind == SHT_PROGBITS && flags & SHF_EXECINSTR != 0 && size > 0 && inside(off, size) {
                out.push((off, size));
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
    }
    let phoff = u64_at(elf, 0x20).ok_or_else(bad)?;
    let phentsize = u64::from(u16_at(elf, 0x36).ok_or_else(bad)?);
    let phnum = u64::from(u16_at(elf, 0x38).ok_or_else(bad)?);
    if phentsize < 0x38 {
        return Ok(out);
    }
    for i in 0..phnum {
        let at = phoff.saturating_add(i.saturating_mul(phentsize));
        let Ok(at) = usize::try_from(at) else { break };
        let (Some(kind), Some(flags), Some(off), Some(size)) = (
            u32_at(elf, at),
            u32_at(elf, at + 4),
            u64_at(elf, at + 8),
            u64_at(elf, at + 0x20),
        ) else {
            break;
        };
        const PT_LOAD: u32 = 1;
        const PF_X: u32 = 1;
        if kind == PT_LOAD && flags & PF_X != 0 && size > 0 && inside(off, size) {
            out.push((off, size));
        }
    }
    Ok(out)
}

/// An executable mapping of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// Address after the last.
    pub end: u64,
    /// File offset of `start`.
    pub offset: u64,
    /// `major:minor` of the file's device.
    pub dev: String,
    /// The file's inode (0: not a file).
    pub inode: u64,
    /// The path or pseudo-name (`[vdso]`, ...), empty for anonymous memory.
    pub name: String,
}

/// The executable mappings in the text of `/proc/PID/maps`.
pub fn exec_mappings(maps: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if perms.as_bytes().get(2) != Some(&b'x') {
            continue;
        }
        let name = f.collect::<Vec<_>>().join(" ");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset), Ok(inode)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            u64::from_str_radix(offset, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        out.push(Mapping {
            start,
            end,
            offset,
            dev: dev.to_string(),
            inode,
            name,
        });
    }
    out
}

/// What scanning a process found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// An instruction site, at its address in the process.
    Site {
        /// The site.
        site: Site,
        /// The file it is in.
        path: String,
    },
    /// Something not recordable or not scannable (a gap record).
    Gap {
        /// What kind.
        kind: GapKind,
        /// An address it concerns.
        ip: u64,
        /// In words.
        detail: String,
    },
}

/// The sites of a file, by file offset; cached per (device, inode).
type FileSites = Vec<(Unrecordable, u64)>;

/// Scans processes, remembering what it has seen.
#[derive(Debug, Default)]
pub struct Scanner {
    files: HashMap<(String, u64), Result<FileSites, String>>,
    /// Per process and generation: the mappings already reported on (by start).
    seen: HashMap<Tid, (u64, HashSet<u64>)>,
}

impl Scanner {
    /// A scanner that has seen nothing.
    pub fn new() -> Scanner {
        Scanner::default()
    }

    /// What is new in process `pid` (generation `generation`: it changes at exec, when
    /// everything is new again).
    pub fn scan_process(&mut self, pid: Tid, generation: u64) -> io::Result<Vec<Finding>> {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        let entry = self.seen.entry(pid).or_insert((generation, HashSet::new()));
        if entry.0 != generation {
            *entry = (generation, HashSet::new());
        }
        let mut out = Vec::new();
        for m in exec_mappings(&maps) {
            if !self.seen.get_mut(&pid).is_some_and(|e| e.1.insert(m.start)) {
                continue;
            }
            match m.name.as_str() {
                "[vdso]" | "[vsyscall]" => continue,
                // CRIU's parasite, there only while CRIU dumps the process for a checkpoint.
                n if n.starts_with("/memfd:CRIUMFD") => continue,
                n if m.inode == 0 => {
                    out.push(Finding::Gap {
                        kind: GapKind::UnscannedCode,
                        ip: m.start,
                        detail: format!(
                            "executable memory {:#x}-{:#x} {} is not a file (code generated at \
                             run time?): not scanned for cpuid/rdrand/rdseed/rdpid",
                            m.start,
                            m.end,
                            if n.is_empty() { "(anonymous)" } else { n }
                        ),
                    });
                    continue;
                }
                _ => {}
            }
            let key = (m.dev.clone(), m.inode);
            if !self.files.contains_key(&key) {
                let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
                let elf = match std::fs::read(&path) {
                    Ok(b) => b,
                    // The mapping went away meanwhile (an exec, an unmap, the process ended):
                    // nothing to report; if it is back next time it is scanned then.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        if let Some(e) = self.seen.get_mut(&pid) {
                            e.1.remove(&m.start);
                        }
                        continue;
                    }
                    Err(e) => {
                        out.push(Finding::Gap {
                            kind: GapKind::UnscannedCode,
                            ip: m.start,
                            detail: format!(
                                "executable mapping {:#x}-{:#x} not scanned: reading {}: {e}",
                                m.start, m.end, m.name
                            ),
                        });
                        continue;
                    }
                };
                let sites = file_sites(&elf).map_err(|e| format!("{}: {e}", m.name));
                self.files.insert(key.clone(), sites);
            }
            match self.files.get(&key) {
                Some(Ok(sites)) => out.extend(mapping_sites(&m, sites)),
                Some(Err(e)) => out.push(Finding::Gap {
                    kind: GapKind::UnscannedCode,
                    ip: m.start,
                    detail: format!(
                        "executable mapping {:#x}-{:#x} not scanned: {e}",
                        m.start, m.end
                    ),
                }),
                None => {}
            }
        }
        Ok(out)
    }

    /// Forgets a process that is gone.
    pub fn forget(&mut self, pid: Tid) {
        self.seen.remove(&pid);
    }
}

/// The sites of an ELF file, by file offset.
fn file_sites(elf: &[u8]) -> Result<FileSites, String> {
    let mut out = Vec::new();
    for (off, len) in exec_ranges(elf)? {
        let (Ok(a), Ok(b)) = (usize::try_from(off), usize::try_from(off + len)) else {
            continue;
        };
        let Some(code) = elf.get(a..b) else { continue };
        out.extend(sites_in_code(code, off).into_iter().map(|s| (s.what, s.ip)));
    }
    Ok(out)
}

/// The file's sites that `m` maps, at their addresses in the process, at most [`MAX_SITES`]
/// per instruction (the rest in one gap).
fn mapping_sites(m: &Mapping, sites: &FileSites) -> Vec<Finding> {
    let len = m.end.saturating_sub(m.start);
    let mut per: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut out = Vec::new();
    let mut more = 0usize;
    for &(what, off) in sites {
        if off < m.offset || off >= m.offset + len {
            continue;
        }
        let n = per.entry(name(what)).or_default();
        *n += 1;
        if *n > MAX_SITES {
            more += 1;
            continue;
        }
        out.push(Finding::Site {
            site: Site {
                what,
                ip: m.start + (off - m.offset),
            },
            path: m.name.clone(),
        });
    }
    if more > 0 {
        out.push(Finding::Gap {
            kind: GapKind::Other,
            ip: m.start,
            detail: format!(
                "{more} more cpuid/rdrand/rdseed/rdpid sites in {} are not listed",
                m.name
            ),
        });
    }
    out
}

/// The instruction's name.
pub fn name(what: Unrecordable) -> &'static str {
    match what {
        Unrecordable::Cpuid => "cpuid",
        Unrecordable::Rdrand => "rdrand",
        Unrecordable::Rdseed => "rdseed",
        Unrecordable::Rdpid => "rdpid",
    }
}

/// The traced processes (host pids) and a generation each (bumped at exec), kept by the
/// recorder for the scanner thread.
#[derive(Debug, Default)]
pub struct ProcessList {
    inner: Mutex<(BTreeMap<Tid, u64>, u64)>,
    changed: Condvar,
}

impl ProcessList {
    /// A process appeared, or replaced its image (exec): scan it (again).
    pub fn add(&self, pid: Tid) {
        if let Ok(mut g) = self.inner.lock() {
            g.1 += 1;
            let generation = g.1;
            g.0.insert(pid, generation);
        }
        self.changed.notify_all();
    }

    /// Wakes the scanner (to see that it must stop).
    pub fn wake(&self) {
        if let Ok(mut g) = self.inner.lock() {
            g.1 += 1;
        }
        self.changed.notify_all();
    }

    /// A process is gone.
    pub fn remove(&self, pid: Tid) {
        if let Ok(mut g) = self.inner.lock() {
            g.0.remove(&pid);
        }
    }

    /// The processes and their generations.
    pub fn snapshot(&self) -> Vec<(Tid, u64)> {
        self.inner
            .lock()
            .map(|g| g.0.iter().map(|(&p, &g)| (p, g)).collect())
            .unwrap_or_default()
    }

    /// Waits until a process is added, or `timeout`.
    fn wait(&self, timeout: Duration) {
        if let Ok(g) = self.inner.lock() {
            let before = g.1;
            let _ = self
                .changed
                .wait_timeout_while(g, timeout, |g| g.1 == before);
        }
    }
}

/// Where the scanner's findings go: `report(pid, finding)` returns false when it cannot take
/// them yet (the log is not open); they are offered again at the next scan.
pub type Report = Box<dyn FnMut(Tid, &[Finding]) -> bool + Send>;

/// Runs the scanner on a thread of its own until `stop` is set: every process of `list` is
/// scanned when it appears and every [`RESCAN`].
pub fn spawn_scanner(
    list: Arc<ProcessList>,
    mut report: Report,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rrc-scan".into())
        .spawn(move || {
            let mut scanner = Scanner::new();
            let mut known: HashSet<Tid> = HashSet::new();
            while !stop.load(Ordering::SeqCst) {
                let procs = list.snapshot();
                let now: HashSet<Tid> = procs.iter().map(|p| p.0).collect();
                for gone in known.difference(&now) {
                    scanner.forget(*gone);
                }
                known = now;
                for (pid, generation) in procs {
                    let Ok(found) = scanner.scan_process(pid, generation) else {
                        continue;
                    };
                    if !found.is_empty() && !report(pid, &found) {
                        // Offered again: forget that the mappings were seen.
                        scanner.forget(pid);
                    }
                }
                list.wait(RESCAN);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_instruction_and_skips_lookalikes_inside_others() {
        // cpuid; nop; rdrand eax; rdseed rcx; rdpid rax; mov eax, 0x0fa20fa2 (looks like two
        // cpuids in its immediate); ret
        let code = [
            0x0f, 0xa2, 0x90, 0x0f, 0xc7, 0xf0, 0x48, 0x0f, 0xc7, 0xf9, 0xf3, 0x0f, 0xc7, 0xf8,
            0xb8, 0xa2, 0x0f, 0xa2, 0x0f, 0xc3,
        ];
        let sites = sites_in_code(&code, 0x1000);
        assert_eq!(
            sites,
            vec![
                Site {
                    what: Unrecordable::Cpuid,
                    ip: 0x1000
                },
                Site {
                    what: Unrecordable::Rdrand,
                    ip: 0x1003
                },
                Site {
                    what: Unrecordable::Rdseed,
                    ip: 0x1006
                },
                Site {
                    what: Unrecordable::Rdpid,
                    ip: 0x100a
                },
            ]
        );
    }

    #[test]
    fn parses_maps_and_keeps_executable_ones() {
        let maps = "\
55d0c0a00000-55d0c0a20000 r--p 00000000 08:01 1234 /usr/bin/redis-server\n\
55d0c0a20000-55d0c0b20000 r-xp 00020000 08:01 1234 /usr/bin/redis-server\n\
7f0000000000-7f0000001000 rwxp 00000000 00:00 0 \n\
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]\n\
garbage\n";
        let m = exec_mappings(maps);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].offset, 0x20000);
        assert_eq!(m[0].inode, 1234);
        assert_eq!(m[0].name, "/usr/bin/redis-server");
        assert_eq!(m[1].name, "");
        assert_eq!(m[2].name, "[vdso]");
    }

    #[test]
    fn elf_ranges_of_a_real_binary_are_inside_it_and_garbage_is_refused() {
        let exe = std::fs::read("/proc/self/exe").expect("own binary");
        let ranges = exec_ranges(&exe).expect("an ELF file");
        assert!(!ranges.is_empty());
        for (off, len) in ranges {
            assert!(off + len <= exe.len() as u64);
        }
        assert!(exec_ranges(b"not an elf").is_err());
        let mut short = exe[..0x30].to_vec();
        short[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(exec_ranges(&short).is_err() || exec_ranges(&short).is_ok_and(|r| r.is_empty()));
    }

    #[test]
    fn this_process_is_scanned_and_its_sites_are_inside_its_mappings() {
        // The test binary links std, whose CPU feature detection executes cpuid.
        let pid = std::process::id() as Tid;
        let mut s = Scanner::new();
        let found = s.scan_process(pid, 1).expect("scan");
        let maps = exec_mappings(&std::fs::read_to_string("/proc/self/maps").expect("maps"));
        let sites: Vec<&Site> = found
            .iter()
            .filter_map(|f| match f {
                Finding::Site { site, .. } => Some(site),
                _ => None,
            })
            .collect();
        assert!(
            sites.iter().any(|s| s.what == Unrecordable::Cpuid),
            "no cpuid in a Rust test binary and its libraries: {found:?}"
        );
        for site in sites {
            assert!(maps.iter().any(|m| site.ip >= m.start && site.ip < m.end));
        }
        // Nothing new the second time; everything again after an exec (a new generation).
        assert!(s.scan_process(pid, 1).expect("scan").is_empty());
        assert!(!s.scan_process(pid, 2).expect("scan").is_empty());
    }
}
