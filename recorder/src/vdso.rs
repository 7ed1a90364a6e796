//! Making vDSO calls trap: parse the tracee's `[vdso]` ELF image (read from its memory), find the
//! entry points of the time functions and overwrite each with `mov $nr,%eax; syscall; ret`, so
//! that the call becomes a real syscall that seccomp traces.
//!
//! On Linux 6.18 the vDSO area is three mappings, `[vvar]`, `[vvar_vclock]` (data pages the
//! vDSO code reads) and `[vdso]` (the ELF image with the code); only `[vdso]` is parsed and
//! patched. The data pages are left alone: nothing reads them once the entry points no longer
//! do.
//!
//! `getrandom` has had a vDSO entry since 6.11 (glibc 2.41+ uses it). Its interface is not the
//! syscall's, so it is patched to return `-ENOSYS`, which makes glibc fall back to the
//! `getrandom` syscall (traced).

use crate::event::PatchedSymbol;
use crate::syscalls::nr;

/// Errors of vDSO parsing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VdsoError {
    /// Not a 64-bit little-endian ELF image.
    #[error("not an ELF64 little-endian image")]
    NotElf,
    /// A header or table points outside the image.
    #[error("truncated or inconsistent ELF: {0}")]
    Truncated(&'static str),
    /// No dynamic symbol table.
    #[error("no .dynsym section")]
    NoDynsym,
}

/// A function symbol of the vDSO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    /// Its name (`__vdso_clock_gettime`, `clock_gettime`, ...).
    pub name: String,
    /// Offset of its code from the start of the `[vdso]` mapping.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Little-endian integers at a byte offset of an ELF image; `None` past its end (also used by
/// the code scanner).
pub(crate) fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
pub(crate) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
pub(crate) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

const PT_LOAD: u32 = 1;
const SHT_DYNSYM: u32 = 11;
const STT_FUNC: u8 = 2;

/// The function symbols of a vDSO image (the bytes of the `[vdso]` mapping).
pub fn symbols(image: &[u8]) -> Result<Vec<Symbol>, VdsoError> {
    if image.get(..4) != Some(b"\x7fELF".as_slice())
        || image.get(4) != Some(&2)
        || image.get(5) != Some(&1)
    {
        return Err(VdsoError::NotElf);
    }
    let t = VdsoError::Truncated;
    let phoff = u64_at(image, 0x20).ok_or(t("e_phoff"))? as usize;
    let shoff = u64_at(image, 0x28).ok_or(t("e_shoff"))? as usize;
    let phentsize = usize::from(u16_at(image, 0x36).ok_or(t("e_phentsize"))?);
    let phnum = usize::from(u16_at(image, 0x38).ok_or(t("e_phnum"))?);
    let shentsize = usize::from(u16_at(image, 0x3a).ok_or(t("e_shentsize"))?);
    let shnum = usize::from(u16_at(image, 0x3c).ok_or(t("e_shnum"))?);

    // Where vaddr v lives in the image: v - p_vaddr + p_offset of the first PT_LOAD.
    // Start of entry i of a table at `base` with entries of `size`, inside the image.
    let entry = |base: usize, i: usize, size: usize, what: &'static str| {
        i.checked_mul(size)
            .and_then(|o| o.checked_add(base))
            .filter(|&o| o <= image.len())
            .ok_or(VdsoError::Truncated(what))
    };
    let mut load = None;
    for i in 0..phnum {
        let ph = entry(phoff, i, phentsize, "program header")?;
        if u32_at(image, ph).ok_or(t("program header"))? == PT_LOAD {
            let off = u64_at(image, ph + 8).ok_or(t("p_offset"))?;
            let vaddr = u64_at(image, ph + 16).ok_or(t("p_vaddr"))?;
            load = Some((off, vaddr));
            break;
        }
    }
    let (load_off, load_vaddr) = load.ok_or(t("no PT_LOAD"))?;

    let section = |i: usize| -> Result<(u32, u64, u64, u32, u64), VdsoError> {
        let sh = entry(shoff, i, shentsize, "section header")?;
        Ok((
            u32_at(image, sh + 4).ok_or(t("sh_type"))?,
            u64_at(image, sh + 24).ok_or(t("sh_offset"))?,
            u64_at(image, sh + 32).ok_or(t("sh_size"))?,
            u32_at(image, sh + 40).ok_or(t("sh_link"))?,
            u64_at(image, sh + 56).ok_or(t("sh_entsize"))?,
        ))
    };
    let mut dynsym = None;
    for i in 0..shnum {
        let s = section(i)?;
        if s.0 == SHT_DYNSYM {
            dynsym = Some(s);
            break;
        }
    }
    let (_, sym_off, sym_size, link, entsize) = dynsym.ok_or(VdsoError::NoDynsym)?;
    let (_, str_off, str_size, _, _) = section(link as usize)?;
    let str_end = str_off.checked_add(str_size).ok_or(t("dynstr"))?;
    let strtab = image
        .get(str_off as usize..str_end as usize)
        .ok_or(t("dynstr"))?;
    let entsize = if entsize == 0 { 24 } else { entsize as usize };
    let mut out = Vec::new();
    for i in 0..(sym_size as usize / entsize) {
        let s = entry(sym_off as usize, i, entsize, "dynsym")?;
        let name_off = u32_at(image, s).ok_or(t("st_name"))? as usize;
        let info = *image.get(s + 4).ok_or(t("st_info"))?;
        let shndx = u16_at(image, s + 6).ok_or(t("st_shndx"))?;
        let value = u64_at(image, s + 8).ok_or(t("st_value"))?;
        let size = u64_at(image, s + 16).ok_or(t("st_size"))?;
        if info & 0xf != STT_FUNC || shndx == 0 {
            continue;
        }
        let name_bytes = strtab.get(name_off..).ok_or(t("symbol name"))?;
        let end = name_bytes
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_bytes.len());
        let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
        let offset = value
            .checked_sub(load_vaddr)
            .and_then(|v| v.checked_add(load_off))
            .ok_or(t("symbol outside PT_LOAD"))?;
        out.push(Symbol { name, offset, size });
    }
    Ok(out)
}

/// `mov $nr,%eax; syscall; ret`.
pub fn syscall_stub(nr: u32) -> [u8; 8] {
    let n = nr.to_le_bytes();
    [0xb8, n[0], n[1], n[2], n[3], 0x0f, 0x05, 0xc3]
}

/// `mov $-38,%rax; ret` (returns -ENOSYS).
pub const ENOSYS_STUB: [u8; 8] = [0x48, 0xc7, 0xc0, 0xda, 0xff, 0xff, 0xff, 0xc3];

/// What to do to one entry point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// All names at this address.
    pub names: Vec<String>,
    /// Offset from the start of the `[vdso]` mapping.
    pub offset: u64,
    /// The stub.
    pub bytes: [u8; 8],
    /// The syscall the stub makes (`None`: the -ENOSYS stub).
    pub syscall: Option<u32>,
}

impl Patch {
    /// The event form, for a mapping at `base`.
    pub fn to_event(&self, base: u64) -> PatchedSymbol {
        PatchedSymbol {
            names: self.names.clone(),
            addr: base + self.offset,
            syscall: self.syscall,
        }
    }
}

/// What to patch, and the entry points too small for a stub (reported, not patched).
pub fn plan(symbols: &[Symbol]) -> (Vec<Patch>, Vec<Symbol>) {
    let mut patches: Vec<Patch> = Vec::new();
    let mut too_small = Vec::new();
    for s in symbols {
        let base = s.name.strip_prefix("__vdso_").unwrap_or(&s.name);
        let syscall = match base {
            "clock_gettime" => Some(nr::CLOCK_GETTIME),
            "gettimeofday" => Some(nr::GETTIMEOFDAY),
            "time" => Some(nr::TIME),
            "getcpu" => Some(nr::GETCPU),
            "getrandom" => None,
            _ => continue,
        };
        if s.size != 0 && s.size < 8 {
            too_small.push(s.clone());
            continue;
        }
        if let Some(p) = patches.iter_mut().find(|p| p.offset == s.offset) {
            p.names.push(s.name.clone());
            continue;
        }
        patches.push(Patch {
            names: vec![s.name.clone()],
            offset: s.offset,
            bytes: syscall.map(syscall_stub).unwrap_or(ENOSYS_STUB),
            syscall,
        });
    }
    patches.sort_by_key(|p| p.offset);
    (patches, too_small)
}

/// The `[vdso]` mapping `(start, end)` in a `/proc/PID/maps` text.
pub fn find_mapping(maps: &str) -> Option<(u64, u64)> {
    let line = maps.lines().find(|l| l.trim_end().ends_with("[vdso]"))?;
    let range = line.split_whitespace().next()?;
    let (a, b) = range.split_once('-')?;
    Some((
        u64::from_str_radix(a, 16).ok()?,
        u64::from_str_radix(b, 16).ok()?,
    ))
}

/// What [`patch_process`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patched {
    /// Where the `[vdso]` mapping starts.
    pub base: u64,
    /// The entry points patched.
    pub patches: Vec<Patch>,
    /// Entry points left alone because a stopped thread was inside one (their calls are not
    /// recorded), by name.
    pub skipped: Vec<String>,
    /// The address of a `syscall` instruction in a patched stub, through which syscalls can be
    /// injected into the process.
    pub syscall_insn: Option<u64>,
}

/// Patches the vDSO of process `tgid` (read and written through its thread `tid`, stopped):
/// its time entry points make the real syscalls, so the recorder (and a replayer) see them.
/// `avoid` are addresses where stopped threads will resume: no stub may cover one. `None`
/// when the process has no vDSO.
pub fn patch_process<T: crate::ptrace::Tracer>(
    tracer: &mut T,
    tgid: crate::event::Tid,
    tid: crate::event::Tid,
    avoid: &[u64],
) -> std::io::Result<Option<Patched>> {
    let maps = tracer.maps(tgid)?;
    let Some((start, end)) = find_mapping(&maps) else {
        return Ok(None);
    };
    let len = usize::try_from(end.saturating_sub(start)).unwrap_or(0);
    let image = tracer.read_mem(tid, start, len)?;
    let symbols =
        symbols(&image).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let (mut patches, too_small) = plan(&symbols);
    let mut skipped = Vec::new();
    patches.retain(|p| {
        let at = start + p.offset;
        let hit = avoid
            .iter()
            .any(|&ip| ip >= at && ip < at + p.bytes.len() as u64);
        if hit {
            skipped.push(p.names.join("/"));
        }
        !hit
    });
    for s in &too_small {
        tracing::warn!(tgid, symbol = %s.name, size = s.size, "vDSO entry too small to patch");
    }
    for p in &patches {
        tracer.write_mem(tid, start + p.offset, &p.bytes)?;
    }
    // The stub's `syscall` instruction, 5 bytes in.
    let syscall_insn = patches
        .iter()
        .find(|p| p.syscall.is_some())
        .map(|p| start + p.offset + 5);
    Ok(Some(Patched {
        base: start,
        patches,
        skipped,
        syscall_insn,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_vdso() -> Vec<u8> {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        let (start, end) = find_mapping(&maps).expect("this process has a vDSO");
        // SAFETY: the [vdso] mapping of this very process is readable for its whole extent.
        unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) }.to_vec()
    }

    #[test]
    fn finds_the_mapping_among_the_three() {
        let maps = "7ffd1000-7ffd5000 r--p 00000000 00:00 0                          [vvar]\n\
                    7ffd5000-7ffd7000 r--p 00000000 00:00 0                          [vvar_vclock]\n\
                    7ffd7000-7ffd9000 r-xp 00000000 00:00 0                          [vdso]\n";
        assert_eq!(find_mapping(maps), Some((0x7ffd7000, 0x7ffd9000)));
        assert_eq!(find_mapping("nothing here"), None);
    }

    #[test]
    fn parses_this_kernels_vdso() {
        let image = own_vdso();
        let syms = symbols(&image).expect("parse");
        let names: Vec<&str> = syms.iter().map(|s| s.name.as_str()).collect();
        for want in ["__vdso_clock_gettime", "__vdso_gettimeofday", "__vdso_time"] {
            assert!(names.contains(&want), "{want} not in {names:?}");
        }
        let (patches, small) = plan(&syms);
        assert!(small.is_empty(), "{small:?}");
        let cg = patches
            .iter()
            .find(|p| p.names.iter().any(|n| n == "__vdso_clock_gettime"))
            .expect("clock_gettime patch");
        assert!(
            cg.names.iter().any(|n| n == "clock_gettime"),
            "alias grouped: {cg:?}"
        );
        assert_eq!(cg.syscall, Some(228));
        assert!((cg.offset as usize) < image.len());
        // Each patch targets a distinct address.
        for w in patches.windows(2) {
            assert!(w[0].offset + 8 <= w[1].offset);
        }
    }

    #[test]
    fn stubs() {
        assert_eq!(syscall_stub(228), [0xb8, 0xe4, 0, 0, 0, 0x0f, 0x05, 0xc3]);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(symbols(b"not an elf"), Err(VdsoError::NotElf));
        let mut hdr = vec![0u8; 64];
        hdr[..6].copy_from_slice(b"\x7fELF\x02\x01");
        hdr[0x20] = 0xff; // e_phoff far outside
        hdr[0x38] = 1; // one program header
        assert!(matches!(symbols(&hdr), Err(VdsoError::Truncated(_))));
    }
}
